//! Request bodies that can be sent again. The first attempt streams the caller's body to the
//! upstream as it arrives (nothing waits for the whole body, so streaming calls keep working)
//! while a copy of up to [`REPLAY_LIMIT`] bytes is kept. A retry is possible only if the copy
//! is complete: the body ended within the limit. Larger bodies are never retried.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Bodies up to this size are kept for replay (as linkerd2-proxy does).
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub fn empty() -> ProxyBody {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed()
}

#[derive(Default)]
struct Capture {
    /// Every body byte that passed, kept or not (for taps).
    total: u64,
    data: BytesMut,
    trailers: Option<hyper::HeaderMap>,
    ended: bool,
    overflowed: bool,
}

/// Handle kept by the retry loop to rebuild the body for another attempt.
#[derive(Clone, Default)]
pub struct Replay {
    capture: Arc<Mutex<Capture>>,
}

impl Replay {
    /// The whole body again, if it ended within the limit.
    pub fn body(&self) -> Option<ProxyBody> {
        let c = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        if !c.ended || c.overflowed {
            return None;
        }
        Some(
            Replayed {
                data: Some(c.data.clone().freeze()).filter(|d| !d.is_empty()),
                trailers: c.trailers.clone(),
            }
            .boxed(),
        )
    }

    /// Body bytes read from the caller so far.
    pub fn bytes_seen(&self) -> u64 {
        self.capture.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    /// True once the body ended within the limit (so it could be sent again).
    pub fn is_replayable(&self) -> bool {
        let c = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        c.ended && !c.overflowed
    }
}

/// The recorded body, sent again: its data, then its trailers.
struct Replayed {
    data: Option<Bytes>,
    trailers: Option<hyper::HeaderMap>,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// Wraps the caller's body: forwards every frame and records a bounded copy.
pub struct TeeBody<B> {
    inner: B,
    capture: Arc<Mutex<Capture>>,
}

/// Starts recording `inner`; the [`Replay`] rebuilds it later if it stayed small.
pub fn tee<B>(inner: B) -> (TeeBody<B>, Replay) {
    let capture = Arc::new(Mutex::new(Capture::default()));
    (
        TeeBody {
            inner,
            capture: capture.clone(),
        },
        Replay { capture },
    )
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let mut c = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    c.total += data.len() as u64;
                    if c.data.len() + data.len() > REPLAY_LIMIT {
                        c.overflowed = true;
                        c.data = BytesMut::new();
                    } else if !c.overflowed {
                        c.data.extend_from_slice(data);
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    c.trailers = Some(t.clone());
                }
            }
            Poll::Ready(None) => c.ended = true,
            _ => {}
        }
        drop(c);
        match polled {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.capture.lock().unwrap_or_else(|p| p.into_inner()).ended = true;
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps a response body on its way to the caller: counts its bytes and calls `on_end` once,
/// when the body ends or is dropped (the caller went away), so taps and metrics see the whole
/// exchange without holding anything up.
pub struct ObservedBody {
    inner: ProxyBody,
    bytes: u64,
    on_end: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl ObservedBody {
    pub fn new(inner: ProxyBody, on_end: impl FnOnce(u64) + Send + Sync + 'static) -> ObservedBody {
        ObservedBody {
            inner,
            bytes: 0,
            on_end: Some(Box::new(on_end)),
        }
    }

    fn finish(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes);
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_small_body_is_replayed_whole() {
        let (body, replay) = tee(http_body_util::Full::new(Bytes::from_static(b"hello")));
        assert!(replay.body().is_none(), "not replayable before it was read");
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(sent, "hello");
        let again = replay.body().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(again, "hello");
    }

    #[tokio::test]
    async fn a_body_over_64k_is_not_replayable() {
        let big = Bytes::from(vec![1u8; REPLAY_LIMIT + 1]);
        let (body, replay) = tee(http_body_util::Full::new(big));
        let _ = body.collect().await.unwrap();
        assert!(replay.body().is_none());
    }

    #[tokio::test]
    async fn an_empty_body_is_replayable() {
        let (body, replay) = tee(http_body_util::Empty::<Bytes>::new());
        let _ = body.collect().await.unwrap();
        assert!(replay.is_replayable());
    }
}
