-- tls_echo: scripts/echo.lua over TLS, for `bench/run tls`.
--   luahost bench/peers/tls_echo.lua CERT KEY [PORT [HOST]]   (port 0: any)
-- Prints "listening on HOST:PORT" once ready; SIGTERM ends it.  TLS 1.3
-- only and TLS_AES_128_GCM_SHA256 only, as nginx and Node are set up.
local so = require "so"
local tls = require "so.tls"

local cert, key = arg[1], arg[2]
local port = tonumber(arg[3]) or 0
local host = arg[4] or "127.0.0.1"
if not cert or not key then
  io.stderr:write("usage: tls_echo.lua CERT KEY [PORT [HOST]]\n")
  os.exit(2)
end

local ctx = assert(tls.server{ cert = cert, key = key, min_version = "1.3",
                               ciphers = "TLS_AES_128_GCM_SHA256" })

-- The handshake, then every byte back until the client ends its side
-- (close_notify or EOF: read gives "") or the connection fails.
local function serve_client(conn)
  -- tls.wrap upgrades conn in place and returns it; nil when the
  -- handshake failed, and conn is closed then.
  local t <close> = tls.wrap(conn, ctx)
  if not t then return end
  while true do
    local data = so.read(t)
    if not data or data == "" then break end
    if not so.write(t, data) then break end
  end
end

local listener = assert(so.listen(host, port))
local h, p = so.sockname(listener)
io.write("listening on ", h, ":", p, "\n")
io.stdout:flush()

while true do
  local conn, _, name = listener:accept()
  if conn then
    so.spawn(serve_client, conn)
  elseif name == "ECANCELED" then
    break
  end
end
