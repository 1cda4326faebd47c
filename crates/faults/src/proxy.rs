//! A TCP proxy the harness puts in front of every link it wants to break: it forwards bytes both ways,
//! and on command refuses new connections and closes the open ones (a cut), or holds every chunk for a
//! while before passing it on (a slow link). The upstream address changes when the process behind it
//! restarts on fresh ports; clients keep the proxy's stable address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug)]
struct State {
    upstream: Mutex<Option<SocketAddr>>,
    cut: AtomicBool,
    delay_ms: AtomicU64,
    /// Bumped to close every open connection.
    generation: watch::Sender<u64>,
    connections: AtomicU64,
    refused: AtomicU64,
}

/// One proxied link, by name (`registry`, `bank icbc`, `postgres`, ...).
#[derive(Clone, Debug)]
pub struct Proxy {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    /// Listens on a free loopback port; forwards to `upstream` once it is set.
    pub async fn start(name: &str, upstream: Option<SocketAddr>) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (generation, _) = watch::channel(0);
        let state = Arc::new(State {
            upstream: Mutex::new(upstream),
            cut: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            generation,
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let accepting = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                let state = accepting.clone();
                tokio::spawn(async move { forward(state, inbound).await });
            }
        });
        Ok(Proxy { name: name.to_string(), addr, state })
    }

    pub fn set_upstream(&self, upstream: SocketAddr) {
        if let Ok(mut u) = self.state.upstream.lock() {
            *u = Some(upstream);
        }
        self.close_all();
    }

    /// Refuses new connections and closes the open ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.close_all();
    }

    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.state.delay_ms.store(0, Ordering::SeqCst);
    }

    /// Holds every chunk this long in each direction (0: none).
    pub fn delay(&self, d: Duration) {
        self.state.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    fn close_all(&self) {
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// Connections forwarded and refused so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.state.connections.load(Ordering::Relaxed), self.state.refused.load(Ordering::Relaxed))
    }
}

async fn forward(state: Arc<State>, inbound: TcpStream) {
    let upstream = state.upstream.lock().ok().and_then(|u| *u);
    let Some(upstream) = upstream.filter(|_| !state.cut.load(Ordering::SeqCst)) else {
        state.refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut closed = state.generation.subscribe();
    let Ok(Ok(outbound)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(upstream)).await else {
        state.refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    state.connections.fetch_add(1, Ordering::Relaxed);
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    tokio::select! {
        _ = pump(ri, wo, &state) => {}
        _ = pump(ro, wi, &state) => {}
        _ = closed.changed() => {}
    }
    // Dropping both halves closes both sockets: the peers see the link go away.
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, state: &State) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = state.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if state.cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
