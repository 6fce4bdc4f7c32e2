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
}
