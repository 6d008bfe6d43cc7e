/*
** alloc.c: the Lua state's allocator, with an optional cap on the heap
** (--max-memory). Past the cap an allocation fails as Lua's do when the
** system has no memory: the operation that allocates fails, and the host
** goes on (see lh_pushprotected for callbacks).
*/
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahost.h"

typedef struct heap_use {
  size_t used;   /* bytes the Lua state holds */
  size_t limit;  /* 0: none */
} heap_use;

static heap_use heap_use_of_L;

static void *l_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  heap_use *h = ud;
  if (ptr == NULL)
    osize = 0;  /* then osize tells the kind of object, not a size */
  if (nsize == 0) {
    free(ptr);
    h->used -= osize;
    return NULL;
  }
  if (h->limit != 0 && nsize > osize && h->used - osize + nsize > h->limit)
    return NULL;
  ptr = realloc(ptr, nsize);
  if (ptr != NULL)
    h->used = h->used - osize + nsize;
  return ptr;
}

static int l_panic(lua_State *L) {
  const char *msg = lua_tostring(L, -1);
  fprintf(stderr, "luahost: PANIC: unprotected error in call to Lua API "
          "(%s)\n", msg ? msg : "error object is not a string");
  return 0;  /* abort */
}

/*
** Warnings as lua.c has them: off until a script sends "@on".
*/
static int warn_on;

static void l_warn(void *ud, const char *msg, int tocont) {
  static int cont;
  (void)ud;
  if (!cont && msg[0] == '@') {  /* a control message */
    if (strcmp(msg, "@on") == 0)
      warn_on = 1;
    else if (strcmp(msg, "@off") == 0)
      warn_on = 0;
    return;
  }
  if (warn_on) {
    fprintf(stderr, "%s%s", cont ? "" : "Lua warning: ", msg);
    if (!tocont)
      fputc('\n', stderr);
  }
  cont = tocont;
}

/*
** A new Lua state whose heap may not pass `limit` bytes (0: no limit).
*/
lua_State *lh_newstate(size_t limit) {
  lua_State *L;
  heap_use_of_L.limit = limit;
  L = lua_newstate(l_alloc, &heap_use_of_L);
  if (L != NULL) {
    lua_atpanic(L, l_panic);
    lua_setwarnf(L, l_warn, NULL);
  }
  return L;
}

/*
** Memory that comes back. The collector runs only when Lua allocates, so
** an idle host would keep garbage conns (and their descriptors) and its
** peak heap. Once a second a timer looks: if no task has run since it
** last looked, the host finishes a collection cycle and gives freed
** memory back to the OS, once per idle spell. It keeps no loop alive.
*/
static uv_timer_t idle_timer;
static uint64_t idle_seen;   /* run_seq when the timer last looked */
static int idle_done;        /* collected in this idle spell */

static void on_idle_check(uv_timer_t *timer) {
  uint64_t seq = __atomic_load_n(&lh_H.run_seq, __ATOMIC_RELAXED);
  (void)timer;
  if (seq != idle_seen || lh_H.L == NULL) {
    idle_seen = seq;
    idle_done = 0;
    return;
  }
  if (!idle_done) {
    idle_done = 1;
    lua_gc(lh_H.L, LUA_GCCOLLECT);
    malloc_trim(0);
  }
}

void lh_idle_gc_init(void) {
  uv_timer_init(lh_H.loop, &idle_timer);
  uv_timer_start(&idle_timer, on_idle_check, 1000, 1000);
  uv_unref((uv_handle_t *)&idle_timer);
}
