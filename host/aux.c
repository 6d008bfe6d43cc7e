/*
** aux.c: what every other file uses, and that uses nothing of theirs: the
** host's global state, the check of the host's objects, and timeouts.
*/
#include <math.h>

#include "luahost.h"

lh_host lh_H;

/*
** The object at arg if it is a userdata of ours with that tag, or a
** "bad argument" error naming tname.
*/
void *lh_checkobj(lua_State *L, int arg, uint64_t tag, const char *tname) {
  uint64_t *p = lua_touserdata(L, arg);
  if (p == NULL || lua_rawlen(L, arg) < sizeof(uint64_t) || *p != tag)
    luaL_typeerror(L, arg, tname);
  return p;
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

/* The loop's clock, in ms, as of the current loop turn. */
int64_t lh_now(void) {
  return (int64_t)uv_now(lh_H.loop);
}
