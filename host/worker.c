/*
** worker.c: the worker's side of --workers (see supervisor.c). A worker
** is started with LUAHOST_WORKER set to its number and the control socket
** as descriptor 3: so.listen asks the supervisor for its listening socket
** there, and the worker says when its script runs (for reloads).
*/
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "luahost.h"

#define CONTROL_FD 3

/* Sets up a worker from its environment; 0 if this is no worker. */
int lh_worker_init(void) {
  const char *n = getenv("LUAHOST_WORKER");
  if (n == NULL || atoi(n) <= 0 || fcntl(CONTROL_FD, F_GETFD) < 0)
    return 0;
  lh_H.worker = atoi(n);
  fcntl(CONTROL_FD, F_SETFD, FD_CLOEXEC);  /* not for the script's children */
  unsetenv("LUAHOST_WORKER");
  prctl(PR_SET_PDEATHSIG, SIGTERM);  /* no worker outlives its supervisor */
  return lh_H.worker;
}

/* The script runs: the supervisor may retire the generation before. */
void lh_worker_ready(void) {
  if (lh_H.worker > 0)
    while (write(CONTROL_FD, "R\n", 2) < 0 && errno == EINTR)
      ;
}

/*
** The listening socket for a numeric host, port and backlog, from the
** supervisor (which keeps one per address for every worker): a
** descriptor, or a libuv error code.
*/
int lh_worker_listen(const char *host, int port, int backlog) {
  char req[128], cbuf[CMSG_SPACE(sizeof(int))];
  struct msghdr msg;
  struct iovec iov;
  struct cmsghdr *cm;
  int status = 0, fd = -1;
  ssize_t n;
  snprintf(req, sizeof req, "L %d %d %s\n", port, backlog, host);
  if (write(CONTROL_FD, req, strlen(req)) < 0)
    return -errno;  /* libuv codes are -errno */
  memset(&msg, 0, sizeof msg);
  iov.iov_base = &status;
  iov.iov_len = sizeof status;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof cbuf;
  do
    n = recvmsg(CONTROL_FD, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n != sizeof status)
    return UV_ECONNRESET;
  if (status < 0)
    return status;  /* -errno: libuv's code for it */
  cm = CMSG_FIRSTHDR(&msg);
  if (cm == NULL || cm->cmsg_type != SCM_RIGHTS)
    return UV_EPROTO;
  memcpy(&fd, CMSG_DATA(cm), sizeof fd);
  return fd;
}

/* so.worker(): this worker's number (1..N), or nil without --workers. */
static int so_worker(lua_State *L) {
  if (lh_H.worker <= 0)
    return 0;
  lua_pushinteger(L, lh_H.worker);
  return 1;
}

void lh_worker_open(lua_State *L) {
  lua_pushcfunction(L, so_worker);
  lua_setfield(L, -2, "worker");
}
