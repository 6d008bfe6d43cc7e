-- What the specs share: the binary under test, child processes, counts of
-- what is open, and waiting with a limit.
local so = require "so"
local lfs = require "lfs"

local helper = {}

-- libuv opens a spare descriptor (for EMFILE) at the first listen: open it
-- now, so that descriptor counts in specs compare like with like.
assert(so.listen("127.0.0.1", 0)):close()

helper.luahost = os.getenv("LUAHOST") or "build/luahost"

-- Starts `luahost SCRIPT 0 ARGS...` and waits for its "listening on" line.
-- The child's stderr goes to proc.errfile. proc:stop([signal]) ends it
-- and returns its exit code.
function helper.start(script, ...)
  return helper.start_with("", script, ...)
end

-- helper.start, with shell commands to run first (e.g. "ulimit -n 64;").
-- A line of the host's log at a level ("ERROR"), up to its message: a
-- pattern.
function helper.log_line(level)
  return "%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ " .. level
         .. " %[[^%]]+%] "
end

-- helper.start, with options for the host before the script (a string).
function helper.start_opts(opts, script, ...)
  return helper.start_with("", opts .. " " .. script, ...)
end

function helper.start_with(prefix, script, ...)
  local args = { ... }
  for i, a in ipairs(args) do args[i] = string.format("%q", tostring(a)) end
  local errfile = os.tmpname()
  local cmd = string.format("echo $$; %s exec %s %s 0 %s 2>%s", prefix,
                            helper.luahost, script, table.concat(args, " "),
                            errfile)
  local pipe = assert(io.popen(cmd, "r"))
  local pid = assert(tonumber(pipe:read("l")), "no pid")
  local line = pipe:read("l")
  local proc = { pid = pid, pipe = pipe, errfile = errfile, line = line }
  if not line then
    pipe:close()
    local f = io.open(errfile)
    local err = f and f:read("a") or ""
    if f then f:close() end
    os.remove(errfile)
    error("server did not start: " .. err, 2)
  end
  proc.host, proc.port = line:match("^listening on (.*):(%d+)$")
  proc.port = tonumber(proc.port)
  -- Waits until it exits by itself; its exit code.
  function proc:wait()
    return self:stop("0")
  end
  function proc:stop(signal)
    if not self.stopped then
      os.execute(string.format("kill -%s %d 2>/dev/null", signal or "TERM",
                               self.pid))
      local _, _, code = self.pipe:close()
      self.code = code
      self.stopped = true
      local f = io.open(self.errfile)
      self.stderr = f and f:read("a") or ""
      if f then f:close() end
      os.remove(self.errfile)
    end
    return self.code
  end
  return proc
end

-- Runs a shell command; returns its exit code, stdout and stderr.
function helper.run(cmd)
  local errfile = os.tmpname()
  local pipe = assert(io.popen(cmd .. " 2>" .. errfile, "r"))
  local out = pipe:read("a")
  local _, _, code = pipe:close()
  local f = assert(io.open(errfile))
  local err = f:read("a")
  f:close()
  os.remove(errfile)
  return code, out, err
end

-- Writes Lua source to a temporary script; returns its path.
-- A file's whole content (raises if it cannot be read); writes one.
function helper.slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

function helper.spit(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- Runs a shell command that must succeed; its stdout.
function helper.sh(cmd)
  local code, out, err = helper.run(cmd)
  assert(code == 0, cmd .. ": exit " .. tostring(code) .. ": " .. err)
  return out
end

function helper.write_script(source)
  local path = os.tmpname() .. ".lua"
  local f = assert(io.open(path, "w"))
  f:write(source)
  f:close()
  return path
end

-- Runs Lua source as the script of a child luahost, with arguments; the
-- child is killed after 30 s, so a hang fails instead of stopping the run.
-- Returns exit code, stdout, stderr, and the script's path (gone by then).
function helper.run_script(source, ...)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(source)
  f:close()
  local args = { ... }
  for i, a in ipairs(args) do args[i] = string.format("%q", a) end
  local code, out, err = helper.run(string.format("timeout -k 1 30 %s %s %s",
                                    helper.luahost, path,
                                    table.concat(args, " ")))
  os.remove(path)
  return code, out, err, path
end

-- A to-be-closed value that appends `name` to `log` when it closes.
function helper.closer(log, name)
  return setmetatable({}, { __close = function() log[#log + 1] = name end })
end

-- The values of r (a table.pack) as an array, nils kept as holes.
function helper.results(r) return { table.unpack(r, 1, r.n) } end

-- How many descriptors this process has open.
function helper.fds()
  local n = 0
  for name in lfs.dir("/proc/self/fd") do
    if name ~= "." and name ~= ".." then n = n + 1 end
  end
  return n - 1  -- the directory lfs.dir itself holds open
end

-- CPU time (user + system) a process has used, in seconds.
function helper.cputime(pid)
  local f = assert(io.open("/proc/" .. (pid or "self") .. "/stat"))
  local s = f:read("a")
  f:close()
  local fields = {}
  for x in s:match("%) (.*)"):gmatch("%S+") do fields[#fields + 1] = x end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

-- Resident set size of a process (default: this one), in bytes.
function helper.rss(pid)
  local f = assert(io.open("/proc/" .. (pid or "self") .. "/status"))
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)")) * 1024
end

-- Waits until fn() is true, polling, for at most `seconds`.
function helper.wait_until(fn, seconds)
  local deadline = so.now() + (seconds or 5)
  while not fn() do
    if so.now() > deadline then return false end
    so.sleep(0.01)
  end
  return true
end

-- Joins a task with a limit and rethrows its error.
function helper.join(task, seconds)
  local res = table.pack(so.join(task, seconds or 10))
  if res[1] == nil then error("task did not end: " .. tostring(res[2]), 2) end
  if res[1] == false then error(res[2], 0) end
  return table.unpack(res, 2, res.n)
end

-- A listener on a free loopback port whose accept loop runs
-- handler(conn) in a task per connection. Returns listener, host, port.
function helper.server(handler, host)
  local l = assert(so.listen(host or "127.0.0.1", 0))
  local h, p = so.sockname(l)
  so.spawn(function()
    while true do
      local c = l:accept()
      if not c then return end  -- closed
      so.spawn(handler, c)
    end
  end)
  return l, h, p
end

-- Reads exactly n bytes from conn (raises on an error or an early EOF).
function helper.read_n(conn, n)
  local parts, got = {}, 0
  while got < n do
    local d, err = conn:read()
    assert(d, err)
    assert(d ~= "", "EOF after " .. got .. " of " .. n .. " bytes")
    parts[#parts + 1] = d
    got = got + #d
  end
  return table.concat(parts)
end

-- A pair of connected conns, the client's and the server's ends; with
-- `limit`, every wait on either is bounded by it (a failing spec cannot
-- hang).
function helper.pair(limit)
  local l = assert(so.listen("127.0.0.1", 0))
  local h, p = so.sockname(l)
  local accepted
  local t = so.spawn(function() accepted = assert(l:accept()) end)
  local c = assert(so.connect(h, p))
  helper.join(t)
  l:close()
  if limit then
    c:settimeout(limit)
    accepted:settimeout(limit)
  end
  return c, accepted
end

-- What a spec must leave behind: no conn, no listener, no descriptor more
-- than at its start, and only the tasks it started with.
function helper.snapshot()
  collectgarbage()
  local st = so.stats()
  return { fds = helper.fds(), tasks = st.tasks, conns = st.conns,
           listeners = st.listeners }
end

function helper.assert_clean(before)
  assert(helper.wait_until(function()
    collectgarbage()
    local now = helper.snapshot()
    return now.conns == before.conns and now.listeners == before.listeners
       and now.fds == before.fds and now.tasks == before.tasks
  end, 5), "something was left open: " .. (function()
    local now = helper.snapshot()
    return string.format("fds %d->%d tasks %d->%d conns %d->%d listeners "
      .. "%d->%d", before.fds, now.fds, before.tasks, now.tasks, before.conns,
      now.conns, before.listeners, now.listeners)
  end)())
end

-- A watchdog: a test that waits for longer than this fails the whole run
-- with its name, instead of hanging it.
helper.test_limit = 120
do
  local ok, busted = pcall(require, "busted")
  if ok and type(busted) == "table" and busted.subscribe then
    local started, name, done
    busted.subscribe({ "test", "start" }, function(element)
      started, name = so.now(), element.name
      return nil, true
    end)
    busted.subscribe({ "test", "end" }, function()
      started = nil
      return nil, true
    end)
    busted.subscribe({ "exit" }, function()
      done = true
      return nil, true
    end)
    so.spawn(function()
      while not done do
        so.sleep(0.1)
        if started and so.now() - started > helper.test_limit then
          io.stderr:write("luahost spec: test hung for ", helper.test_limit,
                          " s: ", tostring(name), "\n")
          os.exit(1)
        end
      end
    end)
  end
end

-- A string quoted for the shell.
function helper.shq(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs a shell command in the background, in a session of its own, with
-- stdout and stderr going to files, so that this process's tasks go on
-- while it runs. Returns a handle: h:done() is its exit code once it has
-- ended (else nil); h:wait([seconds]) waits (with so.sleep) and returns
-- code, stdout, stderr, or nil, "timeout" after killing it; h:kill().
--
-- With `stdin` true its stdin is a FIFO that h:send(text) writes to and
-- h:close_stdin() ends (else it is /dev/null).
function helper.bg(cmd, stdin)
  local base = os.tmpname()
  local h = { out = base .. ".out", err = base .. ".err", rc = base .. ".rc",
              base = base }
  local input = "/dev/null"
  if stdin then
    input = base .. ".in"
    assert(os.execute("mkfifo " .. input))
  end
  local inner = string.format("( %s ) <%s >%s 2>%s; echo $? >%s.tmp; "
                              .. "mv %s.tmp %s", cmd, input, h.out, h.err,
                              h.rc, h.rc, h.rc)
  os.execute(string.format("setsid sh -c %s </dev/null >/dev/null 2>&1 & "
                           .. "echo $! >%s.pid", helper.shq(inner), base))
  local f = assert(io.open(base .. ".pid"))
  h.pid = assert(tonumber(f:read("l")))
  f:close()
  if stdin then
    -- (opening waits until the shell has opened its end: at once)
    h.stdin = assert(io.open(input, "w"))
    h.stdin:setvbuf("no")
  end
  function h:send(text) return self.stdin:write(text) end
  function h:close_stdin()
    if self.stdin then self.stdin:close(); self.stdin = nil end
  end
  local function slurp(path)
    local fh = io.open(path)
    if not fh then return "" end
    local s = fh:read("a")
    fh:close()
    return s
  end
  function h:done()
    local fh = io.open(self.rc)
    if not fh then return nil end
    local code = tonumber(fh:read("l"))
    fh:close()
    return code
  end
  -- What it has written so far.
  function h:output() return slurp(self.out), slurp(self.err) end
  function h:kill()
    os.execute(string.format("kill -KILL -%d 2>/dev/null", self.pid))
  end
  function h:cleanup()
    self:close_stdin()
    for _, suffix in ipairs { "", ".out", ".err", ".rc", ".pid", ".in" } do
      os.remove(base .. suffix)
    end
  end
  function h:wait(seconds)
    local ok = helper.wait_until(function() return self:done() ~= nil end,
                                 seconds or 10)
    local out, err = self:output()
    if not ok then
      self:kill()
      self:cleanup()
      return nil, "timeout", out, err
    end
    local code = self:done()
    self:cleanup()
    return code, out, err
  end
  return h
end

-- Certificates for the TLS specs, made with the openssl command in a new
-- temporary directory: a private CA (ca.crt), leaf certificates signed by
-- it (server: localhost and 127.0.0.1; other: other.test; wild:
-- *.wild.test; client: a client certificate; expired: localhost, valid
-- only on 2020-01-01), and a second CA (rogue.crt) with untrusted (a
-- localhost server certificate) and rogueclient. Returns a table:
-- certs.dir, certs.ca, certs.rogue_ca, certs.NAME = { cert =, key = },
-- certs:remove().
local CERTS_SH = [=[
set -e
d=$1; cd "$d"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
ca() { # name cn
  key $1.key
  openssl req -x509 -new -key $1.key -subj "/CN=$2" -days 30 -out $1.crt \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash"
}
leaf() { # name cn san eku [ca]
  key $1.key
  openssl req -new -key $1.key -subj "/CN=$2" -out $1.csr
  printf "basicConstraints=CA:FALSE\nsubjectAltName=%s\nextendedKeyUsage=%s\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" \
    "$3" "$4" > $1.ext
  openssl x509 -req -in $1.csr -CA ${5:-ca}.crt -CAkey ${5:-ca}.key \
    -CAcreateserial -days 30 -extfile $1.ext -out $1.crt
}
ca ca "luahost test CA"
ca rogue "luahost rogue CA"
leaf server localhost "DNS:localhost,IP:127.0.0.1" serverAuth
leaf other other.test "DNS:other.test" serverAuth
leaf wild "*.wild.test" "DNS:*.wild.test" serverAuth
leaf client "luahost client" "email:client@example.com" clientAuth
leaf untrusted localhost "DNS:localhost,IP:127.0.0.1" serverAuth rogue
leaf rogueclient "rogue client" "email:rogue@example.com" clientAuth rogue
# An expired one: openssl ca takes explicit validity dates.
mkdir -p db; : > db/index.txt; echo 1000 > db/serial
cat > ca.cnf <<CNF
[ ca ]
default_ca = test
[ test ]
database = $d/db/index.txt
serial = $d/db/serial
new_certs_dir = $d/db
default_md = sha256
policy = any
copy_extensions = none
x509_extensions = leaf
unique_subject = no
[ any ]
commonName = supplied
[ leaf ]
basicConstraints = CA:FALSE
subjectAltName = DNS:localhost,IP:127.0.0.1
extendedKeyUsage = serverAuth
CNF
key expired.key
openssl req -new -key expired.key -subj "/CN=localhost" -out expired.csr
openssl ca -batch -config ca.cnf -cert ca.crt -keyfile ca.key \
  -in expired.csr -out expired.crt -notext \
  -startdate 20200101000000Z -enddate 20200102000000Z
printf 'this is not a certificate\n' > garbage.pem
]=]

function helper.tls_certs()
  local dir = os.tmpname()
  os.remove(dir)
  assert(lfs.mkdir(dir))
  local script = dir .. "/make.sh"
  local f = assert(io.open(script, "w"))
  f:write(CERTS_SH)
  f:close()
  local code, _, err = helper.run("sh " .. script .. " " .. dir)
  assert(code == 0, "making certificates failed: " .. err)
  local certs = { dir = dir, ca = dir .. "/ca.crt",
                  rogue_ca = dir .. "/rogue.crt",
                  garbage = dir .. "/garbage.pem" }
  for _, name in ipairs { "server", "other", "wild", "client", "untrusted",
                          "rogueclient", "expired" } do
    certs[name] = { cert = dir .. "/" .. name .. ".crt",
                    key = dir .. "/" .. name .. ".key" }
  end
  function certs:remove() os.execute("rm -rf " .. helper.shq(self.dir)) end
  return certs
end


-- A free TCP port on 127.0.0.1 (bound and released: another process may
-- take it meanwhile, which the specs that use it accept).
function helper.free_port()
  local l = assert(so.listen("127.0.0.1", 0))
  local _, port = so.sockname(l)
  l:close()
  return port
end

-- Waits until something accepts connections on host:port (at most
-- `seconds`, default 10). True when it does.
function helper.wait_port(port, host, seconds)
  return helper.wait_until(function()
    local c = so.connect(host or "127.0.0.1", port)
    if c then c:close(); return true end
    return false
  end, seconds or 10)
end

--[[
** nginx (Debian's, with its Lua module) started as bench/run starts its
** peer: a temporary prefix, `daemon off`, one worker, listening on a free
** port of 127.0.0.1. `http_conf` is the text inside its `http { }` block,
** with @PORT@ and @PREFIX@ replaced. Returns a handle: ngx.port,
** ngx.prefix, ngx:stop(); or nil, why (nginx or its Lua module missing,
** or it did not start).
]]
function helper.nginx(http_conf)
  if not os.execute("command -v nginx >/dev/null 2>&1") then
    return nil, "nginx not found"
  end
  local lua_mod = "/usr/lib/nginx/modules/ngx_http_lua_module.so"
  local has_lua = io.open(lua_mod) ~= nil
  local prefix = os.tmpname()
  os.remove(prefix)
  assert(lfs.mkdir(prefix))
  assert(lfs.mkdir(prefix .. "/tmp"))
  local port = helper.free_port()
  http_conf = http_conf:gsub("@PORT@", tostring(port))
                       :gsub("@PREFIX@", prefix)
  local conf = table.concat({
    "daemon off;",
    "master_process on;",
    "worker_processes 1;",
    "pid " .. prefix .. "/nginx.pid;",
    "error_log " .. prefix .. "/error.log warn;",
    has_lua and "load_module /usr/lib/nginx/modules/ndk_http_module.so;" or "",
    has_lua and "load_module " .. lua_mod .. ";" or "",
    "events { worker_connections 1024; }",
    "http {",
    "  access_log off;",
    "  client_body_temp_path " .. prefix .. "/tmp/body;",
    "  proxy_temp_path " .. prefix .. "/tmp/proxy;",
    "  fastcgi_temp_path " .. prefix .. "/tmp/fastcgi;",
    "  uwsgi_temp_path " .. prefix .. "/tmp/uwsgi;",
    "  scgi_temp_path " .. prefix .. "/tmp/scgi;",
    http_conf,
    "}", "" }, "\n")
  local f = assert(io.open(prefix .. "/nginx.conf", "w"))
  f:write(conf)
  f:close()
  local h = helper.bg("exec nginx -p " .. helper.shq(prefix) .. " -c "
                      .. helper.shq(prefix .. "/nginx.conf"))
  local ngx = { port = port, prefix = prefix, has_lua = has_lua, bg = h }
  function ngx:stop()
    if self.stopped then return end
    self.stopped = true
    local pf = io.open(self.prefix .. "/nginx.pid")
    local pid = pf and tonumber(pf:read("l"))
    if pf then pf:close() end
    if pid then os.execute(string.format("kill -QUIT %d 2>/dev/null", pid))
    else self.bg:kill() end
    self.bg:wait(5)
    os.execute("rm -rf " .. helper.shq(self.prefix))
  end
  if not helper.wait_port(port) then
    local _, err = h:output()
    ngx:stop()
    return nil, "nginx did not start: " .. err
  end
  return ngx
end

--[[
** Runs Python source (python3 -u) in the background with `args`; it must
** print "port N" once it listens (and may print "pid N" before, for a
** quick stop: else it is killed with its shell). Returns a handle: p.port,
** p:stop(), p:output(); or nil, why.
]]
function helper.python_server(source, ...)
  local path = os.tmpname() .. ".py"
  local f = assert(io.open(path, "w"))
  f:write(source)
  f:close()
  local args = { ... }
  for i, a in ipairs(args) do args[i] = helper.shq(a) end
  local h = helper.bg("exec python3 -u " .. helper.shq(path) .. " "
                      .. table.concat(args, " "))
  local p = { bg = h, path = path }
  function p:output() return self.bg:output() end
  function p:stop()
    if self.stopped then return end
    self.stopped = true
    local pid = tonumber((self.bg:output()):match("pid (%d+)"))
    if pid then os.execute(string.format("kill -TERM %d 2>/dev/null", pid))
    else self.bg:kill() end
    self.bg:wait(5)
    os.remove(self.path)
  end
  local ok = helper.wait_until(function()
    local out = h:output()
    p.port = tonumber(out:match("port (%d+)"))
    return p.port ~= nil or h:done() ~= nil
  end, 10)
  if not ok or not p.port then
    local _, err = h:output()
    p:stop()
    return nil, "python server did not start: " .. err
  end
  return p
end

return helper
