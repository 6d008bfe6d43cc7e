-- so.redis against a real redis-server started here (Debian's package: a
-- random port, a Unix socket, no persistence; its absence fails the spec),
-- and against fake servers (so.listen tasks) that send crafted bytes.
local so = require "so"
local helper = require "helper"
local lfs = require "lfs"
local redis = require "so.redis"
local pool = require "so.pool"

local null = redis.null

-- A free loopback port (the listener that found it is closed again).
local function free_port()
  local l = assert(so.listen("127.0.0.1", 0))
  local _, port = so.sockname(l)
  l:close()
  return port
end

-- Sends a raw command line to host:port and returns the first reply read.
local function raw_ping(port)
  local c = so.connect("127.0.0.1", port, 1)
  if not c then return nil end
  local cc <close> = c
  c:settimeout(1)
  if not c:write("PING\r\n") then return nil end
  return c:read()
end

--[[
** Starts redis-server in the background: a free port, a Unix socket, no
** persistence, its files in a temporary directory, plus `extra` options.
** Waits until it answers PING. Returns { port, sock, dir, stop() }.
]]
local function start_redis(extra)
  assert(os.execute("command -v redis-server >/dev/null 2>&1"),
         "redis-server is not installed (apt-get install redis-server)")
  local dir = os.tmpname()
  os.remove(dir)
  assert(lfs.mkdir(dir))
  local port = free_port()
  local sock = dir .. "/redis.sock"
  local h = helper.bg(string.format(
    "exec redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no"
    .. " --daemonize no --dir %s --unixsocket %s --unixsocketperm 700"
    .. " --loglevel warning %s", port, helper.shq(dir), helper.shq(sock),
    extra or ""))
  local ok = helper.wait_until(function()
    return raw_ping(port) == "+PONG\r\n"
  end, 10)
  local srv = { port = port, sock = sock, dir = dir, h = h }
  function srv.stop()
    h:kill()  -- (its whole process group: the shell never writes its status)
    helper.wait_until(function()
      return not os.execute("kill -0 " .. h.pid .. " 2>/dev/null")
    end, 5)
    h:cleanup()
    os.execute("rm -rf " .. helper.shq(dir))
  end
  if not ok then
    local out, err = h:output()
    srv.stop()
    error("redis-server did not start: " .. out .. err)
  end
  return srv
end

-- A fake server: handler(conn) runs in a task per connection, and its conn
-- is closed when it returns. Returns the listener and its port.
local function fake(handler)
  local l, _, port = helper.server(function(c)
    local cc <close> = c
    c:settimeout(10)
    handler(c)
  end)
  return l, port
end

-- Reads from c until the peer's EOF or an error (a fake's last act).
local function drain(c)
  while true do
    local d = c:read()
    if not d or d == "" then return end
  end
end

-- A fake that answers the first request with `bytes` (a string, or a list
-- written piece by piece), then stays until the client goes, or closes at
-- once with `close`.
local function fake_reply(bytes, close)
  return fake(function(c)
    if not c:read() then return end
    if type(bytes) == "string" then bytes = { bytes } end
    for i, piece in ipairs(bytes) do
      if i > 1 then so.sleep(0.002) end
      if not c:write(piece) then return end
    end
    if not close then drain(c) end
  end)
end

describe("so.redis", function()
  local R  -- the redis-server

  setup(function() R = start_redis() end)
  teardown(function() if R then R.stop() end end)

  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function()
    pool.clear()
    helper.assert_clean(before)
  end)

  local function connect(opts)
    return assert(redis.connect("127.0.0.1", R.port, opts))
  end

  -- The server's id of the client's connection.
  local function id_of(r) return assert(r:call("CLIENT", "ID")) end

  describe("replies", function()
    it("turns each kind of reply into Lua values", function()
      local r <close> = connect()
      assert.is_true(r:call("SET", "k", "v"))                 -- +OK
      assert.equal("PONG", r:call("PING"))                    -- other status
      assert.equal("v", r:call("GET", "k"))                   -- bulk
      assert.equal("", (r:call("ECHO", "")))                  -- empty bulk
      assert.equal(null, r:call("GET", "no such key"))        -- nil bulk
      assert.equal(null, r:call("BLPOP", "no such list", "0.01"))  -- nil array
      local n = r:call("INCR", "counter")
      assert.equal("integer", math.type(n))
      assert.equal(-7, r:call("INCRBY", "counter", -7 - n))  -- negative
      assert.same({}, r:call("LRANGE", "no such list", 0, -1))
      local nested = r:call("EVAL",
        "return {1, {2, 'x', {}}, 'y', redis.error_reply('E1 inner')}", 0)
      assert.equal(1, nested[1])
      assert.same({ 2, "x", {} }, nested[2])
      assert.equal("y", nested[3])
      assert.equal("E1 inner", redis.iserror(nested[4]))
      assert.equal("E1 inner", nested[4].err)
      assert.is_nil(redis.iserror("x"))
      assert.equal("redis.null", tostring(null))
      assert.has_error(function() null.x = 1 end)
      r:call("DEL", "k", "counter")
    end)

    it("returns an error reply as nil, msg, EREDIS and stays usable", function()
      local r <close> = connect()
      assert.is_true(r:call("SET", "str", "x"))
      assert.same({ nil, "WRONGTYPE Operation against a key holding the wrong "
                    .. "kind of value", "EREDIS" },
                  { r:call("LPUSH", "str", "a") })
      local v, msg, name = r:call("NO-SUCH-COMMAND", "a")
      assert.is_nil(v)
      assert.matches("^ERR unknown command", msg)
      assert.equal("EREDIS", name)
      assert.equal("x", r:call("GET", "str"))
      assert.is_true(r:keepalive())  -- an error reply leaves it clean
      local r2 <close> = connect()
      assert.equal("x", r2:get("str"))
      r2:del("str")
    end)

    it("carries a 5 MiB value and a 100,000-element array", function()
      local r <close> = connect()
      local big = {}
      for i = 1, 5 * 1024 do
        big[i] = string.format("%8d", i) .. string.rep(".", 1015) .. "\n"
      end
      big = table.concat(big)
      assert.is_true(r:call("SET", "big", big))
      assert.is_true(r:call("GET", "big") == big)
      local items = {}
      for i = 1, 100000 do items[i] = tostring(i) end
      for i = 1, 100000, 10000 do
        assert(r:call("RPUSH", "list", table.move(items, i, i + 9999, 1, {})))
      end
      local t0 = so.now()
      local got = r:call("LRANGE", "list", 0, -1)
      assert.equal(100000, #got)
      assert.same(items, got)
      assert.is_true(so.now() - t0 < 5)
      assert.equal(2, r:call("DEL", "big", "list"))
    end)
  end)

  describe("arguments", function()
    it("are binary-safe: any bytes, no injection through \\r\\n", function()
      local r <close> = connect()
      local all = {}
      for i = 0, 255 do all[#all + 1] = string.char(i) end
      all = table.concat(all)
      local evil = "k\r\nSET injected 1\r\n*3\r\n$3\r\nSET\r\n$1\r\nj\r\n$1\r\n1\r\n"
      assert.is_true(r:call("SET", evil, all))
      assert.equal(all, r:call("GET", evil))
      assert.is_true(r:call("SET", all, evil .. "\0"))
      assert.equal(evil .. "\0", r:call("GET", all))
      assert.equal(0, r:call("EXISTS", "injected", "j"))
      assert.same({ all, evil .. "\0" }, r:call("MGET", evil, all))
      assert.is_true(r:call("SET", "", ""))
      assert.equal("", r:call("GET", ""))
      assert.equal(3, r:call("DEL", evil, all, ""))
    end)

    it("take numbers: integers as integers, floats with 17 digits", function()
      local r <close> = connect()
      assert.is_true(r:call("SET", "n", 9007199254740993))
      assert.equal("9007199254740993", r:call("GET", "n"))
      assert.is_true(r:call("SET", "n", 0.1))
      assert.equal(0.1, tonumber(r:call("GET", "n")))
      assert.is_true(r:call("SET", "n", 1 / 3))
      assert.equal(1 / 3, tonumber(r:call("GET", "n")))
      assert.is_true(r:call("SET", "n", -2.5e-300))
      assert.equal(-2.5e-300, tonumber(r:call("GET", "n")))
      assert.equal(1, r:call("ZADD", "z", math.huge, "top"))
      assert.equal("inf", r:call("ZSCORE", "z", "top"))
      assert.equal(5, r:call("INCRBY", "i", 5))
      assert.equal(3, r:call("DEL", "n", "z", "i"))
    end)

    it("take a table as its elements (one level), and many at once", function()
      local r <close> = connect()
      assert.equal(3, r:call("RPUSH", "l", { "a", "b", 3 }))
      assert.same({ "a", "b", "3" }, r:call("LRANGE", "l", 0, -1))
      local keys, kv = {}, {}
      for i = 1, 5000 do
        keys[i] = "key" .. i
        kv[2 * i - 1], kv[2 * i] = keys[i], i
      end
      assert.is_true(r:call("MSET", kv))
      assert.equal("5000", r:call("GET", "key5000"))
      -- 40 arguments through varargs, and a big one among many pieces
      local mset = {}
      for i = 1, 40 do mset[i] = "v" .. i end
      assert.is_true(r:call("MSET", table.unpack(mset)))
      assert.equal("v40", r:call("GET", "v39"))
      local big = string.rep("b", 200000)
      kv[2] = big
      assert.is_true(r:call("MSET", kv))
      assert.is_true(r:call("GET", "key1") == big)
      assert.is_true(r:call("SET", "big", big))  -- (a big one alone)
      assert.is_true(r:call("GET", "big") == big)
      assert.equal(5000, r:call("DEL", keys))
      assert.equal(22, r:call("DEL", "l", "big", table.unpack(mset, 1, 40)))
    end)

    it("of the wrong kind raise, and send nothing", function()
      local r <close> = connect()
      assert.has_error(function() r:call(nil) end,
        "bad argument #1 to 'call' (string expected, got nil)")
      assert.has_error(function() r:call("SET", "k", true) end,
        "bad argument #3 to 'call' (string or number expected, got boolean)")
      assert.has_error(function() r:call("SET", "k", nil) end,
        "bad argument #3 to 'call' (string or number expected, got nil)")
      assert.has_error(function() r:call("DEL", { "a", { "b" } }) end,
        "bad argument #2 to 'call' (string or number expected, got table)")
      assert.has_error(function() r:set("k", print) end,
        "bad argument #3 to 'call' (string or number expected, got function)")
      assert.has_error(function() r:call("SUBSCRIBE", "c") end)
      assert.has_error(function() r:call("MONITOR") end)
      assert.has_error(function() r:call("CLIENT", "REPLY", "OFF") end)
      assert.equal("PONG", r:call("PING"))  -- still in step
      assert.equal(0, r:call("EXISTS", "k"))
    end)

    it("make methods of command names: client:get, client:HSET", function()
      local r <close> = connect()
      assert.equal(1, r:HSET("h", "f", "v"))
      assert.equal("v", r:hget("h", "f"))
      assert.same({ "f", "v" }, r:hgetall("h"))
      assert.is_nil(r:nosuchcommand())
      assert.equal(1, r:del("h"))
    end)
  end)

  describe("pipeline", function()
    it("returns the replies in order, error replies in their slot", function()
      local r <close> = connect()
      local res = assert(r:pipeline(function(p, key)
        p:call("SET", key, "1")
        p:incr(key)
        p:call("LPUSH", key, "x")         -- WRONGTYPE
        p:get(key):get("no such key")     -- (chained)
        p:call("EVAL", "return {1, redis.error_reply('E2 x')}", 0)
        p:del(key)
      end, "pk"))
      assert.equal(7, #res)
      assert.is_true(res[1])
      assert.equal(2, res[2])
      assert.matches("^WRONGTYPE", redis.iserror(res[3]))
      assert.matches("^WRONGTYPE", res[3].err)
      assert.equal("2", res[4])
      assert.equal(null, res[5])
      assert.equal(1, res[6][1])
      assert.equal("E2 x", redis.iserror(res[6][2]))
      assert.equal(1, res[7])
      assert.same({}, r:pipeline(function() end))
      assert.equal("PONG", r:ping())
    end)

    it("sends its commands in one write", function()
      local chunks = {}
      local l, port = fake(function(c)
        local d = c:read()
        chunks[#chunks + 1] = d
        so.sleep(0.05)  -- (anything sent in a second write would come now)
        while c:readable() do
          d = c:read()
          if not d or d == "" then break end
          chunks[#chunks + 1] = d
        end
        c:write(string.rep("+OK\r\n", 100))
        drain(c)
      end)
      local r <close> = assert(redis.connect("127.0.0.1", port))
      local res = assert(r:pipeline(function(p)
        for i = 1, 100 do p:set("key" .. i, i) end
      end))
      assert.equal(100, #res)
      assert.equal(1, #chunks)
      local _, n = chunks[1]:gsub("%*3\r\n%$3\r\nSET\r\n", "")
      assert.equal(100, n)
      r:close()
      l:close()
    end)

    it("takes thousands of commands (more than so.write's 1024 pieces)", function()
      local r <close> = connect()
      local res = assert(r:pipeline(function(p)
        for i = 1, 3000 do p:call("RPUSH", "plist", i) end
        p:call("LRANGE", "plist", 2990, -1)
        p:call("DEL", "plist")
      end))
      assert.equal(3002, #res)
      assert.equal(3000, res[3000])
      assert.same({ "2991", "2992", "2993", "2994", "2995", "2996", "2997",
                    "2998", "2999", "3000" }, res[3001])
      -- smaller ones after it: no piece of a bigger one is sent again
      res = assert(r:pipeline(function(p) p:ping(); p:echo("e") end))
      assert.same({ "PONG", "e" }, res)
      res = assert(r:pipeline(function(p)
        for i = 1, 10 do p:echo(i) end
      end))
      assert.equal(10, #res)
      assert.same({ "a" }, r:pipeline(function(p) p:echo("a") end))
      assert.equal("in step", r:echo("in step"))
    end)

    it("sends nothing when its function raises, and ends with it", function()
      local r <close> = connect()
      local kept
      assert.has_error(function()
        r:pipeline(function(p)
          kept = p
          p:incr("never"):incr("never"):incr("never")
          error("changed my mind")
        end)
      end, nil)
      assert.equal(null, r:get("never"))
      assert.has_error(function() kept:incr("never") end, "pipeline is over")
      assert.has_error(function()
        r:pipeline(function() r:pipeline(function() end) end)
      end, "a pipeline is already being built")
      assert.same({ "PONG" }, r:pipeline(function(p) p:ping() end))
      assert.equal(null, r:get("never"))  -- (nothing queued then went out)
    end)

    it("carries MULTI/EXEC, with errors inside EXEC's reply", function()
      local r <close> = connect()
      local res = assert(r:pipeline(function(p)
        p:multi()
        p:set("tx", "a")
        p:incr("tx")      -- fails at EXEC
        p:get("tx")
        p:exec()
      end))
      assert.same({ true, "QUEUED", "QUEUED", "QUEUED" },
                  { res[1], res[2], res[3], res[4] })
      local exec = res[5]
      assert.is_true(exec[1])
      assert.matches("not an integer", redis.iserror(exec[2]))
      assert.equal("a", exec[3])
      assert.is_true(r:keepalive())  -- EXEC ended the transaction
      local r2 <close> = connect()
      r2:del("tx")
    end)
  end)

  describe("publish/subscribe", function()
    it("gives messages and pattern messages, any bytes", function()
      local sub <close> = connect()
      local pub <close> = connect()
      assert.equal(2, sub:subscribe("ch1", "ch\r\n2"))
      assert.equal(3, sub:psubscribe("news.*"))
      local payload = "p\0\r\n\255"
      assert.equal(1, pub:publish("ch\r\n2", payload))
      assert.equal(1, pub:publish("news.today", "n"))
      assert.equal(1, pub:publish("ch1", "one"))
      assert.same({ "message", "ch\r\n2", payload }, { sub:message(2) })
      assert.same({ "pmessage", "news.today", "n", "news.*" },
                  { sub:message(2) })
      assert.same({ "message", "ch1", "one" }, { sub:message(2) })
    end)

    it("times out without a message and stays subscribed", function()
      local sub <close> = connect()
      local pub <close> = connect()
      assert.equal(1, sub:subscribe("quiet"))
      local t0 = so.now()
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { sub:message(0.1) })
      assert.is_true(so.now() - t0 >= 0.09)
      assert.equal(1, pub:publish("quiet", "now"))
      assert.same({ "message", "quiet", "now" }, { sub:message(2) })
      -- so.deadline bounds a wait without a timeout the same way
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { so.deadline(0.05, sub.message, sub) })
      assert.equal(1, pub:publish("quiet", "again"))
      assert.same({ "message", "quiet", "again" }, { sub:message(2) })
    end)

    it("keeps messages that come while it subscribes to more", function()
      local sub <close> = connect()
      local pub <close> = connect()
      assert.equal(1, sub:subscribe("a"))
      assert.equal(1, pub:publish("a", "first"))
      assert.equal(2, sub:subscribe("b"))  -- reads "first" before its reply
      assert.equal(1, pub:publish("b", "second"))
      assert.same({ "message", "a", "first" }, { sub:message(1) })
      assert.same({ "message", "b", "second" }, { sub:message(1) })
    end)

    it("allows only pub/sub calls while subscribed; unsubscribing ends it",
       function()
      local sub = connect()
      local id = id_of(sub)
      assert.equal(2, sub:subscribe("x", "y"))
      assert.equal(3, sub:psubscribe("z*"))
      assert.has_error(function() sub:get("k") end)
      assert.has_error(function() sub:pipeline(function() end) end)
      assert.equal(1, sub:unsubscribe())      -- both channels
      assert.equal(1, sub:unsubscribe("x"))   -- (none of them left)
      assert.equal(0, sub:punsubscribe())
      assert.has_error(function() sub:message(0.01) end,
                       "redis client is not subscribed")
      assert.equal("PONG", sub:ping())
      assert.is_true(sub:keepalive())
      local again <close> = connect()
      assert.equal(id, id_of(again))
    end)

    it("never pools a subscribed client", function()
      local sub = connect()
      local id = id_of(sub)
      assert.equal(1, sub:subscribe("s"))
      assert.is_false(sub:keepalive())
      local other <close> = connect()
      assert.are_not.equal(id, id_of(other))
      assert.equal(0, pool.count())
    end)
  end)

  describe("connect", function()
    it("selects the database; pools are per database", function()
      local r3 = connect({ db = 3 })
      local r0 = connect()
      local id3 = id_of(r3)
      assert.is_true(r3:set("where", "three"))
      assert.equal(null, r0:get("where"))
      assert.matches(" db=3 ", r3:client("INFO"))
      assert.is_true(r0:keepalive())
      assert.is_true(r3:keepalive())  -- (the newest: handed out first)
      r0 = connect()
      assert.are_not.equal(id3, id_of(r0))
      assert.matches(" db=0 ", r0:client("INFO"))
      r3 = connect({ db = 3 })
      assert.equal(id3, id_of(r3))
      assert.equal("three", r3:get("where"))
      r3:del("where")
      r3:close()
      r0:close()
    end)

    it("authenticates with a password; pools are per credentials", function()
      local admin <close> = connect()
      assert.is_true(admin:call("CONFIG", "SET", "requirepass", "s3cret"))
      local ok, err = pcall(function()
        local plain <close> = connect()  -- (the pool held none: fresh)
        local v, msg, name = plain:get("k")
        assert.is_nil(v)
        assert.matches("^NOAUTH", msg)
        assert.equal("EREDIS", name)
        local r = connect({ password = "s3cret" })
        local id = id_of(r)
        assert.is_true(r:keepalive())
        local v2, msg2, name2 = redis.connect("127.0.0.1", R.port,
                                              { password = "wrong" })
        assert.is_nil(v2)
        assert.matches("^WRONGPASS", msg2)
        assert.equal("EREDIS", name2)
        assert.equal(1, pool.count())   -- the good one still waits there
        local unauth <close> = connect()  -- not handed the authenticated one
        assert.matches("^NOAUTH", select(2, unauth:get("k")))
        r = connect({ password = "s3cret" })
        assert.equal(id, id_of(r))
        r:close()
      end)
      assert.is_true(admin:call("CONFIG", "SET", "requirepass", ""))
      assert(ok, err)
    end)

    it("authenticates an ACL user with username and password", function()
      local admin <close> = connect()
      assert.is_true(admin:call("ACL", "SETUSER", "alice", "on", ">pw-a",
                                "~*", "+@all"))
      local a = connect({ username = "alice", password = "pw-a" })
      assert.equal("alice", a:call("ACL", "WHOAMI"))
      local id = id_of(a)
      assert.is_true(a:keepalive())
      local v, msg, name = redis.connect("127.0.0.1", R.port,
                                         { username = "alice",
                                           password = "not it" })
      assert.is_nil(v)
      assert.matches("^WRONGPASS", msg)
      assert.equal("EREDIS", name)
      v, msg, name = redis.connect("127.0.0.1", R.port,  -- (a long one)
        { username = "alice", password = string.rep("p", 100000), db = 1 })
      assert.is_nil(v)
      assert.matches("^WRONGPASS", msg)
      assert.equal("EREDIS", name)
      local d <close> = connect()
      assert.equal("default", d:call("ACL", "WHOAMI"))
      a = connect({ username = "alice", password = "pw-a" })
      assert.equal(id, id_of(a))
      a:close()
      assert.has_error(function()
        redis.connect("127.0.0.1", R.port, { username = "alice" })
      end)
      assert.is_true(admin:call("ACL", "DELUSER", "alice") == 1)
    end)

    it("connects through a Unix socket", function()
      local r = assert(redis.connect("unix:" .. R.sock))
      local id = id_of(r)
      assert.is_true(r:set("via", "unix"))
      assert.is_true(r:keepalive())
      r = assert(redis.connect("unix:" .. R.sock, nil, { db = 0 }))
      assert.equal(id, id_of(r))
      assert.equal("unix", r:get("via"))
      r:del("via")
      r:close()
      assert.matches("^ENOENT", select(2, redis.connect("unix:" .. R.dir
                                                       .. "/nope.sock")))
    end)

    it("returns nil, msg, name when the server is not there", function()
      local port = free_port()
      assert.same({ nil, "ECONNREFUSED: connection refused", "ECONNREFUSED" },
                  { redis.connect("127.0.0.1", port) })
    end)

    it("gives up after its timeout on a server that does not answer AUTH",
       function()
      local l, port = fake(drain)
      local t0 = so.now()
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { redis.connect("127.0.0.1", port,
                                  { password = "x", timeout = 0.2 }) })
      assert.is_true(so.now() - t0 < 2)
      assert.equal(0, pool.count())
      l:close()
    end)

    it("checks its options", function()
      assert.has_error(function()
        redis.connect("127.0.0.1", R.port, { passwd = "x" })
      end, "bad argument #3 to 'connect' (unknown option 'passwd')")
      assert.has_error(function()
        redis.connect("127.0.0.1", R.port, { db = -1 })
      end)
      assert.has_error(function()
        redis.connect("127.0.0.1", R.port, { timeout = "1" })
      end)
      assert.has_error(function() redis.connect(nil) end)
    end)
  end)

  describe("keep-alive pool", function()
    it("reuses a conn: the same CLIENT ID and peer port", function()
      local r = connect()
      local id = id_of(r)
      local _, port = so.sockname(r:getconn())
      local list = r:client("LIST")
      assert.matches("id=" .. id .. " addr=127.0.0.1:" .. port .. " ", list)
      assert.is_true(r:keepalive())
      assert.has_error(function() r:get("k") end,
                       "attempt to use a closed redis client")
      assert.equal(1, pool.count())
      r = connect()
      assert.equal(0, pool.count())
      assert.equal(id, id_of(r))
      assert.equal(port, select(2, so.sockname(r:getconn())))
      r:close()
      -- without the pool: a new conn each time, and keepalive closes
      local a = connect({ pool = false })
      local ida = id_of(a)
      assert.is_false(a:keepalive())
      local b <close> = connect({ pool = false })
      assert.are_not.equal(ida, id_of(b))
      assert.equal(0, pool.count())
    end)

    it("never hands out a conn the server closed, or one idle too long",
       function()
      local r = connect()
      local id = id_of(r)
      assert.is_true(r:keepalive())
      local admin <close> = connect({ pool = false })
      assert.equal(1, admin:client("KILL", "ID", id))
      r = connect()
      local id2 = id_of(r)
      assert.are_not.equal(id, id2)
      assert.equal("PONG", r:ping())
      assert.is_true(r:keepalive(0.05))
      so.sleep(0.1)
      r = connect()
      assert.are_not.equal(id2, id_of(r))
      r:close()
    end)

    it("takes back only clean conns", function()
      local cases = {
        multi = function(r) assert(r:multi()) end,
        watch = function(r) assert(r:watch("k")) end,
        select = function(r) assert(r:select(1)) end,
        setname = function(r) assert(r:client("SETNAME", "x")) end,
        subscribed = function(r) assert(r:subscribe("c")) end,
        closed = function(r) r:close() end,
        busy = function(r)  -- a call of another task is waiting
          local t = so.spawn(function() r:call("BLPOP", "nothing", "1") end)
          so.sleep(0.02)
          return t
        end,
      }
      for what, make in pairs(cases) do
        local r = connect()
        local t = make(r)
        assert.is_false(r:keepalive(), what)
        assert.equal(0, pool.count(), what)
        if t then so.join(t, 5) end
      end
      -- while these are clean again
      local clean = {
        exec = function(r) assert(r:multi()); assert(r:exec()) end,
        discard = function(r) assert(r:multi()); assert(r:discard()) end,
        unwatch = function(r) assert(r:watch("k")); assert(r:unwatch()) end,
        error_reply = function(r) assert(not r:call("NOPE")) end,
        client_id = function(r) assert(r:client("ID")) end,
      }
      for what, make in pairs(clean) do
        local r = connect()
        make(r)
        assert.is_true(r:keepalive(), what)
        pool.clear()
      end
    end)

    it("does not take back a conn with bytes nobody asked for", function()
      local l, port = fake(function(c)
        c:read()
        c:write("+OK\r\n+SURPRISE\r\n")
        drain(c)
      end)
      local r = assert(redis.connect("127.0.0.1", port))
      assert.is_true(r:call("SET", "k", "v"))
      assert.is_false(r:keepalive())
      -- and one whose extra bytes came only after the reply was read
      local l2, port2 = fake(function(c)
        c:read()
        c:write("+OK\r\n")
        so.sleep(0.05)
        c:write("+LATE\r\n")
        drain(c)
      end)
      r = assert(redis.connect("127.0.0.1", port2))
      assert.is_true(r:call("SET", "k", "v"))
      so.sleep(0.1)
      assert.is_false(r:keepalive())
      assert.equal(0, pool.count())
      l:close()
      l2:close()
    end)

    it("leaks no descriptor over 10,000 requests from 20 tasks", function()
      local fds = helper.fds()
      local tasks = {}
      for t = 1, 20 do
        tasks[t] = so.spawn(function()
          for i = 1, 500 do
            local r = connect()
            if i % 2 == 0 then
              assert.is_true(r:set("leak" .. t, i))
            else
              assert(r:get("leak" .. t))
            end
            assert.is_true(r:keepalive())
          end
        end)
      end
      for t = 1, 20 do helper.join(tasks[t], 30) end
      local r = connect()
      local _, clients = r:client("LIST"):gsub("\n", "")
      assert.is_true(clients <= 21, clients .. " connections to the server")
      r:keepalive()
      assert.is_true(pool.count() <= 20)
      assert.is_true(helper.fds() - fds <= 20)
      pool.clear()
      assert.equal(fds, helper.fds())
      local c <close> = connect({ pool = false })
      for t = 1, 20 do c:del("leak" .. t) end
    end)
  end)

  describe("timeouts, tasks and cancelling", function()
    it("breaks a client whose reply does not come in time", function()
      local l, port = fake(function(c)
        c:read()
        c:write("$5\r\nab")  -- and stalls
        drain(c)
      end)
      local r = assert(redis.connect("127.0.0.1", port, { timeout = 0.2 }))
      local t0 = so.now()
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { r:get("k") })
      assert.is_true(so.now() - t0 < 2)
      -- the same error from then on; never pooled
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { r:get("k") })
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { r:pipeline(function(p) p:get("k") end) })
      assert.is_false(r:keepalive())
      assert.equal(0, pool.count())
      l:close()
    end)

    it("obeys client:settimeout and so.deadline", function()
      local r <close> = connect()
      r:settimeout(0.1)
      local t0 = so.now()
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { r:call("BLPOP", "nothing", "5") })
      assert.is_true(so.now() - t0 < 2)
      local r2 <close> = connect()
      t0 = so.now()
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { so.deadline(0.1, r2.call, r2, "BLPOP", "nothing", "5") })
      assert.is_true(so.now() - t0 < 2)
      assert.is_false(r2:keepalive())
    end)

    it("serves 50 tasks at once, each with its client", function()
      local c <close> = connect()
      c:del("shared")
      local tasks = {}
      for t = 1, 50 do
        tasks[t] = so.spawn(function()
          local r = connect()
          for _ = 1, 100 do assert(r:incr("shared")) end
          local res = assert(r:pipeline(function(p)
            for _ = 1, 100 do p:incr("shared") end
          end))
          assert.equal(100, #res)
          assert.is_true(r:keepalive())
        end)
      end
      for t = 1, 50 do helper.join(tasks[t], 20) end
      assert.equal("10000", c:get("shared"))
      c:del("shared")
    end)

    it("refuses a second task's call while one waits", function()
      local r <close> = connect()
      local t = so.spawn(function() return r:call("BLPOP", "nothing", "0.1") end)
      assert.has_error(function() r:get("k") end,
                       "redis client is in use by another task (call)")
      assert.equal(null, helper.join(t))
      assert.equal("PONG", r:ping())  -- still in step
    end)

    it("breaks a client whose call was cancelled, and never pools it",
       function()
      local r = connect()
      local t = so.spawn(function() return r:call("BLPOP", "nothing", "5") end)
      so.sleep(0.02)
      assert.is_true(so.cancel(t))
      assert.same({ nil, "ECANCELED: a call on this client was interrupted",
                    "ECANCELED" }, { r:get("k") })
      assert.is_false(r:keepalive())
      assert.equal(0, pool.count())
    end)

    it("closes at the end of a <close> scope", function()
      local st = so.stats().conns
      do
        local r <close> = connect()
        assert.equal(st + 1, so.stats().conns)
      end
      assert.equal(st, so.stats().conns)
    end)
  end)

  describe("bad servers", function()
    -- Each: what the fake sends, and the name and message of the failure.
    local cases = {
      { "closes without a reply", "", "EOF", "^EOF: the server closed" },
      { "truncates a line", "+OK", "EOF", "^EOF" },
      { "truncates a bulk string", "$10\r\nabc", "EOF", "^EOF" },
      { "closes mid-array", "*3\r\n:1\r\n$1\r\nx\r\n", "EOF", "^EOF" },
      { "sends an oversize bulk length", "$536870913\r\n", "EPROTO",
        "^EPROTO: bulk length 536870913 over the limit" },
      { "sends an absurd bulk length", "$99999999999999999999999\r\n",
        "EPROTO", "over the limit" },
      { "sends a negative bulk length", "$-2\r\nxx\r\n", "EPROTO",
        "^EPROTO: negative bulk length %-2" },
      { "sends a negative array length", "*-5\r\n", "EPROTO",
        "^EPROTO: negative array length %-5" },
      { "sends an absurd array length", "*99999999999\r\n", "EPROTO",
        "^EPROTO: array length 99999999999 over the limit" },
      { "sends a malformed length", "$abc\r\n", "EPROTO",
        "^EPROTO: malformed bulk length" },
      { "sends a length with a space", "$ 3\r\nabc\r\n", "EPROTO",
        "malformed" },
      { "sends a float length", "*1.5\r\n", "EPROTO", "malformed" },
      { "sends a hex length", "$0x3\r\nabc\r\n", "EPROTO", "malformed" },
      { "sends an empty length", "$\r\n", "EPROTO", "malformed" },
      { "overflows an integer", ":99999999999999999999\r\n", "EPROTO",
        "^EPROTO: malformed integer" },
      { "sends a bad integer", ":12a\r\n", "EPROTO", "malformed integer" },
      { "sends an unknown type", "?what\r\n", "EPROTO",
        "^EPROTO: unknown reply type \"%?\"" },
      { "sends an empty line", "\r\n", "EPROTO", "unknown reply type" },
      { "sends RESP3", "%1\r\n+a\r\n+b\r\n", "EPROTO", "unknown reply type" },
      { "forgets the CRLF after a bulk", "$3\r\nabcXY", "EPROTO",
        "^EPROTO: bulk string not followed by CRLF" },
      { "forgets the CRLF after a split bulk", { "$3\r\nab", "cXY" },
        "EPROTO", "not followed by CRLF" },
      { "sends a line without end", { string.rep("+aaaaaaaa", 80000),
                                      string.rep("a", 600000) },
        "EPROTO", "^EPROTO: line too long" },
      { "nests arrays too deep", string.rep("*1\r\n", 200) .. ":1\r\n",
        "EPROTO", "^EPROTO: arrays nested too deep" },
    }
    for _, case in ipairs(cases) do
      local what, bytes, name, pattern = table.unpack(case)
      it(what .. ": nil, msg, " .. name .. "; the client broken, not pooled",
         function()
        local l, port = fake_reply(bytes, name == "EOF")
        local r = assert(redis.connect("127.0.0.1", port, { timeout = 5 }))
        local t0 = so.now()
        local v, msg, err = r:call("GET", "k")
        assert.is_true(so.now() - t0 < 2, "waited for the timeout")
        assert.is_nil(v)
        assert.equal(name, err)
        assert.matches(pattern, msg)
        assert.same({ nil, msg, err }, { r:call("GET", "k") })
        assert.is_false(r:keepalive())
        assert.equal(0, pool.count())
        l:close()
      end)
    end

    it("in a pipeline: nil, msg, name and the client broken", function()
      local l, port = fake_reply("+OK\r\n$-7\r\n")
      local r = assert(redis.connect("127.0.0.1", port))
      assert.same({ nil, "EPROTO: negative bulk length -7", "EPROTO" },
                  { r:pipeline(function(p) p:set("a", 1); p:get("a") end) })
      assert.is_false(r:keepalive())
      l:close()
    end)

    it("parses replies split at every byte", function()
      local reply = "*7\r\n+OK\r\n:-42\r\n$5\r\nhe\r\no\r\n$-1\r\n*-1\r\n"
                    .. "*2\r\n-ERR inner\r\n$0\r\n\r\n+PONG\r\n"
      local expect = { true, -42, "he\r\no", null, null }
      for cut = 1, #reply - 1 do
        local l, port = fake_reply({ reply:sub(1, cut), reply:sub(cut + 1) })
        local r = assert(redis.connect("127.0.0.1", port))
        local got = assert(r:call("X"))
        assert.same(expect, { got[1], got[2], got[3], got[4], got[5] }, cut)
        assert.equal("ERR inner", redis.iserror(got[6][1]), cut)
        assert.equal("", got[6][2], cut)
        assert.equal("PONG", got[7], cut)
        r:close()
        l:close()
      end
      -- the replies of a pipeline (whose loop has a fast path of its own)
      reply = "+OK\r\n$3\r\nabc\r\n$12\r\nhello\r\nworld\r\n+OKAY\r\n"
              .. ":5\r\n$-1\r\n-ERR x\r\n$0\r\n\r\n+OK\r\n"
      for cut = 1, #reply - 1 do
        local l, port = fake_reply({ reply:sub(1, cut), reply:sub(cut + 1) })
        local r = assert(redis.connect("127.0.0.1", port))
        local got = assert(r:pipeline(function(p)
          for _ = 1, 9 do p:call("X") end
        end))
        assert.same({ true, "abc", "hello\r\nworld", "OKAY", 5, null },
                    { table.unpack(got, 1, 6) }, cut)
        assert.equal("ERR x", redis.iserror(got[7]), cut)
        assert.same({ "", true }, { got[8], got[9] }, cut)
        r:close()
        l:close()
      end
    end)

    it("reads a bulk string that trickles in, in linear time", function()
      local n = 1024 * 1024
      local pieces = { "$" .. n .. "\r\n" }
      local chunk = string.rep("z", 1000)
      for i = 1, n // 1000 do pieces[#pieces + 1] = chunk end
      pieces[#pieces + 1] = string.rep("z", n % 1000) .. "\r"
      pieces[#pieces + 1] = "\n"
      local l, port = fake(function(c)
        c:read()
        for _, p in ipairs(pieces) do c:write(p); so.sleep(0) end
        drain(c)
      end)
      local r = assert(redis.connect("127.0.0.1", port))
      local v = assert(r:call("GET", "k"))
      assert.equal(n, #v)
      assert.is_true(v == string.rep("z", n))
      assert.is_true(r:keepalive())
      pool.clear()
      l:close()
    end)
  end)

  describe("TLS", function()
    local C, T
    setup(function()
      C = helper.tls_certs()
      local port = free_port()
      T = start_redis(string.format(
        "--tls-port %d --tls-cert-file %s --tls-key-file %s "
        .. "--tls-ca-cert-file %s --tls-auth-clients no", port,
        C.server.cert, C.server.key, C.ca))
      T.tls_port = port
    end)
    teardown(function()
      if T then T.stop() end
      if C then C:remove() end
    end)

    it("connects with opts.tls, verified, pooled apart", function()
      local tls = require "so.tls"
      local ctx = assert(tls.client({ ca = C.ca }))
      local r = assert(redis.connect("127.0.0.1", T.tls_port, { tls = ctx }))
      assert.equal("PONG", r:ping())
      assert.equal("TLSv1.3", tls.info(r:getconn()).version)
      local id = id_of(r)
      assert.is_true(r:keepalive())
      r = assert(redis.connect("127.0.0.1", T.tls_port, { tls = ctx }))
      assert.equal(id, id_of(r))
      r:close()
      -- a context that does not trust the server's CA
      local v, msg, name = redis.connect("127.0.0.1", T.tls_port,
        { tls = assert(tls.client({ ca = C.rogue_ca })) })
      assert.is_nil(v)
      assert.equal("ETLS", name, msg)
    end)
  end)
end)
