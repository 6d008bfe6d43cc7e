-- The message protocol: build/luahost scripts/msg_echo.lua [PORT [HOST]]
--
-- A message ends with "\n"; each gets "Echo: " plus the message (its "\n"
-- included) in reply. "quit\n" gets "Bye.\n" and the connection is closed,
-- and so is a connection that sends a message longer than 1 MiB.
-- Replies to pipelined messages are gathered and sent together: the writer
-- is flushed whenever the reader has to wait for more input.

local so = require "so"
local reader = require "so.reader"

local MAX_MESSAGE = 1024 * 1024
local UNTIL = { inclusive = true, limit = MAX_MESSAGE }

local function serve_client(conn)
  local c <close> = conn
  local w = reader.writer(conn)
  local r = reader.new(conn, { writer = w })
  while true do
    local msg = r:readuntil("\n", UNTIL)
    if not msg then break end          -- EOF, too long or a network error
    if msg == "quit\n" then
      w:put("Bye.\n")
      break
    end
    if not w:put("Echo: ", msg) then break end
  end
  w:flush()
end

local port = tonumber(arg[1]) or 1234
local host = arg[2] or "127.0.0.1"
local l = assert(so.listen(host, port))
local h, p = so.sockname(l)
io.write("listening on ", h, ":", p, "\n")
io.stdout:flush()
-- Until the host drains (SIGTERM): then accept gives ECANCELED.
while true do
  local conn, _, name = so.accept(l)
  if conn then
    so.spawn(serve_client, conn)
  elseif name == "ECANCELED" then
    break
  end
end
