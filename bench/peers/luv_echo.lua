-- luv_echo: callback echo server on Lua 5.4 with luv (Debian lua-luv).
-- Same backpressure as uv_echo.c: stop reading while a write is pending.
--
-- usage: lua5.4 luv_echo.lua PORT [HOST]   (port 0 picks a free port)
-- Prints "listening on HOST:PORT" once ready; SIGTERM ends it.

local uv = require "luv"

local port = tonumber(arg[1]) or error("usage: luv_echo.lua PORT [HOST]")
local host = arg[2] or "127.0.0.1"

local server = uv.new_tcp()
assert(server:bind(host, port))

local function serve(client)
  local on_read
  local function on_written(err)
    if err then
      client:close()
    else
      client:read_start(on_read)
    end
  end
  function on_read(err, data)
    if err or not data then   -- error, or EOF
      client:close()
      return
    end
    client:read_stop()
    client:write(data, on_written)
  end
  client:read_start(on_read)
end

assert(server:listen(4096, function(err)
  if err then return end
  local client = uv.new_tcp()
  if server:accept(client) then
    client:nodelay(true)
    serve(client)
  else
    client:close()
  end
end))

local name = server:getsockname()
io.stdout:write(("listening on %s:%d\n"):format(name.ip, name.port))
io.stdout:flush()
uv.run()
