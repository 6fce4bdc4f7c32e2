//! Identifiers: request ids and entity ids (UUIDv7, time-ordered, so they
//! index well in B-trees and sort by creation time).

thread_local! {
    /// Each thread's UUIDv7 clock: `Uuid::now_v7` shares one behind a
    /// mutex, which every request of every thread would take.
    static V7_CONTEXT: uuid::ContextV7 = const { uuid::ContextV7::new() };
}

/// A new time-ordered id as a lowercase hyphenated string: ordered by
/// millisecond everywhere, and within a millisecond on the same thread.
pub fn new_id() -> String {
    let id = V7_CONTEXT.with(|ctx| uuid::Uuid::new_v7(uuid::Timestamp::now(ctx)));
    // Encoded straight into the string, without the formatting machinery
    // (`to_string`): this runs for every request the gateway serves.
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf).to_owned()
}

/// `text` when it is an entity id as [`new_id`] writes it (a hyphenated
/// UUID), so it can go into a URL path or a query as it is; `None` for
/// anything else (`../x`, `a/b`, spaces, percent signs...).
pub fn parse_id(text: &str) -> Option<&str> {
    uuid::Uuid::try_parse(text)
        .ok()
        .filter(|_| text.len() == uuid::fmt::Hyphenated::LENGTH)
        .map(|_| text)
}

thread_local! {
    /// Each thread's request-id generator state (SplitMix64); 0 until
    /// first seeded from the OS's randomness.
    static REQUEST_ID_STATE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A new request id: a UUIDv7 (ordered by millisecond) whose 74 random
/// bits come from a per-thread SplitMix64 generator seeded from the OS,
/// at about half of [`new_id`]'s cost (the gateway makes one for every
/// request that comes without one). Unique, not unguessable: never use it
/// as a secret or a token.
pub fn new_request_id() -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    new_request_id_in(&mut buf).to_owned()
}

/// A new request id written into `buf`.
fn new_request_id_in(buf: &mut [u8; uuid::fmt::Hyphenated::LENGTH]) -> &mut str {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (a, b) = REQUEST_ID_STATE.with(|state| {
        let mut s = state.get();
        if s == 0 {
            // Seeded once per thread; the low bit keeps it from being 0.
            s = (uuid::Uuid::new_v4().as_u128() as u64) | 1;
        }
        let a = splitmix64(&mut s);
        let b = splitmix64(&mut s);
        state.set(s);
        (a, b)
    });
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&a.to_le_bytes());
    random[8..].copy_from_slice(&b.to_le_bytes()[..2]);
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    id.hyphenated().encode_lower(buf)
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A request id: accepts a caller's id when it is short and printable,
/// otherwise makes a new one ([`new_request_id`]), so logs can never be
/// polluted through it.
pub fn request_id_or_new(incoming: Option<&str>) -> String {
    request_id_or_new_shared(incoming).to_string()
}

/// [`request_id_or_new`] as an `Arc<str>`, made in one allocation (the
/// runtime's, per request).
pub fn request_id_or_new_shared(incoming: Option<&str>) -> std::sync::Arc<str> {
    match incoming {
        Some(id)
            if !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) =>
        {
            id.into()
        }
        _ => {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            (&*new_request_id_in(&mut buf)).into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyphenated_uuids_are_ids() {
        let id = new_id();
        assert_eq!(parse_id(&id), Some(id.as_str()));
        for bad in [
            "../../accounts/me",
            "a/b",
            "",
            "0192f0c1-0000-7000-8000-00000000000",
            "0192f0c100007000800000000000000a",
            "{0192f0c1-0000-7000-8000-00000000000a}",
            "0192f0c1-0000-7000-8000-00000000000a/..",
            "%2e%2e",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn request_ids_are_v7_uuids_distinct_and_ordered_by_millisecond() {
        let first = new_request_id();
        let parsed = uuid::Uuid::parse_str(&first).unwrap();
        assert_eq!(parsed.get_version(), Some(uuid::Version::SortRand));
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122);
        let many: std::collections::HashSet<String> =
            (0..10_000).map(|_| new_request_id()).collect();
        assert_eq!(many.len(), 10_000, "no repeats");
        // Another thread has its own generator, seeded apart.
        let other = std::thread::spawn(new_request_id).join().unwrap();
        assert!(!many.contains(&other));
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = new_request_id();
        assert!(later[..13] > first[..13], "{later} after {first}");
    }

    #[test]
    fn keeps_a_sane_incoming_id_and_replaces_a_bad_one() {
        assert_eq!(request_id_or_new(Some("abc-123")), "abc-123");
        let replaced = request_id_or_new(Some("bad id\nwith newline"));
        assert_ne!(replaced, "bad id\nwith newline");
        assert_eq!(replaced.len(), 36);
        assert_eq!(request_id_or_new(None).len(), 36);
    }
}

/// Lower-case hex of `bytes`, in one allocation (hashes as keys and ids:
/// `format!("{b:02x}")` per byte made a String per byte, 32 of them for
/// every session lookup).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Bytes first, then one check: pushing chars to a String encodes
    // each as UTF-8, on every session lookup.
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

#[cfg(test)]
mod hex_tests {
    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
    }
}
