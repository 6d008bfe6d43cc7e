/*
** luahost.h: what the host's C files share.
**
** The host runs Lua coroutines ("tasks") on one libuv loop. A task that
** waits for the network yields; the libuv callback that completes the wait
** pushes the results onto the task's stack and resumes it from the loop.
*/
#ifndef LUAHOST_H
#define LUAHOST_H

#include <stdint.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#define LUAHOST_VERSION "luahost 0.1.0"

/* Nested resumes so.spawn makes before it queues new tasks instead. */
#define LH_MAX_NESTED_SPAWNS 64

/*
** A task: a Lua thread run by the scheduler. The struct lives in a full
** userdata (the task handle scripts see); its first user value is the
** thread. The thread's LUA_EXTRASPACE points back here, so a C function
** finds the task it runs in without a lookup.
*/
typedef struct lh_task lh_task;

/* Undoes a wait's registration when the wait ends early (timeout). */
typedef void (*lh_cancel_fn)(lh_task *t);

struct lh_task {
  uint64_t tag;           /* LH_TAG_TASK: see lh_checkobj */
  lua_State *co;          /* the thread; NULL once the task has ended */
  int ref;                /* registry ref to this userdata while alive */
  int status;             /* LH_TASK_* */
  int nargs;              /* values pushed on co for its next resume */
  int queued;             /* in the ready queue? */
  lh_task *next;          /* link: ready queue, or a list of waiters */
  lh_cancel_fn cancel;    /* set while waiting on something cancellable */
  void *waiting_on;       /* the object or request of the current wait */
  uv_timer_t *timer;      /* deadline timer, allocated on first use */
  lh_task *joiners;       /* tasks waiting in so.join for this one */
};

enum { LH_TASK_RUNNING, LH_TASK_WAITING, LH_TASK_DONE, LH_TASK_FAILED };

/*
** A thread's LUA_EXTRASPACE: for a task's own thread, its lh_task; for a
** script's coroutine that a task resumed, that task tagged LH_NESTED (and
** LH_WAITING while the coroutine is suspended in a wait of the host's);
** 0 for any other coroutine.
*/
#define LH_EXTRA(L) (*(uintptr_t *)lua_getextraspace(L))
#define LH_NESTED ((uintptr_t)1)
#define LH_WAITING ((uintptr_t)2)
#define LH_EXTRA_TAGS (LH_NESTED | LH_WAITING)

/*
** A TCP socket: a conn or a listener. C owns this memory; it is freed in
** the uv_close callback once the Lua userdata no longer points at it.
*/
typedef struct lh_sock {
  uv_tcp_t tcp;           /* first, so a uv_handle_t* is an lh_sock* */
  unsigned flags;         /* LH_SOCK_* */
  int err;                /* sticky read error (libuv code), 0 if none */
  int64_t timeout;        /* ms for reads/writes/accepts, -1 for none */
  lh_task *reader;        /* conn: the task waiting in so.read */
  lh_task *acceptors;     /* listener: tasks waiting in so.accept (FIFO) */
  lh_task **acceptors_tail;
} lh_sock;

enum {
  LH_SOCK_LISTENER = 1 << 0, /* a listener, not a conn */
  LH_SOCK_READING  = 1 << 1, /* uv_read_start is in effect */
  LH_SOCK_EOF      = 1 << 2, /* the peer's EOF was read */
  LH_SOCK_PENDING  = 1 << 3, /* listener: libuv holds an accepted fd */
  LH_SOCK_DETACHED = 1 << 4, /* no userdata points here any more */
  LH_SOCK_CLOSED   = 1 << 5  /* uv_close has called back */
};

/*
** The Lua side of a socket. A tag instead of a metatable lookup on every
** call: the check is a compare, and C modules' userdata never carry it.
*/
typedef struct lh_sockref {
  uint64_t tag;           /* LH_TAG_CONN or LH_TAG_LISTENER */
  lh_sock *s;             /* NULL once closed */
} lh_sockref;

#define LH_TAG_CONN     UINT64_C(0x6c756168636f6e6e) /* "luahconn" */
#define LH_TAG_LISTENER UINT64_C(0x6c7561686c73746e) /* "luahlstn" */
#define LH_TAG_TASK     UINT64_C(0x6c7561687461736b) /* "luahtask" */

/* The host: one loop, one Lua state. */
typedef struct lh_host {
  uv_loop_t *loop;
  lua_State *L;           /* main state; NULL once closed */
  int depth;              /* resumes in progress (0: called from the loop) */
  int nested_wait;        /* a coroutine inside a task yielded for a wait */
  int exit_status;        /* what main returns */
  lh_task *ready_head, *ready_tail;
  uv_check_t ready_check; /* runs queued tasks after each poll */
  uv_idle_t ready_idle;   /* keeps poll from blocking while tasks are queued */
  long ntasks, nconns, nlisteners; /* live counts, for so.stats */
} lh_host;

extern lh_host lh_H;

/* error.c */
int lh_pusherror(lua_State *L, int err);
void lh_pusherror_values(lua_State *L, int err);

/* task.c */
void lh_sched_init(void);
lh_task *lh_task_current(lua_State *L);
lh_task *lh_checktask_caller(lua_State *L, const char *what);
int lh_wait(lua_State *L, lh_task *t, void *on, lh_cancel_fn cancel,
            int64_t timeout_ms);
int lh_waitk(lua_State *L, lh_task *t, void *on, lh_cancel_fn cancel,
             int64_t timeout_ms, lua_KContext ctx, lua_KFunction k);
void lh_wait_end(lh_task *t);
void lh_resume(lh_task *t, int nargs);
void lh_wake(lh_task *t, int nargs);
void lh_resume_status(lh_task *t, int status);
int lh_spawn_main(lua_State *L, int nargs);
int64_t lh_checktimeout(lua_State *L, int arg);
void lh_task_open(lua_State *L);

/* coro.c */
void lh_coro_open(lua_State *L);

/* sock.c */
void *lh_checkobj(lua_State *L, int arg, uint64_t tag, const char *tname);
lh_sock *lh_checkconn(lua_State *L, int arg);
lh_sock *lh_checklistener(lua_State *L, int arg);
lh_sock *lh_newsock(lua_State *L, unsigned flags);
void lh_sock_close(lua_State *L, int idx);
void lh_sock_open(lua_State *L);
int lh_parseaddr(const char *host, int port, struct sockaddr_storage *ss);
int lh_pushaddr(lua_State *L, const struct sockaddr_storage *ss);
int lh_getaddrinfo(uv_getaddrinfo_t *req, uv_getaddrinfo_cb cb,
                   const char *host, int port, int flags);

/* stream.c, listener.c */
void lh_stream_open(lua_State *L);
void lh_listener_open(lua_State *L);

/* so.c */
int luaopen_so(lua_State *L);

#endif
