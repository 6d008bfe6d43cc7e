-- A small HTTP/1.1 server: build/luahost scripts/http_hello.lua [PORT [HOST]]
--
--   GET /        200 "hello world\n"
--   POST /echo   the request body, streamed back as it arrives
--   GET /stream  a chunked response produced piece by piece
--   GET /raise   a handler that raises: 500, the error in the log
--   otherwise    404
--
-- scripts/https_hello.lua runs this file with a TLS context as its first
-- value (a script run from the command line gets strings there).
local so = require "so"
local http = require "so.http"

local tls_ctx = type((...)) == "userdata" and (...) or nil
local port = tonumber(arg[1]) or 1234
local host = arg[2] or "127.0.0.1"

local TEXT = { ["Content-Type"] = "text/plain" }
local OCTETS = { ["Content-Type"] = "application/octet-stream" }
local HELLO = { status = 200, headers = TEXT, body = "hello world\n" }
local NOT_FOUND = { status = 404, headers = TEXT, body = "not found\n" }

local function handler(req, body)
  local path, method = req.path, req.method
  if path == "/" and (method == "GET" or method == "HEAD") then
    return HELLO
  elseif path == "/echo" and method == "POST" then
    return { status = 200, headers = OCTETS, body = body }
  elseif path == "/stream" and (method == "GET" or method == "HEAD") then
    local i = 0
    return { status = 200, headers = TEXT, body = function()
      i = i + 1
      if i > 5 then return nil end
      if i > 1 then so.sleep(0.01) end
      return "piece " .. i .. "\n"
    end }
  elseif path == "/raise" then
    error("this handler raises, on purpose")
  end
  return NOT_FOUND
end

local server = assert(http.listen(host, port, handler, {
  max_body = 4 * 1024 * 1024 * 1024,   -- /echo streams: 4 GiB is fine
  tls = tls_ctx,
}))
local h, p = server:sockname()
io.write("listening on ", h, ":", p, "\n")
io.stdout:flush()
server:serve()
