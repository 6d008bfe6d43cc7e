--[[
** so.http.gzip: response compression for so.http, as nginx's gzip module
** does it: a response is compressed when the client accepts gzip, its type
** is compressible (text, JSON, JavaScript, CSS, SVG, XML), its body is at
** least gzip_min bytes (a streamed body of unknown length counts as
** large), it is a 200 and not a range, and nothing encoded it already. It
** then goes out compressed at once (a string body) or chunked, streamed
** through so.zlib (each piece flushed, so a stream's pieces still leave as
** they come; a file is never read whole), with Vary: Accept-Encoding
** and its ETag marked "-gzip" (two codings never share one validator).
]]

local zlib = require "so.zlib"
local spans = require "so.http.span"
local memo = require "so.http.memo"

local find, lower, sub, match, gmatch = string.find, string.lower,
  string.sub, string.match, string.gmatch
local type, tonumber, next = type, tonumber, next

local M = {}

-- Content types worth compressing (the part before any ";").
local function classify(ctype)
  local t = lower(match(ctype, "^%s*([^;%s]+)") or "")
  return sub(t, 1, 5) == "text/" or t == "application/json"
      or t == "application/javascript" or t == "application/xml"
      or t == "image/svg+xml" or sub(t, -5) == "+json" or sub(t, -4) == "+xml"
end

-- classify, remembered: a server sends few types (bounded all the same).
local verdicts = memo(256, classify)
local function compressible(ctype)
  return type(ctype) == "string" and verdicts[ctype]
end

-- Whether an Accept-Encoding value accepts gzip (a q of 0 refuses it).
local function accepts_gzip(ae)
  if not ae then return false end
  for item in gmatch(lower(ae), "[^,]+") do
    local coding, params = match(item, "^%s*([^;%s]+)%s*(.*)$")
    if coding == "gzip" or coding == "x-gzip" or coding == "*" then
      local q = match(params, "q%s*=%s*([%d.]+)")
      return not q or tonumber(q) ~= 0
    end
  end
  return false
end

-- The canonical spelling of the names looked up here.
local CANONICAL = { ["content-type"] = "Content-Type", ["etag"] = "ETag",
                    ["vary"] = "Vary", ["content-length"] = "Content-Length",
                    ["content-encoding"] = "Content-Encoding",
                    ["content-range"] = "Content-Range" }

-- The header of `headers` named `lname` (any case): key, value. The
-- canonical spelling first, the one handlers use: no scan.
local function header(headers, lname)
  local ck = CANONICAL[lname]
  local cv = ck and headers[ck]
  if cv ~= nil then return ck, cv end
  for k, v in next, headers do
    if type(k) == "string" and lower(k) == lname then return k, v end
  end
end

--[[
** A body source compressing `src` (a function returning pieces, or file
** spans, which are read here: it is called with true, as so.http calls
** a source).
]]
local function gzip_source(src)
  local z = zlib.deflate()
  local done, chunks = false, nil  -- chunks: of the span being read
  return function()
    while not done do
      local piece, err, name
      if chunks then
        piece, err, name = chunks()
        if piece == nil and err == nil then chunks = nil end
      else
        piece, err, name = src(true)
        if type(piece) == "table" then
          local bad = spans.bad(piece)
          if bad then return nil, bad end
          chunks, piece = spans.chunks(piece), nil
        elseif piece == nil and err == nil or piece == "" then
          done = true
          return z:finish()
        end
      end
      if piece == nil and err ~= nil then return nil, err, name end
      if piece then
        local out = z:flush(piece)
        if out ~= "" then return out end
      end
    end
    return nil
  end
end

--[[
** The response to send for (req, status, headers, body) under options o:
** the same headers and body, or compressed ones. headers is copied, never
** changed, when it changes. `source_of` turns a body (function or reader)
** into a function. A HEAD gets the headers its GET would get: a string
** body is compressed for its length, a source is wrapped, never called.
]]
function M.apply(req, status, headers, body, o, source_of)
  local min = o.gzip_min
  if not min or status ~= 200 then return headers, body end
  headers = headers or {}
  local _, ctype = header(headers, "content-type")
  if not compressible(ctype) then return headers, body end
  local rh = req.headers
  -- Vary for every compressible response, compressed or not (caches).
  local out = {}
  for k, v in next, headers do out[k] = v end
  local vk, vary = header(out, "vary")
  if not vary then out["Vary"] = "Accept-Encoding"
  elseif not find(lower(vary), "accept-encoding", 1, true) then
    out[vk] = vary .. ", Accept-Encoding"
  end
  if not accepts_gzip(rh["accept-encoding"]) or header(out, "content-encoding")
     or header(out, "content-range") or body == nil then
    return out, body
  end
  local clk, cl = header(out, "content-length")
  local size = type(body) == "string" and #body or tonumber(cl)
  if size and size < min then return out, body end
  if clk then out[clk] = nil end
  out["Content-Encoding"] = "gzip"
  local ek, etag = header(out, "etag")
  if etag and sub(etag, -1) == '"' then
    out[ek] = sub(etag, 1, -2) .. '-gzip"'
  end
  if type(body) == "string" then  -- whole: it keeps a Content-Length
    return out, zlib.deflate():finish(body)
  end
  return out, gzip_source(source_of(body))
end

M.compressible = compressible
M.accepts_gzip = accepts_gzip

return M
