//! Load benchmark: starts the whole stack in-process on embedded defaults
//! (SQLite, encrypted embedded store), then sends ResolveSecrets batches
//! from many concurrent callers and prints start-up time, throughput,
//! latency percentiles and peak memory.
//!
//!   cargo run --release -p integration-tests --example resolve_load -- [calls] [concurrency] [items]
//!
//! Defaults: 5000 calls, 16 concurrent callers, 20 items per batch (half
//! placeholders, half secret objects, some falling back to global secrets).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::*;
use secrets_proto::v1::{self as pb, resolved_item::Result as R};

fn arg(n: usize, default: usize) -> usize {
    std::env::args().nth(n).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let (calls, concurrency, items) = (arg(1, 5000), arg(2, 16), arg(3, 20).max(2));

    let started = Instant::now();
    let app = TestApp::spawn_with(Options { no_log_capture: true, ..Default::default() }).await;
    let startup = started.elapsed();
    app.setup_domain("finance").await;
    let admin = app.as_user(ADMIN);
    for i in 0..items {
        admin.create("finance", &format!("key-{i}"), &format!("value-{i}-{}", "x".repeat(32))).await.unwrap();
    }
    admin.create_in(pb::Scope::Global, "", "global-key", "global-value").await.unwrap();

    let batch: Vec<pb::ResolveItem> = (0..items)
        .map(|i| match i % 4 {
            0 => text_item(&format!("envVars.V{i}"), &format!("a=${{secrets.key-{i}}};g=${{secrets.global-key}}")),
            1 => text_item(&format!("sparkConf.c{i}"), &format!("${{secrets.key-{i}}}")),
            _ => object_item(&format!("envVars.O{i}"), "finance", &format!("key-{i}")),
        })
        .collect();
    let service = app.as_service(Some("user:nina"));
    // Warm up connections.
    service.resolve("finance", batch.clone()).await.unwrap();

    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(calls)));
    let run = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, latencies, service, batch) = (next.clone(), latencies.clone(), service.clone(), batch.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < calls {
                    let t = Instant::now();
                    let out = service.resolve("finance", batch.clone()).await.expect("resolve");
                    let took = t.elapsed();
                    assert!(out.iter().all(|r| !matches!(r.result, Some(R::Error(_)))), "{out:?}");
                    latencies.lock().unwrap().push(took);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = run.elapsed();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();

    println!("stack start-up (4 services, SQLite migrations, store keys): {:.1} ms", startup.as_secs_f64() * 1000.0);
    println!("ResolveSecrets: {calls} calls x {items} items, {concurrency} concurrent callers");
    println!(
        "  throughput: {:.0} calls/s ({:.0} items/s)",
        calls as f64 / elapsed.as_secs_f64(),
        (calls * items) as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
        percentile(&l, 0.50),
        percentile(&l, 0.95),
        percentile(&l, 0.99),
        percentile(&l, 1.0)
    );
    println!("peak RSS of the process (all services and the load generator): {:.1} MiB", peak_rss_mib());
}
