// The example service behind a real `shoal up`: two instances of it
// register under /api/greetings; the gateway checks sessions for it; jobs
// it enqueues over HTTP are pushed back to it (a failed first attempt is
// retried; an instance SIGKILLed mid-job does not make the job run twice);
// its events reach the user's SSE stream on a Shoal instance.
//
//   SHOAL_BIN=target/debug/shoal node --test examples/node-service/test/
//
// Needs the shoal binary (SHOAL_BIN, default target/debug/shoal from the
// repository root) and `npm ci` in examples/node-service.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

const here = path.dirname(new URL(import.meta.url).pathname);
const root = path.resolve(here, '../../..');
const bin = path.resolve(process.env.SHOAL_BIN ?? path.join(root, 'target/debug/shoal'));
const server = path.resolve(here, '../server.js');
const PUSH_SECRET = 'greetings-push-secret-0123456789';
// Shoal reads every SHOAL_* variable as a setting: not this one.
const baseEnv = { ...process.env };
delete baseEnv.SHOAL_BIN;

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'shoal-node-example-'));
const dataDir = path.join(dir, 'node-data');
let up;
const instances = [];
let base;
let token;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

async function until(what, check, ms = 30000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const got = await check();
    if (got) return got;
    if (Date.now() > deadline) {
      const log = fs.existsSync(path.join(dir, 'up.log')) ? fs.readFileSync(path.join(dir, 'up.log'), 'utf8') : '';
      throw new Error(`timed out waiting for ${what}\n--- shoal up log (tail) ---\n${log.slice(-4000)}`);
    }
    await sleep(100);
  }
}

// One instance of the example; resolves once it has registered.
async function startInstance() {
  const child = spawn(process.execPath, [server], {
    env: { ...baseEnv, PORT: '0', SHOAL_URL: base, SHOAL_TOKEN: token, SHOAL_PUSH_SECRET: PUSH_SECRET, DATA_DIR: dataDir },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = readline.createInterface({ input: child.stdout });
  const serving = await new Promise((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`the example exited with ${code}`)));
    lines.on('line', (line) => {
      try {
        const msg = JSON.parse(line);
        if (msg.msg === 'serving') resolve(msg);
      } catch {}
    });
  });
  const instance = { child, pid: child.pid, url: serving.url };
  instances.push(instance);
  return instance;
}

before(async () => {
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  // The service's token (stdout), and the entries that accept it
  // (stderr), from the CLI, as docs/node-quickstart.md does.
  const made = spawnSync(bin, ['token', 'new', '--name', 'greetings', '--scope', 'jobs:enqueue', '--scope', 'events:publish', '--pool', 'greetings'], {
    cwd: dir,
    encoding: 'utf8',
    env: baseEnv,
  });
  assert.equal(made.status, 0, made.stderr);
  token = made.stdout.trim();
  const entries = made.stderr.split('\n').filter((l) => /^(\[\[|[a-z0-9_]+ = )/.test(l));
  assert.equal(entries.length, 8, made.stderr);
  fs.writeFileSync(
    path.join(dir, 'shoal.toml'),
    `
[[gateway.pools]]
name = "greetings"
upstreams = []

# Only logged-in users reach the service; it gets their id.
[[gateway.routes]]
prefix = "/api/greetings"
pool = "greetings"
require_session = true

# Where Shoal pushes its jobs (signed, so no session).
[[gateway.routes]]
prefix = "/hooks/greetings"
pool = "greetings"

[[worker.push]]
queue = "greetings"
url = "${base}/hooks/greetings/jobs"
secret = "${PUSH_SECRET}"

${entries.join('\n').replaceAll('[[', '\n[[')}
`,
  );
  const log = fs.openSync(path.join(dir, 'up.log'), 'w');
  up = spawn(bin, ['up', '--port', String(port), '--instances', '1', '--data-dir', path.join(dir, 'data')], {
    env: { ...baseEnv, SHOAL_CONFIG: path.join(dir, 'shoal.toml'), SHOAL_LOG__LEVEL: 'warn', SHOAL_UP__LOGS: 'json' },
    stdio: ['ignore', log, log],
  });
  await until('shoal up', async () => (await fetch(`${base}/api/openapi.json`).catch(() => null))?.ok, 120000);
  await startInstance();
  await startInstance();
});

after(async () => {
  for (const i of instances) i.child.kill('SIGTERM');
  if (up) {
    up.kill('SIGTERM');
    await new Promise((r) => (up.exitCode !== null ? r() : up.once('exit', r)));
  }
  fs.rmSync(dir, { recursive: true, force: true });
});

async function logIn(email) {
  const creds = { email, password: 'correct horse battery staple' };
  const json = { 'content-type': 'application/json' };
  const signup = await fetch(`${base}/api/accounts/signup`, { method: 'POST', headers: json, body: JSON.stringify(creds) });
  assert.ok(signup.ok, `signup: ${signup.status}`);
  const login = await fetch(`${base}/api/accounts/login`, { method: 'POST', headers: json, body: JSON.stringify(creds) });
  assert.equal(login.status, 200);
  const cookie = login.headers.getSetCookie().find((c) => c.startsWith('shoal_session=')).split(';')[0];
  return { id: (await login.json()).id, cookie };
}

// The user's SSE stream on a Shoal instance, collected as it arrives.
function openStream(cookie) {
  const events = [];
  const ctl = new AbortController();
  const done = (async () => {
    const r = await fetch(`${base}/api/notifications/stream`, { headers: { cookie }, signal: ctl.signal });
    assert.equal(r.status, 200);
    const decoder = new TextDecoder();
    let buf = '';
    for await (const chunk of r.body) {
      buf += decoder.decode(chunk, { stream: true });
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
        if (data) events.push(JSON.parse(data));
      }
    }
  })().catch((e) => {
    if (e.name !== 'AbortError') throw e;
  });
  return { events, close: () => ctl.abort(), done };
}

const sentOf = (events, job) => events.filter((e) => e.kind === 'greeting.sent' && e.data.job === job);

test('only a logged-in user reaches the service, with a verified id, on both instances', async () => {
  const anonymous = await fetch(`${base}/api/greetings/hello`);
  assert.equal(anonymous.status, 401);
  const forged = await fetch(`${base}/api/greetings/hello`, { headers: { 'x-shoal-user-id': 'someone-else' } });
  assert.equal(forged.status, 401, 'a forged id header opens nothing');
  const { id, cookie } = await logIn('ada@example.com');
  const pids = new Set();
  await until('both instances to answer', async () => {
    const answers = await Promise.all(
      Array.from({ length: 16 }, () =>
        fetch(`${base}/api/greetings/hello`, { headers: { cookie, 'x-shoal-user-id': 'someone-else' } }),
      ),
    );
    for (const a of answers) {
      assert.equal(a.status, 200);
      const body = await a.json();
      assert.equal(body.hello, id, 'the forged header was replaced by the session user');
      pids.add(body.pid);
    }
    return pids.size === 2;
  });
});

test('a job enqueued over HTTP is pushed back, retried after a failed first attempt, and tells the user', async () => {
  const { cookie } = await logIn('grace@example.com');
  const stream = openStream(cookie);
  await sleep(300);
  const r = await fetch(`${base}/api/greetings`, {
    method: 'POST',
    headers: { cookie, 'content-type': 'application/json' },
    body: JSON.stringify({ text: 'hello from node', fail_first: true }),
  });
  assert.equal(r.status, 202);
  const { job } = await r.json();
  const [event] = await until('the greeting.sent event', async () => sentOf(stream.events, job)[0] && sentOf(stream.events, job));
  assert.equal(event.data.text, 'hello from node');
  assert.equal(event.data.attempt, 2, 'the first attempt failed on purpose; the second did it');
  // The service tells the user, then records the job as done: the event
  // can arrive before the record is written.
  const file = path.join(dataDir, 'sent', `${job}.json`);
  const record = await until('the record of the job', async () => fs.existsSync(file) && JSON.parse(fs.readFileSync(file, 'utf8')));
  assert.equal(record.attempt, 2);
  // Bad input is refused by the service and enqueues nothing.
  const bad = await fetch(`${base}/api/greetings`, {
    method: 'POST',
    headers: { cookie, 'content-type': 'application/json' },
    body: JSON.stringify({ text: '' }),
  });
  assert.equal(bad.status, 422);
  stream.close();
});

test('a job whose instance is SIGKILLed mid-run is delivered again and done once', async () => {
  const { cookie } = await logIn('linus@example.com');
  const stream = openStream(cookie);
  await sleep(300);
  const r = await fetch(`${base}/api/greetings`, {
    method: 'POST',
    headers: { cookie, 'content-type': 'application/json' },
    body: JSON.stringify({ text: 'slow work', hold_ms: 8000 }),
  });
  assert.equal(r.status, 202);
  const { job } = await r.json();
  const recordPath = path.join(dataDir, 'sent', `${job}.json`);
  // The work is done and recorded; the instance still holds the request.
  const record = await until('the job to start', () => fs.existsSync(recordPath) && JSON.parse(fs.readFileSync(recordPath, 'utf8')));
  const victim = instances.find((i) => i.pid === record.pid);
  assert.ok(victim, `the record names one of our instances: ${JSON.stringify(record)}`);
  process.kill(victim.pid, 'SIGKILL');
  // Shoal sees the delivery fail and delivers again, to the survivor,
  // which knows the job's id and does not do it twice.
  const repeatsPath = path.join(dataDir, 'repeats.log');
  const repeat = await until('the repeat delivery', () =>
    fs.existsSync(repeatsPath) && fs.readFileSync(repeatsPath, 'utf8').split('\n').find((l) => l.startsWith(`${job} `)),
  );
  const [, attempt, pid] = repeat.split(' ');
  assert.equal(Number(attempt), 2);
  assert.notEqual(Number(pid), victim.pid);
  await sleep(500);
  assert.equal(sentOf(stream.events, job).length, 1, 'the user was told once');
  assert.equal(fs.readdirSync(path.join(dataDir, 'sent')).filter((f) => f.startsWith(job)).length, 1);
  stream.close();
});

test('an instance stopped with SIGTERM leaves the pool without failing a request', async () => {
  const { cookie } = await logIn('margaret@example.com');
  const leaving = await startInstance();
  const pools = async () => {
    const token = fs.readFileSync(path.join(dir, 'data/secrets/admin-token'), 'utf8').trim();
    const r = await fetch(`${base}/_gateway/pools`, { headers: { authorization: `Bearer ${token}` } });
    const pool = (await r.json()).pools.find((p) => p.name === 'greetings');
    return pool.instances.map((i) => i.url);
  };
  assert.ok((await pools()).includes(leaving.url));
  let failures = 0;
  let answered = 0;
  const failed = [];
  let stop = false;
  const load = Array.from({ length: 8 }, async () => {
    while (!stop) {
      const r = await fetch(`${base}/api/greetings/hello`, { headers: { cookie } }).catch((e) => e);
      if (r?.status === 200) answered++;
      else {
        failures++;
        failed.push(r instanceof Error ? r.message : `${r.status} ${await r.text()}`);
        continue;
      }
      await r.arrayBuffer();
    }
  });
  await sleep(500);
  const exited = new Promise((r) => leaving.child.once('exit', (code) => r(code)));
  leaving.child.kill('SIGTERM');
  assert.equal(await exited, 0, 'it drained and exited cleanly');
  await sleep(500);
  stop = true;
  await Promise.all(load);
  assert.equal(failures, 0, `${failures} of ${answered + failures} requests failed: ${failed.slice(0, 5).join(' | ')}`);
  assert.ok(answered > 50, `${answered} answered`);
  assert.ok(!(await pools()).includes(leaving.url), 'it is out of the pool');
});
