/*
** supervisor.c: luahost --workers N. One process per worker, each running
** the script with its own Lua state and loop; this process only starts
** them, owns the listening sockets, and handles the signals.
**
** Listening sockets: a worker's so.listen asks the supervisor over a
** control socket (fd 3 in the worker) and gets the descriptor back
** (SCM_RIGHTS). The supervisor opens one socket per address and keeps it
** across reloads, as nginx keeps its listeners: the kernel has one accept
** queue, shared by every worker, so the load spreads without a script
** changing, and a connection queued while workers come and go is never
** reset (SO_REUSEPORT would give each worker a queue of its own, whose
** connections die with it).
**
** Signals: SIGTERM, SIGINT and SIGQUIT drain every worker (the supervisor
** stops listening and passes SIGTERM on) and exit 0 once all have ended;
** SIGHUP reloads: a new generation of workers loads the script afresh, and
** once every one of them runs, the old ones drain. A new worker that ends
** before it runs (a syntax error) aborts the reload: the old ones go on.
** SIGUSR1 is passed on. A worker that dies is started again, after a
** back-off that grows while workers die right after they start.
*/
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "luahost.h"

#define MAX_WORKERS 256

typedef struct worker {
  uv_process_t proc;
  uv_poll_t poll;         /* the control socket: requests from the worker */
  int ctl;                /* our end of the control socketpair, or -1 */
  int slot;               /* its number, 1..N: so.worker() */
  int gen;                /* the generation (reloads) it belongs to */
  int ready;              /* its script runs (it said so) */
  int draining;           /* asked to drain: its end is expected */
  uint64_t started;       /* loop ms */
  struct worker *next;
} worker;

typedef struct listening {
  char key[160];          /* "host|port" as workers ask */
  int fd;
} listening;

static char **child_argv;
static int nworkers, gen, stopping, reloading;
static worker *workers;
static listening *socks;
static int nsocks;
static uv_signal_t signals[5];
static uv_timer_t restart_timers[MAX_WORKERS + 1];
static int64_t backoff_ms[MAX_WORKERS + 1];

static void start_worker(int slot, int g);

static void close_listening(void) {
  int i;
  for (i = 0; i < nsocks; i++) {
    const char *path = lh_unixpath(socks[i].key);
    close(socks[i].fd);
    if (path != NULL) {  /* its file goes with it ("unix:PATH|0") */
      char *bar = strrchr(socks[i].key, '|');
      *bar = '\0';
      unlink(path);
    }
  }
  nsocks = 0;
  free(socks);
  socks = NULL;
}

static int live_workers(void) {
  int n = 0;
  worker *w;
  for (w = workers; w != NULL; w = w->next)
    n++;
  return n;
}

static void signal_workers(int signum, int only_gen) {
  worker *w;
  for (w = workers; w != NULL; w = w->next)
    if (only_gen < 0 || w->gen == only_gen)
      uv_process_kill(&w->proc, signum);
}

/* {======================================================
** Listening sockets, for the workers
** ======================================================= */

/* A listening socket for "host port backlog"; the fd, or -errno. */
static int get_listening(const char *host, int port, int backlog) {
  struct sockaddr_storage ss;
  struct sockaddr_un *sun = (struct sockaddr_un *)&ss;
  const char *path = lh_unixpath(host);
  socklen_t sslen;
  char key[160];
  int i, fd, one = 1;
  snprintf(key, sizeof key, "%s|%d", host, port);
  for (i = 0; i < nsocks; i++)
    if (strcmp(socks[i].key, key) == 0)
      return socks[i].fd;
  if (path != NULL) {
    if ((i = lh_unix_claim(path)) < 0)
      return i;
    memset(sun, 0, sizeof *sun);
    sun->sun_family = AF_UNIX;
    memcpy(sun->sun_path, path, strlen(path));  /* claim checked its size */
    sslen = sizeof *sun;
  } else if (lh_parseaddr(host, port, &ss) != 0)
    return -EINVAL;
  else
    sslen = ss.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                     : sizeof(struct sockaddr_in);
  fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -errno;
  if (path == NULL)
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (ss.ss_family == AF_INET6)
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  if (bind(fd, (struct sockaddr *)&ss, sslen) != 0 ||
      listen(fd, backlog) != 0) {
    int err = -errno;
    close(fd);
    return err;
  }
  socks = realloc(socks, (size_t)(nsocks + 1) * sizeof *socks);
  if (socks == NULL)
    abort();
  snprintf(socks[nsocks].key, sizeof socks[nsocks].key, "%s", key);
  socks[nsocks].fd = fd;
  nsocks++;
  return fd;
}

/* Answers on the control socket: the status, and the descriptor if any. */
static void reply(int ctl, int status, int fd) {
  struct msghdr msg;
  struct iovec iov;
  char cbuf[CMSG_SPACE(sizeof(int))];
  memset(&msg, 0, sizeof msg);
  iov.iov_base = &status;
  iov.iov_len = sizeof status;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (fd >= 0) {
    struct cmsghdr *cm;
    memset(cbuf, 0, sizeof cbuf);
    msg.msg_control = cbuf;
    msg.msg_controllen = sizeof cbuf;
    cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof fd);
  }
  while (sendmsg(ctl, &msg, MSG_NOSIGNAL) < 0 && errno == EINTR)
    ;
}

static void on_control(uv_poll_t *poll, int status, int events) {
  worker *w = poll->data;
  char buf[256], host[128];
  ssize_t n;
  int port, backlog;
  (void)events;
  n = status < 0 ? -1 : read(w->ctl, buf, sizeof buf - 1);
  if (n < 0 && (errno == EAGAIN || errno == EINTR))
    return;
  if (n <= 0) {  /* the worker is gone */
    uv_poll_stop(poll);
    return;
  }
  buf[n] = '\0';
  if (buf[0] == 'R') {  /* its script runs */
    w->ready = 1;
    if (reloading && w->gen == gen) {
      worker *x;
      int all = 1;
      for (x = workers; x != NULL; x = x->next)
        if (x->gen == gen && !x->ready)
          all = 0;
      if (all) {  /* the new generation runs: the old one drains */
        reloading = 0;
        for (x = workers; x != NULL; x = x->next)
          if (x->gen != gen) {
            x->draining = 1;
            uv_process_kill(&x->proc, SIGTERM);
          }
        lh_log(LH_LOG_INFO, NULL, "reload: generation %d runs", gen);
      }
    }
  } else if (sscanf(buf, "L %d %d %127s", &port, &backlog, host) == 3) {
    int fd = stopping ? -ECANCELED : get_listening(host, port, backlog);
    reply(w->ctl, fd < 0 ? fd : 0, fd);
  }
}

/* }====================================================== */


/* {======================================================
** Workers' lives
** ======================================================= */

static void on_worker_closed(uv_handle_t *h) {
  worker *w = h->data;
  if (w->ctl >= 0) {
    uv_close((uv_handle_t *)&w->poll, NULL);
    close(w->ctl);
    w->ctl = -1;
  }
  free(w);
}

static void on_restart_timer(uv_timer_t *timer) {
  int slot = (int)(timer - restart_timers);
  if (!stopping)
    start_worker(slot, gen);
}

static void on_worker_exit(uv_process_t *proc, int64_t status, int term) {
  worker *w = proc->data, **p;
  int64_t lived = (int64_t)(uv_now(proc->loop) - w->started);
  for (p = &workers; *p != w; p = &(*p)->next)
    ;
  *p = w->next;
  if (term)
    lh_log(w->draining || stopping ? LH_LOG_INFO : LH_LOG_ERROR, NULL,
           "worker %d (pid %d) killed by signal %d", w->slot, proc->pid,
           term);
  else
    lh_log(status == 0 || w->draining || stopping ? LH_LOG_INFO
                                                  : LH_LOG_ERROR, NULL,
           "worker %d (pid %d) exited with status %d", w->slot, proc->pid,
           (int)status);
  if (stopping) {
    if (live_workers() == 0)
      uv_stop(proc->loop);
  } else if (w->draining) {
    ;  /* an old generation's worker, done */
  } else if (reloading && w->gen == gen && !w->ready) {
    /* The new generation cannot run the script: the old one goes on. */
    lh_log(LH_LOG_ERROR, NULL, "reload failed: worker %d of generation %d "
           "ended before it ran; generation %d goes on serving", w->slot,
           gen, gen - 1);
    reloading = 0;
    signal_workers(SIGKILL, gen);
    for (p = &workers; *p != NULL; p = &(*p)->next)
      if ((*p)->gen == gen)
        (*p)->draining = 1;
    gen--;
  } else if (w->gen == gen) {  /* died while serving: start it again */
    int slot = w->slot;
    backoff_ms[slot] = lived < 1000
        ? (backoff_ms[slot] ? backoff_ms[slot] * 2 : 100) : 0;
    if (backoff_ms[slot] > 30000)
      backoff_ms[slot] = 30000;
    if (backoff_ms[slot] > 0)
      lh_log(LH_LOG_WARN, NULL, "worker %d: starting again in %g s", slot,
             (double)backoff_ms[slot] / 1000.0);
    uv_timer_start(&restart_timers[slot], on_restart_timer,
                   (uint64_t)backoff_ms[slot], 0);
  }
  uv_close((uv_handle_t *)proc, on_worker_closed);
}

static void start_worker(int slot, int g) {
  uv_process_options_t opts;
  uv_stdio_container_t stdio[4];
  char env_worker[32], **env;
  extern char **environ;
  int pair[2], n = 0, err;
  worker *w = calloc(1, sizeof *w);
  if (w == NULL || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair)) {
    free(w);
    lh_log(LH_LOG_ERROR, NULL, "worker %d: %s", slot, strerror(errno));
    return;
  }
  while (environ[n] != NULL)
    n++;
  env = calloc((size_t)n + 2, sizeof *env);
  memcpy(env, environ, (size_t)n * sizeof *env);
  snprintf(env_worker, sizeof env_worker, "LUAHOST_WORKER=%d", slot);
  env[n] = env_worker;
  memset(&opts, 0, sizeof opts);
  memset(stdio, 0, sizeof stdio);
  stdio[0].flags = stdio[1].flags = stdio[2].flags = UV_INHERIT_FD;
  stdio[0].data.fd = 0;
  stdio[1].data.fd = 1;
  stdio[2].data.fd = 2;
  stdio[3].flags = UV_INHERIT_FD;
  stdio[3].data.fd = pair[1];
  opts.file = child_argv[0];
  opts.args = child_argv;
  opts.env = env;
  opts.stdio = stdio;
  opts.stdio_count = 4;
  opts.exit_cb = on_worker_exit;
  w->proc.data = w;
  w->slot = slot;
  w->gen = g;
  w->ctl = pair[0];
  w->started = uv_now(lh_H.loop);
  err = uv_spawn(lh_H.loop, &w->proc, &opts);
  free(env);
  close(pair[1]);
  if (err < 0) {
    lh_log(LH_LOG_ERROR, NULL, "worker %d: %s", slot, uv_strerror(err));
    close(pair[0]);
    free(w);
    return;
  }
  uv_poll_init(lh_H.loop, &w->poll, w->ctl);
  w->poll.data = w;
  uv_poll_start(&w->poll, UV_READABLE | UV_DISCONNECT, on_control);
  w->next = workers;
  workers = w;
}

static void on_signal(uv_signal_t *sig, int signum) {
  int i;
  (void)sig;
  if (signum == SIGUSR1) {  /* to workers whose handler is set: ready */
    worker *w;
    for (w = workers; w != NULL; w = w->next)
      if (w->ready)
        uv_process_kill(&w->proc, SIGUSR1);
  } else if (signum == SIGHUP) {
    if (stopping || reloading)
      return;
    reloading = 1;
    gen++;
    lh_log(LH_LOG_INFO, NULL, "reload: starting generation %d", gen);
    for (i = 1; i <= nworkers; i++)
      start_worker(i, gen);
  } else if (!stopping) {
    stopping = 1;
    lh_log(LH_LOG_INFO, NULL, "drain: every worker");
    close_listening();  /* the kernel refuses new connections */
    for (i = 1; i <= nworkers; i++)
      uv_timer_stop(&restart_timers[i]);
    signal_workers(SIGTERM, -1);
    if (live_workers() == 0)
      uv_stop(lh_H.loop);
  } else {  /* the second: at once, even a worker whose loop is stuck */
    lh_log(LH_LOG_WARN, NULL, "drain: second signal, killing every worker");
    signal_workers(SIGKILL, -1);
  }
}

/* }====================================================== */


/*
** Runs the supervisor of n workers, each started as this program with
** argv less the --workers option; returns the exit status.
*/
int lh_supervise(int n, char **argv) {
  static const int signums[5] = {SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1};
  char exe[4096];
  size_t len = sizeof exe;
  int i;
  if (uv_exepath(exe, &len) != 0)
    return 1;
  child_argv = argv;
  child_argv[0] = exe;
  nworkers = n;
  lh_H.loop = uv_default_loop();
  signal(SIGPIPE, SIG_IGN);
  for (i = 0; i < 5; i++) {
    uv_signal_init(lh_H.loop, &signals[i]);
    uv_signal_start(&signals[i], on_signal, signums[i]);
  }
  for (i = 1; i <= n; i++)
    uv_timer_init(lh_H.loop, &restart_timers[i]);
  for (i = 1; i <= n; i++)
    start_worker(i, gen);
  uv_run(lh_H.loop, UV_RUN_DEFAULT);
  close_listening();
  return 0;
}
