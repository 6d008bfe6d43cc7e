// node_fetch: load from Node's fetch (undici, built into Node 18+), for
// `bench/run clients`; the peer of http_client.lua.
//
//   node node_fetch.js url=http://127.0.0.1:PORT/ conc=50 seconds=5 \
//     warmup=0.5 [srvpid=PID] [body="hello world\n"]
//
// `conc` async loops, each: await fetch(url), await res.text(), status and
// body checked; so `conc` requests are in flight at once. fetch's global
// dispatcher keeps connections alive (undici's Agent: keep-alive, no limit
// on connections per origin, no pipelining), so 50 loops use 50 conns.
// After `warmup` seconds the measured window starts; after `seconds` more it
// ends. One line on stdout, as http_client.lua:
//
//   result ops=N seconds=S cpu_s=C srv_ticks=T errors=E
//
// cpu_s: process.cpuUsage() over the window (every thread of the process).
'use strict';

const fs = require('fs');

const opt = { conc: '50', seconds: '5', warmup: '0.5', srvpid: '',
              body: 'hello world\\n' };
for (const a of process.argv.slice(2)) {
  const m = /^(\w+)=(.*)$/s.exec(a);
  if (!m) { console.error(`bad argument: ${a}`); process.exit(2); }
  opt[m[1]] = m[2];
}
const url = opt.url;
const conc = Number(opt.conc);
const seconds = Number(opt.seconds), warmup = Number(opt.warmup);
const wantBody = opt.body.replace(/\\n/g, '\n');

function srvTicks() {
  if (!opt.srvpid) return -1;
  try {
    const s = fs.readFileSync(`/proc/${opt.srvpid}/stat`, 'latin1');
    const f = s.slice(s.lastIndexOf(') ') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  } catch (e) { return -1; }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let count = 0, errors = 0, firstErr = null, stop = false;

function note(e) {
  errors++;
  if (!firstErr) firstErr = e;
  if (errors > 100) stop = true;
}

async function worker() {
  while (!stop) {
    try {
      const res = await fetch(url);
      const text = await res.text();
      if (res.status === 200 && text === wantBody) count++;
      else note(`status ${res.status}, body ${JSON.stringify(text)}`);
    } catch (e) {
      note(e && e.cause ? `${e.message}: ${e.cause.message}` : String(e));
      await sleep(10);
    }
  }
}

async function main() {
  const workers = [];
  for (let i = 0; i < conc; i++) workers.push(worker());
  await sleep(warmup * 1000);
  const c0 = count, u0 = process.cpuUsage(), t0 = performance.now(), s0 = srvTicks();
  await sleep(seconds * 1000);
  const c1 = count, u1 = process.cpuUsage(u0), t1 = performance.now(), s1 = srvTicks();
  stop = true;
  await Promise.all(workers);
  const cpu = (u1.user + u1.system) / 1e6;
  console.log(`result ops=${c1 - c0} seconds=${((t1 - t0) / 1000).toFixed(4)} ` +
              `cpu_s=${cpu.toFixed(4)} srv_ticks=${s0 >= 0 && s1 >= 0 ? s1 - s0 : -1} errors=${errors}`);
  if (firstErr) {
    console.error(`node_fetch: ${errors} error(s), the first: ${firstErr}`);
    process.exit(1);
  }
  process.exit(0);  // the dispatcher's idle keep-alive conns would hold it 4 s
}

main();
