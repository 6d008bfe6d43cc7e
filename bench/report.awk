# report.awk: turns the raw "kv ..." lines of one bench/run into Markdown.
# Plain POSIX awk (Debian's default is mawk): no asort, no gensub.
#
# awk -f report.awk -v kind=echo|http|tls|clients|web -v title=... -v when=... -v machine=...
#     -v runs=... -v png=FILE -v chart=FILE -v levels=1,10,... SERVERS RAW
#
# SERVERS: one line per server, tab-separated: id, label, status
# (ok | missing | skipped), note.  RAW: lines "kv server=ID rep=N mode=...
# key=value ... ok=0|1" as bench/run collects them from loadgen or wrk
# (kind=clients: "server" is the client measured).
# Writes the report on stdout and, for kind=echo, the chart's data to
# `chart` (a tab-separated table: connections, then one column per server).

BEGIN {
  FS = "\t"; nserv = 0
  # Sections appear only for the modes this run measured.
  n = split(modes == "" ? "pingpong,bulk,idle,flood,scale" : modes, ml, ",")
  for (i = 1; i <= n; i++) want[ml[i]] = 1
}

FILENAME == ARGV[1] {
  nserv++
  sid[nserv] = $1; label[$1] = $2; status[$1] = $3; note[$1] = $4
  next
}

{
  # A raw line: split on blanks, not tabs.
  n = split($0, f, " ")
  delete rec
  for (i = 2; i <= n; i++) {
    eq = index(f[i], "=")
    if (eq > 0) rec[substr(f[i], 1, eq - 1)] = substr(f[i], eq + 1)
  }
  s = rec["server"]; m = rec["mode"]
  if (m == "scale") m = "scale:" rec["conns"]
  if (rec["ok"] != "1") { failed[s, m]++; next }
  good[s, m]++
  for (k in rec) {
    if (k == "server" || k == "rep" || k == "mode" || k == "ok") continue
    if (k == "proto" || k == "cipher" || k == "group") continue
    vals[s, m, k] = vals[s, m, k] " " rec[k]
  }
  # tls: what the handshakes negotiated, the same for every run.
  if ("cipher" in rec) negotiated[s] = rec["proto"] " " rec["cipher"] " " rec["group"]
}

function sorted(list, a,    n, i, j, t) {
  n = split(list, a, " ")
  for (i = 2; i <= n; i++) {
    t = a[i] + 0
    for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]
    a[j + 1] = t
  }
  return n
}

function med(s, m, k,    a, n) {
  n = sorted(vals[s, m, k], a)
  if (n == 0) return ""
  if (n % 2) return a[(n + 1) / 2] + 0
  return (a[n / 2] + a[n / 2 + 1]) / 2
}

function lo(s, m, k,    a, n) { n = sorted(vals[s, m, k], a); return n ? a[1] + 0 : "" }
function hi(s, m, k,    a, n) { n = sorted(vals[s, m, k], a); return n ? a[n] + 0 : "" }

# A median, with its min-max spread when there was more than one run.
function cell(s, m, k, fmt, scale,    v, a, n) {
  if (scale == "") scale = 1
  v = med(s, m, k)
  if (v == "") return nodata(s, m)
  n = sorted(vals[s, m, k], a)
  if (n < 2) return sprintf(fmt, v / scale)
  return sprintf(fmt " (" fmt "–" fmt ")", v / scale, a[1] / scale, a[n] / scale)
}

function plain(s, m, k, fmt, scale,    v) {
  if (scale == "") scale = 1
  v = med(s, m, k)
  if (v == "") return nodata(s, m)
  return sprintf(fmt, v / scale)
}

function nodata(s, m) {
  if (status[s] != "ok") return status[s]
  if (failed[s, m]) return "failed"
  return "—"
}

function ratio(s, m, k, base,    a, b) {
  a = med(s, m, k); b = med(base, m, k)
  if (a == "" || b == "" || b == 0) return "—"
  return sprintf("%.2f×", a / b)
}

function failnote(s, m) {
  if (failed[s, m] && good[s, m]) return " (" failed[s, m] " failed)"
  return ""
}

function row(cells) { print "| " cells " |" }

function missing_notes(    i, s, any) {
  for (i = 1; i <= nserv; i++) {
    s = sid[i]
    if (status[s] != "ok") {
      if (!any) { print ""; any = 1 }
      print "- **" label[s] "**: " status[s] ". " note[s]
    }
  }
}

function target(what, v, ok) {
  if (v == "") { row(what " | — | no data"); return }
  row(what " | " v " | " (ok ? "met" : "**not met**"))
}

function echo_report(    i, s, m, nl, lv, L, c, v, a, b) {
  print "# " title
  print ""
  print "- When: " when
  print "- Machine: " machine
  print "- Runs: " runs
  print "- Servers: each started fresh for each figure; all figures medians,"
  print "  with the min–max spread of the runs in brackets."
  missing_notes()

  if (want["pingpong"]) {
  print ""
  print "## pingpong: 100 connections, 64-byte messages, one in flight each"
  print ""
  row("server | round trips/s | × raw libuv | p50 ms | p99 ms | max ms | server CPU % | loadgen CPU %")
  row("--- | ---: | ---: | ---: | ---: | ---: | ---: | ---:")
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; m = "pingpong"
    row(label[s] failnote(s, m) " | " cell(s, m, "rps", "%.0f") " | " ratio(s, m, "rps", "uv") \
        " | " plain(s, m, "p50_ms", "%.2f") " | " plain(s, m, "p99_ms", "%.2f") \
        " | " plain(s, m, "max_ms", "%.1f") " | " plain(s, m, "srv_cpu", "%.0f") \
        " | " plain(s, m, "lg_cpu", "%.0f"))
  }
  }

  if (want["bulk"]) {
  print ""
  print "## bulk: 10 connections streaming 64 KiB writes, every byte verified"
  print ""
  row("server | MB/s echoed | × raw libuv | server CPU % | loadgen CPU %")
  row("--- | ---: | ---: | ---: | ---:")
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; m = "bulk"
    row(label[s] failnote(s, m) " | " cell(s, m, "mbps", "%.0f") " | " ratio(s, m, "mbps", "uv") \
        " | " plain(s, m, "srv_cpu", "%.0f") " | " plain(s, m, "lg_cpu", "%.0f"))
  }
  }

  if (want["idle"]) {
  print ""
  print "## idle: " (idle_conns ? idle_conns : "N") " connections held open after one echo each"
  print ""
  row("server | RSS before MiB | RSS after MiB | bytes/conn | × raw libuv")
  row("--- | ---: | ---: | ---: | ---:")
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; m = "idle"
    row(label[s] failnote(s, m) " | " plain(s, m, "rss_before_kb", "%.1f", 1024) \
        " | " plain(s, m, "rss_after_kb", "%.1f", 1024) " | " cell(s, m, "bytes_per_conn", "%.0f") \
        " | " ratio(s, m, "bytes_per_conn", "uv"))
  }
  }

  if (want["flood"]) {
  print ""
  print "## flood: one connection writes " (flood_total ? flood_total : "256 MiB") " and reads nothing until blocked"
  print ""
  row("server | accepted MiB | blocked | idle RSS MiB | peak RSS MiB | peak − idle MiB | read back s")
  row("--- | ---: | :---: | ---: | ---: | ---: | ---:")
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; m = "flood"
    b = med(s, m, "blocked")
    row(label[s] failnote(s, m) " | " cell(s, m, "accepted", "%.1f", 1048576) \
        " | " (b == "" ? nodata(s, m) : (b >= 1 ? "yes" : "no")) \
        " | " plain(s, m, "idle_rss_kb", "%.1f", 1024) " | " plain(s, m, "peak_rss_kb", "%.1f", 1024) \
        " | " cell(s, m, "peak_over_idle_kb", "%.2f", 1024) " | " plain(s, m, "readback_s", "%.2f"))
  }
  }

  nl = split(levels, L, ",")
  if (want["scale"]) {
  print ""
  print "## scale: pingpong, 64-byte messages, round trips/s by connection count"
  print ""
  c = "server"; v = "---"
  for (lv = 1; lv <= nl; lv++) { c = c " | " L[lv]; v = v " | ---:" }
  row(c " | " L[nl] " ÷ 100"); row(v " | ---:")
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; c = label[s]
    for (lv = 1; lv <= nl; lv++) c = c " | " plain(s, "scale:" L[lv], "rps", "%.0f")
    a = med(s, "scale:" L[nl], "rps"); b = med(s, "scale:100", "rps")
    row(c " | " ((a != "" && b != "" && b > 0) ? sprintf("%.2f", a / b) : "—"))
  }
  print ""
  print "Ratio to raw libuv at each connection count:"
  print ""
  c = "server"; v = "---"
  for (lv = 1; lv <= nl; lv++) { c = c " | " L[lv]; v = v " | ---:" }
  row(c); row(v)
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; c = label[s]
    for (lv = 1; lv <= nl; lv++) c = c " | " ratio(s, "scale:" L[lv], "rps", "uv")
    row(c)
  }
  print ""
  print "p99 latency (ms) at each connection count:"
  print ""
  c = "server"; v = "---"
  for (lv = 1; lv <= nl; lv++) { c = c " | " L[lv]; v = v " | ---:" }
  row(c); row(v)
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; c = label[s]
    for (lv = 1; lv <= nl; lv++) c = c " | " plain(s, "scale:" L[lv], "p99_ms", "%.2f")
    row(c)
  }
  if (png != "") {
    print ""
    print "![round trips per second against connection count](" png ")"
  }
  }

  # The chart's data: one row per level, one column per server.
  if (chart != "") {
    c = "conns"
    for (i = 1; i <= nserv; i++) if (status[sid[i]] == "ok") c = c "\t\"" label[sid[i]] "\""
    print c > chart
    for (lv = 1; lv <= nl; lv++) {
      c = L[lv]
      for (i = 1; i <= nserv; i++) {
        s = sid[i]
        if (status[s] != "ok") continue
        v = med(s, "scale:" L[lv], "rps")
        c = c "\t" (v == "" ? "?" : v)
      }
      print c > chart
    }
    close(chart)
  }

  # The issue's targets for luahost, checked on this run's medians.
  print ""
  print "## luahost targets (this run)"
  print ""
  if (status["luahost"] != "ok") {
    print "luahost was " status["luahost"] ": no target checked."
    return
  }
  row("target | measured | status"); row("--- | ---: | ---")
  if (want["pingpong"]) {
    tgt_ratio("pingpong 100 conns ≥ 0.9× raw libuv", "pingpong", "rps", "uv", 0.9)
    tgt_ratio("pingpong 100 conns ≥ 2× Node", "pingpong", "rps", "node", 2)
    tgt_ratio("pingpong 100 conns ≥ 1.5× cqueues", "pingpong", "rps", "cqueues", 1.5)
  }
  if (want["bulk"])
    tgt_ratio("bulk 10 conns ≥ 0.9× raw libuv", "bulk", "mbps", "uv", 0.9)
  if (want["idle"]) {
    v = med("luahost", "idle", "bytes_per_conn")
    target("idle ≤ 1,500 bytes/conn (" (idle_conns ? idle_conns : "?") " conns)", \
           v == "" ? "" : sprintf("%.0f", v), v != "" && v <= 1500)
  }
  if (want["flood"]) {
    v = med("luahost", "flood", "peak_over_idle_kb")
    target("flood peak RSS ≤ 2 MiB above idle", v == "" ? "" : sprintf("%.2f MiB", v / 1024), \
           v != "" && v <= 2048)
  }
  if (want["scale"]) {
    a = med("luahost", "scale:" L[nl], "rps"); b = med("luahost", "scale:100", "rps")
    target("scale " L[nl] " conns ≥ 0.8× its own 100-conn rate", \
           (a == "" || b == "") ? "" : sprintf("%.2f×", a / b), a != "" && b != "" && a / b >= 0.8)
  }
}

function tgt_ratio(what, m, k, base, want,    a, b) {
  a = med("luahost", m, k); b = med(base, m, k)
  if (a == "" || b == "" || b == 0) { row(what " | — | no data (" base ")"); return }
  target(what, sprintf("%.2f×", a / b), a / b >= want)
}

function http_report(    i, s, m) {
  print "# " title
  print ""
  print "- When: " when
  print "- Machine: " machine
  print "- Runs: " runs
  print "- Load: wrk -t1 -c100 --latency, keep-alive GET / answered by \"hello world\\n\";"
  print "  medians, with the min–max spread of the runs in brackets."
  missing_notes()
  print ""
  row("server | requests/s | × nginx+Lua | × Node | p50 ms | p99 ms | errors")
  row("--- | ---: | ---: | ---: | ---: | ---: | ---:")
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; m = "http"
    row(label[s] failnote(s, m) " | " cell(s, m, "rps", "%.0f") " | " ratio(s, m, "rps", "nginx") \
        " | " ratio(s, m, "rps", "node") " | " plain(s, m, "p50_ms", "%.2f") \
        " | " plain(s, m, "p99_ms", "%.2f") " | " plain(s, m, "errors", "%.0f"))
  }
}

# bench/run tls: handshakes, bulk and https, with ratios to nginx and Node.
function tls_report(    i, s, m, v, a, b, any) {
  print "# " title
  print ""
  print "- When: " when
  print "- Machine: " machine
  print "- Runs: " runs
  print "- TLS: 1.3 only, one self-signed ECDSA P-256 certificate for every server,"
  print "  TLS_AES_128_GCM_SHA256 and X25519 offered by the clients (tlsgen, and wrk"
  print "  through OPENSSL_CONF) and nothing else; no session is ever resumed."
  print "- Figures: medians, with the min–max spread of the runs in brackets."
  missing_notes()
  any = 0
  for (i = 1; i <= nserv; i++)
    if (sid[i] in negotiated) {
      if (!any) { print ""; any = 1 }
      print "- " label[sid[i]] " negotiated: " negotiated[sid[i]]
    }

  if (want["handshakes"]) {
  print ""
  print "## handshakes: " clients " clients, each: connect, full TLS 1.3 handshake, close"
  print ""
  print "*per server CPU-s* = handshakes per second of server CPU time (rate ÷ server CPU);"
  print "when *tlsgen CPU %* is near 100 the load generator, not the server, sets the rate."
  print ""
  row("server | handshakes/s | × nginx | × Node | per server CPU-s | × nginx | × Node | p50 ms | p99 ms | server CPU % | tlsgen CPU %")
  row("--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---:")
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; m = "handshakes"
    row(label[s] failnote(s, m) " | " cell(s, m, "hps", "%.0f") " | " ratio(s, m, "hps", "nginx") \
        " | " ratio(s, m, "hps", "node") " | " cell(s, m, "hps_per_core", "%.0f") \
        " | " ratio(s, m, "hps_per_core", "nginx") " | " ratio(s, m, "hps_per_core", "node") \
        " | " plain(s, m, "p50_ms", "%.2f") " | " plain(s, m, "p99_ms", "%.2f") \
        " | " plain(s, m, "srv_cpu", "%.0f") " | " plain(s, m, "lg_cpu", "%.0f"))
  }
  }

  if (want["bulk"]) {
  print ""
  print "## bulk: one TLS connection streaming 64 KiB writes, the echo read back and verified"
  print ""
  row("server | MB/s echoed | × nginx | × Node | MB per server CPU-s | × nginx | × Node | server CPU % | tlsgen CPU % | tickets/conn")
  row("--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---:")
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; m = "bulk"
    row(label[s] failnote(s, m) " | " cell(s, m, "mbps", "%.0f") " | " ratio(s, m, "mbps", "nginx") \
        " | " ratio(s, m, "mbps", "node") " | " cell(s, m, "mbps_per_core", "%.0f") \
        " | " ratio(s, m, "mbps_per_core", "nginx") " | " ratio(s, m, "mbps_per_core", "node") \
        " | " plain(s, m, "srv_cpu", "%.0f") \
        " | " plain(s, m, "lg_cpu", "%.0f") " | " plain(s, m, "tickets", "%.0f"))
  }
  }

  if (want["https"]) {
  print ""
  print "## https: wrk -t1 -c100 --latency, keep-alive GET / answered by \"hello world\\n\" over TLS"
  print ""
  row("server | requests/s | × nginx | × Node | per server CPU-s | × nginx | × Node | p50 ms | p99 ms | server CPU % | wrk CPU % | errors")
  row("--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---:")
  for (i = 1; i <= nserv; i++) {
    s = sid[i]; m = "https"
    row(label[s] failnote(s, m) " | " cell(s, m, "rps", "%.0f") " | " ratio(s, m, "rps", "nginx") \
        " | " ratio(s, m, "rps", "node") " | " cell(s, m, "rps_per_core", "%.0f") \
        " | " ratio(s, m, "rps_per_core", "nginx") " | " ratio(s, m, "rps_per_core", "node") \
        " | " plain(s, m, "p50_ms", "%.2f") " | " plain(s, m, "p99_ms", "%.2f") \
        " | " plain(s, m, "srv_cpu", "%.0f") " | " plain(s, m, "lg_cpu", "%.0f") \
        " | " plain(s, m, "errors", "%.0f"))
  }
  }

  print ""
  print "## luahost targets (this run)"
  print ""
  if (status["luahost"] != "ok") {
    print "luahost was " (status["luahost"] == "" ? "not run" : status["luahost"]) ": no target checked."
    return
  }
  row("target | measured | status"); row("--- | ---: | ---")
  if (want["bulk"]) {
    tgt_ratio("bulk MB/s ≥ 0.9× nginx", "bulk", "mbps", "nginx", 0.9)
    tgt_ratio("bulk MB per server CPU-s ≥ 0.9× nginx", "bulk", "mbps_per_core", "nginx", 0.9)
  }
  if (want["handshakes"]) {
    tgt_ratio("handshakes/s ≥ 0.9× nginx", "handshakes", "hps", "nginx", 0.9)
    tgt_ratio("handshakes/s ≥ 1.5× Node", "handshakes", "hps", "node", 1.5)
    tgt_ratio("handshakes per server CPU-s ≥ 0.9× nginx", "handshakes", "hps_per_core", "nginx", 0.9)
    tgt_ratio("handshakes per server CPU-s ≥ 1.5× Node", "handshakes", "hps_per_core", "node", 1.5)
  }
  if (want["https"]) {
    tgt_ratio("HTTPS hello requests/s ≥ 0.8× nginx + Lua", "https", "rps", "nginx", 0.8)
    tgt_ratio("HTTPS hello requests per server CPU-s ≥ 0.8× nginx + Lua", "https", "rps_per_core", "nginx", 0.8)
  }
}

# bench/run clients: the client is what is measured.  For each figure (a
# mode), the luahost client, the Node one and the C ceiling.
function cl_ids(m) {
  if (m == "http") { CL_L = "luahost-http"; CL_N = "node-fetch"; CL_C = "wrk" }
  else { CL_L = "luahost-redis"; CL_N = "ioredis"; CL_C = "redis-benchmark" }
}

function cl_title(m) {
  if (m == "http") return "HTTP keep-alive GET /, requests/s"
  if (m == "get") return "Redis GET, ops/s"
  if (m == "set") return "Redis SET, ops/s"
  if (m == "get-pipelined") return "Redis GET pipelined ×" depth ", ops/s"
  if (m == "set-pipelined") return "Redis SET pipelined ×" depth ", ops/s"
  return m
}

function clients_report(    n, ml, i, j, m, s, ids, what) {
  print "# " title
  print ""
  print "- When: " when
  print "- Machine: " machine
  print "- Runs: " runs
  print "- Load: " conc " concurrent tasks (luahost), requests or connections (Node,"
  print "  wrk -c" conc ", redis-benchmark -c " conc "), each with one request in flight, or"
  print "  one pipeline of " depth " commands; every server started fresh for every figure."
  print "- Figures: medians, with the min–max spread of the runs in brackets."
  print "  *client CPU %*: the client's CPU over the measured window, in percent of"
  print "  one core (it has one); *per client CPU-s*: the rate divided by it;"
  print "  *server CPU %*: nginx's worker or redis-server over the same window."
  missing_notes()
  n = split(modes, ml, ",")

  print ""
  print "## Summary"
  print ""
  row("figure | luahost | Node.js | C ceiling | luahost ÷ Node | luahost ÷ ceiling")
  row("--- | ---: | ---: | ---: | ---: | ---:")
  for (i = 1; i <= n; i++) {
    m = ml[i]; cl_ids(m)
    row(cl_title(m) " | " plain(CL_L, m, "ops_s", "%.0f") " | " plain(CL_N, m, "ops_s", "%.0f") \
        " | " plain(CL_C, m, "ops_s", "%.0f") " | " ratio(CL_L, m, "ops_s", CL_N) \
        " | " ratio(CL_L, m, "ops_s", CL_C))
  }
  print ""
  print "Node.js is fetch (undici) for HTTP, ioredis for Redis; the C ceiling is wrk"
  print "for HTTP, redis-benchmark for Redis."

  for (i = 1; i <= n; i++) {
    m = ml[i]; cl_ids(m)
    ids[1] = CL_L; ids[2] = CL_N; ids[3] = CL_C
    print ""
    if (m == "http")
      print "## HTTP: keep-alive GET / against nginx (one worker, `return 200 \"hello world\\n\"`)"
    else
      print "## " cl_title(m) " against redis-server"
    print ""
    row("client | " (m == "http" ? "requests/s" : "ops/s") " | × Node | × ceiling | client CPU % | per client CPU-s | × Node | server CPU %")
    row("--- | ---: | ---: | ---: | ---: | ---: | ---: | ---:")
    for (j = 1; j <= 3; j++) {
      s = ids[j]
      if (!(s in status)) continue
      row(label[s] failnote(s, m) " | " cell(s, m, "ops_s", "%.0f") " | " ratio(s, m, "ops_s", CL_N) \
          " | " ratio(s, m, "ops_s", CL_C) " | " plain(s, m, "cpu", "%.0f") \
          " | " cell(s, m, "per_cpu_s", "%.0f") " | " ratio(s, m, "per_cpu_s", CL_N) \
          " | " plain(s, m, "srv_cpu", "%.0f"))
    }
  }

  print ""
  print "## luahost targets (this run)"
  print ""
  row("target | measured | status"); row("--- | ---: | ---")
  for (i = 1; i <= n; i++) {
    m = ml[i]; cl_ids(m)
    what = (m == "http") ? "HTTP client" : "Redis " toupper(substr(m, 1, 3)) (m ~ /pipelined/ ? " pipelined" : "")
    cl_target(what " ≥ 1.5× " label[CL_N], m, CL_L, CL_N, 1.5, "ops_s")
    cl_target(what " ≥ 0.6× " label[CL_C], m, CL_L, CL_C, 0.6, "ops_s")
  }
  print ""
  print "The same per second of client CPU (what a request costs the client,"
  print "whatever share of its core it got; steadier on a shared machine):"
  print ""
  row("target | measured | status"); row("--- | ---: | ---")
  for (i = 1; i <= n; i++) {
    m = ml[i]; cl_ids(m)
    what = (m == "http") ? "HTTP client" : "Redis " toupper(substr(m, 1, 3)) (m ~ /pipelined/ ? " pipelined" : "")
    cl_target(what " per CPU-s ≥ 1.5× " label[CL_N], m, CL_L, CL_N, 1.5, "per_cpu_s")
    cl_target(what " per CPU-s ≥ 0.6× " label[CL_C], m, CL_L, CL_C, 0.6, "per_cpu_s")
  }
}

function cl_target(what, m, s, base, want, k,    a, b) {
  a = med(s, m, k); b = med(base, m, k)
  if (a == "" || b == "" || b == 0) { row(what " | — | no data"); return }
  target(what, sprintf("%.2f×", a / b), a / b >= want)
}

# bench/run web: static files beside nginx, WebSocket echo beside Node's ws.
function web_report(    i, s, m, mi, base) {
  print "# " title
  print ""
  print "- When: " when
  print "- Machine: " machine
  print "- Runs: " runs
  print "- Figures: medians, with the min–max spread of the runs in brackets;"
  print "  *server CPU %* is the server's CPU time (all threads, nginx's worker"
  print "  included) over the measured window, 100 = one core."
  missing_notes()
  for (mi = 1; mi <= 3; mi++) {
    m = (mi == 1 ? "4k" : mi == 2 ? "1m" : "ws")
    if (!want[m]) continue
    print ""
    if (m == "ws") {
      print "## WebSocket echo: " ws_conns " connections, " ws_size "-byte masked binary frames, one in flight each"
      print ""
      row("server | messages/s | × Node ws | server CPU % | wsgen CPU %")
      row("--- | ---: | ---: | ---: | ---:")
      base = "node-ws"
    } else {
      print "## static file, " (m == "4k" ? "4 KiB" : "1 MiB") " of random bytes: wrk -t1 -c" wrk_conns ", keep-alive"
      print ""
      row("server | requests/s | MiB/s | × nginx | p50 ms | p99 ms | server CPU % | wrk CPU %")
      row("--- | ---: | ---: | ---: | ---: | ---: | ---: | ---:")
      base = "nginx-static"
    }
    for (i = 1; i <= nserv; i++) {
      s = sid[i]
      if (m == "ws" && s == "nginx-static") continue
      if (m != "ws" && s == "node-ws") continue
      if (m == "ws")
        row(label[s] failnote(s, m) " | " cell(s, m, "msgs_s", "%.0f") " | " ratio(s, m, "msgs_s", base) \
            " | " plain(s, m, "srv_cpu", "%.0f") " | " plain(s, m, "lg_cpu", "%.0f"))
      else
        row(label[s] failnote(s, m) " | " cell(s, m, "rps", "%.0f") " | " plain(s, m, "mb_s", "%.0f") \
            " | " ratio(s, m, "rps", base) " | " plain(s, m, "p50_ms", "%.2f") " | " plain(s, m, "p99_ms", "%.2f") \
            " | " plain(s, m, "srv_cpu", "%.0f") " | " plain(s, m, "lg_cpu", "%.0f"))
    }
  }
  print ""
  print "## Targets"
  print ""
  row("target | luahost | status")
  row("--- | ---: | ---")
  if (want["4k"]) tgt_ratio("4 KiB file ≥ 0.7× nginx requests/s", "4k", "rps", "nginx-static", 0.7)
  if (want["1m"]) tgt_ratio("1 MiB file ≥ 0.9× nginx requests/s", "1m", "rps", "nginx-static", 0.9)
  if (want["ws"]) tgt_ratio("WebSocket echo ≥ 2× Node ws messages/s", "ws", "msgs_s", "node-ws", 2)
}

END {
  if (kind == "http") http_report()
  else if (kind == "tls") tls_report()
  else if (kind == "clients") clients_report()
  else if (kind == "web") web_report()
  else echo_report()
}
