/*
** coro.c: coroutine.resume, coroutine.wrap and coroutine.close, made to
** live with tasks.
**
** A script's own coroutines may wait for the network when a task resumes
** them (an iterator built with coroutine.wrap that reads a conn, as
** OpenResty allows): the wait registers the task, the coroutine yields,
** and resume, seeing the host's wait, yields its caller in turn, up to the
** task's thread. When the wait completes, the host resumes the task, and
** each resume on the way down hands the results to the coroutine below.
**
** A task's own thread is never resumed or closed by a script (a script
** reaches it with coroutine.running): only the host resumes a task, with
** the results of what it waits for.
*/
#include "luahost.h"

static int resume(lua_State *L, lua_State *co, int nargs, int wrap,
                  int again);

enum { CO_RUNNING, CO_SUSPENDED, CO_NORMAL, CO_DEAD };

/* What coroutine.status says of co, seen from L (lcorolib's auxstatus). */
static int costatus(lua_State *L, lua_State *co) {
  lua_Debug ar;
  if (L == co)
    return CO_RUNNING;
  switch (lua_status(co)) {
    case LUA_YIELD:
      return CO_SUSPENDED;
    case LUA_OK:
      if (lua_getstack(co, 0, &ar))
        return CO_NORMAL;  /* it resumed another coroutine */
      return lua_gettop(co) == 0 ? CO_DEAD : CO_SUSPENDED;  /* not started */
    default:
      return CO_DEAD;  /* it failed */
  }
}

/*
** Refuses what a script must not resume or close: a task's own thread, or
** a coroutine suspended in a wait of the host's (its task will resume it).
*/
static lua_State *checkco(lua_State *L, lua_State *co, const char *what) {
  uintptr_t x = LH_EXTRA(co);
  if (lh_task_current(co) != NULL)
    luaL_error(L, "cannot %s a task%s", what, *what == 'r'
               ? " (the host resumes it; so.join waits for it)" : "");
  if (x & LH_WAITING)
    luaL_error(L, "cannot %s a coroutine that waits in the host", what);
  return co;
}

/* After a wait passed up from co: hand its results down, resume again. */
static int k_resume(lua_State *L, int status, lua_KContext ctx) {
  int wrap = (int)(ctx & 1), base = (int)(ctx >> 1);
  lua_State *co = lua_tothread(L, wrap ? lua_upvalueindex(1) : 1);
  (void)status;
  LH_EXTRA(co) &= ~LH_WAITING;
  return resume(L, co, lua_gettop(L) - base, wrap, base);
}

#define DEADLINES "luahost.deadlines"

/*
** A so.deadline belongs to the code inside its function: when that code
** is a coroutine that yields out (a generator), the resumer goes on under
** its own deadline, and the coroutine gets its own back when resumed.
** What a coroutine keeps is in a weak table, flagged LH_OWNDL.
*/
static int64_t own_deadline(lua_State *L, lua_State *co, int64_t outer) {
  int64_t d;
  lua_getfield(L, LUA_REGISTRYINDEX, DEADLINES);
  lua_pushthread(co);
  lua_xmove(co, L, 1);
  lua_rawget(L, -2);
  d = (int64_t)lua_tointeger(L, -1);
  lua_pop(L, 2);
  return (outer >= 0 && outer < d) ? outer : d;
}

static void keep_deadline(lua_State *L, lua_State *co, int64_t d) {
  luaL_checkstack(L, 4, NULL);
  if (luaL_getsubtable(L, LUA_REGISTRYINDEX, DEADLINES) == 0) {
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_pushvalue(L, -1);
    lua_setmetatable(L, -2);
  }
  lua_pushthread(co);
  lua_xmove(co, L, 1);
  lua_pushinteger(L, (lua_Integer)d);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

/*
** Resumes co with the nargs values on top of L, as lcorolib's auxresume
** does, and returns what coroutine.resume (or a wrap function) returns.
** `again` (the stack index of the saved deadline) when k_resume resumes
** co after a wait it passed up, else 0.
*/
static int resume(lua_State *L, lua_State *co, int nargs, int wrap,
                  int again) {
  uintptr_t mine = LH_EXTRA(L) & ~LH_EXTRA_TAGS;
  lh_task *task = (lh_task *)mine;
  int64_t outer = -1;
  /* Only a suspended coroutine is retagged: a running or normal one (this
     very chain of resumes) keeps its tag, and lua_resume refuses it. */
  int suspended = costatus(L, co) == CO_SUSPENDED;
  int status, nres, kind;
  lua_State *prev;
  if (!lua_checkstack(co, nargs)) {
    lua_pushliteral(L, "too many arguments to resume");
    status = LUA_ERRRUN;
    goto failed;
  }
  if (task != NULL) {
    outer = again ? (int64_t)lua_tointeger(L, again) : task->deadline;
    if (!again && (LH_EXTRA(co) & LH_OWNDL))
      task->deadline = own_deadline(L, co, outer);
  }
  lua_xmove(L, co, nargs);
  /* Inside a task, and able to pass a yield up: co may wait too. */
  if (suspended)
    LH_EXTRA(co) = ((mine != 0 && lua_isyieldable(L)) ? (mine | LH_NESTED)
                    : 0) | (LH_EXTRA(co) & LH_OWNDL);
  prev = lh_guard_enter(co);
  status = lua_resume(co, L, nargs, &nres);
  lh_guard_leave(prev);
  kind = status == LUA_YIELD ? lh_yieldkind(co, nres) : LH_YIELD_PLAIN;
  if (kind != LH_YIELD_PLAIN) {
    /* A yield of the host's: co is tagged, so L could yield when it
       resumed co, and still can. */
    if (kind == LH_YIELD_CANCEL) {
      /* The task is being cancelled: close co (its <close> variables run,
         innermost first), and go on unwinding up to the task. */
      lua_pop(co, nres);
      LH_EXTRA(co) = 0;
      if (lh_closethread(co, L) != LUA_OK)
        lua_pop(co, 1);  /* an error of a <close> handler: the task ends */
      return lh_unwind(L);
    }
    LH_EXTRA(co) |= LH_WAITING;
    if (!again)
      lua_pushinteger(L, (lua_Integer)outer);  /* kept for after the wait */
    lua_xmove(co, L, 1);  /* the marker: pass the wait up */
    return lua_yieldk(L, 1, (lua_KContext)(lua_gettop(L) - 1) << 1 | wrap,
                      k_resume);
  }
  if (task != NULL) {  /* co is out of the way: the resumer's deadline */
    if (status == LUA_YIELD && task->deadline != outer) {
      keep_deadline(L, co, task->deadline);
      LH_EXTRA(co) |= LH_OWNDL;
    } else
      LH_EXTRA(co) &= ~LH_OWNDL;
    task->deadline = outer;
  }
  if (suspended)  /* whoever resumes it next says what it is */
    LH_EXTRA(co) &= LH_OWNDL;
  if (status == LUA_OK || status == LUA_YIELD) {
    if (!lua_checkstack(L, nres + 1)) {
      lua_pop(co, nres);
      lua_pushliteral(L, "too many results to resume");
      status = LUA_ERRRUN;
      goto failed;
    }
    lua_xmove(co, L, nres);
    if (wrap)
      return nres;
    lua_pushboolean(L, 1);
    lua_insert(L, -(nres + 1));
    return nres + 1;  /* true, results... */
  }
  lua_xmove(co, L, 1);  /* the error */
failed:
  if (!wrap) {
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;  /* false, error */
  }
  /* As lcorolib's auxwrap: close a coroutine that failed, and add the
     position to a string error. */
  if (lua_status(co) != LUA_OK && lua_status(co) != LUA_YIELD) {
    status = lh_closethread(co, L);
    lua_pop(L, 1);
    lua_xmove(co, L, 1);  /* the error after closing */
  }
  if (status != LUA_ERRMEM && lua_type(L, -1) == LUA_TSTRING) {
    luaL_where(L, 1);
    lua_insert(L, -2);
    lua_concat(L, 2);
  }
  return lua_error(L);
}

static int co_resume(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  luaL_argexpected(L, co, 1, "thread");
  if (lh_task_current(co) != NULL || (LH_EXTRA(co) & LH_WAITING)) {
    lua_pushboolean(L, 0);  /* fail as for a coroutine not suspended */
    lua_pushstring(L, lh_task_current(co) != NULL
                   ? "cannot resume a task (the host resumes it; so.join "
                     "waits for it)"
                   : "cannot resume a coroutine that waits in the host");
    return 2;
  }
  return resume(L, co, lua_gettop(L) - 1, 0, 0);
}

static int co_wrapped(lua_State *L) {
  lua_State *co = lua_tothread(L, lua_upvalueindex(1));
  checkco(L, co, "resume");
  return resume(L, co, lua_gettop(L), 1, 0);
}

static int co_wrap(lua_State *L) {
  lua_State *co;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  co = lua_newthread(L);
  lua_pushvalue(L, 1);
  lua_xmove(L, co, 1);  /* the body */
  lua_pushcclosure(L, co_wrapped, 1);
  return 1;
}

/*
** coroutine.close, as lcorolib's, refusing a task or a coroutine in a
** host wait.
*/
static int co_close(lua_State *L) {
  static const char *const names[] = {"running", "suspended", "normal",
                                      "dead"};
  lua_State *co = lua_tothread(L, 1);
  int status;
  luaL_argexpected(L, co, 1, "thread");
  checkco(L, co, "close");
  status = costatus(L, co);
  if (status != CO_SUSPENDED && status != CO_DEAD)
    return luaL_error(L, "cannot close a %s coroutine", names[status]);
  status = lh_closethread(co, L);
  if (status == LUA_OK) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushboolean(L, 0);
  lua_xmove(co, L, 1);  /* the error */
  return 2;
}

/*
** Replaces coroutine.resume, coroutine.wrap and coroutine.close.
*/
void lh_coro_open(lua_State *L) {
  lua_getglobal(L, "coroutine");
  lua_pushcfunction(L, co_resume);
  lua_setfield(L, -2, "resume");
  lua_pushcfunction(L, co_wrap);
  lua_setfield(L, -2, "wrap");
  lua_pushcfunction(L, co_close);
  lua_setfield(L, -2, "close");
  lua_pop(L, 1);
}
