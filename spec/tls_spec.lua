-- so.tls: contexts, tls.wrap, tls.connect, tls.info over real loopback
-- sockets, against luahost itself and real peers (openssl s_client and
-- s_server, Python's ssl module). Certificates are made at load time with
-- the openssl command (helper.tls_certs).
local so = require "so"
local tls = require "so.tls"
local helper = require "helper"

local C = helper.tls_certs()
local MiB = 1024 * 1024

-- A table with the fields of a, then those of b.
local function merge(a, b)
  local t = {}
  for k, v in pairs(a) do t[k] = v end
  for k, v in pairs(b or {}) do t[k] = v end
  return t
end

-- A server context with the localhost certificate, plus opts.
local function server_ctx(opts)
  return assert(tls.server(merge({ cert = C.server.cert,
                                   key = C.server.key }, opts)))
end

-- A client context that trusts the test CA, plus opts.
local function client_ctx(opts)
  return assert(tls.client(merge({ ca = C.ca }, opts)))
end

-- Both handshakes over a fresh loopback pair (every wait bounded by 5 s),
-- the server's in a task. Returns the results of the client's and of the
-- server's tls.wrap (packed), and the two plain conns.
local function handshake(sctx, cctx, servername)
  local c, s = helper.pair(5)
  local st = so.spawn(function() return tls.wrap(s, sctx) end)
  local cr = table.pack(tls.wrap(c, cctx, servername))
  local sr = table.pack(helper.join(st, 10))
  return cr, sr, c, s
end

-- Two TLS conns, the client's and the server's, after a good handshake.
local function tls_pair(sctx, cctx, servername)
  local cr, sr = handshake(sctx or server_ctx(), cctx or client_ctx(),
                           servername or "localhost")
  assert(cr[1], "client handshake: " .. tostring(cr[2]))
  assert(sr[1], "server handshake: " .. tostring(sr[2]))
  return cr[1], sr[1]
end

local read_n = helper.read_n

-- Reads until EOF: everything, "" at the end; or nil, msg, name after
-- what came.
local function read_all(conn)
  local parts = {}
  while true do
    local d, msg, name = conn:read()
    if d == nil then return nil, msg, name, table.concat(parts) end
    if d == "" then return table.concat(parts) end
    parts[#parts + 1] = d
  end
end

-- Writes until a write is blocked for `seconds`; returns the bytes taken.
local function fill(conn, seconds)
  local chunk = string.rep("x", MiB)
  local sent = 0
  conn:settimeout(seconds)
  while true do
    local ok, err, name = conn:write(chunk)
    if not ok then
      assert.equal("ETIMEDOUT", name, err)
      break
    end
    sent = sent + #chunk
    assert(sent < 1024 * MiB, "never blocked")
  end
  conn:settimeout(nil)
  return sent
end

-- A TLS server in this process. Each accepted conn gets `timeout` (5 s)
-- and is wrapped with ctx in a task of its own; handler(tconn, rec) then
-- serves it (it is closed afterwards). rec.failures lists the handshakes
-- that failed ({msg, name}), rec.infos the tls.info of those that did
-- not. Returns port, rec, stop.
local function tls_server(ctx, handler, timeout)
  local rec = { failures = {}, infos = {}, results = {} }
  local l, _, port = helper.server(function(c)
    c:settimeout(timeout or 5)
    local t, msg, name = tls.wrap(c, ctx)
    if not t then
      rec.failures[#rec.failures + 1] = { msg = msg, name = name }
      return
    end
    local tc <close> = t
    rec.infos[#rec.infos + 1] = tls.info(tc)
    if handler then handler(tc, rec) end
  end)
  return port, rec, function() l:close() end
end

-- An echo handler for tls_server: records how the stream ended in
-- rec.results ({msg, name} of the last read: "" for a clean end).
local function echo(tc, rec)
  while true do
    local d, msg, name = tc:read()
    if d == nil or d == "" then
      rec.results[#rec.results + 1] = { d = d, msg = msg, name = name }
      return
    end
    if not tc:write(d) then return end
  end
end

-- A relay between a client and 127.0.0.1:target_port, so that a spec can
-- see the bytes on the wire (r.up: client to server, r.down) and cut the
-- connection: r:cut() closes both sides with a plain TCP close. With
-- up_limit, it forwards only that many bytes upward, then cuts.
-- Returns the port to connect to and r; r:finish() waits for it.
local function relay(target_port, up_limit)
  local l = assert(so.listen("127.0.0.1", 0))
  local _, port = so.sockname(l)
  local r = { up = {}, down = {} }
  function r.wire(dir) return table.concat(r[dir]) end
  local function copy(from, to, log, limit)
    local n = 0
    while true do
      local d = from:read()
      if not d then return end
      if d == "" then
        pcall(so.shutdown, to)
        return
      end
      if limit and n + #d >= limit then
        d = d:sub(1, limit - n)
        log[#log + 1] = d
        to:write(d)
        return "cut"
      end
      n = n + #d
      log[#log + 1] = d
      if not to:write(d) then return end
    end
  end
  function r:cut()
    if self.a then self.a:close() end
    if self.b then self.b:close() end
  end
  r.task = so.spawn(function()
    local a <close> = assert(l:accept())
    l:close()
    local b <close> = assert(so.connect("127.0.0.1", target_port))
    a:settimeout(10)
    b:settimeout(10)
    r.a, r.b = a, b
    local down = so.spawn(copy, b, a, r.down)
    if copy(a, b, r.up, up_limit) == "cut" then
      so.sleep(0.05)
      r:cut()
    end
    so.join(down, 10)
  end)
  function r:finish()
    helper.join(self.task, 10)
  end
  return port, r
end

-- Writes a Python program into the certificates' directory; its path.
local function python(name, source)
  local path = C.dir .. "/" .. name .. ".py"
  local f = assert(io.open(path, "w"))
  f:write(source)
  f:close()
  return path
end

-- A client with Python's ssl module: PORT CA ALPN(comma list or -)
-- MAXVERSION(1.2 or -). Sends "ping", reads the echo, sends close_notify
-- (unwrap), prints what it saw as key=value lines.
local PY_CLIENT = python("client", [[
import socket, ssl, sys
port, ca, alpn, maxv = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
if alpn != "-":
    ctx.set_alpn_protocols(alpn.split(","))
if maxv == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
raw = socket.create_connection(("127.0.0.1", port), timeout=5)
s = ctx.wrap_socket(raw, server_hostname="localhost")
print("version=%s" % s.version())
print("alpn=%s" % s.selected_alpn_protocol())
print("cipher=%s" % s.cipher()[0])
s.sendall(b"ping")
print("echo=%s" % s.recv(100).decode())
try:
    s.unwrap()
    print("unwrap=ok")
except Exception as e:
    print("unwrap=%r" % e)
sys.stdout.flush()
]])

-- A Python client that ends the TCP connection without close_notify:
-- sends "hello", reads the reply, closes the socket.
local PY_NO_NOTIFY = python("no_notify", [[
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                    server_hostname="localhost")
s.sendall(b"hello")
print(s.recv(100).decode())
sys.stdout.flush()
s.close()  # SSLSocket.close sends no close_notify: the TCP stream just ends
]])

-- Waits for a background `openssl s_server` to print its address; its
-- port.
local function s_server_port(h)
  local port
  assert(helper.wait_until(function()
    port = h:output():match("ACCEPT 127%.0%.0%.1:(%d+)")
    return port ~= nil or h:done() ~= nil
  end, 10), "s_server did not start")
  assert(port, "s_server failed: " .. select(2, h:output()))
  return tonumber(port)
end

describe("so.tls", function()
  teardown(function() C:remove() end)

  local before
  before_each(function() before = helper.snapshot() end)
  after_each(function() helper.assert_clean(before) end)

  describe("tls.server and tls.client", function()
    it("are preloaded as so.tls, with wrap, connect and info beside them",
       function()
      assert.equal(tls, package.loaded["so.tls"])
      for _, f in ipairs { "server", "client", "wrap", "connect", "info" } do
        assert.equal("function", type(tls[f]), f)
      end
      -- in a fresh host too, without any package.path of the specs
      local code, out, err = helper.run_script([[
        local tls = require "so.tls"
        print(type(tls.wrap), package.loaded["so.tls"] == tls)
      ]])
      assert.equal(0, code, err)
      assert.equal("function\ttrue\n", out)
    end)

    it("refuse an unreadable or mismatched certificate or key with ETLS",
       function()
      local cases = {
        { cert = C.dir .. "/no-such.crt", key = C.server.key },
        { cert = C.server.cert, key = C.dir .. "/no-such.key" },
        { cert = C.garbage, key = C.server.key },
        { cert = C.server.cert, key = C.garbage },
        { cert = C.server.cert, key = C.other.key },      -- not its key
        { cert = C.server.cert, key = C.server.key,
          sni = { ["other.test"] = { cert = C.other.cert,
                                     key = C.server.key } } },
      }
      for i, opts in ipairs(cases) do
        local ctx, msg, name = tls.server(opts)
        assert.is_nil(ctx, "case " .. i)
        assert.equal("ETLS", name, "case " .. i)
        assert.equal("string", type(msg))
        assert.matches("^ETLS: .", msg)
      end
      for i, opts in ipairs {
        { ca = C.dir .. "/no-such-ca.crt" },
        { ca = C.garbage },
        { ca = C.ca, cert = C.dir .. "/no-such.crt", key = C.client.key },
        { ca = C.ca, cert = C.client.cert, key = C.server.key },
      } do
        local ctx, msg, name = tls.client(opts)
        assert.is_nil(ctx, "client case " .. i)
        assert.equal("ETLS", name, "client case " .. i)
        assert.matches("^ETLS: .", msg)
      end
      -- and the good ones make contexts
      assert.truthy(server_ctx())
      assert.truthy(server_ctx { alpn = { "http/1.1" }, min_version = "1.2",
                                 sni = { ["other.test"] = C.other } })
      assert.truthy(client_ctx())
      assert.truthy(client_ctx { cert = C.client.cert, key = C.client.key })
      assert.truthy(tls.client {})
    end)
  end)

  describe("tls.wrap", function()
    it("handshakes both ways and upgrades the conns in place: the same objects carry bytes over TLS",
       function()
      local cr, sr, c, s = handshake(server_ctx(), client_ctx(), "localhost")
      local tc, ts = cr[1], sr[1]
      assert.truthy(tc, cr[2])
      assert.truthy(ts, sr[2])
      assert.is_true(rawequal(c, tc))
      assert.is_true(rawequal(s, ts))
      assert.matches("conn", tostring(tc))
      assert.matches("conn", tostring(ts))
      assert.has_error(function() tls.wrap(c, client_ctx()) end,
                       "bad argument #1 to 'wrap' (already a TLS conn)")
      assert.is_true(tc:write("hello over tls"))
      assert.equal("hello over tls", read_n(ts, 14))
      assert.is_true(so.write(ts, { "a", "", "bc" }))
      assert.equal("abc", read_n(tc, 3))
      assert.is_true(so.close(tc))
      assert.is_true(tc:close())  -- idempotent
      assert.has_error(function() tc:read() end,
                       "attempt to use a closed conn")
      ts:close()
    end)

    it("negotiates ALPN", function()
      local tc, ts = tls_pair(server_ctx { alpn = { "http/1.1", "x-other" } },
                              client_ctx { alpn = { "x-unknown", "http/1.1" } },
                              "localhost")
      assert.equal("http/1.1", tls.info(tc).alpn)
      assert.equal("http/1.1", tls.info(ts).alpn)
      tc:close()
      ts:close()
      -- the server's preference among the client's offers
      tc, ts = tls_pair(server_ctx { alpn = { "x-other", "http/1.1" } },
                        client_ctx { alpn = { "http/1.1", "x-other" } },
                        "localhost")
      assert.equal("x-other", tls.info(tc).alpn)
      assert.equal("x-other", tls.info(ts).alpn)
      tc:close()
      ts:close()
    end)

    it("does STARTTLS: plaintext first, then both sides of the conn upgrade",
       function()
      local l = assert(so.listen("127.0.0.1", 0))
      local _, port = so.sockname(l)
      local srv = so.spawn(function()
        local s = assert(l:accept())
        s:settimeout(5)
        assert.equal("EHLO client\r\n", s:read())
        assert(s:write("250 STARTTLS\r\n"))
        assert.equal("STARTTLS\r\n", s:read())
        assert(s:write("220 go ahead\r\n"))
        local ts <close> = assert(tls.wrap(s, server_ctx()))
        assert.is_true(rawequal(s, ts))
        local line = read_n(ts, 15)
        assert(ts:write("250 secure: " .. line))
        return tls.info(ts)
      end)
      local c = assert(so.connect("127.0.0.1", port))
      c:settimeout(5)
      assert(c:write("EHLO client\r\n"))
      assert.equal("250 STARTTLS\r\n", c:read())
      assert(c:write("STARTTLS\r\n"))
      assert.equal("220 go ahead\r\n", c:read())
      local tc <close> = assert(tls.wrap(c, client_ctx(), "localhost"))
      assert(tc:write("MAIL FROM:<a>\r\n"))
      assert.equal("250 secure: MAIL FROM:<a>\r\n", read_n(tc, 27))
      local info = helper.join(srv)
      assert.equal("localhost", info.servername)
      assert.is_true(tls.info(tc).peer_verified)
      l:close()
    end)

    it("fails a verification with its cause, closing both conns", function()
      local cases = {
        -- server certificate, client context, servername, cause
        { C.server, {}, "other.test", "hostname mismatch" },
        { C.other, {}, "127.0.0.1", "mismatch" },   -- an IP it does not name
        { C.untrusted, {}, "localhost", "issuer" },
        { C.expired, {}, "localhost", "expired" },
        { C.server, { ca = C.rogue_ca }, "localhost", "issuer" },
      }
      for i, case in ipairs(cases) do
        local sctx = assert(tls.server(case[1]))
        local cr, sr, c, s = handshake(sctx, client_ctx(case[2]), case[3])
        assert.is_nil(cr[1], "case " .. i)
        assert.equal("ETLS", cr[3], "case " .. i)
        assert.matches("^ETLS: certificate verify failed", cr[2])
        assert.truthy(cr[2]:find(case[4], 1, true),
                      ("case %d: %q does not name %q"):format(i, cr[2], case[4]))
        -- the server's handshake fails too (an alert, or the conn closing)
        assert.is_nil(sr[1], "case " .. i)
        assert.equal("string", type(sr[2]))
        assert.has_error(function() c:read() end, "attempt to use a closed conn")
        assert.has_error(function() s:read() end, "attempt to use a closed conn")
      end
      local cr = handshake(server_ctx(), client_ctx(), "other.test")
      assert.is_nil(cr[1])
      assert.same({ "ETLS: certificate verify failed (hostname mismatch)", "ETLS" },
                  { cr[2], cr[3] })
      -- while an IP the certificate names passes
      local tc, ts = tls_pair(nil, nil, "127.0.0.1")
      assert.is_true(tls.info(tc).peer_verified)
      tc:close()
      ts:close()
    end)

    it("skips verification with verify = false", function()
      local tc, ts = tls_pair(assert(tls.server(C.untrusted)),
                              client_ctx { verify = false }, "wrong.name")
      assert.is_false(tls.info(tc).peer_verified)
      assert(tc:write("x"))
      assert.equal("x", ts:read())
      tc:close()
      ts:close()
    end)
  end)

  describe("TLS conns", function()
    it("put only TLS records on the wire", function()
      local sctx, cctx = server_ctx(), client_ctx()
      local secret = "a secret that must not be seen " .. ("S"):rep(64)
      local port, rec, stop = tls_server(sctx, echo)
      local rport, r = relay(port)
      local raw = assert(so.connect("127.0.0.1", rport))
      raw:settimeout(5)
      local tc = assert(tls.wrap(raw, cctx, "localhost"))
      assert(tc:write(secret))
      assert.equal(secret, read_n(tc, #secret))
      assert(tc:shutdown())
      assert.equal("", read_all(tc))
      tc:close()
      r:finish()
      stop()
      local up, down = r.wire("up"), r.wire("down")
      -- a ClientHello record first, a ServerHello back
      assert.equal("\22\3", up:sub(1, 2))
      assert.equal("\22\3", down:sub(1, 2))
      assert.is_nil(up:find("secret", 1, true))
      assert.is_nil(down:find("secret", 1, true))
      assert.is_true(#up > #secret)
      assert.same({ { d = "" } }, rec.results)
    end)

    it("report the session in tls.info on both sides", function()
      local tc, ts = tls_pair(nil, nil, "localhost")
      local ci, si = tls.info(tc), tls.info(ts)
      assert.equal("TLSv1.3", ci.version)
      assert.equal("TLSv1.3", si.version)
      assert.equal("string", type(ci.cipher))
      assert.matches("^TLS_", ci.cipher)
      assert.equal(ci.cipher, si.cipher)
      assert.is_nil(ci.alpn)
      assert.is_nil(si.alpn)
      assert.equal("localhost", si.servername)
      assert.equal("localhost", ci.servername)
      assert.is_true(ci.peer_verified)      -- the server's certificate
      assert.is_false(si.peer_verified)     -- no client certificate asked
      assert.has_error(function() tls.info("not a conn") end)
      tc:close()
      ts:close()
    end)

    it("keep the addresses of the plain conns", function()
      local c, s = helper.pair(5)
      local ch, cp = so.sockname(c)
      local sh, sp = so.peername(s)
      local st = so.spawn(function() return assert(tls.wrap(s, server_ctx())) end)
      local tc = assert(tls.wrap(c, client_ctx(), "localhost"))
      local ts = helper.join(st)
      assert.same({ ch, cp }, { so.sockname(tc) })
      assert.same({ ch, cp }, { tc:sockname() })
      assert.same({ sh, sp }, { so.peername(ts) })
      assert.same({ ch, cp }, { sh, sp })
      assert.same({ so.sockname(ts) }, { so.peername(tc) })
      tc:close()
      ts:close()
    end)

    it("carry the plain conn's timeout over, and take so.settimeout", function()
      local c, s = helper.pair()
      c:settimeout(0.2)
      local st = so.spawn(function() return assert(tls.wrap(s, server_ctx())) end)
      local tc = assert(tls.wrap(c, client_ctx(), "localhost"))
      local ts = helper.join(st)
      local t0 = so.now()
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { tc:read() })
      local took = so.now() - t0
      assert.is_true(took >= 0.15 and took < 2, took)
      -- the conn stays usable
      assert(ts:write("late"))
      assert.equal("late", tc:read())
      assert.is_true(so.settimeout(ts, 0.1))
      t0 = so.now()
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { so.read(ts) })
      assert.is_true(so.now() - t0 < 2)
      ts:settimeout(nil)
      local reader = so.spawn(function() return ts:read() end)
      so.sleep(0.3)  -- no limit now: still waiting
      assert(tc:write("later"))
      assert.equal("later", helper.join(reader))
      tc:close()
      ts:close()
    end)

    it("send close_notify and FIN on shutdown: the peer reads \"\" and can still answer",
       function()
      local tc, ts = tls_pair()
      assert(tc:write("request"))
      assert.is_true(so.shutdown(tc))
      assert.equal("request", read_n(ts, 7))
      assert.equal("", ts:read())
      assert.equal("", ts:read())  -- and again
      assert(ts:write("answer after the client's close_notify"))
      assert(ts:shutdown())
      assert.equal("answer after the client's close_notify", read_all(tc))
      assert.equal("", tc:read())
      tc:close()
      ts:close()
    end)

    it("send close_notify on close: the peer reads the bytes, then \"\"", function()
      local tc, ts = tls_pair()
      -- a round trip first, so that nothing is left unread at close
      assert(ts:write("ready"))
      assert.equal("ready", read_n(tc, 5))
      assert(tc:write("last words"))
      assert.is_true(tc:close())
      assert.equal("last words", read_n(ts, 10))
      assert.same({ "" }, { ts:read() })
      ts:close()
    end)

    it("keep 8 MiB of all byte values whole and in order through an echo",
       function()
      local tc, ts = tls_pair()
      local echoer = so.spawn(function()
        while true do
          local d = assert(ts:read())
          if d == "" then break end
          assert(ts:write(d))
        end
        assert(ts:shutdown())
        ts:close()
      end)
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local parts = {}
      for i = 1, 128 do  -- 128 x 64 KiB, each a different rotation
        local b = table.concat(bytes, "", i % 256 + 1) .. table.concat(bytes, "", 1, i % 256)
        parts[i] = b:rep(256)
      end
      local writer = so.spawn(function()
        for i = 1, #parts, 3 do
          assert(tc:write({ parts[i], parts[i + 1], parts[i + 2] }))
        end
        assert(tc:shutdown())
      end)
      local got = assert(read_all(tc))
      helper.join(writer, 30)
      helper.join(echoer, 30)
      assert.equal(8 * MiB, #got)
      assert.is_true(got == table.concat(parts), "bytes differ")
      tc:close()
    end)

    it("read from the socket only while a task waits in read (backpressure)",
       function()
      local tc, ts = tls_pair()
      local sent = fill(tc, 0.3)
      assert.is_true(sent < 64 * MiB, sent)
      local reader = so.spawn(function()
        local total = 0
        while total < sent + MiB do total = total + #assert(ts:read()) end
        return total
      end)
      assert.is_true(tc:write(string.rep("y", MiB)))
      assert.is_true(helper.join(reader, 20) >= sent + MiB)
      tc:close()
      ts:close()
    end)
  end)

  describe("tls.connect", function()
    it("connects by name and by IP, verified against the host; SNI only for a name",
       function()
      local port, rec, stop = tls_server(server_ctx(), echo)
      local tc = assert(tls.connect("localhost", port, client_ctx()))
      assert(tc:write("by name"))
      assert.equal("by name", read_n(tc, 7))
      assert.is_true(tls.info(tc).peer_verified)
      local h, p = tc:peername()
      assert.equal(port, p)
      assert.truthy(h == "127.0.0.1" or h == "::1", h)
      tc:close()
      tc = assert(tls.connect("127.0.0.1", port, client_ctx(), 5))
      assert(tc:write("by ip"))
      assert.equal("by ip", read_n(tc, 5))
      assert.is_true(tls.info(tc).peer_verified)
      tc:close()
      assert(helper.wait_until(function() return #rec.results == 2 end))
      stop()
      assert.equal(2, #rec.infos)
      assert.equal("localhost", rec.infos[1].servername)
      assert.is_nil(rec.infos[2].servername)
      -- a name the certificate does not have
      local l2 = assert(so.listen("127.0.0.1", 0))
      local _, p2 = l2:sockname()
      local srv = so.spawn(function()
        local s = assert(l2:accept())
        s:settimeout(5)
        return tls.wrap(s, assert(tls.server(C.other)))
      end)
      local ok, msg, name = tls.connect("127.0.0.1", p2, client_ctx())
      assert.is_nil(ok)
      assert.equal("ETLS", name)
      assert.matches("^ETLS: certificate verify failed", msg)
      assert.truthy(msg:find("mismatch", 1, true), msg)
      helper.join(srv)
      l2:close()
    end)

    it("verifies against the system's CA store by default", function()
      local port, rec, stop = tls_server(server_ctx(), echo)
      local ok, msg, name = tls.connect("localhost", port)
      assert.is_nil(ok)
      assert.equal("ETLS", name)
      assert.matches("^ETLS: certificate verify failed", msg)
      ok, msg, name = tls.connect("localhost", port, tls.client {})
      assert.is_nil(ok)
      assert.equal("ETLS", name)
      assert.matches("^ETLS: certificate verify failed", msg)
      assert(helper.wait_until(function() return #rec.failures == 2 end))
      stop()
      assert.equal(0, #rec.infos)
    end)

    it("gives up after its timeout on a listener that never handshakes",
       function()
      local l = assert(so.listen("127.0.0.1", 0))  -- never accepts
      local _, port = l:sockname()
      local t0 = so.now()
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { tls.connect("127.0.0.1", port, client_ctx(), 0.3) })
      local took = so.now() - t0
      assert.is_true(took >= 0.25 and took < 2, took)
      -- one that accepts and says nothing: the same, within the timeout
      -- for connect and handshake together
      local acceptor = so.spawn(function()
        local a <close> = assert(l:accept())  -- the first attempt's conn
        a:settimeout(5)
        return read_all(a)
      end)
      t0 = so.now()
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { tls.connect("127.0.0.1", port, client_ctx(), 0.4) })
      took = so.now() - t0
      assert.is_true(took >= 0.35 and took < 2, took)
      -- it had sent a ClientHello, then closed its side
      local hello = helper.join(acceptor)
      assert.equal("\22\3", hello:sub(1, 2))
      l:close()
    end)
  end)

  describe("SNI", function()
    local function sni_ctx()
      return server_ctx { sni = { ["other.test"] = C.other,
                                  ["*.wild.test"] = C.wild } }
    end

    it("selects the certificate for the name asked, verified by the client",
       function()
      local sctx = sni_ctx()
      for _, name in ipairs { "other.test", "a.wild.test", "localhost" } do
        local tc, ts = tls_pair(sctx, client_ctx(), name)
        assert.is_true(tls.info(tc).peer_verified)
        assert.equal(name, tls.info(ts).servername)
        tc:close()
        ts:close()
      end
      -- a name that only the default certificate could have answered
      local cr = handshake(sctx, client_ctx(), "nobody.test")
      assert.is_nil(cr[1])
      assert.matches("hostname mismatch", cr[2])
    end)

    it("serves the subject openssl s_client asks for, the default otherwise",
       function()
      local port, rec, stop = tls_server(sni_ctx(), function(tc)
        read_all(tc)
      end)
      local cases = {
        { "-servername other.test", "other.test" },
        { "-servername x.wild.test", "*.wild.test" },
        { "-servername b.a.wild.test", "localhost" },  -- one label only
        { "-servername nobody.test", "localhost" },
        { "-noservername", "localhost" },
      }
      local hs = {}
      for i, case in ipairs(cases) do
        hs[i] = helper.bg(("openssl s_client -connect 127.0.0.1:%d %s")
                          :format(port, case[1]))
      end
      for i, case in ipairs(cases) do
        local code, out, err = hs[i]:wait(10)
        assert.equal(0, code, err)
        local subject = out:match("\nsubject=([^\n]*)")
        assert.equal("CN = " .. case[2], subject, case[1])
      end
      assert(helper.wait_until(function() return #rec.infos == #cases end))
      stop()
      local names = {}
      for _, info in ipairs(rec.infos) do names[#names + 1] = info.servername or "-" end
      table.sort(names)
      assert.same({ "-", "b.a.wild.test", "nobody.test", "other.test",
                    "x.wild.test" }, names)
    end)
  end)

  describe("mutual TLS", function()
    local function mtls_ctx()
      return server_ctx { verify = true, ca = C.ca }
    end

    it("verifies a client certificate on both sides", function()
      local tc, ts = tls_pair(mtls_ctx(),
                              client_ctx { cert = C.client.cert,
                                           key = C.client.key }, "localhost")
      assert.is_true(tls.info(ts).peer_verified)
      assert.is_true(tls.info(tc).peer_verified)
      assert(tc:write("authenticated"))
      assert.equal("authenticated", read_n(ts, 13))
      tc:close()
      ts:close()
    end)

    it("fails the server's handshake without a client certificate, or with an untrusted one",
       function()
      for _, opts in ipairs { {}, { cert = C.rogueclient.cert,
                                    key = C.rogueclient.key } } do
        local cr, sr = handshake(mtls_ctx(), client_ctx(opts), "localhost")
        assert.is_nil(sr[1])
        assert.equal("ETLS", sr[3])
        assert.matches("^ETLS: .", sr[2])
        -- TLS 1.3: the client may finish first; then its read fails
        local tc = cr[1]
        if tc then
          local ok, msg, name = tc:read()
          assert.is_nil(ok)
          assert.equal("ETLS", name, msg)
          tc:close()
        else
          assert.equal("ETLS", cr[3])
        end
      end
    end)
  end)

  describe("bad input", function()
    it("fails a handshake that gets plaintext or garbage, and serves others meanwhile",
       function()
      local port, rec, stop = tls_server(server_ctx(), echo)
      local inputs = {
        "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "\22\3\1\0\5hello",                     -- a record that is no hello
        string.rep("\0", 4096),
        string.rep("\255\22\3\3", 1000),
      }
      for i, input in ipairs(inputs) do
        local c <close> = assert(so.connect("127.0.0.1", port))
        c:settimeout(5)
        -- a good client at the same time
        local good = so.spawn(function()
          local tc <close> = assert(tls.connect("localhost", port, client_ctx(), 5))
          assert(tc:write("fine " .. i))
          return read_n(tc, #("fine " .. i))
        end)
        c:write(input)
        -- no HTTP answer, nothing echoed: at most an alert, then the end
        local got = {}
        repeat
          local d = c:read()
          got[#got + 1] = d or ""
        until not d or d == ""
        got = table.concat(got)
        assert.is_nil(got:find("HTTP", 1, true))
        assert.is_nil(got:find("hello", 1, true))
        if #got > 0 then assert.equal("\21", got:sub(1, 1)) end  -- an alert
        assert.equal("fine " .. i, helper.join(good))
      end
      assert(helper.wait_until(function() return #rec.failures == #inputs end))
      for _, f in ipairs(rec.failures) do
        assert.equal("ETLS", f.name, f.msg)
        assert.matches("^ETLS: .", f.msg)
      end
      stop()
    end)

    it("fails a handshake cut short, on both sides", function()
      local port, rec, stop = tls_server(server_ctx(), echo)
      local rport, r = relay(port, 60)  -- 60 bytes of the ClientHello
      local c = assert(so.connect("127.0.0.1", rport))
      c:settimeout(5)
      local ok, msg, name = tls.wrap(c, client_ctx(), "localhost")
      assert.is_nil(ok)
      assert.equal("ETLS", name, msg)
      assert.has_error(function() c:read() end, "attempt to use a closed conn")
      r:finish()
      assert(helper.wait_until(function() return #rec.failures == 1 end))
      assert.equal("ETLS", rec.failures[1].name, rec.failures[1].msg)
      stop()
    end)

    it("times out a handshake that stalls, on either side", function()
      -- a client that connects and says nothing
      local port, rec, stop = tls_server(server_ctx(), echo, 0.3)
      local c <close> = assert(so.connect("127.0.0.1", port))
      local t0 = so.now()
      assert(helper.wait_until(function() return #rec.failures == 1 end))
      local took = so.now() - t0
      assert.same({ msg = "ETIMEDOUT: connection timed out", name = "ETIMEDOUT" },
                  rec.failures[1])
      assert.is_true(took >= 0.2 and took < 2, took)
      c:settimeout(5)
      assert.equal("", c:read())  -- the server closed its side
      -- a client that sends part of a hello, then stalls
      local c2 <close> = assert(so.connect("127.0.0.1", port))
      c2:write("\22\3\1\2\0\1\0\1\252\3\3")
      assert(helper.wait_until(function() return #rec.failures == 2 end))
      assert.same({ msg = "ETIMEDOUT: connection timed out", name = "ETIMEDOUT" },
                  rec.failures[2])
      stop()
      -- a server that accepts and says nothing
      local a, b = helper.pair()
      a:settimeout(0.3)
      t0 = so.now()
      assert.same({ nil, "ETIMEDOUT: connection timed out", "ETIMEDOUT" },
                  { tls.wrap(a, client_ctx(), "localhost") })
      assert.is_true(so.now() - t0 < 2)
      assert.has_error(function() a:read() end, "attempt to use a closed conn")
      b:settimeout(5)
      local hello = b:read()
      assert.equal("\22", hello:sub(1, 1))  -- it had sent its ClientHello
      b:close()
    end)

    it("returns ETLS for an EOF without close_notify (a relay cuts the TCP stream)",
       function()
      local got = {}
      local port, _, stop = tls_server(server_ctx(), function(tc)
        got[1] = tc:read()
        tc:write("hi")
        got[2] = table.pack(tc:read())
        got[3] = table.pack(tc:read())  -- and again
      end)
      local rport, r = relay(port)
      local c = assert(so.connect("127.0.0.1", rport))
      c:settimeout(5)
      local tc <close> = assert(tls.wrap(c, client_ctx(), "localhost"))
      assert(tc:write("hello"))
      assert.equal("hi", tc:read())
      assert.equal("hello", got[1])
      r:cut()  -- a plain TCP close toward the server: no close_notify
      r:finish()
      assert(helper.wait_until(function() return got[3] ~= nil end))
      assert.same({ n = 3, nil, "ETLS: unexpected eof while reading", "ETLS" },
                  got[2])
      assert.same(got[2], got[3])
      stop()
    end)

    it("returns ETLS for a Python client that closes without close_notify, \"\" after close_notify",
       function()
      local results = {}
      local port, _, stop = tls_server(server_ctx(), function(tc)
        local r = {}
        results[#results + 1] = r
        r[1] = tc:read()
        tc:write(r[1] == "hello" and "hi" or r[1])
        r[2] = table.pack(tc:read())
      end)
      local code, out, err = helper.bg(("python3 %s %d %s")
        :format(PY_NO_NOTIFY, port, C.ca)):wait(10)
      assert.equal(0, code, err)
      assert.equal("hi\n", out)
      code, out, err = helper.bg(("python3 %s %d %s - -")
        :format(PY_CLIENT, port, C.ca)):wait(10)
      assert.equal(0, code, err)
      assert.matches("echo=ping\n", out)
      assert(helper.wait_until(function()
        return #results == 2 and results[2][2] ~= nil
      end))
      stop()
      assert.equal("hello", results[1][1])
      assert.same({ n = 3, nil, "ETLS: unexpected eof while reading", "ETLS" },
                  results[1][2])
      assert.equal("ping", results[2][1])
      assert.same({ n = 1, "" }, results[2][2])
    end)

    it("fails a read with ETLS naming renegotiation when a TLS 1.2 client renegotiates; others go on",
       function()
      local seen = {}
      local port, rec, stop = tls_server(server_ctx(), function(tc, r)
        local first = tc:read()
        tc:write(first)
        if first ~= "hello\n" then return echo(tc, r) end
        seen[#seen + 1] = { first = first }
        seen[#seen].after = table.pack(tc:read())
      end)
      -- another conn, open across it
      local other = assert(tls.connect("localhost", port, client_ctx(), 5))
      assert(other:write("before"))
      assert.equal("before", read_n(other, 6))
      local h = helper.bg(("openssl s_client -tls1_2 -connect 127.0.0.1:%d "
                           .. "-servername localhost -CAfile %s")
                          :format(port, C.ca), true)
      h:send("hello\n")
      assert(helper.wait_until(function() return seen[1] ~= nil end, 10),
             "s_client did not get through: " .. select(2, h:output()))
      assert.equal("hello\n", seen[1].first)
      assert(helper.wait_until(function()
        return h:output():find("hello\n", 1, true)
      end), "no echo")
      h:send("R\n")  -- s_client: renegotiate
      local ok = helper.wait_until(function() return seen[1].after end, 10)
      h:close_stdin()
      local code, out, err = h:wait(10)
      assert(ok, "the server's read did not end: " .. tostring(out) .. tostring(err))
      local after = seen[1].after
      assert.is_nil(after[1], tostring(after[1]))
      assert.equal("ETLS", after[3], after[2])
      assert.truthy(after[2]:lower():find("renegotiat", 1, true), after[2])
      assert.truthy(err:find("RENEGOTIATING", 1, true), err)
      local _ = code
      -- the other conn goes on
      assert(other:write("after"))
      assert.equal("after", read_n(other, 5))
      other:close()
      assert(helper.wait_until(function() return #rec.results == 1 end))
      stop()
    end)

    it("leaves nothing behind after many failed handshakes", function()
      local snap = helper.snapshot()
      local port, rec, stop = tls_server(server_ctx { verify = true, ca = C.ca },
                                         nil, 0.5)
      local tasks = {}
      for i = 1, 40 do
        tasks[i] = so.spawn(function()
          local kind = i % 4
          if kind == 0 then      -- no client certificate
            local tc = tls.connect("127.0.0.1", port, client_ctx(), 5)
            if tc then tc:read(); tc:close() end
          elseif kind == 1 then  -- garbage
            local c <close> = assert(so.connect("127.0.0.1", port))
            c:write(("junk"):rep(100))
            c:settimeout(5)
            c:read()
          elseif kind == 2 then  -- a server it does not trust
            local c = tls.connect("127.0.0.1", port,
                                  tls.client { ca = C.rogue_ca }, 5)
            assert(not c)
          else                   -- stalls
            local c <close> = assert(so.connect("127.0.0.1", port))
            c:settimeout(5)
            c:read()
          end
        end)
      end
      for i = 1, #tasks do helper.join(tasks[i], 20) end
      stop()
      assert.is_true(#rec.failures >= 40)
      helper.assert_clean(snap)
    end)
  end)

  describe("with real peers, luahost TLS conns", function()
    it("talk to openssl s_server -rev, with ALPN and a client certificate",
       function()
      local h = helper.bg(("openssl s_server -accept 127.0.0.1:0 -naccept 1 -ign_eof "
                           .. "-rev -alpn x-other,http/1.1 -cert %s -key %s "
                           .. "-Verify 1 -CAfile %s")
                          :format(C.server.cert, C.server.key, C.ca))
      local port = s_server_port(h)
      local tc = assert(tls.connect("localhost", port,
                                    client_ctx { alpn = { "http/1.1" },
                                                 cert = C.client.cert,
                                                 key = C.client.key }, 5))
      local info = tls.info(tc)
      assert.equal("TLSv1.3", info.version)
      assert.equal("http/1.1", info.alpn)
      assert.equal("localhost", info.servername)
      assert.is_true(info.peer_verified)
      assert(tc:write("hello tls\n"))
      assert.equal("slt olleh\n", read_n(tc, 10))
      tc:close()
      local code, _, err = h:wait(10)
      assert.equal(0, code, err)
    end)

    it("fetch the status page of openssl s_server -www over TLS 1.2", function()
      local h = helper.bg(("openssl s_server -accept 127.0.0.1:0 -naccept 1 -ign_eof "
                           .. "-www -tls1_2 -cert %s -key %s")
                          :format(C.server.cert, C.server.key))
      local port = s_server_port(h)
      local tc = assert(tls.connect("127.0.0.1", port, client_ctx(), 5))
      assert.equal("TLSv1.2", tls.info(tc).version)
      assert(tc:write("GET / HTTP/1.0\r\n\r\n"))
      local page = assert(read_all(tc))
      assert.matches("^HTTP/1.0 200 ok\r\n", page)
      assert.truthy(page:find("Protocol  : TLSv1.2", 1, true), page)
      assert.truthy(page:find(tls.info(tc).cipher, 1, true))
      tc:close()
      assert.equal(0, (h:wait(10)))
    end)

    it("serve Python's ssl: TLS 1.3 and 1.2, ALPN, ciphers, min_version",
       function()
      local port, rec, stop = tls_server(server_ctx {
        alpn = { "http/1.1" },
        ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256",
      }, echo)
      local code, out, err = helper.bg(("python3 %s %d %s h2,http/1.1 -")
        :format(PY_CLIENT, port, C.ca)):wait(10)
      assert.equal(0, code, err)
      assert.matches("version=TLSv1.3\n", out)
      assert.matches("alpn=http/1.1\n", out)
      assert.matches("echo=ping\n", out)
      assert.matches("unwrap=ok\n", out)
      code, out, err = helper.bg(("python3 %s %d %s - 1.2")
        :format(PY_CLIENT, port, C.ca)):wait(10)
      assert.equal(0, code, err)
      assert.matches("version=TLSv1.2\n", out)
      assert.matches("alpn=None\n", out)
      assert.matches("cipher=ECDHE%-ECDSA%-AES128%-GCM%-SHA256\n", out)
      assert.matches("echo=ping\n", out)
      assert(helper.wait_until(function() return #rec.results == 2 end))
      stop()
      assert.equal("http/1.1", rec.infos[1].alpn)
      assert.equal("TLSv1.3", rec.infos[1].version)
      assert.equal("TLSv1.2", rec.infos[2].version)
      assert.equal("ECDHE-ECDSA-AES128-GCM-SHA256", rec.infos[2].cipher)
      assert.same({ { d = "" }, { d = "" } }, rec.results)  -- close_notify
      -- min_version = "1.3" turns a TLS 1.2 client away
      local port2, rec2, stop2 = tls_server(server_ctx { min_version = "1.3" }, echo)
      code, out = helper.bg(("python3 %s %d %s - 1.2")
        :format(PY_CLIENT, port2, C.ca)):wait(10)
      assert.are_not.equal(0, code)
      assert.is_nil(out:find("echo=", 1, true))
      assert(helper.wait_until(function() return #rec2.failures == 1 end))
      assert.equal("ETLS", rec2.failures[1].name)
      stop2()
    end)
  end)

  describe("a TLS echo server", function()
    it("stays within a few MiB during a flood from a client that reads nothing",
       function()
      local script = helper.write_script([[
        local so = require "so"
        local tls = require "so.tls"
        local ctx = assert(tls.server { cert = arg[2], key = arg[3] })
        local l = assert(so.listen("127.0.0.1", tonumber(arg[1])))
        local h, p = so.sockname(l)
        io.write("listening on ", h, ":", p, "\n")
        io.stdout:flush()
        while true do
          local c, _, name = l:accept()
          if c then
            so.spawn(function()
              local t <close> = tls.wrap(c, ctx)
              while t do
                local d = t:read()
                if not d or d == "" or not t:write(d) then break end
              end
            end)
          elseif name == "ECANCELED" then
            break
          end
        end
      ]])
      local proc = helper.start(script, C.server.cert, C.server.key)
      os.remove(script)
      local c <close> = assert(tls.connect("127.0.0.1", proc.port, client_ctx(), 5))
      assert(c:write("warm up"))
      assert.equal("warm up", read_n(c, 7))
      so.sleep(0.1)
      local idle = helper.rss(proc.pid)
      local chunk = ("0123456789abcdef"):rep(64 * 1024)  -- 1 MiB
      local sent, peak = 0, idle
      c:settimeout(0.5)
      while sent < 1024 * MiB do
        local ok, _, name = c:write(chunk)
        peak = math.max(peak, helper.rss(proc.pid))
        if not ok then
          assert.equal("ETIMEDOUT", name)  -- blocked by TCP
          break
        end
        sent = sent + #chunk
      end
      assert.is_true(sent < 1024 * MiB, "the client was never blocked")
      for _ = 1, 5 do
        so.sleep(0.1)
        peak = math.max(peak, helper.rss(proc.pid))
      end
      c:close()
      assert.equal(0, proc:stop())
      -- a few MiB; under AddressSanitizer (CI's second run) memory is the
      -- sanitizer's (about 18 MiB here), so a wider bound there
      local bound = os.getenv("ASAN_OPTIONS") and 32 * MiB or 6 * MiB
      assert.is_true(peak - idle < bound,
                     ("RSS grew by %d bytes"):format(peak - idle))
    end)
  end)
end)
