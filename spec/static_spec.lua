-- Specs for http.static (lua/so/http/static.lua), gzip in so.http
-- responses (lua/so/http/gzip.lua) and scripts/static.lua: the script in a
-- child process over a temporary directory, driven with curl, Python's
-- http.client and raw sockets; http.static and gzip_min in process, with
-- large files sent by fs.sendfile (by reads and writes over HTTPS) and
-- body sources that give file spans.
local so = require "so"
local http = require "so.http"
local zlib = require "so.zlib"
local reader = require "so.reader"
local fs = require "so.fs"
local tls = require "so.tls"
local lfs = require "lfs"
local helper = require "helper"

local shq = helper.shq

-- {======================================================
-- The served directory
-- =======================================================

local MTIME = "2024-01-02 03:04:05 UTC"
local MTIME_HTTP = "Tue, 02 Jan 2024 03:04:05 GMT"
local GB = 1024 * 1024 * 1024

local write = helper.spit

local slurp = helper.slurp

local BIG = {}
for i = 1, 3000 do
  BIG[#BIG + 1] = string.format("line %05d: the quick brown fox jumps over "
                                .. "the lazy dog %d\n", i, i * i % 977)
end
BIG = table.concat(BIG)
local SMALL = "hello, small file\n"
local INDEX = "<h1>home</h1>\n"
local SUB_INDEX = "<p>sub index</p>\n"
local BIN = {}
for i = 0, 2999 do BIN[#BIN + 1] = string.char((i * 7 + i // 256) % 256) end
BIN = table.concat(BIN)
local JSON = "[" .. string.rep('{"k": "value", "n": 12345},', 100) .. "1]"
local SVG = "<svg xmlns='http://www.w3.org/2000/svg'>"
            .. string.rep("<rect width='1' height='1'/>", 100) .. "</svg>"
local CSS = string.rep("body { color: red; margin: 0 auto; }\n", 60)

local PASSWD = slurp("/etc/passwd")
local PASSWD_LINE = PASSWD:match("^[^\n]+")

local function make_dir()
  local d = os.tmpname()
  os.remove(d)
  assert(lfs.mkdir(d))
  write(d .. "/index.html", INDEX)
  write(d .. "/big.txt", BIG)
  write(d .. "/small.txt", SMALL)
  write(d .. "/data.bin", BIN)
  write(d .. "/data.json", JSON)
  write(d .. "/pic.svg", SVG)
  write(d .. "/style.css", CSS)
  write(d .. "/empty.txt", "")
  write(d .. "/thing.foo", BIG)
  write(d .. "/mut.txt", "version one\n")
  assert(lfs.mkdir(d .. "/sub"))
  write(d .. "/sub/index.html", SUB_INDEX)
  write(d .. "/sub/a.txt", "a in sub\n")
  assert(lfs.mkdir(d .. "/noindex"))
  write(d .. "/noindex/b.txt", "b\n")
  local sh = table.concat({
    "set -e", "cd " .. shq(d),
    "ln -s /etc/passwd link-to-passwd",
    "ln -s /etc link-to-etc",
    "ln -s big.txt link-inside",
    "ln -s sub link-sub",
    "ln -s ../../../../../../etc/passwd sub/rel-out",
    "mkfifo fifo",
    "truncate -s 1G huge.bin",
    "touch -d " .. shq(MTIME) .. " small.txt big.txt data.bin mut.txt",
  }, "\n")
  local code, _, err = helper.run("sh -c " .. shq(sh))
  assert(code == 0, "making the directory failed: " .. err)
  return d
end

-- }======================================================


-- {======================================================
-- Clients
-- =======================================================

-- Header lines of a response head: a table of lower-case names.
local function parse_head(head)
  local headers = {}
  for k, v in head:gmatch("\r?\n([^:\r\n]+):%s*([^\r\n]*)") do
    k = k:lower()
    headers[k] = headers[k] and headers[k] .. ", " .. v or v
  end
  return headers
end

--[[
** curl against base .. path with extra arguments (a shell string): a
** table { status, headers, body, err, size } (the body saved, as curl
** gives it).
]]
local function curl(base, path, args)
  local hfile, bfile = os.tmpname(), os.tmpname()
  local code, out, err = helper.run(string.format(
    "curl -sS --max-time 10 --path-as-is %s -D %s -o %s "
    .. "-w '%%{http_code} %%{size_download}' %s",
    args or "", hfile, bfile, shq(base .. path)))
  local head = slurp(hfile)
  local body = slurp(bfile)
  os.remove(hfile)
  os.remove(bfile)
  -- The last head (after any 1xx).
  local last = head
  for h in head:gmatch("HTTP/[^\r\n]*.-\r\n\r\n") do last = h end
  local status, size = out:match("^(%d+) (%d+)")
  return { status = tonumber(status), headers = parse_head(last),
           body = body, err = err, code = code, size = tonumber(size),
           head = last }
end

-- Reads one response from reader r: status, headers, body, head.
local function read_response(r, method)
  local head = assert(r:readuntil("\r\n\r\n", { limit = 65536 }))
  local status = tonumber(head:match("^HTTP/1%.1 (%d%d%d)"))
  assert(status, "bad status line in " .. head)
  local headers = parse_head(head)
  local body
  if method == "HEAD" or status == 204 or status == 304 then
    body = ""
  elseif headers["transfer-encoding"] == "chunked" then
    local parts = {}
    while true do
      local size = tonumber(assert(r:read("l")):match("^%x+"), 16)
      if size == 0 then assert(r:read("l") == ""); break end
      parts[#parts + 1] = assert(r:read(size))
      assert(r:read("l") == "")
    end
    body = table.concat(parts)
  elseif headers["content-length"] then
    body = assert(r:read(tonumber(headers["content-length"])))
  else
    body = assert(r:read("a", 1 << 26))
  end
  return status, headers, body, head
end

local function connect(port)
  local c = assert(so.connect("127.0.0.1", port))
  c:settimeout(5)
  return c, reader.new(c)
end

--[[
** Sends raw bytes and reads everything until the server closes: status,
** headers, body (all after the head), head. The request should ask for
** Connection: close.
]]
local function raw(port, data)
  local c <close>, r = connect(port)
  assert(c:write(data))
  local all = assert(r:read("a", 1 << 26))
  local head, body = all:match("^(.-\r\n\r\n)(.*)$")
  if not head then return nil, {}, all, all end
  local headers = parse_head(head)
  if headers["transfer-encoding"] == "chunked" and body ~= "" then
    local parts, pos = {}, 1
    while true do
      local size, e = body:match("^(%x+)[^\r\n]*\r\n()", pos)
      size = assert(tonumber(size, 16), "bad chunk")
      if size == 0 then break end
      parts[#parts + 1] = body:sub(e, e + size - 1)
      assert(body:sub(e + size, e + size + 1) == "\r\n", "bad chunk end")
      pos = e + size + 2
    end
    body = table.concat(parts)
  end
  return tonumber(head:match("^HTTP/1%.1 (%d%d%d)")), headers, body, head
end

local function get_raw(port, target, extra)
  return raw(port, "GET " .. target .. " HTTP/1.1\r\nHost: x\r\n"
                   .. (extra or "") .. "Connection: close\r\n\r\n")
end

-- Like curl(base, path, args) for args of only -H 'Name: value', -I and
-- -X METHOD, over a raw socket (no process to start: quicker).
local function quick(port, path, args)
  args = args or ""
  local bare = args:gsub("%-H '[^']*'", "")
  local method = bare:match("%-X (%u+)") or (bare:find("%-I") and "HEAD")
                 or "GET"
  local extra = {}
  for h in args:gmatch("%-H '([^']*)'") do extra[#extra + 1] = h .. "\r\n" end
  local rest = args:gsub("%-H '[^']*'", ""):gsub("%-X %u+", "")
                   :gsub("%-I", ""):gsub("%s", "")
  assert(rest == "", "quick: unknown arguments " .. rest)
  local status, headers, body, head = raw(port, method .. " " .. path
    .. " HTTP/1.1\r\nHost: x\r\n" .. table.concat(extra)
    .. "Connection: close\r\n\r\n")
  return { status = status, headers = headers, body = body, head = head }
end

local function gunzip(data)
  local z = zlib.inflate(1 << 28)
  return assert(z:finish(data))
end

-- The parts of a multipart/byteranges body: { range =, type =, data = }.
local function multipart(ctype, body)
  local b = assert(ctype:match("^multipart/byteranges; boundary=(%S+)$"),
                   "not multipart: " .. tostring(ctype))
  local parts, pos = {}, 1
  while true do
    local s, e = body:find("--" .. b, pos, true)
    assert(s, "no boundary")
    if body:sub(e + 1, e + 2) == "--" then
      assert(body:sub(e + 3) == "\r\n", "bytes after the closing boundary")
      break
    end
    local he = assert(body:find("\r\n\r\n", e, true))
    local h = parse_head(body:sub(e + 1, he + 1))
    local first, last = h["content-range"]:match("^bytes (%d+)%-(%d+)/%d+$")
    local len = tonumber(last) - tonumber(first) + 1
    local data = body:sub(he + 4, he + 3 + len)
    assert(body:sub(he + 4 + len, he + 5 + len) == "\r\n", "no CRLF after part")
    parts[#parts + 1] = { range = h["content-range"], type = h["content-type"],
                          data = data }
    pos = he + 4 + len
  end
  return parts
end

local function refused(status)
  return status == 400 or status == 403 or status == 404
end

-- }======================================================


describe("scripts/static.lua", function()
  local dir, proc, base

  setup(function()
    dir = make_dir()
    proc = helper.start_with("", "scripts/static.lua " .. shq(dir))
    base = "http://127.0.0.1:" .. proc.port
  end)

  teardown(function()
    if proc then assert.equal(0, proc:stop()) end
    if dir then os.execute("rm -rf " .. shq(dir)) end
  end)

  -- (most requests over raw sockets: starting curl costs ~50 ms)
  local function q(path, args) return quick(proc.port, path, args) end

  it("prints where it listens, on 127.0.0.1 by default", function()
    assert.matches("^listening on 127%.0%.0%.1:%d+$", proc.line)
    assert.is_true(proc.port > 0)
  end)

  it("prints its usage without a directory, and exits with 2", function()
    local code, _, err = helper.run(helper.luahost .. " scripts/static.lua")
    assert.equal(2, code)
    assert.matches("usage: static.lua DIR", err)
  end)

  it("listens on the HOST argument", function()
    local p = helper.start_with("", "scripts/static.lua " .. shq(dir),
                                "localhost")
    -- (static.lua DIR 0 localhost)
    local ok, err = pcall(function()
      assert.matches("^listening on [%w%.:]+:%d+$", p.line)
      local r = curl("http://127.0.0.1:" .. p.port, "/small.txt")
      assert.equal(200, r.status)
      assert.equal(SMALL, r.body)
    end)
    assert.equal(0, p:stop())
    assert(ok, err)
  end)

  describe("files", function()
    it("serves a file with its type, length, validators and Accept-Ranges",
       function()
      local r = curl(base, "/small.txt")
      assert.equal(200, r.status)
      assert.equal(SMALL, r.body)
      assert.equal("text/plain; charset=utf-8", r.headers["content-type"])
      assert.equal(tostring(#SMALL), r.headers["content-length"])
      assert.equal("bytes", r.headers["accept-ranges"])
      assert.equal(MTIME_HTTP, r.headers["last-modified"])
      assert.matches('^"[^"]+"$', r.headers.etag)  -- strong
      assert.is_nil(r.headers["cache-control"])
    end)

    it("gives Content-Type by extension", function()
      local want = {
        ["/index.html"] = "text/html; charset=utf-8",
        ["/data.bin"] = "application/octet-stream",
        ["/data.json"] = "application/json",
        ["/pic.svg"] = "image/svg+xml",
        ["/style.css"] = "text/css; charset=utf-8",
        ["/thing.foo"] = "application/octet-stream",
      }
      for path, ctype in pairs(want) do
        local r = q(path)
        assert.equal(200, r.status, path)
        assert.equal(ctype, r.headers["content-type"], path)
      end
    end)

    it("serves a binary file byte for byte", function()
      local r = curl(base, "/data.bin")
      assert.equal(200, r.status)
      assert.equal(#BIN, #r.body)
      assert.is_true(BIN == r.body)
    end)

    it("serves a file larger than a chunk whole", function()
      local r = curl(base, "/big.txt")
      assert.equal(200, r.status)
      assert.equal(tostring(#BIG), r.headers["content-length"])
      assert.is_true(BIG == r.body)
    end)

    it("serves an empty file with Content-Length: 0", function()
      local r = curl(base, "/empty.txt")
      assert.equal(200, r.status)
      assert.equal("0", r.headers["content-length"])
      assert.equal("", r.body)
    end)

    it("serves index.html for the root and for a directory", function()
      local r = curl(base, "/")
      assert.equal(200, r.status)
      assert.equal(INDEX, r.body)
      assert.equal("text/html; charset=utf-8", r.headers["content-type"])
      r = curl(base, "/sub/")
      assert.equal(200, r.status)
      assert.equal(SUB_INDEX, r.body)
      r = curl(base, "/sub/a.txt")
      assert.equal(200, r.status)
      assert.equal("a in sub\n", r.body)
    end)

    it("redirects a directory without its slash, keeping the query",
       function()
      local r = curl(base, "/sub")
      assert.equal(301, r.status)
      assert.equal("/sub/", r.headers.location)
      r = curl(base, "/sub?x=1&y=2")
      assert.equal(301, r.status)
      assert.equal("/sub/?x=1&y=2", r.headers.location)
      r = curl(base, "/noindex")
      assert.equal(301, r.status)
      assert.equal("/noindex/", r.headers.location)
    end)

    it("gives 404 for a directory without index.html: no listing",
       function()
      local r = curl(base, "/noindex/")
      assert.equal(404, r.status)
      assert.not_matches("b%.txt", r.body)
    end)

    it("gives 404 for what does not exist", function()
      -- (a file named as a directory too, as nginx: ENOTDIR; and a name
      -- too long for the file system)
      for _, path in ipairs { "/nope", "/nope.txt", "/nope/deeper.txt",
                              "/sub/nope", "/small.txt/x", "/%2e%2e%2e",
                              "/small.txt/", "/" .. string.rep("n", 300) } do
        local r = q(path)
        assert.equal(404, r.status, path)
      end
    end)

    it("gives 403 for a FIFO (not a regular file), without hanging",
       function()
      local t0 = so.now()
      local r = curl(base, "/fifo")
      assert.equal(403, r.status)
      assert.is_true(so.now() - t0 < 5)
    end)

    it("follows a symlink that stays inside the directory", function()
      local r = curl(base, "/link-inside")
      assert.equal(200, r.status)
      assert.is_true(BIG == r.body)
      r = curl(base, "/link-sub/a.txt")
      assert.equal(200, r.status)
      assert.equal("a in sub\n", r.body)
    end)

    it("refuses symlinks that resolve outside the directory", function()
      for _, path in ipairs { "/link-to-passwd", "/link-to-etc/passwd",
                              "/link-to-etc/", "/sub/rel-out" } do
        local r = q(path)
        assert.is_true(refused(r.status), path .. ": " .. tostring(r.status))
        assert.is_nil(r.body:find(PASSWD_LINE, 1, true), path)
      end
    end)

    it("answers HEAD with the headers only", function()
      local r = curl(base, "/big.txt", "-I")
      assert.equal(200, r.status)
      assert.equal(tostring(#BIG), r.headers["content-length"])
      assert.equal("bytes", r.headers["accept-ranges"])
      assert.is_not_nil(r.headers.etag)
      local status, headers, body = raw(proc.port, "HEAD /big.txt HTTP/1.1\r\n"
        .. "Host: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n")
      assert.equal(200, status)
      assert.is_not_nil(headers["last-modified"])
      assert.equal("", body)
    end)

    it("gives 405 with Allow for other methods", function()
      for _, m in ipairs { "POST", "PUT", "DELETE", "OPTIONS", "PATCH" } do
        local r = q("/small.txt", "-X " .. m)
        assert.equal(405, r.status, m)
        assert.equal("GET, HEAD", r.headers.allow, m)
      end
    end)

    it("serves several requests on one kept-alive connection", function()
      local c <close>, r = connect(proc.port)
      for _, path in ipairs { "/small.txt", "/big.txt", "/nope", "/data.bin",
                              "/small.txt" } do
        assert(c:write("GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
        local status, _, body = read_response(r)
        if path == "/nope" then assert.equal(404, status)
        else
          assert.equal(200, status, path)
          assert.equal(#slurp(dir .. path), #body, path)
        end
      end
    end)
  end)

  describe("traversal", function()
    -- Targets sent as they are (curl --path-as-is).
    local payloads = {
      "/../etc/passwd", "/../../../../../../etc/passwd",
      "/sub/../../etc/passwd", "/%2e%2e/etc/passwd", "/%2E%2E/etc/passwd",
      "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/%2E%2E%2Fetc%2Fpasswd",
      "/sub/..%2f..%2fetc/passwd", "/sub/%2e%2e/%2e%2e/etc/passwd",
      "/.%2e/etc/passwd", "/%2e./etc/passwd", "/%c0%ae%c0%ae/etc/passwd",
      "/%c0%ae%c0%ae%c0%af%c0%ae%c0%ae%c0%afetc%c0%afpasswd",
      "/%e0%80%ae%e0%80%ae/etc/passwd", "/%c0%2e%c0%2e/etc/passwd",
      "/..%5cetc%5cpasswd", "/..%5c..%5c..%5cetc%5cpasswd",
      "/%252e%252e/etc/passwd", "/..%00/etc/passwd", "/%00",
      "/index.html%00.txt", "/link-to-passwd", "/link-to-etc/passwd",
      "//etc/passwd", "///etc/passwd", "/./index.html", "/sub/./a.txt",
      "/sub/.", "/sub/..", "/..", "/.", "/%2e", "/%2e%2e", "/..;/etc/passwd",
      "/%u002e%u002e/etc/passwd", "/%ff%fe/etc/passwd", "/%",
      "/%2", "/%zz/etc/passwd", "/etc/passwd",
      "/sub/rel-out", "/link-sub/../../etc/passwd",
    }
    for _, p in ipairs(payloads) do
      it("refuses " .. p, function()
        local r = q(p)
        assert.is_truthy(r.status, r.err)
        assert.is_true(refused(r.status), p .. " gave " .. tostring(r.status))
        assert.is_nil(r.body:find(PASSWD_LINE, 1, true))
      end)
    end

    it("refuses them all to curl --path-as-is", function()
      local urls = {}
      for _, p in ipairs(payloads) do urls[#urls + 1] = shq(base .. p) end
      local code, out, err = helper.run("curl -s --max-time 20 --path-as-is "
        .. "-w '\\nSTATUS %{http_code}\\n' " .. table.concat(urls, " "))
      assert.equal(0, code, err)
      local n = 0
      for status in out:gmatch("STATUS (%d+)") do
        n = n + 1
        assert.is_true(refused(tonumber(status)),
                       payloads[n] .. " gave " .. status)
      end
      assert.equal(#payloads, n)
      assert.is_nil(out:find(PASSWD_LINE, 1, true))
    end)

    -- Raw targets, with bytes curl would not send as they are.
    local raws = {
      "/sub\\..\\..\\etc\\passwd", "/..\\etc\\passwd", "/\\etc\\passwd",
      "/index.html\0.txt", "/\0", "/../etc/passwd", "../etc/passwd",
      "/sub/..\\..\\..\\etc/passwd", "/%2e%2e\\etc\\passwd",
      "http://x/../etc/passwd", "/..\t/etc/passwd",
    }
    for _, p in ipairs(raws) do
      it("refuses the raw target " .. p:gsub("%z", "\\0"), function()
        local status, _, body, head = get_raw(proc.port, p)
        assert.is_true(status == nil or status >= 400,
                       "got " .. tostring(head))
        assert.is_true(status == nil or status < 500, tostring(head))
        assert.is_nil(body:find(PASSWD_LINE, 1, true))
      end)
    end

    it("still serves after all of that", function()
      local r = curl(base, "/small.txt")
      assert.equal(200, r.status)
      assert.equal(SMALL, r.body)
    end)
  end)

  describe("ranges", function()
    local function range(path, spec, extra)
      return curl(base, path, "-H " .. shq("Range: " .. spec) .. " "
                  .. (extra or ""))
    end
    local function qrange(path, spec, extra)
      return q(path, "-H " .. shq("Range: " .. spec) .. " " .. (extra or ""))
    end

    it("serves bytes=a-b as 206 with Content-Range", function()
      local r = range("/big.txt", "bytes=0-99")
      assert.equal(206, r.status)
      assert.equal("bytes 0-99/" .. #BIG, r.headers["content-range"])
      assert.equal("100", r.headers["content-length"])
      assert.equal(BIG:sub(1, 100), r.body)
      assert.equal("bytes", r.headers["accept-ranges"])
      r = curl(base, "/data.bin", "-r 1000-1999")
      assert.equal(206, r.status)
      assert.is_true(BIN:sub(1001, 2000) == r.body)
    end)

    it("serves a range spanning several chunks", function()
      local r = range("/big.txt", "bytes=1000-150000")
      assert.equal(206, r.status)
      assert.equal("bytes 1000-150000/" .. #BIG, r.headers["content-range"])
      assert.is_true(BIG:sub(1001, 150001) == r.body)
    end)

    it("serves bytes=a- to the end", function()
      local r = range("/big.txt", "bytes=100-")
      assert.equal(206, r.status)
      assert.equal(string.format("bytes 100-%d/%d", #BIG - 1, #BIG),
                   r.headers["content-range"])
      assert.is_true(BIG:sub(101) == r.body)
    end)

    it("serves bytes=-n, the last n bytes", function()
      local r = range("/data.bin", "bytes=-50")
      assert.equal(206, r.status)
      assert.equal(string.format("bytes %d-%d/%d", #BIN - 50, #BIN - 1, #BIN),
                   r.headers["content-range"])
      assert.is_true(BIN:sub(-50) == r.body)
    end)

    it("clips a range or a suffix past the end", function()
      local r = range("/small.txt", "bytes=5-99999")
      assert.equal(206, r.status)
      assert.equal(string.format("bytes 5-%d/%d", #SMALL - 1, #SMALL),
                   r.headers["content-range"])
      assert.equal(SMALL:sub(6), r.body)
      r = range("/small.txt", "bytes=-99999")
      assert.equal(206, r.status)
      assert.equal(string.format("bytes 0-%d/%d", #SMALL - 1, #SMALL),
                   r.headers["content-range"])
      assert.equal(SMALL, r.body)
    end)

    it("serves several ranges as multipart/byteranges", function()
      local r = range("/data.bin", "bytes=0-9,20-29,-5")
      assert.equal(206, r.status)
      assert.equal(tostring(#r.body), r.headers["content-length"])
      assert.is_nil(r.headers["content-range"])
      local parts = multipart(r.headers["content-type"], r.body)
      assert.equal(3, #parts)
      local want = { { 0, 9 }, { 20, 29 }, { #BIN - 5, #BIN - 1 } }
      for i, w in ipairs(want) do
        assert.equal(string.format("bytes %d-%d/%d", w[1], w[2], #BIN),
                     parts[i].range)
        assert.equal("application/octet-stream", parts[i].type)
        assert.is_true(BIN:sub(w[1] + 1, w[2] + 1) == parts[i].data, i)
      end
    end)

    it("serves 16 ranges as multipart, more as the whole file", function()
      local specs = {}
      for i = 0, 15 do specs[#specs + 1] = (i * 100) .. "-" .. (i * 100 + 9) end
      local r = range("/data.bin", "bytes=" .. table.concat(specs, ","))
      assert.equal(206, r.status)
      assert.equal(16, #multipart(r.headers["content-type"], r.body))
      specs[#specs + 1] = "2000-2009"
      r = range("/data.bin", "bytes=" .. table.concat(specs, ","))
      assert.equal(200, r.status)
      assert.is_true(BIN == r.body)
    end)

    it("sends the whole file for ranges that add up to more than it "
       .. "(overlaps, repeats: no amplification)", function()
      local r = range("/data.bin", "bytes=" .. string.rep("0-,", 15) .. "0-")
      assert.equal(200, r.status)
      assert.is_true(BIN == r.body)
      r = range("/data.bin", "bytes=0-" .. (#BIN // 2) .. ",-" .. (#BIN // 2 + 2))
      assert.equal(200, r.status)
      -- what does add up to at most the file stays multipart
      r = range("/data.bin", "bytes=0-9,5-14")
      assert.equal(206, r.status)
      assert.equal(2, #multipart(r.headers["content-type"], r.body))
    end)

    it("gives 416 with Content-Range: bytes */size when unsatisfiable",
       function()
      for _, spec in ipairs { "bytes=" .. #BIN .. "-", "bytes=99999-100000",
                              "bytes=-0" } do
        local r = range("/data.bin", spec)
        assert.equal(416, r.status, spec)
        assert.equal("bytes */" .. #BIN, r.headers["content-range"], spec)
      end
      local r = range("/empty.txt", "bytes=0-")
      assert.equal(416, r.status)
      assert.equal("bytes */0", r.headers["content-range"])
    end)

    it("ignores an invalid Range header (200, the whole file)", function()
      for _, spec in ipairs { "bytes=5-2", "bytes=abc", "items=0-1",
                              "bytes=", "bytes=-", "bytes=1-2-3",
                              "bytes=0-1,x" } do
        local r = qrange("/data.bin", spec)
        assert.equal(200, r.status, spec)
        assert.is_true(BIN == r.body, spec)
        assert.is_nil(r.headers["content-range"], spec)
      end
    end)

    it("honours If-Range with the ETag or the date", function()
      local etag = q("/data.bin", "-I").headers.etag
      assert.is_not_nil(etag)
      local r = qrange("/data.bin", "bytes=0-9", "-H " .. shq("If-Range: " .. etag))
      assert.equal(206, r.status)
      assert.equal(BIN:sub(1, 10), r.body)
      r = qrange("/data.bin", "bytes=0-9", "-H 'If-Range: \"other\"'")
      assert.equal(200, r.status)
      assert.is_true(BIN == r.body)
      -- a weak ETag never matches for If-Range (strong comparison)
      r = qrange("/data.bin", "bytes=0-9", "-H " .. shq("If-Range: W/" .. etag))
      assert.equal(200, r.status)
      r = qrange("/data.bin", "bytes=0-9",
                "-H " .. shq("If-Range: " .. MTIME_HTTP))
      assert.equal(206, r.status)
      assert.equal(BIN:sub(1, 10), r.body)
      r = qrange("/data.bin", "bytes=0-9",
                "-H 'If-Range: Wed, 03 Jan 2024 03:04:05 GMT'")
      assert.equal(200, r.status)
      r = qrange("/data.bin", "bytes=0-9", "-H 'If-Range: garbage'")
      assert.equal(200, r.status)
    end)

    it("serves ranges to Python's http.client on one connection", function()
      local py = [[
import http.client, sys
port, path = int(sys.argv[1]), sys.argv[2]
data = open(path, 'rb').read()
c = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
for spec, want in [('bytes=10-19', data[10:20]), ('bytes=-7', data[-7:]),
                   ('bytes=2990-', data[2990:])]:
    c.request('GET', '/data.bin', headers={'Range': spec})
    r = c.getresponse()
    body = r.read()
    assert r.status == 206, (spec, r.status)
    assert body == want, spec
    assert r.getheader('Content-Range').endswith('/%d' % len(data))
c.request('GET', '/data.bin', headers={'Range': 'bytes=0-1,5-6'})
r = c.getresponse()
body = r.read()
assert r.status == 206 and r.getheader('Content-Type').startswith('multipart/byteranges; boundary='), r.status
b = r.getheader('Content-Type').split('boundary=')[1].encode()
assert body.endswith(b'\r\n--' + b + b'--\r\n'), body[-40:]
assert body.count(b'--' + b) == 3
c.request('GET', '/data.bin', headers={'Range': 'bytes=5000-'})
r = c.getresponse(); r.read()
assert r.status == 416 and r.getheader('Content-Range') == '*/%d' % len(data) or r.getheader('Content-Range') == 'bytes */%d' % len(data), r.getheader('Content-Range')
print('ok')
]]
      local script = helper.write_script(py)
      local code, out, err = helper.run(string.format("python3 %s %d %s",
        script, proc.port, shq(dir .. "/data.bin")))
      os.remove(script)
      assert.equal("ok\n", out, err)
      assert.equal(0, code)
    end)

    it("serves a range at the end of a 1 GB sparse file", function()
      local r = range("/huge.bin", "bytes=-24")
      assert.equal(206, r.status)
      assert.equal(string.format("bytes %d-%d/%d", GB - 24, GB - 1, GB),
                   r.headers["content-range"])
      assert.equal(string.rep("\0", 24), r.body)
    end)

    it("sends no gzip for a range of a compressible file", function()
      local r = range("/big.txt", "bytes=0-4999", "-H 'Accept-Encoding: gzip'")
      assert.equal(206, r.status)
      assert.is_nil(r.headers["content-encoding"])
      assert.is_true(BIG:sub(1, 5000) == r.body)
    end)
  end)

  describe("conditional requests", function()
    local etag
    local function cond(path, header)
      return q(path, "-H " .. shq(header))
    end

    setup(function()
      etag = curl(base, "/big.txt", "-I").headers.etag
    end)

    it("gives 304 with ETag and no body for a matching If-None-Match",
       function()
      local r = cond("/big.txt", "If-None-Match: " .. etag)
      assert.equal(304, r.status)
      assert.equal(etag, r.headers.etag)
      assert.equal(MTIME_HTTP, r.headers["last-modified"])
      assert.equal("", r.body)
      -- nothing after the head on the wire either
      local status, headers, body = get_raw(proc.port, "/big.txt",
                                            "If-None-Match: " .. etag .. "\r\n")
      assert.equal(304, status)
      assert.equal(etag, headers.etag)
      assert.equal("", body)
    end)

    it("matches in a list, *, and a weak W/ form", function()
      for _, v in ipairs { '"nope", ' .. etag, etag .. ', "nope"', "*",
                           "W/" .. etag, '"a","b",' .. etag } do
        local r = cond("/big.txt", "If-None-Match: " .. v)
        assert.equal(304, r.status, v)
        assert.equal("", r.body, v)
      end
    end)

    it("gives 200 for an If-None-Match that does not match", function()
      for _, v in ipairs { '"nope"', '"nope", "other"', etag:sub(1, -3) .. '"' } do
        local r = cond("/big.txt", "If-None-Match: " .. v)
        assert.equal(200, r.status, v)
        assert.is_true(BIG == r.body, v)
      end
    end)

    it("gives each file its own ETag", function()
      local e2 = q("/small.txt", "-I").headers.etag
      assert.not_equal(etag, e2)
      local r = cond("/small.txt", "If-None-Match: " .. etag)
      assert.equal(200, r.status)
    end)

    it("changes the ETag when the file changes", function()
      local e1 = q("/mut.txt", "-I").headers.etag
      write(dir .. "/mut.txt", "version two\n")  -- same size, newer mtime
      local r = cond("/mut.txt", "If-None-Match: " .. e1)
      assert.equal(200, r.status)
      assert.equal("version two\n", r.body)
      assert.not_equal(e1, r.headers.etag)
      assert.not_equal(MTIME_HTTP, r.headers["last-modified"])
    end)

    it("handles If-Modified-Since: equal, later, earlier, garbage",
       function()
      local cases = {
        { MTIME_HTTP, 304 },
        { "Wed, 03 Jan 2024 00:00:00 GMT", 304 },
        { "Sunday, 07-Jan-24 03:04:05 GMT", 304 },   -- RFC 850
        { "Tue Jan  2 03:04:05 2024", 304 },         -- asctime
        { "Tue, 02 Jan 2024 03:04:04 GMT", 200 },
        { "Mon, 01 Jan 1990 00:00:00 GMT", 200 },
        { "garbage", 200 },
        { "", 200 },
        { "Tue, 02 Foo 2024 03:04:05 GMT", 200 },
      }
      for _, case in ipairs(cases) do
        local r = cond("/big.txt", "If-Modified-Since: " .. case[1])
        assert.equal(case[2], r.status, case[1])
        if case[2] == 304 then assert.equal("", r.body, case[1])
        else assert.is_true(BIG == r.body, case[1]) end
      end
    end)

    it("lets If-None-Match win over If-Modified-Since", function()
      local r = curl(base, "/big.txt", "-H 'If-None-Match: \"nope\"' "
                     .. "-H " .. shq("If-Modified-Since: " .. MTIME_HTTP))
      assert.equal(200, r.status)
      r = curl(base, "/big.txt", "-H " .. shq("If-None-Match: " .. etag)
               .. " -H 'If-Modified-Since: Mon, 01 Jan 1990 00:00:00 GMT'")
      assert.equal(304, r.status)
    end)

    it("gives 304 to HEAD too", function()
      local r = curl(base, "/big.txt", "-I -H " .. shq("If-None-Match: " .. etag))
      assert.equal(304, r.status)
    end)

    it("gives 304 for the gzip ETag a gzip client got", function()
      local r = curl(base, "/big.txt", "-H 'Accept-Encoding: gzip'")
      assert.equal(200, r.status)
      local gz = r.headers.etag
      assert.matches('%-gzip"$', gz)
      r = curl(base, "/big.txt", "-H 'Accept-Encoding: gzip' -H "
               .. shq("If-None-Match: " .. gz))
      assert.equal(304, r.status)
      assert.equal("", r.body)
    end)
  end)

  describe("gzip", function()
    it("compresses a large text file for curl --compressed", function()
      local r = curl(base, "/big.txt", "--compressed")
      assert.equal(200, r.status)
      assert.equal("gzip", r.headers["content-encoding"])
      assert.is_true(BIG == r.body)
      assert.is_true(r.size < #BIG / 2, "size_download " .. tostring(r.size))
      assert.matches("[Aa]ccept%-[Ee]ncoding", r.headers.vary)
      assert.is_nil(r.headers["content-length"])
      assert.equal("chunked", r.headers["transfer-encoding"])
    end)

    it("marks the gzip ETag with -gzip, unlike the identity one", function()
      local plain = curl(base, "/big.txt").headers.etag
      local gz = curl(base, "/big.txt", "--compressed").headers.etag
      assert.equal(plain:sub(1, -2) .. '-gzip"', gz)
      assert.matches("[Aa]ccept%-[Ee]ncoding",
                     curl(base, "/big.txt").headers.vary)
    end)

    it("gives Python's gzip.decompress the file's bytes", function()
      local py = [[
import http.client, gzip, sys
port, path = int(sys.argv[1]), sys.argv[2]
for name in ['big.txt', 'data.json', 'pic.svg', 'style.css']:
    data = open(path + '/' + name, 'rb').read()
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    c.request('GET', '/' + name, headers={'Accept-Encoding': 'gzip'})
    r = c.getresponse()
    raw = r.read()
    assert r.status == 200, r.status
    assert r.getheader('Content-Encoding') == 'gzip', (name, r.getheaders())
    assert 'accept-encoding' in r.getheader('Vary', '').lower(), name
    assert r.getheader('ETag').endswith('-gzip"'), name
    assert gzip.decompress(raw) == data, name
    c.close()
print('ok')
]]
      local script = helper.write_script(py)
      local code, out, err = helper.run(string.format("python3 %s %d %s",
        script, proc.port, shq(dir)))
      os.remove(script)
      assert.equal("ok\n", out, err)
      assert.equal(0, code)
    end)

    it("does not compress a small file", function()
      local r = curl(base, "/small.txt", "-H 'Accept-Encoding: gzip'")
      assert.equal(200, r.status)
      assert.is_nil(r.headers["content-encoding"])
      assert.equal(SMALL, r.body)
      assert.equal(tostring(#SMALL), r.headers["content-length"])
    end)

    it("does not compress a binary type", function()
      local r = q("/data.bin", "-H 'Accept-Encoding: gzip'")
      assert.equal(200, r.status)
      assert.is_nil(r.headers["content-encoding"])
      assert.is_true(BIN == r.body)
      r = q("/thing.foo", "-H 'Accept-Encoding: gzip'")
      assert.is_nil(r.headers["content-encoding"])
      assert.is_true(BIG == r.body)
    end)

    it("does not compress for a client that refuses gzip", function()
      for _, ae in ipairs { "gzip;q=0", "gzip; q=0.0", "identity", "br",
                            "deflate" } do
        local r = q("/big.txt", "-H " .. shq("Accept-Encoding: " .. ae))
        assert.equal(200, r.status, ae)
        assert.is_nil(r.headers["content-encoding"], ae)
        assert.is_true(BIG == r.body, ae)
      end
      local r = curl(base, "/big.txt")  -- no Accept-Encoding
      assert.is_nil(r.headers["content-encoding"])
    end)

    it("compresses for the other ways of accepting gzip", function()
      for _, ae in ipairs { "GZIP", "deflate, gzip;q=0.5", "x-gzip", "*",
                            "br, gzip" } do
        local r = q("/big.txt", "-H " .. shq("Accept-Encoding: " .. ae))
        assert.equal(200, r.status, ae)
        assert.equal("gzip", r.headers["content-encoding"], ae)
        assert.is_true(BIG == gunzip(r.body), ae)
      end
    end)

    it("gives a HEAD the headers of its GET, and a 304 the client's validator",
       function()
      local get = q("/big.txt", "-H 'Accept-Encoding: gzip'")
      assert.equal("gzip", get.headers["content-encoding"])
      local r = curl(base, "/big.txt", "-I -H 'Accept-Encoding: gzip'")
      assert.equal(200, r.status)
      assert.equal("gzip", r.headers["content-encoding"])
      assert.equal(get.headers.etag, r.headers.etag)
      assert.matches('%-gzip"$', r.headers.etag)
      assert.matches("Accept%-Encoding", r.headers.vary)
      assert.equal(get.headers["content-length"], r.headers["content-length"])
      local status, headers, body = raw(proc.port, "HEAD /big.txt HTTP/1.1\r\n"
        .. "Host: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n")
      assert.equal(200, status)
      assert.equal("", body)
      assert.equal("gzip", headers["content-encoding"])
      -- the 304 names what the client holds: the gzip coding, which varies
      local etag = get.headers.etag
      r = q("/big.txt", "-H 'Accept-Encoding: gzip' -H "
            .. shq("If-None-Match: " .. etag))
      assert.equal(304, r.status)
      assert.equal(etag, r.headers.etag)
      assert.matches("Accept%-Encoding", r.headers.vary)
      assert.is_nil(r.headers["content-encoding"])
      assert.equal("", r.body)
      -- and the identity one for a client that holds that
      local plain = q("/big.txt").headers.etag
      r = q("/big.txt", "-H " .. shq("If-None-Match: " .. plain))
      assert.equal(304, r.status)
      assert.equal(plain, r.headers.etag)
      assert.is_nil(r.headers.vary)
    end)
  end)

  describe("descriptors", function()
    -- What the server process has open: its descriptors' targets
    -- ("socket:[...]", paths); and how many of those match a pattern.
    local function open_fds()
      local fds = {}
      for name in lfs.dir("/proc/" .. proc.pid .. "/fd") do
        if name ~= "." and name ~= ".." then
          local t = lfs.symlinkattributes("/proc/" .. proc.pid .. "/fd/"
                                          .. name, "target")
          if t then fds[#fds + 1] = t end
        end
      end
      return fds
    end
    local function count(fds, pattern)
      local n = 0
      for _, t in ipairs(fds) do
        if t:find(pattern) then n = n + 1 end
      end
      return n
    end

    it("keeps no file or conn open after GETs, HEADs, ranges and 304s "
       .. "of files sent by sendfile", function()
      -- (a file of its own: what other tests left for the collector
      -- cannot blur the count)
      local name = "fds-" .. tostring(os.time()) .. ".bin"
      local data = BIG .. BIN .. BIG
      write(dir .. "/" .. name, data)
      local target = "^" .. dir:gsub("%p", "%%%0") .. "/" .. name:gsub("%p",
                                                                   "%%%0")
      -- its one socket is the listener's, once the conns of earlier
      -- tests are gone
      local function listener_only()
        return count(open_fds(), "^socket:") == 1
      end
      assert.is_true(helper.wait_until(listener_only, 3),
                     "open: " .. table.concat(open_fds(), " "))
      local etag
      for _ = 1, 5 do
        local r = q("/" .. name)
        assert.equal(200, r.status)
        assert.is_true(data == r.body)
        etag = r.headers.etag
        r = q("/" .. name, "-I")
        assert.equal(200, r.status)
        assert.equal(tostring(#data), r.headers["content-length"])
        assert.equal("", r.body)
        r = q("/" .. name, "-H 'Range: bytes=1000-200000'")
        assert.equal(206, r.status)
        assert.is_true(data:sub(1001, 200001) == r.body)
        r = q("/" .. name, "-H 'Range: bytes=0-9,-10'")
        assert.equal(206, r.status)
        r = q("/" .. name, "-H " .. shq("If-None-Match: " .. etag))
        assert.equal(304, r.status)
        r = q("/" .. name, "-H 'Range: bytes=999999-'")
        assert.equal(416, r.status)
      end
      assert.is_true(helper.wait_until(function()
        local fds = open_fds()
        return count(fds, target) == 0 and count(fds, "^socket:") == 1
      end, 3), "still open: " .. table.concat(open_fds(), " "))
      os.remove(dir .. "/" .. name)
    end)
  end)

  describe("a 1 GB sparse file", function()
    it("is sent whole with the server's RSS flat", function()
      local start = helper.rss(proc.pid)
      local h = helper.bg(string.format(
        "curl -sS --max-time 60 -o /dev/null -w '%%{http_code} "
        .. "%%{size_download}' %s", shq(base .. "/huge.bin")))
      local peak = start
      local ok = helper.wait_until(function()
        local rss = helper.rss(proc.pid)
        if rss > peak then peak = rss end
        return h:done() ~= nil
      end, 60)
      local code, out, err = h:wait(5)
      assert.is_true(ok, "curl did not end")
      assert.equal(0, code, err)
      assert.equal("200 " .. GB, out)
      assert.is_true(peak - start < 40 * 1024 * 1024,
                     string.format("RSS grew by %d bytes", peak - start))
    end)

    it("keeps the RSS flat for a slow reader (backpressure)", function()
      local start = helper.rss(proc.pid)
      local h = helper.bg(string.format(
        "curl -sS --max-time 1.5 --limit-rate 2M -o /dev/null %s",
        shq(base .. "/huge.bin")))
      local peak = start
      helper.wait_until(function()
        local rss = helper.rss(proc.pid)
        if rss > peak then peak = rss end
        return h:done() ~= nil
      end, 10)
      h:wait(5)
      assert.is_true(peak - start < 20 * 1024 * 1024,
                     string.format("RSS grew by %d bytes", peak - start))
      -- and the server still answers
      local r = curl(base, "/small.txt")
      assert.equal(200, r.status)
    end)
  end)
end)


describe("http.static in process", function()
  local dir

  setup(function() dir = make_dir() end)
  teardown(function() if dir then os.execute("rm -rf " .. shq(dir)) end end)

  local function server(handler, opts)
    local logs = {}
    opts = opts or {}
    opts.log = function(msg) logs[#logs + 1] = msg end
    local srv = assert(http.listen("127.0.0.1", 0, handler, opts))
    local _, port = srv:sockname()
    local t = so.spawn(srv.serve, srv)
    return port, function()
      srv:close()
      so.join(t, 5)
    end, logs
  end

  it("answers 500, not 403, when the server itself fails (EMFILE)",
     function()
    -- in a child with 64 descriptors: its handler called directly, with
    -- every descriptor taken
    local script = helper.write_script(string.format([[
      local so, http = require "so", require "so.http"
      local h = http.static(%q)
      local function get(p) return h({ method = "GET", path = p,
                                       headers = {} }).status end
      local before = get("/small.txt")
      local hold = {}
      while true do
        local f = io.open("/dev/null")
        if not f then break end
        hold[#hold + 1] = f
      end
      io.write(before, " ", get("/small.txt"), " ", get("/sub/"), " ",
               get("/nope"), "\n")
      for _, f in ipairs(hold) do f:close() end
      io.write(get("/small.txt"), "\n")
    ]], dir))
    local code, out, err = helper.run("ulimit -n 64 && "
      .. helper.luahost .. " " .. shq(script))
    os.remove(script)
    assert.equal(0, code, err)
    -- (a missing file too: the open fails before its lookup), and all is
    -- well again once descriptors are free
    assert.equal("200 500 500 500\n200\n", out)
  end)

  it("refuses a directory that is not a string", function()
    assert.has_error(function() http.static(42) end,
      "bad argument #1 to 'static' (string expected, got number)")
    assert.has_error(function() http.static() end)
  end)

  it("extends the types with opts.types and sets opts.cache_control",
     function()
    local port, stop = server(http.static(dir, {
      types = { FOO = "text/x-foo" }, cache_control = "public, max-age=60" }))
    local ok, err = pcall(function()
      local status, headers, body = get_raw(port, "/thing.foo")
      assert.equal(200, status)
      assert.equal("text/x-foo", headers["content-type"])
      assert.equal("public, max-age=60", headers["cache-control"])
      assert.is_true(BIG == body)
      status, headers = get_raw(port, "/small.txt")
      assert.equal("text/plain; charset=utf-8", headers["content-type"])
      assert.equal("public, max-age=60", headers["cache-control"])
      status, headers = get_raw(port, "/small.txt",
                                "If-None-Match: " .. headers.etag .. "\r\n")
      assert.equal(304, status)
      assert.equal("public, max-age=60", headers["cache-control"])
      -- the new type is compressible (text/*)
      status, headers, body = get_raw(port, "/thing.foo",
                                      "Accept-Encoding: gzip\r\n")
      assert.equal("gzip", headers["content-encoding"])
      assert.is_true(BIG == gunzip(body))
    end)
    stop()
    assert(ok, err)
  end)

  it("sends no gzip with gzip_min = false", function()
    local port, stop = server(http.static(dir), { gzip_min = false })
    local ok, err = pcall(function()
      local status, headers, body = get_raw(port, "/big.txt",
                                            "Accept-Encoding: gzip\r\n")
      assert.equal(200, status)
      assert.is_nil(headers["content-encoding"])
      assert.equal(tostring(#BIG), headers["content-length"])
      assert.is_true(BIG == body)
    end)
    stop()
    assert(ok, err)
  end)

  describe("gzip of handler responses", function()
    local function text(body)
      return function()
        return { status = 200, body = body,
                 headers = { ["Content-Type"] = "text/plain" } }
      end
    end

    it("compresses a big string body, keeping a Content-Length", function()
      local port, stop = server(text(BIG))
      local ok, err = pcall(function()
        local status, headers, body = get_raw(port, "/",
                                              "Accept-Encoding: gzip\r\n")
        assert.equal(200, status)
        assert.equal("gzip", headers["content-encoding"])
        assert.equal(tostring(#body), headers["content-length"])
        assert.equal("Accept-Encoding", headers.vary)
        assert.is_true(BIG == gunzip(body))
      end)
      stop()
      assert(ok, err)
    end)

    it("does not compress with gzip_min = false", function()
      local port, stop = server(text(BIG), { gzip_min = false })
      local ok, err = pcall(function()
        local status, headers, body = get_raw(port, "/",
                                              "Accept-Encoding: gzip\r\n")
        assert.equal(200, status)
        assert.is_nil(headers["content-encoding"])
        assert.is_true(BIG == body)
      end)
      stop()
      assert(ok, err)
    end)

    it("compresses from gzip_min bytes: 1024 by default, or as set",
       function()
      local port, stop = server(function(req)
        local n = tonumber(req.path:match("%d+"))
        return { status = 200, body = string.rep("x", n),
                 headers = { ["Content-Type"] = "text/plain" } }
      end)
      local port2, stop2 = server(function(req)
        local n = tonumber(req.path:match("%d+"))
        return { status = 200, body = string.rep("x", n),
                 headers = { ["Content-Type"] = "application/json" } }
      end, { gzip_min = 100 })
      local ok, err = pcall(function()
        local cases = { { port, 1023, nil }, { port, 1024, "gzip" },
                        { port2, 99, nil }, { port2, 100, "gzip" } }
        for _, c in ipairs(cases) do
          local _, headers, body = get_raw(c[1], "/" .. c[2],
                                           "Accept-Encoding: gzip\r\n")
          assert.equal(c[3], headers["content-encoding"], c[2])
          if c[3] then body = gunzip(body) end
          assert.equal(string.rep("x", c[2]), body)
        end
      end)
      stop()
      stop2()
      assert(ok, err)
    end)

    it("streams a function body, each piece decompressible as it arrives",
       function()
      local pieces = { string.rep("first piece. ", 10),
                       string.rep("second piece! ", 20), "third\n" }
      local first_seen = false
      local waited_ok
      local port, stop = server(function()
        local i = 0
        return { status = 200, headers = { ["Content-Type"] = "text/plain" },
                 body = function()
                   i = i + 1
                   if i == 2 then
                     -- the client must have decoded piece 1 before this
                     waited_ok = helper.wait_until(function()
                       return first_seen
                     end, 3)
                   end
                   return pieces[i]
                 end }
      end)
      local ok, err = pcall(function()
        local c <close>, r = connect(port)
        assert(c:write("GET / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip"
                       .. "\r\nConnection: close\r\n\r\n"))
        local head = assert(r:readuntil("\r\n\r\n", { limit = 65536 }))
        local headers = parse_head(head)
        assert.equal("gzip", headers["content-encoding"])
        assert.equal("chunked", headers["transfer-encoding"])
        assert.is_nil(headers["content-length"])
        local z = zlib.inflate(1 << 20)
        local got = ""
        -- chunks until piece 1 is decoded whole
        while #got < #pieces[1] do
          local size = tonumber(assert(r:read("l")):match("^%x+"), 16)
          assert.is_true(size > 0, "ended before piece 1")
          local data = assert(r:read(size))
          assert(r:read("l") == "")
          got = got .. assert(z:write(data))
        end
        assert.equal(pieces[1], got)
        first_seen = true
        while true do
          local size = tonumber(assert(r:read("l")):match("^%x+"), 16)
          if size == 0 then break end
          got = got .. assert(z:write(assert(r:read(size))))
          assert(r:read("l") == "")
        end
        got = got .. assert(z:finish())
        assert.equal(table.concat(pieces), got)
        assert.is_true(waited_ok)
      end)
      first_seen = true
      stop()
      assert(ok, err)
    end)

    it("leaves alone non-200s, other types, encoded bodies; adds to Vary",
       function()
      local port, stop = server(function(req)
        local p = req.path
        if p == "/201" then
          return { status = 201, body = BIG,
                   headers = { ["Content-Type"] = "text/plain" } }
        elseif p == "/png" then
          return { status = 200, body = BIG,
                   headers = { ["Content-Type"] = "image/png" } }
        elseif p == "/encoded" then
          return { status = 200, body = BIG,
                   headers = { ["Content-Type"] = "text/plain",
                               ["Content-Encoding"] = "identity-ish" } }
        else
          return { status = 200, body = BIG,
                   headers = { ["Content-Type"] = "text/html",
                               ["Vary"] = "Origin" } }
        end
      end)
      local ok, err = pcall(function()
        for _, p in ipairs { "/201", "/png" } do
          local _, headers, body = get_raw(port, p, "Accept-Encoding: gzip\r\n")
          assert.is_nil(headers["content-encoding"], p)
          assert.is_true(BIG == body, p)
        end
        local _, headers, body = get_raw(port, "/encoded",
                                         "Accept-Encoding: gzip\r\n")
        assert.equal("identity-ish", headers["content-encoding"])
        assert.is_true(BIG == body)
        _, headers, body = get_raw(port, "/vary", "Accept-Encoding: gzip\r\n")
        assert.equal("gzip", headers["content-encoding"])
        assert.equal("Origin, Accept-Encoding", headers.vary)
        assert.is_true(BIG == gunzip(body))
      end)
      stop()
      assert(ok, err)
    end)
  end)

  describe("large files", function()
    -- Files over the 64 KiB that are read whole: they go by fs.sendfile
    -- (in spans of at most 16 MiB) on a plain conn, else by reads and
    -- writes (TLS).
    local big_dir, FIVE, FORTY, C
    local MiB = 1024 * 1024

    setup(function()
      big_dir = os.tmpname()
      os.remove(big_dir)
      assert(lfs.mkdir(big_dir))
      helper.sh(string.format("head -c %d /dev/urandom >%s/five.bin && "
        .. "head -c %d /dev/urandom >%s/forty.bin", 5 * MiB, shq(big_dir),
        40 * MiB + 12345, shq(big_dir)))
      FIVE = slurp(big_dir .. "/five.bin")
      FORTY = slurp(big_dir .. "/forty.bin")
      C = helper.tls_certs()
    end)
    teardown(function()
      if big_dir then os.execute("rm -rf " .. shq(big_dir)) end
      if C then C:remove() end
    end)

    local snap
    before_each(function() snap = helper.snapshot() end)
    after_each(function() helper.assert_clean(snap) end)

    -- curl in the background (this process serves meanwhile): exit code,
    -- its -w output, stderr, and the heads it got.
    local function curl_bg(args)
      local hfile = os.tmpname()
      local h = helper.bg("curl -sS --max-time 20 -D " .. shq(hfile) .. " "
                          .. args)
      local code, out, err = h:wait(25)
      local head = slurp(hfile)
      os.remove(hfile)
      return code, out, err, head
    end

    -- How many descriptors this process has once the collector has
    -- closed what other tests left to it (closes that go to the pool).
    local function settled_fds()
      collectgarbage()
      collectgarbage()
      local n
      helper.wait_until(function()
        local m = helper.fds()
        local same = m == n
        n = m
        return same
      end, 1)
      return n
    end

    -- The so.tasks entries waiting in fs.sendfile.
    local function in_sendfile()
      local n = 0
      for _, info in ipairs(so.tasks()) do
        if info.waiting and info.waiting:find("^sendfile") then n = n + 1 end
      end
      return n
    end

    it("sends a 5 MiB and a 40 MiB file to curl byte for byte", function()
      local port, stop = server(http.static(big_dir))
      local out5, out40 = os.tmpname(), os.tmpname()
      local base = "http://127.0.0.1:" .. port
      -- (one curl, one kept-alive connection: two responses in a row)
      local code, out, err, head = curl_bg(string.format(
        "-w '%%{http_code} %%{size_download}\\n' -o %s %s -o %s %s",
        shq(out5), shq(base .. "/five.bin"), shq(out40),
        shq(base .. "/forty.bin")))
      local got5, got40 = slurp(out5), slurp(out40)
      os.remove(out5)
      os.remove(out40)
      stop()
      assert.equal(0, code, err)
      assert.equal(string.format("200 %d\n200 %d\n", #FIVE, #FORTY), out)
      assert.matches("Content%-Length: " .. #FIVE .. "\r\n", head)
      assert.matches("Content%-Length: " .. #FORTY .. "\r\n", head)
      assert.is_true(FIVE == got5, "five.bin differs")
      assert.is_true(FORTY == got40, "forty.bin differs")
    end)

    it("waits in fs.sendfile for a client that does not read yet",
       function()
      local port, stop = server(http.static(big_dir))
      local ok, err = pcall(function()
        local c <close>, r = connect(port)
        assert(c:write("GET /forty.bin HTTP/1.1\r\nHost: x\r\n"
                       .. "Connection: close\r\n\r\n"))
        -- the socket fills: the serving task waits for room in sendfile
        assert.is_true(helper.wait_until(function()
          return in_sendfile() == 1
        end, 2), "no task waits in fs.sendfile")
        local status, headers, body = read_response(r)
        assert.equal(200, status)
        assert.equal(tostring(#FORTY), headers["content-length"])
        assert.is_true(FORTY == body, "the body differs")
        assert.equal("", r:read("a"))  -- and nothing more
      end)
      stop()
      assert(ok, err)
    end)

    it("serves ranges of a big file: one in the middle, several as "
       .. "multipart", function()
      local port, stop = server(http.static(big_dir))
      local ok, err = pcall(function()
        -- 29 MB from the middle: two spans
        local status, headers, body = get_raw(port, "/forty.bin",
          "Range: bytes=1000000-30000000\r\n")
        assert.equal(206, status)
        assert.equal("bytes 1000000-30000000/" .. #FORTY,
                     headers["content-range"])
        assert.equal("29000001", headers["content-length"])
        assert.is_true(FORTY:sub(1000001, 30000001) == body)
        -- part heads (strings) between spans of the file
        status, headers, body = get_raw(port, "/forty.bin",
          "Range: bytes=10-20,5000000-21999999,-100\r\n")
        assert.equal(206, status)
        assert.equal(tostring(#body), headers["content-length"])
        local parts = multipart(headers["content-type"], body)
        assert.equal(3, #parts)
        for i, w in ipairs { { 10, 20 }, { 5000000, 21999999 },
                             { #FORTY - 100, #FORTY - 1 } } do
          assert.equal(string.format("bytes %d-%d/%d", w[1], w[2], #FORTY),
                       parts[i].range)
          assert.is_true(FORTY:sub(w[1] + 1, w[2] + 1) == parts[i].data, i)
        end
        -- the last byte alone
        status, headers, body = get_raw(port, "/five.bin",
                                        "Range: bytes=-1\r\n")
        assert.equal(206, status)
        assert.equal(FIVE:sub(-1), body)
      end)
      stop()
      assert(ok, err)
    end)

    it("answers HEAD of a big file with its length, no body, no "
       .. "descriptor left", function()
      local port, stop = server(http.static(big_dir))
      -- (a first request opens what the handler keeps: its root)
      assert.equal(200, quick(port, "/five.bin", "-I").status)
      local fds = settled_fds()
      local ok, err = pcall(function()
        for _ = 1, 10 do
          local r = quick(port, "/forty.bin", "-I")
          assert.equal(200, r.status)
          assert.equal(tostring(#FORTY), r.headers["content-length"])
          assert.equal("bytes", r.headers["accept-ranges"])
          assert.equal("", r.body)
          -- and a Range is no matter for HEAD
          r = quick(port, "/five.bin", "-I -H 'Range: bytes=0-9'")
          assert.equal(200, r.status)
          assert.equal(tostring(#FIVE), r.headers["content-length"])
          assert.equal("", r.body)
        end
        -- (no collector run: the handler closes what it opened)
        assert.is_true(helper.wait_until(function()
          return helper.fds() == fds
        end, 2), "left " .. helper.fds() - fds .. " descriptors")
      end)
      stop()
      assert(ok, err)
    end)

    it("closes the file of a download a client left in the middle",
       function()
      local port, stop = server(http.static(big_dir))
      assert.equal(200, quick(port, "/five.bin", "-I").status)
      local fds = settled_fds()
      local ok, err = pcall(function()
        for _ = 1, 3 do
          local c, r = connect(port)
          assert(c:write("GET /forty.bin HTTP/1.1\r\nHost: x\r\n\r\n"))
          assert(r:read(MiB))
          c:close()  -- with 39 MiB to go
        end
        -- the conns end and their files close at once, by the body's
        -- __close: no collection is asked for (a quiet server may not run
        -- one for a long time)
        collectgarbage("stop")
        local gone = helper.wait_until(function()
          return helper.fds() == fds
        end, 2)
        collectgarbage("restart")
        assert.is_true(gone, "left " .. helper.fds() - fds .. " descriptors")
        -- and it still serves
        local status, _, body = get_raw(port, "/five.bin")
        assert.equal(200, status)
        assert.is_true(FIVE == body)
      end)
      stop()
      assert(ok, err)
    end)

    it("sends the big files byte for byte over HTTPS (reads and writes: "
       .. "sendfile refuses TLS)", function()
      local port, stop = server(http.static(big_dir), {
        tls = assert(tls.server { cert = C.server.cert, key = C.server.key })
      })
      local out5, out40, outr = os.tmpname(), os.tmpname(), os.tmpname()
      local base = "https://localhost:" .. port
      local code, out, err = curl_bg(string.format(
        "--cacert %s --resolve localhost:%d:127.0.0.1 "
        .. "-w '%%{http_code} %%{size_download}\\n' -o %s %s -o %s %s "
        .. "--next --cacert %s --resolve localhost:%d:127.0.0.1 "
        .. "-w '%%{http_code} %%{size_download}\\n' -r 1000000-20000000 "
        .. "-o %s %s", shq(C.ca), port, shq(out5), shq(base .. "/five.bin"),
        shq(out40), shq(base .. "/forty.bin"), shq(C.ca), port, shq(outr),
        shq(base .. "/forty.bin")))
      local got5, got40, gotr = slurp(out5), slurp(out40), slurp(outr)
      os.remove(out5)
      os.remove(out40)
      os.remove(outr)
      stop()
      assert.equal(0, code, err)
      assert.equal(string.format("200 %d\n200 %d\n206 %d\n", #FIVE, #FORTY,
                                 19000001), out)
      assert.is_true(FIVE == got5, "five.bin differs")
      assert.is_true(FORTY == got40, "forty.bin differs")
      assert.is_true(FORTY:sub(1000001, 20000001) == gotr, "the range differs")
    end)

    describe("a body source's file spans", function()
      -- A handler whose body source gives the items of `items` in turn
      -- (strings, and {offset, length} spans of forty.bin) to a caller
      -- that takes spans; with `cl`, a Content-Length.
      local function spans_handler(items, cl)
        return function()
          local f = assert(fs.open(big_dir .. "/forty.bin"))
          local i = 0
          return { status = 200,
                   headers = { ["Content-Type"] = "application/x-test",
                               ["Content-Length"] = cl },
                   body = function(spans)
                     assert(spans == true, "not called with true")
                     i = i + 1
                     local item = items[i]
                     if item == nil then f:close(); return nil end
                     if type(item) == "string" then return item end
                     return { file = f, offset = item[1], length = item[2] }
                   end }
        end
      end
      -- (the empty spans must be skipped: chunked, an empty chunk would
      -- end the body there)
      local ITEMS = { "<head>", { 0, 100 }, { 7, 0 }, "<mid>",
                      { 3 * MiB, 17 * MiB }, { 5, 0 }, "<end>" }

      -- What ITEMS stand for.
      local function expected()
        return "<head>" .. FORTY:sub(1, 100) .. "<mid>"
               .. FORTY:sub(3 * MiB + 1, 20 * MiB) .. "<end>"
      end

      it("are sent chunked, zero-length ones skipped", function()
        local port, stop = server(spans_handler(ITEMS))
        local ok, err = pcall(function()
          local status, headers, body = get_raw(port, "/")
          assert.equal(200, status)
          assert.equal("chunked", headers["transfer-encoding"])
          assert.is_nil(headers["content-length"])
          assert.is_true(expected() == body, "the body differs")
        end)
        stop()
        assert(ok, err)
      end)

      it("are sent with the handler's Content-Length", function()
        local want = expected()
        local port, stop = server(spans_handler(ITEMS, #want))
        local ok, err = pcall(function()
          local status, headers, body = get_raw(port, "/")
          assert.equal(200, status)
          assert.is_nil(headers["transfer-encoding"])
          assert.equal(tostring(#want), headers["content-length"])
          assert.is_true(want == body, "the body differs")
        end)
        stop()
        assert(ok, err)
      end)

      it("are a body error when not spans: 500 before anything was sent",
         function()
        for _, bad in ipairs { { -1, 10 }, { 0, -1 }, { 1.5, 10 },
                               { 0, 2.5 }, { "0", 10 } } do
          local port, stop, logs = server(spans_handler({ bad }))
          local ok, err = pcall(function()
            local status = get_raw(port, "/")
            assert.equal(500, status)
            assert.matches("not a file span", table.concat(logs, "\n"))
          end)
          stop()
          assert(ok, err)
        end
        -- after bytes went out: the connection is dropped
        local port, stop, logs = server(spans_handler({ "sent", { 0, 10 },
                                                        { -5, 1 } }))
        local ok, err = pcall(function()
          local c <close>, r = connect(port)
          assert(c:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
          local all = assert(r:read("a", 1 << 20))
          assert.matches("^HTTP/1%.1 200 ", all)
          assert.is_nil(all:find("\r\n0\r\n\r\n", 1, true),
                        "the body ended as if whole")
          assert.matches("not a file span", table.concat(logs, "\n"))
        end)
        stop()
        assert(ok, err)
      end)

      it("are read and written on a TLS conn", function()
        local port, stop = server(spans_handler(ITEMS), {
          tls = assert(tls.server { cert = C.server.cert,
                                    key = C.server.key }) })
        local out = os.tmpname()
        local code, w, err = curl_bg(string.format(
          "--cacert %s --resolve localhost:%d:127.0.0.1 -w '%%{http_code}' "
          .. "-o %s https://localhost:%d/", shq(C.ca), port, shq(out),
          port))
        local body = slurp(out)
        os.remove(out)
        stop()
        assert.equal(0, code, err)
        assert.equal("200", w)
        assert.is_true(expected() == body, "the body differs")
      end)
    end)
  end)
end)
