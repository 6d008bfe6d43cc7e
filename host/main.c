/*
** main.c: the luahost program. Sets up Lua and libuv, runs the script as
** the first task, runs the loop until nothing is left to do, and tears
** everything down in an order that no callback can outlive.
*/
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>

#include <lualib.h>

#include "luahost.h"

#ifndef LUAHOST_SOURCE_LUADIR
#define LUAHOST_SOURCE_LUADIR ""
#endif

static const char *progname = "luahost";

static void usage(FILE *f) {
  fprintf(f,
          "usage: %s [options] script [args]\n"
          "Runs a Lua script as the first task of an event loop.\n"
          "Options:\n"
          "  --max-memory SIZE  cap the Lua heap (bytes, or with K, M, G)\n"
          "  --log-level LEVEL  debug, info (default), warn or error\n"
          "  --drain SECONDS    how long a drain may take (default 3)\n"
          "  --workers N        N worker processes (or auto: one per CPU)\n"
          "  --task-budget SECONDS  stop a task that runs that long without\n"
          "                     waiting (default: off)\n"
          "  --help             show this help and exit\n"
          "  --version          show version information and exit\n"
          "  --                 stop handling options\n",
          progname);
}

/*
** Descriptors are connections: take all the kernel allows us.
*/
static void raise_fd_limit(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

/*
** package.path: the host's own Lua modules first, then what Lua itself
** searches (LUA_PATH or Debian's default), so Debian's modules are found.
** The host's own: next to the binary, as installed ("../share/luahost/lua",
** wherever the tree was moved), or else, for a binary in its build tree,
** the source tree it was built from. An installed host never looks at a
** source tree or at the prefix it was configured for.
*/
static void set_path(lua_State *L) {
  char exe[4096], dir[4096 + 32];
  size_t len = sizeof exe;
  char *slash;
  uv_fs_t req;
  const char *own = LUAHOST_SOURCE_LUADIR;
  if (uv_exepath(exe, &len) == 0 && (slash = strrchr(exe, '/')) != NULL) {
    *slash = '\0';
    snprintf(dir, sizeof dir, "%s/../share/luahost/lua", exe);
    if (uv_fs_realpath(NULL, &req, dir, NULL) == 0 &&
        strlen(req.ptr) < sizeof dir) {
      strcpy(dir, req.ptr);
      own = dir;
    }
    uv_fs_req_cleanup(&req);
  }
  lua_getglobal(L, "package");
  lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", own, own);
  lua_getfield(L, -2, "path");
  lua_concat(L, 2);
  lua_setfield(L, -2, "path");
  lua_pop(L, 1);
}

/*
** arg, as lua.c sets it: arg[0] the script, arg[1..] its arguments, and
** negative indices for the interpreter and its options.
*/
static void set_arg(lua_State *L, char **argv, int argc, int script) {
  int i;
  lua_createtable(L, argc - script - 1, script + 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - script);
  }
  lua_setglobal(L, "arg");
}


static void close_handle(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h))
    uv_close(h, NULL);
}

/*
** lua_close first: every conn's and task's __gc starts uv_close, and from
** then on callbacks see lh_H.L == NULL and only free memory. Then what
** remains (the host's own handles) is closed, and the loop runs until all
** close callbacks are done.
*/
static void teardown(lua_State *L) {
  /* The host is ending: a signal now (a second SIGTERM racing the exit)
     must not turn the exit status into a death by signal. */
  signal(SIGTERM, SIG_IGN);
  signal(SIGINT, SIG_IGN);
  signal(SIGQUIT, SIG_IGN);
  lh_H.L = NULL;
  lh_H.ready_head = lh_H.ready_tail = NULL;
  lua_close(L);
  lh_sched_close();
  lh_sendfile_close();
  uv_walk(lh_H.loop, close_handle, NULL);
  /* A uv_stop before (the script raised) would end this run at once: a
     first run clears it, the second runs the close callbacks. */
  uv_run(lh_H.loop, UV_RUN_NOWAIT);
  if (lh_H.fs_abandoned > 0)
    return;  /* main exits without waiting for the pool: see below */
  uv_run(lh_H.loop, UV_RUN_DEFAULT);
  if (uv_loop_close(lh_H.loop) != 0)  /* a handle outlived its owner */
    fprintf(stderr, "%s: internal error: handles left open at exit\n",
            progname);
}

/*
** Before each poll: when nothing but abandoned fs requests keeps the loop
** alive (a FIFO's open that no writer will ever end, its task long gone),
** the script is done: the loop stops instead of waiting on them.
*/
static uv_prepare_t abandoned_check;

static void on_prepare(uv_prepare_t *p) {
  uv_loop_t *loop = p->loop;
  if (lh_H.fs_abandoned > 0 && loop->active_handles == 0 &&
      loop->active_reqs.count == (unsigned)lh_H.fs_abandoned)
    uv_stop(loop);
}

static int report_load_error(lua_State *L) {
  fprintf(stderr, "%s: %s\n", progname, lua_tostring(L, -1));
  fflush(stderr);
  return 1;
}

/*
** A size: digits with an optional K, M or G (powers of 1024); 0 if bad.
*/
static size_t parse_size(const char *s) {
  char *end;
  unsigned long long n = strtoull(s, &end, 10);
  int shift = 0;
  if (end == s || s[0] == '-')
    return 0;
  switch (*end) {
    case 'K': case 'k': shift = 10; end++; break;
    case 'M': case 'm': shift = 20; end++; break;
    case 'G': case 'g': shift = 30; end++; break;
  }
  if (*end != '\0' || n > (SIZE_MAX >> shift))
    return 0;
  return (size_t)n << shift;
}

/* A number of seconds, at least min; 0 if bad. */
static int parse_seconds(const char *s, double min, double *out) {
  char *end;
  double v = strtod(s, &end);
  if (end == s || *end != '\0' || !(v >= min && v < 1e9))
    return 0;
  *out = v;
  return 1;
}

/* An option's value is missing or wrong: say what it wants; exit 2. */
static int bad_value(const char *opt, const char *wants) {
  fprintf(stderr, "%s: %s wants %s\n", progname, opt, wants);
  return 2;
}

int main(int argc, char **argv) {
  lua_State *L;
  int script = 1, nargs, i, status;
  size_t max_memory = 0;
  double task_budget = 0;
  int workers = 0;

  while (script < argc && argv[script][0] == '-' &&
         argv[script][1] != '\0') {  /* "-" is a script: stdin */
    const char *opt = argv[script];
    const char *val = script + 1 < argc ? argv[script + 1] : NULL;
    if (strcmp(opt, "--") == 0) {
      script++;
      break;
    } else if (strcmp(opt, "--version") == 0) {
      printf("%s (%s, libuv %s)\n", LUAHOST_VERSION, LUA_RELEASE,
             uv_version_string());
      return 0;
    } else if (strcmp(opt, "--max-memory") == 0) {
      if (val == NULL || (max_memory = parse_size(val)) == 0)
        return bad_value(opt, "a size (e.g. 64M)");
      script += 2;
      continue;
    } else if (strcmp(opt, "--task-budget") == 0) {
      if (val == NULL || !parse_seconds(val, 0.01, &task_budget))
        return bad_value(opt, "seconds (at least 0.01)");
      script += 2;
      continue;
    } else if (strcmp(opt, "--workers") == 0) {
      workers = val == NULL ? 0 : strcmp(val, "auto") == 0
                ? (int)uv_available_parallelism() : atoi(val);
      if (workers < 1 || workers > 256)
        return bad_value(opt, "a number from 1 to 256, or auto");
      /* The workers get the same command line, less this option. */
      memmove(argv + script, argv + script + 2,
              (size_t)(argc - script - 1) * sizeof *argv);
      argc -= 2;
      continue;
    } else if (strcmp(opt, "--drain") == 0) {
      double s;
      if (val == NULL || !parse_seconds(val, 0, &s))
        return bad_value(opt, "seconds (e.g. 3)");
      lh_drain_ms = (int64_t)(s * 1000);
      script += 2;
      continue;
    } else if (strcmp(opt, "--log-level") == 0) {
      if (val == NULL || (lh_log_level = lh_log_parse(val)) < 0)
        return bad_value(opt, "debug, info, warn or error");
      script += 2;
      continue;
    } else if (strcmp(opt, "--help") == 0 || strcmp(opt, "-h") == 0) {
      usage(stdout);
      return 0;
    } else {
      fprintf(stderr, "%s: unknown option '%s'\n", progname, opt);
      usage(stderr);
      return 2;
    }
  }
  if (script >= argc) {
    usage(stderr);
    return 2;
  }

  raise_fd_limit();
  if (workers > 0)
    return lh_supervise(workers, argv);
  lh_worker_init();
  signal(SIGPIPE, SIG_IGN);  /* a write to a reset conn returns EPIPE */
  /* Freed read strings (up to 256 KiB) must not be trimmed back to the
     kernel and faulted in again on every bulk read. */
  mallopt(M_TRIM_THRESHOLD, 4 << 20);
  mallopt(M_MMAP_THRESHOLD, 1 << 20);

  lh_H.loop = uv_default_loop();
  L = lh_newstate(max_memory);
  if (L == NULL) {
    fprintf(stderr, "%s: cannot create the Lua state\n", progname);
    return 1;
  }
  lh_H.L = L;
  memset(lua_getextraspace(L), 0, LUA_EXTRASPACE);  /* not a task */
  luaL_openlibs(L);
  lh_coro_open(L);
  set_path(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_so);
  lua_setfield(L, -2, "so");
  lua_pushcfunction(L, luaopen_so_tls);
  lua_setfield(L, -2, "so.tls");
  lua_pushcfunction(L, luaopen_so_fs);
  lua_setfield(L, -2, "so.fs");
  lua_pushcfunction(L, luaopen_so_zlib);
  lua_setfield(L, -2, "so.zlib");
  lua_pop(L, 1);
  set_arg(L, argv, argc, script);
  lh_error_init(L);
  lh_sched_init(L);
  lh_task_init(L);
  lh_drain_init(L);
  lh_idle_gc_init();
  if (task_budget > 0 && lh_guard_start(task_budget) != 0) {
    fprintf(stderr, "%s: cannot start the task guard\n", progname);
    teardown(L);
    return 1;
  }

  /* "-": the standard input, as lua.c has it */
  status = luaL_loadfile(L, strcmp(argv[script], "-") == 0 ? NULL
                                                            : argv[script]);
  if (status != LUA_OK) {
    status = report_load_error(L);
    teardown(L);
    return status;
  }
  nargs = argc - script - 1;
  luaL_checkstack(L, nargs, "too many arguments to script");
  for (i = script + 1; i < argc; i++)
    lua_pushstring(L, argv[i]);


  lh_spawn_main(L, nargs);
  lh_worker_ready();
  uv_prepare_init(lh_H.loop, &abandoned_check);
  uv_prepare_start(&abandoned_check, on_prepare);
  uv_unref((uv_handle_t *)&abandoned_check);
  if (lh_H.exit_status == 0)
    uv_run(lh_H.loop, UV_RUN_DEFAULT);
  status = lh_H.exit_status;
  fflush(stdout);
  teardown(L);
  if (lh_H.fs_abandoned > 0) {
    /* A pool thread is stuck in a system call that may never return;
       exit() would join it (libuv's destructor): leave without. */
    fflush(NULL);
    _exit(status);
  }
  return status;
}
