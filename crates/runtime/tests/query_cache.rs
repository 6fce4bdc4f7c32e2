//! `QueryCache` and the session cache against real backends: single flight,
//! negative caching, tag invalidation across instances over the bus (SQLite
//! and Redis), a shared L2 on Redis, and reads that survive a dead Redis.

use bytes::Bytes;
use shoal_backends::{
    Broadcast, Database, RedisBroadcast, SessionLifetimes, SessionStore, SqlBroadcast,
    SqlBroadcastOptions, SqlSessionStore,
};
use shoal_runtime::session_cache::CachedSessionStore;
use shoal_runtime::{QueryCache, QueryCacheOptions};
use shoal_testkit as kit;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(60);

fn options() -> QueryCacheOptions {
    QueryCacheOptions {
        early_refresh_beta: 0.0,
        ..QueryCacheOptions::default()
    }
}

async fn sqlite_bus(dir: &kit::TempDir) -> Arc<dyn Broadcast> {
    let db = Database::connect(&kit::sqlite_url(dir.path()), 4, Duration::from_secs(5))
        .await
        .unwrap();
    Arc::new(
        SqlBroadcast::new(db, SqlBroadcastOptions::default())
            .await
            .unwrap(),
    )
}

fn tags(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn read(
    cache: &QueryCache,
    key: &str,
    value: &'static str,
    calls: &AtomicU64,
) -> Option<Bytes> {
    cache
        .get_or_load(key, &tags(&["t"]), TTL, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Some(Bytes::from_static(value.as_bytes())))
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thousand_concurrent_misses_run_one_loader() {
    let cache = QueryCache::new(options(), None).await;
    let calls = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let cache = cache.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("hot", &tags(&["t"]), TTL, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, Infallible>(Some(Bytes::from_static(b"v")))
                })
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().as_deref(), Some(&b"v"[..]));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "exactly one loader call");
    assert_eq!(cache.loads(), 1);
}

#[tokio::test]
async fn not_found_is_cached_for_the_negative_ttl() {
    let cache = QueryCache::new(
        QueryCacheOptions {
            negative_ttl: Duration::from_millis(200),
            ttl_jitter_percent: 0,
            ..options()
        },
        None,
    )
    .await;
    let calls = AtomicU64::new(0);
    let load = || async {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Infallible>(None)
    };
    assert!(cache
        .get_or_load("gone", &[], TTL, load)
        .await
        .unwrap()
        .is_none());
    assert!(cache
        .get_or_load("gone", &[], TTL, load)
        .await
        .unwrap()
        .is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the miss is cached");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(cache
        .get_or_load("gone", &[], TTL, load)
        .await
        .unwrap()
        .is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 2, "and expires sooner");
}

/// The ETag kept with an entry is the body's, is the same object on
/// every hit (hashed once), and is the new body's after an invalidation.
#[tokio::test]
async fn an_entry_keeps_its_etag_until_it_is_replaced() {
    let cache = QueryCache::new(options(), None).await;
    let load = |body: &'static [u8]| {
        let cache = cache.clone();
        async move {
            cache
                .get_or_load_cached("e", &tags(&["t"]), TTL, || async move {
                    Ok::<_, Infallible>(Some(Bytes::from_static(body)))
                })
                .await
                .unwrap()
                .expect("a value")
        }
    };
    let first = load(b"one").await;
    assert_eq!(first.bytes().as_ref(), b"one");
    assert_eq!(*first.etag(), shoal_runtime::cache::strong_etag(b"one"));
    let again = load(b"ignored: a hit").await;
    assert_eq!(again.bytes().as_ref(), b"one");
    assert!(
        std::ptr::eq(first.etag(), again.etag()),
        "a hit reuses the entry's ETag, not a new hash"
    );
    cache.invalidate_tags(&tags(&["t"])).await;
    let after = load(b"two").await;
    assert_eq!(after.bytes().as_ref(), b"two");
    assert_eq!(*after.etag(), shoal_runtime::cache::strong_etag(b"two"));
    assert_ne!(after.etag(), first.etag());
    // A cached "not found" is no value at all.
    let none = cache
        .get_or_load_cached("missing", &[], TTL, || async { Ok::<_, Infallible>(None) })
        .await
        .unwrap();
    assert!(none.is_none());
}

#[tokio::test]
async fn loader_errors_are_returned_and_not_cached() {
    let cache = QueryCache::new(options(), None).await;
    let err = cache
        .get_or_load("k", &[], TTL, || async {
            Err::<Option<Bytes>, _>(std::io::Error::other("db down"))
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("db down"), "{err}");
    let calls = AtomicU64::new(0);
    assert_eq!(
        read(&cache, "k", "ok", &calls).await.as_deref(),
        Some(&b"ok"[..])
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_load_that_races_an_invalidation_is_not_served() {
    let cache = QueryCache::new(options(), None).await;
    let c2 = cache.clone();
    let slow = tokio::spawn(async move {
        c2.get_or_load("k", &tags(&["t"]), TTL, || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, Infallible>(Some(Bytes::from_static(b"old")))
        })
        .await
        .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    cache.invalidate_tags(&tags(&["t"])).await;
    assert_eq!(slow.await.unwrap().as_deref(), Some(&b"old"[..]));
    let calls = AtomicU64::new(0);
    assert_eq!(
        read(&cache, "k", "new", &calls).await.as_deref(),
        Some(&b"new"[..]),
        "the value loaded before the invalidation is stale"
    );
}

/// Two caches (two instances) on one bus: an invalidation on A reaches B's
/// L1 within 100 ms, and only entries with that tag go.
async fn invalidation_reaches_other_instance(a_bus: Arc<dyn Broadcast>, b_bus: Arc<dyn Broadcast>) {
    let a = QueryCache::new(options(), Some(a_bus)).await;
    let b = QueryCache::new(options(), Some(b_bus)).await;
    let calls = AtomicU64::new(0);
    for cache in [&a, &b] {
        read(cache, "p1", "v1", &calls).await;
        cache
            .get_or_load("other", &tags(&["u"]), TTL, || async {
                Ok::<_, Infallible>(Some(Bytes::from_static(b"o")))
            })
            .await
            .unwrap();
    }
    assert_eq!(
        read(&b, "p1", "v1", &calls).await.as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let started = Instant::now();
    a.invalidate_tags(&tags(&["t"])).await;
    loop {
        let got = read(&b, "p1", "v2", &calls).await;
        if got.as_deref() == Some(&b"v2"[..]) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "B still serves the old value after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("invalidation reached B in {:?}", started.elapsed());
    let loads_before = b.loads();
    b.get_or_load("other", &tags(&["u"]), TTL, || async {
        Ok::<_, Infallible>(Some(Bytes::from_static(b"o")))
    })
    .await
    .unwrap();
    assert_eq!(b.loads(), loads_before, "other tags stay cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_reaches_other_instance_over_sqlite_bus() {
    let dir = kit::TempDir::new("qc-bus");
    let a = sqlite_bus(&dir).await;
    let b = sqlite_bus(&dir).await;
    invalidation_reaches_other_instance(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_reaches_other_instance_over_redis_bus() {
    let Some(url) = kit::redis_url("invalidation_reaches_other_instance_over_redis_bus") else {
        return;
    };
    let prefix = kit::unique_name();
    let a = Arc::new(RedisBroadcast::connect(&url, &prefix).await.unwrap());
    let b = Arc::new(RedisBroadcast::connect(&url, &prefix).await.unwrap());
    invalidation_reaches_other_instance(a, b).await;
}

#[tokio::test]
async fn l2_on_redis_is_shared_and_invalidated_by_tag() {
    let Some(url) = kit::redis_url("l2_on_redis_is_shared_and_invalidated_by_tag") else {
        return;
    };
    let opts = QueryCacheOptions {
        l2_redis_url: Some(url),
        redis_prefix: kit::unique_name(),
        ..options()
    };
    let a = QueryCache::new(opts.clone(), None).await;
    let b = QueryCache::new(opts, None).await;
    let calls = AtomicU64::new(0);
    assert_eq!(
        read(&a, "k", "v1", &calls).await.as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(
        read(&b, "k", "v1", &calls).await.as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "B is filled from L2");
    a.invalidate_tags(&tags(&["t"])).await;
    b.clear_local();
    assert_eq!(
        read(&b, "k", "v2", &calls).await.as_deref(),
        Some(&b"v2"[..]),
        "the L2 entry of an invalidated tag is stale"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // negative entries travel through L2 too
    let miss = || async { Ok::<_, Infallible>(None) };
    assert!(a
        .get_or_load("none", &[], TTL, miss)
        .await
        .unwrap()
        .is_none());
    let before = b.loads();
    assert!(b
        .get_or_load("none", &[], TTL, miss)
        .await
        .unwrap()
        .is_none());
    assert_eq!(b.loads(), before);
}

#[tokio::test]
async fn a_dead_redis_falls_back_to_the_loader() {
    let cache = QueryCache::new(
        QueryCacheOptions {
            l2_redis_url: Some("redis://127.0.0.1:1".into()),
            ..options()
        },
        None,
    )
    .await;
    let calls = AtomicU64::new(0);
    let started = Instant::now();
    for i in 0..20 {
        let key = format!("k{i}");
        assert_eq!(
            read(&cache, &key, "v", &calls).await.as_deref(),
            Some(&b"v"[..])
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 20);
    cache.invalidate_tags(&tags(&["t"])).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a dead L2 is skipped, not waited on: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_on_one_instance_reaches_the_other_session_cache() {
    let dir = kit::TempDir::new("sess-cache");
    let db = Database::connect(&kit::sqlite_url(dir.path()), 4, Duration::from_secs(5))
        .await
        .unwrap();
    let store: Arc<dyn SessionStore> = Arc::new(SqlSessionStore::new(db).await.unwrap());
    let ttl = Duration::from_secs(30);
    let a = CachedSessionStore::new(store.clone(), sqlite_bus(&dir).await, ttl)
        .await
        .unwrap();
    let b = CachedSessionStore::new(store.clone(), sqlite_bus(&dir).await, ttl)
        .await
        .unwrap();
    let life = SessionLifetimes {
        idle: Duration::from_secs(600),
        absolute: Duration::from_secs(6000),
    };
    for (user, logout_all) in [("u1", false), ("u2", true)] {
        let s = a.create(user, life).await.unwrap();
        assert!(b.touch(&s.token, life).await.unwrap().is_some());
        // cached on B: the store no longer sees it, B still does
        store.delete(&s.token).await.unwrap();
        assert!(
            b.touch(&s.token, life).await.unwrap().is_some(),
            "B reads through its cache"
        );
        let s = a.create(user, life).await.unwrap();
        assert_eq!(
            b.touch(&s.token, life).await.unwrap().unwrap().token,
            s.token
        );
        let started = Instant::now();
        if logout_all {
            a.delete_user(user).await.unwrap();
        } else {
            a.delete(&s.token).await.unwrap();
        }
        while b.touch(&s.token, life).await.unwrap().is_some() {
            assert!(
                started.elapsed() < Duration::from_millis(100),
                "B still accepts the ended session"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A session store that counts its reads and takes 50 ms for each, or
/// fails every one.
#[derive(Debug)]
struct SlowStore {
    inner: Arc<dyn SessionStore>,
    touches: AtomicU64,
    fail: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl SessionStore for SlowStore {
    async fn create(
        &self,
        user_id: &str,
        life: SessionLifetimes,
    ) -> Result<shoal_backends::Session, shoal_backends::SessionError> {
        self.inner.create(user_id, life).await
    }
    async fn touch(
        &self,
        token: &str,
        life: SessionLifetimes,
    ) -> Result<Option<shoal_backends::Session>, shoal_backends::SessionError> {
        self.touches.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if self.fail.load(Ordering::SeqCst) {
            return Err(shoal_backends::SessionError::Sql(sqlx::Error::PoolTimedOut));
        }
        self.inner.touch(token, life).await
    }
    async fn delete(&self, token: &str) -> Result<(), shoal_backends::SessionError> {
        self.inner.delete(token).await
    }
    async fn delete_user(&self, user_id: &str) -> Result<u64, shoal_backends::SessionError> {
        self.inner.delete_user(user_id).await
    }
    async fn prune_expired(&self) -> Result<u64, shoal_backends::SessionError> {
        self.inner.prune_expired().await
    }
    async fn ping(&self) -> bool {
        self.inner.ping().await
    }
}

/// Concurrent misses of one session wait on one read of the store (a
/// herd of reconnects after a restart costs one read, not thousands):
/// for a session, for a token that has none, and for a read that fails,
/// whose error (an overload, here) every waiter gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_session_make_one_store_read() {
    let dir = kit::TempDir::new("sess-herd");
    let db = Database::connect(&kit::sqlite_url(dir.path()), 4, Duration::from_secs(5))
        .await
        .unwrap();
    let slow = Arc::new(SlowStore {
        inner: Arc::new(SqlSessionStore::new(db).await.unwrap()),
        touches: AtomicU64::new(0),
        fail: std::sync::atomic::AtomicBool::new(false),
    });
    let store: Arc<dyn SessionStore> = slow.clone();
    let cached = Arc::new(
        CachedSessionStore::new(store, sqlite_bus(&dir).await, Duration::from_secs(30))
            .await
            .unwrap(),
    );
    let life = SessionLifetimes {
        idle: Duration::from_secs(600),
        absolute: Duration::from_secs(6000),
    };
    let herd = |token: String| {
        let cached = cached.clone();
        async move {
            let reads: Vec<_> = (0..50)
                .map(|_| {
                    let (cached, token) = (cached.clone(), token.clone());
                    tokio::spawn(async move { cached.touch(&token, life).await })
                })
                .collect();
            let mut out = Vec::new();
            for r in reads {
                out.push(r.await.unwrap());
            }
            out
        }
    };
    let s = cached.create("u1", life).await.unwrap();
    for got in herd(s.token.clone()).await {
        assert_eq!(got.unwrap().unwrap().token, s.token);
    }
    assert_eq!(slow.touches.load(Ordering::SeqCst), 1, "one read for 50");

    let unknown = shoal_backends::sessions::new_token();
    for got in herd(unknown).await {
        assert!(got.unwrap().is_none());
    }
    assert_eq!(slow.touches.load(Ordering::SeqCst), 2);

    slow.fail.store(true, Ordering::SeqCst);
    let other = cached.create("u2", life).await.unwrap();
    for got in herd(other.token.clone()).await {
        assert!(got.unwrap_err().is_pool_timeout());
    }
    assert_eq!(slow.touches.load(Ordering::SeqCst), 3);
    // A failed read is not kept: the next one goes to the store.
    slow.fail.store(false, Ordering::SeqCst);
    assert!(cached.touch(&other.token, life).await.unwrap().is_some());
    assert_eq!(slow.touches.load(Ordering::SeqCst), 4);
}
