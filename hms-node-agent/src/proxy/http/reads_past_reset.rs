//! An upstream HTTP/2 byte stream that, once writing to the instance fails because it is
//! gone (its kernel reset the connection), still delivers everything the instance sent
//! before it left, and only then the failure. It owns the order in which a peer's reset is
//! reported to h2; it never invents data, never hides the end of the connection, and never
//! holds an error back longer than [`READ_AFTER_RESET`] while nothing comes to read.
//!
//! Why: a server that closes its socket while our data is unread in its receive buffer
//! (hyper and tonic at the end of a graceful shutdown close at once, with the request frames
//! of the streams their GOAWAY refused still unread) makes its kernel answer with a reset.
//! Its final GOAWAY and last responses are already in our receive buffer, and Linux keeps
//! them readable after the reset. But tokio reads a socket only once its reactor has seen
//! it readable, and h2 flushes what it has to write whenever its read finds nothing ready
//! (`Connection::poll`: `poll2`, then `poll_complete`). When the connection's task runs
//! before the reactor has looked (a new request woke it: its frames are to be written), the
//! flush meets the reset first and h2 fails the connection with `EPIPE`/`ECONNRESET`, and
//! every open stream with it, as "connection error": a stream the GOAWAY refused (safe to
//! send again for any method) then looks like one that may have been processed, and a POST
//! gets a 502 (3-13 POSTs in 10,000 at a hyper backend's graceful shutdown, 1 run in 6).
//!
//! Here such a write error is held back: the write reports the bytes as taken (they could
//! never arrive anyway), reads go on until the end of the stream, and the read that finds
//! the end returns the held error. h2 thus reads the GOAWAY first and fails the streams it
//! refused with the GOAWAY's error (`SendError::Unprocessed` upstream), then the streams
//! still open with the reset.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long reads may still wait for data once a write found the peer gone. What the peer
/// sent before its reset is already in our receive buffer; this only bounds a wait for
/// readiness the reactor has not reported yet (microseconds), so that a stream type that
/// never reports its end cannot keep the connection's streams waiting.
pub const READ_AFTER_RESET: std::time::Duration = std::time::Duration::from_secs(1);

/// Wraps `io` (see the module's documentation).
pub struct ReadsPastReset<IO> {
    io: IO,
    /// The write error that said the peer is gone, until a read has reported it.
    gone: Option<GoneState>,
}

enum GoneState {
    /// Not yet reported: the read that finds the end of the stream returns it, or the one
    /// that still finds nothing once `limit` has passed.
    Held {
        error: io::Error,
        limit: Pin<Box<tokio::time::Sleep>>,
    },
    /// Reported once; reads from now on return what the stream returns.
    Reported,
}

impl<IO> ReadsPastReset<IO> {
    pub fn new(io: IO) -> Self {
        ReadsPastReset { io, gone: None }
    }
}

/// The write errors that mean the peer reset or closed the connection: nothing more can be
/// written, but what it sent before may still be waiting to be read.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

impl<IO: AsyncWrite + Unpin> ReadsPastReset<IO> {
    /// The outcome of a write-side call: a peer-gone error is held and the call succeeds.
    fn hold<T>(&mut self, polled: Poll<io::Result<T>>, taken: T) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(Err(e)) if peer_gone(&e) => {
                tracing::debug!(
                    "upstream connection reset by the instance while writing: reading what it sent before ({e})"
                );
                self.gone = Some(GoneState::Held {
                    error: e,
                    limit: Box::pin(tokio::time::sleep(READ_AFTER_RESET)),
                });
                Poll::Ready(Ok(taken))
            }
            other => other,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadsPastReset<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (before, room) = (buf.filled().len(), buf.remaining());
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(GoneState::Held { limit, .. }) = &mut this.gone else {
            return polled;
        };
        // The peer is gone: what it sent before is delivered; the end of the stream is
        // reported with the held write error. Nothing ready yet is waited for (the
        // reactor may not have seen the data's readiness yet), but at most
        // `READ_AFTER_RESET`: after a reset nothing new can come.
        let end = match polled {
            Poll::Ready(Ok(())) if room == 0 || buf.filled().len() > before => {
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => {
                // Its own error (ECONNRESET after the data) reports the end.
                this.gone = Some(GoneState::Reported);
                return Poll::Ready(Err(e));
            }
            Poll::Pending => limit.as_mut().poll(cx).is_ready(),
        };
        if !end {
            return Poll::Pending;
        }
        match this.gone.replace(GoneState::Reported) {
            Some(GoneState::Held { error, .. }) => Poll::Ready(Err(error)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadsPastReset<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.gone.is_some() {
            // Nothing written can arrive any more: taken and dropped.
            return Poll::Ready(Ok(buf.len()));
        }
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.hold(polled, buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.gone.is_some() {
            return Poll::Ready(Ok(len));
        }
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.hold(polled, len)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.gone.is_some() {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.hold(polled, ())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.gone.is_some() {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.hold(polled, ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stream whose peer is gone but which never reports its end.
    struct SilentAfterReset;

    impl AsyncRead for SilentAfterReset {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for SilentAfterReset {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_held_reset_ends_the_reads_within_the_limit_when_nothing_comes() {
        let mut io = ReadsPastReset::new(SilentAfterReset);
        io.write_all(b"frames").await.expect("held back");
        let started = tokio::time::Instant::now();
        let err = io.read(&mut [0u8; 16]).await.expect_err("the held reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(
            started.elapsed() >= READ_AFTER_RESET,
            "only after the limit"
        );
    }

    /// A real loopback connection the peer closed with our bytes unread (its kernel resets
    /// it): the bytes it wrote before are read first, then the write's error.
    #[tokio::test]
    async fn what_the_peer_sent_before_its_reset_is_read_before_the_error() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut io = ReadsPastReset::new(client);
        io.write_all(b"unread").await.unwrap();
        server.peek(&mut [0u8; 1]).unwrap();
        server.write_all(b"last words").unwrap();
        drop(server);
        // Until a write meets the reset.
        let started = std::time::Instant::now();
        while io.gone.is_none() {
            assert!(started.elapsed() < std::time::Duration::from_secs(10));
            io.write_all(b"more").await.expect("held back");
            tokio::task::yield_now().await;
        }
        let mut got = Vec::new();
        let err = io.read_to_end(&mut got).await.expect_err("the reset");
        assert_eq!(got, b"last words");
        assert!(peer_gone(&err), "{err:?}");
    }
}
