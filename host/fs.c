/*
** fs.c: the so.fs module, files through libuv's fs requests.
**
** Every operation is a uv_fs_* request run on libuv's thread pool; the
** task waits as it waits for a socket, and the request's callback resumes
** it on the loop. So the loop never blocks on a disk. A task that stops
** waiting (a timeout of so.deadline, so.cancel) leaves its request to
** finish on its own: the callback then only cleans up (and closes what an
** abandoned open opened).
**
** fs.open_beneath is the one operation that is ours, not libuv's: it
** resolves, opens, stats and (for a small file) reads in one trip to the
** pool, where a static file server would otherwise make four or five;
** each trip is two thread switches, which cost more than the disk work
** for a file in the page cache.
*/
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <unistd.h>
#ifdef SYS_openat2
#include <linux/openat2.h>
#endif

#include "luahost.h"

#define FILE_TNAME "file"

/* Bytes one file:read returns at most, whatever it asks for. */
#define MAXREAD (64 * 1024 * 1024)

/* What fs.open_beneath does on the pool thread, and what it found. */
typedef struct beneath {
  char *dir, *path;  /* dir, then path, in this allocation */
  int dirfd;         /* dir's descriptor (a dup on the pool), -1: by path */
  int64_t slurp;     /* read a regular file of at most this size whole
                        (-1: never) */
  int fd;            /* the file opened, -1 for none (or closed, slurped) */
  int err;           /* a libuv error, 0 for none */
  uv_stat_t st;      /* its size, mtime, mode and inode */
  dev_t dev;         /* its file system */
  char *data;        /* slurped: its bytes (st.st_size of them) */
} beneath;

typedef struct fs_req {
  union {
    uv_req_t any;              /* its type says which */
    uv_fs_t req;               /* a uv_fs_* operation */
    uv_work_t work;            /* open_beneath's, run by beneath_work */
  };
  lh_task *task;               /* NULL once the task stopped waiting */
  int abandoned;               /* counted in lh_H.fs_abandoned */
  int (*push)(lua_State *L);   /* the results, from the request */
  char *buf;                   /* read: where the bytes land */
  int ref;                     /* write: the string written, anchored */
  int flags;                   /* open: its flags */
  lh_file *file;               /* read, write, stat: the file it uses */
  int fileref;                 /* ... anchored while the pool has its fd */
  beneath *b;                  /* open_beneath's */
} fs_req;

static lh_file *checkfile(lua_State *L, int arg) {
  lh_file *f = lh_checkobj(L, arg, LH_TAG_FILE, FILE_TNAME);
  if (f->fd < 0)
    luaL_error(L, "attempt to use a closed file");
  return f;
}

static void beneath_free(beneath *b) {
  if (b->fd >= 0)
    close(b->fd);
  if (b->dirfd >= 0)
    close(b->dirfd);
  free(b->data);
  free(b);
}

/*
** The pool is done with r's file: a close that came meanwhile happens
** now. (A close must not free the number while a queued request holds
** it: the next open would take it, and the request would read that file.)
*/
static void let_go(fs_req *r) {
  lh_file *f = r->file;
  if (--f->pending == 0 && f->deferred >= 0) {
    close(f->deferred);
    f->deferred = -1;
  }
  luaL_unref(lh_H.L, LUA_REGISTRYINDEX, r->fileref);
}

static void req_free(fs_req *r) {
  if (r->any.type == UV_FS)
    uv_fs_req_cleanup(&r->req);
  else if (r->b != NULL)
    beneath_free(r->b);
  free(r->buf);
  if (lh_H.L != NULL) {  /* (else the file's memory is gone too) */
    luaL_unref(lh_H.L, LUA_REGISTRYINDEX, r->ref);
    if (r->file != NULL)
      let_go(r);
  }
  free(r);
}

/* r uses f (the userdata at idx) on the pool until it ends. */
static void hold(lua_State *L, fs_req *r, lh_file *f, int idx) {
  lua_pushvalue(L, idx);
  r->fileref = luaL_ref(L, LUA_REGISTRYINDEX);
  r->file = f;
  f->pending++;
}

/* The pushers: what each request returns, made under protection. */

static int push_true(lua_State *L) {
  lua_pushboolean(L, 1);
  return 1;
}

/* A new file for fd, -1 for one already closed. */
static void newfile(lua_State *L, int fd, int readonly) {
  lh_file *f = lua_newuserdatauv(L, sizeof *f, 0);
  f->tag = LH_TAG_FILE;
  f->fd = fd;
  f->readonly = readonly;
  f->pending = 0;
  f->deferred = -1;
  luaL_setmetatable(L, FILE_TNAME);
}

static int push_file(lua_State *L) {
  fs_req *r = lua_touserdata(L, 1);
  newfile(L, (int)r->req.result, (r->flags & O_ACCMODE) == O_RDONLY);
  r->req.result = -1;  /* the userdata owns it now */
  return 1;
}

static int push_bytes(lua_State *L) {
  fs_req *r = lua_touserdata(L, 1);
  lua_pushlstring(L, r->buf, (size_t)r->req.result);
  return 1;
}

static const char *kind_of(uint64_t mode) {
  switch (mode & S_IFMT) {
    case S_IFREG: return "file";
    case S_IFDIR: return "directory";
    case S_IFLNK: return "link";
    case S_IFIFO: return "fifo";
    case S_IFSOCK: return "socket";
    case S_IFCHR: return "char device";
    case S_IFBLK: return "block device";
    default: return "unknown";
  }
}

static void pushstat(lua_State *L, const uv_stat_t *st) {
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)st->st_size);
  lua_setfield(L, -2, "size");
  lua_pushnumber(L, (lua_Number)st->st_mtim.tv_sec +
                    (lua_Number)st->st_mtim.tv_nsec / 1e9);
  lua_setfield(L, -2, "mtime");
  lua_pushstring(L, kind_of(st->st_mode));
  lua_setfield(L, -2, "mode");
  lua_pushinteger(L, (lua_Integer)st->st_ino);
  lua_setfield(L, -2, "ino");
  lua_pushinteger(L, (lua_Integer)(st->st_mode & 07777));
  lua_setfield(L, -2, "perm");
}

static int push_stat(lua_State *L) {
  fs_req *r = lua_touserdata(L, 1);
  pushstat(L, &r->req.statbuf);
  return 1;
}

static int push_names(lua_State *L) {
  fs_req *r = lua_touserdata(L, 1);
  uv_dirent_t ent;
  int i = 0;
  lua_newtable(L);
  while (uv_fs_scandir_next(&r->req, &ent) != UV_EOF) {
    lua_pushstring(L, ent.name);
    lua_rawseti(L, -2, ++i);
  }
  return 1;
}

static int push_path(lua_State *L) {
  fs_req *r = lua_touserdata(L, 1);
  lua_pushstring(L, r->req.ptr);
  return 1;
}

/*
** The request ended: its task gets err (< 0), or the results r->push
** makes from ud. Nothing to do for a task that left, or at lua_close.
*/
static void complete(fs_req *r, int err, void *ud) {
  lh_task *t = r->task;
  int n;
  if (r->abandoned)
    lh_H.fs_abandoned--;
  if (t == NULL || lh_H.L == NULL)
    return;
  if (err < 0)
    lh_resume_err(t, err);
  else if ((n = lh_pushprotected(t, r->push, ud)) >= 0)
    lh_resume(t, n);
  else if (n == -1)
    lh_resume_err(t, UV_ENOMEM);
}

static void on_fs(uv_fs_t *req) {
  fs_req *r = (fs_req *)req;
  complete(r, req->result < 0 ? (int)req->result : 0, r);
  /* An open nobody took (the task left, or no memory for the file). */
  if (req->fs_type == UV_FS_OPEN && req->result >= 0) {
    uv_fs_t c;
    uv_fs_close(NULL, &c, (uv_file)req->result, NULL);
    uv_fs_req_cleanup(&c);
  }
  req_free(r);
}

static void cancel_fs(lh_task *t) {
  fs_req *r = t->wait.on;
  r->task = NULL;
  /* Still queued: it ends now. Else it runs on: counted, so that it keeps
     nothing alive (see main.c). */
  if (uv_cancel((uv_req_t *)&r->req) != 0) {
    r->abandoned = 1;
    lh_H.fs_abandoned++;
  }
}

static void describe_fs(lh_task *t, char *buf, size_t size) {
  fs_req *r = t->wait.on;
  const char *path = r->any.type == UV_FS ? r->req.path : r->b->path;
  snprintf(buf, size, "%s", path != NULL ? path : "");
}

static const lh_waitkind fs_kind = {"fs", cancel_fs, NULL, 0, describe_fs};

/* A request for the calling task, with push making its results. */
static fs_req *newreq(lua_State *L, lh_task **t, const char *what,
                      int (*push)(lua_State *L)) {
  fs_req *r;
  *t = lh_checktask_caller(L, what);
  r = calloc(1, sizeof *r);
  if (r == NULL)
    luaL_error(L, "not enough memory");
  r->push = push;
  r->ref = LUA_NOREF;
  return r;
}

/* Waits for r, which uv_fs_* started with err; frees r on failure. */
static int wait_fs(lua_State *L, lh_task *t, fs_req *r, int err) {
  if (err < 0) {
    req_free(r);
    return lh_pusherror(L, err);
  }
  r->task = t;
  return lh_wait(L, t, &fs_kind, r, -1);
}

/* io.open's modes, as open(2) flags; -1 for anything else. */
static int parse_flags(const char *m) {
  int flags;
  switch (*m++) {
    case 'r': flags = O_RDONLY; break;
    case 'w': flags = O_WRONLY | O_CREAT | O_TRUNC; break;
    case 'a': flags = O_WRONLY | O_CREAT | O_APPEND; break;
    default: return -1;
  }
  if (*m == '+') {
    flags = (flags & ~O_ACCMODE) | O_RDWR;
    m++;
  }
  if (*m == 'b')
    m++;
  return *m == '\0' ? flags | O_CLOEXEC : -1;
}

/* fs.open(path [, flags [, mode]]) → file */
static int fs_open(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  const char *m = luaL_optstring(L, 2, "r");
  lua_Integer mode = luaL_optinteger(L, 3, 0666);
  int flags = parse_flags(m);
  lh_task *t;
  fs_req *r;
  luaL_argcheck(L, flags >= 0, 2, "invalid mode");
  luaL_argcheck(L, mode >= 0 && mode <= 07777, 3, "mode out of range");
  r = newreq(L, &t, "open", push_file);
  r->flags = flags;
  return wait_fs(L, t, r, uv_fs_open(lh_H.loop, &r->req, path, flags,
                                     (int)mode, on_fs));
}

/* {======================================================
** fs.open_beneath
** ======================================================= */

#define BENEATH_FLAGS (O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)

/*
** Opens a real path (realpath's: no link in it) refusing any link, so
** that one swapped in since fails (ELOOP) instead of being followed.
*/
static int open_real(const char *real) {
#ifdef SYS_openat2
  struct open_how how;
  int fd;
  memset(&how, 0, sizeof how);
  how.flags = BENEATH_FLAGS;
  how.resolve = RESOLVE_NO_SYMLINKS;
  fd = (int)syscall(SYS_openat2, AT_FDCWD, real, &how, sizeof how);
  if (fd >= 0 || (errno != ENOSYS && errno != EPERM))
    return fd;
#endif
  return open(real, BENEATH_FLAGS | O_NOFOLLOW);  /* (the last name only) */
}

/*
** Opens b->path under b->dir through the real path of both: what the
** kernel cannot refuse for us (openat2 missing, or an absolute link that
** may still land inside dir). Returns the fd, or -1 with errno set.
*/
static int open_by_realpath(const beneath *b) {
  char *full, *real = NULL, *root = NULL;
  size_t n, dlen = strlen(b->dir);
  int fd = -1;
  full = malloc(dlen + strlen(b->path) + 2);
  if (full == NULL) {
    errno = ENOMEM;
    return -1;
  }
  sprintf(full, "%s/%s", b->dir, b->path);
  if ((real = realpath(full, NULL)) != NULL &&
      (root = realpath(b->dir, NULL)) != NULL) {
    n = strlen(root);
    if (strncmp(real, root, n) == 0 &&
        (real[n] == '\0' || real[n] == '/' || (n == 1 && root[0] == '/')))
      fd = open_real(real);
    else
      errno = EXDEV;
  }
  free(full);
  free(real);
  free(root);
  return fd;
}

#ifdef RESOLVE_CACHED
/* Whether the kernel knows RESOLVE_CACHED (Linux 5.12). */
static int resolve_cached = 1;
#else
#define RESOLVE_CACHED 0
static const int resolve_cached = 0;
#endif

/*
** Opens b->path under b->dir; -1 with errno set (EXDEV: outside). With
** cached, only from the kernel's lookup cache: EAGAIN for anything that
** needs the disk (or a realpath), as io_uring tries a request inline.
*/
static int open_beneath(const beneath *b, int cached) {
#ifdef SYS_openat2
  struct open_how how;
  int dirfd = b->dirfd, fd, e;
  memset(&how, 0, sizeof how);
  how.flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
  how.resolve = cached ? RESOLVE_CACHED : 0;
  if (dirfd < 0)
    dirfd = (int)syscall(SYS_openat2, AT_FDCWD, b->dir, &how, sizeof how);
  if (dirfd < 0) {
    e = errno;
    if (e == ENOSYS || e == EPERM || e == EINVAL)
      goto fallback;
    return -1;
  }
  how.flags = BENEATH_FLAGS;
  how.resolve |= RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  fd = (int)syscall(SYS_openat2, dirfd, b->path[0] ? b->path : ".", &how,
                    sizeof how);
  e = errno;
  if (b->dirfd < 0)
    close(dirfd);
  /* openat2 not there (an old kernel, a seccomp filter), or an absolute
     link, which RESOLVE_BENEATH refuses even when it points inside. */
  if (fd >= 0 || (e != ENOSYS && e != EPERM && e != EXDEV)) {
    errno = e;
    return fd;
  }
fallback:
  if (cached && e == EINVAL)
    resolve_cached = 0;  /* a kernel before 5.12 */
#endif
  if (cached) {
    errno = EAGAIN;
    return -1;
  }
  return open_by_realpath(b);
}

/*
** A file system that keeps its files in memory (tmpfs, ramfs): it refuses
** RWF_NOWAIT (EOPNOTSUPP), and has no disk to wait for. The last one met
** is remembered (only the loop asks): one fstatfs per device, not per file.
*/
static dev_t memory_dev;
static int memory_dev_known;

static int in_memory(const beneath *b) {
  struct statfs sfs;
  if (memory_dev_known && b->dev == memory_dev)
    return 1;
  if (fstatfs(b->fd, &sfs) < 0 ||
      (sfs.f_type != TMPFS_MAGIC && sfs.f_type != RAMFS_MAGIC))
    return 0;
  memory_dev = b->dev;
  memory_dev_known = 1;
  return 1;
}

/* Reads b's file whole, into b->data; with cached, only from the page
   cache (0: it is not all there). */
static int slurp(beneath *b, int cached) {
  size_t size = (size_t)b->st.st_size, got = 0;
  ssize_t n;
  struct iovec iov;
  int flags = cached ? RWF_NOWAIT : 0;
  if (cached && memory_dev_known && b->dev == memory_dev)
    flags = 0;
  b->data = malloc(size > 0 ? size : 1);
  if (b->data == NULL)
    return !cached;  /* (then the caller reads it) */
  while (got < size) {
    iov.iov_base = b->data + got;
    iov.iov_len = size - got;
    n = preadv2(b->fd, &iov, 1, (off_t)got, flags);
    if (n > 0)
      got += (size_t)n;
    else if (n < 0 && errno == EINTR)
      continue;
    else if (n < 0 && errno == EOPNOTSUPP && flags != 0 && in_memory(b)) {
      flags = 0;
      continue;
    }
    else if (cached || n < 0) {  /* not all cached; or EIO, say */
      if (!cached)
        b->err = uv_translate_sys_error(errno);
      free(b->data);
      b->data = NULL;
      if (cached)
        return 0;
      break;
    } else
      break;
  }
  b->st.st_size = got;  /* (a file that shrank meanwhile: what was there) */
  close(b->fd);
  b->fd = -1;
  return 1;
}

/*
** Opens, stats and, for a small file, reads b's file. 1 when done (with
** b->err set on failure); with cached, 0 when the disk (or a realpath)
** is needed: nothing was kept.
*/
static int beneath_run(beneath *b, int cached) {
  struct stat st;
  b->fd = open_beneath(b, cached);
  if (b->fd < 0 && cached && errno == EAGAIN)
    return 0;
  if (b->fd < 0 || fstat(b->fd, &st) < 0) {
    b->err = uv_translate_sys_error(errno);
    if (b->fd >= 0)
      close(b->fd);
    b->fd = -1;
    return 1;
  }
  b->st.st_size = (uint64_t)st.st_size;
  b->st.st_mode = (uint64_t)st.st_mode;
  b->st.st_ino = (uint64_t)st.st_ino;
  b->st.st_mtim.tv_sec = st.st_mtim.tv_sec;
  b->st.st_mtim.tv_nsec = st.st_mtim.tv_nsec;
  b->dev = st.st_dev;
  if (S_ISREG(st.st_mode) && (int64_t)st.st_size <= b->slurp &&
      !slurp(b, cached)) {
    close(b->fd);
    b->fd = -1;
    return 0;
  }
  return 1;
}

static void beneath_work(uv_work_t *w) {
  beneath_run(((fs_req *)w)->b, 0);
}

static int push_beneath(lua_State *L) {
  beneath *b = lua_touserdata(L, 1);
  newfile(L, b->fd, 1);
  b->fd = -1;  /* the userdata owns it now */
  pushstat(L, &b->st);
  if (b->data != NULL)
    lua_pushlstring(L, b->data, (size_t)b->st.st_size);
  else
    lua_pushnil(L);
  return 3;
}

static void on_beneath(uv_work_t *w, int status) {
  fs_req *r = (fs_req *)w;
  complete(r, status < 0 ? status : r->b->err, r->b);
  req_free(r);  /* (closes what nobody took) */
}

/*
** The results of a beneath done on the loop, or an error; b's memory
** goes (the file's fd to the userdata), even when that raises.
*/
static int push_done(lua_State *L, beneath *b) {
  int err = b->err, status;
  if (err < 0)
    return lh_pusherror(L, err);
  lua_pushcfunction(L, push_beneath);
  lua_pushlightuserdata(L, b);
  status = lua_pcall(L, 1, 3, 0);
  if (b->fd >= 0)
    close(b->fd);
  free(b->data);
  if (status != LUA_OK)
    return lua_error(L);
  return 3;
}

/*
** fs.open_beneath(dir, path [, slurp]) → file, stat, data: opens path,
** relative to dir (a path, or a file open on a directory), for reading;
** fails with EXDEV when its resolution (links included) leaves dir. A
** regular file of at most slurp bytes is read whole into data and already
** closed. What the kernel has in memory is done at once, on the loop;
** the rest in one trip to the pool.
*/
static int fs_open_beneath(lua_State *L) {
  size_t dlen, plen;
  char procdir[32];
  lh_file *df = NULL;
  const char *dir, *path = luaL_checklstring(L, 2, &plen);
  lua_Integer n = luaL_optinteger(L, 3, -1);  /* -1: none */
  lh_task *t;
  fs_req *r;
  beneath *b, quick;
  if (lua_type(L, 1) == LUA_TSTRING) {
    dir = lua_tolstring(L, 1, &dlen);
    luaL_argcheck(L, strlen(dir) == dlen, 1, "embedded zero");
  } else {
    if (lua_type(L, 1) != LUA_TUSERDATA)
      luaL_typeerror(L, 1, "string or file");
    df = lh_checkobj(L, 1, LH_TAG_FILE, FILE_TNAME);
    luaL_argcheck(L, df->fd >= 0, 1, "attempt to use a closed file");
    dlen = (size_t)snprintf(procdir, sizeof procdir, "/proc/self/fd/%d",
                            df->fd);
    dir = procdir;  /* (for a real path, and so.tasks) */
  }
  luaL_argcheck(L, strlen(path) == plen, 2, "embedded zero");
  luaL_argcheck(L, n <= MAXREAD, 3, "too large (64 MiB at most)");
  t = lh_checktask_caller(L, "open_beneath");
  if (path[0] == '/')  /* (as RESOLVE_BENEATH has it; not joined to dir) */
    return lh_pusherror(L, UV_EXDEV);
  memset(&quick, 0, sizeof quick);
  quick.dir = (char *)dir;
  quick.dirfd = df != NULL ? df->fd : -1;
  quick.path = (char *)path;
  quick.slurp = n < 0 ? -1 : (int64_t)n;
  if (resolve_cached && !lh_expired(t) && beneath_run(&quick, 1))
    return push_done(L, &quick);
  r = newreq(L, &t, "open_beneath", push_beneath);
  b = malloc(sizeof *b + sizeof procdir + dlen + plen + 2);
  if (b == NULL) {
    req_free(r);
    return luaL_error(L, "not enough memory");
  }
  *b = quick;
  b->dirfd = -1;
  r->any.type = UV_WORK;  /* (for req_free, before uv_queue_work) */
  r->b = b;
  /* The pool's own descriptor of dir: a file closed meanwhile cannot hand
     its number to another file under the pool thread's feet. */
  if (df != NULL) {
    b->dirfd = fcntl(df->fd, F_DUPFD_CLOEXEC, 0);
    if (b->dirfd < 0)
      return wait_fs(L, t, r, uv_translate_sys_error(errno));
    dlen = (size_t)snprintf(procdir, sizeof procdir, "/proc/self/fd/%d",
                            b->dirfd);
  }
  b->dir = (char *)(b + 1);
  memcpy(b->dir, dir, dlen + 1);
  b->path = b->dir + dlen + 1;
  memcpy(b->path, path, plen + 1);
  return wait_fs(L, t, r, uv_queue_work(lh_H.loop, &r->work, beneath_work,
                                        on_beneath));
}

/* }====================================================== */


/* file:read(n [, offset]) → string, "" at the end */
static int file_read(lua_State *L) {
  lh_file *f = checkfile(L, 1);
  lua_Integer n = luaL_checkinteger(L, 2);
  lua_Integer off = luaL_optinteger(L, 3, -1);
  lh_task *t;
  fs_req *r;
  uv_buf_t b;
  luaL_argcheck(L, n >= 0, 2, "negative count");
  luaL_argcheck(L, off >= -1, 3, "negative offset");
  if (n > MAXREAD)
    n = MAXREAD;
  r = newreq(L, &t, "read", push_bytes);
  r->buf = malloc(n > 0 ? (size_t)n : 1);
  if (r->buf == NULL) {
    req_free(r);
    return luaL_error(L, "not enough memory");
  }
  b = uv_buf_init(r->buf, (unsigned)n);
  hold(L, r, f, 1);
  return wait_fs(L, t, r, uv_fs_read(lh_H.loop, &r->req, f->fd, &b, 1,
                                     (int64_t)off, on_fs));
}

/* file:write(data [, offset]) → true */
static int file_write(lua_State *L) {
  lh_file *f = checkfile(L, 1);
  size_t len;
  const char *p = luaL_checklstring(L, 2, &len);
  lua_Integer off = luaL_optinteger(L, 3, -1);
  lh_task *t;
  fs_req *r;
  uv_buf_t b;
  luaL_argcheck(L, off >= -1, 3, "negative offset");
  luaL_argcheck(L, len <= UINT32_MAX, 2, "string too long");
  r = newreq(L, &t, "write", push_true);
  lua_pushvalue(L, 2);  /* the thread pool reads it: anchor it */
  r->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  b = uv_buf_init((char *)p, (unsigned)len);
  hold(L, r, f, 1);
  return wait_fs(L, t, r, uv_fs_write(lh_H.loop, &r->req, f->fd, &b, 1,
                                      (int64_t)off, on_fs));
}

/* file:stat() */
static int file_stat(lua_State *L) {
  lh_file *f = checkfile(L, 1);
  lh_task *t;
  fs_req *r = newreq(L, &t, "stat", push_stat);
  hold(L, r, f, 1);
  return wait_fs(L, t, r, uv_fs_fstat(lh_H.loop, &r->req, f->fd, on_fs));
}

static void on_close_unwaited(uv_fs_t *req) {
  uv_fs_req_cleanup(req);
  free(req);
}

/* Closes fd on the pool, with nobody waiting (a quick close here when
   there is no memory for the request). */
static void close_unwaited(int fd) {
  uv_fs_t *req = malloc(sizeof *req);
  if (req == NULL || uv_fs_close(lh_H.loop, req, fd, on_close_unwaited) < 0) {
    uv_fs_t c;
    free(req);
    uv_fs_close(NULL, &c, fd, NULL);
    uv_fs_req_cleanup(&c);
  }
}

/*
** file:close() → true; a closed file is closed again without error. A
** file opened for reading has nothing to write back, hence no error to
** report and no disk to wait for: it is closed at once, as nginx does.
*/
static int file_close(lua_State *L) {
  lh_file *f = lh_checkobj(L, 1, LH_TAG_FILE, FILE_TNAME);
  int fd = f->fd;
  lh_task *t;
  fs_req *r;
  if (fd >= 0 && f->readonly) {
    f->fd = -1;
    if (f->pending > 0)
      f->deferred = fd;  /* after the requests that hold it */
    else
      close(fd);
  }
  if (f->fd < 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  r = newreq(L, &t, "close", push_true);  /* (may raise: fd still ours) */
  f->fd = -1;
  return wait_fs(L, t, r, uv_fs_close(lh_H.loop, &r->req, fd, on_fs));
}

/* __gc and __close: a finalizer cannot wait. */
static int file_gc(lua_State *L) {
  lh_file *f = lua_touserdata(L, 1);
  if (f == NULL || lua_rawlen(L, 1) != sizeof *f || f->tag != LH_TAG_FILE)
    return 0;
  if (f->deferred >= 0) {  /* (only at lua_close) */
    close_unwaited(f->deferred);
    f->deferred = -1;
  }
  if (f->fd < 0)
    return 0;
  if (f->readonly && f->pending == 0)
    close(f->fd);
  else  /* (pending only at lua_close: the pool's queue goes in order) */
    close_unwaited(f->fd);
  f->fd = -1;
  return 0;
}

/* fs.type(x) → "file", "closed file", or nil: as io.type. */
static int fs_type(lua_State *L) {
  lh_file *f;
  luaL_checkany(L, 1);
  f = lua_touserdata(L, 1);
  if (lua_type(L, 1) != LUA_TUSERDATA || lua_rawlen(L, 1) != sizeof *f ||
      f->tag != LH_TAG_FILE)
    lua_pushnil(L);
  else
    lua_pushstring(L, f->fd >= 0 ? "file" : "closed file");
  return 1;
}

static int file_tostring(lua_State *L) {
  lh_file *f = lh_checkobj(L, 1, LH_TAG_FILE, FILE_TNAME);
  if (f->fd < 0)
    lua_pushliteral(L, "file (closed)");
  else
    lua_pushfstring(L, "file (%d)", f->fd);
  return 1;
}

/* The uv_fs_* operations on one path, with nothing else to pass. */
typedef int (*path_op)(uv_loop_t *loop, uv_fs_t *req, const char *path,
                       uv_fs_cb cb);

/* fs.<what>(path): op on it, push making the results. */
static int on_path(lua_State *L, const char *what, path_op op,
                   int (*push)(lua_State *L)) {
  const char *path = luaL_checkstring(L, 1);
  lh_task *t;
  fs_req *r = newreq(L, &t, what, push);
  return wait_fs(L, t, r, op(lh_H.loop, &r->req, path, on_fs));
}

/* fs.stat(path), fs.lstat(path) */
static int fs_stat(lua_State *L) {
  return on_path(L, "stat", uv_fs_stat, push_stat);
}

static int fs_lstat(lua_State *L) {
  return on_path(L, "lstat", uv_fs_lstat, push_stat);
}

/* fs.readdir(path) → the names in it, without "." and ".." */
static int fs_readdir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lh_task *t;
  fs_req *r = newreq(L, &t, "readdir", push_names);
  return wait_fs(L, t, r, uv_fs_scandir(lh_H.loop, &r->req, path, 0, on_fs));
}

static int fs_realpath(lua_State *L) {
  return on_path(L, "realpath", uv_fs_realpath, push_path);
}

static int fs_unlink(lua_State *L) {
  return on_path(L, "unlink", uv_fs_unlink, push_true);
}

static int fs_rename(lua_State *L) {
  const char *from = luaL_checkstring(L, 1);
  const char *to = luaL_checkstring(L, 2);
  lh_task *t;
  fs_req *r = newreq(L, &t, "rename", push_true);
  return wait_fs(L, t, r, uv_fs_rename(lh_H.loop, &r->req, from, to, on_fs));
}

static int fs_mkdir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lua_Integer mode = luaL_optinteger(L, 2, 0777);
  lh_task *t;
  fs_req *r;
  luaL_argcheck(L, mode >= 0 && mode <= 07777, 2, "mode out of range");
  r = newreq(L, &t, "mkdir", push_true);
  return wait_fs(L, t, r, uv_fs_mkdir(lh_H.loop, &r->req, path, (int)mode,
                                      on_fs));
}

static const luaL_Reg fs_funcs[] = {
  {"open", fs_open},
  {"open_beneath", fs_open_beneath},
  {"stat", fs_stat},
  {"lstat", fs_lstat},
  {"readdir", fs_readdir},
  {"realpath", fs_realpath},
  {"unlink", fs_unlink},
  {"rename", fs_rename},
  {"mkdir", fs_mkdir},
  {"sendfile", lh_fs_sendfile},
  {"type", fs_type},
  {NULL, NULL}
};

static const luaL_Reg file_methods[] = {
  {"read", file_read},
  {"write", file_write},
  {"stat", file_stat},
  {"close", file_close},
  {NULL, NULL}
};

static const luaL_Reg file_meta[] = {
  {"__gc", file_gc},
  {"__close", file_gc},
  {"__tostring", file_tostring},
  {NULL, NULL}
};

int luaopen_so_fs(lua_State *L) {
  luaL_newmetatable(L, FILE_TNAME);
  luaL_setfuncs(L, file_meta, 0);
  luaL_newlib(L, file_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newlib(L, fs_funcs);
  return 1;
}
