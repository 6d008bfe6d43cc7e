-- scripts/http_hello.lua over TLS (HTTP/1.1 by ALPN, TLS 1.2 and 1.3):
--   build/luahost scripts/https_hello.lua CERT KEY [PORT [HOST]]
local tls = require "so.tls"

local cert, key = arg[1], arg[2]
if not cert or not key then
  io.stderr:write("usage: https_hello.lua CERT KEY [PORT [HOST]]\n")
  os.exit(2)
end
local ctx, err = tls.server{ cert = cert, key = key, alpn = { "http/1.1" },
                             min_version = "1.2" }
if not ctx then
  io.stderr:write("https_hello.lua: ", err, "\n")
  os.exit(1)
end

-- http_hello.lua reads PORT and HOST from arg[1] and arg[2].
local dir = arg[0]:match("^(.*/)") or "./"
arg = { [0] = arg[0], arg[3], arg[4] }
assert(loadfile(dir .. "http_hello.lua"))(ctx)
