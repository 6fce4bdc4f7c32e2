use super::*;

fn head(wire: &str, method: Method) -> Result<Option<ResponseHead>, Invalid> {
    let mut buf = BytesMut::from(wire.as_bytes());
    loop {
        match parse_response(&mut buf, &method)? {
            None => return Ok(None),
            Some(Parsed::Interim(_)) => continue,
            Some(Parsed::Final(h)) => return Ok(Some(h)),
        }
    }
}

#[test]
fn response_framing_follows_rfc_9112() {
    let h = head(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\n",
        Method::GET,
    )
    .unwrap()
    .expect("a whole head");
    assert_eq!(h.parts.status, 200);
    assert_eq!(h.parts.headers["x-a"], "b");
    assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
    // (head, request method) → (framing, connection kept)
    let cases = [
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            Method::GET,
            Framing::Chunked(Chunk::Size),
            false,
        ),
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            Method::GET,
            Framing::Chunked(Chunk::Size),
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\n\r\n",
            Method::GET,
            Framing::Close,
            false,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            Method::HEAD,
            Framing::Length(0),
            true,
        ),
        (
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
            Method::GET,
            Framing::Length(0),
            true,
        ),
        (
            "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
            Method::GET,
            Framing::Length(1),
            false,
        ),
        (
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
            Method::GET,
            Framing::Length(1),
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
            Method::GET,
            Framing::Length(1),
            false,
        ),
    ];
    for (wire, method, framing, kept) in cases {
        let h = head(wire, method).unwrap().expect("a whole head");
        assert_eq!((h.framing, h.keep_alive), (framing, kept), "{wire:?}");
    }
    assert!(head("HTTP/1.1 200 OK\r\ncontent-le", Method::GET)
        .unwrap()
        .is_none());
    for bad in [
        "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        "SMTP hello\r\n\r\n",
    ] {
        assert!(head(bad, Method::GET).is_err(), "{bad:?}");
    }
}

/// The security review's "response TE other than chunked": `gzip,
/// chunked` was decoded as chunked and the gzip coding dropped, so the
/// client got gzip bytes labelled as nothing. Now the response is
/// invalid (the gateway answers 502, as nginx does), unless it has no
/// body to decode.
#[test]
fn a_response_coding_other_than_chunked_is_invalid() {
    for te in [
        "gzip, chunked",
        "gzip",
        "chunked, chunked",
        "gzip\r\ntransfer-encoding: chunked",
    ] {
        let wire = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
        assert_eq!(
            head(&wire, Method::GET).err(),
            Some(Invalid(
                "a response's Transfer-Encoding may only be chunked"
            )),
            "{te}"
        );
        let h = head(&wire, Method::HEAD).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Length(0), "HEAD: no body to decode");
    }
}
