-- so.websocket (RFC 6455): the frame layer, our client against our server,
-- Debian's python3-websockets as client and as server, raw sockets for
-- protocol violations (both directions), scripts/ws_echo.lua, wss://.
local so = require "so"
local http = require "so.http"
local tls = require "so.tls"
local reader = require "so.reader"
local ws = require "so.websocket"
local helper = require "helper"

local char, pack, unpack = string.char, string.pack, string.unpack

-- The python3 that has websockets (Debian's; a pyenv one may not).
local PY
for _, py in ipairs { "/usr/bin/python3", "python3" } do
  if helper.run(py .. " -c 'import websockets' >/dev/null") == 0 then
    PY = py
    break
  end
end
local function need_python()
  assert(PY, "python3-websockets is missing: apt-get install python3-websockets")
end

-- Writes a Python script to a temporary file; its path.
local function py_file(source)
  local path = os.tmpname() .. ".py"
  local f = assert(io.open(path, "w"))
  f:write(source)
  f:close()
  return path
end

-- Masking, the slow and obvious way: what the fast one must equal.
local function slow_mask(s, key)
  local t = {}
  for i = 1, #s do
    t[i] = char(s:byte(i) ~ key:byte((i - 1) % 4 + 1))
  end
  return table.concat(t)
end

-- A client frame (masked with `key`), first byte b1.
local function cframe(b1, payload, key)
  key = key or "\55\250\33\61"
  local len = #payload
  local hdr
  if len < 126 then hdr = char(b1, 0x80 | len)
  elseif len < 65536 then hdr = pack(">BBI2", b1, 0xFE, len)
  else hdr = pack(">BBI8", b1, 0xFF, len) end
  return hdr .. key .. slow_mask(payload, key)
end

-- A server frame (unmasked).
local function sframe(b1, payload)
  local len = #payload
  if len < 126 then return char(b1, len) .. payload end
  if len < 65536 then return pack(">BBI2", b1, 126, len) .. payload end
  return pack(">BBI8", b1, 127, len) .. payload
end

-- Reads one frame from a so.reader: b1, payload (unmasked), masked.
local function read_frame(r)
  local h = assert(r:read(2))
  local b1, b2 = h:byte(1, 2)
  local len = b2 & 0x7f
  if len == 126 then len = unpack(">I2", assert(r:read(2)))
  elseif len == 127 then len = unpack(">I8", assert(r:read(8))) end
  local key = b2 >= 0x80 and assert(r:read(4))
  local payload = assert(r:read(len))
  if key then payload = slow_mask(payload, key) end
  return b1, payload, key and true or false, key
end

-- Reads a close frame and the EOF after it: the code (and reason).
local function read_close(r)
  local b1, payload = read_frame(r)
  assert.are.equal(0x88, b1, "a close frame expected")
  local code = #payload >= 2 and unpack(">I2", payload) or nil
  local rest, err = r:read("a")
  assert(rest == "" or err, "EOF expected after the close frame")
  return code, payload:sub(3)
end

local HANDSHAKE = "GET %s HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
  .. "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
  .. "Sec-WebSocket-Version: 13\r\n\r\n"

-- A raw connection that has done the opening handshake: conn, reader.
local function raw_client(port, path)
  local c = assert(so.connect("127.0.0.1", port))
  c:settimeout(5)
  local r = reader.new(c)
  assert(c:write(HANDSHAKE:format(path or "/")))
  local head = assert(r:readuntil("\r\n\r\n", { inclusive = true }))
  assert(head:match("^HTTP/1.1 101 "), head)
  assert(head:find("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n",
                   1, true), head)
  return c, r
end

-- A raw HTTP request: status and head.
local function raw_request(port, request)
  local c <close> = assert(so.connect("127.0.0.1", port))
  c:settimeout(5)
  local r = reader.new(c)
  assert(c:write(request))
  local head = assert(r:readuntil("\r\n\r\n", { inclusive = true }))
  return tonumber(head:match("^HTTP/1.1 (%d+)")), head
end

-- An so.http server whose websockets run session(sock, req). Returns
-- server, port; server:close() ends it.
local function ws_server(session, opts, http_opts)
  local srv = assert(http.listen("127.0.0.1", 0, function(req, body)
    local sock, res = ws.upgrade(req, body, opts)
    if not sock then return res end
    session(sock, req)
  end, http_opts))
  so.spawn(function() srv:serve() end)
  local _, port = srv:sockname()
  return srv, port
end

local function echo(sock)
  while true do
    local data, kind = sock:receive()
    if not data then break end
    if not sock:send(data, kind) then break end
  end
  sock:close()
end

-- A raw server that runs fn(conn, reader, key) after reading a request
-- head; key is its Sec-WebSocket-Key. Returns listener, port.
local function raw_server(fn)
  local l, _, port = helper.server(function(conn)
    local c <close> = conn
    c:settimeout(5)
    local r = reader.new(c)
    local head = r:readuntil("\r\n\r\n", { inclusive = true })
    if not head then return end
    fn(c, r, head:match("\r\n[Ss]ec%-[Ww]eb[Ss]ocket%-[Kk]ey: ([^\r\n]+)"),
       head)
  end)
  return l, port
end

local function switching(key, extra)
  return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    .. "Connection: Upgrade\r\nSec-WebSocket-Accept: " .. ws.accept_key(key)
    .. "\r\n" .. (extra or "") .. "\r\n"
end

describe("so.websocket", function()
  local snap
  before_each(function() snap = helper.snapshot() end)
  after_each(function() helper.assert_clean(snap) end)

  describe("pieces", function()
    it("computes SHA-1, base64 and Sec-WebSocket-Accept", function()
      local function hex(s)
        return (s:gsub(".", function(ch) return ("%02x"):format(ch:byte()) end))
      end
      assert.are.equal("a9993e364706816aba3e25717850c26c9cd0d89d",
                       hex(ws.sha1("abc")))
      assert.are.equal("da39a3ee5e6b4b0d3255bfef95601890afd80709",
                       hex(ws.sha1("")))
      assert.are.equal("84983e441c3bd26ebaae4aa1f95129e5e54670f1",
        hex(ws.sha1("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")))
      assert.are.equal("34aa973cd4c4daa4f61eeb2bdbad27316534016f",
                       hex(ws.sha1(("a"):rep(1000000))))
      assert.are.same({ "", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==" },
        { ws.base64(""), ws.base64("f"), ws.base64("fo"), ws.base64("foo"),
          ws.base64("foob") })
      -- RFC 6455 section 1.3
      assert.are.equal("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
                       ws.accept_key("dGhlIHNhbXBsZSBub25jZQ=="))
    end)

    it("masks every length and alignment as the byte-by-byte way does", function()
      local rnd = {}
      for i = 1, 3000 do rnd[i] = char(math.random(0, 255)) end
      rnd = table.concat(rnd)
      local key = "\1\128\255\77"
      for _, n in ipairs { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 63, 64,
                           65, 125, 126, 511, 512, 513, 1023, 1024, 1031,
                           2999, 3000 } do
        local s = rnd:sub(1, n)
        assert.are.equal(slow_mask(s, key), ws.mask(s, key), "length " .. n)
        assert.are.equal(s, ws.mask(ws.mask(s, key), key))
      end
    end)
  end)

  describe("our client and our server", function()
    it("echo text and binary messages of every length class", function()
      local srv <close>, port = ws_server(echo)
      local s <close> = assert(ws.connect("ws://127.0.0.1:" .. port .. "/",
                                          { timeout = 5 }))
      local big = {}
      for i = 1, 70000 do big[i] = char(i % 256) end
      big = table.concat(big)
      for _, m in ipairs { "", "a", ("é"):rep(62) .. "x", ("x"):rep(126),
                           ("y"):rep(65535), ("z"):rep(65536),
                           ("€"):rep(400000) } do
        assert.is_true(s:send(m))
        local data, kind = s:receive()
        assert.are.equal("text", kind)
        assert(data == m, "text of " .. #m .. " bytes")
      end
      for _, m in ipairs { "", "\0", big, big:rep(20) } do
        assert.is_true(s:send(m, "binary"))
        local data, kind = s:receive()
        assert.are.equal("binary", kind)
        assert(data == m, "binary of " .. #m .. " bytes")
      end
    end)

    it("negotiates a subprotocol in the server's order", function()
      local got = {}
      local srv <close>, port = ws_server(function(sock)
        got[#got + 1] = sock.protocol or "none"
        echo(sock)
      end, { protocols = { "v2.chat", "v1.chat" } })
      local url = "ws://127.0.0.1:" .. port .. "/"
      local a = assert(ws.connect(url, { protocols = { "v1.chat", "v2.chat" } }))
      assert.are.equal("v2.chat", a.protocol)
      a:close()
      local b = assert(ws.connect(url, { protocols = { "v1.chat", "x" } }))
      assert.are.equal("v1.chat", b.protocol)
      b:close()
      local c = assert(ws.connect(url))
      assert.is_nil(c.protocol)
      c:close()
      assert(helper.wait_until(function() return #got == 3 end))
      assert.are.same({ "v2.chat", "v1.chat", "none" }, got)
    end)

    it("answers a bad handshake with 400 or 426 and serves the next", function()
      local srv <close>, port = ws_server(echo)
      local function req(lines)
        return raw_request(port, "GET / HTTP/1.1\r\nHost: x\r\n" .. lines
                                 .. "\r\n")
      end
      local ok = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
      local key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
      local v13 = "Sec-WebSocket-Version: 13\r\n"
      local status, head = req("")
      assert.are.equal(426, status)
      assert.truthy(head:find("\r\nSec-WebSocket-Version: 13\r\n", 1, true))
      assert.truthy(head:find("\r\nUpgrade: websocket\r\n", 1, true))
      status, head = req(ok .. key .. "Sec-WebSocket-Version: 8\r\n")
      assert.are.equal(426, status)
      assert.truthy(head:find("\r\nSec-WebSocket-Version: 13\r\n", 1, true))
      assert.are.equal(426, (req("Upgrade: websocket\r\n" .. key .. v13)))
      assert.are.equal(426, (req("Connection: Upgrade\r\n" .. key .. v13)))
      assert.are.equal(400, (req(ok .. v13)))
      assert.are.equal(400, (req(ok .. v13 .. "Sec-WebSocket-Key: short==\r\n")))
      assert.are.equal(400, (req(ok .. v13
        .. "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=!\r\n")))
      assert.are.equal(400, (raw_request(port, "POST / HTTP/1.1\r\nHost: x\r\n"
        .. ok .. key .. v13 .. "Content-Length: 0\r\n\r\n")))
      assert.are.equal(400, (raw_request(port, "GET / HTTP/1.0\r\n"
        .. ok .. key .. v13 .. "\r\n")))
      -- Several tokens, odd case: fine.
      local c <close>, r = raw_client(port)
      assert(c:write(cframe(0x81, "still fine")))
      local b1, payload = read_frame(r)
      assert.are.equal(0x81, b1)
      assert.are.equal("still fine", payload)
      assert.are.equal(101, (req("Upgrade: WebSocket\r\nConnection: keep-alive, "
        .. "UPGRADE\r\n" .. key .. v13)))
    end)

    it("joins fragments, answers pings inside receive, drops pongs", function()
      local srv <close>, port = ws_server(echo)
      local c <close>, r = raw_client(port)
      -- "café" split inside the é, a ping between the fragments.
      assert(c:write(cframe(0x01, "caf\xc3") .. cframe(0x89, "p1")
                     .. cframe(0x00, "\xa9") .. cframe(0x8A, "unasked pong")
                     .. cframe(0x00, "") .. cframe(0x80, "!")))
      b1, payload = read_frame(r)
      assert.are.same({ 0x8A, "p1" }, { b1, payload })
      b1, payload = read_frame(r)
      assert.are.same({ 0x81, "café!" }, { b1, payload })
      assert(c:write(cframe(0x02, "\0\1") .. cframe(0x80, "\2")))
      b1, payload = read_frame(r)
      assert.are.same({ 0x82, "\0\1\2" }, { b1, payload })
      -- Frames sent with the request, before the 101, are not lost.
      local c2 <close> = assert(so.connect("127.0.0.1", port))
      c2:settimeout(5)
      local r2 = reader.new(c2)
      assert(c2:write(HANDSHAKE:format("/") .. cframe(0x81, "early")
                      .. cframe(0x81, "bird")))
      assert(r2:readuntil("\r\n\r\n"))
      local b1, payload = read_frame(r2)
      assert.are.same({ 0x81, "early" }, { b1, payload })
      b1, payload = read_frame(r2)
      assert.are.same({ 0x81, "bird" }, { b1, payload })
      -- Our ping: the server's pong is swallowed by our receive.
      local s <close> = assert(ws.connect("ws://127.0.0.1:" .. port .. "/"))
      s:settimeout(5)
      assert.is_true(s:ping("are you there"))
      assert.is_true(s:send("after the ping"))
      assert.are.equal("after the ping", s:receive())
      assert.are.equal("are you there", s.pong)
      assert.has_error(function() s:ping(("x"):rep(126)) end)
    end)

    it("closes with codes both ways; calls after the close say so", function()
      local got = {}
      local srv <close>, port = ws_server(function(sock, req)
        if req.path == "/server-closes" then
          sock:close(4000, "server says bye")
          got[#got + 1] = { sock:receive() }
          return
        end
        local _, msg, name = sock:receive()
        got[#got + 1] = { msg, name, sock.close_code, sock.close_reason }
        sock:close()
      end)
      local url = "ws://127.0.0.1:" .. port
      local s = assert(ws.connect(url .. "/", { timeout = 5 }))
      assert.is_true(s:close(4001, "client says bye"))
      assert.is_true(s:close())            -- again: nothing more
      assert.are.same({ nil, "ECLOSED: closed (4001 client says bye)",
                        "ECLOSED" }, { s:receive() })
      assert.are.same({ nil, "ECLOSED: closed (4001 client says bye)",
                        "ECLOSED" }, { s:send("late") })
      assert(helper.wait_until(function() return #got == 1 end))
      assert.are.same({ "ECLOSED: peer closed (4001 client says bye)",
                        "ECLOSED", 4001, "client says bye" }, got[1])
      s = assert(ws.connect(url .. "/server-closes", { timeout = 5 }))
      assert.are.same({ nil, "ECLOSED: peer closed (4000 server says bye)",
                        "ECLOSED" }, { s:receive() })
      assert.are.equal(4000, s.close_code)
      assert.are.same({ nil, "ECLOSED: peer closed (4000 server says bye)",
                        "ECLOSED" }, { s:ping() })
      assert(helper.wait_until(function() return #got == 2 end))
      assert.are.same({ nil, "ECLOSED: closed (4000 server says bye)",
                        "ECLOSED" }, got[2])
      -- Misuse raises.
      local t = assert(ws.connect(url .. "/"))
      assert.has_error(function() t:close(1005) end)
      assert.has_error(function() t:close(1000, ("x"):rep(124)) end)
      assert.has_error(function() t:send("\xff") end)
      assert.has_error(function() t:send("x", "bytes") end)
      assert.has_error(function() t:send({}) end)
      assert.has_error(function() ws.connect("http://127.0.0.1/") end)
      do local _ <close> = t end           -- a <close> variable closes it
      assert(helper.wait_until(function() return #got == 3 end))
      assert.are.equal("ECLOSED: peer closed (1000)", got[3][1])
    end)

    it("lets another task close while one receives", function()
      local got
      local srv <close>, port = ws_server(function(sock)
        local _, msg = sock:receive()
        got = msg
        sock:close()
      end)
      local s = assert(ws.connect("ws://127.0.0.1:" .. port .. "/"))
      s:settimeout(5)
      local t = so.spawn(function() return s:receive() end)
      assert.error_matches(function() s:receive() end,
                           "already being read by another task")
      assert.is_true(s:close(4002, "from elsewhere"))
      assert.are.same({ nil, "ECLOSED: closed (4002 from elsewhere)",
                        "ECLOSED" }, { helper.join(t) })
      assert(helper.wait_until(function() return got ~= nil end))
      assert.are.equal("ECLOSED: peer closed (4002 from elsewhere)", got)
    end)

    it("can be read again after a task cancelled in receive", function()
      local srv <close>, port = ws_server(echo)
      local s <close> = assert(ws.connect("ws://127.0.0.1:" .. port .. "/"))
      s:settimeout(5)
      local t = so.spawn(function() return s:receive() end)
      so.sleep(0.05)
      assert.is_true(so.cancel(t))
      assert(s:send("after the cancel"))
      assert.are.equal("after the cancel", s:receive())
    end)

    -- so.http's hijack (req.hijacked, set by ws.upgrade): nothing is
    -- written after the handler, and the connection is closed.
    it("a handler returning with its websocket open: nothing more is written",
       function()
      local logged = {}
      local srv <close>, port = ws_server(function(sock)
        sock:send("one message, then the handler returns")
      end, nil, { log = function(msg) logged[#logged + 1] = msg end })
      local s <close> = assert(ws.connect("ws://127.0.0.1:" .. port .. "/",
                                          { timeout = 5 }))
      assert.are.equal("one message, then the handler returns", s:receive())
      assert.are.same({ nil,
        "ECLOSED: connection closed without a close frame (1006)", "ECLOSED" },
        { s:receive() })
      assert.are.same({}, logged)
    end)

    it("fails a message over max_message with 1009, fragmented or not", function()
      local got = {}
      local srv <close>, port = ws_server(function(sock)
        local data, msg, name = sock:receive()
        got[#got + 1] = { data, msg, name }
        sock:close()
      end, { max_message = 1000 })
      local s <close> = assert(ws.connect("ws://127.0.0.1:" .. port .. "/",
                                          { timeout = 5 }))
      assert(s:send(("x"):rep(1000)))
      assert(helper.wait_until(function() return #got == 1 end))
      assert.are.equal(("x"):rep(1000), got[1][1])
      local c <close>, r = raw_client(port)
      assert(c:write(cframe(0x02, ("a"):rep(600)) .. cframe(0x80, ("b"):rep(401))))
      assert.are.equal(1009, read_close(r))
      assert(helper.wait_until(function() return #got == 2 end))
      assert.are.same({ nil, "EMSGSIZE: message too big (1009)", "EMSGSIZE" },
                      got[2])
      -- The client's limit: a server sending more is failed with 1009.
      local seen
      local l <close>, p2 = raw_server(function(conn, rr, key)
        assert(conn:write(switching(key) .. sframe(0x82, ("z"):rep(2000))))
        local b1, payload, masked = read_frame(rr)
        seen = { b1, unpack(">I2", payload), masked }
      end)
      local t <close> = assert(ws.connect("ws://127.0.0.1:" .. p2 .. "/",
                                          { max_message = 1999, timeout = 5 }))
      assert.are.same({ nil, "EMSGSIZE: message too big (1009)", "EMSGSIZE" },
                      { t:receive() })
      assert(helper.wait_until(function() return seen end))
      assert.are.same({ 0x88, 1009, true }, seen)
    end)

    it("keeps a partial frame across a receive timeout", function()
      local go = so.channel()
      local l <close>, port = raw_server(function(conn, r, key)
        local frame = sframe(0x81, ("ü"):rep(100))
        -- The 101 and the first frame in one write; then half a frame.
        assert(conn:write(switching(key) .. sframe(0x81, "first")
                          .. frame:sub(1, 101)))
        go:recv()
        assert(conn:write(frame:sub(102)))
        read_frame(r)
      end)
      local s <close> = assert(ws.connect("ws://127.0.0.1:" .. port .. "/"))
      s:settimeout(0.2)
      assert.are.equal("first", s:receive())
      assert.are.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                      { s:receive() })
      go:send(true)
      assert.are.equal(("ü"):rep(100), s:receive())
    end)

    it("holds a sender back while the peer does not receive", function()
      local go = so.channel()
      local received = 0
      local srv <close>, port = ws_server(function(sock)
        go:recv()
        while true do
          local data = sock:receive()
          if not data then break end
          received = received + #data
        end
      end)
      local s = assert(ws.connect("ws://127.0.0.1:" .. port .. "/"))
      s:settimeout(10)
      local chunk = ("x"):rep(4 * 1024 * 1024)
      local sender = so.spawn(function()
        for _ = 1, 8 do assert(s:send(chunk, "binary")) end
        return true
      end)
      so.sleep(0.3)
      local waiting
      for _, t in ipairs(so.tasks()) do
        if t.id == sender.id then waiting = t.waiting end
      end
      assert.truthy(waiting and waiting:match("^write"),
                    "the sender should wait in write, not " .. tostring(waiting))
      assert(received == 0)
      go:send(true)
      assert.is_true(helper.join(sender))
      s:close()
      assert(helper.wait_until(function() return received == 8 * #chunk end))
    end)

    it("fails frames a client must not get, and a bad 101", function()
      local cases = {
        { sframe(0x81, "ok") .. char(0x81, 0x82, 1, 2, 3, 4, 5, 6), 1002,
          "EPROTO: masked frame from the server (1002)" },
        { sframe(0x81, "\xe2\x82"), 1007,
          "EPROTO: text message is not UTF-8 (1007)" },
        { sframe(0x8F, ""), 1002, "EPROTO: bad opcode 15 (1002)" },
      }
      for _, case in ipairs(cases) do
        local seen
        local l <close>, port = raw_server(function(conn, r, key)
          assert(conn:write(switching(key) .. case[1]))
          local b1, payload, masked = read_frame(r)
          seen = { b1, unpack(">I2", payload), masked }
        end)
        local s = assert(ws.connect("ws://127.0.0.1:" .. port .. "/",
                                    { timeout = 5 }))
        if case[2] == 1002 and case[1]:sub(1, 1) == "\x81" then
          assert.are.equal("ok", s:receive())
        end
        assert.are.same({ nil, case[3], "EPROTO" }, { s:receive() })
        assert(helper.wait_until(function() return seen end))
        assert.are.same({ 0x88, case[2], true }, seen)
      end
      local replies = {
        ["EHANDSHAKE: server answered 404 Not Found"] = function()
          return "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        end,
        ["EHANDSHAKE: bad Sec-WebSocket-Accept"] = function()
          return switching("dGhlIHNhbXBsZSBub25jZQ==")
        end,
        ["EHANDSHAKE: subprotocol other was not offered"] = function(key)
          return switching(key, "Sec-WebSocket-Protocol: other\r\n")
        end,
        ["EHANDSHAKE: extensions that were not offered"] = function(key)
          return switching(key, "Sec-WebSocket-Extensions: permessage-deflate\r\n")
        end,
        ["EHANDSHAKE: connection closed before the response"] = function()
          return ""
        end,
      }
      for want, reply in pairs(replies) do
        local l <close>, port = raw_server(function(conn, _, key)
          conn:write(reply(key))
        end)
        assert.are.same({ nil, want, "EHANDSHAKE" },
          { ws.connect("ws://127.0.0.1:" .. port .. "/", { timeout = 5 }) })
      end
      local _, _, name = ws.connect("ws://127.0.0.1:1/")
      assert.are.equal("ECONNREFUSED", name)
      -- A server that never answers: opts.timeout bounds the handshake.
      local l <close>, port = raw_server(function(_, r) r:read("a") end)
      local t0 = so.now()
      assert.are.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
        { ws.connect("ws://127.0.0.1:" .. port .. "/", { timeout = 0.2 }) })
      assert(so.now() - t0 < 1)
      assert.error_matches(function()
        ws.connect("ws://127.0.0.1:" .. port .. "/",
                   { headers = { ["X-A"] = "a\r\nX-B: b" } })
      end, "bad value of header X%-A")
    end)

    it("sends the request a server expects", function()
      local head, frames = nil, {}
      local l <close>, port = raw_server(function(conn, r, key, h)
        head = h
        conn:write(switching(key))
        repeat
          local b1, payload, _, mkey = read_frame(r)
          frames[#frames + 1] = { b1, payload, mkey }
        until b1 == 0x88
      end)
      local s <close> = assert(ws.connect(
        "ws://127.0.0.1:" .. port .. "/chat/room?x=1#frag",
        { headers = { Origin = "http://example.com" }, protocols = { "a", "b" },
          timeout = 5 }))
      assert.is_nil(s.protocol)
      -- Every frame masked, each with a key of its own.
      for i = 1, 20 do assert(s:send("m" .. i)) end
      s:close()
      assert.are.equal(21, #frames)
      local keys = {}
      for i, f in ipairs(frames) do
        assert.is_string(f[3], "frame " .. i .. " is not masked")
        assert.is_nil(keys[f[3]], "a masking key used twice")
        keys[f[3]] = true
        if i <= 20 then assert.are.same({ 0x81, "m" .. i }, { f[1], f[2] }) end
      end
      local lines = {}
      for line in head:gmatch("([^\r\n]+)\r\n") do lines[line] = true end
      assert.truthy(lines["GET /chat/room?x=1 HTTP/1.1"], head)
      assert.truthy(lines["Host: 127.0.0.1:" .. port], head)
      assert.truthy(lines["Upgrade: websocket"], head)
      assert.truthy(lines["Connection: Upgrade"], head)
      assert.truthy(lines["Sec-WebSocket-Version: 13"], head)
      assert.truthy(lines["Sec-WebSocket-Protocol: a, b"], head)
      assert.truthy(lines["Origin: http://example.com"], head)
      local key = head:match("Sec%-WebSocket%-Key: ([^\r\n]+)")
      assert.are.equal(24, #key)
      assert.truthy(key:match("^[%w+/]+==$"))
    end)
  end)

  describe("with python3-websockets", function()
    local SERVER = [[
import asyncio, http, os, sys, websockets
async def handler(ws, path=None):
    path = ws.path
    if path == "/echo":
        async for m in ws:
            await ws.send(m)
    elif path == "/frag":
        await ws.send(["hel", "lo ", "wörld"])
        await ws.send([b"\x00\x01", b"\x02"])
        await ws.recv()
    elif path == "/close":
        await ws.close(4001, "bye now")
    elif path == "/ping":
        pong = await ws.ping(b"abc")
        await asyncio.wait_for(pong, 5)
        await ws.send("pong ok")
        await ws.recv()
    elif path == "/proto":
        await ws.send(str(ws.subprotocol))
        await ws.recv()
    elif path == "/big":
        await ws.send(b"z" * 2000000)
        try:
            await ws.recv()
        except websockets.ConnectionClosed as e:
            print("big closed", e.rcvd.code, flush=True)
    elif path == "/wait":
        try:
            await ws.recv()
        except websockets.ConnectionClosed as e:
            print("wait closed", e.rcvd.code, e.rcvd.reason, flush=True)
async def process_request(path, headers):
    if path == "/reject":
        return http.HTTPStatus.FORBIDDEN, [], b"no\n"
async def main():
    async with websockets.serve(handler, "127.0.0.1", 0, max_size=2**25,
                                ping_interval=None, subprotocols=["chat", "superchat"],
                                process_request=process_request) as server:
        print("pid", os.getpid(), flush=True)
        print("listening on 127.0.0.1:%d" % server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
]]
    local CLIENT = [[
import asyncio, sys, websockets
async def main():
    uri, mode = sys.argv[1], sys.argv[2]
    if mode == "echo":
        async with websockets.connect(uri, max_size=2**25) as ws:
            msgs = ["hello", "", "x" * 125, "y" * 126, "é" * 40000, b"\x00\xff",
                    b"z" * 1000000, "€" * 1000000]
            for m in msgs:
                await ws.send(m)
                r = await ws.recv()
                assert r == m, (len(r), len(m))
            await ws.send(["frag", "mén", "ted"])
            assert await ws.recv() == "fragménted"
            await ws.send([b"\x01", b"\x02"])
            assert await ws.recv() == b"\x01\x02"
            pong = await ws.ping(b"ping data")
            await asyncio.wait_for(pong, 5)
            print("echo ok", len(msgs) + 2, flush=True)
        print("closed", ws.close_code, flush=True)
    else:
        async with websockets.connect(uri, max_size=2**25) as ws:
            try:
                if mode == "big":
                    await ws.send(b"q" * 5000)
                print("got", await ws.recv(), flush=True)
                await ws.recv()
            except websockets.ConnectionClosed as e:
                print("closed", e.rcvd.code, e.rcvd.reason, flush=True)
asyncio.run(main())
]]
    local pyserver, port, spath, cpath

    setup(function()
      need_python()
      spath, cpath = py_file(SERVER), py_file(CLIENT)
      pyserver = helper.bg("exec " .. PY .. " -u " .. helper.shq(spath))
      assert(helper.wait_until(function()
        port = tonumber((pyserver:output()):match("listening on [%d.]+:(%d+)"))
        return port or pyserver:done()
      end, 10))
      assert(port, "python server did not start: "
                   .. select(2, pyserver:output()))
    end)
    teardown(function()
      if pyserver then
        local pid = tonumber((pyserver:output()):match("pid (%d+)"))
        if pid then os.execute("kill " .. pid) else pyserver:kill() end
        pyserver:wait(5)
      end
      if spath then os.remove(spath) end
      if cpath then os.remove(cpath) end
    end)

    local function url(path) return "ws://127.0.0.1:" .. port .. path end

    it("our client: echo, fragments, pings, close codes, subprotocols", function()
      local s = assert(ws.connect(url("/echo"), { timeout = 5 }))
      for _, m in ipairs { "hello", "", ("é"):rep(100), ("x"):rep(70000),
                           ("€"):rep(1000000) } do
        assert(s:send(m))
        assert(s:receive() == m, #m)
      end
      assert(s:send("\0\1\255", "binary"))
      assert.are.same({ "\0\1\255", "binary" }, { s:receive() })
      assert(s:ping("p"))
      assert(s:send("after the ping"))
      assert.are.equal("after the ping", s:receive())
      assert.are.equal("p", s.pong)
      assert.is_true(s:close())
      s = assert(ws.connect(url("/frag"), { timeout = 5 }))
      assert.are.same({ "hello wörld", "text" }, { s:receive() })
      assert.are.same({ "\0\1\2", "binary" }, { s:receive() })
      s:close()
      s = assert(ws.connect(url("/close"), { timeout = 5 }))
      assert.are.same({ nil, "ECLOSED: peer closed (4001 bye now)", "ECLOSED" },
                      { s:receive() })
      s = assert(ws.connect(url("/ping"), { timeout = 5 }))
      assert.are.equal("pong ok", s:receive())
      s:close()
      s = assert(ws.connect(url("/proto"), { timeout = 5,
                                              protocols = { "superchat" } }))
      assert.are.equal("superchat", s.protocol)
      assert.are.equal("superchat", s:receive())
      s:close()
      s = assert(ws.connect(url("/wait"), { timeout = 5 }))
      s:close(4321, "done here")
      assert(helper.wait_until(function()
        return (pyserver:output()):find("wait closed 4321 done here", 1, true)
      end))
      assert.are.same({ nil, "EHANDSHAKE: server answered 403 Forbidden",
                        "EHANDSHAKE" }, { ws.connect(url("/reject")) })
    end)

    it("our client: a message over max_message is closed with 1009", function()
      local s = assert(ws.connect(url("/big"), { timeout = 5,
                                                  max_message = 1000000 }))
      assert.are.same({ nil, "EMSGSIZE: message too big (1009)", "EMSGSIZE" },
                      { s:receive() })
      assert(helper.wait_until(function()
        return (pyserver:output()):find("big closed 1009", 1, true)
      end))
    end)

    it("their client against our server: echo, close codes", function()
      local srv <close>, p = ws_server(function(sock, req)
        if req.path == "/echo" then return echo(sock) end
        sock:send("bye coming")
        sock:close(4003, "go away")
      end)
      local small <close>, p2 = ws_server(function(sock)
        sock:receive()            -- too big for max_message
        sock:close()
      end, { max_message = 4000 })
      local function run(path, mode)
        local port_ = mode == "big" and p2 or p
        local h = helper.bg(PY .. " -u " .. helper.shq(cpath) .. " "
                            .. helper.shq("ws://127.0.0.1:" .. port_ .. path)
                            .. " " .. mode)
        local code, out, err = h:wait(20)
        assert.are.equal(0, code, err)
        return out
      end
      assert.are.equal("echo ok 10\nclosed 1000\n", run("/echo", "echo"))
      assert.are.equal("got bye coming\nclosed 4003 go away\n",
                       run("/bye", "recv"))
      assert.are.equal("closed 1009 message too big\n", run("/big", "big"))
    end)
  end)

  describe("protocol violations (raw socket against scripts/ws_echo.lua)", function()
    local proc
    setup(function() proc = helper.start("scripts/ws_echo.lua") end)
    teardown(function() if proc then proc:stop() end end)

    local K = "\55\250\33\61"
    local cases = {
      { "an unmasked client frame", char(0x81, 5) .. "hello", 1002 },
      { "opcode 3", cframe(0x83, "x"), 1002 },
      { "opcode 11", cframe(0x8B, ""), 1002 },
      { "a reserved bit", cframe(0xC1, "x"), 1002 },
      { "a fragmented ping", cframe(0x09, "x"), 1002 },
      { "a fragmented close", cframe(0x08, pack(">I2", 1000)), 1002 },
      { "a ping of 126 bytes", cframe(0x89, ("x"):rep(126)), 1002 },
      { "a continuation without a message", cframe(0x80, "x"), 1002 },
      { "a new message inside a fragmented one",
        cframe(0x01, "a") .. cframe(0x81, "b"), 1002 },
      { "invalid UTF-8", cframe(0x81, "ab\xff"), 1007 },
      { "a UTF-16 surrogate", cframe(0x81, "\xed\xa0\x80"), 1007 },
      { "an overlong encoding", cframe(0x81, "\xc0\xaf"), 1007 },
      { "a code point past U+10FFFF", cframe(0x81, "\xf4\x90\x80\x80"), 1007 },
      { "invalid UTF-8 across fragments",
        cframe(0x01, "caf\xc3") .. cframe(0x80, "\xa9 \xc3"), 1007 },
      { "a length of 2^40", pack(">BBI8", 0x82, 0xFF, 1 << 40) .. K, 1009 },
      { "a length over 2^63", pack(">BBi8", 0x82, 0xFF, -2) .. K, 1002 },
      { "a close code of 1005", cframe(0x88, pack(">I2", 1005)), 1002 },
      { "a close code of 999", cframe(0x88, pack(">I2", 999)), 1002 },
      { "a close frame of one byte", cframe(0x88, "\3"), 1002 },
      { "a close reason that is not UTF-8",
        cframe(0x88, pack(">I2", 1000) .. "\xff"), 1007 },
    }

    it("each gets its close code, and nothing else is affected", function()
      local keeper <close> = assert(ws.connect(
        "ws://127.0.0.1:" .. proc.port .. "/", { timeout = 5 }))
      for i, case in ipairs(cases) do
        local c <close>, r = raw_client(proc.port)
        assert(c:write(case[2]))
        local code = read_close(r)
        assert.are.equal(case[3], code, case[1])
        assert(keeper:send("still here " .. i))
        assert.are.equal("still here " .. i, keeper:receive(), case[1])
      end
      -- A clean close, and a close without a code.
      local c <close>, r = raw_client(proc.port)
      assert(c:write(cframe(0x88, pack(">I2", 4000) .. "bye")))
      assert.are.equal(4000, (read_close(r)))
      local c2 <close>, r2 = raw_client(proc.port)
      assert(c2:write(cframe(0x88, "")))
      local b1, payload = read_frame(r2)
      assert.are.same({ 0x88, "" }, { b1, payload })
    end)

    it("serves python3-websockets, 404s other paths and 426s plain GETs", function()
      need_python()
      local path = py_file([[
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1]) as ws:
        for m in ["hi", b"\x00" * 100000, "ü" * 70000]:
            await ws.send(m)
            assert await ws.recv() == m
    print("ok", ws.close_code, flush=True)
asyncio.run(main())
]])
      local h = helper.bg(PY .. " -u " .. helper.shq(path) .. " "
                          .. helper.shq("ws://127.0.0.1:" .. proc.port .. "/"))
      local code, out, err = h:wait(20)
      os.remove(path)
      assert.are.equal(0, code, err)
      assert.are.equal("ok 1000\n", out)
      assert.are.equal(404, (raw_request(proc.port,
        "GET /x HTTP/1.1\r\nHost: x\r\n\r\n")))
      assert.are.equal(426, (raw_request(proc.port,
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n")))
    end)

    it("closes its websockets with 1001 when it drains", function()
      local p = helper.start("scripts/ws_echo.lua")
      local s = assert(ws.connect("ws://127.0.0.1:" .. p.port .. "/",
                                  { timeout = 5 }))
      assert(s:send("before"))
      assert.are.equal("before", s:receive())
      local t0 = so.now()
      os.execute("kill -TERM " .. p.pid)
      assert.are.same({ nil, "ECLOSED: peer closed (1001 server shutting down)",
                        "ECLOSED" }, { s:receive() })
      -- It exits at once (a zombie until reaped), not after the drain period.
      assert(helper.wait_until(function()
        local f = io.open("/proc/" .. p.pid .. "/stat")
        if not f then return true end
        local st = f:read("a")
        f:close()
        return st:match("%) (%a)") == "Z"
      end, 5))
      assert(so.now() - t0 < 2, "exit took " .. (so.now() - t0) .. " s")
      assert.are.equal(0, p:stop())
    end)
  end)

  describe("wss://", function()
    it("runs over TLS (an HTTPS server, a verified client)", function()
      local certs = helper.tls_certs()
      local ctx = assert(tls.server(certs.server))
      local srv <close> = assert(http.listen("127.0.0.1", 0, function(req, body)
        local sock, res = ws.upgrade(req, body)
        if not sock then return res end
        echo(sock)
      end, { tls = ctx }))
      so.spawn(function() srv:serve() end)
      local _, port = srv:sockname()
      local s = assert(ws.connect("wss://localhost:" .. port .. "/",
        { tls = assert(tls.client { ca = certs.ca }), timeout = 5 }))
      certs:remove()
      assert(s:send(("secret "):rep(10000)))
      assert.are.equal(("secret "):rep(10000), s:receive())
      assert.is_true(s:close())
    end)
  end)
end)
