--[[
** so.redis: a Redis client for tasks (RESP2), see docs/redis.md.
**
**   local redis = require "so.redis"
**   local r = assert(redis.connect("127.0.0.1", 6379, { db = 1 }))
**   assert(r:call("SET", "k", "v"))          --> true
**   local v = r:get("k")                     --> "v"
**   local replies = r:pipeline(function(p)    --> { true, 2 }
**     p:set("a", 1)
**     p:incr("a")
**   end)
**   r:keepalive()                            -- back to so.pool
**
** Requests are built with one table.concat of pieces kept in a reused
** table (a command's header is memoized per command name) and sent with one
** so.write. Replies are parsed from one buffered string and an offset with
** string.find/sub: a reply already buffered costs a few C calls, and one
** that spans reads is gathered in a list and joined once (linear in its
** size whatever the chunk boundaries).
**
** A client breaks (its conn closes, and every later call returns the same
** nil, msg, name) as soon as it cannot know where the next reply starts:
** a network error or timeout during a request, EOF, a malformed reply, or
** a call interrupted by so.cancel or an error. An error reply (EREDIS) does
** not break it.
]]

local so = require "so"
local pool = require "so.pool"

local find, sub, byte, upper, format =
  string.find, string.sub, string.byte, string.upper, string.format
local concat, move = table.concat, table.move
local type, select, tostring, tonumber, setmetatable, getmetatable, error,
      pairs, rawset = type, select, tostring, tonumber, setmetatable,
      getmetatable, error, pairs, rawset
local mtype = math.type
local so_read, so_write, so_settimeout, so_close, so_connect =
  so.read, so.write, so.settimeout, so.close, so.connect

local M = {}

M.DEFAULT_TIMEOUT = 30          -- seconds: connect, and each read and write
M.MAX_BULK = 512 * 1024 * 1024  -- Redis's proto-max-bulk-len
M.MAX_ARRAY = 2 ^ 31 - 1        -- elements of one array reply
M.MAX_DEPTH = 100               -- arrays nested in arrays
M.MAX_LINE = 1024 * 1024        -- a status, error or length line

-- The value of a nil bulk string or a nil array.
M.null = setmetatable({}, {
  __name = "redis.null",
  __tostring = function() return "redis.null" end,
  __newindex = function() error("redis.null is read-only", 2) end,
  __metatable = false,
})
local null = M.null

-- An error reply inside an array or a pipeline: { err = "ERR ..." }.
local Err = {
  __name = "redis.error",
  __tostring = function(e) return e.err end,
}
M.error_mt = Err

-- redis.iserror(v): the message of an error reply found in an array or a
-- pipeline's results, else nil.
function M.iserror(v)
  if getmetatable(v) == Err then return v.err end
  return nil
end

local EOF_MSG = "EOF: the server closed the connection"
local INTERRUPTED = "ECANCELED: a call on this client was interrupted"

local BIG = 64 * 1024  -- an argument this long is written, not copied

--[[
** {======================================================
** Encoding: "*N\r\n" "$len\r\nCMD" { "\r\n$len\r\n" arg }... "\r\n"
** =======================================================
]]

local COUNT, SEP = {}, {}
local function count_hdr(n)
  local s = "*" .. n .. "\r\n"
  if n < 4096 then COUNT[n] = s end
  return s
end
local function sep_hdr(n)
  local s = "\r\n$" .. n .. "\r\n"
  if n < 4096 then SEP[n] = s end
  return s
end

-- Commands that need care (see special below).
local SPECIAL = {
  SUBSCRIBE = "sub", PSUBSCRIBE = "sub", UNSUBSCRIBE = "sub",
  PUNSUBSCRIBE = "sub",
  MONITOR = "refuse", SYNC = "refuse", PSYNC = "refuse",
  SSUBSCRIBE = "refuse", SUNSUBSCRIBE = "refuse",
  MULTI = "multi", EXEC = "exec", DISCARD = "exec",
  WATCH = "watch", UNWATCH = "unwatch",
  SELECT = "dirty", AUTH = "dirty", HELLO = "dirty", RESET = "dirty",
  QUIT = "dirty", READONLY = "dirty", READWRITE = "dirty",
  CLIENT = "client",
}
-- CLIENT subcommands that leave no state behind.
local CLIENT_CLEAN = {
  ID = true, LIST = true, INFO = true, GETNAME = true, GETREDIR = true,
  TRACKINGINFO = true, HELP = true,
}

local function learn(cmd, level)
  if type(cmd) ~= "string" then
    error("bad argument #1 to 'call' (string expected, got " .. type(cmd)
          .. ")", level)
  end
  return "$" .. #cmd .. "\r\n" .. cmd, SPECIAL[upper(cmd)] or false
end

local function tostr(a, i, lvl)
  local ta = type(a)
  if ta == "number" then
    if mtype(a) == "integer" then return tostring(a) end
    return format("%.17g", a)
  end
  error(format("bad argument #%d to 'call' (string or number expected, "
               .. "got %s)", i, ta), lvl)
end

-- Appends the strings of a table argument (argument #argi) to t.
local function encode_list(t, k, count, big, a, argi)
  for j = 1, #a do
    local s = a[j]
    if type(s) ~= "string" then s = tostr(s, argi, 6) end
    local len = #s
    t[k + 1], t[k + 2] = SEP[len] or sep_hdr(len), s
    k, count = k + 2, count + 1
    if len >= BIG then big = true end
  end
  return k, count, big
end

--[[
** Puts the pieces of a command at t[k0..]: returns the last index used and
** whether an argument is big. t[k0] is the "*N" header. A table argument
** stands for its elements (one level).
]]
local function encode(t, k0, head, ...)
  local n = select("#", ...)
  local k, count, big = k0 + 1, 1, false
  local args = n > 16 and { ... }
  t[k] = head
  for i = 1, n do
    local s
    if args then s = args[i] else s = select(i, ...) end
    if type(s) ~= "string" then
      if type(s) == "table" then
        k, count, big = encode_list(t, k, count, big, s, i + 1)
        goto next
      end
      s = tostr(s, i + 1, 5)
    end
    do
      local len = #s
      t[k + 1], t[k + 2] = SEP[len] or sep_hdr(len), s
      k, count = k + 2, count + 1
      if len >= BIG then big = true end
    end
    ::next::
  end
  t[k + 1] = "\r\n"
  t[k0] = COUNT[count] or count_hdr(count)
  return k + 1, big
end

local pieces = {}  -- for one request at a time (nothing yields meanwhile)

-- A request in general: one string, or an array of strings (for so.write)
-- when big arguments are better not copied.
local function request_list(head, ...)
  local t = pieces
  local k, big = encode(t, 1, head, ...)
  if not big then
    local req = concat(t, "", 1, k)
    if k > 64 then pieces = {} end  -- (hold on to no long list of strings)
    return req
  end
  local req
  if k <= 1024 then req = move(t, 1, k, 1, {}) else req = concat(t, "", 1, k) end
  for i = k, 1, -1 do t[i] = nil end
  return req
end

-- A number as an argument: integers as such, floats with all their digits.
local function numstr(x)
  if mtype(x) == "integer" then return tostring(x) end
  return format("%.17g", x)
end

--[[
** The request for a command of n <= 3 arguments a, b, c when they are
** small strings or numbers, with one concatenation (table.concat costs
** more for so few pieces); else nil.
]]
local function build(head, n, a, b, c)
  if n ~= 0 then
    local ta = type(a)
    if ta ~= "string" then
      if ta ~= "number" then return nil end
      a = numstr(a)
    end
    local la = #a
    if la >= BIG then return nil end
    if n == 1 then
      return "*2\r\n" .. head .. (SEP[la] or sep_hdr(la)) .. a .. "\r\n"
    end
    local tb = type(b)
    if tb ~= "string" then
      if tb ~= "number" then return nil end
      b = numstr(b)
    end
    local lb = #b
    if lb >= BIG then return nil end
    if n == 2 then
      return "*3\r\n" .. head .. (SEP[la] or sep_hdr(la)) .. a
             .. (SEP[lb] or sep_hdr(lb)) .. b .. "\r\n"
    end
    local tc = type(c)
    if tc ~= "string" then
      if tc ~= "number" then return nil end
      c = numstr(c)
    end
    local lc = #c
    if lc >= BIG then return nil end
    return "*4\r\n" .. head .. (SEP[la] or sep_hdr(la)) .. a
           .. (SEP[lb] or sep_hdr(lb)) .. b
           .. (SEP[lc] or sep_hdr(lc)) .. c .. "\r\n"
  end
  return "*1\r\n" .. head .. "\r\n"
end

-- The request for a command and its arguments: a string, or an array of
-- strings for so.write.
local function request(head, ...)
  local n = select("#", ...)
  return n <= 3 and build(head, n, ...) or request_list(head, ...)
end

-- }======================================================

--[[
** {======================================================
** The client
** =======================================================
]]

local Client = {}   -- methods; unknown names become commands (see below)
local ClientMT = { __index = Client, __name = "redis.client" }

local Guard = {}    -- closes a client whose call did not finish
Guard.__index = Guard

-- Breaks the client: closes its conn; msg, name are its sticky error.
local function fail(self, msg, name)
  local conn = self.conn
  self.busy = false
  if conn then
    self.conn = false
    so_close(conn)
  end
  if not self.err then self.err, self.errname = msg, name end
  self.buf, self.pos = "", 1
  return nil, msg, name
end

local function proto(self, what)
  return fail(self, "EPROTO: " .. what, "EPROTO")
end

Guard.__close = function(g)
  local self = g.client
  if self.busy then fail(self, INTERRUPTED, "ECANCELED") end
end

-- The next chunk from the conn, or the failure (the client broken).
local function more(self)
  local data, err, name = so_read(self.conn)
  if data == "" then return fail(self, EOF_MSG, "EOF") end
  if not data then return fail(self, err, name) end
  return data
end

--[[
** Makes sure a whole line starts at self.pos: returns buf, pos, s (where its
** "\r\n" starts), or nil, msg, name.
]]
local function fill_line(self)
  local buf, pos = self.buf, self.pos
  if pos > #buf then  -- nothing buffered: the usual case
    local chunk, err, name = more(self)
    if not chunk then return nil, err, name end
    self.buf, self.pos = chunk, 1
    local s = find(chunk, "\r\n", 1, true)
    if s then return chunk, 1, s end
    buf, pos = chunk, 1
  end
  -- A partial line: gather chunks, search each (and the junction), join once.
  local last = pos == 1 and buf or sub(buf, pos)
  local parts, np, have = { last }, 1, #last
  local max = M.MAX_LINE
  while true do
    if have > max then return proto(self, "line too long") end
    local chunk, err, name = more(self)
    if not chunk then return nil, err, name end
    local s
    if byte(last, -1) == 13 and byte(chunk, 1) == 10 then
      s = have
    else
      s = find(chunk, "\r\n", 1, true)
      if s then s = have + s end
    end
    np = np + 1
    parts[np] = chunk
    if s then
      if s - 1 > max then return proto(self, "line too long") end
      local whole = concat(parts, "", 1, np)
      self.buf, self.pos = whole, 1
      return whole, 1, s
    end
    have = have + #chunk
    last = chunk
  end
end

--[[
** The n bytes of a bulk string at self.pos, and its "\r\n", when they are
** not all buffered: gathered in a list, joined once.
]]
local function bulk_slow(self, n)
  local buf, pos = self.buf, self.pos
  local parts, np, have = {}, 0, #buf - pos + 1
  if have > 0 then
    np = 1
    parts[1] = pos == 1 and buf or sub(buf, pos)
  end
  while have < n do
    local chunk, err, name = more(self)
    if not chunk then return nil, err, name end
    np = np + 1
    parts[np] = chunk
    have = have + #chunk
  end
  local rest = ""
  if have > n then  -- the last part holds bytes past the data
    local last = parts[np]
    local keep = #last - (have - n)
    rest = sub(last, keep + 1)
    parts[np] = sub(last, 1, keep)
  end
  local data = np == 1 and parts[1] or concat(parts, "", 1, np)
  while #rest < 2 do
    local chunk, err, name = more(self)
    if not chunk then return nil, err, name end
    rest = rest .. chunk
  end
  local c1, c2 = byte(rest, 1, 2)
  if c1 ~= 13 or c2 ~= 10 then
    return proto(self, "bulk string not followed by CRLF")
  end
  self.buf, self.pos = rest, 3
  return data
end

--[[
** One reply: a string, an integer, true (+OK), redis.null, an array (a
** table); an error reply is nil, msg, "EREDIS" at depth 0, an error
** object inside arrays. A failure is nil, msg, name with the client broken.
]]
local function value(self, depth)
  local buf, pos = self.buf, self.pos
  -- First the commonest replies, whole in the buffer: +OK, and bulk
  -- strings of less than 100 bytes, without a search or a pattern.
  local t, b1, b2, b3, b4 = byte(buf, pos, pos + 4)
  if t == 36 then
    local n, e
    if b2 == 13 and b3 == 10 and b1 >= 48 and b1 <= 57 then
      n, e = b1 - 48, pos + 3
    elseif b3 == 13 and b4 == 10 and b1 >= 48 and b1 <= 57 and b2 >= 48
           and b2 <= 57 then
      n, e = b1 * 10 + b2 - 528, pos + 4
    end
    if n then
      local last = e + n
      if last + 2 <= #buf then
        local c1, c2 = byte(buf, last + 1, last + 2)
        if c1 ~= 13 or c2 ~= 10 then
          return proto(self, "bulk string not followed by CRLF")
        end
        self.pos = last + 3
        return sub(buf, e + 1, last)
      end
    end
  elseif t == 43 and b1 == 79 and b2 == 75 and b3 == 13 and b4 == 10 then
    self.pos = pos + 5
    return true
  end
  local s = find(buf, "\r\n", pos, true)
  if not s then
    local err, name
    buf, err, name = fill_line(self)
    if not buf then return nil, err, name end
    pos, s = err, name
    t = byte(buf, pos)
  end
  if t == 36 then  -- $: bulk string
    local n, e
    local d = s - pos - 1  -- (short lengths without a pattern)
    if d == 1 then
      n = byte(buf, pos + 1) - 48
      if n < 0 or n > 9 then n = nil end
    elseif d == 2 then
      local b1, b2 = byte(buf, pos + 1, pos + 2)
      if b1 >= 48 and b1 <= 57 and b2 >= 48 and b2 <= 57 then
        n = b1 * 10 + b2 - 528
      end
    end
    if n then
      e = s + 1
    else
      local _, digits
      _, e, digits = find(buf, "^(%-?%d+)\r\n", pos + 1)
      if e ~= s + 1 then return proto(self, "malformed bulk length") end
      n = tonumber(digits)
      if n < 0 then
        if n == -1 then
          self.pos = e + 1
          return null
        end
        return proto(self, "negative bulk length " .. digits)
      end
      if n > M.MAX_BULK then
        return proto(self, "bulk length " .. digits .. " over the limit")
      end
    end
    local last = e + n
    if last + 2 <= #buf then
      local c1, c2 = byte(buf, last + 1, last + 2)
      if c1 ~= 13 or c2 ~= 10 then
        return proto(self, "bulk string not followed by CRLF")
      end
      self.pos = last + 3
      return sub(buf, e + 1, last)
    end
    self.pos = e + 1
    return bulk_slow(self, n)
  elseif t == 43 then  -- +: status
    self.pos = s + 2
    if s == pos + 3 and byte(buf, pos + 1) == 79 and byte(buf, pos + 2) == 75
    then
      return true
    end
    return sub(buf, pos + 1, s - 1)
  elseif t == 58 then  -- :: integer
    local _, e, digits = find(buf, "^(%-?%d+)\r\n", pos + 1)
    local n = e == s + 1 and tonumber(digits)
    if mtype(n) ~= "integer" then return proto(self, "malformed integer") end
    self.pos = e + 1
    return n
  elseif t == 42 then  -- *: array
    local _, e, digits = find(buf, "^(%-?%d+)\r\n", pos + 1)
    if e ~= s + 1 then return proto(self, "malformed array length") end
    local n = tonumber(digits)
    self.pos = e + 1
    if n < 0 then
      if n == -1 then return null end
      return proto(self, "negative array length " .. digits)
    end
    if n > M.MAX_ARRAY then
      return proto(self, "array length " .. digits .. " over the limit")
    end
    if depth >= M.MAX_DEPTH then
      return proto(self, "arrays nested too deep")
    end
    local a = {}
    for i = 1, n do
      local v, err, name = value(self, depth + 1)
      if v == nil then return nil, err, name end
      a[i] = v
    end
    return a
  elseif t == 45 then  -- -: error
    self.pos = s + 2
    local msg = sub(buf, pos + 1, s - 1)
    if depth == 0 then return nil, msg, "EREDIS" end
    return setmetatable({ err = msg }, Err)
  end
  return proto(self, format("unknown reply type %q", sub(buf, pos, pos)))
end

-- Whether a call may start; raises on misuse, returns a sticky error.
local function check(self, what)
  if self.busy then
    error("redis client is in use by another task (" .. what .. ")", 3)
  end
  if not self.conn then
    if self.err then return nil, self.err, self.errname end
    error("attempt to use a closed redis client", 3)
  end
  if self.subs > 0 and what ~= "sub" then
    error("redis client is subscribed: only subscribe, unsubscribe, "
          .. "psubscribe, punsubscribe, message and close", 3)
  end
  return true
end

-- What a special command does to the client (or raises).
local function special(self, kind, cmd, a1)
  if kind == "multi" then
    self.inmulti = true
  elseif kind == "exec" then
    self.inmulti, self.watching = false, false
  elseif kind == "watch" then
    self.watching = true
  elseif kind == "unwatch" then
    self.watching = false
  elseif kind == "dirty" then
    self.dirty = true
  elseif kind == "client" then
    local subc = type(a1) == "string" and upper(a1) or ""
    if subc == "REPLY" then
      error("CLIENT REPLY is not supported (replies would go out of step)",
            3)
    end
    if not CLIENT_CLEAN[subc] then self.dirty = true end
  elseif kind == "sub" then
    error(upper(cmd) .. " through call: use client:" .. cmd:lower()
          .. "(...)", 3)
  else
    error(upper(cmd) .. " is not supported", 3)
  end
end

--[[
** client:call(cmd, ...): the reply, or nil, msg, "EREDIS" for an error
** reply, or nil, msg, name when the network or the server failed. Each
** command name gets a function of its own (its header an upvalue), which is
** also the method client:name(...).
]]
local callers, ncallers = {}, 0

local function caller(cmd, level)
  local f = callers[cmd]
  if f then return f end
  local head, kind = learn(cmd, level + 1)
  f = function(self, ...)
    if self.busy or not self.conn or self.subs > 0 then
      local ok, err, name = check(self, "call")
      if not ok then return nil, err, name end
    end
    if kind then special(self, kind, cmd, ...) end
    local n = select("#", ...)
    local req = n <= 3 and build(head, n, ...) or request_list(head, ...)
    self.busy = true
    local g <close> = self.guard
    local ok, err, name = so_write(self.conn, req)
    if not ok then return fail(self, err, name) end
    local v
    v, err, name = value(self, 0)
    self.busy = false
    if v == nil then return nil, err, name end
    return v
  end
  if ncallers < 4096 then  -- (names come from code: few)
    ncallers = ncallers + 1
    callers[cmd] = f
  end
  return f
end

-- client:call(cmd, ...): the command's own function, by a tail call (so
-- errors and tracebacks name the caller, as client:cmd(...) does).
function Client.call(self, cmd, ...)
  return (callers[cmd] or caller(cmd, 3))(self, ...)
end

--[[
** client:pipeline(fn, ...): fn(p, ...) queues commands with p:call(...) (or
** p:get(...), ...); they are sent with one write, and the replies come back
** as an array (an error reply as an error object, see redis.iserror).
]]
local Pipe = {}
local PipeMT = { __index = Pipe, __name = "redis.pipeline" }
PipeMT.__close = function(p)
  p.open = false
  p.client.piping = false
  local t = p.t  -- (what was not sent: fn raised, or the client broke)
  for i = p.k, 1, -1 do t[i] = nil end
  p.k = 0
end

local pcallers = {}

local function pcaller(cmd, level)
  local f = pcallers[cmd]
  if f then return f end
  local head, kind = learn(cmd, level + 1)
  f = function(p, ...)
    if not p.open then error("pipeline is over", 2) end
    if kind then special(p.client, kind, cmd, ...) end
    local n = select("#", ...)
    local req = n <= 3 and build(head, n, ...)
    local t, k = p.t, p.k + 1
    if req then
      t[k] = req
    else
      req = request_list(head, ...)
      if type(req) == "string" then
        t[k] = req
      else
        move(req, 1, #req, k, t)
        k = k + #req - 1
      end
    end
    p.k, p.n = k, p.n + 1
    return p
  end
  if ncallers < 4096 then
    ncallers = ncallers + 1
    pcallers[cmd] = f
  end
  return f
end

-- p:call(cmd, ...): as client:call, through the command's own function.
function Pipe.call(p, cmd, ...)
  return (pcallers[cmd] or pcaller(cmd, 3))(p, ...)
end

function Client.pipeline(self, fn, ...)
  if type(fn) ~= "function" then
    error("bad argument #1 to 'pipeline' (function expected, got "
          .. type(fn) .. ")", 2)
  end
  local ok, err, name = check(self, "pipeline")
  if not ok then return nil, err, name end
  if self.piping then error("a pipeline is already being built", 2) end
  local t = self.pbuf
  self.piping = true
  local p <close> = setmetatable({ client = self, t = t, k = 0, n = 0,
                                   open = true }, PipeMT)
  fn(p, ...)
  p.open = false
  local n, k = p.n, p.k
  if n == 0 then return {} end
  ok, err, name = check(self, "pipeline")  -- (fn may have used the client)
  if not ok then return nil, err, name end
  local req = t  -- (t holds the requests at 1..k, nothing after)
  if k > 1024 then req = concat(t, "", 1, k) end  -- (so.write's bound)
  self.busy = true
  local g <close> = self.guard
  ok, err, name = so_write(self.conn, req)
  for i = k, 1, -1 do t[i] = nil end  -- (sent: hold on to nothing)
  p.k = 0
  if not ok then return fail(self, err, name) end
  -- The replies: +OK and short bulk strings whole in the buffer here (as
  -- value's fast path does, without a call each), the others by value.
  local res = {}
  local buf, pos, i = self.buf, self.pos, 1
  while i <= n do
    local t, b1, b2, b3, b4 = byte(buf, pos, pos + 4)
    local v, e
    if t == 43 then
      if b1 == 79 and b2 == 75 and b3 == 13 and b4 == 10 then
        v, pos = true, pos + 5
      end
    elseif t == 36 and b1 and b1 >= 48 and b1 <= 57 then
      local len
      if b2 == 13 and b3 == 10 then
        len, e = b1 - 48, pos + 3
      elseif b3 == 13 and b4 == 10 and b2 >= 48 and b2 <= 57 then
        len, e = b1 * 10 + b2 - 528, pos + 4
      end
      if len and e + len + 2 <= #buf then
        local c1, c2 = byte(buf, e + len + 1, e + len + 2)
        if c1 == 13 and c2 == 10 then
          v, pos = sub(buf, e + 1, e + len), e + len + 3
        end
      end
    end
    if v == nil then
      self.pos = pos
      v, err, name = value(self, 1)
      if v == nil then return nil, err, name end
      buf, pos = self.buf, self.pos
    end
    res[i] = v
    i = i + 1
  end
  self.pos = pos
  self.busy = false
  return res
end

--[[
** {======================================================
** Publish/subscribe
** =======================================================
]]

local MESSAGE = { message = true, pmessage = true }

-- Queues a message that came while waiting for something else.
local function queue(self, m)
  local q = self.queue
  if not q then
    q = { first = 1, last = 0 }
    self.queue = q
  end
  q.last = q.last + 1
  q[q.last] = m
end

local function unpack_message(m)
  if m[1] == "pmessage" then return "pmessage", m[3], m[4], m[2] end
  return m[1], m[2], m[3]
end

local function confirmation(self, m)
  local kind, subject, count = m[1], m[2], m[3]
  local set = (kind == "subscribe" or kind == "unsubscribe") and self.chans
              or self.pats
  if kind == "subscribe" or kind == "psubscribe" then
    if not set[subject] then set[subject] = true; set.n = set.n + 1 end
  elseif type(subject) == "string" and set[subject] then
    set[subject] = nil
    set.n = set.n - 1
  end
  if mtype(count) == "integer" then self.subs = count end
end

local CONFIRMS = { subscribe = "chans", unsubscribe = "chans",
                   psubscribe = "pats", punsubscribe = "pats" }

--[[
** Sends a (P)(UN)SUBSCRIBE and reads its confirmations (one per name, or
** per current subscription for an unsubscribe of all), queuing the
** messages that arrive meanwhile. The number of subscriptions now, or
** nil, msg, name.
]]
local function subcmd(self, cmd, kind, ...)
  local ok, err, name = check(self, "sub")
  if not ok then return nil, err, name end
  local head = learn(cmd, 3)
  local t = pieces
  local k = encode(t, 1, head, ...)
  local expect = (k - 3) // 2  -- names given
  if expect == 0 then
    if kind == "subscribe" or kind == "psubscribe" then
      error("bad argument #1 to '" .. kind .. "' (a channel expected)", 3)
    end
    expect = self[CONFIRMS[kind]].n
    if expect == 0 then expect = 1 end
  end
  local req = concat(t, "", 1, k)
  self.busy = true
  local g <close> = self.guard
  ok, err, name = so_write(self.conn, req)
  if not ok then return fail(self, err, name) end
  while expect > 0 do
    local m
    m, err, name = value(self, 0)
    if m == nil then  -- (an error reply, e.g. NOPERM, answers the whole
      if name == "EREDIS" then self.busy = false end  -- command)
      return nil, err, name
    end
    if type(m) ~= "table" or type(m[1]) ~= "string" then
      return proto(self, "unexpected reply in subscribe mode")
    end
    local mk = m[1]
    if MESSAGE[mk] then
      queue(self, m)
    elseif CONFIRMS[mk] then
      confirmation(self, m)
      if mk == kind then expect = expect - 1 end
    else
      return proto(self, "unexpected reply in subscribe mode")
    end
  end
  self.busy = false
  return self.subs
end

function Client.subscribe(self, ...)
  return subcmd(self, "SUBSCRIBE", "subscribe", ...)
end
function Client.psubscribe(self, ...)
  return subcmd(self, "PSUBSCRIBE", "psubscribe", ...)
end
function Client.unsubscribe(self, ...)
  return subcmd(self, "UNSUBSCRIBE", "unsubscribe", ...)
end
function Client.punsubscribe(self, ...)
  return subcmd(self, "PUNSUBSCRIBE", "punsubscribe", ...)
end

--[[
** client:message([timeout]): the next message: "message", channel, payload
** or "pmessage", channel, payload, pattern. With a timeout (seconds), nil,
** "ETIMEDOUT: ...", "ETIMEDOUT" when none came (the client stays good).
]]
function Client.message(self, timeout)
  local q = self.queue
  if q and q.first <= q.last then
    local m = q[q.first]
    q[q.first] = nil
    q.first = q.first + 1
    return unpack_message(m)
  end
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0) then
    error("bad argument #1 to 'message' (non-negative number expected)", 2)
  end
  local ok, err, name = check(self, "sub")
  if not ok then return nil, err, name end
  if self.subs == 0 then
    error("redis client is not subscribed", 2)
  end
  self.busy = true
  local g <close> = self.guard
  local conn = self.conn
  while true do
    if self.pos > #self.buf then  -- wait with the caller's timeout
      so_settimeout(conn, timeout)
      local data
      data, err, name = so_read(conn)
      so_settimeout(conn, self.timeout)
      if not data then
        if name == "ETIMEDOUT" then  -- nothing read: still in step
          self.busy = false
          return nil, err, name
        end
        return fail(self, err, name)
      end
      if data == "" then return fail(self, EOF_MSG, "EOF") end
      self.buf, self.pos = data, 1
    end
    local m
    m, err, name = value(self, 0)
    if m == nil then
      if name == "EREDIS" then return fail(self, "EPROTO: " .. err, "EPROTO") end
      return nil, err, name
    end
    if type(m) ~= "table" or type(m[1]) ~= "string" then
      return proto(self, "unexpected reply in subscribe mode")
    end
    local mk = m[1]
    if MESSAGE[mk] then
      self.busy = false
      return unpack_message(m)
    elseif CONFIRMS[mk] then
      confirmation(self, m)
      self.busy = false
      return mk, m[2], m[3]
    end
    return proto(self, "unexpected reply in subscribe mode")
  end
end

-- }======================================================

--[[
** client:close() → true: closes the conn (idempotent).
]]
function Client.close(self)
  local conn = self.conn
  self.conn, self.closed = false, true
  if conn then so_close(conn) end
  return true
end
ClientMT.__close = Client.close

--[[
** client:keepalive([idle_seconds]) → true | false: the conn goes back to
** the pool when it is clean (nothing pending, not subscribed, not in a
** transaction, no state changed); otherwise it is closed (false). Either
** way the client is closed.
]]
function Client.keepalive(self, idle)
  local conn = self.conn
  if not conn then return false end
  self.conn, self.closed = false, true
  if not self.key or self.busy or self.subs > 0 or self.inmulti
     or self.watching or self.dirty or self.pos <= #self.buf
     or (self.queue and self.queue.first <= self.queue.last) then
    so_close(conn)
    return false
  end
  return pool.put(self.key, conn, idle)
end

-- client:settimeout(seconds|nil): for each later read and write.
function Client.settimeout(self, s)
  if s ~= nil and (type(s) ~= "number" or s < 0) then
    error("bad argument #1 to 'settimeout' (non-negative number expected)",
          2)
  end
  self.timeout = s
  if self.conn then so_settimeout(self.conn, s) end
  return true
end

-- client:getconn(): the conn (for so.sockname and the like), or nil.
function Client.getconn(self)
  return self.conn or nil
end

ClientMT.__tostring = function(self)
  return format("redis.client (%s)%s", self.addr,
                self.conn and "" or " (closed)")
end

-- Unknown methods are commands: client:hget(k, f) is client:call("HGET", k, f).
setmetatable(Client, { __index = function(t, name)
  if type(name) ~= "string" then return nil end
  local f = caller(upper(name), 3)
  rawset(t, name, f)
  return f
end })
setmetatable(Pipe, { __index = function(t, name)
  if type(name) ~= "string" then return nil end
  local f = pcaller(upper(name), 3)
  rawset(t, name, f)
  return f
end })

-- }======================================================

--[[
** {======================================================
** redis.connect
** =======================================================
]]

local OPTS = { timeout = true, password = true, username = true, db = true,
               pool = true, tls = true }

-- A number per credentials (so that pool keys hold no password).
local creds, ncreds = {}, 0
local function credid(user, password)
  local k = format("%d:%s%s", #(user or ""), user or "", password or "")
  local id = creds[k]
  if not id then
    ncreds = ncreds + 1
    id = ncreds
    creds[k] = id
  end
  return id
end
local ctxids, nctx = setmetatable({}, { __mode = "k" }), 0
local default_tls  -- the context of opts.tls = true, made once
local function ctxid(ctx)
  local id = ctxids[ctx]
  if not id then
    nctx = nctx + 1
    id = nctx
    ctxids[ctx] = id
  end
  return id
end

local function new(conn, addr, key, timeout)
  local self = setmetatable({
    conn = conn, addr = addr, key = key, timeout = timeout,
    buf = "", pos = 1,
    busy = false, err = false, errname = false, closed = false,
    inmulti = false, watching = false, dirty = false,
    subs = 0, chans = { n = 0 }, pats = { n = 0 }, queue = false,
    pbuf = {}, piping = false, guard = false,
  }, ClientMT)
  self.guard = setmetatable({ client = self }, Guard)
  return self
end

--[[
** redis.connect(host [, port] [, opts]) → client | nil, msg, name. host
** may be "unix:PATH" (port then nil or omitted). opts: timeout (seconds,
** default 30; false: none), password, username, db (default 0), pool
** (default true), tls (true, or a context of so.tls).
]]
function M.connect(host, port, opts)
  if type(host) ~= "string" then
    error("bad argument #1 to 'connect' (string expected, got " .. type(host)
          .. ")", 2)
  end
  if type(port) == "table" and opts == nil then port, opts = nil, port end
  local unix = host:sub(1, 5) == "unix:"
  if port == nil then
    port = not unix and 6379 or nil
  elseif mtype(port) ~= "integer" and not (type(port) == "string"
                                           and tonumber(port)) then
    error("bad argument #2 to 'connect' (port expected, got " .. type(port)
          .. ")", 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then
    error("bad argument #3 to 'connect' (table expected, got " .. type(opts)
          .. ")", 2)
  end
  for k in pairs(opts) do
    if not OPTS[k] then
      error("bad argument #3 to 'connect' (unknown option '" .. tostring(k)
            .. "')", 2)
    end
  end
  local timeout = opts.timeout
  if timeout == nil then timeout = M.DEFAULT_TIMEOUT
  elseif timeout == false then timeout = nil
  elseif type(timeout) ~= "number" or timeout < 0 then
    error("bad argument #3 to 'connect' (timeout: non-negative number "
          .. "expected)", 2)
  end
  local db = opts.db or 0
  if mtype(db) ~= "integer" or db < 0 then
    error("bad argument #3 to 'connect' (db: non-negative integer expected)",
          2)
  end
  local password, username = opts.password, opts.username
  if password ~= nil and type(password) ~= "string" then
    error("bad argument #3 to 'connect' (password: string expected)", 2)
  end
  if username ~= nil and type(username) ~= "string" then
    error("bad argument #3 to 'connect' (username: string expected)", 2)
  end
  if username and not password then
    error("bad argument #3 to 'connect' (username without password)", 2)
  end
  local tlsctx = opts.tls
  local addr = unix and host or host .. ":" .. port
  local key = "redis " .. addr .. "/" .. db
  if password then key = key .. " cred#" .. credid(username, password) end
  if tlsctx then
    if tlsctx == true then  -- (one context: its conns share a pool key)
      default_tls = default_tls or require("so.tls").client()
      tlsctx = default_tls
    end
    key = key .. " tls#" .. ctxid(tlsctx)
  end
  local usepool = opts.pool ~= false
  local conn = usepool and pool.get(key)
  if conn then
    so_settimeout(conn, timeout)
    return new(conn, addr, key, timeout)
  end
  local err, name
  if tlsctx then
    conn, err, name = require("so.tls").connect(host, port, tlsctx, timeout)
  else
    conn, err, name = so_connect(host, port, timeout)
  end
  if not conn then return nil, err, name end
  so_settimeout(conn, timeout)
  local self = new(conn, addr, usepool and key, timeout)
  if password or db ~= 0 then  -- AUTH and SELECT in one write
    local req, n = {}, 0
    if password then
      n = n + 1
      if username then
        req[n] = request_list(learn("AUTH", 2), username, password)
      else
        req[n] = request_list(learn("AUTH", 2), password)
      end
    end
    if db ~= 0 then
      n = n + 1
      req[n] = request_list(learn("SELECT", 2), db)
    end
    for i = 1, n do  -- (an array when a password is long)
      if type(req[i]) == "table" then req[i] = concat(req[i]) end
    end
    self.busy = true
    local g <close> = self.guard
    local ok
    ok, err, name = so_write(conn, req)
    if not ok then return fail(self, err, name) end
    local first
    for _ = 1, n do
      local v
      v, err, name = value(self, 1)
      if v == nil then return nil, err, name end
      if getmetatable(v) == Err and not first then first = v.err end
    end
    self.busy = false
    if first then
      self:close()
      return nil, first, "EREDIS"
    end
  end
  return self
end

-- }======================================================

return M
