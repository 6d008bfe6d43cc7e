--[[
** so.reader: buffered framing over a byte stream (a conn of the "so" module)
** and a writer that gathers pieces into one so.write.
**
** The unconsumed input is one string `buf` plus an offset `pos`: consuming a
** frame advances `pos` and never copies the rest. A frame that spans several
** reads is gathered in a local list and joined once, so a frame costs time
** linear in its size whatever the chunk boundaries. A delimiter search that
** has to wait for more input resumes where it stopped (less #delim-1 bytes),
** even across calls (after a timeout).
**
** The reader reads from the conn only when the buffered bytes cannot satisfy
** the current request, so the host's backpressure holds.
**
** Results (see docs/reader.md):
**   frame                       on success
**   nil, "EOF", partial         the stream ended first; partial ("" at a clean
**                               end) is consumed and returned
**   nil, "message too long"     the frame exceeds the limit; nothing consumed
**   nil, msg, name              so.read failed (e.g. "ETIMEDOUT: ...",
**                               "ETIMEDOUT"); nothing consumed, may retry
]]

local so = require "so"

local find, sub, byte = string.find, string.sub, string.byte
local concat = table.concat
local type, select, setmetatable = type, select, setmetatable
local so_read, so_write, so_settimeout, so_now =
  so.read, so.write, so.settimeout, so.now

local M = {}

M.DEFAULT_LIMIT = 65536
-- so.write takes at most 1024 strings at once (the host's iovec bound).
local MAX_PIECES = 1024
local TOO_LONG = "message too long"

local Reader = {}
Reader.__index = Reader
Reader.__name = "so.reader"

--[[
** reader.new(conn [, opts]): opts.limit (default 64 KiB) bounds line,
** delimited and "a" reads; opts.writer is a writer flushed before the reader
** blocks on the network (as stdio flushes stdout before reading stdin).
]]
function M.new(conn, opts)
  local limit, writer = M.DEFAULT_LIMIT, nil
  if opts then
    limit = opts.limit or limit
    writer = opts.writer
  end
  return setmetatable({
    conn = conn,
    buf = "",          -- buffered input; bytes before pos are consumed
    pos = 1,
    eof = false,       -- so.read returned "" (sticky)
    limit = limit,
    writer = writer,
    scan_d = nil,      -- delimiter of an unfinished search ...
    scan_at = 1,       -- ... and the index in buf where to resume it
    timeout = nil,     -- timeout set through r:settimeout
    deadline = nil,    -- absolute so.now() time, or nil
    dirty = false,     -- the deadline changed the conn's timeout
  }, Reader)
end

--[[
** Read one chunk from the conn: flush the writer first, honour the deadline.
** Returns chunk ("" at EOF) or nil, msg, name.
]]
local function fetch(self)
  if self.eof then return "" end
  local w = self.writer
  if w and w.n > 0 then
    local ok, err, name = w:flush()
    if not ok then return nil, err, name end
  end
  local conn = self.conn
  local dl = self.deadline
  if dl then
    local left = dl - so_now()
    if left <= 0 then
      return nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT"
    end
    so_settimeout(conn, left)
    self.dirty = true
  end
  local data, err, name = so_read(conn)
  if data == "" then self.eof = true end
  return data, err, name
end

-- Put back what a failed slow-path read gathered: parts[1..np] become buf.
local function keep(self, parts, np)
  if np == 1 then
    self.buf = parts[1]
  elseif np > 1 then
    self.buf = concat(parts, "", 1, np)
  else
    self.buf = ""
  end
  self.pos = 1
end

-- The unconsumed buffered bytes as a fresh list (slow paths only).
local function start_parts(self)
  local buf, pos = self.buf, self.pos
  if pos > #buf then return {}, 0, 0 end
  local rest = pos == 1 and buf or sub(buf, pos)
  return { rest }, 1, #rest
end

--[[
** Everything up to delimiter d. Frame length (without d) is at most limit.
]]
local function readuntil(self, d, incl, limit)
  local buf, pos = self.buf, self.pos
  local dl = #d
  local init = pos
  if self.scan_d == d and self.scan_at > pos then init = self.scan_at end
  local s, e = find(buf, d, init, true)
  if s then
    if s - pos > limit then return nil, TOO_LONG end
    self.scan_d = nil
    if e == #buf then self.buf, self.pos = "", 1 else self.pos = e + 1 end
    if incl then return sub(buf, pos, e) end
    return sub(buf, pos, s - 1)
  end
  local have = #buf - pos + 1
  if have >= limit + dl then return nil, TOO_LONG end
  -- Slow path: gather chunks, search each new one (plus the junction).
  local parts, np
  parts, np, have = start_parts(self)
  local tail = have > 0 and dl > 1 and sub(parts[1], -(dl - 1)) or ""
  while true do
    local chunk, err, name = fetch(self)
    if not chunk then
      keep(self, parts, np)
      self.scan_d, self.scan_at = d, have - dl + 2
      return nil, err, name
    end
    if chunk == "" then
      local partial = np > 0 and concat(parts, "", 1, np) or ""
      self.buf, self.pos, self.scan_d = "", 1, nil
      return nil, "EOF", partial
    end
    s, e = nil, nil
    local tl = #tail
    if tl > 0 then
      -- A delimiter that starts in the tail ends in this chunk.
      local js, je = find(tail .. sub(chunk, 1, dl - 1), d, 1, true)
      if js then s, e = js - tl, je - tl end
    end
    if not s then s, e = find(chunk, d, 1, true) end
    if s then
      if have + s - 1 > limit then
        np = np + 1; parts[np] = chunk
        keep(self, parts, np)
        self.scan_d = nil
        return nil, TOO_LONG
      end
      local frame
      local cut = incl and e or s - 1     -- last chunk byte in the frame
      if np == 0 then
        frame = sub(chunk, 1, cut)
      elseif cut >= 1 then
        np = np + 1; parts[np] = sub(chunk, 1, cut)
        frame = concat(parts, "", 1, np)
      else
        -- The delimiter started before this chunk: drop its first bytes.
        frame = concat(parts, "", 1, np)
        if cut < 0 then frame = sub(frame, 1, cut - 1) end
      end
      self.scan_d = nil
      if e == #chunk then self.buf, self.pos = "", 1
      else self.buf, self.pos = chunk, e + 1 end
      return frame
    end
    np = np + 1; parts[np] = chunk
    have = have + #chunk
    if have >= limit + dl then
      keep(self, parts, np)
      self.scan_d = nil
      return nil, TOO_LONG
    end
    if dl > 1 then
      if #chunk >= dl - 1 then tail = sub(chunk, -(dl - 1))
      else tail = sub(tail .. chunk, -(dl - 1)) end
    end
  end
end

-- Exactly n bytes.
local function readn(self, n)
  local buf, pos = self.buf, self.pos
  local last = pos + n - 1
  if last <= #buf then
    if last == #buf then self.buf, self.pos = "", 1 else self.pos = last + 1 end
    return sub(buf, pos, last)
  end
  local parts, np, have = start_parts(self)
  while true do
    local chunk, err, name = fetch(self)
    if not chunk then
      keep(self, parts, np)
      return nil, err, name
    end
    if chunk == "" then
      local partial = np > 0 and concat(parts, "", 1, np) or ""
      self.buf, self.pos = "", 1
      return nil, "EOF", partial
    end
    local need = n - have
    if #chunk >= need then
      if #chunk == need then self.buf, self.pos = "", 1
      else self.buf, self.pos = chunk, need + 1 end
      if np == 0 then return sub(chunk, 1, need) end
      np = np + 1; parts[np] = sub(chunk, 1, need)
      return concat(parts, "", 1, np)
    end
    np = np + 1; parts[np] = chunk
    have = have + #chunk
  end
end

-- Everything to EOF (at most limit bytes).
local function readall(self, limit)
  local parts, np, have = start_parts(self)
  if have > limit then return nil, TOO_LONG end
  while true do
    local chunk, err, name = fetch(self)
    if not chunk then
      keep(self, parts, np)
      return nil, err, name
    end
    if chunk == "" then
      self.buf, self.pos = "", 1
      return np > 0 and concat(parts, "", 1, np) or ""
    end
    np = np + 1; parts[np] = chunk
    have = have + #chunk
    if have > limit then
      keep(self, parts, np)
      return nil, TOO_LONG
    end
  end
end

--[[
** r:read(fmt [, limit]): fmt is "l" (line without its "\n" or "\r\n"),
** "L" (line with its end of line), n (exactly n bytes) or "a" (everything
** to EOF; "" when already at EOF). limit overrides the reader's limit.
]]
function Reader:read(fmt, limit)
  if type(fmt) == "number" then
    if fmt < 0 or fmt ~= fmt // 1 then
      error("bad argument #1 to 'read' (invalid count)", 2)
    end
    if fmt == 0 then return "" end
    return readn(self, fmt)
  end
  if fmt == "l" then
    local line, err, x = readuntil(self, "\n", false, limit or self.limit)
    if line and byte(line, -1) == 13 then return sub(line, 1, -2) end
    return line, err, x
  elseif fmt == "L" then
    return readuntil(self, "\n", true, limit or self.limit)
  elseif fmt == "a" then
    return readall(self, limit or self.limit)
  end
  error("bad argument #1 to 'read' (invalid format)", 2)
end

--[[
** r:readuntil(delim [, opts]): the bytes before delim (with delim when
** opts.inclusive); delim is consumed either way. opts.limit bounds the
** frame (without delim). opts may be a table reused across calls.
]]
function Reader:readuntil(delim, opts)
  if type(delim) ~= "string" or delim == "" then
    error("bad argument #1 to 'readuntil' (non-empty string expected)", 2)
  end
  if opts then
    return readuntil(self, delim, opts.inclusive, opts.limit or self.limit)
  end
  return readuntil(self, delim, false, self.limit)
end

--[[
** r:readsome([max]): the buffered bytes (at most max) or, when none is
** buffered, the next chunk from the conn (at most max; the rest stays
** buffered).
]]
function Reader:readsome(max)
  local buf, pos = self.buf, self.pos
  if pos > #buf then
    local chunk, err, name = fetch(self)
    if not chunk then return nil, err, name end
    if chunk == "" then return nil, "EOF", "" end
    buf, pos = chunk, 1
  end
  local last = #buf
  if max and pos + max - 1 < last then
    last = pos + max - 1
    self.buf, self.pos = buf, last + 1
  else
    self.buf, self.pos = "", 1
  end
  if pos == 1 and last == #buf then return buf end
  return sub(buf, pos, last)
end

--[[
** r:fill(): make sure at least one byte is buffered, without consuming it.
** Returns true, or nil, "EOF" or nil, msg, name.
]]
function Reader:fill()
  if self.pos <= #self.buf then return true end
  local chunk, err, name = fetch(self)
  if not chunk then return nil, err, name end
  if chunk == "" then return nil, "EOF" end
  self.buf, self.pos = chunk, 1
  return true
end

-- r:buffered(): the number of bytes buffered and not consumed.
function Reader:buffered()
  return #self.buf - self.pos + 1
end

-- r:setlimit(n): the default limit of line, delimited and "a" reads.
function Reader:setlimit(n)
  if type(n) ~= "number" or n < 0 then
    error("bad argument #1 to 'setlimit' (non-negative number expected)", 2)
  end
  self.limit = n
end

--[[
** r:settimeout(seconds|nil): timeout of each read from the conn (and of the
** conn's writes: so.settimeout is per conn).
]]
function Reader:settimeout(s)
  if s ~= self.timeout or self.dirty then
    self.timeout = s
    self.dirty = false
    so_settimeout(self.conn, s)
  end
end

--[[
** r:setdeadline(t|nil): reads fail with ETIMEDOUT once so.now() passes t,
** however the bytes trickle in. Clearing it restores r:settimeout's value.
]]
function Reader:setdeadline(t)
  self.deadline = t
  if t == nil and self.dirty then
    self.dirty = false
    so_settimeout(self.conn, self.timeout)
  end
end

-- The conn the reader reads from.
function Reader:getconn()
  return self.conn
end

--[[
** Writer: w:put(...) queues strings, w:flush() writes them with a single
** so.write (an array of strings: one system call).
]]
local Writer = {}
Writer.__index = Writer
Writer.__name = "so.writer"

--[[
** reader.writer(conn [, opts]): opts.limit (default 64 KiB) makes put
** flush by itself once that many bytes are queued.
]]
function M.writer(conn, opts)
  return setmetatable({
    conn = conn,
    pieces = {},      -- queued strings, handed to so.write as one array
    n = 0,            -- number of queued strings
    size = 0,         -- number of queued bytes
    limit = opts and opts.limit or M.DEFAULT_LIMIT,
  }, Writer)
end

-- w:put(s, ...): queue strings. Returns true, or what a flush returned.
function Writer:put(...)
  local pieces, n, size = self.pieces, self.n, self.size
  for i = 1, select("#", ...) do
    local s = select(i, ...)
    if type(s) ~= "string" then
      error("bad argument #" .. i .. " to 'put' (string expected, got "
            .. type(s) .. ")", 2)
    end
    if s ~= "" then
      if n == MAX_PIECES then
        self.n, self.size = n, size
        local ok, err, name = self:flush()
        if not ok then return nil, err, name end
        n, size = 0, 0
      end
      n = n + 1
      pieces[n] = s
      size = size + #s
    end
  end
  self.n, self.size = n, size
  if size >= self.limit then return self:flush() end
  return true
end

-- w:flush(): write what is queued. Returns true or nil, msg, name.
function Writer:flush()
  local n = self.n
  if n == 0 then return true end
  local pieces = self.pieces
  local ok, err, name
  if n == 1 then
    ok, err, name = so_write(self.conn, pieces[1])
  else
    ok, err, name = so_write(self.conn, pieces)
  end
  for i = n, 1, -1 do pieces[i] = nil end
  self.n, self.size = 0, 0
  return ok, err, name
end

-- w:write(...): put then flush.
function Writer:write(...)
  local ok, err, name = self:put(...)
  if not ok then return nil, err, name end
  return self:flush()
end

-- w:buffered(): the number of bytes queued.
function Writer:buffered()
  return self.size
end

return M
