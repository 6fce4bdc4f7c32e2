//! Bearer tokens (`Authorization: Bearer <token>`, RFC 6750) checked in
//! constant time, for every endpoint that a token opens: the gateway's
//! admin API and status, and `/metrics` of `serve` and `worker`.

/// Whether the `Authorization` header's value `header` carries one of
/// `tokens`. Each configured token is compared in full, so the time taken
/// does not tell which one nearly matched; no tokens means no match.
pub fn matches(header: Option<&str>, tokens: &[&str]) -> bool {
    let given = header
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .as_bytes();
    tokens
        .iter()
        .fold(false, |ok, t| ok | constant_time_eq(given, t.as_bytes()))
}

/// Equal bytes, taking the same time wherever the first difference is
/// (lengths may differ in time: a token's length is no secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The SHA-256 of `token` in lowercase hex: how service and registration
/// tokens are kept in settings.
pub fn sha256_hex(token: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 64 hex digits, as [`sha256_hex`] writes (either case).
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The entry of `entries` whose SHA-256 (`hash_of`) is that of the bearer
/// token in `header`, compared in constant time; `None` for no header,
/// another scheme, or an unknown token.
pub fn find_hashed<'a, T>(
    header: Option<&str>,
    entries: &'a [T],
    hash_of: impl Fn(&T) -> &str,
) -> Option<&'a T> {
    let token = header?.strip_prefix("Bearer ")?.trim();
    if token.is_empty() || entries.is_empty() {
        return None;
    }
    let hash = sha256_hex(token);
    entries.iter().find(|e| {
        let stored = hash_of(e);
        stored.len() == hash.len()
            && constant_time_eq(stored.to_ascii_lowercase().as_bytes(), hash.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_configured_token_after_bearer_matches() {
        let tokens = ["admin-token-0123456789", "metrics-token-0123456789"];
        assert!(matches(Some("Bearer admin-token-0123456789"), &tokens));
        assert!(matches(Some("Bearer metrics-token-0123456789"), &tokens));
        assert!(!matches(Some("Bearer admin-token-012345678"), &tokens));
        assert!(!matches(Some("admin-token-0123456789"), &tokens));
        assert!(!matches(Some("Basic admin-token-0123456789"), &tokens));
        assert!(!matches(None, &tokens));
        // No configured token: nothing matches, an empty header included.
        assert!(!matches(Some("Bearer "), &[]));
        assert!(!matches(None, &[]));
    }

    #[test]
    fn a_hashed_token_is_found_by_its_bearer() {
        let entries = [
            ("a", sha256_hex("tok-a")),
            ("b", sha256_hex("tok-b").to_uppercase()),
        ];
        let find = |h| find_hashed(h, &entries, |e| e.1.as_str()).map(|e| e.0);
        assert_eq!(find(Some("Bearer tok-a")), Some("a"));
        assert_eq!(find(Some("Bearer tok-b")), Some("b"));
        assert_eq!(find(Some("Bearer tok-c")), None);
        assert_eq!(find(Some("tok-a")), None);
        assert_eq!(find(Some("Bearer ")), None);
        assert_eq!(find(None), None);
        assert!(is_sha256_hex(&entries[0].1));
        assert!(!is_sha256_hex("abc"));
    }
}
