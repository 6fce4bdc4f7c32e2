//! Conformance suites: behaviour every backend of a trait must show. Tests
//! in `tests/` run each suite against every backend (SQLite, PostgreSQL,
//! Redis), so backends cannot drift apart.

use crate::sessions::{SessionLifetimes, SessionStore};
use std::time::Duration;

const LONG: SessionLifetimes = SessionLifetimes {
    idle: Duration::from_secs(3600),
    absolute: Duration::from_secs(7200),
};

/// Runs every session-store check against `store`. Panics on the first
/// failure with a message naming the check.
pub async fn session_store(store: &dyn SessionStore) {
    assert!(store.ping().await, "ping: store does not answer");

    // create, then touch finds the same user
    let s = store.create("user-a", LONG).await.expect("create");
    assert_eq!(s.token.len(), 43, "token length");
    let found = store
        .touch(&s.token, LONG)
        .await
        .expect("touch")
        .expect("live");
    assert_eq!(found.user_id, "user-a", "touch returns the owner");
    assert!(found.expires_at <= found.absolute_expires_at);

    // unknown and malformed tokens are None, not errors
    let unknown = crate::sessions::new_token();
    assert!(store
        .touch(&unknown, LONG)
        .await
        .expect("touch unknown")
        .is_none());
    assert!(store
        .touch("not a token", LONG)
        .await
        .expect("touch junk")
        .is_none());
    assert!(store.touch("", LONG).await.expect("touch empty").is_none());

    // tokens are unique
    let s2 = store.create("user-a", LONG).await.expect("create 2");
    assert_ne!(s.token, s2.token, "tokens differ");

    // delete ends one session only
    store.delete(&s.token).await.expect("delete");
    assert!(
        store.touch(&s.token, LONG).await.unwrap().is_none(),
        "deleted session is gone"
    );
    assert!(
        store.touch(&s2.token, LONG).await.unwrap().is_some(),
        "other session lives"
    );
    store
        .delete(&unknown)
        .await
        .expect("deleting unknown is fine");

    // delete_user ends every session of that user and no other
    let b1 = store.create("user-b", LONG).await.unwrap();
    let b2 = store.create("user-b", LONG).await.unwrap();
    let c1 = store.create("user-c", LONG).await.unwrap();
    let removed = store.delete_user("user-b").await.expect("delete_user");
    assert_eq!(removed, 2, "delete_user counts the sessions it ended");
    assert!(store.touch(&b1.token, LONG).await.unwrap().is_none());
    assert!(store.touch(&b2.token, LONG).await.unwrap().is_none());
    assert!(
        store.touch(&c1.token, LONG).await.unwrap().is_some(),
        "other users unaffected"
    );

    // idle expiry, and sliding: a touch before the deadline extends it
    let short = SessionLifetimes {
        idle: Duration::from_millis(1200),
        absolute: Duration::from_secs(60),
    };
    let idle = store.create("user-d", short).await.unwrap();
    let slid = store.create("user-d", short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        store.touch(&slid.token, short).await.unwrap().is_some(),
        "alive before idle deadline"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        store.touch(&idle.token, short).await.unwrap().is_none(),
        "an untouched session expires after its idle time"
    );
    assert!(
        store.touch(&slid.token, short).await.unwrap().is_some(),
        "a touched session slides past its first deadline"
    );

    // the absolute deadline caps sliding
    let capped = SessionLifetimes {
        idle: Duration::from_secs(60),
        absolute: Duration::from_millis(800),
    };
    let a = store.create("user-e", capped).await.unwrap();
    assert!(a.expires_at <= a.absolute_expires_at);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(store.touch(&a.token, capped).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        store.touch(&a.token, capped).await.unwrap().is_none(),
        "absolute deadline ends the session however active"
    );

    // prune removes expired rows and keeps live ones
    store.prune_expired().await.expect("prune");
    assert!(
        store.touch(&c1.token, LONG).await.unwrap().is_some(),
        "prune keeps live sessions"
    );
}
