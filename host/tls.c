/*
** tls.c: the so.tls module, TLS over conns with OpenSSL.
**
** OpenSSL never touches the socket. Each TLS conn's SSL object reads and
** writes through a BIO of ours: it reads the bytes the libuv read callback
** has just received (and what it left over), and its writes append to a
** buffer that goes to the socket with one libuv write after each SSL
** call. So the socket is read only while a task waits in so.read (or in
** the handshake), exactly as for a plain conn, and nothing blocks.
**
** A TLS conn is a conn whose handle's data points at its lh_tls: so.read,
** so.write and so.shutdown go through the layer functions below, and
** everything else (close, timeouts, addresses) is the plain conn's.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "luahost.h"

/*
** Decrypted bytes, before they become the string so.read returns: one
** buffer for every conn, as the read buffer is.
*/
static char plainbuf[256 * 1024];

/* The plaintext a write gathers from small pieces into one record. */
#define RECORD (16 * 1024)


/* {======================================================
** The BIO between SSL and the socket
** ======================================================= */

enum { TLS_HANDSHAKE, TLS_OPEN, TLS_CLOSED, TLS_FAILED };

typedef struct lh_tls {
  const lh_layer *layer;  /* first: what lh_layerof finds */
  SSL *ssl;
  lh_sockref *ref;        /* the conn being wrapped, during the handshake */
  const char *in;         /* bytes the socket gave that SSL has not read */
  size_t inlen;
  char *carry;            /* bytes an earlier read left over (malloc'd) */
  size_t carrylen, carrypos;
  char *out;              /* records SSL wrote, not yet sent (malloc'd) */
  size_t outlen, outcap;
  char *msg;              /* why it failed, "ETLS: ..." (malloc'd) */
  unsigned state : 2;     /* TLS_* */
  unsigned eof : 1;       /* the socket's EOF has been read */
  unsigned shut : 1;      /* close_notify sent */
  unsigned reneg : 1;     /* the peer began a renegotiation */
  unsigned nomem : 1;     /* a record could not be kept: no memory */
} lh_tls;

static BIO_METHOD *bio_method;

/* Room for n more bytes of records in tls->out: 0, or -1. */
static int reserve(lh_tls *tls, size_t n) {
  size_t cap = tls->outcap > 0 ? tls->outcap : 4096;
  char *p;
  if (tls->outlen + n <= tls->outcap)
    return 0;
  while (cap < tls->outlen + n)
    cap *= 2;
  p = realloc(tls->out, cap);
  if (p == NULL)
    return -1;
  tls->out = p;
  tls->outcap = cap;
  return 0;
}

static int bio_write(BIO *b, const char *data, size_t len, size_t *written) {
  lh_tls *tls = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  if (reserve(tls, len) != 0) {
    tls->nomem = 1;
    return 0;
  }
  memcpy(tls->out + tls->outlen, data, len);
  tls->outlen += len;
  *written = len;
  return 1;
}

/* What is left over first, then what the socket just gave. */
static int bio_read(BIO *b, char *buf, size_t len, size_t *readbytes) {
  lh_tls *tls = BIO_get_data(b);
  size_t n;
  BIO_clear_retry_flags(b);
  *readbytes = 0;
  if (tls->carry != NULL) {
    n = tls->carrylen - tls->carrypos;
    if (n > len)
      n = len;
    memcpy(buf, tls->carry + tls->carrypos, n);
    tls->carrypos += n;
    if (tls->carrypos == tls->carrylen) {
      free(tls->carry);
      tls->carry = NULL;
      tls->carrylen = tls->carrypos = 0;
    }
  } else if (tls->inlen > 0) {
    n = tls->inlen < len ? tls->inlen : len;
    memcpy(buf, tls->in, n);
    tls->in += n;
    tls->inlen -= n;
  } else {
    if (!tls->eof)
      BIO_set_retry_read(b);  /* SSL_ERROR_WANT_READ */
    return 0;  /* at EOF: SSL then sees BIO_eof */
  }
  *readbytes = n;
  return 1;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
  lh_tls *tls = BIO_get_data(b);
  (void)num;
  (void)ptr;
  switch (cmd) {
    case BIO_CTRL_FLUSH:  /* the records go out after each SSL call */
      return 1;
    case BIO_CTRL_EOF:
      return tls->eof && tls->carry == NULL && tls->inlen == 0;
    default:
      return 0;
  }
}

static int bio_create(BIO *b) {
  BIO_set_init(b, 1);
  return 1;
}

/*
** Keeps what SSL did not read of the socket's bytes (they live in the
** shared read buffer) for the next read: 0, or -1 without memory.
*/
static int keep_rest(lh_tls *tls) {
  size_t have = tls->carrylen - tls->carrypos;
  char *p;
  if (tls->inlen == 0)
    return 0;
  p = malloc(have + tls->inlen);
  if (p == NULL)
    return -1;
  if (have > 0)
    memcpy(p, tls->carry + tls->carrypos, have);
  memcpy(p + have, tls->in, tls->inlen);
  free(tls->carry);
  tls->carry = p;
  tls->carrylen = have + tls->inlen;
  tls->carrypos = 0;
  tls->in = NULL;
  tls->inlen = 0;
  return 0;
}

/* Hands the records SSL wrote to the socket: 0, or a libuv error. */
static int flush(lh_tls *tls, lh_sock *s) {
  char *buf = tls->out;
  size_t len = tls->outlen;
  if (len == 0)
    return 0;
  tls->out = NULL;
  tls->outlen = tls->outcap = 0;
  return lh_stream_send(s, buf, len);
}

/* }====================================================== */


/* {======================================================
** Driving SSL
** ======================================================= */

/*
** The conn fails for good: its reads and writes return nil, msg, "ETLS"
** from now on. why: the cause, or NULL for OpenSSL's (with the
** certificate check's verdict when that was it).
*/
static void fail(lh_tls *tls, const char *why) {
  char buf[256];
  unsigned long e = ERR_peek_error();
  long vr = SSL_get_verify_result(tls->ssl);
  if (why == NULL)
    why = tls->nomem ? "out of memory" : lh_tls_reason();
  if (why == NULL)
    why = "connection failed";
  if (e != 0 && ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED &&
      vr != X509_V_OK)
    snprintf(buf, sizeof buf, "ETLS: %s (%s)", why,
             X509_verify_cert_error_string(vr));
  else
    snprintf(buf, sizeof buf, "ETLS: %s", why);
  ERR_clear_error();
  free(tls->msg);
  tls->msg = strdup(buf);  /* NULL: push_failure says less */
  tls->state = TLS_FAILED;
}

static int push_failure(lua_State *L, lh_tls *tls) {
  lua_pushnil(L);
  if (tls->msg != NULL)
    lua_pushstring(L, tls->msg);
  else
    lua_pushliteral(L, "ETLS: connection failed");
  lua_pushliteral(L, "ETLS");
  return 3;
}

/* Renegotiation is refused, as nginx refuses it (TLS 1.3 has none). */
static void on_info(const SSL *ssl, int where, int ret) {
  lh_tls *tls = SSL_get_app_data(ssl);
  (void)ret;
  if ((where & SSL_CB_HANDSHAKE_START) && tls->state != TLS_HANDSHAKE &&
      SSL_version(ssl) < TLS1_3_VERSION)
    tls->reneg = 1;
}

/* A renegotiation began: nothing of it goes out, and the conn fails. */
static void check_reneg(lh_tls *tls) {
  if (!tls->reneg)
    return;
  tls->outlen = 0;
  if (tls->state != TLS_FAILED) {
    ERR_clear_error();
    fail(tls, "renegotiation refused");
  }
}

/* One step of the handshake with what the BIO holds: the new state. */
static int handshake(lh_tls *tls, lh_sock *s) {
  int rc;
  ERR_clear_error();
  rc = SSL_do_handshake(tls->ssl);
  if (rc == 1)
    tls->state = TLS_OPEN;
  else if (SSL_get_error(tls->ssl, rc) != SSL_ERROR_WANT_READ ||
           tls->nomem)
    fail(tls, NULL);
  flush(tls, s);  /* the next flight, or the alert that says why */
  return tls->state;
}

/*
** Decrypts what the BIO holds into plainbuf: the bytes; 0 when there is
** none, and then the state says whether SSL wants more (TLS_OPEN), the
** peer closed (TLS_CLOSED) or the conn failed.
*/
static size_t decrypt(lh_tls *tls, lh_sock *s) {
  size_t n = 0, got;
  while (n < sizeof plainbuf) {
    ERR_clear_error();
    if (SSL_read_ex(tls->ssl, plainbuf + n, sizeof plainbuf - n, &got)) {
      n += got;
      continue;
    }
    switch (SSL_get_error(tls->ssl, 0)) {
      case SSL_ERROR_WANT_READ:
        if (tls->nomem)
          fail(tls, NULL);
        break;
      case SSL_ERROR_ZERO_RETURN:
        tls->state = TLS_CLOSED;  /* close_notify */
        break;
      default:
        fail(tls, NULL);
    }
    break;
  }
  check_reneg(tls);
  if (n == 0 && tls->state == TLS_OPEN && tls->eof)
    fail(tls, "unexpected eof while reading");
  flush(tls, s);  /* what reading wrote: a key update, an alert */
  return n;
}

/* }====================================================== */


/* {======================================================
** TLS conns: handshake, read, write, shutdown, close
** ======================================================= */

static int push_plain(lua_State *L) {
  size_t *n = lua_touserdata(L, 1);
  lua_pushlstring(L, plainbuf, *n);
  return 1;
}

static int push_failure_p(lua_State *L) {
  return push_failure(L, lua_touserdata(L, 1));
}

/*
** Resumes t with what f(ud) pushes, made under protection (lh_resume's
** way of allocating in a callback). 0, or -2 when t was cancelled
** meanwhile (and must not be touched).
*/
static int resume_with(lh_task *t, lua_CFunction f, void *ud) {
  int n = lh_pushprotected(t, f, ud);
  if (n >= 0)
    lh_resume(t, n);
  else if (n == -1)
    lh_resume_err(t, UV_ENOMEM);
  return n == -2 ? -2 : 0;
}

/* The handshake failed: the task gets why, and the conn closes. */
static void handshake_failed(lh_tls *tls, lh_task *t, int err) {
  lh_sockref *ref = tls->ref;
  int n = err < 0 ? 0 : lh_pushprotected(t, push_failure_p, tls);
  if (n == -2)
    return;  /* cancelled meanwhile: the cancel closed the conn */
  lh_sock_closeref(ref);  /* frees tls */
  if (err < 0 || n == -1)
    lh_resume_err(t, err < 0 ? err : UV_ENOMEM);
  else
    lh_resume(t, n);
}

static void handshake_read(lh_sock *s, lh_tls *tls, lh_task *t) {
  int state = handshake(tls, s);
  if (state == TLS_HANDSHAKE)
    return;  /* SSL wants more: keep reading */
  s->w.reader = NULL;
  lh_stream_stop(s);
  if (state != TLS_OPEN || keep_rest(tls) != 0) {
    if (state == TLS_OPEN)
      fail(tls, "out of memory");
    handshake_failed(tls, t, 0);
    return;
  }
  lh_resume(t, 0);  /* the conn is made on the task's side: wrap_done */
}

static void data_read(lh_sock *s, lh_tls *tls, lh_task *t) {
  size_t n = decrypt(tls, s);
  if (keep_rest(tls) != 0) {
    fail(tls, "out of memory");
    n = 0;
  }
  if (n == 0 && tls->state == TLS_OPEN)
    return;  /* nothing yet: keep reading */
  s->w.reader = NULL;
  if (n > 0) {
    if (resume_with(t, push_plain, &n) != 0)
      return;
  } else if (tls->state == TLS_CLOSED) {
    lua_pushliteral(t->co, "");  /* interned: allocates nothing */
    lh_resume(t, 1);
  } else if (resume_with(t, push_failure_p, tls) != 0)
    return;
  if (s->w.reader == NULL && !uv_is_closing(&s->handle))
    lh_stream_stop(s);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  lh_sock *s = lh_sockof(stream);
  lh_tls *tls = s->handle.data;
  lh_task *t = s->w.reader;
  if (nread == 0)
    return;
  if (t == NULL || tls == NULL || lh_H.L == NULL) {  /* cannot happen */
    lh_stream_stop(s);
    return;
  }
  if (nread > 0) {
    lh_H.bytes_in += (uint64_t)nread;
    tls->in = buf->base;
    tls->inlen = (size_t)nread;
  } else if (nread == UV_EOF) {
    s->flags |= LH_SOCK_EOF;
    tls->eof = 1;
  } else {  /* a socket error: the task gets it as from a plain conn */
    s->err = (int)nread;
    s->w.reader = NULL;
    if (tls->state == TLS_HANDSHAKE)
      handshake_failed(tls, t, s->err);
    else {
      lh_stream_stop(s);
      lh_resume_err(t, s->err);
    }
    return;
  }
  if (tls->state == TLS_HANDSHAKE)
    handshake_read(s, tls, t);
  else
    data_read(s, tls, t);
}

static int tls_read(lua_State *L, lh_sock *s, lh_task *t) {
  lh_tls *tls = s->handle.data;
  size_t n;
  if (tls->state == TLS_HANDSHAKE)
    return luaL_error(L, "conn is in a TLS handshake");
  if (tls->state == TLS_OPEN && s->err == 0) {
    n = decrypt(tls, s);  /* what came with the last read */
    if (n > 0) {
      lua_pushlstring(L, plainbuf, n);
      return 1;
    }
  }
  if (tls->state == TLS_FAILED)
    return push_failure(L, tls);
  if (s->err != 0)
    return lh_pusherror(L, s->err);
  if (tls->state == TLS_CLOSED) {
    lua_pushliteral(L, "");
    return 1;
  }
  return lh_stream_wait_read(L, s, t, on_read);
}

/* Encrypts p[0..len) into tls->out: 1, or 0 when the conn failed. */
static int encrypt(lh_tls *tls, const char *p, size_t len) {
  size_t written;
  ERR_clear_error();
  if (len == 0 || SSL_write_ex(tls->ssl, p, len, &written))
    return 1;
  fail(tls, NULL);
  return 0;
}

/*
** so.write: the data is encrypted at once (small pieces gathered into
** full records), and the records go out as a plain conn's bytes do.
*/
static int tls_write(lua_State *L, lh_sock *s, lh_task *t, int data,
                     size_t total) {
  lh_tls *tls = s->handle.data;
  size_t len, used = 0;
  const char *p;
  int ok = 1;
  if (tls->state == TLS_HANDSHAKE)
    return luaL_error(L, "conn is in a TLS handshake");
  if (tls->state == TLS_FAILED)
    return push_failure(L, tls);
  if (tls->shut || s->err != 0)
    return lh_pusherror(L, s->err != 0 ? s->err : UV_EPIPE);
  if (total == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (reserve(tls, total + (total / RECORD + 2) * 64) != 0)
    return luaL_error(L, "not enough memory");
  if (lua_type(L, data) == LUA_TSTRING) {
    p = lua_tolstring(L, data, &len);
    ok = encrypt(tls, p, len);
  } else {
    lua_Integer i, n = (lua_Integer)lua_rawlen(L, data);
    for (i = 1; i <= n && ok; i++) {
      lua_rawgeti(L, data, i);
      p = lua_tolstring(L, -1, &len);
      lua_pop(L, 1);  /* the table keeps it */
      if (len >= RECORD || used + len > sizeof plainbuf) {
        ok = encrypt(tls, plainbuf, used);  /* in order */
        used = 0;
      }
      if (len >= RECORD)
        ok = ok && encrypt(tls, p, len);
      else {
        memcpy(plainbuf + used, p, len);
        used += len;
      }
    }
    ok = ok && encrypt(tls, plainbuf, used);
  }
  if (!ok) {
    tls->outlen = 0;
    return push_failure(L, tls);
  }
  p = tls->out;
  len = tls->outlen;
  tls->out = NULL;
  tls->outlen = tls->outcap = 0;
  return lh_stream_write_owned(L, s, t, (char *)p, len);
}

/* so.shutdown: close_notify, before the plain conn's FIN. */
static int tls_shutdown(lh_sock *s) {
  lh_tls *tls = s->handle.data;
  if (tls->state == TLS_HANDSHAKE)
    return UV_EBUSY;
  if (tls->state == TLS_FAILED || tls->shut)
    return 0;
  tls->shut = 1;
  ERR_clear_error();
  SSL_shutdown(tls->ssl);
  ERR_clear_error();
  return flush(tls, s);
}

/*
** The conn closes: a close_notify if it can go at once (as nginx sends
** one when it closes), then the memory.
*/
static void tls_close(lh_sock *s) {
  lh_tls *tls = s->handle.data;
  if ((tls->state == TLS_OPEN || tls->state == TLS_CLOSED) && !tls->shut &&
      s->err == 0 && !uv_is_closing(&s->handle))
    tls_shutdown(s);
  SSL_free(tls->ssl);
  free(tls->carry);
  free(tls->out);
  free(tls->msg);
  free(tls);
}

/* so.readable: decrypted bytes, or records left over, are waiting. */
static int tls_buffered(lh_sock *s) {
  lh_tls *tls = s->handle.data;
  return tls->state != TLS_OPEN || tls->carry != NULL ||
         SSL_pending(tls->ssl) > 0;
}

static const lh_layer tls_layer = {tls_read, tls_write, tls_shutdown,
                                   tls_buffered, tls_close};

/* }====================================================== */


/* {======================================================
** tls.wrap, tls.connect, tls.info
** ======================================================= */

/*
** The handshake's end on the task's side: the conn itself is now the TLS
** conn (as OpenResty's sslhandshake and cqueues' starttls upgrade theirs),
** so a <close> on it, or any other reference, holds the TLS conn; or the
** failure is returned.
*/
static int wrap_done(lua_State *L, int base) {
  lh_sockref *ref = lua_touserdata(L, 1);
  if (lua_gettop(L) - base == 3)
    return 3;  /* nil, msg, "ETLS": the conn is closed */
  if (ref->s == NULL)  /* closed while this task was queued */
    return lh_pusherror(L, UV_ECANCELED);
  ((lh_tls *)ref->s->handle.data)->ref = NULL;
  lua_settop(L, 1);
  return 1;
}

/* A timeout, so.deadline or so.cancel: the half-made TLS conn closes. */
static void cancel_handshake(lh_task *t) {
  lh_sock *s = t->wait.on;
  lh_tls *tls = s->handle.data;
  s->w.reader = NULL;
  lh_stream_stop(s);
  lh_sock_closeref(tls->ref);
}

static void describe_handshake(lh_task *t, char *buf, size_t size) {
  lh_sock_addr(t->wait.on, 1, buf, size);
}

static const lh_waitkind handshake_kind = {"handshake", cancel_handshake,
                                           wrap_done, LH_WAIT_NET,
                                           describe_handshake};

static int is_ipaddr(const char *name) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, name, buf) == 1 ||
         inet_pton(AF_INET6, name, buf) == 1;
}

/*
** The client's checks of the server's name: SNI for a name, and the
** certificate must name it (an IP address: name that address).
*/
static int set_servername(SSL *ssl, const char *name) {
  if (is_ipaddr(name))
    return X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name) == 1;
  return SSL_set_tlsext_host_name(ssl, name) == 1 &&
         SSL_set1_host(ssl, name) == 1;
}

/*
** tls.wrap(conn, ctx [, servername]): the handshake over conn (waits);
** then conn, a TLS conn from now on, or nil, msg, name with conn closed.
*/
static int tls_wrap(lua_State *L) {
  lh_sockref *ref = lh_checkobj(L, 1, LH_TAG_CONN, "conn");
  lh_sock *s = lh_checkconn(L, 1);
  int server;
  SSL_CTX *ctx = lh_tls_checkctx(L, 2, &server);
  const char *name = luaL_optstring(L, 3, NULL);
  lh_task *t;
  lh_tls *tls;
  BIO *bio;
  int err;
  luaL_argcheck(L, s->handle.data == NULL, 1, "already a TLS conn");
  if (s->w.reader != NULL)
    return luaL_error(L, "conn is already being read by another task");
  t = lh_checktask_caller(L, "wrap");
  lua_settop(L, 3);
  tls = calloc(1, sizeof *tls);
  if (tls == NULL)
    return luaL_error(L, "not enough memory");
  tls->layer = &tls_layer;
  tls->ref = ref;
  tls->ssl = SSL_new(ctx);
  bio = tls->ssl != NULL ? BIO_new(bio_method) : NULL;
  if (bio == NULL) {
    SSL_free(tls->ssl);
    free(tls);
    lh_sock_closeref(ref);
    return lh_tls_pusherror(L, "cannot start TLS");
  }
  BIO_set_data(bio, tls);
  SSL_set_bio(tls->ssl, bio, bio);
  SSL_set_app_data(tls->ssl, tls);
  SSL_set_info_callback(tls->ssl, on_info);
  s->handle.data = tls;  /* from here on, closing the conn frees tls */
  if (server)
    SSL_set_accept_state(tls->ssl);
  else {
    SSL_set_connect_state(tls->ssl);
    if (name != NULL && !set_servername(tls->ssl, name)) {
      lh_sock_closeref(ref);
      return lh_tls_pusherror(L, "bad server name");
    }
  }
  if (s->err != 0) {
    err = s->err;
    lh_sock_closeref(ref);
    return lh_pusherror(L, err);
  }
  tls->eof = (s->flags & LH_SOCK_EOF) != 0;
  if (handshake(tls, s) == TLS_FAILED) {  /* (a client's: its hello) */
    push_failure(L, tls);
    lh_sock_closeref(ref);
    return 3;
  }
  /* A plain read that just ended may have left the plain callback
     reading (STARTTLS): the handshake's bytes are TLS's. */
  lh_stream_stop(s);
  if ((err = lh_stream_start(s, on_read)) < 0) {
    lh_sock_closeref(ref);
    return lh_pusherror(L, err);
  }
  s->w.reader = t;
  return lh_wait(L, t, &handshake_kind, s, s->timeout);
}

#define DEFAULT_CLIENT "so.tls default client"

/* After so.connect: the handshake, within what is left of the timeout. */
static int connected(lua_State *L, int status, lua_KContext k);
static int wrapped(lua_State *L, int status, lua_KContext k);

/*
** tls.connect(host, port [, ctx [, timeout]]): so.connect, then tls.wrap
** with host as the server's name; the timeout bounds both together.
*/
static int tls_connect(lua_State *L) {
  int64_t timeout;
  luaL_checkstring(L, 1);
  luaL_checkinteger(L, 2);
  if (!lua_isnoneornil(L, 3))
    lh_tls_checkctx(L, 3, NULL);
  timeout = lh_checktimeout(L, 4);
  lua_settop(L, 4);
  if (lua_isnil(L, 3)) {  /* the default: the system's CAs */
    if (lua_getfield(L, LUA_REGISTRYINDEX, DEFAULT_CLIENT) == LUA_TNIL) {
      lua_pop(L, 1);
      lua_pushcfunction(L, lh_tls_client);
      lua_call(L, 0, 3);
      if (lua_isnil(L, -3))
        return 3;
      lua_pop(L, 2);
      lua_pushvalue(L, -1);
      lua_setfield(L, LUA_REGISTRYINDEX, DEFAULT_CLIENT);
    }
    lua_replace(L, 3);
  }
  lua_pushinteger(L, timeout >= 0 ? lh_now() + timeout : -1);  /* 5 */
  lua_pushvalue(L, lua_upvalueindex(1));  /* so.connect */
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 4);
  lua_callk(L, 3, 3, 0, connected);
  return connected(L, LUA_OK, 0);
}

static int connected(lua_State *L, int status, lua_KContext k) {
  int64_t deadline = (int64_t)lua_tointeger(L, 5);
  (void)status;
  (void)k;
  if (lua_isnil(L, 6))
    return 3;  /* nil, msg, name */
  if (deadline >= 0) {
    int64_t left = deadline - lh_now();
    lh_checkconn(L, 6)->timeout = left > 0 ? left : 0;
  }
  lua_pushcfunction(L, tls_wrap);
  lua_pushvalue(L, 6);
  lua_pushvalue(L, 3);
  if (lh_unixpath(lua_tostring(L, 1)) != NULL)
    lua_pushnil(L);  /* a path is no server name */
  else
    lua_pushvalue(L, 1);
  lua_callk(L, 3, 3, 0, wrapped);
  return wrapped(L, LUA_OK, 0);
}

static int wrapped(lua_State *L, int status, lua_KContext k) {
  (void)status;
  (void)k;
  if (lua_isnil(L, 9))
    return 3;
  lh_checkconn(L, 9)->timeout = -1;  /* as so.connect's conns have */
  lua_settop(L, 9);
  return 1;
}

static lh_tls *checktls(lua_State *L, int arg) {
  lh_sock *s = lh_checkconn(L, arg);
  lh_tls *tls = s->handle.data;
  if (tls == NULL || tls->state == TLS_HANDSHAKE)
    luaL_typeerror(L, arg, "TLS conn");
  return tls;
}

/* tls.info(conn): what the handshake agreed on. */
static int tls_info(lua_State *L) {
  lh_tls *tls = checktls(L, 1);
  SSL *ssl = tls->ssl;
  const unsigned char *alpn;
  unsigned alpnlen;
  const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, SSL_get_version(ssl));
  lua_setfield(L, -2, "version");
  lua_pushstring(L, SSL_get_cipher_name(ssl));
  lua_setfield(L, -2, "cipher");
  SSL_get0_alpn_selected(ssl, &alpn, &alpnlen);
  if (alpnlen > 0) {
    lua_pushlstring(L, (const char *)alpn, alpnlen);
    lua_setfield(L, -2, "alpn");
  }
  if (name != NULL) {
    lua_pushstring(L, name);
    lua_setfield(L, -2, "servername");
  }
  lua_pushboolean(L, SSL_get0_peer_certificate(ssl) != NULL &&
                     SSL_get_verify_result(ssl) == X509_V_OK);
  lua_setfield(L, -2, "peer_verified");
  return 1;
}

/* }====================================================== */


static const luaL_Reg tls_funcs[] = {
  {"server", lh_tls_server},
  {"client", lh_tls_client},
  {"wrap", tls_wrap},
  {"info", tls_info},
  {NULL, NULL}
};

int luaopen_so_tls(lua_State *L) {
  luaL_requiref(L, "so", luaopen_so, 0);  /* conns' metatable */
  if (bio_method == NULL) {
    bio_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK,
                              "luahost conn");
    if (bio_method == NULL ||
        !BIO_meth_set_write_ex(bio_method, bio_write) ||
        !BIO_meth_set_read_ex(bio_method, bio_read) ||
        !BIO_meth_set_ctrl(bio_method, bio_ctrl) ||
        !BIO_meth_set_create(bio_method, bio_create))
      return luaL_error(L, "cannot set up OpenSSL");
  }
  lh_tlsctx_open(L);
  luaL_newlib(L, tls_funcs);
  lua_getfield(L, -2, "connect");
  lua_pushcclosure(L, tls_connect, 1);
  lua_setfield(L, -2, "connect");
  return 1;
}
