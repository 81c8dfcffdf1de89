//! Unit tests of the authority shim: refused `:authority` values rewritten and good ones kept
//! (HPACK, Huffman, dynamic table, continuation, padding), other frames passed byte for byte,
//! malformed and oversized input refused, and any split of the input giving the same output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame_header(&mut out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
    out
}

/// A client stream: the preface, SETTINGS, then `frames`.
fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
    for f in frames {
        bytes.extend_from_slice(f);
    }
    bytes
}

fn rewrite(input: &[u8]) -> Result<Vec<u8>, ShimError> {
    let mut out = Vec::new();
    Rewriter::new().feed(input, &mut out)?;
    Ok(out)
}

/// A frame as the server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frames(bytes: &[u8]) -> Vec<Frame> {
    assert_eq!(&bytes[..24], PREFACE);
    let mut rest = &bytes[24..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        assert!(length <= MAX_FRAME_PAYLOAD, "frame of {length} bytes");
        out.push(Frame {
            kind: rest[3],
            flags: rest[4],
            stream: u32::from_be_bytes(rest[5..9].try_into().unwrap()),
            payload: rest[9..9 + length].to_vec(),
        });
        rest = &rest[9 + length..];
    }
    out
}

/// The header blocks the server reads, each decoded by a *fresh* decoder: this only works
/// when no block refers to the dynamic table.
fn header_lists(bytes: &[u8]) -> Vec<Fields> {
    let mut lists = Vec::new();
    let mut block: Option<Vec<u8>> = None;
    for f in frames(bytes) {
        match f.kind {
            TYPE_HEADERS => {
                assert!(block.is_none());
                assert_eq!(f.flags & FLAG_PADDED, 0, "padding is dropped");
                let skip = if f.flags & FLAG_PRIORITY != 0 { 5 } else { 0 };
                block = Some(f.payload[skip..].to_vec());
            }
            TYPE_CONTINUATION => block.as_mut().unwrap().extend_from_slice(&f.payload),
            _ => assert!(block.is_none(), "frame inside a header block"),
        }
        if matches!(f.kind, TYPE_HEADERS | TYPE_CONTINUATION) && f.flags & FLAG_END_HEADERS != 0 {
            let mut fresh = Decoder::new();
            lists.push(fresh.decode(&block.take().unwrap()).unwrap());
        }
    }
    assert!(block.is_none(), "unterminated header block");
    lists
}

fn authority_in(list: &Fields) -> String {
    let (_, value) = list.iter().find(|(n, _)| n == b":authority").unwrap();
    String::from_utf8(value.clone()).unwrap()
}

/// An HPACK string literal without Huffman coding.
fn literal(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, &mut out).unwrap();
    out.extend_from_slice(s);
    out
}

/// `:method POST`, `:scheme http`, `:path /pluginregistration.Registration/GetInfo`,
/// `:authority` and `content-type` as grpc-go writes them: the authority a literal with
/// incremental indexing (name index 1), so later requests refer to it by index (63 once
/// content-type is indexed after it as 62).
fn request_block(authority: &[u8]) -> Vec<u8> {
    let mut block = vec![0x83, 0x86, 0x04];
    block.extend(literal(b"/pluginregistration.Registration/GetInfo"));
    block.push(0x41);
    block.extend(literal(authority));
    block.push(0x40);
    block.extend(literal(b"content-type"));
    block.extend(literal(b"application/grpc"));
    block
}

const BAD: [&str; 3] = [
    "%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fdra.example-reg.sock",
    "/var/lib/kubelet/plugins_registry/dra.example-reg.sock",
    "",
];

#[test]
fn refused_authorities_become_localhost_and_good_ones_stay() {
    for (authority, expected) in BAD.iter().map(|a| (*a, "localhost")).chain([
        ("localhost", "localhost"),
        ("example.com:443", "example.com:443"),
    ]) {
        let headers = frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &request_block(authority.as_bytes()),
        );
        let out = rewrite(&connection(&[headers])).unwrap();
        let lists = header_lists(&out);
        assert_eq!(lists.len(), 1);
        assert_eq!(authority_in(&lists[0]), expected, "{authority:?}");
        // Everything else is kept, in order.
        let names: Vec<&[u8]> = lists[0].iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(
            names,
            [
                &b":method"[..],
                b":scheme",
                b":path",
                b":authority",
                b"content-type"
            ]
        );
        assert_eq!(lists[0][2].1, b"/pluginregistration.Registration/GetInfo");
    }
}

/// Log output collected in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_rewrite_is_logged_once_per_connection_at_debug_level() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let block = request_block(BAD[0].as_bytes());
    let requests = connection(&[
        frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block),
        frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &block),
    ]);
    tracing::subscriber::with_default(subscriber, || {
        rewrite(&requests).unwrap();
        rewrite(&requests).unwrap();
        // A good authority is not logged.
        let good = request_block(b"localhost");
        rewrite(&connection(&[frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &good,
        )]))
        .unwrap();
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("rewriting")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("DEBUG") && l.contains(BAD[0])),
        "{text}"
    );
}

#[test]
fn dynamic_table_references_across_requests_are_resolved() {
    // Stream 1 indexes the authority and content-type (entries 63 and 62 afterwards);
    // streams 3 and 5 refer to them only by index, as grpc-go does.
    let first = frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS,
        1,
        &request_block(BAD[0].as_bytes()),
    );
    let mut again = vec![0x83, 0x86, 0x04];
    again.extend(literal(
        b"/pluginregistration.Registration/NotifyRegistrationStatus",
    ));
    again.extend([0xbf, 0xbe]);
    let second = frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &again);
    let third = frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 5, &again);
    let out = rewrite(&connection(&[first, second, third])).unwrap();
    let lists = header_lists(&out);
    assert_eq!(lists.len(), 3);
    for list in &lists {
        assert_eq!(authority_in(list), "localhost");
        assert!(list.contains(&(b"content-type".to_vec(), b"application/grpc".to_vec())));
    }
    let streams: Vec<(u32, u8)> = frames(&out)
        .iter()
        .filter(|f| f.kind == TYPE_HEADERS)
        .map(|f| (f.stream, f.flags))
        .collect();
    assert_eq!(
        streams,
        [
            (1, FLAG_END_HEADERS),
            (3, FLAG_END_HEADERS),
            (5, FLAG_END_HEADERS | FLAG_END_STREAM)
        ]
    );
}

#[test]
fn huffman_coded_blocks_from_rfc_7541_keep_their_meaning() {
    // RFC 7541 C.4.1 to C.4.3: Huffman-coded strings and dynamic-table references.
    let blocks: [&[u8]; 3] = [
        &[
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ],
        &[
            0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
        ],
        &[
            0x82, 0x87, 0x85, 0xbf, 0x40, 0x88, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f,
            0x89, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf,
        ],
    ];
    let frames: Vec<Vec<u8>> = blocks
        .iter()
        .zip([1, 3, 5])
        .map(|(b, stream)| frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, b))
        .collect();
    let lists = header_lists(&rewrite(&connection(&frames)).unwrap());
    let field = |n: &str, v: &str| (n.as_bytes().to_vec(), v.as_bytes().to_vec());
    assert_eq!(
        lists[1],
        [
            field(":method", "GET"),
            field(":scheme", "http"),
            field(":path", "/"),
            field(":authority", "www.example.com"),
            field("cache-control", "no-cache"),
        ]
    );
    assert_eq!(lists[2][4], field("custom-key", "custom-value"));
    assert_eq!(authority_in(&lists[2]), "www.example.com");
}

/// HPACK Huffman code (RFC 7541 Appendix B) of the few characters the tests use.
fn huffman(s: &str) -> Vec<u8> {
    let mut bits: Vec<bool> = Vec::new();
    for c in s.chars() {
        let (code, len): (u32, u32) = match c {
            '%' => (0x15, 6),
            '.' => (0x17, 6),
            '/' => (0x18, 6),
            '2' => (0x2, 5),
            'F' => (0x61, 7),
            'a' => (0x3, 5),
            'c' => (0x4, 5),
            'k' => (0x75, 7),
            'o' => (0x7, 5),
            's' => (0x8, 5),
            _ => panic!("no code for {c:?} in this test"),
        };
        bits.extend((0..len).rev().map(|i| code >> i & 1 == 1));
    }
    while !bits.len().is_multiple_of(8) {
        bits.push(true); // EOS padding
    }
    let bytes: Vec<u8> = bits
        .chunks(8)
        .map(|b| b.iter().fold(0u8, |acc, &bit| acc << 1 | u8::from(bit)))
        .collect();
    let mut out = Vec::new();
    loona_hpack::encoder::encode_integer_into(bytes.len(), 7, 0x80, &mut out).unwrap();
    out.extend(bytes);
    out
}

#[test]
fn a_huffman_coded_refused_authority_is_rewritten() {
    for value in ["%2Fa%2Fsock", "/a/sock", "/a.sock"] {
        let mut block = vec![0x83, 0x86, 0x41];
        block.extend(huffman(value));
        // The test's own Huffman coding is right: a plain decoder reads the value back.
        let decoded = Decoder::new().decode(&block).unwrap();
        assert_eq!(decoded[2].1, value.as_bytes());
        let headers = frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block);
        let lists = header_lists(&rewrite(&connection(&[headers])).unwrap());
        assert_eq!(authority_in(&lists[0]), "localhost", "{value}");
    }
}

#[test]
fn padding_is_dropped_and_priority_kept() {
    let block = request_block(BAD[1].as_bytes());
    let priority = [0x80, 0, 0, 0, 15];
    let mut payload = vec![7];
    payload.extend(priority);
    payload.extend(&block);
    payload.extend([0; 7]);
    let flags = FLAG_PADDED | FLAG_PRIORITY | FLAG_END_HEADERS | FLAG_END_STREAM;
    let out = rewrite(&connection(&[frame(TYPE_HEADERS, flags, 1, &payload)])).unwrap();
    let headers = &frames(&out)[1];
    assert_eq!(
        headers.flags,
        FLAG_PRIORITY | FLAG_END_HEADERS | FLAG_END_STREAM
    );
    assert_eq!(headers.payload[..5], priority);
    assert_eq!(authority_in(&header_lists(&out)[0]), "localhost");
}

#[test]
fn continuation_frames_are_joined_and_large_blocks_split() {
    // In: HEADERS + 2 CONTINUATION frames. Out: a block over 16 KiB, split again.
    let mut block = request_block(BAD[0].as_bytes());
    block.push(0x40);
    block.extend(literal(b"x-big"));
    block.extend(literal(&[b'v'; 20_000]));
    let (a, rest) = block.split_at(10);
    let (b, c) = rest.split_at(rest.len() / 2);
    let input = connection(&[
        frame(TYPE_HEADERS, 0, 1, a),
        frame(TYPE_CONTINUATION, 0, 1, b),
        frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, c),
        frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\x05hello"),
    ]);
    let out = rewrite(&input).unwrap();
    let kinds: Vec<(u8, u8)> = frames(&out).iter().map(|f| (f.kind, f.flags)).collect();
    assert_eq!(
        kinds,
        [
            (0x4, 0),
            (TYPE_HEADERS, 0),
            (TYPE_CONTINUATION, FLAG_END_HEADERS),
            (0x0, FLAG_END_STREAM)
        ]
    );
    let lists = header_lists(&out);
    assert_eq!(authority_in(&lists[0]), "localhost");
    assert_eq!(lists[0][5].1.len(), 20_000);
    // The DATA frame passes byte for byte.
    assert!(out.ends_with(&frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\x05hello")));
}

#[test]
fn any_split_of_the_input_gives_the_same_output() {
    let input = connection(&[
        frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &request_block(BAD[0].as_bytes()),
        ),
        frame(0x0, 0, 1, b"\0\0\0\0\x02hi"),
        frame(0x8, 0, 0, &[0, 0, 1, 0]),
        frame(TYPE_HEADERS, 0, 3, &request_block(b"localhost")[..7]),
        frame(
            TYPE_CONTINUATION,
            FLAG_END_HEADERS,
            3,
            &request_block(b"localhost")[7..],
        ),
    ]);
    let whole = rewrite(&input).unwrap();
    for chunk in [1, 2, 3, 7, 9, 10, 64] {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            rewriter.feed(piece, &mut out).unwrap();
        }
        assert_eq!(out, whole, "reads of {chunk} bytes");
    }
}

#[test]
fn frames_other_than_headers_pass_byte_for_byte() {
    let others = [
        frame(0x4, 0, 0, &[0, 4, 0, 1, 0, 0]),
        frame(0x4, 0x1, 0, &[]),
        frame(0x6, 0, 0, b"12345678"),
        frame(0x8, 0, 0, &[0, 0x10, 0, 0]),
        frame(0x0, 0x8, 1, &[2, b'x', 0, 0]),
        frame(0x3, 0, 1, &[0, 0, 0, 8]),
    ];
    let input = connection(&others);
    assert_eq!(rewrite(&input).unwrap(), input);
    // Not HTTP/2 at all: nothing is touched.
    let http1 = b"GET / HTTP/1.1\r\nHost: /var/run/x.sock\r\n\r\n";
    assert_eq!(rewrite(http1).unwrap(), http1);
}

#[test]
fn malformed_frames_close_the_connection() {
    let block = request_block(BAD[0].as_bytes());
    let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
        (
            vec![frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block)],
            "CONTINUATION without HEADERS",
        ),
        (
            vec![
                frame(TYPE_HEADERS, 0, 1, &block),
                frame(0x0, 0, 1, b"\0\0\0\0\0"),
            ],
            "interrupted",
        ),
        (
            vec![
                frame(TYPE_HEADERS, 0, 1, &block),
                frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &block),
            ],
            "interrupted",
        ),
        (
            vec![frame(
                TYPE_HEADERS,
                FLAG_PADDED | FLAG_END_HEADERS,
                1,
                &[200, 0x82],
            )],
            "padding",
        ),
        (
            vec![frame(TYPE_HEADERS, FLAG_PADDED | FLAG_END_HEADERS, 1, &[])],
            "pad length",
        ),
        (
            vec![frame(
                TYPE_HEADERS,
                FLAG_PRIORITY | FLAG_END_HEADERS,
                1,
                &[0, 0],
            )],
            "PRIORITY",
        ),
        (
            vec![frame(TYPE_HEADERS, FLAG_END_HEADERS, 0, &block)],
            "stream 0",
        ),
        (
            vec![frame(TYPE_PUSH_PROMISE, 0, 1, &[0, 0, 0, 2])],
            "PUSH_PROMISE",
        ),
        // An index beyond both tables, and a string longer than the block.
        (
            vec![frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0x10])],
            "HPACK",
        ),
        (
            vec![frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                1,
                &[0x41, 0x7f, 0x10, b'x'],
            )],
            "HPACK",
        ),
        // A dynamic table larger than the server allows.
        (
            vec![frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                1,
                &[0x3f, 0xe1, 0x7f, 0x82],
            )],
            "HPACK",
        ),
    ];
    for (frames, expected) in cases {
        let error = rewrite(&connection(&frames)).unwrap_err().to_string();
        assert!(error.contains(expected), "{error} (expected {expected})");
    }
}

#[test]
fn header_blocks_are_bounded() {
    // Too many encoded bytes, refused before they are collected.
    let huge = frame(TYPE_HEADERS, 0, 1, &[]);
    let mut input = connection(&[huge]);
    let chunk = vec![0u8; MAX_FRAME_PAYLOAD];
    for _ in 0..=MAX_HEADER_BLOCK / MAX_FRAME_PAYLOAD {
        input.extend(frame(TYPE_CONTINUATION, 0, 1, &chunk));
    }
    assert_eq!(rewrite(&input), Err(ShimError::TooLarge));
    // Few encoded bytes that expand beyond the bound through the dynamic table.
    let mut block = vec![0x40];
    block.extend(literal(b"x"));
    block.extend(literal(&[b'y'; 4000]));
    block.extend(std::iter::repeat_n(0xbe, 100));
    let input = connection(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block)]);
    assert_eq!(rewrite(&input), Err(ShimError::TooLarge));
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A small xorshift generator: deterministic, no extra dependency.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..2_000 {
        let len = usize::try_from(next() % 200).unwrap();
        let mut input = PREFACE.to_vec();
        // Mostly header frames with random flags and payloads.
        let kind =
            [TYPE_HEADERS, TYPE_CONTINUATION, 0x0, 0x4][usize::try_from(next() % 4).unwrap()];
        let payload: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        input.extend(frame(kind, next().to_le_bytes()[0], 1, &payload));
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        for piece in input.chunks(usize::try_from(next() % 16 + 1).unwrap()) {
            if rewriter.feed(piece, &mut out).is_err() {
                break;
            }
        }
    }
}

#[tokio::test]
async fn the_stream_wrapper_rewrites_and_fails_on_malformed_input() {
    let (mut client, server) = tokio::io::duplex(64);
    let mut shim = AuthorityShim::new(server);
    let input = connection(&[frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS,
        1,
        &request_block(BAD[0].as_bytes()),
    )]);
    let expected = rewrite(&input).unwrap();
    let writer = tokio::spawn(async move {
        client.write_all(&input).await.unwrap();
        client
            .write_all(&frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[]))
            .await
            .unwrap();
        client.read_u8().await.unwrap();
    });
    let mut got = vec![0; expected.len()];
    shim.read_exact(&mut got).await.unwrap();
    assert_eq!(got, expected);
    let error = shim.read_u8().await.unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert!(error.to_string().contains("CONTINUATION"), "{error}");
    // Writes go straight through.
    shim.write_all(b"!").await.unwrap();
    writer.await.unwrap();
}
