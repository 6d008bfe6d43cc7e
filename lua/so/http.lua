--[[
** so.http: an HTTP/1.1 server on so.reader (see docs/http.md).
**
**   local http = require "so.http"
**   local srv = assert(http.listen("127.0.0.1", 8080, function(req, body)
**     return { status = 200, headers = { ["Content-Type"] = "text/plain" },
**              body = "hello world\n" }
**   end))
**   srv:serve()
**
** One task per connection. A request head is found with one plain search
** for CRLFCRLF over the buffered bytes and cut into lines with plain
** searches; a line seen before (the same request line or Host header from
** the same client) is looked up in a bounded cache instead of being matched
** again. Request bodies are streamed through a body reader, never buffered
** whole. A response's head and body leave in one so.write.
]]

local so = require "so"
local reader = require "so.reader"

local find, match, sub, lower, format, byte, gmatch =
  string.find, string.match, string.sub, string.lower, string.format,
  string.byte, string.gmatch
local concat, unpack = table.concat, table.unpack
local type, pairs, next, tostring, tonumber, setmetatable, rawget, xpcall,
      pcall, error =
  type, pairs, next, tostring, tonumber, setmetatable, rawget, xpcall,
  pcall, error
local traceback = debug.traceback
local so_write, so_now, so_close, so_shutdown, so_settimeout, so_read =
  so.write, so.now, so.close, so.shutdown, so.settimeout, so.read

local M = {}

M.reasons = {
  [100] = "Continue", [101] = "Switching Protocols",
  [200] = "OK", [201] = "Created", [202] = "Accepted",
  [203] = "Non-Authoritative Information", [204] = "No Content",
  [205] = "Reset Content", [206] = "Partial Content",
  [300] = "Multiple Choices", [301] = "Moved Permanently", [302] = "Found",
  [303] = "See Other", [304] = "Not Modified", [307] = "Temporary Redirect",
  [308] = "Permanent Redirect",
  [400] = "Bad Request", [401] = "Unauthorized", [402] = "Payment Required",
  [403] = "Forbidden", [404] = "Not Found", [405] = "Method Not Allowed",
  [406] = "Not Acceptable", [408] = "Request Timeout", [409] = "Conflict",
  [410] = "Gone", [411] = "Length Required", [412] = "Precondition Failed",
  [413] = "Content Too Large", [414] = "URI Too Long",
  [415] = "Unsupported Media Type", [416] = "Range Not Satisfiable",
  [417] = "Expectation Failed", [418] = "I'm a teapot",
  [421] = "Misdirected Request", [422] = "Unprocessable Content",
  [426] = "Upgrade Required", [428] = "Precondition Required",
  [429] = "Too Many Requests", [431] = "Request Header Fields Too Large",
  [500] = "Internal Server Error", [501] = "Not Implemented",
  [502] = "Bad Gateway", [503] = "Service Unavailable",
  [504] = "Gateway Timeout", [505] = "HTTP Version Not Supported",
}

-- Defaults of the options of http.listen and http.serve_conn.
M.defaults = {
  max_head = 8192,            -- bytes of request line and headers (431)
  max_headers = 100,          -- header lines (431)
  max_body = 1024 * 1024,     -- request body bytes (413); false: no limit
  header_timeout = 10,        -- seconds for a whole request head (408)
  keepalive_timeout = 5,      -- seconds idle between requests
  timeout = 60,               -- seconds for each body read or write
  max_requests = false,       -- requests per connection; false: no limit
  drain = 64 * 1024,          -- unread body bytes drained to keep alive
  linger = 1,                 -- seconds to drain input before a close
  log = false,                -- function(msg); default: stderr
}

-- Status lines, built once.
local STATUS_LINE = setmetatable({}, { __index = function(t, status)
  if type(status) ~= "number" or status < 100 or status > 999
     or status % 1 ~= 0 then
    return nil
  end
  local line = format("HTTP/1.1 %d %s\r\n", status,
                      M.reasons[status] or "Unknown")
  t[status] = line
  return line
end })

--[[
** The Date header, built again only when the wall clock's second changes
** (os.time is a vDSO call).
]]
local date_sec, date_line = -1, nil
local function date_header()
  local t = os.time()
  if t ~= date_sec then
    date_sec = t
    date_line = "Date: " .. os.date("!%a, %d %b %Y %H:%M:%S GMT", t) .. "\r\n"
  end
  return date_line
end
M.date_header = date_header

local function default_log(msg)
  io.stderr:write(msg, "\n")
  io.stderr:flush()
end

local function log_error(o, what, err)
  (o.log or default_log)(what .. ": " .. tostring(err))
end

-- Content-Length lines of small sizes, built once.
local CL_LINE = setmetatable({}, { __index = function(t, n)
  local line = "Content-Length: " .. n .. "\r\n"
  if type(n) == "number" and n <= 65536 then t[n] = line end
  return line
end })

local TCHAR = "[!#$%%&'*+%-.^_`|~%w]"
local TOKEN = "^" .. TCHAR .. "+$"
local REQUEST_LINE = "^(" .. TCHAR .. "+) ([!-~]+) HTTP/(%d)%.(%d)$"
local ANY_VERSION = "^" .. TCHAR .. "+ [!-~]+ HTTP/%d+%.%d+$"
local HEADER_LINE = "^(" .. TCHAR .. "+):[ \t]*(.-)[ \t]*$"
local BAD_VALUE = "[%z\1-\8\10-\31\127]"

--[[
** Bounded caches of parsed lines: a line is parsed once per client (wrk
** and browsers send the same request line and Host again and again). Each
** cache is dropped whole when it fills; a line longer than CACHE_LINE is
** never kept.
]]
local CACHE_MAX, CACHE_LINE = 2048, 256
local rl_cache, rl_n = {}, 0
local hl_cache, hl_n = {}, 0

--[[
** A request line: the metatable of the requests with that line, whose
** __index table holds method, target, version, path and query (and falls
** back to the Request methods); or nil, status. Requests then carry only
** their own fields.
]]
local Request = {}
Request.__index = Request
Request.__name = "so.http.request"

local function parse_request_line(line)
  local method, target, major, minor = match(line, REQUEST_LINE)
  if not method then
    if match(line, ANY_VERSION) then return nil, 505 end
    return nil, 400
  end
  if major ~= "1" then return nil, 505 end
  local path, query = target, nil
  if byte(target) == 47 then                   -- "/": origin form
    local q = find(target, "?", 2, true)
    if q then path, query = sub(target, 1, q - 1), sub(target, q + 1) end
  elseif find(target, "^%a[%w+.-]*://") then  -- absolute form
    local rest = match(target, "^%a[%w+.-]*://[^/?#]*(.*)$")
    if rest == "" or byte(rest) == 63 then rest = "/" .. rest end
    path = rest
    local q = find(rest, "?", 1, true)
    if q then path, query = sub(rest, 1, q - 1), sub(rest, q + 1) end
  end
  local fields = setmetatable({
    method = method, target = target, path = path, query = query,
    version = minor == "0" and "1.0" or "1.1",
  }, Request)
  return { __index = fields, __name = "so.http.request" }
end

-- A header line: { lname, value, name } or nil.
local function parse_header_line(line)
  local hl = hl_cache[line]
  if hl then return hl end
  local name, value = match(line, HEADER_LINE)
  if not name or find(value, BAD_VALUE) then return nil end
  hl = { lower(name), value, name }
  if #line <= CACHE_LINE then
    if hl_n >= CACHE_MAX then hl_cache, hl_n = {}, 0 end
    hl_cache[line] = hl
    hl_n = hl_n + 1
  end
  return hl
end

--[[
** Headers: keys are lower-case names; a lookup lower-cases its key, so
** req.headers["Content-Type"] works. Repeated headers are joined with ", "
** (req:header(name) gives them one by one).
]]
local HeadersMT = {
  __index = function(t, k)
    if type(k) == "string" then
      local lk = lower(k)
      if lk ~= k then return rawget(t, lk) end
    end
    return nil
  end,
  __name = "so.http.headers",
}

--[[
** Request: fields method, target, path, query, version ("1.1" or "1.0")
** (shared by the requests of one request line), headers, conn; methods
** each_header, header, peername.
]]

--[[
** req:each_header(): iterator over (name, value) of each header line in
** order, names as sent.
]]
function Request:each_header()
  local head, p = self.head, self.hpos
  return function()
    local e = find(head, "\r\n", p, true)
    if not e or e == p then return nil end
    local hl = parse_header_line(sub(head, p, e - 1))
    p = e + 2
    return hl[3], hl[2]
  end
end

-- req:header(name): every value of that header, in order, as results.
function Request:header(name)
  local lname = lower(name)
  local vals, n = {}, 0
  for k, v in self:each_header() do
    if lower(k) == lname then n = n + 1; vals[n] = v end
  end
  return unpack(vals, 1, n)
end

-- req:peername(): the client's host and port.
function Request:peername()
  return so.peername(self.conn)
end

--[[
** Parse a request head (ending with CRLFCRLF, leading CRLFs allowed).
** Returns req, fields (of its request line); false (only empty lines); or
** nil, status. req.headers has no metatable yet: the server looks up the
** headers it needs without going through __index.
]]
local head_cache, head_n = {}, 0
local HEAD_CACHE_MAX, HEAD_CACHE_LINE = 512, 512

local function parse_head(head, max_headers)
  local hc = head_cache[head]
  if hc and hc[3] <= max_headers then
    -- The same head as an earlier request: copy its parsed headers.
    local headers = {}
    for i = 4, #hc, 2 do headers[hc[i]] = hc[i + 1] end
    local meta = hc[1]
    return setmetatable({ headers = headers, head = head, hpos = hc[2],
                          conn = false }, meta), meta.__index
  end
  local p = 1
  local e = find(head, "\r\n", 1, true)
  if e == 1 then
    -- Empty lines before the request line: skip them.
    while byte(head, p) == 13 and byte(head, p + 1) == 10 do p = p + 2 end
    if p > #head then return false end
    e = find(head, "\r\n", p, true)
  end
  local last = #head - 1                        -- the final empty line
  local line = sub(head, p, e - 1)
  local meta = rl_cache[line]
  if not meta then
    local status
    meta, status = parse_request_line(line)
    if not meta then return nil, status end
    if #line <= CACHE_LINE then
      if rl_n >= CACHE_MAX then rl_cache, rl_n = {}, 0 end
      rl_cache[line] = meta
      rl_n = rl_n + 1
    end
  end
  p = e + 2
  local hpos = p
  local headers = {}
  local count = 0
  while p < last do
    e = find(head, "\r\n", p, true)
    line = sub(head, p, e - 1)
    local hl = hl_cache[line] or parse_header_line(line)
    if not hl then return nil, 400 end
    count = count + 1
    if count > max_headers then return nil, 431 end
    local lname = hl[1]
    local old = headers[lname]
    if old then
      if lname == "host" then return nil, 400 end  -- two Host lines
      headers[lname] = old .. ", " .. hl[2]
    else
      headers[lname] = hl[2]
    end
    p = e + 2
  end
  if #head <= HEAD_CACHE_LINE and count <= 32 then
    hc = { meta, hpos, count }
    for k, v in next, headers do hc[#hc + 1] = k; hc[#hc + 1] = v end
    if head_n >= HEAD_CACHE_MAX then head_cache, head_n = {}, 0 end
    head_cache[head] = hc
    head_n = head_n + 1
  end
  return setmetatable({ headers = headers, head = head, hpos = hpos,
                        conn = false }, meta), meta.__index
end

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
M.empty_body = EMPTY

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

--[[
** Send FIN first and drop what the client still sends for a moment: a
** close with unread input makes the kernel send RST, which may destroy the
** response before the client has read it.
]]
local function close_gracefully(conn, linger)
  if so_shutdown(conn) then
    so_settimeout(conn, linger)
    local seen = 0
    while seen < 1024 * 1024 do
      local data = so_read(conn)
      if not data or data == "" then break end
      seen = seen + #data
    end
  end
  so_close(conn)
end

-- An error response: short text body; the connection is closed after it.
local function send_error(conn, status)
  local text = (M.reasons[status] or "Error") .. "\n"
  so_write(conn, STATUS_LINE[status] .. date_header()
    .. "Content-Type: text/plain\r\n" .. CL_LINE[#text]
    .. "Connection: close\r\n\r\n" .. text)
end

--[[
** Response headers. A handler's header (name, value) becomes a line once:
** the lines are cached (bounded) by name and value, so that the constant
** headers most handlers return cost a lookup. NAME[name] is the lower-case
** name, or false for a name that is not a token.
]]
local NAME = {}
local line_cache, line_n = {}, 0
local SPECIAL = { ["content-length"] = true, ["date"] = true,
                  ["transfer-encoding"] = true, ["connection"] = true }

-- A header line not in the cache (or nil for a bad value).
local function header_line(k, v)
  if type(v) ~= "string" then
    if type(v) ~= "number" then return nil end
    v = tostring(v)
  end
  if find(v, BAD_VALUE) then return nil end
  local line = k .. ": " .. v .. "\r\n"
  if #line <= CACHE_LINE then
    if line_n >= CACHE_MAX then line_cache, line_n = {}, 0 end
    local byname = line_cache[k]
    if not byname then byname = {}; line_cache[k] = byname end
    byname[v] = line
    line_n = line_n + 1
  end
  return line
end

--[[
** Render a handler's headers. Returns lines, content-length (string or
** nil), close, or nil, message for a bad header.
]]
local function render_headers(headers)
  local lines, cl, close = "", nil, false
  for k, v in next, headers do
    local lk = NAME[k]
    if lk == nil then
      lk = type(k) == "string" and find(k, TOKEN) and lower(k) or false
      if type(k) == "string" and #k <= CACHE_LINE then NAME[k] = lk end
    end
    if not lk then return nil, "invalid header name " .. tostring(k) end
    if SPECIAL[lk] then
      if lk == "content-length" then
        cl = tostring(v)
        if not find(cl, "^%d+$") then
          return nil, "invalid Content-Length " .. cl
        end
      elseif lk == "connection" then
        close = find(lower(tostring(v)), "close", 1, true) and true or close
      end
    else
      local byname = line_cache[k]
      local line = byname and byname[v]
      if not line then
        if type(v) == "table" then
          line = ""
          for i = 1, #v do
            local one = header_line(k, v[i])
            if not one then return nil, "invalid value of header " .. k end
            line = line .. one
          end
        else
          line = header_line(k, v)
          if not line then return nil, "invalid value of header " .. k end
        end
      end
      lines = lines .. line
    end
  end
  return lines, cl, close
end

local function chunk_size(s)
  return format("%x\r\n", #s)
end

-- Whether b has a read method (raises for a userdata without __index).
local function has_read(b)
  if not b.read then error("no read method") end
end

-- Call a body source: a function, or an object with a read method.
local function source_of(b)
  if type(b) == "function" then return b end
  return function() return b:read() end
end

--[[
** The end of a response head: the connection's fate is decided when the
** head is written, from what was read of the request body by then.
]]
local function head_end(c, body, close)
  if not close and not body.done then
    local left = body.left
    if body.expect or body.err or (left and left > c.o.drain) then
      close = true
    end
  end
  c.keep = not close
  if close then return "Connection: close\r\n\r\n" end
  if c.version == "1.0" then return "Connection: keep-alive\r\n\r\n" end
  return "\r\n"
end

-- Small bodies are joined to their head: one string is cheaper to write.
local JOIN_MAX = 2048

--[[
** Write the response. Returns true (the connection stays open), false
** (close it), false, status (nothing was sent: answer with that status),
** or nil (failed after the head was sent: drop the connection).
]]
local function respond(c, req, body, status, headers, rbody)
  local conn, o = c.conn, c.o
  local status_line = STATUS_LINE[status]
  if not status_line then
    log_error(o, "bad response", "invalid status " .. tostring(status))
    return false, 500
  end
  local lines, cl, close = "", nil, not c.keep
  if headers then
    local hclose
    lines, cl, hclose = render_headers(headers)
    if not lines then
      log_error(o, "bad response", cl)
      return false, 500
    end
    close = close or hclose
  end
  local head_only = c.method == "HEAD"
  local tb = type(rbody)
  if status < 200 or status == 204 or status == 304 then
    rbody, tb = nil, "nil"
    if status ~= 304 then cl = nil end
  end
  if tb == "string" or tb == "nil" then
    local n = rbody and #rbody or 0
    local cl_line = ""
    if cl then cl_line = "Content-Length: " .. cl .. "\r\n"
    elseif status >= 200 and status ~= 204 and status ~= 304 then
      cl_line = CL_LINE[n]
    end
    local tail = "\r\n"
    if close or not body.done or c.version == "1.0" then
      tail = head_end(c, body, close)
    end
    local ok
    if head_only or n == 0 then
      ok = so_write(conn, status_line .. date_header() .. lines .. cl_line
                          .. tail)
    elseif n <= JOIN_MAX then
      ok = so_write(conn, status_line .. date_header() .. lines .. cl_line
                          .. tail .. rbody)
    else
      c.r:settimeout(o.timeout)
      ok = so_write(conn, { status_line .. date_header() .. lines .. cl_line
                            .. tail, rbody })
    end
    return ok and c.keep
  end
  if not (tb == "function" or ((tb == "table" or tb == "userdata")
                               and pcall(has_read, rbody))) then
    log_error(o, "bad response", "invalid body (" .. tb .. ")")
    return false, 500
  end
  -- Streamed.
  if not cl and tb == "table" and rbody.length
     and (rbody ~= body or not body.chunked) then
    cl = tostring(rbody.length)
  end
  local chunked = false
  local head = status_line .. date_header() .. lines
  if cl then
    head = head .. "Content-Length: " .. cl .. "\r\n"
  elseif c.version == "1.1" then
    chunked = true
    head = head .. "Transfer-Encoding: chunked\r\n"
  elseif not head_only then
    close = true
  end
  if head_only then
    return so_write(conn, head .. head_end(c, body, close)) and c.keep
  end
  -- The head leaves with the first chunk: a failure before it can still
  -- be answered with a status.
  c.r:settimeout(o.timeout)
  local src = source_of(rbody)
  local sent, want = 0, cl and tonumber(cl)
  local started = false
  while true do
    local ok, chunk, err = xpcall(src, traceback)
    local bad
    if not ok then
      bad = chunk
    elseif chunk == nil then
      if err ~= nil then bad = err else break end
    elseif type(chunk) ~= "string" then
      bad = "body source gave a " .. type(chunk)
    elseif chunk == "" then
      break
    elseif want and sent + #chunk > want then
      bad = "body longer than its Content-Length"
    end
    if bad then
      if not (body.status and rbody == body) then
        log_error(o, "response body failed", bad)
      end
      if not started then return false, body.status or 500 end
      return nil
    end
    sent = sent + #chunk
    local w
    if not started then
      started = true
      head = head .. head_end(c, body, close)
      if chunked then w = so_write(conn, { head, chunk_size(chunk), chunk, "\r\n" })
      else w = so_write(conn, { head, chunk }) end
    elseif chunked then
      w = so_write(conn, { chunk_size(chunk), chunk, "\r\n" })
    else
      w = so_write(conn, chunk)
    end
    if not w then return nil end
  end
  if want and sent ~= want then
    log_error(o, "response body failed", "body shorter than its Content-Length")
    if not started then return false, body.status or 500 end
    return nil
  end
  local ok = true
  if not started then
    head = head .. head_end(c, body, close)
    ok = so_write(conn, chunked and head .. "0\r\n\r\n" or head)
  elseif chunked then
    ok = so_write(conn, "0\r\n\r\n")
  end
  if not ok then return nil end
  return c.keep
end

--[[
** Run one request: handler, response, rest of the body drained. Returns
** true to go on with the connection.
]]
local function handle(c, req, body)
  local o = c.o
  local ok, res, h, b = xpcall(c.handler, traceback, req, body)
  local status, headers, rbody
  if not ok then
    if not body.status then log_error(o, "handler failed", res) end
    send_error(c.conn, body.status or 500)
    return false
  end
  local tr = type(res)
  if tr == "table" then
    status, headers, rbody = res.status or 200, res.headers, res.body
  elseif tr == "number" then
    status, headers, rbody = res, h, b
  elseif tr == "string" then
    status, rbody = 200, res
  else
    log_error(o, "handler failed", "returned " .. tr
              .. " (a response table expected)")
    send_error(c.conn, 500)
    return false
  end
  if body.status and not body.done then
    -- The handler met a bad body and answered anyway: the body's status.
    send_error(c.conn, body.status)
    return false
  end
  local keep, err_status = respond(c, req, body, status, headers, rbody)
  if keep == false and err_status then
    send_error(c.conn, err_status)
    return false
  end
  if not keep then return keep end
  if not body.done and not body:discard(o.drain) then return false end
  return true
end

local function normalize_opts(opts)
  local o = {}
  for k, v in pairs(M.defaults) do o[k] = v end
  if opts then for k, v in pairs(opts) do o[k] = v end end
  if not o.max_body then o.max_body = nil end
  if not o.log then o.log = nil end
  o.head_opts = { inclusive = true, limit = o.max_head }
  return o
end

--[[
** Serve one connection until it closes; close it. The common case, a whole
** head already buffered, is read from the reader's buffer directly.
]]
local function serve_conn(conn, handler, o)
  local _ <close> = conn               -- closed even if something raises
  local r = reader.new(conn)
  local c = { conn = conn, r = r, o = o, handler = handler, keep = true,
              version = "1.1", method = "GET" }
  local head_opts, max_headers, max_head = o.head_opts, o.max_headers,
                                           o.max_head
  local keepalive, header_timeout = o.keepalive_timeout, o.header_timeout
  local served = 0
  local graceful = true
  while true do
    local buf, pos = r.buf, r.pos
    if pos > #buf then
      -- Idle: wait for the next request (r:fill() inlined).
      if r.timeout ~= keepalive or r.dirty then r:settimeout(keepalive) end
      buf = so_read(conn)
      if not buf or buf == "" then graceful = false; break end
      pos = 1
      r.buf, r.pos = buf, 1
    end
    local head
    local e = find(buf, "\r\n\r\n", pos, true)
    if e and e - pos <= max_head then
      if e + 3 == #buf then
        head = pos == 1 and buf or sub(buf, pos)    -- the usual: one chunk
        r.buf, r.pos = "", 1
      else
        head = sub(buf, pos, e + 3)
        r.pos = e + 4
      end
    else
      -- The head is incomplete: read the rest before a deadline.
      r:setdeadline(so_now() + header_timeout)
      local err, x
      head, err, x = r:readuntil("\r\n\r\n", head_opts)
      r:setdeadline(nil)
      if not head then
        if err == "message too long" then send_error(conn, 431)
        elseif x == "ETIMEDOUT" then send_error(conn, 408)
        elseif err == "EOF" and x ~= "" and find(x, "[^\r\n]") then
          send_error(conn, 400)
        else graceful = false end
        break
      end
    end
    local req, f = parse_head(head, max_headers)
    if req then
      local headers, version = req.headers, f.version
      local body, status = EMPTY, nil
      if headers["content-length"] or headers["transfer-encoding"] then
        body, status = open_body(req, version, r, conn, o)
        if not body then send_error(conn, status); break end
      end
      local connection = headers.connection
      if version == "1.1" then
        if not headers.host then send_error(conn, 400); break end
        c.keep = not (connection and find(lower(connection), "close", 1, true))
      else
        c.keep = connection and find(lower(connection), "keep-alive", 1, true)
                 and not body.chunked and true or false
      end
      served = served + 1
      if o.max_requests and served >= o.max_requests then c.keep = false end
      c.version, c.method = version, f.method
      setmetatable(headers, HeadersMT)
      req.conn = conn
      if not handle(c, req, body) then break end
    elseif req == nil then
      send_error(conn, f)
      break
    end
  end
  if graceful then
    close_gracefully(conn, o.linger)
  else
    so_close(conn)
  end
end

--[[
** http.serve_conn(conn, handler [, opts]): serve one connection in the
** calling task until it closes; closes it.
]]
function M.serve_conn(conn, handler, opts)
  if type(handler) ~= "function" then
    error("bad argument #2 to 'serve_conn' (function expected)", 2)
  end
  return serve_conn(conn, handler, normalize_opts(opts))
end

--[[
** Server: http.listen(host, port, handler [, opts]) -> server or nil, msg,
** name. server:serve() accepts connections (one task each) until
** server:close().
]]
local Server = {}
Server.__index = Server
Server.__name = "so.http.server"

function M.listen(host, port, handler, opts)
  if type(handler) ~= "function" then
    error("bad argument #3 to 'listen' (function expected)", 2)
  end
  local l, err, name = so.listen(host, port, opts and opts.backlog)
  if not l then return nil, err, name end
  return setmetatable({ listener = l, handler = handler,
                        opts = normalize_opts(opts), closed = false }, Server)
end

function Server:sockname()
  return so.sockname(self.listener)
end

function Server:serve()
  local l, handler, o = self.listener, self.handler, self.opts
  while not self.closed do
    local conn, err = so.accept(l)
    if conn then
      so.spawn(serve_conn, conn, handler, o)
    elseif self.closed then
      break
    else
      log_error(o, "accept failed", err)
      so.sleep(0.01)
    end
  end
end

function Server:close()
  if not self.closed then
    self.closed = true
    so_close(self.listener)
  end
end
Server.__close = Server.close

return M
