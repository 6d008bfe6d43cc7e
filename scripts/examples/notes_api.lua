-- A JSON API in Lua: notes kept in Redis, each enriched by an upstream
-- HTTP service. Run it as the README's "A JSON API" section shows:
--   build/luahost scripts/examples/notes_api.lua [PORT [HOST]]
-- Environment: REDIS (host:port, default 127.0.0.1:6379), UPSTREAM (the
-- word-count service's URL, default http://127.0.0.1:8081/count).
--
--   POST   /notes        {"text": "..."}  -> 201 {"id": 1, "text": ..., "words": 2}
--   GET    /notes                         -> 200 [{"id": 1, ...}, ...] (newest first)
--   GET    /notes/ID                      -> 200 {"id": ...} | 404
--   DELETE /notes/ID                      -> 204 | 404
--   GET    /health                        -> 200 {"redis": "ok", "upstream": "ok"} | 503
--
-- Handlers are plain Lua: each request runs in its own task, and every
-- call that waits (Redis, the upstream, the client) yields that task only.
local so = require "so"
local http = require "so.http"
local redis = require "so.redis"
local cjson = require "cjson.safe"   -- Debian's lua-cjson

local port = tonumber(arg[1]) or 8080
local host = arg[2] or "127.0.0.1"
local rhost, rport = (os.getenv("REDIS") or "127.0.0.1:6379"):match("^(.*):(%d+)$")
local upstream = os.getenv("UPSTREAM") or "http://127.0.0.1:8081/count"

local JSON = { ["Content-Type"] = "application/json" }

local function reply(status, value)
  return { status = status, headers = JSON,
           body = value ~= nil and cjson.encode(value) .. "\n" or nil }
end

local function fail(status, msg) return reply(status, { error = msg }) end

-- A Redis client from the pool for the length of one request.
local function with_redis(fn)
  local r, err = redis.connect(rhost, tonumber(rport), { timeout = 2 })
  if not r then return fail(503, "redis: " .. err) end
  local res = fn(r)
  r:keepalive()   -- back to the pool (closed instead if it broke)
  return res
end

-- The upstream's word count for a text, or nil, why.
local function count_words(text)
  local res, err = http.request{ url = upstream, method = "POST", timeout = 2,
                                 headers = { ["Content-Type"] = "text/plain" },
                                 body = text }
  if not res then return nil, err end
  local body = res.body:readall()
  if res.status ~= 200 then return nil, "upstream answered " .. res.status end
  local doc = cjson.decode(body or "")
  return doc and doc.words, "upstream sent no count"
end

local function load(r, id)
  local h = r:call("HGETALL", "note:" .. id)
  if type(h) ~= "table" or #h == 0 then return nil end
  local note = { id = tonumber(id) }
  for i = 1, #h, 2 do note[h[i]] = h[i + 1] end
  note.words = tonumber(note.words)
  return note
end

local routes = {}

routes["POST /notes"] = function(req, body)
  local doc = cjson.decode(body:readall(64 * 1024) or "")
  if type(doc) ~= "table" or type(doc.text) ~= "string" or doc.text == "" then
    return fail(400, 'expected {"text": "..."}')
  end
  -- The upstream call and Redis run one after the other in this task; a
  -- slow upstream holds only this request.
  local words, err = count_words(doc.text)
  if not words then return fail(502, err) end
  return with_redis(function(r)
    local id = r:call("INCR", "notes:next")
    if not id then return fail(503, "redis failed") end
    local ok = r:pipeline(function(p)
      p:call("HSET", "note:" .. id, "text", doc.text, "words", words)
      p:call("LPUSH", "notes", id)
    end)
    if not ok then return fail(503, "redis failed") end
    return reply(201, { id = id, text = doc.text, words = words })
  end)
end

routes["GET /notes"] = function()
  return with_redis(function(r)
    local ids = r:call("LRANGE", "notes", 0, 99) or {}
    local notes = setmetatable({}, cjson.array_mt)
    for _, id in ipairs(ids) do notes[#notes + 1] = load(r, id) end
    return reply(200, notes)
  end)
end

routes["GET /notes/ID"] = function(_, _, id)
  return with_redis(function(r)
    local note = load(r, id)
    if not note then return fail(404, "no note " .. id) end
    return reply(200, note)
  end)
end

routes["DELETE /notes/ID"] = function(_, _, id)
  return with_redis(function(r)
    local n = r:call("DEL", "note:" .. id)
    if n ~= 1 then return fail(404, "no note " .. id) end
    r:call("LREM", "notes", 0, id)
    return { status = 204 }
  end)
end

routes["GET /health"] = function()
  local state, status = {}, 200
  local r, err = redis.connect(rhost, tonumber(rport), { timeout = 1 })
  state.redis = r and r:call("PING") == "PONG" and "ok" or ("down: " .. tostring(err))
  if r then r:keepalive() end
  local words, uerr = count_words("ping")
  state.upstream = words and "ok" or ("down: " .. tostring(uerr))
  if state.redis ~= "ok" or state.upstream ~= "ok" then status = 503 end
  return reply(status, state)
end

local function handler(req, body)
  local path = req.path
  local id = path:match("^/notes/(%d+)$")
  local route = routes[req.method .. " " .. (id and "/notes/ID" or path)]
  if not route then return fail(404, "no route for " .. req.method .. " " .. path) end
  return route(req, body, id)
end

local server = assert(http.listen(host, port, handler, { access_log = true }))
local h, p = server:sockname()
io.write("listening on ", h, ":", p, "\n")
io.stdout:flush()
server:serve()
