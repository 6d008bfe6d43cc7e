-- so.zlib: streaming gzip. Deflate at every level with output per call,
-- flush and finish; inflate of gzip and zlib data in any pieces (down to
-- one byte), with its limit on output; every error (bad header, corrupt
-- data and trailer, truncation at every point, bytes after the end, the
-- limit), a stream ended by finish, an error, <close> or the collector;
-- and interoperation: our gzip read by the gzip command and by Python's
-- gzip module, theirs read by us, a large random and text input round
-- trip, and decompression bombs (1 GiB of zeros) that cost their limit.
local zlib = require "so.zlib"
local fs = require "so.fs"
local lfs = require "lfs"
local helper = require "helper"

local KiB, MiB = 1024, 1024 * 1024

local dir
local function path(name) return dir .. "/" .. name end

local spit = helper.spit

local slurp = helper.slurp

local sh = helper.sh

-- Runs Python code with arguments; its stdout.
local function python(code, ...)
  local args = { ... }
  for i, a in ipairs(args) do args[i] = helper.shq(a) end
  return sh("python3 -c " .. helper.shq(code) .. " " .. table.concat(args, " "))
end

-- The error fn(...) raises (it must raise).
local function raised(fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "it did not raise")
  return tostring(err)
end

-- Asserts that fn(...) raises `msg` (after the position Lua puts first).
local function raises(msg, fn, ...)
  local err = raised(fn, ...)
  assert(err == msg or err:sub(-#msg - 2) == ": " .. msg,
         "expected error '" .. msg .. "', got '" .. err .. "'")
end

local function results(...) return { n = select("#", ...), ... } end

-- Asserts a failure: nil, "EZLIB: msg", "EZLIB".
local function fails(msg, ...)
  assert.same({ n = 3, nil, "EZLIB: " .. msg, "EZLIB" }, results(...))
end

local FINISHED = "attempt to use a finished zlib stream"

-- Asserts that every method of z raises as a finished stream's.
local function finished(z)
  raises(FINISHED, function() local s = z:write("x") end)
  raises(FINISHED, function() local s = z:flush() end)
  raises(FINISHED, function() local s = z:flush("x") end)
  raises(FINISHED, function() local s = z:finish() end)
end

local function random(n)
  local f = assert(io.open("/dev/urandom", "rb"))
  local s = f:read(n)
  f:close()
  return s
end

-- Text that compresses as text does: words, numbers, lines.
local function text(n)
  local words = { "the", "loop", "never", "blocks", "on", "a", "disk",
                  "luahost", "coroutine", "zlib", "stream", "gzip", "of",
                  "tasks", "and", "sockets", "while", "buffer" }
  local parts, len, i = {}, 0, 0
  while len < n do
    i = i + 1
    local w = words[(i * 7 + i // 13) % #words + 1]
    if i % 11 == 0 then w = w .. " " .. i .. ".\n" end
    parts[#parts + 1] = w
    len = len + #w + 1
  end
  return table.concat(parts, " "):sub(1, n)
end

-- s cut into pieces of the sizes next() gives.
local function pieces(s, next)
  local out, pos = {}, 1
  while pos <= #s do
    local n = next()
    out[#out + 1] = s:sub(pos, pos + n - 1)
    pos = pos + n
  end
  return out
end

local function random_sizes(max)
  return function() return math.random(1, max) end
end

-- Compresses s in one write; the gzip bytes.
local function gzip(s, level)
  local z = zlib.deflate(level)
  local a = assert(z:write(s))
  return a .. assert(z:finish())
end

-- Feeds the pieces to a new inflate(max) and finishes: the output, or
-- nil, msg, name.
local function inflate_pieces(list, max)
  local z = zlib.inflate(max)
  local out = {}
  for _, p in ipairs(list) do
    local s, msg, name = z:write(p)
    if not s then return nil, msg, name end
    out[#out + 1] = s
  end
  local s, msg, name = z:finish()
  if not s then return nil, msg, name end
  out[#out + 1] = s
  return table.concat(out)
end

local function gunzip(s, max) return inflate_pieces({ s }, max) end

-- Peak resident size since the last reset_peak(), in bytes.
local function reset_peak()
  local f = io.open("/proc/self/clear_refs", "w")
  if f then f:write("5"); f:close() end
end

local function peak_rss()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmHWM:%s*(%d+)")) * 1024
end

-- Makes a gzip file of `mib` MiB of zeros (a power of two) without
-- compressing them all: a 1 MiB block compressed after a full flush is
-- the same every time, so the stream repeats it; the trailer's CRC-32 is
-- combined as zlib's crc32_combine does.
local BOMB_PY = [[
import struct, sys, zlib
MiB = 1 << 20
def times(mat, vec):
    s, i = 0, 0
    while vec:
        if vec & 1: s ^= mat[i]
        vec >>= 1; i += 1
    return s
def square(mat): return [times(mat, mat[n]) for n in range(32)]
def combine(crc1, crc2, len2):
    odd = [0xedb88320] + [1 << n for n in range(31)]
    even = square(odd); odd = square(even)
    while True:
        even = square(odd)
        if len2 & 1: crc1 = times(even, crc1)
        len2 >>= 1
        if not len2: break
        odd = square(even)
        if len2 & 1: crc1 = times(odd, crc1)
        len2 >>= 1
        if not len2: break
    return crc1 ^ crc2
out, mib = sys.argv[1], int(sys.argv[2])
zeros = bytes(MiB)
c = zlib.compressobj(9, zlib.DEFLATED, 31)
head = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
assert c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH) == block
end = c.flush()[:-8]
crc, n = zlib.crc32(zeros), 1
while n < mib:
    crc, n = combine(crc, crc, n * MiB), n * 2
assert n == mib
with open(out, "wb") as f:
    f.write(head + block * (mib - 1) + end)
    f.write(struct.pack("<II", crc, (mib * MiB) & 0xffffffff))
]]

describe("so.zlib", function()
  setup(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(lfs.mkdir(dir))
  end)

  teardown(function()
    os.execute("rm -rf " .. helper.shq(dir))
  end)

  it("has the version of the zlib it runs with, Debian's", function()
    assert.is_string(zlib.version)
    assert.matches("^%d+%.%d+%.%d+", zlib.version)
    local h = io.open("/usr/include/zlib.h")
    if h then
      local want = h:read("a"):match('#define ZLIB_VERSION "([^"]+)"')
      h:close()
      assert.equal(want, zlib.version)
    end
  end)

  describe("zlib.deflate", function()
    it("makes gzip, output coming from write and finish", function()
      local z = zlib.deflate()
      assert.matches("^zlib stream", tostring(z))
      local a = z:write("hello, ")
      local b = z:write("world")
      local c = z:finish()
      assert.is_string(a)
      assert.is_string(b)
      assert.is_string(c)
      local gz = a .. b .. c
      assert.equal("\31\139\8", gz:sub(1, 3))  -- gzip, deflate
      assert.equal(#"hello, world", string.unpack("<I4", gz, #gz - 3))
      assert.equal("hello, world", gunzip(gz))
      finished(z)
    end)

    it("takes data in finish, and numbers as strings", function()
      local z = zlib.deflate()
      local gz = z:write(12) .. z:finish(" and more")
      assert.equal("12 and more", gunzip(gz))
      z = zlib.deflate()
      assert.equal("x", gunzip(z:finish("x")))
      z = zlib.deflate()
      assert.equal("", gunzip(z:write("") .. z:finish(nil)))
    end)

    it("makes an empty stream of nothing", function()
      local gz = zlib.deflate():finish()
      assert.equal("\31\139\8", gz:sub(1, 3))
      assert.equal(0, string.unpack("<I4", gz, #gz - 3))
      assert.equal("", gunzip(gz))
    end)

    it("takes every level, -1 (the default, 6) to 9", function()
      local data = text(200 * KiB)
      local sizes = {}
      for level = -1, 9 do
        local gz = gzip(data, level)
        assert.equal(data, gunzip(gz), "level " .. level)
        sizes[level] = #gz
      end
      assert.equal(gzip(data, 6), gzip(data))
      assert.equal(gzip(data, -1), gzip(data))
      assert.is_true(sizes[0] > #data, "level 0 stores")
      assert.is_true(sizes[1] < #data / 2)
      assert.is_true(sizes[9] <= sizes[1])
      local noise = random(64 * KiB)
      assert.equal(noise, gunzip(gzip(noise, 0)))
      assert.equal(noise, gunzip(gzip(noise, 9)))
    end)

    it("raises on a bad level or data", function()
      raises("bad argument #1 to 'deflate' (level out of range)", function()
        local z = zlib.deflate(10)
      end)
      raises("bad argument #1 to 'deflate' (level out of range)", function()
        local z = zlib.deflate(-2)
      end)
      assert.matches("bad argument #1 to 'deflate' %(number expected",
                     raised(function() local z = zlib.deflate("x") end))
      assert.matches("number has no integer representation",
                     raised(function() local z = zlib.deflate(1.5) end))
      local z = zlib.deflate()
      assert.matches("bad argument #1 to 'write' %(string expected",
                     raised(function() local s = z:write() end))
      assert.matches("bad argument #1 to 'write' %(string expected",
                     raised(function() local s = z:write({}) end))
      assert.matches("bad argument #1 to 'flush' %(string expected",
                     raised(function() local s = z:flush({}) end))
      assert.matches("bad argument #1 to 'finish' %(string expected",
                     raised(function() local s = z:finish({}) end))
      for _, name in ipairs { "write", "flush", "finish" } do
        assert.matches("zlib stream expected, got table",
                       raised(function() local s = z[name]({}, "x") end))
        assert.matches("zlib stream expected, got FILE%*",
                       raised(function() local s = z[name](io.stdout) end))
      end
      -- the stream is still whole
      assert.equal("ok", gunzip(z:write("ok") .. z:finish()))
    end)

    it("flush gives everything so far, readable at once", function()
      local z = zlib.deflate()
      local inf = zlib.inflate()
      local a = z:write("first part, ")
      local fa = z:flush()
      assert.equal("\0\0\255\255", (a .. fa):sub(-4))  -- a sync flush
      assert.equal("first part, ", inf:write(a .. fa))
      local b = z:flush("second part")
      assert.equal("\0\0\255\255", b:sub(-4))
      assert.equal("second part", inf:write(b))
      -- nothing new: nothing more, and the stream goes on
      local again = z:flush()
      assert.equal("", inf:write(again))
      local c = z:write(", the end")
      local d = z:finish()
      assert.equal(", the end", inf:write(c .. d) .. inf:finish())
      assert.equal("first part, second part, the end",
                   gunzip(a .. fa .. b .. again .. c .. d))
      finished(z)
      finished(inf)
    end)

    it("gives output as it goes, holding no input", function()
      local data = random(2 * MiB)
      local z = zlib.deflate(1)
      local out, before_finish = {}, 0
      for _, p in ipairs(pieces(data, function() return 64 * KiB end)) do
        local s = z:write(p)
        before_finish = before_finish + #s
        out[#out + 1] = s
      end
      out[#out + 1] = z:finish()
      assert.is_true(before_finish > MiB, "only " .. before_finish
                     .. " bytes came before finish")
      assert.equal(data, gunzip(table.concat(out)))
    end)
  end)

  describe("zlib.inflate", function()
    local data, gz

    setup(function()
      data = text(100 * KiB) .. random(20 * KiB)
      gz = gzip(data)
    end)

    it("takes its input in any pieces, down to one byte", function()
      assert.equal(data, inflate_pieces({ gz }))
      local ones = pieces(gz, function() return 1 end)
      assert.equal(#gz, #ones)
      assert.equal(data, inflate_pieces(ones))
      for _ = 1, 5 do
        assert.equal(data, inflate_pieces(pieces(gz, random_sizes(3000))))
      end
      -- with empty writes between, and through flush
      local z = zlib.inflate()
      local out = {}
      for _, p in ipairs(pieces(gz, random_sizes(5000))) do
        assert.equal("", z:write(""))
        out[#out + 1] = z:flush(p)
        out[#out + 1] = z:flush()
      end
      out[#out + 1] = z:finish()
      assert.equal(data, table.concat(out))
      finished(z)
    end)

    it("gives output as it goes", function()
      local z = zlib.inflate()
      local got = 0
      local list = pieces(gz, function() return 4 * KiB end)
      for i = 1, #list // 2 do got = got + #z:write(list[i]) end
      assert.is_true(got > #data / 4, "only " .. got .. " bytes")
    end)

    it("takes the data in finish, and returns the rest there", function()
      local z = zlib.inflate()
      local half = #gz // 2
      local a = z:write(gz:sub(1, half))
      assert.equal(data, a .. z:finish(gz:sub(half + 1)))
      z = zlib.inflate()
      assert.equal(data, z:finish(gz))
      z = zlib.inflate()
      assert.equal(data, z:write(gz))
      assert.equal("", z:finish())
    end)

    it("takes the zlib format too, not raw deflate", function()
      local s = "zlib, not gzip"
      python("import sys, zlib\n"
        .. "data = sys.argv[1].encode()\n"
        .. "open(sys.argv[2], 'wb').write(zlib.compress(data))\n"
        .. "c = zlib.compressobj(6, zlib.DEFLATED, -15)\n"
        .. "open(sys.argv[3], 'wb').write(c.compress(data) + c.flush())\n",
        s, path("zl"), path("raw"))
      local zl, raw = slurp(path("zl")), slurp(path("raw"))
      assert.equal("\120", zl:sub(1, 1))
      assert.equal(s, gunzip(zl))
      assert.equal(s, inflate_pieces(pieces(zl, function() return 1 end)))
      local r = results(gunzip(raw))
      assert.is_nil(r[1])
      assert.equal("EZLIB", r[3])
      assert.matches("^EZLIB: ", r[2])
    end)

    it("fails on garbage: incorrect header check", function()
      local z = zlib.inflate()
      fails("incorrect header check", z:write("this is not compressed"))
      finished(z)
      fails("incorrect header check", gunzip("\31\140\8\0\0\0\0\0\0\3"))
      z = zlib.inflate()
      fails("incorrect header check", z:finish("garbage"))
      finished(z)
      -- a good header, a bad method
      fails("unknown compression method", gunzip("\31\139\9" .. gz:sub(4)))
    end)

    it("fails on corrupt data and a corrupt trailer", function()
      -- a bad block type (3) right after the header
      local bad = gz:sub(1, 10) .. "\7" .. gz:sub(12)
      fails("invalid block type", gunzip(bad))
      -- the CRC-32 and the length of the trailer
      local n = #gz
      local crc = gz:sub(1, n - 8) .. string.char(gz:byte(n - 7) ~ 1)
                  .. gz:sub(n - 6)
      fails("incorrect data check", gunzip(crc))
      local len = gz:sub(1, n - 4) .. string.char(gz:byte(n - 3) ~ 1)
                  .. gz:sub(n - 2)
      fails("incorrect length check", gunzip(len))
      -- one byte at a time, the failure comes from the write that has it
      local z = zlib.inflate()
      local failed
      for i = 1, n do
        local s, msg = z:write(crc:sub(i, i))
        if not s then failed = { i, msg } break end
      end
      assert.same({ n - 4, "EZLIB: incorrect data check" }, failed)
      finished(z)
      -- flipping bits across the data: every failure is of this contract
      for i = 11, n - 8, 97 do
        local flipped = gz:sub(1, i - 1) .. string.char(gz:byte(i) ~ 0x5a)
                        .. gz:sub(i + 1)
        local r = results(gunzip(flipped))
        if r[1] == nil then
          assert.equal("EZLIB", r[3])
          assert.matches("^EZLIB: %a", r[2])
        else
          assert.is_string(r[1])
        end
      end
    end)

    it("fails at finish on a stream cut anywhere: truncated stream",
       function()
      local small = gzip("a short text, a short text, a short text")
      for cut = 0, #small - 1 do
        local z = zlib.inflate()
        local part = assert(z:write(small:sub(1, cut)), "cut " .. cut)
        assert.is_string(part)
        fails("truncated stream", z:finish())
        finished(z)
      end
      fails("truncated stream", gunzip(gz:sub(1, #gz // 2)))
      fails("truncated stream", zlib.inflate():finish())
      fails("truncated stream", zlib.inflate():finish(""))
    end)

    it("fails on bytes after the end of the stream", function()
      fails("bytes after the end of the stream", gunzip(gz .. "x"))
      local z = zlib.inflate()
      assert.equal(data, z:write(gz))
      fails("bytes after the end of the stream", z:write("junk"))
      finished(z)
      z = zlib.inflate()
      assert.equal(data, z:write(gz))
      fails("bytes after the end of the stream", z:finish("junk"))
      z = zlib.inflate()
      assert.equal(data, z:write(gz))
      fails("bytes after the end of the stream", z:flush("junk"))
      -- a second gzip member (as `cat a.gz b.gz` makes) is such bytes
      fails("bytes after the end of the stream", gunzip(gz .. gzip("b")))
      -- nothing after the end: all is well
      z = zlib.inflate()
      assert.equal(data, z:write(gz))
      assert.equal("", z:write(""))
      assert.equal("", z:finish())
    end)

    it("fails once its output passes max_output", function()
      local n = #data
      assert.equal(data, gunzip(gz, n))
      assert.equal(data, gunzip(gz, n + 1))
      assert.equal(data, gunzip(gz, -1))
      fails("output larger than its limit", gunzip(gz, n - 1))
      fails("output larger than its limit", gunzip(gz, 0))
      fails("output larger than its limit", gunzip(gz, 1000))
      -- the limit is on the total, over every write
      local z = zlib.inflate(n - 1)
      local got, failed = 0
      for _, p in ipairs(pieces(gz, function() return 1000 end)) do
        local s, msg, name = z:write(p)
        if not s then
          failed = { msg, name }
          break
        end
        got = got + #s
      end
      assert.same({ "EZLIB: output larger than its limit", "EZLIB" }, failed)
      assert.is_true(got <= n - 1)
      finished(z)
      -- what ends in finish counts too
      z = zlib.inflate(n - 1)
      local cut = #gz - 20
      local a = assert(z:write(gz:sub(1, cut)))
      assert.is_true(#a < n)
      fails("output larger than its limit", z:finish(gz:sub(cut + 1)))
      -- an empty stream fits in 0
      assert.equal("", gunzip(gzip(""), 0))
      fails("output larger than its limit", gunzip(gzip("x"), 0))
    end)

    it("raises on a bad limit or input", function()
      raises("bad argument #1 to 'inflate' (negative limit)", function()
        local z = zlib.inflate(-2)
      end)
      assert.matches("bad argument #1 to 'inflate' %(number expected",
                     raised(function() local z = zlib.inflate("x") end))
      local z = zlib.inflate()
      assert.matches("bad argument #1 to 'write' %(string expected",
                     raised(function() local s = z:write() end))
      assert.matches("bad argument #1 to 'write' %(string expected",
                     raised(function() local s = z:write(true) end))
      assert.equal(data, gunzip(gz, nil))
      -- the stream is still whole
      assert.equal(data, z:write(gz) .. z:finish())
    end)
  end)

  describe("a stream", function()
    it("ends at the end of a <close> scope, also by an error", function()
      local kept
      do
        local z <close> = zlib.deflate()
        kept = z
        assert.is_string(z:write("x"))
      end
      finished(kept)
      local ok = pcall(function()
        local z <close> = zlib.inflate()
        kept = z
        error("boom")
      end)
      assert.is_false(ok)
      finished(kept)
      do  -- finished in the scope, then closed: nothing more happens
        local z <close> = zlib.deflate()
        assert.equal("y", gunzip(z:write("y") .. z:finish()))
      end
    end)

    it("gives its memory back when the collector finds it", function()
      local noise = random(64 * KiB)
      local half = gzip(noise, 1)
      half = half:sub(1, #half // 2)
      collectgarbage()
      collectgarbage()
      local rss = helper.rss()
      for i = 1, 400 do
        local z = zlib.deflate(1)
        z:write(noise)  -- zlib's buffers in use, not finished
        local y = zlib.inflate()
        y:write(half)
        if i % 20 == 0 then collectgarbage() end
      end
      collectgarbage()
      collectgarbage()
      local grown = helper.rss() - rss
      assert.is_true(grown < 40 * MiB, "RSS grew by " .. grown // MiB
                     .. " MiB for 400 unfinished streams")
    end)
  end)

  describe("with the gzip command and Python", function()
    local sample

    setup(function()
      sample = text(600 * KiB) .. random(300 * KiB) .. text(100 * KiB)
      spit(path("sample"), sample)
    end)

    it("writes a gzip file, in pieces through so.fs, that they read",
       function()
      local files = {}
      for _, level in ipairs { 1, 6, 9 } do
        local p = path("ours-" .. level .. ".gz")
        local f <close> = assert(fs.open(p, "w"))
        local z = zlib.deflate(level)
        for i, piece in ipairs(pieces(sample, random_sizes(50 * KiB))) do
          assert.is_true(f:write(z:write(piece)))
          if i == 7 then assert.is_true(f:write(z:flush())) end
        end
        assert.is_true(f:write(z:finish()))
        assert.is_true(f:close())
        sh("gzip -t " .. helper.shq(p))
        assert.is_true(sh("gzip -dc " .. helper.shq(p)) == sample,
                       "gzip -dc differs at level " .. level)
        files[#files + 1] = p
      end
      -- and the empty stream
      spit(path("empty.gz"), zlib.deflate():finish())
      assert.equal("", sh("gzip -dc " .. helper.shq(path("empty.gz"))))
      files[#files + 1] = path("empty.gz")
      -- Python's gzip module writes what it reads from each to FILE.py
      python("import gzip, sys\n"
        .. "for p in sys.argv[1:]:\n"
        .. "    open(p + '.py', 'wb').write(gzip.open(p).read())\n",
        table.unpack(files))
      for i = 1, 3 do
        assert.is_true(slurp(files[i] .. ".py") == sample,
                       "Python's gzip differs in " .. files[i])
      end
      assert.equal("", slurp(path("empty.gz.py")))
    end)

    it("reads what the gzip command writes, in any pieces", function()
      for _, opt in ipairs { "-1", "-6", "-9", "-n -9" } do
        -- "-c FILE" puts the file's name in the header, "-n" does not
        local gzd = sh(string.format("gzip -c %s %s", opt,
                                     helper.shq(path("sample"))))
        assert.equal("\31\139\8", gzd:sub(1, 3))
        assert.is_true(gunzip(gzd) == sample, "all at once, gzip " .. opt)
        assert.is_true(inflate_pieces(pieces(gzd, random_sizes(10 * KiB)))
                       == sample, "in pieces, gzip " .. opt)
      end
      -- from a pipe, with no name; one byte at a time
      local small = text(30 * KiB)
      spit(path("small"), small)
      local gzd = sh("gzip < " .. helper.shq(path("small")))
      assert.equal(small, inflate_pieces(pieces(gzd, function() return 1 end)))
      assert.equal("", gunzip(sh("printf '' | gzip")))
    end)

    it("reads what Python's gzip and zlib write, in any pieces", function()
      local small = text(20 * KiB)
      spit(path("small2"), small)
      -- gzip.compress of the sample; a header with every optional field
      -- (name, comment, extra, header CRC) made by hand; zlib.compress
      python([[
import gzip, struct, sys, zlib
sample, small, d = sys.argv[1], sys.argv[2], sys.argv[3]
data = open(sample, 'rb').read()
open(d + '/py.gz', 'wb').write(gzip.compress(data, compresslevel=9))
data = open(small, 'rb').read()
c = zlib.compressobj(6, zlib.DEFLATED, -15)
body = c.compress(data) + c.flush()
head = (b'\x1f\x8b\x08' + bytes([2 | 4 | 8 | 16]) + struct.pack('<I', 0)
        + b'\x00\x03')
head += struct.pack('<H', 6) + b'ab\x02\x00xy'
head += b'name.txt\x00' + b'a comment\x00'
head += struct.pack('<H', zlib.crc32(head) & 0xffff)
trailer = struct.pack('<II', zlib.crc32(data), len(data))
open(d + '/full.gz', 'wb').write(head + body + trailer)
open(d + '/py.z', 'wb').write(zlib.compress(data, 9))
]], path("sample"), path("small2"), dir)
      local gzd = slurp(path("py.gz"))
      assert.is_true(gunzip(gzd) == sample)
      assert.is_true(inflate_pieces(pieces(gzd, random_sizes(20 * KiB)))
                     == sample)
      local full = slurp(path("full.gz"))
      assert.equal(small, sh("gzip -dc < " .. helper.shq(path("full.gz"))))
      assert.equal(small, gunzip(full))
      assert.equal(small, inflate_pieces(pieces(full, function() return 1 end)))
      local zl = slurp(path("py.z"))
      assert.equal(small, inflate_pieces(pieces(zl, function() return 1 end)))
    end)

    it("round-trips a large random and text input in random pieces",
       function()
      local big = random(4 * MiB) .. text(4 * MiB) .. random(MiB + 17)
      for _, level in ipairs { 1, 6 } do
        local z = zlib.deflate(level)
        local out = {}
        for _, p in ipairs(pieces(big, random_sizes(300 * KiB))) do
          out[#out + 1] = z:write(p)
        end
        out[#out + 1] = z:finish()
        local gzd = table.concat(out)
        assert.is_true(#gzd < #big)
        local back = inflate_pieces(pieces(gzd, random_sizes(100 * KiB)),
                                    #big)
        assert.is_true(back == big, "level " .. level .. " round trip")
      end
    end)

    -- Streams a gzip file through inflate(limit) in pieces read with
    -- so.fs; the error, and how much came out before it. Stops once far
    -- past the limit, should the limit not hold.
    local function inflate_file(p, limit)
      local f <close> = assert(fs.open(p))
      local z = zlib.inflate(limit)
      local got = 0
      while true do
        local piece = assert(f:read(16 * KiB))
        if piece == "" then
          local s, msg, name = z:finish()
          if not s then return got, msg, name end
          return got + #s
        end
        local s, msg, name = z:write(piece)
        if not s then return got, msg, name end
        got = got + #s
        if got > 4 * limit then return got, "the limit did not hold" end
      end
    end

    it("stops a decompression bomb at its limit, without the memory",
       function()
      -- 1 GiB of zeros in 1 MiB of gzip
      local bomb = path("bomb.gz")
      python(BOMB_PY, bomb, "1024")
      assert.is_true(lfs.attributes(bomb, "size") < 2 * MiB)
      -- it is one: its trailer says 1 GiB, gzip inflates past the limit
      assert.equal(1024 * MiB, string.unpack("<I4", slurp(bomb), -4))
      assert.equal(string.format("%d\n", 11 * MiB),
                   sh("gzip -dc " .. helper.shq(bomb)
                      .. " 2>/dev/null | head -c " .. 11 * MiB .. " | wc -c"))
      collectgarbage()
      collectgarbage()
      reset_peak()
      local base = peak_rss()
      local got, msg, name = inflate_file(bomb, 10 * MiB)
      assert.equal("EZLIB: output larger than its limit", msg)
      assert.equal("EZLIB", name)
      assert.is_true(got <= 10 * MiB)
      local grown = peak_rss() - base
      assert.is_true(grown < 64 * MiB, "peak RSS grew by " .. grown // MiB
                     .. " MiB")
      -- and from the gzip command: zeros from /dev/zero, gzipped
      local bomb2 = path("bomb2.gz")
      sh("head -c " .. 48 * MiB .. " /dev/zero | gzip -1 > "
         .. helper.shq(bomb2))
      collectgarbage()
      collectgarbage()
      reset_peak()
      base = peak_rss()
      got, msg, name = inflate_file(bomb2, 10 * MiB)
      assert.equal("EZLIB: output larger than its limit", msg)
      assert.equal("EZLIB", name)
      assert.is_true(got <= 10 * MiB)
      grown = peak_rss() - base
      assert.is_true(grown < 64 * MiB, "peak RSS grew by " .. grown // MiB
                     .. " MiB")
      -- within a limit it fits, the same file inflates whole
      got, msg = inflate_file(bomb2, 48 * MiB)
      assert.is_nil(msg)
      assert.equal(48 * MiB, got)
    end)
  end)
end)
