-- so.channel: values passed between tasks, in order, with backpressure.
local so = require "so"
local helper = require "helper"

-- How long a socket wait may take before a spec counts it as hung.
local LIMIT = 5

-- A pair of connected conns, every wait on them bounded by LIMIT.
local function pair() return helper.pair(LIMIT) end

local EPIPE = { nil, "EPIPE: broken pipe", "EPIPE" }
local TIMEDOUT = { nil, "ETIMEDOUT: timed out", "ETIMEDOUT" }

describe("so.channel", function()
  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  it("gives values in the order they were sent", function()
    local ch = so.channel(10)
    assert.equal(0, #ch)
    for i = 1, 10 do
      assert.is_true(ch:send(i))
      assert.equal(i, #ch)
    end
    for i = 1, 10 do assert.equal(i, ch:recv()) end
    assert.equal(0, #ch)
    -- and between tasks, across waits
    local got = {}
    local consumer = so.spawn(function()
      for _ = 1, 100 do got[#got + 1] = ch:recv() end
    end)
    for i = 1, 100 do
      assert.is_true(ch:send(i))
      if i % 7 == 0 then so.sleep(0) end
    end
    helper.join(consumer, 2)
    for i = 1, 100 do assert.equal(i, got[i]) end
  end)

  it("carries any value but nil, as it is", function()
    local ch = so.channel(8)
    local t, f = {}, function() end
    for _, v in ipairs({ false, 0, "", t, f, math.huge }) do ch:send(v) end
    assert.equal(false, ch:recv())
    assert.equal(0, ch:recv())
    assert.equal("", ch:recv())
    assert.equal(t, ch:recv())
    assert.equal(f, ch:recv())
    assert.equal(math.huge, ch:recv())
  end)

  it("with capacity 0, makes each send wait until a receiver takes the value",
     function()
    local ch = so.channel()
    local log = {}
    local sender = so.spawn(function()
      log[#log + 1] = "sending"
      local ok = ch:send("v")
      log[#log + 1] = "sent"
      return ok
    end)
    so.sleep(0.02)
    assert.same({ "sending" }, log)  -- nobody received yet
    assert.equal(0, #ch)  -- a waiting sender is not a queued value
    assert.equal("v", ch:recv())
    assert.same({ true, true }, { so.join(sender, 1) })
    assert.same({ "sending", "sent" }, log)
    -- a receiver that waits first gets the value at once
    local receiver = so.spawn(function() return ch:recv() end)
    assert.is_true(ch:send("w"))
    assert.same({ true, "w" }, { so.join(receiver, 1) })
    -- so.channel(0) is the same
    local ch0 = so.channel(0)
    so.settimeout(ch0, 0.02)
    assert.same(TIMEDOUT, { ch0:send(1) })
  end)

  it("blocks senders while full: #ch never above the capacity", function()
    local ch = so.channel(2)
    local sent, max = 0, 0
    local producer = so.spawn(function()
      for i = 1, 6 do
        assert.is_true(ch:send(i))
        sent = i
        max = math.max(max, #ch)
      end
    end)
    so.sleep(0.02)
    assert.equal(2, sent)  -- the third send waits
    assert.equal(2, #ch)
    local got = {}
    for i = 1, 6 do
      assert.is_true(#ch <= 2)
      got[i] = ch:recv()
      max = math.max(max, #ch)
      so.sleep(0)
    end
    helper.join(producer, 1)
    assert.same({ 1, 2, 3, 4, 5, 6 }, got)
    assert.is_true(max <= 2, max)
    assert.equal(0, #ch)
  end)

  it("wakes every waiting receiver with nil when closed", function()
    local ch = so.channel()
    local rs = {}
    for i = 1, 3 do
      rs[i] = so.spawn(function() return "returned", ch:recv() end)
    end
    so.sleep(0.01)
    ch:close()
    for i = 1, 3 do
      local r = table.pack(so.join(rs[i], 1))
      assert.is_true(r[1])
      assert.equal("returned", r[2])
      assert.is_nil(r[3])
    end
    assert.is_nil(ch:recv())  -- and later receivers at once
    assert.is_nil(ch:recv())
  end)

  it("wakes every waiting sender with nil, EPIPE when closed", function()
    local ch = so.channel(1)
    assert.is_true(ch:send("kept"))
    local ss = {}
    for i = 1, 3 do ss[i] = so.spawn(function() return ch:send(i) end) end
    so.sleep(0.01)
    assert.equal(1, #ch)
    ch:close()
    for i = 1, 3 do
      assert.same({ true, table.unpack(EPIPE) }, { so.join(ss[i], 1) })
    end
    assert.same(EPIPE, { ch:send("after") })  -- and later senders at once
    assert.equal("kept", ch:recv())  -- the value queued before the close
    assert.is_nil(ch:recv())
  end)

  it("still gives the buffered values after close, then nil", function()
    local ch = so.channel(3)
    ch:send("a"); ch:send("b"); ch:send("c")
    ch:close()
    assert.equal(3, #ch)
    assert.same(EPIPE, { ch:send("d") })
    assert.equal("a", ch:recv())
    assert.equal("b", ch:recv())
    assert.equal("c", ch:recv())
    assert.equal(0, #ch)
    assert.is_nil(ch:recv())
    assert.is_nil(ch:recv())
  end)

  it("serves several receivers first come, first served", function()
    local ch = so.channel()
    local rs = {}
    for i = 1, 4 do rs[i] = so.spawn(function() return ch:recv() end) end
    for _, v in ipairs({ "a", "b", "c", "d" }) do assert.is_true(ch:send(v)) end
    for i, v in ipairs({ "a", "b", "c", "d" }) do
      assert.same({ true, v }, { so.join(rs[i], 1) })
    end
    -- a value sent while a receiver waits is that receiver's, even when
    -- another recv comes before it runs
    local ch1 = so.channel(1)
    local first = so.spawn(function() return ch1:recv() end)
    assert.is_true(ch1:send("x"))
    so.settimeout(ch1, 0.02)
    assert.same(TIMEDOUT, { ch1:recv() })
    assert.same({ true, "x" }, { so.join(first, 1) })
  end)

  it("serves several senders first come, first served", function()
    local ch = so.channel()
    local ss = {}
    for i = 1, 4 do ss[i] = so.spawn(function() return ch:send(i) end) end
    for i = 1, 4 do assert.equal(i, ch:recv()) end
    for i = 1, 4 do assert.same({ true, true }, { so.join(ss[i], 1) }) end
    -- behind a full buffer, too: the waiting senders' values follow it
    local ch2 = so.channel(2)
    ch2:send(1); ch2:send(2)
    for i = 3, 6 do ss[i] = so.spawn(function() return ch2:send(i) end) end
    assert.equal(2, #ch2)
    local got = {}
    for i = 1, 6 do got[i] = ch2:recv() end
    assert.same({ 1, 2, 3, 4, 5, 6 }, got)
    for i = 3, 6 do assert.same({ true, true }, { so.join(ss[i], 1) }) end
  end)

  it("raises when sending nil", function()
    local ch = so.channel(1)
    assert.has_error(function() ch:send(nil) end)
    assert.has_error(function() ch:send() end)
    assert.equal(0, #ch)
  end)

  it("times out send and recv with so.settimeout, and stays usable", function()
    local ch = so.channel()
    assert.is_true(so.settimeout(ch, 0.03))
    local t0 = so.now()
    assert.same(TIMEDOUT, { ch:recv() })
    assert.is_true(so.now() - t0 >= 0.025)
    t0 = so.now()
    assert.same(TIMEDOUT, { ch:send("v") })
    assert.is_true(so.now() - t0 >= 0.025)
    -- the timed-out send left nothing: a receiver still finds it empty
    assert.same(TIMEDOUT, { ch:recv() })
    -- and it still works
    so.settimeout(ch, nil)
    local r = so.spawn(function() return ch:recv() end)
    assert.is_true(ch:send("w"))
    assert.same({ true, "w" }, { so.join(r, 1) })
  end)

  it("raises on bad arguments", function()
    assert.has_error(function() so.channel(-1) end)
    assert.has_error(function() so.channel("x") end)
    assert.has_error(function() so.channel({}) end)
    local ch = so.channel()
    assert.has_error(function() ch.send(42, 1) end)
    assert.has_error(function() ch.recv("ch") end)
    assert.has_error(function() so.settimeout(ch, -1) end)
  end)

  it("is not counted by so.stats", function()
    local st0 = so.stats()
    local chs = {}
    for i = 1, 10 do
      chs[i] = so.channel(i)
      chs[i]:send(i)
    end
    local st = so.stats()
    assert.same(st0, st)
    assert.is_nil(st.channels)
  end)

  it("carries what a task reads from a socket to another task", function()
    local c, s = pair()
    local ch = so.channel(1)
    local pump = so.spawn(function()
      local conn <close> = s
      while true do
        local d = assert(conn:read())
        if d == "" then break end
        assert.is_true(ch:send(d))
      end
      ch:close()
    end)
    local writer = so.spawn(function()
      for i = 1, 5 do
        assert(c:write("part" .. i .. ";"))
        so.sleep(0.005)
      end
      c:close()
    end)
    local got = {}
    while true do
      local v = ch:recv()
      if v == nil then break end
      got[#got + 1] = v
    end
    assert.equal("part1;part2;part3;part4;part5;", table.concat(got))
    helper.join(writer, 1)
    helper.join(pump, 1)
  end)
end)
