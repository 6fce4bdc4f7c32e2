//! Content sniffing: does the start of a file match its declared type?
//! Magic numbers for the image formats and PDF; plain text must be valid
//! UTF-8 without NUL bytes in what was read.

/// Bytes to read before deciding.
pub const NEEDED: usize = 512;

pub fn matches(declared: &str, head: &[u8]) -> bool {
    match declared {
        "image/png" => head.starts_with(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg" => head.starts_with(&[0xFF, 0xD8, 0xFF]),
        "image/gif" => head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a"),
        "image/webp" => head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP",
        "application/pdf" => head.starts_with(b"%PDF-"),
        "text/plain" => {
            !head.contains(&0)
                && match std::str::from_utf8(head) {
                    Ok(_) => true,
                    // A multi-byte character may be cut at the end of `head`.
                    Err(e) => e.error_len().is_none() && head.len() - e.valid_up_to() < 4,
                }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn magic_numbers() {
        assert!(matches("image/png", b"\x89PNG\r\n\x1a\nrest"));
        assert!(!matches("image/png", b"GIF89a"));
        assert!(matches("application/pdf", b"%PDF-1.7"));
        assert!(matches("text/plain", "héllo".as_bytes()));
        assert!(!matches("text/plain", b"\x00\x01binary"));
        assert!(matches("text/plain", &"é".as_bytes()[..1]));
        assert!(!matches("image/jpeg", b"<html>"));
    }
}
