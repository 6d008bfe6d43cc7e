--[[
** redis_client.lua: load from luahost's Redis client (so.redis), for
** `bench/run clients`.
**
**   luahost bench/peers/redis_client.lua port=PORT cmd=get|set conc=50 \
**     pipeline=1 seconds=5 warmup=0.5 [srvpid=PID]
**
** `conc` tasks, each with a client of its own (redis.connect with
** pool = true), loop: with pipeline=1, c:call("GET", key) or
** c:call("SET", key, value); with pipeline=N > 1, c:pipeline(fn) sending N
** such commands at once. The key is redis-benchmark's ("key:__rand_int__",
** which it uses as is without -r) and the value its default 3 bytes "xxx";
** GET expects "xxx" (bench/run sets it first). Every reply is checked.
** After `warmup` seconds the measured window starts; after `seconds` more
** it ends. One line on stdout:
**
**   result ops=N seconds=S cpu_s=C srv_ticks=T errors=E
**
** ops: commands completed in the window (N per pipeline); cpu_s and
** srv_ticks as in http_client.lua.
]]

local so = require "so"
local redis = require "so.redis"

local opt = { conc = "50", seconds = "5", warmup = "0.5", srvpid = "",
              pipeline = "1", host = "127.0.0.1", cmd = "get" }
for _, a in ipairs(arg) do
  local k, v = a:match("^([%w_]+)=(.*)$")
  if not k then error("bad argument: " .. a) end
  opt[k] = v
end
local port = assert(math.tointeger(tonumber(opt.port)), "port=... wanted")
local conc = assert(math.tointeger(tonumber(opt.conc)), "conc")
local depth = assert(math.tointeger(tonumber(opt.pipeline)), "pipeline")
local seconds, warmup = tonumber(opt.seconds), tonumber(opt.warmup)
local CMD = opt.cmd:upper()
assert(CMD == "GET" or CMD == "SET", "cmd=get|set")
local KEY, VALUE = "key:__rand_int__", "xxx"
local want = CMD == "GET" and VALUE or true

local function srv_ticks()
  if opt.srvpid == "" then return -1 end
  local f = io.open("/proc/" .. opt.srvpid .. "/stat")
  if not f then return -1 end
  local s = f:read("a"); f:close()
  local rest = s:match("%) (.*)$")
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  return tonumber(fields[12]) + tonumber(fields[13])
end

local count, errors, first_err, stop = 0, 0, nil, false

-- One batch of a pipeline; made once, not per batch.
local batch
if CMD == "GET" then
  batch = function(p) for _ = 1, depth do p:call("GET", KEY) end end
else
  batch = function(p) for _ = 1, depth do p:call("SET", KEY, VALUE) end end
end

local function note(err)
  errors = errors + 1
  first_err = first_err or err
  if errors > 100 then stop = true end
end

local function worker()
  local c, err = redis.connect(opt.host, port, { pool = true })
  if not c then note(err); return end
  if depth == 1 then
    local call = c.call
    if CMD == "GET" then
      while not stop do
        local v, e = call(c, "GET", KEY)
        if v == want then count = count + 1
        else note(e or ("GET returned " .. tostring(v))); if e then break end end
      end
    else
      while not stop do
        local v, e = call(c, "SET", KEY, VALUE)
        if v == want then count = count + 1
        else note(e or ("SET returned " .. tostring(v))); if e then break end end
      end
    end
  else
    while not stop do
      local replies, e = c:pipeline(batch)
      if not replies then note(e); break end
      for i = 1, depth do
        if replies[i] ~= want then
          note("reply " .. i .. ": " .. tostring(replies[i])); break
        end
      end
      count = count + depth
    end
  end
  c:keepalive()
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
  io.stderr:write("redis_client: ", errors, " error(s), the first: ",
                  tostring(first_err), "\n")
  os.exit(1)
end
