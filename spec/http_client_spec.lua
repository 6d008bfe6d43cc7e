-- Specs for the HTTP client of so.http (http.request, http.get), against
-- real servers started here: luahost's own HTTP server (in this process
-- and scripts/https_hello.lua), nginx, Python's http.server; and raw
-- sockets posing as a server that misbehaves.
local so = require "so"
local http = require "so.http"
local pool = require "so.pool"
local tls = require "so.tls"
local reader = require "so.reader"
local helper = require "helper"

-- An in-process so.http server: returns port, stop, logs.
local function server(handler, opts)
  local logs = {}
  opts = opts or {}
  opts.log = function(msg) logs[#logs + 1] = msg end
  local srv = assert(http.listen(opts.host or "127.0.0.1", 0, handler, opts))
  local _, port = srv:sockname()
  local t = so.spawn(srv.serve, srv)
  return port, function()
    srv:close()
    so.join(t, 5)
  end, logs
end

-- A handler answering with the request's body.
local function echo_all(req, body)
  return { status = 200, body = assert(body:readall()) }
end

-- A handler answering with the peer's port (to see which conn was used).
local function port_handler(req)
  local _, p = req:peername()
  return { status = 200, body = tostring(p) }
end

--[[
** A raw server posing as an HTTP server: script(conn, r, n, st) runs for
** each accepted conn (n: its number from 1; r: a reader on it), and the
** conn is closed after it. st.conns counts conns, st.heads gathers the
** request heads read with read_req. Returns port, stop, st.
]]
local function read_req(r, st)
  local head = r:readuntil("\r\n\r\n")
  if head and st then st.heads[#st.heads + 1] = head end
  return head
end

local function fake(script)
  local st = { conns = 0, heads = {}, errors = {} }
  local l, _, port = helper.server(function(c)
    st.conns = st.conns + 1
    local n = st.conns
    c:settimeout(5)
    local ok, err = pcall(script, c, reader.new(c), n, st)
    if not ok then st.errors[#st.errors + 1] = err end
    c:close()
  end)
  return port, function() l:close() end, st
end

-- A raw server answering every request with `reply` on the same conn.
local function fake_reply(reply, after)
  return fake(function(c, r, n, st)
    while read_req(r, st) do
      c:write(reply)
      if after then after(c, r) return end
    end
  end)
end

local function key(port, host, scheme)
  return (scheme or "http") .. "://" .. (host or "127.0.0.1") .. ":" .. port
end

describe("so.http client", function()
  local snap
  before_each(function()
    pool.clear()
    snap = helper.snapshot()
  end)
  after_each(function()
    pool.clear()
    helper.assert_clean(snap)
  end)

  describe("against luahost's HTTP server", function()
    it("GETs status, reason, headers (case-insensitive) and body, with Host and User-Agent from the URL",
       function()
      local seen
      local port, stop = server(function(req)
        seen = { host = req.headers.host, ua = req.headers["user-agent"],
                 target = req.target, method = req.method }
        return { status = 201, headers = { ["Content-Type"] = "text/plain",
                 ["X-Multi"] = { "one", "two" } }, body = "made\n" }
      end)
      local res, err = http.request{ url = "http://127.0.0.1:" .. port
                                           .. "/a/b?x=1&y=2#frag" }
      assert.is_nil(err)
      assert.are.equal(201, res.status)
      assert.are.equal("Created", res.reason)
      assert.are.equal("1.1", res.version)
      assert.are.equal("text/plain", res.headers["content-type"])
      assert.are.equal("text/plain", res.headers["Content-Type"])
      assert.are.equal("one, two", res.headers["X-MULTI"])
      assert.are.same({ "one", "two" }, { res:header("x-multi") })
      assert.are.equal("5", res:header("Content-Length"))
      assert.are.equal(5, res.body.length)
      assert.are.equal("made\n", res.body:readall())
      assert.are.same({ host = "127.0.0.1:" .. port, target = "/a/b?x=1&y=2",
                        method = "GET",
                        ua = "luahost/" .. so._VERSION:match("%S+$") }, seen)
      -- A caller's Host and User-Agent win.
      res = assert(http.request{ url = "http://127.0.0.1:" .. port,
                                 headers = { host = "example.test",
                                             ["User-Agent"] = "spec" } })
      assert.are.equal("made\n", res.body:readall())
      assert.are.same({ host = "example.test", ua = "spec", target = "/",
                        method = "GET" }, seen)
      stop()
    end)

    it("http.get gives status, body, headers; or nil, msg, name", function()
      local port, stop = server(function(req)
        return { status = 404, headers = { ["X-A"] = "b" }, body = "none\n" }
      end)
      local status, body, headers = http.get("http://127.0.0.1:" .. port
                                             .. "/x", { ["X-Q"] = "1" })
      assert.are.equal(404, status)
      assert.are.equal("none\n", body)
      assert.are.equal("b", headers["x-a"])
      stop()
      local r = table.pack(http.get("http://127.0.0.1:" .. port .. "/"))
      assert.are.equal(3, r.n)
      assert.is_nil(r[1])
      assert.are.equal("ECONNREFUSED", r[3])
      assert.matches("^ECONNREFUSED: ", r[2])
    end)

    it("sends string bodies with Content-Length, functions and readers chunked",
       function()
      local port, stop = server(function(req, body)
        local data = assert(body:readall())
        return { status = 200, body = req.method .. "|"
                 .. tostring(req.headers["content-length"]) .. "|"
                 .. tostring(req.headers["transfer-encoding"]) .. "|" .. data }
      end)
      local url = "http://127.0.0.1:" .. port .. "/"
      local res = assert(http.request{ url = url, method = "POST",
                                       body = "hello" })
      assert.are.equal("POST|5|nil|hello", res.body:readall())
      local i = 0
      res = assert(http.request{ url = url, method = "PUT", body = function()
        i = i + 1
        if i <= 3 then so.sleep(0.01); return "part" .. i .. ";" end
      end })
      assert.are.equal("PUT|nil|chunked|part1;part2;part3;", res.body:readall())
      -- Another response's body reader as the source: a proxy.
      local src = assert(http.request{ url = url, method = "POST",
                                       body = string.rep("x", 100000) })
      res = assert(http.request{ url = url, method = "POST", body = src.body })
      assert.are.equal("POST|nil|chunked|POST|100000|nil|"
                       .. string.rep("x", 100000), res.body:readall())
      -- A caller's Content-Length sends a function's body with it.
      local sent = false
      res = assert(http.request{ url = url, method = "POST",
        headers = { ["Content-Length"] = 3 },
        body = function() if not sent then sent = true; return "abc" end end })
      assert.are.equal("POST|3|nil|abc", res.body:readall())
      -- No body: POST says Content-Length: 0, GET says nothing.
      res = assert(http.request{ url = url, method = "POST" })
      assert.are.equal("POST|0|nil|", res.body:readall())
      res = assert(http.request{ url = url })
      assert.are.equal("GET|nil|nil|", res.body:readall())
      stop()
    end)

    it("gives HEAD, 204 and 304 responses empty bodies and keeps their conn",
       function()
      local port, stop = server(function(req)
        local _, p = req:peername()
        if req.path == "/204" then return { status = 204 } end
        if req.path == "/304" then return { status = 304 } end
        return { status = 200, headers = { ["X-Port"] = p },
                 body = "a body of some length\n" }
      end)
      local base = "http://127.0.0.1:" .. port
      local res = assert(http.request{ url = base .. "/", method = "HEAD" })
      assert.are.equal(200, res.status)
      assert.are.equal("22", res.headers["content-length"])
      assert.are.equal("", res.body:readall())
      assert.is_true(res.body.done)
      local p1 = res.headers["x-port"]
      assert.are.equal(1, pool.count(key(port)))
      for _, path in ipairs { "/204", "/304" } do
        res = assert(http.request{ url = base .. path })
        assert.are.equal(tonumber(path:sub(2)), res.status)
        assert.are.equal("", res.body:readall())
      end
      res = assert(http.request{ url = base .. "/" })
      assert.are.equal("a body of some length\n", res.body:readall())
      assert.are.equal(p1, res.headers["x-port"])     -- one conn throughout
      assert.are.equal(1, pool.count(key(port)))
      stop()
    end)

    it("streams a large body with read, chunks and discard; max_body bounds it",
       function()
      local piece = string.rep("0123456789", 6554)     -- 65540 bytes
      local port, stop = server(function(req)
        local n = 0
        return { status = 200, body = function()
          n = n + 1
          if n <= 80 then return piece end
        end }
      end)
      local url = "http://127.0.0.1:" .. port .. "/"
      local res = assert(http.request{ url = url })
      assert.is_true(res.body.chunked)
      local total, reads = 0, 0
      for chunk in res.body:chunks() do
        total = total + #chunk
        reads = reads + 1
      end
      assert.are.equal(80 * #piece, total)
      assert.is_true(reads >= 80)
      assert.are.equal(1, pool.count(key(port)))      -- read to its end
      res = assert(http.request{ url = url })
      local first = assert(res.body:read(1000))
      assert.are.equal(1000, #first)
      assert.is_true(res.body:discard())
      assert.are.equal(1, pool.count(key(port)))
      -- Over max_body (4 MiB here): the read that passes it fails.
      res = assert(http.request{ url = url, max_body = 4 * 1024 * 1024 })
      local body, err, name = res.body:readall()
      assert.is_nil(body)
      assert.are.equal("EMSGSIZE", name)
      assert.matches("^EMSGSIZE: response body too large", err)
      assert.are.equal(0, pool.count(key(port)))
      -- http.get holds the default of 16 MiB: 5 MiB pass.
      local status, all = http.get(url)
      assert.are.equal(200, status)
      assert.are.equal(80 * #piece, #all)
      stop()
    end)

    it("with Expect: 100-continue, sends the body after 100 Continue, never after a final status",
       function()
      local reads = 0
      local port, stop = server(function(req, body)
        if req.path == "/no" then return { status = 403, body = "no\n" } end
        reads = reads + 1
        return { status = 200, body = assert(body:readall()) }
      end)
      local base = "http://127.0.0.1:" .. port
      local t0 = so.now()
      local res = assert(http.request{ url = base .. "/yes", method = "POST",
        headers = { Expect = "100-continue" }, body = "the body" })
      assert.are.equal(200, res.status)
      assert.are.equal("the body", res.body:readall())
      assert.is_true(so.now() - t0 < 0.5)   -- no waiting for the timeout
      assert.are.equal(1, pool.count(key(port)))
      res = assert(http.request{ url = base .. "/no", method = "POST",
        headers = { Expect = "100-continue" }, body = "unwanted" })
      assert.are.equal(403, res.status)
      assert.are.equal("no\n", res.body:readall())
      assert.are.equal(1, reads)
      assert.are.equal(0, pool.count(key(port)))  -- the body was never sent
      stop()
    end)

    it("sends a held body after continue_timeout when no 100 comes", function()
      local got
      local port, stop, st = fake(function(c, r, n, st)
        local head = read_req(r, st)
        local t0 = so.now()
        local body = r:read(4)
        got = { body = body, waited = so.now() - t0,
                expect = head:lower():match("\r\nexpect: ([^\r\n]*)") }
        c:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        r:read("a")
      end)
      local res = assert(http.request{ url = "http://127.0.0.1:" .. port,
        method = "PUT", headers = { expect = "100-continue" }, body = "data",
        continue_timeout = 0.3 })
      assert.are.equal("ok", res.body:readall())
      assert.are.equal("data", got.body)
      assert.are.equal("100-continue", got.expect)
      assert.is_true(got.waited >= 0.25 and got.waited < 2, got.waited)
      stop()
    end)

    it("gets the server's early answer to an upload it refuses (413)", function()
      local port, stop = server(echo_all, { max_body = 1000 })
      local url = "http://127.0.0.1:" .. port .. "/"
      for _, n in ipairs { 2000, 100000, 8000000 } do
        local res, err = http.request{ url = url, method = "POST",
                                       body = ("x"):rep(n) }
        assert.is_truthy(res, err)
        assert.are.equal(413, res.status)
        local i = 0
        res, err = http.request{ url = url, method = "PUT", body = function()
          i = i + 1
          if i * 65536 <= n + 65536 then return ("y"):rep(65536) end
        end }
        assert.is_truthy(res, err)
        assert.are.equal(413, res.status)
        assert.are.equal(0, pool.count(key(port)))
      end
      stop()
    end)

    it("reuses a conn (one peer port) and leaves nothing with pool = false",
       function()
      local port, stop = server(port_handler)
      local url = "http://127.0.0.1:" .. port .. "/"
      local ports = {}
      for i = 1, 5 do
        local status, body = http.get(url)
        assert.are.equal(200, status)
        ports[body] = true
        assert.are.equal(1, pool.count(key(port)))
      end
      assert.are.equal(1, #(function() local t = {} for p in pairs(ports) do t[#t+1] = p end return t end)())
      -- Concurrent requests take a conn each and give it back.
      local tasks = {}
      for i = 1, 4 do
        tasks[i] = so.spawn(function()
          local res = assert(http.request{ url = url })
          so.sleep(0.05)
          return res.body:readall()
        end)
      end
      local seen = {}
      for i = 1, 4 do seen[helper.join(tasks[i])] = true end
      local n = 0
      for _ in pairs(seen) do n = n + 1 end
      assert.are.equal(4, n)
      assert.are.equal(4, pool.count(key(port)))
      pool.clear()
      local seen2 = {}
      for i = 1, 3 do
        local res = assert(http.request{ url = url, pool = false })
        seen2[res.body:readall()] = true
        assert.are.equal(0, pool.count(key(port)))
      end
      n = 0
      for _ in pairs(seen2) do n = n + 1 end
      assert.are.equal(3, n)
      stop()
    end)

    it("never hands out a conn the server has closed meanwhile", function()
      local port, stop = server(port_handler, { keepalive_timeout = 0.1 })
      local url = "http://127.0.0.1:" .. port .. "/"
      local _, p1 = http.get(url)
      assert.are.equal(1, pool.count(key(port)))
      so.sleep(0.3)                                  -- the server closed it
      local status, p2, _, err = http.get(url)
      assert.are.equal(200, status, err)
      assert.are_not.equal(p1, p2)
      stop()
    end)

    it("retries an idempotent request once when its pooled conn was closed as it was sent; not a POST",
       function()
      -- Each conn: the first request is answered, keep-alive; at the
      -- second the server closes without a word (its idle timeout struck).
      local port, stop, st = fake(function(c, r, n, st)
        if not read_req(r, st) then return end
        c:write("HTTP/1.1 200 OK\r\nContent-Length: " .. #tostring(n)
                .. "\r\n\r\n" .. n)
        read_req(r, st)
      end)
      local url = "http://127.0.0.1:" .. port .. "/"
      local status, body = http.get(url)
      assert.are.equal(200, status)
      assert.are.equal("1", body)
      status, body = http.get(url)                   -- conn 1 fails: conn 2
      assert.are.equal(200, status)
      assert.are.equal("2", body)
      assert.are.equal(2, st.conns)
      local res, err, name = http.request{ url = url, method = "POST",
                                           body = "once" }
      assert.is_nil(res)
      assert.are.equal("ECONNRESET", name)
      assert.matches("closed before any response", err)
      assert.are.equal(2, st.conns)                  -- not sent again
      assert.are.equal(4, #st.heads)
      stop()
    end)

    it("returns a conn only when its body was read to its end", function()
      local port, stop = server(function() return { body = ("z"):rep(1000) } end)
      local url = "http://127.0.0.1:" .. port .. "/"
      local res = assert(http.request{ url = url })
      assert.are.equal(0, pool.count(key(port)))     -- not yet
      assert.are.equal(100, #res.body:read(100))
      res:close()                                    -- given up on
      assert.are.equal(0, pool.count(key(port)))
      assert.are.same({ nil, "ECANCELED: response closed", "ECANCELED" },
                      { res.body:read() })
      do
        local r2 <close> = assert(http.request{ url = url })
        assert(r2.body:read(10))
      end                                            -- <close>: dropped
      assert.are.equal(0, pool.count(key(port)))
      res = assert(http.request{ url = url })
      assert.are.equal(1000, #res.body:readall())
      assert.are.equal(1, pool.count(key(port)))
      res:close()                                    -- read: no effect
      assert.are.equal(1, pool.count(key(port)))
      stop()
    end)

    it("reaches a server on an IPv6 literal", function()
      local l = so.listen("::1", 0)
      if not l then
        print("(no IPv6 loopback here: skipped)")
        return
      end
      l:close()
      local seen
      local port, stop = server(function(req)
        seen = req.headers.host
        return "v6"
      end, { host = "::1" })
      local status, body = http.get("http://[::1]:" .. port .. "/")
      assert.are.equal(200, status)
      assert.are.equal("v6", body)
      assert.are.equal("[::1]:" .. port, seen)
      assert.are.equal(1, pool.count("http://[::1]:" .. port))
      stop()
    end)

    it("refuses bad URLs, headers and arguments", function()
      for _, url in ipairs { "ftp://h/", "http://", "http:///x", "h:80/x",
                             "http://h:0/", "http://h:65536/", "http://h:x/",
                             "http://u:p@h/", "http://h/a b", "http://h/\0" } do
        local res, err, name = http.request{ url = url }
        assert.is_nil(res, url)
        assert.are.equal("EINVAL", name, url)
        assert.matches("^EINVAL: ", err)
      end
      local port, stop, st = fake_reply("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
      local url = "http://127.0.0.1:" .. port .. "/"
      for _, h in ipairs {
        { ["X-A"] = "a\r\nInjected: yes" }, { ["Bad Name"] = "x" },
        { ["X-A"] = "nul\0" }, { ["Transfer-Encoding"] = "chunked" },
        { Expect = "something" }, { ["Content-Length"] = "-1" } } do
        local res, err, name = http.request{ url = url, headers = h }
        assert.is_nil(res)
        assert.are.equal("EINVAL", name, err)
      end
      local res, _, name = http.request{ url = url, method = "BAD METHOD" }
      assert.is_nil(res)
      assert.are.equal("EINVAL", name)
      res, _, name = http.request{ url = url, method = "POST", body = "abc",
                                   headers = { ["Content-Length"] = 4 } }
      assert.is_nil(res)
      assert.are.equal("EINVAL", name)
      assert.are.equal(0, st.conns)                  -- nothing was sent
      assert.has_error(function() http.request("http://x/") end)
      assert.has_error(function() http.request{ url = 5 } end)
      assert.has_error(function() http.request{ url = url, body = 5 } end)
      assert.has_error(function() http.request{ url = url, timeout = "1" } end)
      assert.has_error(function() http.request{ url = url, headers = "x" } end)
      stop()
    end)

    it("sends a header set twice under different cases once, in the canonical case",
       function()
      local port, stop, st = fake_reply("HTTP/1.1 204 No Content\r\n\r\n")
      local res = assert(http.request{ url = "http://127.0.0.1:" .. port,
        headers = { ["x-token"] = "lower", ["X-Token"] = "canonical",
                    ["X-TOKEN"] = "upper" } })
      assert.are.equal(204, res.status)
      local head = st.heads[1] .. "\r\n"
      local n = 0
      for _ in head:lower():gmatch("\r\nx%-token:") do n = n + 1 end
      assert.are.equal(1, n, head)
      assert.truthy(head:find("\r\nX-Token: canonical\r\n", 1, true), head)
      stop()
    end)

    it("leaks no descriptor over 10,000 requests from 50 tasks", function()
      local port, stop = server(function() return "x" end,
                                { max_requests = 500 })  -- some conns close
      local url = "http://127.0.0.1:" .. port .. "/"
      local fds0 = helper.fds()
      local conns = {}
      local before = so.stats().accepts
      local tasks = {}
      local done, failed = 0, {}
      for i = 1, 50 do
        tasks[i] = so.spawn(function()
          for _ = 1, 200 do
            local status, body, _, err = http.get(url)
            if status == 200 and body == "x" then done = done + 1
            else failed[#failed + 1] = tostring(body) .. " " .. tostring(err) end
          end
        end)
      end
      for i = 1, 50 do helper.join(tasks[i], 60) end
      assert.are.same({}, failed)
      assert.are.equal(10000, done)
      local accepted = so.stats().accepts - before
      -- Reused: a conn per task, and anew after each 500th request.
      assert.is_true(accepted <= 50 + 10000 / 500 + 50, accepted)
      assert.is_true(pool.count(key(port)) <= 50)
      -- Conns not kept were closed at once, not left to the collector:
      -- the pool's, and the server's ends of them, are all that is open.
      assert.is_true(helper.wait_until(function()
        return so.stats().conns <= 2 * pool.count(key(port))
      end, 5), so.stats().conns .. " conns for " .. pool.count(key(port))
               .. " pooled")
      pool.clear()
      stop()
      assert.is_true(helper.wait_until(function()
        return helper.fds() <= fds0
      end, 5), "fds " .. fds0 .. " -> " .. helper.fds())
    end)
  end)

  describe("against nginx", function()
    local ngx, why
    setup(function()
      ngx, why = helper.nginx([[
  keepalive_requests 100;
  server {
    listen 127.0.0.1:@PORT@;
    location = / { default_type text/plain; return 200 "hello from nginx\n"; }
    location = /port { default_type text/plain; return 200 "$remote_port"; }
    location = /204 { return 204; }
    location = /304 { return 304; }
    location = /chunked {
      default_type text/plain;
      content_by_lua_block {
        for i = 1, 5 do ngx.print("piece ", i, "\n"); ngx.flush(true) end
      }
    }
    location = /big {
      default_type text/plain;
      content_by_lua_block {
        ngx.header.content_length = 1048576
        ngx.print(string.rep("x", 1048576))
      }
    }
    location = /echo {
      client_max_body_size 10m;
      client_body_buffer_size 10m;
      default_type text/plain;
      content_by_lua_block {
        ngx.req.read_body()
        ngx.header["X-Method"] = ngx.req.get_method()
        ngx.header["X-TE"] = ngx.var.http_transfer_encoding or "-"
        ngx.print(ngx.req.get_body_data() or "")
      }
    }
  }
]])
    end)
    teardown(function() if ngx then ngx:stop() end end)

    it("started", function() assert.truthy(ngx, why) end)

    it("GETs and keeps the conn alive (the same remote port)", function()
      local base = "http://127.0.0.1:" .. ngx.port
      local status, body, headers = http.get(base .. "/")
      assert.are.equal(200, status)
      assert.are.equal("hello from nginx\n", body)
      assert.matches("^nginx", headers.server)
      local _, p1 = http.get(base .. "/port")
      local _, p2 = http.get(base .. "/port")
      assert.are.equal(p1, p2)
      assert.are.equal(1, pool.count(key(ngx.port)))
    end)

    it("reads a chunked response, HEAD, 204 and 304 on one conn", function()
      local base = "http://127.0.0.1:" .. ngx.port
      local _, p1 = http.get(base .. "/port")
      local res = assert(http.request{ url = base .. "/chunked" })
      assert.is_true(res.body.chunked)
      assert.are.equal("piece 1\npiece 2\npiece 3\npiece 4\npiece 5\n",
                       res.body:readall())
      res = assert(http.request{ url = base .. "/big", method = "HEAD" })
      assert.are.equal("1048576", res.headers["content-length"])
      assert.are.equal("", res.body:readall())
      for _, code in ipairs { 204, 304 } do
        res = assert(http.request{ url = base .. "/" .. code })
        assert.are.equal(code, res.status)
        assert.are.equal("", res.body:readall())
      end
      local _, p2 = http.get(base .. "/port")
      assert.are.equal(p1, p2)
    end)

    it("POSTs string, chunked and 100-continue bodies", function()
      local url = "http://127.0.0.1:" .. ngx.port .. "/echo"
      local res = assert(http.request{ url = url, method = "POST",
                                       body = "a string body" })
      assert.are.equal("a string body", res.body:readall())
      assert.are.equal("-", res.headers["x-te"])
      local parts = { "chunk one, ", "chunk two, ", ("3"):rep(100000) }
      local i = 0
      res = assert(http.request{ url = url, method = "PUT", body = function()
        i = i + 1
        return parts[i]
      end })
      assert.are.equal("PUT", res.headers["x-method"])
      assert.are.equal("chunked", res.headers["x-te"])
      assert.are.equal(table.concat(parts), res.body:readall())
      local t0 = so.now()
      res = assert(http.request{ url = url, method = "POST",
                                 headers = { Expect = "100-continue" },
                                 body = "continued" })
      assert.are.equal("continued", res.body:readall())
      assert.is_true(so.now() - t0 < 0.8)           -- nginx sent 100
    end)

    it("refuses a Content-Length over max_body before reading", function()
      local url = "http://127.0.0.1:" .. ngx.port .. "/big"
      local res, err, name = http.request{ url = url, max_body = 1000 }
      assert.is_nil(res)
      assert.are.equal("EMSGSIZE", name)
      assert.matches("1048576", err)
      assert.are.equal(0, pool.count(key(ngx.port)))
      local status, body = http.get(url)
      assert.are.equal(200, status)
      assert.are.equal(1048576, #body)
    end)

    it("serves 2,000 requests from 50 tasks over few conns (keepalive_requests 100)",
       function()
      local url = "http://127.0.0.1:" .. ngx.port .. "/port"
      local ports, ok = {}, 0
      local tasks = {}
      for i = 1, 50 do
        tasks[i] = so.spawn(function()
          for _ = 1, 40 do
            local status, body = http.get(url)
            if status == 200 then ok = ok + 1; ports[body] = true end
          end
        end)
      end
      for i = 1, 50 do helper.join(tasks[i], 30) end
      assert.are.equal(2000, ok)
      local n = 0
      for _ in pairs(ports) do n = n + 1 end
      -- 50 conns, each closed by nginx after its 100th request: about 70.
      assert.is_true(n >= 50 and n <= 120, n)
    end)
  end)

  describe("against Python's http.server", function()
    local py, why, pym, dir
    local SCRIPT = [==[
import os, sys, http.server

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass

    def send_body(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self): self.do_GET()

    def do_GET(self):
        if self.path == "/cl":
            self.send_body(b"content-length body\n")
        elif self.path == "/port":
            self.send_body(str(self.client_address[1]).encode())
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Sum")
            self.end_headers()
            for i, piece in enumerate([b"one ", b"two ", b"three\n"]):
                ext = [b"", b";name=value", b' ; q="a \\" b"'][i]
                self.wfile.write(b"%x%s\r\n%s\r\n" % (len(piece), ext, piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\nX-Sum: 3\r\n\r\n")
        elif self.path == "/close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the close\n" * 1000)
            self.close_connection = True
        else:
            self.send_error(404)

    def do_POST(self):
        te = self.headers.get("Transfer-Encoding")
        if te == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    break
                data += self.rfile.read(size)
                self.rfile.read(2)
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Expect", self.headers.get("Expect", ""))
        self.send_header("X-TE", te or "")
        self.end_headers()
        self.wfile.write(data)

srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print("pid", os.getpid())
print("port", srv.server_address[1])
srv.serve_forever()
]==]
    -- python3 -m http.server, run as its module's main (to learn its pid).
    local MODULE = [==[
import os, sys, runpy
print("pid", os.getpid())
sys.argv = ["http.server", "0", "--bind", "127.0.0.1", "--directory", sys.argv[1]]
runpy.run_module("http.server", run_name="__main__")
]==]
    local FILE = string.rep("a static file served by python3 -m http.server\n", 2000)
    setup(function()
      py, why = helper.python_server(SCRIPT)
      dir = os.tmpname()
      os.remove(dir)
      require("lfs").mkdir(dir)
      local f = assert(io.open(dir .. "/file.txt", "w"))
      f:write(FILE)
      f:close()
      pym = helper.python_server(MODULE, dir)
    end)
    teardown(function()
      if py then py:stop() end
      if pym then pym:stop() end
      os.execute("rm -rf " .. helper.shq(dir))
    end)

    it("started", function()
      assert.truthy(py, why)
      assert.truthy(pym, "python3 -m http.server did not start")
    end)

    it("reads Content-Length, chunked (extensions, trailers) and close-delimited bodies",
       function()
      local base = "http://127.0.0.1:" .. py.port
      local status, body = http.get(base .. "/cl")
      assert.are.equal(200, status)
      assert.are.equal("content-length body\n", body)
      assert.are.equal(1, pool.count(key(py.port)))
      local res = assert(http.request{ url = base .. "/chunked" })
      assert.is_true(res.body.chunked)
      assert.are.equal("one two three\n", res.body:readall())
      assert.are.equal(1, pool.count(key(py.port)))
      res = assert(http.request{ url = base .. "/close" })
      assert.is_nil(res.body.length)
      assert.are.equal(string.rep("until the close\n", 1000), res.body:readall())
      assert.are.equal(0, pool.count(key(py.port)))  -- that one closed
      res = assert(http.request{ url = base .. "/cl", method = "HEAD" })
      assert.are.equal("20", res.headers["content-length"])
      assert.are.equal("", res.body:readall())
      status = http.get(base .. "/nothing")
      assert.are.equal(404, status)
    end)

    it("keeps HTTP/1.1 conns alive (the same client port)", function()
      local base = "http://127.0.0.1:" .. py.port
      local _, p1 = http.get(base .. "/port")
      local _, p2 = http.get(base .. "/port")
      local _, p3 = http.get(base .. "/port")
      assert.are.equal(p1, p2)
      assert.are.equal(p2, p3)
    end)

    it("POSTs with Expect: 100-continue and chunked", function()
      local url = "http://127.0.0.1:" .. py.port .. "/echo"
      local t0 = so.now()
      local res = assert(http.request{ url = url, method = "POST",
                                       headers = { Expect = "100-continue" },
                                       body = "expected body" })
      assert.are.equal("expected body", res.body:readall())
      assert.are.equal("100-continue", res.headers["x-expect"])
      assert.is_true(so.now() - t0 < 0.8)           -- it sent 100 Continue
      local n = 0
      res = assert(http.request{ url = url, method = "POST", body = function()
        n = n + 1
        if n <= 3 then return ("%d;"):format(n) end
      end })
      assert.are.equal("chunked", res.headers["x-te"])
      assert.are.equal("1;2;3;", res.body:readall())
    end)

    it("reads a file from python3 -m http.server (HTTP/1.0: closed after)",
       function()
      local url = "http://127.0.0.1:" .. pym.port .. "/file.txt"
      local res = assert(http.request{ url = url })
      assert.are.equal(200, res.status)
      assert.are.equal("1.0", res.version)
      assert.are.equal(#FILE, res.body.length)
      assert.are.equal(FILE, res.body:readall())
      assert.are.equal(0, pool.count(key(pym.port)))
      local status, body = http.get(url)
      assert.are.equal(200, status)
      assert.are.equal(FILE, body)
    end)
  end)

  describe("over HTTPS", function()
    local C, proc
    setup(function()
      C = helper.tls_certs()
      proc = helper.start_with("", "scripts/https_hello.lua "
                               .. helper.shq(C.server.cert) .. " "
                               .. helper.shq(C.server.key))
    end)
    teardown(function()
      if proc then proc:stop() end
      C:remove()
    end)

    it("GETs and POSTs to scripts/https_hello.lua with the test CA, one conn",
       function()
      local ctx = assert(tls.client{ ca = C.ca })
      local base = "https://localhost:" .. proc.port
      local res = assert(http.request{ url = base .. "/", tls = ctx })
      assert.are.equal(200, res.status)
      assert.are.equal("hello world\n", res.body:readall())
      -- Keyed by scheme://host:port and the context.
      assert.are.equal(0, pool.count("https://localhost:" .. proc.port))
      assert.are.equal(1, pool.count())
      res = assert(http.request{ url = base .. "/echo", method = "POST",
                                 body = ("tls"):rep(10000), tls = ctx })
      assert.are.equal(("tls"):rep(10000), res.body:readall())
      res = assert(http.request{ url = base .. "/stream", tls = ctx })
      assert.are.equal("piece 1\npiece 2\npiece 3\npiece 4\npiece 5\n",
                       res.body:readall())
      assert.are.equal(1, pool.count())              -- one conn throughout
    end)

    it("verifies against the system CAs by default", function()
      local res, err, name = http.request{
        url = "https://localhost:" .. proc.port .. "/" }
      assert.is_nil(res)
      assert.are.equal("ETLS", name)
      assert.matches("certificate verify failed", err)
      assert.are.equal(0, pool.count())
    end)

    it("reuses a TLS conn (the server sees one peer port)", function()
      local sctx = assert(tls.server{ cert = C.server.cert, key = C.server.key })
      local port, stop = server(port_handler, { tls = sctx })
      local ctx = assert(tls.client{ ca = C.ca })
      local url = "https://127.0.0.1:" .. port .. "/"
      local seen = {}
      for _ = 1, 4 do
        local res = assert(http.request{ url = url, tls = ctx })
        seen[res.body:readall()] = true
      end
      local n = 0
      for _ in pairs(seen) do n = n + 1 end
      assert.are.equal(1, n)
      pool.clear()
      stop()
    end)
  end)

  describe("with a misbehaving server", function()
    -- One request to a server that answers `reply` and closes.
    local function check_fail(reply, want_name, want_msg, opts)
      local port, stop, st = fake(function(c, r, n, st)
        read_req(r, st)
        c:write(reply)
      end)
      local o = { url = "http://127.0.0.1:" .. port .. "/", timeout = 1 }
      for k, v in pairs(opts or {}) do o[k] = v end
      -- With the collector stopped: a conn left open is seen.
      collectgarbage("stop")
      local _ <close> = setmetatable({}, { __close = function()
        collectgarbage("restart")
      end })
      local conns0 = so.stats().conns
      local ok, res, err, name = pcall(http.request, o)
      assert.is_true(ok, res)                        -- never raises
      if res then                                    -- the body fails
        local conn = res.body.conn
        ok, res, err, name = pcall(res.body.readall, res.body)
        assert.is_true(ok, res)
        -- Its conn is closed at once, not left to the collector.
        if conn then assert.is_false(pcall(so.readable, conn)) end
      end
      assert.is_nil(res, ("%q"):format(reply))
      assert.are.equal(want_name, name, ("%q: %s"):format(reply, tostring(err)))
      if want_msg then assert.matches(want_msg, err) end
      assert.are.equal(0, pool.count(key(port)), ("%q"):format(reply))
      assert.is_true(helper.wait_until(function()
        return so.stats().conns <= conns0
      end, 2), ("%q: a conn left open"):format(reply))
      stop()
      return st
    end

    it("gives a clear nil, msg, name for bad heads", function()
      local cases = {
        { "", "ECONNRESET", "closed before any response" },
        { "HTTP/1.1 200 OK\r\nContent-Len", "EPROTO", "inside the response head" },
        { "HTTP/1.1 2000 OK\r\n\r\n", "EPROTO", "bad status line" },
        { "HTTP/1.1 99 Odd\r\n\r\n", "EPROTO", "bad status line" },
        { "HTTP/2 200 OK\r\n\r\n", "EPROTO", "bad status line" },
        { "ICY 200 OK\r\n\r\n", "EPROTO", "bad status line" },
        { "HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", "EPROTO" },
        { "HTTP/1.1 200 O\1K\r\nContent-Length: 0\r\n\r\n", "EPROTO" },
        { "HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n", "EPROTO", "bad header" },
        { "HTTP/1.1 200 OK\r\nX: a\0b\r\nContent-Length: 0\r\n\r\n", "EPROTO", "bad header" },
        { "HTTP/1.1 200 OK\r\nX : a\r\nContent-Length: 0\r\n\r\n", "EPROTO", "bad header" },
        { "HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n", "EPROTO", "bad header" },
        { "HTTP/1.1 200 OK\r\n" .. ("X: y\r\n"):rep(101) .. "\r\n", "EMSGSIZE", "max_headers" },
        { "HTTP/1.1 200 OK\r\nX: " .. ("y"):rep(9000) .. "\r\n\r\n", "EMSGSIZE", "max_head" },
        { "HTTP/1.1 101 Switching Protocols\r\n\r\n", "EPROTO", "101" },
        { ("HTTP/1.1 103 Early Hints\r\n\r\n"):rep(20), "EPROTO", "1xx" },
      }
      for _, c in ipairs(cases) do check_fail(c[1], c[2], c[3]) end
    end)

    it("gives a clear nil, msg, name for bad framing and bodies", function()
      local H = "HTTP/1.1 200 OK\r\n"
      local cases = {
        { H .. "Content-Length: 10\r\n\r\nabc", "EPROTO", "inside the body" },
        { H .. "Content-Length: -5\r\n\r\nabc", "EPROTO", "Content%-Length" },
        { H .. "Content-Length: 5x\r\n\r\nabc", "EPROTO", "Content%-Length" },
        { H .. "Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef", "EPROTO" },
        { H .. "Content-Length: 99999999999999999999999\r\n\r\n", "EMSGSIZE" },
        { H .. "Content-Length: 20000000\r\n\r\n", "EMSGSIZE" },       -- > 16 MiB
        { H .. "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
          "EPROTO", "both" },
        { H .. "Transfer-Encoding: gzip, chunked\r\n\r\n", "EPROTO", "Transfer%-Encoding" },
        { H .. "Transfer-Encoding: chunked\r\n\r\n5\r\nab", "EPROTO", "inside the body" },
        { H .. "Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", "EPROTO", "chunk" },
        { H .. "Transfer-Encoding: chunked\r\n\r\n2 \r\nab\r\n0\r\n\r\n", "EPROTO", "chunk" },
        { H .. "Transfer-Encoding: chunked\r\n\r\n2;a\nb\r\nab\r\n0\r\n\r\n", "EPROTO", "chunk" },
        { H .. "Transfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\n", "EPROTO", "chunk end" },
        { H .. "Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX: a\1b\r\n\r\n", "EPROTO", "trailer" },
        { H .. "Transfer-Encoding: chunked\r\n\r\n"
          .. ("400\r\n" .. ("x"):rep(1024) .. "\r\n"):rep(2) .. "0\r\n\r\n",
          "EMSGSIZE", "too large", { max_body = 1500 } },
        { H .. "\r\n" .. ("x"):rep(3000), "EMSGSIZE", "too large",
          { max_body = 1500 } },                      -- close-delimited
      }
      for _, c in ipairs(cases) do check_fail(c[1], c[2], c[3], c[4]) end
    end)

    it("times out a server that stalls, before the head or inside the body",
       function()
      for _, reply in ipairs { "", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
                              "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" } do
        local port, stop = fake(function(c, r, n, st)
          read_req(r, st)
          c:write(reply)
          r:read("a")                                -- until the client goes
        end)
        local t0 = so.now()
        local res, e, nm = http.request{ url = "http://127.0.0.1:" .. port .. "/",
                                         timeout = 0.2 }
        if res then res, e, nm = res.body:readall() end
        assert.is_nil(res)
        assert.are.equal("ETIMEDOUT", nm, e)
        assert.is_true(so.now() - t0 < 1)
        assert.are.equal(0, pool.count(key(port)))
        stop()
      end
    end)

    it("closes instead of pooling a conn with bytes after the body, Connection: close or HTTP/1.0",
       function()
      for _, reply in ipairs {
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\n" } do
        local port, stop = fake_reply(reply)
        local res = assert(http.request{ url = "http://127.0.0.1:" .. port .. "/" })
        local conn = res.body.conn
        assert.are.equal(res.status == 204 and "" or "ok", res.body:readall())
        assert.are.equal(0, pool.count(key(port)), reply)
        -- Closed at once, not left to the collector.
        if conn then assert.is_false(pcall(so.readable, conn), reply) end
        stop()
      end
      -- HTTP/1.0 with keep-alive is kept.
      local port, stop = fake_reply("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n"
                                    .. "Connection: keep-alive\r\n\r\nok")
      local status, body = http.get("http://127.0.0.1:" .. port .. "/")
      assert.are.equal("ok", body, status)
      assert.are.equal(1, pool.count(key(port)))
      pool.clear()
      stop()
    end)

    it("skips 1xx interim responses", function()
      local port, stop = fake_reply("HTTP/1.1 100 Continue\r\n\r\n"
        .. "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        .. "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
      local status, body = http.get("http://127.0.0.1:" .. port .. "/")
      assert.are.equal(200, status)
      assert.are.equal("final", body)
      assert.are.equal(1, pool.count(key(port)))
      pool.clear()
      stop()
    end)
  end)
end)
