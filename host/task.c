/*
** task.c: the task functions scripts call (so.spawn, so.join, so.sleep,
** so.now, so.stats) and the task handle, over the scheduler in sched.c.
*/
#include "luahost.h"

static lh_task *checktask(lua_State *L, int arg) {
  return lh_checkobj(L, arg, LH_TAG_TASK, LH_TASK_TNAME);
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
  lh_task **p = &t->joiners;
  while (*p != NULL && *p != self)
    p = &(*p)->next;
  if (*p == self)
    *p = self->next;
  self->next = NULL;
}

static const lh_waitkind join_kind = {"join", cancel_join, NULL, 0};

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
  self->next = t->joiners;
  t->joiners = self;
  return lh_wait(L, self, &join_kind, t, timeout);
}

/* }====================================================== */


static const lh_waitkind sleep_kind = {"sleep", NULL, NULL, LH_WAIT_ENDS};

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
  {NULL, NULL}
};

static const luaL_Reg task_methods[] = {
  {"join", so_join},
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
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

/* Adds the task functions to the module table on top of L. */
void lh_task_open(lua_State *L) {
  luaL_setfuncs(L, task_funcs, 0);
}
