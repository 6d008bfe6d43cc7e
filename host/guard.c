/*
** guard.c: the runaway-task guard (--task-budget SECONDS). A task that
** runs longer than the budget without waiting gets an error raised inside
** it; every other task goes on being served.
**
** Free until it fires: the scheduler only counts resumes and notes the
** thread it runs (two relaxed stores). A watchdog thread looks four times
** a budget; when the same resume is still running after a whole budget,
** it signals the loop's thread, whose handler arms a count hook on the
** running thread (lua_sethook may be called from a signal handler; this
** is how lua.c stops a script on ^C). The hook raises the error at the
** next instruction. The watchdog never touches Lua itself: only the
** interrupted thread knows which Lua thread is running at that instant.
*/
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <time.h>

#include "luahost.h"

static double budget_s;
static pthread_t loop_thread;
static uint64_t fire_seq;  /* the resume the watchdog found too long */

static void runaway_hook(lua_State *L, lua_Debug *ar) {
  lh_task *t = lh_task_caller(L);
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  if (__atomic_load_n(&lh_H.run_seq, __ATOMIC_RELAXED) != fire_seq)
    return;  /* armed as that resume ended: L has done nothing wrong */
  luaL_traceback(L, L, lua_pushfstring(L, "task ran for more than %f s "
                 "without yielding", (lua_Number)budget_s), 0);
  lh_log_string(LH_LOG_ERROR, t, lua_tostring(L, -1), lua_rawlen(L, -1));
  if (t != NULL)
    t->runaway = 1;  /* reported here, where it was stopped */
  lua_pop(L, 2);
  luaL_error(L, "task ran for more than %f s without yielding",
             (lua_Number)budget_s);
}

/* In the loop's thread, wherever it was: arm the hook if still stuck. */
static void on_sigalrm(int signum) {
  lua_State *L = __atomic_load_n(&lh_H.running, __ATOMIC_RELAXED);
  (void)signum;
  if (L != NULL &&
      __atomic_load_n(&lh_H.run_seq, __ATOMIC_RELAXED) == fire_seq)
    lua_sethook(L, runaway_hook, LUA_MASKCOUNT, 1);
}

static void *watchdog(void *arg) {
  struct timespec tick;
  uint64_t seen = 0;
  int ticks = 0;
  (void)arg;
  tick.tv_sec = (time_t)(budget_s / 4);
  tick.tv_nsec = (long)((budget_s / 4 - (double)tick.tv_sec) * 1e9);
  for (;;) {
    uint64_t seq;
    nanosleep(&tick, NULL);
    seq = __atomic_load_n(&lh_H.run_seq, __ATOMIC_RELAXED);
    if (seq != seen ||
        __atomic_load_n(&lh_H.running, __ATOMIC_RELAXED) == NULL) {
      seen = seq;
      ticks = 0;
      continue;
    }
    if (++ticks >= 4) {  /* a whole budget in one resume */
      ticks = 0;
      fire_seq = seq;
      pthread_kill(loop_thread, SIGALRM);
    }
  }
  return NULL;
}

/*
** Starts the guard for a budget of `seconds`: the watchdog thread, and
** SIGALRM's handler in this (the loop's) thread. 0, or an errno.
*/
int lh_guard_start(double seconds) {
  struct sigaction sa;
  pthread_attr_t attr;
  sigset_t all, old;
  int err;
  budget_s = seconds;
  loop_thread = pthread_self();
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigalrm;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGALRM, &sa, NULL) != 0)
    return -1;
  /* The watchdog takes no signal: they are all the loop's. */
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&attr, 64 * 1024);
  err = pthread_create(&(pthread_t){0}, &attr, watchdog, NULL);
  pthread_attr_destroy(&attr);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return err;
}
