-- Specs for lua/so/http.lua: an in-process server driven over raw sockets,
-- and scripts/http_hello.lua in a child process driven with curl.
local so = require "so"
local http = require "so.http"
local reader = require "so.reader"
local helper = require "helper"

-- Reads one response from reader r. Returns status, headers (lower-case
-- names), body, raw head; or nil, err.
local function read_response(r, method)
  local head, err = r:readuntil("\r\n\r\n", { limit = 65536 })
  if not head then return nil, err end
  local status = tonumber(head:match("^HTTP/1%.1 (%d%d%d) [^\r\n]*\r\n"))
  assert(status, "bad status line in " .. head)
  local headers = {}
  for k, v in head:gmatch("\r\n([^:\r\n]+): ([^\r\n]*)") do
    k = k:lower()
    headers[k] = headers[k] and headers[k] .. ", " .. v or v
  end
  local body
  if method == "HEAD" or status == 204 or status == 304 or status < 200 then
    body = ""
  elseif headers["content-length"] then
    body = assert(r:read(tonumber(headers["content-length"])))
  elseif headers["transfer-encoding"] == "chunked" then
    local parts = {}
    while true do
      local size = tonumber(assert(r:read("l")), 16)
      if size == 0 then assert(r:read("l") == ""); break end
      parts[#parts + 1] = assert(r:read(size))
      assert(r:read("l") == "")
    end
    body = table.concat(parts)
  else
    body = assert(r:read("a", 1 << 30))
  end
  return status, headers, body, head
end

-- The rest of the stream: "" at a clean close, or nil, err.
local function rest(r)
  return r:read("a")
end

--[[
** An in-process server: returns port, stop(). The log lines are gathered
** in the returned table.
]]
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

local function connect(port)
  local c = assert(so.connect("127.0.0.1", port))
  c:settimeout(5)
  return c, reader.new(c)
end

-- Send raw bytes on a new connection, read one response.
local function raw(port, data, method)
  local c <close>, r = connect(port)
  assert(c:write(data))
  local status, headers, body = read_response(r, method)
  return status, headers, body, rest(r)
end

local function hello(req, body)
  return { status = 200, headers = { ["Content-Type"] = "text/plain" },
           body = "hello world\n" }
end

describe("so.http", function()
  local snap
  before_each(function() snap = helper.snapshot() end)
  after_each(function() helper.assert_clean(snap) end)

  describe("requests", function()
    it("answers a GET with Date and Content-Length", function()
      local port, stop = server(hello)
      local status, h, body = raw(port,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      assert.are.equal(200, status)
      assert.are.equal("hello world\n", body)
      assert.are.equal("12", h["content-length"])
      assert.are.equal("text/plain", h["content-type"])
      assert.truthy(h.date:match("^%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d GMT$"))
      assert.are.equal("close", h.connection)
      stop()
    end)

    it("gives the handler method, target, path, query, version, headers", function()
      local seen
      local port, stop = server(function(req, body)
        seen = { method = req.method, target = req.target, path = req.path,
                 query = req.query, version = req.version,
                 a = req.headers["X-Multi"], b = req.headers["x-multi"],
                 list = { req:header("X-MULTI") }, host = req.headers.Host,
                 none = req.headers["x-none"] }
        local names = {}
        for k in req:each_header() do names[#names + 1] = k end
        seen.names = names
        return { status = 204 }
      end)
      local status = raw(port, "GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: h\r\n"
        .. "X-Multi: one\r\nx-multi:  two  \r\nConnection: close\r\n\r\n")
      assert.are.equal(204, status)
      assert.are.same({ method = "GET", target = "/a/b?x=1&y=2", path = "/a/b",
        query = "x=1&y=2", version = "1.1", a = "one, two", b = "one, two",
        list = { "one", "two" }, host = "h",
        names = { "Host", "X-Multi", "x-multi", "Connection" } }, seen)
      stop()
    end)

    it("keeps the connection alive and answers pipelined requests in order", function()
      local port, stop = server(function(req)
        return { status = 200, body = req.path }
      end)
      local c <close>, r = connect(port)
      local req = "GET /%d HTTP/1.1\r\nHost: x\r\n\r\n"
      assert(c:write(req:format(1) .. req:format(2) .. req:format(3)))
      for i = 1, 3 do
        local status, h, body = read_response(r)
        assert.are.equal(200, status)
        assert.are.equal("/" .. i, body)
        assert.is_nil(h.connection)
      end
      -- One split across packets, byte by byte.
      local one = req:format(4)
      for i = 1, #one do
        assert(c:write(one:sub(i, i)))
        if i % 7 == 0 then so.sleep(0.001) end
      end
      assert.are.equal("/4", select(3, read_response(r)))
      c:close()
      stop()
    end)

    it("speaks HTTP/1.0 with and without keep-alive", function()
      local port, stop = server(hello)
      local status, h, body, tail = raw(port, "GET / HTTP/1.0\r\n\r\n")
      assert.are.equal(200, status)
      assert.are.equal("hello world\n", body)
      assert.are.equal("close", h.connection)
      assert.are.equal("", tail)
      local c <close>, r = connect(port)
      for _ = 1, 2 do
        assert(c:write("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"))
        status, h = read_response(r)
        assert.are.equal(200, status)
        assert.are.equal("keep-alive", h.connection)
      end
      c:close()
      stop()
    end)

    it("closes after Connection: close", function()
      local port, stop = server(hello)
      local c <close>, r = connect(port)
      assert(c:write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     .. "GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
      local status, h = read_response(r)
      assert.are.equal(200, status)
      assert.are.equal("close", h.connection)
      assert.are.equal("", rest(r))
      c:close()
      stop()
    end)

    it("skips empty lines before a request and accepts absolute targets", function()
      local port, stop = server(function(req)
        return { body = req.path .. " " .. tostring(req.query) }
      end)
      local status, _, body = raw(port, "\r\n\r\nGET http://h:1/p?q HTTP/1.1\r\n"
                                  .. "Host: h\r\nConnection: close\r\n\r\n")
      assert.are.equal(200, status)
      assert.are.equal("/p q", body)
      stop()
    end)
  end)

  describe("request bodies", function()
    local function echo(req, body)
      return { status = 200, body = body }
    end

    it("streams a Content-Length body to the handler", function()
      local pieces = {}
      local port, stop = server(function(req, body)
        for chunk in body:chunks() do pieces[#pieces + 1] = chunk end
        return { body = tostring(body.total) }
      end)
      local c <close>, r = connect(port)
      assert(c:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234"))
      so.sleep(0.01)
      assert(c:write("56789"))
      local status, _, body = read_response(r)
      assert.are.equal(200, status)
      assert.are.equal("10", body)
      assert.are.equal("0123456789", table.concat(pieces))
      assert.is_true(#pieces >= 2)
      c:close()
      stop()
    end)

    it("decodes a chunked body with extensions and trailers", function()
      local port, stop = server(function(req, body)
        return { body = assert(body:readall()) }
      end)
      local status, _, body = raw(port, "POST / HTTP/1.1\r\nHost: x\r\n"
        .. "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .. "5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\n"
        .. "X-Trailer: t\r\n\r\n")
      assert.are.equal(200, status)
      assert.are.equal("hello 0123456789", body)
      stop()
    end)

    it("echoes a body back streamed, with its length or chunked", function()
      local port, stop = server(echo)
      local status, h, body = raw(port, "POST / HTTP/1.1\r\nHost: x\r\n"
        .. "Content-Length: 3\r\nConnection: close\r\n\r\nabc")
      assert.are.equal(200, status)
      assert.are.equal("3", h["content-length"])
      assert.are.equal("abc", body)
      status, h, body = raw(port, "POST / HTTP/1.1\r\nHost: x\r\n"
        .. "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .. "3\r\nabc\r\n0\r\n\r\n")
      assert.are.equal(200, status)
      assert.are.equal("chunked", h["transfer-encoding"])
      assert.are.equal("abc", body)
      stop()
    end)

    it("sends 100 Continue when the handler reads the body", function()
      local port, stop = server(echo)
      local c <close>, r = connect(port)
      assert(c:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     .. "Expect: 100-continue\r\n\r\n"))
      assert.are.equal("HTTP/1.1 100 Continue", r:read("l"))
      assert.are.equal("", r:read("l"))
      assert(c:write("data"))
      local status, _, body = read_response(r)
      assert.are.equal(200, status)
      assert.are.equal("data", body)
      c:close()
      stop()
    end)

    it("answers without 100 Continue and closes when the body is not wanted", function()
      local port, stop = server(function() return { status = 404, body = "no\n" } end)
      local c <close>, r = connect(port)
      assert(c:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     .. "Expect: 100-continue\r\n\r\n"))
      local status, h = read_response(r)
      assert.are.equal(404, status)
      assert.are.equal("close", h.connection)
      assert.are.equal("", rest(r))
      c:close()
      stop()
    end)

    it("drains a small unread body and keeps the connection", function()
      local port, stop = server(hello)
      local c <close>, r = connect(port)
      assert(c:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
                     .. "abcdeGET / HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert.are.equal(200, (read_response(r)))
      assert.are.equal(200, (read_response(r)))
      c:close()
      stop()
    end)
  end)

  describe("responses", function()
    it("streams a function body chunked, or until close for HTTP/1.0", function()
      local function counter()
        local i = 0
        return function()
          i = i + 1
          if i <= 3 then return "part" .. i .. ";" end
        end
      end
      local port, stop = server(function() return { body = counter() } end)
      local status, h, body = raw(port,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      assert.are.equal(200, status)
      assert.are.equal("chunked", h["transfer-encoding"])
      assert.are.equal("part1;part2;part3;", body)
      status, h, body = raw(port, "GET / HTTP/1.0\r\n\r\n")
      assert.are.equal(200, status)
      assert.is_nil(h["transfer-encoding"])
      assert.are.equal("part1;part2;part3;", body)
      stop()
    end)

    it("sends no body for HEAD, 204 and 304", function()
      local port, stop = server(function(req)
        if req.path == "/204" then return { status = 204, body = "x" } end
        if req.path == "/304" then return { status = 304 } end
        return hello()
      end)
      local c <close>, r = connect(port)
      assert(c:write("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"))
      local status, h, body = read_response(r, "HEAD")
      assert.are.equal(200, status)
      assert.are.equal("12", h["content-length"])
      assert(c:write("GET /204 HTTP/1.1\r\nHost: x\r\n\r\n"))
      status, h = read_response(r)
      assert.are.equal(204, status)
      assert.is_nil(h["content-length"])
      assert(c:write("GET /304 HTTP/1.1\r\nHost: x\r\n\r\n"))
      status, h = read_response(r)
      assert.are.equal(304, status)
      assert.is_nil(h["content-length"])
      -- Nothing else came: the next response is the next request's.
      assert(c:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
      status, h, body = read_response(r)
      assert.are.equal("hello world\n", body)
      c:close()
      stop()
    end)

    it("accepts status, headers, body results, repeated headers and strings", function()
      local port, stop = server(function(req)
        if req.path == "/multi" then
          return 201, { ["Set-Cookie"] = { "a=1", "b=2" }, ["X-N"] = 5 }, "made"
        end
        return "just a string"
      end)
      local c <close>, r = connect(port)
      assert(c:write("GET /multi HTTP/1.1\r\nHost: x\r\n\r\n"))
      local status, h, body, head = read_response(r)
      assert.are.equal(201, status)
      assert.are.equal("made", body)
      assert.are.equal("5", h["x-n"])
      assert.truthy(head:find("\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n", 1, true))
      assert(c:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
      status, h, body = read_response(r)
      assert.are.equal(200, status)
      assert.are.equal("just a string", body)
      c:close()
      stop()
    end)

    it("sends a large body with its head", function()
      local big = string.rep("0123456789", 100000)
      local port, stop = server(function() return { body = big } end)
      local status, h, body = raw(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      assert.are.equal(200, status)
      assert.are.equal(tostring(#big), h["content-length"])
      assert.are.equal(big, body)
      stop()
    end)
  end)

  describe("errors", function()
    local function expect_status(port, data, want)
      local status, h, _, tail = raw(port, data)
      assert.are.equal(want, status, "for " .. string.format("%q", data))
      assert.are.equal("close", h.connection)
      assert.is_true(tail == "" or tail == nil)
    end

    it("rejects malformed and unsupported requests with the right status", function()
      local port, stop = server(function(req, body)
        return { body = assert(body:readall()) }
      end, { max_body = 100 })
      local H = "Host: x\r\n"
      local cases = {
        { "GARBAGE\r\n\r\n", 400 },
        { "GET /\r\n\r\n", 400 },
        { "GET  / HTTP/1.1\r\n" .. H .. "\r\n", 400 },
        { "GET / HTTP/1.1\r\nBad Header\r\n" .. H .. "\r\n", 400 },
        { "GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400 },
        { "GET / HTTP/1.1\r\n" .. H .. " folded\r\n\r\n", 400 },
        { "GET / HTTP/1.1\r\nX: a\0b\r\n" .. H .. "\r\n", 400 },
        { "GET / HTTP/1.1\r\nX: a\rb\r\n" .. H .. "\r\n", 400 },
        { "GET / HTTP/1.1\r\n\r\n", 400 },                      -- no Host
        { "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400 },
        { "GET / HTTP/2.0\r\n" .. H .. "\r\n", 505 },
        { "GET / HTTP/0.9\r\n" .. H .. "\r\n", 505 },
        { "GET / HTTP/1.1\r\n" .. H .. "Content-Length: 3\r\n"
          .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400 },
        { "POST / HTTP/1.1\r\n" .. H .. "Content-Length: 3\r\n"
          .. "Content-Length: 4\r\n\r\nabcd", 400 },
        { "POST / HTTP/1.1\r\n" .. H .. "Content-Length: 3, 4\r\n\r\nabcd", 400 },
        { "POST / HTTP/1.1\r\n" .. H .. "Content-Length: -1\r\n\r\n", 400 },
        { "POST / HTTP/1.1\r\n" .. H .. "Content-Length: 0x10\r\n\r\n", 400 },
        { "POST / HTTP/1.1\r\n" .. H .. "Transfer-Encoding: gzip\r\n\r\n", 501 },
        { "POST / HTTP/1.1\r\n" .. H .. "Transfer-Encoding: gzip, chunked\r\n\r\n", 501 },
        { "POST / HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n"
          .. "zz\r\nabc\r\n0\r\n\r\n", 400 },
        { "POST / HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n"
          .. "-1\r\nabc\r\n0\r\n\r\n", 400 },
        { "POST / HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n"
          .. "ffffffffffffffffffff\r\n", 400 },
        { "POST / HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n"
          .. "3\r\nabcX\r\n0\r\n\r\n", 400 },
        { "POST / HTTP/1.1\r\n" .. H .. "Content-Length: 101\r\n\r\n", 413 },
        { "POST / HTTP/1.1\r\n" .. H .. "Content-Length: 99999999999999999999999\r\n\r\n", 413 },
        { "POST / HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n"
          .. "64\r\n" .. ("x"):rep(100) .. "\r\n1\r\ny\r\n0\r\n\r\n", 413 },
        { "POST / HTTP/1.1\r\n" .. H .. "Expect: teapot\r\nContent-Length: 1\r\n\r\nx", 417 },
        { "GET / HTTP/1.1\r\n" .. H .. "X: " .. ("y"):rep(9000) .. "\r\n\r\n", 431 },
        { "GET /" .. ("y"):rep(9000) .. " HTTP/1.1\r\n" .. H .. "\r\n", 414 },
        { "GET / HTTP/1.1\r\n" .. H .. ("X: y\r\n"):rep(101) .. "\r\n", 431 },
      }
      for _, case in ipairs(cases) do expect_status(port, case[1], case[2]) end
      stop()
    end)

    it("answers 400 to a head cut by EOF, and closes quietly on nothing", function()
      local port, stop = server(hello)
      local c <close>, r = connect(port)
      assert(c:write("GET / HTTP/1.1\r\nHo"))
      assert(c:shutdown())
      assert.are.equal(400, (read_response(r)))
      c:close()
      local c2 <close>, r2 = connect(port)
      assert(c2:shutdown())
      assert.are.equal("", rest(r2))
      c2:close()
      stop()
    end)

    it("answers 500 to a handler error, logs its traceback, serves on", function()
      local port, stop, logs = server(function(req)
        if req.path == "/boom" then error("kaboom") end
        if req.path == "/bad" then return { status = 200, headers = { ["Bad Name"] = "x" } } end
        if req.path == "/nil" then return nil end
        return hello()
      end)
      for _, path in ipairs { "/boom", "/bad", "/nil" } do
        local status, h, _, tail = raw(port, "GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n")
        assert.are.equal(500, status)
        assert.are.equal("close", h.connection)
        assert.are.equal("", tail)
      end
      assert.are.equal(3, #logs)
      assert.truthy(logs[1]:find("kaboom", 1, true))
      assert.truthy(logs[1]:find("stack traceback", 1, true))
      assert.truthy(logs[2]:find("invalid header name", 1, true))
      assert.are.equal(200, (raw(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")))
      stop()
    end)

    it("aborts a streamed response whose source fails after the head", function()
      local port, stop, logs = server(function()
        local n = 0
        return { body = function()
          n = n + 1
          if n == 1 then return "first" end
          error("source broke")
        end }
      end)
      local c <close>, r = connect(port)
      assert(c:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
      local head = r:readuntil("\r\n\r\n")
      assert.truthy(head:find("chunked", 1, true))
      assert.are.equal("5\r\nfirst\r\n", r:read("a"))   -- no last chunk: cut
      assert.truthy(logs[1]:find("source broke", 1, true))
      c:close()
      stop()
    end)
  end)

  describe("timeouts", function()
    it("times out a slow head with 408 while serving others", function()
      local port, stop = server(hello, { header_timeout = 0.3 })
      local slow = {}
      for i = 1, 200 do
        local c = assert(so.connect("127.0.0.1", port))
        c:settimeout(5)
        assert(c:write("GET / HTTP/1.1\r\n"))
        slow[i] = c
      end
      local t0 = so.now()
      assert.are.equal(200, (raw(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")))
      assert.is_true(so.now() - t0 < 0.25)
      for i, c in ipairs(slow) do
        if i % 20 == 0 then c:write("X") end          -- trickling does not help
        local status = read_response(reader.new(c))
        assert.are.equal(408, status)
        c:close()
      end
      assert.is_true(so.now() - t0 < 2)
      stop()
    end)

    it("closes an idle keep-alive connection", function()
      local port, stop = server(hello, { keepalive_timeout = 0.2 })
      local c <close>, r = connect(port)
      assert(c:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert.are.equal(200, (read_response(r)))
      local t0 = so.now()
      assert.are.equal("", rest(r))
      assert.is_true(so.now() - t0 < 1)
      c:close()
      stop()
    end)
  end)

  describe("scripts/http_hello.lua with curl", function()
    local proc, base
    setup(function()
      proc = helper.start("scripts/http_hello.lua")
      base = "http://" .. proc.host .. ":" .. proc.port
    end)
    teardown(function() if proc then proc:stop() end end)

    local function curl(args)
      local code, out, err = helper.run("curl -sS --max-time 20 " .. args)
      assert.are.equal(0, code, err)
      return out, err
    end

    it("serves GET /, 404 and reuses the connection", function()
      local out = curl("-w '|%{http_code}|%{num_connects}\\n' " .. base .. "/ "
                       .. base .. "/nothing " .. base .. "/")
      assert.are.equal("hello world\n|200|1\nnot found\n|404|0\nhello world\n|200|0\n", out)
    end)

    it("answers HEAD with headers only", function()
      local out = curl("-I " .. base .. "/")
      assert.truthy(out:find("^HTTP/1.1 200 OK\r\n"))
      assert.truthy(out:find("\r\nContent%-Length: 12\r\n"))
      assert.truthy(out:find("\r\nDate: "))
    end)

    it("streams /stream chunked", function()
      local out = curl("-i " .. base .. "/stream")
      assert.truthy(out:find("\r\nTransfer%-Encoding: chunked\r\n"))
      assert.truthy(out:find("piece 1\npiece 2\npiece 3\npiece 4\npiece 5\n$"))
    end)

    it("echoes chunked uploads (curl -T -) and 100-continue uploads", function()
      local file = os.tmpname()
      assert(os.execute("head -c 3000000 /dev/urandom > " .. file))
      local _, sum = helper.run("md5sum < " .. file)
      local out = curl("-T - -X POST " .. base .. "/echo < " .. file .. " | md5sum")
      assert.are.equal(sum, out)
      local _, verbose = curl("-v -H 'Expect: 100-continue' --data-binary @" .. file
                              .. " " .. base .. "/echo -o /dev/null")
      assert.truthy(verbose:find("HTTP/1.1 100 Continue", 1, true))
      out = curl("-H 'Expect: 100-continue' --data-binary @" .. file .. " "
                 .. base .. "/echo | md5sum")
      assert.are.equal(sum, out)
      os.remove(file)
    end)

    it("echoes a 256 MB upload in bounded memory", function()
      local out = curl("-T - -X POST " .. base .. "/echo < /dev/null")
      assert.are.equal("", out)
      local idle = helper.rss(proc.pid)
      local code, size = helper.run("head -c 268435456 /dev/zero | curl -sS -T - "
        .. "-X POST " .. base .. "/echo | wc -c")
      assert.are.equal(0, code)
      assert.are.equal("268435456", size:match("%d+"))
      local f = assert(io.open("/proc/" .. proc.pid .. "/status"))
      local peak = tonumber(f:read("a"):match("VmHWM:%s*(%d+)")) * 1024
      f:close()
      -- growth, not the absolute figure: a sanitizer build starts larger
      assert.is_true(peak - idle < 16 * 1024 * 1024,
                     ("peak RSS %d, %d above idle"):format(peak, peak - idle))
    end)
  end)
end)
