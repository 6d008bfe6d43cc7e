/*
** loadgen: a load generator for TCP echo servers, in the spirit of libuv's
** test/benchmark-ping-pongs.c and benchmark-pump.c.  One thread, one epoll
** set, non-blocking sockets, no dependency beyond libc.
**
** Every byte a connection sends is taken from one pseudo-random pattern at
** an offset that depends on the connection and the stream position, so the
** echo can be checked with one memcmp against the pattern wherever it is
** cut into reads.
**
** Usage: loadgen MODE --port PORT [options]; see usage() below.  Each figure
** is printed as one human line ("pingpong 100 conns 64 B: ...") and, with
** --kv, also as one "kv key=value ..." line for scripts.  Exit status 0 means
** the mode ran and every echoed byte matched; anything else is a failure
** whose reason is printed on stderr.
*/

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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

/* A prime length, so the pattern never lines up with a read or write size. */
#define PAT_LEN 65521
#define MAX_CHUNK (1 << 20)
#define RBUF_SIZE (256 * 1024)
#define MAX_EVENTS 1024
#define CONNECTS_IN_FLIGHT 128
#define MiB (1024.0 * 1024.0)

typedef struct {
  int fd;
  uint32_t base;    /* where this connection's stream starts in the pattern */
  uint64_t sent;    /* bytes written so far */
  uint64_t recvd;   /* bytes read back, all of them verified */
  uint64_t target;  /* write until sent reaches this */
  uint64_t t_start; /* ns: when the current round trip began */
  unsigned events;  /* the epoll interest set now registered */
} conn_t;

typedef struct {
  double seconds;   /* length of the measured window */
  uint64_t count;   /* round trips (pingpong) or bytes (bulk) in it */
  double srv_cpu;   /* server CPU use in the window, percent of one core */
  double lg_cpu;    /* our own CPU use in the window, percent of one core */
} window_t;

static struct {
  const char* mode;
  const char* host;
  int port;
  int conns;
  int size;
  double seconds;
  double warmup;
  int pid;
  int kv;
  const char* levels;
  uint64_t total;
  int block_ms;
  int chunk;
  double connect_timeout;
} opt;

static unsigned char* pat;          /* PAT_LEN bytes, then MAX_CHUNK again */
static unsigned char rbuf[RBUF_SIZE];
static int epfd = -1;
static struct sockaddr_in server_addr;

/* Latency samples in ns for the current pingpong window. */
static uint32_t* samples;
static size_t nsamples;
static size_t samples_cap;


static void fail(const char* fmt, ...) {
  va_list ap;
  fprintf(stderr, "loadgen %s: error: ", opt.mode ? opt.mode : "");
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
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


static void sleep_s(double s) {
  struct timespec ts;
  ts.tv_sec = (time_t) s;
  ts.tv_nsec = (long) ((s - (double) ts.tv_sec) * 1e9);
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
    ;
}


static void pattern_init(void) {
  uint64_t x = 0x9e3779b97f4a7c15u;
  size_t i;

  pat = malloc(PAT_LEN + MAX_CHUNK);
  if (pat == NULL)
    fail("out of memory");
  for (i = 0; i < PAT_LEN; i++) {
    /* xorshift64: cheap, and no period shorter than the table. */
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    pat[i] = (unsigned char) (x >> 24);
  }
  /* The tail repeats the head so any offset gives MAX_CHUNK contiguous
   * bytes. */
  for (i = PAT_LEN; i < PAT_LEN + MAX_CHUNK; i++)
    pat[i] = pat[i - PAT_LEN];
}


static const unsigned char* pattern_at(const conn_t* c, uint64_t off) {
  return pat + (c->base + off) % PAT_LEN;
}


/*
** /proc/PID/status fields, in KiB; -1 when there is no server PID or the
** field cannot be read.
*/
static long proc_status_kb(const char* field) {
  char path[64];
  char line[256];
  size_t flen = strlen(field);
  long v = -1;
  FILE* f;

  if (opt.pid <= 0)
    return -1;
  snprintf(path, sizeof(path), "/proc/%d/status", opt.pid);
  f = fopen(path, "r");
  if (f == NULL)
    return -1;
  while (fgets(line, sizeof(line), f) != NULL) {
    if (strncmp(line, field, flen) == 0 && line[flen] == ':') {
      v = strtol(line + flen + 1, NULL, 10);
      break;
    }
  }
  fclose(f);
  return v;
}


/*
** Reset the server's VmHWM to its current RSS (Linux >= 4.0, "5" written to
** clear_refs).  Returns 0 when that worked.
*/
static int proc_reset_hwm(void) {
  char path[64];
  FILE* f;
  int r;

  if (opt.pid <= 0)
    return -1;
  snprintf(path, sizeof(path), "/proc/%d/clear_refs", opt.pid);
  f = fopen(path, "w");
  if (f == NULL)
    return -1;
  r = fputs("5", f) < 0;
  if (fclose(f) != 0)
    r = 1;
  return r ? -1 : 0;
}


/* The server's user+system CPU time in seconds, all threads; -1 if unknown. */
static double proc_cpu_s(void) {
  char path[64];
  char buf[1024];
  unsigned long utime, stime;
  ssize_t n;
  char* p;
  FILE* f;

  if (opt.pid <= 0)
    return -1;
  snprintf(path, sizeof(path), "/proc/%d/stat", opt.pid);
  f = fopen(path, "r");
  if (f == NULL)
    return -1;
  n = (ssize_t) fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  if (n <= 0)
    return -1;
  buf[n] = '\0';
  /* The command name may hold spaces and parentheses: skip past the last
   * ')'; utime and stime are then fields 12 and 13 of the rest. */
  p = strrchr(buf, ')');
  if (p == NULL)
    return -1;
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
             &utime, &stime) != 2)
    return -1;
  return (double) (utime + stime) / (double) sysconf(_SC_CLK_TCK);
}


static double self_cpu_s(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double) ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
         (double) ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}


static void raise_nofile(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}


static void ep_set(conn_t* c, uint32_t index, unsigned events) {
  struct epoll_event ev;
  int op = c->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;

  if (events == c->events)
    return;
  memset(&ev, 0, sizeof(ev));
  ev.events = events;
  ev.data.u32 = index;
  if (events == 0) {
    op = EPOLL_CTL_DEL;
  }
  if (epoll_ctl(epfd, op, c->fd, &ev) != 0)
    fail("epoll_ctl: %s", strerror(errno));
  c->events = events;
}


/*
** Open n connections, at most CONNECTS_IN_FLIGHT handshakes at a time so a
** server's listen backlog is never the thing measured.  Each connection ends
** registered for nothing; the caller picks its events.
*/
static conn_t* connect_all(int n) {
  struct epoll_event evs[MAX_EVENTS];
  uint64_t deadline;
  conn_t* conns;
  int opened = 0;
  int done = 0;
  int pending = 0;
  int i;

  conns = calloc((size_t) n, sizeof(*conns));
  if (conns == NULL)
    fail("out of memory");
  deadline = now_ns() + (uint64_t) (opt.connect_timeout * 1e9);

  while (done < n) {
    while (opened < n && pending < CONNECTS_IN_FLIGHT) {
      conn_t* c = &conns[opened];
      int one = 1;
      int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0)
        fail("socket (connection %d): %s", opened, strerror(errno));
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      c->fd = fd;
      c->base = (uint32_t) (((uint64_t) opened * 7919u) % PAT_LEN);
      if (connect(fd, (struct sockaddr*) &server_addr, sizeof(server_addr)) ==
          0) {
        opened++;
        done++;
        continue;
      }
      if (errno != EINPROGRESS)
        fail("connect (connection %d): %s", opened, strerror(errno));
      ep_set(c, (uint32_t) opened, EPOLLOUT);
      opened++;
      pending++;
    }
    if (pending > 0) {
      int nev = epoll_wait(epfd, evs, MAX_EVENTS, 100);
      if (nev < 0 && errno != EINTR)
        fail("epoll_wait: %s", strerror(errno));
      for (i = 0; i < nev; i++) {
        conn_t* c = &conns[evs[i].data.u32];
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0)
          fail("connect (connection %u of %d): %s", evs[i].data.u32, n,
               strerror(err));
        ep_set(c, evs[i].data.u32, 0);
        pending--;
        done++;
      }
    }
    if (now_ns() > deadline)
      fail("only %d of %d connections established in %.0f s", done, n,
           opt.connect_timeout);
  }
  return conns;
}


static void close_all(conn_t* conns, int n) {
  int i;
  for (i = 0; i < n; i++)
    if (conns[i].fd >= 0)
      close(conns[i].fd);
  free(conns);
}


/*
** Write the pattern until c->sent reaches c->target or the socket is full;
** a full socket gets EPOLLOUT added.  `base_events` is what the caller wants
** registered besides that.
*/
static void conn_flush(conn_t* c, uint32_t index, unsigned base_events,
                       size_t chunk) {
  while (c->sent < c->target) {
    uint64_t left = c->target - c->sent;
    size_t len = left < chunk ? (size_t) left : chunk;
    ssize_t n = write(c->fd, pattern_at(c, c->sent), len);
    if (n > 0) {
      c->sent += (uint64_t) n;
      continue;
    }
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && errno == EAGAIN) {
      ep_set(c, index, base_events | EPOLLOUT);
      return;
    }
    fail("write (connection %u): %s", index, strerror(errno));
  }
  ep_set(c, index, base_events);
}


/*
** Read once into rbuf and check the bytes against the pattern.  Returns the
** byte count, or 0 when nothing was there.  EOF and errors are failures: no
** server in this benchmark may close on its own.
*/
static size_t conn_read(conn_t* c, uint32_t index) {
  ssize_t n;

  for (;;) {
    n = read(c->fd, rbuf, sizeof(rbuf));
    if (n > 0)
      break;
    if (n == 0)
      fail("connection %u closed by the server after %" PRIu64 " bytes",
           index, c->recvd);
    if (errno == EINTR)
      continue;
    if (errno == EAGAIN)
      return 0;
    fail("read (connection %u): %s", index, strerror(errno));
  }
  if (c->recvd + (uint64_t) n > c->sent)
    fail("connection %u: server sent %" PRIu64 " bytes, only %" PRIu64
         " were sent to it",
         index, c->recvd + (uint64_t) n, c->sent);
  if (memcmp(rbuf, pattern_at(c, c->recvd), (size_t) n) != 0)
    fail("connection %u: echoed bytes differ from the bytes sent, "
         "at stream offset %" PRIu64,
         index, c->recvd);
  c->recvd += (uint64_t) n;
  return (size_t) n;
}


static void sample_add(uint64_t ns) {
  if (nsamples == samples_cap) {
    samples_cap = samples_cap ? samples_cap * 2 : 1 << 16;
    samples = realloc(samples, samples_cap * sizeof(*samples));
    if (samples == NULL)
      fail("out of memory");
  }
  samples[nsamples++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t) ns;
}


static int cmp_u32(const void* a, const void* b) {
  uint32_t x = *(const uint32_t*) a;
  uint32_t y = *(const uint32_t*) b;
  return (x > y) - (x < y);
}


static double percentile_ms(double p) {
  size_t i = (size_t) ((double) (nsamples - 1) * p);
  return samples[i] / 1e6;
}


/* Start the measured window: a snapshot of counters and CPU clocks. */
typedef struct {
  uint64_t t0;
  uint64_t count0;
  double srv0;
  double self0;
} mark_t;

static void mark_start(mark_t* m, uint64_t t, uint64_t count) {
  m->t0 = t;
  m->count0 = count;
  m->srv0 = proc_cpu_s();
  m->self0 = self_cpu_s();
}

static window_t mark_end(const mark_t* m, uint64_t t, uint64_t count) {
  window_t w;
  double srv1 = proc_cpu_s();
  w.seconds = (double) (t - m->t0) / 1e9;
  w.count = count - m->count0;
  w.srv_cpu = (srv1 >= 0 && m->srv0 >= 0) ?
                  100.0 * (srv1 - m->srv0) / w.seconds : -1;
  w.lg_cpu = 100.0 * (self_cpu_s() - m->self0) / w.seconds;
  return w;
}


/*
** pingpong: n connections, one message of opt.size bytes in flight on each;
** a round trip ends when the whole message is back.  Runs opt.warmup
** seconds unmeasured, then opt.seconds measured.
*/
static void run_pingpong(const char* label, int n) {
  struct epoll_event evs[MAX_EVENTS];
  uint64_t size = (uint64_t) opt.size;
  uint64_t t_measure, t_end, t;
  uint64_t roundtrips = 0;
  int measuring = 0;
  mark_t mark;
  window_t w;
  conn_t* conns;
  int i;

  conns = connect_all(n);
  nsamples = 0;
  t = now_ns();
  for (i = 0; i < n; i++) {
    conns[i].target = size;
    conns[i].t_start = t;
    conn_flush(&conns[i], (uint32_t) i, EPOLLIN, size);
  }
  t_measure = t + (uint64_t) (opt.warmup * 1e9);
  t_end = t_measure + (uint64_t) (opt.seconds * 1e9);

  for (;;) {
    int nev, timeout;
    t = now_ns();
    if (!measuring && t >= t_measure) {
      measuring = 1;
      mark_start(&mark, t, roundtrips);
      nsamples = 0;
    }
    if (t >= t_end)
      break;
    timeout = (int) ((t_end - t) / 1000000u) + 1;
    nev = epoll_wait(epfd, evs, MAX_EVENTS, timeout);
    if (nev < 0 && errno != EINTR)
      fail("epoll_wait: %s", strerror(errno));
    for (i = 0; i < nev; i++) {
      uint32_t idx = evs[i].data.u32;
      conn_t* c = &conns[idx];
      if (evs[i].events & EPOLLOUT)
        conn_flush(c, idx, EPOLLIN, size);
      if (!(evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        continue;
      while (conn_read(c, idx) > 0 && c->recvd < c->target)
        ;
      if (c->recvd == c->target) {
        t = now_ns();
        roundtrips++;
        /* Only round trips begun inside the window give a latency: one
         * begun during warmup may include a late handshake. */
        if (measuring && c->t_start >= mark.t0)
          sample_add(t - c->t_start);
        c->target += size;
        c->t_start = t;
        conn_flush(c, idx, EPOLLIN, size);
      }
    }
  }
  w = mark_end(&mark, t, roundtrips);
  close_all(conns, n);

  if (w.count == 0 || nsamples == 0)
    fail("%s %d conns: no round trip completed in %.1f s", label, n,
         w.seconds);
  qsort(samples, nsamples, sizeof(*samples), cmp_u32);
  {
    double rate = (double) w.count / w.seconds;
    double p50 = percentile_ms(0.50);
    double p99 = percentile_ms(0.99);
    double max = samples[nsamples - 1] / 1e6;
    printf("%s %d conns %d B: %.0f roundtrips/s p50 %.3f ms p99 %.3f ms "
           "max %.3f ms\n",
           label, n, opt.size, rate, p50, p99, max);
    if (opt.kv)
      printf("kv mode=%s conns=%d size=%d seconds=%.3f roundtrips=%" PRIu64
             " rps=%.1f p50_ms=%.4f p99_ms=%.4f max_ms=%.4f srv_cpu=%.1f "
             "lg_cpu=%.1f ok=1\n",
             label, n, opt.size, w.seconds, w.count, rate, p50, p99, max,
             w.srv_cpu, w.lg_cpu);
  }
  fflush(stdout);
}


static void run_scale(void) {
  const char* p = opt.levels;
  while (*p != '\0') {
    char* end;
    long n = strtol(p, &end, 10);
    if (end == p || n <= 0)
      fail("bad --levels list: %s", opt.levels);
    run_pingpong("scale", (int) n);
    p = end;
    if (*p == ',')
      p++;
    /* Let the server reap the connections just closed before the next
     * level opens more. */
    if (*p != '\0')
      sleep_s(0.2);
  }
}


/*
** bulk: n connections each stream opt.chunk-byte writes for as long as the
** socket takes them, and read the echo back as it comes; every byte read is
** verified.  The figure is echoed bytes per second, all connections.
*/
static void run_bulk(void) {
  struct epoll_event evs[MAX_EVENTS];
  int n = opt.conns;
  uint64_t t_measure, t_end, t;
  uint64_t echoed = 0;
  int measuring = 0;
  mark_t mark;
  window_t w;
  conn_t* conns;
  int i;

  conns = connect_all(n);
  for (i = 0; i < n; i++) {
    conns[i].target = UINT64_MAX;
    ep_set(&conns[i], (uint32_t) i, EPOLLIN | EPOLLOUT);
  }
  t = now_ns();
  t_measure = t + (uint64_t) (opt.warmup * 1e9);
  t_end = t_measure + (uint64_t) (opt.seconds * 1e9);

  for (;;) {
    int nev, timeout;
    t = now_ns();
    if (!measuring && t >= t_measure) {
      measuring = 1;
      mark_start(&mark, t, echoed);
    }
    if (t >= t_end)
      break;
    timeout = (int) ((t_end - t) / 1000000u) + 1;
    nev = epoll_wait(epfd, evs, MAX_EVENTS, timeout);
    if (nev < 0 && errno != EINTR)
      fail("epoll_wait: %s", strerror(errno));
    for (i = 0; i < nev; i++) {
      uint32_t idx = evs[i].data.u32;
      conn_t* c = &conns[idx];
      if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        echoed += conn_read(c, idx);
      if (evs[i].events & EPOLLOUT) {
        /* One write per wakeup keeps the connections fair. */
        ssize_t r = write(c->fd, pattern_at(c, c->sent), (size_t) opt.chunk);
        if (r > 0)
          c->sent += (uint64_t) r;
        else if (r < 0 && errno != EAGAIN && errno != EINTR)
          fail("write (connection %u): %s", idx, strerror(errno));
      }
    }
  }
  w = mark_end(&mark, t, echoed);
  close_all(conns, n);

  if (w.count == 0)
    fail("bulk %d conns: nothing echoed in %.1f s", n, w.seconds);
  {
    double mbs = (double) w.count / 1e6 / w.seconds;
    printf("bulk %d conns %d B writes: %.1f MB/s echoed and verified\n", n,
           opt.chunk, mbs);
    if (opt.kv)
      printf("kv mode=bulk conns=%d chunk=%d seconds=%.3f bytes=%" PRIu64
             " mbps=%.2f srv_cpu=%.1f lg_cpu=%.1f ok=1\n",
             n, opt.chunk, w.seconds, w.count, mbs, w.srv_cpu, w.lg_cpu);
  }
  fflush(stdout);
}


/*
** Run every connection in conns[0..n) until each has its c->target bytes
** echoed back, or fail after `timeout` seconds.
*/
static void echo_until_done(conn_t* conns, int n, double timeout) {
  struct epoll_event evs[MAX_EVENTS];
  uint64_t deadline = now_ns() + (uint64_t) (timeout * 1e9);
  int left = 0;
  int i;

  for (i = 0; i < n; i++) {
    conn_flush(&conns[i], (uint32_t) i, EPOLLIN, (size_t) opt.size);
    if (conns[i].recvd < conns[i].target)
      left++;
  }
  while (left > 0) {
    int nev = epoll_wait(epfd, evs, MAX_EVENTS, 100);
    if (nev < 0 && errno != EINTR)
      fail("epoll_wait: %s", strerror(errno));
    for (i = 0; i < nev; i++) {
      uint32_t idx = evs[i].data.u32;
      conn_t* c = &conns[idx];
      if (evs[i].events & EPOLLOUT)
        conn_flush(c, idx, EPOLLIN, (size_t) opt.size);
      if (!(evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        continue;
      while (c->recvd < c->target && conn_read(c, idx) > 0)
        ;
      if (c->recvd == c->target) {
        left--;
        /* Stay registered for EPOLLIN: an idle connection that turns
         * readable was closed or sent bytes unasked, both failures. */
      }
    }
    if (now_ns() > deadline)
      fail("%d of %d connections still waiting for their echo after %.0f s",
           left, n, timeout);
  }
}


/*
** idle: the server's RSS with no client, then with opt.conns connections
** open that have each had one opt.size-byte echo and then nothing, held
** for opt.seconds.  A connection opened, echoed and closed first lets the
** server do any one-time setup before the first figure.
*/
static void run_idle(void) {
  struct epoll_event evs[MAX_EVENTS];
  int n = opt.conns;
  long before, after, hwm;
  uint64_t t_end;
  conn_t* conns;

  conns = connect_all(1);
  conns[0].target = (uint64_t) opt.size;
  echo_until_done(conns, 1, opt.connect_timeout);
  close_all(conns, 1);
  sleep_s(0.3);
  before = proc_status_kb("VmRSS");

  conns = connect_all(n);
  {
    int i;
    for (i = 0; i < n; i++)
      conns[i].target = (uint64_t) opt.size;
  }
  echo_until_done(conns, n, opt.connect_timeout);

  t_end = now_ns() + (uint64_t) (opt.seconds * 1e9);
  for (;;) {
    uint64_t t = now_ns();
    int nev;
    if (t >= t_end)
      break;
    nev = epoll_wait(epfd, evs, MAX_EVENTS, (int) ((t_end - t) / 1000000u) + 1);
    if (nev > 0) {
      uint32_t idx = evs[0].data.u32;
      conn_read(&conns[idx], idx); /* fails: EOF, or bytes never sent */
      fail("idle connection %u became readable", idx);
    }
  }
  after = proc_status_kb("VmRSS");
  hwm = proc_status_kb("VmHWM");
  close_all(conns, n);

  if (before < 0 || after < 0) {
    printf("idle %d conns: all echoed, held %.1f s (no server --pid: RSS "
           "unknown)\n",
           n, opt.seconds);
    if (opt.kv)
      printf("kv mode=idle conns=%d ok=1\n", n);
  } else {
    double per = ((double) (after - before) * 1024.0) / n;
    printf("idle %d conns: server RSS %.1f MiB before, %.1f MiB after: "
           "%.0f bytes/conn\n",
           n, before / 1024.0, after / 1024.0, per);
    if (opt.kv)
      printf("kv mode=idle conns=%d rss_before_kb=%ld rss_after_kb=%ld "
             "hwm_kb=%ld bytes_per_conn=%.1f ok=1\n",
             n, before, after, hwm, per);
  }
  fflush(stdout);
}


/*
** flood: one connection writes up to opt.total bytes and reads nothing.
** When writes make no progress for opt.block_ms the client counts as
** blocked: everything written so far is what the server (and the kernel
** buffers on both sides) accepted.  The server's RSS is sampled all along,
** and its VmHWM was reset at the start where the kernel allows.  Then the
** client reads everything back, writing what is left as it goes, and
** verifies every byte.
*/
static void run_flood(void) {
  struct epoll_event evs[MAX_EVENTS];
  uint64_t t, t_progress, t_block, t_next_sample, t_done, deadline;
  long idle_rss, rss, peak = -1, hwm, rss_blocked = -1;
  int hwm_reset, blocked = 0;
  uint64_t accepted;
  conn_t* c;

  c = connect_all(1);
  c->target = (uint64_t) opt.size;
  echo_until_done(c, 1, opt.connect_timeout);
  sleep_s(0.2);
  idle_rss = proc_status_kb("VmRSS");
  hwm_reset = proc_reset_hwm() == 0;
  peak = idle_rss;

  /* Phase 1: write only. */
  c->target = opt.total;
  ep_set(c, 0, EPOLLOUT);
  t_progress = t_next_sample = now_ns();
  for (;;) {
    uint64_t before = c->sent;
    int nev;
    conn_flush(c, 0, 0, (size_t) opt.chunk);
    t = now_ns();
    if (c->sent != before)
      t_progress = t;
    if (t >= t_next_sample) {
      rss = proc_status_kb("VmRSS");
      if (rss > peak)
        peak = rss;
      t_next_sample = t + 20000000u;
    }
    if (c->sent >= c->target)
      break;
    if (t - t_progress >= (uint64_t) opt.block_ms * 1000000u) {
      blocked = 1;
      break;
    }
    nev = epoll_wait(epfd, evs, MAX_EVENTS, 20);
    if (nev < 0 && errno != EINTR)
      fail("epoll_wait: %s", strerror(errno));
  }
  accepted = c->sent;
  rss_blocked = proc_status_kb("VmRSS");
  if (rss_blocked > peak)
    peak = rss_blocked;

  /* Phase 2: read back, and write the rest as room appears. */
  t_block = now_ns();
  t_progress = t_block;
  deadline = 10ull * 1000000000u; /* no progress for 10 s fails */
  ep_set(c, 0, EPOLLIN | (c->sent < c->target ? EPOLLOUT : 0));
  while (c->recvd < c->target) {
    int nev = epoll_wait(epfd, evs, MAX_EVENTS, 20);
    uint64_t progress = c->recvd + c->sent;
    if (nev < 0 && errno != EINTR)
      fail("epoll_wait: %s", strerror(errno));
    if (nev > 0) {
      if (evs[0].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        while (conn_read(c, 0) > 0)
          ;
      if (c->sent < c->target)
        conn_flush(c, 0, EPOLLIN, (size_t) opt.chunk);
    }
    t = now_ns();
    if (c->recvd + c->sent != progress)
      t_progress = t;
    if (t >= t_next_sample) {
      rss = proc_status_kb("VmRSS");
      if (rss > peak)
        peak = rss;
      t_next_sample = t + 20000000u;
    }
    if (t - t_progress > deadline)
      fail("flood: read back stalled at %" PRIu64 " of %" PRIu64 " bytes",
           c->recvd, c->target);
  }
  t_done = now_ns();
  hwm = proc_status_kb("VmHWM");
  if (hwm_reset && hwm > peak)
    peak = hwm;
  close_all(c, 1);

  {
    double read_s = (double) (t_done - t_block) / 1e9;
    printf("flood %.0f MiB: server accepted %.1f MiB %s; server RSS idle "
           "%.1f MiB peak %.1f MiB (+%.1f MiB); all read back and verified "
           "in %.2f s\n",
           (double) opt.total / MiB, (double) accepted / MiB,
           blocked ? "before the client blocked" : "without blocking",
           idle_rss / 1024.0, peak / 1024.0, (peak - idle_rss) / 1024.0,
           read_s);
    if (opt.kv)
      printf("kv mode=flood total=%" PRIu64 " accepted=%" PRIu64
             " blocked=%d idle_rss_kb=%ld blocked_rss_kb=%ld peak_rss_kb=%ld "
             "peak_over_idle_kb=%ld hwm_reset=%d readback_s=%.3f ok=1\n",
             opt.total, accepted, blocked, idle_rss, rss_blocked, peak,
             peak - idle_rss, hwm_reset, read_s);
  }
  fflush(stdout);
}


/* Print a port that was free a moment ago (for servers that need one). */
static void run_freeport(void) {
  struct sockaddr_in a = server_addr;
  socklen_t len = sizeof(a);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  a.sin_port = 0;
  if (fd < 0 || bind(fd, (struct sockaddr*) &a, sizeof(a)) != 0 ||
      getsockname(fd, (struct sockaddr*) &a, &len) != 0)
    fail("cannot bind %s:0: %s", opt.host, strerror(errno));
  printf("%d\n", ntohs(a.sin_port));
  close(fd);
}


static uint64_t parse_size(const char* s) {
  char* end;
  double v = strtod(s, &end);
  switch (*end) {
    case 'k': case 'K': v *= 1024; break;
    case 'm': case 'M': v *= MiB; break;
    case 'g': case 'G': v *= MiB * 1024; break;
    case '\0': break;
    default: fail("bad size: %s", s);
  }
  if (v < 1)
    fail("bad size: %s", s);
  return (uint64_t) v;
}


static void usage(FILE* f) {
  fprintf(f,
"usage: loadgen MODE --port PORT [options]\n"
"modes:\n"
"  pingpong  --conns N connections, one --size-byte message in flight each\n"
"  bulk      --conns N connections streaming --chunk-byte writes\n"
"  idle      --conns N connections held open after one echo each (RSS)\n"
"  flood     one connection writes --total bytes without reading\n"
"  scale     pingpong at each count of --levels\n"
"  freeport  print a free TCP port on --host and exit\n"
"options:\n"
"  --host ADDR        server address (127.0.0.1)\n"
"  --port PORT        server port\n"
"  --pid PID          server process, for RSS and CPU figures\n"
"  --conns N          connections (pingpong 100, bulk 10, idle 5000)\n"
"  --size BYTES       message size (64)\n"
"  --seconds S        measured time per figure (5); idle: time held\n"
"  --warmup S         unmeasured time first (0.5)\n"
"  --levels LIST      scale levels (1,10,100,1000,10000)\n"
"  --total BYTES      flood total, K/M/G suffix allowed (256M)\n"
"  --block-ms MS      flood: no write progress this long = blocked (1000)\n"
"  --chunk BYTES      bulk and flood write size (65536)\n"
"  --connect-timeout S  (20)\n"
"  --kv               also print one 'kv key=value ...' line per figure\n");
}


int main(int argc, char** argv) {
  static const struct option longopts[] = {
    {"host", required_argument, NULL, 'H'},
    {"port", required_argument, NULL, 'p'},
    {"pid", required_argument, NULL, 'P'},
    {"conns", required_argument, NULL, 'c'},
    {"size", required_argument, NULL, 's'},
    {"seconds", required_argument, NULL, 't'},
    {"warmup", required_argument, NULL, 'w'},
    {"levels", required_argument, NULL, 'l'},
    {"total", required_argument, NULL, 'T'},
    {"block-ms", required_argument, NULL, 'b'},
    {"chunk", required_argument, NULL, 'C'},
    {"connect-timeout", required_argument, NULL, 'o'},
    {"kv", no_argument, NULL, 'k'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0}
  };
  int ch;

  opt.host = "127.0.0.1";
  opt.conns = -1;
  opt.size = 64;
  opt.seconds = 5;
  opt.warmup = 0.5;
  opt.levels = "1,10,100,1000,10000";
  opt.total = 256u << 20;
  opt.block_ms = 1000;
  opt.chunk = 65536;
  opt.connect_timeout = 20;

  while ((ch = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (ch) {
      case 'H': opt.host = optarg; break;
      case 'p': opt.port = atoi(optarg); break;
      case 'P': opt.pid = atoi(optarg); break;
      case 'c': opt.conns = atoi(optarg); break;
      case 's': opt.size = (int) parse_size(optarg); break;
      case 't': opt.seconds = atof(optarg); break;
      case 'w': opt.warmup = atof(optarg); break;
      case 'l': opt.levels = optarg; break;
      case 'T': opt.total = parse_size(optarg); break;
      case 'b': opt.block_ms = atoi(optarg); break;
      case 'C': opt.chunk = (int) parse_size(optarg); break;
      case 'o': opt.connect_timeout = atof(optarg); break;
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
  if (strcmp(opt.mode, "freeport") == 0) {
    run_freeport();
    return 0;
  }
  if (opt.port <= 0 || opt.port > 65535)
    fail("--port is required");
  if (opt.size < 1 || opt.size > MAX_CHUNK)
    fail("--size must be 1..%d", MAX_CHUNK);
  if (opt.chunk < 1 || opt.chunk > MAX_CHUNK)
    fail("--chunk must be 1..%d", MAX_CHUNK);
  if (opt.seconds <= 0 || opt.warmup < 0)
    fail("--seconds must be > 0 and --warmup >= 0");

  signal(SIGPIPE, SIG_IGN);
  raise_nofile();
  pattern_init();
  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0)
    fail("epoll_create1: %s", strerror(errno));

  if (strcmp(opt.mode, "pingpong") == 0) {
    run_pingpong("pingpong", opt.conns > 0 ? opt.conns : 100);
  } else if (strcmp(opt.mode, "scale") == 0) {
    run_scale();
  } else if (strcmp(opt.mode, "bulk") == 0) {
    if (opt.conns <= 0)
      opt.conns = 10;
    run_bulk();
  } else if (strcmp(opt.mode, "idle") == 0) {
    if (opt.conns <= 0)
      opt.conns = 5000;
    run_idle();
  } else if (strcmp(opt.mode, "flood") == 0) {
    run_flood();
  } else {
    usage(stderr);
    return 2;
  }
  free(samples);
  free(pat);
  close(epfd);
  return 0;
}
