// Seeds the peer's SQLite database the way `shoal seed --products N` seeds
// Shoal's (crates/services/catalog/src/seed.rs): the same word lists, the
// same shape of every column (UUIDv7 ids, `RUN-00000001` skus, names,
// descriptions, image URLs, 0-3 sorted tags as a JSON array, prices
// 199..250000 cents in USD/EUR/GBP, stock 0..999, millisecond times), in
// transactions; on top of any products already there, like Shoal's. Also
// creates the tables the peer's routes need (schema.mjs).
//   DB=/tmp/api.db PRODUCTS=10000 node bench/api/seed.mjs
import { randomInt, randomUUID } from "node:crypto";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { SCHEMA, open, uuidv7 } from "./schema.mjs";

const DB = process.env.DB ?? "api-data/api.db";
const PRODUCTS = Number(process.env.PRODUCTS ?? 1000);
// As `shoal seed --stock`: every product's stock (checkouts hold stock).
const STOCK = process.env.STOCK === undefined ? undefined : Number(process.env.STOCK);
const PER_TRANSACTION = 10_000; // Shoal: 20 statements of 500 rows

const ADJECTIVES = ["Classic", "Compact", "Deluxe", "Ergonomic", "Handmade", "Lightweight", "Modern",
  "Rugged", "Sleek", "Vintage", "Wireless", "Organic", "Premium", "Portable", "Smart", "Waterproof"];
const MATERIALS = ["Bamboo", "Ceramic", "Cotton", "Leather", "Linen", "Oak", "Steel", "Wool", "Glass",
  "Copper", "Granite", "Walnut"];
const NOUNS = ["Backpack", "Chair", "Desk Lamp", "Headphones", "Kettle", "Keyboard", "Mug", "Notebook",
  "Pillow", "Speaker", "Teapot", "Watch", "Wallet", "Water Bottle", "Blanket", "Bookshelf"];
const USES = ["everyday use", "the office", "travel", "the kitchen", "outdoor adventures", "gifting",
  "small spaces", "long workdays"];
const TAGS = ["new", "sale", "bestseller", "eco", "gift", "limited", "home", "office", "outdoor", "travel"];
const CURRENCIES = ["USD", "EUR", "GBP"];

const pick = (list) => list[randomInt(list.length)];
/** `n` distinct elements of `list` in random order (rand's `choose_multiple`). */
function chooseMultiple(list, n) {
  const copy = list.slice();
  for (let i = 0; i < n; i++) {
    const j = i + randomInt(copy.length - i);
    [copy[i], copy[j]] = [copy[j], copy[i]];
  }
  return copy.slice(0, n);
}

mkdirSync(dirname(DB), { recursive: true });
const db = open(DB);
db.exec(SCHEMA);
const insert = db.prepare(
  `INSERT INTO products (id, sku, name, description, price_cents, currency, stock, image_url, tags,
     created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
);
const run = Array.from({ length: 6 }, () => String.fromCharCode(65 + randomInt(26))).join("");
const started = performance.now();
let done = 0;
while (done < PRODUCTS) {
  const n = Math.min(PER_TRANSACTION, PRODUCTS - done);
  db.exec("BEGIN");
  for (let i = 0; i < n; i++) {
    const adjective = pick(ADJECTIVES);
    const material = pick(MATERIALS);
    const noun = pick(NOUNS);
    const sku = `${run}-${String(done + i).padStart(8, "0")}`;
    const tags = chooseMultiple(TAGS, randomInt(4)).sort();
    const at = Date.now();
    insert.run(
      uuidv7(randomUUID),
      sku,
      `${adjective} ${material} ${noun}`,
      `A ${adjective.toLowerCase()} ${material.toLowerCase()} ${noun.toLowerCase()} made for ${pick(USES)}. Model ${sku}.`,
      199 + randomInt(250_000 - 199),
      pick(CURRENCIES),
      STOCK ?? randomInt(1000),
      `https://images.example.com/products/${sku}.jpg`,
      JSON.stringify(tags),
      at,
      at,
    );
  }
  db.exec("COMMIT");
  done += n;
}
db.close();
console.error(`seeded ${PRODUCTS} products into ${DB} in ${((performance.now() - started) / 1000).toFixed(1)} s`);
