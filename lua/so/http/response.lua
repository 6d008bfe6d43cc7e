--[[
** so.http.response: what so.http writes (see docs/http.md): status lines,
** the Date header, handlers' headers rendered through a bounded cache, a
** response with a string, function or reader body in as few so.writes as
** it can, and error responses. Also the log of bad responses.
]]

local so = require "so"
local fs = require "so.fs"
local parse = require "so.http.parse"

local find, lower, upper, format, gsub =
  string.find, string.lower, string.upper, string.format, string.gsub
local type, next, tostring, tonumber, setmetatable, getmetatable, xpcall,
  pcall, error = type, next, tostring, tonumber, setmetatable, getmetatable,
  xpcall, pcall, error
local traceback = debug.traceback
local so_write = so.write
local fs_sendfile = fs.sendfile
local spans = require "so.http.span"
local bad_span, span_chunks = spans.bad, spans.chunks
local tointeger = math.tointeger
local TOKEN, BAD_VALUE = parse.TOKEN, parse.BAD_VALUE
local CACHE_MAX, CACHE_LINE = parse.CACHE_MAX, parse.CACHE_LINE

local M = {}

--[[
** Reason phrases, read when a status line is first built: so.http exports
** this very table as http.reasons.
]]
local reasons = {
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

-- Status lines, built once; nil for what is not an integer 100-599.
local STATUS_LINE = setmetatable({}, { __index = function(t, status)
  if type(status) ~= "number" or status < 100 or status > 599
     or status % 1 ~= 0 then
    return nil
  end
  local line = format("HTTP/1.1 %d %s\r\n", status,
                      reasons[status] or "Unknown")
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

-- The log of handler errors and bad responses (opts.log): the host's.
local function default_log(msg)
  so.log("error", "%s", msg)
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

-- An error response: short text body; the connection is closed after it.
local function send_error(conn, status)
  local text = (reasons[status] or "Error") .. "\n"
  so_write(conn, STATUS_LINE[status] .. date_header()
    .. "Content-Type: text/plain\r\n" .. CL_LINE[#text]
    .. "Connection: close\r\n\r\n" .. text)
end

--[[
** Response headers. A handler's header (name, value) becomes a line once:
** the lines are cached (bounded) by name and value, so that the constant
** headers most handlers return cost a lookup. NAME[name] is the lower-case
** name of a name spelled in the canonical case (see lname_of below).
]]
local NAME, name_n = {}, 0
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

-- The canonical case of a lower-case name: Content-Type, Www-Authenticate
-- (cached, bounded).
local CANON, canon_n = {}, 0
local function canonical(lk)
  local c = CANON[lk]
  if c then return c end
  c = gsub(gsub(lk, "^%l", upper), "%-%l", upper)
  if #lk <= CACHE_LINE then
    if canon_n >= CACHE_MAX then CANON, canon_n = {}, 0 end
    CANON[lk] = c
    canon_n = canon_n + 1
  end
  return c
end

--[[
** Whether the odd (non-canonical) key k of lower-case name lk shares its
** name with another key of headers: the canonical spelling, or another
** odd key (odd keys of one rendering are stamped with its number g in
** `seen`, which is dropped whole when it grows past CACHE_MAX).
]]
local seen, seen_n = {}, 0
local function twice(headers, k, lk, g)
  local c = canonical(lk)
  if c ~= k and headers[c] ~= nil then return true end
  local s = seen[lk]
  if s == g then return true end
  if s == nil then
    if seen_n >= CACHE_MAX then seen, seen_n = {}, 0 end
    seen_n = seen_n + 1
  end
  seen[lk] = g
  return false
end
local gen = 0

--[[
** The lower-case name of a header key, or false when it is not a token.
** NAME caches the keys spelled in the canonical case (most handlers'),
** ODD the others (and names that are not tokens): a table of canonical
** keys only cannot hold one name twice, so only ODD keys call for the
** check for duplicates.
]]
local ODD, odd_n = {}, 0

local function lname_of(k)
  local lk = NAME[k]
  if lk ~= nil then return lk end
  lk = ODD[k]
  if lk ~= nil then return lk end
  lk = type(k) == "string" and find(k, TOKEN) and lower(k) or false
  if type(k) == "string" and #k <= CACHE_LINE then
    if lk and k == canonical(lk) then
      if name_n >= CACHE_MAX then NAME, name_n = {}, 0 end
      NAME[k] = lk
      name_n = name_n + 1
    else
      if odd_n >= CACHE_MAX then ODD, odd_n = {}, 0 end
      ODD[k] = lk
      odd_n = odd_n + 1
    end
  end
  return lk
end

--[[
** A header table with keys that differ only in case (content-type and
** Content-Type): a copy with one key of each, the one spelled in the
** canonical case, or else the least in byte order (whatever the table's
** order), with its value. Keys that are not tokens are kept (they are
** reported when rendered). Or nil: no name is there twice.
]]
local function dedup(headers)
  local best, dup = {}, false
  for k in next, headers do
    local lk = lname_of(k)
    if lk then
      local b = best[lk]
      if b == nil then
        best[lk] = k
      else
        dup = true
        if b ~= canonical(lk) and (k == canonical(lk) or k < b) then
          best[lk] = k
        end
      end
    end
  end
  if not dup then return nil end
  local out = {}
  for k, v in next, headers do
    if not lname_of(k) then out[k] = v end
  end
  for _, k in next, best do out[k] = headers[k] end
  return out
end

--[[
** Render a handler's headers. Returns lines, content-length (string or
** nil), close, or nil, message for a bad header.
]]
local function render_headers(headers)
  local lines, cl, close, g = "", nil, false, nil
  for k, v in next, headers do
    local lk = NAME[k]
    if lk == nil then
      -- Not a canonical name: the table may hold a name twice.
      lk = lname_of(k)
      if not lk then return nil, "invalid header name " .. tostring(k) end
      if not g then g = gen + 1; gen = g end
      if twice(headers, k, lk, g) then
        local once = dedup(headers)
        if once then return render_headers(once) end
      end
    end
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

-- Whether b is called as a function (a table or userdata with __call).
local function callable(b)
  local mt = getmetatable(b)
  return type(mt) == "table" and mt.__call ~= nil
end

--[[
** What to close when the response ends, sent or cut: a callable body with
** __close (http.static's file source: its file goes at once, not when the
** collector finds it), else nil.
]]
local function closer(b)
  local t = type(b)
  if t ~= "table" and t ~= "userdata" then return nil end
  local mt = getmetatable(b)
  return type(mt) == "table" and mt.__call and mt.__close and b or nil
end

-- Call a body source: a function, or an object with a read method.
local function source_of(b)
  if type(b) == "function" or callable(b) then return b end
  return function() return b:read() end
end

--[[
** Sends a span of a file (which a body source may give): by sendfile, or
** where the conn cannot take it (a TLS conn: ENOTSUP; writes queued:
** EBUSY) read and written a chunk at a time; head (a string or nil) goes
** first. true, or nil, err.
]]
local function send_span(conn, span, head)
  local ok, err, name = fs_sendfile(conn, span.file, tointeger(span.offset),
                                    tointeger(span.length), head)
  if ok or (name ~= "ENOTSUP" and name ~= "EBUSY") then return ok, err end
  if head and not so_write(conn, head) then return nil end
  local next_chunk = span_chunks(span)
  while true do
    local data, rerr = next_chunk()
    if not data then
      if rerr then return nil, rerr end
      return true
    end
    local w, werr = so_write(conn, data)
    if not w then return nil, werr end
  end
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
local gzip_apply = require("so.http.gzip").apply

local function respond(c, req, body, status, headers, rbody)
  local conn, o = c.conn, c.o
  local _ <close> = closer(rbody)
  local status_line = STATUS_LINE[status]
  if not status_line then
    log_error(o, "bad response", "invalid status "
              .. (type(status) == "string" and format("%q (a string)", status)
                  or tostring(status))
              .. ": an integer 100-599 expected")
    return false, 500
  end
  local gzip_min = o.gzip_min
  if gzip_min and status == 200 and rbody ~= nil
     and not (type(rbody) == "string" and #rbody < gzip_min) then
    headers, rbody = gzip_apply(req, status, headers, rbody, o, source_of)
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
                               and (callable(rbody)
                                    or pcall(has_read, rbody)))) then
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
    local ok, chunk, err = xpcall(src, traceback, true)
    local bad, n
    local tc = type(chunk)
    if not ok then
      bad = chunk
    elseif chunk == nil then
      if err ~= nil then bad = err else break end
    elseif tc == "table" then
      bad = bad_span(chunk)
      n = tointeger(chunk.length)
    elseif tc ~= "string" then
      bad = "body source gave a " .. tc
    elseif chunk == "" then
      break
    else
      n = #chunk
    end
    if not bad and want and sent + n > want then
      bad = "body longer than its Content-Length"
    end
    if bad then
      if not (body.status and rbody == body) then
        log_error(o, "response body failed", bad)
      end
      if not started then return false, body.status or 500 end
      return nil
    end
    if n > 0 then
      sent = sent + n
      local w, pre = nil, ""
      if not started then
        started = true
        head = head .. head_end(c, body, close)
        pre = head
      end
      if tc == "table" then  -- a file span, with what goes before it
        if chunked then pre = pre .. format("%x\r\n", n) end
        w = send_span(conn, chunk, pre ~= "" and pre or nil)
        if w and chunked then w = so_write(conn, "\r\n") end
      elseif chunked then
        w = so_write(conn, { pre, chunk_size(chunk), chunk, "\r\n" })
      elseif pre ~= "" then
        w = so_write(conn, { pre, chunk })
      else
        w = so_write(conn, chunk)
      end
      if not w then return nil end
    end
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

M.reasons = reasons
M.date_header = date_header
M.lname_of = lname_of
M.canonical = canonical
M.dedup = dedup
M.header_line = header_line
M.log_error = log_error
M.send_error = send_error
M.respond = respond

return M
