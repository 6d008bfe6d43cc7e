/*
** stream.c: reading, writing, shutting down and connecting conns.
**
** Backpressure as in the chapter's soRead: a conn reads from the OS only
** while a task waits in so.read (uv_read_start when one starts waiting,
** uv_read_stop when the data is delivered and nobody waits again), so a
** peer that sends and never reads is held back by TCP, not by our memory.
*/
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "luahost.h"

/*
** One read buffer for every conn: a read callback turns its bytes into a
** Lua string before libuv asks for a buffer again, so an idle conn holds
** none, and no buffer is allocated and freed per read. 256 KiB rather than
** libuv's suggested 64 KiB: a bulk stream then costs a quarter of the
** reads and resumes (measured: bulk echo 0.83x -> 1.02x raw libuv), and a
** conn still holds at most one chunk.
*/
static char readbuf[256 * 1024];


/* {======================================================
** so.read
** ======================================================= */

/* The read buffer for every conn, plain or TLS. */
void lh_stream_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  (void)suggested;
  *buf = uv_buf_init(readbuf, sizeof readbuf);
}

/* Reads from the OS into cb, unless already reading: 0, or an error. */
int lh_stream_start(lh_sock *s, uv_read_cb cb) {
  if (!(s->flags & LH_SOCK_READING)) {
    int err = uv_read_start(&s->stream, lh_stream_alloc, cb);
    if (err < 0)
      return err;
    s->flags |= LH_SOCK_READING;
  }
  return 0;
}

void lh_stream_stop(lh_sock *s) {
  if (s->flags & LH_SOCK_READING) {
    uv_read_stop(&s->stream);
    s->flags &= ~LH_SOCK_READING;
  }
}

typedef struct read_result {
  const char *base;
  size_t len;
} read_result;

static int push_read(lua_State *L) {
  read_result *r = lua_touserdata(L, 1);
  lua_pushlstring(L, r->base, r->len);
  return 1;  /* the bytes */
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  lh_sock *s = lh_sockof(stream);
  lh_task *t = s->w.reader;
  if (nread == 0)  /* EAGAIN: nothing this time */
    return;
  if (t == NULL || lh_H.L == NULL) {
    /* Cannot happen: reading stops when the reader leaves. Should it, the
       data must not be lost silently. */
    if (nread > 0)
      fprintf(stderr, "luahost: internal error: %zd bytes read with no "
              "reader\n", nread);
    lh_stream_stop(s);
    return;
  }
  s->w.reader = NULL;
  if (nread > 0)
    lh_H.bytes_in += (uint64_t)nread;
  if (nread > 0 || nread == UV_EOF) {
    /* The string is made under protection: out of memory, this read
       fails and the conn with it (its bytes are gone), nothing else. */
    read_result r = {buf->base, nread > 0 ? (size_t)nread : 0};
    if (nread == UV_EOF)
      s->flags |= LH_SOCK_EOF;
    int n = lh_pushprotected(t, push_read, &r);
    if (n == 1)
      lh_resume(t, 1);
    else if (n == -1) {
      s->err = UV_ENOMEM;
      lh_resume_err(t, UV_ENOMEM);
    }
  } else {
    s->err = (int)nread;
    lh_resume_err(t, s->err);
  }
  /* The task is often back in so.read already: then keep reading, which
     saves the two epoll_ctl calls of a stop and a start. */
  if (s->w.reader == NULL && !uv_is_closing((uv_handle_t *)stream))
    lh_stream_stop(s);
}

static void cancel_read(lh_task *t) {
  lh_sock *s = t->wait.on;
  s->w.reader = NULL;
  lh_stream_stop(s);
}

static void describe_read(lh_task *t, char *buf, size_t size) {
  lh_sock_addr(t->wait.on, 1, buf, size);
}

static const lh_waitkind read_kind = {"read", cancel_read, NULL, LH_WAIT_NET,
                                  describe_read};

/* A request's conn's peer: what write and shutdown wait on. */
static void describe_req(lh_task *t, char *buf, size_t size) {
  uv_req_t *r = t->wait.on;
  uv_stream_t *h = r->type == UV_WRITE ? ((uv_write_t *)r)->handle
                                       : ((uv_shutdown_t *)r)->handle;
  lh_sock_addr(lh_sockof(h), 1, buf, size);
}

/*
** so.read(conn): the next bytes that arrive (up to 256 KiB); "" at EOF;
** nil, msg, name on a socket error. Errors and EOF stay for later reads.
*/
static int so_read(lua_State *L) {
  lh_sock *s = lh_checkconn(L, 1);
  lh_task *t;
  if (s->w.reader != NULL)
    return luaL_error(L, "conn is already being read by another task");
  t = lh_checktask_caller(L, "read");
  if (s->handle.data != NULL)
    return lh_layerof(s)->read(L, s, t);
  if (s->err != 0)
    return lh_pusherror(L, s->err);
  if (s->flags & LH_SOCK_EOF) {
    lua_pushliteral(L, "");
    return 1;
  }
  return lh_stream_wait_read(L, s, t, on_read);
}

/*
** so.read's wait, with cb reading (plain conns' on_read, or TLS's): t
** becomes the conn's reader until cb resumes it.
*/
int lh_stream_wait_read(lua_State *L, lh_sock *s, lh_task *t, uv_read_cb cb) {
  int err = lh_stream_start(s, cb);
  if (err < 0)
    return lh_pusherror(L, err);
  s->w.reader = t;
  return lh_wait(L, t, &read_kind, s, s->timeout);
}

/*
** so.readable(conn): whether so.read would return without waiting, i.e.
** bytes, the peer's EOF or an error have arrived; asks the OS without
** reading (MSG_PEEK). What a pool asks of an idle conn before handing it
** out: anything that arrives on one means it is no longer usable.
*/
static int so_readable(lua_State *L) {
  lh_sock *s = lh_checkconn(L, 1);
  uv_os_fd_t fd;
  char c;
  int r = 1;
  if (s->err == 0 && !(s->flags & LH_SOCK_EOF) &&
      !(s->handle.data != NULL && lh_layerof(s)->buffered(s)) &&
      uv_fileno(&s->handle, &fd) == 0) {
    ssize_t n;
    do
      n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    r = !(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
    if (n < 0 && r)  /* the peek took the socket's error: keep it */
      s->err = -errno;
  }
  lua_pushboolean(L, r);
  return 1;
}

/* }====================================================== */


/* {======================================================
** so.write
** ======================================================= */

typedef struct write_req {
  uv_write_t req;
  lh_task *task;  /* the writer, NULL once it stopped waiting (timeout) */
  int data_ref;   /* what the buffers point into, until the callback */
  char *owned;    /* or the buffer itself, freed then (TLS's records) */
  size_t len;     /* bytes it hands the OS, for so.stats */
} write_req;

static void on_write(uv_write_t *r, int status) {
  write_req *req = (write_req *)r;
  lh_task *t = req->task;
  free(req->owned);
  if (lh_H.L == NULL) {  /* lua_close has run: only memory is left */
    free(req);
    return;
  }
  luaL_unref(lh_H.L, LUA_REGISTRYINDEX, req->data_ref);
  if (status == 0)
    lh_H.bytes_out += req->len;
  free(req);
  if (t != NULL)
    lh_resume_status(t, status);
}

static void cancel_write(lh_task *t) {
  write_req *req = t->wait.on;
  req->task = NULL;  /* the write goes on; only its writer left */
}

static const lh_waitkind write_kind = {"write", cancel_write, NULL,
                                       LH_WAIT_NET, describe_req};

#define MAXPIECES 1024

/*
** The buffers of a write being prepared. Shared, so filled only where no
** Lua code can run before libuv has them (uv_write copies the array): no
** allocation, no metamethod, hence no collector and no __gc that writes.
*/
static uv_buf_t pieces[MAXPIECES];

/*
** Fills pieces from data (a string, or a table of strings that
** check_data accepted), from byte `skip` on; returns how many. Reads
** with raw gets only: nothing here can run Lua code.
*/
static unsigned fill_pieces(lua_State *L, int data, size_t skip) {
  lua_Integer i, n;
  unsigned nbufs = 0;
  size_t len;
  const char *p;
  if (lua_type(L, data) == LUA_TSTRING) {
    p = lua_tolstring(L, data, &len);
    pieces[0] = uv_buf_init((char *)p + skip, (unsigned)(len - skip));
    return 1;
  }
  n = (lua_Integer)lua_rawlen(L, data);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, data, i);
    p = lua_tolstring(L, -1, &len);
    lua_pop(L, 1);  /* the table keeps the string */
    if (skip >= len) {
      skip -= len;
      continue;
    }
    pieces[nbufs++] = uv_buf_init((char *)p + skip, (unsigned)(len - skip));
    skip = 0;
  }
  return nbufs;
}

/*
** Checks so.write's data argument, a string or an array of at most
** MAXPIECES strings, and returns its total length.
*/
static size_t check_data(lua_State *L, int arg) {
  size_t total = 0, len;
  if (lua_type(L, arg) == LUA_TSTRING) {
    lua_tolstring(L, arg, &len);
    luaL_argcheck(L, len <= UINT32_MAX, arg, "string too long");
    return len;
  } else if (lua_type(L, arg) == LUA_TTABLE) {
    lua_Integer i, n = (lua_Integer)lua_rawlen(L, arg);
    luaL_argcheck(L, n <= MAXPIECES, arg, "too many pieces (1024 at most)");
    for (i = 1; i <= n; i++) {
      if (lua_rawgeti(L, arg, i) != LUA_TSTRING)
        return luaL_argerror(L, arg, lua_pushfstring(L,
                   "string expected at index %d, got %s", (int)i,
                   luaL_typename(L, -1)));
      lua_tolstring(L, -1, &len);
      luaL_argcheck(L, len <= UINT32_MAX, arg, "string too long");
      lua_pop(L, 1);
      total += len;
    }
    return total;
  }
  return luaL_typeerror(L, arg, "string or table");
}

/*
** Anchors what a queued write reads from, until its callback: a string
** is itself; a table's strings go into a copy, since the script may
** change its own table before the write completes (after a timeout, or
** from another task). Returns the registry ref; pushes the anchored value.
*/
static int anchor_data(lua_State *L, int data) {
  if (lua_type(L, data) == LUA_TSTRING)
    lua_pushvalue(L, data);
  else {
    lua_Integer i, n = (lua_Integer)lua_rawlen(L, data);
    lua_createtable(L, (int)n, 0);
    for (i = 1; i <= n; i++) {
      lua_rawgeti(L, data, i);
      lua_rawseti(L, -2, i);
    }
  }
  lua_pushvalue(L, -1);
  return luaL_ref(L, LUA_REGISTRYINDEX);
}

/*
** so.write(conn, data): data is a string or an array of strings, written
** in one system call when the OS takes it all at once (no yield), else
** queued in order; true once libuv has handed everything to the OS.
*/
static int so_write(lua_State *L) {
  lh_sock *s = lh_checkconn(L, 1);
  size_t total = check_data(L, 2);
  lh_task *t = lh_checktask_caller(L, "write");
  unsigned nbufs;
  int written, err, ref;
  write_req *req;
  if (s->handle.data != NULL)
    return lh_layerof(s)->write(L, s, t, 2, total);
  if (s->w.sender != NULL)  /* its bytes would land inside the file's */
    return lh_pusherror(L, UV_EBUSY);
  if (total == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  luaL_checkstack(L, 4, NULL);
  nbufs = fill_pieces(L, 2, 0);
  written = uv_try_write(&s->stream, pieces, nbufs);
  if (written > 0)
    lh_H.bytes_out += (uint64_t)written;
  if (written >= 0 && (size_t)written == total) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (written < 0 && written != UV_EAGAIN)
    return lh_pusherror(L, written);
  /* Anchoring allocates, and a __gc it sets off may write: fill the
     pieces again, from the anchored copy, after it. */
  ref = anchor_data(L, 2);
  req = malloc(sizeof *req);
  if (req == NULL) {
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    return luaL_error(L, "not enough memory");
  }
  req->task = t;
  req->data_ref = ref;
  req->owned = NULL;
  req->len = total - (written > 0 ? (size_t)written : 0);
  nbufs = fill_pieces(L, lua_gettop(L), written > 0 ? (size_t)written : 0);
  err = uv_write(&req->req, &s->stream, pieces, nbufs, on_write);
  if (err < 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, req->data_ref);
    free(req);
    return lh_pusherror(L, err);
  }
  return lh_wait(L, t, &write_kind, req, s->timeout);
}

/*
** Sends buf[0..len) (malloc'd: the send owns it from now on) after what
** is queued on s. 1 when the OS took it all at once; 0 when queued, with
** *reqp its request; or a libuv error.
*/
static int send_owned(lh_sock *s, char *buf, size_t len, lh_task *t,
                      write_req **reqp) {
  uv_buf_t b = uv_buf_init(buf, (unsigned)len);
  int written = uv_try_write(&s->stream, &b, 1), err;
  write_req *req;
  if (written > 0)
    lh_H.bytes_out += (uint64_t)written;
  if (written >= 0 && (size_t)written == len) {
    free(buf);
    return 1;
  }
  if (written < 0 && written != UV_EAGAIN) {
    free(buf);
    return written;
  }
  if (written < 0)
    written = 0;
  req = malloc(sizeof *req);
  if (req == NULL) {
    free(buf);
    return UV_ENOMEM;
  }
  req->task = t;
  req->data_ref = LUA_NOREF;
  req->owned = buf;
  req->len = len - (size_t)written;
  b = uv_buf_init(buf + written, (unsigned)req->len);
  err = uv_write(&req->req, &s->stream, &b, 1, on_write);
  if (err < 0) {
    free(buf);
    free(req);
    return err;
  }
  *reqp = req;
  return 0;
}

/* Sends buf as send_owned does, with nobody waiting: 0, or an error. */
int lh_stream_send(lh_sock *s, char *buf, size_t len) {
  write_req *req;
  int r = send_owned(s, buf, len, NULL, &req);
  return r < 0 ? r : 0;
}

/* so.write for a layer's bytes, buf as send_owned takes it. */
int lh_stream_write_owned(lua_State *L, lh_sock *s, lh_task *t, char *buf,
                          size_t len) {
  write_req *req;
  int r = send_owned(s, buf, len, t, &req);
  if (r < 0)
    return lh_pusherror(L, r);
  if (r == 1) {
    lua_pushboolean(L, 1);
    return 1;
  }
  return lh_wait(L, t, &write_kind, req, s->timeout);
}

/* }====================================================== */


/* {======================================================
** so.shutdown
** ======================================================= */

typedef struct shutdown_req {
  uv_shutdown_t req;
  lh_task *task;  /* NULL once the task stopped waiting */
} shutdown_req;

static void on_shutdown(uv_shutdown_t *r, int status) {
  shutdown_req *req = (shutdown_req *)r;
  lh_task *t = req->task;
  free(req);
  if (t != NULL && lh_H.L != NULL)
    lh_resume_status(t, status);
}

static void cancel_shutdown(lh_task *t) {
  shutdown_req *req = t->wait.on;
  req->task = NULL;
}

static const lh_waitkind shutdown_kind = {"shutdown", cancel_shutdown, NULL,
                                          LH_WAIT_NET, describe_req};

/*
** so.shutdown(conn): sends EOF after the queued writes; true once done.
*/
static int so_shutdown(lua_State *L) {
  lh_sock *s = lh_checkconn(L, 1);
  lh_task *t = lh_checktask_caller(L, "shutdown");
  shutdown_req *req;
  int err;
  if (s->handle.data != NULL && (err = lh_layerof(s)->shutdown(s)) < 0)
    return lh_pusherror(L, err);
  req = malloc(sizeof *req);
  if (req == NULL)
    return luaL_error(L, "not enough memory");
  req->task = t;
  err = uv_shutdown(&req->req, &s->stream, on_shutdown);
  if (err < 0) {
    free(req);
    return lh_pusherror(L, err);
  }
  return lh_wait(L, t, &shutdown_kind, req, s->timeout);
}

/* }====================================================== */


/* {======================================================
** so.connect
** ======================================================= */

typedef struct connect_req {
  uv_getaddrinfo_t resolve;
  uv_connect_t connect;
  lh_task *task;          /* NULL once the task stopped waiting */
  lh_sockref *conn;       /* the conn being connected */
  int conn_ref;           /* anchors it until the request is freed */
  struct addrinfo *addrs; /* from the resolver, freed with the request */
  struct addrinfo *next;  /* the next address to try */
  int err;                /* the last address's error */
} connect_req;

static void connect_free(connect_req *req) {
  if (req->addrs != NULL)
    uv_freeaddrinfo(req->addrs);
  if (lh_H.L != NULL)
    luaL_unref(lh_H.L, LUA_REGISTRYINDEX, req->conn_ref);
  free(req);
}

/*
** The task gets the conn, or the error (and the conn is closed); the
** request is freed.
*/
static void connect_done(connect_req *req, int err) {
  lh_task *t = req->task;
  if (err < 0) {
    lh_sock_closeref(req->conn);
    connect_free(req);
    lh_resume_err(t, err);
    return;
  }
  if (!(req->conn->s->flags & LH_SOCK_UNIX))
    uv_tcp_nodelay(&req->conn->s->tcp, 1);
  /* The conn's userdata exists: pushing it allocates nothing. */
  lua_rawgeti(t->co, LUA_REGISTRYINDEX, req->conn_ref);
  connect_free(req);
  lh_resume(t, 1);  /* the conn */
}

static void on_connect(uv_connect_t *r, int status);

/*
** Starts a connect to the next address that takes one; 0, or the last
** error when none is left.
*/
static int connect_next(connect_req *req) {
  while (req->next != NULL) {
    struct addrinfo *ai = req->next;
    int err;
    req->next = ai->ai_next;
    if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
      continue;
    err = uv_tcp_connect(&req->connect, &req->conn->s->tcp, ai->ai_addr,
                         on_connect);
    if (err == 0)
      return 0;
    req->err = err;
  }
  return req->err;
}

static void on_connect(uv_connect_t *r, int status) {
  connect_req *req = (connect_req *)((char *)r -
                                     offsetof(connect_req, connect));
  if (req->task == NULL || lh_H.L == NULL) {  /* gave up, or closing */
    connect_free(req);
    return;
  }
  if (status == 0) {
    connect_done(req, 0);
    return;
  }
  req->err = status;
  /* A failed socket cannot connect again: the next address gets a fresh
     one, made as every socket is. */
  if (req->next != NULL && lh_sock_renew(req->conn) == 0 &&
      connect_next(req) == 0)
    return;
  connect_done(req, req->err);
}

static void on_resolved(uv_getaddrinfo_t *r, int status,
                        struct addrinfo *res) {
  connect_req *req = (connect_req *)r;
  req->addrs = res;
  req->next = res;
  if (req->task == NULL || lh_H.L == NULL) {
    connect_free(req);
    return;
  }
  if (status < 0 || (status = connect_next(req)) < 0)
    connect_done(req, status);
}

/*
** The task stopped waiting (timeout, so.deadline, so.cancel): the conn
** closes at once, which ends a connect in progress (its callback then
** frees the request); a resolve still queued is dropped, one running
** finishes and frees.
*/
static void cancel_connect(lh_task *t) {
  connect_req *req = t->wait.on;
  req->task = NULL;
  lh_sock_closeref(req->conn);
  uv_cancel((uv_req_t *)&req->resolve);
}

static const lh_waitkind connect_kind = {"connect", cancel_connect, NULL,
                                         LH_WAIT_NET, NULL};

/*
** so.connect(host, port [, timeout]): a connected conn, or nil, msg,
** name. Names are resolved off the loop (uv_getaddrinfo), and each address
** is tried in turn; "unix:PATH" connects to a Unix socket (port ignored).
*/
static int so_connect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  const char *path = lh_unixpath(host);
  lua_Integer port = path ? luaL_optinteger(L, 2, 0) : luaL_checkinteger(L, 2);
  int64_t timeout = lh_checktimeout(L, 3);
  struct sockaddr_storage ss;
  connect_req *req;
  lh_task *t;
  int err, conn;
  luaL_argcheck(L, port >= 0 && port <= 65535, 2, "port out of range");
  t = lh_checktask_caller(L, "connect");
  if (path != NULL && strlen(path) >= sizeof(struct sockaddr_un) -
                                      offsetof(struct sockaddr_un, sun_path))
    return lh_pusherror(L, UV_ENAMETOOLONG);  /* libuv would cut it */
  if (lh_expired(t))
    return lh_pusherror(L, UV_ETIMEDOUT);
  lua_settop(L, 3);
  lh_newsock(L, path ? LH_SOCK_UNIX : 0);
  conn = lua_gettop(L);
  req = calloc(1, sizeof *req);
  if (req == NULL) {
    lh_sock_close(L, conn);
    return luaL_error(L, "not enough memory");
  }
  req->conn = lua_touserdata(L, conn);
  lua_pushvalue(L, conn);
  req->conn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  req->task = t;
  if (path != NULL) {  /* (libuv reports every error to on_connect) */
    uv_pipe_connect(&req->connect, &req->conn->s->pipe, path, on_connect);
    err = 0;
  } else if (lh_parseaddr(host, (int)port, &ss) == 0) {
    err = uv_tcp_connect(&req->connect, &req->conn->s->tcp,
                         (struct sockaddr *)&ss, on_connect);
  } else
    err = lh_getaddrinfo(&req->resolve, on_resolved, host, (int)port,
                         AI_ADDRCONFIG);
  if (err < 0) {
    connect_free(req);
    lh_sock_close(L, conn);
    return lh_pusherror(L, err);
  }
  return lh_wait(L, t, &connect_kind, req, timeout);
}

/* }====================================================== */


static const luaL_Reg stream_funcs[] = {
  {"read", so_read},
  {"readable", so_readable},
  {"write", so_write},
  {"shutdown", so_shutdown},
  {"connect", so_connect},
  {NULL, NULL}
};

void lh_stream_open(lua_State *L) {
  luaL_setfuncs(L, stream_funcs, 0);
}
