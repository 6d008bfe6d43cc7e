// WebSocket echo with the ws package (npm), the peer of scripts/ws_echo.lua:
//   NODE_PATH=.../node_modules node node_ws_echo.js PORT [HOST]
// Every message on / goes back as it came (binary as binary, text as text);
// no permessage-deflate, as luahost's server.  Prints "listening on H:P".
"use strict";
const { WebSocketServer } = require("ws");

const port = Number(process.argv[2] || 1234);
const host = process.argv[3] || "127.0.0.1";

const wss = new WebSocketServer({ host, port, path: "/", perMessageDeflate: false,
                                  backlog: 4096 });
wss.on("connection", (ws) => {
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on("error", () => {});
});
wss.on("listening", () => {
  const a = wss.address();
  process.stdout.write(`listening on ${a.address}:${a.port}\n`);
});
