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
//! a connection reused only when both sides keep it alive and both the request and the
//! response ended, a request body written on after an early answer's head (by a task on
//! the write half, `Io::Split`), and the same limits on a response head (100 fields,
//! about 400 KiB). Where it is stricter (chunk size lines, transfer codings), docs/http.md
//! says why.

use std::{
    future::Future as _,
    io::{self, Write as _},
    marker::PhantomData,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes, BytesMut};
use hyper::{
    Method, Response, StatusCode, Version,
    body::{Frame, SizeHint},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    http::request::Parts,
};
use smallvec::SmallVec;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tokio_util::task::AbortOnDropHandle;

use super::{body::BoxError, headers::has_token, pool::Home};
use crate::proxy::counted::Tally;

/// The most header fields in a response head (hyper's client default).
const MAX_HEADERS: usize = 100;
/// The largest response head, and the largest chunk-size line or trailer section
/// (hyper's client buffer limit, so nothing it passed is refused now).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// The longest chunk size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
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
    #[error("a Transfer-Encoding other than chunked alone in HTTP/1.1")]
    TransferEncoding,
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
    io: Io,
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

/// The socket. Split only while a task finishes writing a request body that outlived its
/// answer's head: the response is read here, and the request body written there, each
/// at its own pace (the client's side reads the one and feeds the other; a client that
/// sends all before it reads must not stall its upload behind its unread answer).
enum Io {
    Whole(TcpStream),
    Split { read: OwnedReadHalf, upload: Upload },
}

/// The write half's task, and what it came to.
enum Upload {
    /// Aborted if the connection is dropped with it still running (the response broke
    /// or its client went away); let go to finish on its own once the response ended.
    Running(AbortOnDropHandle<Result<OwnedWriteHalf, Error>>),
    Done(OwnedWriteHalf),
    /// The endpoint stopped reading (or the task ended otherwise): the connection is spent.
    Failed,
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
        let io = Io::Whole(stream);
        Box::new(Self { io, tally, buf: BytesMut::new(), out: Vec::new(), read_size: READ_MIN, reused: false })
    }

    /// Hand the write half to a task that finishes `sending`.
    fn split<B>(self, sending: Sending<B>) -> Self
    where
        B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let Conn { io, tally, buf, out, read_size, reused } = self;
        let Io::Whole(stream) = io else { unreachable!("split once, after the head") };
        let (read, write) = stream.into_split();
        let task = tokio::spawn(upload(sending, write, tally.clone()));
        let upload = Upload::Running(AbortOnDropHandle::new(task));
        Conn { io: Io::Split { read, upload }, tally, buf, out, read_size, reused }
    }

    /// The connection whole again once its response ended: `None` if it can not carry
    /// another request (its upload failed, or is still going, and is let finish alone).
    fn rejoin(self: Box<Self>) -> Option<Box<Self>> {
        if let Io::Whole(_) = self.io {
            return Some(self);
        }
        let Conn { io, tally, buf, out, read_size, reused } = *self;
        let stream = match io {
            Io::Whole(stream) => stream,
            Io::Split { read, upload: Upload::Done(write) } => read.reunite(write).ok()?,
            Io::Split { upload: Upload::Running(task), .. } => {
                drop(task.detach());
                return None;
            }
            Io::Split { upload: Upload::Failed, .. } => return None,
        };
        Some(Box::new(Conn { io: Io::Whole(stream), tally, buf, out, read_size, reused }))
    }

    /// Whether the endpoint closed this idle connection (or wrote to it unasked, which
    /// leaves it as useless). No system call unless the socket became readable since
    /// its last read, which on an idle connection is only ever that.
    pub fn is_closed(&self) -> bool {
        let Io::Whole(stream) = &self.io else { return true };
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            // Readiness can be left over from a read that filled its buffer exactly: ask.
            Poll::Ready(Ok(())) => {
                !matches!(stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
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
    /// The response body reads the rest from this connection (and writes the rest of the
    /// request body, if any), and gives it to `home` at its end if it can carry another
    /// request.
    pub async fn send<B>(
        mut self: Box<Self>,
        parts: &Parts,
        body: B,
        home: Home,
    ) -> Result<Response<Body<B>>, SendError<B>>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let head_request = parts.method == Method::HEAD;
        let mut sending = Sending::new(parts, body, std::mem::take(&mut self.out));
        // Whether the request went out whole; why it could not.
        let mut sent = false;
        let mut refused = None;
        // The request is written while the response head is awaited: an endpoint may
        // answer (413, a redirect) before it has read it all, or without reading it.
        let head = std::future::poll_fn(|cx| {
            let Conn { io, tally, buf, read_size, .. } = &mut *self;
            // Whole: only a connection whose upload came back is pooled (`rejoin`).
            let Io::Whole(stream) = io else { return Poll::Ready(Err(Error::Closed)) };
            if !sent && refused.is_none() {
                match sending.poll_send(stream, tally.as_ref(), cx) {
                    Poll::Pending => {}
                    Poll::Ready(Ok(())) => sent = true,
                    // The client's body broke: the request can not be completed.
                    Poll::Ready(Err(e @ Error::RequestBody(_))) => return Poll::Ready(Err(e)),
                    // The endpoint may still answer: it can have stopped reading to.
                    Poll::Ready(Err(e)) => refused = Some(e),
                }
            }
            poll_head(stream, buf, read_size, tally.as_ref(), head_request, cx)
        })
        .await;
        let spent = refused.is_some();
        let head = match (head, refused) {
            (Ok(head), _) => head,
            (Err(_), Some(e)) if sending.written == 0 && self.reused && !sending.polled => {
                return Err(SendError::Unsent(sending.body, e));
            }
            // A request that could not be written, and no answer: the write's error says why.
            (Err(Error::RequestBody(e)), _) => return Err(SendError::Failed(Error::RequestBody(e))),
            (Err(_), Some(e)) | (Err(e), None) => return Err(SendError::Failed(e)),
        };
        self.reused = true;
        if sent {
            self.out = std::mem::take(&mut sending.out);
        } else if !spent {
            self = Box::new((*self).split(sending));
        }
        // Reused only if both sides keep it alive and the request could be written whole.
        let home = (head.keep_alive && !spent).then_some(home);
        let mut body = Body { conn: Some(self), decode: head.decode, home, _request: PhantomData };
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

/// A request on its way out: its encoded bytes not yet written and the body frames still
/// to come. Driven beside the response: before its head, and after it by the response
/// body (an endpoint that echoes a body streams its answer as the body comes in).
struct Sending<B> {
    body: B,
    framing: Framing,
    /// The trailer fields the request declared (`Trailer`): the only ones sent.
    trailers: SmallVec<[HeaderName; 2]>,
    /// Encoded, written up to `at`.
    out: Vec<u8>,
    at: usize,
    /// Bytes written, all told.
    written: usize,
    /// Whether a frame was taken from the body (it can no longer go elsewhere whole).
    polled: bool,
    ended: bool,
}

impl<B> Sending<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn new(parts: &Parts, body: B, mut out: Vec<u8>) -> Self {
        out.clear();
        let framing = encode_head(parts, body.size_hint(), &mut out);
        let trailers = parts
            .headers
            .get_all(header::TRAILER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .filter(sendable_trailer)
            .collect();
        let ended = body.is_end_stream();
        let mut sending = Self { body, framing, trailers, out, at: 0, written: 0, polled: false, ended };
        if ended {
            sending.finish(None);
        }
        sending
    }

    /// Write what there is; `Ready(Ok)` once the whole request is out. Body frames at
    /// hand go behind what waits to be written, so that the head and a small body leave
    /// in one write.
    fn poll_send<W: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut W,
        tally: Option<&Tally>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        loop {
            while !self.ended && self.out.len() - self.at < GATHER {
                match Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => {
                        self.ended = true;
                        self.finish(None);
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        self.polled = true;
                        match frame.into_data() {
                            Ok(data) => encode_data(&data, self.framing, &mut self.out),
                            Err(frame) => {
                                self.ended = true;
                                self.finish(frame.trailers_ref());
                            }
                        }
                        if !self.ended && self.body.is_end_stream() {
                            self.ended = true;
                            self.finish(None);
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::RequestBody(e.into()))),
                }
            }
            if self.at == self.out.len() {
                self.out.clear();
                self.at = 0;
                // Not ended: the body's poll above has its waker.
                return if self.ended { Poll::Ready(Ok(())) } else { Poll::Pending };
            }
            let n = ready!(Pin::new(&mut *stream).poll_write(cx, &self.out[self.at..])).map_err(Error::Write)?;
            if n == 0 {
                return Poll::Ready(Err(Error::Write(io::ErrorKind::WriteZero.into())));
            }
            if let Some(t) = tally {
                t.written(n);
            }
            self.at += n;
            self.written += n;
        }
    }

    /// The end of a chunked body: the last chunk and the declared trailers.
    fn finish(&mut self, trailers: Option<&HeaderMap>) {
        if self.framing != Framing::Chunked {
            return;
        }
        self.out.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.into_iter().flatten() {
            if self.trailers.contains(name) {
                put_field(&mut self.out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        self.out.extend_from_slice(b"\r\n");
    }
}

/// The rest of a request body, on the write half; the half back when all is written.
async fn upload<B>(
    mut sending: Sending<B>,
    mut write: OwnedWriteHalf,
    tally: Option<Tally>,
) -> Result<OwnedWriteHalf, Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| sending.poll_send(&mut write, tally.as_ref(), cx)).await?;
    Ok(write)
}

/// Fields a trailer may not carry, whatever the request declared (hyper's list: framing,
/// routing, authentication and fields a recipient would act on before the body).
fn sendable_trailer(name: &HeaderName) -> bool {
    ![
        header::AUTHORIZATION,
        header::CACHE_CONTROL,
        header::CONTENT_ENCODING,
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
        header::CONTENT_TYPE,
        header::HOST,
        header::MAX_FORWARDS,
        header::SET_COOKIE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
    ]
    .contains(name)
}

/// The request line and header fields, with the framing the body has: a length when it
/// is known (hyper's server has checked the client's `content-length` against it, and it
/// is written again from the body so the two can never differ), else chunked. HTTP/1.1:
/// a proxy speaks its own version (RFC 9110 section 6.2).
fn encode_head(parts: &Parts, size: SizeHint, out: &mut Vec<u8>) -> Framing {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    match (parts.uri.scheme(), parts.uri.path_and_query()) {
        // Absolute form, as the client sent it.
        (Some(_), _) => out.extend_from_slice(parts.uri.to_string().as_bytes()),
        (None, Some(p)) => out.extend_from_slice(p.as_str().as_bytes()),
        (None, None) => out.push(b'/'),
    }
    // HTTP/1.1 needs a Host (RFC 9112 section 3.2): an absolute target's authority, else
    // an HTTP/1.0 client that sent none has its request go as HTTP/1.0, as it came.
    let host = parts.headers.contains_key(header::HOST);
    let http10 = !host && parts.uri.authority().is_none() && parts.version == Version::HTTP_10;
    out.extend_from_slice(if http10 { b" HTTP/1.0\r\n" } else { b" HTTP/1.1\r\n" });
    if let (false, Some(authority)) = (host, parts.uri.authority()) {
        // Host and port: never the userinfo an absolute target may carry.
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.host().as_bytes());
        if let Some(port) = authority.port() {
            let _ = write!(out, ":{port}");
        }
        out.extend_from_slice(b"\r\n");
    }
    if http10 {
        put_field(out, b"connection", b"keep-alive");
    }
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

/// One chunk of request body, framed.
fn encode_data(data: &[u8], framing: Framing, out: &mut Vec<u8>) {
    match framing {
        // An empty chunk would end the body.
        Framing::Chunked if data.is_empty() => {}
        Framing::Chunked => {
            let _ = write!(out, "{:x}\r\n", data.len());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        _ => out.extend_from_slice(data),
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
fn poll_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    read_size: &mut usize,
    tally: Option<&Tally>,
    head_request: bool,
    cx: &mut Context<'_>,
) -> Poll<Result<Head, Error>> {
    loop {
        if let Some(head) = parse_head(buf, head_request)? {
            return Poll::Ready(Ok(head));
        }
        if ready!(poll_fill(stream, buf, read_size, tally, cx))? == 0 {
            return Poll::Ready(Err(Error::Closed));
        }
    }
}

/// Read what the socket has into `buf`, counted. Through `AsyncRead`, which clears
/// tokio's readiness after a short read: no empty read to learn the socket is drained.
/// Reads ask for `read_size`, doubled while they fill it.
fn poll_fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    read_size: &mut usize,
    tally: Option<&Tally>,
    cx: &mut Context<'_>,
) -> Poll<Result<usize, Error>> {
    buf.reserve(*read_size);
    let spare = buf.capacity() - buf.len();
    let n = ready!(tokio_util::io::poll_read_buf(Pin::new(r), cx, buf)).map_err(Error::Read)?;
    if let Some(t) = tally {
        t.read(n);
    }
    if n == spare {
        *read_size = (*read_size * 2).min(READ_MAX);
    }
    Poll::Ready(Ok(n))
}

/// A final response head from the front of `buf` (taken off it), if it is all there.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Error> {
    loop {
        // Uninitialised: no 3 KiB of fields zeroed for every response.
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len =
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut fields) {
                // The limit on a whole head too: one that comes in one read is refused as
                // one that comes in many is (what the fuzz target holds to).
                Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(Error::HeadTooLarge),
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
            match framing(&headers, version)? {
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

/// Whether the endpoint keeps the connection open after this response.
fn keeps_alive(headers: &HeaderMap, version: Version) -> bool {
    match version {
        Version::HTTP_10 => has_token(headers, header::CONNECTION, "keep-alive"),
        _ => !has_token(headers, header::CONNECTION, "close"),
    }
}

/// How a response body is delimited.
fn framing(headers: &HeaderMap, version: Version) -> Result<Framing, Error> {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Chunked alone, and from HTTP/1.1 only (RFC 9112 section 6.1): the field is
        // hop-by-hop and dropped, so another coding would reach the client undone, and
        // an HTTP/1.0 message that has one is framed faultily.
        let mut codings = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty());
        let chunked = codings.next().is_some_and(|c| c.eq_ignore_ascii_case("chunked")) && codings.next().is_none();
        return match chunked && version == Version::HTTP_11 {
            true => Ok(Framing::Chunked),
            false => Err(Error::TransferEncoding),
        };
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
pub struct Body<B> {
    /// Until the body has ended (then pooled or closed).
    conn: Option<Box<Conn>>,
    decode: Decode,
    /// The pool, when the connection may carry another request once the body is read.
    home: Option<Home>,
    /// The request body's type, which an upload task of the connection's writes.
    _request: PhantomData<fn(B)>,
}

impl<B> Body<B> {
    /// At the end, the connection goes back to the pool if its request went out whole,
    /// or closes (after an upload still going finishes: an endpoint that answered before
    /// reading all of the body still gets it all).
    fn check_end(&mut self) {
        if self.decode == Decode::Done
            && let Some(conn) = self.conn.take()
            // First: it also lets an upload still going finish, pooled or not.
            && let Some(conn) = conn.rejoin()
            && let Some(home) = self.home.take()
        {
            home.put(conn);
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else { return Poll::Ready(None) };
            if let Io::Split { upload, .. } = &mut conn.io
                && let Upload::Running(task) = upload
                && let Poll::Ready(done) = Pin::new(task).poll(cx)
            {
                *upload = match done {
                    Ok(Ok(write)) => Upload::Done(write),
                    // The client's body broke: so does the exchange.
                    Ok(Err(e @ Error::RequestBody(_))) => return Poll::Ready(Some(Err(e))),
                    // The endpoint stopped reading: its answer may still come whole, on a
                    // connection spent.
                    _ => {
                        self.home = None;
                        Upload::Failed
                    }
                };
            }
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
            let Conn { io, tally, buf, read_size, .. } = &mut **conn;
            let read = match io {
                Io::Whole(stream) => poll_fill(stream, buf, read_size, tally.as_ref(), cx),
                Io::Split { read, .. } => poll_fill(read, buf, read_size, tally.as_ref(), cx),
            };
            if ready!(read)? == 0 {
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
                Decode::Chunked(Chunk::Size) => match chunk_line(buf)? {
                    Some((used, size)) => {
                        buf.advance(used);
                        *self = Decode::Chunked(if size == 0 { Chunk::Trailers } else { Chunk::Data(size) });
                    }
                    None => return Ok(Step::More),
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
                        Ok(httparse::Status::Complete((used, _))) if used > MAX_HEAD => Err(Error::Chunked),
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

/// A chunk's size line (RFC 9112 section 7.1: `1*HEXDIG [ BWS ";" chunk-ext ] CRLF`):
/// its length and the size, once it is all in. Stricter than httparse's, which takes an
/// empty line for the last chunk (a body cut short, and the rest read as the next
/// response), and with hyper's rules: no bare LF, no control bytes, a bounded line.
fn chunk_line(buf: &[u8]) -> Result<Option<(usize, u64)>, Error> {
    let digits = buf.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits > 16 {
        return Err(Error::Chunked);
    }
    let mut extension = false;
    for (i, &b) in buf.iter().enumerate().skip(digits) {
        if i >= MAX_CHUNK_LINE || digits == 0 {
            return Err(Error::Chunked);
        }
        match b {
            b'\r' => {
                let Some(&next) = buf.get(i + 1) else { return Ok(None) };
                if next != b'\n' {
                    return Err(Error::Chunked);
                }
                let hex = std::str::from_utf8(&buf[..digits]).map_err(|_| Error::Chunked)?;
                let size = u64::from_str_radix(hex, 16).map_err(|_| Error::Chunked)?;
                return Ok(Some((i + 2, size)));
            }
            b' ' | b'\t' => {}
            b';' => extension = true,
            b if b < 0x20 || b == 0x7f || !extension => return Err(Error::Chunked),
            _ => {}
        }
    }
    if buf.len() >= MAX_CHUNK_LINE {
        return Err(Error::Chunked);
    }
    Ok(None)
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

impl<B> hyper::body::Body for Body<B> {
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
        io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
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

    /// The next connection to `listener`, its request head read.
    async fn accept_head(listener: &TcpListener) -> BufReader<TcpStream> {
        let (s, _) = listener.accept().await.unwrap();
        let mut s = BufReader::new(s);
        let mut line = String::new();
        while line != "\r\n" {
            line.clear();
            s.read_line(&mut line).await.unwrap();
        }
        s
    }

    async fn conn(addr: SocketAddr) -> Box<Conn> {
        Conn::new(TcpStream::connect(addr).await.unwrap(), None)
    }

    fn get(method: Method) -> Request<Empty<Bytes>> {
        Request::builder().method(method).uri("/x").header("host", "web").body(Empty::new()).unwrap()
    }

    /// The status, the body and the trailers of a response read to its end.
    async fn read<B>(resp: Response<Body<B>>) -> (u16, String, Option<HeaderMap>)
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let status = resp.status().as_u16();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (status, String::from_utf8(collected.to_bytes().to_vec()).unwrap(), trailers)
    }

    async fn send_one<B>(conn: Box<Conn>, req: Request<B>, pool: &Pool, addr: SocketAddr) -> Response<Body<B>>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
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
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", "Transfer-Encoding"),
            ("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", "Transfer-Encoding"),
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
        // A bad chunk size line fails the body, not the head. An empty one is not the last
        // chunk (httparse's reading): the body would end early and the rest of it be read
        // as the next request's response.
        for line in ["zz\r\n", "\r\n", ";ext\r\n", "5\nhello", "5 x\r\n", "5;a\nb\r\n", "11111111111111111\r\n"] {
            let answer = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{line}");
            let (addr, _seen) = endpoint(vec![answer.leak()]).await;
            let resp = send_one(conn(addr).await, get(Method::GET), &Pool::default(), addr).await;
            let err = resp.into_body().collect().await.expect_err("a broken body");
            assert_eq!(err.to_string(), "malformed chunked response body", "{line:?}");
        }
    }

    /// What goes out: HTTP/1.1, the client's fields, a length the body has or chunks, and
    /// the length written from the body, never the client's word for it.
    #[tokio::test]
    async fn requests_are_written_with_the_framing_their_body_has() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (addr, mut seen) = endpoint(vec![ok, ok, ok, ok, ok]).await;
        let pool = Pool::default();
        let mut c = conn(addr).await;
        let post = Request::builder()
            .method(Method::POST)
            .uri("/p?q=1")
            .version(Version::HTTP_10)
            .header("host", "web")
            .header("content-length", "999")
            .body(Full::new(Bytes::from_static(b"abc")))
            .unwrap();
        let empty = Request::builder().method(Method::PUT).uri("/e").body(Empty::<Bytes>::new()).unwrap();
        // HTTP/1.1 needs a Host: taken from an absolute target, or the request goes as the
        // HTTP/1.0 it came as.
        let old = Request::builder().uri("/old").version(Version::HTTP_10).body(Empty::<Bytes>::new()).unwrap();
        let absolute = Request::builder().uri("http://u:p@web:8080/abs").body(Empty::<Bytes>::new()).unwrap();
        let requests = [post.map(|b| b.boxed()), empty.map(|b| b.boxed()), get(Method::GET).map(|b| b.boxed())];
        for req in requests.into_iter().chain([old.map(|b| b.boxed()), absolute.map(|b| b.boxed())]) {
            let resp = send_one(c, req, &pool, addr).await;
            let _ = read(resp).await;
            c = pool.take_h1(addr).expect("pooled again");
        }
        let mut heads = Vec::new();
        for _ in 0..5 {
            heads.push(seen.recv().await.unwrap());
        }
        assert_eq!(heads[0], "POST /p?q=1 HTTP/1.1\r\nhost: web\r\ncontent-length: 3\r\n\r\nabc");
        assert_eq!(heads[1], "PUT /e HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(heads[2], "GET /x HTTP/1.1\r\nhost: web\r\n\r\n");
        assert_eq!(heads[3], "GET /old HTTP/1.0\r\nconnection: keep-alive\r\n\r\n");
        assert_eq!(heads[4], "GET http://u:p@web:8080/abs HTTP/1.1\r\nhost: web:8080\r\n\r\n");
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_in_chunks_with_its_trailers_and_the_connection_is_kept() {
        let (addr, mut seen) = endpoint(vec!["HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"]).await;
        let (tx, rx) = futures::channel::mpsc::unbounded::<Sent>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"abc")))).unwrap();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"defg")))).unwrap();
            // Only what the request declared, and never a field a trailer may not carry.
            let mut trailers = HeaderMap::new();
            trailers.insert("x-sum", "7".parse().unwrap());
            trailers.insert("x-undeclared", "1".parse().unwrap());
            trailers.insert("host", "elsewhere".parse().unwrap());
            tx.unbounded_send(Ok(Frame::trailers(trailers))).unwrap();
        });
        let req = Request::builder()
            .method(Method::POST)
            .uri("/up")
            .header("trailer", "x-sum, host")
            .body(StreamBody::new(rx))
            .unwrap();
        let pool = Pool::default();
        let resp = send_one(conn(addr).await, req, &pool, addr).await;
        later.await.unwrap();
        assert_eq!(read(resp).await.0, 201);
        assert_eq!(
            seen.recv().await.unwrap(),
            "POST /up HTTP/1.1\r\ntrailer: x-sum, host\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\nx-sum: 7\r\n\r\n"
        );
        assert_eq!(pool.idle_h1(addr), 1);
    }

    /// An endpoint may answer before it has read the body (a 202 to an upload it stores
    /// afterwards): the answer comes through at once, the rest of the body still reaches
    /// the endpoint whole, and the connection, its request unfinished when its answer
    /// ended, is not pooled.
    #[tokio::test]
    async fn an_early_answer_comes_through_and_the_body_still_goes_out_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (got, stored) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut s = accept_head(&listener).await;
            s.get_mut().write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            let mut rest = String::new();
            let _ = s.read_to_string(&mut rest).await;
            let _ = got.send(rest);
        });
        let (tx, rx) = futures::channel::mpsc::unbounded::<Sent>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"first")))).unwrap();
        let req = Request::builder().method(Method::POST).uri("/store").body(StreamBody::new(rx)).unwrap();
        let pool = Pool::default();
        let resp = tokio::time::timeout(Duration::from_secs(5), send_one(conn(addr).await, req, &pool, addr))
            .await
            .expect("answered while the body was open");
        assert_eq!(read(resp).await.0, 202);
        assert_eq!(pool.idle_h1(addr), 0);
        // The answer is done and dropped; the body goes on.
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"second")))).unwrap();
        drop(tx);
        let rest = tokio::time::timeout(Duration::from_secs(5), stored).await.expect("the upload ends").unwrap();
        assert_eq!(rest, "5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n");
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

    /// An endpoint that answers at once and echoes the body as it comes (a stream): the
    /// rest of the request goes out while its answer streams back, and the connection,
    /// both ended, is kept.
    #[tokio::test]
    async fn a_request_body_keeps_going_out_while_its_answer_streams_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut s = accept_head(&listener).await;
            s.get_mut().write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await.unwrap();
            // Each chunk back as it came, to the last.
            loop {
                let mut line = String::new();
                s.read_line(&mut line).await.unwrap();
                let size = usize::from_str_radix(line.trim(), 16).unwrap();
                let mut data = vec![0; size + 2];
                s.read_exact(&mut data).await.unwrap();
                s.get_mut().write_all(line.as_bytes()).await.unwrap();
                s.get_mut().write_all(&data).await.unwrap();
                if size == 0 {
                    break;
                }
            }
            let _ = s.read_to_end(&mut Vec::new()).await;
        });
        let (tx, rx) = futures::channel::mpsc::unbounded::<Sent>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"one")))).unwrap();
        let req = Request::builder().method(Method::POST).uri("/echo").body(StreamBody::new(rx)).unwrap();
        let pool = Pool::default();
        let mut body = tokio::time::timeout(Duration::from_secs(5), send_one(conn(addr).await, req, &pool, addr))
            .await
            .expect("the head, before the request has ended")
            .into_body();
        for (sent, next) in [("one", Some("two")), ("two", None)] {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("the echo comes");
            assert_eq!(&frame.unwrap().unwrap().into_data().unwrap()[..], sent.as_bytes());
            match next {
                Some(n) => tx.unbounded_send(Ok(Frame::data(Bytes::from_static(n.as_bytes())))).unwrap(),
                None => tx.close_channel(),
            }
        }
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("the end comes");
        assert!(end.is_none());
        assert_eq!(pool.idle_h1(addr), 1, "both ended: kept");
    }

    /// An endpoint that answers without reading a large body (the socket's buffers full,
    /// the write blocked): the answer still comes.
    #[tokio::test]
    async fn an_answer_comes_through_while_the_request_is_stuck_unread() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!").await.unwrap();
            let _ = held.await;
        });
        let big = Full::new(Bytes::from(vec![b'x'; 32 << 20]));
        let req = Request::builder().method(Method::PUT).uri("/big").body(big).unwrap();
        let pool = Pool::default();
        let resp = tokio::time::timeout(Duration::from_secs(5), send_one(conn(addr).await, req, &pool, addr))
            .await
            .expect("answered while the write was stuck");
        assert_eq!(read(resp).await.1, "big!");
        assert_eq!(pool.idle_h1(addr), 0, "its request unfinished, the connection is spent");
        drop(release);
    }
}
