--[[
** so.http.parse: the request head of so.http (see docs/http.md): the
** request line, header lines, the Request and headers metatables, and the
** bounded caches that let a line seen before cost one table lookup.
**
** Also the grammar the other parts share (TCHAR, TOKEN, BAD_VALUE) and the
** cache bounds (CACHE_MAX, CACHE_LINE), so that each is written once.
]]

local so = require "so"

local find, match, sub, lower, byte =
  string.find, string.match, string.sub, string.lower, string.byte
local unpack = table.unpack
local type, next, setmetatable, rawget = type, next, setmetatable, rawget

local M = {}

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

M.TCHAR, M.TOKEN, M.BAD_VALUE = TCHAR, TOKEN, BAD_VALUE
M.CACHE_MAX, M.CACHE_LINE = CACHE_MAX, CACHE_LINE
M.Request = Request
M.HeadersMT = HeadersMT
M.parse_head = parse_head

return M
