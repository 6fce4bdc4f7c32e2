//! Issue 21: draining an instance that holds thousands of event streams
//! behind the gateway loses no event. A test binary of its own, so that
//! no other test's stack shares the two cores while thousands of streams
//! reconnect at once.

mod common;

use common::Stack;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use shoal_testkit as kit;
use std::time::{Duration, Instant};

/// Issue 21: an instance stopped behind the gateway tells its streams to
/// reconnect, spread over `drain_window_ms`; each client comes back
/// through the gateway (to the other instance) with its `Last-Event-ID`
/// and has every event published meanwhile once, in order.
///
/// 4,000 streams by default, `SHOAL_TEST_DRAIN_STREAMS` for another
/// number. 9,000 is about the most one gateway holds here (two
/// descriptors a stream under 20,000 open files per process, where the
/// issue asks for 10,000); CI runs 4,000 because 9,000 did not pass
/// every run inside `.ci/run` (bench/README.md, "Draining 9,000 streams
/// behind the gateway, again", has the runs). The events
/// published shrink as the streams grow (every one goes to every
/// stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_instance_moves_its_streams_through_the_gateway_without_a_lost_event() {
    // The gateway holds two descriptors a stream: under a lower
    // open-files limit than this machine's 20,000, fewer streams.
    let open_files: usize = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(20_000);
    let streams: usize = std::env::var("SHOAL_TEST_DRAIN_STREAMS")
        .ok()
        .map(|v| v.parse().expect("SHOAL_TEST_DRAIN_STREAMS is a number"))
        .unwrap_or_else(|| 4_000.min(open_files.saturating_sub(2_000) / 2));
    eprintln!("{streams} streams (open-files limit {open_files})");
    let events: usize = (160_000 / streams.max(1)).clamp(40, 160);
    let mut stack = Stack::start(
        2,
        &[
            // The default window.
            ("SHOAL_NOTIFICATIONS__DRAIN_WINDOW_MS", "5000"),
            (
                "SHOAL_NOTIFICATIONS__MAX_CONNECTIONS_PER_USER",
                &(streams + 100).to_string(),
            ),
            // Every stream comes from 127.0.0.1.
            ("SHOAL_GATEWAY__MAX_CONNECTIONS_PER_CLIENT", "0"),
            (
                "SHOAL_GATEWAY__MAX_CONNECTIONS",
                &(streams + 1_000).max(10_000).to_string(),
            ),
        ],
    );
    stack.wait_ready(2).await;
    let (cookie, _) = kit::sign_up_and_log_in(&stack.base, "drain@example.com").await;
    // Half opened on serve-1 itself (so that many are sure to be on the
    // instance stopped), half through the gateway (wherever it puts
    // them); every reconnect goes through the gateway. Opened 200 at a
    // time, on one client's connections.
    let serve1 = stack.addresses()["serve-1"].clone();
    // No idle connections kept: thousands of reconnects at once make
    // hyper's pool open new connections while others fall idle, and the
    // idle ones would count against the gateway's connection limit (two
    // descriptors a stream under the 20,000 open files).
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let opening = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
    let opened_at = Instant::now();
    let opens: Vec<_> = (0..streams)
        .map(|n| {
            let url = if n % 2 == 0 {
                format!("http://{serve1}/api/notifications/stream")
            } else {
                stack.url("/api/notifications/stream")
            };
            let (http, cookie, opening) = (http.clone(), cookie.clone(), opening.clone());
            tokio::spawn(async move {
                let _turn = opening.acquire_owned().await.unwrap();
                kit::SseReader::open_with(&http, &url, &cookie, None).await
            })
        })
        .collect();
    let mut readers = Vec::new();
    for open in opens {
        readers.push(open.await.unwrap());
    }
    eprintln!("{streams} streams open in {:?}", opened_at.elapsed());
    // Published on serve-2, which stays up, so every publish's answer is
    // known (one cut off by the stop could have published unseen).
    let serve2 = stack.addresses()["serve-2"].clone();
    let publisher = {
        let cookie = cookie.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ids = Vec::new();
            for n in 0..events {
                let r = http
                    .post(format!("http://{serve2}/api/notifications/test"))
                    .header("cookie", &cookie)
                    .json(&json!({"n": n}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
                let v: Value = r.json().await.unwrap();
                ids.push(v["id"].as_str().unwrap().to_string());
                // About 7 s of events, across the drain.
                tokio::time::sleep(Duration::from_millis((7_000 / events) as u64)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = stack.children()["serve-1"];
    kill(Pid::from_raw(victim as i32), Signal::SIGTERM).unwrap();

    let followers: Vec<_> = readers
        .into_iter()
        .map(|mut sse| {
            let (cookie, url) = (cookie.clone(), stack.url("/api/notifications/stream"));
            let http = http.clone();
            tokio::spawn(async move {
                let mut got: Vec<String> = Vec::new();
                let mut moved = false;
                loop {
                    let (id, e) = sse.next(Duration::from_secs(20)).await;
                    if e["kind"] == "stream.reconnect" {
                        // (A reconnect that reached the stopping instance
                        // before the gateway saw it go is told again.)
                        moved = true;
                        assert!(sse.retry.is_some(), "the reconnect event carries retry:");
                        assert!(
                            sse.ends(Duration::from_secs(5)).await,
                            "the stream ends after it"
                        );
                        // Back through the gateway, from the last event.
                        sse = kit::SseReader::open_with(
                            &http,
                            &url,
                            &cookie,
                            got.last().map(String::as_str),
                        )
                        .await;
                        continue;
                    }
                    assert_ne!(e["kind"], "stream.reset", "a resumed stream lost its place");
                    got.push(id.unwrap());
                    if e["data"]["n"] == events - 1 {
                        return (moved, got);
                    }
                }
            })
        })
        .collect();
    let published = publisher.await.unwrap();
    let mut moved = 0;
    for f in followers {
        let (was_moved, got) = f.await.unwrap();
        moved += usize::from(was_moved);
        let first = published
            .iter()
            .position(|id| *id == got[0])
            .expect("a stream's first event was published");
        assert_eq!(
            got,
            published[first..],
            "events missed or repeated across the move"
        );
    }
    assert!(
        moved >= streams / 2,
        "only {moved} of {streams} streams were moved"
    );
    eprintln!(
        "{moved} of {streams} streams moved off the stopped instance, none lost any of {events} events"
    );
    tokio::task::block_in_place(|| stack.stop(Duration::from_secs(30)));
}
