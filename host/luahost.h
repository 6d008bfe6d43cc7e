/*
** luahost.h: what the host's C files share.
**
** The host runs Lua coroutines ("tasks") on one libuv loop. A task that
** waits for the network records what it waits on in its wait record and
** yields the host's private marker; the libuv callback that completes the
** wait leaves the results on the task's stack and resumes it from the loop.
**
** Files depend on each other in one direction only:
**   main.c -> supervisor.c (--workers), drain.c, tls.c (so.tls), fs.c
**     (so.fs), zlib.c (so.zlib), so.c
**   fs.c -> sendfile.c (fs.sendfile: a file to a conn; main.c ends its
**     requests at exit)
**   tls.c -> tlsctx.c, so.c (the conn class), stream.c
**   so.c -> task.c, channel.c, stream.c, listener.c, log.c, worker.c
**   stream.c, listener.c -> sock.c
**   sock.c -> sched.c, coro.c, guard.c
**   everything -> log.c, alloc.c, aux.c, error.c
*/
#ifndef LUAHOST_H
#define LUAHOST_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#ifndef LUAHOST_VERSION_NUM  /* CMake's project version */
#define LUAHOST_VERSION_NUM "0.0.0"
#endif
#define LUAHOST_VERSION "luahost " LUAHOST_VERSION_NUM

/* Nested resumes so.spawn makes before it queues new tasks instead. */
#define LH_MAX_NESTED_SPAWNS 64

/*
** A host error code outside libuv's range: a timeout that involves no
** connection (so.join, a channel, so.first), "ETIMEDOUT: timed out".
*/
#define LH_ETIMEDOUT (-4096)  /* below every UV_E* (UV_EOF is -4095) */

typedef struct lh_task lh_task;

/*
** What a kind of wait is; one static instance per kind (read, accept,
** sleep, join, ...), shared by every wait of that kind.
*/
typedef struct lh_waitkind {
  const char *name;            /* what so.tasks will show: "read", ... */
  void (*cancel)(lh_task *t);  /* the object forgets t; NULL: nothing to undo */
  /* After the wait ended normally, on the waiting thread, with the results
     above base: what the waiting function returns (NULL: the results). */
  int (*after)(lua_State *L, int base);
  unsigned flags;              /* LH_WAIT_* */
  /* What it waits on, for so.tasks ("127.0.0.1:52314"); NULL: nothing. */
  void (*describe)(lh_task *t, char *buf, size_t size);
} lh_waitkind;

enum {
  LH_WAIT_NET  = 1 << 0,  /* on a socket: a timeout is libuv's ETIMEDOUT */
  LH_WAIT_ENDS = 1 << 1   /* its own timeout is its normal end (so.sleep) */
};

/*
** One pending operation of a task: what it waits on, how to abandon it
** and when it times out. A task waits on one thing at a time, so the record
** lives in the task; `kind` is NULL while the task waits on nothing.
*/
typedef struct lh_waitrec {
  const lh_waitkind *kind;  /* NULL when not waiting */
  void *on;                 /* the object or request waited on */
  int heapidx;              /* its deadline's place in the heap, -1: none */
  int base;                 /* the waiting C function's stack top */
} lh_waitrec;

/*
** A task: a Lua thread run by the scheduler. The struct lives in a full
** userdata (the task handle scripts see); its user value is the thread.
** The thread's
** LUA_EXTRASPACE points back here, so a C function finds the task it runs
** in without a lookup.
*/
struct lh_task {
  lua_State *co;          /* the thread */
  lh_task *next;          /* link: ready queue, or a list of waiters */
  /* Who waits for it to end: a task so.first started has no handle a
     script could join, so it has its so.first and no joiners. */
  union {
    lh_task *joiners;       /* tasks waiting in so.join for this one */
    struct lh_first *first; /* with `in_first`: the so.first that started it */
  } u;
  lh_waitrec wait;          /* what it waits on now */
  int64_t deadline;       /* so.deadline in force (loop ms), or -1 */
  const char *site;       /* "file:line" of the so.spawn that started it */
  int ref;                /* registry ref to this userdata while alive */
  uint64_t id;            /* unique in the process, from 1 */
  int nargs;              /* values pushed on co for its next resume */
  uint32_t since;         /* loop ms (mod 2^32) when its state changed */
  int16_t err;            /* how its last wait failed: a libuv code */
  unsigned status : 3;    /* LH_TASK_* */
  unsigned queued : 2;    /* in the ready queue: 1 + the turn's parity */
  unsigned cancelling : 1;  /* so.cancel asked it to end */
  unsigned in_first : 1;    /* started by so.first (see u) */
  unsigned held : 1;        /* a so.first loser: its wait abandoned */
  unsigned by_deadline : 1; /* its wait's deadline is so.deadline's */
  unsigned runaway : 1;     /* the guard stopped it in this run (logged) */
};

enum {
  LH_TASK_RUNNING,    /* on the C stack: running, or resuming another */
  LH_TASK_WAITING,    /* suspended in a wait of the host's */
  LH_TASK_YIELDED,    /* suspended in a plain yield, or not started */
  LH_TASK_DONE,       /* returned */
  LH_TASK_FAILED,     /* raised */
  LH_TASK_CANCELLED   /* ended by so.cancel */
};

/*
** so.first's record: the task waiting in it, the tasks it started, and
** the first of them to return.
*/
typedef struct lh_first {
  lh_task *waiter;   /* NULL while so.first is still starting tasks */
  lh_task *winner;   /* the first task that returned or raised */
  int n, live;       /* tasks started; of those, not yet ended */
  lh_task *tasks[1]; /* n of them: their handles are on so.first's stack */
} lh_first;

#define lh_task_ended(t) ((t)->status >= LH_TASK_DONE)

/*
** A thread's LUA_EXTRASPACE: for a task's own thread, its lh_task; for a
** script's coroutine that a task resumed, that task tagged LH_NESTED (and
** LH_WAITING while the coroutine is suspended in a wait of the host's);
** 0 for any other coroutine.
*/
#define LH_EXTRA(L) (*(uintptr_t *)lua_getextraspace(L))
#define LH_NESTED ((uintptr_t)1)
#define LH_WAITING ((uintptr_t)2)
#define LH_OWNDL ((uintptr_t)4)  /* has a so.deadline of its own, kept */
#define LH_EXTRA_TAGS (LH_NESTED | LH_WAITING | LH_OWNDL)

/* What the host yields (a light userdata): a wait, or a cancel unwinding. */
enum { LH_YIELD_PLAIN, LH_YIELD_WAIT, LH_YIELD_CANCEL };

/*
** A socket, TCP or Unix: a conn or a listener. C owns this memory; it is
** freed in the uv_close callback once the Lua userdata no longer points at
** it. The handle comes last, and a TCP socket's memory ends with its
** uv_tcp_t (a uv_pipe_t is larger): the size of every conn counts.
*/
typedef struct lh_sock {
  unsigned flags;         /* LH_SOCK_* */
  int err;                /* sticky read error (libuv code), 0 if none */
  int64_t timeout;        /* ms for reads/writes/accepts, -1 for none */
  union {
    struct {              /* conn: */
      lh_task *reader;    /* the task waiting in so.read */
      lh_task *sender;    /* the task waiting in fs.sendfile */
    };
    struct {              /* listener: tasks waiting in so.accept (FIFO) */
      lh_task *head, **tail;
    } acceptors;
  } w;
  union {                 /* the handle: which one, LH_SOCK_UNIX says */
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;       /* only with LH_SOCK_UNIX: memory ends above */
  };
} lh_sock;

/* The socket of a handle libuv calls back with. */
#define lh_sockof(h) ((lh_sock *)((char *)(h) - offsetof(lh_sock, handle)))

enum {
  LH_SOCK_LISTENER = 1 << 0, /* a listener, not a conn */
  LH_SOCK_READING  = 1 << 1, /* uv_read_start is in effect */
  LH_SOCK_EOF      = 1 << 2, /* the peer's EOF was read */
  LH_SOCK_PENDING  = 1 << 3, /* listener: libuv holds an accepted fd */
  LH_SOCK_DETACHED = 1 << 4, /* no userdata points here any more */
  LH_SOCK_CLOSED   = 1 << 5, /* uv_close has called back */
  LH_SOCK_SHUT     = 1 << 6, /* listener closed by the drain, not by Lua */
  LH_SOCK_UNIX     = 1 << 7  /* a Unix domain socket (a uv_pipe_t) */
};

/*
** A layer over a conn's bytes (TLS), as nginx switches a connection's
** recv and send to SSL's: the conn's handle's `data` points at a struct
** whose first member points at these, and so.read, so.write and
** so.shutdown go through them. sock.c and stream.c know no more of it.
*/
typedef struct lh_layer {
  /* so.read and so.write for the conn, with the checks common to both
     done (the data checked: a string or an array of strings, total bytes) */
  int (*read)(lua_State *L, lh_sock *s, lh_task *t);
  int (*write)(lua_State *L, lh_sock *s, lh_task *t, int data, size_t total);
  /* so.shutdown's part before the TCP shutdown: 0, or a libuv error */
  int (*shutdown)(lh_sock *s);
  /* so.readable's part: the layer holds bytes a read would return */
  int (*buffered)(lh_sock *s);
  /* the conn closes: send what a close sends, free the layer */
  void (*close)(lh_sock *s);
} lh_layer;

#define lh_layerof(s) (*(const lh_layer **)(s)->handle.data)

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
#define LH_TAG_CHANNEL  UINT64_C(0x6c7561686368616e) /* "luahchan" */
#define LH_TAG_TLSCTX   UINT64_C(0x6c7561687463747a) /* "luahtctz" */
#define LH_TAG_FILE     UINT64_C(0x6c75616866696c65) /* "luahfile" */
#define LH_TAG_ZSTREAM  UINT64_C(0x6c7561687a737472) /* "luahzstr" */

#define LH_TASK_TNAME "task"

/* A file of so.fs: a full userdata, metatable "file". */
typedef struct lh_file {
  uint64_t tag;   /* LH_TAG_FILE */
  int fd;         /* -1 once closed */
  int readonly;   /* opened for reading only: closes without waiting */
  int pending;    /* pool requests on fd (each anchors the userdata) */
  int deferred;   /* closed while some were pending: closed after them */
} lh_file;

/* The host: one loop, one Lua state. */
typedef struct lh_host {
  uv_loop_t *loop;
  lua_State *L;           /* main state; NULL once closing */
  int depth;              /* resumes in progress (0: called from the loop) */
  int exit_status;        /* what main returns */
  int draining;           /* a signal asked the host to stop */
  int worker;             /* its number under --workers, else 0 */
  lh_task *ready_head, *ready_tail;
  uv_check_t ready_check; /* runs queued tasks after each poll */
  uv_idle_t ready_idle;   /* keeps poll from blocking while tasks are queued */
  uv_timer_t deadline_timer; /* the earliest deadline of any wait */
  long ntasks, nconns, nlisteners; /* live counts, for so.stats */
  uint64_t next_id;       /* the next task's id */
  /* For the runaway guard's watchdog thread (see guard.c): the Lua thread
     that runs now (NULL: none), and a count of resumes and returns. */
  lua_State *running;
  uint64_t run_seq;
  /* fs requests whose task stopped waiting while a pool thread runs them
     (a FIFO's open may never end): they must not keep the host alive. */
  int fs_abandoned;
  /* Counters since start, for so.stats. */
  uint64_t accepts, bytes_in, bytes_out, timeouts, errors;
} lh_host;

extern lh_host lh_H;

/* alloc.c */
lua_State *lh_newstate(size_t limit);
void lh_idle_gc_init(void);

/* log.c */
enum { LH_LOG_DEBUG, LH_LOG_INFO, LH_LOG_WARN, LH_LOG_ERROR };
extern int lh_log_level;
int lh_log_parse(const char *name);
void lh_log(int level, lh_task *t, const char *fmt, ...);
void lh_log_string(int level, lh_task *t, const char *msg, size_t len);
void lh_log_always(int level, lh_task *t, const char *msg, size_t len);
void lh_log_open(lua_State *L);

/* aux.c */
void *lh_checkobj(lua_State *L, int arg, uint64_t tag, const char *tname);
int64_t lh_checktimeout(lua_State *L, int arg);
int64_t lh_now(void);

/* error.c */
int lh_pusherror(lua_State *L, int err);
void lh_pusherror_values(lua_State *L, int err);
void lh_error_init(lua_State *L);

/* sched.c: tasks' lives, waits, wakes and deadlines */
void lh_sched_init(lua_State *L);
void lh_sched_close(void);
lh_task *lh_task_current(lua_State *L);
lh_task *lh_task_caller(lua_State *L);
lh_task *lh_checktask_caller(lua_State *L, const char *what);
lh_task *lh_newtask(lua_State *L, int fn);
void lh_start(lua_State *L, lh_task *t, int nargs);
int lh_wait(lua_State *L, lh_task *t, const lh_waitkind *kind, void *on,
            int64_t timeout_ms);
int lh_expired(lh_task *t);
void lh_resume(lh_task *t, int nargs);
void lh_resume_err(lh_task *t, int err);
void lh_resume_status(lh_task *t, int status);
void lh_wake(lh_task *t, int nargs);
void lh_wake_err(lh_task *t, int err);
void lh_abort_err(lh_task *t, int err);
void lh_wait_renew(lh_task *t, int64_t timeout_ms);
int lh_push_results(lua_State *L, lh_task *t);
int lh_cancel(lua_State *L, lh_task *t);
int lh_unwind(lua_State *L);
int lh_yieldkind(lua_State *co, int nres);
int lh_pushprotected(lh_task *t, lua_CFunction f, void *ud);
int lh_spawn_main(lua_State *L, int nargs);
int lh_closethread(lua_State *co, lua_State *from);

/* coro.c */
void lh_coro_open(lua_State *L);

/* sock.c */
lh_sock *lh_checkconn(lua_State *L, int arg);
lh_sock *lh_checklistener(lua_State *L, int arg);
lh_sock *lh_newsock(lua_State *L, unsigned flags);
int lh_sock_renew(lh_sockref *ref);
void lh_sock_close(lua_State *L, int idx);
void lh_sock_closeref(lh_sockref *ref);
void lh_sock_open(lua_State *L);
void lh_sock_shut_listeners(void);
int lh_sock_settimeout(lua_State *L);
int lh_parseaddr(const char *host, int port, struct sockaddr_storage *ss);
int lh_pushaddr(lua_State *L, const struct sockaddr_storage *ss);
void lh_sock_addr(const lh_sock *s, int peer, char *buf, size_t size);
const char *lh_unixpath(const char *host);
int lh_unix_claim(const char *path);
int lh_getaddrinfo(uv_getaddrinfo_t *req, uv_getaddrinfo_cb cb,
                   const char *host, int port, int flags);

/* sendfile.c */
int lh_fs_sendfile(lua_State *L);
void lh_sendfile_close(void);

/* stream.c */
void lh_stream_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
int lh_stream_start(lh_sock *s, uv_read_cb cb);
void lh_stream_stop(lh_sock *s);
int lh_stream_wait_read(lua_State *L, lh_sock *s, lh_task *t, uv_read_cb cb);
int lh_stream_send(lh_sock *s, char *buf, size_t len);
int lh_stream_write_owned(lua_State *L, lh_sock *s, lh_task *t, char *buf,
                          size_t len);
void lh_stream_open(lua_State *L);

/* tlsctx.c: TLS contexts; tls.c: TLS conns and the so.tls module */
struct ssl_ctx_st;
const char *lh_tls_reason(void);
int lh_tls_pusherror(lua_State *L, const char *what);
struct ssl_ctx_st *lh_tls_checkctx(lua_State *L, int arg, int *server);
int lh_tls_server(lua_State *L);
int lh_tls_client(lua_State *L);
void lh_tlsctx_open(lua_State *L);
int luaopen_so_tls(lua_State *L);

/* fs.c, zlib.c: the so.fs and so.zlib modules */
int luaopen_so_fs(lua_State *L);
int luaopen_so_zlib(lua_State *L);

/* listener.c, task.c, channel.c */
void lh_listener_open(lua_State *L);
void lh_task_open(lua_State *L);
void lh_task_init(lua_State *L);
void lh_task_dump(void);
void lh_cancel_all(lua_State *L);

/* guard.c, and what the scheduler tells it */
int lh_guard_start(double seconds);

static inline lua_State *lh_guard_enter(lua_State *co) {
  lua_State *prev = lh_H.running;
  __atomic_store_n(&lh_H.running, co, __ATOMIC_RELAXED);
  __atomic_add_fetch(&lh_H.run_seq, 1, __ATOMIC_RELAXED);
  return prev;
}

static inline void lh_guard_leave(lua_State *prev) {
  __atomic_store_n(&lh_H.running, prev, __ATOMIC_RELAXED);
  __atomic_add_fetch(&lh_H.run_seq, 1, __ATOMIC_RELAXED);
}

/* supervisor.c, worker.c */
int lh_supervise(int n, char **argv);
int lh_worker_init(void);
void lh_worker_ready(void);
int lh_worker_listen(const char *host, int port, int backlog);
void lh_worker_open(lua_State *L);

/* drain.c */
extern int64_t lh_drain_ms;
void lh_drain_init(lua_State *L);
void lh_drain_open(lua_State *L);
void lh_channel_open(lua_State *L);
int lh_channel_settimeout(lua_State *L);

/* so.c */
int luaopen_so(lua_State *L);

#endif
