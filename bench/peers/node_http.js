// node_http: Node's own http module, keep-alive "hello world\n" on GET /.
//
// usage: node node_http.js PORT [HOST]   (port 0 picks a free port)
// Prints "listening on HOST:PORT" once ready; SIGTERM ends it.
'use strict';

const http = require('http');

const port = Number(process.argv[2]);
const host = process.argv[3] || '127.0.0.1';
if (!Number.isInteger(port)) {
  console.error('usage: node node_http.js PORT [HOST]');
  process.exit(2);
}

const body = Buffer.from('hello world\n');
const server = http.createServer((req, res) => {
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
