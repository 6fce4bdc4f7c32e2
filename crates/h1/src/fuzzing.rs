//! Fuzz targets: each takes arbitrary bytes and panics only when the
//! codec breaks one of its own promises. `fuzz/` runs them under AFL++
//! (`bench/fuzz.sh`); `tests/corpus.rs` replays the committed corpus and
//! the tests' own cases through them on every `cargo test`.
//!
//! The promises checked, beyond "no panic, no hang":
//!
//! - **Incremental = whole.** A head or body fed in two parts (split at a
//!   point the input itself picks) gives the same result as fed at once:
//!   a parser that decides differently on a partial buffer would find a
//!   different message boundary depending on how TCP cut the stream.
//! - **Nothing invented.** The decoded body is never longer than the bytes
//!   it came from, a parsed head is never longer than the input, and what
//!   is left after a message is exactly the input's tail.
//! - **Refusal is final.** Once refused, more bytes do not make the same
//!   prefix acceptable.

use crate::{decode, parse_request, parse_response, Chunk, Framing, Parsed, Step};
use bytes::BytesMut;
use http::Method;

/// The head limit the targets parse under.
const MAX_HEAD: usize = 16 * 1024;

/// A split point picked by the input's first byte (so the fuzzer can
/// steer it), and the rest of the input.
fn split_point(data: &[u8]) -> Option<(usize, &[u8])> {
    let (&first, rest) = data.split_first()?;
    let at = if rest.is_empty() {
        0
    } else {
        usize::from(first) % (rest.len() + 1)
    };
    Some((at, rest))
}

/// What a request parse came to, in comparable form.
#[derive(Debug, PartialEq, Eq)]
enum ReqOutcome {
    Partial,
    Refused(crate::Refused),
    Head {
        consumed: usize,
        method: String,
        target: String,
        headers: Vec<(String, Vec<u8>)>,
        framing: Option<Framing>,
        keep_alive: bool,
    },
}

fn parse_req_outcome(input: &[u8]) -> ReqOutcome {
    let mut buf = BytesMut::from(input);
    match parse_request(&mut buf, MAX_HEAD) {
        Ok(None) => {
            assert_eq!(&buf[..], input, "a partial parse leaves the buffer alone");
            ReqOutcome::Partial
        }
        Err(e) => ReqOutcome::Refused(e),
        Ok(Some(head)) => {
            let consumed = input.len() - buf.len();
            assert!(consumed <= MAX_HEAD, "a head past the limit was taken");
            assert_eq!(&buf[..], &input[consumed..], "the rest is the input's tail");
            assert!(head.parts.headers.len() <= crate::MAX_HEADERS + 1);
            if let Some(Framing::Length(n)) = head.framing {
                assert!(n > 0, "an empty body is no body");
            }
            ReqOutcome::Head {
                consumed,
                method: head.parts.method.to_string(),
                target: head.parts.uri.to_string(),
                headers: head
                    .parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                    .collect(),
                framing: head.framing,
                keep_alive: head.keep_alive,
            }
        }
    }
}

/// Target `request_head`: a request head, whole and in two parts.
pub fn request_head(data: &[u8]) {
    let Some((at, input)) = split_point(data) else {
        return;
    };
    let whole = parse_req_outcome(input);
    let prefix = parse_req_outcome(&input[..at]);
    match (&prefix, &whole) {
        // A prefix may be incomplete where the whole is anything.
        (ReqOutcome::Partial, _) => {}
        // A head found in the prefix is the same head in the whole.
        (ReqOutcome::Head { .. }, _) => assert_eq!(prefix, whole, "prefix and whole disagree"),
        // Refused for its first bytes, refused whatever follows (the
        // size limit aside: a longer input can only be more too large).
        (ReqOutcome::Refused(_), ReqOutcome::Refused(_)) => {}
        (ReqOutcome::Refused(e), other) => {
            panic!("prefix refused ({e:?}) but the whole gave {other:?}")
        }
    }
}

/// Decodes `input` under `framing`, fed in pieces cut at `cuts`.
fn decode_in_pieces(
    framing: Framing,
    input: &[u8],
    cuts: &[usize],
) -> (Result<bool, crate::Invalid>, Vec<u8>, usize) {
    let mut framing = framing;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut cuts = cuts
        .iter()
        .copied()
        .filter(|c| *c <= input.len())
        .peekable();
    loop {
        match decode(&mut framing, &mut buf) {
            Err(e) => return (Err(e), out, fed - buf.len()),
            Ok(Step::Data(d)) => {
                assert!(!d.is_empty(), "an empty data step");
                out.extend_from_slice(&d);
            }
            Ok(Step::End) => return (Ok(true), out, fed - buf.len()),
            Ok(Step::More) => {
                if fed == input.len() {
                    return (Ok(false), out, fed - buf.len());
                }
                let next = loop {
                    match cuts.next() {
                        Some(c) if c > fed => break c,
                        Some(_) => continue,
                        None => break input.len(),
                    }
                };
                buf.extend_from_slice(&input[fed..next]);
                fed = next;
            }
        }
    }
}

/// Target `chunked`: a chunked body, whole and cut in up to three places
/// the input picks; both must give the same body, end and error.
pub fn chunked(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (picks, input) = data.split_at(3);
    let mut cuts: Vec<usize> = picks
        .iter()
        .map(|p| usize::from(*p) % (input.len() + 1))
        .collect();
    cuts.sort_unstable();
    let framing = Framing::Chunked(Chunk::Size);
    let (whole_end, whole_body, whole_used) = decode_in_pieces(framing, input, &[]);
    let (cut_end, cut_body, cut_used) = decode_in_pieces(framing, input, &cuts);
    assert!(whole_body.len() <= input.len(), "more body than bytes");
    match (&whole_end, &cut_end) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "ended whole but not in pieces, or the other way");
            assert_eq!(whole_body, cut_body, "bodies differ by read boundaries");
            if *a {
                assert_eq!(whole_used, cut_used, "the body ends at different bytes");
            }
        }
        (Err(_), Err(_)) => {
            // The same bytes are refused; the body up to the refusal may
            // be handed out in different pieces but is the same prefix.
            let n = whole_body.len().min(cut_body.len());
            assert_eq!(whole_body[..n], cut_body[..n]);
        }
        _ => panic!("whole {whole_end:?} but in pieces {cut_end:?}"),
    }
}

/// Target `response`: a response head for a request with the method the
/// first byte picks, whole and in two parts, then its body decoded.
pub fn response(data: &[u8]) {
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    let method = match pick % 4 {
        0 => Method::GET,
        1 => Method::HEAD,
        2 => Method::POST,
        _ => Method::OPTIONS,
    };
    let Some((at, input)) = split_point(data) else {
        return;
    };
    let outcome = |bytes: &[u8]| -> Result<Option<(usize, u16, Framing, bool)>, crate::Invalid> {
        let mut buf = BytesMut::from(bytes);
        loop {
            let before = buf.len();
            match parse_response(&mut buf, &method)? {
                None => {
                    assert_eq!(buf.len(), before, "a partial parse leaves the buffer alone");
                    return Ok(None);
                }
                Some(Parsed::Interim(s)) => {
                    assert!(s.is_informational() && buf.len() < before);
                }
                Some(Parsed::Final(h)) => {
                    if method == Method::HEAD {
                        assert_eq!(h.framing, Framing::Length(0), "HEAD has no body");
                    }
                    if h.framing == Framing::Close {
                        assert!(!h.keep_alive, "a close-delimited body closes");
                    }
                    return Ok(Some((
                        bytes.len() - buf.len(),
                        h.parts.status.as_u16(),
                        h.framing,
                        h.keep_alive,
                    )));
                }
            }
        }
    };
    let whole = outcome(input);
    match outcome(&input[..at]) {
        Ok(None) => {}
        Ok(Some(found)) => assert_eq!(Ok(Some(found)), whole, "prefix and whole disagree"),
        Err(_) => assert!(whole.is_err(), "prefix refused, whole accepted"),
    }
    if let Ok(Some((used, _, framing, _))) = whole {
        let body = &input[used..];
        let (end, out, _) = decode_in_pieces(framing, body, &[body.len() / 2]);
        assert!(out.len() <= body.len());
        if let (Framing::Length(n), Ok(true)) = (framing, end) {
            assert_eq!(
                out.len() as u64,
                n,
                "a length-framed body of another length"
            );
        }
    }
}
