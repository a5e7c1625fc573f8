//! Bodies on their way through: requests keep a copy of their frames (up to a limit) so
//! a failed attempt can be replayed on another endpoint; responses hold the endpoint's
//! in-flight guard until they end, so a long stream counts as load on the endpoint
//! serving it. Frames, trailers included, pass through unchanged. (Bytes are counted at
//! the sockets, `proxy::counted`.)

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::http::HeaderMap;

use super::h1;
use crate::balance::ActiveGuard;

/// What a request body left behind for a replay.
#[derive(Debug, Default)]
struct Kept {
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    ended: bool,
    overflow: bool,
}

/// The copy of one request body, shared by its attempts.
#[derive(Clone, Debug)]
pub struct Replay {
    /// `None` for a body that had ended before it began (no body, or an empty one):
    /// nothing to keep, so nothing allocated for the requests most clients send.
    kept: Option<Arc<Mutex<Kept>>>,
    max: usize,
}

impl Replay {
    /// The copy of `body` (at most `max` bytes of it).
    pub fn of(body: &Incoming, max: usize) -> Self {
        Self { kept: (!body.is_end_stream()).then(Arc::default), max }
    }

    /// Whether [`Replay::replay`] would give a body.
    pub fn can_replay(&self) -> bool {
        self.kept.as_ref().is_none_or(|kept| {
            let kept = kept.lock().unwrap();
            kept.ended && !kept.overflow
        })
    }

    /// A body that sends the same bytes again, if the whole body was seen and fitted.
    pub fn replay(&self) -> Option<ReqBody> {
        let Some(kept) = &self.kept else {
            return Some(ReqBody::Replay { frames: VecDeque::new(), trailers: None });
        };
        let kept = kept.lock().unwrap();
        (kept.ended && !kept.overflow)
            .then(|| ReqBody::Replay { frames: kept.frames.iter().cloned().collect(), trailers: kept.trailers.clone() })
    }
}

pub enum ReqBody {
    /// The client's body, streamed on while `replay` keeps a copy.
    First { inner: Incoming, replay: Replay },
    /// A kept copy.
    Replay { frames: VecDeque<Bytes>, trailers: Option<HeaderMap> },
}

impl ReqBody {
    pub fn first(inner: Incoming, replay: Replay) -> Self {
        ReqBody::First { inner, replay }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::First { inner, replay } => {
                let frame = ready!(Pin::new(&mut *inner).poll_frame(cx));
                let Some(kept) = &replay.kept else { return Poll::Ready(frame) };
                let mut kept = kept.lock().unwrap();
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(data) = f.data_ref() {
                            kept.len += data.len();
                            if kept.len > replay.max {
                                kept.overflow = true;
                                kept.frames = Vec::new();
                            } else if !kept.overflow {
                                kept.frames.push(data.clone());
                            }
                        } else if let Some(t) = f.trailers_ref() {
                            kept.trailers = Some(t.clone());
                            kept.ended = true;
                        }
                    }
                    None => kept.ended = true,
                    // A broken client body can not be replayed.
                    Some(Err(_)) => kept.overflow = true,
                }
                // hyper stops polling once the body says it has ended (HTTP/2 sends
                // END_STREAM with the last frame), so the end is noted here too.
                if inner.is_end_stream() {
                    kept.ended = true;
                }
                Poll::Ready(frame)
            }
            ReqBody::Replay { frames, trailers } => Poll::Ready(match frames.pop_front() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::First { inner, .. } => inner.is_end_stream(),
            ReqBody::Replay { frames, trailers } => frames.is_empty() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::First { inner, .. } => inner.size_hint(),
            ReqBody::Replay { frames, .. } => SizeHint::with_exact(frames.iter().map(|f| f.len() as u64).sum()),
        }
    }
}

/// What a body error is, whichever side it comes from.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body from an endpoint: read by the agent's own HTTP/1 client, or by
/// hyper's (HTTP/2, upgrades).
pub enum Upstream {
    H1(h1::Body<ReqBody>),
    Hyper(Incoming),
}

impl Body for Upstream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match self.get_mut() {
            Upstream::H1(b) => ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(BoxError::from)),
            Upstream::Hyper(b) => ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(BoxError::from)),
        };
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Upstream::H1(b) => b.is_end_stream(),
            Upstream::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Upstream::H1(b) => b.size_hint(),
            Upstream::Hyper(b) => b.size_hint(),
        }
    }
}

pub enum RespBody {
    Upstream {
        /// A frame read ahead (a gRPC response's first frame, looked at for its status),
        /// or the error that came instead: passed on, so a broken body is not taken for
        /// one that ended.
        first: Option<Result<Frame<Bytes>, BoxError>>,
        inner: Upstream,
        _guard: Option<ActiveGuard>,
    },
    /// A response the agent makes itself (502, 504, ...).
    Local(Option<Bytes>),
}

impl RespBody {
    pub fn upstream(inner: Upstream, guard: Option<ActiveGuard>) -> Self {
        RespBody::Upstream { first: None, inner, _guard: guard }
    }

    /// Count the response as load on its endpoint (`guard`) until the body ends.
    pub fn hold(&mut self, guard: ActiveGuard) {
        if let RespBody::Upstream { _guard, .. } = self {
            *_guard = Some(guard);
        }
    }

    /// Read the first frame ahead, waiting at most `wait`; it is still sent first.
    /// Returns the trailers if the body is nothing but trailers (how gRPC servers answer
    /// with an error status after the headers).
    pub async fn peek_trailers(&mut self, wait: std::time::Duration) -> Option<&HeaderMap> {
        let RespBody::Upstream { first, inner, .. } = self else { return None };
        if first.is_none() && !inner.is_end_stream() {
            use http_body_util::BodyExt as _;
            if let Ok(Some(frame)) = tokio::time::timeout(wait, inner.frame()).await {
                *first = Some(frame);
            }
        }
        first.as_ref().and_then(|f| f.as_ref().ok()).and_then(|f| f.trailers_ref())
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Upstream { first, inner, _guard } => {
                let frame = match first.take() {
                    Some(f) => Some(f),
                    None => ready!(Pin::new(&mut *inner).poll_frame(cx)),
                };
                if !matches!(frame, Some(Ok(_))) || inner.is_end_stream() {
                    // Ended: the endpoint is no longer busy with this request.
                    *_guard = None;
                }
                Poll::Ready(frame)
            }
            RespBody::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Upstream { first, inner, .. } => first.is_none() && inner.is_end_stream(),
            RespBody::Local(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Upstream { first: None, inner, .. } => inner.size_hint(),
            RespBody::Upstream { .. } => SizeHint::default(),
            RespBody::Local(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    #[tokio::test]
    async fn replay_sends_the_same_frames_and_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let kept = Replay { kept: Some(Arc::default()), max: 100 };
        *kept.kept.as_ref().unwrap().lock().unwrap() = Kept {
            frames: vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")],
            trailers: Some(trailers.clone()),
            len: 4,
            ended: true,
            overflow: false,
        };
        let body = kept.replay().expect("replayable");
        assert_eq!(body.size_hint().exact(), Some(4));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(&collected.to_bytes()[..], b"abcd");
    }

    /// A real HTTP/2 exchange over an in-memory pipe: the server sends headers, then a
    /// gRPC error status as trailers in a frame of their own (as grpc servers do).
    #[tokio::test]
    async fn peek_finds_a_grpc_status_sent_as_trailers_after_the_headers() {
        use http_body_util::{BodyExt as _, StreamBody};
        use hyper::{Request, Response, service::service_fn};
        use hyper_util::rt::{TokioExecutor, TokioIo};

        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let svc = service_fn(|_req| async {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "14".parse().unwrap());
                let frames =
                    futures::stream::iter([Ok::<_, std::convert::Infallible>(Frame::<Bytes>::trailers(trailers))]);
                Ok::<_, std::convert::Infallible>(Response::new(StreamBody::new(frames)))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server_io), svc)
                .await;
        });
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io)).await.unwrap();
        tokio::spawn(conn);
        let req = Request::builder().uri("http://grpc/test.Echo/Who").body(http_body_util::Empty::<Bytes>::new());
        let resp = sender.send_request(req.unwrap()).await.unwrap();
        assert!(resp.headers().get("grpc-status").is_none(), "not a trailers-only response");
        let mut body = RespBody::upstream(Upstream::Hyper(resp.into_body()), None);
        let trailers = body.peek_trailers(std::time::Duration::from_secs(5)).await.expect("trailers seen");
        assert_eq!(trailers["grpc-status"], "14");
        // The peeked frame is still delivered to the client.
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    }

    #[test]
    fn an_unfinished_or_oversized_body_is_not_replayed() {
        let r = Replay { kept: Some(Arc::default()), max: 3 };
        assert!(r.replay().is_none(), "not ended yet");
        *r.kept.as_ref().unwrap().lock().unwrap() = Kept { ended: true, overflow: true, ..Kept::default() };
        assert!(r.replay().is_none(), "too big to keep");
    }
}
