-- The echo server of "Promises and Events", with tasks where the chapter
-- has async functions: luahost scripts/echo.lua [PORT [HOST]]
local so = require "so"

local port = tonumber(arg[1]) or 1234
local host = arg[2] or "127.0.0.1"

-- Echoes everything back until the client ends its side (read gives "")
-- or the connection fails (read or write gives nil, msg).
local function serve_client(conn)
  local c <close> = conn
  while true do
    local data = c:read()
    if not data or data == "" then break end
    if not c:write(data) then break end
  end
end

local listener = assert(so.listen(host, port))
local h, p = so.sockname(listener)
io.write("listening on ", h, ":", p, "\n")
io.stdout:flush()

-- Until the host drains (SIGTERM, SIGINT): then accept gives ECANCELED,
-- and the clients' tasks have the drain period to finish.
while true do
  local conn, _, name = listener:accept()
  if conn then
    so.spawn(serve_client, conn)  -- one task per connection, never awaited
  elseif name == "ECANCELED" then
    break
  end
end
