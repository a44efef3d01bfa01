//! The TCP stream under every HTTP connection, with a handle that can abort it at once.
//!
//! A WebSocket whose client stops reading leaves actix-http's dispatcher waiting, for ever, to
//! write what it already took from the socket's channel: dropping the socket's session does
//! not reach the TCP connection, so its descriptor and megabytes of kernel send buffer stayed
//! until the client left. [`AbortHandle::abort`] makes the stream fail its next read or write
//! (waking the dispatcher if it waits) and sets a zero linger first, so the dispatcher drops
//! the connection and the kernel discards what was queued for the peer (a reset, not a
//! graceful close that would wait for a reader who never comes).

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use actix_web::rt::net::TcpStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between a stream and its handles (one connection lives on one worker thread).
#[derive(Default)]
struct State {
    aborted: Cell<bool>,
    /// The task last told to wait for the stream, woken by an abort.
    waiting: RefCell<Option<Waker>>,
}

/// Aborts one connection's stream; cheap to clone. Handed to requests as connection data.
#[derive(Clone, Default)]
pub struct AbortHandle(Rc<State>);

impl AbortHandle {
    /// Ends the connection now: nothing queued is sent, the descriptor is released as soon
    /// as the dispatcher runs (at once, since this wakes it).
    pub fn abort(&self) {
        self.0.aborted.set(true);
        if let Some(waker) = self.0.waiting.borrow_mut().take() {
            waker.wake();
        }
    }
}

/// A TCP stream that an [`AbortHandle`] can end.
pub struct AbortableStream {
    inner: TcpStream,
    state: AbortHandle,
}

impl AbortableStream {
    pub fn new(inner: TcpStream) -> Self {
        Self {
            inner,
            state: AbortHandle::default(),
        }
    }

    /// A handle that aborts this stream.
    pub fn handle(&self) -> AbortHandle {
        self.state.clone()
    }

    /// `Err` once aborted (with a zero linger set, so the close that follows is a reset).
    fn check(&self) -> io::Result<()> {
        if self.state.0.aborted.get() {
            let _ = self.inner.set_zero_linger();
            return Err(io::ErrorKind::ConnectionAborted.into());
        }
        Ok(())
    }

    /// Remembers who waits on a pending operation, so an abort can wake them.
    fn note<T>(&self, poll: Poll<T>, cx: &Context<'_>) -> Poll<T> {
        if poll.is_pending() {
            let mut waiting = self.state.0.waiting.borrow_mut();
            if !waiting.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waiting = Some(cx.waker().clone());
            }
        }
        poll
    }
}

impl AsyncRead for AbortableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.note(poll, cx)
    }
}

impl AsyncWrite for AbortableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note(poll, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note(poll, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.note(poll, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.note(poll, cx)
    }
}
