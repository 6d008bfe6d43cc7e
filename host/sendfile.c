/*
** sendfile.c: fs.sendfile(conn, file, offset, length), a file's bytes to
** a plain conn through the kernel, never through Lua or our memory.
**
** sendfile(2) runs on the pool, since it may read the disk; ours, not
** uv_fs_sendfile, which in libuv 1.44 (Debian 12's) tries
** copy_file_range first and, refused for a socket, falls back to
** reading and writing 8 KiB at a time. The socket is
** non-blocking, so it sends what the socket buffer takes and returns; the
** rest waits until the socket drains. libuv has no "writable" event for a
** stream, so a uv_poll_t watches a dup of the socket: epoll keeps one
** interest per descriptor, and the dup's does not disturb the stream's.
** Then the next sendfile goes to the pool.
**
** The pool thread writes to that dup and reads from a dup of the file: a
** conn or file closed meanwhile (a timeout, a cancel) cannot hand its
** descriptor number to another file under the pool thread's feet.
*/
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "luahost.h"

typedef struct sendfile_req {
  uv_work_t work;    /* the sendfile running on the pool (busy) */
  ssize_t result;    /* what it sent, or a libuv error */
  uv_poll_t poll;    /* on sock, once the socket was full (polling) */
  lh_task *task;     /* NULL once the task stopped waiting */
  lh_sock *s;        /* the conn, whose w.sender is task; NULL then too */
  int sock, file;    /* dups of the conn's socket and of the file */
  int64_t offset;    /* of the next byte to send */
  size_t left;       /* bytes still to send */
  const char *head;  /* bytes to send first (below), head_left of them */
  size_t head_left, head_sent;
  unsigned busy : 1, polling : 1, abandoned : 1;
  struct sendfile_req *prev, *next;  /* in `live` */
} sendfile_req;

/* Every request not yet freed: the host's teardown ends them. */
static sendfile_req *live;

static void release(sendfile_req *req) {
  if (req->prev != NULL)
    req->prev->next = req->next;
  else
    live = req->next;
  if (req->next != NULL)
    req->next->prev = req->prev;
  close(req->sock);
  close(req->file);
  free(req);
}

static void on_poll_closed(uv_handle_t *h) {
  release(h->data);
}

static void req_free(sendfile_req *req) {
  if (req->polling)  /* (stopped, so its descriptor is out of epoll) */
    uv_close((uv_handle_t *)&req->poll, on_poll_closed);
  else
    release(req);
}

/* The task stops waiting: the conn forgets it. */
static void leave(sendfile_req *req) {
  if (req->s != NULL)
    req->s->w.sender = NULL;
  req->s = NULL;
  req->task = NULL;
}

/* Ends the wait with err (0: all sent) and frees req. */
static void finish(sendfile_req *req, int err) {
  lh_task *t = req->task;
  leave(req);
  req_free(req);
  if (t != NULL && lh_H.L != NULL)
    lh_resume_status(t, err);
}

/*
** As much as the socket takes now: bytes of the file sent, or a libuv
** error. The head goes first with MSG_MORE, so that it leaves with the
** file's first bytes, not in a packet of its own (nginx corks the socket
** for that: two more system calls).
*/
static ssize_t send_now(sendfile_req *req) {
  off_t off = (off_t)req->offset;
  ssize_t n;
  while (req->head_left > 0) {
    n = send(req->sock, req->head, req->head_left,
             (req->left > 0 ? MSG_MORE : 0) | MSG_NOSIGNAL);
    if (n < 0 && errno != EINTR)
      return uv_translate_sys_error(errno);
    if (n > 0) {
      req->head += n;
      req->head_left -= (size_t)n;
      req->head_sent += (size_t)n;
    }
  }
  if (req->left == 0)
    return 0;
  do
    n = sendfile(req->sock, req->file, &off, req->left);
  while (n < 0 && errno == EINTR);
  return n < 0 ? uv_translate_sys_error(errno) : n;
}

static void send_work(uv_work_t *w) {
  sendfile_req *req = (sendfile_req *)w;
  req->result = send_now(req);
}

#if defined(__linux__) && (defined(__x86_64__) || defined(__aarch64__))
#ifndef __NR_cachestat
#define __NR_cachestat 451  /* Linux 6.5; not in Debian 12's headers */
#endif
struct cachestat_range { uint64_t off, len; };
struct cachestat_counts {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};
static int has_cachestat = 1;

/*
** Whether every page of what is left to send is in the page cache, so
** that sendfile here cannot wait on the disk (the chance that one is
** evicted in between is the price of not going to the pool).
*/
static int in_cache(const sendfile_req *req) {
  struct cachestat_range range;
  struct cachestat_counts cs;
  static uint64_t page;
  uint64_t first, last;
  if (req->left == 0)
    return 1;
  if (!has_cachestat)
    return 0;
  if (page == 0)
    page = (uint64_t)sysconf(_SC_PAGESIZE);
  range.off = (uint64_t)req->offset;
  range.len = req->left;
  if (syscall(__NR_cachestat, req->file, &range, &cs, 0) < 0) {
    if (errno == ENOSYS || errno == EPERM)
      has_cachestat = 0;  /* a kernel before 6.5, or a seccomp filter */
    return 0;
  }
  first = range.off / page;
  last = (range.off + range.len - 1) / page;
  return cs.nr_cache >= last - first + 1;
}
#else
#define in_cache(req) 0
#endif

enum { SENT_ALL = 1, SENT_WAIT = 0 };

static void on_sent(uv_work_t *w, int status);
static void on_writable(uv_poll_t *poll, int status, int events);

/*
** After a sendfile that gave n: SENT_ALL, or SENT_WAIT once the socket
** is watched for room, or a libuv error.
*/
static int advance(sendfile_req *req, ssize_t n) {
  int err;
  lh_H.bytes_out += req->head_sent;
  req->head_sent = 0;
  if (n < 0 && n != UV_EAGAIN)
    return (int)n;
  if (n == 0 && req->left > 0)
    return UV_EOF;  /* the file ends before offset + length */
  if (n > 0) {
    req->offset += n;
    req->left -= (size_t)n;
    lh_H.bytes_out += (uint64_t)n;
    if (req->task != NULL)  /* the timeout is for each step, not all */
      lh_wait_renew(req->task, req->s->timeout);
  }
  if (req->left == 0 && req->head_left == 0)
    return SENT_ALL;
  /* The socket took what it had room for: wait until it has more. */
  if (!req->polling) {
    if ((err = uv_poll_init(lh_H.loop, &req->poll, req->sock)) < 0)
      return err;
    req->poll.data = req;
    req->polling = 1;
  }
  err = uv_poll_start(&req->poll, UV_WRITABLE, on_writable);
  return err < 0 ? err : SENT_WAIT;
}

/*
** The next sendfile: here when what it sends is in the page cache (as
** nginx does it, with no thread switch), else on the pool. SENT_ALL,
** SENT_WAIT (for the socket or the pool) or a libuv error.
*/
static int send_next(sendfile_req *req) {
  int err;
  if (in_cache(req))
    return advance(req, send_now(req));
  err = uv_queue_work(lh_H.loop, &req->work, send_work, on_sent);
  req->busy = err == 0;
  return err < 0 ? err : SENT_WAIT;
}

/* Ends the wait unless r is SENT_WAIT: all sent, or the error r. */
static void settle(sendfile_req *req, int r) {
  if (r != SENT_WAIT)
    finish(req, r == SENT_ALL ? 0 : r);
}

/* The socket's pending error (a reset peer), or err when it has none:
   libuv reports an error on a polled socket as EBADF. */
static int sock_error(sendfile_req *req, int err) {
  int e = 0;
  socklen_t len = sizeof e;
  if (getsockopt(req->sock, SOL_SOCKET, SO_ERROR, &e, &len) == 0 && e != 0)
    return uv_translate_sys_error(e);
  return err;
}

static void on_writable(uv_poll_t *poll, int status, int events) {
  sendfile_req *req = poll->data;
  (void)events;
  uv_poll_stop(poll);
  settle(req, status < 0 ? sock_error(req, status) : send_next(req));
}

static void on_sent(uv_work_t *w, int status) {
  sendfile_req *req = (sendfile_req *)w;
  req->busy = 0;
  if (req->abandoned)
    lh_H.fs_abandoned--;
  if (req->task == NULL || lh_H.L == NULL)
    req_free(req);
  else
    settle(req, advance(req, status < 0 ? status : req->result));
}

static void cancel_sendfile(lh_task *t) {
  sendfile_req *req = t->wait.on;
  leave(req);
  if (!req->busy) {  /* waiting for the socket: ends now */
    if (req->polling)
      uv_poll_stop(&req->poll);
    req_free(req);
  } else if (uv_cancel((uv_req_t *)&req->work) != 0) {
    /* Running: on_sent frees it; meanwhile it keeps nothing alive. */
    req->abandoned = 1;
    lh_H.fs_abandoned++;
  }
}

static void describe_sendfile(lh_task *t, char *buf, size_t size) {
  sendfile_req *req = t->wait.on;
  snprintf(buf, size, "%zu bytes left", req->left);
}

static const lh_waitkind sendfile_kind = {"sendfile", cancel_sendfile, NULL,
                                          LH_WAIT_NET, describe_sendfile};

/*
** fs.sendfile(conn, file, offset, length [, head]) → true once head (a
** string) and length bytes of file from offset on are handed to the OS. ENOTSUP for a conn with a
** layer (TLS), EBUSY while writes are queued on it: write those bytes
** yourself. EOF when the file ends first. The conn's timeout bounds it.
*/
int lh_fs_sendfile(lua_State *L) {
  lh_sock *s = lh_checkconn(L, 1);
  lh_file *f = lh_checkobj(L, 2, LH_TAG_FILE, "file");
  lua_Integer offset = luaL_checkinteger(L, 3);
  lua_Integer length = luaL_checkinteger(L, 4);
  size_t hlen = 0;
  const char *head = luaL_optlstring(L, 5, NULL, &hlen);
  lh_task *t = lh_checktask_caller(L, "sendfile");
  sendfile_req *req;
  uv_os_fd_t fd;
  int err;
  luaL_argcheck(L, f->fd >= 0, 2, "attempt to use a closed file");
  luaL_argcheck(L, offset >= 0, 3, "negative offset");
  luaL_argcheck(L, length >= 0, 4, "negative length");
  if (s->handle.data != NULL)
    return lh_pusherror(L, UV_ENOTSUP);
  if (uv_stream_get_write_queue_size(&s->stream) > 0 || s->w.sender != NULL)
    return lh_pusherror(L, UV_EBUSY);
  if ((err = uv_fileno(&s->handle, &fd)) < 0)
    return lh_pusherror(L, err);
  if (length == 0 && hlen == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  req = calloc(1, sizeof *req + hlen);
  if (req == NULL)
    return luaL_error(L, "not enough memory");
  req->sock = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  req->file = fcntl(f->fd, F_DUPFD_CLOEXEC, 0);
  if (req->sock < 0 || req->file < 0) {
    err = uv_translate_sys_error(errno);
    if (req->sock >= 0)
      close(req->sock);
    if (req->file >= 0)
      close(req->file);
    free(req);
    return lh_pusherror(L, err);
  }
  req->next = live;
  if (live != NULL)
    live->prev = req;
  live = req;
  req->offset = offset;
  req->left = (size_t)length;
  req->head = memcpy(req + 1, head != NULL ? head : "", hlen);
  req->head_left = hlen;
  if ((err = send_next(req)) != SENT_WAIT) {
    req_free(req);
    if (err < 0)
      return lh_pusherror(L, err);
    lua_pushboolean(L, 1);
    return 1;
  }
  req->task = t;
  req->s = s;
  s->w.sender = t;
  return lh_wait(L, t, &sendfile_kind, req, s->timeout);
}

/*
** At the host's end (after lua_close: no task runs again): a request
** waiting for room closes its poll handle with the callback that frees
** it, before the teardown closes every handle without one. One on the
** pool frees itself when the pool is done with it.
*/
void lh_sendfile_close(void) {
  sendfile_req *req;
  for (req = live; req != NULL; req = req->next) {
    req->task = NULL;
    req->s = NULL;  /* (freed memory by now, perhaps) */
  }
  req = live;
  while (req != NULL) {
    sendfile_req *next = req->next;
    if (!req->busy &&
        !(req->polling && uv_is_closing((uv_handle_t *)&req->poll))) {
      if (req->polling)
        uv_poll_stop(&req->poll);
      req_free(req);
    }
    req = next;
  }
}
