//! Differential test: generated messages, each read by this codec, by
//! hyper (its HTTP/1 server for requests, its client for responses) and
//! by httparse (heads and chunk-size lines). Wherever this codec accepts
//! a message, the others must accept it too and agree on the method,
//! target, body bytes and where the message ends (the next request must
//! be the same request for all). Where they would disagree, this codec
//! must refuse: that is what keeps a request from being read as two by
//! two hops (smuggling).
//!
//! The inputs come from a seeded generator that mixes valid forms with
//! the forms smuggling is built from (doubled and signed lengths, codings
//! lists, odd chunk lines, bare LF, obs-fold, missing and doubled Host).
//! `SHOAL_DIFF_CASES` sets how many (default 3,000 of each kind) and
//! `SHOAL_DIFF_SEED` the seed, so a failure can be replayed.

use bytes::{Bytes, BytesMut};
use http::Method;
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_h1::{decode, parse_request, parse_response, Framing, Parsed, Step};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECOND: &[u8] = b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n";

fn cases() -> usize {
    std::env::var("SHOAL_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

fn seed() -> u64 {
    std::env::var("SHOAL_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5ea1)
}

fn pick<'a, T: ?Sized>(rng: &mut StdRng, items: &[&'a T]) -> &'a T {
    items[rng.random_range(0..items.len())]
}

/// Like [`pick`], but the first item (a valid form) while `clean`: some
/// messages are kept mostly valid, so both sides of the test are reached.
fn pick_c<'a, T: ?Sized>(rng: &mut StdRng, clean: bool, items: &[&'a T]) -> &'a T {
    if clean && rng.random_bool(0.9) {
        items[0]
    } else {
        pick(rng, items)
    }
}

/// A chunk-size line's variants (size 5); the first ones are valid.
const CHUNK_LINES: &[&str] = &[
    "5\r\n",
    "05\r\n",
    "5;ext=1\r\n",
    "5 ;a\r\n",
    "5;a=\"b c\"\r\n",
    "+5\r\n",
    " 5\r\n",
    "5 \r\n",
    "0x5\r\n",
    "5\n",
    "5\r\r\n",
    "5;a\rb\r\n",
    "-5\r\n",
    "5\t\r\n",
];

/// A chunked body: chunks of `hello`, a last chunk, maybe trailers.
fn chunked_body(rng: &mut StdRng, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    for _ in 0..rng.random_range(0..3) {
        let line = if clean || rng.random_bool(0.7) {
            "5\r\n"
        } else {
            pick(rng, CHUNK_LINES)
        };
        body.extend_from_slice(line.as_bytes());
        body.extend_from_slice(b"hello");
        body.extend_from_slice(
            pick_c(rng, clean, &["\r\n", "\r\n", "\r\n", "\n", "XX", ""]).as_bytes(),
        );
    }
    body.extend_from_slice(
        pick_c(rng, clean, &["0\r\n", "0\r\n", "000\r\n", "0;x\r\n", "0\n"]).as_bytes(),
    );
    body.extend_from_slice(
        pick_c(
            rng,
            clean,
            &[
                "\r\n",
                "\r\n",
                "x-t: 1\r\n\r\n",
                "x-t: 1\n\r\n",
                "x-t 1\r\n\r\n",
                " fold\r\n\r\n",
                "\n",
            ],
        )
        .as_bytes(),
    );
    body
}

/// A generated request, followed by [`SECOND`].
fn request(rng: &mut StdRng) -> Vec<u8> {
    let clean = rng.random_bool(0.5);
    let method = pick_c(
        rng,
        clean,
        &[
            "GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "get", "G T",
        ],
    );
    let target = pick_c(
        rng,
        clean,
        &["/", "/a?b=1", "*", "http://x/p", "//x", "/a b", "/%00"],
    );
    let version = pick_c(
        rng,
        clean,
        &[
            "HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0",
        ],
    );
    let eol = if clean || rng.random_bool(0.9) {
        "\r\n"
    } else {
        "\n"
    };
    let mut head = format!("{method} {target} {version}{eol}");
    let mut fields: Vec<String> = Vec::new();
    for _ in 0..pick_c(rng, clean, &[&1usize, &1, &1, &0, &2]).to_owned() {
        fields.push("Host: x".into());
    }
    let length = if rng.random_bool(0.5) {
        Some(pick_c(
            rng,
            clean,
            &[
                "5",
                "5",
                "0",
                "05",
                " 5 ",
                "+5",
                "5,5",
                "5, 5",
                "-1",
                "5 5",
                "4",
                "6",
                "99999999999999999999",
            ],
        ))
    } else {
        None
    };
    let coding = if rng.random_bool(0.5) {
        Some(pick_c(
            rng,
            clean,
            &[
                "chunked",
                "chunked",
                "Chunked",
                "gzip, chunked",
                "chunked, gzip",
                "identity",
                "chunked, chunked",
                "",
                " chunked",
                "chunked\u{b}",
                "x-chunked",
            ],
        ))
    } else {
        None
    };
    let (length, coding) = if clean && length.is_some() && coding.is_some() {
        (None, coding)
    } else {
        (length, coding)
    };
    if let Some(l) = length {
        fields.push(format!("Content-Length: {l}"));
        if !clean && rng.random_bool(0.1) {
            fields.push(format!("Content-Length: {}", pick(rng, &["5", "6"])));
        }
    }
    if let Some(c) = coding {
        fields.push(format!("Transfer-Encoding: {c}"));
        if !clean && rng.random_bool(0.1) {
            fields.push("Transfer-Encoding: chunked".into());
        }
    }
    if rng.random_bool(0.2) {
        fields.push(
            pick(
                rng,
                &[
                    "Connection: close",
                    "Connection: keep-alive",
                    "Expect: 100-continue",
                ],
            )
            .into(),
        );
    }
    if !clean && rng.random_bool(0.1) {
        fields.push(
            pick(
                rng,
                &[
                    "X: a\r\n b",
                    "X : y",
                    "X: a\rb",
                    "Transfer-Encoding : chunked",
                    "X:\tv",
                    ": v",
                ],
            )
            .into(),
        );
    }
    // Shuffle the fields a little.
    if fields.len() > 1 && rng.random_bool(0.5) {
        let i = rng.random_range(0..fields.len());
        let j = rng.random_range(0..fields.len());
        fields.swap(i, j);
    }
    for f in fields {
        head.push_str(&f);
        head.push_str(eol);
    }
    head.push_str(eol);
    let mut wire = head.into_bytes();
    if coding.is_some() || rng.random_bool(0.1) {
        wire.extend_from_slice(&chunked_body(rng, clean));
    } else if length.is_some() || rng.random_bool(0.1) {
        wire.extend_from_slice(b"hello");
    }
    wire.extend_from_slice(SECOND);
    wire
}

/// A request as a reader made it out.
#[derive(Debug, PartialEq, Eq)]
struct Read {
    method: String,
    target: String,
    body: Vec<u8>,
}

/// This codec: `None` when it refuses the first request (or finds it
/// unfinished); else the requests it reads (the first, and the next if
/// it reads one), the first's head length and where it ends.
fn ours(wire: &[u8]) -> Option<(Vec<Read>, usize, usize)> {
    let mut buf = BytesMut::from(wire);
    let mut reads = Vec::new();
    let (mut head_len, mut end) = (0, 0);
    while reads.len() < 2 {
        let Ok(Some(head)) = parse_request(&mut buf, 64 * 1024) else {
            break;
        };
        if reads.is_empty() {
            head_len = wire.len() - buf.len();
        }
        let mut body = Vec::new();
        if let Some(mut framing) = head.framing {
            loop {
                match decode(&mut framing, &mut buf) {
                    Ok(Step::Data(d)) => body.extend_from_slice(&d),
                    Ok(Step::End) => break,
                    Ok(Step::More) | Err(_) => {
                        return (!reads.is_empty()).then_some((reads, head_len, end))
                    }
                }
            }
        }
        reads.push(Read {
            method: head.parts.method.to_string(),
            // hyper keeps the target as sent; so does the comparison.
            target: head.parts.uri.to_string(),
            body,
        });
        if reads.len() == 1 {
            end = wire.len() - buf.len();
        }
        if !head.keep_alive {
            break;
        }
    }
    (!reads.is_empty()).then_some((reads, head_len, end))
}

/// hyper's HTTP/1 server over an in-memory pipe: every request it read.
async fn hyper_reads(wire: Vec<u8>) -> Vec<Result<Read, String>> {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let seen: Arc<Mutex<Vec<Result<Read, String>>>> = Arc::default();
    let record = Arc::clone(&seen);
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let record = Arc::clone(&record);
        async move {
            let method = req.method().to_string();
            let target = req.uri().to_string();
            let read = match req.into_body().collect().await {
                Ok(b) => Ok(Read {
                    method,
                    target,
                    body: b.to_bytes().to_vec(),
                }),
                Err(e) => Err(e.to_string()),
            };
            record.lock().unwrap().push(read);
            Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Empty::<Bytes>::new(),
            ))
        }
    });
    // half_close: the client's end of input does not make hyper drop
    // a pipelined request it already holds.
    let conn = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .serve_connection(hyper_util::rt::TokioIo::new(server), service);
    let writer = async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = client.write_all(&wire).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let (served, ()) = tokio::join!(conn, writer);
        served
    })
    .await;
    let out = std::mem::take(&mut *seen.lock().unwrap());
    out
}

/// httparse alone: the head's length, and the chunked body walked with
/// its own chunk-size parser (trailers skipped line by line).
fn httparse_reads(wire: &[u8]) -> Option<(usize, Vec<u8>, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head_len) = req.parse(wire).ok()? else {
        return None;
    };
    let chunked = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && std::str::from_utf8(h.value).is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"))
    });
    let length = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let mut at = head_len;
    let mut body = Vec::new();
    if chunked {
        loop {
            let httparse::Status::Complete((line, size)) =
                httparse::parse_chunk_size(&wire[at..]).ok()?
            else {
                return None;
            };
            at += line;
            if size == 0 {
                break;
            }
            let size = usize::try_from(size).ok()?;
            body.extend_from_slice(wire.get(at..at + size)?);
            at += size;
            if wire.get(at..at + 2)? != b"\r\n" {
                return None;
            }
            at += 2;
        }
        loop {
            let eol = wire[at..].iter().position(|b| *b == b'\n')?;
            at += eol + 1;
            if eol <= 1 {
                break;
            }
        }
    } else if let Some(n) = length {
        body.extend_from_slice(wire.get(at..at + n)?);
        at += n;
    }
    Some((head_len, body, at))
}

#[test]
fn requests_are_framed_as_hyper_and_httparse_frame_them_or_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed());
    let (mut accepted, mut refused) = (0usize, 0usize);
    let mut failures = Vec::new();
    for i in 0..cases() {
        let wire = request(&mut rng);
        let Some((mine, head_len, end)) = ours(&wire) else {
            refused += 1;
            continue;
        };
        accepted += 1;
        let show = || String::from_utf8_lossy(&wire).into_owned();
        let theirs: Vec<Read> = rt
            .block_on(hyper_reads(wire.clone()))
            .into_iter()
            .map_while(Result::ok)
            .collect();
        if theirs != mine {
            failures.push(format!(
                "case {i}: hyper read {theirs:?}, we read {mine:?}: {:?}",
                show()
            ));
        }
        match httparse_reads(&wire) {
            Some((len, body, at)) if len == head_len && body == mine[0].body && at == end => {}
            other => failures.push(format!(
                "case {i}: httparse read {other:?}, we read head {head_len}, {:?}, end {end}: {:?}",
                mine[0].body,
                show()
            )),
        }
    }
    println!(
        "{accepted} accepted (all agree), {refused} refused, of {}",
        cases()
    );
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The generator must reach both sides, or the test proves nothing.
    assert!(accepted * 4 >= cases(), "only {accepted} accepted");
    assert!(refused * 4 >= cases(), "only {refused} refused");
}

/// A generated response head and body, then bytes that are not part of
/// it (a reader that takes them into the body has the boundary wrong).
fn response(rng: &mut StdRng) -> Vec<u8> {
    let status = pick(
        rng,
        &[
            "200 OK",
            "200 OK",
            "204 No Content",
            "304 Not Modified",
            "404 Not Found",
            "100 Continue\r\n\r\nHTTP/1.1 200 OK",
        ],
    );
    let mut wire = format!("HTTP/1.1 {status}\r\n");
    let length = rng
        .random_bool(0.5)
        .then(|| pick(rng, &["5", "5", "0", "05", "+5", "5,5", "-1", "6"]));
    let coding = rng.random_bool(0.5).then(|| {
        pick(
            rng,
            &[
                "chunked",
                "chunked",
                "gzip, chunked",
                "gzip",
                "chunked, chunked",
                "identity",
            ],
        )
    });
    if let Some(l) = length {
        wire.push_str(&format!("Content-Length: {l}\r\n"));
    }
    if let Some(c) = coding {
        wire.push_str(&format!("Transfer-Encoding: {c}\r\n"));
    }
    wire.push_str("\r\n");
    let mut wire = wire.into_bytes();
    if coding.is_some() {
        wire.extend_from_slice(&chunked_body(rng, false));
    } else {
        wire.extend_from_slice(b"hello");
    }
    wire.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad");
    wire
}

/// This codec on a response to GET: the body, when it ends cleanly
/// before the connection closes (a close-delimited body is not compared:
/// it ends where the connection does for every reader).
fn our_response(wire: &[u8]) -> Option<Vec<u8>> {
    let mut buf = BytesMut::from(wire);
    let head = loop {
        match parse_response(&mut buf, &Method::GET).ok()?? {
            Parsed::Interim(_) => continue,
            Parsed::Final(h) => break h,
        }
    };
    let mut framing = head.framing;
    if framing == Framing::Close {
        return None;
    }
    let mut body = Vec::new();
    loop {
        match decode(&mut framing, &mut buf).ok()? {
            Step::Data(d) => body.extend_from_slice(&d),
            Step::End => return Some(body),
            Step::More => return None,
        }
    }
}

/// hyper's client: the body of the response to a GET, or why it failed.
async fn hyper_response(wire: Vec<u8>) -> Result<Vec<u8>, String> {
    let (client, mut server) = tokio::io::duplex(1 << 20);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut req = [0u8; 1024];
        let _ = server.read(&mut req).await;
        let _ = server.write_all(&wire).await;
        let _ = server.shutdown().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let req = http::Request::get("/")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(2), send.send_request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let body = tokio::time::timeout(Duration::from_secs(2), res.into_body().collect())
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(body.to_bytes().to_vec())
}

#[test]
fn responses_end_where_hyper_ends_them_or_are_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed() ^ 0xbeef);
    let (mut accepted, mut refused) = (0usize, 0usize);
    let mut failures = Vec::new();
    for i in 0..cases() / 3 {
        let wire = response(&mut rng);
        let Some(mine) = our_response(&wire) else {
            refused += 1;
            continue;
        };
        accepted += 1;
        match rt.block_on(hyper_response(wire.clone())) {
            Ok(body) if body == mine => {}
            other => failures.push(format!(
                "case {i}: hyper read {other:?}, we read {:?}: {:?}",
                String::from_utf8_lossy(&mine),
                String::from_utf8_lossy(&wire)
            )),
        }
    }
    println!("{accepted} responses accepted (all agree), {refused} refused or close-delimited");
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(accepted * 10 >= cases() / 3, "only {accepted} accepted");
    assert!(refused * 10 >= cases() / 3, "only {refused} refused");
}
