-- cqueues_echo: coroutine echo server on Lua 5.4 with cqueues (Debian
-- lua-cqueues).  One coroutine per connection: read what is there, write it
-- back unbuffered, repeat; a coroutine waiting in xwrite reads nothing, which
-- is the backpressure.
--
-- usage: lua5.4 cqueues_echo.lua PORT [HOST]   (port 0 picks a free port)
-- Prints "listening on HOST:PORT" once ready; SIGTERM ends it.

local cqueues = require "cqueues"
local socket = require "cqueues.socket"

local port = tonumber(arg[1]) or error("usage: cqueues_echo.lua PORT [HOST]")
local host = arg[2] or "127.0.0.1"

local loop = cqueues.new()
local listener = socket.listen { host = host, port = port, reuseaddr = true,
                                 backlog = 4096 }
assert(listener:listen())   -- bind now, so the port is known

-- Network errors end the connection; they are returned, not raised.
local function onerror(_, _, why) return why end

local function serve(con)
  con:onerror(onerror)
  con:setmode("bn", "bn")
  while true do
    local data = con:xread(-65536, "b")   -- up to 64 KiB, whatever is there
    if not data then break end            -- EOF or error
    local ok = con:xwrite(data, "bn")
    if not ok then break end
  end
  con:close()
end

loop:wrap(function()
  for con in listener:clients() do
    loop:wrap(serve, con)
  end
end)

local _, addr, lport = listener:localname()
io.stdout:write(("listening on %s:%d\n"):format(addr, lport))
io.stdout:flush()

while true do
  local ok, err = loop:step()
  if not ok then
    io.stderr:write("cqueues_echo: ", tostring(err), "\n")
  end
end
