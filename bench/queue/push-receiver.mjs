// The endpoint of bench/push.sh: a Node.js HTTP server taking the jobs
// Shoal pushes ([[worker.push]] / `shoal jobs bench --push`), as a team's
// own service would: it checks each delivery's Standard Webhooks
// signature, then answers 204. For `latency` jobs (payload: the enqueue
// time in ms) it records enqueue-to-handler milliseconds on arrival,
// which is what BullMQ's worker measures in bench/queue/bullmq.mjs.
//   GET /stats -> {"count", "p50_ms", "p99_ms"}; POST /reset clears them.
// Prints {"port"} once listening.
import http from "node:http";
import crypto from "node:crypto";

const secret = Buffer.from(process.env.PUSH_SECRET ?? "shoal-bench-push-secret");
let lat = [];
const pct = (xs, p) => xs[Math.min(xs.length - 1, Math.ceil((p / 100) * xs.length) - 1)];

const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/stats") {
    const sorted = [...lat].sort((a, b) => a - b);
    res.setHeader("content-type", "application/json");
    return res.end(JSON.stringify({ count: sorted.length, p50_ms: pct(sorted, 50) ?? null, p99_ms: pct(sorted, 99) ?? null }));
  }
  if (req.method === "POST" && req.url === "/reset") {
    lat = [];
    res.statusCode = 204;
    return res.end();
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    const id = req.headers["webhook-id"];
    const ts = req.headers["webhook-timestamp"];
    const mac = crypto.createHmac("sha256", secret).update(`${id}.${ts}.`).update(body).digest("base64");
    if (req.headers["webhook-signature"] !== `v1,${mac}`) {
      res.statusCode = 401;
      return res.end();
    }
    const job = JSON.parse(body);
    if (job.kind === "latency") lat.push(Math.max(0, Date.now() - job.payload));
    res.statusCode = 204;
    res.end();
  });
});
server.keepAliveTimeout = 60_000;
server.listen(Number(process.env.PORT ?? 0), "127.0.0.1", () => {
  console.log(JSON.stringify({ port: server.address().port }));
});
