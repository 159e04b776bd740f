//! A TCP proxy that can stop forwarding without closing anything: the way a
//! database behind a dead network link or a hung server looks to a client.
//! It can also hold every byte for a while before passing it on: a slow
//! link whose peers are alive but late.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    time::Instant,
};

pub struct FreezableProxy {
    pub port: u16,
    frozen: watch::Sender<bool>,
    /// How long each byte is held before it is passed on.
    delay: watch::Sender<Duration>,
    /// Connections opened before this count go silent (see `partition`).
    partitioned: watch::Sender<u64>,
    opened: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    /// Forwards `127.0.0.1:<port>` to `target` (host:port).
    pub async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (frozen, watch) = watch::channel(false);
        let (delay, late) = watch::channel(Duration::ZERO);
        let (partitioned, cut) = watch::channel(0u64);
        let opened = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let target = Arc::new(target);
        let counter = opened.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (target, watch, cut, late) = (target.clone(), watch.clone(), cut.clone(), late.clone());
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target.as_str()).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let link = |w| Link { frozen: w, cut: cut.clone(), delay: late.clone(), number: n };
                    tokio::join!(pump(cr, sw, link(watch.clone())), pump(sr, cw, link(watch)));
                });
            }
        });
        Self { port, frozen, delay, partitioned, opened, task }
    }

    /// The network to every connection open now goes silent, in both
    /// directions and for good, without closing it (a peer that crashed
    /// with its host, a partition): neither side hears another byte, nor
    /// that the other is gone. New connections are forwarded as before.
    pub fn partition(&self) {
        let _ = self.partitioned.send(self.opened.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// Holds every byte from now on; connections stay open.
    pub fn freeze(&self) {
        let _ = self.frozen.send(true);
    }

    pub fn thaw(&self) {
        let _ = self.frozen.send(false);
    }

    /// From now on every byte, in both directions and on every connection,
    /// arrives `delay` after it was sent, in order (zero: at once again).
    pub fn delay(&self, delay: Duration) {
        let _ = self.delay.send(delay);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Link {
    frozen: watch::Receiver<bool>,
    cut: watch::Receiver<u64>,
    delay: watch::Receiver<Duration>,
    /// The connection's number: partitioned when `cut` reaches it.
    number: u64,
}

impl Link {
    fn partitioned(&self) -> bool {
        *self.cut.borrow() >= self.number
    }

    /// Holds both halves open and silent until the proxy goes.
    async fn hang(&mut self) {
        while self.cut.changed().await.is_ok() {}
    }
}

/// Forwards one direction: what is read is queued with the time it is due,
/// and written when due, so a delay holds every byte without slowing the
/// bytes behind it.
async fn pump(from: tokio::net::tcp::OwnedReadHalf, to: tokio::net::tcp::OwnedWriteHalf, link: Link) {
    let (queue, due) = mpsc::unbounded_channel();
    tokio::join!(receive(from, queue, link.clone()), send(to, due, link));
}

async fn receive(
    mut from: tokio::net::tcp::OwnedReadHalf,
    queue: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    mut link: Link,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            _ = link.cut.wait_for(|c| *c >= link.number) => Ok(0),
        };
        if link.partitioned() {
            link.hang().await;
            return;
        }
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let due = Instant::now() + *link.delay.borrow();
        if queue.send((due, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

async fn send(
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut due: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    mut link: Link,
) {
    loop {
        let next = tokio::select! {
            next = due.recv() => next,
            _ = link.cut.wait_for(|c| *c >= link.number) => None,
        };
        if link.partitioned() {
            link.hang().await;
            return;
        }
        let Some((at, bytes)) = next else { return };
        tokio::time::sleep_until(at).await;
        if link.frozen.wait_for(|f| !*f).await.is_err() || link.partitioned() {
            link.hang().await;
            return;
        }
        if to.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

/// A Service's virtual address as kube-proxy gives it: each new connection
/// goes to one of the targets, in turn starting at `first`, skipping any
/// that refuses; an open connection stays with its target.
pub struct ClusterIp {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl ClusterIp {
    pub async fn start(targets: Vec<String>, first: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let targets = Arc::new(targets);
        let task = tokio::spawn(async move {
            let mut turn = first;
            while let Ok((mut client, _)) = listener.accept().await {
                let (targets, start) = (targets.clone(), turn);
                turn += 1;
                tokio::spawn(async move {
                    for k in 0..targets.len() {
                        if let Ok(mut server) = TcpStream::connect(targets[(start + k) % targets.len()].as_str()).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Self { port, task }
    }
}

impl Drop for ClusterIp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
