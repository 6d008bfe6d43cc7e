/*
** sock.c: the Lua objects for TCP sockets (conns and listeners): creating,
** checking, closing, timeouts, addresses, and their metatables.
**
** Ownership: the userdata (lh_sockref) points at C memory (lh_sock) that
** holds the handle (uv_tcp_t, or uv_pipe_t for a Unix socket). Closing (so.close, __close or __gc, one function)
** detaches the userdata and starts uv_close; the close callback frees the
** memory. libuv calls back every pending request before the close
** callback, so the memory outlives everything that may touch it.
*/
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "luahost.h"

#define CONN_TNAME "conn"
#define LISTENER_TNAME "listener"

static lh_sock *checkopen(lua_State *L, int arg, uint64_t tag,
                          const char *tname) {
  lh_sockref *ref = lh_checkobj(L, arg, tag, tname);
  if (ref->s == NULL)
    luaL_error(L, "attempt to use a closed %s", tname);
  return ref->s;
}

lh_sock *lh_checkconn(lua_State *L, int arg) {
  return checkopen(L, arg, LH_TAG_CONN, CONN_TNAME);
}

lh_sock *lh_checklistener(lua_State *L, int arg) {
  return checkopen(L, arg, LH_TAG_LISTENER, LISTENER_TNAME);
}

/*
** A conn or a listener, open or closed: what so.close and so.settimeout
** take.
*/
static lh_sockref *toref(lua_State *L, int arg) {
  lh_sockref *ref = lua_touserdata(L, arg);
  if (ref == NULL || lua_rawlen(L, arg) != sizeof *ref ||
      (ref->tag != LH_TAG_CONN && ref->tag != LH_TAG_LISTENER))
    return NULL;
  return ref;
}

static lh_sockref *checkref(lua_State *L, int arg) {
  lh_sockref *ref = toref(L, arg);
  if (ref == NULL)
    luaL_typeerror(L, arg, "conn or listener");
  return ref;
}

static void on_close(uv_handle_t *h) {
  lh_sock *s = lh_sockof(h);
  s->flags |= LH_SOCK_CLOSED;
  if (s->flags & LH_SOCK_DETACHED)
    free(s);
}

/*
** The C side of a new socket: memory and an initialized handle (TCP, or a
** pipe with LH_SOCK_UNIX), or NULL when there is no memory.
*/
static lh_sock *sock_alloc(unsigned flags) {
  size_t size = offsetof(lh_sock, handle) + ((flags & LH_SOCK_UNIX)
                ? sizeof(uv_pipe_t) : sizeof(uv_tcp_t));
  lh_sock *s = malloc(size);
  int err;
  if (s == NULL)
    return NULL;
  memset(s, 0, size);
  s->flags = flags;
  s->timeout = -1;
  if (flags & LH_SOCK_LISTENER)
    s->w.acceptors.tail = &s->w.acceptors.head;
  err = (flags & LH_SOCK_UNIX) ? uv_pipe_init(lh_H.loop, &s->pipe, 0)
                               : uv_tcp_init(lh_H.loop, &s->tcp);
  if (err < 0) {
    free(s);
    return NULL;
  }
  return s;
}

/*
** Pushes a new userdata of the given kind, in its closed state, then
** creates the socket behind it. Raises on failure, leaving nothing open.
*/
lh_sock *lh_newsock(lua_State *L, unsigned flags) {
  int listener = (flags & LH_SOCK_LISTENER) != 0;
  lh_sockref *ref = lua_newuserdatauv(L, sizeof *ref, 0);
  lh_sock *s;
  ref->tag = listener ? LH_TAG_LISTENER : LH_TAG_CONN;
  ref->s = NULL;  /* closed until the socket exists */
  luaL_setmetatable(L, listener ? LISTENER_TNAME : CONN_TNAME);
  s = sock_alloc(flags);
  if (s == NULL)
    luaL_error(L, "not enough memory");
  ref->s = s;
  if (listener)
    lh_H.nlisteners++;
  else
    lh_H.nconns++;
  return s;
}

/*
** Gives an open conn a fresh socket in place of its own, which closes:
** a socket whose connect failed cannot connect again. 0, or UV_ENOMEM
** (the conn then keeps its socket).
*/
int lh_sock_renew(lh_sockref *ref) {
  lh_sock *old = ref->s, *s = sock_alloc(old->flags);
  if (s == NULL)
    return UV_ENOMEM;
  s->timeout = old->timeout;
  ref->s = s;
  old->flags |= LH_SOCK_DETACHED;
  uv_close(&old->handle, on_close);
  return 0;
}

/*
** Ends every wait on s with nil, "ECANCELED: ...": the waiting tasks run
** from the ready queue, since this runs inside the closing task.
*/
static void cancel_waiters(lh_sock *s) {
  lh_task *t;
  if (!(s->flags & LH_SOCK_LISTENER)) {
    t = s->w.reader;
    s->w.reader = NULL;
    if (t != NULL)
      lh_wake_err(t, UV_ECANCELED);
    if ((t = s->w.sender) != NULL)  /* (its cancel forgets s) */
      lh_abort_err(t, UV_ECANCELED);
    return;
  }
  while ((t = s->w.acceptors.head) != NULL) {
    s->w.acceptors.head = t->next;
    t->next = NULL;
    lh_wake_err(t, UV_ECANCELED);
  }
  s->w.acceptors.tail = &s->w.acceptors.head;
}

/*
** A Unix listener takes its socket file with it, as Node's does (a
** worker's belongs to the supervisor, which keeps it across reloads).
*/
static void unlink_path(lh_sock *s) {
  char path[256];
  size_t len = sizeof path;
  if ((s->flags & LH_SOCK_UNIX) && (s->flags & LH_SOCK_LISTENER) &&
      lh_H.worker == 0 && !uv_is_closing(&s->handle) &&
      uv_pipe_getsockname(&s->pipe, path, &len) == 0 && len > 0 &&
      path[0] == '/')
    unlink(path);
}

/*
** The one closer behind so.close, __close and __gc; safe to call twice.
*/
void lh_sock_closeref(lh_sockref *ref) {
  lh_sock *s = ref->s;
  if (s == NULL)
    return;
  ref->s = NULL;
  if (s->flags & LH_SOCK_SHUT)
    ;  /* counted out, and its waiters woken, by the drain */
  else if (s->flags & LH_SOCK_LISTENER)
    lh_H.nlisteners--;
  else
    lh_H.nconns--;
  if (lh_H.L != NULL)  /* not at lua_close: tasks may still run */
    cancel_waiters(s);
  if (s->handle.data != NULL) {  /* TLS: its goodbye, and its memory */
    lh_layerof(s)->close(s);
    s->handle.data = NULL;
  }
  s->flags |= LH_SOCK_DETACHED;
  if (s->flags & LH_SOCK_CLOSED)
    free(s);
  else if (!uv_is_closing(&s->handle)) {
    unlink_path(s);
    uv_close(&s->handle, on_close);
  }
}

static void shut_listener(uv_handle_t *h, void *arg) {
  lh_sock *s = lh_sockof(h);
  (void)arg;
  if ((h->type != UV_TCP && h->type != UV_NAMED_PIPE) || uv_is_closing(h) ||
      !(s->flags & LH_SOCK_LISTENER) || (s->flags & LH_SOCK_DETACHED))
    return;
  s->flags |= LH_SOCK_SHUT;
  lh_H.nlisteners--;
  cancel_waiters(s);
  unlink_path(s);
  uv_close(h, on_close);
}

/*
** The drain: every listener stops listening (the kernel refuses new
** connections) and its acceptors get ECANCELED; the listener objects read
** as open, and their accepts fail the same way, until Lua closes them.
*/
void lh_sock_shut_listeners(void) {
  uv_walk(lh_H.loop, shut_listener, NULL);
}

/* Closes the conn or listener at idx, as so.close does. */
void lh_sock_close(lua_State *L, int idx) {
  lh_sock_closeref(lua_touserdata(L, idx));
}

/* so.close(obj): closes a conn or a listener; true, also when closed. */
static int so_close(lua_State *L) {
  lh_sock_closeref(checkref(L, 1));
  lua_pushboolean(L, 1);
  return 1;
}

/* __gc and __close; a script may call them by hand, with anything. */
static int sock_gc(lua_State *L) {
  lh_sockref *ref = toref(L, 1);
  if (ref != NULL)
    lh_sock_closeref(ref);
  return 0;
}

static int sock_tostring(lua_State *L) {
  lh_sockref *ref = checkref(L, 1);
  const char *kind = ref->tag == LH_TAG_CONN ? CONN_TNAME : LISTENER_TNAME;
  if (ref->s == NULL)
    lua_pushfstring(L, "%s (closed)", kind);
  else
    lua_pushfstring(L, "%s (%p)", kind, (void *)ref->s);
  return 1;
}

/*
** so.settimeout(obj, seconds): a limit for each later read, write and
** accept on obj; nil for none.
*/
int lh_sock_settimeout(lua_State *L) {
  lh_sockref *ref = checkref(L, 1);
  int64_t ms = lh_checktimeout(L, 2);
  if (ref->s == NULL)
    return luaL_error(L, "attempt to use a closed %s",
                      ref->tag == LH_TAG_CONN ? CONN_TNAME : LISTENER_TNAME);
  ref->s->timeout = ms;
  lua_pushboolean(L, 1);
  return 1;
}


/* {======================================================
** Addresses
** ======================================================= */

/*
** Fills ss from a numeric address (IPv4 or IPv6) or "*" (any IPv4
** address). 0, or UV_EINVAL for a name, which needs a resolver.
*/
int lh_parseaddr(const char *host, int port, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof *ss);
  if (strcmp(host, "*") == 0)
    host = "0.0.0.0";
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)ss) == 0)
    return 0;
  if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss) == 0)
    return 0;
  return UV_EINVAL;
}

/*
** Resolves host:port for a TCP socket (flags: AI_PASSIVE, AI_ADDRCONFIG);
** with cb NULL, at once (blocking), as uv_getaddrinfo does.
*/
int lh_getaddrinfo(uv_getaddrinfo_t *req, uv_getaddrinfo_cb cb,
                   const char *host, int port, int flags) {
  struct addrinfo hints;
  char service[16];
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = flags;
  snprintf(service, sizeof service, "%d", port);
  return uv_getaddrinfo(lh_H.loop, req, cb, host, service, &hints);
}

/* Pushes host, port for ss. */
int lh_pushaddr(lua_State *L, const struct sockaddr_storage *ss) {
  char host[INET6_ADDRSTRLEN];
  int port;
  if (ss->ss_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
    uv_ip6_name(a, host, sizeof host);
    port = ntohs(a->sin6_port);
  } else {
    const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
    uv_ip4_name(a, host, sizeof host);
    port = ntohs(a->sin_port);
  }
  lua_pushstring(L, host);
  lua_pushinteger(L, port);
  return 2;  /* host, port */
}

/*
** The path of "unix:PATH", a Unix domain socket's name; NULL for a host.
*/
const char *lh_unixpath(const char *host) {
  return strncmp(host, "unix:", 5) == 0 ? host + 5 : NULL;
}

typedef struct path_search {
  const char *path;
  int found;
} path_search;

static void find_listener(uv_handle_t *h, void *arg) {
  path_search *ps = arg;
  char path[256];
  size_t len = sizeof path - 1;
  if (h->type == UV_NAMED_PIPE && !uv_is_closing(h) &&
      (lh_sockof(h)->flags & LH_SOCK_LISTENER) &&
      uv_pipe_getsockname((uv_pipe_t *)h, path, &len) == 0) {
    path[len] = '\0';
    ps->found |= strcmp(path, ps->path) == 0;
  }
}

/*
** Makes path free for a Unix listener to bind: a socket file that nobody
** listens on any more (left by a process that died) is removed; one that
** a live process listens on is EADDRINUSE, as is any other file there.
** Whether one listens is asked the only way there is, by connecting: a
** live server sees a connection that closes at once. 0, or an error.
*/
int lh_unix_claim(const char *path) {
  struct sockaddr_un sun;
  struct stat st;
  path_search ps = {path, 0};
  int fd, r;
  if (strlen(path) >= sizeof sun.sun_path)
    return UV_ENAMETOOLONG;
  uv_walk(lh_H.loop, find_listener, &ps);
  if (ps.found)  /* ours: not to be asked */
    return UV_EADDRINUSE;
  if (lstat(path, &st) != 0)
    return errno == ENOENT ? 0 : -errno;
  if (!S_ISSOCK(st.st_mode))
    return UV_EADDRINUSE;
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -errno;
  memset(&sun, 0, sizeof sun);
  sun.sun_family = AF_UNIX;
  memcpy(sun.sun_path, path, strlen(path));
  r = connect(fd, (struct sockaddr *)&sun, sizeof sun) == 0 ? 0 : errno;
  close(fd);
  if (r == ECONNREFUSED)  /* stale: nobody accepts there */
    return unlink(path) == 0 || errno == ENOENT ? 0 : -errno;
  return r == ENOENT ? 0 : UV_EADDRINUSE;  /* (EAGAIN: a full backlog) */
}

/*
** The address of s (peer: of its peer) into ss, or for a Unix socket its
** path into path (size bytes, with its length in *len): 0, or an error.
*/
static int getname(const lh_sock *s, int peer, struct sockaddr_storage *ss,
                   char *path, size_t *len) {
  int sslen = sizeof *ss;
  if (s->flags & LH_SOCK_UNIX)
    return peer ? uv_pipe_getpeername(&s->pipe, path, len)
                : uv_pipe_getsockname(&s->pipe, path, len);
  return peer ? uv_tcp_getpeername(&s->tcp, (struct sockaddr *)ss, &sslen)
              : uv_tcp_getsockname(&s->tcp, (struct sockaddr *)ss, &sslen);
}

/*
** "host:port" of a socket's peer (or its own address), or "unix:PATH",
** for so.tasks; "?" when the OS does not say.
*/
void lh_sock_addr(const lh_sock *s, int peer, char *buf, size_t size) {
  struct sockaddr_storage ss;
  char host[INET6_ADDRSTRLEN] = "?", path[256];
  size_t len = sizeof path;
  int port = 0, err = getname(s, peer, &ss, path, &len);
  if (s->flags & LH_SOCK_UNIX) {
    if (err == 0 && len == 0 && peer)  /* an unnamed client: our path */
      err = getname(s, 0, &ss, path, (len = sizeof path, &len));
    snprintf(buf, size, "unix:%.*s", err == 0 ? (int)len : 1,
             err == 0 ? path : "?");
    return;
  }
  if (err == 0 && ss.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&ss, host, sizeof host);
    port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
  } else if (err == 0 && ss.ss_family == AF_INET) {
    uv_ip4_name((struct sockaddr_in *)&ss, host, sizeof host);
    port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
  }
  snprintf(buf, size, "%s:%d", host, port);
}

/* host, port of s or of its peer; a Unix socket's path (no "unix:"). */
static int pushname(lua_State *L, const lh_sock *s, int peer) {
  struct sockaddr_storage ss;
  char path[256];
  size_t len = sizeof path;
  int err = getname(s, peer, &ss, path, &len);
  if (err < 0)
    return lh_pusherror(L, err);
  if (s->flags & LH_SOCK_UNIX) {
    lua_pushlstring(L, path, len);
    return 1;
  }
  return lh_pushaddr(L, &ss);
}

/* so.sockname(obj): the local host, port of a conn or a listener. */
static int so_sockname(lua_State *L) {
  lh_sockref *ref = checkref(L, 1);
  if (ref->s == NULL)
    return luaL_error(L, "attempt to use a closed %s",
                      ref->tag == LH_TAG_CONN ? CONN_TNAME : LISTENER_TNAME);
  return pushname(L, ref->s, 0);
}

/* so.peername(conn): the remote host, port. */
static int so_peername(lua_State *L) {
  return pushname(L, lh_checkconn(L, 1), 1);
}

/* }====================================================== */


static const luaL_Reg sock_funcs[] = {
  {"close", so_close},
  {"settimeout", lh_sock_settimeout},
  {"sockname", so_sockname},
  {"peername", so_peername},
  {NULL, NULL}
};

static const char *const conn_methods[] = {
  "read", "readable", "write", "shutdown", "close", "settimeout", "sockname",
  "peername", NULL
};

static const char *const listener_methods[] = {
  "accept", "close", "settimeout", "sockname", NULL
};

/*
** Creates a metatable whose __index holds the named functions of the
** module table at index `mod`.
*/
static void newclass(lua_State *L, int mod, const char *tname,
                     const char *const methods[]) {
  int i;
  luaL_newmetatable(L, tname);  /* also sets __name, for error messages */
  lua_createtable(L, 0, 8);
  for (i = 0; methods[i] != NULL; i++) {
    lua_getfield(L, mod, methods[i]);
    lua_setfield(L, -2, methods[i]);
  }
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, sock_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, sock_gc);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, sock_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
}

/*
** Adds the socket functions to the module table on top of L. Call it after
** the stream and listener functions are in, for the method tables.
*/
void lh_sock_open(lua_State *L) {
  int mod = lua_gettop(L);
  luaL_setfuncs(L, sock_funcs, 0);
  newclass(L, mod, CONN_TNAME, conn_methods);
  newclass(L, mod, LISTENER_TNAME, listener_methods);
}
