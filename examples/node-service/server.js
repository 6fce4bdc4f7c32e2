// A Node.js service behind Shoal (docs/node-quickstart.md).
//
// - Its instances join the gateway's pool `greetings` by registering
//   themselves, and leave it when they stop (SIGTERM/SIGINT).
// - The gateway checks the session for `/api/greetings` and forwards the
//   user's id in `x-shoal-user-id`; this code never reads a cookie.
// - `POST /api/greetings` enqueues a job over HTTP; Shoal pushes it back to
//   `POST /hooks/greetings/jobs`, signed (Standard Webhooks), retried until
//   a 2xx. The job's id is the delivery's `webhook-id`: a repeat (after a
//   lost answer or a killed instance) is recognised and not done twice.
// - The job tells the user through Shoal's realtime streams (SSE and
//   WebSocket, on any Shoal instance).
//
// Settings, all by environment:
//   PORT (0: any free port), HOST (127.0.0.1)
//   SHOAL_URL              the gateway, e.g. http://127.0.0.1:8080
//   SHOAL_TOKEN            this service's token (`shoal token new --name
//                          greetings --scope jobs:enqueue --scope
//                          events:publish --pool greetings`): it may
//                          enqueue, publish events and register in its pool,
//                          nothing else
//   SHOAL_POOL             the pool to join (greetings)
//   SHOAL_PUSH_SECRET      the secret of the queue's [[worker.push]] binding
//   DATA_DIR               where sent greetings are recorded (./data); every
//                          instance must share it (in production: your
//                          database, with the job id as a unique key)

import Fastify from 'fastify';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

const env = process.env;
const config = {
  port: Number(env.PORT ?? 0),
  host: env.HOST ?? '127.0.0.1',
  shoal: (env.SHOAL_URL ?? 'http://127.0.0.1:8080').replace(/\/$/, ''),
  token: env.SHOAL_TOKEN,
  pool: env.SHOAL_POOL ?? 'greetings',
  pushSecret: env.SHOAL_PUSH_SECRET,
  dataDir: env.DATA_DIR ?? './data',
  ttlSecs: 10,
};
const missing = ['SHOAL_TOKEN', 'SHOAL_PUSH_SECRET'].filter((k) => !env[k]);
if (missing.length) {
  console.error(`set ${missing.join(', ')} (see docs/node-quickstart.md)`);
  process.exit(2);
}
const sentDir = path.join(config.dataDir, 'sent');
fs.mkdirSync(sentDir, { recursive: true });

const app = Fastify({ logger: true });
let draining = false;

// Keep the raw body: the push signature covers the exact bytes.
app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
  req.rawBody = body;
  try {
    done(null, body.length ? JSON.parse(body) : {});
  } catch (e) {
    e.statusCode = 400;
    done(e);
  }
});

function problem(reply, status, detail, headers = {}) {
  return reply.code(status).headers(headers).type('application/problem+json').send({ status, title: 'Request refused', detail });
}

// Shoal's HTTP APIs, with the service token.
async function shoal(pathname, body) {
  const r = await fetch(config.shoal + pathname, {
    method: 'POST',
    headers: { authorization: `Bearer ${config.token}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(5000),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${pathname} answered ${r.status}: ${text.slice(0, 300)}`);
  return JSON.parse(text);
}

app.get('/readyz', async (req, reply) =>
  draining ? problem(reply, 503, 'draining') : { status: 'ready', pid: process.pid });

// Behind a route with `require_session = true`: the gateway answered 401
// to anyone without a live session, and this header is the session's user
// (any such header a client sent was removed).
function userOf(req, reply) {
  const user = req.headers['x-shoal-user-id'];
  if (!user) problem(reply, 401, 'no verified user: reach this service through the gateway');
  return user;
}

app.get('/api/greetings/hello', async (req, reply) => {
  const user = userOf(req, reply);
  if (!user) return reply;
  return { hello: user, pid: process.pid };
});

app.post('/api/greetings', async (req, reply) => {
  const user = userOf(req, reply);
  if (!user) return reply;
  const { text, hold_ms = 0, fail_first = false } = req.body ?? {};
  if (typeof text !== 'string' || text.length < 1 || text.length > 200) {
    return problem(reply, 422, 'text: 1 to 200 characters');
  }
  if (!Number.isInteger(hold_ms) || hold_ms < 0 || hold_ms > 10000) {
    return problem(reply, 422, 'hold_ms: 0 to 10000');
  }
  const job = {
    queue: 'greetings',
    kind: 'greeting.send',
    payload: { user, text, hold_ms, fail_first: fail_first === true },
    max_attempts: 5,
    timeout_ms: 30000,
  };
  // A client's Idempotency-Key makes a retried POST one job.
  const key = req.headers['idempotency-key'];
  if (typeof key === 'string' && key.length > 0 && key.length <= 100) {
    job.unique_key = `greeting:${user}:${key}`;
  }
  const answer = await shoal('/api/jobs', job);
  return reply.code(202).send({ job: answer.id });
});

// --- push delivery ------------------------------------------------------

function pushKey(secret) {
  return secret.startsWith('whsec_') ? Buffer.from(secret.slice(6), 'base64') : Buffer.from(secret);
}
const key = pushKey(config.pushSecret);

// Standard Webhooks: v1,base64(HMAC-SHA256("id.timestamp.body")).
function signed(req) {
  const id = req.headers['webhook-id'];
  const ts = Number(req.headers['webhook-timestamp']);
  const given = String(req.headers['webhook-signature'] ?? '');
  if (!id || !Number.isFinite(ts) || Math.abs(Date.now() / 1000 - ts) > 300) return false;
  const mac = crypto.createHmac('sha256', key).update(`${id}.${ts}.${req.rawBody ?? ''}`).digest();
  return given.split(' ').some((s) => {
    const [version, sig] = s.split(',');
    const bytes = Buffer.from(sig ?? '', 'base64');
    return version === 'v1' && bytes.length === mac.length && crypto.timingSafeEqual(bytes, mac);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

app.post('/hooks/greetings/jobs', async (req, reply) => {
  if (!signed(req)) return problem(reply, 401, 'bad or missing webhook signature');
  const id = req.headers['webhook-id'];
  const attempt = Number(req.headers['x-shoal-job-attempt'] ?? 1);
  const { kind, payload } = req.body;
  // A job this code will never take: to the dead letters, no retries.
  const dead = { 'x-shoal-job': 'dead' };
  if (kind !== 'greeting.send') return problem(reply, 422, `unknown kind ${kind}`, dead);
  if (typeof payload?.user !== 'string' || typeof payload?.text !== 'string') {
    return problem(reply, 422, 'payload needs user and text', dead);
  }
  // The job's id is the idempotency key: done once, whatever the repeats.
  const record = path.join(sentDir, `${id}.json`);
  if (fs.existsSync(record)) {
    req.log.info({ job: id, attempt }, 'repeat delivery of a job already done');
    fs.appendFileSync(path.join(config.dataDir, 'repeats.log'), `${id} ${attempt} ${process.pid}\n`);
    return { done: true, repeat: true };
  }
  if (payload.fail_first && attempt === 1) {
    return problem(reply, 503, 'failing the first attempt on purpose; Shoal retries');
  }
  // The work: tell the user (at least once; the event carries the job's
  // id), then record it as done. Written whole, then linked into place:
  // the link fails if another instance recorded it first.
  await shoal('/api/notifications/events', {
    user_id: payload.user,
    kind: 'greeting.sent',
    data: { job: id, text: payload.text, attempt, pid: process.pid },
  });
  const tmp = `${record}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify({ job: id, user: payload.user, text: payload.text, attempt, pid: process.pid }));
  try {
    fs.linkSync(tmp, record);
  } catch (e) {
    if (e.code !== 'EEXIST') throw e;
  } finally {
    fs.rmSync(tmp, { force: true });
  }
  // Long work still running when the instance dies is delivered again.
  if (payload.hold_ms) await sleep(payload.hold_ms);
  return { done: true };
});

// --- joining and leaving the gateway's pool ----------------------------

let me;
async function gateway(action) {
  const r = await fetch(`${config.shoal}/_gateway/admin/${action}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${config.token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ pool: config.pool, url: me, ttl_secs: config.ttlSecs }),
    signal: AbortSignal.timeout(3000),
  });
  if (!r.ok) throw new Error(`${action} answered ${r.status}: ${(await r.text()).slice(0, 300)}`);
}

// Out of the pool first; then a moment for requests the gateway had
// already sent this way (and its pooled connections) to finish, as
// Shoal's own instances wait `serve.drain_delay_ms`; then close.
const DRAIN_DELAY_MS = 1000;
async function stop(signal) {
  if (draining) return;
  draining = true;
  app.log.info({ signal }, 'leaving the pool, then closing');
  await gateway('deregister').catch((e) => app.log.warn({ err: e.message }, 'deregister failed'));
  await sleep(DRAIN_DELAY_MS);
  await app.close();
  process.exit(0);
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));

await app.listen({ port: config.port, host: config.host });
me = `http://${config.host}:${app.server.address().port}`;
// Registered at once, then renewed at a third of the TTL: a killed
// instance drops out when its registration lapses (the health checks
// take it out of rotation sooner).
async function renew() {
  if (draining) return;
  try {
    await gateway('register');
  } catch (e) {
    app.log.warn({ err: e.message }, 'registration failed; retrying');
  }
}
await renew();
setInterval(renew, (config.ttlSecs * 1000) / 3).unref();
console.log(JSON.stringify({ msg: 'serving', url: me, pool: config.pool, pid: process.pid }));
