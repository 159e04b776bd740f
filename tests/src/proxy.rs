//! A TCP proxy that can stop forwarding without closing anything: the way a
//! database behind a dead network link or a hung server looks to a client.

use std::sync::Arc;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

pub struct FreezableProxy {
    pub port: u16,
    frozen: watch::Sender<bool>,
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
        let (partitioned, cut) = watch::channel(0u64);
        let opened = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let target = Arc::new(target);
        let counter = opened.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (target, watch, cut) = (target.clone(), watch.clone(), cut.clone());
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target.as_str()).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let link = |w| Link { frozen: w, cut: cut.clone(), number: n };
                    tokio::join!(pump(cr, sw, link(watch.clone())), pump(sr, cw, link(watch)));
                });
            }
        });
        Self { port, frozen, partitioned, opened, task }
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
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Link {
    frozen: watch::Receiver<bool>,
    cut: watch::Receiver<u64>,
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

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mut link: Link) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            _ = link.cut.wait_for(|c| *c >= link.number) => Ok(0),
        };
        if link.partitioned() {
            link.hang().await;
            drop((from, to));
            return;
        }
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if link.frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
