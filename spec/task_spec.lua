-- Tasks: so.spawn, so.join, so.sleep, plain yields, errors.
local so = require "so"
local helper = require "helper"

local luahost = helper.run_script

describe("so.spawn", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("runs the function at once, until it first waits", function()
    local steps = {}
    local t = so.spawn(function(a, b)
      steps[#steps + 1] = "started " .. a .. b
      so.sleep(0)
      steps[#steps + 1] = "resumed"
      return "r1", "r2"
    end, "x", "y")
    steps[#steps + 1] = "spawn returned"
    assert.same({ "started xy", "spawn returned" }, steps)
    assert.same({ true, "r1", "r2" }, { so.join(t) })
    assert.same({ "started xy", "spawn returned", "resumed" }, steps)
    assert.matches("^task %(done%)", tostring(t))
  end)

  it("returns a task handle, not a coroutine", function()
    local t = so.spawn(function() end)
    assert.equal("userdata", type(t))
    assert.has_error(function() coroutine.resume(t) end)
    assert.has_error(function() so.spawn("f") end,
                     "bad argument #1 to 'spawn' (function expected, got string)")
  end)

  it("keeps a failing task's error to itself", function()
    local other = so.spawn(function() so.sleep(0.02); return "fine" end)
    local bad = so.spawn(function() so.sleep(0.01); error("boom") end)
    local ok, err = so.join(bad)
    assert.is_false(ok)
    assert.matches("boom$", err)
    assert.same({ true, "fine" }, { so.join(other) })
  end)

  it("runs a failing task's <close> variables", function()
    local closed = false
    local t = so.spawn(function()
      local _ <close> = setmetatable({}, { __close = function() closed = true end })
      so.sleep(0)
      error("after a wait")
    end)
    assert.is_false((so.join(t)))
    assert.is_true(closed)
  end)

  it("runs 10,000 tasks, and wakes a chain of 1,000 joins without nesting",
     function()
    local done = 0
    for _ = 1, 10000 do
      so.spawn(function() so.sleep(0); done = done + 1 end)
    end
    assert.is_true(helper.wait_until(function() return done == 10000 end))
    -- Each task joins the one before: the first ending wakes them all, one
    -- after another, from the ready queue rather than inside each other.
    local gate = so.spawn(function() so.sleep(0.01) return 0 end)
    local prev = gate
    for _ = 1, 1000 do
      local p = prev
      prev = so.spawn(function()
        local _, n = so.join(p)
        return n + 1
      end)
    end
    assert.same({ true, 1000 }, { so.join(prev) })
  end)

  it("runs a plain coroutine.yield again on the next loop turn", function()
    local turns = 0
    local spinner = so.spawn(function()
      for _ = 1, 5 do
        coroutine.yield("ignored")
        turns = turns + 1
      end
      return turns
    end)
    local sleeper = so.spawn(function() so.sleep(0); return turns end)
    assert.same({ true, 5 }, { so.join(spinner) })
    local _, seen = so.join(sleeper)
    assert.is_true(seen < 5)  -- the spinner did not starve the loop
  end)

  it("refuses coroutine.resume and coroutine.close of a task", function()
    local th
    local l = assert(so.listen("127.0.0.1", 0))
    local t = so.spawn(function()
      th = coroutine.running()
      return l:accept()
    end)
    assert.same({ false, "cannot resume a task (the host resumes it; "
                  .. "so.join waits for it)" }, { coroutine.resume(th, "forged") })
    assert.has_error(function() coroutine.close(th) end, "cannot close a task")
    assert.equal("suspended", coroutine.status(th))
    -- the task still waits for a real connection
    local h, p = l:sockname()
    local c = assert(so.connect(h, p))
    local ok, s = so.join(t, 1)
    assert.is_true(ok)
    s:close()
    c:close()
    l:close()
    -- the script's own coroutines are untouched
    local co = coroutine.create(function(x) return x * 2 end)
    assert.same({ true, 42 }, { coroutine.resume(co, 21) })
    assert.is_true(coroutine.close(co))
    assert.has_error(function() coroutine.resume(1) end,
                     "bad argument #1 to 'resume' (thread expected, got number)")
  end)

  it("spawns with many arguments, and joins many results", function()
    local args = {}
    for i = 1, 300 do args[i] = i end
    local t = so.spawn(function(...)
      so.sleep(0)
      return ...
    end, table.unpack(args))
    local r = table.pack(so.join(t))  -- joined while it runs
    assert.equal(301, r.n)
    assert.equal(300, r[301])
    local big = so.spawn(function()
      local many = {}
      for i = 1, 5000 do many[i] = i end
      return table.unpack(many)
    end)
    r = table.pack(so.join(big))  -- joined when it has ended
    assert.equal(5001, r.n)
    assert.equal(5000, r[5001])
  end)

  it("spawns a chain of 1,000 tasks that spawn before they wait", function()
    local depth = 0
    local function chain(n)
      depth = math.max(depth, n)
      if n < 1000 then so.spawn(chain, n + 1) end
      so.sleep(0)
    end
    so.join(so.spawn(chain, 1))
    assert.is_true(helper.wait_until(function() return depth == 1000 end))
  end)

  it("keeps the error value as raised, whatever it is", function()
    local E = setmetatable({}, { __tostring = function() return nil end })
    local B = setmetatable({}, { __tostring = function() error("bad tostring") end })
    for _, v in ipairs({ 42, E, B }) do
      local t = so.spawn(function() so.sleep(0); error(v) end)
      local ok, err = so.join(t)
      assert.is_false(ok)
      assert.equal(v, err)
    end
  end)

  it("lets a script's coroutines wait inside a task (coroutine.wrap iterators)",
     function()
    local l = assert(so.listen("127.0.0.1", 0))
    local h, p = l:sockname()
    local writer = so.spawn(function()
      local c <close> = l:accept()
      for i = 1, 3 do c:write("line" .. i .. "\n"); so.sleep(0.01) end
    end)
    local c <close> = assert(so.connect(h, p))
    local function lines(conn)
      return coroutine.wrap(function()
        local buf = ""
        while true do
          local d = assert(conn:read())
          if d == "" then return end
          buf = buf .. d
          for line in buf:gmatch("([^\n]*)\n") do coroutine.yield(line) end
          buf = buf:match("[^\n]*$")
        end
      end)
    end
    local got = {}
    for line in lines(c) do got[#got + 1] = line end
    assert.same({ "line1", "line2", "line3" }, got)
    helper.join(writer)
    l:close()
    -- two levels deep, with coroutine.resume, and a timeout on the way
    local inner = coroutine.create(function()
      local ok, msg, name = so.join(so.spawn(function() so.sleep(1) end), 0.01)
      coroutine.yield(name)
      so.sleep(0.01)
      return "done"
    end)
    local outer = coroutine.wrap(function()
      local _, a = coroutine.resume(inner)
      local _, b = coroutine.resume(inner)
      return a, b
    end)
    assert.same({ "ETIMEDOUT", "done" }, { outer() })
  end)

  it("passes a wait up even after a failed resume of a coroutine in the chain",
     function()
    local l = assert(so.listen("127.0.0.1", 0))
    local h, p = l:sockname()
    local writer = so.spawn(function()
      local c <close> = l:accept()
      so.sleep(0.05)
      c:write("hello")
    end)
    local conn <close> = assert(so.connect(h, p))
    local co0, co1
    co1 = coroutine.create(function()
      -- co0 is running this chain: the resume fails, and must not untag it
      assert.same({ false, "cannot resume non-suspended coroutine" },
                  { coroutine.resume(co0) })
      return so.read(conn)
    end)
    co0 = coroutine.create(function() return coroutine.resume(co1) end)
    assert.same({ true, true, "hello" }, { coroutine.resume(co0) })
    helper.join(writer)
    l:close()
  end)

  it("refuses to resume a coroutine that waits in the host", function()
    local co
    co = coroutine.create(function() so.sleep(0.05) end)
    local t = so.spawn(function() coroutine.resume(co) end)
    assert.same({ false, "cannot resume a coroutine that waits in the host" },
                { coroutine.resume(co) })
    assert.has_error(function() coroutine.close(co) end,
                     "cannot close a coroutine that waits in the host")
    so.join(t)
    assert.equal("dead", coroutine.status(co))
  end)

  it("keeps coroutine.wrap's errors as Lua gives them", function()
    assert.same({ false, "boom" },
                { pcall(coroutine.wrap(function() error("boom", 0) end)) })
    local done = coroutine.wrap(function() end)
    done()
    assert.same({ false, "cannot resume dead coroutine" }, { pcall(done) })
    local E = {}
    assert.same({ false, E }, { pcall(coroutine.wrap(function() error(E) end)) })
    assert.has_error(function() coroutine.wrap(1) end,
                     "bad argument #1 to 'wrap' (function expected, got number)")
  end)

  it("lets a script use its own coroutines inside a task", function()
    local gen = coroutine.wrap(function()
      for i = 1, 3 do coroutine.yield(i) end
    end)
    assert.same({ 1, 2, 3 }, { gen(), gen(), gen() })
  end)
end)

describe("so.join", function()
  it("returns true and the results, or false and the error", function()
    local t = so.spawn(function() return 1, nil, 3 end)
    local r = table.pack(so.join(t))
    assert.equal(4, r.n)
    assert.same({ true, 1, nil, 3 }, { r[1], r[2], r[3], r[4] })
    local e = so.spawn(function() error({ code = 7 }) end)
    local ok, err = so.join(e)
    assert.is_false(ok)
    assert.same({ code = 7 }, err)
    -- joining again gives the same
    assert.same({ true, 1, nil, 3 }, { so.join(t) })
  end)

  it("times out with nil, ETIMEDOUT, and the task goes on", function()
    local t = so.spawn(function() so.sleep(0.1); return "late" end)
    local ok, msg, name = so.join(t, 0.01)
    assert.is_nil(ok)
    assert.equal("ETIMEDOUT", name, msg)
    assert.same({ true, "late" }, { so.join(t) })
  end)

  it("wakes every task joining the same task", function()
    local t = so.spawn(function() so.sleep(0.01); return "x" end)
    local a = so.spawn(function() return select(2, so.join(t)) end)
    local b = so.spawn(function() return select(2, so.join(t)) end)
    assert.same({ true, "x" }, { so.join(a) })
    assert.same({ true, "x" }, { so.join(b) })
  end)
end)

describe("so.sleep and so.now", function()
  it("sleeps about as long as asked, in order", function()
    local order = {}
    local t0 = so.now()
    local a = so.spawn(function() so.sleep(0.06); order[#order + 1] = "a" end)
    local b = so.spawn(function() so.sleep(0.02); order[#order + 1] = "b" end)
    so.join(a)
    so.join(b)
    assert.same({ "b", "a" }, order)
    assert.is_true(so.now() - t0 >= 0.05)
    assert.has_error(function() so.sleep(-1) end)
    assert.has_error(function() so.sleep("soon") end)
  end)
end)

describe("a failing task in a script", function()
  it("reports an error raised by a <close> variable as it unwinds", function()
    local code, _, err = luahost([[
      local so = require "so"
      so.spawn(function()
        local _ <close> = setmetatable({}, { __close = function() error("in close") end })
        so.sleep(0)
        error("first")
      end)
    ]])
    assert.equal(0, code)
    assert.matches(helper.log_line("ERROR") .. "[^\n]*: first\nstack traceback:", err)
    assert.matches(helper.log_line("ERROR") .. "error in a <close> variable: [^\n]*: in close", err)
  end)

  it("is printed with its traceback and affects no other task", function()
    local code, out, err = luahost([[
      local so = require "so"
      local function inner() error("task failed here") end
      so.spawn(function() so.sleep(0.01); inner() end)
      so.spawn(function() so.sleep(0.05); print("other task finished") end)
    ]])
    assert.equal(0, code)
    assert.equal("other task finished\n", out)
    assert.matches(helper.log_line("ERROR") .. "[^\n]*:2: task failed here\nstack traceback:\n", err)
    assert.matches("in %a* ?[%w']*inner", err)
  end)

  it("with a non-string error value is still reported", function()
    local code, _, err = luahost([[
      local so = require "so"
      so.spawn(function() error(setmetatable({}, { __tostring = function() return "custom" end })) end)
      so.spawn(function() error({}) end)
    ]])
    assert.equal(0, code)
    assert.matches(helper.log_line("ERROR") .. "custom\n", err)
    assert.matches(helper.log_line("ERROR") .. "%(error object is a table value%)", err)
  end)
end)
