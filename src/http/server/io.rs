//! A connection's socket with a write deadline: a client that stops reading (a slow
//! reader, or one that pipelines requests and never reads the answers) is cut off once
//! no byte of a response could be written for `WRITE_TIMEOUT_MS`. hyper runs no timer
//! while a response waits on the socket, so without this such a connection lives forever.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use hyper::rt::{Read, ReadBufCursor, Write};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pin_project! {
    /// `inner` whose writes fail with `TimedOut` after `timeout` without progress.
    pub struct WriteDeadline<T> {
        #[pin]
        inner: T,
        timeout: Duration,
        // Boxed: hyper wants the socket `Unpin`; one allocation per connection.
        stalled: Pin<Box<Sleep>>,
        armed: bool,
    }
}

impl<T> WriteDeadline<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
        }
    }
}

impl<T: Write> WriteDeadline<T> {
    /// Runs one write-side poll; a `Pending` starts (or continues) the stall clock, any
    /// progress stops it.
    fn guard<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        poll: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let this = self.project();
        if let Poll::Ready(result) = poll(this.inner, cx) {
            *this.armed = false;
            return Poll::Ready(result);
        }
        if !*this.armed {
            *this.armed = true;
            let deadline = Instant::now() + *this.timeout;
            this.stalled.as_mut().reset(deadline);
        }
        ready!(std::future::Future::poll(this.stalled.as_mut(), cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading: write deadline passed",
        )))
    }
}

impl<T: Read> Read for WriteDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: Write> Write for WriteDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.guard(cx, |inner, cx| inner.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.guard(cx, |inner, cx| inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guard(cx, |inner, cx| inner.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guard(cx, |inner, cx| inner.poll_shutdown(cx))
    }
}
