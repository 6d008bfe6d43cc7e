/*
** fs.c: the so.fs module, files through libuv's fs requests.
**
** Every operation is a uv_fs_* request run on libuv's thread pool; the
** task waits as it waits for a socket, and the request's callback resumes
** it on the loop. So the loop never blocks on a disk. A task that stops
** waiting (a timeout of so.deadline, so.cancel) leaves its request to
** finish on its own: the callback then only cleans up (and closes what an
** abandoned open opened).
*/
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "luahost.h"

#define FILE_TNAME "file"

/* Bytes one file:read returns at most, whatever it asks for. */
#define MAXREAD (64 * 1024 * 1024)

typedef struct lh_file {
  uint64_t tag;   /* LH_TAG_FILE */
  int fd;         /* -1 once closed */
} lh_file;

typedef struct fs_req {
  uv_fs_t req;
  lh_task *task;               /* NULL once the task stopped waiting */
  int abandoned;               /* counted in lh_H.fs_abandoned */
  int (*push)(lua_State *L);   /* the results, from the request */
  char *buf;                   /* read: where the bytes land */
  int ref;                     /* write: the string written, anchored */
} fs_req;

static lh_file *checkfile(lua_State *L, int arg) {
  lh_file *f = lh_checkobj(L, arg, LH_TAG_FILE, FILE_TNAME);
  if (f->fd < 0)
    luaL_error(L, "attempt to use a closed file");
  return f;
}

static void req_free(fs_req *r) {
  uv_fs_req_cleanup(&r->req);
  free(r->buf);
  if (lh_H.L != NULL)
    luaL_unref(lh_H.L, LUA_REGISTRYINDEX, r->ref);
  free(r);
}

/* The pushers: what each request returns, made under protection. */

static int push_true(lua_State *L) {
  lua_pushboolean(L, 1);
  return 1;
}

static int push_file(lua_State *L) {
  fs_req *r = lua_touserdata(L, 1);
  lh_file *f = lua_newuserdatauv(L, sizeof *f, 0);
  f->tag = LH_TAG_FILE;
  f->fd = (int)r->req.result;
  r->req.result = -1;  /* the userdata owns it now */
  luaL_setmetatable(L, FILE_TNAME);
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

static int push_stat(lua_State *L) {
  fs_req *r = lua_touserdata(L, 1);
  const uv_stat_t *st = &r->req.statbuf;
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

static void on_fs(uv_fs_t *req) {
  fs_req *r = (fs_req *)req;
  lh_task *t = r->task;
  int n;
  if (r->abandoned)
    lh_H.fs_abandoned--;
  if (t != NULL && lh_H.L != NULL) {
    if (req->result < 0)
      lh_resume_err(t, (int)req->result);
    else if ((n = lh_pushprotected(t, r->push, r)) >= 0)
      lh_resume(t, n);
    else if (n == -1)
      lh_resume_err(t, UV_ENOMEM);
  }
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
  const char *path = r->req.path;
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
  return wait_fs(L, t, r, uv_fs_open(lh_H.loop, &r->req, path, flags,
                                     (int)mode, on_fs));
}

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
  return wait_fs(L, t, r, uv_fs_write(lh_H.loop, &r->req, f->fd, &b, 1,
                                      (int64_t)off, on_fs));
}

/* file:stat() */
static int file_stat(lua_State *L) {
  lh_file *f = checkfile(L, 1);
  lh_task *t;
  fs_req *r = newreq(L, &t, "stat", push_stat);
  return wait_fs(L, t, r, uv_fs_fstat(lh_H.loop, &r->req, f->fd, on_fs));
}

/* file:close() → true; a closed file is closed again without error. */
static int file_close(lua_State *L) {
  lh_file *f = lh_checkobj(L, 1, LH_TAG_FILE, FILE_TNAME);
  int fd = f->fd;
  lh_task *t;
  fs_req *r;
  if (fd < 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  r = newreq(L, &t, "close", push_true);  /* (may raise: fd still ours) */
  f->fd = -1;
  return wait_fs(L, t, r, uv_fs_close(lh_H.loop, &r->req, fd, on_fs));
}

static void on_gc_close(uv_fs_t *req) {
  uv_fs_req_cleanup(req);
  free(req);
}

/*
** __gc and __close: closes without waiting (a finalizer cannot wait):
** the close runs on the thread pool, nobody waits for it.
*/
static int file_gc(lua_State *L) {
  lh_file *f = lua_touserdata(L, 1);
  uv_fs_t *req;
  if (f == NULL || lua_rawlen(L, 1) != sizeof *f || f->tag != LH_TAG_FILE ||
      f->fd < 0)
    return 0;
  req = malloc(sizeof *req);
  if (req == NULL || uv_fs_close(lh_H.loop, req, f->fd, on_gc_close) < 0) {
    uv_fs_t c;  /* no memory: close here, it is quick for a file */
    free(req);
    uv_fs_close(NULL, &c, f->fd, NULL);
    uv_fs_req_cleanup(&c);
  }
  f->fd = -1;
  return 0;
}

static int file_tostring(lua_State *L) {
  lh_file *f = lh_checkobj(L, 1, LH_TAG_FILE, FILE_TNAME);
  if (f->fd < 0)
    lua_pushliteral(L, "file (closed)");
  else
    lua_pushfstring(L, "file (%d)", f->fd);
  return 1;
}

/* fs.stat(path), fs.lstat(path) */
static int fs_stat(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lh_task *t;
  fs_req *r = newreq(L, &t, "stat", push_stat);
  return wait_fs(L, t, r, uv_fs_stat(lh_H.loop, &r->req, path, on_fs));
}

static int fs_lstat(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lh_task *t;
  fs_req *r = newreq(L, &t, "lstat", push_stat);
  return wait_fs(L, t, r, uv_fs_lstat(lh_H.loop, &r->req, path, on_fs));
}

/* fs.readdir(path) → the names in it, without "." and ".." */
static int fs_readdir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lh_task *t;
  fs_req *r = newreq(L, &t, "readdir", push_names);
  return wait_fs(L, t, r, uv_fs_scandir(lh_H.loop, &r->req, path, 0, on_fs));
}

static int fs_realpath(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lh_task *t;
  fs_req *r = newreq(L, &t, "realpath", push_path);
  return wait_fs(L, t, r, uv_fs_realpath(lh_H.loop, &r->req, path, on_fs));
}

static int fs_unlink(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lh_task *t;
  fs_req *r = newreq(L, &t, "unlink", push_true);
  return wait_fs(L, t, r, uv_fs_unlink(lh_H.loop, &r->req, path, on_fs));
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
  {"stat", fs_stat},
  {"lstat", fs_lstat},
  {"readdir", fs_readdir},
  {"realpath", fs_realpath},
  {"unlink", fs_unlink},
  {"rename", fs_rename},
  {"mkdir", fs_mkdir},
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
