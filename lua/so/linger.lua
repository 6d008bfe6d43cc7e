--[[
** so.linger: a lingering close, as nginx's lingering_close. A close with
** input left unread makes the kernel send RST, which may destroy what was
** sent before the peer has read it (a response, a close frame). So: FIN
** first, then the peer's input read and dropped until its EOF, for at
** most `seconds` in all (a deadline, not a timeout for each read: a peer
** that sends a byte a second cannot keep the connection) and at most
** 1 MiB, then the close. Shared by so.http and so.websocket.
]]

local so = require "so"

local so_read, so_shutdown, so_close = so.read, so.shutdown, so.close

local M = {}

-- Read and drop what the peer still sends, up to its EOF or 1 MiB.
function M.drop_input(conn)
  local seen = 0
  while seen < 1024 * 1024 do
    local data = so_read(conn)
    if not data or data == "" then break end
    seen = seen + #data
  end
end

-- FIN, the peer's input dropped for at most `seconds`, then the close.
function M.close(conn, seconds)
  if so_shutdown(conn) then so.deadline(seconds, M.drop_input, conn) end
  so_close(conn)
end

return M
