-- so.read, so.write, so.shutdown, so.connect on real loopback sockets.
local so = require "so"
local helper = require "helper"

local pair = helper.pair

-- Writes until a write is blocked for `seconds`; returns the bytes taken.
local function fill(conn, seconds)
  local chunk = string.rep("x", 1024 * 1024)
  local sent = 0
  conn:settimeout(seconds)
  while true do
    local ok, err, name = conn:write(chunk)
    if not ok then
      assert.equal("ETIMEDOUT", name, err)
      break
    end
    sent = sent + #chunk
    assert(sent < 1024 * 1024 * 1024, "never blocked")
  end
  conn:settimeout(nil)
  return sent
end

describe("so.read and so.write", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("survive running out of memory as bytes arrive: that read fails, nothing else",
     function()
    -- Under --max-memory the script fills the heap; the 256 KiB read
    -- then cannot become a string. Before, that aborted the process
    -- (PANIC: unprotected error in a libuv callback).
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write([[
      local so = require "so"
      local l = assert(so.listen("127.0.0.1", 0))
      local _, port = so.sockname(l)
      local c = assert(so.connect("127.0.0.1", port))
      local s = assert(l:accept())
      local got = { a = false, b = false, c = false }
      local reader = so.spawn(function() got.a, got.b, got.c = s:read() end)
      local ticker = so.spawn(function() so.sleep(0.05) return "ticked" end)
      local data = string.rep("y", 256 * 1024)
      local hog = {}
      local function fill(size)
        while true do hog[#hog + 1] = string.rep("x", size) end
      end
      for _, size in ipairs { 65536, 4096, 256, 16 } do pcall(fill, size) end
      c:write(data)
      so.join(reader, 10)  -- (allocates nothing)
      hog = nil
      collectgarbage()
      print(got.a, got.b, got.c, select(2, so.join(ticker)))
      print(s:read())  -- its bytes are gone: the conn keeps failing
      print(c:write("still a conn"), so.stats().tasks)
    ]])
    f:close()
    local code, out, err = helper.run(helper.luahost .. " --max-memory 4M "
                                      .. path)
    os.remove(path)
    assert.equal(0, code, err)
    assert.equal("nil\tENOMEM: not enough memory\tENOMEM\tticked\n"
                 .. "nil\tENOMEM: not enough memory\tENOMEM\n"
                 .. "true\t1\n", out)
  end)

  it("send the right bytes when finalizers write during a queued table write",
     function()
    -- A __gc that calls so.write (and fails: it cannot wait there) must
    -- not touch the buffers of a table write being set up: stress it with
    -- finalizers due while big table writes are anchored.
    local c, s = pair()
    local c2, s2 = pair()
    local parts, garbage = {}, {}
    for i = 1, 1024 do
      parts[i] = string.rep(string.char(65 + i % 26), 4096)
      garbage[i] = "G"
    end
    local expect = table.concat(parts)
    local mt = { __gc = function() pcall(so.write, c2, garbage) end }
    local drain = so.spawn(function() while s2:read() ~= "" do end end)
    collectgarbage("generational", 1, 100)
    for iter = 1, 20 do
      local reader = so.spawn(function()
        local got, n = {}, 0
        while n < #expect do
          local d = assert(s:read())
          got[#got + 1] = d
          n = n + #d
        end
        return table.concat(got)
      end)
      for _ = 1, 50 + iter do setmetatable({}, mt) end
      assert(c:write(parts))
      assert.is_true(helper.join(reader) == expect)
    end
    collectgarbage("incremental")
    c2:close()
    helper.join(drain)
    c:close(); s:close(); s2:close()
  end)

  it("carry bytes both ways, in order", function()
    local c, s = pair()
    assert.is_true(c:write("ping"))
    assert.equal("ping", s:read())
    assert.is_true(s:write("pong"))
    assert.equal("pong", c:read())
    c:close()
    s:close()
  end)

  it("write an array of strings as one stream of bytes", function()
    local c, s = pair()
    assert.is_true(c:write({ "GET / HTTP/1.1\r\n", "", "Host: x\r\n\r\n" }))
    local got = ""
    while #got < 27 do got = got .. s:read() end
    assert.equal("GET / HTTP/1.1\r\nHost: x\r\n\r\n", got)
    local many = {}
    for i = 1, 100 do many[i] = tostring(i % 10) end
    assert.is_true(c:write(many))
    got = ""
    while #got < 100 do got = got .. s:read() end
    assert.equal(table.concat(many), got)
    c:close()
    s:close()
  end)

  it("return \"\" at EOF, again on every later read", function()
    local c, s = pair()
    c:write("last")
    c:close()
    assert.equal("last", s:read())
    assert.equal("", s:read())
    assert.equal("", s:read())
    s:close()
  end)

  it("keep 16 MiB of bytes whole and in order through an echo", function()
    local c, s = pair()
    local echo = so.spawn(function()
      while true do
        local d = assert(s:read())
        if d == "" then break end
        assert(s:write(d))
      end
      s:close()
    end)
    local parts = {}
    for i = 1, 256 do parts[i] = string.rep(string.char(i % 256), 65536) end
    local writer = so.spawn(function()
      for i = 1, #parts do assert(c:write(parts[i])) end
      assert(c:shutdown())
    end)
    local got, n = {}, 0
    while true do
      local d = assert(c:read())
      if d == "" then break end
      n = n + 1
      got[n] = d
    end
    helper.join(writer)
    helper.join(echo)
    assert.equal(table.concat(parts), table.concat(got))
    c:close()
  end)

  it("keep the pieces of a queued table write, whatever the script does to its table",
     function()
    local c, s = pair()
    local a, b = ("a"):rep(4 * 1024 * 1024), ("b"):rep(4 * 1024 * 1024)
    local pieces = { a, b }
    a, b = nil, nil
    c:settimeout(0.05)
    local ok, _, name = c:write(pieces)  -- nobody reads: it times out
    assert.is_nil(ok)
    assert.equal("ETIMEDOUT", name)
    c:settimeout(nil)
    pieces[1], pieces[2] = nil, nil
    collectgarbage()
    collectgarbage()
    local junk = {}
    for i = 1, 100 do junk[i] = ("z"):rep(100000) .. i end
    local counts, total = { a = 0, b = 0 }, 0
    while total < 8 * 1024 * 1024 do
      local d = assert(s:read())
      total = total + #d
      for ch in pairs(counts) do
        local _, n = d:gsub(ch, "")
        counts[ch] = counts[ch] + n
      end
    end
    assert.same({ a = 4 * 1024 * 1024, b = 4 * 1024 * 1024 }, counts)
    c:close()
    s:close()
  end)

  it("survive a script calling their metamethods by hand", function()
    local c, s = pair()
    local mt = getmetatable(c)
    mt.__close("x")
    mt.__gc(io.stdout)
    mt.__gc(nil)
    assert.is_true(c:write("alive"))
    assert.equal("alive", s:read())
    mt.__close(c)  -- a real conn: closes it, as so.close does
    assert.has_error(function() c:read() end, "attempt to use a closed conn")
    s:close()
  end)

  it("complete queued writes in order", function()
    local c, s = pair()
    local big = string.rep("a", 8 * 1024 * 1024)
    local order = {}
    local w1 = so.spawn(function() assert(c:write(big)); order[#order + 1] = 1 end)
    local w2 = so.spawn(function() assert(c:write("b")); order[#order + 1] = 2 end)
    local total, last = 0, nil
    while total < #big + 1 do
      local d = assert(s:read())
      total = total + #d
      last = d
    end
    assert.equal("b", last:sub(-1))
    helper.join(w1)
    helper.join(w2)
    assert.same({ 1, 2 }, order)
    c:close()
    s:close()
  end)

  it("do not read from the OS while no task reads (backpressure)", function()
    local c, s = pair()
    -- Nobody reads s: the client is stopped by TCP once the kernel's
    -- buffers are full, far below what it tries to send.
    local sent = fill(c, 0.3)
    assert.is_true(sent < 64 * 1024 * 1024, sent)
    -- Once the server reads, the client can send again.
    local reader = so.spawn(function()
      local total = 0
      while total < sent + 1024 * 1024 do total = total + #assert(s:read()) end
      return total
    end)
    assert.is_true(c:write(string.rep("y", 1024 * 1024)))
    helper.join(reader)
    c:close()
    s:close()
  end)

  it("keep an EOF that arrives while nobody reads", function()
    local c, s = pair()
    c:write("a")
    c:close()
    so.sleep(0.05)
    assert.equal("a", s:read())
    assert.equal("", s:read())
    s:close()
  end)

  it("keep a reset that arrives while nobody reads, and return it", function()
    local c, s = pair()
    assert(s:write("unread"))
    so.sleep(0.05)
    c:close()  -- closing with unread data sends RST
    so.sleep(0.05)
    local ok, msg, name = s:read()
    assert.is_nil(ok)
    assert.equal("ECONNRESET", name)
    assert.equal("ECONNRESET: connection reset by peer", msg)
    -- the error stays: the next read says it again
    assert.same({ nil, msg, name }, { s:read() })
    s:close()
  end)

  it("end a pending read with the error when the peer resets", function()
    local c, s = pair()
    local t = so.spawn(function() return s:read() end)
    assert(s:write("unread"))
    so.sleep(0.05)
    c:close()
    local ok, data, msg, name = so.join(t, 5)
    assert.is_true(ok)
    assert.is_nil(data)
    assert.equal("ECONNRESET", name, msg)
    s:close()
  end)

  it("fail writes to a reset conn with nil, msg, name", function()
    local c, s = pair()
    assert(s:write("unread"))
    so.sleep(0.05)
    c:close()
    so.sleep(0.05)
    local ok, msg, name
    for _ = 1, 10 do
      ok, msg, name = s:write("more")
      if not ok then break end
    end
    assert.is_nil(ok)
    assert.truthy(name == "ECONNRESET" or name == "EPIPE", msg)
    assert.equal(name .. ":", msg:match("^%u+:"))
    s:close()
  end)

  it("allow one read at a time per conn", function()
    local c, s = pair()
    local t = so.spawn(function() return s:read() end)
    assert.has_error(function() s:read() end,
                     "conn is already being read by another task")
    c:write("x")
    assert.same({ true, "x" }, { so.join(t, 5) })
    c:close()
    s:close()
  end)

  it("end a read, a write and an accept pending on an object another task closes",
     function()
    local c, s = pair()
    local reader = so.spawn(function() return s:read() end)
    s:close()
    local ok, data, msg, name = so.join(reader, 1)
    assert.is_true(ok)
    assert.is_nil(data)
    assert.equal("ECANCELED", name, msg)

    local c2, s2 = pair()
    local writer = so.spawn(function()
      local chunk = string.rep("z", 1024 * 1024)
      for _ = 1, 1024 do
        local w, m, n = c2:write(chunk)
        if not w then return w, m, n end
      end
    end)
    so.sleep(0.1)  -- the writer is blocked by now
    c2:close()
    local _, w, _, wname = so.join(writer, 1)
    assert.is_nil(w)
    assert.equal("ECANCELED", wname)

    local l = assert(so.listen("127.0.0.1", 0))
    local acceptor = so.spawn(function() return l:accept() end)
    l:close()
    local _, a, _, aname = so.join(acceptor, 1)
    assert.is_nil(a)
    assert.equal("ECANCELED", aname)
    c:close()
    s2:close()
  end)

  it("raise on use after close, and close twice quietly", function()
    local c, s = pair()
    assert.is_true(c:close())
    assert.is_true(c:close())
    assert.is_true(so.close(c))
    assert.has_error(function() c:read() end, "attempt to use a closed conn")
    assert.has_error(function() c:write("x") end, "attempt to use a closed conn")
    assert.has_error(function() so.shutdown(c) end, "attempt to use a closed conn")
    assert.matches("conn %(closed%)", tostring(c))
    s:close()
  end)

  it("raise on bad arguments with the function's name", function()
    local c, s = pair()
    assert.has_error(function() so.read("conn") end,
                     "bad argument #1 to 'read' (conn expected, got string)")
    assert.has_error(function() so.write(c, 42) end,
                     "bad argument #2 to 'write' (string or table expected, got number)")
    assert.has_error(function() so.write(c, { "a", 1 }) end,
                     "bad argument #2 to 'write' (string expected at index 2, got number)")
    assert.has_error(function() so.write(io.stdout, "x") end,
                     "bad argument #1 to 'write' (conn expected, got FILE*)")
    local l = assert(so.listen("127.0.0.1", 0))
    assert.has_error(function() so.read(l) end,
                     "bad argument #1 to 'read' (conn expected, got listener)")
    assert.has_error(function() c:settimeout(-1) end)
    l:close()
    c:close()
    s:close()
  end)

  it("time out reads, and the conn stays usable", function()
    local c, s = pair()
    s:settimeout(0.05)
    local t0 = so.now()
    local ok, msg, name = s:read()
    assert.is_nil(ok)
    assert.equal("ETIMEDOUT", name)
    assert.equal("ETIMEDOUT: connection timed out", msg)
    assert.is_true(so.now() - t0 >= 0.04)
    c:write("late")
    assert.equal("late", s:read())
    s:settimeout(nil)
    c:close()
    s:close()
  end)

  it("time out blocked writes, and the conn stays usable", function()
    local c, s = pair()
    local sent = fill(c, 0.1)
    local reader = so.spawn(function()
      local total = 0
      while true do
        local d = assert(s:read())
        if d == "" then break end
        total = total + #d
      end
      return total
    end)
    assert.is_true(c:write("end"))
    assert.is_true(c:shutdown())
    local total = helper.join(reader)
    -- What timed out was still written, in order: nothing lost.
    assert.is_true(total >= sent + 3)
    c:close()
    s:close()
  end)

  it("half-close with shutdown: the peer reads EOF and can still answer", function()
    local c, s = pair()
    c:write("question")
    assert.is_true(c:shutdown())
    local got = ""
    while true do
      local d = s:read()
      if d == "" then break end
      got = got .. d
    end
    assert.equal("question", got)
    s:write("answer")
    s:close()
    assert.equal("answer", c:read())
    assert.equal("", c:read())
    local ok, _, name = c:shutdown()
    assert.is_nil(ok)
    assert.equal("ENOTCONN", name)
    c:close()
  end)

  it("report addresses with sockname and peername", function()
    local c, s = pair()
    local ch, cp = c:sockname()
    local sh, sp = s:peername()
    assert.equal("127.0.0.1", ch)
    assert.equal(ch, sh)
    assert.equal(cp, sp)
    assert.same({ s:sockname() }, { c:peername() })
    c:close()
    s:close()
  end)

  it("close a conn at the end of a <close> scope", function()
    local s
    do
      local c <close>, s1 = pair()
      s = s1
      assert.equal(2, so.stats().conns - before.conns)
    end
    assert.equal("", s:read())
    s:close()
  end)

  it("close an unreachable conn in the garbage collector", function()
    local s = select(2, pair())
    collectgarbage()
    collectgarbage()
    assert.equal("", s:read())  -- the peer saw the client close
    s:close()
  end)

  it("reject a wait outside a task, leaving nothing behind", function()
    local c, s = pair()
    local t = { 3, 2, 1 }
    assert.has_error(function()
      table.sort(t, function(a, b) s:read(); return a < b end)
    end, "read: cannot wait across a C call boundary (metamethod, iterator "
         .. "or C function)")
    -- a coroutine resumed where no yield can pass up to the task
    local ok, err = pcall(table.sort, t, function(a, b)
      return coroutine.wrap(function() s:read(); return a < b end)()
    end)
    assert.is_false(ok)
    assert.matches("read: not in a task %(call it from the script, from a "
                   .. "function started by so.spawn, or from a coroutine "
                   .. "one of them resumes%)", err)
    c:write("still fine")
    assert.equal("still fine", s:read())
    c:close()
    s:close()
  end)
end)

describe("so.connect", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("returns nil, msg, name when refused", function()
    local l = assert(so.listen("127.0.0.1", 0))
    local _, port = l:sockname()
    l:close()
    so.sleep(0.01)
    local c, msg, name = so.connect("127.0.0.1", port)
    assert.is_nil(c)
    assert.equal("ECONNREFUSED", name)
    assert.equal("ECONNREFUSED: connection refused", msg)
  end)

  it("resolves names without blocking, and tries each address", function()
    local l = assert(so.listen("127.0.0.1", 0))
    local _, port = l:sockname()
    local acc = so.spawn(function() return l:accept() end)
    local c = assert(so.connect("localhost", port))
    local s = helper.join(acc)
    assert.equal("127.0.0.1", (c:peername()))
    c:close()
    s:close()
    l:close()
  end)

  it("tries the next address when the first refuses, with a fresh socket",
     function()
    -- A name with two addresses, 127.0.0.1 first: a hosts file of our own,
    -- bind-mounted over /etc/hosts in a mount namespace of the child.
    local hosts = os.tmpname()
    local f = assert(io.open(hosts, "w"))
    f:write("127.0.0.1 twoaddr.test\n127.0.0.2 twoaddr.test\n")
    f:close()
    local path = os.tmpname()
    f = assert(io.open(path, "w"))
    f:write([[
      local so = require "so"
      local first = assert(so.listen("127.0.0.1", 0))  -- finds a free port
      local _, port = first:sockname()
      first:close()  -- nothing listens on 127.0.0.1:port: refused
      local l = assert(so.listen("127.0.0.2", port))
      local acc = so.spawn(function() return l:accept() end)
      local c = assert(so.connect("twoaddr.test", port, 5))
      local _, s = so.join(acc)
      assert(c:write("via the second"))
      print(c:peername(), s:read(), so.stats().conns)
    ]])
    f:close()
    local code, out, err = helper.run(string.format(
      "unshare -m sh -c 'mount --bind %s /etc/hosts && exec %s %s'",
      hosts, helper.luahost, path))
    os.remove(hosts)
    os.remove(path)
    assert.equal(0, code, err)
    assert.equal("127.0.0.2\tvia the second\t2\n", out)
  end)

  it("returns the resolver's error for an unknown host", function()
    local c, msg, name = so.connect("no-such-host.invalid", 80)
    assert.is_nil(c)
    assert.matches("^EAI_", name)
    assert.equal(name .. ":", msg:match("^[%u_]+:"))
  end)

  it("connects over IPv6", function()
    local l = assert(so.listen("::1", 0))
    local h, p = l:sockname()
    assert.equal("::1", h)
    local acc = so.spawn(function() return l:accept() end)
    local c = assert(so.connect("::1", p))
    local s = helper.join(acc)
    assert.equal("::1", (s:peername()))
    c:close()
    s:close()
    l:close()
  end)

  it("times out, closing the conn it was making", function()
    -- A listener nobody accepts from, with its queue full: the kernel
    -- drops further SYNs, so a connect hangs until its timeout.
    local l = assert(so.listen("127.0.0.1", 0, 1))
    local _, port = l:sockname()
    local conns, timedout = {}, nil
    for _ = 1, 16 do
      local c, msg, name = so.connect("127.0.0.1", port, 0.2)
      if not c then
        assert.equal("ETIMEDOUT", name, msg)
        timedout = true
        break
      end
      conns[#conns + 1] = c
    end
    assert.is_true(timedout)
    for _, c in ipairs(conns) do c:close() end
    l:close()
  end)

  it("raises on bad arguments", function()
    assert.has_error(function() so.connect() end,
                     "bad argument #1 to 'connect' (string expected, got no value)")
    assert.has_error(function() so.connect("127.0.0.1", 70000) end,
                     "bad argument #2 to 'connect' (port out of range)")
    assert.has_error(function() so.connect("127.0.0.1", 1, "x") end)
  end)
end)
