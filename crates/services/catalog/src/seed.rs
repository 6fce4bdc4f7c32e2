//! `seed`: fills the products table with realistic, varied products fast,
//! with multi-row INSERTs batched in transactions (for benchmarks and
//! demos: `shoal seed --products N`).

use crate::MIGRATIONS;
use rand::seq::IndexedRandom;
use rand::Rng;
use shoal_backends::{Database, DbError};

const ROWS_PER_STATEMENT: usize = 500;
const STATEMENTS_PER_TRANSACTION: usize = 20;

const ADJECTIVES: &[&str] = &[
    "Classic",
    "Compact",
    "Deluxe",
    "Ergonomic",
    "Handmade",
    "Lightweight",
    "Modern",
    "Rugged",
    "Sleek",
    "Vintage",
    "Wireless",
    "Organic",
    "Premium",
    "Portable",
    "Smart",
    "Waterproof",
];
const MATERIALS: &[&str] = &[
    "Bamboo", "Ceramic", "Cotton", "Leather", "Linen", "Oak", "Steel", "Wool", "Glass", "Copper",
    "Granite", "Walnut",
];
const NOUNS: &[&str] = &[
    "Backpack",
    "Chair",
    "Desk Lamp",
    "Headphones",
    "Kettle",
    "Keyboard",
    "Mug",
    "Notebook",
    "Pillow",
    "Speaker",
    "Teapot",
    "Watch",
    "Wallet",
    "Water Bottle",
    "Blanket",
    "Bookshelf",
];
const USES: &[&str] = &[
    "everyday use",
    "the office",
    "travel",
    "the kitchen",
    "outdoor adventures",
    "gifting",
    "small spaces",
    "long workdays",
];
const TAGS: &[&str] = &[
    "new",
    "sale",
    "bestseller",
    "eco",
    "gift",
    "limited",
    "home",
    "office",
    "outdoor",
    "travel",
];
const CURRENCIES: &[&str] = &["USD", "EUR", "GBP"];

/// Inserts `products` new products (on top of any there) and calls
/// `progress` with the running total after each transaction. Creates the
/// catalog tables first if needed.
pub async fn seed(db: &Database, products: usize, progress: impl Fn(usize)) -> Result<(), DbError> {
    db.migrate("catalog", MIGRATIONS).await?;
    let run: String = {
        let mut rng = rand::rng();
        (0..6)
            .map(|_| char::from(b'A' + rng.random_range(0..26u8)))
            .collect()
    };
    let mut done = 0usize;
    while done < products {
        let mut tx = db.pool().begin().await?;
        for _ in 0..STATEMENTS_PER_TRANSACTION {
            let n = ROWS_PER_STATEMENT.min(products - done);
            if n == 0 {
                break;
            }
            let rows: Vec<Row> = {
                let mut rng = rand::rng();
                (0..n)
                    .map(|i| Row::random(&mut rng, &run, done + i))
                    .collect()
            };
            let mut sql = String::with_capacity(64 + n * 48);
            sql.push_str(
                "INSERT INTO products (id, sku, name, description, price_cents, currency, \
                 stock, image_url, tags, created_at, updated_at) VALUES ",
            );
            for i in 0..n {
                let b = i * 11;
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${},${},${},${},${},${},${},${},${},${},${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8,
                    b + 9,
                    b + 10,
                    b + 11
                ));
            }
            let mut query = sqlx::query(&sql);
            for r in rows {
                query = query
                    .bind(r.id)
                    .bind(r.sku)
                    .bind(r.name)
                    .bind(r.description)
                    .bind(r.price_cents)
                    .bind(r.currency)
                    .bind(r.stock)
                    .bind(r.image_url)
                    .bind(r.tags)
                    .bind(r.at)
                    .bind(r.at);
            }
            query.execute(&mut *tx).await?;
            done += n;
        }
        tx.commit().await?;
        progress(done);
    }
    Ok(())
}

struct Row {
    id: String,
    sku: String,
    name: String,
    description: String,
    price_cents: i64,
    currency: &'static str,
    stock: i64,
    image_url: String,
    tags: String,
    at: i64,
}

impl Row {
    fn random(rng: &mut impl Rng, run: &str, n: usize) -> Row {
        let pick = |rng: &mut dyn rand::RngCore, list: &[&'static str]| -> &'static str {
            list.choose(rng).copied().unwrap_or("")
        };
        let adjective = pick(rng, ADJECTIVES);
        let material = pick(rng, MATERIALS);
        let noun = pick(rng, NOUNS);
        let sku = format!("{run}-{n:08}");
        let how_many = rng.random_range(0..4);
        let mut tags: Vec<&str> = TAGS.choose_multiple(rng, how_many).copied().collect();
        tags.sort_unstable();
        Row {
            id: shoal_core::ids::new_id(),
            name: format!("{adjective} {material} {noun}"),
            description: format!(
                "A {} {} {} made for {}. Model {sku}.",
                adjective.to_lowercase(),
                material.to_lowercase(),
                noun.to_lowercase(),
                pick(rng, USES)
            ),
            image_url: format!("https://images.example.com/products/{sku}.jpg"),
            sku,
            price_cents: rng.random_range(199..250_000),
            currency: pick(rng, CURRENCIES),
            stock: rng.random_range(0..1_000),
            tags: serde_json::to_string(&tags).unwrap_or_else(|_| "[]".into()),
            at: shoal_backends::now_millis(),
        }
    }
}

/// Sets every product's stock (`shoal seed --stock`: benchmarks and tests
/// that place many orders need more than the random seed gives); returns
/// how many products it set.
pub async fn set_all_stock(db: &Database, stock: i64) -> Result<u64, DbError> {
    let done = sqlx::query("UPDATE products SET stock = $1, updated_at = $2")
        .bind(stock)
        .bind(shoal_backends::now_millis())
        .execute(db.pool())
        .await?;
    Ok(done.rows_affected())
}
