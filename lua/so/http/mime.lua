--[[
** so.http.mime: Content-Type by file extension (lower case, without the
** dot), for http.static; opts.types there adds to or overrides it. The
** common types of nginx's mime.types, with a charset for text.
]]

return {
  html = "text/html; charset=utf-8", htm = "text/html; charset=utf-8",
  css = "text/css; charset=utf-8", js = "text/javascript; charset=utf-8",
  mjs = "text/javascript; charset=utf-8",
  json = "application/json", map = "application/json",
  txt = "text/plain; charset=utf-8", md = "text/markdown; charset=utf-8",
  csv = "text/csv; charset=utf-8", xml = "application/xml",
  svg = "image/svg+xml", ico = "image/x-icon", png = "image/png",
  jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif",
  webp = "image/webp", avif = "image/avif", bmp = "image/bmp",
  woff = "font/woff", woff2 = "font/woff2", ttf = "font/ttf", otf = "font/otf",
  pdf = "application/pdf", zip = "application/zip",
  gz = "application/gzip", tar = "application/x-tar",
  wasm = "application/wasm", mp3 = "audio/mpeg", ogg = "audio/ogg",
  wav = "audio/wav", mp4 = "video/mp4", webm = "video/webm",
  lua = "text/plain; charset=utf-8",
  default = "application/octet-stream",
}
