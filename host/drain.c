/*
** drain.c: stopping as a service stops. On the first SIGTERM, SIGINT or
** SIGQUIT the host drains: every listener closes (tasks waiting in accept
** get ECANCELED), so.draining() turns true, each so.ondrain function runs
** as a task, and the host exits 0 once no task is left, or when the drain
** period (--drain, default 3 s) has passed, after cancelling what is left
** (their <close> variables run). A second signal exits at once.
*/
#include <signal.h>

#include "luahost.h"

int64_t lh_drain_ms = 3000;

static uv_timer_t drain_timer;
static uv_signal_t signals[5];
static int ondrain_ref = LUA_NOREF;  /* array of so.ondrain functions */

/* The drain period is over: what is left is cancelled, and the host ends. */
static void on_drain_timeout(uv_timer_t *timer) {
  (void)timer;
  if (lh_H.L == NULL)
    return;
  lh_log(LH_LOG_WARN, NULL, "drain: %ld task(s) left after %g s, cancelled",
         lh_H.ntasks, (double)lh_drain_ms / 1000.0);
  lh_cancel_all(lh_H.L);
  uv_stop(lh_H.loop);
}

/* Starts each so.ondrain function as a task (protected, on the main state). */
static int start_ondrain(lua_State *L) {
  lua_Integer i, n;
  if (lua_rawgeti(L, LUA_REGISTRYINDEX, ondrain_ref) != LUA_TTABLE)
    return 0;
  n = (lua_Integer)lua_rawlen(L, -1);
  for (i = 1; i <= n; i++) {
    lh_task *t;
    lua_rawgeti(L, -1, i);
    t = lh_newtask(L, -1);  /* fns fn task */
    lua_remove(L, -2);
    lh_start(L, t, 0);
    lua_pop(L, 1);
  }
  return 0;
}

static void drain(int signum) {
  lua_State *L = lh_H.L;
  lh_H.draining = 1;
  lh_log(LH_LOG_INFO, NULL, "drain: %s, stopping within %g s",
         signum == SIGINT ? "SIGINT" : signum == SIGQUIT ? "SIGQUIT"
                                                         : "SIGTERM",
         (double)lh_drain_ms / 1000.0);
  lh_sock_shut_listeners();
  uv_timer_start(&drain_timer, on_drain_timeout, (uint64_t)lh_drain_ms, 0);
  uv_unref((uv_handle_t *)&drain_timer);
  if (L != NULL && lua_checkstack(L, 1)) {
    lua_pushcfunction(L, start_ondrain);
    if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
      lh_log(LH_LOG_ERROR, NULL, "drain: %s", lua_tostring(L, -1));
      lua_pop(L, 1);
    }
  }
  if (lh_H.ntasks == 0)
    uv_stop(lh_H.loop);
}

static void on_signal(uv_signal_t *sig, int signum) {
  (void)sig;
  if (signum == SIGUSR1) {
    lh_task_dump();
    return;
  }
  if (signum == SIGHUP) {
    lh_log(LH_LOG_WARN, NULL, "SIGHUP: nothing to reload in one process");
    return;
  }
  if (lh_H.draining) {  /* the second one: at once */
    lh_log(LH_LOG_WARN, NULL, "drain: second signal, exiting now");
    uv_stop(lh_H.loop);
    return;
  }
  drain(signum);
}

/* so.draining(): true once the host drains. */
static int so_draining(lua_State *L) {
  lua_pushboolean(L, lh_H.draining);
  return 1;
}

/* so.ondrain(fn): fn runs as a task of its own when the host drains. */
static int so_ondrain(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ondrain_ref);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  if (lh_H.draining) {  /* late: it runs now */
    lh_task *t = lh_newtask(L, 1);
    lh_start(L, t, 0);
  }
  return 0;
}

/* The signals the host handles; none keeps the loop alive. */
void lh_drain_init(lua_State *L) {
  static const int signums[5] = {SIGTERM, SIGINT, SIGQUIT, SIGUSR1, SIGHUP};
  int i;
  for (i = 0; i < 5; i++) {
    uv_signal_init(lh_H.loop, &signals[i]);
    uv_signal_start(&signals[i], on_signal, signums[i]);
    uv_unref((uv_handle_t *)&signals[i]);
  }
  uv_timer_init(lh_H.loop, &drain_timer);
  lua_newtable(L);
  ondrain_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

void lh_drain_open(lua_State *L) {
  lua_pushcfunction(L, so_draining);
  lua_setfield(L, -2, "draining");
  lua_pushcfunction(L, so_ondrain);
  lua_setfield(L, -2, "ondrain");
}
