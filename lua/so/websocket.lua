--[[
** so.websocket: WebSocket (RFC 6455) over conns of the "so" module (see
** docs/websocket.md).
**
**   local ws = require "so.websocket"
**   -- in an so.http handler:
**   local sock, res = ws.upgrade(req, body)
**   if not sock then return res end            -- 400 or 426
**   while true do
**     local data, kind = sock:receive()
**     if not data then break end               -- closed, or an error
**     sock:send(data, kind)
**   end
**   -- a client:
**   local sock = assert(ws.connect("ws://127.0.0.1:8080/"))
**
** The frame path is written for speed: a frame's header is read with
** string.byte and string.unpack straight from the buffered bytes, a
** payload is (un)masked eight bytes at a time by functions generated once
** (string.unpack of up to 64 little-endian 64-bit words, XOR with the key
** repeated twice, string.pack), text is checked with utf8.len (C), and a
** frame leaves in one so.write (header and payload as a two-string array,
** one writev: no concatenation). The usual frame of a server (short,
** masked, whole in the buffer, text or binary) takes a short cut: its key
** and payload come out of one unpack.
**
** Input is one string `buf` plus an offset `pos`; a frame is consumed only
** once it is whole, so a receive that times out leaves everything in place
** and the next one goes on where it stopped.
]]

local so = require "so"
local lingering = require "so.linger"

local byte, char, sub, find, lower, rep, format, match, gmatch =
  string.byte, string.char, string.sub, string.find, string.lower,
  string.rep, string.format, string.match, string.gmatch
local spack, sunpack = string.pack, string.unpack
local concat = table.concat
local utf8len = utf8.len
local type, tostring, tonumber, setmetatable, pairs, ipairs, pcall, error,
      load = type, tostring, tonumber, setmetatable, pairs, ipairs, pcall,
      error, load
local running = coroutine.running
local so_read, so_write, so_close, so_settimeout =
  so.read, so.write, so.close, so.settimeout

local M = {}

M.GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

M.defaults = {
  max_message = 16 * 1024 * 1024,  -- bytes of a received message (1009)
  timeout = nil,                   -- seconds for each read and write
  close_timeout = 5,               -- seconds a close handshake may take
  protocols = nil,                 -- subprotocols: the server's, in its
                                   -- order of preference; the client's offer
  headers = nil,                   -- extra headers of the 101 / the request
  tls = nil,                       -- wss://: a tls.client context
}

------------------------------------------------------------------------
-- SHA-1 and base64 (for Sec-WebSocket-Accept; the handshake only).
------------------------------------------------------------------------

local function sha1(msg)
  local h0, h1, h2, h3, h4 =
    0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0
  local ml = #msg
  msg = msg .. "\128" .. rep("\0", (55 - ml) % 64) .. spack(">I8", ml * 8)
  local w = {}
  for chunk = 1, #msg, 64 do
    for i = 1, 16 do w[i] = sunpack(">I4", msg, chunk + (i - 1) * 4) end
    for i = 17, 80 do
      local x = w[i - 3] ~ w[i - 8] ~ w[i - 14] ~ w[i - 16]
      w[i] = ((x << 1) | (x >> 31)) & 0xffffffff
    end
    local a, b, c, d, e = h0, h1, h2, h3, h4
    for i = 1, 80 do
      local f, k
      if i <= 20 then
        f, k = (b & c) | (~b & d), 0x5A827999
      elseif i <= 40 then
        f, k = b ~ c ~ d, 0x6ED9EBA1
      elseif i <= 60 then
        f, k = (b & c) | (b & d) | (c & d), 0x8F1BBCDC
      else
        f, k = b ~ c ~ d, 0xCA62C1D6
      end
      local t = (((a << 5) | (a >> 27)) + f + e + k + w[i]) & 0xffffffff
      e, d, c, b, a = d, c, ((b << 30) | (b >> 2)) & 0xffffffff, a, t
    end
    h0 = (h0 + a) & 0xffffffff
    h1 = (h1 + b) & 0xffffffff
    h2 = (h2 + c) & 0xffffffff
    h3 = (h3 + d) & 0xffffffff
    h4 = (h4 + e) & 0xffffffff
  end
  return spack(">I4I4I4I4I4", h0, h1, h2, h3, h4)
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64C = {}
for i = 1, 64 do B64C[i - 1] = sub(B64, i, i) end

local function base64(s)
  local out, n = {}, 0
  for i = 1, #s, 3 do
    local a, b, c = byte(s, i, i + 2)
    local v = (a << 16) | ((b or 0) << 8) | (c or 0)
    n = n + 1
    out[n] = B64C[v >> 18] .. B64C[(v >> 12) & 63]
             .. (b and B64C[(v >> 6) & 63] or "=")
             .. (c and B64C[v & 63] or "=")
  end
  return concat(out)
end

M.sha1, M.base64 = sha1, base64

-- Sec-WebSocket-Accept for a Sec-WebSocket-Key.
function M.accept_key(key)
  return base64(sha1(key .. M.GUID))
end

------------------------------------------------------------------------
-- Masking: XOR with a 4-byte key, eight bytes at a time.
------------------------------------------------------------------------

--[[
** XOR[w](s, p, k): the 8*w bytes of s at p, XORed with k (the key twice, as
** a little-endian 64-bit integer). Generated: one unpack into locals, one
** pack; no table, no loop. ("j", a lua_Integer, spares the format parser
** the digits of "i8".)
]]
local XOR = {}
for w = 1, 64 do
  local vars, xs = {}, {}
  for i = 1, w do
    vars[i] = "a" .. i
    xs[i] = "a" .. i .. "~k"
  end
  XOR[w] = load("local unpack, pack = ...\n"
    .. "local F = '<" .. rep("j", w) .. "'\n"
    .. "return function(s, p, k)\n"
    .. "  local " .. concat(vars, ",") .. " = unpack(F, s, p)\n"
    .. "  return pack(F, " .. concat(xs, ",") .. ")\n"
    .. "end", "=(websocket mask " .. w .. ")")(sunpack, spack)
end
local XOR64 = XOR[64]
-- The last 1-7 bytes: one unsigned integer of that size.
local TAILF, TAILM = {}, {}
for t = 1, 7 do
  TAILF[t] = "<I" .. t
  TAILM[t] = (1 << (8 * t)) - 1
end

--[[
** UNMASK[len](s, p): the payload of a short masked frame (len < 126), its
** key at p and its len bytes right after, unmasked. One unpack takes the
** key, the words and the tail together, one pack gives the payload: the
** whole of a small frame's unmasking in two C calls. Generated when a
** length first occurs (at most 126 of them).
]]
local UNMASK = setmetatable({ [0] = function() return "" end }, {
  __index = function(t, len)
    local w, tl = len >> 3, len & 7
    local vars, xs = { "k" }, {}
    for i = 1, w do
      vars[i + 1] = "a" .. i
      xs[i] = "a" .. i .. "~k"
    end
    local fin, fout = "<I4" .. rep("j", w), "<" .. rep("j", w)
    if tl > 0 then
      vars[w + 2] = "b"
      xs[w + 1] = "b~(k&" .. TAILM[tl] .. ")"
      fin, fout = fin .. "I" .. tl, fout .. "I" .. tl
    end
    local f = load("local unpack, pack = ...\n"
      .. "return function(s, p)\n"
      .. "  local " .. concat(vars, ",") .. " = unpack('" .. fin .. "', s, p)\n"
      .. "  k = k | (k << 32)\n"
      .. "  return pack('" .. fout .. "', " .. concat(xs, ",") .. ")\n"
      .. "end", "=(websocket unmask " .. len .. ")")(sunpack, spack)
    t[len] = f
    return f
  end,
})

-- len bytes of s from p, XORed with the 64-bit key k.
local function mask(s, p, len, k)
  if len <= 512 then
    local w, t = len >> 3, len & 7
    if t == 0 then
      if w == 0 then return "" end
      return XOR[w](s, p, k)
    end
    local f = TAILF[t]
    local tail = spack(f, sunpack(f, s, p + (w << 3)) ~ (k & TAILM[t]))
    if w == 0 then return tail end
    return XOR[w](s, p, k) .. tail
  end
  local parts, n = {}, 0
  local last = p + len - 512
  while p <= last do
    n = n + 1
    parts[n] = XOR64(s, p, k)
    p = p + 512
  end
  local rest = len & 511
  if rest > 0 then
    n = n + 1
    parts[n] = mask(s, p, rest, k)
  end
  return concat(parts, "", 1, n)
end

-- ws.mask(data, key4): data masked (or unmasked) with a 4-byte key.
function M.mask(data, key)
  local k = sunpack("<I4", key)
  return mask(data, 1, #data, k | (k << 32))
end

--[[
** Masking keys, and the client's Sec-WebSocket-Key, come straight from
** /dev/urandom, read 4 KiB at a time (1024 keys a read; the file is
** opened and closed each time, so nothing stays open).
]]
local pool, pool_pos = "", 1
local function random_bytes(n)
  if pool_pos + n > #pool + 1 then
    local f = assert(io.open("/dev/urandom", "rb"))
    pool = assert(f:read(4096))
    f:close()
    pool_pos = 1
  end
  local s = sub(pool, pool_pos, pool_pos + n - 1)
  pool_pos = pool_pos + n
  return s
end

local function random32()
  if pool_pos + 4 > #pool + 1 then
    local f = assert(io.open("/dev/urandom", "rb"))
    pool = assert(f:read(4096))
    f:close()
    pool_pos = 1
  end
  local k = sunpack("<I4", pool, pool_pos)
  pool_pos = pool_pos + 4
  return k
end

------------------------------------------------------------------------
-- Frames.
------------------------------------------------------------------------

-- Close codes a peer may send (RFC 6455 7.4, and IANA's 1012-1014).
local function valid_code(c)
  return (c >= 1000 and c <= 1003) or (c >= 1007 and c <= 1014)
      or (c >= 3000 and c <= 4999)
end

-- Unmasked headers of short frames, by first byte and length.
local SHORT = {}
for _, b1 in ipairs { 0x81, 0x82, 0x88, 0x89, 0x8A } do
  local t = {}
  for len = 0, 125 do t[len] = char(b1, len) end
  SHORT[b1] = t
end


local Sock = {}
Sock.__index = Sock
Sock.__name = "so.websocket"

--[[
** One frame, b1 its first byte (FIN and opcode), in one so.write. A
** client masks it with a fresh key.
]]
local function send_frame(self, b1, data)
  local len = #data
  local hdr
  if self.server then
    if len < 126 then
      hdr = SHORT[b1][len]
    elseif len < 65536 then
      hdr = spack(">BBI2", b1, 126, len)
    else
      hdr = spack(">BBI8", b1, 127, len)
    end
  else
    local k = random32()
    if len < 126 then
      hdr = spack("<BBI4", b1, 0x80 | len, k)
    elseif len < 65536 then
      hdr = spack(">BBI2", b1, 0xFE, len) .. spack("<I4", k)
    else
      hdr = spack(">BBI8", b1, 0xFF, len) .. spack("<I4", k)
    end
    data = mask(data, 1, len, k | (k << 32))
  end
  local wb = self.wb
  wb[1], wb[2] = hdr, data
  local ok, err, name = so_write(self.conn, wb)  -- (the host copies wb)
  wb[1], wb[2] = "", ""
  return ok, err, name
end

local function close_payload(code, reason)
  if not code then return "" end
  return spack(">I2", code) .. (reason or "")
end

-- The server's open websockets, for the drain (1001).
local open_servers = setmetatable({}, { __mode = "k" })

-- After failing: FIN, then the peer's input dropped until its EOF (at most
-- a second), so that our close frame is read before an RST can destroy it.
local function linger(conn)
  lingering.close(conn, 1)
end

--[[
** The websocket is closed: the error every later call returns, and the
** conn closed. `wait`: first wait (at most `wait` seconds) for the peer to
** close the TCP connection, as a client does after the close handshake
** (RFC 6455 7.1.1: the server closes first); "linger": close it as
** linger() does, in a task of its own (the caller returns at once).
]]
local function finish(self, msg, name, wait)
  self.state = "closed"
  self.err, self.errname = msg, name
  open_servers[self] = nil
  local wd = self.watchdog
  if wd then
    self.watchdog = nil
    if wd ~= running() then so.cancel(wd) end
  end
  if self.conn_closed then return end
  self.conn_closed = true
  local conn = self.conn
  if wait == "linger" then
    so.spawn(linger, conn)
    return
  elseif wait then
    so.deadline(wait, lingering.drop_input, conn)
  end
  so_close(conn)
end

--[[
** Fail the websocket (RFC 6455 7.1.7): a close frame with `code`, then the
** conn closed.
]]
local function fail(self, code, why)
  local name = code == 1009 and "EMSGSIZE" or "EPROTO"
  local msg = format("%s: %s (%d)", name, why, code)
  self.close_code, self.close_reason = code, why
  if self.state == "open" then
    self.state = "closing"
    send_frame(self, 0x88, close_payload(code, why))
  end
  finish(self, msg, name, "linger")
  return nil, msg, name
end

-- A read failed (nil, err, name) or met EOF (nil, nil): the websocket's end,
-- except for a timeout, after which it goes on.
local function read_failed(self, err, name)
  if self.state == "closed" then return nil, self.err, self.errname end
  if name == "ETIMEDOUT" then return nil, err, name end
  if not err then
    self.close_code, self.close_reason = 1006, ""
    err, name = "ECLOSED: connection closed without a close frame (1006)",
                "ECLOSED"
  end
  finish(self, err, name)
  return nil, err, name
end

--[[
** Make at least n bytes available at self.pos. Returns true, or what the
** read returned (nil, nil at EOF); whatever arrived is kept.
]]
local function need(self, n)
  local buf, pos = self.buf, self.pos
  local have = #buf - pos + 1
  local conn = self.conn
  if have <= 0 then
    local data, err, name = so_read(conn)
    if not data or data == "" then return nil, err, name end
    self.buf, self.pos = data, 1
    if #data >= n then return true end
    buf, pos, have = data, 1, #data
  end
  local parts, np = { pos == 1 and buf or sub(buf, pos) }, 1
  while have < n do
    local data, err, name = so_read(conn)
    if not data or data == "" then
      self.buf, self.pos = concat(parts, "", 1, np), 1
      return nil, err, name
    end
    np = np + 1
    parts[np] = data
    have = have + #data
  end
  self.buf, self.pos = concat(parts, "", 1, np), 1
  return true
end

-- The peer's close frame (payload `data`).
local function on_close(self, data)
  local len = #data
  local code, reason = 1005, ""
  if len == 1 then return fail(self, 1002, "close frame of one byte") end
  if len >= 2 then
    code = sunpack(">I2", data)
    reason = sub(data, 3)
    if not valid_code(code) then
      return fail(self, 1002, "bad close code " .. code)
    end
    if not utf8len(reason) then
      return fail(self, 1007, "close reason is not UTF-8")
    end
  end
  self.close_code, self.close_reason = code, reason
  local msg
  if self.state == "open" then
    -- The peer starts the close: echo its code.
    self.state = "closing"
    send_frame(self, 0x88, code == 1005 and "" or spack(">I2", code))
    msg = format("ECLOSED: peer closed (%d%s)", code,
                 reason ~= "" and " " .. reason or "")
  else
    -- The answer to ours.
    local sent = self.sent_code
    msg = format("ECLOSED: closed (%d%s)", sent or 1005,
                 (self.sent_reason or "") ~= "" and " " .. self.sent_reason
                 or "")
  end
  finish(self, msg, "ECLOSED", not self.server and self.close_timeout)
  return nil, msg, "ECLOSED"
end

--[[
** The next message: data, kind, or nil, msg, name. Control frames are
** handled on the way: pings answered, pongs dropped, a close answered.
]]
local function recv(self)
  if self.state == "closed" then return nil, self.err, self.errname end
  while true do
    local buf, pos = self.buf, self.pos
    local n = #buf - pos + 1
    if n <= 0 then
      -- The usual: nothing buffered; one read often brings a whole frame.
      local err, name
      buf, err, name = so_read(self.conn)
      if not buf or buf == "" then return read_failed(self, err, name) end
      self.buf, self.pos = buf, 1
      pos, n = 1, #buf
    end
    if n < 2 then
      local ok, err, name = need(self, 2)
      if not ok then return read_failed(self, err, name) end
      buf, pos = self.buf, self.pos
      n = #buf - pos + 1
    end
    local b1, b2 = byte(buf, pos, pos + 1)
    -- The usual frame, handled first: on a server, a whole final text or
    -- binary frame, masked, shorter than 126 bytes, outside a fragmented
    -- message and within max_message. Everything else (and a frame that is
    -- not whole yet) takes the general path below, which checks it all.
    if b2 >= 0x80 and b2 < 0xFE and (b1 == 0x82 or b1 == 0x81)
       and self.server and not self.frag_kind then
      local len = b2 - 0x80
      local total = len + 6
      if n >= total and len <= self.max_message then
        local data = UNMASK[len](buf, pos + 2)
        self.pos = pos + total
        if b1 == 0x82 then return data, "binary" end
        if not utf8len(data) then
          return fail(self, 1007, "text message is not UTF-8")
        end
        self.text_ok = data
        return data, "text"
      end
    end
    local len = b2 & 0x7f
    local masked = b2 >= 0x80
    local hl = len < 126 and 2 or (len == 126 and 4 or 10)
    if masked then hl = hl + 4 end
    if n < hl then
      local ok, err, name = need(self, hl)
      if not ok then return read_failed(self, err, name) end
      buf, pos = self.buf, self.pos
      n = #buf - pos + 1
    end
    if len == 126 then
      len = sunpack(">I2", buf, pos + 2)
    elseif len == 127 then
      len = sunpack(">i8", buf, pos + 2)
      if len < 0 then return fail(self, 1002, "frame length over 2^63") end
    end
    local op = b1 & 0x0f
    if b1 & 0x70 ~= 0 then return fail(self, 1002, "reserved bits set") end
    if masked ~= self.server then
      return fail(self, 1002, masked and "masked frame from the server"
                              or "unmasked frame from the client")
    end
    local frag = self.frag_kind
    if op >= 8 then
      if op > 10 then return fail(self, 1002, "bad opcode " .. op) end
      if b1 < 0x80 then return fail(self, 1002, "fragmented control frame") end
      if len > 125 then return fail(self, 1002, "control frame too long") end
    elseif op == 0 then
      if not frag then
        return fail(self, 1002, "continuation frame without a message")
      end
      if len > self.max_message - self.frag_len then
        return fail(self, 1009, "message too big")
      end
    elseif op <= 2 then
      if frag then
        return fail(self, 1002, "new message inside a fragmented one")
      end
      if len > self.max_message then
        return fail(self, 1009, "message too big")
      end
    else
      return fail(self, 1002, "bad opcode " .. op)
    end
    local total = hl + len
    if n < total then
      local ok, err, name = need(self, total)
      if not ok then return read_failed(self, err, name) end
      buf, pos = self.buf, self.pos
    end
    local p = pos + hl
    local data
    if masked then
      local k = sunpack("<I4", buf, p - 4)
      k = k | (k << 32)
      if len & 7 == 0 and len <= 512 and len > 0 then
        data = XOR[len >> 3](buf, p, k)
      else
        data = mask(buf, p, len, k)
      end
    else
      data = sub(buf, p, p + len - 1)
    end
    self.pos = pos + total
    if total > 65536 and pos + total > #buf then
      self.buf = ""        -- (a large frame: its bytes are not kept)
      self.pos = 1
    end
    if op == 1 or op == 2 then
      if b1 >= 0x80 then
        if op == 1 then
          if not utf8len(data) then
            return fail(self, 1007, "text message is not UTF-8")
          end
          self.text_ok = data   -- (echoed as is: not checked again)
          return data, "text"
        end
        return data, "binary"
      end
      self.frag_kind, self.frag_len, self.frags, self.nfrags =
        op, len, { data }, 1
    elseif op == 0 then
      local nf = self.nfrags + 1
      local frags = self.frags
      frags[nf] = data
      self.nfrags = nf
      self.frag_len = self.frag_len + len
      if b1 >= 0x80 then
        data = concat(frags, "", 1, nf)
        self.frag_kind, self.frag_len, self.frags, self.nfrags =
          nil, 0, nil, 0
        if frag == 1 then
          if not utf8len(data) then
            return fail(self, 1007, "text message is not UTF-8")
          end
          self.text_ok = data
          return data, "text"
        end
        return data, "binary"
      end
    elseif op == 9 then
      if self.state == "open" then
        local ok, err, name = send_frame(self, 0x8A, data)
        if not ok and name ~= "ETIMEDOUT" then
          return read_failed(self, err, name)
        end
      end
    elseif op == 10 then
      self.pong = data
    else
      return on_close(self, data)
    end
  end
end

--[[
** sock:receive() -> data, kind ("text" or "binary") | nil, msg, name.
** A second task that receives while one waits raises, as so.read does.
]]
Sock.receive = recv

-- What send and ping return when the websocket is not open.
local function not_open(self)
  if self.state == "closing" then
    return nil, "ECLOSED: the websocket is closing", "ECLOSED"
  end
  return nil, self.err, self.errname
end

--[[
** sock:send(data [, kind]) -> true | nil, msg, name
]]
function Sock:send(data, kind)
  if type(data) ~= "string" then
    if type(data) ~= "number" then
      error("bad argument #1 to 'send' (string expected, got "
            .. type(data) .. ")", 2)
    end
    data = tostring(data)
  end
  local b1
  if kind == "binary" then
    b1 = 0x82
  elseif kind == nil or kind == "text" then
    if data ~= self.text_ok and not utf8len(data) then
      error("bad argument #1 to 'send' (text is not UTF-8; send it as "
            .. "\"binary\")", 2)
    end
    b1 = 0x81
  else
    error("bad argument #2 to 'send' (\"text\" or \"binary\" expected)", 2)
  end
  if self.state ~= "open" then return not_open(self) end
  return send_frame(self, b1, data)
end

--[[
** sock:ping([data]) -> true | nil, msg, name: the pong is dropped by
** receive (sock.pong holds the last one's payload).
]]
function Sock:ping(data)
  data = data or ""
  if type(data) ~= "string" or #data > 125 then
    error("bad argument #1 to 'ping' (string of at most 125 bytes expected)",
          2)
  end
  if self.state ~= "open" then return not_open(self) end
  return send_frame(self, 0x89, data)
end

-- What so.read raises when another task reads the conn.
local BUSY = "already being read by another task"

-- Receive until the peer's close frame (or a failure, or a timeout).
local function close_wait(self)
  while self.state ~= "closed" do
    if not recv(self) and self.state ~= "closed" then return end  -- timeout
  end
end

--[[
** sock:close([code [, reason] ]) -> true: the close handshake (at most
** close_timeout seconds), then the conn closed. When another task is
** reading, that task completes the handshake (its receive returns
** nil, "ECLOSED: closed (...)") and close returns at once.
]]
function Sock:close(code, reason)
  if self.state == "closed" then return true end
  if self.state == "open" then
    if code ~= nil then
      if math.type(code) ~= "integer" or not valid_code(code) then
        error("bad argument #1 to 'close' (close code 1000-1003, 1007-1014 "
              .. "or 3000-4999 expected)", 2)
      end
    end
    if reason ~= nil then
      if type(reason) ~= "string" or #reason > 123 or not utf8len(reason) then
        error("bad argument #2 to 'close' (UTF-8 string of at most 123 bytes "
              .. "expected)", 2)
      end
      code = code or 1000
    end
    code = code or 1000
    self.state = "closing"
    self.sent_code, self.sent_reason = code, reason or ""
    local ok, err, name = send_frame(self, 0x88, close_payload(code, reason))
    if not ok and name ~= "ETIMEDOUT" then
      finish(self, err, name)
      return true
    end
  end
  local msg = format("ECLOSED: closed (%d%s)", self.sent_code or 1005,
                     (self.sent_reason or "") ~= "" and " " .. self.sent_reason
                     or "")
  -- Wait for the peer's close (data frames are dropped meanwhile).
  local ok, err = pcall(so.deadline, self.close_timeout, close_wait, self)
  if not ok then
    if type(err) ~= "string" or not find(err, BUSY, 1, true) then
      error(err, 0)
    end
    -- Another task is reading: it finishes the handshake (its receive
    -- returns nil, "ECLOSED: closed (...)"); if the peer never answers,
    -- the conn closes after close_timeout.
    if not self.watchdog then
      self.watchdog = so.spawn(function()
        so.sleep(self.close_timeout)
        if self.state ~= "closed" then
          self.watchdog = nil
          self.state = "closed"
          self.err, self.errname = msg, "ECLOSED"
          open_servers[self] = nil
          self.conn_closed = true
          so_close(self.conn)
        end
      end)
    end
    return true
  end
  if self.state ~= "closed" then finish(self, msg, "ECLOSED") end
  return true
end

-- A <close> variable: a close handshake if it can wait here, else the conn
-- closed at once.
function Sock:__close()
  if self.state == "closed" then return end
  if not pcall(self.close, self) and self.state ~= "closed" then
    self.state = "closed"
    self.err, self.errname = "ECLOSED: closed", "ECLOSED"
    open_servers[self] = nil
    self.conn_closed = true
    so_close(self.conn)
  end
end

function Sock:settimeout(seconds)
  return so_settimeout(self.conn, seconds)
end

function Sock:__tostring()
  return format("websocket (%s)", self.state)
end

local function new_sock(conn, server, opts, protocol, buffered)
  local o = M.defaults
  return setmetatable({
    conn = conn,
    server = server,
    protocol = protocol,
    state = "open",            -- "closing" once a close frame was sent
    buf = buffered or "",
    pos = 1,
    max_message = opts and opts.max_message or o.max_message,
    close_timeout = opts and opts.close_timeout or o.close_timeout,
    frag_kind = nil,           -- opcode of a fragmented message in progress
    frag_len = 0,
    frags = nil,
    nfrags = 0,
    wb = { "", "" },
    watchdog = nil,
    err = nil, errname = nil,  -- once closed: what every call returns
    close_code = nil,          -- the peer's close code (1005: none; 1006:
    close_reason = nil,        -- no close frame), or the one we failed with
    sent_code = nil, sent_reason = nil,
    pong = nil,
    text_ok = nil,             -- the last text received (valid UTF-8)
  }, Sock)
end

------------------------------------------------------------------------
-- Handshakes.
------------------------------------------------------------------------

-- Whether a comma-separated header value holds `token` (case-insensitive).
local function has_token(value, token)
  if not value then return false end
  for t in gmatch(lower(value), "[^,]+") do
    if match(t, "^%s*(.-)%s*$") == token then return true end
  end
  return false
end

local function split_list(value)
  local list = {}
  if value then
    for t in gmatch(value, "[^,]+") do
      t = match(t, "^%s*(.-)%s*$")
      if t ~= "" then list[#list + 1] = t end
    end
  end
  return list
end

local function bad(status, why, headers)
  local h = { ["Content-Type"] = "text/plain" }
  if headers then for k, v in pairs(headers) do h[k] = v end end
  return nil, { status = status, headers = h,
                body = "bad WebSocket handshake: " .. why .. "\n" }
end

local UPGRADE_HEADERS = { ["Upgrade"] = "websocket",
                          ["Sec-WebSocket-Version"] = "13" }

-- opts.headers as header lines; a name that is not a token, or a value
-- with CR, LF or NUL, raises.
local function header_line(k, v)
  if type(k) ~= "string" or not find(k, "^[%w!#$%%&'*+.^_`|~-]+$") then
    error("bad header name " .. tostring(k) .. " in opts.headers", 4)
  end
  v = tostring(v)
  if find(v, "[\r\n%z]") then
    error("bad value of header " .. k .. " in opts.headers", 4)
  end
  return k .. ": " .. v .. "\r\n"
end

local function header_lines(headers)
  local out = {}
  if headers then
    for k, v in pairs(headers) do
      if type(v) == "table" then
        for _, x in ipairs(v) do out[#out + 1] = header_line(k, x) end
      else
        out[#out + 1] = header_line(k, v)
      end
    end
  end
  return concat(out)
end

local drain_set = false

--[[
** ws.upgrade(req, body [, opts]) -> websocket | nil, response
]]
function M.upgrade(req, body, opts)
  local h = req.headers
  if req.method ~= "GET" then return bad(400, "method is not GET") end
  if req.version ~= "1.1" then return bad(400, "not HTTP/1.1") end
  if body and (body.chunked or (body.length and body.length > 0)) then
    return bad(400, "request has a body")
  end
  if not has_token(h["upgrade"], "websocket") then
    return bad(426, "no Upgrade: websocket", UPGRADE_HEADERS)
  end
  if not has_token(h["connection"], "upgrade") then
    return bad(426, "no Connection: Upgrade", UPGRADE_HEADERS)
  end
  local version = h["sec-websocket-version"]
  if not version or match(version, "^%s*(.-)%s*$") ~= "13" then
    return bad(426, "Sec-WebSocket-Version is not 13", UPGRADE_HEADERS)
  end
  local key = h["sec-websocket-key"]
  key = key and match(key, "^%s*(.-)%s*$")
  if not key or #key ~= 24 or not find(key, "^[A-Za-z0-9+/]+==$") then
    return bad(400, "bad Sec-WebSocket-Key")
  end
  local protocol
  local mine = opts and opts.protocols
  if mine then
    local offered = {}
    for _, p in ipairs(split_list(h["sec-websocket-protocol"])) do
      offered[p] = true
    end
    for _, p in ipairs(mine) do
      if offered[p] then protocol = p; break end
    end
  end
  local extra = header_lines(opts and opts.headers)
  local conn = req.conn
  local head = "HTTP/1.1 101 Switching Protocols\r\n"
    .. "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    .. "Sec-WebSocket-Accept: " .. M.accept_key(key) .. "\r\n"
    .. (protocol and "Sec-WebSocket-Protocol: " .. protocol .. "\r\n" or "")
    .. extra .. "\r\n"
  req.hijacked = true
  -- What the HTTP server set (its keep-alive timeout) gives way to ours.
  so_settimeout(conn, opts and opts.timeout or M.defaults.timeout)
  -- Bytes a server's reader buffered past the head, if it shows them.
  local buffered
  local r = req.reader
  if type(r) == "table" and type(r.buf) == "string" and r.pos
     and r.pos <= #r.buf then
    buffered = sub(r.buf, r.pos)
    r.buf, r.pos = "", 1
  end
  local sock = new_sock(conn, true, opts, protocol, buffered)
  local ok, err, name = so_write(conn, head)
  if not ok then
    finish(sock, err, name)
    return sock
  end
  open_servers[sock] = true
  if not drain_set then
    drain_set = true
    so.ondrain(function()
      for s in pairs(open_servers) do
        if s.state == "open" then
          so.spawn(s.close, s, 1001, "server shutting down")
        end
      end
    end)
  end
  return sock
end

-- Parse a ws:// or wss:// URL: tls, host, port, Host header, path.
local function parse_url(url)
  local scheme, rest = match(url, "^([wW][sS][sS]?)://(.*)$")
  if not scheme then return nil end
  local tls = lower(scheme) == "wss"
  local authority, path = match(rest, "^([^/?#]*)([^#]*)")
  if authority == "" or find(authority, "@", 1, true) then return nil end
  if path == "" then path = "/"
  elseif sub(path, 1, 1) == "?" then path = "/" .. path end
  local host, port
  if sub(authority, 1, 1) == "[" then
    host, port = match(authority, "^%[([^%]]+)%]:?(%d*)$")
  else
    host, port = match(authority, "^([^:]+):?(%d*)$")
  end
  if not host then return nil end
  port = tonumber(port) or (tls and 443 or 80)
  if port < 1 or port > 65535 then return nil end
  return tls, host, port, authority, path
end

-- Read a response head (up to 16 KiB): head, rest | nil, msg, name.
local function read_head(conn)
  local parts, np, size, prev = {}, 0, 0, ""
  while true do
    local data, err, name = so_read(conn)
    if not data then return nil, err, name end
    if data == "" then
      return nil, "EHANDSHAKE: connection closed before the response",
             "EHANDSHAKE"
    end
    np = np + 1
    parts[np] = data
    size = size + #data
    local s = prev .. data
    local e = find(s, "\r\n\r\n", 1, true)
    if e then
      local all = concat(parts, "", 1, np)
      e = find(all, "\r\n\r\n", 1, true)
      return sub(all, 1, e + 3), sub(all, e + 4)
    end
    if size > 16384 then
      return nil, "EHANDSHAKE: response head too long", "EHANDSHAKE"
    end
    prev = sub(s, -3)
  end
end

local function handshake(conn, host_header, path, opts, extra)
  local key = base64(random_bytes(16))
  local offered = opts.protocols
  local req = "GET " .. path .. " HTTP/1.1\r\n"
    .. "Host: " .. host_header .. "\r\n"
    .. "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    .. "Sec-WebSocket-Key: " .. key .. "\r\n"
    .. "Sec-WebSocket-Version: 13\r\n"
    .. (offered and #offered > 0
        and "Sec-WebSocket-Protocol: " .. concat(offered, ", ") .. "\r\n"
        or "")
    .. extra .. "\r\n"
  local ok, err, name = so_write(conn, req)
  if not ok then return nil, err, name end
  local head, rest, x = read_head(conn)
  if not head then return nil, rest, x end
  local status, reason = match(head, "^HTTP/1%.[01] (%d%d%d) ?([^\r\n]*)\r\n")
  if not status then
    return nil, "EHANDSHAKE: not an HTTP response", "EHANDSHAKE"
  end
  if status ~= "101" then
    return nil, format("EHANDSHAKE: server answered %s %s", status, reason),
           "EHANDSHAKE"
  end
  local h = {}
  local HEADER = "\r\n([^:\r\n]+):[ \t]*([^\r\n]-)[ \t]*%f[\r]"
  for name_, value in gmatch(head, HEADER) do
    name_ = lower(name_)
    h[name_] = h[name_] and h[name_] .. ", " .. value or value
  end
  if not has_token(h["upgrade"], "websocket") then
    return nil, "EHANDSHAKE: no Upgrade: websocket in the response",
           "EHANDSHAKE"
  end
  if not has_token(h["connection"], "upgrade") then
    return nil, "EHANDSHAKE: no Connection: Upgrade in the response",
           "EHANDSHAKE"
  end
  if h["sec-websocket-accept"] ~= M.accept_key(key) then
    return nil, "EHANDSHAKE: bad Sec-WebSocket-Accept", "EHANDSHAKE"
  end
  if h["sec-websocket-extensions"] then
    return nil, "EHANDSHAKE: extensions that were not offered", "EHANDSHAKE"
  end
  local protocol = h["sec-websocket-protocol"]
  if protocol then
    local found = false
    for _, p in ipairs(offered or {}) do
      if p == protocol then found = true end
    end
    if not found then
      return nil, "EHANDSHAKE: subprotocol " .. protocol
             .. " was not offered", "EHANDSHAKE"
    end
  end
  return true, protocol, rest
end

--[[
** ws.connect(url [, opts]) -> websocket | nil, msg, name
]]
function M.connect(url, opts)
  if type(url) ~= "string" then
    error("bad argument #1 to 'connect' (string expected, got "
          .. type(url) .. ")", 2)
  end
  local tls, host, port, host_header, path = parse_url(url)
  if tls == nil then
    error("bad argument #1 to 'connect' (ws:// or wss:// URL expected)", 2)
  end
  opts = opts or {}
  local extra = header_lines(opts.headers)
  local timeout = opts.timeout or M.defaults.timeout
  local conn, err, name
  if tls then
    local tlsmod = require "so.tls"
    conn, err, name = tlsmod.connect(host, port, opts.tls, timeout)
  else
    conn, err, name = so.connect(host, port, timeout)
  end
  if not conn then return nil, err, name end
  local ok, protocol, rest
  if timeout then
    ok, protocol, rest = so.deadline(timeout, handshake, conn, host_header,
                                     path, opts, extra)
  else
    ok, protocol, rest = handshake(conn, host_header, path, opts, extra)
  end
  if not ok then
    so_close(conn)
    return nil, protocol, rest
  end
  if timeout then so_settimeout(conn, timeout) end
  return new_sock(conn, false, opts, protocol, rest)
end

return M
