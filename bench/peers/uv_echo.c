/*
** uv_echo: the raw libuv echo server the benchmark measures everything
** against.  Classic backpressure: a connection reads only while it has
** nothing waiting to be written.  Each read first tries uv_try_write; when
** the kernel takes every byte nothing is pending and reading goes on.
** Otherwise reading stops, the rest goes to uv_write, and the write callback
** frees the buffer and starts reading again.
**
** Read buffers come from a small free list: with malloc and free alone,
** glibc gives the 64 KiB back to the kernel (brk) on every other message,
** and that syscall would be measured as part of the "physical limit".
**
** usage: uv_echo PORT [HOST]   (port 0 picks a free port)
** Prints "listening on HOST:PORT" once ready; SIGTERM ends it.
*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

typedef struct {
  uv_tcp_t handle;
  uv_write_t req;
  uv_buf_t buf; /* the bytes being written back, owned until write_cb */
} conn_t;

#define BUF_SIZE 65536
#define BUF_CACHE 8

static uv_loop_t* loop;
static uv_tcp_t server;
static char* buf_cache[BUF_CACHE]; /* free read buffers, BUF_SIZE each */
static int buf_cached;


static void buf_free(char* base) {
  if (base == NULL)
    return;
  if (buf_cached < BUF_CACHE)
    buf_cache[buf_cached++] = base;
  else
    free(base);
}


static void fatal(const char* what, int err) {
  fprintf(stderr, "uv_echo: %s: %s: %s\n", what, uv_err_name(err),
          uv_strerror(err));
  exit(1);
}


static void on_close(uv_handle_t* handle) {
  conn_t* conn = (conn_t*) handle;
  buf_free(conn->buf.base);
  free(conn);
}


static void on_alloc(uv_handle_t* handle, size_t suggested, uv_buf_t* buf) {
  (void) handle;
  (void) suggested;
  buf->base = buf_cached > 0 ? buf_cache[--buf_cached] : malloc(BUF_SIZE);
  buf->len = buf->base == NULL ? 0 : BUF_SIZE;
}


static void on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf);


static void on_write(uv_write_t* req, int status) {
  conn_t* conn = (conn_t*) req->handle;

  buf_free(conn->buf.base);
  conn->buf.base = NULL;
  if (status < 0) {
    if (!uv_is_closing((uv_handle_t*) &conn->handle))
      uv_close((uv_handle_t*) &conn->handle, on_close);
    return;
  }
  /* Everything written: only now take more from the peer. */
  uv_read_start((uv_stream_t*) &conn->handle, on_alloc, on_read);
}


static void on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf) {
  conn_t* conn = (conn_t*) stream;
  int err;

  if (nread <= 0) {
    buf_free(buf->base);
    if (nread < 0 && !uv_is_closing((uv_handle_t*) stream))
      uv_close((uv_handle_t*) stream, on_close); /* EOF or error */
    return;
  }
  conn->buf = uv_buf_init(buf->base, (unsigned int) nread);
  err = uv_try_write(stream, &conn->buf, 1);
  if (err == nread) {
    /* All taken by the kernel: nothing pending, keep reading. */
    buf_free(conn->buf.base);
    conn->buf.base = NULL;
    return;
  }
  if (err < 0 && err != UV_EAGAIN)
    goto fail;
  /* Part or none taken: stop reading until the rest is written. */
  if (err > 0) {
    conn->buf.base += err;
    conn->buf.len -= (unsigned int) err;
  }
  uv_read_stop(stream);
  err = uv_write(&conn->req, stream, &conn->buf, 1, on_write);
  conn->buf.base = buf->base; /* what on_write and on_close free */
  if (err == 0)
    return;
fail:
  buf_free(buf->base);
  conn->buf.base = NULL;
  uv_close((uv_handle_t*) stream, on_close);
}


static void on_connection(uv_stream_t* listener, int status) {
  conn_t* conn;

  if (status < 0)
    return;
  conn = calloc(1, sizeof(*conn));
  if (conn == NULL)
    fatal("calloc", UV_ENOMEM);
  uv_tcp_init(loop, &conn->handle);
  if (uv_accept(listener, (uv_stream_t*) &conn->handle) != 0) {
    uv_close((uv_handle_t*) &conn->handle, on_close);
    return;
  }
  uv_tcp_nodelay(&conn->handle, 1);
  uv_read_start((uv_stream_t*) &conn->handle, on_alloc, on_read);
}


int main(int argc, char** argv) {
  const char* host = argc > 2 ? argv[2] : "127.0.0.1";
  struct sockaddr_storage ss;
  struct sockaddr_in* sin = (struct sockaddr_in*) &ss;
  int len = sizeof(ss);
  char name[64];
  int err;

  if (argc < 2) {
    fprintf(stderr, "usage: uv_echo PORT [HOST]\n");
    return 2;
  }
  loop = uv_default_loop();
  err = uv_ip4_addr(host, atoi(argv[1]), sin);
  if (err != 0)
    fatal("uv_ip4_addr", err);
  uv_tcp_init(loop, &server);
  err = uv_tcp_bind(&server, (const struct sockaddr*) sin, 0);
  if (err == 0)
    err = uv_listen((uv_stream_t*) &server, 4096, on_connection);
  if (err != 0)
    fatal("listen", err);
  uv_tcp_getsockname(&server, (struct sockaddr*) &ss, &len);
  uv_ip4_name(sin, name, sizeof(name));
  printf("listening on %s:%d\n", name, ntohs(sin->sin_port));
  fflush(stdout);
  return uv_run(loop, UV_RUN_DEFAULT);
}
