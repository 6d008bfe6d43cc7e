-- Strict HTTP parsing in so.http, both directions: chunk-size lines per
-- RFC 9112 §7.1.1 and trailer lines (a proxy in front that reads chunk
-- boundaries differently must not be able to smuggle a request), request
-- targets over max_target (414), and handler mistakes (a bad status, a
-- header set twice under different cases). The client reads responses
-- with the same parser: the same inputs fail there too.
local so = require "so"
local http = require "so.http"
local pool = require "so.pool"
local reader = require "so.reader"
local helper = require "helper"

-- An in-process server; returns port, stop, logs (what opts.log got).
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

-- Sends raw bytes on a new conn and reads until the server closes it.
-- Returns everything it sent back.
local function exchange(port, data)
  local c <close> = assert(so.connect("127.0.0.1", port))
  c:settimeout(5)
  assert(c:write(data))
  local out = assert(reader.new(c):read("a", 1 << 20))
  return out
end

-- The status codes of the responses in `out`, in order.
local function statuses(out)
  local t = {}
  for code in out:gmatch("HTTP/1%.1 (%d%d%d) ") do t[#t + 1] = tonumber(code) end
  return t
end

-- The echo handler: the body read whole, sent back.
local function echo(req, body)
  return { body = assert(body:readall()) }
end

local CHUNKED = "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
-- A request that must never be answered: if it is, it was smuggled.
local SMUGGLED = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

describe("strict HTTP parsing", function()
  local snap
  before_each(function()
    pool.clear()
    snap = helper.snapshot()
  end)
  after_each(function()
    pool.clear()
    helper.assert_clean(snap)
  end)

  describe("chunk-size lines (RFC 9112 §7.1.1)", function()
    it("accept extensions: ';' name, '=' token or quoted-string, whitespace around ';' and '='",
       function()
      local port, stop = server(echo)
      for _, line in ipairs { ";a", ";a=b", ";a=b;c", ";a;b;c=d", " ;a", "\t;\ta",
                             "; a = b", ";a= \"quoted value\"", ";a=\"q\\\"e\"",
                             ";a=\"\"", ";a=\"\\\\\"", ";a=\"obs \200\255\"",
                             ";!#$%&'*+-.^_`|~09Az=!#$%&'*+-.^_`|~09Az" } do
        local out = exchange(port, CHUNKED .. "5" .. line .. "\r\nhello\r\n"
                             .. "0" .. line .. "\r\n\r\n"
                             .. "GET /next HTTP/1.1\r\nHost: x\r\n"
                             .. "Connection: close\r\n\r\n")
        assert.are.same({ 200, 200 }, statuses(out), ("%q"):format(line))
        assert.truthy(out:find("\r\n\r\nhello", 1, true))
      end
      stop()
    end)

    it("answer anything else with 400 and a close, never reading on", function()
      local port, stop = server(echo)
      local bad = {
        "5 ",              -- whitespace after the size, no extension
        "5\t",
        "5 \t ",
        "5;",              -- no name
        "5; ",
        "5;=b",
        "5;a ",            -- whitespace after the name, nothing after it
        "5;a=",            -- no value
        "5;a= ",
        "5;a=b ",
        "5;a=b c",
        "5;a b",
        "5;a=\"unterminated",
        "5;a=\"x\"y",
        "5;a=\"ctl\1\"",
        "5;a=\"\\\1\"",    -- quoted-pair of a control byte
        "5;a=b;",
        "5;a\rb",          -- bare CR
        "5\rX",
        "5;a\nb",          -- bare LF
        "5\n",
        "5;a\0",           -- NUL
        "5\0",
        "5;a\1",           -- other control bytes
        "5;a\127",
        "5;a\27",
        "5x",
        "x5",
        " 5",
        "+5",
        "0x5",
        "5;a,b",
        "5;a=b,c",
        "5;a:b",
        "5;a=@",
        "5;a=\"b\";c=(",
      }
      for _, line in ipairs(bad) do
        local out = exchange(port, CHUNKED .. line .. "\r\nhello\r\n0\r\n\r\n"
                             .. SMUGGLED)
        assert.are.same({ 400 }, statuses(out), ("%q"):format(line))
        assert.truthy(out:find("\r\nConnection: close\r\n", 1, true))
        assert.falsy(out:find("smuggled", 1, true))
      end
      stop()
    end)

    it("reject a bad last-chunk line and bad trailer lines", function()
      local port, stop = server(echo)
      local bad = {
        "0 \r\n\r\n",
        "0;\r\n\r\n",
        "0\r\nX: a\1b\r\n\r\n",     -- control byte in a trailer
        "0\r\nX: a\0b\r\n\r\n",
        "0\r\nX: a\rb\r\n\r\n",     -- bare CR
        "0\r\nX: a\nb\r\n\r\n",     -- bare LF
        "0\r\nX: a\127\r\n\r\n",
        "0\r\nX : a\r\n\r\n",       -- space before the colon
        "0\r\n folded\r\n\r\n",     -- obs-fold
        "0\r\nno colon\r\n\r\n",
        "0\r\n\1X: a\r\n\r\n",
      }
      for _, tail in ipairs(bad) do
        local out = exchange(port, CHUNKED .. "5\r\nhello\r\n" .. tail .. SMUGGLED)
        assert.are.same({ 400 }, statuses(out), ("%q"):format(tail))
        assert.falsy(out:find("smuggled", 1, true))
      end
      -- Good trailers pass.
      local out = exchange(port, CHUNKED .. "5\r\nhello\r\n0\r\nX-A: 1\r\n"
                           .. "X-B:\t two words \r\n\r\n"
                           .. "GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      assert.are.same({ 200, 200 }, statuses(out))
      stop()
    end)

    it("do not let a bare LF hide a request inside a chunk", function()
      -- A proxy that ends the chunk-size line at the LF sees a 2-byte chunk
      -- then a request; a lax parser sees one extension and a 0x45-byte
      -- chunk swallowing it. Either reading is refused.
      local port, stop = server(echo)
      local inner = "0\r\n\r\n" .. SMUGGLED
      local out = exchange(port, CHUNKED .. "2;x\n" .. string.format("%x", #inner)
                           .. "\r\nab\r\n" .. inner .. "\r\n0\r\n\r\n")
      assert.are.same({ 400 }, statuses(out))
      assert.falsy(out:find("smuggled", 1, true))
      stop()
    end)
  end)

  describe("the same rules for responses (the client)", function()
    local function reply_with(data)
      local l, _, port = helper.server(function(c)
        c:settimeout(5)
        local r = reader.new(c)
        if r:readuntil("\r\n\r\n") then c:write(data) end
        c:close()
      end)
      return port, function() l:close() end
    end
    local H = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    it("reads valid extensions and trailers", function()
      local port, stop = reply_with(H .. "5 ; a = \"b c\";d\r\nhello\r\n"
                                    .. "0;e=f\r\nX-T: ok\r\n\r\n")
      local status, body = http.get("http://127.0.0.1:" .. port .. "/")
      assert.are.equal(200, status)
      assert.are.equal("hello", body)
      stop()
    end)

    it("fails on a bad chunk-size line or trailer with EPROTO, pooling nothing",
       function()
      for _, tail in ipairs { "5 \r\nhello\r\n0\r\n\r\n", "5;a\nb\r\nhello\r\n0\r\n\r\n",
                              "5;a\0\r\nhello\r\n0\r\n\r\n", "5;\r\nhello\r\n0\r\n\r\n",
                              "5\r\nhello\r\n0\r\nX: \1\r\n\r\n" } do
        local port, stop = reply_with(H .. tail)
        local status, err, name = http.get("http://127.0.0.1:" .. port .. "/")
        assert.is_nil(status, ("%q"):format(tail))
        assert.are.equal("EPROTO", name)
        assert.matches("^EPROTO: bad ", err)
        assert.are.equal(0, pool.count())
        stop()
      end
    end)
  end)

  describe("request targets", function()
    it("answer 414 to a target over max_target (default 8 KiB), 431 to a long head",
       function()
      local port, stop = server(function(req) return req.path:sub(1, 10) end)
      local long = "/" .. ("t"):rep(9000)
      local out = exchange(port, "GET " .. long .. " HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.are.same({ 414 }, statuses(out))
      assert.truthy(out:find("URI Too Long", 1, true))
      -- A request line still coming, already longer than max_head: 414.
      do
        local c <close> = assert(so.connect("127.0.0.1", port))
        c:settimeout(5)
        assert(c:write("GET /" .. ("t"):rep(20000)))
        assert.are.same({ 414 }, statuses(assert(reader.new(c):read("a"))))
      end
      -- A target that fits, with headers that do not: 431.
      out = exchange(port, "GET /" .. ("t"):rep(4000) .. " HTTP/1.1\r\nHost: x\r\n"
                     .. "X-Big: " .. ("h"):rep(5000) .. "\r\n\r\n")
      assert.are.same({ 431 }, statuses(out))
      -- Still served.
      out = exchange(port, "GET /" .. ("t"):rep(8000) .. " HTTP/1.1\r\nHost: x\r\n"
                     .. "Connection: close\r\n\r\n")
      assert.are.same({ 200 }, statuses(out))
      stop()
    end)

    it("hold each server to its own max_target, even for a head another cached",
       function()
      local port1, stop1 = server(function() return "one" end)
      local port2, stop2 = server(function() return "two" end,
                                  { max_target = 100 })
      local req = "GET /" .. ("t"):rep(150) .. " HTTP/1.1\r\nHost: x\r\n"
                  .. "Connection: close\r\n\r\n"
      for _ = 1, 2 do
        assert.are.same({ 200 }, statuses(exchange(port1, req)))
        assert.are.same({ 414 }, statuses(exchange(port2, req)))
      end
      local short = "GET /" .. ("t"):rep(99) .. " HTTP/1.1\r\nHost: x\r\n"
                    .. "Connection: close\r\n\r\n"
      assert.are.same({ 200 }, statuses(exchange(port2, short)))
      stop1()
      stop2()
    end)
  end)

  describe("handler mistakes", function()
    it("answer a string status or one outside 100-599 with 500 and a log line naming it",
       function()
      local cases = {
        ["/string"] = { { status = "200", body = "x" }, '"200"' },
        ["/600"] = { { status = 600 }, "600" },
        ["/99"] = { { status = 99 }, "99" },
        ["/float"] = { { status = 200.5 }, "200.5" },
        ["/bool"] = { { status = true }, "true" },
        ["/results"] = { { "404", { ["X-A"] = "b" }, "body" }, '"404"' },
      }
      local port, stop, logs = server(function(req)
        local c = cases[req.path]
        if c[1].status ~= nil then return c[1] end
        return table.unpack(c[1], 1, 3)
      end)
      for path, c in pairs(cases) do
        local before = #logs
        local out = exchange(port, "GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n")
        assert.are.same({ 500 }, statuses(out), path)
        assert.are.equal(before + 1, #logs, path)
        local line = logs[#logs]
        assert.truthy(line:find("invalid status " .. c[2], 1, true), line)
        assert.truthy(line:find("100-599", 1, true), line)
      end
      -- The bounds themselves are fine.
      local port2, stop2 = server(function(req)
        return { status = tonumber(req.path:sub(2)) }
      end)
      for _, code in ipairs { 100, 200, 599 } do
        local out = exchange(port2, "GET /" .. code .. " HTTP/1.1\r\nHost: x\r\n"
                             .. "Connection: close\r\n\r\n")
        assert.are.equal(code, statuses(out)[1])
      end
      stop()
      stop2()
    end)

    it("send a header set under several cases once, with the canonical key's value",
       function()
      local port, stop = server(function(req)
        if req.path == "/canonical" then
          return { headers = { ["content-type"] = "text/lower",
                               ["Content-Type"] = "text/canonical",
                               ["CONTENT-TYPE"] = "text/upper",
                               ["x-one"] = "single" }, body = "a" }
        elseif req.path == "/none" then
          -- No canonical spelling: the least in byte order wins.
          return { headers = { ["x-tWo"] = "lower", ["X-TWO"] = "upper" },
                   body = "b" }
        elseif req.path == "/length" then
          return { headers = { ["content-length"] = 5, ["Content-Length"] = 3 },
                   body = (function()
                     local done
                     return function() if not done then done = true; return "abc" end end
                   end)() }
        end
      end)
      local function head_of(path)
        local out = exchange(port, "GET " .. path .. " HTTP/1.1\r\nHost: x\r\n"
                             .. "Connection: close\r\n\r\n")
        return out:match("^(.-\r\n\r\n)"), out
      end
      for _ = 1, 2 do                                -- cached or not
        local head = head_of("/canonical")
        local n = 0
        for _ in head:lower():gmatch("\r\ncontent%-type:") do n = n + 1 end
        assert.are.equal(1, n, head)
        assert.truthy(head:find("\r\nContent-Type: text/canonical\r\n", 1, true), head)
        assert.truthy(head:find("\r\nx-one: single\r\n", 1, true), head)
        head = head_of("/none")
        n = 0
        for _ in head:lower():gmatch("\r\nx%-two:") do n = n + 1 end
        assert.are.equal(1, n, head)
        assert.truthy(head:find("\r\nX-TWO: upper\r\n", 1, true), head)
      end
      local head, out = head_of("/length")
      assert.truthy(head:find("\r\nContent-Length: 3\r\n", 1, true), head)
      assert.truthy(out:find("\r\n\r\nabc$"), out)
      stop()
    end)
  end)
end)
