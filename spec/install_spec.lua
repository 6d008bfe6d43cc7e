-- Installing like a package: cmake --install into any prefix (and moving
-- it), and the Debian package cpack builds; the installed host finds only
-- its own modules and Lua's.
local helper = require "helper"

local exe = helper.luahost
if exe:sub(1, 1) ~= "/" then exe = os.getenv("PWD") .. "/" .. exe end
local build = exe:match("^(.*)/[^/]+$")        -- the build directory
local source = os.getenv("PWD")                 -- specs run from the source

local function sh(cmd)
  local code, out, err = helper.run(cmd)
  assert(code == 0, cmd .. ": " .. err .. out)
  return out
end

local PROBE = [[
print(package.searchpath("so.reader", package.path))
print(package.path)
]]

describe("an installed luahost", function()
  it("finds its modules relative to itself, moved anywhere, and no source tree",
     function()
    local tmp = sh("mktemp -d"):gsub("\n$", "")
    finally(function() sh("rm -rf " .. tmp) end)
    sh(string.format("cmake --install %s --prefix %s/a", build, tmp))
    sh(string.format("mv %s/a %s/b", tmp, tmp))
    local probe = helper.write_script(PROBE)
    local out = sh(string.format("cd / && %s/b/bin/luahost %s", tmp, probe))
    os.remove(probe)
    local found, path = out:match("^([^\n]*)\n([^\n]*)\n$")
    assert.equal(tmp .. "/b/share/luahost/lua/so/reader.lua", found)
    assert.is_nil(path:find(source, 1, true), path)
    assert.is_nil(path:find("/a/share", 1, true), path)
    -- its scripts and docs are there too
    sh(string.format("test -f %s/b/share/luahost/scripts/echo.lua", tmp))
    sh(string.format("test -f %s/b/share/doc/luahost/api.md", tmp))
  end)

  it("comes as a Debian package that depends on Debian's Lua, libuv, OpenSSL "
     .. "and CA store, and runs scripts/echo.lua", function()
    local tmp = sh("mktemp -d"):gsub("\n$", "")
    finally(function() sh("rm -rf " .. tmp) end)
    sh(string.format("cpack --config %s/CPackConfig.cmake -G DEB -B %s",
                     build, tmp))
    local deb = sh(string.format("ls %s/luahost_*.deb", tmp)):gsub("\n$", "")
    assert.equal("luahost\nliblua5.4-0, libuv1, libssl3, zlib1g, ca-certificates\n",
                 sh("dpkg-deb -f " .. deb .. " Package Depends"):gsub("%a+: ", ""))
    local files = sh("dpkg-deb -c " .. deb)
    for _, f in ipairs { "./usr/bin/luahost", "./usr/share/luahost/lua/so/http.lua",
                         "./usr/share/luahost/scripts/echo.lua",
                         "./usr/share/doc/luahost/api.md" } do
      assert.truthy(files:find(f, 1, true), f)
    end
    -- unpacked (not installed: the spec leaves the system alone), it runs
    sh(string.format("dpkg-deb -x %s %s/root", deb, tmp))
    local saved = helper.luahost
    helper.luahost = tmp .. "/root/usr/bin/luahost"
    local ok, proc = pcall(helper.start_with, "cd / &&",
                           tmp .. "/root/usr/share/luahost/scripts/echo.lua")
    helper.luahost = saved
    assert(ok, proc)
    assert.equal("127.0.0.1", proc.host)
    proc:stop("KILL")
  end)
end)
