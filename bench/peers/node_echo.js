// node_echo: the chapter's promise-based echo server, in plain JavaScript.
// Sockets start paused (pauseOnConnect); soRead resumes the socket for one
// 'data' event and pauses it again, soWrite resolves when the write has been
// handed to the kernel, and an async serveClient loop awaits one, then the
// other: that pause/resume pairing is the backpressure.  soListen/soAccept
// turn the listener into the same shape: accept is a promise.
//
// usage: node node_echo.js PORT [HOST]   (port 0 picks a free port)
// Prints "listening on HOST:PORT" once ready; SIGTERM ends it.
'use strict';

const net = require('net');

// A connection wrapper: the one pending read, and what ended the stream.
function soInit(socket) {
  const conn = { socket, err: null, ended: false, reader: null };
  socket.on('data', (data) => {
    // Paused between reads, so data arrives only while a read waits.
    socket.pause();
    const reader = conn.reader;
    conn.reader = null;
    reader.resolve(data);
  });
  socket.on('end', () => {
    conn.ended = true;
    if (conn.reader) {
      const reader = conn.reader;
      conn.reader = null;
      reader.resolve(Buffer.alloc(0));   // EOF
    }
  });
  socket.on('error', (err) => {
    conn.err = err;
    if (conn.reader) {
      const reader = conn.reader;
      conn.reader = null;
      reader.reject(err);
    }
  });
  return conn;
}

function soRead(conn) {
  return new Promise((resolve, reject) => {
    if (conn.reader) {
      reject(new Error('soRead: a read is already pending'));
    } else if (conn.err) {
      reject(conn.err);
    } else if (conn.ended) {
      resolve(Buffer.alloc(0));
    } else {
      conn.reader = { resolve, reject };
      conn.socket.resume();
    }
  });
}

function soWrite(conn, data) {
  return new Promise((resolve, reject) => {
    if (conn.err) {
      reject(conn.err);
      return;
    }
    conn.socket.write(data, (err) => (err ? reject(err) : resolve()));
  });
}

// A listener wrapper: sockets accepted by Node but not yet by the program,
// and the one pending accept.
function soListen(port, host) {
  const listener = {
    server: net.createServer({ pauseOnConnect: true, noDelay: true }),
    queue: [],
    acceptor: null,
    err: null,
  };
  listener.server.on('connection', (socket) => {
    if (listener.acceptor) {
      const acceptor = listener.acceptor;
      listener.acceptor = null;
      acceptor.resolve(socket);
    } else {
      listener.queue.push(socket);
    }
  });
  listener.server.on('error', (err) => {
    listener.err = err;
    if (listener.acceptor) {
      const acceptor = listener.acceptor;
      listener.acceptor = null;
      acceptor.reject(err);
    }
  });
  return new Promise((resolve, reject) => {
    listener.server.once('error', reject);
    listener.server.listen({ port, host, backlog: 4096 }, () => {
      listener.server.off('error', reject);
      resolve(listener);
    });
  });
}

function soAccept(listener) {
  return new Promise((resolve, reject) => {
    if (listener.err) {
      reject(listener.err);
    } else if (listener.queue.length > 0) {
      resolve(listener.queue.shift());
    } else {
      listener.acceptor = { resolve, reject };
    }
  });
}

async function serveClient(socket) {
  const conn = soInit(socket);
  for (;;) {
    const data = await soRead(conn);
    if (data.length === 0) break;
    await soWrite(conn, data);
  }
}

async function newConn(socket) {
  try {
    await serveClient(socket);
  } catch (err) {
    // ECONNRESET and the like end one connection, nothing more.
  } finally {
    socket.destroy();
  }
}

async function main() {
  const port = Number(process.argv[2]);
  const host = process.argv[3] || '127.0.0.1';
  if (!Number.isInteger(port)) {
    console.error('usage: node node_echo.js PORT [HOST]');
    process.exit(2);
  }
  const listener = await soListen(port, host);
  const addr = listener.server.address();
  console.log(`listening on ${addr.address}:${addr.port}`);
  for (;;) {
    const socket = await soAccept(listener);
    newConn(socket);   // not awaited: one async loop per connection
  }
}

main().catch((err) => {
  console.error('node_echo:', err);
  process.exit(1);
});
