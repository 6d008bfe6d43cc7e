/*
** tlsgen: a TLS load generator for echo servers, the TLS sibling of
** loadgen.c.  One thread, non-blocking sockets, OpenSSL; built by bench/run
** with `cc -O2 tlsgen.c $(pkg-config --cflags --libs openssl)`.
**
**   handshakes  --conns N clients, each in a loop: connect, a full TLS 1.3
**               handshake (no session is ever offered for resumption),
**               close_notify, then wait for the server to close;
**               the figure is such connections per second.
**   bulk        one TLS connection (--conns N for more) streams --chunk-byte
**               writes and reads the echo back; every byte is verified
**               against the pattern, as in loadgen.  The figure is echoed
**               MB/s.
**
** The client offers TLS 1.3 only, one cipher suite (--cipher,
** TLS_AES_128_GCM_SHA256) and one key-exchange group (--groups, X25519), so
** every server negotiates the same thing; the negotiated values are printed
** and a handshake that resumed a session, or negotiated anything else, fails
** the run.  The certificate chain is not verified (--ca FILE verifies it):
** the server's CertificateVerify signature is checked either way, it is
** part of the TLS 1.3 handshake.
**
** Each figure is one human line and, with --kv, one "kv key=value ..." line
** for bench/run.  Exit status 0: the mode ran, every handshake completed,
** every echoed byte matched.
*/

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAT_LEN 65521 /* prime: never lines up with a record or a write */
#define MAX_CHUNK (1 << 20)
#define RBUF_SIZE (256 * 1024)
#define MAX_EVENTS 256

static struct {
  const char* mode;
  const char* host;
  int port;
  int pid;
  int conns;
  double seconds;
  double warmup;
  int chunk;
  const char* cipher;
  const char* groups;
  const char* ca;
  const char* preamble;
  double timeout;
  int kv;
} opt;

static unsigned char* pat;
static unsigned char rbuf[RBUF_SIZE];
static int epfd = -1;
static struct sockaddr_in server_addr;
static SSL_CTX* ctx;
static uint64_t tickets; /* NewSessionTicket messages seen (bulk) */

static uint32_t* samples; /* handshake latencies, ns */
static size_t nsamples, samples_cap;


static void fail(const char* fmt, ...) {
  va_list ap;
  unsigned long e;
  fprintf(stderr, "tlsgen %s: error: ", opt.mode ? opt.mode : "");
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    fprintf(stderr, "  openssl: %s\n", buf);
  }
  if (opt.kv)
    printf("kv mode=%s ok=0\n", opt.mode ? opt.mode : "?");
  fflush(stdout);
  exit(1);
}


static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}


static void pattern_init(void) {
  uint64_t x = 0x9e3779b97f4a7c15u;
  size_t i;
  pat = malloc(PAT_LEN + MAX_CHUNK);
  if (pat == NULL)
    fail("out of memory");
  for (i = 0; i < PAT_LEN; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    pat[i] = (unsigned char) (x >> 24);
  }
  for (i = PAT_LEN; i < PAT_LEN + MAX_CHUNK; i++)
    pat[i] = pat[i - PAT_LEN];
}


/* The server's user+system CPU seconds (all threads), -1 if unknown. */
static double proc_cpu_s(void) {
  char path[64], buf[1024];
  unsigned long ut, st;
  size_t n;
  char* p;
  FILE* f;
  if (opt.pid <= 0)
    return -1;
  snprintf(path, sizeof(path), "/proc/%d/stat", opt.pid);
  if ((f = fopen(path, "r")) == NULL)
    return -1;
  n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = '\0';
  if ((p = strrchr(buf, ')')) == NULL)
    return -1;
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
             &ut, &st) != 2)
    return -1;
  return (double) (ut + st) / (double) sysconf(_SC_CLK_TCK);
}


/* The server's CPU including its children: nginx's worker is a child of the
** master we were given.  Children are found through /proc/PID/task/PID/
** children (Linux >= 3.5); one level is enough here. */
static double server_cpu_s(void) {
  char path[96], buf[4096];
  double total = proc_cpu_s();
  int save = opt.pid;
  size_t n;
  char* p;
  FILE* f;
  if (total < 0)
    return -1;
  snprintf(path, sizeof(path), "/proc/%d/task/%d/children", save, save);
  if ((f = fopen(path, "r")) == NULL)
    return total;
  n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = '\0';
  for (p = strtok(buf, " \n"); p != NULL; p = strtok(NULL, " \n")) {
    double c;
    opt.pid = atoi(p);
    c = proc_cpu_s();
    if (c > 0)
      total += c;
  }
  opt.pid = save;
  return total;
}


static double self_cpu_s(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double) ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
         (double) ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}


typedef struct {
  uint64_t t0, count0;
  double srv0, self0;
} mark_t;

typedef struct {
  double seconds;
  uint64_t count;
  double srv_cpu, lg_cpu; /* percent of one core, -1 unknown */
} window_t;

static void mark_start(mark_t* m, uint64_t t, uint64_t count) {
  m->t0 = t;
  m->count0 = count;
  m->srv0 = server_cpu_s();
  m->self0 = self_cpu_s();
}

static window_t mark_end(const mark_t* m, uint64_t t, uint64_t count) {
  window_t w;
  double srv1 = server_cpu_s();
  w.seconds = (double) (t - m->t0) / 1e9;
  w.count = count - m->count0;
  w.srv_cpu =
      (srv1 >= 0 && m->srv0 >= 0) ? 100.0 * (srv1 - m->srv0) / w.seconds : -1;
  w.lg_cpu = 100.0 * (self_cpu_s() - m->self0) / w.seconds;
  return w;
}


static void sample_add(uint64_t ns) {
  if (nsamples == samples_cap) {
    samples_cap = samples_cap ? samples_cap * 2 : 1 << 14;
    samples = realloc(samples, samples_cap * sizeof(*samples));
    if (samples == NULL)
      fail("out of memory");
  }
  samples[nsamples++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t) ns;
}

static int cmp_u32(const void* a, const void* b) {
  uint32_t x = *(const uint32_t*) a, y = *(const uint32_t*) b;
  return (x > y) - (x < y);
}

static double percentile_ms(double p) {
  return samples[(size_t) ((double) (nsamples - 1) * p)] / 1e6;
}


static int new_session_cb(SSL* ssl, SSL_SESSION* sess) {
  (void) ssl;
  (void) sess;
  tickets++;
  return 0; /* not kept: nothing is ever resumed */
}


static void ctx_init(void) {
  ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == NULL)
    fail("SSL_CTX_new");
  if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) ||
      !SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION))
    fail("cannot pin TLS 1.3");
  if (!SSL_CTX_set_ciphersuites(ctx, opt.cipher))
    fail("bad --cipher: %s", opt.cipher);
  if (!SSL_CTX_set1_groups_list(ctx, opt.groups))
    fail("bad --groups: %s", opt.groups);
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
  /* The callback counts tickets; no session is stored, none offered. */
  SSL_CTX_set_session_cache_mode(
      ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(ctx, new_session_cb);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                            SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  /* Handshakes: a whole flight per read(), not a header then a body. */
  SSL_CTX_set_read_ahead(ctx, 1);
  if (opt.ca != NULL) {
    if (!SSL_CTX_load_verify_locations(ctx, opt.ca, NULL))
      fail("cannot load --ca %s", opt.ca);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
  } else {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  }
}


static int tcp_socket(void) {
  int one = 1;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    fail("socket: %s", strerror(errno));
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (connect(fd, (struct sockaddr*) &server_addr, sizeof(server_addr)) != 0 &&
      errno != EINPROGRESS)
    fail("connect: %s", strerror(errno));
  return fd;
}


/* Close with a reset: no TIME_WAIT, so a long run never runs out of ports. */
static void close_rst(int fd) {
  struct linger l = {1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close(fd);
}


/* What the first handshake negotiated, printed with the figure. */
static char neg_proto[32], neg_cipher[64], neg_group[32];

static void check_negotiated(SSL* ssl) {
  const char* g;
  int nid;
  if (SSL_session_reused(ssl))
    fail("a session was resumed: not a full handshake");
  if (SSL_version(ssl) != TLS1_3_VERSION)
    fail("negotiated %s, not TLS 1.3", SSL_get_version(ssl));
  if (strcmp(SSL_get_cipher_name(ssl), opt.cipher) != 0)
    fail("negotiated cipher %s, not %s", SSL_get_cipher_name(ssl), opt.cipher);
  if (neg_proto[0] != '\0')
    return;
  snprintf(neg_proto, sizeof(neg_proto), "%s", SSL_get_version(ssl));
  snprintf(neg_cipher, sizeof(neg_cipher), "%s", SSL_get_cipher_name(ssl));
  nid = SSL_get_negotiated_group(ssl);
  g = SSL_group_to_name(ssl, nid);
  snprintf(neg_group, sizeof(neg_group), "%s", g ? g : "?");
}


/* ------------------------------------------------------------ handshakes */

enum { HS_TLS, HS_CLOSING };

typedef struct {
  int fd;
  SSL* ssl;
  int state;
  unsigned events;
  uint64_t t_start; /* connect() */
} slot_t;

static void slot_watch(slot_t* s, uint32_t idx, unsigned events) {
  struct epoll_event ev;
  if (events == s->events)
    return;
  memset(&ev, 0, sizeof(ev));
  ev.events = events;
  ev.data.u32 = idx;
  if (epoll_ctl(epfd, s->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, s->fd,
                &ev) != 0)
    fail("epoll_ctl: %s", strerror(errno));
  s->events = events;
}

static void slot_open(slot_t* s, uint32_t idx) {
  s->fd = tcp_socket();
  /* One SSL object per client, cleared between connections: SSL_new is
   * costly in OpenSSL 3.  No session is kept, so none can be offered. */
  if (s->ssl == NULL)
    s->ssl = SSL_new(ctx);
  else if (!SSL_clear(s->ssl) || !SSL_set_session(s->ssl, NULL))
    fail("SSL_clear");
  if (s->ssl == NULL || !SSL_set_fd(s->ssl, s->fd))
    fail("SSL_new");
  SSL_set_connect_state(s->ssl);
  s->state = HS_TLS;
  s->events = 0;
  s->t_start = now_ns();
  /* The ClientHello goes out once the TCP handshake is done. */
  slot_watch(s, idx, EPOLLOUT);
}

static void slot_close(slot_t* s, int last) {
  /* Deleting from epoll is implied by close(). */
  if (last) {
    SSL_free(s->ssl);
    s->ssl = NULL;
  }
  close_rst(s->fd);
  s->fd = -1;
}

/* Advance one client; returns 1 when its connection is finished. */
static int slot_step(slot_t* s, uint32_t idx, int* hs_done) {
  if (s->state == HS_TLS) {
    int r = SSL_do_handshake(s->ssl);
    if (r != 1) {
      int e = SSL_get_error(s->ssl, r);
      if (e == SSL_ERROR_WANT_READ) {
        slot_watch(s, idx, EPOLLIN);
        return 0;
      }
      if (e == SSL_ERROR_WANT_WRITE) {
        slot_watch(s, idx, EPOLLOUT);
        return 0;
      }
      fail("handshake failed (SSL error %d, errno %s)", e,
           errno ? strerror(errno) : "0");
    }
    check_negotiated(s->ssl);
    *hs_done = 1;
    /* close_notify, then wait for the server to close.  No FIN from us:
     * the server closes first, our close then resets, and neither side
     * keeps a TIME_WAIT (thousands of them slow every connect() down). */
    ERR_clear_error();
    SSL_shutdown(s->ssl);
    s->state = HS_CLOSING;
    slot_watch(s, idx, EPOLLIN);
  }
  for (;;) {
    /* The server's tickets and close_notify are read raw and dropped:
     * decrypting them would only spend the load generator's CPU. */
    ssize_t n = read(s->fd, rbuf, sizeof(rbuf));
    if (n > 0)
      continue;
    if (n == 0 || errno == ECONNRESET)
      return 1;
    if (errno == EAGAIN)
      return 0;
    if (errno != EINTR)
      fail("read after the handshake: %s", strerror(errno));
  }
}

static void run_handshakes(void) {
  struct epoll_event evs[MAX_EVENTS];
  int n = opt.conns > 0 ? opt.conns : 16;
  uint64_t t, t_measure, t_end, done = 0, hs = 0;
  uint64_t stuck_ns = (uint64_t) (opt.timeout * 1e9);
  uint64_t last_check;
  int measuring = 0;
  slot_t* slots;
  mark_t mark;
  window_t w;
  int i;

  slots = calloc((size_t) n, sizeof(*slots));
  if (slots == NULL)
    fail("out of memory");
  for (i = 0; i < n; i++)
    slot_open(&slots[i], (uint32_t) i);
  t = now_ns();
  last_check = t;
  t_measure = t + (uint64_t) (opt.warmup * 1e9);
  t_end = t_measure + (uint64_t) (opt.seconds * 1e9);

  for (;;) {
    int nev;
    t = now_ns();
    if (!measuring && t >= t_measure) {
      measuring = 1;
      mark_start(&mark, t, done);
      nsamples = 0;
    }
    if (t >= t_end)
      break;
    if (t - last_check > 1000000000u) {
      last_check = t;
      for (i = 0; i < n; i++)
        if (t - slots[i].t_start > stuck_ns)
          fail("client %d: no handshake and close within %.0f s (state %s)",
               i, opt.timeout,
               slots[i].state == HS_TLS ? "handshaking" :
                                          "waiting for the server to close");
    }
    nev = epoll_wait(epfd, evs, MAX_EVENTS, (int) ((t_end - t) / 1000000u) + 1);
    if (nev < 0 && errno != EINTR)
      fail("epoll_wait: %s", strerror(errno));
    for (i = 0; i < nev; i++) {
      uint32_t idx = evs[i].data.u32;
      slot_t* s = &slots[idx];
      int hs_done = 0;
      if (slot_step(s, idx, &hs_done)) {
        uint64_t t1 = now_ns();
        done++;
        if (measuring && s->t_start >= mark.t0)
          sample_add(t1 - s->t_start);
        slot_close(s, 0);
        slot_open(s, idx);
      }
      hs += (uint64_t) hs_done;
    }
  }
  w = mark_end(&mark, t, done);
  for (i = 0; i < n; i++)
    slot_close(&slots[i], 1);
  free(slots);

  if (w.count == 0 || nsamples == 0)
    fail("no connection completed in %.1f s (%" PRIu64 " handshakes)",
         w.seconds, hs);
  qsort(samples, nsamples, sizeof(*samples), cmp_u32);
  {
    double rate = (double) w.count / w.seconds;
    double per_core = w.srv_cpu > 0 ? rate / (w.srv_cpu / 100.0) : -1;
    printf("handshakes %d clients: %.0f handshakes/s (%s %s %s) p50 %.2f ms "
           "p99 %.2f ms; server CPU %.0f%% (%.0f per core-second), tlsgen "
           "CPU %.0f%%\n",
           n, rate, neg_proto, neg_cipher, neg_group, percentile_ms(0.5),
           percentile_ms(0.99), w.srv_cpu, per_core, w.lg_cpu);
    if (opt.kv)
      printf("kv mode=handshakes conns=%d seconds=%.3f handshakes=%" PRIu64
             " hps=%.1f p50_ms=%.4f p99_ms=%.4f srv_cpu=%.1f lg_cpu=%.1f "
             "hps_per_core=%.1f proto=%s cipher=%s group=%s ok=1\n",
             n, w.seconds, w.count, rate, percentile_ms(0.5),
             percentile_ms(0.99), w.srv_cpu, w.lg_cpu, per_core, neg_proto,
             neg_cipher, neg_group);
  }
  fflush(stdout);
}


/* ------------------------------------------------------------------ bulk */

/*
** The bulk client keeps its own cost low so the server is what is measured:
** OpenSSL works on a BIO pair in memory, and the socket is read and written
** in large pieces straight from and into the pair's ring buffers (one
** syscall for many records, no copy), instead of one or two syscalls per
** 16 KiB record through a socket BIO.
*/
#define PAIR_BUF (256 * 1024)

typedef struct {
  int fd;
  SSL* ssl;
  BIO* net;         /* our end of the pair: ciphertext to and from the socket */
  uint32_t base;    /* where this connection's stream starts in the pattern */
  uint64_t sent;    /* plaintext bytes SSL_write took */
  uint64_t recvd;   /* plaintext bytes read back, all verified */
  int rd_blocked;   /* the last read() said EAGAIN */
  int wr_blocked;   /* the last write() said EAGAIN */
} bconn_t;

/* Ciphertext from the pair to the socket, until one of them is empty. */
static int flush_out(bconn_t* c) {
  int moved = 0;
  c->wr_blocked = 0;
  for (;;) {
    char* p;
    int n = BIO_nread0(c->net, &p);
    ssize_t w;
    if (n <= 0)
      return moved;
    w = write(c->fd, p, (size_t) n);
    if (w > 0) {
      BIO_nread(c->net, &p, (int) w);
      moved = 1;
      continue;
    }
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0 && errno == EAGAIN) {
      c->wr_blocked = 1;
      return moved;
    }
    fail("write: %s", strerror(errno));
  }
}

/* Ciphertext from the socket into the pair, until the socket is empty or the
 * pair full. */
static int fill_in(bconn_t* c) {
  int moved = 0;
  c->rd_blocked = 0;
  for (;;) {
    char* p;
    int n = BIO_nwrite0(c->net, &p);
    ssize_t r;
    if (n <= 0)
      return moved;
    r = read(c->fd, p, (size_t) n);
    if (r > 0) {
      BIO_nwrite(c->net, &p, (int) r);
      moved = 1;
      continue;
    }
    if (r == 0)
      fail("the server closed the connection after %" PRIu64 " bytes",
           c->recvd);
    if (errno == EINTR)
      continue;
    if (errno == EAGAIN) {
      c->rd_blocked = 1;
      return moved;
    }
    fail("read: %s", strerror(errno));
  }
}

/* Wait for one descriptor (setup only); fails at the deadline. */
static void wait_fd(int fd, unsigned events, uint64_t deadline) {
  struct epoll_event ev, out;
  int r;
  memset(&ev, 0, sizeof(ev));
  ev.events = events;
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0)
    fail("epoll_ctl: %s", strerror(errno));
  for (;;) {
    uint64_t t = now_ns();
    if (t >= deadline)
      fail("timed out setting up the connection");
    r = epoll_wait(epfd, &out, 1, (int) ((deadline - t) / 1000000u) + 1);
    if (r > 0 || (r < 0 && errno != EINTR))
      break;
  }
  epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev);
}

/* Run an SSL call to completion through the pair (setup only). */
static void settle(bconn_t* c, int r, const char* what, uint64_t deadline) {
  int e = SSL_get_error(c->ssl, r);
  flush_out(c);
  if (c->wr_blocked)
    wait_fd(c->fd, EPOLLOUT, deadline);
  else if (e == SSL_ERROR_WANT_READ) {
    if (!fill_in(c) && c->rd_blocked)
      wait_fd(c->fd, EPOLLIN, deadline);
  } else if (e != SSL_ERROR_WANT_WRITE)
    fail("%s failed (SSL error %d)", what, e);
}

static void bconn_open(bconn_t* c, int index) {
  uint64_t deadline = now_ns() + (uint64_t) (opt.timeout * 1e9);
  size_t pre = opt.preamble ? strlen(opt.preamble) : 0, off = 0;
  BIO* inner;
  int r;

  c->fd = tcp_socket();
  c->base = (uint32_t) (((uint64_t) index * 7919u) % PAT_LEN);
  c->ssl = SSL_new(ctx);
  if (c->ssl == NULL || !BIO_new_bio_pair(&inner, PAIR_BUF, &c->net, PAIR_BUF))
    fail("SSL_new");
  SSL_set_bio(c->ssl, inner, inner);
  wait_fd(c->fd, EPOLLOUT, deadline); /* the TCP handshake */
  while ((r = SSL_connect(c->ssl)) != 1)
    settle(c, r, "handshake", deadline);
  check_negotiated(c->ssl);
  /* Anything the server needs before the echo starts (nginx: the request
   * line of its /echo location).  It is not echoed. */
  while (off < pre) {
    r = SSL_write(c->ssl, opt.preamble + off, (int) (pre - off));
    if (r > 0)
      off += (size_t) r;
    else
      settle(c, r, "writing the preamble", deadline);
  }
  do {
    flush_out(c);
    if (c->wr_blocked)
      wait_fd(c->fd, EPOLLOUT, deadline);
  } while (BIO_ctrl_pending(c->net) > 0);
}

/* Decrypt and verify all the pair holds; returns the bytes read. */
static uint64_t bconn_read(bconn_t* c, int index) {
  uint64_t got = 0;
  for (;;) {
    int r = SSL_read(c->ssl, rbuf, sizeof(rbuf));
    int e;
    if (r > 0) {
      if (c->recvd + (uint64_t) r > c->sent)
        fail("connection %d: server sent %" PRIu64 " bytes, only %" PRIu64
             " were sent to it", index, c->recvd + (uint64_t) r, c->sent);
      if (memcmp(rbuf, pat + (c->base + c->recvd) % PAT_LEN, (size_t) r) != 0)
        fail("connection %d: echoed bytes differ from the bytes sent, at "
             "stream offset %" PRIu64, index, c->recvd);
      c->recvd += (uint64_t) r;
      got += (uint64_t) r;
      continue;
    }
    e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
      return got;
    if (e == SSL_ERROR_ZERO_RETURN)
      fail("connection %d: the server sent close_notify after %" PRIu64
           " bytes", index, c->recvd);
    fail("connection %d: TLS read failed after %" PRIu64 " bytes (SSL error "
         "%d)", index, c->recvd, e);
  }
}

/* Encrypt pattern bytes into the pair until it is full. */
static void bconn_fill(bconn_t* c, int index) {
  for (;;) {
    int r = SSL_write(c->ssl, pat + (c->base + c->sent) % PAT_LEN, opt.chunk);
    int e;
    if (r > 0) {
      c->sent += (uint64_t) r;
      continue;
    }
    e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
      return;
    fail("connection %d: TLS write failed (SSL error %d)", index, e);
  }
}

/*
** Move everything that can move on one connection: socket to pair to
** plaintext (verified), pattern to pair to socket, until the socket blocks
** both ways (edge-triggered epoll wakes us on the next change) or the time
** is up.  Returns the bytes echoed.
*/
static uint64_t bconn_pump(bconn_t* c, int index, uint64_t t_end) {
  uint64_t got = 0;
  int spins = 0;
  do {
    fill_in(c);
    got += bconn_read(c, index);
    bconn_fill(c, index);
    flush_out(c);
    if (++spins % 64 == 0 && now_ns() >= t_end)
      break;
  } while (!(c->rd_blocked && c->wr_blocked));
  return got;
}

static void run_bulk(void) {
  struct epoll_event evs[MAX_EVENTS];
  int n = opt.conns > 0 ? opt.conns : 1;
  uint64_t t, t_measure, t_end, echoed = 0;
  int measuring = 0;
  bconn_t* cs;
  mark_t mark;
  window_t w;
  int i;

  cs = calloc((size_t) n, sizeof(*cs));
  if (cs == NULL)
    fail("out of memory");
  for (i = 0; i < n; i++) {
    struct epoll_event ev;
    bconn_open(&cs[i], i);
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLOUT | EPOLLET;
    ev.data.u32 = (uint32_t) i;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, cs[i].fd, &ev) != 0)
      fail("epoll_ctl: %s", strerror(errno));
  }
  t = now_ns();
  t_measure = t + (uint64_t) (opt.warmup * 1e9);
  t_end = t_measure + (uint64_t) (opt.seconds * 1e9);
  for (i = 0; i < n; i++)
    echoed += bconn_pump(&cs[i], i, t_end);

  for (;;) {
    int nev;
    t = now_ns();
    if (!measuring && t >= t_measure) {
      measuring = 1;
      mark_start(&mark, t, echoed);
    }
    if (t >= t_end)
      break;
    nev = epoll_wait(epfd, evs, MAX_EVENTS, (int) ((t_end - t) / 1000000u) + 1);
    if (nev < 0 && errno != EINTR)
      fail("epoll_wait: %s", strerror(errno));
    for (i = 0; i < nev; i++) {
      int idx = (int) evs[i].data.u32;
      echoed += bconn_pump(&cs[idx], idx, measuring ? t_end : t_measure);
    }
  }
  w = mark_end(&mark, t, echoed);
  for (i = 0; i < n; i++) {
    SSL_free(cs[i].ssl); /* frees the inner BIO */
    BIO_free(cs[i].net);
    close_rst(cs[i].fd);
  }
  free(cs);

  if (w.count == 0)
    fail("nothing echoed in %.1f s", w.seconds);
  {
    double mbs = (double) w.count / 1e6 / w.seconds;
    double per_core = w.srv_cpu > 0 ? mbs / (w.srv_cpu / 100.0) : -1;
    printf("bulk %d conn(s) %d B writes: %.1f MB/s echoed and verified (%s "
           "%s %s, %.1f tickets/conn); server CPU %.0f%% (%.0f MB per "
           "core-second), tlsgen CPU %.0f%%\n",
           n, opt.chunk, mbs, neg_proto, neg_cipher, neg_group,
           (double) tickets / n, w.srv_cpu, per_core, w.lg_cpu);
    if (opt.kv)
      printf("kv mode=bulk conns=%d chunk=%d seconds=%.3f bytes=%" PRIu64
             " mbps=%.2f srv_cpu=%.1f lg_cpu=%.1f mbps_per_core=%.1f "
             "tickets=%.1f proto=%s cipher=%s group=%s ok=1\n",
             n, opt.chunk, w.seconds, w.count, mbs, w.srv_cpu, w.lg_cpu,
             per_core, (double) tickets / n, neg_proto, neg_cipher,
             neg_group);
  }
  fflush(stdout);
}


/* ------------------------------------------------------------------ main */

static uint64_t parse_size(const char* s) {
  char* end;
  double v = strtod(s, &end);
  switch (*end) {
    case 'k': case 'K': v *= 1024; break;
    case 'm': case 'M': v *= 1024 * 1024; break;
    case '\0': break;
    default: fail("bad size: %s", s);
  }
  if (v < 1)
    fail("bad size: %s", s);
  return (uint64_t) v;
}

static void usage(FILE* f) {
  fprintf(f,
"usage: tlsgen MODE --port PORT [options]\n"
"modes:\n"
"  handshakes  --conns N clients in a loop: connect, full TLS 1.3 handshake,\n"
"              close_notify, wait for the server's close\n"
"  bulk        --conns N TLS connections (1) streaming --chunk-byte writes,\n"
"              the echo read back and verified\n"
"options:\n"
"  --host ADDR      server address (127.0.0.1)\n"
"  --port PORT      server port\n"
"  --pid PID        server process (its children too), for the CPU figures\n"
"  --conns N        handshakes: concurrent clients (16); bulk: conns (1)\n"
"  --seconds S      measured time (5)\n"
"  --warmup S       unmeasured time first (0.5)\n"
"  --chunk BYTES    bulk write size (65536)\n"
"  --cipher LIST    TLS 1.3 cipher suites offered (TLS_AES_128_GCM_SHA256)\n"
"  --groups LIST    key-exchange groups offered (X25519)\n"
"  --ca FILE        verify the server's chain against FILE (default: no\n"
"                   chain verification)\n"
"  --preamble STR   bulk: sent over TLS before the stream, not echoed\n"
"                   (\\r and \\n are understood)\n"
"  --timeout S      a connection stuck this long fails the run (10)\n"
"  --kv             also print one 'kv key=value ...' line\n");
}

/* \r and \n in --preamble, so a shell can pass an HTTP request line. */
static char* unescape(const char* s) {
  char* out = malloc(strlen(s) + 1);
  char* o = out;
  if (out == NULL)
    fail("out of memory");
  for (; *s; s++) {
    if (s[0] == '\\' && s[1] == 'r') { *o++ = '\r'; s++; }
    else if (s[0] == '\\' && s[1] == 'n') { *o++ = '\n'; s++; }
    else *o++ = *s;
  }
  *o = '\0';
  return out;
}

int main(int argc, char** argv) {
  static const struct option longopts[] = {
    {"host", required_argument, NULL, 'H'},
    {"port", required_argument, NULL, 'p'},
    {"pid", required_argument, NULL, 'P'},
    {"conns", required_argument, NULL, 'c'},
    {"seconds", required_argument, NULL, 't'},
    {"warmup", required_argument, NULL, 'w'},
    {"chunk", required_argument, NULL, 'C'},
    {"cipher", required_argument, NULL, 'x'},
    {"groups", required_argument, NULL, 'g'},
    {"ca", required_argument, NULL, 'a'},
    {"preamble", required_argument, NULL, 'r'},
    {"timeout", required_argument, NULL, 'o'},
    {"kv", no_argument, NULL, 'k'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0}
  };
  int ch;

  opt.host = "127.0.0.1";
  opt.conns = -1;
  opt.seconds = 5;
  opt.warmup = 0.5;
  opt.chunk = 65536;
  opt.cipher = "TLS_AES_128_GCM_SHA256";
  opt.groups = "X25519";
  opt.timeout = 10;
  while ((ch = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (ch) {
      case 'H': opt.host = optarg; break;
      case 'p': opt.port = atoi(optarg); break;
      case 'P': opt.pid = atoi(optarg); break;
      case 'c': opt.conns = atoi(optarg); break;
      case 't': opt.seconds = atof(optarg); break;
      case 'w': opt.warmup = atof(optarg); break;
      case 'C': opt.chunk = (int) parse_size(optarg); break;
      case 'x': opt.cipher = optarg; break;
      case 'g': opt.groups = optarg; break;
      case 'a': opt.ca = optarg; break;
      case 'r': opt.preamble = unescape(optarg); break;
      case 'o': opt.timeout = atof(optarg); break;
      case 'k': opt.kv = 1; break;
      case 'h': usage(stdout); return 0;
      default: usage(stderr); return 2;
    }
  }
  if (optind != argc - 1) {
    usage(stderr);
    return 2;
  }
  opt.mode = argv[optind];
  memset(&server_addr, 0, sizeof(server_addr));
  server_addr.sin_family = AF_INET;
  server_addr.sin_port = htons((uint16_t) opt.port);
  if (inet_pton(AF_INET, opt.host, &server_addr.sin_addr) != 1)
    fail("bad --host (IPv4 address expected): %s", opt.host);
  if (opt.port <= 0 || opt.port > 65535)
    fail("--port is required");
  if (opt.chunk < 1 || opt.chunk > MAX_CHUNK)
    fail("--chunk must be 1..%d", MAX_CHUNK);
  if (opt.seconds <= 0 || opt.warmup < 0)
    fail("--seconds must be > 0 and --warmup >= 0");

  signal(SIGPIPE, SIG_IGN);
  pattern_init();
  ctx_init();
  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0)
    fail("epoll_create1: %s", strerror(errno));
  if (strcmp(opt.mode, "handshakes") == 0)
    run_handshakes();
  else if (strcmp(opt.mode, "bulk") == 0)
    run_bulk();
  else {
    usage(stderr);
    return 2;
  }
  SSL_CTX_free(ctx);
  free(samples);
  free(pat);
  close(epfd);
  return 0;
}
