--[[
** http_client.lua: load from luahost's HTTP client (so.http), for
** `bench/run clients`.
**
**   luahost bench/peers/http_client.lua url=http://127.0.0.1:PORT/ \
**     conc=50 seconds=5 warmup=0.5 [srvpid=PID] [body="hello world\n"]
**
** `conc` tasks each loop: http.request{url, pool = true}, the body read to
** its end (which returns the conn to the keep-alive pool), status and body
** checked. After `warmup` seconds the measured window starts; after
** `seconds` more it ends and the tasks stop after their current request.
** One line on stdout:
**
**   result ops=N seconds=S cpu_s=C srv_ticks=T errors=E
**
** ops: requests completed in the window; cpu_s: this process's CPU time
** over the window (os.clock); srv_ticks: the CPU clock ticks
** (utime + stime) of process srvpid over the window, or -1. The first error
** goes to stderr; any error makes the exit status 1.
]]

local so = require "so"
local http = require "so.http"
local pool = require "so.pool"

local opt = { conc = "50", seconds = "5", warmup = "0.5", srvpid = "",
              body = "hello world\n" }
for _, a in ipairs(arg) do
  local k, v = a:match("^([%w_]+)=(.*)$")
  if not k then error("bad argument: " .. a) end
  opt[k] = v
end
local url = assert(opt.url, "url=... wanted")
local conc = assert(math.tointeger(tonumber(opt.conc)), "conc")
local seconds, warmup = tonumber(opt.seconds), tonumber(opt.warmup)
local want_body = opt.body:gsub("\\n", "\n")

-- Every task may hold a conn between two requests: keep them all.
pool.configure{ max_idle = math.max(conc, 32) }

local function srv_ticks()
  if opt.srvpid == "" then return -1 end
  local f = io.open("/proc/" .. opt.srvpid .. "/stat")
  if not f then return -1 end
  local s = f:read("a"); f:close()
  -- Fields after the ")" of the command: utime and stime are the 12th and
  -- 13th of them.
  local rest = s:match("%) (.*)$")
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  return tonumber(fields[12]) + tonumber(fields[13])
end

local count, errors, first_err, stop = 0, 0, nil, false
local request = http.request
local req = { url = url, pool = true, timeout = 30 }

local function worker()
  while not stop do
    local res, err = request(req)
    if res then
      local body
      body, err = res.body:readall()
      if body == want_body and res.status == 200 then
        count = count + 1
      else
        err = err or ("status " .. tostring(res.status) .. ", body "
                      .. string.format("%q", tostring(body)))
      end
    end
    if err then
      errors = errors + 1
      first_err = first_err or err
      if errors > 100 then stop = true end
      so.sleep(0.01)
    end
  end
end

local tasks = {}
for i = 1, conc do tasks[i] = so.spawn(worker) end

so.sleep(warmup)
local c0, cpu0, t0, s0 = count, os.clock(), so.now(), srv_ticks()
so.sleep(seconds)
local c1, cpu1, t1, s1 = count, os.clock(), so.now(), srv_ticks()
stop = true
for i = 1, conc do so.join(tasks[i]) end

print(string.format("result ops=%d seconds=%.4f cpu_s=%.4f srv_ticks=%d errors=%d",
                    c1 - c0, t1 - t0, cpu1 - cpu0,
                    (s0 >= 0 and s1 >= 0) and s1 - s0 or -1, errors))
if first_err then
  io.stderr:write("http_client: ", errors, " error(s), the first: ",
                  tostring(first_err), "\n")
  os.exit(1)
end
