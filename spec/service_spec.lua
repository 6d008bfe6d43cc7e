-- Running as a service: graceful drain, the runaway guard, the task view,
-- the log, counters, and memory that comes back; over real sockets, with
-- luahost in child processes where signals and stderr are the point.
local so = require "so"
local helper = require "helper"
local lfs = require "lfs"

local script = helper.write_script

local function signal(proc, sig)
  os.execute(string.format("kill -%s %d", sig, proc.pid))
end

-- An HTTP server for the drain: /slow streams 10 pieces 0.1 s apart,
-- /echo streams the request body back, / says hello; /spin never yields.
local SERVER = [[
local so = require "so"
local http = require "so.http"
local srv = assert(http.listen("127.0.0.1", tonumber(arg[1]), function(req, body)
  if req.path == "/slow" then
    local i = 0
    return { status = 200, body = function()
      i = i + 1
      if i > 10 then return nil end
      so.sleep(0.1)
      return "piece " .. i .. "\n"
    end }
  elseif req.path == "/echo" then
    return { status = 200, body = body }
  elseif req.path == "/spin" then
    while true do end
  end
  return "hello\n"
end, { log = function() end }))
local h, p = srv:sockname()
print("listening on " .. h .. ":" .. p)
io.stdout:flush()
srv:serve()
]]

-- Reads a whole HTTP/1.1 response with a Content-Length or chunked body;
-- returns the head and the body.
local function response(c)
  local buf = ""
  while not buf:find("\r\n\r\n", 1, true) do
    local d = assert(c:read())
    assert(d ~= "", "EOF in the head")
    buf = buf .. d
  end
  local e = buf:find("\r\n\r\n", 1, true)
  local head, rest = buf:sub(1, e + 3), buf:sub(e + 4)
  local cl = tonumber(head:match("\r\n[Cc]ontent%-[Ll]ength: (%d+)"))
  if cl then
    while #rest < cl do rest = rest .. assert(c:read()) end
    return head, rest
  end
  -- chunked: read to the last chunk
  while not rest:find("\r\n0\r\n\r\n", 1, true) and rest:sub(1, 3) ~= "0\r\n" do
    local d = assert(c:read())
    assert(d ~= "", "EOF in the body")
    rest = rest .. d
  end
  return head, rest
end

describe("the drain (SIGTERM)", function()
  it("finishes an upload and a download in flight, closes an idle keep-alive "
     .. "connection at once, refuses new ones, and exits 0", function()
    local path = script(SERVER)
    local proc = helper.start_opts("--drain 10", path)
    finally(function() proc:stop("KILL"); os.remove(path) end)
    local idle = assert(so.connect(proc.host, proc.port))
    local up = assert(so.connect(proc.host, proc.port))
    local down = assert(so.connect(proc.host, proc.port))
    for _, c in ipairs { idle, up, down } do c:settimeout(5) end
    assert(idle:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    local head = response(idle)
    assert.matches("^HTTP/1.1 200", head)
    -- an upload half sent, a download begun
    local half = string.rep("u", 64 * 1024)
    assert(up:write("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: "
                    .. 2 * #half .. "\r\n\r\n" .. half))
    assert(down:write("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"))
    local got_up = {}
    local reader = so.spawn(function()
      local h, b = response(up)
      return h, b
    end)
    so.sleep(0.15)
    local t0 = so.now()
    signal(proc, "TERM")
    so.sleep(0.1)
    -- the idle keep-alive connection is closed at once
    local d = idle:read()
    assert.truthy(d == "" or d == nil)
    assert.is_true(so.now() - t0 < 1)
    -- a new connection is refused
    local refused, _, name = so.connect(proc.host, proc.port)
    assert.is_nil(refused)
    assert.equal("ECONNREFUSED", name)
    -- the upload completes, echoed whole, told to close
    assert(up:write(half))
    local h_up, b_up = helper.join(reader)
    assert.matches("^HTTP/1.1 200", h_up)  -- (its head went out before)
    assert.equal(2 * #half, #b_up:gsub("\r\n%x+\r\n", ""):gsub("^%x+\r\n", ""):gsub("\r\n0\r\n\r\n$", ""))
    -- the download completes with all ten pieces
    local h_down, b_down = response(down)
    assert.matches("^HTTP/1.1 200", h_down)
    assert.equal(10, select(2, b_down:gsub("piece %d+\n", "")))
    -- both then closed by the server
    for _, c in ipairs { up, down } do
      local e = c:read()
      assert.truthy(e == "" or e == nil)
    end
    -- then the host is done: no task left, it exits 0 long before 10 s
    assert.equal(0, proc:wait())
    assert.is_true(so.now() - t0 < 5)
    assert.matches("drain: SIGTERM", proc.stderr)
    for _, c in ipairs { idle, up, down } do c:close() end
    got_up = nil
  end)
end)

describe("the runaway guard (--task-budget)", function()
  it("stops a handler that never yields while 100 other requests are answered",
     function()
    local path = script(SERVER)
    local proc = helper.start_opts("--task-budget 0.2", path)
    finally(function() proc:stop("KILL"); os.remove(path) end)
    local spin = assert(so.connect(proc.host, proc.port))
    spin:settimeout(10)
    assert(spin:write("GET /spin HTTP/1.1\r\nHost: x\r\n\r\n"))
    local spun = so.spawn(function() return response(spin) end)
    local ok = 0
    local clients = {}
    for i = 1, 10 do
      clients[i] = so.spawn(function()
        local c <close> = assert(so.connect(proc.host, proc.port))
        c:settimeout(10)
        for _ = 1, 10 do
          assert(c:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
          local h, b = response(c)
          if h:match("^HTTP/1.1 200") and b == "hello\n" then ok = ok + 1 end
        end
      end)
    end
    for _, t in ipairs(clients) do helper.join(t, 20) end
    assert.equal(100, ok)
    local h = helper.join(spun, 10)
    assert.matches("^HTTP/1.1 500", h)
    spin:close()
    assert.equal(0, proc:stop())  -- a drain with nothing left: 0
    assert.matches(helper.log_line("ERROR")
                   .. "task ran for more than 0.2 s without yielding\n"
                   .. "stack traceback:", proc.stderr)
  end)

  it("runs a failing task's <close> variables; others keep their turn", function()
    local path = script([[
      local so = require "so"
      local ticks = 0
      so.spawn(function() for _ = 1, 20 do so.sleep(0.02) ticks = ticks + 1 end end)
      local closed = false
      local t = so.spawn(function()
        local _ <close> = setmetatable({}, { __close = function() closed = true end })
        so.sleep(0.01)
        while true do end
      end)
      print(so.join(t))
      print(closed)
      so.sleep(0.5)
      print(ticks)
    ]])
    local code, out, err = helper.run("timeout -k 1 20 " .. helper.luahost .. " --task-budget 0.1 "
                                      .. path)
    os.remove(path)
    assert.equal(0, code, err)
    assert.equal("false\ttask ran for more than 0.1 s without yielding\n"
                 .. "true\n20\n", out)
    assert.equal(1, select(2, err:gsub("ERROR", "")), err)
  end)

  it("costs nothing and does nothing without the option", function()
    local code, _, err = helper.run(helper.luahost
                                    .. " --task-budget 0 x.lua")
    assert.equal(2, code)
    assert.matches("%-%-task%-budget wants seconds", err)
  end)
end)

describe("so.tasks", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("lists every live task: id, state, what it waits on, since, spawn site",
     function()
    local c, s = helper.pair(5)
    local _, cport = c:sockname()
    local reader = so.spawn(function() return s:read() end)
    local sleeper = so.spawn(function() so.sleep(10) end)
    local joiner = so.spawn(function() return so.join(sleeper) end)
    local spin = so.spawn(function() coroutine.yield() end)
    so.sleep(0.05)
    local by_id = {}
    for _, info in ipairs(so.tasks()) do by_id[info.id] = info end
    local r = by_id[reader.id]
    assert.equal("waiting", r.state)
    assert.equal("read 127.0.0.1:" .. cport, r.waiting)
    assert.is_true(r.since >= 0.04 and r.since < 5, r.since)
    assert.matches("service_spec%.lua:%d+$", r.spawned)
    assert.equal("sleep", by_id[sleeper.id].waiting)
    assert.equal("join " .. sleeper.id, by_id[joiner.id].waiting)
    assert.is_nil(by_id[spin.id])  -- it has ended
    -- this task: running, listed too
    local me
    for _, info in ipairs(so.tasks()) do
      if info.state == "running" then me = info end
    end
    assert.truthy(me)
    assert.is_true(reader.id ~= sleeper.id and sleeper.id < joiner.id)
    assert.is_true(so.cancel(sleeper))
    helper.join(joiner)
    assert(c:write("x"))
    assert.equal("x", helper.join(reader))
    c:close()
    s:close()
  end)

  it("counts accepts, bytes, timeouts and failed tasks in so.stats", function()
    local st0 = so.stats()
    local c, s = helper.pair()
    assert(c:write("12345"))
    assert.equal("12345", s:read())
    c:settimeout(0.01)
    assert.is_nil((c:read()))
    local t = so.spawn(function() error("counted", 0) end)
    so.join(t)
    local st = so.stats()
    assert.equal(1, st.accepts - st0.accepts)
    assert.equal(5, st.bytes_in - st0.bytes_in)
    assert.equal(5, st.bytes_out - st0.bytes_out)
    assert.equal(1, st.timeouts - st0.timeouts)
    assert.equal(1, st.errors - st0.errors)
    c:close()
    s:close()
  end)

  it("are written with tracebacks on SIGUSR1, service going on", function()
    local proc = helper.start("scripts/echo.lua")
    finally(function() proc:stop("KILL") end)
    local c = assert(so.connect(proc.host, proc.port))
    c:settimeout(5)
    local _, cport = c:sockname()
    assert(c:write("x"))
    assert.equal("x", c:read())
    signal(proc, "USR1")
    so.sleep(0.2)
    assert(c:write("y"))             -- still served
    assert.equal("y", c:read())
    c:close()
    proc:stop("KILL")
    local err = proc.stderr
    assert.matches("waiting read 127%.0%.0%.1:" .. cport
                   .. " for [%d.]+ s, started at scripts/echo%.lua:%d+\n"
                   .. "stack traceback:", err)
    assert.matches("waiting accept 127%.0%.0%.1:" .. proc.port, err)
  end)
end)

describe("so.log", function()
  it("writes time, level, task and message; --log-level drops lower levels",
     function()
    local path = script([[
      local so = require "so"
      so.log("debug", "d %d", 1)
      so.log("info", "i %s", "two")
      so.log("warn", "w")
      so.spawn(function() so.log("error", "e %q", "x") end)
      print(pcall(so.log, "loud", "x"))
    ]])
    local code, out, err = helper.run(helper.luahost .. " " .. path)
    assert.equal(0, code, err)
    assert.matches("^false\t.*bad argument #1 to '%S*log' %(invalid option 'loud'%)",
                   out)
    assert.matches("^" .. helper.log_line("INFO") .. "i two\n"
                   .. helper.log_line("WARN") .. "w\n"
                   .. helper.log_line("ERROR") .. "e \"x\"\n$", err)
    assert.matches("%[task 1%] i two", err)
    assert.matches("%[task 2%] e", err)
    code, _, err = helper.run(helper.luahost .. " --log-level warn " .. path)
    assert.equal(0, code)
    assert.not_matches("INFO", err)
    assert.matches("WARN", err)
    code, _, err = helper.run(helper.luahost .. " --log-level debug " .. path)
    assert.matches(helper.log_line("DEBUG") .. "d 1\n", err)
    code, _, err = helper.run(helper.luahost .. " --log-level chatty " .. path)
    assert.equal(2, code)
    os.remove(path)
  end)
end)

describe("memory", function()
  it("comes back when the host is idle: garbage conns closed, heap shrunk",
     function()
    local path = script([[
      local so = require "so"
      local lfs = require "lfs"
      local function fds()
        local n = 0
        for _ in lfs.dir("/proc/self/fd") do n = n + 1 end
        return n
      end
      local l = assert(so.listen("127.0.0.1", 0))
      local h, p = l:sockname()
      so.sleep(1.5)  -- one idle collection first: a like-for-like start
      local fd0, kb0 = fds(), collectgarbage("count")
      -- 2,500 pairs, 5,000 conns, dropped without closing (the collector
      -- stopped meanwhile, as if these were made by a burst of requests
      -- between two cycles)
      collectgarbage("stop")
      for _ = 1, 2500 do
        local acc = so.spawn(function() return l:accept() end)
        local c = so.connect(h, p)
        local _, s = so.join(acc)
        c, s = nil, nil
      end
      local fd1, kb1 = fds(), collectgarbage("count")
      collectgarbage("restart")
      so.sleep(2.5)  -- idle: nothing runs
      -- what stays is what the burst grew for good (the registry's
      -- array), a tenth of its peak at most
      local kb2 = collectgarbage("count")
      print(fd1 - fd0 > 1000, fds() - fd0, (kb2 - kb0) < (kb1 - kb0) / 10)
    ]])
    local code, out, err = helper.run("ulimit -n 20000; " .. helper.luahost
                                      .. " " .. path)
    os.remove(path)
    assert.equal(0, code, err)
    assert.equal("true\t0\ttrue\n", out)
  end)
end)

describe("so.http's linger", function()
  it("is a total deadline: a client trickling bytes cannot keep the conn",
     function()
    local http = require "so.http"
    local srv = assert(http.listen("127.0.0.1", 0, function() return "x" end,
                                   { linger = 0.5 }))
    local h, p = srv:sockname()
    local serving = so.spawn(function() srv:serve() end)
    local c = assert(so.connect(h, p))
    c:settimeout(5)
    assert(c:write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    local head = response(c)
    assert.matches("Connection: close", head)
    -- The server has sent FIN; it reads and drops what comes for 0.5 s
    -- in all, then closes: a write after that fails (RST).
    local t0 = so.now()
    local failed_at
    for _ = 1, 40 do
      if not c:write("z") then
        failed_at = so.now() - t0
        break
      end
      so.sleep(0.1)
    end
    assert.truthy(failed_at, "the server kept the conn for 4 s")
    assert.is_true(failed_at < 1.5, failed_at)
    -- and it did linger: what came meanwhile was read, not met with RST
    assert.is_true(failed_at >= 0.3, "closed at once: " .. failed_at)
    c:close()
    srv:close()
    helper.join(serving)
  end)
end)

describe("so.http's access log", function()
  it("calls a function after each response", function()
    local http = require "so.http"
    local seen = {}
    local srv = assert(http.listen("127.0.0.1", 0, function(req)
      return req.path == "/missing" and 404 or "hello"
    end, { access_log = function(req, status, bytes, seconds)
      seen[#seen + 1] = { req.method .. " " .. req.target, status, bytes,
                          type(seconds) }
    end }))
    local h, p = srv:sockname()
    local serving = so.spawn(function() srv:serve() end)
    local c = assert(so.connect(h, p))
    c:settimeout(5)
    assert(c:write("GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n"))
    response(c)
    assert(c:write("GET /missing HTTP/1.1\r\nHost: x\r\n\r\n"))
    response(c)
    assert.same({ { "GET /a?b", 200, 5, "number" },
                  { "GET /missing", 404, nil, "number" } }, seen)
    c:close()
    srv:close()
    helper.join(serving)
  end)

  it("writes one line a request in the Common Log Format with true", function()
    local path = script([[
      local so = require "so"
      local http = require "so.http"
      local srv = assert(http.listen("127.0.0.1", 0, function() return "hi" end,
                                     { access_log = true }))
      local h, p = srv:sockname()
      so.spawn(function() srv:serve() end)
      local c = assert(so.connect(h, p))
      c:write("GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
      while (c:read() or "") ~= "" do end
      srv:close()
    ]])
    local code, _, err = helper.run("timeout -k 1 20 " .. helper.luahost
                                    .. " " .. path)
    os.remove(path)
    assert.equal(0, code, err)
    assert.matches("^" .. helper.log_line("INFO") .. "127%.0%.0%.1 %- %- "
                   .. "%[%d%d/%a%a%a/%d%d%d%d:%d%d:%d%d:%d%d %+0000%] "
                   .. '"GET /x HTTP/1%.1" 200 2 %d+%.%d%d%d\n$', err)
  end)
end)

describe("what an attack on the host found", function()
  local function run(opts, source)
    local path = script(source)
    local code, out, err = helper.run("timeout -s KILL 30 " .. helper.luahost
                                      .. " " .. opts .. " " .. path)
    os.remove(path)
    return code, out, err
  end

  it("reports a task's error when the heap is full, and goes on", function()
    local code, out, err = run("--max-memory 1M", [[
      local so = require "so"
      local hog = {}
      so.spawn(function()
        so.sleep(0.01)
        pcall(function() local i = 0 while true do i = i + 1 hog[i] = {} end end)
        error("failed while memory is full")
      end)
      so.spawn(function() so.sleep(0.2) hog = nil print("still runs") end)
    ]])
    assert.equal(0, code, err)
    assert.equal("still runs\n", out)
    assert.matches(helper.log_line("ERROR"), err)
  end)

  it("never resumes a reader that a finalizer cancelled inside the read "
     .. "callback", function()
    local code, out, err = run("", [[
      local so = require "so"
      local l = assert(so.listen("127.0.0.1", 0))
      local _, port = so.sockname(l)
      local T
      local W = so.spawn(function()
        local c <close> = assert(l:accept())
        local big = string.rep("x", 200000)
        for _ = 1, 100 do if not c:write(big) then break end end
      end)
      local c = assert(so.connect("127.0.0.1", port))
      T = so.spawn(function()
        while true do
          for _ = 1, 50 do
            setmetatable({}, { __gc = function()
              local _, main = coroutine.running()
              if main and T then local t = T; T = nil; so.cancel(t) end
            end })
          end
          local d = c:read()
          if not d or d == "" then break end
        end
      end)
      print(so.join(T))
      c:close()
      so.join(W)
      local st = so.stats()
      print(st.tasks, st.errors)
    ]])
    assert.equal(0, code, err)
    assert.equal("false\tcancelled\n1\t0\n", out)
    assert.not_matches("ERROR", err)
  end)

  it("stops a <close> handler that spins while its task is cancelled",
     function()
    local code, out, err = run("--task-budget 0.2", [[
      local so = require "so"
      local t = so.spawn(function()
        local _ <close> = setmetatable({}, { __close = function()
          while true do end
        end })
        so.sleep(10)
      end)
      so.sleep(0.01)
      print(so.cancel(t))
    ]])
    assert.equal(0, code, err)
    assert.equal("true\n", out)
    assert.matches("error in a <close> variable: task ran for more than 0.2 s",
                   err)
  end)
end)
