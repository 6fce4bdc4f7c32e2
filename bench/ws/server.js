// The Node.js peer of bench/ws.sh: a WebSocket server (the `ws` package,
// Node's usual one) holding logged-in sockets as Shoal's
// /api/notifications/ws does. An upgrade on /ws must carry the session
// cookie `shoal_session=TOKEN` (checked against a session kept in memory,
// lighter work than Shoal's lookup); each socket is kept in its user's
// set for fan-out and pinged every 30 s, as Shoal's hub does.
//   node server.js PORT TOKEN
const http = require("http");
const { WebSocketServer } = require("ws");

const port = Number(process.argv[2] || 3200);
const token = process.argv[3] || "bench";
const sessions = new Map([[token, { userId: "bench-user" }]]);
const byUser = new Map();

const server = http.createServer((req, res) => {
  if (req.url === "/readyz") return res.writeHead(200).end("ok");
  res.writeHead(404).end();
});
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });

function sessionOf(req) {
  for (const part of (req.headers.cookie || "").split(";")) {
    const [k, v] = part.trim().split("=");
    if (k === "shoal_session") return sessions.get(v);
  }
  return undefined;
}

server.on("upgrade", (req, socket, head) => {
  const session = req.url === "/ws" ? sessionOf(req) : undefined;
  if (!session) {
    socket.end("HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n");
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    let set = byUser.get(session.userId);
    if (!set) byUser.set(session.userId, (set = new Set()));
    set.add(ws);
    ws.on("close", () => set.delete(ws));
    ws.on("error", () => {});
  });
});

setInterval(() => {
  for (const set of byUser.values()) for (const ws of set) ws.ping();
}, 30000).unref();

server.listen(port, "127.0.0.1", () => console.log(`ws peer on ${port}`));
