-- The fault soak for 30 s (bench/soak, whose full run is 600 s): six
-- servers under normal traffic and faults; none may fail, die, leak a
-- descriptor or grow by more than 5 MiB.
local helper = require "helper"

describe("the fault soak", function()
  it("serves every client of six servers through 30 s of faults", function()
    -- Under AddressSanitizer (CI's second run) memory is the sanitizer's
    -- to keep: a wider bound there; the plain run checks 5 MiB.
    local rss = os.getenv("ASAN_OPTIONS") and 24 or 5
    local code, out, err = helper.run(string.format(
      "SOAK_RSS_MIB=%d LUAHOST=%s timeout -k 5 240 bench/soak 30", rss,
      helper.luahost))
    assert.equal(0, code, out .. err)
    assert.matches("\nfailures: 0\n$", out)
    for _, kind in ipairs { "flood", "half%-close", "handler raised",
                            "malformed", "reset", "slow reader", "slowloris" } do
      assert.matches("\nfault " .. kind .. ": [1-9]%d*\n", out)
    end
    local conns = tonumber(out:match("connections: (%d+)"))
    assert.is_true(conns > 500, conns)
  end)
end)
