-- so.listen and so.accept; many connections; descriptor exhaustion.
local so = require "so"
local helper = require "helper"

describe("so.listen", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("picks a free port for port 0 and reports it", function()
    local l = assert(so.listen("127.0.0.1", 0))
    local h, p = l:sockname()
    assert.equal("127.0.0.1", h)
    assert.is_true(p > 0)
    assert.matches("^listener %(", tostring(l))
    l:close()
  end)

  it("returns nil, EADDRINUSE for a port in use", function()
    local l = assert(so.listen("127.0.0.1", 0))
    local _, p = l:sockname()
    local l2, msg, name = so.listen("127.0.0.1", p)
    assert.is_nil(l2)
    assert.equal("EADDRINUSE: address already in use", msg)
    assert.equal("EADDRINUSE", name)
    l:close()
  end)

  it("resolves a host name, and reports an unknown one", function()
    local l = assert(so.listen("localhost", 0))
    l:close()
    local l2, msg, name = so.listen("no-such-host.invalid", 0)
    assert.is_nil(l2)
    assert.matches("^EAI_", name)
    assert.matches("^EAI_[%u_]+: ", msg)
  end)

  it("raises on bad arguments", function()
    assert.has_error(function() so.listen("127.0.0.1") end,
                     "bad argument #2 to 'listen' (number expected, got no value)")
    assert.has_error(function() so.listen("127.0.0.1", -1) end,
                     "bad argument #2 to 'listen' (port out of range)")
    assert.has_error(function() so.listen("127.0.0.1", 0, 0) end,
                     "bad argument #3 to 'listen' (backlog out of range)")
    assert.has_error(function() so.accept("x") end,
                     "bad argument #1 to 'accept' (listener expected, got string)")
  end)
end)

describe("so.accept", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("takes connections only for a waiting task", function()
    local l = assert(so.listen("127.0.0.1", 0))
    local h, p = l:sockname()
    local clients = {}
    for i = 1, 5 do clients[i] = assert(so.connect(h, p)) end
    so.sleep(0.05)
    -- the kernel holds them; the host made no conn for any
    assert.equal(5, so.stats().conns - before.conns)
    for i = 1, 5 do clients[i]:close() end
    l:close()
    -- With a backlog of 1 and nobody accepting, the kernel queue fills up
    -- and further connects hang: the host took nothing off it.
    l = assert(so.listen("127.0.0.1", 0, 1))
    h, p = l:sockname()
    clients = {}
    while true do
      local c, _, name = so.connect(h, p, 0.2)
      if not c then
        assert.equal("ETIMEDOUT", name)
        break
      end
      clients[#clients + 1] = c
      assert.is_true(#clients <= 4, "connections were taken off the queue")
    end
    for i = 1, #clients do
      local c = assert(l:accept())
      clients[i]:write("n" .. i)
      assert.equal("n" .. i, c:read())
      c:close()
      clients[i]:close()
    end
    l:close()
  end)

  it("serves waiting tasks first come, first served", function()
    local l = assert(so.listen("127.0.0.1", 0))
    local h, p = l:sockname()
    local got = {}
    local tasks = {}
    for i = 1, 3 do
      tasks[i] = so.spawn(function()
        local c = assert(l:accept())
        got[#got + 1] = i
        c:close()
      end)
    end
    for _ = 1, 3 do
      local c = assert(so.connect(h, p))
      so.sleep(0.02)
      c:close()
    end
    for i = 1, 3 do helper.join(tasks[i]) end
    assert.same({ 1, 2, 3 }, got)
    l:close()
  end)

  it("times out, and the listener stays usable", function()
    local l = assert(so.listen("127.0.0.1", 0))
    l:settimeout(0.02)
    local c, msg, name = l:accept()
    assert.is_nil(c)
    assert.equal("ETIMEDOUT", name, msg)
    local h, p = l:sockname()
    local client = assert(so.connect(h, p))
    local s = assert(l:accept())
    s:close()
    client:close()
    l:close()
  end)

  it("holds 9,000 connections at once, each echoing", function()
    local l, h, p = helper.server(function(c)
      local data = c:read()
      if data and data ~= "" then c:write(data) end
      c:read()  -- until the client closes
      c:close()
    end)
    local conns = {}
    for i = 1, 9000 do conns[i] = assert(so.connect(h, p)) end
    local ok = 0
    local tasks = {}
    for i = 1, 9000 do
      tasks[i] = so.spawn(function(c, msg)
        assert(c:write(msg))
        assert.equal(msg, c:read())
        ok = ok + 1
      end, conns[i], "c" .. i)
    end
    for i = 1, 9000 do helper.join(tasks[i], 60) end
    assert.equal(9000, ok)
    assert.equal(18000, so.stats().conns - before.conns)
    for i = 1, 9000 do conns[i]:close() end
    l:close()
  end)

  it("leaks no descriptor across 10,000 connections reset by the peer",
     function()
    local served = 0
    local l, h, p = helper.server(function(c)
      c:write("hello")
      local data = c:read()  -- nil, ECONNRESET (or "" if the FIN came first)
      served = served + 1
      assert(data == nil or data == "")
      c:close()
    end)
    for _ = 1, 100 do
      local batch = {}
      for i = 1, 100 do batch[i] = assert(so.connect(h, p)) end
      so.sleep(0.005)
      for i = 1, 100 do batch[i]:close() end  -- "hello" unread: RST
    end
    assert.is_true(helper.wait_until(function() return served == 10000 end, 30))
    l:close()
  end)
end)

describe("a server out of descriptors (EMFILE)", function()
  it("does not spin, and serves again once descriptors free up", function()
    local proc = helper.start_with("ulimit -n 40;", "scripts/echo.lua")
    local clients = {}
    for i = 1, 60 do clients[i] = assert(so.connect(proc.host, proc.port)) end
    so.sleep(0.2)
    local cpu0 = helper.cputime(proc.pid)
    so.sleep(1)
    local spent = helper.cputime(proc.pid) - cpu0
    assert.is_true(spent < 0.3, "server used " .. spent .. " s of CPU in 1 s")
    for i = 1, 60 do clients[i]:close() end
    so.sleep(0.2)
    local c = assert(so.connect(proc.host, proc.port))
    c:settimeout(5)
    assert(c:write("back"))
    assert.equal("back", c:read())
    c:close()
    assert.equal(0, proc:stop())
  end)
end)
