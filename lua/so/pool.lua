--[[
** so.pool: keep-alive pools of idle conns, keyed by a string (what the
** clients use: "host:port", with the TLS name or the database in it).
**
**   local pool = require "so.pool"
**   local conn = pool.get(key) or assert(so.connect(host, port))
**   ...                              -- a whole request and its answer
**   pool.put(key, conn)              -- idle again: someone may reuse it
**
** As OpenResty's cosocket keepalive: the most recently used conn is handed
** out first (it is the least likely to have been closed by the peer), at
** most `max_idle` wait per key (the oldest closes to make room), and each
** waits at most its idle time. A conn on which anything arrived while it
** was idle (the peer's EOF, an error, or bytes nobody asked for) is
** closed, never handed out: so.readable tells, without reading. Idle
** conns are looked at when their key is used again; they hold no task and
** keep no script from ending.
]]

local so = require "so"

local now, readable, close = so.now, so.readable, so.close
local type, tostring, error, pairs, pcall, getmetatable =
  type, tostring, error, pairs, pcall, getmetatable
local find = string.find

local M = {}

local config = {
  max_idle = 32,       -- idle conns kept per key
  idle_timeout = 30,   -- seconds a conn may idle, unless put says
}

-- key -> { n = count, conns..., expires = { ... } }: a stack, newest last.
local pools = {}

-- Closes the conns of list that have idled too long; keeps the order.
local function sweep(list, t)
  local n, j = list.n, 0
  local expires = list.expires
  for i = 1, n do
    local c = list[i]
    if expires[i] > t then
      j = j + 1
      list[j], expires[j] = c, expires[i]
    else
      close(c)
    end
  end
  for i = j + 1, n do list[i], expires[i] = nil, nil end
  list.n = j
end

--[[
** pool.get(key): the most recently put idle conn of key that is still
** good, or nil. Conns that expired or that the peer closed are closed on
** the way.
]]
function M.get(key)
  local list = pools[key]
  if not list then return nil end
  local t, expires = now(), list.expires
  local n = list.n
  while n > 0 do
    local c, e = list[n], expires[n]
    list[n], expires[n] = nil, nil
    n = n - 1
    -- (a conn its owner closed after putting it is dropped: pcall)
    local ok, busy = pcall(readable, c)
    if e > t and ok and not busy then
      list.n = n
      return c
    end
    close(c)
  end
  pools[key] = nil
  return nil
end

--[[
** pool.put(key, conn [, idle_seconds]): conn waits in the pool for the
** next get(key), at most idle_seconds (config.idle_timeout). true; false
** when conn was not idle (bytes or EOF had arrived): it is closed.
]]
function M.put(key, conn, idle)
  if type(key) ~= "string" then
    error("bad argument #1 to 'put' (string expected, got " .. type(key)
          .. ")", 2)
  end
  if idle ~= nil and (type(idle) ~= "number" or idle < 0) then
    error("bad argument #3 to 'put' (non-negative number expected, got "
          .. tostring(idle) .. ")", 2)
  end
  local ok, busy = pcall(readable, conn)
  if not ok then
    if find(busy, "closed conn", 1, true) then
      error("attempt to use a closed conn", 2)
    end
    local mt = getmetatable(conn)
    error("bad argument #2 to 'put' (conn expected, got "
          .. (type(mt) == "table" and mt.__name or type(conn)) .. ")", 2)
  end
  if busy or config.max_idle < 1 then
    close(conn)
    return false
  end
  local t = now()
  local list = pools[key]
  if not list then
    list = { n = 0, expires = {} }
    pools[key] = list
  else
    sweep(list, t)
  end
  for i = 1, list.n do  -- put twice: once in the pool
    if list[i] == conn then
      list.expires[i] = t + (idle or config.idle_timeout)
      return true
    end
  end
  local max = config.max_idle
  if list.n >= max then  -- the oldest makes room
    local expires = list.expires
    close(list[1])
    for i = 1, list.n - 1 do list[i], expires[i] = list[i + 1], expires[i + 1] end
    list[list.n], expires[list.n] = nil, nil
    list.n = list.n - 1
  end
  local n = list.n + 1
  list[n], list.expires[n] = conn, t + (idle or config.idle_timeout)
  list.n = n
  return true
end

--[[
** pool.configure{max_idle = N, idle_timeout = S}: changes the defaults
** (existing idle conns keep their times); returns the settings in force.
]]
function M.configure(opts)
  if opts ~= nil then
    if type(opts) ~= "table" then
      error("bad argument #1 to 'configure' (table expected, got "
            .. type(opts) .. ")", 2)
    end
    for k, v in pairs(opts) do  -- all checked before any is applied
      if config[k] == nil then
        error("bad argument #1 to 'configure' (unknown option '"
              .. tostring(k) .. "')", 2)
      elseif type(v) ~= "number" or v < 0 or (k == "max_idle" and v % 1 ~= 0) then
        error("bad argument #1 to 'configure' (" .. k
              .. " must be a non-negative " .. (k == "max_idle" and "integer" or "number")
              .. ")", 2)
      end
    end
    for k, v in pairs(opts) do config[k] = v end
  end
  return { max_idle = config.max_idle, idle_timeout = config.idle_timeout }
end

-- pool.count([key]): idle conns of key, or of every key (for tests, stats).
function M.count(key)
  if key ~= nil then
    local list = pools[key]
    return list and list.n or 0
  end
  local total = 0
  for _, list in pairs(pools) do total = total + list.n end
  return total
end

-- pool.clear([key]): closes the idle conns of key, or of every key.
function M.clear(key)
  for k, list in pairs(pools) do
    if key == nil or k == key then
      for i = 1, list.n do close(list[i]) end
      pools[k] = nil
    end
  end
end

return M
