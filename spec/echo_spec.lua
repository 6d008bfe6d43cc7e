-- scripts/echo.lua end to end: the real binary over real sockets.
local so = require "so"
local helper = require "helper"

describe("scripts/echo.lua", function()
  local proc
  before_each(function() proc = helper.start("scripts/echo.lua") end)
  after_each(function() assert.equal(0, proc:stop()) end)

  it("prints exactly one line with the real address", function()
    assert.matches("^listening on 127%.0%.0%.1:%d+$", proc.line)
    assert.is_true(proc.port > 0)
  end)

  it("echoes every byte, on many connections at once", function()
    local tasks = {}
    for i = 1, 50 do
      tasks[i] = so.spawn(function()
        local c <close> = assert(so.connect(proc.host, proc.port))
        for j = 1, 20 do
          local msg = ("%d:%d;"):format(i, j):rep(j)
          assert(c:write(msg))
          local got = ""
          while #got < #msg do got = got .. assert(c:read()) end
          assert.equal(msg, got)
        end
      end)
    end
    for i = 1, 50 do helper.join(tasks[i], 30) end
  end)

  it("echoes all 256 byte values and 32 MiB in order", function()
    local c <close> = assert(so.connect(proc.host, proc.port))
    local bytes = {}
    for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
    local block = table.concat(bytes):rep(1024)  -- 256 KiB
    local writer = so.spawn(function()
      for _ = 1, 128 do assert(c:write(block)) end
      assert(c:shutdown())
    end)
    local n, pos = 0, 0
    while true do
      local d = assert(c:read())
      if d == "" then break end
      -- compare against the pattern without building 32 MiB
      local off = pos % #block
      local expect = (block .. block):sub(off + 1, off + #d)
      if #d > #block then expect = nil end
      if expect then assert(d == expect, "bytes differ near " .. pos) end
      pos = pos + #d
      n = n + 1
    end
    helper.join(writer, 30)
    assert.equal(128 * #block, pos)
  end)

  it("stays within a few MiB during a 1 GiB flood from a client that reads nothing",
     function()
    local c <close> = assert(so.connect(proc.host, proc.port))
    so.sleep(0.1)
    local idle = helper.rss(proc.pid)
    local chunk = ("0123456789abcdef"):rep(64 * 1024)  -- 1 MiB
    local sent, peak = 0, idle
    c:settimeout(0.5)
    while sent < 1024 * 1024 * 1024 do
      local ok, _, name = c:write(chunk)
      peak = math.max(peak, helper.rss(proc.pid))
      if not ok then
        assert.equal("ETIMEDOUT", name)  -- blocked by TCP
        break
      end
      sent = sent + #chunk
    end
    assert.is_true(sent < 1024 * 1024 * 1024, "the client was never blocked")
    for _ = 1, 5 do
      so.sleep(0.1)
      peak = math.max(peak, helper.rss(proc.pid))
    end
    assert.is_true(peak - idle < 16 * 1024 * 1024,
                   ("RSS grew by %d bytes"):format(peak - idle))
  end)

  it("closes a connection whose client resets it, and goes on serving",
     function()
    for _ = 1, 20 do
      local c = assert(so.connect(proc.host, proc.port))
      c:write("unread reply")
      so.sleep(0.01)
      c:close()  -- the echo is unread: RST
    end
    local c <close> = assert(so.connect(proc.host, proc.port))
    c:write("still here")
    assert.equal("still here", c:read())
    so.sleep(0.05)
  end)
end)

describe("scripts/echo.lua arguments", function()
  it("listens on the given host", function()
    local proc = helper.start("scripts/echo.lua", "::1")
    assert.matches("^listening on ::1:%d+$", proc.line)
    local c <close> = assert(so.connect("::1", proc.port))
    c:write("six")
    assert.equal("six", c:read())
    assert.equal(0, proc:stop())
  end)

  it("defaults to 127.0.0.1:1234", function()
    local pipe = assert(io.popen("echo $$; exec " .. helper.luahost
                                 .. " scripts/echo.lua 2>&1"))
    local pid = assert(tonumber(pipe:read("l")))
    local line = pipe:read("l")  -- waits until it listens (or fails)
    os.execute("kill -INT " .. pid)
    local rest = pipe:read("a")
    local _, _, code = pipe:close()
    assert.equal("listening on 127.0.0.1:1234", line, rest)  -- port taken?
    assert.equal(0, code)
  end)
end)
