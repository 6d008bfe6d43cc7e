-- Specs for lua/so/reader.lua, run inside the host: build/luahost spec/busted.lua spec/reader_spec.lua
local so = require "so"
local reader = require "so.reader"
local helper = require "helper"

-- A connected pair of loopback conns: client, server.
local function pair()
  local l = assert(so.listen("127.0.0.1", 0))
  local _, port = so.sockname(l)
  local t = so.spawn(function() return so.accept(l) end)
  local c = assert(so.connect("127.0.0.1", port))
  local ok, s = so.join(t, 5)
  so.close(l)
  assert(ok and s, "accept failed")
  return c, s
end

--[[
** Run fn(r) on a reader over one end while a spawned task writes the pieces
** to the other end, pausing between them so that each arrives as its own
** chunk; close_after closes the writing end when all is sent.
]]
local function feed(pieces, fn, opts, keep_open)
  local c, s = pair()
  local w = so.spawn(function()
    for i, p in ipairs(pieces) do
      if i > 1 then so.sleep(0.002) end
      assert(so.write(c, p))
    end
    if not keep_open then so.shutdown(c) end
  end)
  local r = reader.new(s, opts)
  local results = table.pack(pcall(fn, r, c))
  assert(so.join(w, 5))
  so.close(c)
  so.close(s)
  if not results[1] then error(results[2], 0) end
  return table.unpack(results, 2, results.n)
end

describe("so.reader", function()
  local snap
  before_each(function() snap = helper.snapshot() end)
  after_each(function() helper.assert_clean(snap) end)

  describe("read('l') and read('L')", function()
    it("reads lines with \\n and \\r\\n, with and without the end of line", function()
      feed({ "one\ntwo\r\nthree\n" }, function(r)
        assert.are.equal("one", r:read("l"))
        assert.are.equal("two", r:read("l"))
        assert.are.equal("three\n", r:read("L"))
        assert.are.same({ nil, "EOF", "" }, { r:read("l") })
      end)
      feed({ "a\r\nb\n\n" }, function(r)
        assert.are.equal("a\r\n", r:read("L"))
        assert.are.equal("b\n", r:read("L"))
        assert.are.equal("", r:read("l"))
      end)
    end)

    it("returns nil, 'EOF' and the partial line at EOF mid-line", function()
      feed({ "full\npart" }, function(r)
        assert.are.equal("full", r:read("l"))
        assert.are.same({ nil, "EOF", "part" }, { r:read("l") })
        assert.are.same({ nil, "EOF", "" }, { r:read("l") })
      end)
    end)

    it("splits a message at every position", function()
      local msg = "hello\r\nworld\n!\n"
      for i = 1, #msg - 1 do
        feed({ msg:sub(1, i), msg:sub(i + 1) }, function(r)
          assert.are.equal("hello", r:read("l"))
          assert.are.equal("world\n", r:read("L"))
          assert.are.equal("!", r:read("l"))
          assert.are.same({ nil, "EOF", "" }, { r:read("L") })
        end)
      end
    end)

    it("enforces the limit without consuming", function()
      feed({ "12345\n123456\n" }, function(r)
        r:setlimit(5)
        assert.are.equal("12345", r:read("l"))
        assert.are.same({ nil, "message too long" }, { r:read("l") })
        assert.are.equal(7, r:buffered())
        assert.are.equal("123456", r:read("l", 6))
      end)
    end)

    it("detects an overlong line before its end arrives", function()
      feed({ ("x"):rep(100), ("y"):rep(100) }, function(r)
        assert.are.same({ nil, "message too long" }, { r:read("l", 150) })
      end, nil, true)
    end)
  end)

  describe("read(n)", function()
    it("reads exactly n bytes, across chunks", function()
      feed({ "abc", "defgh", "ij" }, function(r)
        assert.are.equal("", r:read(0))
        assert.are.equal("ab", r:read(2))
        assert.are.equal("cdefg", r:read(5))
        assert.are.equal("hi", r:read(2))
        assert.are.same({ nil, "EOF", "j" }, { r:read(3) })
        assert.are.same({ nil, "EOF", "" }, { r:read(1) })
      end)
    end)

    it("splits a message at every position", function()
      local msg = "0123456789"
      for i = 1, #msg - 1 do
        feed({ msg:sub(1, i), msg:sub(i + 1) }, function(r)
          assert.are.equal("012", r:read(3))
          assert.are.equal("3456789", r:read(7))
        end)
      end
    end)

    it("rejects bad counts", function()
      feed({ "x" }, function(r)
        assert.has_error(function() r:read(-1) end)
        assert.has_error(function() r:read(1.5) end)
        assert.has_error(function() r:read("x") end)
      end)
    end)
  end)

  describe("readuntil", function()
    it("reads up to a multi-byte delimiter, exclusive and inclusive", function()
      feed({ "a--b--c" }, function(r)
        assert.are.equal("a", r:readuntil("--"))
        assert.are.equal("b--", r:readuntil("--", { inclusive = true }))
        assert.are.same({ nil, "EOF", "c" }, { r:readuntil("--") })
      end)
    end)

    it("finds a delimiter split at every position over three chunks", function()
      local msg = "head\r\n\r\nbody\r\n\r\n"
      for i = 1, #msg - 2 do
        for j = i + 1, #msg - 1 do
          feed({ msg:sub(1, i), msg:sub(i + 1, j), msg:sub(j + 1) }, function(r)
            assert.are.equal("head", r:readuntil("\r\n\r\n"))
            assert.are.equal("body\r\n\r\n",
              r:readuntil("\r\n\r\n", { inclusive = true }))
            assert.are.same({ nil, "EOF", "" }, { r:readuntil("\r\n\r\n") })
          end)
        end
      end
    end)

    it("enforces the limit exactly", function()
      feed({ "abcd::", "abcde::" }, function(r)
        local o = { limit = 4 }
        assert.are.equal("abcd", r:readuntil("::", o))
        assert.are.same({ nil, "message too long" }, { r:readuntil("::", o) })
        assert.are.equal("abcde", r:readuntil("::", { limit = 5 }))
      end)
    end)

    it("returns the partial frame at EOF", function()
      feed({ "abc", "de" }, function(r)
        assert.are.same({ nil, "EOF", "abcde" }, { r:readuntil("|") })
      end)
    end)

    it("keeps the buffered bytes after a timeout and resumes", function()
      local c, s = pair()
      local r = reader.new(s)
      r:settimeout(0.05)
      assert(so.write(c, "par"))
      local v, err, name = r:readuntil("\r\n")
      assert.is_nil(v)
      assert.are.equal("ETIMEDOUT", name)
      assert.truthy(err:find("ETIMEDOUT", 1, true))
      assert(so.write(c, "tial\r"))
      assert.are.same({ nil, err, name }, { r:readuntil("\r\n") })
      assert(so.write(c, "\nnext"))
      assert.are.equal("partial", r:readuntil("\r\n"))
      assert.are.equal(4, r:buffered())
      so.close(c); so.close(s)
    end)

    it("honours a deadline however slowly bytes arrive", function()
      local c, s = pair()
      local w = so.spawn(function()
        for _ = 1, 20 do
          if not so.write(c, "x") then return end
          so.sleep(0.02)
        end
      end)
      local r = reader.new(s)
      r:setdeadline(so.now() + 0.1)
      local t0 = so.now()
      local v, _, name = r:readuntil("\n")
      assert.is_nil(v)
      assert.are.equal("ETIMEDOUT", name)
      assert.is_true(so.now() - t0 < 0.3)
      r:setdeadline(nil)
      so.join(w, 5)
      so.close(c); so.close(s)
    end)

    it("rejects an empty delimiter", function()
      feed({ "x" }, function(r)
        assert.has_error(function() r:readuntil("") end)
      end)
    end)
  end)

  describe("readsome and read('a')", function()
    it("returns buffered bytes first, then the next chunk", function()
      feed({ "ab\ncd", "efg" }, function(r)
        assert.are.equal("ab", r:read("l"))
        assert.are.equal("c", r:readsome(1))
        assert.are.equal("d", r:readsome())
        assert.are.equal("ef", r:readsome(2))
        assert.are.equal("g", r:readsome(100))
        assert.are.same({ nil, "EOF", "" }, { r:readsome() })
      end)
    end)

    it("reads everything to EOF, within a limit", function()
      feed({ "abc", "def" }, function(r)
        assert.are.equal("a", r:read(1))
        assert.are.equal("bcdef", r:read("a"))
        assert.are.equal("", r:read("a"))
      end)
      feed({ "abc", "def" }, function(r)
        assert.are.same({ nil, "message too long" }, { r:read("a", 4) })
      end)
    end)

    it("fill waits for bytes without consuming them", function()
      feed({ "xy" }, function(r)
        assert.is_true(r:fill())
        assert.are.equal(2, r:buffered())
        assert.are.equal("xy", r:read(2))
        assert.are.same({ nil, "EOF" }, { r:fill() })
      end)
    end)
  end)

  describe("cost", function()
    it("reads 100,000 small messages from one 1 MB write in linear time", function()
      local parts = {}
      for i = 1, 100000 do parts[i] = string.format("msg%05d\n", i % 100000) end
      local blob = table.concat(parts)
      local c, s = pair()
      local w = so.spawn(function() assert(so.write(c, blob)); so.shutdown(c) end)
      local r = reader.new(s)
      local t0 = os.clock()
      local n = 0
      while true do
        local m = r:readuntil("\n")
        if not m then break end
        n = n + 1
      end
      local dt = os.clock() - t0
      assert.are.equal(100000, n)
      assert.is_true(dt < 1, "took " .. dt .. " s")
      so.join(w, 5)
      so.close(c); so.close(s)
    end)

    it("reads an 8 MB line arriving in many chunks in linear time", function()
      local c, s = pair()
      local piece = ("z"):rep(1000)
      local w = so.spawn(function()
        for _ = 1, 8000 do assert(so.write(c, piece)) end
        assert(so.write(c, "\n"))
      end)
      local r = reader.new(s, { limit = 16 * 1024 * 1024 })
      local t0 = os.clock()
      local line = r:read("l")
      local dt = os.clock() - t0
      assert.are.equal(8000000, #line)
      assert.is_true(dt < 2, "took " .. dt .. " s")
      so.join(w, 5)
      so.close(c); so.close(s)
    end)
  end)

  describe("writer", function()
    it("sends queued pieces together and flushes before the reader blocks", function()
      local c, s = pair()
      local w = reader.writer(s)
      local r = reader.new(s, { writer = w })
      assert.is_true(w:put("Echo: ", "a", "\n"))
      assert.are.equal(8, w:buffered())
      local peer = so.spawn(function()
        local got = reader.new(c):read(8)
        assert(so.write(c, "ok\n"))
        return got
      end)
      assert.are.equal("ok", r:read("l"))   -- flushed w before waiting
      local _, got = so.join(peer, 5)
      assert.are.equal("Echo: a\n", got)
      assert.are.equal(0, w:buffered())
      assert.is_true(w:write("x", "y"))
      assert.are.equal("xy", reader.new(c):read(2))
      assert.has_error(function() w:put(1) end)
      so.close(c); so.close(s)
    end)

    it("splits more than 1024 pieces over several so.write calls", function()
      local c, s = pair()
      local w = reader.writer(s, { limit = 1 << 20 })
      local want = {}
      for i = 1, 3000 do
        want[i] = tostring(i % 10)
        assert.is_true(w:put(want[i]))
      end
      assert.is_true(w:flush())
      assert.are.equal(table.concat(want), reader.new(c):read(3000))
      so.close(c); so.close(s)
    end)

    it("flushes by itself past its limit", function()
      local c, s = pair()
      local w = reader.writer(s, { limit = 4 })
      assert.is_true(w:put("ab"))
      assert.are.equal(2, w:buffered())
      assert.is_true(w:put("cd"))
      assert.are.equal(0, w:buffered())
      assert.are.equal("abcd", reader.new(c):read(4))
      so.close(c); so.close(s)
    end)
  end)
end)
