/*
** so.c: the "so" module, TCP for tasks through calls that look blocking.
** Each concern registers its own functions; this file only assembles them.
*/
#include "luahost.h"

/*
** so.settimeout(obj, seconds): conns, listeners and channels each keep
** their own limit.
*/
static int so_settimeout(lua_State *L) {
  uint64_t *tag = lua_touserdata(L, 1);
  if (tag != NULL && lua_rawlen(L, 1) >= sizeof *tag &&
      *tag == LH_TAG_CHANNEL)
    return lh_channel_settimeout(L);
  return lh_sock_settimeout(L);
}

int luaopen_so(lua_State *L) {
  lua_createtable(L, 0, 32);
  lh_task_open(L);
  lh_log_open(L);
  lh_drain_open(L);
  lh_worker_open(L);
  lh_channel_open(L);
  lh_stream_open(L);
  lh_listener_open(L);
  lh_sock_open(L);  /* last: the method tables take functions from above */
  lua_pushcfunction(L, so_settimeout);
  lua_setfield(L, -2, "settimeout");
  lua_pushliteral(L, LUAHOST_VERSION);
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
