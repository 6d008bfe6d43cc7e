--[[
** so.http.client: the HTTP/1.1 client of so.http (see docs/http.md):
** http.request(opts) and http.get(url [, headers]).
**
**   local http = require "so.http"
**   local status, body, headers = http.get("http://127.0.0.1:8080/")
**   local res = assert(http.request{ url = "https://example.com/",
**                                    method = "POST", body = "data" })
**   for chunk in res.body:chunks() do ... end
**
** One parser for both directions: a response head is cut and checked by
** so.http.parse as a request head is (the same header-line grammar, the
** same limits), and its body is framed and read by so.http.body's reader,
** the one the server gives handlers (the same smuggling rules: both
** Content-Length and Transfer-Encoding, differing lengths, bad chunk lines
** are errors). Connections are kept alive in so.pool, keyed by
** scheme://host:port (and the TLS context): a conn goes back only when its
** response allowed it and its body was read to its end with nothing after
** it. Never pipelined: one request at a time on a conn.
]]

local so = require "so"
local tls = require "so.tls"
local reader = require "so.reader"
local pool = require "so.pool"
local parse = require "so.http.parse"
local bodies = require "so.http.body"
local response = require "so.http.response"

local find, match, sub, lower, byte, format, gsub =
  string.find, string.match, string.sub, string.lower, string.byte,
  string.format, string.gsub
local type, next, tostring, tonumber, setmetatable, error =
  type, next, tostring, tonumber, setmetatable, error
local so_write, so_close, so_connect, so_read =
  so.write, so.close, so.connect, so.read
local pool_get, pool_put = pool.get, pool.put
local parse_response_head = parse.parse_response_head
local open_response_body, EMPTY = bodies.open_response_body, bodies.empty
local lname_of, header_line, dedup =
  response.lname_of, response.header_line, response.dedup
local TOKEN, CACHE_MAX = parse.TOKEN, parse.CACHE_MAX
local HeadersMT = parse.HeadersMT
local EMPTY_INFO = {}

local M = {}

-- Defaults of the options of http.request (and http.get).
M.defaults = {
  timeout = 30,                 -- seconds: connect, and each read or write
  max_body = 16 * 1024 * 1024,  -- response body bytes; false: no limit
  max_head = 8192,              -- bytes of status line and headers
  max_headers = 100,            -- header lines
  pool = true,                  -- keep connections alive in so.pool
  continue_timeout = 1,         -- seconds to wait for 100 Continue
}
local D = M.defaults

M.user_agent = "luahost/" .. gsub(so._VERSION, "^luahost ", "")

-- Methods a request on a stale pooled conn is sent again for.
local IDEMPOTENT = { GET = true, HEAD = true, PUT = true, DELETE = true,
                     OPTIONS = true, TRACE = true }
-- Methods whose requests get Content-Length: 0 when they have no body.
local WANTS_LENGTH = { POST = true, PUT = true, PATCH = true }

local function fail(msg)
  return nil, msg, match(msg, "^(%u[%u%d_]*):") or "EINVAL"
end

--[[
** URLs: http://host[:port]/path?query (https://, [v6]:port), parsed once
** and kept in a bounded cache. u.host (what to connect to), u.port,
** u.tls, u.target, u.hostline ("Host: ...\r\n"), u.key (the pool's key),
** u.heads (request heads without headers, by method).
]]
local url_cache, url_n = {}, 0

local function parse_url(url)
  local u = url_cache[url]
  if u then return u end
  local scheme, rest = match(url, "^(%a[%w+.-]*)://(.*)$")
  if not scheme then return fail("EINVAL: bad URL " .. format("%q", url)) end
  scheme = lower(scheme)
  local secure = scheme == "https"
  if not secure and scheme ~= "http" then
    return fail("EINVAL: unsupported scheme " .. scheme .. " in URL")
  end
  local authority, target = match(rest, "^([^/?#]*)(.*)$")
  if find(authority, "@", 1, true) then
    return fail("EINVAL: user information in URLs is not supported")
  end
  local host, port, v6
  if byte(authority) == 91 then                          -- "[" v6 "]"
    host, port = match(authority, "^%[([%x:.]+)%](.*)$")
    v6 = true
  else
    host, port = match(authority, "^([^:]*)(.*)$")
  end
  if not host or host == "" or not find(host, "^[%w.%-_:]+$") then
    return fail("EINVAL: bad host in URL " .. format("%q", url))
  end
  local default = secure and 443 or 80
  if port == "" or port == ":" then
    port = default
  else
    port = tonumber(match(port, "^:(%d+)$"))
    if not port or port < 1 or port > 65535 then
      return fail("EINVAL: bad port in URL " .. format("%q", url))
    end
  end
  target = match(target, "^[^#]*")
  if target == "" then target = "/"
  elseif byte(target) == 63 then target = "/" .. target end  -- "?"
  if not find(target, "^[!-~]+$") then
    return fail("EINVAL: bad path in URL " .. format("%q", url)
                .. " (spaces and control characters must be %-encoded)")
  end
  local hostport = (v6 and "[" .. host .. "]" or host)
  if port ~= default then hostport = hostport .. ":" .. port end
  u = { host = host, port = port, tls = secure, target = target,
        hostline = "Host: " .. hostport .. "\r\n",
        key = scheme .. "://" .. lower(v6 and "[" .. host .. "]" or host)
              .. ":" .. port,
        heads = {} }
  if url_n >= 256 then url_cache, url_n = {}, 0 end
  url_cache[url] = u
  url_n = url_n + 1
  return u
end

-- A TLS context's part of a pool key (a context is kept while alive).
local ctx_ids = setmetatable({}, { __mode = "k" })
local function ctx_id(ctx)
  local id = ctx_ids[ctx]
  if not id then
    id = "|" .. tostring(ctx)
    ctx_ids[ctx] = id
  end
  return id
end

--[[
** The caller's headers as lines. Returns lines, and what the client must
** know of them: a table with host, ua, cl (Content-Length as a string),
** close (Connection: close), expect (100-continue); or nil, msg.
** Names differing only in case are sent once, as the server sends them.
]]
local seen, seen_n, gen = {}, 0, 0

local function render(headers, info)
  if seen_n >= CACHE_MAX then seen, seen_n = {}, 0 end
  local g = gen + 1
  gen = g
  local lines = ""
  for k, v in next, headers do
    local lk = lname_of(k)
    if not lk then return nil, "EINVAL: invalid header name " .. tostring(k) end
    local s = seen[lk]
    if s == g then
      -- A name twice: again, with one key of each name.
      for f in next, info do info[f] = nil end
      return render(dedup(headers), info)
    end
    if s == nil then seen_n = seen_n + 1 end
    seen[lk] = g
    if lk == "transfer-encoding" then
      return nil, "EINVAL: Transfer-Encoding is the client's to set"
    elseif lk == "content-length" then
      local cl = tostring(v)
      if not find(cl, "^%d+$") then
        return nil, "EINVAL: invalid Content-Length " .. cl
      end
      info.cl = cl
    else
      if lk == "host" then info.host = true
      elseif lk == "user-agent" then info.ua = true
      elseif lk == "connection" then
        info.close = find(lower(tostring(v)), "close", 1, true) and true
                     or false
      elseif lk == "expect" then
        if lower(tostring(v)) ~= "100-continue" then
          return nil, "EINVAL: the only expectation is 100-continue"
        end
        info.expect = true
      end
      local line
      if type(v) == "table" then
        line = ""
        for i = 1, #v do
          local one = header_line(k, v[i])
          if not one then
            return nil, "EINVAL: invalid value of header " .. k
          end
          line = line .. one
        end
      else
        line = header_line(k, v)
        if not line then return nil, "EINVAL: invalid value of header " .. k end
      end
      lines = lines .. line
    end
  end
  return lines
end

--[[
** Response: status, reason, version, headers (case-insensitive), body
** (the body reader); res:header(name), res:each_header(), res:close()
** (drops the conn unless the body was read to its end; also <close>).
]]
local Response = {}
Response.__index = Response
Response.__name = "so.http.response"
Response.header = parse.header
Response.each_header = parse.each_header

function Response:close()
  local body = self.body
  if not body.done and not body.err and body.conn then
    body.err, body.errname = "ECANCELED: response closed", "ECANCELED"
    so_close(body.conn)
  end
end
Response.__close = Response.close

-- A body read to its end: its conn goes back to the pool, if it may.
local function release(body)
  local conn, key, r = body.conn, body.key, body.r
  if key and r.pos > #r.buf then
    pool_put(key, conn, body.idle)
  else
    so_close(conn)
  end
end

-- A body read failed: its conn is in an unknown state.
local function drop(body)
  so_close(body.conn)
end

-- The metatable of response bodies: the body reader's, with the above.
local RBody = setmetatable({ what = "response", on_done = release,
                             on_fail = drop }, { __index = bodies.Body })
RBody.__index = RBody
RBody.__name = "so.http.body"

--[[
** The state of each conn, kept while the conn lives (in the pool too):
** its reader, and a guard: an exchange holds it in a <close> variable,
** armed, so that the conn closes if the exchange fails, raises or is
** cancelled before the conn is handed over to a response.
]]
local State = { __close = function(st)
  if st.armed then
    st.armed = false
    so_close(st.conn)
  end
end }
local states = setmetatable({}, { __mode = "k" })

-- Call a body source: a function, or an object with a read method.
local function source_of(b)
  if type(b) == "function" then return b end
  return function() return b:read() end
end

--[[
** Send a streamed request body: chunked, or exactly `cl` bytes. `first`
** is what to write before it (the head, or ""). Returns true or nil, msg,
** name; a source that raises raises.
]]
local function send_stream(conn, first, src, cl)
  local want, sent = cl and tonumber(cl), 0
  while true do
    local chunk, err, name = src()
    if chunk == nil then
      if err ~= nil then
        return nil, "body source failed: " .. tostring(err), name or "EIO"
      end
      break
    end
    if type(chunk) ~= "string" then
      error("request body source gave a " .. type(chunk), 0)
    end
    if chunk == "" then break end
    sent = sent + #chunk
    if want and sent > want then
      return fail("EINVAL: request body longer than its Content-Length")
    end
    local ok, e, n
    if want then
      ok, e, n = so_write(conn, first == "" and chunk or { first, chunk })
    else
      ok, e, n = so_write(conn, { first, format("%x\r\n", #chunk), chunk,
                                  "\r\n" })
    end
    if not ok then return nil, e, n end
    first = ""
  end
  if want and sent ~= want then
    return fail("EINVAL: request body shorter than its Content-Length")
  end
  if not want then
    local ok, e, n = so_write(conn, first .. "0\r\n\r\n")
    if not ok then return nil, e, n end
  elseif first ~= "" then
    local ok, e, n = so_write(conn, first)
    if not ok then return nil, e, n end
  end
  return true
end

local HEAD_OPTS = { inclusive = true, limit = D.max_head }

-- The options of r:readuntil for a head of at most max_head bytes.
local function head_opts(max_head)
  if max_head == HEAD_OPTS.limit then return HEAD_OPTS end
  return { inclusive = true, limit = max_head }
end

--[[
** Read the response head, skipping interim (1xx) responses. Sends the body
** (send()) when a 100 Continue comes or continue_timeout passes, if it
** was held back (held). Returns status, reason, version, headers, hpos,
** head, sent; or nil, msg, name, retry (true when nothing at all came).
]]
local function read_head(r, opts, timeout, held, send)
  local max_head = opts.max_head or D.max_head
  local interim = 0
  local sent = not held
  while true do
    local head, err, x
    if sent and r.pos > #r.buf and not r.eof then
      -- The usual: nothing buffered yet, and the whole head comes in one
      -- read (r:fill() and r:readuntil inlined).
      local data
      data, err, x = so_read(r.conn)
      if data == "" then
        r.eof = true
        err, x = "EOF", ""
      elseif data then
        local e = find(data, "\r\n\r\n", 1, true)
        if e and e <= max_head + 1 then
          if e + 3 == #data then
            head = data
            r.buf, r.pos = "", 1
          else
            head = sub(data, 1, e + 3)
            r.buf, r.pos = data, e + 4
          end
        else
          r.buf, r.pos = data, 1
          head, err, x = r:readuntil("\r\n\r\n", head_opts(max_head))
        end
      end
    elseif sent then
      head, err, x = r:readuntil("\r\n\r\n", head_opts(max_head))
    else
      r:settimeout(opts.continue_timeout or D.continue_timeout)
      head, err, x = r:readuntil("\r\n\r\n", head_opts(max_head))
      r:settimeout(timeout)
    end
    if not head then
      if not sent and x == "ETIMEDOUT" then
        -- No 100 Continue in time: send the body anyway (as curl does).
        local ok, e, n = send()
        if not ok then return nil, e, n end
        sent = true
      elseif err == "message too long" then
        return fail("EMSGSIZE: response head longer than max_head ("
                    .. max_head .. " bytes)")
      elseif err == "EOF" then
        if x == "" and interim == 0 then
          return nil, "ECONNRESET: connection closed before any response",
                 "ECONNRESET", true
        end
        return fail("EPROTO: connection closed inside the response head")
      else
        return nil, err, x, interim == 0 and r:buffered() == 0
                           and x ~= "ETIMEDOUT"
      end
    else
      local status, reason, version, headers, hpos =
        parse_response_head(head, opts.max_headers or D.max_headers)
      if not status then return fail(reason) end
      if status >= 200 then
        return status, reason, version, headers, hpos, head, sent
      end
      if status == 101 then
        return fail("EPROTO: unexpected 101 Switching Protocols")
      end
      interim = interim + 1
      if interim > 16 then return fail("EPROTO: too many 1xx responses") end
      if status == 100 and not sent then
        local ok, e, n = send()
        if not ok then return nil, e, n end
        sent = true
      end
    end
  end
end

--[[
** One exchange on conn: send the request, read the response head, open
** its body. Returns res, or nil, msg, name, retry (retry: nothing at all
** came back, the request may be sent again on another conn).
]]
local function exchange(conn, u, opts, method, timeout, head, body, info,
                        key, keep_wanted)
  local st = states[conn]
  if not st then
    st = setmetatable({ conn = conn, r = reader.new(conn), armed = false },
                      State)
    states[conn] = st
  end
  st.armed = true
  local guard <close> = st
  local r = st.r
  if r.timeout ~= timeout or r.dirty then r:settimeout(timeout) end
  local send, held
  local ok, err, name
  if body == nil then
    ok, err, name = so_write(conn, head)
  else
    if type(body) == "string" then
      send = function() return so_write(conn, body) end
    else
      local src = source_of(body)
      send = function() return send_stream(conn, "", src, info.cl) end
    end
    held = info.expect
    if held then
      ok, err, name = so_write(conn, head)
    elseif type(body) == "string" then
      ok, err, name = so_write(conn, { head, body })
    else
      ok, err, name = send_stream(conn, head, source_of(body), info.cl)
    end
  end
  if not ok then
    if name == "EINVAL" then return nil, err, name end
    -- The server may have answered (and closed) before taking it all.
    if not r:fill() then
      return nil, err, name, body == nil or type(body) == "string"
    end
    held = false
  end
  local status, reason, version, headers, hpos, rhead, sent =
    read_head(r, opts, timeout, held, send)
  if not status then return nil, reason, version, headers end
  local keep = keep_wanted and ok and sent
  local idle
  if keep then
    local c = headers.connection
    if version == "1.1" then
      keep = c == nil or c == "keep-alive"
             or not find(lower(c), "close", 1, true)
    else
      keep = c and find(lower(c), "keep-alive", 1, true) and true or false
    end
    local ka = headers["keep-alive"]
    if ka then
      -- The server's idle time, less a second (as undici does).
      local t = tonumber(match(ka, "timeout=(%d+)"))
      if t then idle = t > 1 and t - 1 or 0 end
    end
  end
  local b = EMPTY
  if method ~= "HEAD" and status ~= 204 and status ~= 304 then
    local max_body = opts.max_body
    if max_body == nil then max_body = D.max_body end
    local e, n
    b, e, n = open_response_body(headers, r, conn, max_body or nil,
                                 opts.max_head or D.max_head, timeout, RBody,
                                 keep and key or nil)
    if not b then return nil, e, n end
  end
  local res = setmetatable({ status = status, reason = reason,
                             version = version,
                             headers = setmetatable(headers, HeadersMT),
                             body = b, head = rhead, hpos = hpos }, Response)
  st.armed = false
  if b == EMPTY then
    if keep and r.pos > #r.buf then
      pool_put(key, conn, idle)
    else
      so_close(conn)
    end
    return res
  end
  if idle and b.key then b.idle = idle end
  return res
end

-- Connect to u: a conn, or nil, msg, name.
local function connect(u, opts, timeout)
  if u.tls then
    return tls.connect(u.host, u.port, opts.tls, timeout)
  end
  return so_connect(u.host, u.port, timeout)
end

local function argerror(msg)
  error("bad argument #1 to 'request' (" .. msg .. ")", 3)
end

--[[
** http.request(opts): response, or nil, msg, name. See docs/http.md.
** The defaults come from http.client_defaults, read at each request.
]]
function M.request(opts)
  if type(opts) ~= "table" then
    argerror("table expected, got " .. type(opts))
  end
  local url, method, headers, body = opts.url, opts.method, opts.headers,
                                     opts.body
  local u = url_cache[url]
  if not u then
    if type(url) ~= "string" then
      argerror("opts.url: string expected, got " .. type(url))
    end
    local err, name
    u, err, name = parse_url(url)
    if not u then return nil, err, name end
  end
  if method == nil then method = "GET"
  elseif type(method) ~= "string" then argerror("opts.method: string expected")
  elseif not find(method, TOKEN) then return fail("EINVAL: invalid method")
  end
  local tb
  if body ~= nil then
    tb = type(body)
    if tb ~= "string" and tb ~= "function"
       and not ((tb == "table" or tb == "userdata") and body.read ~= nil) then
      argerror("opts.body: string, function or reader expected")
    end
  end
  local timeout = opts.timeout
  if timeout == nil then timeout = D.timeout
  elseif type(timeout) ~= "number" or timeout < 0 then
    argerror("opts.timeout: non-negative number expected")
  end
  local use_pool = opts.pool
  if use_pool == nil then use_pool = D.pool end

  -- The head.
  local info = EMPTY_INFO
  local head
  if headers ~= nil then
    if type(headers) ~= "table" then argerror("opts.headers: table expected") end
    if next(headers) ~= nil then
      info = {}
      local lines, e = render(headers, info)
      if not lines then return fail(e) end
      head = method .. " " .. u.target .. " HTTP/1.1\r\n"
             .. (info.host and "" or u.hostline)
             .. (info.ua and "" or "User-Agent: " .. M.user_agent .. "\r\n")
             .. lines
    end
  end
  if head == nil then
    if body == nil and use_pool then
      -- The most common head, whole: cached by URL and method.
      head = u.heads[method]
      if not head then
        head = method .. " " .. u.target .. " HTTP/1.1\r\n" .. u.hostline
               .. "User-Agent: " .. M.user_agent .. "\r\n"
               .. (WANTS_LENGTH[method] and "Content-Length: 0\r\n" or "")
               .. "\r\n"
        u.heads[method] = head
      end
    else
      head = method .. " " .. u.target .. " HTTP/1.1\r\n" .. u.hostline
             .. "User-Agent: " .. M.user_agent .. "\r\n"
    end
  end
  if info ~= EMPTY_INFO or body ~= nil or not use_pool then
    if tb == "string" then
      if info.cl then
        if tonumber(info.cl) ~= #body then
          return fail("EINVAL: Content-Length " .. info.cl
                      .. " is not the body's length " .. #body)
        end
        head = head .. "Content-Length: " .. info.cl .. "\r\n"
      else
        head = head .. "Content-Length: " .. #body .. "\r\n"
      end
    elseif body ~= nil then
      if info.cl then head = head .. "Content-Length: " .. info.cl .. "\r\n"
      else head = head .. "Transfer-Encoding: chunked\r\n" end
    elseif info.cl then
      if tonumber(info.cl) ~= 0 then
        return fail("EINVAL: Content-Length " .. info.cl .. " without a body")
      end
      head = head .. "Content-Length: " .. info.cl .. "\r\n"
    elseif WANTS_LENGTH[method] then
      head = head .. "Content-Length: 0\r\n"
    end
    if not use_pool and info.close == nil then
      head = head .. "Connection: close\r\n"
    end
    head = head .. "\r\n"
  end

  local key = u.key
  if u.tls and opts.tls then key = key .. ctx_id(opts.tls) end
  local keep_wanted = use_pool and not info.close
  local conn
  if use_pool then conn = pool_get(key) end
  if conn then
    local res, e, n, retry = exchange(conn, u, opts, method, timeout, head,
                                      body, info, key, keep_wanted)
    if res or not (retry and IDEMPOTENT[method]
                   and (body == nil or tb == "string")) then
      return res, e, n
    end
    -- A stale conn (the server closed it meanwhile): once more, anew.
  end
  local err, name
  conn, err, name = connect(u, opts, timeout)
  if not conn then return nil, err, name end
  local res, e, n = exchange(conn, u, opts, method, timeout, head, body,
                             info, key, keep_wanted)
  return res, e, n
end

--[[
** http.get(url [, headers]): status, body (a string, at most max_body),
** headers; or nil, msg, name.
]]
function M.get(url, headers)
  local res, err, name = M.request{ url = url, headers = headers }
  if not res then return nil, err, name end
  local body
  body, err, name = res.body:readall()
  if not body then return nil, err, name end
  return res.status, body, res.headers
end

return M
