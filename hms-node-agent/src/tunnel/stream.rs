//! [`H2Stream`]: one HTTP/2 CONNECT stream as a byte stream (tokio `AsyncRead`/`AsyncWrite`),
//! over h2's `SendStream`/`RecvStream` directly (ztunnel's approach, our own code).
//!
//! Owns only the byte-stream view of one stream: data frames in, data frames out, END_STREAM
//! on shutdown, flow-control capacity released as the reader consumes. It never opens or
//! answers streams (`outbound.rs`/`inbound.rs` do) and never spawns a task.
//!
//! Why not hyper's upgrade: hyper's HTTP/2 `Upgraded` copies every write into a new boxed
//! buffer and hands it over a channel to a per-stream task that feeds h2, so each write
//! cost one more copy and one more task wake-up than writing the `SendStream` here. It is
//! also not vectored, so hyper's HTTP/1 on top flattened each message into one buffer first.
//! Here a vectored write (an HTTP/1 head and its body) becomes one copy into one DATA frame.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One CONNECT stream's bytes. Dropping it without `shutdown` resets the stream (h2 sends
/// RST_STREAM(CANCEL) once neither half is referenced), which the peer reads as an end.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received data not yet read.
    buf: Bytes,
    /// END_STREAM sent.
    ended: bool,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            buf: Bytes::new(),
            ended: false,
        }
    }

    /// Waits until the stream may send at least one byte of the `want` asked for, and
    /// returns how many (at most `want`).
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        // Capacity is reserved only when there is something to send: reserving while idle
        // would pin part of the connection window to an idle stream.
        self.send.reserve_capacity(want);
        loop {
            let cap = self.send.capacity();
            if cap > 0 {
                return Poll::Ready(Ok(cap.min(want)));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(self.send_error(cx, e))),
                // The send side is no longer open: the peer reset the stream, or we ended it.
                None => return Poll::Ready(Err(self.closed_error(cx))),
            }
        }
    }

    /// The error for a send side that closed: the peer's reset reason if it sent one.
    fn closed_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => reset_error(reason),
            Poll::Ready(Err(e)) => h2_to_io_error(e),
            Poll::Pending => io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the tunnel stream's send side is closed",
            ),
        }
    }

    fn send_error(&mut self, cx: &mut Context<'_>, e: h2::Error) -> io::Error {
        // A user error (e.g. the stream is already closed) says less than the peer's reset.
        if e.is_reset() || e.is_io() || e.is_go_away() {
            h2_to_io_error(e)
        } else {
            self.closed_error(cx)
        }
    }

    fn send(&mut self, cx: &mut Context<'_>, data: Bytes) -> io::Result<()> {
        self.send
            .send_data(data, false)
            .map_err(|e| self.send_error(cx, e))
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                // END_STREAM: the peer finished this direction (half-close).
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.buf = data,
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        // The peer closed or cancelled the stream: an end, as hyper read it.
                        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Ok(()),
                        Some(Reason::STREAM_CLOSED) => {
                            Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
                        }
                        _ => Err(h2_to_io_error(e)),
                    });
                }
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        // Flow control: the peer may send as much again as we consumed.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, buf.len()))?;
        self.send(cx, Bytes::copy_from_slice(&buf[..n]))?;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, total))?;
        // One copy of every slice into one frame: an HTTP/1 head and its body go out as one
        // DATA frame (one TLS record), not one per slice.
        let mut data = BytesMut::with_capacity(n);
        for b in bufs {
            let take = b.len().min(n - data.len());
            data.put_slice(&b[..take]);
            if data.len() == n {
                break;
            }
        }
        self.send(cx, data.freeze())?;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written by the connection's task; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ended {
            return Poll::Ready(Ok(()));
        }
        self.ended = true;
        // END_STREAM: the peer reads EOF on this direction; the other keeps flowing.
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(self.send_error(cx, e))),
        }
    }
}

fn reset_error(reason: Reason) -> io::Error {
    h2_to_io_error(h2::Error::from(reason))
}

fn h2_to_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().expect("is_io")
    } else {
        io::Error::other(e)
    }
}
