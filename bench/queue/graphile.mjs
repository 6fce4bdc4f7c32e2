// graphile-worker peer for bench/queue.sh: enqueues N no-op jobs (batched
// with add_jobs, 1,000 per call) into a fresh schema, runs them with C
// concurrency, and prints one JSON line like bullmq.mjs. BATCHED=1 turns
// on what graphile-worker's docs recommend for throughput (0.17+): a local
// queue of C + 1 jobs fetched at once (`localQueue.size`), and completions
// and failures written in batches (`completeJobBatchDelay` and
// `failJobBatchDelay` = 0: each batch as soon as the event loop is free).
import { run, makeWorkerUtils } from "graphile-worker";
import pg from "pg";

const N = Number(process.env.JOBS ?? 10000);
const C = Number(process.env.CONCURRENCY ?? 50);
const connectionString = process.env.DATABASE_URL ?? "postgres://root@127.0.0.1:5432/test";
const schema = `gw_bench_${process.pid}`;
const BATCHED = process.env.BATCHED === "1";
const preset = BATCHED
  ? { worker: { localQueue: { size: C + 1 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } }
  : undefined;
const pct = (xs, p) => xs[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];

const utils = await makeWorkerUtils({ connectionString, schema });
await utils.migrate();
const pool = new pg.Pool({ connectionString });

let t0 = performance.now();
for (let i = 0; i < N; i += 1000) {
  const specs = [];
  for (let j = i; j < Math.min(N, i + 1000); j++) specs.push({ identifier: "noop", payload: { i: j } });
  await pool.query(`select ${schema}.add_jobs($1::${schema}.job_spec[])`, [
    specs.map((s) => `("${s.identifier}","{\\"i\\":${s.payload.i}}",,,,,,)`),
  ]);
}
const enqueueSecs = (performance.now() - t0) / 1000;

let done = 0;
let resolveAll;
const all = new Promise((r) => (resolveAll = r));
const lat = [];
let measuring = false;
t0 = performance.now();
const runner = await run({
  preset, connectionString, schema, concurrency: C, noHandleSignals: true, pollInterval: 1000,
  logger: new (await import("graphile-worker")).Logger(() => () => {}),
  taskList: {
    noop: async (payload) => {
      if (measuring) { lat.push(Date.now() - payload.t); return; }
      if (++done === N) resolveAll();
    },
  },
});
await all;
const completeSecs = (performance.now() - t0) / 1000;

measuring = true;
for (let i = 0; i < 200; i++) {
  await utils.addJob("noop", { t: Date.now() });
  await new Promise((r) => setTimeout(r, 10));
}
await new Promise((r) => setTimeout(r, 500));
lat.sort((a, b) => a - b);
console.log(JSON.stringify({
  peer: BATCHED ? "graphile-worker-batched" : "graphile-worker", jobs: N, concurrency: C,
  enqueue_per_sec: N / enqueueSecs, complete_per_sec: N / completeSecs,
  start_latency_p50_ms: pct(lat, 50), start_latency_p99_ms: pct(lat, 99), latency_samples: lat.length,
}));
await runner.stop();
await pool.query(`drop schema ${schema} cascade`);
await pool.end(); await utils.release();
process.exit(0);
