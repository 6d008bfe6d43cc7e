--[[
** so.http.static: http.static(dir [, opts]), a handler serving the files
** under dir, as nginx's static module does: Content-Type by extension,
** index.html for a directory, conditional requests (ETag, Last-Modified),
** byte ranges (RFC 9110 §14). A small file is read whole when opened; a
** larger one goes by sendfile on a plain conn, else in chunks as the
** socket takes them, never whole.
**
** Nothing outside dir is reachable: the path is decoded once and refused
** (403) when it holds an encoded "/", a NUL, a backslash, bytes that are
** not UTF-8 (overlong forms of "." included) or a "." or ".." segment;
** and fs.open_beneath refuses a path whose links lead outside dir.
]]

local so = require "so"
local fs = require "so.fs"
local mime = require "so.http.mime"
local memo = require "so.http.memo"

local find, sub, gsub, match, gmatch, lower, format, char =
  string.find, string.sub, string.gsub, string.match, string.gmatch,
  string.lower, string.format, string.char
local floor, tonumber, type, pairs, ipairs, concat, setmetatable =
  math.floor, tonumber, type, pairs, ipairs, table.concat, setmetatable
local utf8len = utf8.len

local M = {}

local SLURP = 64 * 1024   -- a file up to this size is read whole at open
local SPAN = 16 * 1024 * 1024  -- at most, in one sendfile (one timeout)
local ROOT_TTL = 1        -- seconds the root directory stays open
local MAX_RANGES = 16     -- more in one request: the whole file (as nginx)

local TEXT = { ["Content-Type"] = "text/plain; charset=utf-8" }
local function status_only(status, text, headers)
  return { status = status, headers = headers or TEXT, body = text }
end

-- {======================================================
-- Paths
-- =======================================================

local function hexchar(h) return char(tonumber(h, 16)) end

--[[
** The request path decoded, as segments under the root; nil, status for
** a path that must not be served.
]]
local function safe_path(path)
  -- The common case, in four scans: unreserved characters and "/" only,
  -- no empty, "." or ".." segment. It is its own answer.
  if not find(path, "[^A-Za-z0-9/._~-]") and sub(path, 1, 1) == "/"
     and not find(path, "//", 1, true) and not find(path, "/%.%.?/")
     and not find(path, "/%.%.?$") then
    return match(path, "^/(.-)/?$")
  end
  if find(path, "[%z\\]") then return nil, 403 end
  if find(path, "%%%X") or find(path, "%%%x%X") or find(path, "%%%x?$") then
    return nil, 400
  end
  if find(path, "%%2[fF]") or find(path, "%%5[cC]") or find(path, "%%00") then
    return nil, 403  -- an encoded "/", "\" or NUL: not a name
  end
  local decoded = gsub(path, "%%(%x%x)", hexchar)
  if not utf8len(decoded) then return nil, 403 end  -- overlong "." too
  local segs = {}
  for seg in gmatch(decoded, "[^/]+") do
    if seg == "." or seg == ".." then return nil, 403 end
    segs[#segs + 1] = seg
  end
  return concat(segs, "/")
end

-- }======================================================


-- {======================================================
-- Dates, validators
-- =======================================================

local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6,
                 Jul = 7, Aug = 8, Sep = 9, Oct = 10, Nov = 11, Dec = 12 }

-- Seconds since the epoch of a UTC date (days from civil, no time zone).
local function timegm(y, m, d, hh, mm, ss)
  if m <= 2 then y, m = y - 1, m + 12 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * (m - 3) + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return ((era * 146097 + doe - 719468) * 24 + hh) * 60 * 60 + mm * 60 + ss
end

--[[
** An HTTP date (RFC 9110 §5.6.7: IMF-fixdate, or the obsolete RFC 850
** and asctime forms) as seconds, or nil.
]]
local function parse_date(s)
  if not s then return nil end
  local d, mon, y, hh, mm, ss =
    match(s, "^%a%a%a, (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT$")
  if not d then
    d, mon, y, hh, mm, ss =
      match(s, "^%a+, (%d%d)%-(%a%a%a)%-(%d%d) (%d%d):(%d%d):(%d%d) GMT$")
    if y then y = tonumber(y) + (tonumber(y) < 70 and 2000 or 1900) end
  end
  if not d then
    mon, d, hh, mm, ss, y =
      match(s, "^%a%a%a (%a%a%a) +(%d%d?) (%d%d):(%d%d):(%d%d) (%d%d%d%d)$")
  end
  if not d or not MONTHS[mon] then return nil end
  return timegm(tonumber(y), MONTHS[mon], tonumber(d), tonumber(hh),
                tonumber(mm), tonumber(ss))
end

--[[
** HTTP dates of seconds, remembered: glibc's strftime reads /etc/localtime
** again at every call (seven system calls), and files share a few mtimes.
]]
local HTTP_DATE = memo(1024, function(t)
  return os.date("!%a, %d %b %Y %H:%M:%S GMT", t)
end)

-- A strong validator from the size and the modification time.
local function etag_of(st)
  return format('"%x-%x"', floor(st.mtime * 1e6), st.size)
end

--[[
** Whether an If-None-Match list holds etag (weak comparison, §13.1.2):
** false, or the tag matched, which may be the gzip coding's (see
** so.http.gzip): a 304 carries the validator of what the client has.
]]
local function none_match(list, etag)
  if match(list, "^%s*%*%s*$") then return etag end
  local opaque = sub(etag, 2, -2)
  for tag in gmatch(list, '"([^"]*)"') do
    if tag == opaque then return etag end
    if tag == opaque .. "-gzip" then return '"' .. tag .. '"' end
  end
  return false
end

-- }======================================================


-- {======================================================
-- Ranges
-- =======================================================

--[[
** The ranges of a Range header for a file of size bytes: an array of
** {first, last}; "unsatisfiable"; or nil (no usable header: the whole
** file, as RFC 9110 asks for a header it cannot parse).
]]
local function parse_ranges(h, size)
  local spec = match(h, "^%s*bytes%s*=%s*(.-)%s*$")
  if not spec or spec == "" then return nil end
  local ranges, n = {}, 0
  for part in gmatch(spec .. ",", "([^,]*),") do
    part = match(part, "^%s*(.-)%s*$")
    if part ~= "" then
      local a, b = match(part, "^(%d*)%-(%d*)$")
      if not a or (a == "" and b == "") then return nil end
      local first, last
      if a == "" then                     -- the last b bytes
        local len = tonumber(b)
        if len > 0 then first, last = size - len, size - 1 end
        if first and first < 0 then first = 0 end
      else
        first = tonumber(a)
        last = b == "" and size - 1 or tonumber(b)
        if b ~= "" and last < first then return nil end  -- invalid: ignored
        if last > size - 1 then last = size - 1 end
      end
      if first and first < size and first <= last then
        n = n + 1
        if n > MAX_RANGES then return nil end
        ranges[n] = { first, last }
      end
    end
  end
  if n == 0 then return "unsatisfiable" end
  -- More bytes than the file has (overlaps, repeats): the whole file, as
  -- nginx sends it; a short request must not ask for many times the file.
  local total = 0
  for k = 1, n do total = total + ranges[k][2] - ranges[k][1] + 1 end
  if total > size then return nil end
  return ranges
end

-- }======================================================


--[[
** A body source for the items of an open file: strings (multipart's part
** heads) as they are, {first, last} ranges as spans of the file (so.http
** sends them by sendfile, or reads them where it cannot). A callable table
** whose __close closes the file: so.http closes it when the response
** ends, sent or cut by the client.
]]
local function file_source(file, items)
  local i, pos = 1, nil
  local function next_piece()
    while true do
      local item = items[i]
      if item == nil then
        file:close()
        return nil
      end
      if type(item) == "string" then
        i = i + 1
        return item
      end
      pos = pos or item[1]
      if pos > item[2] then
        i, pos = i + 1, nil
      else
        local n = item[2] - pos + 1
        if n > SPAN then n = SPAN end
        local span = { file = file, offset = pos, length = n }
        pos = pos + n
        return span
      end
    end
  end
  return setmetatable({}, {
    __call = next_piece,
    __close = function() file:close() end,  -- (read-only: at once)
  })
end

--[[
** The body of the items when the file was read whole into data: one
** string, or its pieces for multipart.
]]
local function data_body(data, items)
  local out = {}
  for k, item in ipairs(items) do
    out[k] = type(item) == "string" and item
             or sub(data, item[1] + 1, item[2] + 1)
  end
  return concat(out)
end

local function boundary()
  return format("%08x%08x", math.random(0, 0x7fffffff),
                math.random(0, 0x7fffffff))
end

--[[
** http.static(dir [, opts]) -> handler. opts: types (extension -> type,
** added to so.http.mime's), cache_control (the Cache-Control value),
** index ("index.html").
]]
function M.static(dir, opts)
  if type(dir) ~= "string" then
    error("bad argument #1 to 'static' (string expected, got " .. type(dir)
          .. ")", 2)
  end
  opts = opts or {}
  local types = setmetatable({}, { __index = mime })
  for k, v in pairs(opts.types or {}) do types[lower(k)] = v end
  local index = opts.index or "index.html"
  local cache_control = opts.cache_control

  local function headers_for(name, st)
    local ext = lower(match(name, "%.([^./]+)$") or "")
    local h = {
      ["Content-Type"] = types[ext] or types.default,
      ["ETag"] = etag_of(st),
      ["Last-Modified"] = HTTP_DATE[floor(st.mtime)],
      ["Accept-Ranges"] = "bytes",
    }
    if cache_control then h["Cache-Control"] = cache_control end
    return h
  end

  --[[
  ** dir, open: files are opened relative to it, which saves resolving dir
  ** again for every request (two system calls of the six). It is opened
  ** again after ROOT_TTL seconds, so that a dir replaced by a deploy
  ** (renamed over, or a link switched) is served within that time; dir as
  ** a path while it cannot be opened (the error is then open_beneath's).
  ]]
  local root, root_at
  local function root_file()
    local now = so.now()
    if root_at and now - root_at < ROOT_TTL then return root or dir end
    -- This request opens it again; those that come meanwhile go on with
    -- the old one (closing it is safe: open_beneath holds it only inside
    -- the call, and the pool gets a dup).
    root_at = now
    local f = fs.open(dir)
    if root then root:close() end
    root = f
    return f or dir
  end

  -- The status for a failed open_beneath, as nginx's static module: what
  -- is not there, what may not be reached, and the server's own trouble
  -- (EMFILE, EIO, ENOMEM, ...).
  local function refused(name)
    if name == "ENOENT" or name == "ENOTDIR" or name == "ENAMETOOLONG" then
      return 404
    elseif name == "EXDEV" or name == "EACCES" or name == "EPERM"
           or name == "ELOOP" then
      return 403
    end
    return 500
  end

  --[[
  ** The file to serve: its name (for the type), the open file (closed
  ** when read whole), stat, data (the contents, for a small file); or nil,
  ** status.
  ]]
  local function find_file(path)
    local rel, status = safe_path(path)
    if not rel then return nil, status end
    local file, st, data = fs.open_beneath(root_file(), rel, SLURP)
    if not file then return nil, refused(data) end
    if st.mode == "directory" then
      file:close()
      if sub(path, -1) ~= "/" then return nil, 301 end
      rel = rel == "" and index or rel .. "/" .. index
      file, st, data = fs.open_beneath(root_file(), rel, SLURP)
      if not file then return nil, 404 end
    elseif sub(path, -1) == "/" then  -- a file named as a directory
      file:close()
      return nil, 404                 -- (ENOTDIR, as nginx has it)
    end
    if st.mode ~= "file" then
      file:close()
      return nil, 403
    end
    return rel, file, st, data
  end

  return function(req)
    local method = req.method
    if method ~= "GET" and method ~= "HEAD" then
      return { status = 405, body = "method not allowed\n",
               headers = { ["Allow"] = "GET, HEAD",
                           ["Content-Type"] = TEXT["Content-Type"] } }
    end
    local name, file, st, data = find_file(req.path)
    if not name then
      local status = file
      if status == 301 then
        local loc = req.path .. "/" .. (req.query and "?" .. req.query or "")
        return { status = 301, body = "moved\n",
                 headers = { ["Location"] = loc,
                             ["Content-Type"] = TEXT["Content-Type"] } }
      end
      local text = status == 404 and "not found\n"
                   or status == 403 and "forbidden\n"
                   or status == 400 and "bad request\n" or "error\n"
      return status_only(status, text)
    end
    local headers = headers_for(name, st)
    local etag, rh = headers.ETag, req.headers
    -- Conditional requests (RFC 9110 §13.2.2): If-None-Match wins.
    local inm = rh["if-none-match"]
    local not_modified
    if inm then
      not_modified = none_match(inm, etag)
    else
      local ims = parse_date(rh["if-modified-since"])
      not_modified = ims ~= nil and floor(st.mtime) <= ims
    end
    if not_modified then
      file:close()
      headers["Content-Type"], headers["Accept-Ranges"] = nil, nil
      if not_modified ~= true and not_modified ~= etag then
        headers.ETag = not_modified  -- the gzip coding's: it varies
        headers.Vary = "Accept-Encoding"
      end
      return { status = 304, headers = headers }
    end
    local size = st.size
    local range = rh.range
    local ranges
    if range and method == "GET" then
      local ir = rh["if-range"]
      local fresh = true
      if ir then
        if sub(ir, 1, 1) == '"' then fresh = ir == etag
        else fresh = parse_date(ir) == floor(st.mtime) end
      end
      if fresh then ranges = parse_ranges(range, size) end
    end
    if ranges == "unsatisfiable" then
      file:close()
      return { status = 416, body = "range not satisfiable\n",
               headers = { ["Content-Range"] = "bytes */" .. size,
                           ["Content-Type"] = TEXT["Content-Type"] } }
    end
    -- The body of items: from data, or the file (for HEAD, a source that
    -- is never called, for its length; so.http.gzip may take it).
    local function body_of(items)
      if data then return data_body(data, items) end
      if method == "HEAD" then file:close(); return function() end end
      return file_source(file, items)
    end
    if not ranges then
      headers["Content-Length"] = size
      return { status = 200, headers = headers,
               body = data or body_of({ { 0, size - 1 } }) }
    end
    if #ranges == 1 then
      local r = ranges[1]
      headers["Content-Range"] = format("bytes %d-%d/%d", r[1], r[2], size)
      headers["Content-Length"] = r[2] - r[1] + 1
      return { status = 206, headers = headers, body = body_of({ r }) }
    end
    -- Several: multipart/byteranges, its length known in advance.
    local b = boundary()
    local ctype = headers["Content-Type"]
    local total, items = 0, {}
    for i, r in ipairs(ranges) do
      local head = format("%s--%s\r\nContent-Type: %s\r\n"
                          .. "Content-Range: bytes %d-%d/%d\r\n\r\n",
                          i == 1 and "" or "\r\n", b, ctype, r[1], r[2],
                          size)
      items[#items + 1] = head
      items[#items + 1] = r
      total = total + #head + r[2] - r[1] + 1
    end
    local closing = "\r\n--" .. b .. "--\r\n"
    items[#items + 1] = closing
    total = total + #closing
    headers["Content-Type"] = "multipart/byteranges; boundary=" .. b
    headers["Content-Length"] = total
    return { status = 206, headers = headers, body = body_of(items) }
  end
end

M.parse_ranges = parse_ranges
M.parse_date = parse_date
M.safe_path = safe_path

return M
