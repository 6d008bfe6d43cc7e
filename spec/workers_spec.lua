-- luahost --workers N: worker processes sharing the listening sockets, a
-- supervisor that restarts them, drains them and reloads them.
local so = require "so"
local helper = require "helper"

-- Each connection is answered "WORKER PID\n" and closed.
local SERVER = [[
local so = require "so"
local l = assert(so.listen("127.0.0.1", tonumber(arg[1]) or 0))
local h, p = l:sockname()
print("listening on " .. h .. ":" .. p)
io.stdout:flush()
while true do
  local c, _, name = l:accept()
  if c then
    so.spawn(function()
      local pid = io.open("/proc/self/stat"):read("l"):match("^%d+")
      c:write(so.worker() .. " " .. pid .. "\n")
      c:close()
    end)
  elseif name == "ECANCELED" then
    break
  end
end
]]

-- One request: worker number, pid; or nil, error.
local function ask(proc)
  local c, err = so.connect(proc.host, proc.port)
  if not c then return nil, err end
  c:settimeout(5)
  local d, e = c:read()
  c:close()
  if not d or d == "" then return nil, e or "EOF" end
  local w, pid = d:match("^(%d+) (%d+)\n$")
  return tonumber(w), tonumber(pid)
end

local function kill(sig, pid)
  os.execute(string.format("kill -%s %d", sig, pid))
end

local function start(source, opts)
  local path = helper.write_script(source)
  local proc = helper.start_opts(opts or "--workers 2", path)
  proc.path = path
  return proc
end

local function finish(proc)
  proc:stop("KILL")
  os.remove(proc.path)
end

describe("luahost --workers", function()
  it("runs N workers that all serve the same port", function()
    local proc = start(SERVER)
    finally(function() finish(proc) end)
    local seen, pids = {}, {}
    -- batches of 20 concurrent clients, until both have answered (a
    -- worker may take a moment to start, under a sanitizer most)
    assert.is_true(helper.wait_until(function()
      local tasks = {}
      for i = 1, 20 do
        tasks[i] = so.spawn(function()
          local w, pid = assert(ask(proc))
          seen[w], pids[pid] = true, true
        end)
      end
      for _, t in ipairs(tasks) do helper.join(t, 20) end
      return seen[1] and seen[2]
    end, 10), "connections landed on one worker only")
    local n = 0
    for _ in pairs(pids) do n = n + 1 end
    assert.equal(2, n)
    assert.is_nil(seen[3])
  end)

  it("starts again a worker killed with -9", function()
    local proc = start(SERVER)
    finally(function() finish(proc) end)
    local pids = {}
    assert.is_true(helper.wait_until(function()
      local w, pid = assert(ask(proc))
      pids[w] = pid
      return pids[1] and pids[2]
    end, 10))
    kill("KILL", pids[1])
    local again
    assert.is_true(helper.wait_until(function()
      local w, pid = ask(proc)
      if w == 1 and pid ~= pids[1] then again = pid end
      return again ~= nil
    end, 10))
    proc:stop("TERM")
    assert.matches("worker 1 %(pid " .. pids[1] .. "%) killed by signal 9",
                   proc.stderr)
  end)

  it("backs off when the script keeps crashing", function()
    local proc = start([[
      print("listening on 127.0.0.1:1")
      io.stdout:flush()
      error("crash")
    ]])
    finally(function() finish(proc) end)
    so.sleep(2)
    proc:stop("TERM")
    local _, crashes = proc.stderr:gsub("exited with status 1", "")
    -- two workers, each restarted after 0.1, 0.2, 0.4, 0.8 s: a handful,
    -- not hundreds (fewer where starting is slow, under a sanitizer)
    assert.is_true(crashes >= 4 and crashes <= 14, crashes)
    assert.matches("starting again in 0.4 s", proc.stderr)
  end)

  it("drains every worker on SIGTERM and exits 0", function()
    local proc = start([[
      local so = require "so"
      local l = assert(so.listen("127.0.0.1", 0))
      local h, p = l:sockname()
      print("listening on " .. h .. ":" .. p)
      io.stdout:flush()
      while true do
        local c, _, name = l:accept()
        if c then
          so.spawn(function()
            local d = c:read()       -- answers after the drain began
            so.sleep(0.3)
            c:write("bye " .. d)
            c:close()
          end)
        elseif name == "ECANCELED" then break end
      end
    ]])
    finally(function() finish(proc) end)
    local c = assert(so.connect(proc.host, proc.port))
    c:settimeout(5)
    assert(c:write("x"))
    so.sleep(0.1)
    local t0 = so.now()
    kill("TERM", proc.pid)
    so.sleep(0.1)
    assert.is_nil((so.connect(proc.host, proc.port)))  -- refused at once
    assert.equal("bye x", c:read())                      -- in flight: done
    c:close()
    assert.equal(0, proc:wait())
    assert.is_true(so.now() - t0 < 3)
  end)

  it("kills every worker on a second signal, even one whose loop is stuck",
     function()
    local proc = start([[
      print("listening on 127.0.0.1:1")
      io.stdout:flush()
      while true do end   -- no signal is ever handled here
    ]])
    finally(function() finish(proc) end)
    so.sleep(0.3)
    kill("TERM", proc.pid)
    so.sleep(0.3)
    kill("TERM", proc.pid)
    assert.is_true(helper.wait_until(function()   -- gone, or a zombie
      local f = io.open("/proc/" .. proc.pid .. "/stat")
      local st = f and f:read("a"):match("%) (%a)")
      if f then f:close() end
      return st == nil or st == "Z"
    end, 5), "the supervisor did not exit")
    assert.equal(0, proc:wait())
    assert.matches("second signal, killing every worker", proc.stderr)
  end)

  it("reloads five times in a row with no refused and no reset connection",
     function()
    local proc = start(SERVER)
    finally(function() finish(proc) end)
    local ok, bad, pids, stop = 0, {}, {}, false
    local client = so.spawn(function()
      while not stop do
        local w, pid = ask(proc)
        if w then
          ok = ok + 1
          pids[pid] = true
        else
          bad[#bad + 1] = pid
        end
      end
    end)
    for _ = 1, 5 do
      so.sleep(0.4)
      kill("HUP", proc.pid)
    end
    so.sleep(0.6)
    stop = true
    helper.join(client, 10)
    assert.same({}, bad)
    assert.is_true(ok > 100, ok)
    local n = 0
    for _ in pairs(pids) do n = n + 1 end
    assert.is_true(n >= 10, n)  -- old and new generations both answered
    proc:stop("TERM")
    local _, runs = proc.stderr:gsub("reload: generation %d runs", "")
    assert.equal(5, runs)
  end)

  it("keeps the old workers when the reloaded script is broken", function()
    local proc = start(SERVER)
    finally(function() finish(proc) end)
    local w1, pid1 = assert(ask(proc))
    local f = assert(io.open(proc.path, "w"))
    f:write("this is not lua\n")
    f:close()
    kill("HUP", proc.pid)
    so.sleep(0.5)
    for _ = 1, 20 do assert(ask(proc)) end   -- still served
    proc:stop("TERM")
    assert.matches("reload failed: worker %d of generation 1 ended before "
                   .. "it ran; generation 0 goes on serving", proc.stderr)
    assert.matches(":1: syntax error near", proc.stderr)  -- why, logged
    assert.truthy(w1 and pid1)
  end)

  it("passes SIGUSR1 on to every worker", function()
    local proc = start(SERVER)
    finally(function() finish(proc) end)
    local seen = {}
    assert.is_true(helper.wait_until(function()
      seen[ask(proc) or 0] = true
      return seen[1] and seen[2]
    end, 10))
    kill("USR1", proc.pid)
    so.sleep(0.3)
    proc:stop("TERM")
    local _, dumps = proc.stderr:gsub("waiting accept 127%.0%.0%.1:" .. proc.port,
                                      "")
    assert.equal(2, dumps)
  end)

  it("refuses a bad number of workers; so.worker() is nil without it", function()
    local code, _, err = helper.run(helper.luahost .. " --workers 0 x.lua")
    assert.equal(2, code)
    assert.matches("%-%-workers wants a number from 1 to 256, or auto", err)
    assert.is_nil(so.worker())
  end)
end)
