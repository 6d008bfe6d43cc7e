-- Fuzzing so.http: random bytes and mutated requests. The server must
-- answer with a status or close, within its timeouts, never raise, and go
-- on serving. Bounded: a fixed seed and a fixed number of inputs.
local so = require "so"
local http = require "so.http"
local reader = require "so.reader"
local helper = require "helper"

local SEED = tonumber(os.getenv("FUZZ_SEED")) or 20241128
local N = tonumber(os.getenv("FUZZ_N")) or 1500

local VALID = {
  "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
  "GET /a?b=c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
  "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
  "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    .. "5\r\nhello\r\n3;e=1\r\nabc\r\n0\r\nT: 1\r\n\r\n",
  "PUT /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
  "HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
  "GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n",
}

local PIECES = { "\r\n", "\r", "\n", "\0", ":", " ", "\t", ",", ";", "0",
  "-1", "ffffffffffffffff", "99999999999999999999", "HTTP/1.1", "HTTP/9.9",
  "Content-Length: 3\r\n", "Transfer-Encoding: chunked\r\n", "Host: y\r\n",
  "Expect: 100-continue\r\n", "Connection: close\r\n", "\r\n\r\n", "\255", "%" }

local function random_bytes(n)
  local t = {}
  for i = 1, n do t[i] = string.char(math.random(0, 255)) end
  return table.concat(t)
end

local function mutate(s)
  for _ = 1, math.random(1, 4) do
    local op = math.random(1, 6)
    local i = math.random(1, #s + 1)
    if op == 1 then                                   -- flip a byte
      s = s:sub(1, i - 1) .. string.char(math.random(0, 255)) .. s:sub(i + 1)
    elseif op == 2 then                               -- delete a range
      s = s:sub(1, i - 1) .. s:sub(i + math.random(1, 8))
    elseif op == 3 then                               -- insert a piece
      s = s:sub(1, i - 1) .. PIECES[math.random(#PIECES)] .. s:sub(i)
    elseif op == 4 then                               -- duplicate a range
      local j = math.min(#s, i + math.random(0, 30))
      s = s:sub(1, j) .. s:sub(i, j) .. s:sub(j + 1)
    elseif op == 5 then                               -- truncate
      s = s:sub(1, i)
    else                                              -- random bytes inside
      s = s:sub(1, i - 1) .. random_bytes(math.random(1, 16)) .. s:sub(i)
    end
  end
  return s
end

local function input(k)
  if k % 5 == 0 then return random_bytes(math.random(0, 300)) end
  return mutate(VALID[math.random(#VALID)])
end

describe("so.http under fuzzing", function()
  local snap
  before_each(function() snap = helper.snapshot() end)
  after_each(function() helper.assert_clean(snap) end)

  it("answers with a status or closes, never raises, keeps serving", function()
    math.randomseed(SEED)
    local failures, logs = {}, {}
    local opts = { header_timeout = 0.5, keepalive_timeout = 0.5, timeout = 0.5,
                   max_body = 4096, linger = 0.1,
                   log = function(msg) logs[#logs + 1] = msg end }
    local function handler(req, body)
      if req.path == "/echo" then return { body = body } end
      local data = body:readall()
      return { body = data or "" }
    end
    local l = assert(so.listen("127.0.0.1", 0))
    local _, port = so.sockname(l)
    local live = 0
    local acceptor = so.spawn(function()
      while true do
        local conn = so.accept(l)
        if not conn then return end
        live = live + 1
        so.spawn(function()
          local ok, err = xpcall(http.serve_conn, debug.traceback, conn,
                                 handler, opts)
          if not ok then failures[#failures + 1] = err end
          live = live - 1
        end)
      end
    end)

    local function check(data, half_close)
      local c <close> = assert(so.connect("127.0.0.1", port))
      c:settimeout(3)
      local ok = c:write(data)
      if ok and half_close then c:shutdown() end
      local r = reader.new(c)
      local out, err, name = r:read("a", 1 << 20)
      if not out then
        -- A reset is a close; a timeout is a hang.
        assert.are_not.equal("ETIMEDOUT", name,
          "server hung on " .. string.format("%q", data))
        return
      end
      if out ~= "" then
        local first = out:match("^HTTP/1%.1 (%d%d%d) ")
        assert.truthy(first, "not a response: " .. string.format("%q", out:sub(1, 80))
                      .. " for " .. string.format("%q", data))
      end
    end

    local t0 = so.now()
    -- Most inputs end with the client's FIN, so that every head is final;
    -- every 50th waits for the server's timeouts. 25 workers take turns.
    local next_k = 0
    local function worker()
      while next_k < N do
        next_k = next_k + 1
        local k = next_k
        check(input(k), k % 50 ~= 0)
      end
    end
    local workers = {}
    for i = 1, 25 do workers[i] = so.spawn(worker) end
    for _, t in ipairs(workers) do helper.join(t, 60) end

    -- Still serving.
    local c <close> = assert(so.connect("127.0.0.1", port))
    c:settimeout(3)
    assert(c:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                   .. "Connection: close\r\n\r\nok"))
    local out = assert(reader.new(c):read("a"))
    assert.truthy(out:find("^HTTP/1%.1 200 OK\r\n"))
    assert.truthy(out:find("\r\n\r\nok$"))
    c:close()

    assert.are.same({}, failures)
    for _, msg in ipairs(logs) do
      assert.falsy(msg:find("handler failed", 1, true), msg)
    end
    assert.is_true(so.now() - t0 < 30)
    l:close()
    helper.join(acceptor, 5)
    assert.is_true(helper.wait_until(function() return live == 0 end, 5))
  end)
end)

-- Responses for the client: valid ones, mutated as requests are.
local RESPONSES = {
  "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
  "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    .. "5\r\nhello\r\n3;e=\"q\"\r\nabc\r\n0\r\nT: 1\r\n\r\n",
  "HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n",
  "HTTP/1.0 200 OK\r\n\r\nuntil the close",
  "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
  "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
  "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye",
}

describe("so.http's client under fuzzing", function()
  local pool = require "so.pool"
  local snap
  before_each(function()
    pool.clear()
    snap = helper.snapshot()
  end)
  after_each(function()
    pool.clear()
    helper.assert_clean(snap)
  end)

  it("returns a response or nil, msg, name for any reply, never raises, pools no bad conn",
     function()
    math.randomseed(SEED + 1)
    local M = math.max(N // 2, 10)
    local replies = {}
    for k = 1, M do
      if k % 7 == 0 then replies[k] = random_bytes(math.random(0, 200))
      else replies[k] = mutate(RESPONSES[math.random(#RESPONSES)]) end
    end
    -- The server answers request /k with replies[k], on as many requests
    -- as a conn carries; every 10th reply it cuts in half and stalls.
    local live = 0
    local l, _, port = helper.server(function(c)
      live = live + 1
      c:settimeout(2)
      local r = reader.new(c)
      while true do
        local head = r:readuntil("\r\n\r\n")
        if not head then break end
        local k = tonumber(head:match("^%u+ /(%d+)"))
        if head:match("^GET /ok ") then
          if not c:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") then
            break
          end
        elseif not k then
          break
        elseif k % 10 == 0 then
          -- Half the reply, then a stall until the client gives up.
          c:write(replies[k]:sub(1, #replies[k] // 2))
          r:read("a")
          break
        elseif not c:write(replies[k]) then
          break
        end
      end
      c:close()
      live = live - 1
    end)
    local failures, outcomes = {}, { ok = 0, failed = 0 }
    local next_k = 0
    local function worker()
      while next_k < M do
        next_k = next_k + 1
        local k = next_k
        local ok, res, err, name = pcall(http.request, {
          url = "http://127.0.0.1:" .. port .. "/" .. k, timeout = 0.3,
          method = k % 3 == 0 and "HEAD" or "GET" })
        if ok and res then
          ok, res, err, name = pcall(res.body.readall, res.body)
        end
        if not ok then
          failures[#failures + 1] = ("%q: %s"):format(replies[k], tostring(res))
        elseif res then
          outcomes.ok = outcomes.ok + 1
        elseif type(err) ~= "string" or type(name) ~= "string"
               or not err:find("^" .. name:gsub("%W", "%%%0") .. ":") and name ~= "ETLS" then
          failures[#failures + 1] = ("%q: bad error %s %s"):format(
            replies[k], tostring(err), tostring(name))
        else
          outcomes.failed = outcomes.failed + 1
        end
      end
    end
    local workers = {}
    for i = 1, 25 do workers[i] = so.spawn(worker) end
    for _, t in ipairs(workers) do helper.join(t, 60) end
    assert.are.same({}, failures)
    assert.is_true(outcomes.ok > 0 and outcomes.failed > 0)
    -- What the pool kept is sound: its conns carry valid requests.
    local kept = pool.count()
    for _ = 1, kept + 5 do
      local res, err = http.request{ url = "http://127.0.0.1:" .. port .. "/ok",
                                     timeout = 2 }
      assert.is_truthy(res, err)
      assert.are.equal(200, res.status)
      assert.are.equal("ok", res.body:readall())
    end
    pool.clear()
    l:close()
    assert.is_true(helper.wait_until(function() return live == 0 end, 5))
  end)
end)
