-- so.first: the first of several functions to return wins, the others are
-- cancelled; over real loopback sockets.
local so = require "so"
local helper = require "helper"

-- How long a socket wait may take before a spec counts it as hung.
local LIMIT = 5

-- A pair of connected conns, every wait on them bounded by LIMIT.
local function pair() return helper.pair(LIMIT) end

local closer = helper.closer

local luahost = helper.run_script

local results = helper.results

describe("so.first", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("returns the index and the results of the first to return", function()
    local t0 = so.now()
    local r = table.pack(so.first(
      function() so.sleep(0.3); return "slow" end,
      function() so.sleep(0.01); return "fast", nil, 3 end,
      function() so.sleep(0.2); return "middle" end))
    assert.equal(4, r.n)
    assert.same({ 2, "fast", nil, 3 }, results(r))
    assert.is_true(so.now() - t0 < 0.2)
    -- a function that returns nothing: just its index
    r = table.pack(so.first(function() so.sleep(1) end,
                            function() so.sleep(0.01) end))
    assert.equal(1, r.n)
    assert.equal(2, r[1])
    -- one function
    assert.same({ 1, "only" },
                { so.first(function() so.sleep(0); return "only" end) })
  end)

  it("runs each function in its own task", function()
    local me = coroutine.running()
    local threads = {}
    so.first(function() threads[1] = coroutine.running(); so.sleep(0.01) end,
             function() threads[2] = coroutine.running(); so.sleep(1) end)
    assert.are_not.equal(me, threads[1])
    assert.are_not.equal(me, threads[2])
    assert.are_not.equal(threads[1], threads[2])
  end)

  it("cancels the others before it returns: their <close> variables have run",
     function()
    local log, ran_after = {}, {}
    local c, s = pair()
    local r = table.pack(so.first(
      function()
        local _ <close> = closer(log, "sleeper")
        so.sleep(10)
        ran_after.sleeper = true
      end,
      function()
        local conn <close> = s
        local _ <close> = closer(log, "reader a")
        local _ <close> = closer(log, "reader b")
        conn:read()
        ran_after.reader = true
      end,
      function()
        so.sleep(0.02)
        return "winner"
      end))
    assert.same({ 3, "winner" }, results(r))
    -- at once, not later: the losers ended inside so.first
    table.sort(log)
    assert.same({ "reader a", "reader b", "sleeper" }, log)
    assert.equal(0, so.stats().tasks - before.tasks)
    assert.matches("^conn %(closed%)", tostring(s))
    assert.equal(1, so.stats().conns - before.conns)
    assert.equal("", c:read())  -- the peer saw the loser's conn close
    so.sleep(0.02)
    assert.same({}, ran_after)
    c:close()
  end)

  it("closes each loser's <close> variables in reverse order", function()
    local log = {}
    so.first(function()
      local _ <close> = closer(log, "1")
      local _ <close> = closer(log, "2")
      local _ <close> = closer(log, "3")
      so.sleep(10)
    end, function() so.sleep(0.01) end)
    assert.same({ "3", "2", "1" }, log)
  end)

  it("does not start the others when the first returns without waiting",
     function()
    local started = {}
    local r = table.pack(so.first(
      function() return "now", "and", "here" end,
      function() started[2] = true; so.sleep(1) end,
      function() started[3] = true end))
    assert.same({ 1, "now", "and", "here" }, results(r))
    assert.same({}, started)
    assert.equal(0, so.stats().tasks - before.tasks)
  end)

  it("lets the second win when it returns before waiting, the first waiting",
     function()
    local log = {}
    local r = { so.first(
      function() local _ <close> = closer(log, "1"); so.sleep(1) end,
      function() return "quick" end) }
    assert.same({ 2, "quick" }, r)
    assert.same({ "1" }, log)
  end)

  it("waits for a read or a sleep, whichever comes first", function()
    local c, s = pair()
    -- the data comes first
    local w = so.spawn(function() so.sleep(0.02); return s:write("data") end)
    local t0 = so.now()
    local r = table.pack(so.first(function() return c:read() end,
                                  function() so.sleep(1) end))
    assert.same({ 1, "data" }, results(r))
    assert.is_true(so.now() - t0 < 0.5)
    helper.join(w)
    -- the sleep comes first
    t0 = so.now()
    r = table.pack(so.first(function() return c:read() end,
                            function() so.sleep(0.05) end))
    assert.same({ 2 }, results(r))
    local took = so.now() - t0
    assert.is_true(took >= 0.04 and took < 0.5, took)
    -- the cancelled read lost nothing, and left the conn free to read
    assert.is_true(s:write("abc"))
    assert.equal("abc", c:read())
    -- many times over, with the data about to arrive
    c:settimeout(1)
    for i = 1, 50 do
      assert.is_true(s:write("x"))
      local got = ""
      local n, d = so.first(function() return c:read() end,
                            function() so.sleep(0) end)
      if n == 1 then got = d else got = c:read() end
      assert.equal("x", got, "round " .. i)
    end
    c:close()
    s:close()
  end)

  it("loses no byte of a losing read whose data is there at the same time",
     function()
    local a, pa = pair()
    local b, pb = pair()
    a:settimeout(0.5)
    b:settimeout(0.5)
    assert.is_true(pa:write("A"))
    assert.is_true(pb:write("B"))
    so.sleep(0.01)  -- both have arrived
    local n, d = so.first(function() return a:read() end,
                          function() return b:read() end)
    local winner, loser = "A", { b, "B" }
    if n == 2 then winner, loser = "B", { a, "A" } end
    assert.equal(winner, d)
    -- the loser was cancelled: its bytes are there for the next read
    assert.same({ loser[2] }, { loser[1]:read() })
    a:close(); pa:close(); b:close(); pb:close()
  end)

  it("loses no byte of a losing read whose data comes as the winner returns",
     function()
    local c, s = pair()
    c:settimeout(0.5)
    local lost
    for i = 1, 20 do
      -- The writer's timer and the winner's are due in the same timer
      -- pass, the writer's first: the bytes reach c in the loop turn in
      -- which the winner returns, before so.first's caller runs again.
      local w = so.spawn(function() so.sleep(0.005); return s:write("x") end)
      local n, d = so.first(function() so.sleep(0.005); return "timer" end,
                            function() return c:read() end)
      if n == 1 then d = c:read() end  -- the loser's read left it there
      assert.same({ true, true }, { so.join(w, 1) })
      if d ~= "x" then
        lost = string.format("round %d: so.first gave %s, then the read %s",
                             i, n, tostring(d))
        break
      end
    end
    assert.is_nil(lost)
    c:close()
    s:close()
  end)

  it("raises in the caller an error raised in one, and cancels the others",
     function()
    local log = {}
    local ok, err = pcall(so.first,
      function() local _ <close> = closer(log, "sleeper"); so.sleep(10) end,
      function() so.sleep(0.01); error("boom") end)
    assert.is_false(ok)
    assert.matches("boom$", err)
    assert.same({ "sleeper" }, log)
    assert.equal(0, so.stats().tasks - before.tasks)
    -- an error value is kept as raised
    local E = {}
    assert.same({ false, E },
                { pcall(so.first, function() so.sleep(0); error(E) end,
                        function() so.sleep(1) end) })
    -- and raised without a wait, the others are not started
    local started = false
    ok, err = pcall(so.first, function() error("at once", 0) end,
                    function() started = true end)
    assert.same({ false, "at once" }, { ok, err })
    assert.is_false(started)
  end)

  it("prints nothing for an error it hands to its caller", function()
    local code, out, err = luahost([[
      local so = require "so"
      print(pcall(so.first, function() so.sleep(0.01); error("boom", 0) end,
                            function() so.sleep(1) end))
      print(pcall(so.first, function() error("at once", 0) end))
    ]])
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("false\tboom\nfalse\tat once\n", out)
  end)

  it("prints nothing for a loser that fails as the winner returns", function()
    -- Both sleeps end in the same timer pass: the first returns, the
    -- second raises before so.first's caller runs again.
    local code, out, err = luahost([[
      local so = require "so"
      print(pcall(so.first, function() so.sleep(0.01); return "a" end,
                            function() so.sleep(0.01); error("loser", 0) end))
    ]])
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("true\t1\ta\n", out)
  end)

  it("leaves no task, conn or descriptor behind when conns lose", function()
    local l = assert(so.listen("127.0.0.1", 0))
    local h, p = l:sockname()
    local accepted = {}
    local acceptor = so.spawn(function()
      for i = 1, 2 do accepted[i] = assert(l:accept()) end
    end)
    local r = { so.first(
      function()
        local c <close> = assert(so.connect(h, p))
        return c:read()
      end,
      function()
        local c <close> = assert(so.connect(h, p))
        return c:read()
      end,
      function() so.sleep(0.05); return "timeout" end) }
    assert.same({ 3, "timeout" }, r)
    helper.join(acceptor)
    assert.equal(2, so.stats().conns - before.conns)  -- only the accepted
    for i = 1, 2 do
      assert.equal("", accepted[i]:read())
      accepted[i]:close()
    end
    l:close()
  end)

  it("returns nil, ETIMEDOUT under so.deadline, and cancels the functions",
     function()
    local c, s = pair()
    local log = {}
    local t0 = so.now()
    -- in a task of its own: a deadline that outlived so.deadline (a bug)
    -- would make every later wait of busted's task fail at once
    local r = table.pack(helper.join(so.spawn(function()
      return so.deadline(0.05, so.first,
        function()
          local _ <close> = closer(log, "reader")
          return c:read()
        end,
        function()
          local _ <close> = closer(log, "sleeper")
          so.sleep(1)
          return "slept"
        end)
    end), 5))
    local took = so.now() - t0
    assert.same({ nil, "ETIMEDOUT: timed out", "ETIMEDOUT" }, results(r))
    assert.is_true(took >= 0.04 and took < 0.5, took)
    table.sort(log)
    assert.same({ "reader", "sleeper" }, log)
    assert.equal(0, so.stats().tasks - before.tasks)
    -- the reader's wait was abandoned: the conn reads on
    assert.is_true(s:write("on"))
    assert.equal("on", c:read())
    c:close()
    s:close()
  end)

  it("ends with the caller when a task waiting in it is cancelled", function()
    local c, s = pair()
    local log, ran_after = {}, {}
    local t = so.spawn(function()
      local _ <close> = closer(log, "caller")
      so.first(
        function()
          local _ <close> = closer(log, "reader")
          s:read()
          ran_after.reader = true
        end,
        function()
          local _ <close> = closer(log, "sleeper")
          so.sleep(10)
          ran_after.sleeper = true
        end)
      ran_after.caller = true
    end)
    assert.equal(3, so.stats().tasks - before.tasks)
    assert.is_true(so.cancel(t))
    assert.equal(0, so.stats().tasks - before.tasks)
    assert.equal("caller", log[3])  -- the tasks so.first started end first
    table.sort(log)
    assert.same({ "caller", "reader", "sleeper" }, log)
    assert.same({ false, "cancelled" }, { so.join(t) })
    assert.is_true(c:write("late"))
    so.sleep(0.02)
    assert.same({}, ran_after)
    assert.equal("late", s:read())
    c:close()
    s:close()
  end)

  it("raises on bad arguments", function()
    assert.has_error(function() so.first() end)
    assert.has_error(function() so.first("x", function() end) end)
    assert.has_error(function() so.first(42) end)
  end)
end)
