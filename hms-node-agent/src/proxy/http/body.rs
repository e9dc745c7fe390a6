//! Request bodies that can be sent again. The first attempt streams the caller's body to the
//! upstream as it arrives (nothing waits for the whole body, so streaming calls keep working)
//! while a copy of up to [`REPLAY_LIMIT`] bytes is kept. A retry is possible only if the copy
//! is complete: the body ended within the limit. Larger bodies are never retried.
//!
//! An attempt the instance did not process (a refused HTTP/2 stream) may give the body back
//! before the caller finished sending it: the part read so far is kept, the rest of the
//! caller's body is handed back when the attempt drops it, and
//! [`Replay::body_when_returned`] continues from there (still recording, so it can happen
//! again).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// The caller's body not yet read, given back by an attempt that dropped it early.
    rest: Option<ProxyBody>,
}

#[derive(Default)]
struct Shared {
    capture: Mutex<Capture>,
    /// Woken when the body ends or an attempt gives the rest back.
    changed: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Capture> {
        self.capture.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle kept by the retry loop to rebuild the body for another attempt.
#[derive(Clone, Default)]
pub struct Replay {
    shared: Arc<Shared>,
}

impl Replay {
    /// The whole body again, if it ended within the limit, or the part read so far
    /// followed by the rest of the caller's body if an attempt gave that back.
    pub fn body(&self) -> Option<ProxyBody> {
        let mut c = self.shared.lock();
        if c.overflowed {
            return None;
        }
        if c.ended {
            return Some(
                Replayed {
                    data: Some(c.data.clone().freeze()).filter(|d| !d.is_empty()),
                    trailers: c.trailers.clone(),
                }
                .boxed(),
            );
        }
        let rest = c.rest.take()?;
        let prefix = Some(c.data.clone().freeze()).filter(|d| !d.is_empty());
        drop(c);
        Some(
            Resumed {
                prefix,
                rest: TeeBody {
                    inner: Some(rest),
                    shared: self.shared.clone(),
                },
            }
            .boxed(),
        )
    }

    /// Like [`Replay::body`], waiting up to `wait` for the last attempt to end the body or
    /// give it back (a refused attempt may still be dropping it).
    pub async fn body_when_returned(&self, wait: Duration) -> Option<ProxyBody> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(b) = self.body() {
                return Some(b);
            }
            if self.shared.lock().overflowed {
                return None;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// Body bytes read from the caller so far.
    pub fn bytes_seen(&self) -> u64 {
        self.shared.lock().total
    }

    /// True once the body ended within the limit (so it could be sent again).
    pub fn is_replayable(&self) -> bool {
        let c = self.shared.lock();
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

/// What was read of the caller's body, then the rest of it (recorded as it passes).
struct Resumed {
    prefix: Option<Bytes>,
    rest: TeeBody,
}

impl Body for Resumed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }
}

/// Wraps the caller's body: forwards every frame and records a bounded copy. Dropped
/// before the end, it gives the unread rest back to its [`Replay`].
pub struct TeeBody {
    inner: Option<ProxyBody>,
    shared: Arc<Shared>,
}

/// Starts recording `inner`; the [`Replay`] rebuilds it later if it stayed small.
pub fn tee<B>(inner: B) -> (TeeBody, Replay)
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let shared = Arc::new(Shared::default());
    (
        TeeBody {
            inner: Some(inner.map_err(Into::into).boxed()),
            shared: shared.clone(),
        },
        Replay { shared },
    )
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        let mut c = self.shared.lock();
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
        let ended = c.ended;
        drop(c);
        if ended {
            self.shared.changed.notify_waiters();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.as_ref().is_none_or(|b| b.is_end_stream());
        if end {
            self.shared.lock().ended = true;
            self.shared.changed.notify_waiters();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        let mut c = self.shared.lock();
        if !c.ended && !c.overflowed {
            c.rest = self.inner.take();
        }
        drop(c);
        self.shared.changed.notify_waiters();
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
    async fn a_body_given_back_unfinished_is_sent_again_whole() {
        // A caller's body in two frames; the first attempt reads one and is dropped.
        let frames = futures_like_stream(vec![
            Bytes::from_static(b"hello "),
            Bytes::from_static(b"world"),
        ]);
        let (mut body, replay) = tee(frames);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "hello ");
        assert!(replay.body().is_none(), "still held by the attempt");
        drop(body);
        let again = replay
            .body_when_returned(Duration::from_secs(1))
            .await
            .expect("the rest was given back");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "hello world");
        // And once more, now that it ended.
        let third = replay.body().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(third, "hello world");
        assert_eq!(replay.bytes_seen(), 11);
    }

    /// A body yielding `chunks` one frame at a time.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn futures_like_stream(chunks: Vec<Bytes>) -> Chunks {
        Chunks(chunks.into())
    }

    #[tokio::test]
    async fn an_empty_body_is_replayable() {
        let (body, replay) = tee(http_body_util::Empty::<Bytes>::new());
        let _ = body.collect().await.unwrap();
        assert!(replay.is_replayable());
    }
}
