/*
** channel.c: so.channel, a queue of Lua values between tasks, with a
** capacity: send waits while it is full, recv while it is empty.
**
** One FIFO holds every value sent and not yet received, in send order: the
** first `cap` are buffered, the rest belong to senders still waiting (the
** i-th waiting sender's value is at cap + i). A recv takes the head, which
** lets the first waiting sender's value into the buffer: that sender is
** done. With capacity 0 a send thus completes when a receiver takes its
** value. A receiver waits only while the FIFO is empty, so a send with a
** receiver waiting hands the value straight to it.
*/
#include <stdlib.h>
#include <string.h>

#include "luahost.h"

#define CHANNEL_TNAME "channel"

typedef struct lh_chan {
  uint64_t tag;           /* LH_TAG_CHANNEL */
  lua_Integer cap;        /* values buffered before send waits */
  lua_Integer head;       /* FIFO index (1-based) of the oldest value */
  lua_Integer count;      /* values in the FIFO, buffered or waiting */
  int fifo;               /* registry ref to the FIFO's table */
  int closed;
  int64_t timeout;        /* ms for each send and recv, -1 for none */
  lh_task *senders, **senders_tail;     /* waiting to send, FIFO */
  lh_task *receivers, **receivers_tail; /* waiting to receive, FIFO */
} lh_chan;

static lh_chan *checkchan(lua_State *L, int arg) {
  lh_chan *ch = lh_checkobj(L, arg, LH_TAG_CHANNEL, CHANNEL_TNAME);
  if (ch->fifo == LUA_NOREF)
    luaL_error(L, "attempt to use a collected channel");
  return ch;
}

static void push_back(lh_task ***tail, lh_task *t) {
  t->next = NULL;
  **tail = t;
  *tail = &t->next;
}

static lh_task *pop_front(lh_task **head, lh_task ***tail) {
  lh_task *t = *head;
  *head = t->next;
  if (*head == NULL)
    *tail = head;
  t->next = NULL;
  return t;
}

/* Takes t out of a list; its position (0-based), or -1. */
static int unlink_task(lh_task **head, lh_task ***tail, lh_task *t) {
  lh_task **p = head;
  int i = 0;
  while (*p != NULL && *p != t) {
    p = &(*p)->next;
    i++;
  }
  if (*p == NULL)
    return -1;
  *p = t->next;
  if (*p == NULL)
    *tail = p;
  t->next = NULL;
  return i;
}

/*
** Drops the FIFO's value at 0-based position pos, moving the later ones
** down. Raw sets of existing keys: nothing is allocated. L: any state
** with room on its stack.
*/
static void fifo_drop(lua_State *L, lh_chan *ch, lua_Integer pos) {
  lua_Integer i, last = ch->head + ch->count - 1;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ch->fifo);
  for (i = ch->head + pos; i < last; i++) {
    lua_rawgeti(L, -1, i + 1);
    lua_rawseti(L, -2, i);
  }
  lua_pushnil(L);
  lua_rawseti(L, -2, last);
  lua_pop(L, 1);
  ch->count--;
}

/* A sender stopped waiting: its value leaves the FIFO. */
static void cancel_send(lh_task *t) {
  lh_chan *ch = t->wait.on;
  int i = unlink_task(&ch->senders, &ch->senders_tail, t);
  if (i >= 0 && lua_checkstack(lh_H.L, 3))
    fifo_drop(lh_H.L, ch, ch->cap + i);
}

static void cancel_recv(lh_task *t) {
  lh_chan *ch = t->wait.on;
  unlink_task(&ch->receivers, &ch->receivers_tail, t);
}

static const lh_waitkind send_kind = {"channel send", cancel_send, NULL, 0,
                                     NULL};
static const lh_waitkind recv_kind = {"channel recv", cancel_recv, NULL, 0,
                                     NULL};

/* ch:send(v): true once v is buffered or taken; nil, EPIPE once closed. */
static int ch_send(lua_State *L) {
  lh_chan *ch = checkchan(L, 1);
  lh_task *t;
  luaL_argexpected(L, !lua_isnoneornil(L, 2), 2, "non-nil value");
  lua_settop(L, 2);
  t = lh_checktask_caller(L, "send");
  if (ch->closed)
    return lh_pusherror(L, UV_EPIPE);
  if (ch->receivers != NULL) {  /* the FIFO is empty: hand it over */
    lh_task *r = pop_front(&ch->receivers, &ch->receivers_tail);
    lua_xmove(L, r->co, 1);  /* a wait left room on r's stack */
    lh_wake(r, 1);
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, ch->fifo);
  lua_pushvalue(L, 2);
  lua_rawseti(L, -2, ch->head + ch->count);  /* may raise: nothing done */
  lua_pop(L, 1);
  ch->count++;
  if (ch->count <= ch->cap) {
    lua_pushboolean(L, 1);
    return 1;
  }
  push_back(&ch->senders_tail, t);
  return lh_wait(L, t, &send_kind, ch, ch->timeout);
}

/* ch:recv(): the oldest value; waits while there is none; nil once closed. */
static int ch_recv(lua_State *L) {
  lh_chan *ch = checkchan(L, 1);
  lh_task *t = lh_checktask_caller(L, "recv");
  lua_settop(L, 1);
  if (ch->count == 0) {
    if (ch->closed) {
      lua_pushnil(L);
      return 1;
    }
    push_back(&ch->receivers_tail, t);
    return lh_wait(L, t, &recv_kind, ch, ch->timeout);
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, ch->fifo);
  lua_rawgeti(L, -1, ch->head);
  lua_pushnil(L);
  lua_rawseti(L, -3, ch->head);
  if (--ch->count == 0)
    ch->head = 1;
  else
    ch->head++;
  /* The first waiting sender's value is now buffered (or, at capacity 0,
     taken): it is done. */
  if (ch->count >= ch->cap && ch->senders != NULL) {
    lh_task *s = pop_front(&ch->senders, &ch->senders_tail);
    lua_pushboolean(s->co, 1);  /* no allocation: a wait left room */
    lh_wake(s, 1);
  }
  return 1;  /* the value */
}

/*
** ch:close(): no more sends; receivers get what is buffered, then nil.
** Every waiting task wakes: receivers with nil, senders with EPIPE (their
** values are dropped).
*/
static int ch_close(lua_State *L) {
  lh_chan *ch = checkchan(L, 1);
  ch->closed = 1;
  while (ch->receivers != NULL) {
    lh_task *r = pop_front(&ch->receivers, &ch->receivers_tail);
    lua_pushnil(r->co);
    lh_wake(r, 1);
  }
  luaL_checkstack(L, 3, NULL);
  while (ch->senders != NULL) {
    lh_task *s = pop_front(&ch->senders, &ch->senders_tail);
    fifo_drop(L, ch, ch->count - 1);
    lh_wake_err(s, UV_EPIPE);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* #ch: values buffered, not counting senders still waiting. */
static int ch_len(lua_State *L) {
  lh_chan *ch = checkchan(L, 1);
  lua_pushinteger(L, ch->count < ch->cap ? ch->count : ch->cap);
  return 1;
}

static int ch_tostring(lua_State *L) {
  lh_chan *ch = checkchan(L, 1);
  lua_pushfstring(L, "channel (%s%I/%I): %p", ch->closed ? "closed, " : "",
                  (LUAI_UACINT)(ch->count < ch->cap ? ch->count : ch->cap),
                  (LUAI_UACINT)ch->cap, (void *)ch);
  return 1;
}

/*
** Nobody can reach the channel any more, so nobody waits on it (a waiting
** task's stack holds it).
*/
static int ch_gc(lua_State *L) {
  lh_chan *ch = lua_touserdata(L, 1);
  if (ch == NULL || lua_rawlen(L, 1) != sizeof *ch ||
      ch->tag != LH_TAG_CHANNEL)
    return 0;  /* a script calling __gc by hand with something else */
  if (ch->fifo != LUA_NOREF) {
    luaL_unref(L, LUA_REGISTRYINDEX, ch->fifo);
    ch->fifo = LUA_NOREF;
  }
  return 0;
}

/*
** so.settimeout for a channel: a limit for each later send and recv.
*/
int lh_channel_settimeout(lua_State *L) {
  lh_chan *ch = checkchan(L, 1);
  ch->timeout = lh_checktimeout(L, 2);
  lua_pushboolean(L, 1);
  return 1;
}

/* so.channel([capacity]) */
static int so_channel(lua_State *L) {
  lua_Integer cap = luaL_optinteger(L, 1, 0);
  lh_chan *ch;
  luaL_argcheck(L, cap >= 0, 1, "capacity must not be negative");
  ch = lua_newuserdatauv(L, sizeof *ch, 0);
  memset(ch, 0, sizeof *ch);
  ch->tag = LH_TAG_CHANNEL;
  ch->fifo = LUA_NOREF;
  luaL_setmetatable(L, CHANNEL_TNAME);
  ch->cap = cap;
  ch->head = 1;
  ch->timeout = -1;
  ch->senders_tail = &ch->senders;
  ch->receivers_tail = &ch->receivers;
  lua_newtable(L);
  ch->fifo = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

static const luaL_Reg chan_methods[] = {
  {"send", ch_send},
  {"recv", ch_recv},
  {"close", ch_close},
  {"settimeout", lh_channel_settimeout},
  {NULL, NULL}
};

static const luaL_Reg chan_meta[] = {
  {"__len", ch_len},
  {"__tostring", ch_tostring},
  {"__gc", ch_gc},
  {"__close", ch_close},
  {NULL, NULL}
};

/* Adds so.channel to the module table on top of L. */
void lh_channel_open(lua_State *L) {
  lua_pushcfunction(L, so_channel);
  lua_setfield(L, -2, "channel");
  luaL_newmetatable(L, CHANNEL_TNAME);
  luaL_setfuncs(L, chan_meta, 0);
  luaL_newlib(L, chan_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}
