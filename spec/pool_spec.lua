-- so.pool: keep-alive pools of idle conns by key, against echo servers in
-- this process that record each accepted conn (by the client's port) and
-- can close it or send on it while it idles in the pool.
local so = require "so"
local pool = require "so.pool"
local helper = require "helper"

local DEFAULTS = { max_idle = 32, idle_timeout = 30 }

local read_n = helper.read_n

-- An echo server. rec.accepts counts connections, rec.ports lists the
-- peer port of each (the client's local port) in order, rec.ends[port]
-- is the server's end of a connection until it closes, rec.eofs counts
-- the connections the client closed. rec:stop() closes it all. With a
-- path, a Unix socket there.
local function server(path)
  local rec = { accepts = 0, ports = {}, ends = {}, eofs = 0 }
  local l
  local function handler(c)
    rec.accepts = rec.accepts + 1
    local _, port = so.peername(c)
    port = port or rec.accepts   -- (a Unix client has no name)
    rec.ports[#rec.ports + 1] = port
    rec.ends[port] = c
    while true do
      local d = c:read()
      if d == "" then rec.eofs = rec.eofs + 1 end
      if not d or d == "" then break end
      if not c:write(d) then break end
    end
    rec.ends[port] = nil
    c:close()
  end
  if path then
    l = assert(so.listen("unix:" .. path))
    so.spawn(function()
      while true do
        local c = l:accept()
        if not c then return end
        so.spawn(handler, c)
      end
    end)
  else
    l, rec.host, rec.port = helper.server(handler)
  end
  rec.path = path
  function rec.connect()
    local c = assert(so.connect(path and "unix:" .. path or rec.host,
                                rec.port, 5))
    c:settimeout(5)
    return c
  end
  function rec:stop()
    l:close()
    for _, c in pairs(self.ends) do c:close() end
  end
  return rec
end

-- One request and its answer on c (an echo).
local function request(c, msg)
  msg = msg or "ping"
  assert(c:write(msg))
  assert.equal(msg, read_n(c, #msg))
end

local function port_of(c)
  local _, port = so.sockname(c)
  return port
end

local function is_closed(c)
  local ok, err = pcall(so.readable, c)
  return not ok and err:find("attempt to use a closed conn", 1, true) ~= nil
end

-- Connects n conns, each after one request: an array.
local function conns(rec, n)
  local list = {}
  for i = 1, n do
    list[i] = rec.connect()
    request(list[i])
  end
  return list
end

describe("so.pool", function()
  local before, rec
  before_each(function()
    pool.clear()
    pool.configure(DEFAULTS)
    before = helper.snapshot()
    rec = server()
  end)
  after_each(function()
    pool.clear()
    pool.configure(DEFAULTS)
    rec:stop()
    -- the server's tasks end a loop turn later: not in the next snapshot
    helper.wait_until(function()
      local st = so.stats()
      return st.tasks <= before.tasks and st.conns <= before.conns
    end, 2)
  end)

  it("hands the conn put back to the next get: one connection serves every "
     .. "request", function()
    assert.is_nil(pool.get("a"))
    local c = rec.connect()
    request(c, "one")
    assert.equal(port_of(c), rec.ports[1])
    assert.is_true(pool.put("a", c))
    assert.equal(1, pool.count("a"))
    assert.is_nil(pool.get("b"))               -- keys are apart
    for i = 2, 5 do
      local again = pool.get("a")
      assert.equal(c, again)
      assert.equal(0, pool.count("a"))
      assert.equal(rec.ports[1], port_of(again))  -- the same connection
      request(again, "request " .. i)
      assert.is_true(pool.put("a", again))
    end
    assert.equal(1, rec.accepts)
    assert.same({ rec.ports[1] }, rec.ports)
    pool.clear()
    rec:stop()
    helper.assert_clean(before)
  end)

  it("hands out the most recently put first", function()
    local cs = conns(rec, 3)
    for i = 1, 3 do assert.equal(rec.ports[i], port_of(cs[i])) end
    for i = 1, 3 do assert.is_true(pool.put("k", cs[i])) end
    assert.equal(3, pool.count("k"))
    for i = 3, 1, -1 do
      local c = pool.get("k")
      assert.equal(cs[i], c)
      assert.equal(rec.ports[i], port_of(c))
    end
    assert.is_nil(pool.get("k"))
    -- interleaved
    pool.put("k", cs[1])
    assert.equal(cs[1], pool.get("k"))
    pool.put("k", cs[1])
    pool.put("k", cs[2])
    assert.equal(cs[2], pool.get("k"))
    pool.put("k", cs[3])
    assert.equal(cs[3], pool.get("k"))
    assert.equal(cs[1], pool.get("k"))
    for _, c in ipairs(cs) do request(c) end   -- all still good
    assert.equal(3, rec.accepts)
    for _, c in ipairs(cs) do c:close() end
    rec:stop()
    helper.assert_clean(before)
  end)

  it("never hands out a conn the server closed while it idled, and closes it",
     function()
    local cs = conns(rec, 3)
    for _, c in ipairs(cs) do pool.put("k", c) end
    -- the server closes the newest two
    rec.ends[port_of(cs[3])]:close()
    rec.ends[port_of(cs[2])]:close()
    assert.is_true(helper.wait_until(function()
      return so.readable(cs[3]) and so.readable(cs[2])
    end, 5))
    local n = so.stats().conns
    local c = pool.get("k")
    assert.equal(cs[1], c)
    assert.equal(n - 2, so.stats().conns)
    assert.is_true(is_closed(cs[3]))
    assert.is_true(is_closed(cs[2]))
    assert.equal(0, pool.count("k"))
    request(c)
    -- all of them closed: nil
    pool.put("k", c)
    rec.ends[port_of(c)]:close()
    assert.is_true(helper.wait_until(function() return so.readable(c) end, 5))
    assert.is_nil(pool.get("k"))
    assert.is_true(is_closed(c))
    assert.equal(0, pool.count())
    rec:stop()
    helper.assert_clean(before)
  end)

  it("never hands out a conn on which unread bytes arrived, and closes it",
     function()
    local cs = conns(rec, 2)
    pool.put("k", cs[1])
    pool.put("k", cs[2])
    assert(rec.ends[port_of(cs[2])]:write("unasked"))
    assert.is_true(helper.wait_until(function()
      return so.readable(cs[2])
    end, 5))
    local n = so.stats().conns
    assert.equal(cs[1], pool.get("k"))
    assert.equal(n - 1, so.stats().conns)
    assert.is_true(is_closed(cs[2]))
    -- put itself refuses a conn that is not idle: false, and closed
    assert(rec.ends[port_of(cs[1])]:write("more"))
    assert.is_true(helper.wait_until(function()
      return so.readable(cs[1])
    end, 5))
    assert.is_false(pool.put("k", cs[1]))
    assert.is_true(is_closed(cs[1]))
    assert.equal(0, pool.count("k"))
    -- and one the server closed (EOF arrived)
    local c = rec.connect()
    request(c)
    rec.ends[port_of(c)]:close()
    assert.is_true(helper.wait_until(function() return so.readable(c) end, 5))
    assert.is_false(pool.put("k", c))
    assert.is_true(is_closed(c))
    assert.equal(0, pool.count())
    rec:stop()
    helper.assert_clean(before)
  end)

  it("closes conns that idled past their time, by put's idle_seconds or "
     .. "the configured idle_timeout", function()
    local cs = conns(rec, 6)
    pool.put("k", cs[1], 0.05)
    pool.put("k", cs[2])                      -- 30 s
    so.sleep(0.1)
    assert.equal(2, pool.count("k"))          -- looked at only when used
    assert.equal(cs[2], pool.get("k"))
    assert.is_nil(pool.get("k"))              -- cs[1] expired
    assert.is_true(is_closed(cs[1]))
    assert.is_false(is_closed(cs[2]))
    -- the default, from configure; conns already put keep their time
    pool.put("k", cs[2])                      -- 30 s
    assert.same({ max_idle = 32, idle_timeout = 0.05 },
                pool.configure { idle_timeout = 0.05 })
    pool.put("k", cs[3])                      -- 0.05 s
    so.sleep(0.1)
    assert.equal(cs[2], pool.get("k"))
    assert.equal(0, pool.count("k"))
    assert.is_true(is_closed(cs[3]))
    -- a put sweeps the key's expired conns
    pool.put("k", cs[4], 0.05)
    pool.put("k", cs[5], 0.05)
    so.sleep(0.1)
    pool.put("k", cs[6], 10)
    assert.equal(1, pool.count("k"))
    assert.is_true(is_closed(cs[4]))
    assert.is_true(is_closed(cs[5]))
    -- 0: never reused
    pool.put("k", cs[2], 0)
    assert.equal(cs[6], pool.get("k"))
    assert.is_nil(pool.get("k"))
    assert.is_true(is_closed(cs[2]))
    assert.is_true(helper.wait_until(function() return rec.eofs == 5 end, 5))
    cs[6]:close()
    rec:stop()
    helper.assert_clean(before)
  end)

  it("keeps at most max_idle per key: the oldest closes to make room",
     function()
    assert.same({ max_idle = 3, idle_timeout = 30 },
                pool.configure { max_idle = 3 })
    local cs = conns(rec, 7)
    for i = 1, 4 do assert.is_true(pool.put("a", cs[i])) end
    assert.equal(3, pool.count("a"))
    assert.is_true(is_closed(cs[1]))
    assert.is_true(helper.wait_until(function()
      return rec.eofs == 1 and rec.ends[rec.ports[1]] == nil
    end, 5))
    for i = 5, 7 do pool.put("b", cs[i]) end   -- per key
    assert.equal(3, pool.count("a"))
    assert.equal(3, pool.count("b"))
    assert.equal(6, pool.count())
    for i = 4, 2, -1 do assert.equal(cs[i], pool.get("a")) end
    assert.is_nil(pool.get("a"))
    for i = 2, 4 do cs[i]:close() end
    pool.clear()
    rec:stop()
    helper.assert_clean(before)
  end)

  it("with max_idle 0 keeps nothing: put closes the conn and returns false",
     function()
    pool.configure { max_idle = 0 }
    local cs = conns(rec, 1)
    local ok, res = pcall(pool.put, "z", cs[1])
    assert.is_true(ok, res)
    assert.is_false(res)
    assert.is_true(is_closed(cs[1]))
    assert.equal(0, pool.count())
    -- and with conns already there (put before the change)
    pool.configure { max_idle = 2 }
    cs = conns(rec, 2)
    pool.put("z", cs[1])
    pool.configure { max_idle = 0 }
    ok, res = pcall(pool.put, "z", cs[2])
    assert.is_true(ok, res)
    assert.is_false(res)
    assert.is_true(is_closed(cs[2]))
    pool.clear()
    rec:stop()
    helper.assert_clean(before)
  end)

  it("configure: returns the settings; rejects what is not a setting",
     function()
    assert.same(DEFAULTS, pool.configure())
    assert.same({ max_idle = 5, idle_timeout = 30 },
                pool.configure { max_idle = 5 })
    assert.same({ max_idle = 5, idle_timeout = 2.5 },
                pool.configure { idle_timeout = 2.5 })
    assert.same({ max_idle = 5, idle_timeout = 2.5 }, pool.configure {})
    local bad = {
      { 5, "bad argument #1 to 'configure' (table expected, got number)" },
      { "x", "bad argument #1 to 'configure' (table expected, got string)" },
      { { maxidle = 1 }, "bad argument #1 to 'configure' (unknown option 'maxidle')" },
      { { max_idle = -1 }, "bad argument #1 to 'configure' (max_idle must be a non-negative integer)" },
      { { max_idle = 1.5 }, "bad argument #1 to 'configure' (max_idle must be a non-negative integer)" },
      { { max_idle = "3" }, "bad argument #1 to 'configure' (max_idle must be a non-negative integer)" },
      { { idle_timeout = -0.5 }, "bad argument #1 to 'configure' (idle_timeout must be a non-negative number)" },
      { { idle_timeout = "1" }, "bad argument #1 to 'configure' (idle_timeout must be a non-negative number)" },
    }
    for _, case in ipairs(bad) do
      assert.has_error(function() pool.configure(case[1]) end, case[2])
    end
    assert.same({ max_idle = 5, idle_timeout = 2.5 }, pool.configure())
  end)

  it("configure: a rejected table changes nothing", function()
    -- a good setting with a bad one, each inserted first and last (so that
    -- whatever order pairs takes, a good one comes first in some table)
    local function both_orders(k1, v1, k2, v2)
      local a, b = {}, {}
      a[k1] = v1; a[k2] = v2
      b[k2] = v2; b[k1] = v1
      return a, b
    end
    local tables = { both_orders("max_idle", 4, "idle_timeout", -1) }
    tables[3], tables[4] = both_orders("idle_timeout", 7, "max_idle", -1)
    tables[5], tables[6] = both_orders("idle_timeout", 7, "nonsense", true)
    for _, t in ipairs(tables) do
      assert.has_error(function() pool.configure(t) end)
      assert.same(DEFAULTS, pool.configure())
    end
  end)

  it("put: raises on bad arguments and on a closed conn", function()
    local c = rec.connect()
    assert.has_error(function() pool.put(1, c) end,
                     "bad argument #1 to 'put' (string expected, got number)")
    assert.has_error(function() pool.put(nil, c) end,
                     "bad argument #1 to 'put' (string expected, got nil)")
    assert.has_error(function() pool.put("k", "conn") end,
                     "bad argument #2 to 'put' (conn expected, got string)")
    assert.has_error(function() pool.put("k", nil) end,
                     "bad argument #2 to 'put' (conn expected, got nil)")
    assert.has_error(function() pool.put("k", c, -1) end,
                     "bad argument #3 to 'put' (non-negative number expected, got -1)")
    assert.has_error(function() pool.put("k", c, "5") end,
                     "bad argument #3 to 'put' (non-negative number expected, got 5)")
    assert.equal(0, pool.count())
    assert.is_false(is_closed(c))              -- untouched by the errors
    c:close()
    assert.error_matches(function() pool.put("k", c) end,
                         "attempt to use a closed conn")
    assert.equal(0, pool.count())
    rec:stop()
    helper.assert_clean(before)
  end)

  it("put: a listener is a bad argument #2", function()
    local l <close> = assert(so.listen("127.0.0.1", 0))
    assert.has_error(function() pool.put("k", l) end,
                     "bad argument #2 to 'put' (conn expected, got listener)")
    assert.equal(0, pool.count())
  end)

  it("clear closes the idle conns of one key, or of all", function()
    local cs = conns(rec, 5)
    pool.put("a", cs[1])
    pool.put("a", cs[2])
    for i = 3, 5 do pool.put("b", cs[i]) end
    assert.equal(5, pool.count())
    local n = so.stats().conns
    pool.clear("a")
    assert.equal(0, pool.count("a"))
    assert.equal(3, pool.count("b"))
    assert.equal(n - 2, so.stats().conns)
    assert.is_true(is_closed(cs[1]) and is_closed(cs[2]))
    assert.is_false(is_closed(cs[3]))
    assert.is_true(helper.wait_until(function() return rec.eofs == 2 end, 5))
    pool.clear("nothing")                    -- a key never used
    assert.equal(3, pool.count())
    pool.clear()
    assert.equal(0, pool.count())
    for i = 3, 5 do assert.is_true(is_closed(cs[i])) end
    assert.is_true(helper.wait_until(function() return rec.eofs == 5 end, 5))
    assert.is_nil(pool.get("b"))
    rec:stop()
    helper.assert_clean(before)
  end)

  it("holds no task and keeps no script from ending", function()
    local c = rec.connect()
    request(c)
    local tasks = so.stats().tasks
    pool.put("k", c)
    assert.equal(tasks, so.stats().tasks)
    -- a child whose pooled conn idles for 30 s ends at once
    local script = helper.write_script([[
      local so, pool = require "so", require "so.pool"
      local c = assert(so.connect(arg[1], tonumber(arg[2])))
      assert(pool.put("k", c, 30))
      print(pool.count("k"))
    ]])
    local h = helper.bg(("timeout -k 1 20 %s %s %s %d"):format(helper.luahost,
      script, rec.host, rec.port))
    local t0 = so.now()
    local code, out, err = h:wait(20)
    os.remove(script)
    assert.equal(0, code, err)
    assert.equal("1\n", out)
    assert.is_true(so.now() - t0 < 5)
    pool.clear()
    rec:stop()
    helper.assert_clean(before)
  end)

  it("pools Unix conns too", function()
    local p = os.tmpname()
    os.remove(p)
    local urec = server(p .. ".sock")
    finally(function() urec:stop() end)
    for i = 1, 20 do
      local c = pool.get("unix") or urec.connect()
      request(c, "u" .. i)
      assert.is_true(pool.put("unix", c))
    end
    assert.equal(1, urec.accepts)
    pool.clear()
    assert.is_true(helper.wait_until(function() return urec.eofs == 1 end, 5))
  end)

  it("serves 10,000 requests from 8 tasks with 8 connections at most and "
     .. "no descriptor left", function()
    local fds = before.fds   -- (taken before the server listened)
    local tasks = {}
    local done = 0
    for t = 1, 8 do
      tasks[t] = so.spawn(function()
        for i = 1, 1250 do
          local c = pool.get("echo") or rec.connect()
          request(c, t .. ":" .. i)
          assert.is_true(pool.put("echo", c))
          done = done + 1
        end
      end)
    end
    for _, t in ipairs(tasks) do helper.join(t, 60) end
    assert.equal(10000, done)
    assert.is_true(rec.accepts >= 1 and rec.accepts <= 8, rec.accepts)
    assert.equal(rec.accepts, pool.count("echo"))
    pool.clear()
    rec:stop()
    assert.is_true(helper.wait_until(function()
      collectgarbage()
      return helper.fds() == fds
    end, 5), "descriptors: " .. fds .. " -> " .. helper.fds())
    helper.assert_clean(before)
  end)
end)
