// The Node.js peer of bench/sse.sh: an SSE server that fans events out
// across instances over Redis pub/sub, as Shoal's instances do over their
// bus. GET /stream holds a Server-Sent Events stream (heartbeat comment
// every 15 s); POST /publish sends the JSON body to every instance's
// streams. Run two: one holds the streams, the other takes the publishes.
//   node server.js PORT REDIS_URL
const http = require("http");
const Redis = require("ioredis");

const port = Number(process.argv[2] || 3100);
const redisUrl = process.argv[3] || "redis://127.0.0.1:6379";
const channel = process.env.SSE_CHANNEL || "sse-bench";
const pub = new Redis(redisUrl);
const sub = new Redis(redisUrl);
const streams = new Set();

sub.subscribe(channel);
sub.on("message", (_ch, message) => {
  const frame = `data: ${message}\n\n`;
  for (const res of streams) res.write(frame);
});

setInterval(() => {
  for (const res of streams) res.write(": heartbeat\n\n");
}, 15000).unref();

const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url.startsWith("/stream")) {
    res.writeHead(200, {
      "content-type": "text/event-stream",
      "cache-control": "no-store",
      connection: "keep-alive",
    });
    res.write(": open\n\n");
    streams.add(res);
    req.on("close", () => streams.delete(res));
    return;
  }
  if (req.method === "POST" && req.url.startsWith("/publish")) {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      try {
        JSON.parse(body);
      } catch {
        res.writeHead(400).end("bad json");
        return;
      }
      pub.publish(channel, body).then(() => res.writeHead(202).end("{}"));
    });
    return;
  }
  res.writeHead(404).end();
});
server.keepAliveTimeout = 0;
server.listen(port, "127.0.0.1", () => console.log(`sse peer on ${port}`));
