/*
** so.c: the "so" module, TCP for tasks through calls that look blocking.
** Each concern registers its own functions; this file only assembles them.
*/
#include "luahost.h"

int luaopen_so(lua_State *L) {
  lua_createtable(L, 0, 24);
  lh_task_open(L);
  lh_stream_open(L);
  lh_listener_open(L);
  lh_sock_open(L);  /* last: the method tables take functions from above */
  lua_pushliteral(L, LUAHOST_VERSION);
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
