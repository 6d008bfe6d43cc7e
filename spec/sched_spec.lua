-- The scheduler: which task errors are printed, timeout wording, and
-- so.sleep(0) / coroutine.yield letting I/O and timers run.
local so = require "so"
local helper = require "helper"

-- How long a socket wait may take before a spec counts it as hung.
local LIMIT = 5

-- A pair of connected conns, every wait on them bounded by LIMIT.
local function pair() return helper.pair(LIMIT) end

local luahost = helper.run_script

describe("a task's error", function()
  it("is not printed when a task waits for it in so.join", function()
    local code, out, err = luahost([[
local so = require "so"
local t = so.spawn(function() so.sleep(0.01); error("handled", 0) end)
print(so.join(t))
local u = so.spawn(function() so.sleep(0.01); error("with a timeout", 0) end)
print(so.join(u, 5))
local v = so.spawn(function() so.sleep(0.01); error("by a task", 0) end)
local w = so.spawn(function() return so.join(v) end)
print(so.join(w))
-- two joiners
local x = so.spawn(function() so.sleep(0.01); error("twice", 0) end)
local y = so.spawn(function() return so.join(x) end)
print(so.join(x))
print(so.join(y))
]])
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("false\thandled\nfalse\twith a timeout\n"
                 .. "true\tfalse\tby a task\n"
                 .. "false\ttwice\ntrue\tfalse\ttwice\n", out)
  end)

  it("is not printed when so.first hands it to its caller", function()
    local code, out, err = luahost([[
local so = require "so"
print(pcall(so.first, function() so.sleep(0.01); error("in first", 0) end,
                      function() so.sleep(1) end))
]])
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("false\tin first\n", out)
  end)

  it("is printed, with its traceback and its so.spawn, when nobody waits",
     function()
    local code, out, err, path = luahost([[
local so = require "so"
local function work()
  so.sleep(0.01)
  error("nobody waits")
end
local t = so.spawn(work)
so.sleep(0.05)
print("still running")
]])
    assert.equal(0, code)
    assert.equal("still running\n", out)
    assert.equal(1, select(2, err:gsub(" ERROR %[task", "")), err)
    assert.matches("^" .. helper.log_line("ERROR") .. "[^\n]*:4: nobody waits\nstack traceback:\n", err)
    local tb = assert(err:find("stack traceback:", 1, true))
    local spawned = err:find(path .. ":6", tb, true)
    assert.truthy(spawned, "no line names the so.spawn (" .. path .. ":6):\n"
                  .. err)
    -- on a line after the traceback, the last one
    local last = err:match("([^\n]*)\n?$")
    assert.truthy(last:find(path .. ":6", 1, true), last)
  end)

  it("is printed when the join waiting for it timed out before it failed",
     function()
    local code, out, err = luahost([[
local so = require "so"
local t = so.spawn(function() so.sleep(0.05); error("too late", 0) end)
print(so.join(t, 0.01))
]])
    assert.equal(0, code)
    assert.equal("nil\tETIMEDOUT: timed out\tETIMEDOUT\n", out)
    assert.matches("^" .. helper.log_line("ERROR") .. "too late\nstack traceback:\n", err)
  end)

  it("is printed when the task that joined it was cancelled", function()
    local code, out, err = luahost([[
local so = require "so"
local t = so.spawn(function() so.sleep(0.02); error("orphan", 0) end)
local j = so.spawn(function() return so.join(t) end)
print(so.cancel(j))
]])
    assert.equal(0, code)
    assert.equal("true\n", out)
    assert.matches("^" .. helper.log_line("ERROR") .. "orphan\nstack traceback:\n", err)
  end)

  it("is printed only for the tasks nobody waits for", function()
    local code, out, err = luahost([[
local so = require "so"
local a = so.spawn(function() so.sleep(0.01); error("quiet", 0) end)
so.spawn(function() so.sleep(0.01); error("loud", 0) end)
print(so.join(a))
so.sleep(0.02)
]])
    assert.equal(0, code)
    assert.equal("false\tquiet\n", out)
    assert.matches("^" .. helper.log_line("ERROR") .. "loud\nstack traceback:\n", err)
    assert.is_nil(err:find("quiet", 1, true))
  end)
end)

describe("timeout wording", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("is \"ETIMEDOUT: timed out\" for so.join", function()
    local ch = so.channel()
    local t = so.spawn(function() return ch:recv() end)
    local TIMEDOUT = { nil, "ETIMEDOUT: timed out", "ETIMEDOUT" }
    assert.same(TIMEDOUT, { so.join(t, 0.01) })
    assert.same(TIMEDOUT, { t:join(0.01) })
    assert.is_true(ch:send("late"))  -- the task went on
    assert.same({ true, "late" }, { so.join(t, 1) })
  end)

  it("stays \"ETIMEDOUT: connection timed out\" for sockets", function()
    local c, s = pair()
    s:settimeout(0.01)
    local TIMEDOUT = { nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" }
    assert.same(TIMEDOUT, { s:read() })
    local l = assert(so.listen("127.0.0.1", 0))
    l:settimeout(0.01)
    assert.same(TIMEDOUT, { l:accept() })
    l:close()
    c:close()
    s:close()
  end)
end)

describe("so.sleep(0) and coroutine.yield", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  -- Starts a task that calls step() in a loop until stopped (bounded in
  -- time and in turns); returns the task and a function that stops it.
  local function spinner(step)
    local stop, spins = false, 0
    local t = so.spawn(function()
      local t0 = so.now()
      while not stop and spins < 1000000 and so.now() - t0 < 2 do
        step()
        spins = spins + 1
      end
      return spins
    end)
    return t, function() stop = true end
  end

  for _, case in ipairs({
    { "so.sleep(0)", function() so.sleep(0) end },
    { "coroutine.yield()", function() coroutine.yield() end },
  }) do
    local name, step = case[1], case[2]

    it("in a loop do not starve a task sleeping 0.05 s: " .. name, function()
      local t, stop = spinner(step)
      local t0 = so.now()
      local sleeper = so.spawn(function() so.sleep(0.05); return so.now() end)
      local ok, woke = so.join(sleeper, 3)
      stop()
      local spins = helper.join(t, 5)
      assert.is_true(ok)
      assert.is_true(woke - t0 < 1, woke - t0)
      assert.is_true(spins > 0)
    end)

    it("in a loop do not starve I/O: " .. name, function()
      local c, s = pair()
      local t, stop = spinner(step)
      local t0 = so.now()
      local reader = so.spawn(function() return s:read(), so.now() end)
      local writer = so.spawn(function()
        so.sleep(0.02)
        return c:write("ping")
      end)
      local ok, d, at = so.join(reader, 3)
      stop()
      helper.join(t, 5)
      helper.join(writer, 1)
      assert.is_true(ok)
      assert.equal("ping", d)
      assert.is_true(at - t0 < 1, at - t0)
      c:close()
      s:close()
    end)
  end

  it("take turns between tasks that spin", function()
    local order = {}
    local a = so.spawn(function()
      for _ = 1, 50 do so.sleep(0); order[#order + 1] = "a" end
    end)
    local b = so.spawn(function()
      for _ = 1, 50 do coroutine.yield(); order[#order + 1] = "b" end
    end)
    helper.join(a, 2)
    helper.join(b, 2)
    local run, longest = 1, 1
    for i = 2, #order do
      run = order[i] == order[i - 1] and run + 1 or 1
      longest = math.max(longest, run)
    end
    assert.equal(100, #order)
    assert.is_true(longest <= 2, longest)
  end)
end)

describe("a task's spawn site", function()
  it("lives as long as the task, however long its file's path", function()
    -- Over 40 bytes, Lua does not intern a string: the host must keep the
    -- one it stores, not a copy the collector may free.
    local dir = os.tmpname()
    os.remove(dir)
    dir = dir .. "-" .. string.rep("d", 60)
    assert(os.execute("mkdir " .. helper.shq(dir)))
    local path = dir .. "/spawner.lua"
    helper.spit(path, [[
local so = require "so"
local ts = {}
for i = 1, 20 do ts[i] = so.spawn(function() so.sleep(0.2) end) end
for i = 1, 20 do ts[i] = so.spawn(function() so.sleep(0.2) end) end
for _ = 1, 5 do collectgarbage("collect"); local junk = {} ; for i = 1, 1000 do junk[i] = ("x"):rep(60) .. i end end
local bad = 0
for _, t in ipairs(so.tasks()) do
  if t.id ~= 1 and not t.spawned:find("spawner.lua:%d+$") then bad = bad + 1 end
end
print(bad)
]])
    local code, out, err = helper.run(helper.luahost .. " " .. helper.shq(path))
    os.execute("rm -rf " .. helper.shq(dir))
    assert.equal(0, code, err)
    assert.equal("0\n", out)
  end)
end)
