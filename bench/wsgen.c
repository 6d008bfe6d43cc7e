/* wsgen: WebSocket echo load for bench/run web.
 *
 *   wsgen --port P [--conns 100] [--size 64] [--seconds 5] [--warmup 1]
 *         [--pid PID] [--kv]
 *
 * Opens --conns connections to 127.0.0.1:P, upgrades each with GET /
 * (RFC 6455 handshake; the 101 and its Sec-WebSocket-Accept are checked),
 * then plays ping-pong: every connection sends one masked binary frame of
 * --size bytes and sends the next only when the whole echo has come back,
 * so exactly one message is in flight per connection.  Every echoed frame
 * is parsed and checked (FIN, binary, unmasked, the length and every byte
 * of the payload).  After --warmup seconds it counts for --seconds and
 * prints messages/s, its own CPU % and, with --pid, the CPU % of that
 * process (all its threads, and its children: nginx's or Node's worker).
 * With --kv it prints one line "kv mode=ws ... ok=1" for bench/run.
 * Exit status 1 on any error (a refused upgrade, a wrong byte, a close).
 *
 * Written from a quick ping-pong generator (/tmp/wsx/wsgen.c) with the
 * checks, the warm-up and the CPU figures added.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXSIZE 65535

typedef struct {
  int fd;
  size_t got;               /* bytes of the current reply buffered */
  unsigned char buf[MAXSIZE + 16];
} conn;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static double self_cpu(void) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 +
         r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

/* utime + stime of one process (all its threads), in clock ticks. */
static long ticks_of(long pid) {
  char path[64], line[2048];
  snprintf(path, sizeof path, "/proc/%ld/stat", pid);
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  size_t n = fread(line, 1, sizeof line - 1, f);
  fclose(f);
  line[n] = 0;
  char *p = strrchr(line, ')');
  if (!p) return 0;
  long ut = 0, st = 0;
  /* after ") ": state(3) ... utime is field 14, stime 15 */
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %ld %ld",
             &ut, &st) != 2)
    return 0;
  return ut + st;
}

/* A process's ticks with its children's (nginx's master and worker). */
static long srv_ticks(long pid) {
  if (pid <= 0) return -1;
  long total = ticks_of(pid);
  char path[64];
  snprintf(path, sizeof path, "/proc/%ld/task/%ld/children", pid, pid);
  FILE *f = fopen(path, "r");
  if (f) {
    long c;
    while (fscanf(f, "%ld", &c) == 1) total += ticks_of(c);
    fclose(f);
  }
  return total;
}

static void die(const char *msg) {
  fprintf(stderr, "wsgen: %s\n", msg);
  exit(1);
}

static void write_all(int fd, const unsigned char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {
      /* 100 connections x one small frame: the socket buffer never fills;
       * wait rather than lose bytes if it ever does. */
      usleep(100);
      continue;
    }
    if (w <= 0) { perror("wsgen: write"); exit(1); }
    p += w; n -= (size_t)w;
  }
}

int main(int argc, char **argv) {
  int port = 0, nconn = 100, size = 64, kv = 0;
  double seconds = 5, warmup = 1;
  long pid = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--kv")) { kv = 1; continue; }
    if (!v) { fprintf(stderr, "wsgen: %s wants a value\n", a); return 2; }
    if (!strcmp(a, "--port")) port = atoi(v);
    else if (!strcmp(a, "--conns")) nconn = atoi(v);
    else if (!strcmp(a, "--size")) size = atoi(v);
    else if (!strcmp(a, "--seconds")) seconds = atof(v);
    else if (!strcmp(a, "--warmup")) warmup = atof(v);
    else if (!strcmp(a, "--pid")) pid = atol(v);
    else { fprintf(stderr, "wsgen: unknown option %s\n", a); return 2; }
    i++;
  }
  if (port <= 0 || nconn <= 0 || size < 0 || size > MAXSIZE || seconds <= 0)
    die("usage: wsgen --port P [--conns N] [--size B<=65535] [--seconds S] "
        "[--warmup S] [--pid PID] [--kv]");

  /* The one client frame: FIN + binary, masked, then the reply it wants. */
  static unsigned char frame[MAXSIZE + 16], payload[MAXSIZE];
  size_t fl = 0, hdr = size < 126 ? 2 : 4;
  const unsigned char key[4] = {0x12, 0x34, 0x56, 0x78};
  frame[fl++] = 0x82;
  if (size < 126) frame[fl++] = 0x80 | (unsigned char)size;
  else { frame[fl++] = 0x80 | 126; frame[fl++] = size >> 8; frame[fl++] = size & 255; }
  memcpy(frame + fl, key, 4); fl += 4;
  for (int i = 0; i < size; i++) {
    payload[i] = (unsigned char)('a' + i % 26);
    frame[fl++] = payload[i] ^ key[i % 4];
  }
  size_t reply = hdr + (size_t)size;

  static const char req[] =
      "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
      "Sec-WebSocket-Version: 13\r\n\r\n";
  /* RFC 6455's own example key and its accept value. */
  static const char accept[] = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

  int ep = epoll_create1(0);
  conn *cs = calloc((size_t)nconn, sizeof *cs);
  if (ep < 0 || !cs) die("out of memory");
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET;
  sa.sin_port = htons((unsigned short)port);
  sa.sin_addr.s_addr = htonl(0x7f000001);
  for (int i = 0; i < nconn; i++) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
      perror("wsgen: connect");
      return 1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    cs[i].fd = fd;
    write_all(fd, (const unsigned char *)req, sizeof req - 1);
    char hb[4096];
    size_t len = 0;
    hb[0] = 0;
    char *end;
    while (!(end = strstr(hb, "\r\n\r\n"))) {
      if (len >= sizeof hb - 1) die("handshake answer too long");
      ssize_t r = read(fd, hb + len, sizeof hb - 1 - len);
      if (r <= 0) die("the server closed during the handshake");
      len += (size_t)r;
      hb[len] = 0;
    }
    if (strncmp(hb, "HTTP/1.1 101", 12)) {
      fprintf(stderr, "wsgen: upgrade refused: %.200s\n", hb);
      return 1;
    }
    if (!strcasestr(hb, "Sec-WebSocket-Accept") || !strstr(hb, accept)) {
      fprintf(stderr, "wsgen: wrong Sec-WebSocket-Accept: %.300s\n", hb);
      return 1;
    }
    if (strcasestr(hb, "Sec-WebSocket-Extensions"))
      die("the server negotiated an extension nobody asked for");
    /* Anything after the head is the start of the first reply. */
    size_t extra = len - (size_t)(end + 4 - hb);
    if (extra) die("data before the first message");
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  }

  long count = 0, counted = 0;
  double t0 = now(), tstart = t0 + warmup, tend = tstart + seconds;
  double c0 = 0, wall0 = 0;
  long s0 = 0;
  int measuring = warmup <= 0;
  if (measuring) { c0 = self_cpu(); s0 = srv_ticks(pid); wall0 = now(); tend = wall0 + seconds; }
  for (int i = 0; i < nconn; i++) write_all(cs[i].fd, frame, fl);

  struct epoll_event evs[1024];
  for (;;) {
    double t = now();
    if (!measuring && t >= tstart) {
      measuring = 1; counted = count;
      c0 = self_cpu(); s0 = srv_ticks(pid); wall0 = t; tend = t + seconds;
    }
    if (measuring && t >= tend) break;
    int k = epoll_wait(ep, evs, 1024, 100);
    if (k < 0 && errno != EINTR) { perror("wsgen: epoll_wait"); return 1; }
    for (int j = 0; j < k; j++) {
      conn *c = &cs[evs[j].data.u32];
      for (;;) {
        ssize_t r = read(c->fd, c->buf + c->got, reply - c->got);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
        if (r <= 0) {
          fprintf(stderr, "wsgen: connection %u %s\n", evs[j].data.u32,
                  r == 0 ? "closed by the server" : strerror(errno));
          return 1;
        }
        c->got += (size_t)r;
        if (c->got < reply) continue;
        /* A whole reply: FIN + binary, unmasked, the same length and bytes. */
        const unsigned char *b = c->buf;
        size_t plen = b[1] & 0x7f;
        if (plen == 126) plen = ((size_t)b[2] << 8) | b[3];
        if (b[0] != 0x82 || (b[1] & 0x80) || plen != (size_t)size ||
            memcmp(b + hdr, payload, (size_t)size)) {
          fprintf(stderr, "wsgen: bad echo frame on connection %u "
                  "(%02x %02x, length %zu)\n", evs[j].data.u32, b[0], b[1], plen);
          return 1;
        }
        c->got = 0;
        count++;
        write_all(c->fd, frame, fl);
      }
    }
  }
  double wall = now() - wall0, cpu = self_cpu() - c0;
  long s1 = srv_ticks(pid);
  double rate = (double)(count - counted) / wall;
  double lg_cpu = 100 * cpu / wall;
  double srv_cpu = pid > 0 ? 100.0 * (double)(s1 - s0) / (double)sysconf(_SC_CLK_TCK) / wall : -1;
  printf("ws %d conns, %d B messages: %.0f msgs/s, server CPU %.1f %%, wsgen CPU %.1f %%\n",
         nconn, size, rate, srv_cpu, lg_cpu);
  if (kv)
    printf("kv mode=ws conns=%d size=%d msgs_s=%.1f srv_cpu=%.1f lg_cpu=%.1f ok=1\n",
           nconn, size, rate, srv_cpu, lg_cpu);
  for (int i = 0; i < nconn; i++) close(cs[i].fd);
  return 0;
}
