--[[
** so.http.memo: memo(max, fn) -> a table t in which t[k] is fn(k),
** computed at the first look and kept; when max keys are kept, the next
** new one empties the table first (a bound on memory when keys come from
** outside). A hit is a plain table index, no call. fn must not return nil.
]]

local next, rawset, setmetatable = next, rawset, setmetatable

return function(max, fn)
  local n = 0
  return setmetatable({}, { __index = function(t, k)
    local v = fn(k)
    if n >= max then
      for key in next, t do t[key] = nil end
      n = 0
    end
    rawset(t, k, v)
    n = n + 1
    return v
  end })
end
