// node_tls_echo: Node's tls module, an echo server over TLS 1.3 for
// `bench/run tls`.  Idiomatic Node: socket.pipe(socket), whose stream
// backpressure pauses reading while the write side is full.
//
// usage: node node_tls_echo.js CERT KEY PORT [HOST]   (port 0: any free one)
// Prints "listening on HOST:PORT" once ready; SIGTERM ends it.
'use strict';

const fs = require('fs');
const tls = require('tls');

const [certFile, keyFile, portArg, hostArg] = process.argv.slice(2);
const port = Number(portArg);
const host = hostArg || '127.0.0.1';
if (!certFile || !keyFile || !Number.isInteger(port)) {
  console.error('usage: node node_tls_echo.js CERT KEY PORT [HOST]');
  process.exit(2);
}

const server = tls.createServer({
  cert: fs.readFileSync(certFile),
  key: fs.readFileSync(keyFile),
  minVersion: 'TLSv1.3',
  ciphers: 'TLS_AES_128_GCM_SHA256',
  noDelay: true,
}, (socket) => {
  socket.on('error', () => socket.destroy());
  socket.pipe(socket);
});
server.on('tlsClientError', () => {});   // a client that went away mid-handshake
server.listen({ port, host, backlog: 4096 }, () => {
  const addr = server.address();
  console.log(`listening on ${addr.address}:${addr.port}`);
});
process.on('SIGTERM', () => process.exit(0));
