--[[
** so.http.body: message bodies of so.http, both directions (see
** docs/http.md): the framing of a message from its headers (the same
** smuggling rules for requests and responses), and the body reader that
** streams a Content-Length, chunked or (responses only) close-delimited
** body, never buffering it whole, with its limits; for requests, Expect:
** 100-continue, answered on the first read.
**
** Chunk-size lines are held to RFC 9112 §7.1.1: hex digits, then only
** chunk extensions (";" name, optionally "=" token or quoted-string, with
** whitespace only around ";" and "="); trailer lines to the grammar of
** header lines. Anything else is a bad chunk (400 and a close): a proxy in
** front that reads chunk boundaries differently cannot smuggle a request.
]]

local so = require "so"
local parse = require "so.http.parse"

local find, match, lower, byte, gmatch, sub =
  string.find, string.match, string.lower, string.byte, string.gmatch,
  string.sub
local concat = table.concat
local tonumber, setmetatable, error = tonumber, setmetatable, error
local mtype = math.type
local so_write = so.write
local TCHAR, field_line = parse.TCHAR, parse.field_line

local M = {}

-- The longest length a body may declare: beyond, it is "too large".
local MAX_LENGTH = 1 << 53

-- Content-Length values seen before, by their text: a bounded cache (the
-- same few lengths come again and again).
local CL_MAX = 1024
local cl_cache, cl_n = {}, 0

-- A Content-Length header's value: its length, or nil, status, msg.
local function content_length(cl)
  local text = cl
  if not find(cl, "^%d+$") then
    -- "5, 5" from repeated or listed values: all must be the same.
    local first
    for v in gmatch(cl .. ",", "([^,]*),") do
      v = match(v, "^[ \t]*(%d+)[ \t]*$")
      if not v or (first and tonumber(v) ~= tonumber(first)) then
        return nil, 400, "EPROTO: bad Content-Length"
      end
      first = v
    end
    cl = first
  end
  local n = tonumber(cl)
  if mtype(n) ~= "integer" or n > MAX_LENGTH then
    return nil, 413, "EMSGSIZE: Content-Length " .. cl .. " over the limit"
  end
  if #text <= 32 then
    if cl_n >= CL_MAX then cl_cache, cl_n = {}, 0 end
    cl_cache[text] = n
    cl_n = cl_n + 1
  end
  return n
end

--[[
** The framing of a message from its (lower-case) headers: true for
** chunked, a length, or false for neither; or nil, status, msg (400: both
** Content-Length and Transfer-Encoding, differing or malformed lengths;
** 413: a length over max (or over 2^53); 501: a Transfer-Encoding other
** than chunked).
]]
local function framing(headers, max)
  local te, cl = headers["transfer-encoding"], headers["content-length"]
  if te then
    if cl then
      return nil, 400, "EPROTO: both Content-Length and Transfer-Encoding"
    end
    if lower(te) ~= "chunked" then
      return nil, 501, "EPROTO: unsupported Transfer-Encoding"
    end
    return true
  end
  if not cl then return false end
  local n = cl_cache[cl]
  if not n then
    local status, msg
    n, status, msg = content_length(cl)
    if not n then return nil, status, msg end
  end
  if max and n > max then
    return nil, 413, "EMSGSIZE: Content-Length " .. n .. " over the limit"
  end
  return n
end

--[[
** Body: streams a body. body:read([max]) gives the next bytes (at most
** max, default 64 KiB), "" at the end, or nil, msg, name; then
** body.status is the status the server answers with, if it still can.
** body.on_done(body) and body.on_fail(body), when set (the client's, in
** the metatable of its bodies), are called when the end is read and when
** a read fails: one of them, once.
]]
local Body = {}
Body.__index = Body
Body.__name = "so.http.body"
Body.what = "request"     -- in messages: "request body too large"

local function send_continue(self)
  self.expect = false
  local ok, err, name = so_write(self.conn, "HTTP/1.1 100 Continue\r\n\r\n")
  if not ok then
    self.err, self.errname = err, name
    return nil, err, name
  end
  return true
end

local function body_fail(self, status, msg, name)
  local first = not self.err and not self.done
  self.status, self.err, self.errname = status, msg, name
  local f = self.on_fail
  if f and first then f(self) end
  return nil, msg, name
end

local function too_large(self)
  return body_fail(self, 413, "EMSGSIZE: " .. self.what .. " body too large",
                   "EMSGSIZE")
end

-- The end of the body was read.
local function finish(self)
  self.done = true
  local f = self.on_done
  if f then f(self) end
end

-- Turn a reader failure into a body failure.
local function body_readfail(self, err, x)
  if err == "EOF" then
    return body_fail(self, 400, "EPROTO: connection closed inside the body",
                     "EPROTO")
  elseif err == "message too long" then
    return body_fail(self, 400, "EPROTO: chunk line too long", "EPROTO")
  elseif x == "ETIMEDOUT" then
    return body_fail(self, 408, err, x)
  end
  return body_fail(self, nil, err, x)
end

local CHUNK_LINE = { limit = 4096 }

local EXT_START = "^[ \t]*;[ \t]*" .. TCHAR .. "+()"
local EXT_EQ = "^[ \t]*=[ \t]*()"
local EXT_TOKEN = "^" .. TCHAR .. "+()"
-- qdtext: HTAB, SP, "!", "#"-"[", "]"-"~", obs-text
local QDTEXT = "^[\t !#-Z%[%]^-~\128-\255]*()"

-- The end of a quoted-string starting at p (its DQUOTE), or nil.
local function quoted_end(s, p)
  p = p + 1
  while true do
    p = match(s, QDTEXT, p)
    local b = byte(s, p)
    if b == 34 then return p + 1 end                      -- DQUOTE
    if b ~= 92 then return nil end                        -- not "\"
    b = byte(s, p + 1)                                    -- quoted-pair
    if not b or (b < 32 and b ~= 9) or b == 127 then return nil end
    p = p + 2
  end
end

--[[
** Whether s (what follows the chunk size) is a valid list of chunk
** extensions: *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )
]]
local function valid_exts(s)
  local p, n = 1, #s
  repeat
    p = match(s, EXT_START, p)
    if not p then return false end
    local q = match(s, EXT_EQ, p)
    if q then
      p = match(s, EXT_TOKEN, q)
      if not p then
        if byte(s, q) ~= 34 then return false end
        p = quoted_end(s, q)
        if not p then return false end
      end
    end
  until p > n
  return true
end

-- Read the next chunk-size line (and the trailers after the last chunk).
local function next_chunk(self)
  local r = self.r
  if self.started then
    local crlf, err, x = r:read(2)
    if not crlf then return body_readfail(self, err, x) end
    if crlf ~= "\r\n" then
      return body_fail(self, 400, "EPROTO: bad chunk end", "EPROTO")
    end
  end
  self.started = true
  local line, err, x = r:readuntil("\r\n", CHUNK_LINE)
  if not line then return body_readfail(self, err, x) end
  local hex, ext = match(line, "^(%x+)(.*)$")
  if not hex or #hex > 15 or (ext ~= "" and not valid_exts(ext)) then
    return body_fail(self, 400, "EPROTO: bad chunk size line", "EPROTO")
  end
  local size = tonumber(hex, 16)
  if size == 0 then
    -- Trailer fields, then the final empty line: checked and ignored.
    local total = 0
    repeat
      local t
      t, err, x = r:readuntil("\r\n", CHUNK_LINE)
      if not t then return body_readfail(self, err, x) end
      total = total + #t + 2
      if total > self.max_trailer then
        return body_fail(self, 431, "EPROTO: trailers too large", "EPROTO")
      end
      if t ~= "" and not field_line(t) then
        return body_fail(self, 400, "EPROTO: bad trailer", "EPROTO")
      end
    until t == ""
    finish(self)
    return 0
  end
  local max = self.max
  if max and self.total + size > max then return too_large(self) end
  self.cleft = size
  return size
end

function Body:read(max)
  if self.done then return "" end
  if self.err then return nil, self.err, self.errname end
  local r = self.r
  local timeout = self.timeout
  if r.timeout ~= timeout or r.dirty then r:settimeout(timeout) end
  if self.expect then
    local ok, err, name = send_continue(self)
    if not ok then return nil, err, name end
  end
  max = max or 65536
  local n
  if self.chunked then
    if self.cleft == 0 then
      local size, err, name = next_chunk(self)
      if not size then return nil, err, name end
      if size == 0 then return "" end
    end
    n = self.cleft
  else
    n = self.left or max          -- nil: to the end of the stream
  end
  if n > max then n = max end
  local data, err, x
  local buf, pos = r.buf, r.pos
  local blen = #buf
  if pos <= blen then
    -- Buffered bytes (r:readsome inlined).
    local last = pos + n - 1
    if last < blen then
      r.pos = last + 1
    else
      last = blen
      r.buf, r.pos = "", 1
    end
    data = (pos == 1 and last == blen) and buf or sub(buf, pos, last)
  else
    data, err, x = r:readsome(n)
    if not data then
      if err == "EOF" and self.to_eof then finish(self); return "" end
      return body_readfail(self, err, x)
    end
  end
  local len = #data
  local total = self.total + len
  self.total = total
  if self.chunked then
    self.cleft = self.cleft - len
  else
    local left = self.left
    if left then
      left = left - len
      self.left = left
      if left == 0 then finish(self) end
    elseif self.max and total > self.max then
      return too_large(self)
    end
  end
  return data
end

--[[
** body:readall([limit]): the whole body as one string (at most limit
** bytes, default the server's max_body), or nil, msg, name.
]]
function Body:readall(limit)
  limit = limit or self.max or math.huge
  local parts, n, size = nil, 0, 0
  while true do
    local data, err, name = self:read()
    if not data then return nil, err, name end
    if data == "" then return n > 0 and concat(parts, "", 1, n) or "" end
    size = size + #data
    if size > limit then return too_large(self) end
    if n == 0 then
      if self.done then return data end  -- the usual: one read
      parts = {}
    end
    n = n + 1; parts[n] = data
  end
end

--[[
** body:chunks(): iterator for a generic for; raises on a failure (the
** server still answers with body.status when it can).
]]
function Body:chunks()
  return function()
    local data, err = self:read()
    if not data then error(err, 2) end
    if data == "" then return nil end
    return data
  end
end

-- body:discard([limit]): read and drop the rest. True when all was read.
function Body:discard(limit)
  limit = limit or math.huge
  local seen = 0
  while not self.done do
    local data = self:read()
    if not data then return false end
    seen = seen + #data
    if seen > limit and not self.done then return false end
  end
  return true
end

-- The body of a message that has none: shared, stateless.
local EMPTY = setmetatable({ done = true, length = 0, total = 0 }, Body)

-- The body of a request, or nil, status.
local function open_body(req, version, r, conn, o)
  local headers = req.headers
  local kind, status = framing(headers, o.max_body)
  local body
  if kind == 0 then
    return EMPTY
  elseif kind == true then
    body = setmetatable({ r = r, conn = conn, chunked = true, cleft = 0,
                          started = false, total = 0, max = o.max_body,
                          max_trailer = o.max_head, timeout = o.timeout },
                        Body)
  elseif kind then
    body = setmetatable({ r = r, conn = conn, left = kind, length = kind,
                          total = 0, max = o.max_body, timeout = o.timeout },
                        Body)
  elseif kind == false then
    return EMPTY
  else
    return nil, status
  end
  local expect = headers.expect
  if expect then
    if lower(expect) ~= "100-continue" then return nil, 417 end
    if version == "1.1" then body.expect = true end
  end
  return body
end

--[[
** The body of a response (the client's), framed as a request's is, or
** close-delimited when it says neither. Returns body, or nil, msg, name.
** A length of 0 gives the shared empty body. `meta`: the metatable of the
** body (the client's, whose __index falls back to Body: its `what`,
** on_done, on_fail); `key`: a field for the client.
]]
local function open_response_body(headers, r, conn, max, max_trailer,
                                  timeout, meta, key)
  local kind, _, msg
  local cl = headers["content-length"]
  kind = cl and not headers["transfer-encoding"] and cl_cache[cl]
  if not kind or (max and kind > max) then
    kind, _, msg = framing(headers, max)       -- (not the usual case)
  end
  if kind == 0 then
    return EMPTY
  elseif kind == true then
    return setmetatable({ r = r, conn = conn, chunked = true, cleft = 0,
                          started = false, total = 0, max = max,
                          max_trailer = max_trailer, timeout = timeout,
                          key = key }, meta)
  elseif kind then
    -- (8 fields: the table is made at its size)
    return setmetatable({ r = r, conn = conn, left = kind, length = kind,
                          total = 0, max = max, timeout = timeout,
                          key = key }, meta)
  elseif kind == false then
    return setmetatable({ r = r, conn = conn, to_eof = true, total = 0,
                          max = max, timeout = timeout }, meta)
  end
  return nil, msg, match(msg, "^(%u+):")
end

M.Body = Body
M.empty = EMPTY
M.framing = framing
M.open_body = open_body
M.open_response_body = open_response_body
M.valid_exts = valid_exts

return M
