//! HTTP/1.1 to an endpoint without a task of its own: the request's task writes the
//! request to the pooled socket and reads the response head, and the response body reads
//! straight from the socket as the client's connection asks for it, handing the
//! connection back to the pool at the body's last byte.
//!
//! hyper's client runs a task per upstream connection, and a request crosses to it and
//! back through three channels (the request, the response head, the body's chunks): each
//! a wake-up and another poll of a task, which docs/performance.md found between the
//! agent and HAProxy on keep-alive. HTTP/2 upstreams stay with hyper (one connection
//! multiplexed for many tasks needs its task), and so do upgrades (`super::upgrade`).
//!
//! What hyper's client did that this must too: framing by RFC 9112 section 6 (chunked,
//! length, until close; none for HEAD, 1xx, 204, 304), informational responses skipped,
//! a connection reused only when both sides keep it alive and the body was read to its
//! end, an endpoint's early answer to a request still sending its body, and the same
//! limits on a response head (100 fields, about 400 KiB).

use std::{
    io::{self, Write as _},
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes, BytesMut};
use futures::FutureExt as _;
use http_body_util::BodyExt as _;
use hyper::{
    Method, Response, StatusCode, Version,
    body::{Body as _, Frame, SizeHint},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    http::request::Parts,
};
use smallvec::SmallVec;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{body::BoxError, pool::Home};
use crate::proxy::counted::Tally;

/// The most header fields in a response head (hyper's client default).
const MAX_HEADERS: usize = 100;
/// The largest response head, and the largest chunk-size line or trailer section
/// (hyper's client buffer limit, so nothing it passed is refused now).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Request body bytes gathered behind the head before they are written.
const GATHER: usize = 64 * 1024;
/// Bytes asked of the socket per read: from this, doubled while reads fill it.
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("write the request")]
    Write(#[source] io::Error),
    #[error("read the response")]
    Read(#[source] io::Error),
    #[error("the endpoint closed the connection before the response ended")]
    Closed,
    #[error("malformed response head")]
    Head(#[source] httparse::Error),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid content-length in the response")]
    ContentLength,
    #[error("malformed chunked response body")]
    Chunked,
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedUpgrade,
    #[error("read the client's request body")]
    RequestBody(#[source] BoxError),
}

/// Why a request got no response head.
pub enum SendError<B> {
    /// Not a byte of it went out on a connection taken from the pool: the body comes
    /// back unread, to go elsewhere (the endpoint had closed the idle connection).
    Unsent(B, Error),
    Failed(Error),
}

/// One upstream HTTP/1.1 connection, idle in the pool or carrying one request.
pub struct Conn {
    stream: TcpStream,
    tally: Option<Tally>,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// The request head (and what body came with it) as it is written; kept for the next.
    out: Vec<u8>,
    read_size: usize,
    /// Whether it has carried a request before (a write that fails on it may be an idle
    /// close racing the request: the request was then never seen).
    reused: bool,
}

/// How a message body is delimited (RFC 9112 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// The body is everything until the endpoint closes.
    Close,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    End,
    Trailers,
}

/// What the body reader expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

impl Conn {
    /// Boxed: it moves between the pool and response bodies, one pointer.
    pub fn new(stream: TcpStream, tally: Option<Tally>) -> Box<Self> {
        Box::new(Self { stream, tally, buf: BytesMut::new(), out: Vec::new(), read_size: READ_MIN, reused: false })
    }

    /// Whether the endpoint closed this idle connection (or wrote to it unasked, which
    /// leaves it as useless). No system call unless the socket became readable since
    /// its last read, which on an idle connection is only ever that.
    pub fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            // Readiness can be left over from a read that filled its buffer exactly: ask.
            Poll::Ready(Ok(())) => {
                !matches!(self.stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Ready to wait in the pool: a buffer grown for a large body is let go, so that an
    /// idle connection holds little memory. False for one that can not wait: the
    /// endpoint sent more than its response.
    pub fn idle(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        if self.buf.capacity() > 2 * READ_MIN {
            self.buf = BytesMut::new();
        }
        if self.out.capacity() > 2 * READ_MIN {
            self.out = Vec::new();
        }
        self.read_size = READ_MIN;
        true
    }

    /// Send a request (its head `parts`, which are only read: a retry sends them again,
    /// so they are not copied into a request of their own) and read its response head.
    /// The response body reads the rest from this connection, and gives it to `home` at
    /// its end if it can carry another request.
    pub async fn send<B>(
        mut self: Box<Self>,
        parts: &Parts,
        mut body: B,
        home: Home,
    ) -> Result<Response<Body>, SendError<B>>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let head_request = parts.method == Method::HEAD;
        let framing = encode_head(parts, body.size_hint(), &mut self.out);
        // Body frames already at hand go out with the head, in one write: a small body
        // mostly arrives with its request.
        let mut polled = false;
        let mut ended = body.is_end_stream();
        let mut finished = false;
        while !ended && self.out.len() < GATHER {
            match body.frame().now_or_never() {
                None => break,
                Some(None) => ended = true,
                Some(Some(Ok(frame))) => {
                    polled = true;
                    finished = encode_frame(frame, framing, &mut self.out);
                    ended = finished || body.is_end_stream();
                }
                Some(Some(Err(e))) => return Err(SendError::Failed(Error::RequestBody(e.into()))),
            }
        }
        if ended && !finished {
            finish_body(framing, None, &mut self.out);
        }
        let out = std::mem::take(&mut self.out);
        let written = write_counted(&mut self.stream, &out, self.tally.as_ref()).await;
        self.out = out;
        self.out.clear();
        if let Err((n, e)) = written {
            return Err(match n == 0 && self.reused && !polled {
                true => SendError::Unsent(body, Error::Write(e)),
                false => SendError::Failed(Error::Write(e)),
            });
        }
        let Conn { stream, tally, buf, out, read_size, .. } = &mut *self;
        let (head, whole) = if ended {
            (read_head(stream, buf, read_size, tally.as_ref(), head_request).await, true)
        } else {
            // The rest of the body goes out while the response is awaited: an endpoint
            // may answer (413, a redirect) before it has read it all.
            let (mut r, mut w) = stream.split();
            let sending = send_rest(&mut w, &mut body, framing, out, tally.as_ref());
            let reading = read_head(&mut r, buf, read_size, tally.as_ref(), head_request);
            tokio::pin!(sending, reading);
            let mut sent = None;
            let head = loop {
                tokio::select! {
                    biased;
                    head = &mut reading => break head,
                    r = &mut sending, if sent.is_none() => match r {
                        // The client's body broke: the request can not be completed.
                        Err(e @ Error::RequestBody(_)) => return Err(SendError::Failed(e)),
                        // The endpoint may have answered before it stopped reading.
                        r => sent = Some(r),
                    },
                }
            };
            match (head, sent) {
                // A body that could not be written, and no answer: the write's error says why.
                (Err(_), Some(Err(e))) => (Err(e), false),
                (head, sent) => (head, matches!(sent, Some(Ok(())))),
            }
        };
        let head = head.map_err(SendError::Failed)?;
        self.reused = true;
        // Reused only if the request went out whole and both sides keep it alive.
        let home = (whole && head.keep_alive).then_some(home);
        let mut body = Body { conn: Some(self), decode: head.decode, home };
        // A response without a body gives its connection back at once.
        body.check_end();
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        if let Some(reason) = head.reason {
            resp.extensions_mut().insert(reason);
        }
        Ok(resp)
    }
}

/// The request line and header fields, with the framing the body has: a length when it
/// is known (hyper's server has checked the client's `content-length` against it, and it
/// is written again from the body so the two can never differ), else chunked. Always
/// HTTP/1.1: a proxy speaks its own version (RFC 9110 section 6.2).
fn encode_head(parts: &Parts, size: SizeHint, out: &mut Vec<u8>) -> Framing {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    match (parts.uri.scheme(), parts.uri.path_and_query()) {
        // Absolute form, as the client sent it.
        (Some(_), _) => out.extend_from_slice(parts.uri.to_string().as_bytes()),
        (None, Some(p)) => out.extend_from_slice(p.as_str().as_bytes()),
        (None, None) => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH {
            put_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    let framing = match size.exact() {
        Some(n) => {
            // An empty body needs saying only where a body is expected (or was said).
            let said = parts.headers.contains_key(header::CONTENT_LENGTH);
            if n > 0 || said || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            Framing::Length(n)
        }
        None => {
            put_field(out, b"transfer-encoding", b"chunked");
            Framing::Chunked
        }
    };
    out.extend_from_slice(b"\r\n");
    framing
}

fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// One request body frame, framed; whether it ended the body (trailers come last).
/// Trailers are sent only in a chunked body: one of known length has nowhere to put
/// them (as with hyper).
fn encode_frame(frame: Frame<Bytes>, framing: Framing, out: &mut Vec<u8>) -> bool {
    match frame.into_data() {
        Ok(data) if framing == Framing::Chunked => {
            if !data.is_empty() {
                let _ = write!(out, "{:x}\r\n", data.len());
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            }
            false
        }
        Ok(data) => {
            out.extend_from_slice(&data);
            false
        }
        Err(frame) => {
            finish_body(framing, frame.trailers_ref(), out);
            true
        }
    }
}

/// The end of a chunked body: the last chunk and the trailer section.
fn finish_body(framing: Framing, trailers: Option<&HeaderMap>, out: &mut Vec<u8>) {
    if framing != Framing::Chunked {
        return;
    }
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Write all of `bytes`, counting what went; on failure, how much had gone.
async fn write_counted<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    tally: Option<&Tally>,
) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < bytes.len() {
        match w.write(&bytes[done..]).await {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                done += n;
                if let Some(t) = tally {
                    t.written(n);
                }
            }
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// The rest of a request body, after what went with the head.
async fn send_rest<W, B>(
    w: &mut W,
    body: &mut B,
    framing: Framing,
    out: &mut Vec<u8>,
    tally: Option<&Tally>,
) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    loop {
        out.clear();
        let ended = match body.frame().await {
            None => {
                finish_body(framing, None, out);
                true
            }
            Some(Ok(frame)) => {
                let trailers = encode_frame(frame, framing, out);
                let ended = trailers || body.is_end_stream();
                if ended && !trailers {
                    finish_body(framing, None, out);
                }
                ended
            }
            Some(Err(e)) => return Err(Error::RequestBody(e.into())),
        };
        write_counted(w, out, tally).await.map_err(|(_, e)| Error::Write(e))?;
        if ended {
            return Ok(());
        }
    }
}

/// A response head, and what it says about the body and the connection.
struct Head {
    status: StatusCode,
    version: Version,
    reason: Option<hyper::ext::ReasonPhrase>,
    headers: HeaderMap,
    decode: Decode,
    keep_alive: bool,
}

/// Read until a final response head is in (informational ones are skipped).
async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    read_size: &mut usize,
    tally: Option<&Tally>,
    head_request: bool,
) -> Result<Head, Error> {
    loop {
        if let Some(head) = parse_head(buf, head_request)? {
            return Ok(head);
        }
        buf.reserve(*read_size);
        let n = r.read_buf(buf).await.map_err(Error::Read)?;
        if n == 0 {
            return Err(Error::Closed);
        }
        if let Some(t) = tally {
            t.read(n);
        }
    }
}

/// A final response head from the front of `buf` (taken off it), if it is all there.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Error> {
    loop {
        // Uninitialised: no 3 KiB of fields zeroed for every response.
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len =
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut fields) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(Error::HeadTooLarge),
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(Error::Head(e)),
            };
        let code = resp.code.unwrap_or_default();
        match code {
            101 => return Err(Error::UnaskedUpgrade),
            100..=199 => {
                buf.advance(len);
                continue;
            }
            _ => {}
        }
        let status = StatusCode::from_u16(code).map_err(|_| Error::Head(httparse::Error::Status))?;
        let version = if resp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        let reason = resp
            .reason
            .filter(|r| Some(*r) != status.canonical_reason())
            .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes()).ok());
        // Where each field lies in the head, so that values are slices of it, not copies.
        let base = buf.as_ptr() as usize;
        let at = |part: &[u8]| (part.as_ptr() as usize - base, part.len());
        let spans: SmallVec<[_; 16]> = resp.headers.iter().map(|f| (at(f.name.as_bytes()), at(f.value))).collect();
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        for &((n, nl), (v, vl)) in &spans {
            let name =
                HeaderName::from_bytes(&head[n..n + nl]).map_err(|_| Error::Head(httparse::Error::HeaderName))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
                .map_err(|_| Error::Head(httparse::Error::HeaderValue))?;
            headers.append(name, value);
        }
        let mut keep_alive = keeps_alive(&headers, version);
        let decode = if head_request || matches!(code, 204 | 304) {
            Decode::Done
        } else {
            match framing(&headers)? {
                Framing::Length(0) => Decode::Done,
                Framing::Length(n) => Decode::Length(n),
                Framing::Chunked => {
                    if headers.remove(header::CONTENT_LENGTH).is_some() {
                        // Both: chunked wins, and the connection is not trusted again
                        // (RFC 9112 section 6.3, item 3: a sign of request smuggling).
                        keep_alive = false;
                    }
                    Decode::Chunked(Chunk::Size)
                }
                Framing::Close => {
                    keep_alive = false;
                    Decode::Close
                }
            }
        };
        return Ok(Some(Head { status, version, reason, headers, decode, keep_alive }));
    }
}

fn has_token(headers: &HeaderMap, field: HeaderName, token: &str) -> bool {
    headers
        .get_all(field)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the endpoint keeps the connection open after this response.
fn keeps_alive(headers: &HeaderMap, version: Version) -> bool {
    match version {
        Version::HTTP_10 => has_token(headers, header::CONNECTION, "keep-alive"),
        _ => !has_token(headers, header::CONNECTION, "close"),
    }
}

/// How a response body is delimited.
fn framing(headers: &HeaderMap) -> Result<Framing, Error> {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Chunked only as the last coding; any other ends at the close.
        let last = headers.get_all(header::TRANSFER_ENCODING).iter().next_back().and_then(|v| v.to_str().ok());
        let chunked = last.and_then(|v| v.rsplit(',').next()).is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
        return Ok(if chunked { Framing::Chunked } else { Framing::Close });
    }
    // Every content-length line, and every value in a list, must agree.
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.to_str().map_err(|_| Error::ContentLength)?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Error::ContentLength);
            }
            let n: u64 = part.parse().map_err(|_| Error::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::ContentLength);
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// A response body, read from its connection as the client's side asks for it.
pub struct Body {
    /// Until the body has ended (then pooled or closed).
    conn: Option<Box<Conn>>,
    decode: Decode,
    /// The pool, when the connection may carry another request once the body is read.
    home: Option<Home>,
}

impl Body {
    /// At the end, the connection goes back to the pool (or closes).
    fn check_end(&mut self) {
        if self.decode == Decode::Done
            && let Some(conn) = self.conn.take()
            && let Some(home) = self.home.take()
        {
            home.put(conn);
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else { return Poll::Ready(None) };
            match self.decode.step(&mut conn.buf) {
                Ok(Step::More) => {}
                Ok(Step::Frame(frame)) => {
                    self.check_end();
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::End) => {
                    self.check_end();
                    return Poll::Ready(None);
                }
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            conn.buf.reserve(conn.read_size);
            let spare = conn.buf.capacity() - conn.buf.len();
            // Through `AsyncRead`, which clears tokio's readiness after a short read: no
            // empty read to learn the socket is drained.
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf);
            let n = ready!(read).map_err(Error::Read)?;
            if let Some(t) = &conn.tally {
                t.read(n);
            }
            if n == spare {
                conn.read_size = (conn.read_size * 2).min(READ_MAX);
            }
            if n == 0 {
                // A close-delimited body ends here; any other was cut short.
                self.conn = None;
                return Poll::Ready(self.decode.at_eof().err().map(Err));
            }
        }
    }
}

/// What the body decoder made of the bytes it has.
enum Step {
    Frame(Frame<Bytes>),
    /// More bytes are needed.
    More,
    End,
}

impl Decode {
    /// The next frame from the front of `buf`, if its bytes are all there (I/O apart, so
    /// that the fuzz target can split a response into reads any way it likes).
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Error> {
        loop {
            match *self {
                Decode::Done => return Ok(Step::End),
                Decode::Length(left) | Decode::Chunked(Chunk::Data(left)) if !buf.is_empty() => {
                    let n = left.min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    *self = match *self {
                        Decode::Length(_) if left == n => Decode::Done,
                        Decode::Length(_) => Decode::Length(left - n),
                        _ if left == n => Decode::Chunked(Chunk::End),
                        _ => Decode::Chunked(Chunk::Data(left - n)),
                    };
                    return Ok(Step::Frame(Frame::data(data)));
                }
                Decode::Close if !buf.is_empty() => return Ok(Step::Frame(Frame::data(buf.split().freeze()))),
                Decode::Chunked(Chunk::Size) => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        *self = Decode::Chunked(if size == 0 { Chunk::Trailers } else { Chunk::Data(size) });
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(Step::More),
                    _ => return Err(Error::Chunked),
                },
                Decode::Chunked(Chunk::End) if buf.len() >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Chunked);
                    }
                    buf.advance(2);
                    *self = Decode::Chunked(Chunk::Size);
                }
                Decode::Chunked(Chunk::Trailers) => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    return match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let trailers = trailer_map(fields)?;
                            buf.advance(used);
                            *self = Decode::Done;
                            Ok(if trailers.is_empty() { Step::End } else { Step::Frame(Frame::trailers(trailers)) })
                        }
                        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => Ok(Step::More),
                        _ => Err(Error::Chunked),
                    };
                }
                _ => return Ok(Step::More),
            }
        }
    }

    /// The endpoint closed: the end of a close-delimited body, any other cut short.
    fn at_eof(&mut self) -> Result<(), Error> {
        match std::mem::replace(self, Decode::Done) {
            Decode::Close | Decode::Done => Ok(()),
            _ => Err(Error::Closed),
        }
    }
}

/// A whole response, decoded as the agent decodes one (`fuzzing`).
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: Option<HeaderMap>,
    /// Whether the connection could carry another request.
    pub keep_alive: bool,
}

/// Decode the response to a request (`head_request`: to a HEAD) from `reads`, the bytes
/// as they came off the socket, the last followed by the endpoint's close; for the fuzz
/// target, which checks that how the bytes are split into reads changes nothing.
pub fn decode_response<'a>(reads: impl IntoIterator<Item = &'a [u8]>, head_request: bool) -> Result<Decoded, Error> {
    let mut buf = BytesMut::new();
    let mut head: Option<Head> = None;
    let mut body = Vec::new();
    let mut trailers = None;
    for read in reads {
        buf.extend_from_slice(read);
        if head.is_none() {
            head = parse_head(&mut buf, head_request)?;
        }
        let Some(h) = head.as_mut() else { continue };
        while let Step::Frame(f) = h.decode.step(&mut buf)? {
            match f.into_data() {
                Ok(data) => body.extend_from_slice(&data),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
    }
    let mut head = head.ok_or(Error::Closed)?;
    head.decode.at_eof()?;
    let status = head.status.as_u16();
    Ok(Decoded { status, headers: head.headers, body, trailers, keep_alive: head.keep_alive })
}

fn trailer_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| Error::Chunked)?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| Error::Chunked)?;
        map.append(name, value);
    }
    Ok(map)
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        let frame = ready!(this.poll_next(cx));
        if let Some(Err(_)) = &frame {
            // A broken body: the connection is not used again.
            this.conn = None;
            this.decode = Decode::Done;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.decode == Decode::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.decode {
            Decode::Length(n) => SizeHint::with_exact(n),
            Decode::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, net::SocketAddr, time::Duration};

    use http_body_util::{BodyExt as _, Empty, Full, StreamBody};
    use tokio::{
        io::{AsyncBufReadExt as _, BufReader},
        net::TcpListener,
        sync::mpsc,
    };

    use hyper::Request;

    use super::*;
    use crate::proxy::http::pool::Pool;

    type Sent = Result<Frame<Bytes>, Infallible>;

    /// An endpoint that answers each request on one connection with the next of
    /// `answers`, written as given, and reports each request head and body it read.
    async fn endpoint(answers: Vec<&'static str>) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = BufReader::new(stream);
            for answer in answers {
                let mut seen = String::new();
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap() == 0 {
                        return;
                    }
                    seen.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                if seen.contains("transfer-encoding: chunked") {
                    // Chunks and trailers, to the empty line after the last chunk.
                    let mut last = false;
                    loop {
                        let mut line = String::new();
                        stream.read_line(&mut line).await.unwrap();
                        seen.push_str(&line);
                        if last && line == "\r\n" {
                            break;
                        }
                        last = last || line == "0\r\n";
                    }
                } else if let Some(n) = seen.lines().find_map(|l| l.strip_prefix("content-length: ")) {
                    let mut body = vec![0; n.parse().unwrap()];
                    stream.read_exact(&mut body).await.unwrap();
                    seen.push_str(&String::from_utf8(body).unwrap());
                }
                tx.send(seen).unwrap();
                stream.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
            // Held open until the client closes, so that a close is the client's.
            let _ = stream.read_to_end(&mut Vec::new()).await;
        });
        (addr, rx)
    }

    async fn conn(addr: SocketAddr) -> Box<Conn> {
        Conn::new(TcpStream::connect(addr).await.unwrap(), None)
    }

    fn get(method: Method) -> Request<Empty<Bytes>> {
        Request::builder().method(method).uri("/x").header("host", "web").body(Empty::new()).unwrap()
    }

    /// The status, the body and the trailers of a response read to its end.
    async fn read(resp: Response<Body>) -> (u16, String, Option<HeaderMap>) {
        let status = resp.status().as_u16();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (status, String::from_utf8(collected.to_bytes().to_vec()).unwrap(), trailers)
    }

    async fn send_one<B>(conn: Box<Conn>, req: Request<B>, pool: &Pool, addr: SocketAddr) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        match conn.send(&parts, body, pool.home(addr)).await {
            Ok(resp) => resp,
            Err(SendError::Failed(e) | SendError::Unsent(_, e)) => panic!("no response: {e}"),
        }
    }

    /// Each response framed as RFC 9112 section 6 says, and the connection pooled again
    /// only when the endpoint keeps it and the body was read to its end.
    #[tokio::test]
    async fn responses_are_framed_by_rfc_9112_and_reused_only_when_both_sides_keep_them() {
        let cases: [(Method, &str, (u16, &str), bool); 7] = [
            (Method::GET, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", (200, "hello"), true),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
                (200, "abcde"),
                true,
            ),
            (Method::GET, "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", (200, "ok"), false),
            (Method::GET, "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", (200, "ok"), false),
            (
                Method::GET,
                "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
                (200, "ok"),
                true,
            ),
            // No body, whatever the fields say; informational answers are passed over.
            (Method::HEAD, "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", (200, ""), true),
            (
                Method::GET,
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                (304, ""),
                true,
            ),
        ];
        for (method, answer, (status, body), reused) in cases {
            let (addr, _seen) = endpoint(vec![answer]).await;
            let pool = Pool::default();
            let resp = send_one(conn(addr).await, get(method.clone()), &pool, addr).await;
            let got = tokio::time::timeout(Duration::from_secs(5), read(resp)).await.expect("the body ends");
            assert_eq!((got.0, got.1.as_str()), (status, body), "{method} {answer:?}");
            assert_eq!(pool.idle_h1(addr), usize::from(reused), "{method} {answer:?}: pooled again?");
        }
    }

    /// A close-delimited body is read to the endpoint's close; the connection is spent.
    #[tokio::test]
    async fn a_body_without_a_length_ends_at_the_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\nfirst ").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(b"second").await.unwrap();
        });
        let pool = Pool::default();
        let resp = send_one(conn(addr).await, get(Method::GET), &pool, addr).await;
        assert_eq!(read(resp).await.1, "first second");
        assert_eq!(pool.idle_h1(addr), 0);
    }

    #[tokio::test]
    async fn chunked_trailers_come_through_and_both_framings_mean_chunked_on_a_spent_connection() {
        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n\
                      4\r\nbody\r\n0\r\ngrpc-status: 0\r\nx-done: yes\r\n\r\n";
        let (addr, _seen) = endpoint(vec![answer]).await;
        let pool = Pool::default();
        let resp = send_one(conn(addr).await, get(Method::GET), &pool, addr).await;
        assert!(resp.headers().get("content-length").is_none(), "the length that lost is not passed on");
        let (_, body, trailers) = read(resp).await;
        assert_eq!(body, "body");
        let trailers = trailers.expect("trailers");
        assert_eq!((&trailers["grpc-status"], &trailers["x-done"]), (&"0".parse().unwrap(), &"yes".parse().unwrap()));
        assert_eq!(pool.idle_h1(addr), 0, "a response with both framings spends its connection");
    }

    #[tokio::test]
    async fn a_malformed_response_is_an_error_naming_what_is_wrong() {
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "x-a: b\r\n".repeat(MAX_HEADERS + 1));
        let cases = [
            ("HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello", "invalid content-length"),
            ("HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\nhello", "invalid content-length"),
            ("HTTP/1.1 2x0 OK\r\n\r\n", "malformed response head"),
            ("HTTP/1.1 101 Switching Protocols\r\n\r\n", "101 Switching"),
            (many.leak(), "malformed response head"),
        ];
        for (answer, expected) in cases {
            let (addr, _seen) = endpoint(vec![answer]).await;
            let (parts, body) = get(Method::GET).into_parts();
            match conn(addr).await.send(&parts, body, Pool::default().home(addr)).await {
                Err(SendError::Failed(e)) => assert!(e.to_string().contains(expected), "{answer:?}: {e}"),
                _ => panic!("{answer:?}: accepted"),
            }
        }
        // A bad chunk size fails the body, not the head.
        let (addr, _seen) = endpoint(vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"]).await;
        let resp = send_one(conn(addr).await, get(Method::GET), &Pool::default(), addr).await;
        let err = resp.into_body().collect().await.expect_err("a broken body");
        assert_eq!(err.to_string(), "malformed chunked response body");
    }

    /// What goes out: HTTP/1.1, the client's fields, a length the body has or chunks, and
    /// the length written from the body, never the client's word for it.
    #[tokio::test]
    async fn requests_are_written_with_the_framing_their_body_has() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (addr, mut seen) = endpoint(vec![ok, ok, ok]).await;
        let pool = Pool::default();
        let mut c = conn(addr).await;
        let post = Request::builder()
            .method(Method::POST)
            .uri("/p?q=1")
            .version(Version::HTTP_10)
            .header("content-length", "999")
            .body(Full::new(Bytes::from_static(b"abc")))
            .unwrap();
        let empty = Request::builder().method(Method::PUT).uri("/e").body(Empty::<Bytes>::new()).unwrap();
        for req in [post.map(|b| b.boxed()), empty.map(|b| b.boxed()), get(Method::GET).map(|b| b.boxed())] {
            let resp = send_one(c, req, &pool, addr).await;
            let _ = read(resp).await;
            c = pool.take_h1(addr).expect("pooled again");
        }
        let heads: Vec<String> = [seen.recv().await, seen.recv().await, seen.recv().await].map(Option::unwrap).into();
        assert_eq!(heads[0], "POST /p?q=1 HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc");
        assert_eq!(heads[1], "PUT /e HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(heads[2], "GET /x HTTP/1.1\r\nhost: web\r\n\r\n");
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_in_chunks_with_its_trailers_and_the_connection_is_kept() {
        let (addr, mut seen) = endpoint(vec!["HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"]).await;
        let (tx, rx) = futures::channel::mpsc::unbounded::<Sent>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"abc")))).unwrap();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"defg")))).unwrap();
            let mut trailers = HeaderMap::new();
            trailers.insert("x-sum", "7".parse().unwrap());
            tx.unbounded_send(Ok(Frame::trailers(trailers))).unwrap();
        });
        let req = Request::builder().method(Method::POST).uri("/up").body(StreamBody::new(rx)).unwrap();
        let pool = Pool::default();
        let resp = send_one(conn(addr).await, req, &pool, addr).await;
        later.await.unwrap();
        assert_eq!(read(resp).await.0, 201);
        assert_eq!(
            seen.recv().await.unwrap(),
            "POST /up HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\nx-sum: 7\r\n\r\n"
        );
        assert_eq!(pool.idle_h1(addr), 1);
    }

    /// An endpoint may answer before it has read the body (413, a redirect): the answer
    /// comes through, and the connection, its request unfinished, is not used again.
    #[tokio::test]
    async fn an_early_answer_ends_a_body_still_streaming() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            let mut line = String::new();
            while line != "\r\n" {
                line.clear();
                s.read_line(&mut line).await.unwrap();
            }
            s.get_mut().write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            let _ = s.read_to_end(&mut Vec::new()).await;
        });
        let (tx, rx) = futures::channel::mpsc::unbounded::<Sent>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"first")))).unwrap();
        let req = Request::builder().method(Method::POST).uri("/big").body(StreamBody::new(rx)).unwrap();
        let pool = Pool::default();
        let resp = tokio::time::timeout(Duration::from_secs(5), send_one(conn(addr).await, req, &pool, addr))
            .await
            .expect("answered while the body was open");
        assert_eq!(read(resp).await.0, 413);
        assert_eq!(pool.idle_h1(addr), 0);
        drop(tx);
    }

    /// An idle connection the endpoint closed is seen as closed; a request written on a
    /// reused one that was reset comes back unsent, to go elsewhere whatever its method.
    #[tokio::test]
    async fn a_closed_idle_connection_is_seen_and_a_refused_request_comes_back_unsent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = conn(addr).await;
        let (kept, _) = listener.accept().await.unwrap();
        let mut closed = conn(addr).await;
        let (reset, _) = listener.accept().await.unwrap();
        // SO_LINGER 0: the close is a reset (the deprecation is about blocking on drop,
        // which a zero linger does not).
        #[allow(deprecated)]
        reset.set_linger(Some(Duration::ZERO)).unwrap();
        drop(reset);
        let t0 = std::time::Instant::now();
        while !closed.is_closed() {
            assert!(t0.elapsed() < Duration::from_secs(5), "the reset is never seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!open.is_closed(), "an open idle connection is kept");
        closed.reused = true;
        let (parts, body) = get(Method::DELETE).into_parts();
        match closed.send(&parts, body, Pool::default().home(addr)).await {
            Err(SendError::Unsent(..)) => {}
            Err(SendError::Failed(e)) => panic!("failed, not unsent: {e}"),
            Ok(_) => panic!("answered on a reset connection"),
        }
        drop(kept);
    }
}
