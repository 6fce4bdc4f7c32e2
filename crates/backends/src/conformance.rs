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

/// Runs every broadcast check against `handles`: several handles to one
/// bus, standing for several instances (at least two). Panics on the first
/// failure with a message naming the check.
///
/// Checks: a message published by one handle reaches every subscriber on
/// every handle (the publisher's own included), only on its channel; the
/// messages of one publisher arrive in the order it sent them, with
/// concurrent publishers interleaved; the end-to-end latency has a p99
/// under 100 ms.
pub async fn broadcast(handles: &[std::sync::Arc<dyn crate::broadcast::Broadcast>]) {
    use std::time::Instant;
    assert!(handles.len() >= 2, "the suite needs at least two handles");
    let channel = format!(
        "conformance-{}",
        crate::sessions::new_token()[..8].to_lowercase()
    );
    let other = format!("{channel}-other");

    // every handle subscribes twice (two subscribers in one instance)
    let mut subs = Vec::new();
    for h in handles {
        subs.push(h.subscribe(&channel).await.expect("subscribe"));
        subs.push(h.subscribe(&channel).await.expect("subscribe again"));
    }
    let mut other_sub = handles[1].subscribe(&other).await.expect("subscribe other");

    // fan-out: one message reaches every subscriber, and not other channels
    handles[0]
        .publish(&channel, b"hello")
        .await
        .expect("publish");
    for (i, sub) in subs.iter_mut().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(2), sub.recv())
            .await
            .unwrap_or_else(|_| panic!("fan-out: subscriber {i} got nothing within 2 s"))
            .expect("fan-out: recv");
        assert_eq!(
            &got[..],
            b"hello",
            "fan-out: subscriber {i} got the payload"
        );
    }
    handles[0].publish(&other, b"elsewhere").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), other_sub.recv())
        .await
        .expect("other channel delivers")
        .unwrap();
    assert_eq!(&got[..], b"elsewhere");

    // order per publisher, with two publishers at once; arbitrary bytes
    const N: usize = 200;
    let publishers: Vec<_> = handles
        .iter()
        .take(2)
        .enumerate()
        .map(|(p, h)| {
            let h = h.clone();
            let channel = channel.clone();
            tokio::spawn(async move {
                for i in 0..N {
                    let mut payload = vec![p as u8, 0xff, 0x00];
                    payload.extend_from_slice(&(i as u32).to_be_bytes());
                    h.publish(&channel, &payload)
                        .await
                        .expect("publish in order");
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        let mut next = [0u32; 2];
        while next.iter().any(|n| *n < N as u32) {
            let got = tokio::time::timeout(Duration::from_secs(5), sub.recv())
                .await
                .unwrap_or_else(|_| panic!("order: subscriber {i} stalled at {next:?}"))
                .expect("order: recv");
            assert_eq!(got.len(), 7, "payload bytes kept");
            let publisher = got[0] as usize;
            let seq = u32::from_be_bytes([got[3], got[4], got[5], got[6]]);
            assert_eq!(
                seq, next[publisher],
                "order: subscriber {i} got publisher {publisher}'s #{seq}, expected #{}",
                next[publisher]
            );
            next[publisher] += 1;
        }
    }

    // latency: p99 from publish to delivery on another handle
    let mut listener = handles[1].subscribe(&channel).await.unwrap();
    let mut latencies = Vec::new();
    for i in 0..100u32 {
        let sent = Instant::now();
        handles[0]
            .publish(&channel, &i.to_be_bytes())
            .await
            .unwrap();
        loop {
            let got = tokio::time::timeout(Duration::from_secs(2), listener.recv())
                .await
                .expect("latency: delivered within 2 s")
                .expect("latency: recv");
            if got[..] == i.to_be_bytes() {
                break;
            }
        }
        latencies.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(7)).await;
    }
    latencies.sort();
    let p99 = latencies[98];
    assert!(
        p99 < Duration::from_millis(100),
        "latency: p99 {p99:?} is over 100 ms (p50 {:?})",
        latencies[50]
    );
}

/// Runs every blob-store check against `store`: round trip with SHA-256,
/// ranges, size limit that stores nothing, keys that cannot escape, delete.
pub async fn blob_store(store: &crate::blobs::BlobStore) {
    use crate::blobs::BlobError;
    use bytes::Bytes;
    use futures_util::StreamExt;

    async fn read_all(read: crate::blobs::BlobRead) -> Vec<u8> {
        let mut out = Vec::new();
        let mut body = read.body;
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk.expect("chunk"));
        }
        out
    }
    fn chunks(
        data: &[u8],
        size: usize,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send {
        let parts: Vec<Result<Bytes, std::io::Error>> = data
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures_util::stream::iter(parts)
    }

    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let put = store
        .put_stream("uploads/a/blob.bin", chunks(&data, 16 * 1024), 1 << 20)
        .await
        .expect("put");
    assert_eq!(put.size, data.len() as u64, "size recorded");
    {
        use sha2::Digest;
        let expected: String = sha2::Sha256::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(put.sha256, expected, "sha256 of the content");
    }
    let whole = store.get("uploads/a/blob.bin", None).await.expect("get");
    assert_eq!(whole.size, data.len() as u64);
    assert_eq!(read_all(whole).await, data, "round trip");
    let part = store
        .get("uploads/a/blob.bin", Some(1000..1010))
        .await
        .expect("range");
    assert_eq!(part.range, 1000..1010);
    assert_eq!(
        read_all(part).await,
        data[1000..1010].to_vec(),
        "range bytes"
    );
    let tail = store
        .get("uploads/a/blob.bin", Some(299_990..400_000))
        .await
        .expect("range past the end is clamped");
    assert_eq!(read_all(tail).await, data[299_990..].to_vec());
    assert!(matches!(
        store
            .get("uploads/a/blob.bin", Some(400_000..400_010))
            .await,
        Err(BlobError::RangeNotSatisfiable { .. })
    ));
    assert_eq!(
        store.size("uploads/a/blob.bin").await.unwrap(),
        data.len() as u64
    );

    // Over the limit: an error, and nothing stored under the key.
    let err = store
        .put_stream("uploads/too-big.bin", chunks(&data, 64 * 1024), 100_000)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BlobError::TooLarge { limit: 100_000 }),
        "{err}"
    );
    assert!(matches!(
        store.size("uploads/too-big.bin").await,
        Err(BlobError::NotFound(_))
    ));

    // Keys that could escape the root are refused before any I/O.
    for bad in [
        "../etc/passwd",
        "a/../../b",
        "/abs",
        "a//b",
        "a/./b",
        "",
        "a\\b",
        "a b",
        "a/",
    ] {
        assert!(
            matches!(
                store.get(bad, None).await,
                Err(BlobError::InvalidKey { .. })
            ),
            "{bad:?} must be refused"
        );
    }
    assert!(matches!(
        store.get("uploads/missing", None).await,
        Err(BlobError::NotFound(_))
    ));

    store.delete("uploads/a/blob.bin").await.expect("delete");
    assert!(matches!(
        store.get("uploads/a/blob.bin", None).await,
        Err(BlobError::NotFound(_))
    ));
    store
        .delete("uploads/a/blob.bin")
        .await
        .expect("deleting twice is fine");
}
