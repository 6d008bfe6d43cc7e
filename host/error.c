/*
** error.c: how what the network or the OS causes reaches Lua.
**
** One convention, luv's and Lua's io library's: nil, "NAME: message",
** "NAME". A raw negative libuv code never reaches a script.
*/
#include "luahost.h"

/*
** Pushes the two error values ("NAME: message", "NAME") for libuv's err,
** or for the host's own LH_ETIMEDOUT (a timeout with no connection in it,
** where libuv's "connection timed out" would mislead).
*/
void lh_pusherror_values(lua_State *L, int err) {
  if (err == LH_ETIMEDOUT) {
    lua_pushliteral(L, "ETIMEDOUT: timed out");
    lua_pushliteral(L, "ETIMEDOUT");
    return;
  }
  lua_pushfstring(L, "%s: %s", uv_err_name(err), uv_strerror(err));
  lua_pushstring(L, uv_err_name(err));
}

/*
** The usual failure return of a function for Lua: nil, msg, name.
*/
int lh_pusherror(lua_State *L, int err) {
  lua_pushnil(L);
  lh_pusherror_values(L, err);
  return 3;  /* nil, message, name */
}

/*
** Keeps the strings of ENOMEM alive for good: Lua interns short strings,
** so pushing them again finds them and allocates nothing, and a task can
** be told it is out of memory when no memory is left.
*/
void lh_error_init(lua_State *L) {
  lh_pusherror_values(L, UV_ENOMEM);
  luaL_ref(L, LUA_REGISTRYINDEX);
  luaL_ref(L, LUA_REGISTRYINDEX);
}
