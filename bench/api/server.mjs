// The Node.js peer of bench/api.sh (issue 20): a Fastify 5 app in a
// `node:cluster` of WORKERS processes, each doing the same work as Shoal's
// `serve` for the measured paths — the same data (schema.mjs, seed.mjs),
// lookups, validation, status codes, headers and body shapes:
//
//   GET  /api/catalog/products/:id  crates/services/catalog: an in-process
//        cache of the product's JSON bytes (lru-cache, sized in bytes as
//        Shoal's moka L1 is; TTL 300 s with 10% jitter, "not found" cached
//        5 s, XFetch early refresh, tag invalidation checked on every hit),
//        SQLite on a miss; Cache-Control, a strong ETag (first 128 bits of
//        the body's SHA-256, computed per response as Shoal does), 304 on
//        If-None-Match, Surrogate-Key, Cache-Tag, Vary; 404 problem+json.
//   GET  /api/catalog/products      a list page cached the same way (key
//        catalog:list:{page}:{per_page}:{q}, tag `products`), 422 on bad
//        query parameters.
//   GET  /api/accounts/me           crates/runtime/src/session*.rs and
//        crates/backends/src/sessions.rs: cookie -> SHA-256 of the token ->
//        a 1 s in-process session cache (Shoal's `cache.session_ttl_ms`) ->
//        the session hash in Redis (HGETALL, sliding expiry) -> the user's
//        JSON from the query cache (60 s; SQLite on a miss); 401
//        problem+json without a session.
//   POST /api/accounts/signup, /api/accounts/login (scrypt instead of
//        argon2id; login has no attempt throttling or device cookie: it is
//        only how the benchmark gets a cookie, and is not measured).
//   POST /api/orders                crates/services/orders: session,
//        Idempotency-Key, the same validation, the idempotency lookup, ONE
//        stock reservation for every line from the catalog route
//        (POST /api/catalog/reservations: a SQLite transaction holding
//        each line's stock, with the service token) over HTTP keep-alive
//        (as Shoal's ServiceClient calls its catalog instances over
//        loopback: CATALOG_URL, by default this cluster's own port), then ONE SQLite
//        transaction inserting the order and its `payments.charge` job row
//        (the outbox, as Shoal's job store enqueues inside the transaction);
//        201 with the order.
//   GET  /healthz, /readyz.
//
// Around every route, what Shoal's standard middleware does that a Node
// team would also do: a request id (incoming `x-request-id` or a new one,
// echoed), `x-shoal-instance`, the security headers (nosniff, DENY,
// referrer policy, CSP on JSON), the cross-origin refusal for unsafe
// requests carrying the session cookie, problem+json for every error, a
// 1 MiB body limit. Not done here (Shoal does): Prometheus metrics per
// request, per-request tracing spans, load shedding and the per-request
// deadline. Access logs: off unless LOG=1 (pino at info, to stdout), as
// bench/api.sh runs Shoal at SHOAL_LOG__LEVEL=warn.
//
// Compression: @fastify/compress at its defaults, as a Node team would run
// it: threshold 1024 bytes (smaller bodies are sent as they are), brotli
// at quality 4 preferred over gzip for `gzip, deflate, br`, compressed on
// every response (nothing is kept compressed). Shoal's own layer may pick
// another encoding or threshold: bench/api.sh's report lists each side's
// Content-Encoding and bytes on the wire for every path.
//
// SQLite: @photostructure/sqlite, the node:sqlite API (DatabaseSync) with
// its prebuilt binary inside the npm package: Node 20 has no node:sqlite,
// better-sqlite3 12 downloads its binary from GitHub at install time, and
// better-sqlite3 13's bundled binary needs Node 22. Synchronous, like
// better-sqlite3.
//
// Env: PORT (3000), WORKERS (2), DB (api-data/api.db, made by seed.mjs),
// REDIS_URL (redis://127.0.0.1:6379), REDIS_PREFIX (shoal-api-peer),
// CATALOG_URL (http://127.0.0.1:$PORT), INSTANCE (node@127.0.0.1:$PORT),
// LOG (0).
import cluster from "node:cluster";
import { createHash, randomBytes, randomUUID, scrypt, timingSafeEqual } from "node:crypto";
import { promisify } from "node:util";
import Fastify from "fastify";
import compress from "@fastify/compress";
import { Redis } from "ioredis";
import { LRUCache } from "lru-cache";
import { Pool } from "undici";
import { open, uuidv7 } from "./schema.mjs";

const PORT = Number(process.env.PORT ?? 3000);
const WORKERS = Number(process.env.WORKERS ?? 2);

if (cluster.isPrimary) {
  let stopping = false;
  for (let i = 0; i < WORKERS; i++) cluster.fork();
  cluster.on("exit", (worker, code, signal) => {
    if (!stopping) {
      console.error(`worker ${worker.process.pid} died (${signal ?? code}); stopping`);
      stopping = true;
      for (const w of Object.values(cluster.workers)) w.kill();
      process.exit(1);
    }
  });
  const stop = () => {
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.kill();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
} else {
  // The primary is gone (killed): go too.
  process.on("disconnect", () => process.exit(0));
  await worker();
}

async function worker() {
  const DB = process.env.DB ?? "api-data/api.db";
  const REDIS_URL = process.env.REDIS_URL ?? "redis://127.0.0.1:6379";
  const PREFIX = process.env.REDIS_PREFIX ?? "shoal-api-peer";
  const CATALOG_URL = process.env.CATALOG_URL ?? `http://127.0.0.1:${PORT}`;
  const INSTANCE = process.env.INSTANCE ?? `node@127.0.0.1:${PORT}`;
  // clients.token: what the orders route presents to the catalog's.
  const SERVICE_TOKEN = process.env.SERVICE_TOKEN ?? "shoal-development-service-token";
  const timingSafeEqualStr = (a, b) => {
    const x = Buffer.from(a);
    const y = Buffer.from(b);
    return x.length === y.length && timingSafeEqual(x, y);
  };

  // Shoal's defaults (crates/core/src/settings).
  const CATALOG_TTL_MS = 300_000;
  const CACHE_CONTROL = "public, max-age=10, s-maxage=60, stale-while-revalidate=30";
  const COOKIE = "shoal_session";
  const IDLE_MS = 7 * 24 * 3600 * 1000;
  const ABSOLUTE_MS = 30 * 24 * 3600 * 1000;
  const MIN_PASSWORD = 8;
  const ALLOWED_ORIGINS = []; // serve.allowed_origins

  const db = open(DB);
  const redis = new Redis(REDIS_URL, { lazyConnect: false });
  const sub = new Redis(REDIS_URL);
  const origin = randomUUID();

  // ------------------------------------------------------------ problems

  const PROBLEM_JSON = "application/problem+json";
  class Problem extends Error {
    constructor(status, slug, title, detail) {
      super(detail);
      this.status = status;
      this.body = { type: `https://shoal.dev/problems/${slug}`, title, status, detail };
    }
    field(field, message) {
      (this.body.errors ??= []).push({ field, message });
      return this;
    }
    get hasErrors() {
      return (this.body.errors?.length ?? 0) > 0;
    }
  }
  const badRequest = (d) => new Problem(400, "bad-request", "Bad request", d);
  const unauthorized = (d) => new Problem(401, "unauthorized", "Unauthorized", d);
  const forbidden = (d) => new Problem(403, "forbidden", "Forbidden", d);
  const notFound = (d) => new Problem(404, "not-found", "Not found", d);
  const conflict = (d) => new Problem(409, "conflict", "Conflict", d);
  const validation = (d) => new Problem(422, "validation", "Validation failed", d);
  const internal = () =>
    new Problem(500, "internal", "Internal server error", "the server failed to handle this request; it has been logged");
  function unavailable(d, retryAfter) {
    const p = new Problem(503, "unavailable", "Service unavailable", d);
    p.body.retry_after = retryAfter;
    return p;
  }
  function sendProblem(reply, p) {
    reply.code(p.status).header("content-type", PROBLEM_JSON);
    if (p.body.retry_after !== undefined) reply.header("retry-after", String(p.body.retry_after));
    return reply.send(Buffer.from(JSON.stringify(p.body)));
  }

  // ------------------------------------------------------------ query cache

  // Shoal's QueryCache L1 (crates/runtime/src/cache.rs), without L2 (off
  // by default there too). Loaders here are synchronous SQLite reads, so
  // no two loads of one key can interleave within a worker: single flight
  // comes for free.
  const cache = {
    lru: new LRUCache({
      maxSize: 64 * 1024 * 1024,
      sizeCalculation: (v, k) => k.length + (v.value ? v.value.length : 0) + 96,
    }),
    seq: 1,
    clearedSeq: 0,
    tagSeqs: new Map(),
    valid(e) {
      if (Date.now() >= e.expiresAt || e.loadedSeq < this.clearedSeq) return false;
      for (const t of e.tags) {
        const s = this.tagSeqs.get(t);
        if (s !== undefined && s > e.loadedSeq) return false;
      }
      return true;
    },
    // XFetch, beta 1.0.
    refreshEarly(e) {
      if (e.value === null) return false;
      const r = Math.max(Math.random(), Number.MIN_VALUE);
      const gap = Math.min(e.deltaMs * -Math.log(r), 3_600_000);
      return Date.now() + gap >= e.expiresAt;
    },
    jittered(ttl) {
      return ttl * Math.max(0.01, 1 + 0.1 * (Math.random() * 2 - 1));
    },
    getOrLoad(key, tags, ttlMs, loader) {
      const seen = this.lru.get(key);
      if (seen && this.valid(seen) && !this.refreshEarly(seen)) return seen.value;
      const loadedSeq = this.seq;
      const started = performance.now();
      const value = loader();
      const deltaMs = performance.now() - started;
      const ttl = Math.min(ttlMs, 3_600_000);
      const life = value !== null ? this.jittered(ttl) : this.jittered(Math.min(5000, ttl));
      this.lru.set(key, { value, tags, loadedSeq, expiresAt: Date.now() + life, deltaMs });
      return value;
    },
    invalidateLocal(tags) {
      const seq = ++this.seq;
      for (const t of tags) this.tagSeqs.set(t, seq);
    },
  };

  // ------------------------------------------------------------ sessions

  // CachedSessionStore in front of RedisSessionStore.
  const sessionCache = new LRUCache({ max: 100_000, ttl: 1000 });
  let sessionEpoch = 0;
  const sha256hex = (s) => createHash("sha256").update(s).digest("hex");
  const plausible = (t) => t.length === 43 && /^[A-Za-z0-9_-]+$/.test(t);
  const sessionKey = (hash) => `${PREFIX}:session:${hash}`;
  const userKey = (id) => `${PREFIX}:user-sessions:${id}`;
  const SLIDE_MS = Math.min(IDLE_MS / 10, 60_000);

  // Other workers' logouts, and cache invalidations, as Shoal's bus
  // carries them (nothing publishes in this benchmark).
  await sub.subscribe(`${PREFIX}:sessions.invalidate`, `${PREFIX}:cache.invalidate`);
  sub.on("message", (channel, payload) => {
    try {
      const m = JSON.parse(payload);
      if (channel.endsWith("cache.invalidate")) {
        if (m.origin !== origin) cache.invalidateLocal(m.tags);
      } else {
        sessionEpoch++;
        if (m.kind === "token") sessionCache.delete(m.hash);
        else for (const [k, s] of sessionCache.entries()) if (s.user_id === m.user_id) sessionCache.delete(k);
      }
    } catch {
      /* unreadable message */
    }
  });

  async function touchStore(token, hash) {
    if (!plausible(token)) return null;
    const now = Date.now();
    const key = sessionKey(hash);
    const f = await redis.hgetall(key);
    const num = (k) => (f[k] !== undefined && /^-?\d+$/.test(f[k]) ? Number(f[k]) : undefined);
    const userId = f.user_id;
    const createdAt = num("created_at");
    const expiresAt = num("expires_at");
    const absolute = num("absolute");
    if (userId === undefined || createdAt === undefined || expiresAt === undefined || absolute === undefined) {
      return null;
    }
    if (expiresAt <= now) return null;
    const wanted = Math.min(now + IDLE_MS, absolute);
    let expires = expiresAt;
    if (wanted - expiresAt > SLIDE_MS) {
      if ((await redis.pexpireat(key, wanted)) === 0) return null;
      await redis.hset(key, "expires_at", wanted);
      expires = wanted;
    }
    return { token, user_id: userId, created_at: createdAt, expires_at: expires, absolute_expires_at: absolute };
  }

  async function touch(token) {
    const hash = sha256hex(token);
    const s = sessionCache.get(hash);
    if (s) {
      const now = Date.now();
      if (s.expires_at > now && s.absolute_expires_at > now) return { ...s, token };
    }
    const epoch = sessionEpoch;
    const found = await touchStore(token, hash);
    if (found && sessionEpoch === epoch) sessionCache.set(hash, { ...found, token: "" });
    return found;
  }

  async function createSession(userId) {
    const now = Date.now();
    const absolute = now + ABSOLUTE_MS;
    const token = randomBytes(32).toString("base64url");
    const session = { token, user_id: userId, created_at: now, expires_at: Math.min(now + IDLE_MS, absolute), absolute_expires_at: absolute };
    const hash = sha256hex(token);
    const key = sessionKey(hash);
    await redis
      .multi()
      .hset(key, { user_id: userId, created_at: String(now), expires_at: String(session.expires_at), absolute: String(absolute) })
      .pexpireat(key, session.expires_at)
      .sadd(userKey(userId), hash)
      .pexpireat(userKey(userId), absolute)
      .exec();
    return session;
  }

  async function deleteSession(token) {
    const hash = sha256hex(token);
    const key = sessionKey(hash);
    const userId = await redis.hget(key, "user_id");
    const m = redis.multi().del(key);
    if (userId) m.srem(userKey(userId), hash);
    await m.exec();
    sessionEpoch++;
    sessionCache.delete(hash);
    await redis.publish(`${PREFIX}:sessions.invalidate`, JSON.stringify({ kind: "token", hash }));
  }

  /** The value of cookie `name`, as Shoal's `cookie_value` finds it. */
  function cookieValue(header, name) {
    if (!header) return null;
    for (const part of header.split(";")) {
      const pair = part.trim();
      const i = pair.indexOf("=");
      if (i < 0) continue;
      if (pair.slice(0, i) === name) return pair.slice(i + 1).replace(/^"+|"+$/g, "");
    }
    return null;
  }

  /** Shoal's `CurrentSession` extractor: the live session or a 401 problem. */
  async function currentSession(req) {
    const token = cookieValue(req.headers.cookie, COOKIE);
    if (token === null) {
      throw unauthorized(`this needs a session: log in first (no \`${COOKIE}\` cookie was sent)`);
    }
    const s = await touch(token);
    if (!s) throw unauthorized("the session has expired or was ended: log in again");
    return s;
  }

  // ------------------------------------------------------------ SQL

  const PRODUCT_COLUMNS = "id, sku, name, description, price_cents, currency, stock, image_url, tags, created_at, updated_at";
  const q = {
    product: db.prepare(`SELECT ${PRODUCT_COLUMNS} FROM products WHERE id = ?`),
    page: db.prepare(`SELECT ${PRODUCT_COLUMNS} FROM products ORDER BY id LIMIT ? OFFSET ?`),
    count: db.prepare("SELECT COUNT(*) AS n FROM products"),
    searchPage: db.prepare(
      `SELECT ${PRODUCT_COLUMNS} FROM products WHERE LOWER(name) LIKE ?1 ESCAPE '\\' OR LOWER(description) LIKE ?1 ESCAPE '\\' ORDER BY id LIMIT ?2 OFFSET ?3`,
    ),
    searchCount: db.prepare(
      "SELECT COUNT(*) AS n FROM products WHERE LOWER(name) LIKE ?1 ESCAPE '\\' OR LOWER(description) LIKE ?1 ESCAPE '\\'",
    ),
    userById: db.prepare("SELECT id, email, name, created_at FROM users WHERE id = ?"),
    userByEmail: db.prepare("SELECT id, email, name, password_hash, created_at FROM users WHERE email = ?"),
    insertUser: db.prepare(
      "INSERT INTO users (id, email, password_hash, name, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (email) DO NOTHING",
    ),
    orderByKey: db.prepare("SELECT request_hash, response FROM orders WHERE user_id = ? AND idempotency_key = ?"),
    insertOrder: db.prepare(
      `INSERT INTO orders (id, user_id, status, items, total_cents, currency, payment_method,
          idempotency_key, request_hash, response, created_at, updated_at, reservation_id)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (user_id, idempotency_key) DO NOTHING`,
    ),
    reservationById: db.prepare("SELECT items, result FROM stock_reservations WHERE id = ?"),
    holdStock: db.prepare(
      `UPDATE products SET stock = stock - ?1, updated_at = ?2
       WHERE id = ?3 AND stock >= ?1 RETURNING name, price_cents, currency`,
    ),
    stockOf: db.prepare("SELECT stock FROM products WHERE id = ?"),
    insertReservation: db.prepare(
      `INSERT INTO stock_reservations (id, items, status, result, created_at, updated_at)
       VALUES (?, ?, 'held', ?, ?, ?) ON CONFLICT (id) DO NOTHING`,
    ),
    insertJob: db.prepare(
      `INSERT INTO shoal_jobs (id, queue, kind, payload, priority, state,
          run_at, attempts, max_attempts, unique_key, timeout_ms, trace_id, errors, created_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, '[]', ?)
       ON CONFLICT (unique_key) DO NOTHING`,
    ),
    jobByKey: db.prepare("SELECT id FROM shoal_jobs WHERE unique_key = ?"),
    ping: db.prepare("SELECT 1"),
  };

  /** Enqueues a job on the open transaction (Shoal's `insert_job`). */
  function enqueue(queue, kind, payload, { uniqueKey = null, maxAttempts = 20, traceId = null } = {}) {
    const now = Date.now();
    const id = uuidv7(randomUUID);
    const r = q.insertJob.run(id, queue, kind, JSON.stringify(payload), 0, "available", now, maxAttempts, uniqueKey, 300_000, traceId, now);
    if (r.changes === 0) return q.jobByKey.get(uniqueKey).id;
    return id;
  }

  /**
   * `fn` in one transaction: BEGIN, then COMMIT, or ROLLBACK when `fn`
   * throws or returns `ROLLBACK` (sqlx's `begin` is a deferred BEGIN too).
   */
  const ROLLBACK = Symbol("rollback");
  function transaction(fn) {
    db.exec("BEGIN");
    try {
      const out = fn();
      db.exec(out === ROLLBACK ? "ROLLBACK" : "COMMIT");
      return out;
    } catch (e) {
      if (db.isTransaction) db.exec("ROLLBACK");
      throw e;
    }
  }

  // ------------------------------------------------------------ catalog

  const parseTags = (t) => {
    try {
      const v = JSON.parse(t);
      return Array.isArray(v) ? v : [];
    } catch {
      return [];
    }
  };
  // Keys in the order of Shoal's `Product` struct, so the JSON is the same.
  const product = (r) => ({
    id: r.id,
    sku: r.sku,
    name: r.name,
    description: r.description,
    price_cents: r.price_cents,
    currency: r.currency,
    stock: r.stock,
    image_url: r.image_url,
    tags: parseTags(r.tags),
    created_at: r.created_at,
    updated_at: r.updated_at,
  });

  function etagOf(body) {
    return `"${createHash("sha256").update(body).digest().subarray(0, 16).toString("hex")}"`;
  }
  function noneMatch(header, etag) {
    if (!header) return false;
    for (const raw of header.split(",")) {
      let t = raw.trim();
      while (t.startsWith("W/")) t = t.slice(2);
      if (t === etag || t === "*") return true;
    }
    return false;
  }
  /** Shoal's `public_response`. */
  function publicResponse(req, reply, body, tags) {
    const etag = etagOf(body);
    reply
      .header("cache-control", CACHE_CONTROL)
      .header("etag", etag)
      .header("surrogate-key", tags.join(" "))
      .header("cache-tag", tags.join(","))
      .header("vary", "accept-encoding");
    if (noneMatch(req.headers["if-none-match"], etag)) return reply.code(304).send();
    return reply.header("content-type", "application/json").send(body);
  }

  function cachedProduct(id) {
    if (id.length === 0 || id.length > 64) return null;
    return cache.getOrLoad(`catalog:product:${id}`, [`product:${id}`], CATALOG_TTL_MS, () => {
      const r = q.product.get(id);
      return r ? Buffer.from(JSON.stringify(product(r))) : null;
    });
  }

  function parseListQuery(raw) {
    const p = validation("some query parameters are invalid; see `errors`");
    const one = (v) => (Array.isArray(v) ? v[v.length - 1] : v);
    const number = (name, dflt, max) => {
      const v = one(raw[name])?.trim();
      if (v === undefined || v === "") return dflt;
      const n = /^\+?\d+$/.test(v) ? Number(v) : NaN;
      if (Number.isInteger(n) && n >= 1 && n <= max) return n;
      p.field(name, `must be a whole number from 1 to ${max}`);
      return dflt;
    };
    const page = number("page", 1, 10_000);
    const perPage = number("per_page", 20, 100);
    const query = (one(raw.q) ?? "").trim();
    if ([...query].length > 100) p.field("q", "must be at most 100 characters");
    if (p.hasErrors) throw p;
    return { page, perPage, query };
  }
  function likePattern(s) {
    let out = "%";
    for (const c of s.toLowerCase()) out += c === "%" || c === "_" || c === "\\" ? `\\${c}` : c;
    return `${out}%`;
  }

  // ------------------------------------------------------------ accounts

  function normalizeEmail(raw) {
    const email = String(raw).trim().toLowerCase();
    if (email === "") return [null, "is required"];
    if (Buffer.byteLength(email) > 254) return [null, "must be at most 254 characters"];
    const at = email.indexOf("@");
    const bad = [null, "must be an address such as ada@example.com"];
    if (at < 0) return bad;
    const local = email.slice(0, at);
    const domain = email.slice(at + 1);
    if (
      local === "" || domain.length < 3 || !domain.includes(".") || domain.startsWith(".") ||
      domain.endsWith(".") || /[\s\p{Cc}]/u.test(email) || domain.includes("@")
    ) {
      return bad;
    }
    return [email, null];
  }
  const scryptAsync = promisify(scrypt);
  async function hashPassword(password) {
    const salt = randomBytes(16);
    const key = await scryptAsync(password, salt, 32);
    return `scrypt$${salt.toString("base64")}$${key.toString("base64")}`;
  }
  async function verifyPassword(password, stored) {
    const [, salt, key] = stored.split("$");
    const want = Buffer.from(key, "base64");
    const got = await scryptAsync(password, Buffer.from(salt, "base64"), want.length);
    return timingSafeEqual(got, want);
  }
  const DUMMY_HASH = await hashPassword("no account has this password");

  /**
   * serde's `deny_unknown_fields` and required-field errors, as the 422s
   * Shoal's `ApiJson` makes of them (`at` is the path of `body`, e.g.
   * `items[0].`; serde's "at line L column C" is left out).
   */
  function shape(body, fields, required, at = "") {
    if (body === null || typeof body !== "object" || Array.isArray(body)) {
      throw validation("the JSON body does not have the expected shape: invalid type, expected a JSON object");
    }
    for (const k of Object.keys(body)) {
      if (!fields.includes(k)) {
        const message = `${at}${k}: unknown field \`${k}\`, expected one of ${fields.map((f) => `\`${f}\``).join(", ")}`;
        throw validation(`the JSON body does not have the expected shape: ${message}`).field(`${at}${k}`, message);
      }
    }
    for (const k of required) {
      if (body[k] === undefined) {
        throw validation(`the JSON body does not have the expected shape: missing field \`${k}\``).field(k, "is required");
      }
    }
  }
  function typed(ok, field, what) {
    if (!ok) {
      const message = `${field}: invalid type: expected ${what}`;
      throw validation(`the JSON body does not have the expected shape: ${message}`).field(field, message);
    }
  }

  // ------------------------------------------------------------ orders

  // Shoal's ServiceClient: one deadline for the call (2 s), up to 2
  // retries after connect errors, timeouts and 5xx, a circuit breaker
  // (open after 5 consecutive failures, for 5 s), 404 -> null.
  const catalog = {
    pool: new Pool(CATALOG_URL, { connections: 32, keepAliveTimeout: 60_000 }),
    failures: 0,
    openUntil: 0,
    record(ok) {
      if (ok) {
        this.failures = 0;
        this.openUntil = 0;
      } else if (++this.failures >= 5) {
        this.openUntil = Date.now() + 5000;
      }
    },
    // 4xx answers come back as { status, problem } for the caller to read.
    async getJson(path, requestId) {
      return this.call("GET", path, undefined, requestId);
    },
    async postJson(path, body, requestId) {
      return this.call("POST", path, JSON.stringify(body), requestId);
    },
    async call(method, path, body, requestId) {
      const deadline = Date.now() + 2000;
      let last = null;
      for (let attempt = 0; attempt <= 2; attempt++) {
        if (Date.now() < this.openUntil) throw new Error("catalog: every instance's circuit breaker is open");
        const left = deadline - Date.now();
        if (left <= 0) break;
        try {
          const headers = {
            "x-shoal-deadline-ms": String(left),
            "x-request-id": requestId,
            authorization: `Bearer ${SERVICE_TOKEN}`,
          };
          if (body !== undefined) headers["content-type"] = "application/json";
          const r = await this.pool.request({
            path,
            method,
            body,
            headers,
            headersTimeout: left,
            bodyTimeout: left,
          });
          if (r.statusCode === 404) {
            await r.body.dump();
            this.record(true);
            return null;
          }
          if (r.statusCode >= 200 && r.statusCode < 300) {
            this.record(true);
            return await r.body.json();
          }
          const text = (await r.body.text()).slice(0, 16 * 1024);
          if (r.statusCode >= 500) {
            this.record(false);
            last = new Error(`catalog answered ${r.statusCode}: ${text}`);
            continue;
          }
          this.record(true);
          const refusal = new Error(`catalog answered ${r.statusCode}: ${text}`);
          refusal.status = r.statusCode;
          refusal.problem = (() => { try { return JSON.parse(text); } catch { return null; } })();
          throw refusal;
        } catch (e) {
          if (String(e.message).startsWith("catalog answered 4")) throw e;
          this.record(false);
          last = e;
        }
      }
      throw last ?? new Error("catalog: no answer within the deadline of 2000 ms");
    },
  };
  const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
  const keyReused = () =>
    validation("this Idempotency-Key was used with a different request; use a new key for a new order").field(
      "Idempotency-Key",
      "was used with another body",
    );
  // Shoal replays the stored response through serde_json's `Value`, whose
  // maps are sorted by key.
  const sorted = (v) =>
    Array.isArray(v) ? v.map(sorted)
      : v !== null && typeof v === "object" ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, sorted(v[k])]))
      : v;
  function replay(reply, stored) {
    const body = Buffer.from(JSON.stringify(sorted(JSON.parse(stored))));
    return reply.code(201).header("content-type", "application/json").header("idempotent-replayed", "true").send(body);
  }

  // ------------------------------------------------------------ the app

  const app = Fastify({
    logger: process.env.LOG === "1" ? { level: "info" } : false,
    bodyLimit: 1024 * 1024,
    // Shoal's `request_id_or_new`: a well-formed incoming id, or a new one.
    requestIdHeader: false,
    genReqId: (req) => {
      const id = req.headers["x-request-id"];
      return typeof id === "string" && id.length > 0 && id.length <= 128 && /^[A-Za-z0-9._:-]+$/.test(id) ? id : randomUUID();
    },
    keepAliveTimeout: 60_000,
  });
  await app.register(compress); // defaults: threshold 1024, br (quality 4) > gzip > deflate
  app.decorateRequest("session", null);

  // Shoal's `refuse_cross_origin`: unsafe requests (and WebSocket
  // upgrades) carrying the session cookie must come from this site.
  app.addHook("onRequest", (req, reply, done) => {
    const m = req.method;
    const upgrade = (req.headers.upgrade ?? "").toLowerCase() === "websocket";
    if ((m === "GET" || m === "HEAD" || m === "OPTIONS") && !upgrade) return done();
    const cookie = req.headers.cookie;
    if (!cookie || !cookie.split(";").some((c) => c.trimStart().startsWith(`${COOKIE}=`))) return done();
    const site = req.headers["sec-fetch-site"];
    const from = req.headers.origin;
    let seen = null;
    if (site !== undefined) {
      if (site !== "same-origin" && site !== "none" && !(from && ALLOWED_ORIGINS.includes(from.replace(/\/+$/, "").toLowerCase()))) {
        seen = `Sec-Fetch-Site: ${site}`;
      }
    } else if (from !== undefined) {
      const o = from.replace(/\/+$/, "").toLowerCase();
      const authority = o.includes("://") ? o.split("://")[1] : undefined;
      if (!((authority !== undefined && authority === (req.headers.host ?? "").toLowerCase()) || ALLOWED_ORIGINS.includes(o))) {
        seen = `Origin: ${o}`;
      }
    }
    if (seen === null) return done();
    sendProblem(
      reply,
      forbidden(`a request with this site's session cookie must come from this site (${seen}); allow other origins with serve.allowed_origins`),
    );
  });

  // Request id, instance, security headers (Shoal's `request_context`).
  app.addHook("onSend", (req, reply, payload, done) => {
    reply.header("x-request-id", req.id);
    reply.header("x-shoal-instance", INSTANCE);
    reply.header("x-content-type-options", "nosniff");
    reply.header("x-frame-options", "DENY");
    reply.header("referrer-policy", "strict-origin-when-cross-origin");
    const ct = reply.getHeader("content-type");
    if (typeof ct === "string" && (ct.startsWith("application/json") || ct.startsWith(PROBLEM_JSON))) {
      reply.header("content-security-policy", "default-src 'none'; frame-ancestors 'none'");
    }
    done(null, payload);
  });

  app.setErrorHandler((err, req, reply) => {
    if (err instanceof Problem) return sendProblem(reply, err);
    switch (err.code) {
      case "FST_ERR_CTP_INVALID_MEDIA_TYPE":
        return sendProblem(reply, new Problem(415, "unsupported-media-type", "Unsupported media type",
          "send the body as JSON with `Content-Type: application/json`"));
      case "FST_ERR_CTP_BODY_TOO_LARGE":
        return sendProblem(reply, new Problem(413, "payload-too-large", "Payload too large",
          "the request body is larger than this endpoint accepts"));
      case "FST_ERR_CTP_EMPTY_JSON_BODY":
      case "FST_ERR_CTP_INVALID_JSON_BODY":
        return sendProblem(reply, badRequest(`the body is not valid JSON: ${err.message}`));
      default:
        if (err.statusCode === 400) return sendProblem(reply, badRequest(`the body is not valid JSON: ${err.message}`));
        req.log.error(err);
        return sendProblem(reply, internal());
    }
  });
  app.setNotFoundHandler((req, reply) =>
    sendProblem(reply, new Problem(404, "not-found", "Not Found", "no route matches this path")));

  app.get("/healthz", (req, reply) => {
    reply.header("content-type", "application/json").send(Buffer.from(JSON.stringify({ instance: INSTANCE, pid: process.pid, status: "ok" })));
  });
  app.get("/readyz", async (req, reply) => {
    try {
      q.ping.get();
      await redis.ping();
    } catch {
      throw unavailable("not ready: a store does not answer", 1);
    }
    reply.header("content-type", "application/json");
    return Buffer.from(JSON.stringify({ instance: INSTANCE, status: "ready" }));
  });

  app.get("/api/catalog/products/:id", (req, reply) => {
    const id = req.params.id;
    const body = cachedProduct(id);
    if (body === null) return sendProblem(reply, notFound(`there is no product with id \`${id}\``));
    return publicResponse(req, reply, body, [`product:${id}`]);
  });

  // crates/services/catalog/src/reserve.rs: every line's stock held in
  // one transaction or none, idempotent by id, for the service token only.
  app.post("/api/catalog/reservations", (req, reply) => {
    const auth = req.headers.authorization ?? "";
    if (!timingSafeEqualStr(auth, `Bearer ${SERVICE_TOKEN}`)) {
      throw forbidden("an internal endpoint: only Shoal's own services (with clients.token) may call it");
    }
    const { id, items } = req.body ?? {};
    const itemsJson = JSON.stringify(items.map((l) => ({ product_id: l.product_id, quantity: l.quantity })));
    const stored = q.reservationById.get(id);
    if (stored) {
      if (stored.items !== itemsJson) throw conflict("this reservation id was used for other items").field("id", "already holds other items");
      reply.header("content-type", "application/json");
      return Buffer.from(stored.result);
    }
    const now = Date.now();
    const short = conflict("not enough stock for every item; nothing was held");
    const missing = validation("an item's product does not exist; nothing was held");
    let result = null;
    transaction(() => {
      const held = [];
      items.forEach((l, i) => {
        const row = q.holdStock.get(l.quantity, now, l.product_id);
        if (row) {
          held.push({ product_id: l.product_id, name: row.name, price_cents: row.price_cents, currency: row.currency, quantity: l.quantity });
        } else {
          const left = q.stockOf.get(l.product_id);
          if (left) short.field(`items[${i}].quantity`, `only ${Math.max(0, left.stock)} in stock`);
          else missing.field(`items[${i}].product_id`, "no such product");
        }
      });
      if (missing.hasErrors || short.hasErrors) return ROLLBACK;
      result = JSON.stringify({ id, items: held });
      q.insertReservation.run(id, itemsJson, result, now, now);
      return true;
    });
    if (missing.hasErrors) throw missing;
    if (short.hasErrors) throw short;
    reply.code(201).header("content-type", "application/json");
    return Buffer.from(result);
  });

  app.get("/api/catalog/products", (req, reply) => {
    const lq = parseListQuery(req.query);
    const body = cache.getOrLoad(`catalog:list:${lq.page}:${lq.perPage}:${lq.query}`, ["products"], CATALOG_TTL_MS, () => {
      const offset = (lq.page - 1) * lq.perPage;
      let rows;
      let total;
      if (lq.query === "") {
        rows = q.page.all(lq.perPage, offset);
        total = q.count.get().n;
      } else {
        const pattern = likePattern(lq.query);
        rows = q.searchPage.all(pattern, lq.perPage, offset);
        total = q.searchCount.get(pattern).n;
      }
      return Buffer.from(JSON.stringify({ items: rows.map(product), page: lq.page, per_page: lq.perPage, total }));
    });
    return publicResponse(req, reply, body, ["products"]);
  });

  app.post("/api/accounts/signup", async (req, reply) => {
    const body = req.body;
    shape(body, ["email", "password", "name"], ["email", "password"]);
    typed(typeof body.email === "string", "email", "a string");
    typed(typeof body.password === "string", "password", "a string");
    typed(body.name === undefined || body.name === null || typeof body.name === "string", "name", "a string");
    const p = validation("some fields are invalid; see `errors`");
    const [email, emailError] = normalizeEmail(body.email);
    if (emailError) p.field("email", emailError);
    const chars = [...body.password].length;
    if (chars < MIN_PASSWORD) p.field("password", `must be at least ${MIN_PASSWORD} characters`);
    else if (Buffer.byteLength(body.password) > 1024) p.field("password", "must be at most 1024 bytes");
    const name = (body.name ?? "").trim();
    if ([...name].length > 100) p.field("name", "must be at most 100 characters");
    if (p.hasErrors) throw p;
    const hash = await hashPassword(body.password);
    const user = { id: uuidv7(randomUUID), email, name, created_at: Date.now() };
    transaction(() => {
      if (q.insertUser.run(user.id, user.email, hash, user.name, user.created_at).changes === 0) {
        // The address has an account: answered as a new one (Shoal's
        // signup tells no one who has an account) and the owner told,
        // at most once an hour.
        enqueue("email", "notifications.email", { to: user.email, template: "signup_attempt", data: { email: user.email } }, {
          uniqueKey: `signup-attempt:${user.email}:${Math.floor(Date.now() / 3_600_000)}`,
          traceId: req.id,
        });
        return;
      }
      // The welcome email, in the same transaction (Shoal's notifications outbox).
      enqueue("email", "notifications.email", { to: user.email, template: "welcome", data: { email: user.email, name: user.name } }, {
        uniqueKey: `welcome:${user.id}`,
        traceId: req.id,
      });
    });
    reply.code(201).header("content-type", "application/json");
    return Buffer.from(JSON.stringify(user));
  });

  app.post("/api/accounts/login", async (req, reply) => {
    const body = req.body;
    shape(body, ["email", "password"], ["email", "password"]);
    typed(typeof body.email === "string", "email", "a string");
    typed(typeof body.password === "string", "password", "a string");
    const row = q.userByEmail.get(body.email.trim().toLowerCase());
    const ok = await verifyPassword(body.password, row ? row.password_hash : DUMMY_HASH);
    if (!row || !ok) throw unauthorized("the email or password is wrong");
    const old = cookieValue(req.headers.cookie, COOKIE);
    if (old !== null) await deleteSession(old);
    const session = await createSession(row.id);
    const maxAge = Math.max(0, Math.floor((session.absolute_expires_at - Date.now()) / 1000));
    const secure = (req.headers["x-forwarded-proto"] ?? "").toLowerCase() === "https" ? "; Secure" : "";
    reply
      .header("set-cookie", `${COOKIE}=${session.token}; Path=/; HttpOnly; SameSite=Lax; Max-Age=${maxAge}${secure}`)
      .header("cache-control", "no-store")
      .header("content-type", "application/json");
    return Buffer.from(JSON.stringify({ id: row.id, email: row.email, name: row.name, created_at: row.created_at }));
  });

  app.get("/api/accounts/me", async (req, reply) => {
    const session = await currentSession(req);
    // Through the query cache for 60 s (key accounts:user:<id>, tag
    // user:<id>), as Shoal's `me` reads it.
    const body = cache.getOrLoad(`accounts:user:${session.user_id}`, [`user:${session.user_id}`], 60_000, () => {
      const row = q.userById.get(session.user_id);
      return row
        ? Buffer.from(JSON.stringify({ id: row.id, email: row.email, name: row.name, created_at: row.created_at }))
        : null;
    });
    if (!body) {
      await deleteSession(session.token);
      throw unauthorized("this account no longer exists");
    }
    reply.header("cache-control", "private, no-store").header("content-type", "application/json");
    return body;
  });

  // Shoal's extractor order: the session (401) before the body is parsed
  // (415, 400, 422), then the handler (Idempotency-Key, validation).
  const withSession = async (req) => {
    req.session = await currentSession(req);
  };
  app.post("/api/orders", { onRequest: withSession }, async (req, reply) => {
    const session = req.session;
    const body = req.body;
    shape(body, ["items", "payment_method"], ["items"]);
    typed(Array.isArray(body.items), "items", "a sequence");
    body.items.forEach((item, i) => {
      typed(item !== null && typeof item === "object" && !Array.isArray(item), `items[${i}]`, "struct ItemRequest");
      shape(item, ["product_id", "quantity"], ["product_id", "quantity"], `items[${i}].`);
      typed(typeof item.product_id === "string", `items[${i}].product_id`, "a string");
      typed(Number.isSafeInteger(item.quantity), `items[${i}].quantity`, "i64");
    });
    typed(body.payment_method === undefined || body.payment_method === null || typeof body.payment_method === "string", "payment_method", "a string");
    const key = (req.headers["idempotency-key"] ?? "").trim();
    if (key === "" || Buffer.byteLength(key) > 255) {
      throw badRequest(
        "send an `Idempotency-Key` header (1–255 characters, e.g. a UUID) so a retried checkout cannot order twice",
      ).field("Idempotency-Key", "is required");
    }
    const problem = validation("the order is invalid; see `errors`");
    if (body.items.length === 0 || body.items.length > 100) problem.field("items", "must hold 1 to 100 items");
    body.items.forEach((item, i) => {
      if (item.quantity < 1 || item.quantity > 1000) problem.field(`items[${i}].quantity`, "must be between 1 and 1000");
      if (!UUID.test(item.product_id)) {
        problem.field(`items[${i}].product_id`, "must be a product id (a UUID, as the catalog lists them)");
      }
    });
    const paymentMethod = body.payment_method ?? "pm_card_visa";
    if (!paymentMethod.startsWith("pm_") || Buffer.byteLength(paymentMethod) > 100) {
      problem.field("payment_method", "must be a payment method id such as pm_card_visa");
    }
    if (problem.hasErrors) throw problem;
    const items = body.items.map((i) => ({ product_id: i.product_id, quantity: i.quantity }));
    // serde_json's map is ordered by key: "items" < "payment_method".
    const requestHash = sha256hex(JSON.stringify({ items, payment_method: paymentMethod }));
    const prior = q.orderByKey.get(session.user_id, key);
    if (prior) {
      if (prior.request_hash === requestHash) return replay(reply, prior.response);
      throw keyReused();
    }
    // Stock held and prices read in one catalog call (Shoal's reserve()).
    const reservationId = `order:${sha256hex(`${session.user_id}\n${key}`).slice(0, 32)}`;
    let reservation;
    try {
      reservation = await catalog.postJson("/api/catalog/reservations", { id: reservationId, items }, req.id);
    } catch (e) {
      if (e.status === 409 || e.status === 422) {
        const theirs = e.problem ?? { errors: [] };
        if ((theirs.errors ?? []).some((f) => f.field === "id")) throw keyReused();
        const p = e.status === 409
          ? conflict("not enough stock for every item; nothing was ordered")
          : validation("an item's product does not exist; nothing was ordered");
        for (const f of theirs.errors ?? []) p.field(f.field, f.message);
        throw p;
      }
      req.log.warn({ err: e }, "catalog reservation failed");
      throw unavailable("the catalog service is unavailable; retry with the same Idempotency-Key", 1);
    }
    const lines = [];
    let currency = null;
    let total = 0;
    for (let i = 0; i < reservation.items.length; i++) {
      const l = reservation.items[i];
      currency ??= l.currency;
      if (currency !== l.currency) {
        throw validation("all items must be priced in one currency").field(`items[${i}].product_id`, "is priced in another currency");
      }
      total += l.price_cents * l.quantity;
      lines.push({ product_id: l.product_id, name: l.name, quantity: l.quantity, unit_price_cents: l.price_cents });
    }
    const now = Date.now();
    const order = {
      id: uuidv7(randomUUID),
      status: "pending_payment",
      items: lines,
      total_cents: total,
      currency: currency ?? "usd",
      failure: null,
      created_at: now,
      updated_at: now,
    };
    const response = JSON.stringify(order);
    const outcome = transaction(() => {
      const inserted = q.insertOrder.run(order.id, session.user_id, order.status, JSON.stringify(order.items), order.total_cents,
        order.currency, paymentMethod, key, requestHash, response, now, now, reservationId);
      // A concurrent request with the same key won the race.
      if (inserted.changes === 0) return ROLLBACK;
      // Keys in serde_json's (sorted) order, as Shoal's `json!` stores them.
      enqueue("payments", "payments.charge", {
        amount: order.total_cents,
        currency: order.currency,
        order_id: order.id,
        payment_method: paymentMethod,
        user_id: session.user_id,
      }, { uniqueKey: `charge:${order.id}`, maxAttempts: 10, traceId: req.id });
      return true;
    });
    if (outcome === ROLLBACK) {
      const stored = q.orderByKey.get(session.user_id, key);
      if (stored && stored.request_hash === requestHash) return replay(reply, stored.response);
      throw keyReused();
    }
    reply.code(201).header("location", `/api/orders/${order.id}`).header("content-type", "application/json");
    return Buffer.from(response);
  });

  await app.listen({ port: PORT, host: "127.0.0.1" });
}
