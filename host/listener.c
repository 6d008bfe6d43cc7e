/*
** listener.c: so.listen and so.accept.
**
** A connection is taken from libuv (uv_accept) only for a task waiting in
** so.accept. While none waits, libuv holds one accepted descriptor and
** stops polling the listener, so the kernel's backlog is the accept
** loop's backpressure; and the listener is unref'd, so a script whose
** only pending thing is an unused listener still ends.
*/
#include <string.h>

#include "luahost.h"

/*
** Pushes a conn for the connection libuv holds, or nil, msg, name.
*/
static int accept_conn(lua_State *L, lh_sock *l) {
  lh_sock *c = lh_newsock(L, l->flags & LH_SOCK_UNIX);
  int err = uv_accept(&l->stream, &c->stream);
  l->flags &= ~LH_SOCK_PENDING;
  if (err < 0) {
    lh_sock_close(L, -1);
    lua_pop(L, 1);
    return lh_pusherror(L, err);
  }
  if (!(c->flags & LH_SOCK_UNIX))
    uv_tcp_nodelay(&c->tcp, 1);  /* request-response protocols want it */
  lh_H.accepts++;
  return 1;  /* the conn */
}

static int accept_protected(lua_State *L) {
  return accept_conn(L, lua_touserdata(L, 1));
}

static void on_connection(uv_stream_t *server, int status) {
  lh_sock *l = lh_sockof(server);
  lh_task *t;
  int n;
  /* An error (EMFILE, ENFILE, ENOBUFS) has no connection behind it: libuv
     has already drained the backlog with its spare descriptor, so there is
     nothing to retry here and nothing to busy-loop on. */
  if (status < 0 || lh_H.L == NULL)
    return;
  l->flags |= LH_SOCK_PENDING;
  t = l->w.acceptors.head;
  if (t == NULL)
    return;  /* libuv stops polling until a task accepts */
  l->w.acceptors.head = t->next;
  t->next = NULL;
  if (l->w.acceptors.head == NULL) {
    l->w.acceptors.tail = &l->w.acceptors.head;
    uv_unref(&l->handle);
  }
  /* Out of memory for the conn's userdata, the task gets ENOMEM and the
     connection stays with libuv for the next accept. */
  n = lh_pushprotected(t, accept_protected, l);
  if (n == -1)
    lh_resume_err(t, UV_ENOMEM);
  else if (n >= 0)
    lh_resume(t, n);  /* (-2: a finalizer cancelled t meanwhile) */
}

static void cancel_accept(lh_task *t) {
  lh_sock *l = t->wait.on;
  lh_task **p = &l->w.acceptors.head;
  while (*p != NULL && *p != t)
    p = &(*p)->next;
  if (*p == t) {
    *p = t->next;
    if (*p == NULL)
      l->w.acceptors.tail = p;
  }
  t->next = NULL;
  if (l->w.acceptors.head == NULL)
    uv_unref(&l->handle);
}

static void describe_accept(lh_task *t, char *buf, size_t size) {
  lh_sock_addr(t->wait.on, 0, buf, size);
}

static const lh_waitkind accept_kind = {"accept", cancel_accept, NULL,
                                        LH_WAIT_NET, describe_accept};

/* An accept on a listener the drain closed: ECANCELED, next turn. */
static int after_shut(lua_State *L, int base) {
  lua_settop(L, base);
  return lh_pusherror(L, UV_ECANCELED);
}

static const lh_waitkind shut_kind = {"accept", NULL, after_shut,
                                      LH_WAIT_ENDS, NULL};

/*
** so.accept(listener): the next connection, as a conn; waits for one.
*/
static int so_accept(lua_State *L) {
  lh_sock *l = lh_checklistener(L, 1);
  lh_task *t = lh_checktask_caller(L, "accept");
  if (l->flags & LH_SOCK_SHUT)  /* drained: a loop that ignores it yields */
    return lh_wait(L, t, &shut_kind, NULL, 0);
  if (l->flags & LH_SOCK_PENDING)
    return accept_conn(L, l);
  t->next = NULL;
  *l->w.acceptors.tail = t;
  l->w.acceptors.tail = &t->next;
  uv_ref(&l->handle);
  return lh_wait(L, t, &accept_kind, l, l->timeout);
}

/*
** Binds l (made by so_listen) to a Unix socket's path, or in a worker
** takes the supervisor's socket for it: 0, or an error.
*/
static int bind_unix(lh_sock *l, const char *host, int backlog) {
  int err, fd;
  if (lh_H.worker > 0) {
    fd = lh_worker_listen(host, 0, backlog);
    return fd < 0 ? fd : uv_pipe_open(&l->pipe, fd);
  }
  err = lh_unix_claim(lh_unixpath(host));
  return err < 0 ? err : uv_pipe_bind(&l->pipe, lh_unixpath(host));
}

/* The same for TCP, with ss the address to listen on. */
static int bind_tcp(lh_sock *l, struct sockaddr_storage *ss, int port,
                    int backlog) {
  char name[INET6_ADDRSTRLEN];
  int fd;
  if (lh_H.worker == 0)
    return uv_tcp_bind(&l->tcp, (struct sockaddr *)ss, 0);
  /* A worker's listener is the supervisor's socket for that address,
     shared by every worker (see supervisor.c). */
  if (ss->ss_family == AF_INET6)
    uv_ip6_name((struct sockaddr_in6 *)ss, name, sizeof name);
  else
    uv_ip4_name((struct sockaddr_in *)ss, name, sizeof name);
  fd = lh_worker_listen(name, port, backlog);
  return fd < 0 ? fd : uv_tcp_open(&l->tcp, fd);
}

/*
** so.listen(host, port [, backlog]): a listener bound to host:port, or
** nil, msg, name. host is numeric (IPv4 or IPv6) or "*"; another name is
** resolved before the listener exists (this blocks); "unix:PATH" is a Unix
** domain socket (port ignored).
*/
static int so_listen(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  int is_unix = lh_unixpath(host) != NULL;
  lua_Integer port = is_unix ? luaL_optinteger(L, 2, 0)
                             : luaL_checkinteger(L, 2);
  lua_Integer backlog = luaL_optinteger(L, 3, 511);
  struct sockaddr_storage ss;
  lh_sock *l;
  int err;
  luaL_argcheck(L, port >= 0 && port <= 65535, 2, "port out of range");
  luaL_argcheck(L, backlog > 0 && backlog <= 65535, 3, "backlog out of range");
  if (!is_unix && lh_parseaddr(host, (int)port, &ss) != 0) {
    uv_getaddrinfo_t req;
    err = lh_getaddrinfo(&req, NULL, host, (int)port, AI_PASSIVE);
    if (err < 0)
      return lh_pusherror(L, err);
    memcpy(&ss, req.addrinfo->ai_addr, req.addrinfo->ai_addrlen);
    uv_freeaddrinfo(req.addrinfo);
  }
  l = lh_newsock(L, LH_SOCK_LISTENER | (is_unix ? LH_SOCK_UNIX : 0));
  err = is_unix ? bind_unix(l, host, (int)backlog)
             : bind_tcp(l, &ss, (int)port, (int)backlog);
  if (err == 0)
    err = uv_listen(&l->stream, (int)backlog, on_connection);
  if (err < 0) {
    lh_sock_close(L, -1);
    return lh_pusherror(L, err);
  }
  uv_unref(&l->handle);  /* until a task waits in accept */
  return 1;  /* the listener */
}

static const luaL_Reg listener_funcs[] = {
  {"listen", so_listen},
  {"accept", so_accept},
  {NULL, NULL}
};

void lh_listener_open(lua_State *L) {
  luaL_setfuncs(L, listener_funcs, 0);
}
