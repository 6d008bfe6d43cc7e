-- so.fs: files through libuv's fs requests on the thread pool. Every
-- function with its results and its errors (the sockets' contract:
-- nil, "ENOENT: no such file or directory", "ENOENT"); positions, offsets
-- and the 64 MiB cap of a read; stat's fields for every kind of file;
-- closing by close, <close> and the collector without a descriptor left;
-- a loop that goes on while the pool waits on a FIFO nobody writes; many
-- tasks reading one large file; so.cancel and so.deadline around waits
-- that never end by themselves (a FIFO), a queued request cancelled; the
-- close of a read-only file, which does not wait; fs.open_beneath (small
-- files read whole, links that stay inside or lead out); fs.sendfile over
-- loopback conns (a full socket, timeouts, cancels, EOF, TLS); and a host
-- whose script left such a wait behind still ends.
local so = require "so"
local fs = require "so.fs"
local tls = require "so.tls"
local lfs = require "lfs"
local helper = require "helper"

local MiB = 1024 * 1024

local function octal(s) return tonumber(s, 8) end

-- The temporary directory of this file's specs, and paths in it.
local dir
local function path(name) return dir .. "/" .. name end

local spit = helper.spit

local slurp = helper.slurp

local sh = helper.sh

local fifo_count = 0
-- A new FIFO in dir; its path.
local function mkfifo()
  fifo_count = fifo_count + 1
  local p = path("fifo" .. fifo_count)
  sh("mkfifo " .. helper.shq(p))
  return p
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

-- The results of a call as an array (nils kept).
local function results(...) return { n = select("#", ...), ... } end

local function fails(name, msg, ...)
  local r = results(...)
  assert.same({ n = 3, nil, name .. ": " .. msg, name }, r)
end

-- A watchdog for a FIFO: should a spec leave a request stuck on it (what
-- it checks did not happen), a shell opens it read-write after `seconds`
-- and writes a line, which ends any open or read waiting on it; so the
-- spec fails instead of hanging. w:stop() when it is no longer needed.
local function watchdog(fifo, seconds)
  local h = helper.bg(string.format("sleep %s; echo WATCHDOG 1<>%s",
                                    seconds, helper.shq(fifo)))
  return { stop = function() h:kill(); h:cleanup() end }
end

-- How many threads libuv's pool has.
local function pool_size()
  return tonumber(os.getenv("UV_THREADPOOL_SIZE") or "") or 4
end

-- n bytes in which every position differs from its neighbours' (a block
-- of random bytes, each 4 KiB stamped with its index).
local function content(n)
  local urandom = assert(io.open("/dev/urandom", "rb"))
  local rnd = urandom:read(4096)
  urandom:close()
  local parts = {}
  for i = 0, n // 4096 do
    parts[#parts + 1] = string.pack(">I4", i) .. rnd:sub(5)
  end
  return table.concat(parts):sub(1, n)
end

describe("so.fs", function()
  local before

  setup(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(lfs.mkdir(dir))
  end)

  teardown(function()
    os.execute("rm -rf " .. helper.shq(dir))
  end)

  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  describe("fs.open", function()
    it("opens for reading by default; a missing file fails as sockets do",
       function()
      spit(path("r.txt"), "some text")
      local f = assert(fs.open(path("r.txt")))
      assert.matches("^file %(%d+%)$", tostring(f))
      assert.equal("some text", f:read(100))
      assert.is_true(f:close())
      fails("ENOENT", "no such file or directory", fs.open(path("missing")))
      fails("ENOENT", "no such file or directory",
            fs.open(path("missing"), "r"))
      fails("ENOENT", "no such file or directory",
            fs.open(path("no/dir/x"), "w"))
      -- "r" does not create
      assert.is_nil(lfs.attributes(path("missing")))
    end)

    it("takes io.open's modes: w truncates or creates, a appends, + both",
       function()
      local p = path("modes.txt")
      local f = assert(fs.open(p, "w"))
      assert.is_true(f:write("hello"))
      fails("EBADF", "bad file descriptor", f:read(10))
      assert.is_true(f:close())
      assert.equal("hello", slurp(p))

      f = assert(fs.open(p, "a"))
      assert.is_true(f:write(" world"))
      -- "a" always appends, whatever offset is asked
      assert.is_true(f:write("!", 0))
      assert.is_true(f:close())
      assert.equal("hello world!", slurp(p))

      f = assert(fs.open(p, "r"))
      fails("EBADF", "bad file descriptor", f:write("x"))
      assert.is_true(f:close())

      f = assert(fs.open(p, "r+"))  -- no truncation, both ways
      assert.equal("hello", f:read(5))
      assert.is_true(f:write("_"))
      assert.equal("world!", f:read(100))
      assert.is_true(f:close())
      assert.equal("hello_world!", slurp(p))

      f = assert(fs.open(p, "w+"))  -- truncates, both ways
      assert.equal("", f:read(10))
      assert.is_true(f:write("new"))
      assert.equal("new", f:read(10, 0))
      assert.is_true(f:close())
      assert.equal("new", slurp(p))

      f = assert(fs.open(p, "a+"))  -- appends, reads
      assert.is_true(f:write(" end"))
      assert.equal("new end", f:read(100, 0))
      assert.is_true(f:close())
      assert.equal("new end", slurp(p))

      for _, m in ipairs { "rb", "wb", "ab", "r+b", "w+b", "a+b" } do
        f = assert(fs.open(p, m), m)
        assert.is_true(f:close())
      end
      assert.equal("", slurp(p))  -- w+b truncated

      fails("ENOENT", "no such file or directory", fs.open(path("nope"), "r+"))
      local g = assert(fs.open(path("created-by-a"), "a"))
      assert.is_true(g:close())
      assert.equal("file", lfs.attributes(path("created-by-a"), "mode"))
    end)

    it("raises for a mode io.open would not take", function()
      for _, m in ipairs { "rw", "", "x", "br", "+r", "r++", "r+b+", "rbx",
                           "R", "wa", "b" } do
        raises("bad argument #2 to 'open' (invalid mode)", function()
          local f = fs.open(path("m"), m)
        end)
      end
      assert.is_nil(lfs.attributes(path("m")), "a bad mode created a file")
    end)

    it("creates with the permissions asked (less the umask)", function()
      local f = assert(fs.open(path("p600"), "w", octal "600"))
      assert.equal(octal "600", f:stat().perm)
      assert.is_true(f:close())
      assert.equal("rw-------", lfs.attributes(path("p600"), "permissions"))
      f = assert(fs.open(path("p640"), "w", octal "640"))
      assert.is_true(f:close())
      assert.equal(octal "640", fs.stat(path("p640")).perm)
      -- the default: 0666 less the umask
      local umask = tonumber(sh("umask"):match("%d+"), 8)
      f = assert(fs.open(path("pdef"), "w"))
      assert.is_true(f:close())
      assert.equal(octal "666" & ~umask, fs.stat(path("pdef")).perm)
      -- a mode for a file that exists changes nothing
      f = assert(fs.open(path("p600"), "r+", octal "777"))
      assert.is_true(f:close())
      assert.equal(octal "600", fs.stat(path("p600")).perm)
    end)

    it("raises on bad arguments", function()
      raises("bad argument #3 to 'open' (mode out of range)", function()
        local f = fs.open(path("b"), "w", -1)
      end)
      raises("bad argument #3 to 'open' (mode out of range)", function()
        local f = fs.open(path("b"), "w", octal "10000")
      end)
      assert.matches("bad argument #1 to 'open' %(string expected, got nil%)",
                     raised(function() local f = fs.open(nil) end))
      assert.matches("bad argument #1 to 'open' %(string expected, got table",
                     raised(function() local f = fs.open({}) end))
      assert.matches("bad argument #2 to 'open' %(string expected, got table",
                     raised(function() local f = fs.open(path("b"), {}) end))
      assert.matches("bad argument #3 to 'open' %(number expected, got string",
                     raised(function()
                       local f = fs.open(path("b"), "w", "x")
                     end))
      assert.is_nil(lfs.attributes(path("b")))
    end)

    it("fails on what is not a file to write, or a name too long",
       function()
      fails("EISDIR", "illegal operation on a directory", fs.open(dir, "w"))
      fails("EISDIR", "illegal operation on a directory", fs.open(dir, "r+"))
      spit(path("plain"), "x")
      fails("ENOTDIR", "not a directory", fs.open(path("plain/x")))
      fails("ENAMETOOLONG", "name too long",
            fs.open(path(string.rep("n", 300))))
      sh(string.format("ln -s loop-b %s; ln -s loop-a %s",
                       helper.shq(path("loop-a")), helper.shq(path("loop-b"))))
      fails("ELOOP", "too many symbolic links encountered",
            fs.open(path("loop-a")))
      -- a directory opens for reading; reading it fails
      local d = assert(fs.open(dir))
      fails("EISDIR", "illegal operation on a directory", d:read(10))
      assert.equal("directory", d:stat().mode)
      assert.is_true(d:close())
    end)
  end)

  describe("file:read and file:write", function()
    it("read and write at the file's position, or at an offset that "
       .. "leaves it", function()
      local f = assert(fs.open(path("pos"), "w+"))
      assert.is_true(f:write("0123456789"))
      assert.equal("", f:read(5))  -- the position is at the end
      assert.equal("01234", f:read(5, 0))
      assert.equal("", f:read(5))  -- an offset left the position
      assert.is_true(f:write("abc", 3))
      assert.is_true(f:write("XY"))  -- at the end still
      assert.equal("012abc6789XY", f:read(100, 0))
      assert.is_true(f:close())

      f = assert(fs.open(path("pos")))
      assert.equal("012", f:read(3))
      assert.equal("6789", f:read(4, 6))
      assert.equal("abc", f:read(3))
      assert.equal("6789XY", f:read(100))
      assert.equal("", f:read(100))
      assert.equal("", f:read(100))  -- and again
      assert.equal("", f:read(10, 12))  -- at the end
      assert.equal("", f:read(10, 1000))  -- past it
      assert.equal("", f:read(0))
      assert.equal("", f:read(0, 0))
      assert.equal("Y", f:read(1, 11))
      assert.is_true(f:close())
    end)

    it("writes past the end with an offset (a hole reads as zeros)",
       function()
      local f = assert(fs.open(path("hole"), "w+"))
      assert.is_true(f:write("end", 10))
      assert.equal(13, f:stat().size)
      assert.equal(string.rep("\0", 10) .. "end", f:read(100, 0))
      assert.is_true(f:write(""))  -- nothing, still true
      assert.equal(13, f:stat().size)
      assert.is_true(f:close())
    end)

    it("moves any bytes, large writes in one call", function()
      local all = {}
      for i = 0, 255 do all[#all + 1] = string.char(i) end
      all = table.concat(all)
      local big = content(20 * MiB + 7)
      local f = assert(fs.open(path("bytes"), "w+"))
      assert.is_true(f:write(all))
      assert.is_true(f:write(big))
      assert.equal(256 + #big, f:stat().size)
      assert.equal(all, f:read(256, 0))
      assert.equal(big, f:read(#big, 256))
      assert.is_true(f:close())
      assert.equal(all .. big, slurp(path("bytes")))
      -- numbers are strings to write, as for io.write
      f = assert(fs.open(path("num"), "w"))
      assert.is_true(f:write(42))
      assert.is_true(f:close())
      assert.equal("42", slurp(path("num")))
    end)

    it("returns at most 64 MiB from one read", function()
      local p = path("sparse")
      local f = assert(fs.open(p, "w"))
      assert.is_true(f:write("E", 100 * MiB - 1))  -- a sparse 100 MiB
      assert.is_true(f:close())
      f = assert(fs.open(p))
      local s = f:read(100 * MiB)
      assert.equal(64 * MiB, #s)
      assert.equal("\0", s:sub(-1))
      s = nil
      collectgarbage()
      local rest = f:read(math.maxinteger)
      assert.equal(36 * MiB, #rest)
      assert.equal("E", rest:sub(-1))
      rest = nil
      assert.equal(64 * MiB, #f:read(math.maxinteger, 0))
      assert.equal("", f:read(math.maxinteger))
      assert.is_true(f:close())
      collectgarbage()
    end)

    it("fails as sockets do", function()
      local full = assert(fs.open("/dev/full", "w"))
      fails("ENOSPC", "no space left on device", full:write("x"))
      assert.is_true(full:close())
      local wo = assert(fs.open(path("wo"), "w"))
      fails("EBADF", "bad file descriptor", wo:read(1))
      fails("EBADF", "bad file descriptor", wo:read(1, 0))
      assert.is_true(wo:close())
      local ro = assert(fs.open(path("wo")))
      fails("EBADF", "bad file descriptor", ro:write("x"))
      fails("EBADF", "bad file descriptor", ro:write("x", 0))
      assert.is_true(ro:close())
    end)

    it("raise on bad arguments", function()
      local f = assert(fs.open(path("args"), "w+"))
      raises("bad argument #1 to 'read' (negative count)", function()
        local s = f:read(-1)
      end)
      raises("bad argument #2 to 'read' (negative offset)", function()
        local s = f:read(1, -2)
      end)
      raises("bad argument #2 to 'write' (negative offset)", function()
        local s = f:write("x", -2)
      end)
      assert.matches("bad argument #1 to 'read' %(number expected",
                     raised(function() local s = f:read() end))
      assert.matches("bad argument #1 to 'read' %(number expected",
                     raised(function() local s = f:read("a") end))
      assert.matches("number has no integer representation",
                     raised(function() local s = f:read(1.5) end))
      assert.matches("bad argument #1 to 'write' %(string expected",
                     raised(function() local s = f:write() end))
      assert.matches("bad argument #1 to 'write' %(string expected",
                     raised(function() local s = f:write({}) end))
      -- not a file
      for _, name in ipairs { "read", "write", "stat", "close" } do
        assert.matches("file expected, got table",
                       raised(function() local x = f[name]({}, 1) end))
        assert.matches("file expected, got FILE%*",
                       raised(function()
                         local x = f[name](io.stdout, 1)
                       end))
      end
      -- a valid -1 offset means "at the position"
      assert.is_true(f:write("ab", -1))
      assert.equal("", f:read(1, -1))
      assert.is_true(f:close())
    end)
  end)

  describe("file:close", function()
    it("returns true, again true; a closed file raises when used",
       function()
      local f = assert(fs.open(path("c"), "w"))
      local fd = tonumber(tostring(f):match("%d+"))
      assert.truthy(lfs.attributes("/proc/self/fd/" .. fd))
      assert.is_true(f:close())
      assert.equal("file (closed)", tostring(f))
      assert.is_true(f:close())
      assert.is_true(f:close())
      raises("attempt to use a closed file", function() local s = f:read(1) end)
      raises("attempt to use a closed file", function()
        local s = f:read(1, 0)
      end)
      raises("attempt to use a closed file", function()
        local s = f:write("x")
      end)
      raises("attempt to use a closed file", function() local s = f:stat() end)
    end)

    it("closes at the end of a <close> scope, also by an error", function()
      local fds = helper.fds()
      local kept
      do
        local f <close> = assert(fs.open(path("cl"), "w"))
        assert.is_true(f:write("x"))
        kept = f
        assert.equal(fds + 1, helper.fds())
      end
      assert.equal("file (closed)", tostring(kept))
      raises("attempt to use a closed file", function()
        local s = kept:write("y")
      end)
      assert.is_true(kept:close())
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 5), "the <close> left a descriptor")
      local ok, err = pcall(function()
        local f <close> = assert(fs.open(path("cl")))
        kept = f
        error("boom")
      end)
      assert.is_false(ok)
      assert.matches("boom", err)
      assert.equal("file (closed)", tostring(kept))
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 5), "the <close> left a descriptor after an error")
      assert.equal("x", slurp(path("cl")))
    end)

    it("closes what the collector finds", function()
      spit(path("gc"), "gc")
      local fds = helper.fds()
      local files = {}
      for i = 1, 100 do files[i] = assert(fs.open(path("gc"))) end
      assert.equal(fds + 100, helper.fds())
      files = nil
      collectgarbage()
      collectgarbage()
      so.sleep(0.05)
      assert.is_true(helper.wait_until(function()
        collectgarbage()
        return helper.fds() == fds
      end, 5), "the collector left " .. helper.fds() - fds .. " descriptors")
    end)

    it("leaves no descriptor after many files, closed every way",
       function()
      spit(path("many"), string.rep("m", 1000))
      local fds = helper.fds()
      for i = 1, 300 do
        local f = assert(fs.open(path("many")))
        assert.equal(1000, #f:read(5000))
        if i % 3 == 0 then
          assert.is_true(f:close())
        elseif i % 3 == 1 then
          local g <close> = f
        end  -- else: the collector's
        if i % 50 == 0 then collectgarbage() end
      end
      collectgarbage()
      collectgarbage()
      so.sleep(0.05)
      assert.is_true(helper.wait_until(function()
        collectgarbage()
        return helper.fds() == fds
      end, 5), "left " .. helper.fds() - fds .. " descriptors")
    end)
  end)

  describe("stat", function()
    it("gives size, mtime, mode, ino and perm of a file, by path or open",
       function()
      local p = path("st")
      spit(p, "12345")
      sh("touch -d @1234567890.25 " .. helper.shq(p))
      sh("chmod 640 " .. helper.shq(p))
      local attr = lfs.attributes(p)
      local st = assert(fs.stat(p))
      assert.equal(5, st.size)
      assert.equal(1234567890.25, st.mtime)
      assert.equal("file", st.mode)
      assert.equal(attr.ino, st.ino)
      assert.equal(octal "640", st.perm)
      assert.is_true(math.type(st.size) == "integer")
      assert.is_true(math.type(st.ino) == "integer")
      assert.is_true(math.type(st.mtime) == "float")
      local f = assert(fs.open(p, "a"))
      assert.same(st, f:stat())
      assert.is_true(f:write("678"))
      local now = f:stat()
      assert.equal(8, now.size)
      assert.is_true(math.abs(now.mtime - os.time()) < 5,
                     "mtime " .. now.mtime .. ", time " .. os.time())
      assert.is_true(f:close())
      -- the same through lstat, for what is no link
      assert.same(fs.stat(p), fs.lstat(p))
      -- the other bits of perm
      sh("chmod 4755 " .. helper.shq(p))
      assert.equal(octal "4755", fs.stat(p).perm)
    end)

    it("names every kind of file; stat follows links, lstat does not",
       function()
      assert.equal("directory", fs.stat(dir).mode)
      assert.equal("directory", fs.lstat(dir).mode)
      spit(path("target"), "abc")
      sh(string.format("ln -s target %s", helper.shq(path("link"))))
      local st, lst = fs.stat(path("link")), fs.lstat(path("link"))
      assert.equal("file", st.mode)
      assert.equal(3, st.size)
      assert.equal(lfs.attributes(path("target"), "ino"), st.ino)
      assert.equal("link", lst.mode)
      assert.equal(#"target", lst.size)
      assert.equal(lfs.symlinkattributes(path("link"), "ino"), lst.ino)
      assert.are_not.equal(st.ino, lst.ino)
      -- a link to a directory
      sh(string.format("ln -s %s %s", helper.shq(dir),
                       helper.shq(path("dirlink"))))
      assert.equal("directory", fs.stat(path("dirlink")).mode)
      assert.equal("link", fs.lstat(path("dirlink")).mode)
      -- a dangling link
      sh(string.format("ln -s nowhere %s", helper.shq(path("dangling"))))
      fails("ENOENT", "no such file or directory", fs.stat(path("dangling")))
      assert.equal("link", fs.lstat(path("dangling")).mode)
      -- a FIFO, a socket, a character device
      local fifo = mkfifo()
      assert.equal("fifo", fs.stat(fifo).mode)
      assert.equal("fifo", fs.lstat(fifo).mode)
      local sock = path("sock")
      local l = assert(so.listen("unix:" .. sock))
      assert.equal("socket", fs.stat(sock).mode)
      assert.equal("socket", fs.lstat(sock).mode)
      l:close()
      assert.equal("char device", fs.stat("/dev/null").mode)
      assert.equal("char device", fs.lstat("/dev/null").mode)
      local nul = assert(fs.open("/dev/null", "r+"))
      assert.equal("char device", nul:stat().mode)
      assert.equal("", nul:read(10))
      assert.is_true(nul:write("gone"))
      assert.is_true(nul:close())
      local r = assert(fs.open(fifo, "r+"))  -- a FIFO opened both ways
      assert.equal("fifo", r:stat().mode)
      assert.is_true(r:close())
      -- a block device, where the system has one
      for name in lfs.dir("/dev") do
        local p = "/dev/" .. name
        if lfs.symlinkattributes(p, "mode") == "block device" then
          assert.equal("block device", fs.lstat(p).mode)
          break
        end
      end
    end)

    it("fails as sockets do", function()
      fails("ENOENT", "no such file or directory", fs.stat(path("none")))
      fails("ENOENT", "no such file or directory", fs.lstat(path("none")))
      spit(path("f"), "")
      fails("ENOTDIR", "not a directory", fs.stat(path("f/x")))
      fails("ENOTDIR", "not a directory", fs.lstat(path("f/x")))
      fails("ENAMETOOLONG", "name too long", fs.stat(string.rep("a", 5000)))
      sh(string.format("ln -s sl-b %s; ln -s sl-a %s",
                       helper.shq(path("sl-a")), helper.shq(path("sl-b"))))
      fails("ELOOP", "too many symbolic links encountered",
            fs.stat(path("sl-a")))
      assert.equal("link", fs.lstat(path("sl-a")).mode)
      assert.matches("bad argument #1 to 'stat' %(string expected",
                     raised(function() local s = fs.stat() end))
      assert.matches("bad argument #1 to 'lstat' %(string expected",
                     raised(function() local s = fs.lstat({}) end))
    end)
  end)

  describe("directories and names", function()
    it("fs.readdir lists the names, without . and ..", function()
      local d = path("rd")
      assert.is_true(fs.mkdir(d))
      assert.same({}, fs.readdir(d))
      local want = {}
      for i = 1, 200 do
        local name = string.format("entry-%03d", i)
        want[#want + 1] = name
        spit(d .. "/" .. name, "")
      end
      assert.is_true(fs.mkdir(d .. "/sub"))
      want[#want + 1] = "sub"
      spit(d .. "/.hidden", "")
      want[#want + 1] = ".hidden"
      sh("ln -s nowhere " .. helper.shq(d .. "/dangling"))
      want[#want + 1] = "dangling"
      local got = assert(fs.readdir(d))
      table.sort(got)
      table.sort(want)
      assert.same(want, got)
      fails("ENOENT", "no such file or directory", fs.readdir(path("no")))
      fails("ENOTDIR", "not a directory",
            fs.readdir(d .. "/entry-001"))
      assert.matches("bad argument #1 to 'readdir' %(string expected",
                     raised(function() local s = fs.readdir() end))
    end)

    it("fs.realpath gives the canonical absolute path", function()
      local real = sh("readlink -f " .. helper.shq(dir)):match("[^\n]+")
      assert.equal(real, fs.realpath(dir))
      assert.is_true(fs.mkdir(path("rp")))
      spit(path("rp/file"), "")
      sh(string.format("ln -s rp/file %s; ln -s rp-link1 %s",
                       helper.shq(path("rp-link1")),
                       helper.shq(path("rp-link2"))))
      assert.equal(real .. "/rp/file", fs.realpath(path("rp-link2")))
      assert.equal(real .. "/rp/file",
                   fs.realpath(dir .. "/rp/../rp/./file"))
      assert.equal(real .. "/rp", fs.realpath(dir .. "//rp/"))
      assert.equal("/", fs.realpath("/.."))
      -- relative to the working directory
      assert.equal(lfs.currentdir(), fs.realpath("."))
      fails("ENOENT", "no such file or directory",
            fs.realpath(path("rp/none")))
      sh(string.format("ln -s rl-b %s; ln -s rl-a %s",
                       helper.shq(path("rl-a")), helper.shq(path("rl-b"))))
      fails("ELOOP", "too many symbolic links encountered",
            fs.realpath(path("rl-a")))
      assert.matches("bad argument #1 to 'realpath' %(string expected",
                     raised(function() local s = fs.realpath() end))
    end)

    it("fs.mkdir makes a directory with a mode", function()
      assert.is_true(fs.mkdir(path("md")))
      assert.equal("directory", lfs.attributes(path("md"), "mode"))
      assert.is_true(fs.mkdir(path("md/private"), octal "700"))
      assert.equal(octal "700", fs.stat(path("md/private")).perm)
      assert.is_true(fs.mkdir(path("md/750"), octal "750"))
      assert.equal(octal "750", fs.stat(path("md/750")).perm)
      fails("EEXIST", "file already exists", fs.mkdir(path("md")))
      spit(path("md-file"), "")
      fails("EEXIST", "file already exists", fs.mkdir(path("md-file")))
      fails("ENOENT", "no such file or directory", fs.mkdir(path("x/y/z")))
      fails("ENOTDIR", "not a directory", fs.mkdir(path("md-file/sub")))
      raises("bad argument #2 to 'mkdir' (mode out of range)", function()
        local s = fs.mkdir(path("md-bad"), -1)
      end)
      raises("bad argument #2 to 'mkdir' (mode out of range)", function()
        local s = fs.mkdir(path("md-bad"), 4096)
      end)
      assert.matches("bad argument #1 to 'mkdir' %(string expected",
                     raised(function() local s = fs.mkdir() end))
      assert.is_nil(lfs.attributes(path("md-bad")))
    end)

    it("fs.rename moves, replacing what is at the new name", function()
      spit(path("mv-a"), "A")
      spit(path("mv-b"), "B")
      assert.is_true(fs.rename(path("mv-a"), path("mv-c")))
      assert.is_nil(lfs.attributes(path("mv-a")))
      assert.equal("A", slurp(path("mv-c")))
      assert.is_true(fs.rename(path("mv-c"), path("mv-b")))
      assert.equal("A", slurp(path("mv-b")))
      assert.is_nil(lfs.attributes(path("mv-c")))
      -- directories too, with what is in them
      assert.is_true(fs.mkdir(path("mv-d")))
      spit(path("mv-d/in"), "in")
      assert.is_true(fs.rename(path("mv-d"), path("mv-e")))
      assert.equal("in", slurp(path("mv-e/in")))
      -- an open file follows its inode
      local f = assert(fs.open(path("mv-b")))
      assert.is_true(fs.rename(path("mv-b"), path("mv-f")))
      assert.equal("A", f:read(10))
      assert.is_true(f:close())
      fails("ENOENT", "no such file or directory",
            fs.rename(path("mv-none"), path("mv-x")))
      fails("ENOENT", "no such file or directory",
            fs.rename(path("mv-f"), path("no/dir")))
      fails("ENOTDIR", "not a directory",
            fs.rename(path("mv-e"), path("mv-f")))
      fails("EISDIR", "illegal operation on a directory",
            fs.rename(path("mv-f"), path("mv-e")))
      assert.matches("bad argument #2 to 'rename' %(string expected",
                     raised(function() local s = fs.rename(path("mv-f")) end))
      assert.matches("bad argument #1 to 'rename' %(string expected",
                     raised(function() local s = fs.rename() end))
    end)

    it("fs.unlink removes a name; an open file lives on", function()
      spit(path("ul"), "still here")
      local f = assert(fs.open(path("ul")))
      assert.is_true(fs.unlink(path("ul")))
      assert.is_nil(lfs.attributes(path("ul")))
      assert.equal("still here", f:read(100))
      assert.equal(10, f:stat().size)
      assert.is_true(f:close())
      fails("ENOENT", "no such file or directory", fs.unlink(path("ul")))
      assert.is_true(fs.mkdir(path("ul-dir")))
      fails("EISDIR", "illegal operation on a directory",
            fs.unlink(path("ul-dir")))
      -- a link goes, not what it names
      spit(path("ul-target"), "t")
      sh("ln -s ul-target " .. helper.shq(path("ul-link")))
      assert.is_true(fs.unlink(path("ul-link")))
      assert.equal("t", slurp(path("ul-target")))
      assert.matches("bad argument #1 to 'unlink' %(string expected",
                     raised(function() local s = fs.unlink() end))
    end)
  end)

  describe("waiting", function()
    it("is possible in a coroutine a task resumes", function()
      spit(path("gen"), string.rep("0123456789", 100))
      local f <close> = assert(fs.open(path("gen")))
      local chunks = coroutine.wrap(function()
        while true do
          local s = assert(f:read(300))
          if s == "" then return end
          coroutine.yield(s)
        end
      end)
      local got = {}
      for s in chunks do got[#got + 1] = #s end
      assert.same({ 300, 300, 300, 100 }, got)
    end)

    it("raises across a C call boundary, with nothing opened", function()
      spit(path("cb"), "x")
      local fds = helper.fds()
      -- (opened for writing: the close of a read-only file does not wait)
      local f = assert(fs.open(path("cb"), "r+"))
      for _, case in ipairs {
        { "open", function() return fs.open(path("cb")) end },
        { "stat", function() return fs.stat(dir) end },
        { "read", function() return f:read(1) end },
        { "write", function() return f:write("y") end },
        { "close", function() return f:close() end },
      } do
        local name, call = case[1], case[2]
        assert.matches(name .. ": cannot wait across a C call boundary",
                       raised(string.gsub, "a", "a", call))
        -- the file is as it was
        assert.matches("^file %(%d+%)$", tostring(f), nil,
                       "the file after " .. name .. " raised")
        assert.equal(fds + 1, helper.fds(), "after " .. name)
        assert.matches(name .. ": cannot wait across a C call boundary",
                       raised(table.sort, { 1, 2, 3 }, function()
                         call()
                         return false
                       end))
        assert.matches("^file %(%d+%)$", tostring(f), nil,
                       "the file after " .. name .. " raised")
        assert.equal(fds + 1, helper.fds(), "after " .. name)
      end
      -- the file is still open and whole
      assert.equal("x", f:read(10))
      assert.is_true(f:close())
      assert.equal("x", slurp(path("cb")))
      assert.equal(fds, helper.fds())
    end)

    it("shows in so.tasks while it waits", function()
      local fifo = mkfifo()
      local wd = watchdog(fifo, 5)
      local t = so.spawn(function() return fs.open(fifo) end)
      local found
      for _, info in ipairs(so.tasks()) do
        if info.id == t.id then found = info end
      end
      assert.equal("waiting", found and found.state)
      assert.is_truthy(found.waiting:find(fifo, 1, true), found.waiting)
      local w = assert(io.open(fifo, "w"))
      w:close()
      local f = assert(helper.join(t, 5))
      assert.equal("", f:read(1))
      assert.is_true(f:close())
      wd.stop()
    end)
  end)

  describe("the loop", function()
    it("never blocks while the pool waits on a FIFO nobody writes yet",
       function()
      local fifo = mkfifo()
      local wd = watchdog(fifo, 4)
      local got, reader_done
      local t0 = so.now()
      local reader = so.spawn(function()
        -- opening a FIFO to read waits for a writer: on a pool thread
        local f <close> = assert(fs.open(fifo, "r"))
        local parts = {}
        while true do
          local s = assert(f:read(1000))
          if s == "" then break end
          parts[#parts + 1] = s
        end
        got = table.concat(parts)
        reader_done = so.now()
      end)
      -- meanwhile another task runs and timers fire on time
      local ticks = 0
      local ticker = so.spawn(function()
        for _ = 1, 5 do
          so.sleep(0.02)
          ticks = ticks + 1
        end
      end)
      so.sleep(0.2)
      local slept = so.now() - t0
      assert.is_true(slept < 1, "0.2 s took " .. slept .. " s")
      helper.join(ticker, 1)
      assert.equal(5, ticks)
      assert.is_nil(got)
      -- the rest of the pool goes on too
      assert.equal("directory", fs.stat(dir).mode)
      spit(path("other"), "other")
      local o <close> = assert(fs.open(path("other")))
      assert.equal("other", o:read(10))
      assert.is_nil(got)
      -- a writer from another task releases the reader
      local writer = so.spawn(function()
        local w <close> = assert(fs.open(fifo, "w"))
        assert.is_true(w:write("hello "))
        so.sleep(0.05)
        assert.is_true(w:write("fifo"))
      end)
      helper.join(writer, 5)
      helper.join(reader, 5)
      assert.equal("hello fifo", got)
      assert.is_true(reader_done - t0 < 3)
      wd.stop()
    end)

    it("never blocks while the pool waits in a FIFO's read; io releases it",
       function()
      local fifo = mkfifo()
      local wd = watchdog(fifo, 4)
      -- both ways: the open does not wait, the read does
      local f <close> = assert(fs.open(fifo, "r+"))
      local got
      local t0 = so.now()
      local reader = so.spawn(function() got = assert(f:read(100)) end)
      so.sleep(0.1)
      assert.is_true(so.now() - t0 < 1)
      assert.is_nil(got)
      local w = assert(io.open(fifo, "w"))
      w:write("via io")
      w:close()
      helper.join(reader, 5)
      assert.equal("via io", got)
      wd.stop()
    end)

    it("serves many tasks reading one large file at once", function()
      local size = 8 * MiB + 12345
      local data = content(size)
      local p = path("large")
      local f = assert(fs.open(p, "w"))
      assert.is_true(f:write(data))
      assert.is_true(f:close())
      assert.equal(size, fs.stat(p).size)
      local ticks, done = 0, false
      local ticker = so.spawn(function()
        while not done do
          so.sleep(0.001)
          ticks = ticks + 1
        end
      end)
      local tasks = {}
      -- each with its file, reading in its own odd-sized pieces
      for i = 1, 16 do
        tasks[#tasks + 1] = so.spawn(function()
          local g <close> = assert(fs.open(p))
          local pos, step = 1, 100000 + i * 4099
          while true do
            local s = assert(g:read(step))
            if s == "" then break end
            assert(s == data:sub(pos, pos + #s - 1), "task " .. i
                   .. ": wrong bytes at " .. pos)
            pos = pos + #s
          end
          return pos - 1
        end)
      end
      -- others sharing one file, each reading its slices by offset
      local shared <close> = assert(fs.open(p))
      local slice = 256 * 1024
      for i = 1, 16 do
        tasks[#tasks + 1] = so.spawn(function()
          local n = 0
          for off = (i - 1) * slice, size - 1, 16 * slice do
            local s = assert(shared:read(slice, off))
            assert(s == data:sub(off + 1, off + slice), "shared task " .. i
                   .. ": wrong bytes at " .. off)
            n = n + #s
          end
          return n
        end)
      end
      local total = 0
      for i, t in ipairs(tasks) do
        local n = helper.join(t, 15)
        if i <= 16 then assert.equal(size, n) end
        total = total + n
      end
      done = true
      helper.join(ticker, 1)
      assert.equal(17 * size, total)
      assert.is_true(ticks > 0)
    end)

    it("takes writes at offsets from many tasks into one file", function()
      local chunk = 64 * 1024
      local data = content(32 * chunk)
      local f <close> = assert(fs.open(path("pwrite"), "w+"))
      local order = {}
      for i = 1, 32 do order[i] = i end
      for i = 32, 2, -1 do
        local j = math.random(i)
        order[i], order[j] = order[j], order[i]
      end
      local tasks = {}
      for _, i in ipairs(order) do
        tasks[#tasks + 1] = so.spawn(function()
          local off = (i - 1) * chunk
          return f:write(data:sub(off + 1, off + chunk), off)
        end)
      end
      for _, t in ipairs(tasks) do assert.is_true(helper.join(t, 10)) end
      assert.equal(#data, f:stat().size)
      assert.equal(data, f:read(#data, 0))
    end)
  end)

  describe("a wait ended early", function()
    it("by so.cancel in a FIFO's open: the task ends, nothing is left",
       function()
      local fifo = mkfifo()
      local wd = watchdog(fifo, 4)
      local fds = helper.fds()
      local log, after = {}, false
      local t = so.spawn(function()
        local c <close> = helper.closer(log, "closed")
        local f = fs.open(fifo, "r")
        after = true
        return f
      end)
      so.sleep(0.05)
      assert.is_true(so.cancel(t))
      assert.same({ "closed" }, log)
      assert.same({ false, "cancelled" }, { so.join(t, 1) })
      -- the open still waits on the pool: a writer ends it, and the host
      -- closes what it opened
      local w = assert(fs.open(fifo, "w"))
      assert.is_true(w:close())
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 3), "left " .. helper.fds() - fds .. " descriptors")
      so.sleep(0.05)
      assert.is_false(after, "the cancelled task ran again")
      assert.equal("directory", fs.stat(dir).mode)
      wd.stop()
    end)

    it("by so.cancel in a FIFO's read: its <close> closes the file",
       function()
      local fifo = mkfifo()
      local wd = watchdog(fifo, 4)
      local fds = helper.fds()
      local file, after
      local t = so.spawn(function()
        local f <close> = assert(fs.open(fifo, "r+"))
        file = f
        local s = f:read(10)
        after = true
      end)
      assert.is_true(helper.wait_until(function() return file end, 3))
      so.sleep(0.05)  -- its read is on the pool now
      assert.matches("^file %(%d+%)$", tostring(file))
      assert.is_true(so.cancel(t))
      assert.equal("file (closed)", tostring(file))
      assert.same({ false, "cancelled" }, { so.join(t, 1) })
      -- release the read still on the pool
      local w = assert(io.open(fifo, "w"))
      w:write("x")
      w:close()
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 3), "left " .. helper.fds() - fds .. " descriptors")
      so.sleep(0.05)
      assert.is_nil(after, "the cancelled task ran again")
      wd.stop()
    end)

    it("by so.deadline in a FIFO's open and read: ETIMEDOUT, no leak",
       function()
      local fifo = mkfifo()
      local wd = watchdog(fifo, 5)
      local fds = helper.fds()
      local t0 = so.now()
      fails("ETIMEDOUT", "timed out", so.deadline(0.2, fs.open, fifo, "r"))
      local took = so.now() - t0
      assert.is_true(took >= 0.19 and took < 1, "took " .. took .. " s")
      -- a wait that starts after the deadline fails at once
      fails("ETIMEDOUT", "timed out", so.deadline(0.1, function()
        so.sleep(0.2)
        return fs.stat(dir)
      end))
      -- a read
      local f = assert(fs.open(fifo, "r+"))  -- also ends the open above
      t0 = so.now()
      fails("ETIMEDOUT", "timed out", so.deadline(0.2, f.read, f, 10))
      took = so.now() - t0
      assert.is_true(took >= 0.19 and took < 1, "took " .. took .. " s")
      -- what comes next goes to the abandoned read, which drops it
      assert.is_true(f:write("x"))
      assert.is_true(f:close())
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 3), "left " .. helper.fds() - fds .. " descriptors")
      -- within a deadline that does not pass, all is as usual
      spit(path("dl"), "in time")
      local g = assert(so.deadline(5, fs.open, path("dl")))
      assert.equal("in time", so.deadline(5, g.read, g, 100))
      assert.is_true(so.deadline(5, g.close, g))
      wd.stop()
    end)

    it("by so.cancel of a request still queued behind a busy pool",
       function()
      local fifo = mkfifo()
      local wd = watchdog(fifo, 5)
      local fds = helper.fds()
      local n = pool_size()
      local readers, got = {}, {}
      for i = 1, n do
        readers[i] = so.spawn(function()
          local f <close> = assert(fs.open(fifo, "r"))
          local parts = {}
          while true do
            local s = assert(f:read(10))
            if s == "" then break end
            parts[#parts + 1] = s
          end
          got[i] = table.concat(parts)
        end)
      end
      so.sleep(0.1)  -- every pool thread now waits in open(2)
      local stated
      local queued = so.spawn(function()
        local st = fs.stat(dir)
        stated = true
        return st
      end)
      local t0 = so.now()
      so.sleep(0.2)
      assert.is_true(so.now() - t0 < 1, "the loop waited for the pool")
      assert.is_nil(stated, "the pool was not full")
      assert.is_true(so.cancel(queued))
      assert.same({ false, "cancelled" }, { so.join(queued, 1) })
      -- release the readers
      local w = assert(io.open(fifo, "w"))
      w:write("x")
      w:close()
      for i = 1, n do helper.join(readers[i], 5) end
      assert.equal("x", table.concat(got))
      so.sleep(0.05)
      assert.is_nil(stated, "the cancelled request resumed its task")
      assert.equal("directory", fs.stat(dir).mode)
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 3), "left " .. helper.fds() - fds .. " descriptors")
      wd.stop()
    end)
  end)

  describe("a read-only file's close", function()
    it("keeps the number while a request on the pool holds it: a file "
       .. "opened meanwhile cannot take it, the request reads its own",
       function()
      spit(path("rx"), "SECRET-OF-X")
      spit(path("ry"), "SECRET-OF-Y")
      local fifo = mkfifo()
      local wd = watchdog(fifo, 4)
      -- the pool's threads all wait on the FIFO: a read queues behind them
      local blockers = {}
      for i = 1, pool_size() do blockers[i] = so.spawn(fs.open, fifo) end
      so.sleep(0.1)
      local x = assert(fs.open_beneath(dir, "rx"))  -- (on the loop)
      local got
      local reader = so.spawn(function() got = results(x:read(100, 0)) end)
      so.sleep(0.01)
      assert.is_true(x:close())
      assert.equal("closed file", fs.type(x))
      local y = assert(fs.open_beneath(dir, "ry"))
      local w = assert(io.open(fifo, "w"))  -- the pool goes free
      helper.join(reader, 3)
      w:close()
      for _, b in ipairs(blockers) do
        local f = helper.join(b, 3)
        if f then f:close() end
      end
      wd.stop()
      assert.equal("SECRET-OF-X", got[1])
      assert.equal("SECRET-OF-Y", y:read(100, 0))
      y:close()
    end)

    it("returns at once, even across a C call boundary; the descriptor "
       .. "goes shortly after", function()
      spit(path("ro"), "read only")
      local fds = helper.fds()
      local f = assert(fs.open(path("ro")))
      local g = assert(fs.open(path("ro"), "rb"))
      local b = assert(fs.open_beneath(dir, "ro"))  -- (no slurp: open)
      assert.matches("^file %(%d+%)$", tostring(b))
      assert.equal(fds + 3, helper.fds())
      -- a close that waited would raise inside gsub's callback
      local closed = {}
      string.gsub("abc", "%a", function(ch)
        local file = ({ a = f, b = g, c = b })[ch]
        closed[#closed + 1] = file:close()
      end)
      assert.same({ true, true, true }, closed)
      for _, file in ipairs { f, g, b } do
        assert.equal("file (closed)", tostring(file))
        raises("attempt to use a closed file", function()
          local s = file:read(1)
        end)
        assert.is_true(file:close())  -- again: true
      end
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 2), "left " .. helper.fds() - fds .. " descriptors")
      -- a file opened for writing still waits for its close
      local w = assert(fs.open(path("ro-w"), "w"))
      assert.matches("close: cannot wait across a C call boundary",
                     raised(string.gsub, "a", "a", function()
                       return w:close()
                     end))
      assert.matches("^file %(%d+%)$", tostring(w))
      assert.is_true(w:close())
      assert.equal(fds, helper.fds())
    end)

    it("leaves no descriptor after many quick closes", function()
      spit(path("ro-many"), string.rep("r", 100))
      local fds = helper.fds()
      for _ = 1, 300 do
        local f = assert(fs.open(path("ro-many")))
        assert.equal(100, #f:read(1000))
        assert.is_true(f:close())
      end
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 2), "left " .. helper.fds() - fds .. " descriptors")
    end)
  end)

  describe("fs.open_beneath", function()
    -- root: the directory files are opened beneath; outside: a file next
    -- to it (what an escape would reach). Made once, for every test.
    local root, outside, SMALL, LARGE, PASSWD

    setup(function()
      root = path("beneath")
      outside = path("outside.txt")
      SMALL = "small file\n"
      LARGE = content(200 * 1024 + 3)
      PASSWD = slurp("/etc/passwd")
      local q = helper.shq
      assert(lfs.mkdir(root))
      spit(outside, "outside\n")
      assert(lfs.mkdir(path("outdir")))
      spit(path("outdir/secret"), "secret\n")
      spit(root .. "/small", SMALL)
      spit(root .. "/large", LARGE)
      spit(root .. "/empty", "")
      spit(root .. "/one", "1")
      assert(lfs.mkdir(root .. "/sub"))
      spit(root .. "/sub/inner", "inner\n")
      sh(table.concat({
        "set -e", "cd " .. q(root),
        "ln -s ../small sub/rel",                     -- inside, relative
        "ln -s " .. q(root .. "/small") .. " abs",    -- inside, absolute
        "ln -s " .. q(root .. "/large") .. " abs-large",
        "ln -s " .. q(root .. "/sub") .. " abs-sub",
        "ln -s sub link-sub",
        "ln -s ../outside.txt rel-out",               -- outside
        "ln -s " .. q(outside) .. " abs-out",
        "ln -s /etc/passwd passwd",
        "ln -s .. up",
        "ln -s /etc etc-link",
        "ln -s ../outdir outdir-link",
        "ln -s nowhere dangling",
        "ln -s ../../../../../../../../../etc/passwd sub/deep-out",
        "mkfifo fifo",
      }, "\n"))
    end)

    it("reads a file of at most slurp bytes whole, already closed",
       function()
      local f, st, data = fs.open_beneath(root, "small", 1000)
      assert.equal("file (closed)", tostring(f))
      assert.equal(SMALL, data)
      assert.equal("file", st.mode)
      assert.equal(#SMALL, st.size)
      -- stat is the file's, as fs.stat gives it
      assert.same(fs.stat(root .. "/small"), st)
      raises("attempt to use a closed file", function()
        local s = f:read(1)
      end)
      assert.is_true(f:close())
      -- exactly slurp bytes: read; one more: not
      f, st, data = fs.open_beneath(root, "small", #SMALL)
      assert.equal(SMALL, data)
      assert.equal("file (closed)", tostring(f))
      f, st, data = fs.open_beneath(root, "small", #SMALL - 1)
      assert.is_nil(data)
      assert.matches("^file %(%d+%)$", tostring(f))
      assert.equal(SMALL, f:read(100))
      assert.is_true(f:close())
      -- an empty file with slurp 0; a 1-byte file is more than that
      f, st, data = fs.open_beneath(root, "empty", 0)
      assert.equal("", data)
      assert.equal(0, st.size)
      assert.equal("file (closed)", tostring(f))
      f, st, data = fs.open_beneath(root, "one", 0)
      assert.is_nil(data)
      assert.equal("1", f:read(10))
      assert.is_true(f:close())
    end)

    it("leaves a file larger than slurp, or with no slurp, open to read",
       function()
      local f, st, data = fs.open_beneath(root, "large", 64 * 1024)
      assert.is_nil(data)
      assert.matches("^file %(%d+%)$", tostring(f))
      assert.equal(#LARGE, st.size)
      assert.equal("file", st.mode)
      assert.is_true(LARGE == f:read(#LARGE + 10))
      assert.equal(LARGE:sub(1001, 1010), f:read(10, 1000))
      assert.same(st, f:stat())
      assert.is_true(f:close())
      -- no slurp: even a small file comes back open
      local r = results(fs.open_beneath(root, "small"))
      assert.equal(3, r.n)
      assert.is_nil(r[3])
      assert.matches("^file %(%d+%)$", tostring(r[1]))
      assert.equal(SMALL, r[1]:read(100))
      assert.is_true(r[1]:close())
      -- read-only: no write goes through it
      f = assert(fs.open_beneath(root, "large"))
      fails("EBADF", "bad file descriptor", f:write("x"))
      assert.is_true(f:close())
      assert.is_true(LARGE == slurp(root .. "/large"))
    end)

    it("slurps on the pool a file that is not in the page cache", function()
      -- (evicted with dd's nocache: the loop's RWF_NOWAIT read then fails
      -- and the whole open goes to the pool)
      local cold = content(5000)
      spit(root .. "/cold", cold)
      sh("sync " .. helper.shq(root .. "/cold") .. " && dd if="
         .. helper.shq(root .. "/cold") .. " iflag=nocache count=0 "
         .. "status=none")
      local f, st, data = fs.open_beneath(root, "cold", 64 * 1024)
      assert.is_true(cold == data)
      assert.equal(#cold, st.size)
      assert.equal("file (closed)", tostring(f))
      assert.is_true(fs.unlink(root .. "/cold"))
    end)

    it("opens a directory and a FIFO (at once: no writer needed)",
       function()
      local d, st, data = fs.open_beneath(root, "sub", 1000)
      assert.equal("directory", st.mode)
      assert.is_nil(data)
      assert.matches("^file %(%d+%)$", tostring(d))
      fails("EISDIR", "illegal operation on a directory", d:read(10))
      assert.is_true(d:close())
      -- "" and "." are dir itself
      for _, p in ipairs { "", "." } do
        d, st = fs.open_beneath(root, p)
        assert.equal("directory", st.mode, p)
        assert.equal(lfs.attributes(root, "ino"), st.ino, p)
        assert.is_true(d:close())
      end
      -- a FIFO nobody writes: an open that waited would hang here
      local wd = watchdog(root .. "/fifo", 4)
      local t0 = so.now()
      local fifo, fst, fdata = fs.open_beneath(root, "fifo", 1000)
      assert.is_true(so.now() - t0 < 1, "the open waited for a writer")
      assert.equal("fifo", fst.mode)
      assert.is_nil(fdata)
      assert.matches("^file %(%d+%)$", tostring(fifo))
      assert.is_true(fifo:close())
      wd.stop()
    end)

    it("fails as fs.open does for what is not there", function()
      fails("ENOENT", "no such file or directory",
            fs.open_beneath(root, "missing", 100))
      fails("ENOENT", "no such file or directory",
            fs.open_beneath(root, "sub/missing/deeper"))
      fails("ENOENT", "no such file or directory",
            fs.open_beneath(root, "dangling", 100))
      fails("ENOTDIR", "not a directory",
            fs.open_beneath(root, "small/x", 100))
      fails("ENOTDIR", "not a directory",
            fs.open_beneath(root, "abs/x"))
      -- dir itself missing, or not a directory
      fails("ENOENT", "no such file or directory",
            fs.open_beneath(path("no-such-dir"), "small"))
      fails("ENOTDIR", "not a directory",
            fs.open_beneath(root .. "/small", "x"))
    end)

    it("follows links that stay inside, relative or absolute", function()
      -- relative
      local f, st, data = fs.open_beneath(root, "sub/rel", 1000)
      assert.equal(SMALL, data)
      assert.equal(lfs.attributes(root .. "/small", "ino"), st.ino)
      f, st, data = fs.open_beneath(root, "link-sub/inner", 1000)
      assert.equal("inner\n", data)
      -- absolute, to a file inside: served (through the realpath check)
      f, st, data = fs.open_beneath(root, "abs", 1000)
      assert.equal(SMALL, data)
      assert.equal("file (closed)", tostring(f))
      f, st, data = fs.open_beneath(root, "abs-large", 1000)
      assert.is_nil(data)
      assert.equal(#LARGE, st.size)
      assert.is_true(LARGE == f:read(#LARGE))
      assert.is_true(f:close())
      -- absolute, to a directory inside, and through it
      f, st = fs.open_beneath(root, "abs-sub")
      assert.equal("directory", st.mode)
      assert.is_true(f:close())
      f, st, data = fs.open_beneath(root, "abs-sub/inner", 100)
      assert.equal("inner\n", data)
      -- ".." that stays inside
      f, st, data = fs.open_beneath(root, "sub/../small", 100)
      assert.equal(SMALL, data)
    end)

    it("refuses with EXDEV what leads outside: links, .., linked dirs",
       function()
      local exdev = { "rel-out", "abs-out", "passwd", "../outside.txt",
                      "sub/../../outside.txt", "up/outside.txt",
                      "etc-link/passwd", "outdir-link/secret",
                      "sub/deep-out", "../outdir/secret" }
      for _, p in ipairs(exdev) do
        for _, n in ipairs { 1000, false } do
          local r = results(fs.open_beneath(root, p, n or nil))
          assert.same({ n = 3, nil, "EXDEV: cross-device link not permitted",
                        "EXDEV" }, r, p)
        end
      end
      -- what would escape to nothing: EXDEV, or ENOENT from the check of
      -- its real path; an absolute path never names the system's file
      for _, p in ipairs { "../no-such-file", "../../../../etc/passwd",
                           "up/no-such-file", "/etc/passwd", "/.." } do
        local f, msg, name = fs.open_beneath(root, p, 100000)
        assert.is_nil(f, p .. " was opened")
        assert.is_true(name == "EXDEV" or name == "ENOENT",
                       p .. ": " .. tostring(msg))
      end
    end)

    it("raises on bad arguments and across a C call boundary", function()
      assert.matches("bad argument #1 to 'open_beneath' %(string.* "
                     .. "expected, got nil%)",
                     raised(function() local f = fs.open_beneath(nil, "x") end))
      assert.matches("bad argument #2 to 'open_beneath' %(string expected, "
                     .. "got nil%)",
                     raised(function()
                       local f = fs.open_beneath(root, nil)
                     end))
      assert.matches("bad argument #1 to 'open_beneath' %(string.* "
                     .. "expected, got table%)",
                     raised(function() local f = fs.open_beneath({}, "x") end))
      raises("bad argument #1 to 'open_beneath' (embedded zero)", function()
        local f = fs.open_beneath(root .. "\0/sub", "small")
      end)
      raises("bad argument #2 to 'open_beneath' (embedded zero)", function()
        local f = fs.open_beneath(root, "small\0.txt")
      end)
      raises("bad argument #3 to 'open_beneath' (too large (64 MiB at most))",
             function()
               local f = fs.open_beneath(root, "small", 64 * MiB + 1)
             end)
      assert.matches("bad argument #3 to 'open_beneath' %(number has no "
                     .. "integer representation%)",
                     raised(function()
                       local f = fs.open_beneath(root, "small", 1.5)
                     end))
      assert.matches("bad argument #3 to 'open_beneath' %(number expected, "
                     .. "got string%)",
                     raised(function()
                       local f = fs.open_beneath(root, "small", "all")
                     end))
      -- 64 MiB itself is allowed
      local f, _, data = fs.open_beneath(root, "small", 64 * MiB)
      assert.equal(SMALL, data)
      local fds = helper.fds()
      assert.matches("open_beneath: cannot wait across a C call boundary",
                     raised(string.gsub, "a", "a", function()
                       return fs.open_beneath(root, "large")
                     end))
      assert.equal(fds, helper.fds())
    end)

    it("leaves no descriptor behind, whatever the outcome", function()
      local fds = helper.fds()
      local cases = { "small", "large", "sub", "fifo", "abs", "abs-large",
                      "sub/rel", "missing", "small/x", "rel-out", "passwd",
                      "../outside.txt", "up/outside.txt", "dangling", "" }
      local wd = watchdog(root .. "/fifo", 5)
      for _ = 1, 20 do
        for _, p in ipairs(cases) do
          for _, n in ipairs { 1000, 64 * 1024, false } do
            local f = fs.open_beneath(root, p, n or nil)
            if f then assert.is_true(f:close()) end
          end
        end
      end
      wd.stop()
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 2), "left " .. helper.fds() - fds .. " descriptors")
    end)
  end)

  describe("fs.type", function()
    it("says file, closed file or nil, as io.type", function()
      spit(path("ty"), "x")
      local f = assert(fs.open(path("ty")))
      assert.equal("file", fs.type(f))
      f:close()
      assert.equal("closed file", fs.type(f))
      for _, x in ipairs { "file", 1, {}, io.stdout, so.now } do
        assert.is_nil(fs.type(x))
      end
      assert.matches("bad argument #1 to '[%w.]*type' %(value expected%)",
                     raised(fs.type))
    end)
  end)

  describe("fs.open_beneath on the loop", function()
    it("reads a cached file, on disk or in memory (tmpfs), with the pool "
       .. "all taken", function()
      -- /dev/shm is tmpfs: it refuses RWF_NOWAIT, and needs no disk
      local shm = assert(io.popen("mktemp -d /dev/shm/luahost-spec.XXXXXX"))
        :read("l")
      spit(shm .. "/m.txt", "in memory")
      spit(path("d.txt"), "on disk")
      local fifo = mkfifo()
      local wd = watchdog(fifo, 4)
      local blockers = {}
      for i = 1, pool_size() do blockers[i] = so.spawn(fs.open, fifo) end
      so.sleep(0.1)
      local t0 = so.now()
      local r1 = results(fs.open_beneath(dir, "d.txt", 100))
      local r2 = results(fs.open_beneath(shm, "m.txt", 100))
      local r3 = results(fs.open_beneath(shm, "m.txt", 100))
      local took = so.now() - t0
      local w = assert(io.open(fifo, "w"))  -- the pool goes free
      for _, b in ipairs(blockers) do
        local f = helper.join(b, 3)
        if f then f:close() end
      end
      w:close()
      wd.stop()
      sh("rm -rf " .. helper.shq(shm))
      assert.equal("on disk", r1[3])
      assert.equal("in memory", r2[3])
      assert.equal("in memory", r3[3])
      assert.is_true(took < 1, "waited " .. took .. " s for the pool")
    end)
  end)

  describe("fs.open_beneath with a directory file", function()
    it("opens under it, as under its path, and refuses what leaves it",
       function()
      sh("mkdir -p " .. helper.shq(path("df/sub")))
      spit(path("df/sub/a.txt"), "under")
      spit(path("df-out.txt"), "outside")
      sh("ln -sfn ../../df-out.txt " .. helper.shq(path("df/sub/out")))
      sh("ln -sfn " .. helper.shq(path("df/sub/a.txt")) .. " "
         .. helper.shq(path("df/abs")))
      local fds = helper.fds()
      local d = assert(fs.open(path("df")))
      local f, st, data = fs.open_beneath(d, "sub/a.txt", 100)
      assert.equal("closed file", fs.type(f))
      assert.equal("under", data)
      assert.equal(5, st.size)
      -- an absolute link that lands inside: followed by real paths
      f, st, data = fs.open_beneath(d, "abs", 100)
      assert.equal("under", data)
      local r = results(fs.open_beneath(d, "sub/out", 100))
      assert.equal("EXDEV", r[3])
      r = results(fs.open_beneath(d, "../df-out.txt"))
      assert.equal("EXDEV", r[3])
      -- the directory file stays open and usable; a closed one raises
      assert.equal("file", fs.type(d))
      d:close()
      assert.matches("attempt to use a closed file",
                     raised(fs.open_beneath, d, "sub/a.txt"))
      assert.matches("string or file expected, got table",
                     raised(fs.open_beneath, {}, "x"))
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 2), "left " .. helper.fds() - fds .. " descriptors")
    end)
  end)

  describe("fs.sendfile", function()
    -- A file of `size` bytes of content() in dir; its path and data.
    local function data_file(name, size)
      local data = content(size)
      spit(path(name), data)
      return path(name), data
    end

    -- Reads from conn until EOF: everything (raises on an error).
    local function read_all(conn)
      local parts = {}
      while true do
        local d, err = conn:read()
        assert(d, err)
        if d == "" then return table.concat(parts) end
        parts[#parts + 1] = d
      end
    end

    local read_n = helper.read_n

    -- A sparse file of n bytes (nothing to read from the disk); its path.
    local function sparse(name, n)
      local f = assert(fs.open(path(name), "w"))
      assert.is_true(f:write("E", n - 1))
      assert.is_true(f:close())
      return path(name)
    end

    -- The so.tasks entry of task t.
    local function info_of(t)
      for _, info in ipairs(so.tasks()) do
        if info.id == t.id then return info end
      end
    end

    it("sends spans at the start, the middle and the end, byte for byte",
       function()
      local p, data = data_file("sf-small", 300000)
      local f <close> = assert(fs.open(p))
      local c, s = helper.pair(5)
      local sender = so.spawn(function()
        assert.is_true(fs.sendfile(s, f, 0, 1000))
        assert.is_true(fs.sendfile(s, f, 123457, 100000))
        assert.is_true(fs.sendfile(s, f, #data - 5, 5))
        s:close()
      end)
      local got = read_all(c)
      helper.join(sender)
      assert.equal(1000 + 100000 + 5, #got)
      assert.is_true(data:sub(1, 1000) .. data:sub(123458, 223457)
                     .. data:sub(-5) == got)
      -- the file's own position did not move
      assert.equal(data:sub(1, 10), f:read(10))
      c:close()
    end)

    it("sends 20 MiB to a reader slow at first: waits while the socket "
       .. "is full, the loop running", function()
      local size = 20 * MiB
      local p, data = data_file("sf-big", size + 4096)
      local f <close> = assert(fs.open(p))
      local c, s = helper.pair(10)
      local done
      local sender = so.spawn(function()
        local ok = fs.sendfile(s, f, 4000, size)
        done = so.now()
        return ok
      end)
      local t0 = so.now()
      so.sleep(0.2)  -- nothing read yet: the socket filled up
      assert.is_true(so.now() - t0 < 1, "the loop was blocked")
      assert.is_nil(done, "20 MiB went out with nobody reading")
      local info = info_of(sender)
      assert.equal("waiting", info.state)
      assert.matches("^sendfile %d+ bytes left$", info.waiting)
      local left = tonumber(info.waiting:match("%d+"))
      assert.is_true(left > 0 and left < size, info.waiting)
      local got = read_n(c, size)
      assert.is_true(helper.join(sender))
      assert.equal(size, #got)
      assert.is_true(data:sub(4001, 4000 + size) == got,
                     "the bytes differ from the file's")
      s:close()
      assert.equal("", read_all(c))  -- not a byte more
      c:close()
    end)

    it("sends from a file that is not in the page cache (the pool's turn)",
       function()
      local p, data = data_file("sf-cold", 3 * MiB + 7)
      sh("sync " .. helper.shq(p) .. " && dd if=" .. helper.shq(p)
         .. " iflag=nocache count=0 status=none")
      local f <close> = assert(fs.open(p))
      local c, s = helper.pair(5)
      local sender = so.spawn(function()
        assert.is_true(fs.sendfile(s, f, 3, #data - 3))
        s:close()
      end)
      local got = read_all(c)
      helper.join(sender)
      assert.is_true(data:sub(4) == got)
      c:close()
    end)

    it("sends over a Unix socket too", function()
      local p, data = data_file("sf-unix", 500000)
      local f <close> = assert(fs.open(p))
      local sock = path("sf.sock")
      local l = assert(so.listen("unix:" .. sock))
      local sender = so.spawn(function()
        local s <close> = assert(l:accept())
        s:settimeout(5)
        assert.is_true(fs.sendfile(s, f, 10, #data - 10))
      end)
      local c <close> = assert(so.connect("unix:" .. sock, nil, 5))
      c:settimeout(5)
      local got = read_all(c)
      helper.join(sender)
      l:close()
      assert.is_true(data:sub(11) == got)
    end)

    it("leaves the pool free while sockets are full", function()
      -- a sendfile waiting for room watches the socket on the loop: were
      -- it to wait on a pool thread, these would fill the pool and the
      -- fs.stat below would wait behind them
      local p = sparse("sf-sparse", 64 * MiB)
      local f <close> = assert(fs.open(p))
      local conns, senders = {}, {}
      for i = 1, pool_size() + 2 do
        local c, s = helper.pair(5)
        conns[#conns + 1] = c
        conns[#conns + 1] = s
        senders[i] = so.spawn(fs.sendfile, s, f, 0, 64 * MiB)
      end
      so.sleep(0.2)
      for _, t in ipairs(senders) do
        assert.matches("^sendfile", info_of(t).waiting)
      end
      local t0 = so.now()
      assert.equal("directory", so.deadline(1, fs.stat, dir).mode)
      assert.is_true(so.now() - t0 < 0.5, "fs.stat waited for the pool")
      for _, t in ipairs(senders) do
        assert.is_true(so.cancel(t))
        assert.same({ false, "cancelled" }, { so.join(t, 1) })
      end
      for _, c in ipairs(conns) do c:close() end
    end)

    it("fails with EOF when the file ends first, after what there was",
       function()
      local p, data = data_file("sf-eof", 1000)
      local f <close> = assert(fs.open(p))
      local c, s = helper.pair(5)
      fails("EOF", "end of file", fs.sendfile(s, f, 990, 100))
      fails("EOF", "end of file", fs.sendfile(s, f, 1000, 1))
      fails("EOF", "end of file", fs.sendfile(s, f, 5000, 10))
      s:close()
      assert.equal(data:sub(991), read_all(c))
      c:close()
    end)

    it("returns true for a zero length at once, sending nothing", function()
      spit(path("sf-zero"), "zero")
      local f <close> = assert(fs.open(path("sf-zero")))
      local c, s = helper.pair(5)
      assert.same({ n = 1, true }, results(fs.sendfile(s, f, 0, 0)))
      assert.same({ n = 1, true }, results(fs.sendfile(s, f, 4, 0)))
      assert.same({ n = 1, true }, results(fs.sendfile(s, f, 1 << 40, 0)))
      s:close()
      assert.equal("", read_all(c))
      c:close()
    end)

    it("times out by the conn's timeout, its copies closed at once",
       function()
      local p = sparse("sf-timeout", 64 * MiB)
      local f <close> = assert(fs.open(p))
      local c, s = helper.pair()
      s:settimeout(0.2)
      local fds = helper.fds()
      local t0 = so.now()
      fails("ETIMEDOUT", "connection timed out",
            fs.sendfile(s, f, 0, 64 * MiB))
      local took = so.now() - t0
      assert.is_true(took >= 0.19 and took < 1, "took " .. took .. " s")
      -- the socket and file it dup'd are closed, conn and file still open
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 2), "left " .. helper.fds() - fds .. " descriptors")
      assert.matches("^file %(%d+%)$", tostring(f))
      -- so.deadline bounds it the same way
      s:settimeout(nil)
      t0 = so.now()
      fails("ETIMEDOUT", "connection timed out",
            so.deadline(0.2, fs.sendfile, s, f, 0, 64 * MiB))
      took = so.now() - t0
      assert.is_true(took >= 0.19 and took < 1, "took " .. took .. " s")
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 2), "left " .. helper.fds() - fds .. " descriptors")
      s:close()
      c:close()
    end)

    it("ends by so.cancel: the task unwinds, nothing is left", function()
      local p = sparse("sf-cancel", 64 * MiB)
      local f <close> = assert(fs.open(p))
      local c, s = helper.pair(5)
      local fds = helper.fds()
      local log, after = {}, false
      local t = so.spawn(function()
        local _ <close> = helper.closer(log, "closed")
        local ok = fs.sendfile(s, f, 0, 64 * MiB)
        after = true
        return ok
      end)
      so.sleep(0.1)
      assert.matches("^sendfile", info_of(t).waiting)
      assert.is_true(so.cancel(t))
      assert.same({ "closed" }, log)
      assert.same({ false, "cancelled" }, { so.join(t, 1) })
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 2), "left " .. helper.fds() - fds .. " descriptors")
      so.sleep(0.05)
      assert.is_false(after, "the cancelled task ran again")
      s:close()
      c:close()
    end)

    it("fails, without killing the host, when the peer went away",
       function()
      local p = sparse("sf-gone", 64 * MiB)
      local f <close> = assert(fs.open(p))
      local fds = helper.fds()
      local c, s = helper.pair(5)
      c:close()
      local r = results(fs.sendfile(s, f, 0, 64 * MiB))
      assert.equal(3, r.n)
      assert.is_nil(r[1])
      assert.is_true(r[3] == "EPIPE" or r[3] == "ECONNRESET",
                     tostring(r[2]))
      s:close()
      -- a peer that goes away while it waits for room: it fails at once
      c, s = helper.pair(5)
      local t = so.spawn(fs.sendfile, s, f, 0, 64 * MiB)
      so.sleep(0.1)
      assert.matches("^sendfile", info_of(t).waiting)
      c:close()  -- with megabytes unread: a reset
      r = results(helper.join(t, 1))
      assert.equal(3, r.n)
      assert.is_nil(r[1])
      -- the socket's own error, as so.write gives it (not libuv's EBADF
      -- for a polled socket in error)
      assert.is_true(r[3] == "ECONNRESET" or r[3] == "EPIPE", tostring(r[2]))
      s:close()
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 2), "left " .. helper.fds() - fds .. " descriptors")
    end)

    it("ends with ECANCELED when another task closes the conn, as so.write",
       function()
      local p = sparse("sf-closed", 64 * MiB)
      local f <close> = assert(fs.open(p))
      local fds = helper.fds()
      local c, s = helper.pair(5)
      local t = so.spawn(fs.sendfile, s, f, 0, 64 * MiB)
      so.sleep(0.1)  -- the socket is full, nobody reads
      assert.matches("^sendfile", info_of(t).waiting)
      s:close()
      local r = results(helper.join(t, 1))
      assert.equal(3, r.n)
      assert.is_nil(r[1])
      assert.equal("ECANCELED", r[3])
      -- the peer sees the end: the copies went with the conn
      local got = 0
      while true do
        local d = c:read()
        if not d or d == "" then break end
        got = got + #d
      end
      assert.is_true(got < 64 * MiB, "all of it went out after the close")
      c:close()
      assert.is_true(helper.wait_until(function()
        return helper.fds() == fds
      end, 2), "left " .. helper.fds() - fds .. " descriptors")
    end)

    it("times out between steps, not over the whole length (send_timeout)",
       function()
      local size = 24 * MiB
      local p, data = data_file("sf-steady", size)
      local f <close> = assert(fs.open(p))
      local c, s = helper.pair(5)
      assert.is_true(so.settimeout(s, 0.5))
      local sender = so.spawn(fs.sendfile, s, f, 0, size)
      -- a steady reader: 1 MiB every 0.05 s, about 1.2 s in all
      local parts, got = {}, 0
      while got < size do
        local d = assert(c:read())
        assert(d ~= "", "EOF after " .. got)
        parts[#parts + 1] = d
        got = got + #d
        if got // MiB > (got - #d) // MiB then so.sleep(0.05) end
      end
      local r = results(helper.join(sender, 2))
      assert.is_true(r[1], tostring(r[2]))
      assert.is_true(data == table.concat(parts))
      c:close()
      s:close()
    end)

    it("refuses so.write from another task while it runs (EBUSY): no "
       .. "bytes land inside the file's", function()
      local p = sparse("sf-write", 64 * MiB)
      local f <close> = assert(fs.open(p))
      local c, s = helper.pair(5)
      local t = so.spawn(fs.sendfile, s, f, 0, 64 * MiB)
      so.sleep(0.05)
      local r = results(so.write(s, "MARKER"))
      assert.equal("EBUSY", r[3])
      s:close()
      helper.join(t, 1)
      c:close()
    end)

    it("sends a head alone at once (MSG_MORE only when bytes follow)",
       function()
      local p, data = data_file("sf-head", 10)
      local f <close> = assert(fs.open(p))
      local c, s = helper.pair(5)
      assert.is_true(fs.sendfile(s, f, 0, 0, "HEAD-ONLY"))
      local t0 = so.now()
      assert.equal("HEAD-ONLY", read_n(c, 9))
      assert.is_true(so.now() - t0 < 0.1,
                     "the head came after " .. so.now() - t0 .. " s")
      assert.is_true(fs.sendfile(s, f, 0, 10, "H"))
      assert.equal("H" .. data, read_n(c, 11))
      c:close()
      s:close()
    end)

    it("exits cleanly when the script ends while sendfiles wait for room "
       .. "(no handle left open, no sanitizer report)", function()
      -- (real bytes, just written: in the page cache, so each sendfile
      -- runs on the loop and then waits for room, not on the pool)
      local p = path("sf-exit")
      sh("head -c 16777216 /dev/urandom >" .. helper.shq(p))
      local script = helper.write_script(string.format([[
        local so, fs = require "so", require "so.fs"
        local keep = {}
        for i = 1, 4 do
          local l = assert(so.listen("127.0.0.1", 0))
          local h, port = so.sockname(l)
          local s
          local t = so.spawn(function() s = assert(l:accept()) end)
          local c = assert(so.connect(h, port))
          so.join(t)
          l:close()
          local f = assert(fs.open(%q))
          keep[i] = { c, s, f }
          so.spawn(fs.sendfile, s, f, 0, 16 * 1024 * 1024)
        end
        so.sleep(0.05)  -- every socket full, nobody reading
        error("the script ends here")
      ]], p))
      local code, _, err = helper.run(helper.luahost .. " "
                                      .. helper.shq(script))
      os.remove(script)
      assert.equal(1, code, err)
      assert.matches("the script ends here", err)
      assert.is_nil(err:find("Sanitizer", 1, true), err)
      assert.is_nil(err:find("handles left open", 1, true), err)
    end)

    it("refuses a second sendfile on a conn while one runs (EBUSY)",
       function()
      local p = sparse("sf-busy", 64 * MiB)
      local f <close> = assert(fs.open(p))
      local c, s = helper.pair(5)
      local t = so.spawn(fs.sendfile, s, f, 0, 64 * MiB)
      so.sleep(0.05)
      local r = results(fs.sendfile(s, f, 0, 10))
      assert.equal("EBUSY", r[3])
      s:close()
      helper.join(t, 1)
      c:close()
    end)

    describe("on a TLS conn", function()
      local C
      setup(function() C = helper.tls_certs() end)
      teardown(function() C:remove() end)

      it("fails with ENOTSUP, sending nothing into the stream", function()
        spit(path("sf-tls"), "not for TLS")
        local f <close> = assert(fs.open(path("sf-tls")))
        local c, s = helper.pair(5)
        local sctx = assert(tls.server { cert = C.server.cert,
                                         key = C.server.key })
        local cctx = assert(tls.client { ca = C.ca })
        local st = so.spawn(tls.wrap, s, sctx)
        local tc = assert(tls.wrap(c, cctx, "localhost"))
        local ts = assert(helper.join(st))
        local r = results(fs.sendfile(ts, f, 0, 11))
        assert.equal(3, r.n)
        assert.is_nil(r[1])
        assert.equal("ENOTSUP", r[3])
        assert.matches("^ENOTSUP: ", r[2])
        -- the TLS stream is intact: the next record decrypts
        assert.is_true(ts:write("after"))
        assert.equal("after", read_n(tc, 5))
        ts:close()
        tc:close()
      end)
    end)

    it("raises for closed objects, bad arguments, across a C call boundary",
       function()
      spit(path("sf-args"), "args")
      local f = assert(fs.open(path("sf-args")))
      local c, s = helper.pair(5)
      assert.matches("bad argument #1 to 'sendfile' %(conn expected, got nil%)",
                     raised(function() local x = fs.sendfile(nil, f, 0, 1) end))
      local l = assert(so.listen("127.0.0.1", 0))
      assert.matches("bad argument #1 to 'sendfile' %(conn expected, got "
                     .. "listener%)",
                     raised(function() local x = fs.sendfile(l, f, 0, 1) end))
      l:close()
      assert.matches("bad argument #2 to 'sendfile' %(file expected, got "
                     .. "FILE%*%)",
                     raised(function()
                       local x = fs.sendfile(s, io.stdout, 0, 1)
                     end))
      assert.matches("bad argument #2 to 'sendfile' %(file expected, got nil%)",
                     raised(function() local x = fs.sendfile(s, nil, 0, 1) end))
      assert.matches("bad argument #3 to 'sendfile' %(number expected, got "
                     .. "no value%)",
                     raised(function() local x = fs.sendfile(s, f) end))
      assert.matches("bad argument #4 to 'sendfile' %(number expected, got "
                     .. "string%)",
                     raised(function() local x = fs.sendfile(s, f, 0, "x") end))
      assert.matches("bad argument #3 to 'sendfile' %(number has no integer "
                     .. "representation%)",
                     raised(function() local x = fs.sendfile(s, f, 1.5, 1) end))
      raises("bad argument #3 to 'sendfile' (negative offset)", function()
        local x = fs.sendfile(s, f, -1, 1)
      end)
      raises("bad argument #4 to 'sendfile' (negative length)", function()
        local x = fs.sendfile(s, f, 0, -1)
      end)
      local fds = helper.fds()
      assert.matches("sendfile: cannot wait across a C call boundary",
                     raised(string.gsub, "a", "a", function()
                       return fs.sendfile(s, f, 0, 4)
                     end))
      assert.equal(fds, helper.fds())
      assert.is_true(f:close())
      raises("bad argument #2 to 'sendfile' (attempt to use a closed file)",
             function() local x = fs.sendfile(s, f, 0, 1) end)
      local g <close> = assert(fs.open(path("sf-args")))
      s:close()
      raises("attempt to use a closed conn", function()
        local x = fs.sendfile(s, g, 0, 1)
      end)
      -- nothing went out
      assert.equal("", read_all(c))
      c:close()
    end)
  end)

  describe("a host whose script abandoned a FIFO's open", function()
    -- Prints its pid, then leaves an open on the pool that no writer ends.
    local SCRIPT = [[
      local so = require "so"
      local fs = require "so.fs"
      local stat = io.open("/proc/self/stat")
      print(stat:read("n"))
      stat:close()
      print(so.deadline(0.1, fs.open, arg[1]))
      io.stdout:flush()
    ]]

    -- Starts it; returns the bg handle and the host's pid.
    local function start(opts, fifo)
      local script = helper.write_script(SCRIPT)
      local h = helper.bg(string.format("exec %s %s %s %s", helper.luahost,
                                        opts, script, helper.shq(fifo)))
      local ok = helper.wait_until(function()
        return (h:output()):find("ETIMEDOUT\n") ~= nil or h:done() ~= nil
      end, 5)
      os.remove(script)
      local out, err = h:output()
      assert(ok, "no output: " .. out .. err)
      assert.matches("^%d+\nnil\tETIMEDOUT: timed out\tETIMEDOUT\n$", out)
      return h, tonumber(out:match("^%d+"))
    end

    -- Waits for it to end: its exit code, or nil after killing it.
    local function finish(h, seconds)
      local code = h:wait(seconds)  -- nil, "timeout" after killing it
      return code
    end

    it("still ends when no task is left", function()
      local h = start("", mkfifo())
      assert.equal(0, finish(h, 3), "the host did not end by itself")
    end)

    it("ends within the drain period of a SIGTERM", function()
      local h, pid = start("--drain 1", mkfifo())
      os.execute("kill -TERM " .. pid .. " 2>/dev/null")
      assert.equal(0, finish(h, 3), "the host did not end within the drain")
    end)
  end)
end)
