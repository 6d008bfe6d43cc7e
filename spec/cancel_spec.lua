-- so.cancel: a task ends wherever it waits, its <close> variables run, and
-- nothing it waited on ever resumes it; over real loopback sockets.
local so = require "so"
local helper = require "helper"

-- How long a socket wait may take before a spec counts it as hung.
local LIMIT = 5

-- A pair of connected conns, every wait on them bounded by LIMIT.
local function pair() return helper.pair(LIMIT) end

-- Writes until a write is blocked for `seconds` (nobody reads the peer).
-- Returns how many bytes it wrote, the one that timed out included (it
-- still goes out).
local function fill(conn, seconds)
  local chunk = string.rep("x", 1024 * 1024)
  local sent = 0
  conn:settimeout(seconds)
  for _ = 1, 1024 do
    local ok, err, name = conn:write(chunk)
    sent = sent + #chunk
    if not ok then
      assert.equal("ETIMEDOUT", name, err)
      conn:settimeout(LIMIT)
      return sent
    end
  end
  error("the write never blocked")
end

-- Reads from conn until EOF, an error, or `seconds` of silence; the bytes.
local function drain(conn, seconds)
  conn:settimeout(seconds or 0.5)
  local got = {}
  while true do
    local d = conn:read()
    if not d or d == "" then break end
    got[#got + 1] = d
  end
  conn:settimeout(LIMIT)
  return table.concat(got)
end

local closer = helper.closer

local luahost = helper.run_script

-- Cancels t, which must be waiting, and checks what the contract promises:
-- so.cancel returns true, the task has ended by then, so.join says
-- false, "cancelled", and it has not run a line past its wait.
local function cancel_waiting(t, state)
  assert.is_true(so.cancel(t))
  assert.matches("^task %(cancelled%)", tostring(t))
  assert.same({ false, "cancelled" }, { so.join(t) })
  assert.same({ false, "cancelled" }, { so.join(t, 1) })
  so.sleep(0.02)  -- a late callback would run now
  assert.is_nil(state.after, "the cancelled task ran again")
end

describe("so.cancel of a waiting task", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("ends a read: its <close> conn closes, its <close> variables run reversed",
     function()
    local c, s = pair()
    local log, state = {}, {}
    local t = so.spawn(function()
      local conn <close> = s
      local a <close> = closer(log, "a")
      local b <close> = closer(log, "b")
      state.got = { conn:read() }
      state.after = true
    end)
    assert.equal(1, so.stats().tasks - before.tasks)
    cancel_waiting(t, state)
    assert.same({ "b", "a" }, log)
    assert.matches("^conn %(closed%)", tostring(s))
    assert.equal(0, so.stats().tasks - before.tasks)
    assert.equal("", c:read())  -- the peer sees the <close> conn's close
    c:close()
  end)

  it("ends a read without losing a byte: the next reader gets them all",
     function()
    local c, s = pair()
    local state = {}
    local a = so.spawn(function()
      state.got = s:read()
      state.after = true
    end)
    cancel_waiting(a, state)
    assert.is_true(c:write("abc"))
    so.sleep(0.02)  -- the bytes reach s while nobody reads it
    local b = so.spawn(function() return s:read() end)
    assert.same({ true, "abc" }, { so.join(b, 1) })
    assert.is_nil(state.got)
    -- and once more, with the bytes on their way as the cancel comes
    local a2 = so.spawn(function() state.got = s:read(); state.after = true end)
    assert.is_true(c:write("defgh"))
    cancel_waiting(a2, state)
    assert.equal("defgh", drain(s, 0.2))
    c:close()
    s:close()
  end)

  it("ends a blocked write, and the write's late completion never resumes it",
     function()
    local c, s = pair()
    local sent = fill(c, 0.1)
    local log, state = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "a")
      local _ <close> = closer(log, "b")
      state.res = { c:write(string.rep("w", 1024 * 1024)) }
      state.after = true
    end)
    so.sleep(0.02)
    assert.is_nil(state.res)  -- still blocked
    cancel_waiting(t, state)
    assert.same({ "b", "a" }, log)
    -- The peer reads everything: the queued writes complete now, none
    -- resumes the cancelled task, and the conn takes new writes in order.
    -- The cancelled write still went out (only its waiting ended).
    local reader = so.spawn(function()
      local total, tail = 0, ""
      while true do
        local d = assert(s:read())
        if d == "" then return total, tail end
        total = total + #d
        tail = (tail .. d):sub(-4)
      end
    end)
    assert.is_true(c:write("end"))
    assert.is_true(c:shutdown())
    local total, tail = helper.join(reader)
    assert.equal("wend", tail)
    assert.equal(sent + 1024 * 1024 + 3, total)
    so.sleep(0.02)
    assert.is_nil(state.after)
    c:close()
    s:close()
  end)

  it("ends a blocked write whose task closes the conn", function()
    local c, s = pair()
    fill(c, 0.1)
    local log, state = {}, {}
    local t = so.spawn(function()
      local conn <close> = c
      local _ <close> = closer(log, "first")
      local _ <close> = closer(log, "second")
      state.res = { conn:write(string.rep("w", 1024 * 1024)) }
      state.after = true
    end)
    cancel_waiting(t, state)
    assert.same({ "second", "first" }, log)
    assert.matches("^conn %(closed%)", tostring(c))
    s:close()
  end)

  it("ends an accept, and the next connection goes to the next acceptor",
     function()
    local l = assert(so.listen("127.0.0.1", 0))
    local h, p = l:sockname()
    local log, state = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "a")
      local _ <close> = closer(log, "b")
      state.conn = l:accept()
      state.after = true
    end)
    cancel_waiting(t, state)
    assert.same({ "b", "a" }, log)
    local c = assert(so.connect(h, p))
    so.sleep(0.02)
    assert.is_nil(state.conn)
    local acc = so.spawn(function() return l:accept() end)
    local ok, s = so.join(acc, 1)
    assert.is_true(ok)
    assert.is_true(c:write("hi"))
    assert.equal("hi", s:read())
    s:close()
    c:close()
    l:close()
  end)

  it("ends an accept whose task closes the listener", function()
    local l = assert(so.listen("127.0.0.1", 0))
    local log, state = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "a")
      local lis <close> = l
      local _ <close> = closer(log, "b")
      state.conn = lis:accept()
      state.after = true
    end)
    cancel_waiting(t, state)
    assert.same({ "b", "a" }, log)
    assert.matches("^listener %(closed%)", tostring(l))
  end)

  it("ends a connect cancelled before its callback ran, leaving no conn",
     function()
    local l = assert(so.listen("127.0.0.1", 0))
    local h, p = l:sockname()
    local log, state = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "a")
      local _ <close> = closer(log, "b")
      state.conn = so.connect(h, p)
      state.after = true
    end)
    cancel_waiting(t, state)
    assert.same({ "b", "a" }, log)
    assert.is_nil(state.conn)
    assert.equal(0, so.stats().conns - before.conns)
    -- The kernel may have made the connection before the cancel: then the
    -- server sees it end at once.
    l:settimeout(0.1)
    local s = l:accept()
    if s then
      s:settimeout(1)
      local d, _, name = s:read()
      assert.is_true(d == "" or name == "ECONNRESET", tostring(name))
      s:close()
    end
    l:close()
  end)

  it("ends a connect that hangs on a full backlog, leaving no conn", function()
    local l = assert(so.listen("127.0.0.1", 0, 1))
    local h, p = l:sockname()
    local conns = {}
    while true do  -- fill the kernel's queue until connects hang
      local c, msg, name = so.connect(h, p, 0.1)
      if not c then
        assert.equal("ETIMEDOUT", name, msg)
        break
      end
      conns[#conns + 1] = c
      assert(#conns < 16, "the backlog never filled")
    end
    local log, state = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "a")
      local _ <close> = closer(log, "b")
      state.conn = so.connect(h, p)
      state.after = true
    end)
    so.sleep(0.05)
    assert.is_nil(state.conn)  -- it hangs
    local open = so.stats().conns
    cancel_waiting(t, state)
    assert.same({ "b", "a" }, log)
    assert.equal(open - 1, so.stats().conns)  -- the conn it was making
    for _, c in ipairs(conns) do c:close() end
    l:close()
  end)

  it("ends a shutdown waiting behind a blocked write", function()
    local c, s = pair()
    fill(c, 0.1)  -- the write that timed out is still queued
    local log, state = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "a")
      local _ <close> = closer(log, "b")
      state.res = { c:shutdown() }
      state.after = true
    end)
    so.sleep(0.02)
    assert.is_nil(state.res)  -- waits for the queued write
    cancel_waiting(t, state)
    assert.same({ "b", "a" }, log)
    -- the peer drains: the shutdown completes in libuv, and resumes nobody
    drain(s, 0.3)
    so.sleep(0.02)
    assert.is_nil(state.after)
    c:close()
    s:close()
  end)

  it("ends a sleep, long or of one loop turn, and a plain yield", function()
    for _, fn in ipairs({
      function() so.sleep(10) end,
      function() while true do so.sleep(0) end end,
      function() while true do coroutine.yield() end end,
    }) do
      local log, state = {}, {}
      local t = so.spawn(function()
        local _ <close> = closer(log, "a")
        local _ <close> = closer(log, "b")
        fn()
        state.after = true
      end)
      cancel_waiting(t, state)
      assert.same({ "b", "a" }, log)
    end
  end)

  it("ends a join, and the joined task's end does not resume it", function()
    local target = so.spawn(function() so.sleep(0.05); return "x" end)
    local log, state = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "a")
      local _ <close> = closer(log, "b")
      state.res = { so.join(target) }
      state.after = true
    end)
    cancel_waiting(t, state)
    assert.same({ "b", "a" }, log)
    assert.same({ true, "x" }, { so.join(target, 1) })
    so.sleep(0.02)
    assert.is_nil(state.after)
  end)

  it("ends a channel send, and the value is not delivered", function()
    local ch = so.channel()
    local log, state = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "a")
      local _ <close> = closer(log, "b")
      state.res = { ch:send("v") }
      state.after = true
    end)
    cancel_waiting(t, state)
    assert.same({ "b", "a" }, log)
    assert.equal(0, #ch)
    so.settimeout(ch, 0.03)
    assert.same({ nil, "ETIMEDOUT: timed out", "ETIMEDOUT" }, { ch:recv() })
  end)

  it("ends a channel recv, and the next value goes to the next receiver",
     function()
    local ch = so.channel(1)
    local log, state = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "a")
      local _ <close> = closer(log, "b")
      state.res = { ch:recv() }
      state.after = true
    end)
    cancel_waiting(t, state)
    assert.same({ "b", "a" }, log)
    assert.is_true(ch:send("v"))
    assert.equal(1, #ch)  -- queued: the cancelled receiver did not take it
    assert.equal("v", ch:recv())
    so.sleep(0.02)
    assert.is_nil(state.after)
  end)

  it("ends a so.first and every task it started", function()
    local c, s = pair()
    local log, state = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "outer")
      state.res = { so.first(
        function()
          local _ <close> = closer(log, "reader")
          local d = s:read()
          state.child_after = true
          return d
        end,
        function()
          local _ <close> = closer(log, "sleeper")
          so.sleep(10)
          state.child_after = true
        end) }
      state.after = true
    end)
    assert.equal(3, so.stats().tasks - before.tasks)
    cancel_waiting(t, state)
    assert.equal(0, so.stats().tasks - before.tasks)
    table.sort(log)
    assert.same({ "outer", "reader", "sleeper" }, log)
    assert.is_true(c:write("late"))
    so.sleep(0.02)
    assert.is_nil(state.child_after)
    assert.equal("late", s:read())  -- the cancelled child's read lost nothing
    c:close()
    s:close()
  end)

  it("closes a wrapped iterator's <close> variables before the task's own",
     function()
    local c, s = pair()
    local log, state = {}, {}
    local function chunks(conn)
      return coroutine.wrap(function()
        local _ <close> = closer(log, "iterator")
        while true do
          local d = assert(conn:read())
          if d == "" then return end
          coroutine.yield(d)
        end
      end)
    end
    local t = so.spawn(function()
      local _ <close> = closer(log, "task")
      local conn <close> = s
      for d in chunks(conn) do state.got = (state.got or "") .. d end
      state.after = true
    end)
    assert.is_true(c:write("one"))
    assert.is_true(helper.wait_until(function() return state.got == "one" end,
                                     1))
    cancel_waiting(t, state)
    assert.same({ "iterator", "task" }, log)
    assert.matches("^conn %(closed%)", tostring(s))
    c:close()
  end)
end)

describe("so.cancel", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("is also a method of the task", function()
    local state = {}
    local t = so.spawn(function() so.sleep(10); state.after = true end)
    assert.is_true(t:cancel())
    assert.same({ false, "cancelled" }, { t:join() })
    assert.is_false(t:cancel())
  end)

  it("returns false for a task that had already ended", function()
    local done = so.spawn(function() return 1 end)
    local failed = so.spawn(function() so.sleep(0); error("boom", 0) end)
    local slept = so.spawn(function() so.sleep(0); return 2 end)
    assert.same({ false, "boom" }, { so.join(failed) })
    helper.join(slept)
    assert.is_false(so.cancel(done))
    assert.is_false(so.cancel(failed))
    assert.is_false(so.cancel(slept))
    -- they keep their outcomes
    assert.same({ true, 1 }, { so.join(done) })
    assert.same({ false, "boom" }, { so.join(failed) })
    assert.same({ true, 2 }, { so.join(slept) })
    local cancelled = so.spawn(function() so.sleep(10) end)
    assert.is_true(so.cancel(cancelled))
    assert.is_false(so.cancel(cancelled))
    assert.same({ false, "cancelled" }, { so.join(cancelled) })
  end)

  it("raises when not given a task", function()
    assert.has_error(function() so.cancel("task") end)
    assert.has_error(function() so.cancel(coroutine.running()) end)
  end)

  it("lets a task cancel itself: it ends there, its <close> variables run",
     function()
    local c, s = pair()
    local log, state = {}, {}
    local me
    me = so.spawn(function()
      local conn <close> = s
      local _ <close> = closer(log, "a")
      local _ <close> = closer(log, "b")
      so.sleep(0)  -- so.spawn has returned the handle
      state.before_cancel = true
      so.cancel(me)
      state.after = true
    end)
    assert.same({ false, "cancelled" }, { so.join(me, 1) })
    assert.is_true(state.before_cancel)
    assert.is_nil(state.after)
    assert.same({ "b", "a" }, log)
    assert.matches("^conn %(closed%)", tostring(s))
    c:close()
  end)

  it("only marks a task that is on the C stack: it ends at its next wait",
     function()
    local log, state = {}, {}
    local outer
    outer = so.spawn(function()
      local _ <close> = closer(log, "outer")
      so.sleep(0)  -- so.spawn has returned the handle
      so.spawn(function() state.res = so.cancel(outer) end)
      state.ran_on = true  -- still runs: it was only marked
      so.sleep(0)
      state.after = true
    end)
    assert.same({ false, "cancelled" }, { so.join(outer, 1) })
    assert.is_true(state.res)
    assert.is_true(state.ran_on)
    assert.is_nil(state.after)
    assert.same({ "outer" }, log)
  end)

  it("only marks a task that is on the C stack: it ends at its next yield",
     function()
    local state = {}
    local outer
    outer = so.spawn(function()
      so.sleep(0)
      so.spawn(function() state.res = so.cancel(outer) end)
      state.ran_on = true  -- still runs: it was only marked
      coroutine.yield()
      state.after = true
    end)
    assert.same({ false, "cancelled" }, { so.join(outer, 1) })
    assert.is_true(state.res)
    assert.is_true(state.ran_on)
    assert.is_nil(state.after)
  end)

  it("cancels a task that has not waited yet, from a task it started",
     function()
    -- the cancelling task ends normally; the cancelled one ends at its wait
    local l = assert(so.listen("127.0.0.1", 0))
    local state = {}
    local outer
    outer = so.spawn(function()
      so.sleep(0)
      local lis <close> = l
      so.spawn(function() so.cancel(outer) end)
      state.conn = lis:accept()
      state.after = true
    end)
    assert.same({ false, "cancelled" }, { so.join(outer, 1) })
    assert.is_nil(state.after)
    assert.matches("^listener %(closed%)", tostring(l))
  end)

  it("prints nothing for a cancelled task, and leaves nothing to wait for",
     function()
    local t0 = os.time()
    local code, out, err = luahost([[
      local so = require "so"
      local t = so.spawn(function()
        local _ <close> = setmetatable({}, {
          __close = function() print("closed") end })
        so.sleep(10)
      end)
      print(so.cancel(t))
      print(so.join(t))
      -- never joined, cancelled while it waits on a socket
      local l = assert(so.listen("127.0.0.1", 0))
      local u = so.spawn(function() local lis <close> = l; lis:accept() end)
      so.cancel(u)
      -- cancels itself
      local me
      me = so.spawn(function() so.sleep(0); so.cancel(me) end)
    ]])
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("closed\ntrue\nfalse\tcancelled\n", out)
    assert.is_true(os.time() - t0 <= 3, "the cancelled sleep kept the host up")
  end)
end)

describe("so.cancel racing with the completion of the same wait", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  -- Waits in different ways before the cancel: not at all, one loop turn
  -- (after the poll for I/O), a timer.
  local delays = {
    function() end,
    function() coroutine.yield() end,
    function() so.sleep(0) end,
    function() so.sleep(0.001) end,
  }

  it("read: data and the cancel in the same loop turn, 200 times, no byte lost",
     function()
    local ac, as = pair()  -- the reader's conn
    local kc, ks = pair()  -- wakes the canceller in the same poll
    local ran_after, cancelled, completed = {}, 0, 0
    for i = 1, 200 do
      local reader = so.spawn(function()
        local d = assert(as:read())
        ran_after[i] = true
        return d
      end)
      local res
      local killer = so.spawn(function()
        assert(ks:read())
        delays[i % #delays + 1]()
        res = so.cancel(reader)
      end)
      if i % 2 == 0 then
        assert(kc:write("k"))
        assert(ac:write("d"))
      else
        assert(ac:write("d"))
        assert(kc:write("k"))
      end
      helper.join(killer, 2)
      if res then
        cancelled = cancelled + 1
        assert.same({ false, "cancelled" }, { so.join(reader) })
        assert.is_nil(ran_after[i], "resumed after its cancel")
        as:settimeout(1)
        assert.equal("d", as:read())  -- the byte is there for the next read
        as:settimeout(LIMIT)
      else
        completed = completed + 1
        assert.same({ true, "d" }, { so.join(reader, 1) })
      end
    end
    assert.equal(200, cancelled + completed)
    so.sleep(0.05)
    local n = 0
    for _ in pairs(ran_after) do n = n + 1 end
    assert.equal(completed, n)
    ac:close(); as:close(); kc:close(); ks:close()
  end)

  it("read: the cancelled reader's conn closed by <close>, 200 times",
     function()
    local ran_after = {}
    for i = 1, 200 do
      local c, s = pair()
      local log = {}
      local reader = so.spawn(function()
        local conn <close> = s
        local _ <close> = closer(log, "x")
        conn:read()
        ran_after[i] = true
      end)
      assert(c:write("data"))
      delays[i % #delays + 1]()
      if so.cancel(reader) then
        assert.same({ false, "cancelled" }, { so.join(reader) })
        assert.is_nil(ran_after[i])
      else
        assert.is_true((so.join(reader)))
      end
      assert.same({ "x" }, log)
      assert.matches("^conn %(closed%)", tostring(s))
      c:close()
    end
  end)

  it("write: cancelled as the peer drains it, 200 times, the stream goes on",
     function()
    local c, s = pair()
    fill(c, 0.1)  -- from now on each write waits for the peer to read
    -- the peer reads all the time, one read a loop turn, until the end mark
    local reader = so.spawn(function()
      local tail = ""
      while true do
        local d = assert(s:read())
        if d == "" then return tail end
        tail = (tail .. d):sub(-3)
        so.sleep(0)
      end
    end)
    local chunk = string.rep("w", 256 * 1024)
    local ran_after, cancelled = {}, 0
    for i = 1, 200 do
      local t = so.spawn(function()
        local ok = c:write(chunk)
        ran_after[i] = true
        return ok
      end)
      delays[i % #delays + 1]()
      if so.cancel(t) then
        cancelled = cancelled + 1
        assert.same({ false, "cancelled" }, { so.join(t) })
      else
        assert.same({ true, true }, { so.join(t, 2) })
      end
    end
    assert.is_true(cancelled > 0)
    assert.is_true(c:write("END"))
    assert.is_true(c:shutdown())
    assert.equal("END", helper.join(reader, 5))
    so.sleep(0.02)
    local n = 0
    for _ in pairs(ran_after) do n = n + 1 end
    assert.equal(200 - cancelled, n)  -- no cancelled write ran on
    c:close()
    s:close()
  end)

  it("connect: cancelled as it completes, 200 times, leaves no conn", function()
    local l, h, p = helper.server(function(conn)
      local s <close> = conn
      s:settimeout(2)
      while true do
        local d = s:read()
        if not d or d == "" then return end
      end
    end)
    local ran_after, cancelled = {}, 0
    for i = 1, 200 do
      local t = so.spawn(function()
        local c = so.connect(h, p)
        ran_after[i] = true
        return c
      end)
      delays[i % #delays + 1]()
      if so.cancel(t) then
        cancelled = cancelled + 1
        assert.same({ false, "cancelled" }, { so.join(t) })
        assert.is_nil(ran_after[i])
      else
        local ok, c = so.join(t, 1)
        assert.is_true(ok)
        assert.truthy(c)
        assert.is_true(c:write("hello"))
        c:close()
      end
    end
    assert.is_true(cancelled > 0)
    so.sleep(0.05)
    local n = 0
    for _ in pairs(ran_after) do n = n + 1 end
    assert.equal(200 - cancelled, n)  -- no cancelled connect ran on
    l:close()
  end)

  it("join: a woken joiner cancelled before it runs again, 200 times",
     function()
    local ran_after, cancelled = {}, 0
    for i = 1, 200 do
      -- the target always waits, so that both joiners wait for it
      local target = so.spawn(function() delays[i % 3 + 2](); return i end)
      local joiner, res
      local function cancel_it()
        so.join(target)
        res = so.cancel(joiner)
      end
      local other
      if i % 2 == 0 then other = so.spawn(cancel_it) end
      joiner = so.spawn(function()
        local ok, v = so.join(target)
        ran_after[i] = v
      end)
      if i % 2 == 1 then other = so.spawn(cancel_it) end
      helper.join(other, 2)
      if res then
        cancelled = cancelled + 1
        assert.same({ false, "cancelled" }, { so.join(joiner) })
        so.sleep(0)
        assert.is_nil(ran_after[i], "resumed after its cancel")
      else
        assert.is_true((so.join(joiner, 1)))
        assert.equal(i, ran_after[i])
      end
    end
    assert.is_true(cancelled > 0)
  end)
end)
