--[[
** so.http.parse: the message heads of so.http, both directions (see
** docs/http.md): request lines (the server), status lines (the client),
** the header lines both share, the Request and headers metatables, and the
** bounded caches that let a line seen before cost one table lookup.
**
** Also the grammar the other parts share (TCHAR, TOKEN, BAD_VALUE, the
** field-line check of trailers) and the cache bounds (CACHE_MAX,
** CACHE_LINE), so that each is written once.
]]

local so = require "so"

local find, match, sub, lower, byte, format =
  string.find, string.match, string.sub, string.lower, string.byte,
  string.format
local unpack, concat = table.unpack, table.concat
local load = load
local type, next, setmetatable, rawget, tonumber =
  type, next, setmetatable, rawget, tonumber

local M = {}

local TCHAR = "[!#$%%&'*+%-.^_`|~%w]"
local TOKEN = "^" .. TCHAR .. "+$"
local REQUEST_LINE = "^(" .. TCHAR .. "+) ([!-~]+) HTTP/(%d)%.(%d)$"
local ANY_VERSION = "^" .. TCHAR .. "+ [!-~]+ HTTP/%d+%.%d+$"
local HEADER_LINE = "^(" .. TCHAR .. "+):[ \t]*(.-)[ \t]*$"
local BAD_VALUE = "[%z\1-\8\10-\31\127]"
-- A status line: version, status 100-599, and a reason phrase (HTAB, SP,
-- visible characters and obs-text); "HTTP/1.1 204" without one too.
local STATUS_LINE = "^HTTP/1%.(%d) ([1-5]%d%d) ([\t -~\128-\255]*)$"
local STATUS_ONLY = "^HTTP/1%.(%d) ([1-5]%d%d)$"

--[[
** Bounded caches of parsed lines: a line is parsed once per client (wrk
** and browsers send the same request line and Host again and again). Each
** cache is dropped whole when it fills; a line longer than CACHE_LINE is
** never kept.
]]
local CACHE_MAX, CACHE_LINE = 2048, 256
local rl_cache, rl_n = {}, 0
local hl_cache, hl_n = {}, 0
local sl_cache, sl_n = {}, 0

--[[
** A request line: the metatable of the requests with that line, whose
** __index table holds method, target, version, path and query (and falls
** back to the Request methods); or nil, status. Requests then carry only
** their own fields. meta.tlen is the target's length (for max_target).
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
  return { __index = fields, __name = "so.http.request", tlen = #target }
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
** Whether a line is a well-formed field line (a trailer): the grammar of
** header lines, without going through (or filling) their cache.
]]
local function field_line(line)
  local name, value = match(line, HEADER_LINE)
  return name ~= nil and not find(value, BAD_VALUE)
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
** The header lines of a head, from index p to the final empty line (at
** `last`), into the table headers. Returns their count, or nil, status
** (400: a malformed line; 431: more than max_headers). Shared by requests
** and responses: one grammar, one set of limits.
]]
local function parse_fields(head, p, last, max_headers, headers)
  local count = 0
  while p < last do
    local e = find(head, "\r\n", p, true)
    local line = sub(head, p, e - 1)
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
  return count
end

--[[
** Methods of requests and responses: each_header, header. Both keep their
** head (msg.head) and where its header lines start (msg.hpos).
]]

--[[
** msg:each_header(): iterator over (name, value) of each header line in
** order, names as sent.
]]
local function each_header(self)
  local head, p = self.head, self.hpos
  return function()
    local e = find(head, "\r\n", p, true)
    if not e or e == p then return nil end
    local hl = parse_header_line(sub(head, p, e - 1))
    p = e + 2
    return hl[3], hl[2]
  end
end

-- msg:header(name): every value of that header, in order, as results.
local function header(self, name)
  local lname = lower(name)
  local vals, n = {}, 0
  for k, v in each_header(self) do
    if lower(k) == lname then n = n + 1; vals[n] = v end
  end
  return unpack(vals, 1, n)
end

--[[
** Request: fields method, target, path, query, version ("1.1" or "1.0")
** (shared by the requests of one request line), headers, conn, reader
** (the server's so.reader on conn), hijacked (set by a handler that took
** the connection over); methods each_header, header, peername.
]]
Request.each_header = each_header
Request.header = header

-- req:peername(): the client's host and port.
function Request:peername()
  return so.peername(self.conn)
end

--[[
** The parsed headers of a cached head are copied for each message that
** repeats it (its table is the message's own). The copy is made by a
** function compiled for that head, once it is seen a second time: one
** table constructor with constant keys and values, which sizes the table
** at once (a loop of assignments would grow it step by step).
]]
local function constructor(kv)
  local parts, n = { "return function() return {" }, 1
  for i = 1, #kv, 2 do
    n = n + 1
    parts[n] = format("[%q]=%q,", kv[i], kv[i + 1])
  end
  parts[n + 1] = "} end"
  return load(concat(parts), "=(http head)", "t", {})()
end

-- A copy of the headers of cache entry hc ({..., kv, make}).
local function copy_headers(hc)
  local make = hc[5]
  if not make then
    make = constructor(hc[4])
    hc[5] = make
  end
  return make()
end

--[[
** Parse a request head (ending with CRLFCRLF, leading CRLFs allowed)
** under the limits o.max_headers and o.max_target, which the string lid
** names ("100/8192": a cached head was checked against the limits of that
** name, so that a hit costs one comparison). Returns req, fields (of its
** request line); false (only empty lines); or nil, status (414 for a
** target longer than max_target). req.headers has no metatable yet: the
** server looks up the headers it needs without going through __index.
]]
local head_cache, head_n = {}, 0
local HEAD_CACHE_MAX, HEAD_CACHE_LINE = 512, 512

local function parse_head(head, lid, o)
  local hc = head_cache[head]
  if hc and hc[3] == lid then
    -- The same head as an earlier request: copy its parsed headers.
    local make = hc[5]
    local headers = make and make() or copy_headers(hc)
    local meta = hc[1]
    return setmetatable({ headers = headers, head = head, hpos = hc[2],
                          conn = false, reader = false, hijacked = false },
                        meta), meta.__index
  end
  local p = 1
  local e = find(head, "\r\n", 1, true)
  if e == 1 then
    -- Empty lines before the request line: skip them.
    while byte(head, p) == 13 and byte(head, p + 1) == 10 do p = p + 2 end
    if p > #head then return false end
    e = find(head, "\r\n", p, true)
  end
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
  if meta.tlen > o.max_target then return nil, 414 end
  local hpos = e + 2
  local headers = {}
  local count, status = parse_fields(head, hpos, #head - 1, o.max_headers,
                                     headers)
  if not count then return nil, status end
  if #head <= HEAD_CACHE_LINE and count <= 32 then
    local kv = {}
    for k, v in next, headers do kv[#kv + 1] = k; kv[#kv + 1] = v end
    hc = { meta, hpos, lid, kv, false }
    if head_n >= HEAD_CACHE_MAX then head_cache, head_n = {}, 0 end
    head_cache[head] = hc
    head_n = head_n + 1
  end
  return setmetatable({ headers = headers, head = head, hpos = hpos,
                        conn = false, reader = false, hijacked = false },
                      meta), meta.__index
end

--[[
** A status line: { status, reason, version } or nil. Versions: "1.0", and
** "1.1" for any other HTTP/1.x.
]]
local function parse_status_line(line)
  local sl = sl_cache[line]
  if sl then return sl end
  local minor, status, reason = match(line, STATUS_LINE)
  if not minor then
    minor, status = match(line, STATUS_ONLY)
    if not minor then return nil end
    reason = ""
  end
  sl = { tonumber(status), reason, minor == "0" and "1.0" or "1.1" }
  if #line <= CACHE_LINE then
    if sl_n >= CACHE_MAX then sl_cache, sl_n = {}, 0 end
    sl_cache[line] = sl
    sl_n = sl_n + 1
  end
  return sl
end

--[[
** Parse a response head (ending with CRLFCRLF). Returns status, reason,
** version, headers (lower-case keys; no metatable yet), hpos; or nil, msg.
** The header lines go through parse_fields, as a request's do; whole
** heads are cached as requests' are (a server repeats its head within a
** second: only Date changes).
]]
local rhead_cache, rhead_n = {}, 0

local function parse_response_head(head, max_headers)
  local hc = rhead_cache[head]
  if hc and hc[3] <= max_headers then
    local sl, make = hc[1], hc[5]
    return sl[1], sl[2], sl[3], make and make() or copy_headers(hc), hc[2]
  end
  local e = find(head, "\r\n", 1, true)
  local sl = parse_status_line(sub(head, 1, e - 1))
  if not sl then return nil, "EPROTO: bad status line" end
  local hpos = e + 2
  local headers = {}
  local count, status = parse_fields(head, hpos, #head - 1, max_headers,
                                     headers)
  if not count then
    if status == 431 then
      return nil, "EMSGSIZE: more than max_headers (" .. max_headers
                  .. ") header lines in the response"
    end
    return nil, "EPROTO: bad header line in the response"
  end
  if #head <= HEAD_CACHE_LINE and count <= 32 then
    local kv = {}
    for k, v in next, headers do kv[#kv + 1] = k; kv[#kv + 1] = v end
    hc = { sl, hpos, count, kv, false }
    if rhead_n >= HEAD_CACHE_MAX then rhead_cache, rhead_n = {}, 0 end
    rhead_cache[head] = hc
    rhead_n = rhead_n + 1
  end
  return sl[1], sl[2], sl[3], headers, hpos
end

M.TCHAR, M.TOKEN, M.BAD_VALUE = TCHAR, TOKEN, BAD_VALUE
M.CACHE_MAX, M.CACHE_LINE = CACHE_MAX, CACHE_LINE
M.Request = Request
M.HeadersMT = HeadersMT
M.parse_head = parse_head
M.parse_response_head = parse_response_head
M.field_line = field_line
M.header, M.each_header = header, each_header

return M
