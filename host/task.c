/*
** task.c: the task scheduler.
**
** A task is a Lua thread with an lh_task beside it. It runs until it waits:
** the C function that waits (so.read, so.accept, ...) registers the task
** with the object it waits on, marks it LH_TASK_WAITING and yields. The
** libuv callback that completes the wait pushes the results onto the
** task's stack and resumes it, straight from the loop (depth 0), so a
** resume never nests inside another. Tasks woken from inside a running
** task (a close that ends another task's wait, a task that ends and wakes
** its joiners) go to the ready queue, run after the loop's next poll.
**
** A plain coroutine.yield inside a task leaves the task LH_TASK_RUNNING:
** that is how its yield is told apart from the host's, and it means "run
** me again on the next loop turn".
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "luahost.h"

#define TASK_TNAME "task"

lh_host lh_H;
static lh_task *main_task;

static void run(lh_task *t, int nargs, lua_State *from);

/*
** The task whose own thread L is, or NULL. New threads copy the main
** thread's extra space, which main.c zeroes, so a script's own coroutines
** read as NULL here (coro.c tags them when a task resumes them).
*/
lh_task *lh_task_current(lua_State *L) {
  uintptr_t x = LH_EXTRA(L);
  return (x & LH_EXTRA_TAGS) ? NULL : (lh_task *)x;
}

/*
** The task that calls a function that may wait, or an error. L is the
** task's thread, or a script's coroutine that a task resumed (coro.c
** passes its waits up). Waiting is only possible where the host can
** resume: not across a C boundary (a metamethod, table.sort, a gsub
** callback) that would refuse the yield after the wait was registered.
*/
lh_task *lh_checktask_caller(lua_State *L, const char *what) {
  lh_task *t = (lh_task *)(LH_EXTRA(L) & ~LH_EXTRA_TAGS);
  if (t == NULL)
    luaL_error(L, "%s: not in a task (call it from the script, from a "
               "function started by so.spawn, or from a coroutine one of "
               "them resumes)", what);
  if (!lua_isyieldable(L))
    luaL_error(L, "%s: cannot wait across a C call boundary "
               "(metamethod, iterator or C function)", what);
  return t;
}

/*
** A timeout argument in seconds (nil or none for no timeout), as
** milliseconds; -1 for none.
*/
int64_t lh_checktimeout(lua_State *L, int arg) {
  lua_Number s;
  if (lua_isnoneornil(L, arg))
    return -1;
  s = luaL_checknumber(L, arg);
  luaL_argcheck(L, s >= 0 && s < 1e12, arg, "timeout out of range");
  return (int64_t)ceil(s * 1000);
}


/* {======================================================
** Waiting and waking
** ======================================================= */

static void on_deadline(uv_timer_t *timer) {
  lh_task *t = timer->data;
  if (lh_H.L == NULL)
    return;
  if (t->cancel == NULL) {  /* so.sleep: the deadline is the point */
    lh_resume(t, 0);
    return;
  }
  t->cancel(t);  /* the object forgets this task */
  lua_pushnil(t->co);
  lh_pusherror_values(t->co, UV_ETIMEDOUT);
  lh_resume(t, 3);  /* nil, "ETIMEDOUT: ...", "ETIMEDOUT" */
}

/*
** Registers nothing itself: the caller has already told the object it
** waits on. Marks the task waiting, starts its deadline and yields; the
** results are whatever the completing callback pushes.
*/
int lh_wait(lua_State *L, lh_task *t, void *on, lh_cancel_fn cancel,
            int64_t timeout_ms) {
  return lh_waitk(L, t, on, cancel, timeout_ms, 0, NULL);
}

/*
** lh_wait with a continuation, for a function that has more to do with
** the results (so.connect returns the conn it made).
*/
int lh_waitk(lua_State *L, lh_task *t, void *on, lh_cancel_fn cancel,
             int64_t timeout_ms, lua_KContext ctx, lua_KFunction k) {
  t->status = LH_TASK_WAITING;
  t->waiting_on = on;
  t->cancel = cancel;
  if (L != t->co)
    lh_H.nested_wait = 1;  /* coro.c passes the wait up to the task */
  if (timeout_ms >= 0) {
    if (t->timer == NULL) {
      t->timer = malloc(sizeof *t->timer);
      if (t->timer == NULL) {
        t->status = LH_TASK_RUNNING;
        if (cancel) cancel(t);
        return luaL_error(L, "not enough memory");
      }
      uv_timer_init(lh_H.loop, t->timer);
      t->timer->data = t;
    }
    uv_timer_start(t->timer, on_deadline, (uint64_t)timeout_ms, 0);
  }
  return lua_yieldk(L, 0, ctx, k);
}

/*
** The wait completed normally: forget it and stop the deadline.
*/
void lh_wait_end(lh_task *t) {
  t->cancel = NULL;
  t->waiting_on = NULL;
  if (t->timer != NULL)
    uv_timer_stop(t->timer);
}

/*
** An active idle handle only makes the loop's poll non-blocking while
** tasks are queued; the queue itself runs in the check phase.
*/
static void on_idle(uv_idle_t *idle) {
  (void)idle;
}

static void ready_push(lh_task *t, int nargs) {
  t->nargs = nargs;
  t->queued = 1;
  t->next = NULL;
  if (lh_H.ready_tail)
    lh_H.ready_tail->next = t;
  else {
    lh_H.ready_head = t;
    uv_idle_start(&lh_H.ready_idle, on_idle);
  }
  lh_H.ready_tail = t;
}

/*
** Queues a task whose wait ended (results already on its stack) to run
** after the next poll. For wakes from inside a running task.
*/
void lh_wake(lh_task *t, int nargs) {
  lh_wait_end(t);
  ready_push(t, nargs);
}

/*
** Resumes a waiting task with nargs results on its stack. Called from
** libuv callbacks, i.e. from the loop; should it ever run inside a task,
** it queues instead of nesting.
*/
void lh_resume(lh_task *t, int nargs) {
  lh_wait_end(t);
  if (lh_H.L == NULL)
    return;  /* shutting down: nobody runs any more */
  if (lh_H.depth > 0)
    ready_push(t, nargs);
  else
    run(t, nargs, lh_H.L);
}

/*
** Resumes a task with the outcome of a request: true, or nil, msg, name.
*/
void lh_resume_status(lh_task *t, int status) {
  if (status < 0) {
    lua_pushnil(t->co);
    lh_pusherror_values(t->co, status);
    lh_resume(t, 3);  /* nil, msg, name */
  } else {
    lua_pushboolean(t->co, 1);
    lh_resume(t, 1);  /* true */
  }
}

static void on_ready(uv_check_t *check) {
  lh_task *last = lh_H.ready_tail;
  (void)check;
  /* Run what is queued now; what these tasks queue runs next turn, so a
     task that yields in a loop cannot starve the network. */
  while (lh_H.ready_head != NULL && lh_H.L != NULL) {
    lh_task *t = lh_H.ready_head;
    lh_H.ready_head = t->next;
    if (lh_H.ready_head == NULL)
      lh_H.ready_tail = NULL;
    t->queued = 0;
    t->next = NULL;
    run(t, t->nargs, lh_H.L);
    if (t == last)
      break;
  }
  if (lh_H.ready_head == NULL)
    uv_idle_stop(&lh_H.ready_idle);
}

/* }====================================================== */


/* {======================================================
** Running and ending
** ======================================================= */

static void free_timer(uv_handle_t *h) {
  free(h);
}

/*
** Wakes every task waiting in so.join with true, results... or false, err.
** The results stay on the ended thread's stack (positions 1..nres) for
** joins that come later.
*/
static void wake_joiners(lh_task *t) {
  while (t->joiners != NULL) {
    lh_task *j = t->joiners;
    int i, n = t->nargs;
    t->joiners = j->next;
    j->next = NULL;
    if (!lua_checkstack(j->co, n + 1) || !lua_checkstack(t->co, 1)) {
      lua_pushnil(j->co);
      lua_pushliteral(j->co, "too many results to join");
      lh_wake(j, 2);
      continue;
    }
    lua_pushboolean(j->co, t->status == LH_TASK_DONE);
    for (i = 1; i <= n; i++) {
      lua_pushvalue(t->co, i);
      lua_xmove(t->co, j->co, 1);
    }
    lh_wake(j, n + 1);
  }
}

/*
** Formats an error value (1) as lua.c's message handler does, with the
** traceback of a thread (2) if there is one. Runs protected: a __tostring
** is script code and may raise.
*/
static int format_error(lua_State *L) {
  lua_State *co = lua_tothread(L, 2);
  const char *msg;
  if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER) {
    lua_pushvalue(L, 1);  /* a copy: tostring converts in place */
    msg = lua_tostring(L, -1);
  } else if (luaL_callmeta(L, 1, "__tostring") &&
             lua_type(L, -1) == LUA_TSTRING)
    msg = lua_tostring(L, -1);
  else
    msg = lua_pushfstring(L, "(error object is a %s value)",
                          luaL_typename(L, 1));
  if (co != NULL)
    luaL_traceback(L, co, msg, 0);
  return 1;
}

/*
** Prints the error value on top of L (and leaves it there), with co's
** traceback unless co is NULL, the way lua.c does.
*/
static void report(lua_State *L, lua_State *co, const char *what) {
  lua_pushcfunction(L, format_error);
  lua_pushvalue(L, -2);
  if (co != NULL) {
    lua_pushthread(co);
    lua_xmove(co, L, 1);
  } else
    lua_pushnil(L);
  if (lua_pcall(L, 2, 1, 0) != LUA_OK || lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    lua_pushliteral(L, "(error object cannot be printed)");
  }
  fprintf(stderr, "luahost: %s%s\n", what, lua_tostring(L, -1));
  fflush(stderr);
  lua_pop(L, 1);
}

/*
** What every end of a task shares: its deadline timer goes, its joiners
** wake, and it is no longer anchored (collectable once unreachable).
*/
static void release(lh_task *t) {
  if (t->timer != NULL) {
    uv_close((uv_handle_t *)t->timer, free_timer);
    t->timer = NULL;
  }
  wake_joiners(t);
  luaL_unref(lh_H.L, LUA_REGISTRYINDEX, t->ref);
  t->ref = LUA_NOREF;
  lh_H.ntasks--;
  if (t == main_task)
    main_task = NULL;
}

static void finish(lua_State *L, lh_task *t, int status, int nres) {
  lua_State *co = t->co;
  /* A task ends running, never registered with something it waits on;
     should a bug ever break that, the object must forget it here, or it
     would point at a task about to be collected. */
  if (t->cancel != NULL)
    t->cancel(t);
  lh_wait_end(t);
  if (status == LUA_OK) {
    t->status = LH_TASK_DONE;
    t->nargs = nres;
  } else {
    t->status = LH_TASK_FAILED;
    lua_checkstack(co, 2);  /* for report's pushthread */
    lua_pushvalue(co, -1);
    lua_xmove(co, L, 1);  /* L: error */
    report(L, co, "");
#if LUA_VERSION_NUM >= 504 && LUA_VERSION_RELEASE_NUM >= 50406
    lua_closethread(co, L);  /* runs pending <close> variables */
#else
    lua_resetthread(co);  /* runs pending <close> variables */
#endif
    /* The thread now holds the error value, or the error of a <close>
       handler that raised in its turn, which replaces it. */
    lua_xmove(co, L, 1);  /* L: error final */
    if (!lua_rawequal(L, -1, -2))
      report(L, NULL, "error in a <close> variable: ");
    lua_settop(co, 0);
    lua_xmove(L, co, 1);  /* the final error is the task's "result" */
    lua_pop(L, 1);
    t->nargs = 1;
  }
  if (t == main_task && status != LUA_OK) {  /* the script raised: exit 1 */
    lh_H.exit_status = 1;
    uv_stop(lh_H.loop);
  }
  release(t);
}

/*
** Resumes t with nargs values on its stack. `from` is the state that
** resumes: the main state from the loop, the spawning task in so.spawn.
*/
static void run(lh_task *t, int nargs, lua_State *from) {
  int nres, status;
  t->status = LH_TASK_RUNNING;
  lh_H.depth++;
  status = lua_resume(t->co, from, nargs, &nres);
  lh_H.depth--;
  if (status == LUA_YIELD) {
    lua_pop(t->co, nres);
    if (t->status != LH_TASK_WAITING)  /* a plain coroutine.yield */
      ready_push(t, 0);
  } else
    finish(lh_H.L, t, status, nres);
}

/*
** Creates a task for the function on top of L (pops it) and pushes the
** task handle.
*/
static lh_task *newtask(lua_State *L) {
  lh_task *t = lua_newuserdatauv(L, sizeof *t, 1);  /* fn ud */
  memset(t, 0, sizeof *t);
  t->tag = LH_TAG_TASK;
  t->ref = LUA_NOREF;
  luaL_setmetatable(L, TASK_TNAME);
  t->co = lua_newthread(L);  /* fn ud co */
  *(lh_task **)lua_getextraspace(t->co) = t;
  lua_setiuservalue(L, -2, 1);  /* fn ud; ud keeps the thread alive */
  lua_pushvalue(L, -1);
  t->ref = luaL_ref(L, LUA_REGISTRYINDEX);  /* the task keeps itself alive */
  lua_rotate(L, -2, 1);  /* ud fn */
  lua_xmove(L, t->co, 1);  /* ud */
  lh_H.ntasks++;
  return t;
}

/*
** so.spawn(fn, ...): starts a task and runs it until it first waits, as
** calling an async function does in JavaScript; returns the task.
*/
static int so_spawn(lua_State *L) {
  int nargs = lua_gettop(L) - 1;
  lh_task *t;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_checkstack(L, 3, NULL);
  lua_pushvalue(L, 1);
  t = newtask(L);  /* fn args... task */
  if (!lua_checkstack(t->co, nargs + 1))
    return luaL_error(L, "too many arguments to spawn");
  lua_rotate(L, 2, 1);  /* fn task args... */
  lua_xmove(L, t->co, nargs);  /* fn task */
  /* Each spawn inside a task nests a resume; deep chains of tasks that
     spawn before they first wait would reach Lua's C-call limit, so past
     a depth the new task starts on the next loop turn instead. */
  if (lh_H.depth >= LH_MAX_NESTED_SPAWNS)
    ready_push(t, nargs);
  else
    run(t, nargs, L);
  return 1;  /* the task */
}

/*
** Starts the script: its chunk and its arguments are on L's stack.
*/
int lh_spawn_main(lua_State *L, int nargs) {
  lh_task *t;
  lua_rotate(L, -nargs - 1, -1);  /* args... chunk */
  t = newtask(L);  /* args... task */
  if (!lua_checkstack(t->co, nargs + 1))
    return luaL_error(L, "too many arguments to the script");
  lua_rotate(L, -nargs - 1, 1);  /* task args... */
  lua_xmove(L, t->co, nargs);  /* task */
  main_task = t;
  run(t, nargs, L);
  lua_pop(L, 1);
  return 0;
}

/* }====================================================== */


/* {======================================================
** so.join, so.sleep, so.now, so.stats
** ======================================================= */

static void cancel_join(lh_task *self) {
  lh_task *t = self->waiting_on;  /* the task being joined */
  lh_task **p = &t->joiners;
  while (*p != NULL && *p != self)
    p = &(*p)->next;
  if (*p == self)
    *p = self->next;
  self->next = NULL;
}

/*
** so.join(task [, timeout]): waits until task ends; true, results... or
** false, error value; nil, "ETIMEDOUT: ..." if the timeout passes first.
*/
static int so_join(lua_State *L) {
  lh_task *t = lh_checkobj(L, 1, LH_TAG_TASK, TASK_TNAME);
  int64_t timeout = lh_checktimeout(L, 2);
  lh_task *self;
  if (t->status == LH_TASK_DONE || t->status == LH_TASK_FAILED) {
    int i, n = t->nargs;
    luaL_checkstack(L, n + 1, "too many results to join");
    if (!lua_checkstack(t->co, 1))
      return luaL_error(L, "too many results to join");
    lua_pushboolean(L, t->status == LH_TASK_DONE);
    for (i = 1; i <= n; i++) {
      lua_pushvalue(t->co, i);
      lua_xmove(t->co, L, 1);
    }
    return n + 1;  /* true, results... or false, error */
  }
  self = lh_checktask_caller(L, "join");
  luaL_argcheck(L, self != t, 1, "a task cannot join itself");
  self->next = t->joiners;
  t->joiners = self;
  return lh_wait(L, self, t, cancel_join, timeout);
}

/* so.sleep(seconds): yields for that long. */
static int so_sleep(lua_State *L) {
  int64_t ms = lh_checktimeout(L, 1);
  lh_task *self;
  luaL_argcheck(L, ms >= 0, 1, "number expected");
  self = lh_checktask_caller(L, "sleep");
  return lh_wait(L, self, NULL, NULL, ms);
}

/* so.now(): the loop's time in seconds, as of the current loop turn. */
static int so_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_now(lh_H.loop) / 1000.0);
  return 1;
}

/* so.stats(): live tasks, conns and listeners, for leak checks. */
static int so_stats(lua_State *L) {
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, lh_H.ntasks);
  lua_setfield(L, -2, "tasks");
  lua_pushinteger(L, lh_H.nconns);
  lua_setfield(L, -2, "conns");
  lua_pushinteger(L, lh_H.nlisteners);
  lua_setfield(L, -2, "listeners");
  return 1;
}

static int task_tostring(lua_State *L) {
  lh_task *t = lh_checkobj(L, 1, LH_TAG_TASK, TASK_TNAME);
  static const char *const names[] = {"running", "waiting", "done", "failed"};
  lua_pushfstring(L, "task (%s): %p", names[t->status], (void *)t);
  return 1;
}

/*
** Only at lua_close (lh_H.L is NULL then) can a task with a deadline timer
** be collected: a live task is referenced from the registry.
*/
static int task_gc(lua_State *L) {
  lh_task *t = lua_touserdata(L, 1);
  if (t == NULL || lua_rawlen(L, 1) != sizeof *t || t->tag != LH_TAG_TASK)
    return 0;  /* a script calling __gc by hand with something else */
  if (lh_H.L != NULL)
    return 0;  /* called by hand: a live task keeps its timer */
  if (t->timer != NULL) {
    uv_close((uv_handle_t *)t->timer, free_timer);
    t->timer = NULL;
  }
  return 0;
}

static const luaL_Reg task_funcs[] = {
  {"spawn", so_spawn},
  {"join", so_join},
  {"sleep", so_sleep},
  {"now", so_now},
  {"stats", so_stats},
  {NULL, NULL}
};

/*
** Adds the task functions to the module table on top of L and creates the
** task metatable.
*/
void lh_task_open(lua_State *L) {
  luaL_setfuncs(L, task_funcs, 0);
  luaL_newmetatable(L, TASK_TNAME);
  lua_pushcfunction(L, task_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, task_gc);
  lua_setfield(L, -2, "__gc");
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, so_join);
  lua_setfield(L, -2, "join");
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

void lh_sched_init(void) {
  uv_check_init(lh_H.loop, &lh_H.ready_check);
  uv_check_start(&lh_H.ready_check, on_ready);
  uv_unref((uv_handle_t *)&lh_H.ready_check);
  uv_idle_init(lh_H.loop, &lh_H.ready_idle);
}

/* }====================================================== */
