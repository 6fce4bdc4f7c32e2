use super::*;

fn decode_all(framing: Framing, wire: &[u8], split: usize) -> Result<(Vec<u8>, usize), Invalid> {
    // Feeds the bytes in pieces of `split`, as reads would.
    let mut framing = framing;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    loop {
        match decode(&mut framing, &mut buf)? {
            Step::Data(d) => out.extend_from_slice(&d),
            Step::End => return Ok((out, buf.len())),
            Step::More => {
                if fed == wire.len() {
                    return Err(Invalid("ended early"));
                }
                let end = (fed + split).min(wire.len());
                buf.extend_from_slice(&wire[fed..end]);
                fed = end;
            }
        }
    }
}

#[test]
fn chunked_bodies_decode_whatever_the_read_boundaries() {
    let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
    for split in [1, 2, 3, 7, 64] {
        let (body, left) = decode_all(Framing::Chunked(Chunk::Size), wire, split).unwrap();
        assert_eq!(body, b"hello, world", "split {split}");
        assert_eq!(left, 0);
    }
}

#[test]
fn bytes_after_a_body_are_left_in_the_buffer() {
    let (body, left) = decode_all(Framing::Length(3), b"abcdef", 64).unwrap();
    assert_eq!(body, b"abc");
    assert_eq!(left, 3);
    let (body, left) = decode_all(
        Framing::Chunked(Chunk::Size),
        b"1\r\na\r\n0\r\n\r\nHTTP",
        64,
    )
    .unwrap();
    assert_eq!(body, b"a");
    assert_eq!(left, 4);
}

/// The security review's sixth finding on chunked bodies: chunk sizes
/// `+5` and ` 5 ` and bare-LF lines were taken; a parser that reads
/// them otherwise ends the body elsewhere (smuggling). Each form, at
/// every read boundary, and the strict forms that must stay accepted.
#[test]
fn chunked_framing_is_as_strict_as_rfc_9112() {
    let refused: [&[u8]; 10] = [
        b"+5\r\nhello\r\n0\r\n\r\n",
        b" 5 \r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\n0\r\n\r\n",
        b"5\r\nhello\r\n0\n\r\n",
        b"5\r\nhello\r\n0\r\n\n",
        b"11111111111111111\r\n",
    ];
    for wire in refused {
        for split in [1, 3, 64] {
            assert!(
                matches!(
                    decode_all(Framing::Chunked(Chunk::Size), wire, split),
                    Err(Invalid(_))
                ),
                "{:?} split {split}",
                String::from_utf8_lossy(wire)
            );
        }
    }
    let accepted: [&[u8]; 4] = [
        b"5\r\nhello\r\n0\r\n\r\n",
        b"5 ;ext=1\r\nhello\r\n0\r\n\r\n",
        b"5;a=b;c\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
        b"00005\r\nhello\r\n000\r\n\r\n",
    ];
    for wire in accepted {
        for split in [1, 3, 64] {
            let (body, _) = decode_all(Framing::Chunked(Chunk::Size), wire, split)
                .unwrap_or_else(|e| panic!("{:?}: {e:?}", String::from_utf8_lossy(wire)));
            assert_eq!(body, b"hello");
        }
    }
}

#[test]
fn bad_chunk_framing_is_an_error() {
    for wire in [
        &b"zz\r\nab\r\n0\r\n\r\n"[..],
        b"2\r\nabX\r\n0\r\n\r\n",
        b"\r\n",
    ] {
        assert!(matches!(
            decode_all(Framing::Chunked(Chunk::Size), wire, 64),
            Err(Invalid(_))
        ));
    }
}

/// Trailer lines are fields, as header lines are: a bare CR, obs-fold or
/// a line without a colon would be read as a boundary by someone else.
#[test]
fn trailers_and_extensions_are_checked_not_just_skipped() {
    let accepted: [&[u8]; 2] = [
        b"1\r\na\r\n0\r\nx-t: 1\r\ny: \r\n\r\n",
        b"1;name=\"q v\"\r\na\r\n0\r\n\r\n",
    ];
    for wire in accepted {
        let (body, _) = decode_all(Framing::Chunked(Chunk::Size), wire, 64).unwrap();
        assert_eq!(body, b"a");
    }
    let refused: [&[u8]; 5] = [
        b"1\r\na\r\n0\r\nno colon\r\n\r\n",
        b"1\r\na\r\n0\r\nx: a\rb\r\n\r\n",
        b"1\r\na\r\n0\r\n folded: x\r\n\r\n",
        b"1\r\na\r\n0\r\nx : y\r\n\r\n",
        b"1;a\rb\r\na\r\n0\r\n\r\n",
    ];
    for wire in refused {
        for split in [1, 64] {
            assert!(
                decode_all(Framing::Chunked(Chunk::Size), wire, split).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }
    // Trailers are bounded in all, not only per line.
    let mut many = b"1\r\na\r\n0\r\n".to_vec();
    for i in 0..10_000 {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(
        decode_all(Framing::Chunked(Chunk::Size), &many, 4096).err(),
        Some(Invalid("trailers too large"))
    );
}
