-- The upstream of notes_api.lua: POST /count with a text answers
-- {"words": N}. build/luahost scripts/examples/word_count.lua [PORT [HOST]]
local http = require "so.http"
local cjson = require "cjson"

local port = tonumber(arg[1]) or 8081
local host = arg[2] or "127.0.0.1"

local server = assert(http.listen(host, port, function(req, body)
  if req.method ~= "POST" or req.path ~= "/count" then
    return { status = 404, body = "not found\n" }
  end
  local text = body:readall(1024 * 1024) or ""
  local n = 0
  for _ in text:gmatch("%S+") do n = n + 1 end
  return { status = 200, headers = { ["Content-Type"] = "application/json" },
           body = cjson.encode({ words = n }) .. "\n" }
end))
local h, p = server:sockname()
io.write("listening on ", h, ":", p, "\n")
io.stdout:flush()
server:serve()
