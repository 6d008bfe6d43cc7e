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
**
** This file holds the public API and the per-connection loop; the parts:
**   so.http.parse     request line, header lines, head; their caches
**   so.http.body      the request body reader
**   so.http.response  status lines, headers, Date; writing a response
]]

local so = require "so"
local linger_close = require("so.linger").close
local tls = require "so.tls"
local reader = require "so.reader"
local parse = require "so.http.parse"
local bodies = require "so.http.body"
local response = require "so.http.response"
local client = require "so.http.client"

local find, sub, lower, match =
  string.find, string.sub, string.lower, string.match
local type, pairs, setmetatable, xpcall, error =
  type, pairs, setmetatable, xpcall, error
local traceback = debug.traceback
local so_now, so_close, so_settimeout, so_read =
  so.now, so.close, so.settimeout, so.read
local parse_head, HeadersMT = parse.parse_head, parse.HeadersMT
local open_body, EMPTY = bodies.open_body, bodies.empty
local respond, send_error, log_error =
  response.respond, response.send_error, response.log_error

local M = {}

-- Reason phrases by status (the table so.http.response reads).
M.reasons = response.reasons

-- The client: http.request(opts), http.get(url [, headers]), and the
-- defaults of request's options.
M.request, M.get = client.request, client.get

-- http.static(dir [, opts]): a handler serving the files under dir.
M.static = require("so.http.static").static
M.client_defaults = client.defaults

-- Defaults of the options of http.listen and http.serve_conn.
M.defaults = {
  max_head = 8192,            -- bytes of request line and headers (431)
  max_target = 8192,          -- bytes of the request target (414)
  max_headers = 100,          -- header lines (431)
  max_body = 1024 * 1024,     -- request body bytes (413); false: no limit
  header_timeout = 10,        -- seconds for a whole request head (408)
  keepalive_timeout = 5,      -- seconds idle between requests
  timeout = 60,               -- seconds for each body read or write
  max_requests = false,       -- requests per connection; false: no limit
  drain = 64 * 1024,          -- unread body bytes drained to keep alive
  linger = 1,                 -- seconds to drain input before a close
  log = false,                -- function(msg); default: so.log, "error"
  access_log = false,         -- function(req, status, bytes, seconds), or
                              -- true: one line a request through so.log
  tls = false,                -- a tls.server context: HTTPS
  gzip_min = 1024,            -- compress text bodies of this size or more
                              -- for clients that accept gzip; false: never
}

-- The Date header line of this second; the body of a request without one.
M.date_header = response.date_header
M.empty_body = EMPTY

--[[
** The connections being served, for closing a server and for the drain:
** each connection's state c, weakly (a task that ends forgets it).
** c.idle is true while it waits for the next request; c.closing once its
** server closes: the response in flight says Connection: close.
]]
local active = setmetatable({}, { __mode = "k" })

local function close_conns(o)
  for c in pairs(active) do
    if o == nil or c.o == o then
      c.closing = true
      c.keep = false
      if c.idle then so_close(c.conn) end  -- its read ends: it closes
    end
  end
end

-- One line a request, in the Common Log Format, with the duration.
local function clf(req, status, bytes, seconds)
  local host = so.peername(req.conn) or "-"
  so.log("info", '%s - - [%s] "%s %s HTTP/%s" %d %s %.3f', host,
         os.date("!%d/%b/%Y:%H:%M:%S +0000"), req.method, req.target,
         req.version, status, bytes or "-", seconds)
end

--[[
** Run one request: handler, response, rest of the body drained. Returns
** true to go on with the connection.
]]
local function handle(c, req, body)
  local o = c.o
  local t0 = o.access_log and so_now()
  local ok, res, h, b = xpcall(c.handler, traceback, req, body)
  if req.hijacked then
    -- The handler took the connection over (a WebSocket): nothing more is
    -- written; the connection closes.
    if not ok then log_error(o, "handler failed", res) end
    if t0 then
      local log = o.access_log == true and clf or o.access_log
      log(req, 101, nil, so_now() - t0)
    end
    c.hijacked = true
    return false
  end
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
  elseif tr == "string" and h == nil and b == nil then
    status, rbody = 200, res
  elseif tr == "string" then
    status, headers, rbody = res, h, b         -- a status as a string: 500
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
  if c.closing then c.keep = false end  -- the server closes meanwhile
  local keep, err_status = respond(c, req, body, status, headers, rbody)
  if t0 then
    local log = o.access_log == true and clf or o.access_log
    log(req, err_status or status, type(rbody) == "string" and #rbody or nil,
        so_now() - t0)
  end
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
  if not o.access_log then o.access_log = nil end
  if not o.tls then o.tls = nil end
  if not o.gzip_min then o.gzip_min = nil end
  o.head_opts = { inclusive = true, limit = o.max_head }
  o.lid = o.max_headers .. "/" .. o.max_target  -- (see parse.parse_head)
  return o
end

--[[
** The status for a head over max_head (the reader keeps its bytes): 414
** when its request line is itself too long to be read whole or its target
** is longer than max_target, else 431.
]]
local function too_long(r, o)
  local buf, pos = r.buf, r.pos
  while sub(buf, pos, pos + 1) == "\r\n" do pos = pos + 2 end
  local e = find(buf, "\r\n", pos, true)
  if not e then return 414 end
  local target = match(sub(buf, pos, e - 1), "^[^ ]* ([^ ]*)")
  if target and #target > o.max_target then return 414 end
  return 431
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
  local head_opts, lid, max_head = o.head_opts, o.lid, o.max_head
  local keepalive, header_timeout = o.keepalive_timeout, o.header_timeout
  local served = 0
  local graceful = true
  active[c] = true
  while true do
    local buf, pos = r.buf, r.pos
    if pos > #buf then
      -- Idle: wait for the next request (r:fill() inlined), unless the
      -- server is closing.
      if c.closing then break end
      if r.timeout ~= keepalive or r.dirty then r:settimeout(keepalive) end
      c.idle = true
      buf = so_read(conn)
      c.idle = false
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
        if err == "message too long" then send_error(conn, too_long(r, o))
        elseif x == "ETIMEDOUT" then send_error(conn, 408)
        elseif err == "EOF" and x ~= "" and find(x, "[^\r\n]") then
          send_error(conn, 400)
        else graceful = false end
        break
      end
    end
    local req, f = parse_head(head, lid, o)
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
      if c.closing then c.keep = false end
      c.version, c.method = version, f.method
      setmetatable(headers, HeadersMT)
      req.conn, req.reader = conn, r
      if not handle(c, req, body) then break end
    elseif req == nil then
      send_error(conn, f)
      break
    end
  end
  active[c] = nil
  if graceful and not c.closing and not c.hijacked then
    linger_close(conn, o.linger)  -- (FIN first: see so.linger)
  else
    so_close(conn)
  end
end

--[[
** HTTPS: the TLS handshake, in the time a request head has, then HTTP. A
** failed handshake costs only its connection: a line at level info, as
** nginx logs one.
]]
local function serve_tls(conn, handler, o)
  so_settimeout(conn, o.header_timeout)
  local t, err = tls.wrap(conn, o.tls)
  if not t then
    so.log("info", "TLS handshake failed: " .. err)
    return
  end
  return serve_conn(t, handler, o)
end

--[[
** http.serve_conn(conn, handler [, opts]): serve one connection in the
** calling task until it closes; closes it.
]]
function M.serve_conn(conn, handler, opts)
  if type(handler) ~= "function" then
    error("bad argument #2 to 'serve_conn' (function expected)", 2)
  end
  local o = normalize_opts(opts)
  return (o.tls and serve_tls or serve_conn)(conn, handler, o)
end

--[[
** Server: http.listen(host, port, handler [, opts]) -> server or nil, msg,
** name. server:serve() accepts connections (one task each) until
** server:close().
]]
local Server = {}
Server.__index = Server
Server.__name = "so.http.server"

-- Every server, weakly: the drain closes them all.
local servers = setmetatable({}, { __mode = "k" })
local on_drain_set = false

function M.listen(host, port, handler, opts)
  if type(handler) ~= "function" then
    error("bad argument #3 to 'listen' (function expected)", 2)
  end
  local l, err, name = so.listen(host, port, opts and opts.backlog)
  if not l then return nil, err, name end
  local srv = setmetatable({ listener = l, handler = handler,
                             opts = normalize_opts(opts), closed = false },
                           Server)
  servers[srv] = true
  if not on_drain_set then
    on_drain_set = true
    so.ondrain(function()
      for s in pairs(servers) do s:close() end
      close_conns(nil)  -- connections of http.serve_conn too
    end)
  end
  return srv
end

function Server:sockname()
  return so.sockname(self.listener)
end

function Server:serve()
  local l, handler, o = self.listener, self.handler, self.opts
  local serve = o.tls and serve_tls or serve_conn
  while not self.closed do
    local conn, err, name = so.accept(l)
    if conn then
      so.spawn(serve, conn, handler, o)
    elseif self.closed or name == "ECANCELED" then
      break
    else
      log_error(o, "accept failed", err)
      so.sleep(0.01)
    end
  end
end

--[[
** server:close(): no new connections; idle keep-alive connections close
** at once; requests in flight finish, answered with Connection: close.
]]
function Server:close()
  if not self.closed then
    self.closed = true
    so_close(self.listener)
    close_conns(self.opts)
  end
end
Server.__close = Server.close

return M
