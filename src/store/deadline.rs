//! PostgreSQL connections that give up on a server that stops answering.
//!
//! A server that is paused (SIGSTOP), wedged, or behind a link that went half-open keeps its
//! TCP connection looking healthy: the kernel still acknowledges what the hub sends, and the
//! reply never comes. `statement_timeout` cannot help (the server enforces it, and it is the
//! server that is gone), and TCP keepalives take hours. So each connection's socket is wrapped
//! in [`Deadline`]: while replies are due, the server may not fall silent for longer than a
//! limit (the statement timeout plus the connect timeout), or the socket fails, the query on
//! it fails as "unavailable" (503), the connection is discarded, and the store turns
//! *suspect* (see [`Suspicion`]) so that the next requests find out within the connect
//! timeout instead of each waiting out the limit.
//!
//! The hub opens these sockets itself, so of the URL's connection options it applies the
//! hosts, `hostaddr`, ports and everything of the session (user, database, options); socket
//! options (`keepalives*`, `tcp_user_timeout`) and `connect_timeout` are not applied (the
//! deadline and `SEGUE_DB_CONNECT_TIMEOUT_MS` do their work), and TLS is not offered, as before.
//!
//! Replies are counted as the extended and simple query protocols have them (a `Sync` or a
//! `Query` is answered by one `ReadyForQuery`). `COPY` is not followed (while the client sends
//! `COPY` data no reply is due, and the count would misjudge it): the hub never uses it, and
//! code that starts to must teach [`Framing`] its messages first.

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

/// Follows a stream of PostgreSQL protocol messages (a type byte, then a big-endian length
/// that counts itself, then the body) across reads and writes of any size, so [`Deadline`]
/// knows when replies are due. The client's first message, the start-up message, has no type
/// byte.
struct Framing {
    header: [u8; 5],
    filled: usize,
    /// Body bytes of the current message still to pass.
    skip: u64,
    /// The next message has no type byte.
    untyped: bool,
}

impl Framing {
    fn new(untyped: bool) -> Self {
        Self {
            header: [0; 5],
            filled: 0,
            skip: 0,
            untyped,
        }
    }

    /// Passes `bytes`, calling `seen` with the type of each message whose header completes
    /// (`None` for the untyped start-up message).
    fn feed(&mut self, mut bytes: &[u8], mut seen: impl FnMut(Option<u8>)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let passed = usize::try_from(self.skip).map_or(bytes.len(), |s| s.min(bytes.len()));
                self.skip -= passed as u64;
                bytes = bytes.get(passed..).unwrap_or_default();
                continue;
            }
            let need = if self.untyped { 4 } else { 5 };
            let take = (need - self.filled).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            if let Some(slot) = self.header.get_mut(self.filled..self.filled + take) {
                slot.copy_from_slice(head);
            }
            self.filled += take;
            bytes = rest;
            if self.filled == need {
                let (kind, length) = if self.untyped {
                    (None, self.header.get(..4))
                } else {
                    (self.header.first().copied(), self.header.get(1..5))
                };
                let length = length
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(4, u32::from_be_bytes);
                self.skip = u64::from(length).saturating_sub(4);
                self.filled = 0;
                self.untyped = false;
                seen(kind);
            }
        }
    }
}

/// A socket that fails when replies are due and nothing has been read for `limit`.
///
/// It counts the requests that end in ReadyForQuery (the start-up message, simple queries,
/// and every Sync of the extended protocol) against the ReadyForQuery messages read. While
/// some are outstanding, every byte read restarts the clock (a large reply may take long, as
/// long as it keeps coming); once none are, silence is fine for ever.
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
    outgoing: Framing,
    incoming: Framing,
    /// Requests written whose ReadyForQuery has not been read.
    outstanding: u64,
    timer: Pin<Box<tokio::time::Sleep>>,
    suspicion: Suspicion,
}

impl<S> Deadline<S> {
    fn new(inner: S, limit: Duration, suspicion: Suspicion) -> Self {
        Self {
            inner,
            limit,
            outgoing: Framing::new(true),
            incoming: Framing::new(false),
            outstanding: 0,
            timer: Box::pin(tokio::time::sleep(limit)),
            suspicion,
        }
    }

    fn restart_clock(&mut self, cx: &mut Context<'_>) {
        let due = tokio::time::Instant::now() + self.limit;
        self.timer.as_mut().reset(due);
        // Registers this task with the timer: the connection's reader may be parked already,
        // and only a wake-up makes it look at the deadline. (tokio-postgres drives reads and
        // writes of a connection from one task.)
        let _ = self.timer.as_mut().poll(cx);
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
                let read = buf.filled().get(before..).unwrap_or_default();
                if !read.is_empty() {
                    let mut ready = 0;
                    this.incoming.feed(read, |kind| {
                        if kind == Some(b'Z') {
                            ready += 1;
                        }
                    });
                    this.outstanding = this.outstanding.saturating_sub(ready);
                    if this.outstanding > 0 {
                        this.restart_clock(cx);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.outstanding > 0 && this.timer.as_mut().poll(cx).is_ready() => {
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
        if let Poll::Ready(Ok(count)) = written {
            let mut requests = 0;
            this.outgoing
                .feed(data.get(..count).unwrap_or_default(), |kind| {
                    if matches!(kind, None | Some(b'Q' | b'S')) {
                        requests += 1;
                    }
                });
            if requests > 0 {
                if this.outstanding == 0 {
                    this.restart_clock(cx);
                }
                this.outstanding += requests;
            }
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
    // A URL may name addresses alone (`hostaddr`, no `host`).
    let hosts: Vec<Host> = if config.get_hosts().is_empty() {
        config
            .get_hostaddrs()
            .iter()
            .map(|address| Host::Tcp(address.to_string()))
            .collect()
    } else {
        config.get_hosts().to_vec()
    };
    for (index, host) in hosts.iter().enumerate() {
        // libpq: one port for all hosts, or one per host.
        let port = ports
            .get(index)
            .or_else(|| ports.first())
            .copied()
            .unwrap_or(5432);
        let attempt = async {
            let client = match host {
                Host::Tcp(name) => {
                    // libpq: `hostaddr` names the address to use, `host` the name to present.
                    let stream = match config.get_hostaddrs().get(index) {
                        Some(address) => TcpStream::connect((*address, port)).await?,
                        None => TcpStream::connect((name.as_str(), port)).await?,
                    };
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
    use std::future::poll_fn;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const LIMIT: Duration = Duration::from_millis(150);

    /// A simple query message.
    fn query(sql: &str) -> Vec<u8> {
        let mut message = vec![b'Q'];
        message.extend_from_slice(&(4 + sql.len() as u32 + 1).to_be_bytes());
        message.extend_from_slice(sql.as_bytes());
        message.push(0);
        message
    }

    /// A row of `size` bytes, then ReadyForQuery.
    fn reply(size: usize) -> Vec<u8> {
        let mut message = vec![b'D'];
        message.extend_from_slice(&(4 + size as u32).to_be_bytes());
        message.extend(std::iter::repeat_n(7, size));
        message.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        message
    }

    fn pair() -> (
        Deadline<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Suspicion,
    ) {
        let (near, far) = tokio::io::duplex(1 << 16);
        let suspicion = Suspicion::default();
        // Past the start-up message, as a connection in the pool is.
        let mut stream = Deadline::new(near, LIMIT, suspicion.clone());
        stream.outgoing = Framing::new(false);
        (stream, far, suspicion)
    }

    #[tokio::test]
    async fn a_reply_that_never_comes_fails_the_read_and_raises_suspicion() {
        let (mut stream, _far, suspicion) = pair();
        stream.write_all(&query("SELECT 1")).await.unwrap();
        let mut buf = [0_u8; 8];
        let error = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(suspicion.is_raised());
    }

    #[tokio::test]
    async fn once_every_reply_is_in_silence_is_fine() {
        let (mut stream, mut far, suspicion) = pair();
        stream.write_all(&query("SELECT 1")).await.unwrap();
        let answer = reply(3);
        far.write_all(&answer).await.unwrap();
        let mut buf = vec![0_u8; answer.len()];
        stream.read_exact(&mut buf).await.unwrap();
        let read = tokio::time::timeout(LIMIT * 4, stream.read(&mut buf)).await;
        assert!(read.is_err(), "the idle read should still be waiting");
        assert!(!suspicion.is_raised());
    }

    #[tokio::test]
    async fn a_reply_that_stops_halfway_fails() {
        let (mut stream, mut far, _) = pair();
        stream.write_all(&query("SELECT big")).await.unwrap();
        let answer = reply(100_000);
        far.write_all(answer.get(..20_000).unwrap()).await.unwrap();
        let mut buf = vec![0_u8; answer.len()];
        let error = stream.read_exact(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_long_reply_that_keeps_coming_is_read() {
        let (mut stream, mut far, _) = pair();
        stream.write_all(&query("SELECT slow")).await.unwrap();
        let answer = reply(4_000);
        let sent = answer.clone();
        tokio::spawn(async move {
            // Four pieces, each well within the limit, together far beyond it.
            for piece in sent.chunks(sent.len() / 4 + 1) {
                tokio::time::sleep(LIMIT * 2 / 3).await;
                far.write_all(piece).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut buf = vec![0_u8; answer.len()];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, answer);
    }

    #[tokio::test]
    async fn the_second_of_two_pipelined_queries_is_still_due_after_the_first_reply() {
        let (mut stream, mut far, _) = pair();
        let mut both = query("SELECT 1");
        both.extend(query("SELECT 2"));
        stream.write_all(&both).await.unwrap();
        let first = reply(3);
        far.write_all(&first).await.unwrap();
        let mut buf = vec![0_u8; first.len()];
        stream.read_exact(&mut buf).await.unwrap();
        let error = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    /// tokio-postgres parks its reader, then writes, in one task: the write must arm a timer
    /// that wakes that task.
    #[tokio::test]
    async fn a_reader_parked_before_the_write_is_woken_by_the_deadline() {
        let (mut stream, _far, _) = pair();
        let message = query("SELECT 1");
        let mut wrote = false;
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(
            Duration::from_secs(3),
            poll_fn(|cx| {
                let mut space = [0_u8; 8];
                let mut buf = ReadBuf::new(&mut space);
                let read = Pin::new(&mut stream).poll_read(cx, &mut buf);
                if !wrote {
                    assert!(read.is_pending());
                    assert!(Pin::new(&mut stream).poll_write(cx, &message).is_ready());
                    wrote = true;
                    return Poll::Pending;
                }
                read
            }),
        )
        .await;
        let error = outcome.expect("finished").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        // Woken by the deadline itself, not by the outer timeout polling it at the end.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the parked reader was not woken by its deadline"
        );
    }

    #[test]
    fn framing_follows_messages_split_anywhere() {
        let mut stream = vec![0, 0, 0, 8, 0, 3, 0, 0];
        stream.extend(query("SELECT 1"));
        stream.extend([b'S', 0, 0, 0, 4]);
        for cut in 0..stream.len() {
            let mut framing = Framing::new(true);
            let mut kinds = Vec::new();
            let (a, b) = stream.split_at(cut);
            framing.feed(a, |k| kinds.push(k));
            framing.feed(b, |k| kinds.push(k));
            assert_eq!(kinds, vec![None, Some(b'Q'), Some(b'S')], "cut at {cut}");
        }
    }
}
