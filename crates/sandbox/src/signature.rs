//! Stripe-style webhook signatures: `t=<unix seconds>,v1=<hex HMAC-SHA256
//! of "<t>.<body>">`, with verification that checks the timestamp against
//! a tolerance and compares in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The `Stripe-Signature` header value for `body` at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

#[derive(Debug, PartialEq, Eq)]
pub enum SignatureError {
    Malformed,
    TooOld,
    Mismatch,
}

impl std::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SignatureError::Malformed => "the signature header is malformed",
            SignatureError::TooOld => "the signature timestamp is outside the tolerance",
            SignatureError::Mismatch => "no signature matches the body",
        })
    }
}

impl std::error::Error for SignatureError {}

/// Verifies `header` for `body`; `now` and `tolerance` in seconds.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now: i64,
    tolerance: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => timestamp = v.parse::<i64>().ok(),
            Some(("v1", v)) => {
                candidates.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?)
            }
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now - t).abs() > tolerance {
        return Err(SignatureError::TooOld);
    }
    for candidate in candidates {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&candidate).is_ok() {
            return Ok(());
        }
    }
    Err(SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_and_rejects_tampering_and_age() {
        let header = sign("whsec_x", 1_000, b"{\"a\":1}");
        assert_eq!(verify("whsec_x", &header, b"{\"a\":1}", 1_010, 300), Ok(()));
        assert_eq!(
            verify("whsec_x", &header, b"{\"a\":2}", 1_010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("whsec_y", &header, b"{\"a\":1}", 1_010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("whsec_x", &header, b"{\"a\":1}", 2_000, 300),
            Err(SignatureError::TooOld)
        );
        assert_eq!(
            verify("whsec_x", "v1=zz", b"", 0, 300),
            Err(SignatureError::Malformed)
        );
    }
}
