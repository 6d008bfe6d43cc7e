-- so.fs: files through libuv's fs requests on the thread pool. Every
-- function with its results and its errors (the sockets' contract:
-- nil, "ENOENT: no such file or directory", "ENOENT"); positions, offsets
-- and the 64 MiB cap of a read; stat's fields for every kind of file;
-- closing by close, <close> and the collector without a descriptor left;
-- a loop that goes on while the pool waits on a FIFO nobody writes; many
-- tasks reading one large file; so.cancel and so.deadline around waits
-- that never end by themselves (a FIFO), a queued request cancelled; and
-- a host whose script left such a wait behind still ends.
local so = require "so"
local fs = require "so.fs"
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
      local f = assert(fs.open(path("cb")))
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
