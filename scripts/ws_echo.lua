-- A WebSocket echo server: build/luahost scripts/ws_echo.lua [PORT [HOST]]
--
-- GET / upgrades to a websocket that sends every message back as it came
-- (text as text, binary as binary) until the client closes; anything else
-- gets 404, and a plain GET / gets 426 (see docs/websocket.md).
local so = require "so"
local http = require "so.http"
local ws = require "so.websocket"

local port = tonumber(arg[1]) or 1234
local host = arg[2] or "127.0.0.1"

local NOT_FOUND = { status = 404, headers = { ["Content-Type"] = "text/plain" },
                    body = "not found\n" }

local function handler(req, body)
  if req.path ~= "/" then return NOT_FOUND end
  local sock, res = ws.upgrade(req, body)
  if not sock then return res end
  while true do
    local data, kind = sock:receive()
    if not data then break end           -- closed, failed or timed out
    if not sock:send(data, kind) then break end
  end
  sock:close()
end

local server = assert(http.listen(host, port, handler))
local h, p = server:sockname()
io.write("listening on ", h, ":", p, "\n")
io.stdout:flush()
server:serve()
