//! Each response, once it ends: classified (a 5xx, or a gRPC status other than OK from
//! the headers or the trailers, is a failure, as linkerd classifies), counted on its
//! route and endpoint edges with its latency to the headers, and sent to taps. At the
//! end, not at the headers, since a gRPC status mostly comes in the trailers.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    body::{Body, Frame, SizeHint},
    http::HeaderMap,
};

use crate::stats::{
    signals::Signals,
    tap::{Tap, TapEvent},
};

/// What is known of a request when its response headers are in.
pub struct Record {
    pub route: Option<Arc<Signals>>,
    pub endpoint: Option<Arc<Signals>>,
    pub latency: Duration,
    pub status: u16,
    pub grpc_status: Option<u16>,
    /// Built only while someone taps; boxed so that a record kept inline in every
    /// response body stays small (the event is large).
    pub tap: Option<Box<(Arc<Tap>, TapEvent)>>,
}

/// The `grpc-status` in `headers`, if any.
pub fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

impl Record {
    fn finish(self) {
        let success = self.status < 500 && self.grpc_status.is_none_or(|g| g == 0);
        for edge in [&self.route, &self.endpoint].into_iter().flatten() {
            edge.response(success, self.latency);
        }
        if let Some(tapped) = self.tap {
            let (tap, mut event) = *tapped;
            if let Some(r) = &mut event.request {
                r.status = self.status;
                r.grpc_status = self.grpc_status;
                r.success = success;
            }
            tap.send(event);
        }
    }
}

/// A response body that records its request when it ends (or is dropped unfinished,
/// when the client went away).
pub struct Observed<B> {
    inner: B,
    /// Inline, not boxed: one allocation less per request.
    record: Option<Record>,
}

impl<B> Observed<B> {
    pub fn new(inner: B, record: Option<Record>) -> Self {
        Self { inner, record }
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            r.finish();
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Observed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(t), Some(r)) = (f.trailers_ref(), this.record.as_mut()) {
                    r.grpc_status = grpc_status(t).or(r.grpc_status);
                }
            }
            _ => {
                if let Some(r) = this.record.take() {
                    r.finish();
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt as _, StreamBody};

    use super::*;

    fn record(route: &Arc<Signals>, status: u16, grpc_status: Option<u16>) -> Option<Record> {
        Some(Record {
            route: Some(Arc::clone(route)),
            endpoint: None,
            latency: Duration::from_millis(3),
            status,
            grpc_status,
            tap: None,
        })
    }

    #[tokio::test]
    async fn a_grpc_error_in_the_trailers_is_a_failure_counted_at_the_end() {
        let route = Arc::new(Signals::default());
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let frames = futures::stream::iter([
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let mut body = Observed::new(StreamBody::new(frames), record(&route, 200, None));
        body.frame().await.unwrap().unwrap();
        assert_eq!(route.totals().requests, 0, "not before the end");
        let _ = body.collect().await.unwrap();
        let t = route.totals();
        assert_eq!((t.requests, t.failures), (1, 1));
    }

    #[test]
    fn a_response_dropped_unread_counts_by_its_status() {
        let route = Arc::new(Signals::default());
        drop(Observed::new(http_body_util::Empty::<Bytes>::new(), record(&route, 503, None)));
        drop(Observed::new(http_body_util::Empty::<Bytes>::new(), record(&route, 200, Some(0))));
        let t = route.totals();
        assert_eq!((t.requests, t.failures), (2, 1));
    }
}
