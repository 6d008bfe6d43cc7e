-- scripts/examples/: the JSON notes API against a real redis-server and its
-- word-count upstream, driven by curl as the README's section runs it.
local so = require "so"
local helper = require "spec.helper"

local function curl(args)
  local code, out = helper.run("curl -s -w '\\n%{http_code}' " .. args)
  assert.equal(0, code, out)
  local body, status = out:match("^(.-)\n?(%d%d%d)$")
  return tonumber(status), body
end

describe("scripts/examples/notes_api.lua", function()
  local redis_h, redis_port, upstream, api

  setup(function()
    assert(os.execute("command -v redis-server >/dev/null 2>&1"),
           "redis-server is not installed (the README's test command installs it)")
    redis_port = helper.free_port()
    redis_h = helper.bg(string.format(
      "exec redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no"
      .. " --loglevel warning", redis_port))
    assert(helper.wait_port(redis_port), "redis-server did not start")
    upstream = helper.start("scripts/examples/word_count.lua")
    api = helper.start_with(string.format(
      "REDIS=127.0.0.1:%d UPSTREAM=http://127.0.0.1:%d/count", redis_port,
      upstream.port), "scripts/examples/notes_api.lua")
  end)

  teardown(function()
    if api then api:stop() end
    if upstream then upstream:stop() end
    if redis_h then redis_h:kill(); redis_h:cleanup() end
  end)

  it("stores notes in Redis, counts their words upstream, lists, reads and deletes them",
     function()
    local base = "http://127.0.0.1:" .. api.port
    local status, body = curl("-X POST -d '{\"text\":\"hello luahost world\"}' "
                              .. base .. "/notes")
    assert.equal(201, status, body)
    local id = assert(tonumber(body:match('"id":(%d+)')), body)
    assert.truthy(body:find('"words":3', 1, true), body)
    status, body = curl("-X POST -d '{\"text\":\"second\"}' " .. base .. "/notes")
    assert.equal(201, status, body)
    status, body = curl(base .. "/notes")
    assert.equal(200, status)
    assert.truthy(body:find('^%[{"') and body:find('"text":"second"', 1, true), body)
    assert.truthy(body:find('"second".-"hello luahost world"'), body)  -- newest first
    status, body = curl(base .. "/notes/" .. id)
    assert.equal(200, status)
    assert.truthy(body:find('"text":"hello luahost world"', 1, true), body)
    assert.equal(204, (curl("-X DELETE " .. base .. "/notes/" .. id)))
    assert.equal(404, (curl(base .. "/notes/" .. id)))
    assert.equal(400, (curl("-X POST -d 'not json' " .. base .. "/notes")))
    status, body = curl(base .. "/health")
    assert.equal(200, status, body)
  end)

  it("answers 502 and 503 while the upstream is down, and recovers", function()
    local base = "http://127.0.0.1:" .. api.port
    upstream:stop()
    local status, body = curl("-X POST -d '{\"text\":\"x\"}' " .. base .. "/notes")
    assert.equal(502, status, body)
    status, body = curl(base .. "/health")
    assert.equal(503, status, body)
    assert.truthy(body:find('"redis":"ok"', 1, true), body)
    upstream = helper.start("scripts/examples/word_count.lua")
    api:stop()  -- (the upstream has a new port: the API starts again)
    api = helper.start_with(string.format(
      "REDIS=127.0.0.1:%d UPSTREAM=http://127.0.0.1:%d/count", redis_port,
      upstream.port), "scripts/examples/notes_api.lua")
    status, body = curl(base:gsub("%d+$", api.port) .. "/health")
    assert.equal(200, status, body)
  end)
end)
