--[[
** so.http.span: the file spans a body source may give ({file =, offset =,
** length =}, see docs/http.md), checked, and read a chunk at a time where
** sendfile cannot take them (a TLS conn, the gzip coding).
]]

local fs = require "so.fs"

local type, tointeger = type, math.tointeger
local fs_type = fs.type

local M = {}

local CHUNK = 64 * 1024  -- bytes read at a time

-- Why span is not a span a body source may give, or nil.
function M.bad(span)
  local off, len = span.offset, span.length
  off = type(off) == "number" and tointeger(off)
  len = type(len) == "number" and tointeger(len)
  if not off or not len or off < 0 or len < 0 then
    return "body source gave a table that is not a file span"
  end
  local ft = fs_type(span.file)
  if ft ~= "file" then
    return "body source gave a span of " .. (ft or "no file")
  end
end

--[[
** The bytes of a (good) span, a chunk a call: the next string, nil at
** the end, or nil, err, name (a file shorter than the span).
]]
function M.chunks(span)
  local file = span.file
  local pos, left = tointeger(span.offset), tointeger(span.length)
  return function()
    if left <= 0 then return nil end
    local data, err, name = file:read(left < CHUNK and left or CHUNK, pos)
    if not data or data == "" then
      return nil, err or "file shorter than the span", name
    end
    pos, left = pos + #data, left - #data
    return data
  end
end

return M
