/*
** zlib.c: the so.zlib module, streaming gzip with Debian's zlib.
**
**   local z = zlib.deflate(6)          -- or zlib.inflate([max_output])
**   local out = z:write(data)          -- what came out so far ("" often)
**   local last = z:finish()            -- the rest, and the trailer
**
** Output goes into a luaL_Buffer per call, so nothing of a stream is held
** between calls but zlib's own state (about 256 KiB for deflate, 7 KiB for
** inflate, freed by finish or the collector).
*/
#include <string.h>

#include <zlib.h>

#include "luahost.h"

#define ZSTREAM_TNAME "zlib stream"

typedef struct lh_zstream {
  uint64_t tag;        /* LH_TAG_ZSTREAM */
  z_stream z;
  int inflate;         /* 1: inflating, 0: deflating */
  int state;           /* OPEN, or DONE (finished, failed or collected) */
  lua_Integer max;     /* inflate: total output allowed, or -1 */
  lua_Integer total;   /* inflate: output so far */
} lh_zstream;

enum { OPEN, DONE };

static lh_zstream *checkz(lua_State *L, int arg) {
  lh_zstream *s = lh_checkobj(L, arg, LH_TAG_ZSTREAM, ZSTREAM_TNAME);
  if (s->state != OPEN)
    luaL_error(L, "attempt to use a finished zlib stream");
  return s;
}

static void zend(lh_zstream *s) {
  if (s->state == OPEN) {
    if (s->inflate)
      inflateEnd(&s->z);
    else
      deflateEnd(&s->z);
    s->state = DONE;
  }
}

static int z_gc(lua_State *L) {
  zend(lh_checkobj(L, 1, LH_TAG_ZSTREAM, ZSTREAM_TNAME));
  return 0;
}

/* nil, "EZLIB: msg", "EZLIB"; the stream ends. */
static int zfail(lua_State *L, lh_zstream *s, const char *msg) {
  lua_pushnil(L);
  lua_pushfstring(L, "EZLIB: %s", msg != NULL ? msg : "data error");
  lua_pushliteral(L, "EZLIB");
  zend(s);
  return 3;
}

/*
** Runs zlib over the input at `arg` (or none) with flush, collecting the
** output: the output string, or the failure.
*/
static int run(lua_State *L, lh_zstream *s, int arg, int flush) {
  luaL_Buffer b;
  size_t len = 0;
  const char *in = arg > 0 ? luaL_checklstring(L, arg, &len) : "";
  int rc;
  s->z.next_in = (Bytef *)in;
  s->z.avail_in = (uInt)len;
  luaL_buffinit(L, &b);
  do {
    size_t room = LUAL_BUFFERSIZE;
    char *out = luaL_prepbuffsize(&b, room);
    s->z.next_out = (Bytef *)out;
    s->z.avail_out = (uInt)room;
    rc = s->inflate ? inflate(&s->z, flush) : deflate(&s->z, flush);
    luaL_addsize(&b, room - s->z.avail_out);
    if (s->inflate) {
      s->total += (lua_Integer)(room - s->z.avail_out);
      if (s->max >= 0 && s->total > s->max)
        return zfail(L, s, "output larger than its limit");
      if (rc == Z_STREAM_END) {
        if (s->z.avail_in > 0)
          return zfail(L, s, "bytes after the end of the stream");
        break;
      }
      if (rc == Z_NEED_DICT || rc == Z_DATA_ERROR || rc == Z_MEM_ERROR)
        return zfail(L, s, s->z.msg);
      if (rc == Z_BUF_ERROR && s->z.avail_out > 0)
        break;  /* no progress possible: all input used */
    } else if (rc == Z_STREAM_END)
      break;
  } while (s->z.avail_out == 0 || s->z.avail_in > 0);
  if (s->inflate && flush == Z_FINISH && rc != Z_STREAM_END)
    return zfail(L, s, "truncated stream");
  luaL_pushresult(&b);
  return 1;
}

/* z:write(data) → the output so far (often "") */
static int z_write(lua_State *L) {
  lh_zstream *s = checkz(L, 1);
  luaL_checkstring(L, 2);
  return run(L, s, 2, Z_NO_FLUSH);
}

/* z:flush([data]) → everything so far, for a stream sent piece by piece */
static int z_flush(lua_State *L) {
  lh_zstream *s = checkz(L, 1);
  return run(L, s, lua_isnoneornil(L, 2) ? 0 : 2, Z_SYNC_FLUSH);
}

/* z:finish([data]) → the rest; the stream ends */
static int z_finish(lua_State *L) {
  lh_zstream *s = checkz(L, 1);
  int n = run(L, s, lua_isnoneornil(L, 2) ? 0 : 2, Z_FINISH);
  zend(s);
  return n;
}

static lh_zstream *newz(lua_State *L, int inflating) {
  lh_zstream *s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);
  s->tag = LH_TAG_ZSTREAM;
  s->inflate = inflating;
  s->state = DONE;  /* until zlib has its state */
  s->max = -1;
  luaL_setmetatable(L, ZSTREAM_TNAME);
  return s;
}

/* zlib.deflate([level]) → a gzip compressor (level 0-9, default 6) */
static int z_deflate(lua_State *L) {
  lua_Integer level = luaL_optinteger(L, 1, Z_DEFAULT_COMPRESSION);
  lh_zstream *s;
  luaL_argcheck(L, level >= -1 && level <= 9, 1, "level out of range");
  s = newz(L, 0);
  /* 15 + 16: gzip's header and trailer; memLevel 8 as gzip has it. */
  if (deflateInit2(&s->z, (int)level, Z_DEFLATED, 15 + 16, 8,
                   Z_DEFAULT_STRATEGY) != Z_OK)
    return luaL_error(L, "not enough memory");
  s->state = OPEN;
  return 1;
}

/*
** zlib.inflate([max_output]) → a gzip (or zlib) decompressor; past
** max_output bytes of output it fails (a bomb costs its limit only).
*/
static int z_inflate(lua_State *L) {
  lua_Integer max = luaL_optinteger(L, 1, -1);
  lh_zstream *s;
  luaL_argcheck(L, max >= -1, 1, "negative limit");
  s = newz(L, 1);
  s->max = max;
  if (inflateInit2(&s->z, 15 + 32) != Z_OK)  /* 32: gzip or zlib */
    return luaL_error(L, "not enough memory");
  s->state = OPEN;
  return 1;
}

static const luaL_Reg z_methods[] = {
  {"write", z_write},
  {"flush", z_flush},
  {"finish", z_finish},
  {NULL, NULL}
};

static const luaL_Reg zlib_funcs[] = {
  {"deflate", z_deflate},
  {"inflate", z_inflate},
  {NULL, NULL}
};

int luaopen_so_zlib(lua_State *L) {
  luaL_newmetatable(L, ZSTREAM_TNAME);
  lua_pushcfunction(L, z_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, z_gc);
  lua_setfield(L, -2, "__close");
  luaL_newlib(L, z_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newlib(L, zlib_funcs);
  lua_pushstring(L, zlibVersion());
  lua_setfield(L, -2, "version");
  return 1;
}
