/*
** task.c: the task functions scripts call (so.spawn, so.join, so.sleep,
** so.now, so.stats) and the task handle, over the scheduler in sched.c.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahost.h"

static lh_task *checktask(lua_State *L, int arg) {
  return luaL_checkudata(L, arg, LH_TASK_TNAME);
}

/*
** so.spawn(fn, ...): starts a task and runs it until it first waits, as
** calling an async function does in JavaScript; returns the task.
*/
static int so_spawn(lua_State *L) {
  int nargs = lua_gettop(L) - 1;
  lh_task *t;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  if (lh_H.L == NULL)
    return luaL_error(L, "spawn: the host is shutting down");
  t = lh_newtask(L, 1);  /* fn args... task */
  lua_rotate(L, 2, 1);  /* fn task args... */
  lh_start(L, t, nargs);  /* fn task */
  return 1;  /* the task */
}


/* {======================================================
** so.join
** ======================================================= */

static void cancel_join(lh_task *self) {
  lh_task *t = self->wait.on;  /* the task being joined */
  lh_task **p = &t->u.joiners;
  while (*p != NULL && *p != self)
    p = &(*p)->next;
  if (*p == self)
    *p = self->next;
  self->next = NULL;
}

static void describe_join(lh_task *t, char *buf, size_t size) {
  snprintf(buf, size, "%llu",
           (unsigned long long)((lh_task *)t->wait.on)->id);
}

static const lh_waitkind join_kind = {"join", cancel_join, NULL, 0,
                                      describe_join};

/*
** so.join(task [, timeout]): waits until task ends; true, results... or
** false, error value; nil, "ETIMEDOUT: timed out" if the timeout passes
** first.
*/
static int so_join(lua_State *L) {
  lh_task *t = checktask(L, 1);
  int64_t timeout = lh_checktimeout(L, 2);
  lh_task *self;
  int n;
  if (lh_task_ended(t)) {
    n = lh_push_results(L, t);
    if (n < 0)
      return luaL_error(L, "too many results to join");
    return n;  /* true, results... or false, error */
  }
  self = lh_checktask_caller(L, "join");
  luaL_argcheck(L, self != t, 1, "a task cannot join itself");
  self->next = t->u.joiners;
  t->u.joiners = self;
  return lh_wait(L, self, &join_kind, t, timeout);
}

/* }====================================================== */


/* {======================================================
** so.cancel, so.deadline
** ======================================================= */

/*
** so.cancel(task): ends task wherever it waits; its <close> variables run
** before this returns. true, or false if it had ended already. A task
** that cancels itself ends here.
*/
static int so_cancel(lua_State *L) {
  lh_task *t = checktask(L, 1);
  if (lh_task_ended(t) || lh_H.L == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (t == lh_task_caller(L)) {
    t->cancelling = 1;
    if (lua_isyieldable(L))
      return lh_unwind(L);  /* never returns here */
    /* Behind a C boundary: it ends at its next wait or yield. */
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushboolean(L, lh_cancel(L, t));
  return 1;
}

/* After fn: the outer deadline again (saved at 1), then fn's outcome. */
static int k_deadline(lua_State *L, int status, lua_KContext ctx) {
  lh_task *t = lh_task_caller(L);
  (void)ctx;
  t->deadline = (int64_t)lua_tointeger(L, 1);
  if (status != LUA_OK && status != LUA_YIELD)
    return lua_error(L);  /* fn's error, as it was */
  return lua_gettop(L) - 1;  /* fn's results */
}

/*
** so.deadline(seconds, fn, ...): fn(...) in the calling task, where every
** wait still pending `seconds` from now ends with ETIMEDOUT (and every
** later one at once). The earliest of nested deadlines holds.
*/
static int so_deadline(lua_State *L) {
  lua_Number s = luaL_checknumber(L, 1);
  lh_task *t = lh_task_caller(L);
  int64_t d;
  luaL_argcheck(L, s >= 0 && s < 1e12, 1, "seconds out of range");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (t == NULL)
    return luaL_error(L, "deadline: not in a task");
  d = lh_now() + (int64_t)(s * 1000 + 0.5);
  if (t->deadline >= 0 && t->deadline < d)
    d = t->deadline;
  lua_pushinteger(L, (lua_Integer)t->deadline);
  lua_replace(L, 1);  /* saved: the outer deadline */
  t->deadline = d;
  return k_deadline(L, lua_pcallk(L, lua_gettop(L) - 2, LUA_MULTRET, 0, 0,
                                  k_deadline), 0);
}

/* }====================================================== */


/* {======================================================
** so.first
** ======================================================= */

#define FIRST_TNAME "so.first"

/* Cancels every task f started that has not ended; they forget f first. */
static void cancel_all(lua_State *L, lh_first *f) {
  int i;
  f->waiter = NULL;
  for (i = 0; i < f->n; i++) {
    lh_task *c = f->tasks[i];
    if (c->in_first && c->u.first == f) {
      c->u.first = NULL;
      lh_cancel(L, c);
    }
  }
}

/* so.first's wait ended early (timeout, cancel): its tasks end first. */
static void cancel_first(lh_task *t) {
  cancel_all(lh_H.L, t->wait.on);
}

/*
** The winner's index and results, or its error raised; the record's
** __close (at 1) cancels the others as so.first returns or raises.
*/
static int after_first(lua_State *L, int base) {
  lh_first *f = lua_touserdata(L, 1);
  lh_task *w = f->winner;
  int i = 0, n;
  lua_settop(L, base);
  while (f->tasks[i] != w)
    i++;
  if (w->status == LH_TASK_FAILED) {
    lua_pushvalue(w->co, 1);
    lua_xmove(w->co, L, 1);
    return lua_error(L);  /* its error, in the caller */
  }
  lua_pushinteger(L, i + 1);
  n = lh_push_results(L, w);
  if (n < 0)
    return luaL_error(L, "too many results");
  lua_remove(L, -n);  /* the `true` of a join */
  return n;  /* index, results... */
}

static const lh_waitkind first_kind = {"first", cancel_first, after_first,
                                       0, NULL};

static int first_close(lua_State *L) {
  cancel_all(L, lua_touserdata(L, 1));
  return 0;
}

/*
** so.first(fn1, fn2, ...): runs each in a task of its own; the index and
** results of the first to return (or its error, raised), once the others
** are cancelled.
*/
static int so_first(lua_State *L) {
  int n = lua_gettop(L), i;
  lh_task *self;
  lh_first *f;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  for (i = 2; i <= n; i++)
    luaL_checktype(L, i, LUA_TFUNCTION);
  self = lh_checktask_caller(L, "first");
  if (lh_expired(self))
    return lh_pusherror(L, LH_ETIMEDOUT);
  luaL_checkstack(L, n + LUA_MINSTACK, "too many functions");
  f = lua_newuserdatauv(L, sizeof *f + (size_t)(n - 1) * sizeof(lh_task *),
                        0);
  memset(f, 0, sizeof *f);
  luaL_setmetatable(L, FIRST_TNAME);
  lua_insert(L, 1);  /* f fn1 ... fnN */
  lua_toclose(L, 1);  /* however so.first ends, its tasks end with it */
  for (i = 2; i <= n + 1 && f->winner == NULL; i++) {
    lh_task *c = lh_newtask(L, i);  /* ... handle: anchors c */
    c->in_first = 1;
    c->u.first = f;
    f->tasks[f->n++] = c;
    f->live++;
    lh_start(L, c, 0);
  }
  if (f->winner != NULL)  /* one returned before it waited */
    return after_first(L, lua_gettop(L));
  f->waiter = self;
  return lh_wait(L, self, &first_kind, f, -1);
}

/* }====================================================== */


static const lh_waitkind sleep_kind = {"sleep", NULL, NULL, LH_WAIT_ENDS,
                                       NULL};

/*
** so.sleep(seconds): yields for that long; 0 for one loop turn.
*/
static int so_sleep(lua_State *L) {
  int64_t ms = lh_checktimeout(L, 1);
  lh_task *self;
  luaL_argcheck(L, ms >= 0, 1, "number expected");
  self = lh_checktask_caller(L, "sleep");
  return lh_wait(L, self, &sleep_kind, NULL, ms);
}

/* so.now(): the loop's time in seconds, as of the current loop turn. */
static int so_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)lh_now() / 1000.0);
  return 1;
}

/* so.stats(): live tasks, conns and listeners, for leak checks. */
static int so_stats(lua_State *L) {
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, lh_H.ntasks);
  lua_setfield(L, -2, "tasks");
  lua_pushinteger(L, lh_H.nconns);
  lua_setfield(L, -2, "conns");
  lua_pushinteger(L, lh_H.nlisteners);
  lua_setfield(L, -2, "listeners");
  lua_pushinteger(L, (lua_Integer)lh_H.accepts);
  lua_setfield(L, -2, "accepts");
  lua_pushinteger(L, (lua_Integer)lh_H.bytes_in);
  lua_setfield(L, -2, "bytes_in");
  lua_pushinteger(L, (lua_Integer)lh_H.bytes_out);
  lua_setfield(L, -2, "bytes_out");
  lua_pushinteger(L, (lua_Integer)lh_H.timeouts);
  lua_setfield(L, -2, "timeouts");
  lua_pushinteger(L, (lua_Integer)lh_H.errors);
  lua_setfield(L, -2, "errors");
  return 1;
}

/* {======================================================
** so.tasks and the SIGUSR1 dump: what every task waits on
** ======================================================= */

static int by_id(const void *a, const void *b) {
  uint64_t x = (*(lh_task *const *)a)->id, y = (*(lh_task *const *)b)->id;
  return x < y ? -1 : x > y;
}

/*
** Pushes an array (a userdata) of every live task, by id; returns it and
** sets *n. Live tasks are the task handles the registry anchors.
*/
static lh_task **live_tasks(lua_State *L, size_t *n) {
  lh_task **all;
  size_t i = 0, cap = (size_t)lh_H.ntasks;
  all = lua_newuserdatauv(L, (cap ? cap : 1) * sizeof *all, 0);
  lua_pushnil(L);
  while (lua_next(L, LUA_REGISTRYINDEX) != 0) {
    lh_task *t = luaL_testudata(L, -1, LH_TASK_TNAME);
    if (t != NULL && !lh_task_ended(t) && t->ref != LUA_NOREF && i < cap)
      all[i++] = t;
    lua_pop(L, 1);
  }
  qsort(all, i, sizeof *all, by_id);
  *n = i;
  return all;
}

static const char *state_name(lh_task *t) {
  if (t->status == LH_TASK_RUNNING)
    return "running";
  if (t->queued || t->status == LH_TASK_YIELDED)
    return "ready";
  return "waiting";
}

/* What t waits on, as text ("read 127.0.0.1:52314"), or NULL. */
static const char *waiting_on(lh_task *t, char *buf, size_t size) {
  const lh_waitkind *kind = t->wait.kind;
  size_t n;
  if (kind == NULL || t->status != LH_TASK_WAITING || t->queued)
    return NULL;  /* so.sleep(0): "ready" */
  n = (size_t)snprintf(buf, size, "%s", kind->name);
  if (kind->describe != NULL && n + 1 < size) {
    buf[n++] = ' ';
    kind->describe(t, buf + n, size - n);
  }
  return buf;
}

static double seconds_since(lh_task *t) {
  return (double)(uint32_t)((uint32_t)lh_now() - t->since) / 1000.0;
}

/*
** so.tasks(): one table per live task, by id: id, state ("running",
** "ready", "waiting"), waiting (what on, as text), since (seconds in that
** state), spawned ("file:line").
*/
static int so_tasks(lua_State *L) {
  size_t i, n;
  lh_task **all = live_tasks(L, &n);
  char buf[128];
  lua_createtable(L, (int)n, 0);
  for (i = 0; i < n; i++) {
    lh_task *t = all[i];
    const char *w = waiting_on(t, buf, sizeof buf);
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, (lua_Integer)t->id);
    lua_setfield(L, -2, "id");
    lua_pushstring(L, state_name(t));
    lua_setfield(L, -2, "state");
    if (w != NULL) {
      lua_pushstring(L, w);
      lua_setfield(L, -2, "waiting");
    }
    lua_pushnumber(L, seconds_since(t));
    lua_setfield(L, -2, "since");
    lua_pushstring(L, t->site);
    lua_setfield(L, -2, "spawned");
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  return 1;
}

/* Cancels every live task (the end of a drain); from the loop. */
void lh_cancel_all(lua_State *L) {
  size_t i, n;
  lh_task **all;
  if (!lua_checkstack(L, 4))
    return;
  all = live_tasks(L, &n);  /* anchored on L while we go */
  for (i = 0; i < n; i++)
    lh_cancel(L, all[i]);
  lua_pop(L, 1);
}

/* The dump, run protected on the main state: one entry per task. */
static int dump(lua_State *L) {
  size_t i, n;
  lh_task **all = live_tasks(L, &n);
  char buf[128];
  lh_log_always(LH_LOG_INFO, NULL, "tasks", 5);
  for (i = 0; i < n; i++) {
    lh_task *t = all[i];
    const char *w = waiting_on(t, buf, sizeof buf);
    lua_pushfstring(L, "%s%s%s for %f s, started at %s", state_name(t),
                    w ? " " : "", w ? w : "", seconds_since(t), t->site);
    luaL_traceback(L, t->co, lua_tostring(L, -1), 0);
    lh_log_always(LH_LOG_INFO, t, lua_tostring(L, -1), lua_rawlen(L, -1));
    lua_pop(L, 2);
  }
  return 0;
}

/*
** On SIGUSR1: every task, what it waits on, and its traceback, on
** stderr. Runs from the loop, between tasks: service goes on.
*/
void lh_task_dump(void) {
  lua_State *L = lh_H.L;
  if (L == NULL || !lua_checkstack(L, 2))
    return;
  lua_pushcfunction(L, dump);
  if (lua_pcall(L, 0, 0, 0) != LUA_OK)
    lua_pop(L, 1);
}

/* task.id, and the methods. */
static int task_index(lua_State *L) {
  lh_task *t = checktask(L, 1);
  const char *k = lua_tostring(L, 2);
  if (k != NULL && strcmp(k, "id") == 0) {
    lua_pushinteger(L, (lua_Integer)t->id);
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

/* }====================================================== */


static int task_tostring(lua_State *L) {
  static const char *const names[] = {"running", "waiting", "ready", "done",
                                      "failed", "cancelled"};
  lh_task *t = checktask(L, 1);
  lua_pushfstring(L, "task (%s): %p", names[t->status], (void *)t);
  return 1;
}

static const luaL_Reg task_funcs[] = {
  {"spawn", so_spawn},
  {"join", so_join},
  {"sleep", so_sleep},
  {"now", so_now},
  {"stats", so_stats},
  {"tasks", so_tasks},
  {"cancel", so_cancel},
  {"deadline", so_deadline},
  {"first", so_first},
  {NULL, NULL}
};

static const luaL_Reg task_methods[] = {
  {"join", so_join},
  {"cancel", so_cancel},
  {NULL, NULL}
};

/*
** Creates the task metatable. At start-up, before the script's own task
** exists: every task, the first too, has it.
*/
void lh_task_init(lua_State *L) {
  luaL_newmetatable(L, LH_TASK_TNAME);
  lua_pushcfunction(L, task_tostring);
  lua_setfield(L, -2, "__tostring");
  luaL_newlib(L, task_methods);
  lua_pushcclosure(L, task_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newmetatable(L, FIRST_TNAME);
  lua_pushcfunction(L, first_close);
  lua_setfield(L, -2, "__close");
  lua_pop(L, 1);
}

/* Adds the task functions to the module table on top of L. */
void lh_task_open(lua_State *L) {
  luaL_setfuncs(L, task_funcs, 0);
}
