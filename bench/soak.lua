-- The fault soak, run by bench/soak: luahost bench/soak.lua SECONDS
--
-- Six servers at once (scripts/echo.lua, msg_echo.lua and http_hello.lua,
-- each alone and with --workers 2), each under many clients that mix
-- normal traffic with faults: abrupt resets, half-closes, slow readers,
-- floods that never read, malformed input, slowloris heads, a handler that
-- raises. Every echoed byte is checked. At the end each server must be
-- alive, answer a new client correctly, have its descriptors back to
-- their count after warm-up and its RSS within 5 MiB of where it settled.
local so = require "so"

local SECONDS = tonumber(arg[1]) or 600
local LUAHOST = os.getenv("LUAHOST") or "build/luahost"
local CLIENTS = 8            -- per server
local WARMUP = math.min(60, SECONDS / 3)
-- How far RSS may grow after the warm-up: 5 MiB, or more under
-- AddressSanitizer, whose allocator keeps memory its own way (the 5 MiB
-- bound is checked by the plain build's run).
local RSS_MIB = tonumber(os.getenv("SOAK_RSS_MIB")) or 5

local counts = { connections = 0, bytes = 0, failures = 0 }
local faults = {}
local failures = {}

local function fail(server, what)
  counts.failures = counts.failures + 1
  if #failures < 20 then failures[#failures + 1] = server.name .. ": " .. what end
end

local function fault(kind)
  faults[kind] = (faults[kind] or 0) + 1
end

local function random_bytes(n)
  local t = {}
  for i = 1, n do t[i] = string.char(math.random(0, 255)) end
  return table.concat(t)
end
local BLOB = random_bytes(64 * 1024)

local function connect(server)
  local c, err = so.connect("127.0.0.1", server.port)
  if not c then return nil, err end
  counts.connections = counts.connections + 1
  c:settimeout(10)
  return c
end

-- Reads exactly n bytes (or fails).
local function read_n(c, n)
  local got, len = {}, 0
  while len < n do
    local d = c:read()
    if not d or d == "" then return nil end
    got[#got + 1] = d
    len = len + #d
  end
  return table.concat(got)
end

-- {======================================================
-- What a client does to each kind of server
-- ======================================================

local normal = {}

function normal.echo(server)
  local c <close> = assert(connect(server))
  local n = math.random(1, #BLOB)
  local data = BLOB:sub(1, n)
  if not c:write(data) then return fail(server, "write") end
  local back = read_n(c, n)
  if back ~= data then return fail(server, "echo differs") end
  counts.bytes = counts.bytes + 2 * n
end

function normal.msg(server)
  local c <close> = assert(connect(server))
  local lines = {}
  for i = 1, math.random(1, 20) do lines[i] = "m" .. i .. ("x"):rep(math.random(0, 200)) end
  if not c:write(table.concat(lines, "\n") .. "\nquit\n") then
    return fail(server, "write")
  end
  local want = {}
  for i, l in ipairs(lines) do want[i] = "Echo: " .. l .. "\n" end
  want = table.concat(want) .. "Bye.\n"
  local back = read_n(c, #want)
  if back ~= want then return fail(server, "messages differ") end
  counts.bytes = counts.bytes + 2 * #want
end

local function http_response(c)
  local buf = ""
  while not buf:find("\r\n\r\n", 1, true) do
    local d = c:read()
    if not d or d == "" then return nil end
    buf = buf .. d
  end
  local e = buf:find("\r\n\r\n", 1, true)
  local head, body = buf:sub(1, e + 3), buf:sub(e + 4)
  local cl = tonumber(head:match("\r\n[Cc]ontent%-[Ll]ength: (%d+)"))
  if cl then
    local rest = read_n(c, cl - #body)
    if cl > #body and not rest then return nil end
    return head, body .. (rest or "")
  end
  while not body:find("\r\n0\r\n\r\n", 1, true) and not body:find("^0\r\n") do
    local d = c:read()
    if not d or d == "" then return nil end
    body = body .. d
  end
  return head, body
end

function normal.http(server)
  local c <close> = assert(connect(server))
  for _ = 1, math.random(1, 5) do
    if math.random() < 0.5 then
      if not c:write("GET / HTTP/1.1\r\nHost: soak\r\n\r\n") then return fail(server, "write") end
      local h, b = http_response(c)
      if not h or not h:match("^HTTP/1.1 200") or b ~= "hello world\n" then
        return fail(server, "GET / answered wrong")
      end
    else
      local n = math.random(1, #BLOB)
      if not c:write({ "POST /echo HTTP/1.1\r\nHost: soak\r\nContent-Length: " .. n
                       .. "\r\n\r\n", BLOB:sub(1, n) }) then
        return fail(server, "write")
      end
      local h, b = http_response(c)
      local body = b and (h:match("[Cc]ontent%-[Ll]ength") and b or
                          b:gsub("\r\n%x+\r\n", ""):gsub("^%x+\r\n", ""):gsub("\r\n0\r\n\r\n$", ""))
      if not h or body ~= BLOB:sub(1, n) then return fail(server, "POST /echo differs") end
      counts.bytes = counts.bytes + 2 * n
    end
  end
end

-- The faults; each ends its connection however it likes.
local faulty = {}

function faulty.reset(server)
  local c = assert(connect(server))
  c:write(BLOB:sub(1, 4096))
  so.sleep(0.005)
  c:close()  -- with its echo unread: the kernel sends RST
  fault("reset")
end

function faulty.half_close(server)
  if server.kind ~= "echo" then return normal[server.kind](server) end
  local c <close> = assert(connect(server))
  local data = BLOB:sub(1, math.random(1, 8192))
  c:write(data)
  c:shutdown()
  local back, d = "", c:read()
  while d and d ~= "" do back = back .. d; d = c:read() end
  if back ~= data then return fail(server, "half-close echo differs") end
  fault("half-close")
end

function faulty.slow_reader(server)
  local c <close> = assert(connect(server))
  if server.kind == "http" then
    c:write("GET /stream HTTP/1.1\r\nHost: soak\r\n\r\n")
  elseif server.kind == "msg" then
    c:write(("line\n"):rep(2000))
  else
    c:write(BLOB)
  end
  for _ = 1, 10 do
    if not c:read() then break end
    so.sleep(0.02)
  end
  fault("slow reader")
end

function faulty.flood(server)
  local c <close> = assert(connect(server))
  c:settimeout(0.2)
  local chunk = server.kind == "http" and ("GET / HTTP/1.1\r\nHost: f\r\n\r\n"):rep(2000)
                or server.kind == "msg" and ("flood\n"):rep(10000) or BLOB
  for _ = 1, 200 do
    if not c:write(chunk) then break end
  end
  fault("flood")
end

function faulty.malformed(server)
  local c <close> = assert(connect(server))
  if server.kind == "http" then
    c:write("GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    local h = http_response(c)
    if h and not h:match("^HTTP/1.1 400") then return fail(server, "malformed got " .. h:sub(1, 12)) end
  elseif server.kind == "msg" then
    c:write(("z"):rep(2 * 1024 * 1024))  -- a message over 1 MiB: closed
  else
    c:write(random_bytes(100))
  end
  fault("malformed")
end

function faulty.slowloris(server)
  local c <close> = assert(connect(server))
  local head = "GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: "
  for i = 1, 15 do
    if not c:write(head:sub(i, i)) then break end
    so.sleep(0.1)
  end
  fault("slowloris")
end

function faulty.raise(server)
  if server.kind ~= "http" then return normal[server.kind](server) end
  local c <close> = assert(connect(server))
  c:write("GET /raise HTTP/1.1\r\nHost: soak\r\n\r\n")
  local h = http_response(c)
  if not h or not h:match("^HTTP/1.1 500") then return fail(server, "/raise not 500") end
  fault("handler raised")
end

local FAULTS = {}
for name in pairs(faulty) do FAULTS[#FAULTS + 1] = name end
table.sort(FAULTS)

-- }======================================================

-- {======================================================
-- Servers
-- ======================================================

local function pids_of(server)
  local pids = { server.pid }
  local p = io.popen("pgrep -P " .. server.pid)
  for line in p:lines() do pids[#pids + 1] = tonumber(line) end
  p:close()
  return pids
end

local function fds(server)
  local n = 0
  for _, pid in ipairs(pids_of(server)) do
    local p = io.popen("ls /proc/" .. pid .. "/fd 2>/dev/null | wc -l")
    n = n + tonumber(p:read("a"))
    p:close()
  end
  return n
end

local function rss(server)
  local n = 0
  for _, pid in ipairs(pids_of(server)) do
    local f = io.open("/proc/" .. pid .. "/status")
    if f then
      n = n + tonumber(f:read("a"):match("VmRSS:%s*(%d+)")) * 1024
      f:close()
    end
  end
  return n
end

local function start(script, kind, workers)
  local errfile = os.tmpname()
  local cmd = string.format("echo $$; exec %s %s %s 0 2>%s", LUAHOST,
                            workers and "--workers 2" or "", script, errfile)
  local pipe = assert(io.popen(cmd))
  local pid = tonumber(pipe:read("l"))
  local line = pipe:read("l")
  local port = line and tonumber(line:match(":(%d+)$"))
  assert(port, "server did not start: " .. script)
  return { name = script:match("[^/]+$") .. (workers and " --workers 2" or ""),
           kind = kind, pid = pid, port = port, pipe = pipe, errfile = errfile }
end

local function alive(server)
  return os.execute("kill -0 " .. server.pid .. " 2>/dev/null") == true
end

-- }======================================================

math.randomseed(os.time())
local servers, report = {}, {}

local function soak()
  for _, s in ipairs { { "scripts/echo.lua", "echo" }, { "scripts/msg_echo.lua", "msg" },
                       { "scripts/http_hello.lua", "http" } } do
    servers[#servers + 1] = start(s[1], s[2], false)
    servers[#servers + 1] = start(s[1], s[2], true)
  end

  local t0 = so.now()
  local tasks = {}
  for _, server in ipairs(servers) do
    for _ = 1, CLIENTS do
      tasks[#tasks + 1] = so.spawn(function()
        while so.now() - t0 < SECONDS do
          local ok, err = pcall(function()
            if math.random() < 0.6 then normal[server.kind](server)
            else faulty[FAULTS[math.random(#FAULTS)]](server) end
          end)
          if not ok then fail(server, tostring(err)) end
        end
      end)
    end
  end

  -- After the warm-up: what each server settled at.
  so.sleep(WARMUP)
  for _, server in ipairs(servers) do
    server.rss0 = rss(server)
  end
  for _, t in ipairs(tasks) do so.join(t) end
  so.sleep(2.5)  -- idle: the servers collect and give memory back

  for _, server in ipairs(servers) do
    local ok = alive(server)
    if not ok then fail(server, "died") end
    if ok then
      local good = pcall(normal[server.kind], server)
      if not good then fail(server, "a new client was not served") end
    end
    local f1 = fds(server)
    server.fds1 = f1
    local r1 = rss(server)
    if r1 - server.rss0 > RSS_MIB * 1024 * 1024 then
      fail(server, string.format("RSS grew %.1f MiB", (r1 - server.rss0) / 1048576))
    end
    report[#report + 1] = string.format("  %-28s RSS %.1f -> %.1f MiB, %d descriptors",
                                        server.name, server.rss0 / 1048576, r1 / 1048576, f1)
  end
  -- descriptors: back to what a fresh server of the same kind holds
  for _, server in ipairs(servers) do
    local fresh = start(server.name:match("^%S+") == "echo.lua" and "scripts/echo.lua"
                        or server.name:match("^msg") and "scripts/msg_echo.lua"
                        or "scripts/http_hello.lua", server.kind,
                        server.name:find("workers") ~= nil)
    so.sleep(0.5)
    local want = fds(fresh)
    if server.fds1 > want then
      fail(server, string.format("%d descriptors, a fresh one has %d", server.fds1, want))
    end
    os.execute("kill -9 " .. fresh.pid)
    fresh.pipe:close()
    os.remove(fresh.errfile)
  end
  for _, server in ipairs(servers) do
    os.execute("kill -TERM " .. server.pid)
    server.pipe:close()
    os.remove(server.errfile)
  end

end

local ok, err = xpcall(soak, debug.traceback)
if not ok then
  for _, server in ipairs(servers) do os.execute("kill -9 " .. server.pid) end
  io.stderr:write("soak: ", err, "\n")
  os.exit(1)
end
print(string.format("soak: %d s, %d servers, %d clients each", SECONDS, #servers, CLIENTS))
print(string.format("connections: %d", counts.connections))
print(string.format("bytes checked: %d", counts.bytes))
local kinds = {}
for k in pairs(faults) do kinds[#kinds + 1] = k end
table.sort(kinds)
for _, k in ipairs(kinds) do print(string.format("fault %s: %d", k, faults[k])) end
for _, line in ipairs(report) do print(line) end
for _, f in ipairs(failures) do print("FAILURE " .. f) end
print(string.format("failures: %d", counts.failures))
os.exit(counts.failures == 0 and 0 or 1)
