//! A request body that stops at the route's `max_body`: the gateway wraps the caller's body
//! in [`LimitedBody`] and answers 413 when a frame would pass the limit (a body without
//! `Content-Length`, or one longer than it said). Owns the counting; never buffers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// The error a [`LimitedBody`] ends with; find it in the error chain to answer 413.
#[derive(Debug, thiserror::Error)]
#[error("the request body is over the route's limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

pub struct LimitedBody<B> {
    inner: B,
    limit: u64,
    seen: u64,
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, limit: u64) -> Self {
        LimitedBody {
            inner,
            limit,
            seen: 0,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: this.limit,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            other => other.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `err` (or an error it wraps) is a [`BodyTooLarge`].
pub fn is_body_too_large(err: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<BodyTooLarge>() {
            return Some(t.limit);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::collections::VecDeque;

    /// A body that arrives in chunks and says nothing of its length.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_body_within_the_limit_passes_and_one_over_it_ends_with_body_too_large() {
        let ok = LimitedBody::new(Full::new(Bytes::from_static(b"0123456789")), 10);
        assert_eq!(ok.collect().await.unwrap().to_bytes().len(), 10);
        let chunks = (0..3).map(|_| Bytes::from_static(b"0123")).collect();
        let err = LimitedBody::new(Chunks(chunks), 10)
            .collect()
            .await
            .unwrap_err();
        assert_eq!(is_body_too_large(err.as_ref()), Some(10));
    }
}
