//! The lean HTTP/1.1 upstream client (`src/proxy/h1.rs`) against hyper's client on the same
//! response bytes: status, end-to-end headers, body and whether the connection may be reused
//! must agree. Responses are generated from pieces that matter for framing and smuggling; the
//! `h1_response` fuzz target feeds arbitrary bytes to the same harness.
#![allow(clippy::unwrap_used)]

mod h1_diff;

use proptest::prelude::*;

const STATUS_LINES: &[&str] = &[
    "HTTP/1.1 200 OK\r\n",
    "HTTP/1.1 200 OK\r\n",
    "HTTP/1.1 201 Created\r\n",
    "HTTP/1.1 404 \r\n",
    "HTTP/1.1 500 Oops\r\n",
    "HTTP/1.0 200 OK\r\n",
    "HTTP/1.1 204 No Content\r\n",
    "HTTP/1.1 304 Not Modified\r\n",
    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
    "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n",
    "HTTP/1.1 99 Low\r\n",
    "HTTP/1.1 1000 High\r\n",
    "HTTP/2 200 OK\r\n",
    "HTTP/1.1 200 OK\n",
    "HTTP/1.1  200 OK\r\n",
    "http/1.1 200 OK\r\n",
];

fn status_line() -> impl Strategy<Value = &'static str> {
    prop::sample::select(STATUS_LINES)
}

const HEADER_LINES: &[&str] = &[
    "content-length: 5\r\n",
    "Content-Length: 5\r\n",
    "content-length: 0\r\n",
    "content-length: 7\r\n",
    "content-length: 5, 5\r\n",
    "content-length: 5, 6\r\n",
    "content-length:  5 \r\n",
    "content-length: +5\r\n",
    "content-length: -1\r\n",
    "content-length: 0x5\r\n",
    "content-length: 99999999999999999999999\r\n",
    "transfer-encoding: chunked\r\n",
    "Transfer-Encoding: CHUNKED\r\n",
    "transfer-encoding: gzip, chunked\r\n",
    "transfer-encoding: chunked, gzip\r\n",
    "transfer-encoding: identity\r\n",
    "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
    "connection: close\r\n",
    "connection: keep-alive\r\n",
    "connection: x-hop\r\nx-hop: 1\r\n",
    "keep-alive: timeout=5\r\n",
    "x-one: 1\r\n",
    "x-one: 2\r\n",
    "x-sp:   padded value  \r\n",
    "x-empty:\r\n",
    "x-fold: a\r\n b\r\n",
    "x-bad : space-before-colon\r\n",
    ": no-name\r\n",
    "x-ctl: a\x01b\r\n",
    "x-lf: bare\n",
    "x-utf8: caf\u{e9}\r\n",
    "upgrade: websocket\r\n",
    "trailer: x-t\r\n",
];

fn header_line() -> impl Strategy<Value = &'static str> {
    prop::sample::select(HEADER_LINES)
}

const BODIES: &[&str] = &[
    "",
    "hello",
    "hello world",
    "5\r\nhello\r\n0\r\n\r\n",
    "5;ext=1\r\nhello\r\n0\r\n\r\n",
    "5 \r\nhello\r\n0\r\n\r\n",
    "5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    "5\r\nhello\r\n0\r\nx-t: 1\r\nx-u: 2\r\n\r\n",
    "05\r\nhello\r\n000\r\n\r\n",
    "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    "5\r\nhello\r\n0\r\n",
    "5\r\nhelloXX0\r\n\r\n",
    "5\nhello\n0\n\n",
    "zz\r\nhello\r\n0\r\n\r\n",
    "-5\r\nhello\r\n0\r\n\r\n",
    "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "5\r\nhel",
    "0\r\n\r\n",
];

fn body() -> impl Strategy<Value = &'static str> {
    prop::sample::select(BODIES)
}

const TRAILING: &[&str] = &["", "", "", "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", "x"];

fn trailing() -> impl Strategy<Value = &'static str> {
    prop::sample::select(TRAILING)
}

fn response() -> impl Strategy<Value = Vec<u8>> {
    (status_line(), prop::collection::vec(header_line(), 0..4), body(), trailing()).prop_map(
        |(status, headers, body, trailing)| {
            let mut out = status.as_bytes().to_vec();
            for h in headers {
                out.extend_from_slice(h.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(body.as_bytes());
            out.extend_from_slice(trailing.as_bytes());
            out
        },
    )
}

/// Every status line with every single header line and body: about 9,500 exchanges, 64 at a
/// time. (Bytes after the response, which decide reuse, are covered by the combinations below.)
#[test]
fn every_single_header_response_is_read_as_hyper_reads_it() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut cases = Vec::new();
    for status in STATUS_LINES {
        for header in HEADER_LINES {
            for body in BODIES {
                cases.push([*status, *header, "\r\n", *body].concat().into_bytes());
            }
        }
    }
    let disagreements = rt.block_on(async {
        let server = h1_diff::Server::start().await;
        let mut out = Vec::new();
        for chunk in cases.chunks(64) {
            let runs: Vec<_> = chunk
                .iter()
                .map(|c| {
                    let (c, server) = (c.clone(), server.clone());
                    tokio::spawn(async move { (server.both(c.clone()).await, c) })
                })
                .collect();
            for run in runs {
                let ((lean, hyper), bytes) = run.await.unwrap();
                if !h1_diff::agree(&bytes, &lean, &hyper) {
                    out.push(format!(
                        "{:?}\n  lean  {lean:?}\n  hyper {hyper:?}",
                        String::from_utf8_lossy(&bytes)
                    ));
                }
            }
        }
        out
    });
    assert!(
        disagreements.is_empty(),
        "{} of {} disagree:\n{}",
        disagreements.len(),
        cases.len(),
        disagreements.join("\n")
    );
}

/// Chunk extensions and trailers are bounded per body at 16 KiB, as hyper bounds them: just
/// under is read, just over is refused, by both.
#[test]
fn chunk_extensions_and_trailers_are_bounded_as_in_hyper() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let extensions = |chunks: usize, ext: usize| {
        let mut body = String::new();
        for _ in 0..chunks {
            body.push_str(&format!("1;{}\r\nx\r\n", "e".repeat(ext)));
        }
        body + "0\r\n\r\n"
    };
    let trailers = |n: usize| format!("1\r\nx\r\n0\r\n{}\r\n", "x-t: 0123456789abcdef\r\n".repeat(n));
    let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
    for (what, body, readable) in [
        ("extensions under the limit", extensions(15, 1000), true),
        ("extensions over the limit", extensions(20, 1000), false),
        ("one long extension", extensions(1, 17_000), false),
        ("trailers under the limit", trailers(40), true),
        ("trailers over the limit", trailers(800), false),
    ] {
        let bytes = format!("{head}{body}").into_bytes();
        let (lean, hyper) = rt.block_on(h1_diff::both(bytes.clone()));
        assert!(h1_diff::agree(&bytes, &lean, &hyper), "{what}: lean {lean:?}, hyper {hyper:?}");
        let read = matches!(&lean, h1_diff::Verdict::Response { body: Some(_), .. });
        assert_eq!(read, readable, "{what}: {lean:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Several header lines at once: combinations the exhaustive test does not reach.
    #[test]
    fn the_lean_client_reads_responses_as_hyper_does(bytes in response()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (lean, hyper) = rt.block_on(h1_diff::both(bytes.clone()));
        prop_assert!(h1_diff::agree(&bytes, &lean, &hyper), "lean {:?}, hyper {:?}: {}", lean, hyper, String::from_utf8_lossy(&bytes));
    }
}
