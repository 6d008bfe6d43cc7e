-- End-to-end specs for scripts/msg_echo.lua against the real binary.
local so = require "so"
local reader = require "so.reader"
local helper = require "helper"

describe("scripts/msg_echo.lua", function()
  local proc, snap

  setup(function() proc = helper.start("scripts/msg_echo.lua") end)
  teardown(function() if proc then proc:stop() end end)
  before_each(function() snap = helper.snapshot() end)
  after_each(function() helper.assert_clean(snap) end)

  local function connect()
    local c = assert(so.connect(proc.host, proc.port))
    c:settimeout(5)
    return c, reader.new(c)
  end

  it("echoes each message and says Bye. to quit", function()
    local c <close>, r = connect()
    assert(c:write("hello\n"))
    assert.are.equal("Echo: hello", r:read("l"))
    assert(c:write("two words\r\n"))
    assert.are.equal("Echo: two words\r\n", r:read("L"))
    assert(c:write("\n"))
    assert.are.equal("Echo: \n", r:read("L"))
    assert(c:write("quit\n"))
    assert.are.equal("Bye.\n", r:read("L"))
    assert.are.equal("", r:read("a"))
  end)

  it("answers pipelined messages in order", function()
    local c <close>, r = connect()
    local out, want = {}, {}
    for i = 1, 1000 do
      out[i] = "m" .. i .. "\n"
      want[i] = "Echo: m" .. i .. "\n"
    end
    out[#out + 1] = "quit\n"
    want[#want + 1] = "Bye.\n"
    assert(c:write(table.concat(out)))
    assert.are.equal(table.concat(want), r:read("a", 1e6))
  end)

  it("joins a message split across packets", function()
    local c <close>, r = connect()
    local msg = "split message\n"
    for i = 1, #msg - 1 do
      assert(c:write(msg:sub(1, i)))
      so.sleep(0.002)
      assert(c:write(msg:sub(i + 1)))
      assert.are.equal("Echo: " .. msg, r:read("L"))
    end
    assert(c:write("a\nb"))
    assert.are.equal("Echo: a\n", r:read("L"))
    assert(c:write("c\nquit\n"))
    assert.are.equal("Echo: bc\nBye.\n", r:read("a"))
  end)

  it("accepts a 1 MiB message and closes on a longer one", function()
    local c <close>, r = connect()
    local big = ("x"):rep(1024 * 1024)
    local t = so.spawn(function() return c:write(big .. "\n") end)
    assert.are.equal("Echo: " .. big .. "\n", r:read("L", 2 * 1024 * 1024))
    assert.is_true(so.join(t, 5))
    t = so.spawn(function() return c:write(big .. "y\n") end)
    -- Closed: a clean EOF, or a reset since the server left bytes unread.
    local rest, err = r:read("a")
    assert.is_true(rest == "" or (rest == nil and err ~= nil))
    so.join(t, 5)
  end)

  it("serves other clients while one is silent", function()
    local idle <close> = connect()
    local c <close>, r = connect()
    assert(c:write("still here\n"))
    assert.are.equal("Echo: still here", r:read("l"))
  end)
end)
