-- so.deadline: one limit for every wait inside a function, over real
-- loopback sockets.
local so = require "so"
local helper = require "helper"

-- How long a socket wait may take before a spec counts it as hung.
local LIMIT = 5

-- A pair of connected conns, every wait on them bounded by LIMIT.
local function pair() return helper.pair(LIMIT) end

local NET = { nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" }
local PLAIN = { nil, "ETIMEDOUT: timed out", "ETIMEDOUT" }

-- Calls fn(...) and returns how long it took, then a table of its results.
local function timed(fn, ...)
  local t0 = so.now()
  local r = table.pack(fn(...))
  return so.now() - t0, r
end

local results = helper.results

-- Runs a test's body in a task of its own, so that a deadline that
-- outlives its function (a bug) cannot reach busted's own task, where
-- every later wait would fail at once and the run would spin.
local function isolated(body)
  return function()
    -- it waits once first, so that its failure is so.join's to report
    helper.join(so.spawn(function() so.sleep(0); return body() end), 20)
  end
end

describe("so.deadline", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("bounds many short reads that together take longer", isolated(function()
    local c, s = pair()
    -- The peer sends a byte every 20 ms: each read alone is short.
    local peer = so.spawn(function()
      for _ = 1, 100 do
        if not s:write("x") then break end
        so.sleep(0.02)
      end
      s:close()
    end)
    local n = 0
    local took, r = timed(so.deadline, 0.2, function()
      while true do
        local d, msg, name = c:read()
        if not d then return d, msg, name, n end
        n = n + #d
      end
    end)
    assert.same({ nil, NET[2], NET[3], n }, results(r))
    assert.is_true(n >= 3, n)  -- the reads did get bytes before
    assert.is_true(took >= 0.18 and took < 0.4, took)
    -- Outside the deadline the conn reads on as before, losing nothing.
    local d = c:read()
    assert.equal("x", d:sub(1, 1))
    c:close()
    helper.join(peer)
  end))

  it("ends a sleep early with nil, ETIMEDOUT", isolated(function()
    local took, r = timed(so.deadline, 0.05, so.sleep, 1)
    assert.same(PLAIN, results(r))
    assert.equal(3, r.n)
    assert.is_true(took >= 0.04 and took < 0.5, took)
    -- and sleeps that end in time are untouched
    took, r = timed(so.deadline, 1, so.sleep, 0.02)
    assert.equal(0, r.n)
    assert.is_true(took >= 0.015 and took < 0.5, took)
  end))

  it("fails every wait started after the deadline at once", isolated(function()
    local c, s = pair()
    local ch = so.channel()
    local l = assert(so.listen("127.0.0.1", 0))
    local h, p = l:sockname()
    local sleeper = so.spawn(function() so.sleep(10) end)
    local _ <close> = setmetatable({}, { __close = function()
      so.cancel(sleeper)
      c:close()
      s:close()
      l:close()
    end })
    local r = so.deadline(0.03, function()
      local out = {}
      out.sleep = { so.sleep(1) }  -- until the deadline
      local t1 = so.now()
      out.read = { c:read() }
      out.accept = { l:accept() }
      out.connect = { so.connect(h, p) }
      out.sleep2 = { so.sleep(1) }
      out.sleep0 = { so.sleep(0) }
      out.join = { so.join(sleeper) }
      out.recv = { ch:recv() }
      out.send = { ch:send(1) }
      out.first = { so.first(function() so.sleep(1) end) }
      out.took = so.now() - t1
      return out
    end)
    assert.same(PLAIN, r.sleep)
    assert.same(NET, r.read)
    assert.same(NET, r.accept)
    assert.same(NET, r.connect)
    assert.same(PLAIN, r.sleep2)
    assert.same(PLAIN, r.sleep0)
    assert.same(PLAIN, r.join)
    assert.same(PLAIN, r.recv)
    assert.same(PLAIN, r.send)
    assert.same(PLAIN, r.first)
    assert.is_true(r.took < 0.02, r.took)
    -- none of them left anything behind: the conn reads, the listener
    -- accepts, the channel is empty, the sleeper still runs
    assert.equal(0, #ch)
    assert.equal(0, so.stats().conns - before.conns - 2)
    assert.is_true(s:write("still here"))
    assert.equal("still here", c:read())
    assert.is_true(so.cancel(sleeper))
  end))

  it("with 0 seconds, fails every wait at once", isolated(function()
    local c, s = pair()
    local ch = so.channel()
    local t0 = so.now()
    assert.same(PLAIN, { so.deadline(0, so.sleep, 0) })
    assert.same(PLAIN, { so.deadline(0, so.sleep, 0.01) })
    assert.same(NET, { so.deadline(0, c.read, c) })
    assert.same(PLAIN, { so.deadline(0, ch.recv, ch) })
    assert.is_true(so.now() - t0 < 0.01)
    c:close()
    s:close()
  end))

  it("lets an operation that needs no wait succeed after the deadline",
     isolated(function()
    local c, s = pair()
    local r = { so.deadline(0.02, function()
      so.sleep(1)
      return c:write("late but taken")  -- the OS takes it at once
    end) }
    assert.same({ true }, r)
    assert.equal("late but taken", s:read())
    -- a value a channel holds is taken without waiting, too
    local ch = so.channel(1)
    assert.is_true(ch:send("queued"))
    r = { so.deadline(0.02, function()
      so.sleep(1)
      return ch:recv()
    end) }
    assert.same({ "queued" }, r)
    c:close()
    s:close()
  end))

  it("times out writes, shutdowns and connects with the socket wording",
     isolated(function()
    local c, s = pair()
    local took, r = timed(so.deadline, 0.1, function()
      local chunk = string.rep("w", 1024 * 1024)
      for _ = 1, 1024 do  -- nobody reads s: a write blocks
        local ok, msg, name = c:write(chunk)
        if not ok then return ok, msg, name end
      end
    end)
    assert.same(NET, results(r))
    assert.is_true(took >= 0.08 and took < 0.5, took)
    -- a shutdown behind the queued write
    r = { so.deadline(0.05, so.shutdown, c) }
    assert.same(NET, r)
    c:close()
    s:close()
    -- a connect that hangs: the listener's queue is full
    local l = assert(so.listen("127.0.0.1", 0, 1))
    local h, p = l:sockname()
    local conns = {}
    while true do
      local conn = so.deadline(0.1, so.connect, h, p)
      if not conn then break end
      conns[#conns + 1] = conn
      assert(#conns < 16, "the backlog never filled")
    end
    took, r = timed(so.deadline, 0.05, so.connect, h, p)
    assert.same(NET, results(r))
    assert.is_true(took >= 0.04 and took < 0.5, took)
    assert.equal(#conns, so.stats().conns - before.conns)  -- no conn left
    for _, conn in ipairs(conns) do conn:close() end
    l:close()
  end))

  it("uses the plain wording for joins, channels and so.first",
     isolated(function()
    local t = so.spawn(function() so.sleep(10) end)
    assert.same(PLAIN, { so.deadline(0.02, so.join, t) })
    local ch = so.channel()
    assert.same(PLAIN, { so.deadline(0.02, ch.recv, ch) })
    assert.same(PLAIN, { so.deadline(0.02, ch.send, ch, "v") })
    assert.equal(0, #ch)
    assert.same(PLAIN, { so.deadline(0.02, so.first,
                                     function() so.sleep(10) end,
                                     function() so.join(t) end) })
    assert.is_true(so.cancel(t))
  end))

  it("lets a shorter per-object timeout apply inside a longer deadline",
     isolated(function()
    local c, s = pair()
    c:settimeout(0.03)
    local took, r = timed(so.deadline, 1, c.read, c)
    assert.same(NET, results(r))
    assert.is_true(took < 0.5, took)
    c:settimeout(LIMIT)
    local t = so.spawn(function() so.sleep(10) end)
    took, r = timed(so.deadline, 1, so.join, t, 0.03)
    assert.same(PLAIN, results(r))
    assert.is_true(took < 0.5, took)
    local ch = so.channel()
    so.settimeout(ch, 0.03)
    took, r = timed(so.deadline, 1, ch.recv, ch)
    assert.same(PLAIN, results(r))
    assert.is_true(took < 0.5, took)
    -- and a deadline shorter than the object's timeout wins
    c:settimeout(5)
    took, r = timed(so.deadline, 0.03, c.read, c)
    assert.same(NET, results(r))
    assert.is_true(took < 0.5, took)
    assert.is_true(so.cancel(t))
    c:close()
    s:close()
  end))

  it("passes fn's arguments and results through", isolated(function()
    local r = table.pack(so.deadline(1, function(a, b, ...)
      so.sleep(0)
      return b, nil, a, select("#", ...)
    end, 1, 2, nil, nil))
    assert.equal(4, r.n)
    assert.same({ 2, nil, 1, 2 }, results(r))
    assert.equal(0, select("#", so.deadline(1, function() end)))
    local c, s = pair()
    local w = so.spawn(function() so.sleep(0.01); return s:write("data") end)
    assert.same({ "data" }, { so.deadline(1, c.read, c) })
    helper.join(w)
    c:close()
    s:close()
  end))

  it("propagates an error from fn, as raised", isolated(function()
    local ok, err = pcall(so.deadline, 1, function()
      so.sleep(0)
      error("boom")
    end)
    assert.is_false(ok)
    assert.matches("boom$", err)
    local E = {}
    assert.same({ false, E }, { pcall(so.deadline, 1, error, E) })
  end))

  it("leaves no deadline behind once fn returns or raises", isolated(function()
    so.deadline(0.02, function() end)
    local took, r = timed(so.sleep, 0.05)
    assert.equal(0, r.n)
    assert.is_true(took >= 0.04, took)
    pcall(so.deadline, 0.02, error, "x")
    took, r = timed(so.sleep, 0.05)
    assert.equal(0, r.n)
    assert.is_true(took >= 0.04, took)
    -- and a deadline that passed inside fn does not follow its caller
    so.deadline(0.01, so.sleep, 1)
    took, r = timed(so.sleep, 0.03)
    assert.equal(0, r.n)
  end))

  it("applies only inside fn, even when fn yields out of a coroutine",
     isolated(function()
    -- A generator that pauses inside its own deadline: the code that
    -- resumes it is not inside fn, and its waits have no deadline.
    local gen = coroutine.wrap(function()
      return so.deadline(0.05, function()
        coroutine.yield("inside")
        return so.sleep(1)
      end)
    end)
    assert.equal("inside", gen())
    local took, r = timed(so.sleep, 0.1)
    assert.same({}, results(r))  -- it slept, and returned nothing
    assert.is_true(took >= 0.09, took)
    -- back inside fn, past its deadline: the wait fails at once
    took, r = timed(gen)
    assert.same(PLAIN, results(r))
    assert.is_true(took < 0.05, took)
  end))

  it("raises on bad arguments", isolated(function()
    assert.has_error(function() so.deadline("soon", function() end) end)
    assert.has_error(function() so.deadline(1, "fn") end)
    assert.has_error(function() so.deadline(1) end)
  end))
end)

describe("nested so.deadline", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("an inner earlier deadline wins", isolated(function()
    local c, s = pair()
    local took, r = timed(so.deadline, 1, function()
      local inner = { so.deadline(0.05, c.read, c) }
      return inner, so.now()
    end)
    assert.same(NET, r[1])
    assert.is_true(took >= 0.04 and took < 0.5, took)
    c:close()
    s:close()
  end))

  it("an outer earlier deadline wins", isolated(function()
    local c, s = pair()
    local took, r = timed(so.deadline, 0.05, function()
      return so.deadline(1, c.read, c)
    end)
    assert.same(NET, results(r))
    assert.is_true(took >= 0.04 and took < 0.5, took)
    c:close()
    s:close()
  end))

  it("restores the outer deadline after the inner returns", isolated(function()
    local took, r = timed(so.deadline, 0.1, function()
      local inner = table.pack(so.deadline(10, function() return "in" end))
      assert.same({ "in" }, results(inner))
      return so.sleep(1)
    end)
    assert.same(PLAIN, results(r))
    assert.is_true(took >= 0.08 and took < 0.5, took)
    -- an inner earlier deadline, once left, no longer applies
    took, r = timed(so.deadline, 1, function()
      so.deadline(0.02, function() end)
      return so.sleep(0.05)
    end)
    assert.equal(0, r.n)
    assert.is_true(took >= 0.04 and took < 0.5, took)
  end))

  it("restores the outer deadline after the inner raises", isolated(function()
    local took, r = timed(so.deadline, 0.1, function()
      local ok = pcall(so.deadline, 10, function() so.sleep(0); error("in") end)
      assert.is_false(ok)
      return so.sleep(1)
    end)
    assert.same(PLAIN, results(r))
    assert.is_true(took >= 0.08 and took < 0.5, took)
    took, r = timed(so.deadline, 1, function()
      pcall(so.deadline, 0.02, function() so.sleep(0); error("in") end)
      return so.sleep(0.05)
    end)
    assert.equal(0, r.n)
    assert.is_true(took >= 0.04 and took < 0.5, took)
  end))

  it("an inner deadline that timed out leaves the outer one running",
     isolated(function()
    local took, r = timed(so.deadline, 0.15, function()
      assert.same(PLAIN, { so.deadline(0.03, so.sleep, 1) })
      local t1 = so.now()
      so.sleep(0.03)  -- the outer deadline is still ahead
      local slept = so.now() - t1
      return slept, so.sleep(1)
    end)
    assert.is_true(r[1] >= 0.025, r[1])
    assert.same({ nil, PLAIN[2], PLAIN[3] }, { r[2], r[3], r[4] })
    assert.is_true(took >= 0.13 and took < 0.5, took)
  end))
end)
