-- The luahost command: arguments, exit status, errors, paths, signals.
local so = require "so"
local helper = require "helper"

local script = helper.write_script

local function luahost(args)
  return helper.run(helper.luahost .. " " .. args)
end

describe("luahost", function()
  it("prints usage on stderr and exits 2 without a script", function()
    local code, out, err = luahost("")
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("^usage: luahost %[options%] script %[args%]", err)
  end)

  it("prints usage on stderr and exits 2 for a bad option", function()
    local code, _, err = luahost("--frobnicate x.lua")
    assert.equal(2, code)
    assert.matches("unknown option '%-%-frobnicate'", err)
    assert.matches("usage: luahost", err)
  end)

  it("answers --version and --help on stdout", function()
    local code, out = luahost("--version")
    assert.equal(0, code)
    assert.matches("^luahost %d+%.%d+%.%d+ %(Lua 5%.4%.%d+, libuv 1%.%d+%.%d+%)\n$", out)
    code, out = luahost("--help")
    assert.equal(0, code)
    assert.matches("^usage: luahost", out)
  end)

  it("exits 1 when the script cannot be opened", function()
    local code, out, err = luahost("no/such.lua")
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("^luahost: cannot open no/such.lua", err)
  end)

  it("names file:line for a syntax error, and exits 1", function()
    local path = script("local x = = 1\n")
    local code, _, err = luahost(path)
    os.remove(path)
    assert.equal(1, code)
    assert.equal("luahost: " .. path .. ":1: unexpected symbol near '='\n", err)
  end)

  it("exits 1 with message and traceback when the script raises", function()
    local path = script([[
      local so = require "so"
      so.sleep(0.01)
      local function f() error("script failed") end
      f()
    ]])
    local code, _, err = luahost(path)
    os.remove(path)
    assert.equal(1, code)
    assert.matches("^" .. helper.log_line("ERROR") .. "[^\n]+:3: script failed\nstack traceback:\n", err)
    assert.not_matches("internal error", err)  -- every handle closed at exit
    assert.matches("in main chunk", err)
  end)

  it("exits 1 when the script raises, even with other tasks running",
     function()
    local path = script([[
      local so = require "so"
      so.spawn(function() so.sleep(60) end)
      so.sleep(0.01)
      error("stop")
    ]])
    local t0 = so.now()
    local code = luahost(path)
    os.remove(path)
    assert.equal(1, code)
    assert.is_true(so.now() - t0 < 5)
  end)

  it("sets arg and ... as lua does, and exits 0 when nothing is left",
     function()
    local path = script([[
      local so = require "so"
      print(arg[0] == ..., arg[1], arg[2], #arg, select("#", ...), ...)
      so.spawn(function() so.sleep(0.05) print("last task done") end)
    ]])
    local code, out = luahost(path .. " one 'two words'")
    os.remove(path)
    assert.equal(0, code)
    assert.equal("false\tone\ttwo words\t2\t2\tone\ttwo words\nlast task done\n", out)
  end)

  it("passes many arguments to the script", function()
    local path = script("print(select('#', ...), #arg, (select(300, ...)))")
    local args = {}
    for i = 1, 300 do args[i] = tostring(i) end
    local code, out = luahost(path .. " " .. table.concat(args, " "))
    os.remove(path)
    assert.equal(0, code)
    assert.equal("300\t300\t300\n", out)
  end)

  it("raises its soft descriptor limit to the hard limit", function()
    local path = script([[
      local f = assert(io.open("/proc/self/limits"))
      local soft, hard = f:read("a"):match("Max open files%s+(%d+)%s+(%d+)")
      f:close()
      print(soft == hard, soft ~= "256")
    ]])
    local code, out = helper.run("ulimit -S -n 256; " .. helper.luahost .. " " .. path)
    os.remove(path)
    assert.equal(0, code)
    assert.equal("true\ttrue\n", out)
  end)

  it("stops at -- and passes options after the script to it", function()
    local path = script("print(...)")
    local code, out = luahost("-- " .. path .. " --version -x")
    os.remove(path)
    assert.equal(0, code)
    assert.equal("--version\t-x\n", out)
  end)

  it("finds the host's Lua modules from any directory, and Debian's", function()
    local path = script([[
      print(package.searchpath("so.reader", package.path) ~= nil)
      print(require("lfs") ~= nil, require("pl.path") ~= nil)
    ]])
    local exe = helper.luahost
    if exe:sub(1, 1) ~= "/" then exe = os.getenv("PWD") .. "/" .. exe end
    local code, out, err = helper.run("cd / && " .. exe .. " " .. path)
    os.remove(path)
    assert.equal(0, code, err)
    assert.equal("true\ntrue\ttrue\n", out)
  end)

  it("refuses a spawn or a wait from a finalizer at exit, cleanly", function()
    -- Finalizers run inside lua_close at exit: a spawn there used to
    -- crash the host (and a sleep leaked its timer).
    local path = script([[
      local so = require "so"
      keep = setmetatable({}, { __gc = function()
        so.spawn(function() return "at once" end)
      end })
      keep1 = setmetatable({}, { __gc = function()
        so.spawn(function() so.sleep(1) end)
      end })
      keep2 = setmetatable({}, { __gc = function() so.sleep(1) end })
      print("done")
    ]])
    local code, out, err = luahost(path)
    os.remove(path)
    assert.equal(0, code, err)
    assert.equal("done\n", out)
    assert.equal("", err)
  end)

  it("exits 0 on SIGINT while the script sleeps, leaking nothing", function()
    -- Under AddressSanitizer (CI) a leak makes the exit status 1.
    local path = script([[
      local so = require "so"
      print("listening on 127.0.0.1:1")
      io.stdout:flush()
      so.sleep(30)
    ]])
    local proc = helper.start_opts("--drain 0.2", path)
    assert.equal(0, proc:stop("INT"))
    assert.not_matches("ERROR", proc.stderr)
    assert.matches("drain: 1 task%(s%) left after 0.2 s, cancelled", proc.stderr)
    os.remove(path)
  end)

  it("caps the Lua heap with --max-memory, and checks the size", function()
    local path = script([[
      local ok, err = pcall(string.rep, "x", 64 * 1024 * 1024)
      print(ok, err)
    ]])
    local code, out, err = luahost("--max-memory 16M " .. path)
    assert.equal(0, code, err)
    assert.equal("false\tnot enough memory\n", out)
    code, out = luahost(path)
    assert.equal(0, code)
    assert.matches("^true", out)
    os.remove(path)
    code, _, err = luahost("--max-memory lots x.lua")
    assert.equal(2, code)
    assert.matches("%-%-max%-memory wants a size", err)
  end)

  for _, sig in ipairs({ "INT", "TERM", "QUIT" }) do
    it("drains on SIG" .. sig .. ": refuses new clients at once, serves the "
       .. "connected one, exits 0 within the drain period", function()
      local proc = helper.start_opts("--drain 1", "scripts/echo.lua")
      local c = assert(so.connect(proc.host, proc.port))
      c:settimeout(5)
      assert(c:write("x"))
      assert.equal("x", c:read())
      local t0 = so.now()
      os.execute(string.format("kill -%s %d", sig, proc.pid))
      so.sleep(0.2)
      local refused, _, name = so.connect(proc.host, proc.port)
      assert.is_nil(refused)
      assert.equal("ECONNREFUSED", name)
      assert(c:write("y"))             -- the connected client is still served
      assert.equal("y", c:read())
      local d, msg = c:read()          -- until the drain period ends
      assert.truthy(d == "" or d == nil, msg)
      local took = so.now() - t0
      assert.is_true(took > 0.8 and took < 3, took)
      c:close()
      assert.equal(0, proc:wait())
      assert.matches(helper.log_line("INFO") .. "drain: SIG" .. sig, proc.stderr)
    end)
  end

  it("exits at once on a second signal during a drain", function()
    local proc = helper.start_opts("--drain 30", "scripts/echo.lua")
    local c = assert(so.connect(proc.host, proc.port))
    c:settimeout(5)
    assert(c:write("x"))
    assert.equal("x", c:read())
    local t0 = so.now()
    os.execute(string.format("kill -TERM %d", proc.pid))
    so.sleep(0.2)
    os.execute(string.format("kill -TERM %d", proc.pid))
    local d, msg = c:read()
    assert.truthy(d == "" or d == nil, msg)
    assert.is_true(so.now() - t0 < 2)
    c:close()
    assert.equal(0, proc:wait())
    assert.matches("second signal, exiting now", proc.stderr)
  end)
end)
