-- HTTPS: so.http over so.tls. scripts/https_hello.lua in a child process
-- driven with curl, openssl s_client and luahost's own TLS client, and
-- http.listen(..., {tls = ctx}) in this process.
local so = require "so"
local tls = require "so.tls"
local http = require "so.http"
local reader = require "so.reader"
local helper = require "helper"

local C = helper.tls_certs()
local MiB = 1024 * 1024

local function client_ctx(opts)
  local o = { ca = C.ca }
  for k, v in pairs(opts or {}) do o[k] = v end
  return assert(tls.client(o))
end

-- Reads one response from reader r: status, headers (lower-case names),
-- body (by its length, or chunked); or nil, err.
local function read_response(r)
  local head, err = r:readuntil("\r\n\r\n", { limit = 65536 })
  if not head then return nil, err end
  local status = tonumber(head:match("^HTTP/1%.1 (%d%d%d) [^\r\n]*\r\n"))
  assert(status, "bad status line in " .. head)
  local headers = {}
  for k, v in head:gmatch("\r\n([^:\r\n]+): ([^\r\n]*)") do
    headers[k:lower()] = v
  end
  local body = ""
  if headers["content-length"] then
    body = assert(r:read(tonumber(headers["content-length"])))
  elseif headers["transfer-encoding"] == "chunked" then
    local parts = {}
    while true do
      local size = tonumber(assert(r:read("l")), 16)
      if size == 0 then assert(r:read("l") == ""); break end
      parts[#parts + 1] = assert(r:read(size))
      assert(r:read("l") == "")
    end
    body = table.concat(parts)
  end
  return status, headers, body
end

describe("HTTPS", function()
  teardown(function() C:remove() end)

  describe("scripts/https_hello.lua", function()
    local proc, base, resolve
    setup(function()
      proc = helper.start_with("", "scripts/https_hello.lua "
                               .. helper.shq(C.server.cert) .. " "
                               .. helper.shq(C.server.key))
      base = "https://localhost:" .. proc.port
      resolve = ("--resolve localhost:%d:127.0.0.1 "):format(proc.port)
    end)
    teardown(function() if proc then assert.equal(0, proc:stop()) end end)

    -- curl with the test CA: exit code, stdout, stderr.
    local function curl(args)
      return helper.run("curl -sS --max-time 20 --cacert " .. C.ca .. " "
                        .. resolve .. args)
    end
    local function curl_ok(args)
      local code, out, err = curl(args)
      assert.equal(0, code, err)
      return out, err
    end

    it("prints exactly one line with its address", function()
      assert.matches("^listening on 127%.0%.0%.1:%d+$", proc.line)
      assert.is_true(proc.port > 0)
    end)

    it("serves GET / to curl --cacert, by name and by IP, on one connection",
       function()
      local out = curl_ok("-w '|%{http_code}|%{num_connects}|%{http_version}\\n' "
                          .. base .. "/ " .. base .. "/nothing " .. base .. "/")
      assert.equal("hello world\n|200|1|1.1\nnot found\n|404|0|1.1\n"
                   .. "hello world\n|200|0|1.1\n", out)
      out = curl_ok("-w '|%{http_code}' https://127.0.0.1:" .. proc.port .. "/")
      assert.equal("hello world\n|200", out)
      out = curl_ok("--http1.1 -i " .. base .. "/")
      assert.matches("^HTTP/1.1 200 OK\r\n", out)
      assert.matches("\r\nContent%-Length: 12\r\n", out)
    end)

    it("echoes a 1 MB POST /echo, with its length and chunked", function()
      local file = os.tmpname()
      assert(os.execute("head -c 1048576 /dev/urandom > " .. file))
      local _, sum = helper.run("md5sum < " .. file)
      local out = curl_ok("--data-binary @" .. file .. " " .. base
                          .. "/echo | md5sum")
      assert.equal(sum, out)
      out = curl_ok("-T - -X POST " .. base .. "/echo < " .. file .. " | md5sum")
      assert.equal(sum, out)
      os.remove(file)
    end)

    it("negotiates http/1.1 by ALPN with curl and openssl s_client", function()
      local _, err = curl_ok("-v -o /dev/null " .. base .. "/")
      assert.truthy(err:find("ALPN: server accepted http/1.1", 1, true)
                    or err:find("ALPN, server accepted to use http/1.1", 1, true),
                    err)
      local code, out, err2 = helper.run(("openssl s_client -connect 127.0.0.1:%d "
        .. "-servername localhost -CAfile %s -alpn h2,http/1.1 </dev/null")
        :format(proc.port, C.ca))
      assert.equal(0, code, err2)
      assert.truthy(out:find("ALPN protocol: http/1.1", 1, true), out)
      assert.truthy(out:find("Verify return code: 0 (ok)", 1, true), out)
    end)

    it("speaks TLS 1.2 and TLS 1.3 as curl forces them", function()
      local out, err = curl_ok("-v --tls-max 1.2 " .. base .. "/")
      assert.equal("hello world\n", out)
      assert.truthy(err:find("SSL connection using TLSv1.2", 1, true), err)
      out, err = curl_ok("-v --tlsv1.3 " .. base .. "/")
      assert.equal("hello world\n", out)
      assert.truthy(err:find("SSL connection using TLSv1.3", 1, true), err)
    end)

    it("is refused by curl without the CA or under another name, and serves on",
       function()
      local code, _, err = helper.run("curl -sS --max-time 20 " .. resolve
                                      .. base .. "/")
      assert.equal(60, code, err)  -- peer certificate cannot be authenticated
      code, _, err = helper.run(("curl -sS --max-time 20 --cacert %s "
        .. "--resolve other.test:%d:127.0.0.1 https://other.test:%d/")
        :format(C.ca, proc.port, proc.port))
      assert.equal(60, code, err)
      assert.equal("hello world\n", (curl_ok(base .. "/")))
    end)

    it("gives plaintext HTTP and garbage no HTTP answer, and serves on", function()
      local code, out = helper.run(("curl -sS --max-time 5 -i http://127.0.0.1:%d/")
                                   :format(proc.port))
      assert.are_not.equal(0, code)
      assert.is_nil(out:find("HTTP/", 1, true))
      local c <close> = assert(so.connect("127.0.0.1", proc.port))
      c:settimeout(5)
      c:write(("\0garbage\255"):rep(100))
      local got = {}
      repeat
        local d = c:read()
        got[#got + 1] = d or ""
      until not d or d == ""
      assert.is_nil(table.concat(got):find("HTTP", 1, true))
      assert.equal("hello world\n", (curl_ok(base .. "/")))
    end)

    it("serves while clients stall their handshakes", function()
      local stalled = {}
      for i = 1, 5 do stalled[i] = assert(so.connect("127.0.0.1", proc.port)) end
      stalled[6] = assert(so.connect("127.0.0.1", proc.port))
      stalled[6]:write("\22\3\1\2\0\1\0\1\252\3\3")  -- part of a ClientHello
      local t0 = so.now()
      local out = curl_ok("-w '|%{http_code}' " .. base .. "/")
      assert.equal("hello world\n|200", out)
      assert.is_true(so.now() - t0 < 5)
      for _, c in ipairs(stalled) do c:close() end
    end)
  end)

  describe("scripts/https_hello.lua arguments", function()
    it("listens on the given port and host", function()
      local proc = helper.start_with("", "scripts/https_hello.lua "
                                     .. helper.shq(C.server.cert) .. " "
                                     .. helper.shq(C.server.key) .. " 0 ::1")
      assert.matches("^listening on ::1:%d+$", proc.line)
      local c = assert(so.connect("::1", proc.port))
      c:settimeout(5)
      local tc <close> = assert(tls.wrap(c, client_ctx { alpn = { "h2", "http/1.1" } },
                                         "localhost"))
      assert.equal("http/1.1", tls.info(tc).alpn)
      assert(tc:write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
      local status, _, body = read_response(reader.new(tc))
      assert.equal(200, status)
      assert.equal("hello world\n", body)
      tc:close()
      assert.equal(0, proc:stop())
    end)

    it("refuses to start with a key that is not the certificate's", function()
      local ok, err = pcall(helper.start_with, "", "scripts/https_hello.lua "
                            .. helper.shq(C.server.cert) .. " "
                            .. helper.shq(C.other.key))
      assert.is_false(ok)
      assert.matches("ETLS", err)
      ok, err = pcall(helper.start_with, "", "scripts/https_hello.lua "
                      .. helper.shq(C.dir .. "/none.crt") .. " "
                      .. helper.shq(C.server.key))
      assert.is_false(ok)
      assert.matches("ETLS", err)
    end)
  end)

  describe("mutual TLS with curl --cert/--key", function()
    local proc, base
    setup(function()
      local script = helper.write_script([[
        local so = require "so"
        local http = require "so.http"
        local tls = require "so.tls"
        local ctx = assert(tls.server { cert = arg[2], key = arg[3],
                                        verify = true, ca = arg[4],
                                        alpn = { "http/1.1" } })
        local srv = assert(http.listen("127.0.0.1", tonumber(arg[1]),
          function(req)
            local i = tls.info(req.conn)
            return { body = "verified=" .. tostring(i.peer_verified) .. "\n" }
          end, { tls = ctx }))
        local h, p = srv:sockname()
        io.write("listening on ", h, ":", p, "\n")
        io.stdout:flush()
        srv:serve()
      ]])
      proc = helper.start(script, C.server.cert, C.server.key, C.ca)
      os.remove(script)
      base = ("--resolve localhost:%d:127.0.0.1 https://localhost:%d/")
             :format(proc.port, proc.port)
    end)
    teardown(function() if proc then assert.equal(0, proc:stop()) end end)

    it("serves a client with a certificate from its CA", function()
      local code, out, err = helper.run(("curl -sS --max-time 20 --cacert %s "
        .. "--cert %s --key %s %s"):format(C.ca, C.client.cert, C.client.key, base))
      assert.equal(0, code, err)
      assert.equal("verified=true\n", out)
    end)

    it("turns away a client without a certificate, or with one it does not trust",
       function()
      local code, out = helper.run(("curl -sS --max-time 20 --cacert %s %s")
                                   :format(C.ca, base))
      assert.are_not.equal(0, code)
      assert.equal("", out)
      code, out = helper.run(("curl -sS --max-time 20 --cacert %s --cert %s "
        .. "--key %s %s"):format(C.ca, C.rogueclient.cert, C.rogueclient.key, base))
      assert.are_not.equal(0, code)
      assert.equal("", out)
      -- and serves on
      code, out = helper.run(("curl -sS --max-time 20 --cacert %s --cert %s "
        .. "--key %s %s"):format(C.ca, C.client.cert, C.client.key, base))
      assert.equal(0, code)
      assert.equal("verified=true\n", out)
    end)
  end)

  describe("http.listen with {tls = ctx}", function()
    local snap
    before_each(function() snap = helper.snapshot() end)
    after_each(function() helper.assert_clean(snap) end)

    -- An HTTPS server in this process: port, stop().
    local function server(handler, opts)
      opts = opts or {}
      opts.tls = opts.tls or assert(tls.server { cert = C.server.cert,
                                                 key = C.server.key,
                                                 alpn = { "http/1.1" } })
      opts.log = opts.log or function() end
      local srv = assert(http.listen("127.0.0.1", 0, handler, opts))
      local _, port = srv:sockname()
      local t = so.spawn(srv.serve, srv)
      return port, function()
        srv:close()
        helper.join(t, 5)
      end
    end

    local function connect(port)
      local tc = assert(tls.connect("localhost", port,
                                    client_ctx { alpn = { "http/1.1" } }, 5))
      return tc, reader.new(tc)
    end

    it("serves requests on a kept-alive TLS conn, which the handler sees",
       function()
      local port, stop = server(function(req)
        local i = tls.info(req.conn)
        return { body = table.concat({ i.version, tostring(i.alpn),
                                       tostring(i.servername), req.path }, " ") }
      end)
      local tc <close>, r = connect(port)
      for n = 1, 3 do
        assert(tc:write("GET /" .. n .. " HTTP/1.1\r\nHost: localhost\r\n\r\n"))
        local status, h, body = read_response(r)
        assert.equal(200, status)
        assert.is_nil(h.connection)
        assert.equal("TLSv1.3 http/1.1 localhost /" .. n, body)
      end
      assert(tc:write("GET /4 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
      local status, h = read_response(r)
      assert.equal(200, status)
      assert.equal("close", h.connection)
      assert.equal("", r:read("a"))  -- the server's close_notify: a clean end
      tc:close()
      stop()
    end)

    it("answers 400 when the client sends close_notify mid-request, and serves on",
       function()
      local port, stop = server(function(req, body)
        return { body = assert(body:readall()) }
      end)
      -- in the head
      local tc, r = connect(port)
      assert(tc:write("GET / HTTP/1.1\r\nHo"))
      assert(tc:shutdown())  -- close_notify, then FIN
      assert.equal(400, (read_response(r)))
      assert.equal("", r:read("a"))
      tc:close()
      -- in the body
      tc, r = connect(port)
      assert(tc:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                      .. ("z"):rep(10)))
      assert(tc:shutdown())
      assert.equal(400, (read_response(r)))
      tc:close()
      -- and a whole one
      tc, r = connect(port)
      assert(tc:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"))
      local status, _, body = read_response(r)
      assert.equal(200, status)
      assert.equal("hello", body)
      tc:close()
      stop()
    end)

    it("does not let failed or stalled handshakes hold up other clients",
       function()
      local port, stop = server(function() return "fine" end,
                                { header_timeout = 0.5 })
      local bad = {}
      for i = 1, 3 do  -- stalls
        bad[#bad + 1] = assert(so.connect("127.0.0.1", port))
      end
      for _, junk in ipairs { "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                              ("\0"):rep(1000), "\22\3\1\0\1x" } do
        local c = assert(so.connect("127.0.0.1", port))
        c:write(junk)
        bad[#bad + 1] = c
      end
      local t0 = so.now()
      local tc <close>, r = connect(port)
      assert(tc:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
      local status, _, body = read_response(r)
      assert.equal(200, status)
      assert.equal("fine", body)
      -- (handshakes one after another would have waited for the three
      -- stalls to time out: 1.5 s)
      assert.is_true(so.now() - t0 < 1.2, so.now() - t0)
      tc:close()
      -- the server ends every bad one (stalls by the head's timeout)
      for _, c in ipairs(bad) do
        c:settimeout(5)
        local got = {}
        repeat
          local d, _, name = c:read()
          assert.are_not.equal("ETIMEDOUT", name)
          got[#got + 1] = d or ""
        until not d or d == ""
        assert.is_nil(table.concat(got):find("HTTP", 1, true))
        c:close()
      end
      assert.is_true(so.now() - t0 < 3)
      stop()
    end)

    it("streams a 4 MiB upload and its echo over TLS", function()
      local port, stop = server(function(req, body)
        return { body = body }
      end, { max_body = 8 * MiB })
      local tc <close>, r = connect(port)
      local data = {}
      for i = 1, 64 do data[i] = string.char(i):rep(64 * 1024) end
      data = table.concat(data)
      local writer = so.spawn(function()
        assert(tc:write("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: "
                        .. #data .. "\r\n\r\n"))
        for i = 1, #data, MiB do assert(tc:write(data:sub(i, i + MiB - 1))) end
      end)
      local status, _, got = read_response(r)
      helper.join(writer, 20)
      assert.equal(200, status)
      assert.equal(#data, #got)
      assert.is_true(got == data, "bytes differ")
      tc:close()
      stop()
    end)
  end)
end)
