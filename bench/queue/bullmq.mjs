// BullMQ peer for bench/queue.sh: enqueues N no-op jobs on a fresh queue
// (bulk adds of 1,000; removed on completion unless KEEP=1), then runs them with C concurrency in one worker,
// and prints one JSON line: enqueue and completion rates, and
// enqueue-to-start latency percentiles measured with idle workers.
import { Queue, Worker } from "bullmq";

const N = Number(process.env.JOBS ?? 10000);
const C = Number(process.env.CONCURRENCY ?? 50);
const url = new URL(process.env.REDIS_URL ?? "redis://127.0.0.1:6379");
const connection = { host: url.hostname, port: Number(url.port || 6379), maxRetriesPerRequest: null };
// KEEP=1: keep completed jobs (BullMQ's default, and what Shoal's stores
// do until their retention prunes them); otherwise removeOnComplete.
const keep = process.env.KEEP === "1";
const name = `shoal-bench-${process.pid}-${Date.now()}`;
const queue = new Queue(name, { connection });

const pct = (xs, p) => xs[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];

let t0 = performance.now();
for (let i = 0; i < N; i += 1000) {
  const batch = [];
  for (let j = i; j < Math.min(N, i + 1000); j++) batch.push({ name: "noop", data: { i: j }, opts: { removeOnComplete: !keep } });
  await queue.addBulk(batch);
}
const enqueueSecs = (performance.now() - t0) / 1000;

let done = 0;
let resolveAll;
const all = new Promise((r) => (resolveAll = r));
t0 = performance.now();
const worker = new Worker(name, async () => {}, { connection, concurrency: C });
worker.on("completed", () => { if (++done === N) resolveAll(); });
await all;
const completeSecs = (performance.now() - t0) / 1000;

// Latency: idle worker, one job at a time, 200 samples.
const lat = [];
const started = new Map();
const latWorker = new Worker(name + "-lat", async (job) => { lat.push(Date.now() - job.data.t); }, { connection, concurrency: 1 });
const latQueue = new Queue(name + "-lat", { connection });
await new Promise((r) => setTimeout(r, 300));
for (let i = 0; i < 200; i++) {
  await latQueue.add("noop", { t: Date.now() }, { removeOnComplete: true });
  await new Promise((r) => setTimeout(r, 10));
}
await new Promise((r) => setTimeout(r, 500));
lat.sort((a, b) => a - b);
console.log(JSON.stringify({
  peer: keep ? "bullmq-keep" : "bullmq", jobs: N, concurrency: C,
  enqueue_per_sec: N / enqueueSecs, complete_per_sec: N / completeSecs,
  start_latency_p50_ms: pct(lat, 50), start_latency_p99_ms: pct(lat, 99), latency_samples: lat.length,
}));
await worker.close(); await latWorker.close();
await queue.obliterate({ force: true }); await latQueue.obliterate({ force: true });
await queue.close(); await latQueue.close();
process.exit(0);
