/*
** log.c: one line on stderr per message, for scripts (so.log) and for the
** host's own messages (task errors, drain, runaway tasks):
**
**   2026-12-01T09:30:00.123Z INFO [task 12] message
**
** Levels below --log-level are dropped before anything is formatted.
*/
#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "luahost.h"

static const char *const level_names[] = {"debug", "info", "warn", "error",
                                          NULL};
static const char *const level_tags[] = {"DEBUG", "INFO", "WARN", "ERROR"};

int lh_log_level = LH_LOG_INFO;

/* The level named `name`, or -1. */
int lh_log_parse(const char *name) {
  int i;
  for (i = 0; level_names[i] != NULL; i++)
    if (strcmp(name, level_names[i]) == 0)
      return i;
  return -1;
}

/*
** Writes one line: the time (UTC, ms), the level, the task (id 0: none)
** and the message, in one fwrite so that lines of two processes sharing
** stderr do not interleave.
*/
static void emit(int level, uint64_t task, const char *msg, size_t len) {
  char head[96], *line;
  struct timespec ts;
  struct tm tm;
  int n;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  n = (int)strftime(head, sizeof head, "%Y-%m-%dT%H:%M:%S", &tm);
  if (task != 0)
    n += snprintf(head + n, sizeof head - (size_t)n, ".%03ldZ %s [task %llu] ",
                  ts.tv_nsec / 1000000, level_tags[level],
                  (unsigned long long)task);
  else
    n += snprintf(head + n, sizeof head - (size_t)n, ".%03ldZ %s [host] ",
                  ts.tv_nsec / 1000000, level_tags[level]);
  line = malloc((size_t)n + len + 1);
  if (line == NULL) {  /* still say it, in pieces */
    fprintf(stderr, "%s%.*s\n", head, (int)len, msg);
    return;
  }
  memcpy(line, head, (size_t)n);
  memcpy(line + n, msg, len);
  line[(size_t)n + len] = '\n';
  fwrite(line, 1, (size_t)n + len + 1, stderr);
  fflush(stderr);
  free(line);
}

/* The host's own messages, printf-style; t: the task it is about, or NULL. */
void lh_log(int level, lh_task *t, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  int n;
  if (level < lh_log_level)
    return;
  va_start(ap, fmt);
  n = vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (n < 0)
    return;
  emit(level, t != NULL ? t->id : 0, msg,
       (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
}

/* A message asked for (SIGUSR1's dump): whatever --log-level says. */
void lh_log_always(int level, lh_task *t, const char *msg, size_t len) {
  emit(level, t != NULL ? t->id : 0, msg, len);
}

/* A message already made, of any length (a traceback). */
void lh_log_string(int level, lh_task *t, const char *msg, size_t len) {
  if (level >= lh_log_level)
    emit(level, t != NULL ? t->id : 0, msg, len);
}

/*
** so.log(level, fmt, ...): formats as string.format (upvalue 1) does, and
** writes one line; nothing at all below --log-level.
*/
static int so_log(lua_State *L) {
  int level = luaL_checkoption(L, 1, NULL, level_names);
  const char *msg;
  size_t len;
  if (level < lh_log_level)
    return 0;
  luaL_checkany(L, 2);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_rotate(L, 2, 1);  /* level format fmt ... */
  lua_call(L, lua_gettop(L) - 2, 1);
  msg = lua_tolstring(L, -1, &len);
  emit(level, lh_task_caller(L) != NULL ? lh_task_caller(L)->id : 0, msg,
       len);
  return 0;
}

/* Adds so.log to the module table on top of L. */
void lh_log_open(lua_State *L) {
  lua_getglobal(L, "string");
  lua_getfield(L, -1, "format");
  lua_remove(L, -2);
  lua_pushcclosure(L, so_log, 1);
  lua_setfield(L, -2, "log");
}
