// node_https: Node's https module, keep-alive "hello world\n" on GET /, for
// `bench/run tls` (node_http.js over TLS 1.3, TLS_AES_128_GCM_SHA256).
//
// usage: node node_https.js CERT KEY PORT [HOST]   (port 0: any free one)
// Prints "listening on HOST:PORT" once ready; SIGTERM ends it.
'use strict';

const fs = require('fs');
const https = require('https');

const [certFile, keyFile, portArg, hostArg] = process.argv.slice(2);
const port = Number(portArg);
const host = hostArg || '127.0.0.1';
if (!certFile || !keyFile || !Number.isInteger(port)) {
  console.error('usage: node node_https.js CERT KEY PORT [HOST]');
  process.exit(2);
}

const body = Buffer.from('hello world\n');
const server = https.createServer({
  cert: fs.readFileSync(certFile),
  key: fs.readFileSync(keyFile),
  minVersion: 'TLSv1.3',
  ciphers: 'TLS_AES_128_GCM_SHA256',
}, (req, res) => {
  res.writeHead(200, {
    'Content-Type': 'text/plain',
    'Content-Length': body.length,
  });
  res.end(body);
});
server.keepAliveTimeout = 60000;
server.listen({ port, host, backlog: 4096 }, () => {
  const addr = server.address();
  console.log(`listening on ${addr.address}:${addr.port}`);
});
process.on('SIGTERM', () => process.exit(0));
