//! Protocol detection: read the client's first bytes (kept, to be replayed upstream) and
//! classify them. HTTP/1.x is a request line, HTTP/2 the prior-knowledge preface, TLS a
//! ClientHello (stays opaque; its SNI is recorded); anything else, or nothing within the
//! detect timeout, is opaque TCP. (The proxy races this against the server's first
//! bytes, so a server-speaks-first protocol does not wait for the timeout.)

use bytes::BytesMut;
use tokio::{io::AsyncReadExt as _, net::TcpStream, time::Instant};

/// What a connection speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// TLS, with the server name the client asked for, if it sent one.
    Tls {
        sni: Option<String>,
    },
    Opaque,
    /// The client closed (or failed) before sending enough to tell.
    Closed,
}

impl Detected {
    pub fn name(&self) -> &'static str {
        match self {
            Detected::Http1 => "http/1",
            Detected::Http2 => "h2",
            Detected::Tls { .. } => "tls",
            Detected::Opaque | Detected::Closed => "tcp",
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest prefix read while deciding: a request line or a ClientHello longer than this
/// is treated as opaque rather than buffered without bound.
pub const MAX_PREFIX: usize = 16 * 1024;

/// Read from `client` into `buf` until its bytes say what it speaks, the client stops,
/// or `deadline` passes. Whatever was read stays in `buf` for the upstream. Cancel-safe:
/// dropped mid-read, it loses nothing, and a later call goes on from `buf`.
pub async fn detect(client: &mut TcpStream, buf: &mut BytesMut, deadline: Instant) -> Detected {
    loop {
        if let Some(d) = decide(buf) {
            return d;
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
            // Silent client: a server-speaks-first protocol, or a slow client; both work as
            // opaque TCP.
            Err(_) => return Detected::Opaque,
            Ok(Ok(0)) | Ok(Err(_)) if buf.is_empty() => return Detected::Closed,
            // Half a request and then EOF: pass on what there is, opaque.
            Ok(Ok(0)) | Ok(Err(_)) => return Detected::Opaque,
            Ok(Ok(_)) => {}
        }
    }
}

/// What [`detect`] concludes from the bytes read so far, or None to read more: the
/// protocol they show, and once `MAX_PREFIX` bytes have not settled it, HTTP/1 if they
/// are a request line still going (so hyper's limits apply to it: 414/431, never bytes
/// passed on unchecked), else opaque. Only the first `MAX_PREFIX` bytes count, so a
/// longer prefix never changes a verdict. Pure, so that it can be fuzzed on byte strings
/// (fuzz/fuzz_targets/detect.rs).
pub fn decide(prefix: &[u8]) -> Option<Detected> {
    let prefix = &prefix[..prefix.len().min(MAX_PREFIX)];
    classify(prefix).or_else(|| {
        (prefix.len() == MAX_PREFIX).then(|| if long_request_line(prefix) { Detected::Http1 } else { Detected::Opaque })
    })
}

/// Whether `prefix`, too long to decide on, is an HTTP/1 request line still going (a
/// method and the start of a long target).
fn long_request_line(prefix: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut headers);
    matches!(req.parse(prefix), Ok(httparse::Status::Partial)) && req.method.is_some()
}

/// The protocol `prefix` shows, or None while more bytes are needed to tell.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    if prefix.is_empty() {
        return None;
    }
    if H2_PREFACE.starts_with(&prefix[..prefix.len().min(H2_PREFACE.len())]) {
        return (prefix.len() >= H2_PREFACE.len()).then_some(Detected::Http2);
    }
    if prefix[0] == 0x16 {
        return tls(prefix);
    }
    http1(prefix)
}

/// HTTP/1.x once the request line is in up to its version: httparse fills in the version
/// once it has parsed `METHOD SP target SP HTTP/1.x`. What follows, well-formed or not,
/// does not change that (hyper answers a malformed head with 400): a verdict that looked
/// further would depend on where the client's reads split, since `detect` stops at the
/// first prefix that decides (found by fuzz/fuzz_targets/detect.rs).
fn http1(prefix: &[u8]) -> Option<Detected> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(prefix);
    match parsed {
        _ if req.version.is_some() => Some(Detected::Http1),
        Ok(_) => None,
        Err(_) => Some(Detected::Opaque),
    }
}

/// A TLS handshake record carrying a ClientHello: rustls parses it for the SNI.
fn tls(prefix: &[u8]) -> Option<Detected> {
    // Record header: type 0x16, version 0x03 0x0?, length; anything else is not TLS.
    if prefix.len() >= 2 && prefix[1] != 0x03 {
        return Some(Detected::Opaque);
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut bytes = prefix;
    if acceptor.read_tls(&mut bytes).is_err() {
        return Some(Detected::Opaque);
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(Detected::Tls { sni: accepted.client_hello().server_name().map(str::to_owned) }),
        // The ClientHello is not complete yet.
        Ok(None) => None,
        // Not a ClientHello rustls can read (SSLv2-style, mangled): still opaque TLS-ish
        // bytes; pass them on untouched.
        Err(_) => Some(Detected::Tls { sni: None }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_needs_the_whole_request_line() {
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET /index.html HTT"), None);
        assert_eq!(classify(b"GET /index.html HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST / HTTP/1.0\r\nHost: a\r\n\r\n"), Some(Detected::Http1));
    }

    #[test]
    fn a_bad_head_after_a_request_line_is_still_http() {
        // hyper answers these 400; passed on as bytes they would reach the endpoint.
        assert_eq!(classify(b"POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n"), Some(Detected::Http1));
        let many: Vec<u8> = [&b"GET / HTTP/1.1\r\n"[..], &b"a: b\r\n".repeat(100), b"\r\n"].concat();
        assert_eq!(classify(&many), Some(Detected::Http1));
        // A broken request line is not HTTP.
        assert_eq!(classify(b"GET /\x01 HTTP/1.1\r\n"), Some(Detected::Opaque));
    }

    #[test]
    fn a_request_line_too_long_to_wait_for_is_http_for_hyper_to_refuse() {
        let long = [&b"GET /"[..], &vec![b'a'; MAX_PREFIX]].concat();
        assert_eq!(classify(&long[..MAX_PREFIX - 1]), None);
        assert_eq!(decide(&long[..MAX_PREFIX - 1]), None);
        assert_eq!(decide(&long), Some(Detected::Http1));
        // Bytes past the limit do not change it, whatever they are.
        assert_eq!(decide(&[&long[..], b"\x01 HTTP/1.1\r\n"].concat()), Some(Detected::Http1));
        assert_eq!(decide(&vec![b'a'; MAX_PREFIX]), Some(Detected::Opaque));
    }

    #[test]
    fn what_follows_the_request_line_does_not_change_the_verdict() {
        // Decided as HTTP/1 on the request line, so the whole must be too, however the
        // rest looks (once these were opaque: a bad byte in a header, or after the version).
        for head in [&b"GET / HTTP/1.1\r\nX-Bad\x01: v\r\n\r\n"[..], b"PRI * HTTP/1.0\0\0\0\r\n"] {
            let line = head.iter().position(|&b| b == b'\r' || b == 0).unwrap();
            assert_eq!(classify(&head[..line]), Some(Detected::Http1));
            assert_eq!(classify(head), Some(Detected::Http1), "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn h2_preface_in_pieces() {
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
    }

    #[test]
    fn other_protocols_are_opaque_as_soon_as_they_differ() {
        // RESP (redis), a binary protocol, an SSH banner sent by a client.
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(&[0x00, 0x01, 0x02]), Some(Detected::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(&[0x16, 0x01]), Some(Detected::Opaque));
    }

    #[test]
    fn tls_client_hello_gives_its_sni() {
        // A ClientHello for `web.test` made by rustls itself.
        let hello = client_hello("web.test");
        assert_eq!(classify(&hello[..10]), None, "a partial hello waits for more");
        assert_eq!(classify(&hello), Some(Detected::Tls { sni: Some("web.test".into()) }));
    }

    fn client_hello(name: &str) -> Vec<u8> {
        use std::sync::Arc;
        let roots = rustls::RootCertStore::empty();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name.to_owned().try_into().unwrap()).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }
}
