//! PostgreSQL connections that give up on a server that stops answering.
//!
//! A server that is paused (SIGSTOP), wedged, or behind a link that went half-open keeps its
//! TCP connection looking healthy: the kernel still acknowledges what the hub sends, and the
//! reply never comes. `statement_timeout` cannot help (the server enforces it, and it is the
//! server that is gone), and TCP keepalives take hours. So each connection's socket is wrapped
//! in [`Deadline`]: once the hub has written a request, a reply must start within a limit (the
//! statement timeout plus the connect timeout), or the socket fails, the query on it fails as
//! "unavailable" (503), the connection is discarded, and the store turns *suspect* (see
//! [`Suspicion`]) so that the next requests find out within the connect timeout instead of
//! each waiting out the limit.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use diesel::ConnectionError;
use diesel_async::AsyncPgConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::NoTls;
use tokio_postgres::config::Host;

/// Whether a connection recently found the server unresponsive. While it is set, each
/// checkout first proves its connection with one round trip bounded by the connect timeout.
#[derive(Clone, Default)]
pub struct Suspicion(Arc<AtomicBool>);

impl Suspicion {
    pub fn raise(&self) {
        if !self.0.swap(true, Ordering::AcqRel) {
            tracing::warn!("the database stopped answering; checking connections before use");
        }
    }

    pub fn clear(&self) {
        if self.0.swap(false, Ordering::AcqRel) {
            tracing::info!("the database answers again");
        }
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A socket that fails when a reply is due and nothing has been read for `limit`.
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
    /// Set when something was written and nothing has been read since.
    awaiting: bool,
    timer: Pin<Box<tokio::time::Sleep>>,
    suspicion: Suspicion,
}

impl<S> Deadline<S> {
    fn new(inner: S, limit: Duration, suspicion: Suspicion) -> Self {
        Self {
            inner,
            limit,
            awaiting: false,
            timer: Box::pin(tokio::time::sleep(limit)),
            suspicion,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.awaiting = false;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.awaiting && this.timer.as_mut().poll(cx).is_ready() => {
                this.suspicion.raise();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the database sent nothing for {} ms while a reply was due",
                        this.limit.as_millis()
                    ),
                )))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) && !this.awaiting {
            this.awaiting = true;
            let due = tokio::time::Instant::now() + this.limit;
            this.timer.as_mut().reset(due);
            // Registers this task with the timer: the connection's reader may be parked
            // already, and only a wake-up makes it look at the deadline.
            let _ = this.timer.as_mut().poll(cx);
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Opens a connection to `url` whose socket is a [`Deadline`], trying each host the URL
/// names in turn (TCP or a Unix socket directory, as libpq does), each within
/// `connect_timeout`.
pub async fn establish(
    url: &str,
    connect_timeout: Duration,
    reply_limit: Duration,
    suspicion: Suspicion,
) -> Result<AsyncPgConnection, ConnectionError> {
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| ConnectionError::InvalidConnectionUrl(e.to_string()))?;
    let ports = config.get_ports();
    let mut last_error = ConnectionError::BadConnection("the URL names no host".into());
    for (index, host) in config.get_hosts().iter().enumerate() {
        // libpq: one port for all hosts, or one per host.
        let port = ports
            .get(index)
            .or_else(|| ports.first())
            .copied()
            .unwrap_or(5432);
        let attempt = async {
            let client = match host {
                Host::Tcp(name) => {
                    let stream = TcpStream::connect((name.as_str(), port)).await?;
                    stream.set_nodelay(true)?;
                    let stream = Deadline::new(stream, reply_limit, suspicion.clone());
                    start(&config, stream).await?
                }
                Host::Unix(dir) => {
                    let stream = UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?;
                    let stream = Deadline::new(stream, reply_limit, suspicion.clone());
                    start(&config, stream).await?
                }
            };
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(client)
        };
        match tokio::time::timeout(connect_timeout, attempt).await {
            Ok(Ok(client)) => {
                return AsyncPgConnection::try_from(client).await;
            }
            Ok(Err(error)) => last_error = ConnectionError::BadConnection(error.to_string()),
            Err(_) => {
                last_error = ConnectionError::BadConnection(format!(
                    "connecting to the database took longer than {} ms",
                    connect_timeout.as_millis()
                ));
            }
        }
    }
    Err(last_error)
}

/// Runs the start-up handshake on `stream` and drives the connection on a task of its own.
async fn start<S>(
    config: &tokio_postgres::Config,
    stream: S,
) -> Result<tokio_postgres::Client, tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = config.connect_raw(stream, NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "database connection ended");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_reply_that_never_comes_fails_the_read_and_raises_suspicion() {
        let (near, _far) = tokio::io::duplex(64);
        let suspicion = Suspicion::default();
        let mut stream = Deadline::new(near, Duration::from_millis(100), suspicion.clone());
        stream.write_all(b"query").await.unwrap();
        let mut buf = [0_u8; 8];
        let error = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(suspicion.is_raised());
    }

    #[tokio::test]
    async fn an_idle_connection_with_nothing_due_never_times_out() {
        let (near, mut far) = tokio::io::duplex(64);
        let suspicion = Suspicion::default();
        let mut stream = Deadline::new(near, Duration::from_millis(100), suspicion.clone());
        stream.write_all(b"query").await.unwrap();
        far.write_all(b"reply").await.unwrap();
        let mut buf = [0_u8; 5];
        stream.read_exact(&mut buf).await.unwrap();
        // Nothing written since the reply: silence well past the limit is fine.
        let read = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await;
        assert!(read.is_err(), "the idle read should still be waiting");
        assert!(!suspicion.is_raised());
    }

    #[tokio::test]
    async fn a_slow_reply_within_the_limit_is_read() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream = Deadline::new(near, Duration::from_millis(400), Suspicion::default());
        stream.write_all(b"query").await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            far.write_all(b"late").await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut buf = [0_u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"late");
    }
}
