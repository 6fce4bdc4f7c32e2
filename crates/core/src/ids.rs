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

/// A request id: accepts a caller's id when it is short and printable,
/// otherwise makes a new one, so logs can never be polluted through it.
pub fn request_id_or_new(incoming: Option<&str>) -> String {
    match incoming {
        Some(id)
            if !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) =>
        {
            id.to_string()
        }
        _ => new_id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_sane_incoming_id_and_replaces_a_bad_one() {
        assert_eq!(request_id_or_new(Some("abc-123")), "abc-123");
        let replaced = request_id_or_new(Some("bad id\nwith newline"));
        assert_ne!(replaced, "bad id\nwith newline");
        assert_eq!(replaced.len(), 36);
        assert_eq!(request_id_or_new(None).len(), 36);
    }
}
