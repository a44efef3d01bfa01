//! A TCP proxy on loopback that a test puts between a hub and Redis or PostgreSQL to cut,
//! black-hole or delay the link, as a network fault would.
//!
//! It runs on a thread and a runtime of its own, so it keeps working whatever the test's
//! runtime is doing, and it is stopped when dropped. Modes apply to connections already open
//! as well as to new ones:
//! * [`Link::pass`]: bytes flow both ways;
//! * [`Link::blackhole`]: connections are accepted and kept open but nothing is forwarded in
//!   either direction: the hub's end looks healthy and never hears back (a half-open link, or a
//!   server that hangs with its sockets open). A connection that lost bytes this way stays
//!   silent after [`Link::pass`]; connections opened afterwards work;
//! * [`Link::sever`]: every open connection is closed and new ones are closed on arrival, as
//!   when the peer's host is gone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Pass,
    Blackhole,
    /// Black-holes only Redis pub/sub connections (those that sent SUBSCRIBE).
    BlackholeSubscribers,
    /// Black-holes every connection but the Redis pub/sub ones.
    BlackholeCommands,
    Sever,
}

/// What the proxy's tasks share with the test.
struct Shared {
    mode: watch::Sender<Mode>,
    /// Bumped by every sever: a connection opened in an earlier generation is closed.
    generation: AtomicU64,
}

/// A proxy from a free loopback port to `upstream`.
pub struct Link {
    pub port: u16,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Link {
    pub fn start(upstream: SocketAddr) -> Self {
        let shared = Arc::new(Shared {
            mode: watch::channel(Mode::Pass).0,
            generation: AtomicU64::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, port) = std::sync::mpsc::channel();
        let inside = shared.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
                ready
                    .send(listener.local_addr().expect("proxy address").port())
                    .expect("proxy port");
                tokio::select! {
                    _ = stopped => {}
                    () = accept_loop(listener, upstream, inside) => {}
                }
            });
        });
        Self {
            port: port.recv().expect("proxy started"),
            shared,
            stop: Some(stop),
        }
    }

    /// The Redis URL that goes through this proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pass(&self) {
        self.shared.mode.send_replace(Mode::Pass);
    }

    pub fn blackhole(&self) {
        self.shared.mode.send_replace(Mode::Blackhole);
    }

    /// Like [`blackhole`](Self::blackhole), for Redis pub/sub connections alone: the
    /// subscription goes silent while commands keep working.
    pub fn blackhole_subscribers(&self) {
        self.shared.mode.send_replace(Mode::BlackholeSubscribers);
    }

    /// The converse: command connections go silent, subscriptions keep working.
    pub fn blackhole_commands(&self) {
        self.shared.mode.send_replace(Mode::BlackholeCommands);
    }

    pub fn sever(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        self.shared.mode.send_replace(Mode::Sever);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *shared.mode.borrow() == Mode::Sever {
            // Closed on arrival, as a connection to a host that is gone would fail.
            drop(client);
            continue;
        }
        let born = shared.generation.load(Ordering::SeqCst);
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            relay(client, server, &shared, born).await;
        });
    }
}

/// What both directions of one connection know of it.
#[derive(Default)]
struct Connection {
    /// Bytes vanished: it stays silent for good.
    dead: AtomicBool,
    /// The client sent SUBSCRIBE on it (a Redis pub/sub connection).
    subscriber: AtomicBool,
}

/// Copies both ways until either side closes or the link is severed.
async fn relay(client: TcpStream, server: TcpStream, shared: &Shared, born: u64) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let state = Connection::default();
    tokio::select! {
        () = pump(client_read, server_write, shared, born, &state, true) => {}
        () = pump(server_read, client_write, shared, born, &state, false) => {}
    }
}

/// One direction: read a chunk, then forward, drop or delay it as the mode says.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
    born: u64,
    connection: &Connection,
    from_client: bool,
) {
    let severed = || shared.generation.load(Ordering::SeqCst) > born;
    let mut watcher = shared.mode.subscribe();
    let mut buffer = vec![0_u8; 16 * 1024];
    loop {
        if severed() {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = watcher.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let Ok(count) = read else { return };
        if count == 0 || severed() {
            return;
        }
        let mode = *watcher.borrow_and_update();
        let chunk = buffer.get(..count).unwrap_or_default();
        if from_client
            && chunk
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
        {
            connection.subscriber.store(true, Ordering::SeqCst);
        }
        let subscriber = connection.subscriber.load(Ordering::SeqCst);
        if mode == Mode::Blackhole
            || (mode == Mode::BlackholeSubscribers && subscriber)
            || (mode == Mode::BlackholeCommands && !subscriber)
        {
            // Once bytes have vanished the connection can never carry a protocol again: it
            // stays open and silent for good, as a half-open connection does.
            connection.dead.store(true, Ordering::SeqCst);
        }
        if connection.dead.load(Ordering::SeqCst) {
            continue;
        }
        let Some(chunk) = buffer.get(..count) else {
            return;
        };
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}
