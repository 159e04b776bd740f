//! Captures every log line the in-process services write, at debug level and
//! finer, so tests can search them for values that must never appear.

use std::{
    io::Write,
    sync::{Mutex, OnceLock},
};

use tracing_subscriber::{EnvFilter, fmt::MakeWriter, layer::SubscriberExt, util::SubscriberInitExt};

static BUFFER: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

fn buffer() -> &'static Mutex<Vec<u8>> {
    BUFFER.get_or_init(|| Mutex::new(Vec::new()))
}

#[derive(Clone, Copy)]
struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        buffer().lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        Capture
    }
}

/// Installs the capturing subscriber once per test process. Span fields are
/// included, so a value recorded on a span would be caught too.
pub fn init() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = EnvFilter::new("trace,h2=debug,hyper=debug,hyper_util=debug,tower=debug,sqlx=debug,rustls=debug");
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().with_writer(Capture).with_ansi(false))
            .with(tracing_subscriber::fmt::layer().json().with_writer(Capture))
            .try_init();
    });
}

/// Everything logged so far by every test in this process.
pub fn captured() -> String {
    String::from_utf8_lossy(&buffer().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// The captured logs once they hold every one of `wanted` (a line logged by
/// a server task after the client already saw the outcome may come a little
/// later), or as they are after 30 s.
pub async fn eventually(wanted: &[&str]) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let logs = captured();
        if wanted.iter().all(|w| logs.contains(w)) || std::time::Instant::now() > deadline {
            return logs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
