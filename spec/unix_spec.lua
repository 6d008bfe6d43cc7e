-- Unix domain sockets: so.listen/so.connect("unix:PATH") with every conn
-- function; stale, live and foreign files at the path; the file removed
-- with its listener (so.close, <close>, the collector, the drain); names;
-- so.readable; so.http served to curl --unix-socket and to nginx's
-- proxy_pass; TLS over a Unix conn; --workers sharing one socket file.
local so = require "so"
local lfs = require "lfs"
local tls = require "so.tls"
local http = require "so.http"
local helper = require "helper"

local MiB = 1024 * 1024

-- A new path for a socket, in /tmp, where nothing is yet.
local function sock_path()
  local p = os.tmpname()
  os.remove(p)
  return p .. ".sock"
end

-- What is at path: "socket", "file", "directory", ... or nil.
local function kind(path)
  local a = lfs.symlinkattributes(path)
  return a and a.mode
end

local slurp = helper.slurp

local spit = helper.spit

-- Waits one loop turn, after something that held the loop (a child run
-- with io.popen, a long computation): the loop's clock is as of the
-- turn's start, and a wait's timeout counts from it (see the spec "counts
-- a connect's timeout from the call"), so under load a timeout set right
-- after could pass before the wait even began.
local function fresh() so.sleep(0) end

-- Socket files that nobody listens on, as a process that died leaves
-- them: python3 binds each path and exits.
local function make_stale(...)
  local paths = { ... }
  for i, p in ipairs(paths) do paths[i] = helper.shq(p) end
  local code, _, err = helper.run("python3 -c "
    .. helper.shq("import socket, sys\n"
                  .. "for p in sys.argv[1:]:\n"
                  .. "    socket.socket(socket.AF_UNIX).bind(p)\n")
    .. " " .. table.concat(paths, " "))
  assert(code == 0, "python3: " .. err)
  for _, p in ipairs { ... } do assert(kind(p) == "socket", p) end
  fresh()
end

local read_n = helper.read_n

-- Reads until EOF: everything; or nil, msg, name.
local function read_all(conn)
  local parts = {}
  while true do
    local d, msg, name = conn:read()
    if d == nil then return nil, msg, name end
    if d == "" then return table.concat(parts) end
    parts[#parts + 1] = d
  end
end

-- Echoes what comes until EOF, then sends EOF and closes.
local function echo(c)
  c:settimeout(10)
  while true do
    local d = c:read()
    if not d or d == "" then break end
    if not c:write(d) then break end
  end
  c:shutdown()
  c:close()
end

-- A Unix listener at a new path whose accept loop runs handler(conn) in a
-- task per connection. Returns listener, path.
local function unix_server(handler, path)
  path = path or sock_path()
  local l = assert(so.listen("unix:" .. path))
  so.spawn(function()
    while true do
      local c = l:accept()
      if not c then return end  -- closed
      so.spawn(handler, c)
    end
  end)
  return l, path
end

-- A connected pair of Unix conns, the client's end and the server's, each
-- wait bounded by 5 s; the listener is gone (and its file with it).
local function unix_pair()
  local path = sock_path()
  local l = assert(so.listen("unix:" .. path))
  local s
  local t = so.spawn(function() s = assert(l:accept()) end)
  local c = assert(so.connect("unix:" .. path, nil, 5))
  helper.join(t)
  l:close()
  c:settimeout(5)
  s:settimeout(5)
  return c, s
end

-- 8 MiB (n bytes) where every 16-byte line is numbered: a lost, repeated or
-- reordered piece shows.
local function numbered(n)
  local lines = {}
  for i = 1, n // 16 do lines[i] = string.format("%015d\n", i) end
  local s = table.concat(lines)
  fresh()
  return s
end

-- Where a and b first differ (for the message).
local function first_difference(a, b)
  for i = 1, math.max(#a, #b), 4096 do
    if a:sub(i, i + 4095) ~= b:sub(i, i + 4095) then
      for j = i, i + 4095 do
        if a:sub(j, j) ~= b:sub(j, j) then return j end
      end
    end
  end
  return nil
end

-- A script for a child luahost: listens on unix:arg[2], says
-- "listening on unix:PATH:0", and answers every connection
-- "WORKER PID\n" (WORKER: so.worker() or 0), then closes it.
local WHO_SERVER = [[
local so = require "so"
local path = arg[2]
local l = assert(so.listen("unix:" .. path))
print("listening on unix:" .. path .. ":0")
io.stdout:flush()
local pid = io.open("/proc/self/stat"):read("l"):match("^%d+")
while true do
  local c, _, name = l:accept()
  if c then
    so.spawn(function()
      c:write((so.worker() or 0) .. " " .. pid .. "\n")
      c:shutdown()
      c:close()
    end)
  elseif name == "ECANCELED" then
    break
  end
end
]]

-- One request to a WHO_SERVER: worker, pid; or nil, error.
local function who(path)
  local c, err = so.connect("unix:" .. path, nil, 5)
  if not c then return nil, err end
  c:settimeout(5)
  local d, e = read_all(c)
  c:close()
  if not d or d == "" then return nil, e or "EOF" end
  local w, pid = d:match("^(%d+) (%d+)\n$")
  return tonumber(w), tonumber(pid)
end

describe("Unix domain sockets", function()
  local before
  before_each(function() before = helper.snapshot() end)

  describe("so.listen and so.connect", function()
    it("listen, connect, and carry bytes both ways through every conn function",
       function()
      local path = sock_path()
      local l = assert(so.listen("unix:" .. path))
      assert.equal("socket", kind(path))
      local server = so.spawn(function()
        local c <close> = assert(l:accept())
        c:settimeout(5)
        assert.equal("ping", read_n(c, 4))
        assert(c:write({ "po", "ng" }))          -- an array, one call
        assert.equal("after half-close", read_all(c))  -- until the EOF
        assert(c:write("bye"))
        assert(c:shutdown())
        return "done"
      end)
      local c = assert(so.connect("unix:" .. path))
      c:settimeout(0.05)
      -- a timeout leaves the conn usable
      local d, msg, name = c:read()
      assert.same({ nil, "ETIMEDOUT" }, { d, name }, msg)
      c:settimeout(5)
      assert(c:write("ping"))
      assert.equal("pong", read_n(c, 4))
      assert(c:write("after half-close"))
      assert(so.shutdown(c))
      local _, _, again = c:shutdown()
      assert.equal("ENOTCONN", again)
      assert.equal("bye", read_all(c))
      assert.equal("", c:read())                 -- EOF again
      assert.equal("done", helper.join(server))
      assert.is_true(so.close(c))
      assert.is_true(so.close(c))                -- idempotent
      l:close()
      assert.is_nil(kind(path))
      helper.assert_clean(before)
    end)

    it("carry 8 MiB intact each way at once", function()
      local l, path = unix_server(echo)
      local data = numbered(8 * MiB)
      local c = assert(so.connect("unix:" .. path, nil, 5))
      c:settimeout(10)
      local writer = so.spawn(function()
        assert(c:write(data))
        assert(c:shutdown())
      end)
      local got = assert(read_all(c))
      helper.join(writer, 20)
      c:close()
      l:close()
      assert.equal(#data, #got)
      assert.is_true(got == data, "differs at byte "
                     .. tostring(first_difference(got, data)))
      helper.assert_clean(before)
    end)

    it("name the path: sockname of listener and accepted conn, peername of "
       .. "a client; the unnamed client's own name is empty", function()
      local path = sock_path()
      local l <close> = assert(so.listen("unix:" .. path))
      assert.same({ path }, { l:sockname() })
      assert.same({ path }, { so.sockname(l) })
      local accepted
      local t = so.spawn(function() accepted = assert(l:accept()) end)
      local waiting
      for _, info in ipairs(so.tasks()) do
        if info.id == t.id then waiting = info.waiting end
      end
      assert.equal("accept unix:" .. path, waiting)
      local c <close> = assert(so.connect("unix:" .. path))
      helper.join(t)
      local s <close> = accepted
      assert.same({ path }, { so.peername(c) })
      assert.same({ "" }, { so.sockname(c) })
      assert.same({ path }, { s:sockname() })
      assert.same({ "" }, { s:peername() })
    end)

    it("take the timeout as so.connect's third argument and ignore the port",
       function()
      local l, path = unix_server(echo)
      local c1 = assert(so.connect("unix:" .. path, nil, 1))
      local c2 = assert(so.connect("unix:" .. path, 8080))  -- port ignored
      for _, c in ipairs { c1, c2 } do
        c:settimeout(5)
        assert(c:write("x"))
        assert.equal("x", read_n(c, 1))
        c:close()
      end
      assert.error_matches(function() so.connect("unix:" .. path, nil, -1) end,
                           "bad argument #3 to '[%w.]*connect' %(timeout out of range%)")
      assert.error_matches(function() so.connect("unix:" .. path, nil, "soon") end,
                           "bad argument #3 to '[%w.]*connect' %(number expected, got string%)")
      -- under a deadline that has passed: at once, nothing left open
      local r = table.pack(so.deadline(0.02, function()
        so.sleep(1)
        return so.connect("unix:" .. path, nil, 1)
      end))
      assert.same({ nil, "ETIMEDOUT" }, { r[1], r[3] })
      l:close()
      helper.assert_clean(before)
    end)

    it("count a connect's timeout from the call, not from the start of a "
       .. "long loop turn", function()
      local l, path = unix_server(function(c) c:close() end)
      so.sleep(0)                          -- (a turn's start, as a task sees it)
      local c0 = os.clock()
      while os.clock() - c0 < 0.3 do end   -- 0.3 s of work, no wait
      -- the server is there: the connect is done at once
      local c, msg = so.connect("unix:" .. path, nil, 0.2)
      assert.truthy(c, msg)
      c:close()
      l:close()
      helper.assert_clean(before)
    end)

    it("connect: ENOENT for a missing path, ECONNREFUSED for a stale file",
       function()
      local path = sock_path()
      local c, msg, name = so.connect("unix:" .. path)
      assert.same({ nil, "ENOENT" }, { c, name })
      assert.matches("^ENOENT: ", msg)
      c, msg, name = so.connect("unix:/no/such/dir/x.sock", nil, 1)
      assert.same({ nil, "ENOENT" }, { c, name }, msg)
      make_stale(path)
      c, msg, name = so.connect("unix:" .. path, nil, 1)
      assert.same({ nil, "ECONNREFUSED" }, { c, name })
      assert.matches("^ECONNREFUSED: ", msg)
      assert.equal("socket", kind(path))  -- a connect removes nothing
      os.remove(path)
      helper.assert_clean(before)
    end)

    it("listen replaces a stale socket file, and the file a luahost killed "
       .. "with SIGKILL left", function()
      local path = sock_path()
      make_stale(path)
      local l = assert(so.listen("unix:" .. path))
      so.spawn(function()
        local s = l:accept()
        if s then s:write("fresh"); s:close() end
      end)
      local c = assert(so.connect("unix:" .. path, nil, 5))
      c:settimeout(5)
      assert.equal("fresh", read_all(c))
      c:close()
      l:close()
      assert.is_nil(kind(path))

      local script = helper.write_script(WHO_SERVER)
      local proc = helper.start(script, path)
      finally(function() proc:stop("KILL"); os.remove(script) end)
      fresh()
      assert.equal(0, (who(path)))
      proc:stop("KILL")
      fresh()
      assert.equal("socket", kind(path))        -- left behind
      local c2, _, name = so.connect("unix:" .. path, nil, 1)
      assert.same({ nil, "ECONNREFUSED" }, { c2, name })
      l = assert(so.listen("unix:" .. path))
      local t = so.spawn(function() return assert(l:accept()):close() end)
      local c3 = assert(so.connect("unix:" .. path, nil, 5))
      helper.join(t)
      c3:close()
      l:close()
      assert.is_nil(kind(path))
      helper.assert_clean(before)
    end)

    it("listen: EADDRINUSE where another process listens; it sees one "
       .. "connection that closes at once, and serves on", function()
      local path = sock_path()
      -- python3 serving: each conn's first bytes get "pong", an EOF first
      -- is reported
      local py = helper.bg("exec python3 -u -c " .. helper.shq([[
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(8)
print("ready")
n = 0
while True:
    c, _ = s.accept()
    n += 1
    d = c.recv(100)
    if d:
        c.sendall(b"pong")
        print("conn %d %s" % (n, d.decode()))
    else:
        print("conn %d eof" % n)
    c.close()
]]) .. " " .. helper.shq(path))
      finally(function() py:kill(); py:cleanup(); os.remove(path) end)
      assert.is_true(helper.wait_until(function()
        return (py:output()):find("ready") ~= nil
      end, 10), "python3 did not start: " .. select(2, py:output()))
      local l, msg, name = so.listen("unix:" .. path)
      assert.same({ nil, "EADDRINUSE" }, { l, name })
      assert.equal("EADDRINUSE: address already in use", msg)
      assert.is_true(helper.wait_until(function()
        return (py:output()):find("conn 1 eof\n", 1, true) ~= nil
      end, 5), "no probe seen: " .. (py:output()))
      assert.equal("socket", kind(path))
      local c = assert(so.connect("unix:" .. path, nil, 5))
      c:settimeout(5)
      assert(c:write("ping"))
      assert.equal("pong", read_all(c))
      c:close()
      assert.is_true(helper.wait_until(function()
        return (py:output()):find("conn 2 ping\n", 1, true) ~= nil
      end, 5))
      assert.equal("ready\nconn 1 eof\nconn 2 ping\n", (py:output()))
      helper.assert_clean(before)
    end)

    it("listen: EADDRINUSE for a path this process listens on, without "
       .. "connecting to it", function()
      local path = sock_path()
      local l <close> = assert(so.listen("unix:" .. path))
      local accepts = so.stats().accepts
      local l2, msg, name = so.listen("unix:" .. path)
      assert.same({ nil, "EADDRINUSE" }, { l2, name }, msg)
      assert.is_nil((so.listen("unix:" .. path, 0, 16)))
      -- no probe connection waits in the backlog
      l:settimeout(0.1)
      local c, _, why = l:accept()
      assert.same({ nil, "ETIMEDOUT" }, { c, why })
      assert.equal(accepts, so.stats().accepts)
      -- and the first one serves on
      l:settimeout(5)
      local t = so.spawn(function() return assert(l:accept()):close() end)
      local cc = assert(so.connect("unix:" .. path, nil, 5))
      helper.join(t)
      cc:close()
      assert.equal(accepts + 1, so.stats().accepts)
    end)

    it("listen: EADDRINUSE for a regular file or a directory at the path, "
       .. "left untouched", function()
      local path = sock_path()
      spit(path, "precious\n")
      local l, msg, name = so.listen("unix:" .. path)
      assert.same({ nil, "EADDRINUSE" }, { l, name }, msg)
      assert.equal("file", kind(path))
      assert.equal("precious\n", slurp(path))
      os.remove(path)
      assert(lfs.mkdir(path))
      l, msg, name = so.listen("unix:" .. path)
      assert.same({ nil, "EADDRINUSE" }, { l, name }, msg)
      assert.equal("directory", kind(path))
      assert(lfs.rmdir(path))
      helper.assert_clean(before)
    end)

    it("ENAMETOOLONG for a path longer than sun_path holds; the longest "
       .. "that fits works", function()
      local long = "/tmp/" .. string.rep("L", 108 - #"/tmp/")   -- 108 bytes
      local l, msg, name = so.listen("unix:" .. long)
      assert.same({ nil, "ENAMETOOLONG" }, { l, name }, msg)
      assert.is_nil(kind(long))
      local c
      c, msg, name = so.connect("unix:" .. long, nil, 1)
      assert.same({ nil, "ENAMETOOLONG" }, { c, name }, msg)
      -- (libuv would have cut the name to 107 bytes: that one must not be
      -- reached)
      local fits = long:sub(1, 107)
      local l107 = assert(so.listen("unix:" .. fits))
      c, msg, name = so.connect("unix:" .. long, nil, 1)
      assert.same({ nil, "ENAMETOOLONG" }, { c, name }, msg)
      assert.same({ fits }, { l107:sockname() })
      local t = so.spawn(function() return assert(l107:accept()):close() end)
      c = assert(so.connect("unix:" .. fits, nil, 5))
      assert.same({ fits }, { c:peername() })
      helper.join(t)
      c:close()
      l107:close()
      assert.is_nil(kind(fits))
      helper.assert_clean(before)
    end)
  end)

  describe("the socket file", function()
    it("goes with its listener: so.close, <close> and the collector, not "
       .. "with its conns", function()
      local path = sock_path()
      local l = assert(so.listen("unix:" .. path))
      local t = so.spawn(function() return assert(l:accept()) end)
      local c = assert(so.connect("unix:" .. path, nil, 5))
      local s = helper.join(t)
      c:close()
      s:close()
      assert.equal("socket", kind(path))
      assert.is_true(so.close(l))
      assert.is_nil(kind(path))
      assert.is_true(so.close(l))

      do
        local l2 <close> = assert(so.listen("unix:" .. path))
        assert.equal("socket", kind(path))
      end
      assert.is_nil(kind(path))

      assert.truthy(so.listen("unix:" .. path))  -- dropped at once
      assert.equal("socket", kind(path))
      collectgarbage()
      collectgarbage()
      assert.is_nil(kind(path))
      helper.assert_clean(before)
    end)

    it("goes when a child luahost drains on SIGTERM", function()
      local path = sock_path()
      local script = helper.write_script(WHO_SERVER)
      local proc = helper.start(script, path)
      finally(function() proc:stop("KILL"); os.remove(script) end)
      fresh()
      assert.equal("unix:" .. path, proc.host)
      assert.equal(0, (who(path)))
      assert.equal("socket", kind(path))
      local l, _, name = so.listen("unix:" .. path)   -- alive: not stale
      assert.same({ nil, "EADDRINUSE" }, { l, name })
      assert.equal(0, (who(path)))                   -- still its own
      assert.equal(0, proc:stop("TERM"))
      fresh()
      assert.is_nil(kind(path))
      helper.assert_clean(before)
    end)

    it("is shared by --workers 2: both answer, a reload keeps it, and it "
       .. "goes when the supervisor stops", function()
      local path = sock_path()
      local script = helper.write_script(WHO_SERVER)
      local proc = helper.start_opts("--workers 2", script, path)
      finally(function() proc:stop("KILL"); os.remove(script) end)
      fresh()
      -- batches of 10 concurrent clients until both workers have answered
      local function both(exclude)
        local seen = {}
        local ok = helper.wait_until(function()
          local tasks = {}
          for i = 1, 10 do
            tasks[i] = so.spawn(function()
              local w, pid = who(path)
              assert(w, "a request failed: " .. tostring(pid))
              if not exclude[pid] then seen[w] = pid end
            end)
          end
          for _, t in ipairs(tasks) do helper.join(t, 20) end
          return seen[1] and seen[2]
        end, 15)
        assert.is_true(ok, "both workers did not answer")
        assert.is_nil(seen[0])
        assert.is_nil(seen[3])
        assert.are_not.equal(seen[1], seen[2])
        return seen
      end
      local first = both({})
      local ino = lfs.symlinkattributes(path).ino
      -- SIGHUP: new workers on the same socket, every request answered
      os.execute("kill -HUP " .. proc.pid)
      local second = both({ [first[1]] = true, [first[2]] = true })
      assert.equal("socket", kind(path))
      assert.equal(ino, lfs.symlinkattributes(path).ino)
      assert.equal(0, proc:stop("TERM"))
      assert.is_nil(kind(path))
      helper.assert_clean(before)
    end)
  end)

  it("leak nothing over many connections, failures and replacements",
     function()
    local l, path = unix_server(echo)
    for i = 1, 200 do
      local c = assert(so.connect("unix:" .. path, nil, 5))
      c:settimeout(5)
      local msg = "message " .. i
      assert(c:write(msg))
      assert(c:shutdown())
      assert.equal(msg, read_all(c))
      c:close()
    end
    local missing = sock_path()
    local stale = {}
    for i = 1, 20 do stale[i] = sock_path() end
    make_stale(table.unpack(stale))
    local file = sock_path()
    spit(file, "x")
    for i = 1, 20 do
      assert.is_nil((so.connect("unix:" .. missing)))
      assert.is_nil((so.connect("unix:" .. stale[i])))
      assert.is_nil((so.connect("unix:/" .. string.rep("x", 200))))
      assert.is_nil((so.listen("unix:" .. path)))   -- ours
      assert.is_nil((so.listen("unix:" .. file)))   -- a file
      local r = assert(so.listen("unix:" .. stale[i]))  -- replaced
      r:close()
      assert.is_nil(kind(stale[i]))
    end
    os.remove(file)
    l:close()
    assert.is_nil(kind(path))
    helper.assert_clean(before)
  end)

  describe("so.readable", function()
    it("is false until something arrives, true with unread bytes and at "
       .. "EOF, and never reads", function()
      local c, s = unix_pair()
      assert.is_false(so.readable(c))
      assert.is_false(c:readable())
      assert(s:write("abc"))
      assert.is_true(helper.wait_until(function() return c:readable() end, 5))
      assert.is_true(c:readable())               -- still: nothing was read
      assert.equal("abc", c:read())
      assert.is_false(c:readable())
      assert(s:shutdown())
      assert.is_true(helper.wait_until(function() return c:readable() end, 5))
      assert.equal("", c:read())
      assert.is_true(c:readable())               -- EOF again, at once
      assert.is_false(s:readable())
      c:close()
      assert.is_true(helper.wait_until(function() return s:readable() end, 5))
      assert.equal("", s:read())
      s:close()
      assert.has_error(function() so.readable(c) end,
                       "attempt to use a closed conn")
      local l = assert(so.listen("unix:" .. sock_path()))
      assert.error_matches(function() so.readable(l) end,
                           "bad argument #1 to '[%w.]*readable' %(conn expected, got listener%)")
      l:close()
      helper.assert_clean(before)
    end)

    it("is true after a reset, and leaves the error for the next read",
       function()
      -- closed with our bytes unread: the peer sees a reset
      local c, s = unix_pair()
      assert(c:write("never read"))
      s:close()
      assert.is_true(helper.wait_until(function() return c:readable() end, 5))
      local d, msg, name = c:read()
      assert.same({ nil, "ECONNRESET" }, { d, name }, msg)
      assert.is_true(c:readable())
      d, msg, name = c:read()                    -- and again
      assert.same({ nil, "ECONNRESET" }, { d, name }, msg)
      c:close()
      helper.assert_clean(before)
    end)
  end)

  describe("so.http", function()
    -- Serves with http.listen("unix:" .. path, nil, ...): GET answers
    -- "PATH via VIA over SOCKNAME", POST /echo its body. Returns server,
    -- path, seen (the sockname of each request's conn).
    local function serve(opts)
      local path = sock_path()
      local seen = {}
      local srv = assert(http.listen("unix:" .. path, nil, function(req, body)
        seen[#seen + 1] = so.sockname(req.conn)
        if req.method == "POST" then
          return { status = 200, body = assert(body:readall()) }
        end
        return { status = 200,
                 body = req.path .. " via " .. (req.headers["x-via"] or "-")
                        .. " over " .. so.sockname(req.conn) .. "\n" }
      end, opts))
      so.spawn(srv.serve, srv)
      return srv, path, seen
    end

    -- Runs a shell command in the background, as this process serves;
    -- its exit code, stdout, stderr.
    local function sh(cmd)
      local code, out, err = helper.bg(cmd):wait(20)
      return code, out, err
    end

    it("serves curl --unix-socket, keeping the connection alive", function()
      local srv, path, seen = serve()
      assert.same({ path }, { srv:sockname() })
      local body = numbered(256 * 1024)
      local file = os.tmpname()
      spit(file, body)
      local code, out, err = sh(("curl -sS --max-time 10 --unix-socket %s "
        .. "-w '|%%{http_code}|%%{num_connects}\\n' http://localhost/a "
        .. "http://localhost/b"):format(helper.shq(path)))
      assert.equal(0, code, err)
      assert.equal("/a via - over " .. path .. "\n|200|1\n"
                   .. "/b via - over " .. path .. "\n|200|0\n", out)
      code, out, err = sh(("curl -sS --max-time 10 --unix-socket %s "
        .. "--data-binary @%s http://localhost/echo | md5sum; md5sum <%s")
        :format(helper.shq(path), file, file))
      os.remove(file)
      assert.equal(0, code, err)
      local a, b = out:match("^(%x+)  %-\n(%x+)  %-\n$")
      assert.truthy(a, out)
      assert.equal(b, a)
      assert.same({ path, path, path }, seen)
      srv:close()
      assert.is_nil(kind(path))
      helper.assert_clean(before)
    end)

    it("is reached through nginx's proxy_pass http://unix:PATH:/", function()
      assert(os.execute("command -v nginx >/dev/null 2>&1"),
             "nginx is not installed (the README's test command installs it)")
      local srv, path, seen = serve()
      local prefix = os.tmpname()
      os.remove(prefix)
      assert(lfs.mkdir(prefix))
      assert(lfs.mkdir(prefix .. "/tmp"))
      local probe = assert(so.listen("127.0.0.1", 0))  -- a free port
      local _, port = probe:sockname()
      probe:close()
      spit(prefix .. "/nginx.conf", ([[
daemon off;
master_process off;
worker_processes 1;
pid @P@/nginx.pid;
error_log @P@/error.log warn;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path @P@/tmp/body;
    proxy_temp_path @P@/tmp/proxy;
    fastcgi_temp_path @P@/tmp/fastcgi;
    uwsgi_temp_path @P@/tmp/uwsgi;
    scgi_temp_path @P@/tmp/scgi;
    server {
        listen 127.0.0.1:@PORT@;
        location / {
            proxy_pass http://unix:@SOCK@:/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Via nginx;
        }
    }
}
]]):gsub("@P@", prefix):gsub("@PORT@", port):gsub("@SOCK@", path))
      local nginx = helper.bg(("exec nginx -e %s/error.log -p %s -c %s/nginx.conf")
                              :format(prefix, prefix, prefix))
      finally(function()
        nginx:kill()
        nginx:cleanup()
        os.execute("rm -rf " .. helper.shq(prefix))
      end)
      local up = helper.wait_until(function()
        local c = so.connect("127.0.0.1", port)
        if c then c:close() end
        return c ~= nil or nginx:done() ~= nil
      end, 10)
      assert.is_true(up and nginx:done() == nil, "nginx did not start: "
                     .. select(2, nginx:output()) .. slurp(prefix .. "/error.log"))
      local code, out, err = sh(("curl -sS --max-time 10 -w '|%%{http_code}\\n' "
        .. "http://127.0.0.1:%d/x http://127.0.0.1:%d/y/z")
        :format(port, port))
      assert.equal(0, code, err)
      assert.equal("/x via nginx over " .. path .. "\n|200\n"
                   .. "/y/z via nginx over " .. path .. "\n|200\n", out)
      code, out, err = sh(("curl -sS --max-time 10 --data-binary 'posted body' "
        .. "http://127.0.0.1:%d/echo"):format(port))
      assert.equal(0, code, err)
      assert.equal("posted body", out)
      assert.same({ path, path, path }, seen)
      srv:close()
      assert.is_nil(kind(path))
      -- luahost gone: nginx answers 502 itself
      code, out = sh(("curl -s --max-time 10 -o /dev/null -w '%%{http_code}' "
        .. "http://127.0.0.1:%d/x"):format(port))
      assert.equal("502", out)
      helper.assert_clean(before)
    end)
  end)

  describe("TLS", function()
    local C
    setup(function() C = helper.tls_certs(); fresh() end)
    teardown(function() if C then C:remove() end end)

    it("runs over a Unix conn: tls.wrap on both ends, 1 MiB each way",
       function()
      local sctx = assert(tls.server { cert = C.server.cert,
                                        key = C.server.key })
      local cctx = assert(tls.client { ca = C.ca })
      local c, s = unix_pair()
      local st = so.spawn(function()
        local ts <close> = assert(tls.wrap(s, sctx))
        ts:settimeout(10)
        while true do
          local d = assert(ts:read())
          if d == "" then break end
          assert(ts:write(d))
        end
        assert(ts:shutdown())
      end)
      local tc <close> = assert(tls.wrap(c, cctx, "localhost"))
      tc:settimeout(10)
      assert.truthy(tls.info(tc).version:match("^TLS"))
      local data = numbered(MiB)
      local w = so.spawn(function()
        assert(tc:write(data))
        assert(tc:shutdown())
      end)
      local got = assert(read_all(tc))
      helper.join(w, 20)
      helper.join(st, 20)
      assert.is_true(got == data, "differs at byte "
                     .. tostring(first_difference(got, data)))
      tc:close()
      helper.assert_clean(before)
    end)

    it("serves https to curl --unix-socket with http.listen{tls = ctx}",
       function()
      local sctx = assert(tls.server { cert = C.server.cert,
                                        key = C.server.key })
      local path = sock_path()
      local srv = assert(http.listen("unix:" .. path, nil, function(req)
        return { status = 200, body = "secure " .. req.path .. " over "
                                      .. so.sockname(req.conn) .. "\n" }
      end, { tls = sctx }))
      so.spawn(srv.serve, srv)
      local code, out, err = helper.bg(("curl -sS --max-time 10 --cacert %s "
        .. "--unix-socket %s https://localhost/s"):format(C.ca, helper.shq(path)))
        :wait(20)
      assert.equal(0, code, err)
      assert.equal("secure /s over " .. path .. "\n", out)
      srv:close()
      assert.is_nil(kind(path))
      helper.assert_clean(before)
    end)
  end)
end)
