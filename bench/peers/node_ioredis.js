// node_ioredis: load from Node's ioredis (npm), for `bench/run clients`;
// the peer of redis_client.lua.
//
//   NODE_PATH=DIR/node_modules node node_ioredis.js port=PORT cmd=get|set \
//     conc=50 pipeline=1 seconds=5 warmup=0.5 [srvpid=PID]
//
// `conc` ioredis clients (one connection each), each driven by an async
// loop: with pipeline=1, await r.get(key) or await r.set(key, value), one
// command in flight per connection, as redis-benchmark -c and
// redis_client.lua do; with pipeline=N > 1, r.pipeline() with N such
// commands and await exec(). Auto-pipelining stays off (ioredis's
// default). Key "key:__rand_int__", value "xxx", every reply checked. After
// `warmup` seconds the measured window starts; after `seconds` more it
// ends. One line on stdout, as redis_client.lua:
//
//   result ops=N seconds=S cpu_s=C srv_ticks=T errors=E
'use strict';

const fs = require('fs');
const Redis = require('ioredis');

const opt = { conc: '50', seconds: '5', warmup: '0.5', srvpid: '',
              pipeline: '1', host: '127.0.0.1', cmd: 'get' };
for (const a of process.argv.slice(2)) {
  const m = /^(\w+)=(.*)$/s.exec(a);
  if (!m) { console.error(`bad argument: ${a}`); process.exit(2); }
  opt[m[1]] = m[2];
}
const port = Number(opt.port);
const conc = Number(opt.conc), depth = Number(opt.pipeline);
const seconds = Number(opt.seconds), warmup = Number(opt.warmup);
const cmd = opt.cmd.toLowerCase();
const KEY = 'key:__rand_int__', VALUE = 'xxx';
const want = cmd === 'get' ? VALUE : 'OK';

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

async function worker(r) {
  if (depth === 1) {
    while (!stop) {
      const v = cmd === 'get' ? await r.get(KEY) : await r.set(KEY, VALUE);
      if (v === want) count++;
      else note(`${cmd} returned ${v}`);
    }
  } else {
    while (!stop) {
      const p = r.pipeline();
      if (cmd === 'get') for (let i = 0; i < depth; i++) p.get(KEY);
      else for (let i = 0; i < depth; i++) p.set(KEY, VALUE);
      const replies = await p.exec();
      for (let i = 0; i < depth; i++) {
        const [err, v] = replies[i];
        if (err || v !== want) { note(`reply ${i}: ${err || v}`); break; }
      }
      count += depth;
    }
  }
}

async function main() {
  const clients = [];
  for (let i = 0; i < conc; i++) {
    clients.push(new Redis({ host: opt.host, port, lazyConnect: true,
                             enableAutoPipelining: false,
                             maxRetriesPerRequest: 0 }));
  }
  await Promise.all(clients.map((r) => r.connect()));
  const workers = clients.map((r) => worker(r).catch((e) => note(String(e))));
  await sleep(warmup * 1000);
  const c0 = count, u0 = process.cpuUsage(), t0 = performance.now(), s0 = srvTicks();
  await sleep(seconds * 1000);
  const c1 = count, u1 = process.cpuUsage(u0), t1 = performance.now(), s1 = srvTicks();
  stop = true;
  await Promise.all(workers);
  const cpu = (u1.user + u1.system) / 1e6;
  console.log(`result ops=${c1 - c0} seconds=${((t1 - t0) / 1000).toFixed(4)} ` +
              `cpu_s=${cpu.toFixed(4)} srv_ticks=${s0 >= 0 && s1 >= 0 ? s1 - s0 : -1} errors=${errors}`);
  clients.forEach((r) => r.disconnect());
  if (firstErr) {
    console.error(`node_ioredis: ${errors} error(s), the first: ${firstErr}`);
    process.exit(1);
  }
  process.exit(0);
}

main().catch((e) => { console.error(`node_ioredis: ${e}`); process.exit(1); });
