/*
** tlsctx.c: TLS contexts, what tls.server and tls.client make: OpenSSL's
** SSL_CTX with certificates, CAs, ALPN, SNI and versions, shared by every
** conn wrapped with it.
*/
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "luahost.h"

#define CTX_TNAME "tls context"

typedef struct sni_entry {
  char *name;          /* "host.name" or "*.domain" */
  SSL_CTX *ctx;
} sni_entry;

typedef struct tls_ctx {
  uint64_t tag;        /* LH_TAG_TLSCTX */
  SSL_CTX *ctx;        /* NULL once collected */
  int server;
  int nsni;
  sni_entry *sni;      /* server: the certificates by name */
  unsigned char *alpn; /* the protocols, in ALPN's wire format */
  unsigned alpnlen;
} tls_ctx;

/*
** Why OpenSSL's last call failed: the first reason in its error queue
** (the cause; later ones say where it surfaced), a system error as
** strerror says it; NULL when the queue is empty.
*/
const char *lh_tls_reason(void) {
  unsigned long e = ERR_peek_error();
  if (e == 0)
    return NULL;
  if (ERR_SYSTEM_ERROR(e))
    return strerror(ERR_GET_REASON(e));
  return ERR_reason_error_string(e);
}

/*
** nil, "ETLS: what: reason", "ETLS"; clears OpenSSL's error queue.
*/
int lh_tls_pusherror(lua_State *L, const char *what) {
  const char *reason = lh_tls_reason();
  lua_pushnil(L);
  if (reason != NULL)
    lua_pushfstring(L, "ETLS: %s: %s", what, reason);
  else
    lua_pushfstring(L, "ETLS: %s", what);
  ERR_clear_error();
  lua_pushliteral(L, "ETLS");
  return 3;
}

/* The SSL_CTX of the context at arg; *server: whether a server's. */
SSL_CTX *lh_tls_checkctx(lua_State *L, int arg, int *server) {
  tls_ctx *c = lh_checkobj(L, arg, LH_TAG_TLSCTX, CTX_TNAME);
  if (c->ctx == NULL)
    luaL_argerror(L, arg, "context has been collected");
  if (server != NULL)
    *server = c->server;
  return c->ctx;
}

static int ctx_gc(lua_State *L) {
  tls_ctx *c = lh_checkobj(L, 1, LH_TAG_TLSCTX, CTX_TNAME);
  int i;
  for (i = 0; i < c->nsni; i++) {
    SSL_CTX_free(c->sni[i].ctx);
    free(c->sni[i].name);
  }
  free(c->sni);
  c->sni = NULL;
  c->nsni = 0;
  free(c->alpn);
  c->alpn = NULL;
  SSL_CTX_free(c->ctx);
  c->ctx = NULL;
  return 0;
}

static int ctx_tostring(lua_State *L) {
  tls_ctx *c = lh_checkobj(L, 1, LH_TAG_TLSCTX, CTX_TNAME);
  lua_pushfstring(L, "tls context (%s, %p)", c->server ? "server" : "client",
                  (void *)c);
  return 1;
}

/* The server's ALPN choice: its own first protocol the client offers. */
static int select_alpn(SSL *ssl, const unsigned char **out,
                       unsigned char *outlen, const unsigned char *in,
                       unsigned inlen, void *arg) {
  tls_ctx *c = arg;
  unsigned char *o;
  (void)ssl;
  if (SSL_select_next_proto(&o, outlen, c->alpn, c->alpnlen, in, inlen) !=
      OPENSSL_NPN_NEGOTIATED)
    return SSL_TLSEXT_ERR_NOACK;  /* no protocol in common: none */
  *out = o;
  return SSL_TLSEXT_ERR_OK;
}

static int name_matches(const char *pattern, const char *name) {
  if (pattern[0] == '*' && pattern[1] == '.') {  /* one label */
    const char *dot = strchr(name, '.');
    return dot != NULL && dot != name && strcasecmp(dot, pattern + 1) == 0;
  }
  return strcasecmp(pattern, name) == 0;
}

/* SNI: the certificate for the name asked for, else the default one. */
static int select_cert(SSL *ssl, int *alert, void *arg) {
  tls_ctx *c = arg;
  const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  int i;
  (void)alert;
  if (name == NULL)
    return SSL_TLSEXT_ERR_OK;
  for (i = 0; i < c->nsni; i++)  /* exact names first */
    if (strcasecmp(c->sni[i].name, name) == 0)
      break;
  if (i == c->nsni)
    for (i = 0; i < c->nsni; i++)
      if (name_matches(c->sni[i].name, name))
        break;
  if (i < c->nsni)
    SSL_set_SSL_CTX(ssl, c->sni[i].ctx);
  return SSL_TLSEXT_ERR_OK;
}

/* opts.field as a string, or NULL when absent. */
static const char *optstring(lua_State *L, int opts, const char *field) {
  const char *s = NULL;
  int type = lua_getfield(L, opts, field);
  if (type == LUA_TSTRING)
    s = lua_tostring(L, -1);
  else if (type != LUA_TNIL)
    luaL_error(L, "bad option '%s' (string expected, got %s)", field,
               luaL_typename(L, -1));
  lua_pop(L, 1);  /* the options table keeps the string */
  return s;
}

static int optboolean(lua_State *L, int opts, const char *field, int dflt) {
  int type = lua_getfield(L, opts, field), b = dflt;
  if (type != LUA_TNIL)
    b = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return b;
}

/* A certificate chain and its key into ctx: 0, or pushes the error. */
static int use_cert(lua_State *L, SSL_CTX *ctx, const char *cert,
                    const char *key) {
  if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
    return lh_tls_pusherror(L, lua_pushfstring(L, "cannot use certificate %s",
                                        cert));
  if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
    return lh_tls_pusherror(L, lua_pushfstring(L, "cannot use key %s", key));
  if (SSL_CTX_check_private_key(ctx) != 1)
    return lh_tls_pusherror(L, lua_pushfstring(L, "key %s does not match "
                                        "certificate %s", key, cert));
  return 0;
}

/*
** Cipher names for TLS 1.2 and below, and TLS 1.3's suites (their names
** start with "TLS_"), from one colon-separated list, as nginx takes them.
*/
static int set_ciphers(lua_State *L, SSL_CTX *ctx, const char *list) {
  size_t len = strlen(list) + 1;
  char *old = malloc(len), *v13 = malloc(len);
  const char *p = list;
  int ok;
  if (old == NULL || v13 == NULL) {
    free(old);
    free(v13);
    return luaL_error(L, "not enough memory");
  }
  old[0] = v13[0] = '\0';
  while (*p != '\0') {
    size_t n = strcspn(p, ":");
    char *to = strncmp(p, "TLS_", 4) == 0 ? v13 : old;
    if (n > 0) {
      if (to[0] != '\0')
        strcat(to, ":");
      strncat(to, p, n);
    }
    p += n + (p[n] == ':');
  }
  /* An empty list of either kind leaves that kind's defaults. */
  ok = (old[0] == '\0' || SSL_CTX_set_cipher_list(ctx, old) == 1) &&
       (v13[0] == '\0' || SSL_CTX_set_ciphersuites(ctx, v13) == 1);
  free(old);
  free(v13);
  if (!ok)
    return lh_tls_pusherror(L, lua_pushfstring(L, "no cipher usable in \"%s\"",
                                        list));
  return 0;
}

static const struct {
  const char *name;
  int version;
} versions[] = {
  {"1.0", TLS1_VERSION}, {"1.1", TLS1_1_VERSION}, {"1.2", TLS1_2_VERSION},
  {"1.3", TLS1_3_VERSION}, {NULL, 0}
};

/*
** A new SSL_CTX with opts (at index `opts`) and the given certificate;
** NULL with the error pushed (nil, msg, name).
*/
static SSL_CTX *newctx(lua_State *L, int opts, tls_ctx *c, const char *cert,
                       const char *key) {
  const char *ca = optstring(L, opts, "ca");
  const char *ciphers = optstring(L, opts, "ciphers");
  const char *minv = optstring(L, opts, "min_version");
  int verify = optboolean(L, opts, "verify", !c->server), i;
  SSL_CTX *ctx = SSL_CTX_new(c->server ? TLS_server_method()
                                       : TLS_client_method());
  if (ctx == NULL) {
    lh_tls_pusherror(L, "cannot create a context");
    return NULL;
  }
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION |
                      (c->server ? SSL_OP_CIPHER_SERVER_PREFERENCE : 0));
  /* An idle conn keeps no record buffers (nginx does the same). */
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  for (i = 0; versions[i].name != NULL; i++)
    if (minv != NULL && strcmp(minv, versions[i].name) == 0)
      break;
  if (minv != NULL && versions[i].name == NULL) {
    SSL_CTX_free(ctx);
    luaL_error(L, "bad option 'min_version' (\"1.0\" to \"1.3\" expected, "
               "got \"%s\")", minv);
  }
  SSL_CTX_set_min_proto_version(ctx, minv != NULL ? versions[i].version
                                                  : TLS1_2_VERSION);
  if (ciphers != NULL && set_ciphers(L, ctx, ciphers) != 0)
    goto fail;
  if ((cert != NULL || key != NULL) &&
      use_cert(L, ctx, cert != NULL ? cert : key,
               key != NULL ? key : cert) != 0)
    goto fail;
  if (verify) {
    struct stat st;
    int dir = ca != NULL && stat(ca, &st) == 0 && S_ISDIR(st.st_mode);
    if (ca == NULL ? SSL_CTX_set_default_verify_paths(ctx) != 1
                   : SSL_CTX_load_verify_locations(ctx, dir ? NULL : ca,
                                                   dir ? ca : NULL) != 1) {
      lh_tls_pusherror(L, ca != NULL ? lua_pushfstring(L, "cannot use CA %s", ca)
                              : "cannot use the system's CA store");
      goto fail;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (c->server ?
                       SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), NULL);
    if (c->server && ca != NULL && !dir) {
      STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(ca);
      if (names != NULL)
        SSL_CTX_set_client_CA_list(ctx, names);
    }
  }
  if (c->server) {
    /* Resumed sessions must come back to this context, and to the same
       client certificate checks. */
    static const unsigned char sid[] = "luahost";
    SSL_CTX_set_session_id_context(ctx, sid, sizeof sid - 1);
    if (c->alpn != NULL)
      SSL_CTX_set_alpn_select_cb(ctx, select_alpn, c);
  } else if (c->alpn != NULL &&
             SSL_CTX_set_alpn_protos(ctx, c->alpn, c->alpnlen) != 0) {
    lh_tls_pusherror(L, "cannot set ALPN");
    goto fail;
  }
  ERR_clear_error();
  return ctx;
fail:
  SSL_CTX_free(ctx);
  return NULL;
}

/* opts.alpn, a list of protocol names, into c in ALPN's wire format. */
static void set_alpn(lua_State *L, int opts, tls_ctx *c) {
  lua_Integer i, n;
  size_t total = 0, len;
  if (lua_getfield(L, opts, "alpn") == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  luaL_argcheck(L, lua_istable(L, -1), 1, "option 'alpn' must be a list");
  n = (lua_Integer)lua_rawlen(L, -1);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    if (!lua_isstring(L, -1) || (lua_tolstring(L, -1, &len), len == 0) ||
        len > 255)
      luaL_error(L, "bad option 'alpn' (protocol names of 1 to 255 bytes "
                 "expected at index %d)", (int)i);
    total += len + 1;
    lua_pop(L, 1);
  }
  if (total == 0) {
    lua_pop(L, 1);
    return;
  }
  c->alpn = malloc(total);
  if (c->alpn == NULL)
    luaL_error(L, "not enough memory");
  c->alpnlen = (unsigned)total;
  total = 0;
  for (i = 1; i <= n; i++) {
    const char *p;
    lua_rawgeti(L, -1, i);
    p = lua_tolstring(L, -1, &len);
    c->alpn[total++] = (unsigned char)len;
    memcpy(c->alpn + total, p, len);
    total += len;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* A new context userdata, empty, on the stack. */
static tls_ctx *pushctx(lua_State *L, int server) {
  tls_ctx *c = lua_newuserdatauv(L, sizeof *c, 0);
  memset(c, 0, sizeof *c);
  c->tag = LH_TAG_TLSCTX;
  c->server = server;
  luaL_setmetatable(L, CTX_TNAME);
  return c;
}

/* opts.sni: a context for each name, made as the default one is. */
static int set_sni(lua_State *L, int opts, tls_ctx *c) {
  int n = 0, i;
  if (lua_getfield(L, opts, "sni") == LUA_TNIL) {
    lua_pop(L, 1);
    return 0;
  }
  luaL_argcheck(L, lua_istable(L, -1), 1, "option 'sni' must be a table");
  lua_pushnil(L);
  while (lua_next(L, -2) != 0) {
    n++;
    lua_pop(L, 1);
  }
  c->sni = calloc(n > 0 ? n : 1, sizeof *c->sni);
  if (c->sni == NULL)
    luaL_error(L, "not enough memory");
  lua_pushnil(L);
  while (lua_next(L, -2) != 0) {
    const char *name, *cert, *key;
    int sub = lua_gettop(L);
    if (lua_type(L, -2) != LUA_TSTRING || !lua_istable(L, -1))
      return luaL_error(L, "bad option 'sni' (a table of name = {cert = "
                        "PATH, key = PATH} expected)");
    name = lua_tostring(L, -2);
    cert = optstring(L, sub, "cert");
    key = optstring(L, sub, "key");
    if (cert == NULL || key == NULL)
      return luaL_error(L, "bad option 'sni' (cert and key expected for "
                        "'%s')", name);
    i = c->nsni;
    c->sni[i].name = strdup(name);
    if (c->sni[i].name == NULL)
      return luaL_error(L, "not enough memory");
    c->nsni++;
    c->sni[i].ctx = newctx(L, opts, c, cert, key);
    if (c->sni[i].ctx == NULL)
      return -1;  /* the error is pushed */
    lua_settop(L, sub - 1);  /* the key, for lua_next */
  }
  lua_pop(L, 1);
  if (c->nsni > 0) {
    SSL_CTX_set_tlsext_servername_callback(c->ctx, select_cert);
    SSL_CTX_set_tlsext_servername_arg(c->ctx, c);
  }
  return 0;
}

/*
** tls.server{cert = PATH, key = PATH [, alpn = {...}] [, sni = {...}]
** [, ciphers = LIST] [, min_version = "1.2"] [, verify = true, ca = PATH]}
*/
int lh_tls_server(lua_State *L) {
  const char *cert, *key;
  tls_ctx *c;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  cert = optstring(L, 1, "cert");
  key = optstring(L, 1, "key");
  luaL_argcheck(L, cert != NULL && key != NULL, 1, "cert and key expected");
  c = pushctx(L, 1);
  set_alpn(L, 1, c);
  c->ctx = newctx(L, 1, c, cert, key);
  if (c->ctx == NULL || set_sni(L, 1, c) != 0)
    return 3;  /* nil, msg, "ETLS"; the collector frees what was made */
  lua_settop(L, 2);
  return 1;
}

/* tls.client{[ca = PATH] [, verify = true] [, alpn = {...}] [, cert, key]} */
int lh_tls_client(lua_State *L) {
  const char *cert, *key;
  tls_ctx *c;
  if (lua_isnoneornil(L, 1)) {
    lua_settop(L, 0);
    lua_newtable(L);
  }
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  cert = optstring(L, 1, "cert");
  key = optstring(L, 1, "key");
  luaL_argcheck(L, (cert == NULL) == (key == NULL), 1,
                "cert and key go together");
  c = pushctx(L, 0);
  set_alpn(L, 1, c);
  c->ctx = newctx(L, 1, c, cert, key);
  if (c->ctx == NULL)
    return 3;
  lua_settop(L, 2);
  return 1;
}

static const luaL_Reg ctx_meta[] = {
  {"__gc", ctx_gc},
  {"__tostring", ctx_tostring},
  {NULL, NULL}
};

/* The contexts' metatable. */
void lh_tlsctx_open(lua_State *L) {
  luaL_newmetatable(L, CTX_TNAME);
  luaL_setfuncs(L, ctx_meta, 0);
  lua_pop(L, 1);
}
