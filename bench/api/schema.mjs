// The peer's SQLite schema: the tables Shoal's services create for the
// paths bench/api.sh measures, with the same columns and indexes (catalog
// `products`, accounts `users`, orders `orders`, and the job store's
// `shoal_jobs` as it stands after its third migration), and the pragmas
// Shoal's `Database::connect` sets on every SQLite connection.
import { DatabaseSync } from "@photostructure/sqlite";

export const SCHEMA = `
CREATE TABLE IF NOT EXISTS products (
    id TEXT PRIMARY KEY,
    sku TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    price_cents BIGINT NOT NULL,
    currency TEXT NOT NULL,
    stock BIGINT NOT NULL,
    image_url TEXT,
    tags TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    status TEXT NOT NULL,
    items TEXT NOT NULL,
    total_cents BIGINT NOT NULL,
    currency TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    failure TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    reservation_id TEXT,
    UNIQUE (user_id, idempotency_key));
CREATE INDEX IF NOT EXISTS orders_user ON orders (user_id, created_at);
CREATE TABLE IF NOT EXISTS stock_reservations (
    id TEXT PRIMARY KEY,
    items TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS shoal_jobs (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    priority BIGINT NOT NULL,
    state TEXT NOT NULL,
    run_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    unique_key TEXT,
    timeout_ms BIGINT NOT NULL,
    trace_id TEXT,
    progress TEXT,
    last_error TEXT,
    errors TEXT NOT NULL,
    lease_token TEXT,
    lease_until BIGINT,
    worker_id TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT);
CREATE UNIQUE INDEX IF NOT EXISTS shoal_jobs_unique_key ON shoal_jobs (unique_key);
CREATE INDEX IF NOT EXISTS shoal_jobs_claim_order
    ON shoal_jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('scheduled', 'available', 'retrying');
CREATE INDEX IF NOT EXISTS shoal_jobs_running ON shoal_jobs (queue, lease_until)
    WHERE state = 'running';
CREATE INDEX IF NOT EXISTS shoal_jobs_finished_at ON shoal_jobs (finished_at)
    WHERE finished_at IS NOT NULL;
`;

/** Opens `path` with Shoal's pragmas (WAL, synchronous NORMAL, 10 s busy timeout, foreign keys). */
export function open(path) {
  const db = new DatabaseSync(path);
  db.exec(`PRAGMA journal_mode = WAL;
    PRAGMA synchronous = NORMAL;
    PRAGMA busy_timeout = 10000;
    PRAGMA foreign_keys = ON;`);
  return db;
}

/**
 * A new time-ordered id as Shoal's `ids::new_id` writes it: a hyphenated
 * lowercase UUIDv7 (48-bit millisecond time, version 7, RFC 4122 variant,
 * the rest random; the random part comes from `crypto.randomUUID`'s pool).
 */
export function uuidv7(randomUUID) {
  const r = randomUUID();
  const ts = Date.now().toString(16).padStart(12, "0");
  return `${ts.slice(0, 8)}-${ts.slice(8, 12)}-7${r.slice(15)}`;
}
