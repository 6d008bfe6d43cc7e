-- Serves a directory over HTTP/1.1, as nginx's static module does:
--   build/luahost scripts/static.lua DIR [PORT [HOST]]
-- Content-Type by extension, index.html for a directory, ETag and
-- Last-Modified with conditional requests, byte ranges, gzip for text when
-- the client accepts it; nothing outside DIR is reachable.
local http = require "so.http"

local dir = arg[1]
if not dir then
  io.stderr:write("usage: static.lua DIR [PORT [HOST]]\n")
  os.exit(2)
end
local port = tonumber(arg[2]) or 8080
local host = arg[3] or "127.0.0.1"

local server = assert(http.listen(host, port, http.static(dir)))
local h, p = server:sockname()
io.write("listening on ", h, ":", p, "\n")
io.stdout:flush()
server:serve()
