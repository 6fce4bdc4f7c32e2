use super::*;
use crate::{Chunk, Framing};

fn parse(text: &str) -> Result<Option<RequestHead>, Refused> {
    parse_request(&mut BytesMut::from(text.as_bytes()), 8192)
}

#[test]
fn request_heads_parse_with_their_framing_and_keep_alive() {
    let head = parse("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Y: z\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(head.parts.method, Method::GET);
    assert_eq!(head.parts.uri, "/a?b=1");
    assert_eq!(head.parts.headers["x-y"], "z");
    assert_eq!(head.framing, None);
    assert!(head.keep_alive);

    let head =
        parse("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
    assert_eq!(head.framing, Some(Framing::Length(5)));
    assert!(!head.keep_alive);

    let head = parse("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(head.framing, Some(Framing::Chunked(Chunk::Size)));

    let head = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
    assert!(!head.keep_alive, "HTTP/1.0 closes unless asked");
    let head = parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(head.keep_alive);
    assert_eq!(head.parts.version, Version::HTTP_10);

    let head =
        parse("PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
    assert!(head.expect_continue);

    assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
}

#[test]
fn bad_and_oversized_heads_are_refused() {
    let both = "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert!(matches!(parse(both), Err(Refused::Bad(_))));
    let not_chunked = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n";
    assert!(matches!(parse(not_chunked), Err(Refused::Bad(_))));
    let two_lengths = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
    assert!(matches!(parse(two_lengths), Err(Refused::Bad(_))));
    assert!(matches!(
        parse("GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
        Err(Refused::Bad(_))
    ));
    assert!(matches!(parse("GARBAGE\r\n\r\n"), Err(Refused::Bad(_))));
    assert_eq!(
        parse("CONNECT example.com:443 HTTP/1.1\r\n\r\n").err(),
        Some(Refused::Connect)
    );
    let big = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(9000));
    assert_eq!(parse(&big).err(), Some(Refused::TooLarge));
    let many: String = (0..150).map(|i| format!("h{i}: v\r\n")).collect();
    assert_eq!(
        parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(),
        Some(Refused::TooLarge)
    );
}

/// The security review's sixth finding, case by case (each was
/// accepted and forwarded), and the forms it found refused, which must
/// stay refused.
#[test]
fn request_heads_are_as_strict_as_rfc_9112_says() {
    #[derive(Debug, PartialEq)]
    enum Want {
        Ok,
        Bad,
        NotImplemented,
        TooLarge,
    }
    let cases: &[(&str, &str, Want)] = &[
        ("no Host", "GET / HTTP/1.1\r\n\r\n", Want::Bad),
        ("two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Want::Bad),
        ("HTTP/1.0 without Host", "GET / HTTP/1.0\r\n\r\n", Want::Ok),
        ("GET *", "GET * HTTP/1.1\r\nHost: a\r\n\r\n", Want::Bad),
        ("OPTIONS *", "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", Want::Ok),
        (
            "gzip, chunked",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            Want::NotImplemented,
        ),
        (
            "chunked twice",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            Want::NotImplemented,
        ),
        (
            "gzip then chunked on two lines",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            Want::NotImplemented,
        ),
        ("chunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Want::Ok),
        // Refused before, and still.
        ("gzip alone", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", Want::Bad),
        (
            "CL + TE",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            Want::Bad,
        ),
        (
            "TE + CL",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            Want::Bad,
        ),
        (
            "two Content-Lengths",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            Want::Bad,
        ),
        ("a list as Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n", Want::Bad),
        ("signed Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", Want::Bad),
        ("obs-fold", "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", Want::Bad),
        ("bare CR in a value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", Want::Bad),
        ("space before the colon", "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", Want::Bad),
        ("HTTP/2.0 in an HTTP/1 head", "GET / HTTP/2.0\r\nHost: a\r\n\r\n", Want::Bad),
        ("userinfo in the target", "GET http://u:p@a/ HTTP/1.1\r\nHost: a\r\n\r\n", Want::Bad),
        ("another scheme", "GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", Want::Bad),
    ];
    for (what, text, want) in cases {
        let got = match parse(text) {
            Ok(Some(_)) => Want::Ok,
            Ok(None) => panic!("{what}: incomplete"),
            Err(Refused::Bad(_)) => Want::Bad,
            Err(Refused::NotImplemented(_)) => Want::NotImplemented,
            Err(Refused::TooLarge) => Want::TooLarge,
            Err(Refused::Connect) => panic!("{what}: CONNECT"),
        };
        assert_eq!(&got, want, "{what}");
    }
    // An absolute-form target names the host: the Host field goes.
    let head = parse("GET http://real.example/x?q=1 HTTP/1.1\r\nHost: fake.example\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(head.parts.headers.get_all("host").iter().count(), 1);
    assert_eq!(head.parts.headers["host"], "real.example");
    assert_eq!(head.parts.uri.path(), "/x");
}

#[test]
fn a_pipelined_request_stays_in_the_buffer() {
    let mut buf = BytesMut::from(
        &b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"[..],
    );
    let first = parse_request(&mut buf, 8192).unwrap().unwrap();
    assert_eq!(first.parts.uri, "/1");
    let second = parse_request(&mut buf, 8192).unwrap().unwrap();
    assert_eq!(second.parts.uri, "/2");
    assert!(buf.is_empty());
}
