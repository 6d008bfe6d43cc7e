/*
** sched.c: the scheduler. How a task lives (starts, runs, waits, is
** woken, ends or is cancelled), and the deadlines of its waits.
**
** A task runs until it waits. The C function that waits (so.read,
** so.accept, ...) registers the task with the object it waits on, fills
** the task's wait record (lh_wait) and yields the host's private marker,
** as cqueues does: a yield is the host's exactly when it yields that
** marker, whatever the coroutine or the task's state. The callback that
** completes the wait leaves the results on the task's stack and resumes
** it straight from the loop (depth 0), so a resume never nests inside
** another. Tasks woken from inside a running task (a close that ends
** another task's wait, a task that ends and wakes its joiners) go to the
** ready queue, run after the loop's next poll.
**
** Every wait yields with k_wait as its continuation, which turns the
** outcome into the function's results in the task itself (where an
** allocation may fail like any other), and which unwinds the task when it
** is resumed to be cancelled: it yields the cancel marker, every
** coroutine.resume on the way up closes the coroutine below it, and the
** scheduler closes the task's thread last, so <close> variables run from
** the innermost outwards.
**
** A plain coroutine.yield inside a task means "run me again on the next
** loop turn".
*/
#include <stdlib.h>
#include <string.h>

#include "luahost.h"

/* The markers the host yields; their addresses are what count. */
static const char yield_tags[3];

static lh_task *main_task;

/* Strings a task may be handed where nothing may be allocated. */
static int ref_cancelled = LUA_NOREF;

static void run(lh_task *t, int nargs, lua_State *from);


/* {======================================================
** Who calls
** ======================================================= */

/*
** The task whose own thread L is, or NULL. New threads copy the main
** thread's extra space, which main.c zeroes, so a script's own coroutines
** read as NULL here (coro.c tags them when a task resumes them).
*/
lh_task *lh_task_current(lua_State *L) {
  uintptr_t x = LH_EXTRA(L);
  return (x & LH_EXTRA_TAGS) ? NULL : (lh_task *)x;
}

lh_task *lh_task_caller(lua_State *L) {
  return (lh_task *)(LH_EXTRA(L) & ~LH_EXTRA_TAGS);
}

/*
** The task that calls a function that may wait, or an error. L is the
** task's thread, or a script's coroutine that a task resumed (coro.c
** passes its waits up). Waiting is only possible where the host can
** resume: not across a C boundary (a metamethod called from C,
** table.sort, a gsub callback, a __gc or __close handler) that would refuse
** the yield after the wait was registered.
*/
lh_task *lh_checktask_caller(lua_State *L, const char *what) {
  lh_task *t = lh_task_caller(L);
  if (lh_H.L == NULL)
    luaL_error(L, "%s: the host is shutting down", what);
  if (t == NULL)
    luaL_error(L, "%s: not in a task (call it from the script, from a "
               "function started by so.spawn, or from a coroutine one of "
               "them resumes)", what);
  if (!lua_isyieldable(L))
    luaL_error(L, "%s: cannot wait across a C call boundary "
               "(metamethod, iterator or C function)", what);
  return t;
}

/* LH_YIELD_WAIT or LH_YIELD_CANCEL if co yielded a marker, else PLAIN. */
int lh_yieldkind(lua_State *co, int nres) {
  if (nres == 1 && lua_islightuserdata(co, -1)) {
    const char *p = lua_touserdata(co, -1);
    if (p == &yield_tags[LH_YIELD_WAIT])
      return LH_YIELD_WAIT;
    if (p == &yield_tags[LH_YIELD_CANCEL])
      return LH_YIELD_CANCEL;
  }
  return LH_YIELD_PLAIN;
}

/* }====================================================== */


/* {======================================================
** Deadlines: one timer for every wait, over a binary heap ordered by
** (deadline, seq). A per-task uv_timer_t would cost 150 bytes a task and
** a handle to close; the heap costs a slot while the task waits.
** ======================================================= */

/*
** A heap entry: what orders it, by value (the task need not hold it), and
** the task, which holds its entry's index.
*/
typedef struct deadline_entry {
  int64_t deadline;   /* loop time (ms) */
  uint32_t seq;       /* when it entered the heap: orders equal deadlines */
  lh_task *task;
} deadline_entry;

static deadline_entry *heap;
static int heap_n, heap_cap;
static uint32_t heap_seq;   /* the next entry's seq */
static int64_t armed = -1;  /* what the timer is set for, -1 if stopped */

static void on_deadline(uv_timer_t *timer);

static int before(const deadline_entry *a, const deadline_entry *b) {
  if (a->deadline != b->deadline)
    return a->deadline < b->deadline;
  return (int32_t)(a->seq - b->seq) < 0;
}

static void heap_set(int i, deadline_entry e) {
  heap[i] = e;
  e.task->wait.heapidx = i;
}

static void sift_up(int i) {
  deadline_entry e = heap[i];
  while (i > 0 && before(&e, &heap[(i - 1) / 2])) {
    heap_set(i, heap[(i - 1) / 2]);
    i = (i - 1) / 2;
  }
  heap_set(i, e);
}

static void sift_down(int i) {
  deadline_entry e = heap[i];
  for (;;) {
    int c = 2 * i + 1;
    if (c >= heap_n)
      break;
    if (c + 1 < heap_n && before(&heap[c + 1], &heap[c]))
      c++;
    if (!before(&heap[c], &e))
      break;
    heap_set(i, heap[c]);
    i = c;
  }
  heap_set(i, e);
}

/*
** Sets the timer for the earliest deadline, unless it is set for earlier
** already (then it fires, finds nothing due, and sets itself again). At
** least 1 ms: a 0 ms timer started inside its own callback would be due
** again in the same timer pass, and starve the loop.
*/
static void arm(void) {
  int64_t d = heap[0].deadline, now = lh_now();
  if (armed >= 0 && armed <= d)
    return;
  uv_timer_start(&lh_H.deadline_timer, on_deadline,
                 (uint64_t)(d > now ? d - now : 1), 0);
  armed = d;
}

static int heap_insert(lh_task *t, int64_t deadline) {
  deadline_entry e;
  if (heap_n == heap_cap) {
    int cap = heap_cap ? heap_cap * 2 : 64;
    deadline_entry *h = realloc(heap, (size_t)cap * sizeof *h);
    if (h == NULL)
      return UV_ENOMEM;
    heap = h;
    heap_cap = cap;
  }
  e.deadline = deadline;
  e.seq = heap_seq++;
  e.task = t;
  heap_set(heap_n++, e);
  sift_up(heap_n - 1);
  if (heap[0].task == t)
    arm();
  return 0;
}

static void heap_remove(lh_task *t) {
  int i = t->wait.heapidx;
  t->wait.heapidx = -1;
  if (i < --heap_n) {
    deadline_entry last = heap[heap_n];
    heap_set(i, last);
    if (i > 0 && before(&last, &heap[(i - 1) / 2]))
      sift_up(i);
    else
      sift_down(i);
  }
  if (heap_n == 0 && armed >= 0) {  /* nothing left to keep the loop up */
    uv_timer_stop(&lh_H.deadline_timer);
    armed = -1;
  }
}

/* }====================================================== */


/* {======================================================
** Waiting and waking
** ======================================================= */

/* The wait is over: no object, no deadline. */
static void wait_end(lh_task *t) {
  t->wait.kind = NULL;
  t->wait.on = NULL;
  if (t->wait.heapidx >= 0)
    heap_remove(t);
}

/* The wait ends before its object completed it: the object forgets t. */
static void abandon(lh_task *t) {
  const lh_waitkind *kind = t->wait.kind;
  if (kind != NULL && kind->cancel != NULL)
    kind->cancel(t);
  wait_end(t);
}

/* The error a timed-out wait returns, with the wording that fits it. */
static int timeout_error(const lh_waitkind *kind) {
  return (kind->flags & LH_WAIT_NET) ? UV_ETIMEDOUT : LH_ETIMEDOUT;
}

static void expire(lh_task *t) {
  const lh_waitkind *kind = t->wait.kind;
  if ((kind->flags & LH_WAIT_ENDS) && !t->by_deadline) {
    lh_resume(t, 0);  /* so.sleep: the time has come */
    return;
  }
  abandon(t);
  lh_H.timeouts++;
  lh_resume_err(t, timeout_error(kind));
}

/*
** Times out every wait that is due, oldest first; waits that start while
** this runs (a resumed task that waits again) wait for the next pass.
*/
static void on_deadline(uv_timer_t *timer) {
  uint32_t limit = heap_seq;
  int64_t now = lh_now();
  (void)timer;
  armed = -1;
  while (heap_n > 0 && lh_H.L != NULL) {
    if (heap[0].deadline > now || (int32_t)(heap[0].seq - limit) >= 0)
      break;
    expire(heap[0].task);
  }
  if (heap_n > 0)
    arm();
}

/*
** True once so.deadline's time has passed for t: its waits then fail at
** once.
*/
int lh_expired(lh_task *t) {
  return t->deadline >= 0 && t->deadline <= lh_now();
}

/*
** The loop turn a queued task was queued in, as its `queued` byte: 1 or 2
** by the turn's parity. The queue only ever holds tasks of this turn and
** the one before (on_ready runs all of those), so parity tells them apart.
*/
static unsigned turn;
#define QUEUED_NOW (1 + (turn & 1))

/*
** The idle handle is active while tasks are queued: it keeps the loop's
** poll from blocking, and counts the turns, before each poll. The queue
** itself runs in the check phase, after the poll.
*/
static void on_idle(uv_idle_t *idle) {
  (void)idle;
  turn++;
}

static void ready_push(lh_task *t, int nargs) {
  t->nargs = nargs;
  t->queued = QUEUED_NOW;
  t->since = (uint32_t)lh_now();
  t->next = NULL;
  if (lh_H.ready_tail)
    lh_H.ready_tail->next = t;
  else {
    lh_H.ready_head = t;
    uv_idle_start(&lh_H.ready_idle, on_idle);
  }
  lh_H.ready_tail = t;
}

/*
** The continuation of every wait, run in the waiting thread once the
** host resumes it: the function's results, or its error, or, for a task
** being cancelled, the unwinding.
*/
static int k_wait(lua_State *L, int status, lua_KContext ctx) {
  const lh_waitkind *kind = (const lh_waitkind *)ctx;
  lh_task *t = lh_task_caller(L);
  int err = t->err;
  (void)status;
  if (t->cancelling)
    return lh_unwind(L);
  if (err != 0) {
    t->err = 0;
    lua_settop(L, t->wait.base);
    return lh_pusherror(L, err);
  }
  if (kind->after != NULL)
    return kind->after(L, t->wait.base);
  return lua_gettop(L) - t->wait.base;
}

/*
** Waits: the caller has registered t with the object it waits on (and
** kind->cancel undoes that). Fills the wait record, starts the deadline
** (the operation's timeout or so.deadline's, whichever comes first) and
** yields; the results are whatever completes the wait. A wait that starts
** after so.deadline's time fails at once.
*/
int lh_wait(lua_State *L, lh_task *t, const lh_waitkind *kind, void *on,
            int64_t timeout_ms) {
  lh_waitrec *w = &t->wait;
  int64_t d = -1;
  w->kind = kind;
  w->on = on;
  t->err = 0;
  t->by_deadline = 0;
  if (t->cancelling) {  /* asked to end while it ran: now is the time */
    abandon(t);
    return lh_unwind(L);
  }
  if (timeout_ms >= 0 || t->deadline >= 0) {
    int64_t now;
    /* A timeout counts from now, not from the loop turn's start: a task
       may have computed for a while since. */
    if (timeout_ms > 0)
      uv_update_time(lh_H.loop);
    now = lh_now();
    if (timeout_ms >= 0)
      d = now + timeout_ms;
    if (t->deadline >= 0 && (d < 0 || t->deadline <= d)) {
      d = t->deadline;
      t->by_deadline = 1;
      if (d <= now) {
        abandon(t);
        return lh_pusherror(L, timeout_error(kind));
      }
    }
  }
  if (timeout_ms == 0 && (kind->flags & LH_WAIT_ENDS)) {
    /* so.sleep(0): the next loop turn, after I/O and timers have run;
       through the ready queue, not a timer due in the same timer pass. */
    ready_push(t, 0);
  } else if (d >= 0) {
    if (heap_insert(t, d) < 0) {
      abandon(t);
      return luaL_error(L, "not enough memory");
    }
  }
  w->base = lua_gettop(L);
  lua_pushlightuserdata(L, (void *)&yield_tags[LH_YIELD_WAIT]);
  return lua_yieldk(L, 1, (lua_KContext)kind, k_wait);
}

/* Takes t out of the ready queue (a cancel): a walk, as that is rare. */
static void ready_remove(lh_task *t) {
  lh_task **p = &lh_H.ready_head, *prev = NULL;
  while (*p != NULL && *p != t) {
    prev = *p;
    p = &(*p)->next;
  }
  if (*p == t) {
    *p = t->next;
    if (lh_H.ready_tail == t)
      lh_H.ready_tail = prev;
  }
  t->next = NULL;
  t->queued = 0;
  if (lh_H.ready_head == NULL)
    uv_idle_stop(&lh_H.ready_idle);
}

/*
** Queues a task whose wait ended (results already on its stack) to run
** after the next poll. For wakes from inside a running task.
*/
void lh_wake(lh_task *t, int nargs) {
  wait_end(t);
  ready_push(t, nargs);
}

/* lh_wake, for a wait that failed: the task gets nil, msg, name. */
void lh_wake_err(lh_task *t, int err) {
  t->err = err;
  lh_wake(t, 0);
}

/*
** Ends t's wait before its object completed it (the object forgets t, as
** for a timeout) with err: the conn a task sends on closed under it.
*/
void lh_abort_err(lh_task *t, int err) {
  abandon(t);
  t->err = err;
  ready_push(t, 0);
}

/*
** The wait made progress (a long send moved on): its own timeout counts
** again from now, as nginx's send_timeout does between two writes;
** so.deadline's does not move.
*/
void lh_wait_renew(lh_task *t, int64_t timeout_ms) {
  int64_t d;
  if (timeout_ms < 0 || t->wait.kind == NULL)
    return;
  d = lh_now() + timeout_ms;
  t->by_deadline = 0;
  if (t->deadline >= 0 && t->deadline <= d) {
    d = t->deadline;
    t->by_deadline = 1;
  }
  if (t->wait.heapidx >= 0)
    heap_remove(t);
  heap_insert(t, d);  /* (no memory: left without one) */
}

/*
** Resumes a waiting task with nargs results on its stack. Called from
** libuv callbacks, i.e. from the loop; should it ever run inside a task,
** it queues instead of nesting.
*/
void lh_resume(lh_task *t, int nargs) {
  wait_end(t);
  if (lh_H.L == NULL)
    return;  /* shutting down: nobody runs any more */
  if (lh_H.depth > 0)
    ready_push(t, nargs);
  else
    run(t, nargs, lh_H.L);
}

/*
** lh_resume for a wait that failed with a libuv (or host) error: the task
** builds nil, msg, name itself, so nothing is allocated here.
*/
void lh_resume_err(lh_task *t, int err) {
  t->err = err;
  lh_resume(t, 0);
}

/* Resumes a task with the outcome of a request: true, or nil, msg, name. */
void lh_resume_status(lh_task *t, int status) {
  if (status < 0)
    lh_resume_err(t, status);
  else {
    lua_pushboolean(t->co, 1);  /* no allocation: a wait left room */
    lh_resume(t, 1);
  }
}

/*
** Runs the queued tasks that were queued before this loop turn's poll:
** those queued since (by callbacks in this turn's poll, or by the tasks
** run here) wait for the next turn, after the next poll and timers. So a
** task that yields or sleeps 0 in a loop cannot starve I/O or timers.
*/
static void on_ready(uv_check_t *check) {
  (void)check;
  while (lh_H.ready_head != NULL && lh_H.L != NULL &&
         lh_H.ready_head->queued != QUEUED_NOW) {
    lh_task *t = lh_H.ready_head;
    lh_H.ready_head = t->next;
    if (lh_H.ready_head == NULL)
      lh_H.ready_tail = NULL;
    t->queued = 0;
    t->next = NULL;
    wait_end(t);  /* so.sleep(0) waited in the queue itself */
    run(t, t->nargs, lh_H.L);
  }
  if (lh_H.ready_head == NULL)
    uv_idle_stop(&lh_H.ready_idle);
}

/*
** Calls f(ud) on the main state under protection and moves its results to
** `to`: how a callback builds values (a string read, a conn accepted) that
** may fail to allocate, without raising where nothing can catch. The
** count moved to t, or -1 when f raised (out of memory), or -2 when t
** stopped waiting meanwhile (a __gc that f's allocations set off
** cancelled it): then nothing moved, and t must not be resumed.
*/
int lh_pushprotected(lh_task *t, lua_CFunction f, void *ud) {
  lua_State *L = lh_H.L, *to = t->co;
  int top = lua_gettop(L), n;
  if (!lua_checkstack(L, 3))
    return -1;
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->ref);  /* t lives through f */
  top++;
  lua_pushcfunction(L, f);
  lua_pushlightuserdata(L, ud);
  if (lua_pcall(L, 1, LUA_MULTRET, 0) != LUA_OK)
    n = -1;
  else if (t->wait.kind == NULL)  /* a __gc that f set off cancelled t */
    n = -2;
  else if (!lua_checkstack(to, n = lua_gettop(L) - top))
    n = -1;
  if (n < 0) {
    lua_settop(L, top - 1);
    return n;
  }
  lua_xmove(L, to, n);
  lua_pop(L, 1);  /* t */
  return n;
}

/* }====================================================== */


/* {======================================================
** Ending
** ======================================================= */

/*
** Pushes onto `to` what so.join gives for an ended task: true, results...
** or false, error. The values stay on the ended thread (positions
** 1..nargs) for joins that come later. The count, or -1 when `to` has no
** room.
*/
int lh_push_results(lua_State *to, lh_task *t) {
  int i, n = t->nargs;
  if (!lua_checkstack(to, n + 1) || !lua_checkstack(t->co, 1))
    return -1;
  lua_pushboolean(to, t->status == LH_TASK_DONE);
  for (i = 1; i <= n; i++) {
    lua_pushvalue(t->co, i);
    lua_xmove(t->co, to, 1);
  }
  return n + 1;
}

/*
** A task so.first started has ended: the first to return or raise wins
** and wakes so.first; one that was cancelled does not, unless it was the
** last (then so.first gets ECANCELED).
*/
static void first_task_ended(lh_task *t) {
  struct lh_first *f = t->u.first;
  t->u.first = NULL;
  t->in_first = 0;
  f->live--;
  if (f->winner != NULL)
    return;
  if (t->status != LH_TASK_CANCELLED) {
    int i;
    f->winner = t;
    /* The others lost: their waits end now, so that nothing they wait
       for (a read's bytes, a connection) is taken before so.first's
       caller runs and cancels them. */
    for (i = 0; i < f->n; i++) {
      lh_task *c = f->tasks[i];
      if (c == t || lh_task_ended(c) || c->status == LH_TASK_RUNNING)
        continue;
      abandon(c);
      if (c->queued) {
        ready_remove(c);
        lua_pop(c->co, c->nargs);
      }
      c->held = 1;
    }
  } else if (f->live > 0)
    return;
  if (f->waiter != NULL) {
    lh_task *w = f->waiter;
    f->waiter = NULL;
    if (f->winner != NULL)
      lh_wake(w, 0);  /* so.first reads the winner's results itself */
    else
      lh_wake_err(w, UV_ECANCELED);
  }
}

/*
** Wakes every task waiting in so.join with true, results... or false, err.
*/
static void wake_joiners(lh_task *t) {
  while (t->u.joiners != NULL) {
    lh_task *j = t->u.joiners;
    int n;
    t->u.joiners = j->next;
    j->next = NULL;
    n = lh_push_results(j->co, t);
    if (n < 0)
      lh_wake_err(j, UV_ENOMEM);
    else
      lh_wake(j, n);
  }
}

/*
** Formats an error value (1) as lua.c's message handler does, with the
** traceback of a thread (2) if there is one, and the place the task was
** started (3) if known. Runs protected: a __tostring is script code and
** may raise.
*/
static int format_error(lua_State *L) {
  lua_State *co = lua_tothread(L, 2);
  const char *msg;
  if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER) {
    lua_pushvalue(L, 1);  /* a copy: tostring converts in place */
    msg = lua_tostring(L, -1);
  } else if (luaL_callmeta(L, 1, "__tostring") &&
             lua_type(L, -1) == LUA_TSTRING)
    msg = lua_tostring(L, -1);
  else
    msg = lua_pushfstring(L, "(error object is a %s value)",
                          luaL_typename(L, 1));
  if (co != NULL)
    luaL_traceback(L, co, msg, 0);
  if (lua_touserdata(L, 3) != NULL) {
    lua_pushfstring(L, "\n(in the task started at %s)",
                    (const char *)lua_touserdata(L, 3));
    lua_concat(L, 2);
  }
  lua_pushstring(L, (const char *)lua_touserdata(L, 4));  /* what */
  lua_insert(L, -2);
  lua_concat(L, 2);
  return 1;
}

/*
** Prints the error value on top of L (and leaves it there), with co's
** traceback unless co is NULL, the way lua.c does; with where t started,
** if t is not NULL.
*/
static void report(lua_State *L, lua_State *co, lh_task *t,
                   const char *what) {
  if (!lua_checkstack(L, 5))
    return;
  lua_pushcfunction(L, format_error);
  lua_pushvalue(L, -2);
  if (co != NULL) {
    lua_pushthread(co);
    lua_xmove(co, L, 1);
  } else
    lua_pushnil(L);
  lua_pushlightuserdata(L, co != NULL && t != NULL ? (void *)t->site : NULL);
  lua_pushlightuserdata(L, (void *)what);
  {  /* a __tostring is script code: the runaway guard watches it too */
    lua_State *prev = lh_guard_enter(L);
    int status = lua_pcall(L, 4, 1, 0);
    lh_guard_leave(prev);
    if (status == LUA_OK && lua_type(L, -1) == LUA_TSTRING)
      lh_log_string(LH_LOG_ERROR, t, lua_tostring(L, -1), lua_rawlen(L, -1));
    else  /* out of memory, or a __tostring that raised: nothing to build */
      lh_log(LH_LOG_ERROR, t, "%s(error object cannot be printed)", what);
  }
  lua_pop(L, 1);
}

/*
** What every end of a task shares: who waits for it wakes, and it is no
** longer anchored (collectable once unreachable).
*/
static void release(lh_task *t) {
  if (!t->in_first)
    wake_joiners(t);
  else if (t->u.first != NULL)
    first_task_ended(t);
  luaL_unref(lh_H.L, LUA_REGISTRYINDEX, t->ref);
  t->ref = LUA_NOREF;
  lh_H.ntasks--;
  if (t == main_task)
    main_task = NULL;
  if (lh_H.draining && lh_H.ntasks == 0)  /* drained: done */
    uv_stop(lh_H.loop);
}

/*
** Closes a thread's pending <close> variables (the error a handler raised
** is left on co's stack); LUA_OK or that error's status.
*/
int lh_closethread(lua_State *co, lua_State *from) {
  /* <close> handlers are script code: the runaway guard watches them */
  lua_State *prev = lh_guard_enter(co);
  int status;
#if LUA_VERSION_NUM >= 504 && LUA_VERSION_RELEASE_NUM >= 50406
  status = lua_closethread(co, from);
#else
  (void)from;
  status = lua_resetthread(co);
#endif
  lh_guard_leave(prev);
  return status;
}

/*
** A cancelled task ends: its <close> variables run (an error one raises
** is reported), and so.join gives false, "cancelled". Nothing else is
** printed: the task did nothing wrong.
*/
static void end_cancelled(lh_task *t) {
  lua_State *L = lh_H.L, *co = t->co;
  if (lh_closethread(co, L) != LUA_OK && lua_checkstack(L, 1)) {
    lua_xmove(co, L, 1);
    report(L, NULL, t, "error in a <close> variable: ");
    lua_pop(L, 1);
  }
  lua_settop(co, 0);
  lua_rawgeti(co, LUA_REGISTRYINDEX, ref_cancelled);
  t->nargs = 1;
  t->status = LH_TASK_CANCELLED;
  t->cancelling = 0;
  release(t);
}

/*
** An error nobody waits for is printed; one that a task waiting in
** so.join or so.first will get is theirs to handle.
*/
static int handled(lh_task *t) {
  if (t->in_first)  /* while so.first runs, its tasks are its business */
    return t->u.first != NULL;
  return t->u.joiners != NULL;
}

static void finish(lh_task *t, int status, int nres) {
  lua_State *L = lh_H.L, *co = t->co;
  /* A task ends running, never registered with something it waits on;
     should a bug ever break that, the object must forget it here, or it
     would point at a task about to be collected. */
  abandon(t);
  if (t->cancelling) {  /* asked to end while it was running */
    end_cancelled(t);
    return;
  }
  if (status == LUA_OK) {
    t->status = LH_TASK_DONE;
    t->nargs = nres;
  } else {
    t->status = LH_TASK_FAILED;
    lh_H.errors++;
    lua_checkstack(co, 2);  /* for report's pushthread */
    lua_pushvalue(co, -1);
    lua_xmove(co, L, 1);  /* L: error */
    if (!handled(t) && !t->runaway)
      report(L, co, t, "");
    lh_closethread(co, L);  /* runs pending <close> variables */
    /* The thread now holds the error value, or the error of a <close>
       handler that raised in its turn, which replaces it. */
    lua_xmove(co, L, 1);  /* L: error final */
    if (!lua_rawequal(L, -1, -2))
      report(L, NULL, t, "error in a <close> variable: ");
    lua_settop(co, 0);
    lua_xmove(L, co, 1);  /* the final error is the task's "result" */
    lua_pop(L, 1);
    t->nargs = 1;
  }
  if (t == main_task && status != LUA_OK) {  /* the script raised: exit 1 */
    lh_H.exit_status = 1;
    uv_stop(lh_H.loop);
  }
  release(t);
}

/*
** Resumes t with nargs values on its stack. `from` is the state that
** resumes: the main state from the loop, the calling task in so.spawn
** and so.cancel.
*/
static void run(lh_task *t, int nargs, lua_State *from) {
  int nres, status;
  t->status = LH_TASK_RUNNING;
  t->runaway = 0;
  t->since = (uint32_t)lh_now();
  lua_State *prev = lh_guard_enter(t->co);
  lh_H.depth++;
  status = lua_resume(t->co, from, nargs, &nres);
  lh_H.depth--;
  lh_guard_leave(prev);
  if (status == LUA_YIELD) {
    int kind = lh_yieldkind(t->co, nres);
    lua_pop(t->co, nres);
    t->since = (uint32_t)lh_now();
    if (kind == LH_YIELD_WAIT)
      t->status = LH_TASK_WAITING;
    else if (kind == LH_YIELD_CANCEL || t->cancelling)
      end_cancelled(t);
    else {  /* a plain coroutine.yield: again next turn */
      t->status = LH_TASK_YIELDED;
      ready_push(t, 0);
    }
  } else
    finish(t, status, nres);
}

/* Yields the cancel marker: the task ends, from here outwards. */
int lh_unwind(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&yield_tags[LH_YIELD_CANCEL]);
  return lua_yield(L, 1);
}

/*
** Ends t, as so.cancel does; L is the caller. 1 if t ended (or will, when
** it next waits or yields: a task on the C stack cannot be unwound from
** above), 0 if it had ended already. Not for the caller's own task.
*/
int lh_cancel(lua_State *L, lh_task *t) {
  if (lh_task_ended(t) || lh_H.L == NULL)
    return 0;
  if (t->cancelling)
    return 1;
  t->cancelling = 1;
  switch (t->status) {
    case LH_TASK_RUNNING:
      return 1;
    case LH_TASK_WAITING:
      if (t->wait.kind != NULL)
        abandon(t);
      else if (!t->queued && !t->held)
        return 1;  /* a callback is resuming it right now: k_wait unwinds */
      if (t->queued) {
        ready_remove(t);
        lua_pop(t->co, t->nargs);  /* results it will never see */
      }
      run(t, 0, L);  /* k_wait sees `cancelling` and unwinds */
      return 1;
    default:  /* LH_TASK_YIELDED: nothing of the host's on its stack */
      if (t->queued)
        ready_remove(t);
      end_cancelled(t);
      return 1;
  }
}

/* }====================================================== */


/* {======================================================
** Starting
** ======================================================= */

/*
** Pops a spawn site ("file:line") and returns it as a C string that lives
** as long as the host: sites are few (places in the code), so they are
** kept for good in a registry set, and a task holds a pointer, not a
** value (16 bytes less for each task).
*/
static const char sites_key = 0;  /* its address: the set's registry key */

static const char *keep_site(lua_State *L) {
  const char *site;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &sites_key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &sites_key);
  }  /* site sites */
  lua_pushvalue(L, -2);
  if (lua_rawget(L, -2) == LUA_TNIL) {  /* site sites nil */
    lua_pop(L, 1);
    lua_pushvalue(L, -2);
    lua_pushvalue(L, -3);
    lua_rawset(L, -3);  /* sites[site] = site */
    lua_pushvalue(L, -2);
  }  /* site sites kept */
  /* The set's own string: a long site ("/a/long/path/spec.lua:123", over
     40 bytes) is not interned, so the one just made is another object,
     which the collector would free under t->site. */
  site = lua_tostring(L, -1);
  lua_pop(L, 3);
  return site;
}

/*
** Creates a task for the function at index fn and pushes its handle. The
** task is alive (anchored, counted) but not started: see lh_start.
*/
lh_task *lh_newtask(lua_State *L, int fn) {
  lua_Debug ar;
  lh_task *t;
  int level;
  ar.currentline = -1;
  fn = lua_absindex(L, fn);
  luaL_checkstack(L, 4, NULL);
  t = lua_newuserdatauv(L, sizeof *t, 1);  /* ud */
  memset(t, 0, sizeof *t);
  t->ref = LUA_NOREF;
  t->deadline = -1;
  t->wait.heapidx = -1;
  luaL_setmetatable(L, LH_TASK_TNAME);
  /* Where it was started, for its error report and so.tasks: the nearest
     Lua function up the stack (so.spawn may be called through pcall). */
  for (level = 1; lua_getstack(L, level, &ar) && level < 8; level++)
    if (lua_getinfo(L, "Sl", &ar) && ar.currentline > 0)
      break;
  if (level < 8 && ar.currentline > 0)
    lua_pushfstring(L, "%s:%d", ar.short_src, ar.currentline);
  else
    lua_pushliteral(L, "?");
  t->site = keep_site(L);
  t->co = lua_newthread(L);  /* ud co */
  lua_setiuservalue(L, -2, 1);  /* ud; ud keeps the thread alive */
  *(lh_task **)lua_getextraspace(t->co) = t;
  lua_pushvalue(L, fn);
  lua_xmove(L, t->co, 1);
  lua_pushvalue(L, -1);
  t->ref = luaL_ref(L, LUA_REGISTRYINDEX);  /* the task keeps itself alive */
  t->status = LH_TASK_YIELDED;
  t->id = ++lh_H.next_id;
  t->since = (uint32_t)lh_now();
  lh_H.ntasks++;
  return t;
}

/*
** Starts t with the nargs values on top of L as its arguments, and runs it
** until it first waits. Each start inside a task nests a resume; deep
** chains of tasks that start tasks before they first wait would reach
** Lua's C-call limit, so past a depth the task starts on the next loop
** turn instead.
*/
void lh_start(lua_State *L, lh_task *t, int nargs) {
  if (!lua_checkstack(t->co, nargs)) {
    end_cancelled(t);  /* it never runs: nothing to undo */
    luaL_error(L, "too many arguments to start a task");
  }
  lua_xmove(L, t->co, nargs);
  if (lh_H.depth >= LH_MAX_NESTED_SPAWNS)
    ready_push(t, nargs);
  else
    run(t, nargs, L);
}

/*
** Starts the script: its chunk and its arguments are on L's stack.
*/
int lh_spawn_main(lua_State *L, int nargs) {
  lh_task *t;
  int chunk = lua_gettop(L) - nargs;
  t = lh_newtask(L, chunk);  /* chunk args... task */
  {  /* its "spawn site": the script */
    lua_Debug ar;
    lua_pushvalue(L, chunk);
    lua_getinfo(L, ">S", &ar);
    lua_pushstring(L, ar.short_src);
    t->site = keep_site(L);
  }
  lua_replace(L, chunk);  /* task args... */
  main_task = t;
  lh_start(L, t, nargs);
  lua_pop(L, 1);
  return 0;
}

/* }====================================================== */


void lh_sched_init(lua_State *L) {
  uv_check_init(lh_H.loop, &lh_H.ready_check);
  uv_check_start(&lh_H.ready_check, on_ready);
  uv_unref((uv_handle_t *)&lh_H.ready_check);
  uv_idle_init(lh_H.loop, &lh_H.ready_idle);
  uv_timer_init(lh_H.loop, &lh_H.deadline_timer);
  lua_pushliteral(L, "cancelled");
  ref_cancelled = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* After lua_close: the heap's pointers are gone with the tasks. */
void lh_sched_close(void) {
  free(heap);
  heap = NULL;
  heap_n = heap_cap = 0;
}
