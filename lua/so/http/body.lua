--[[
** so.http.body: the request body reader of so.http (see docs/http.md):
** Content-Length and chunked bodies, streamed and never buffered whole,
** with their limits, and Expect: 100-continue, answered on the first read.
]]

local so = require "so"
local parse = require "so.http.parse"

local find, match, lower, byte, gmatch =
  string.find, string.match, string.lower, string.byte, string.gmatch
local concat = table.concat
local tonumber, setmetatable, error = tonumber, setmetatable, error
local so_write = so.write
local TCHAR = parse.TCHAR

local M = {}

--[[
** Body: streams the request body. body:read([max]) gives the next bytes
** (at most max, default 64 KiB), "" at the end, or nil, msg, name; then
** body.status is the status the server answers with, if it still can.
]]
local Body = {}
Body.__index = Body
Body.__name = "so.http.body"

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
  self.status, self.err, self.errname = status, msg, name
  return nil, msg, name
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
  local hex, ext = match(line, "^(%x+)[ \t]*(.*)$")
  if not hex or (ext ~= "" and byte(ext) ~= 59) or #hex > 15 then  -- ";"
    return body_fail(self, 400, "EPROTO: bad chunk size", "EPROTO")
  end
  local size = tonumber(hex, 16)
  if size == 0 then
    -- Trailer fields, then the final empty line: read and ignore them.
    local total = 0
    repeat
      local t
      t, err, x = r:readuntil("\r\n", CHUNK_LINE)
      if not t then return body_readfail(self, err, x) end
      total = total + #t + 2
      if total > self.max_trailer then
        return body_fail(self, 431, "EPROTO: trailers too large", "EPROTO")
      end
      if t ~= "" and not match(t, "^" .. TCHAR .. "+:") then
        return body_fail(self, 400, "EPROTO: bad trailer", "EPROTO")
      end
    until t == ""
    self.done = true
    return 0
  end
  local max = self.max
  if max and self.total + size > max then
    return body_fail(self, 413, "EMSGSIZE: request body too large",
                     "EMSGSIZE")
  end
  self.cleft = size
  return size
end

function Body:read(max)
  if self.done then return "" end
  if self.err then return nil, self.err, self.errname end
  local r = self.r
  r:settimeout(self.timeout)
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
    n = self.left
  end
  if n > max then n = max end
  local data, err, x = r:readsome(n)
  if not data then return body_readfail(self, err, x) end
  local len = #data
  self.total = self.total + len
  if self.chunked then
    self.cleft = self.cleft - len
  else
    local left = self.left - len
    self.left = left
    if left == 0 then self.done = true end
  end
  return data
end

--[[
** body:readall([limit]): the whole body as one string (at most limit
** bytes, default the server's max_body), or nil, msg, name.
]]
function Body:readall(limit)
  limit = limit or self.max or math.huge
  local parts, n, size = {}, 0, 0
  while true do
    local data, err, name = self:read()
    if not data then return nil, err, name end
    if data == "" then return concat(parts, "", 1, n) end
    size = size + #data
    if size > limit then
      return body_fail(self, 413, "EMSGSIZE: request body too large",
                       "EMSGSIZE")
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

-- The body of a request that has none: shared, stateless.
local EMPTY = setmetatable({ done = true, length = 0, total = 0 }, Body)

-- The body of a request, or nil, status.
local function open_body(req, version, r, conn, o)
  local headers = req.headers
  local te = headers["transfer-encoding"]
  local cl = headers["content-length"]
  local body
  if te then
    if cl then return nil, 400 end               -- request smuggling
    if lower(te) ~= "chunked" then return nil, 501 end
    body = setmetatable({ r = r, conn = conn, chunked = true, cleft = 0,
                          started = false, total = 0, max = o.max_body,
                          max_trailer = o.max_head, timeout = o.timeout },
                        Body)
  elseif cl then
    if not find(cl, "^%d+$") then
      -- "5, 5" from repeated or listed values: all must be the same.
      local first
      for v in gmatch(cl .. ",", "([^,]*),") do
        v = match(v, "^[ \t]*(%d+)[ \t]*$")
        if not v or (first and tonumber(v) ~= tonumber(first)) then
          return nil, 400
        end
        first = v
      end
      cl = first
    end
    local n = tonumber(cl)
    if o.max_body and n > o.max_body then return nil, 413 end
    if n == 0 then return EMPTY end
    body = setmetatable({ r = r, conn = conn, left = n, length = n,
                          total = 0, max = o.max_body, timeout = o.timeout },
                        Body)
  else
    return EMPTY
  end
  local expect = headers.expect
  if expect then
    if lower(expect) ~= "100-continue" then return nil, 417 end
    if version == "1.1" then body.expect = true end
  end
  return body
end

M.Body = Body
M.empty = EMPTY
M.open_body = open_body

return M
