//! The benchmark: the four services as separate processes (release builds),
//! their store objects on the Kubernetes API-server emulator, OpenBao as the
//! Vault, and two references measured in the same run, interleaved with our
//! calls: a no-op tonic server (another process) and a direct OpenBao KV v2
//! read over a keep-alive HTTP client.
//!
//!   cargo build --release --workspace --bins --examples
//!   cargo run --release -p integration-tests --example bench -- [rounds] [calls-per-step]
//!
//! Prints one table (requests/s, p50, p99 and the ratios to the two
//! references at 1, 16 and 64 requests in flight), then for 10,000 one-item
//! resolves: the CPU seconds and peak RSS of each service, and the
//! API-server requests and database queries per resolve; then the same
//! one-item resolve with two replicas of every service on PostgreSQL
//! (`DATABASE_URL`), with each replica's CPU. The services log at
//! `warn`; `BENCH_SERVICE_LOG=info` measures what per-call logging costs.
//! The one-item resolve also runs through gateways whose audit trail is
//! buffered, and off (the others are strict, the default), and audit
//! queries run over a trail of 1,000,000 records.

#![allow(clippy::disallowed_methods, reason = "a benchmark driver may block: it runs beside the servers, not in them")]

use std::{
    collections::BTreeMap,
    future::Future,
    path::Path,
    pin::Pin,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use integration_tests::{kube_server::FakeKube, openbao::OpenBao, *};
use secrets_common::auth::{TokenHash, generate_token};
use secrets_proto::v1::{self as pb, resolved_item::Result as R};

type Call = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

const INFLIGHT: [usize; 3] = [1, 16, 64];

/// The in-flight levels to run: `BENCH_INFLIGHT=1` (comma-separated) for a
/// quick look at one level, all three by default.
fn inflight_levels() -> Vec<usize> {
    std::env::var("BENCH_INFLIGHT")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect::<Vec<usize>>())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| INFLIGHT.to_vec())
}

fn arg(n: usize, default: usize) -> usize {
    std::env::args().nth(n).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// A child process of one of our binaries (or of this one), killed on drop.
struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// utime + stime, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        ticks / 100.0
    }

    fn peak_rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

/// Tokio worker threads of each service (`BENCH_SERVICE_THREADS`, default
/// 1): the machine's cores are shared by four services, OpenBao, the
/// emulator and the load generator, so one worker each is how they would be
/// deployed on it (tokio's own default is one per core, in every process).
fn service_threads() -> String {
    std::env::var("BENCH_SERVICE_THREADS").unwrap_or_else(|_| "1".into())
}

/// The services' log level: `BENCH_SERVICE_LOG` (default `warn`); `info`
/// shows what per-call logging costs.
fn service_log() -> String {
    std::env::var("BENCH_SERVICE_LOG").unwrap_or_else(|_| "warn".into())
}

fn start(dir: &Path, name: &str, config: &str) -> Proc {
    start_as(dir, name, name, config)
}

/// `binary` with `config`, written to `dir/FILE.toml`.
fn start_as(dir: &Path, file: &str, name: &str, config: &str) -> Proc {
    start_logging(dir, file, name, config, &service_log())
}

/// The same, logging at `log` (`RUST_LOG`; `info` is the services' default).
fn start_logging(dir: &Path, file: &str, name: &str, config: &str, log: &str) -> Proc {
    let path = dir.join(format!("{file}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(procs::binary(name));
    command.arg("--config").arg(&path).env_clear().env("RUST_LOG", log);
    command.env("TOKIO_WORKER_THREADS", service_threads());
    let child = command
        .stdout(Stdio::null())
        .stderr(if log == "warn" { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    Proc { name: file.into(), child }
}

async fn wait_serving(port: u16) {
    for _ in 0..200 {
        if secrets_common::server::probe(([127, 0, 0, 1], port).into()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing serving on {port}");
}

/// The no-op reference: a tonic server answering health checks, nothing else.
async fn noop_server(port: u16) {
    let (_reporter, service) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder().add_service(service).serve(([127, 0, 0, 1], port).into()).await.unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[derive(Default)]
struct Sample {
    latencies: Vec<Duration>,
    busy: Duration,
    calls: usize,
}

impl Sample {
    fn rps(&self) -> f64 {
        self.calls as f64 / self.busy.as_secs_f64()
    }
    fn p50(&mut self) -> f64 {
        self.latencies.sort();
        percentile(&self.latencies, 0.5)
    }
    fn p99(&mut self) -> f64 {
        self.latencies.sort();
        percentile(&self.latencies, 0.99)
    }
}

/// `calls` calls of `call`, `inflight` at a time.
async fn step(call: &Call, inflight: usize, calls: usize, into: &mut Sample) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..inflight)
        .map(|_| {
            let (call, next) = (call.clone(), next.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                    let t = Instant::now();
                    call().await;
                    out.push(t.elapsed());
                }
                out
            })
        })
        .collect();
    for w in workers {
        into.latencies.extend(w.await.unwrap());
    }
    into.busy += started.elapsed();
    into.calls += calls;
}

/// `calls` calls at once, each started at the same moment: latencies and
/// failures.
async fn burst(call: &Call, calls: usize) -> Sample {
    let start = Arc::new(tokio::sync::Barrier::new(calls));
    let began = Instant::now();
    let tasks: Vec<_> = (0..calls)
        .map(|_| {
            let (call, start) = (call.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let t = Instant::now();
                call().await;
                t.elapsed()
            })
        })
        .collect();
    let mut sample = Sample::default();
    for t in tasks {
        sample.latencies.push(t.await.unwrap());
    }
    sample.busy = began.elapsed();
    sample.calls = calls;
    sample
}

/// Counts the calls that failed, and the first failure.
#[derive(Default)]
struct Failures {
    count: std::sync::atomic::AtomicUsize,
    first: std::sync::Mutex<Option<String>>,
}

impl Failures {
    fn note(&self, what: String) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.first.lock().unwrap().get_or_insert(what);
    }
    fn take(&self) -> (usize, Option<String>) {
        (self.count.swap(0, std::sync::atomic::Ordering::Relaxed), self.first.lock().unwrap().take())
    }
}

async fn scrape(port: u16) -> String {
    http_get(&format!("http://127.0.0.1:{port}/metrics")).await.1
}

/// The sum of `secrets_backend_calls_total` samples whose labels contain `filter`.
fn backend_calls(text: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("secrets_backend_calls_total{") && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("noop-server") {
        noop_server(arg(2, 0) as u16).await;
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (rounds, per_step) = (arg(1, 3), arg(2, 600));
    let dir = tempfile::tempdir().unwrap();
    let kube = FakeKube::start().await;
    let bao = OpenBao::start();
    bao.bao(&["kv", "put", "secret/bench", "api_key=key-from-vault"]);

    let port = procs::free_port;
    let (authz, secrets, vault, gateway, noop) = (port(), port(), port(), port(), port());
    let (m_authz, m_secrets, m_vault, m_gateway) = (port(), port(), port(), port());
    let internal = generate_token();
    let (admin_token, service_token) = (generate_token(), generate_token());
    let d = dir.path().display();
    let common = |listen: u16, metrics: u16| {
        format!(
            "server = {{ listen_addr = \"127.0.0.1:{listen}\", metrics_addr = \"127.0.0.1:{metrics}\" }}\ninternal_token = \"{internal}\"\n"
        )
    };
    // A vault-config-service keeping values for `ttl_ms` (None: the default).
    let vault_config = |port: u16, metrics: u16, ttl_ms: Option<u64>| {
        format!(
            "{}authz_url = \"http://127.0.0.1:{authz}\"\ndatabase_url = \"sqlite://{d}/vault.db?mode=rwc\"\nbackend = \"embedded\"\n[embedded]\ndata_dir = \"{d}/vault-credentials\"\n{}",
            common(port, metrics),
            ttl_ms.map(|t| format!("[vault]\ncache_ttl_ms = {t}\n")).unwrap_or_default()
        )
    };
    // A gateway with its own audit trail (strict, the default), in a file
    // of its own.
    let gateway_config = |port: u16, metrics: u16, vault: u16, secrets: u16| {
        format!(
            "{}secret_service_url = \"http://127.0.0.1:{secrets}\"\nauthz_service_url = \"http://127.0.0.1:{authz}\"\nvault_config_service_url = \"http://127.0.0.1:{vault}\"\n\
             [[tokens]]\nname = \"admin\"\nkind = \"user\"\nsubject = \"admin\"\nsha256 = \"{}\"\n\
             [[tokens]]\nname = \"spark\"\nkind = \"service\"\nsubject = \"spark\"\nsha256 = \"{}\"\n\
             [audit]\ndatabase_url = \"sqlite://{d}/audit-{port}.db?mode=rwc\"\n",
            common(port, metrics),
            TokenHash::of(&admin_token).to_hex(),
            TokenHash::of(&service_token).to_hex()
        )
    };
    let procs = [
        start(
            dir.path(),
            "authz-service",
            &format!(
                "{}database_url = \"sqlite://{d}/authz.db?mode=rwc\"\nbootstrap_admins = [\"user:admin\"]\n",
                common(authz, m_authz)
            ),
        ),
        start(
            dir.path(),
            "secret-service",
            &format!(
                "{}authz_url = \"http://127.0.0.1:{authz}\"\nbackend = \"kubernetes\"\n[kubernetes]\napi_url = \"{}\"\nnamespace = \"bench\"\n",
                common(secrets, m_secrets),
                kube.url
            ),
        ),
        start(dir.path(), "vault-config-service", &vault_config(vault, m_vault, None)),
        start(dir.path(), "gateway", &gateway_config(gateway, m_gateway, vault, secrets)),
    ];
    let noop_proc = Proc {
        name: "no-op tonic".into(),
        child: Command::new(std::env::current_exe().unwrap())
            .args(["noop-server", &noop.to_string()])
            .env("TOKIO_WORKER_THREADS", service_threads())
            .spawn()
            .unwrap(),
    };
    for p in [authz, secrets, vault, gateway, noop] {
        wait_serving(p).await;
    }
    let url = format!("http://127.0.0.1:{gateway}");
    let admin = Clients::new(&url, Some(&admin_token), None);
    let service = Clients::new(&url, Some(&service_token), Some("user:nina"));

    // Domains with 10, 100 and 1,000 keys; nina, a member, may use each.
    let mut authz_client = admin.authz.clone();
    for (domain, keys) in [("small", 10), ("wide", 100), ("big", 1000)] {
        authz_client
            .add_domain_member(pb::AddDomainMemberRequest {
                domain: domain.into(),
                subject: "user:nina".into(),
                role: pb::DomainRole::Member as i32,
            })
            .await
            .unwrap();
        for i in 0..keys {
            admin.create(domain, &format!("key-{i}"), &format!("value-{i}-{}", "x".repeat(24))).await.unwrap();
        }
    }
    authz_client
        .add_domain_member(pb::AddDomainMemberRequest {
            domain: "small".into(),
            subject: "user:lisa".into(),
            role: pb::DomainRole::Member as i32,
        })
        .await
        .unwrap();
    authz_client
        .create_bundle(pb::CreateBundleRequest {
            name: "vault".into(),
            description: String::new(),
            owner: "user:admin".into(),
        })
        .await
        .unwrap();
    authz_client
        .grant_bundle_permission(pb::GrantBundlePermissionRequest {
            bundle: "vault".into(),
            subject: "user:nina".into(),
            permission: pb::Permission::Use as i32,
        })
        .await
        .unwrap();
    let config = admin
        .vault
        .clone()
        .create_vault_config(pb::CreateVaultConfigRequest {
            domain: "small".into(),
            bundle: "vault".into(),
            spec: Some(pb::VaultConfigSpec {
                name: "bench".into(),
                host: bao.addr.clone(),
                path: "/v1/secret/data/bench".into(),
                credentials: Some(pb::VaultCredentials {
                    method: Some(pb::vault_credentials::Method::Token(bao.root_token.clone())),
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();

    // The same gateway and services, but a vault-config-service that keeps
    // no value past 1 ms: every VAULT read through it goes to OpenBao.
    let (vault_cold, gateway_cold) = (port(), port());
    let _cold = [
        start_as(
            dir.path(),
            "vault-config-service-cold",
            "vault-config-service",
            &vault_config(vault_cold, port(), Some(1)),
        ),
        start_as(dir.path(), "gateway-cold", "gateway", &gateway_config(gateway_cold, port(), vault_cold, secrets)),
    ];
    for p in [vault_cold, gateway_cold] {
        wait_serving(p).await;
    }
    let cold_service =
        Clients::new(&format!("http://127.0.0.1:{gateway_cold}"), Some(&service_token), Some("user:nina"));

    // The same services behind gateways whose audit trail is buffered, or
    // off: what auditing costs a resolve.
    let (gateway_buffered, gateway_unaudited) = (port(), port());
    let _audit_modes = [
        start_as(
            dir.path(),
            "gateway-buffered",
            "gateway",
            &format!("{}mode = \"buffered\"\n", gateway_config(gateway_buffered, port(), vault, secrets)),
        ),
        start_as(
            dir.path(),
            "gateway-unaudited",
            "gateway",
            &format!("{}mode = \"off\"\n", gateway_config(gateway_unaudited, port(), vault, secrets)),
        ),
    ];
    for p in [gateway_buffered, gateway_unaudited] {
        wait_serving(p).await;
    }
    let via = |port: u16| Clients::new(&format!("http://127.0.0.1:{port}"), Some(&service_token), Some("user:nina"));
    let (buffered_service, unaudited_service) = (via(gateway_buffered), via(gateway_unaudited));

    // The calls.
    let resolve_via = |service: &Clients, domain: &'static str, items: Vec<pb::ResolveItem>| -> Call {
        let (service, items) = (service.clone(), Arc::new(items));
        Arc::new(move || {
            let (service, items) = (service.clone(), items.clone());
            Box::pin(async move {
                let out = service.resolve(domain, (*items).clone()).await.expect("resolve");
                assert!(out.iter().all(|r| !matches!(r.result, Some(R::Error(_)))), "{out:?}");
            })
        })
    };
    let resolve = |domain: &'static str, items: Vec<pb::ResolveItem>| resolve_via(&service, domain, items);
    let objects = |n: usize| (0..n).map(|i| object_item(&format!("i{i}"), "wide", &format!("key-{i}"))).collect();
    let noop_call: Call = {
        let channel = channel(&format!("http://127.0.0.1:{noop}"));
        Arc::new(move || {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            Box::pin(async move {
                client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("no-op");
            })
        })
    };
    let bao_call: Call = {
        let http = reqwest::Client::builder().build().unwrap();
        let (url, token) = (format!("{}/v1/secret/data/bench", bao.addr), bao.root_token.clone());
        Arc::new(move || {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            Box::pin(async move {
                let r = http.get(&url).header("X-Vault-Token", &token).send().await.expect("openbao");
                assert!(r.status().is_success());
                r.bytes().await.unwrap();
            })
        })
    };
    let list_call: Call = {
        let admin = admin.clone();
        Arc::new(move || {
            let admin = admin.clone();
            Box::pin(async move {
                admin.list("small").await.expect("list");
            })
        })
    };
    // The two hops behind a one-item resolve, called directly with the
    // internal credential: where a resolve's time goes.
    let internal_client =
        secrets_common::auth::InternalClient::new(&secrecy::SecretString::from(internal.clone())).unwrap();
    let read_call: Call = {
        use secrets_proto::internal::v1 as int;
        let client = int::secret_reader_client::SecretReaderClient::with_interceptor(
            channel(&format!("http://127.0.0.1:{secrets}")),
            internal_client.clone(),
        );
        Arc::new(move || {
            let mut client = client.clone();
            Box::pin(async move {
                let lookup = int::SecretLookup {
                    scope: pb::Scope::Domain as i32,
                    domain: "small".into(),
                    key: "key-1".into(),
                    global_fallback: true,
                };
                let request = int::ReadSecretsRequest { lookups: vec![lookup], ..Default::default() };
                assert!(client.read_secrets(request).await.expect("read").into_inner().results[0].found);
            })
        })
    };
    let check_call: Call = {
        let client = pb::authz_service_client::AuthzServiceClient::with_interceptor(
            channel(&format!("http://127.0.0.1:{authz}")),
            internal_client,
        );
        Arc::new(move || {
            let mut client = client.clone();
            Box::pin(async move {
                let check = pb::CheckRequest {
                    subject: "user:nina".into(),
                    permission: pb::Permission::UseSecrets as i32,
                    domain: "small".into(),
                    ..Default::default()
                };
                let request = pb::BatchCheckRequest { checks: vec![check] };
                assert!(client.batch_check(request).await.expect("check").into_inner().results[0].allowed);
            })
        })
    };
    let cases: Vec<(&str, Call)> = vec![
        ("no-op tonic server (reference)", noop_call),
        ("direct OpenBao KV v2 read (reference)", bao_call),
        ("resolve 1 item, object of 10 keys", resolve("small", vec![object_item("a", "small", "key-1")])),
        (
            "resolve 1 item, audit buffered",
            resolve_via(&buffered_service, "small", vec![object_item("a", "small", "key-1")]),
        ),
        (
            "resolve 1 item, audit off",
            resolve_via(&unaudited_service, "small", vec![object_item("a", "small", "key-1")]),
        ),
        ("resolve 1 item, object of 1,000 keys", resolve("big", vec![object_item("a", "big", "key-1")])),
        ("resolve 20 items, one object", resolve("wide", objects(20))),
        ("resolve 100 items, one object", resolve("wide", objects(100))),
        ("resolve 1 VAULT item (cached)", resolve("small", vec![vault_item("v", &config.id, "api_key")])),
        (
            "resolve 1 VAULT item (cold)",
            resolve_via(&cold_service, "small", vec![vault_item("v", &config.id, "api_key")]),
        ),
        ("ListSecrets, 10 keys", list_call),
        ("hop: secret-service ReadSecrets, 1 key", read_call),
        ("hop: authz-service BatchCheck, 1 check", check_call),
    ];
    // Warm up every path and connection.
    for (_, call) in &cases {
        for _ in 0..20 {
            call().await;
        }
    }

    let mut samples: BTreeMap<(usize, usize), Sample> = BTreeMap::new();
    let levels = inflight_levels();
    for _ in 0..rounds {
        for &inflight in &levels {
            for (i, (_, call)) in cases.iter().enumerate() {
                step(call, inflight, per_step, samples.entry((inflight, i)).or_default()).await;
            }
        }
    }

    println!("| call | in flight | requests/s | p50 ms | p99 ms | rps / no-op | p50 / OpenBao |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &inflight in &levels {
        let noop_rps = samples[&(inflight, 0)].rps();
        let bao_p50 = samples.get_mut(&(inflight, 1)).unwrap().p50();
        for (i, (name, _)) in cases.iter().enumerate() {
            let s = samples.get_mut(&(inflight, i)).unwrap();
            let (rps, p50, p99) = (s.rps(), s.p50(), s.p99());
            println!(
                "| {name} | {inflight} | {rps:.0} | {p50:.2} | {p99:.2} | {:.0}% | {:.2}x |",
                100.0 * rps / noop_rps,
                p50 / bao_p50
            );
        }
    }

    // 10,000 one-item resolves at 16 in flight: the cost per service.
    let metrics_before: Vec<String> = futures::future::join_all([m_authz, m_secrets, m_gateway].map(scrape)).await;
    let cpu_before: Vec<f64> = procs.iter().map(Proc::cpu_seconds).collect();
    let kube_before = kube.counters();
    let one = resolve("small", vec![object_item("a", "small", "key-1")]);
    let mut sample = Sample::default();
    step(&one, 16, 10_000, &mut sample).await;
    let cpu_after: Vec<f64> = procs.iter().map(Proc::cpu_seconds).collect();
    let metrics_after: Vec<String> = futures::future::join_all([m_authz, m_secrets, m_gateway].map(scrape)).await;
    let noop_cpu_before = noop_proc.cpu_seconds();
    let mut noop_sample = Sample::default();
    step(&cases[0].1, 16, 10_000, &mut noop_sample).await;
    let noop_cpu = noop_proc.cpu_seconds() - noop_cpu_before;
    let kube_after = kube.counters();

    println!();
    println!("10,000 one-item resolves at 16 in flight ({:.0}/s):", sample.rps());
    println!("| process | CPU s per 10,000 calls | peak RSS MiB |");
    println!("| --- | ---: | ---: |");
    for (i, p) in procs.iter().enumerate() {
        println!("| {} | {:.2} | {:.1} |", p.name, cpu_after[i] - cpu_before[i], p.peak_rss_mib());
    }
    println!("| {} (10,000 health checks) | {noop_cpu:.2} | {:.1} |", noop_proc.name, noop_proc.peak_rss_mib());
    let per = |after: f64, before: f64| (after - before) / 10_000.0;
    let api = (kube_after.gets + kube_after.creates + kube_after.replaces)
        - (kube_before.gets + kube_before.creates + kube_before.replaces);
    println!();
    println!("services logging at {}, {} tokio worker thread(s) each", service_log(), service_threads());
    println!(
        "per resolve: {:.2} API-server requests, {:.2} authz round trips (gateway), {:.2} database queries (authz-service), {:.2} store-object reads from memory (secret-service)",
        api as f64 / 10_000.0,
        per(
            backend_calls(&metrics_after[2], "operation=\"BatchCheck\""),
            backend_calls(&metrics_before[2], "operation=\"BatchCheck\"")
        ),
        per(
            backend_calls(&metrics_after[0], "backend=\"sqlite\""),
            backend_calls(&metrics_before[0], "backend=\"sqlite\"")
        ),
        per(
            backend_calls(&metrics_after[1], "operation=\"read\""),
            backend_calls(&metrics_before[1], "operation=\"read\"")
        ),
    );

    audit_queries(dir.path(), &admin_token, &gateway_config, vault, secrets).await;

    replicas(rounds, per_step, [cases[0].1.clone(), cases[1].1.clone(), cases[2].1.clone()]).await;

    bursts(Bursts {
        dir: dir.path(),
        rounds,
        admin: &admin,
        service: &service,
        bao: &bao,
        kube_url: &kube.url,
        ports: (authz, vault),
        service_token: &service_token,
        common: &common,
        gateway_config: &gateway_config,
    })
    .await;
}

/// utime + stime of a process, in seconds.
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Two replicas of every service on PostgreSQL (`ReplicatedStack`, with the
/// same log level and worker threads as the single stack above), beside the
/// single-process SQLite stack and the references, interleaved: one-item
/// resolves spread over both gateways, then through a gateway that calls
/// one replica of each service; authz checks per resolve on PostgreSQL; and
/// each replica's CPU per 10,000 resolves. `references`: the no-op server,
/// OpenBao, and a one-item resolve on the single SQLite stack.
async fn replicas(rounds: usize, per_step: usize, references: [Call; 3]) {
    let env: BTreeMap<String, String> =
        [("RUST_LOG".to_string(), service_log()), ("TOKIO_WORKER_THREADS".to_string(), service_threads())]
            .into_iter()
            .collect();
    let Some(mut stack) = replicated::ReplicatedStack::start_with(env).await else {
        println!();
        println!("replica rows skipped: DATABASE_URL names no PostgreSQL server");
        return;
    };
    stack.setup_domain("finance").await;
    stack.as_user(OWNER, 0).create("finance", "db_password", "value-from-the-store").await.unwrap();
    let one_path = stack.another_gateway(&[0]).await;
    let through = |gateways: Vec<usize>| -> Call {
        let clients: Arc<Vec<Clients>> = Arc::new(gateways.iter().map(|g| stack.as_service(MEMBER, *g)).collect());
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        Arc::new(move || {
            let (clients, next) = (clients.clone(), next.clone());
            Box::pin(async move {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let client = &clients[n % clients.len()];
                let out = client.resolve("finance", vec![object_item("a", "finance", "db_password")]).await;
                let out = out.expect("resolve");
                assert!(matches!(out[0].result, Some(R::Value(_))), "{out:?}");
            })
        })
    };
    let [noop, bao, single] = references;
    let cases: Vec<(&str, Call)> = vec![
        ("no-op tonic server (reference)", noop),
        ("direct OpenBao KV v2 read (reference)", bao),
        ("one-item resolve, 1 process each, authz on SQLite", single),
        ("one-item resolve, 2 replicas each on PostgreSQL, over both gateways", through(vec![0, 1])),
        ("one-item resolve, PostgreSQL, one gateway calling 1 replica of each", through(vec![one_path])),
    ];
    for (_, call) in &cases {
        for _ in 0..50 {
            call().await;
        }
    }
    let mut samples: BTreeMap<(usize, usize), Sample> = BTreeMap::new();
    let levels = inflight_levels();
    for _ in 0..rounds {
        for &inflight in &levels {
            for (i, (_, call)) in cases.iter().enumerate() {
                step(call, inflight, per_step, samples.entry((inflight, i)).or_default()).await;
            }
        }
    }
    println!();
    println!("Replicas: two of every service on one PostgreSQL, beside one of each on SQLite:");
    println!("| call | in flight | requests/s | p50 ms | p99 ms | rps / SQLite | p50 / SQLite | p50 / OpenBao |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &inflight in &levels {
        let bao_p50 = samples.get_mut(&(inflight, 1)).unwrap().p50();
        let single_rps = samples[&(inflight, 2)].rps();
        let single_p50 = samples.get_mut(&(inflight, 2)).unwrap().p50();
        for (i, (name, _)) in cases.iter().enumerate() {
            let s = samples.get_mut(&(inflight, i)).unwrap();
            let (rps, p50, p99) = (s.rps(), s.p50(), s.p99());
            println!(
                "| {name} | {inflight} | {rps:.0} | {p50:.2} | {p99:.2} | {:.0}% | {:.2}x | {:.2}x |",
                100.0 * rps / single_rps,
                p50 / single_p50,
                p50 / bao_p50
            );
        }
    }

    // 10,000 resolves over both gateways at 16 in flight: what each replica
    // spends, and what the gateways asked the authz-service.
    let gateway_metrics: Vec<u16> = (0..2).map(|g| stack.metrics[&("gateway", g)]).collect();
    let asked = |texts: &[String]| -> f64 { texts.iter().map(|t| backend_calls(t, "operation=\"BatchCheck\"")).sum() };
    let before_metrics: Vec<String> = futures::future::join_all(gateway_metrics.iter().map(|p| scrape(*p))).await;
    let pids = stack.pids();
    let before: Vec<f64> = pids.iter().map(|(_, pid)| cpu_of(*pid)).collect();
    let mut sample = Sample::default();
    step(&cases[3].1, 16, 10_000, &mut sample).await;
    let after: Vec<f64> = pids.iter().map(|(_, pid)| cpu_of(*pid)).collect();
    let after_metrics: Vec<String> = futures::future::join_all(gateway_metrics.iter().map(|p| scrape(*p))).await;
    println!();
    println!(
        "10,000 one-item resolves over both gateways at 16 in flight ({:.0}/s): {:.3} authz checks per resolve",
        sample.rps(),
        (asked(&after_metrics) - asked(&before_metrics)) / 10_000.0
    );
    println!("| replica | CPU s per 10,000 resolves |");
    println!("| --- | ---: |");
    for (i, ((service, replica), _)) in pids.iter().enumerate() {
        println!("| {service} {replica} | {:.2} |", after[i] - before[i]);
    }
    stack.stop().await;
}

/// What the burst rows need of the set-up above.
struct Bursts<'a> {
    dir: &'a Path,
    rounds: usize,
    admin: &'a Clients,
    service: &'a Clients,
    bao: &'a OpenBao,
    kube_url: &'a str,
    /// The authz-service's and the vault-config-service's ports.
    ports: (u16, u16),
    service_token: &'a str,
    common: &'a dyn Fn(u16, u16) -> String,
    gateway_config: &'a dyn Fn(u16, u16, u16, u16) -> String,
}

/// Writes and bursts: creates beside direct OpenBao writes, 1,000 cold
/// VAULT resolves at once, 1,000 in flight against 64, and the cost of
/// logging at the default level.
async fn bursts(b: Bursts<'_>) {
    let failures = Arc::new(Failures::default());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Each row and round writes 500 keys into 10 domains of its own: the
    // store objects start empty and end with 50 keys each, as a burst of
    // sign-ups or a rotation over 10 domains would leave them.
    let create_call: Call = {
        let (admin, failures, next) = (b.admin.clone(), failures.clone(), next.clone());
        Arc::new(move || {
            let (admin, failures) = (admin.clone(), failures.clone());
            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                let domain = format!("burst{}-{}", n / 500, n % 10);
                if let Err(e) = admin.create(&domain, &format!("key-{n}"), "value").await {
                    failures.note(format!("{:?}: {}", e.code(), e.message()));
                }
            })
        })
    };
    let bao_write: Call = {
        let http = reqwest::Client::builder().build().unwrap();
        let (addr, token, next) = (b.bao.addr.clone(), b.bao.root_token.clone(), next.clone());
        Arc::new(move || {
            let (http, token) = (http.clone(), token.clone());
            let url = format!("{addr}/v1/secret/data/w-{}", next.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            Box::pin(async move {
                let body = serde_json::json!({"data": {"value": "value"}});
                let r = http
                    .post(&url)
                    .header("X-Vault-Token", &token)
                    .body(body.to_string())
                    .send()
                    .await
                    .expect("openbao");
                assert!(r.status().is_success(), "{}", r.status());
            })
        })
    };
    println!();
    println!("Writes, 500 per row and round into 10 new domains ({} rounds):", b.rounds);
    println!("| call | in flight | requests/s | p50 ms | p99 ms | errors | rps / OpenBao |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for inflight in [1, 16, 64, 500] {
        let (mut ours, mut theirs) = (Sample::default(), Sample::default());
        for _ in 0..b.rounds {
            step(&bao_write, inflight, 500, &mut theirs).await;
            // The writes' key numbers name the domains: start each row at a
            // multiple of 500.
            let n = next.load(std::sync::atomic::Ordering::Relaxed);
            next.store(n.div_ceil(500) * 500, std::sync::atomic::Ordering::Relaxed);
            step(&create_call, inflight, 500, &mut ours).await;
        }
        let (errors, first) = failures.take();
        let bao_rps = theirs.rps();
        println!(
            "| direct OpenBao KV v2 write (reference) | {inflight} | {bao_rps:.0} | {:.2} | {:.2} | 0 | 1.00x |",
            theirs.p50(),
            theirs.p99()
        );
        println!(
            "| CreateSecret | {inflight} | {:.0} | {:.2} | {:.2} | {errors} | {:.2}x |",
            ours.rps(),
            ours.p50(),
            ours.p99(),
            ours.rps() / bao_rps
        );
        if let Some(first) = first {
            println!("|   first error: {first} | | | | | | |");
        }
    }

    // 1,000 resolves at once of VAULT keys nothing has read yet, through an
    // AppRole: what reaches OpenBao, from its audit log.
    b.bao.bao(&["auth", "enable", "approle"]);
    let policy = b.dir.join("read.hcl");
    std::fs::write(&policy, "path \"secret/data/*\" { capabilities = [\"read\"] }\n").unwrap();
    b.bao.bao(&["policy", "write", "read-secrets", policy.to_str().unwrap()]);
    b.bao.bao(&["write", "auth/approle/role/bench", "token_policies=read-secrets", "token_ttl=1h"]);
    let role_id = b.bao.field(&["read", "auth/approle/role/bench/role-id"], "role_id");
    let secret_id = b.bao.field(&["write", "-f", "auth/approle/role/bench/secret-id"], "secret_id");
    let create_config = |name: String, path: String| {
        let (mut vault, bao_addr) = (b.admin.vault.clone(), b.bao.addr.clone());
        let credentials = pb::VaultCredentials {
            method: Some(pb::vault_credentials::Method::AppRole(pb::AppRoleCredentials {
                role_id: role_id.clone(),
                secret_id: secret_id.clone(),
                mount: String::new(),
            })),
        };
        async move {
            let spec = pb::VaultConfigSpec {
                name,
                host: bao_addr,
                path,
                credentials: Some(credentials),
                ..Default::default()
            };
            let request =
                pb::CreateVaultConfigRequest { domain: "small".into(), bundle: "vault".into(), spec: Some(spec) };
            vault.create_vault_config(request).await.expect("config").into_inner().id
        }
    };
    for i in 0..50 {
        b.bao.bao(&["kv", "put", &format!("secret/burst-{i}"), &format!("key-{i}=value-{i}")]);
    }
    let one = create_config("burst-one".into(), "/v1/secret/data/burst-0".into()).await;
    let mut fifty = Vec::new();
    for i in 0..50 {
        fifty.push(create_config(format!("burst-{i}"), format!("/v1/secret/data/burst-{i}")).await);
    }
    let resolving = |items: Vec<pb::ResolveItem>| -> Call {
        let (service, items, failures) = (b.service.clone(), Arc::new(items), failures.clone());
        Arc::new(move || {
            let (service, items, failures) = (service.clone(), items.clone(), failures.clone());
            Box::pin(async move {
                match service.resolve("small", (*items).clone()).await {
                    Ok(out) => {
                        if let Some(R::Error(e)) =
                            out.iter().find_map(|r| r.result.clone().filter(|r| matches!(r, R::Error(_))))
                        {
                            failures.note(e.message);
                        }
                    }
                    Err(e) => failures.note(format!("{:?}: {}", e.code(), e.message())),
                }
            })
        })
    };
    println!();
    println!("1,000 resolves at once of VAULT keys not read before (AppRole), OpenBao's audit log:");
    println!("| burst | errors | p50 ms | p99 ms | Vault reads | logins |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let cases = [
        ("1 key of 1 config, 1 item per resolve", vec![vault_item("v", &one, "key-0")]),
        (
            "50 keys over 50 configs, 50 items per resolve",
            fifty.iter().enumerate().map(|(i, id)| vault_item(&format!("v{i}"), id, &format!("key-{i}"))).collect(),
        ),
    ];
    for (name, items) in cases {
        let before = b.bao.requested_paths().len();
        let mut sample = burst(&resolving(items), 1_000).await;
        let paths: Vec<String> = b.bao.requested_paths().into_iter().skip(before).collect();
        let reads = paths.iter().filter(|p| p.starts_with("secret/data/burst-")).count();
        let logins = paths.iter().filter(|p| *p == "auth/approle/login").count();
        let (errors, first) = failures.take();
        println!("| {name} | {errors} | {:.2} | {:.2} | {reads} | {logins} |", sample.p50(), sample.p99());
        if let Some(first) = first {
            println!("|   first error: {first} | | | | | |");
        }
    }

    // Throughput with 1,000 calls in flight against 64: no collapse.
    let one_item = resolving(vec![object_item("a", "small", "key-1")]);
    let (mut at_64, mut at_1000) = (Sample::default(), Sample::default());
    for _ in 0..b.rounds {
        step(&one_item, 64, 5_000, &mut at_64).await;
        step(&one_item, 1_000, 5_000, &mut at_1000).await;
    }
    let (errors, _) = failures.take();
    println!();
    println!("One-item resolves, 5,000 per row and round:");
    println!("| in flight | requests/s | p50 ms | p99 ms | of 64 in flight |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let rps_64 = at_64.rps();
    println!("| 64 | {rps_64:.0} | {:.2} | {:.2} | 100% |", at_64.p50(), at_64.p99());
    println!(
        "| 1,000 | {:.0} | {:.2} | {:.2} | {:.0}% |",
        at_1000.rps(),
        at_1000.p50(),
        at_1000.p99(),
        100.0 * at_1000.rps() / rps_64
    );
    println!("errors: {errors}");

    // The default log level (info) against warn: a second secret-service
    // and gateway logging at info, on the same store objects.
    // `BENCH_SECOND_LOG=warn` runs the second pair at warn too: the same
    // comparison with nothing to tell them apart, to see its noise.
    let second_log = std::env::var("BENCH_SECOND_LOG").unwrap_or_else(|_| "info".into());
    let port = procs::free_port;
    let (secrets_info, gateway_info) = (port(), port());
    let (authz, vault) = b.ports;
    let _info = [
        start_logging(
            b.dir,
            "secret-service-info",
            "secret-service",
            &format!(
                "{}authz_url = \"http://127.0.0.1:{authz}\"\nbackend = \"kubernetes\"\n[kubernetes]\napi_url = \"{}\"\nnamespace = \"bench\"\n",
                (b.common)(secrets_info, port()),
                b.kube_url
            ),
            &second_log,
        ),
        start_logging(
            b.dir,
            "gateway-info",
            "gateway",
            &(b.gateway_config)(gateway_info, port(), vault, secrets_info),
            &second_log,
        ),
    ];
    for p in [secrets_info, gateway_info] {
        wait_serving(p).await;
    }
    let info_service =
        Clients::new(&format!("http://127.0.0.1:{gateway_info}"), Some(b.service_token), Some("user:nina"));
    let at_info = {
        let info_service = info_service.clone();
        let items = vec![object_item("a", "small", "key-1")];
        let call: Call = Arc::new(move || {
            let (service, items) = (info_service.clone(), items.clone());
            Box::pin(async move {
                service.resolve("small", items).await.expect("resolve");
            })
        });
        call
    };
    for _ in 0..20 {
        at_info().await;
    }
    println!();
    println!(
        "One-item resolves, services at warn against a second pair at {second_log}, 5,000 per row and round (order alternating):"
    );
    println!("| in flight | warn requests/s | {second_log} requests/s | {second_log} / warn |");
    println!("| ---: | ---: | ---: | ---: |");
    for inflight in [16, 64] {
        let (mut warn, mut info) = (Sample::default(), Sample::default());
        for round in 0..b.rounds.max(4) {
            if round % 2 == 0 {
                step(&one_item, inflight, 5_000, &mut warn).await;
                step(&at_info, inflight, 5_000, &mut info).await;
            } else {
                step(&at_info, inflight, 5_000, &mut info).await;
                step(&one_item, inflight, 5_000, &mut warn).await;
            }
        }
        println!("| {inflight} | {:.0} | {:.0} | {:.0}% |", warn.rps(), info.rps(), 100.0 * info.rps() / warn.rps());
    }
}

/// Audit queries over a trail of 1,000,000 records (30 days, 50 domains,
/// 5,000 secrets, 200 principals), through a gateway's QueryAuditRecords
/// and ListSecretLastAccess: p50 and p95 of 100 calls each.
async fn audit_queries(
    dir: &Path,
    admin_token: &str,
    gateway_config: &dyn Fn(u16, u16, u16, u16) -> String,
    vault: u16,
    secrets: u16,
) {
    use gateway::audit::db::{audit_last_access, audit_record, audit_reference};
    use sea_orm::{ActiveValue::Set, EntityTrait, TransactionTrait};
    const RECORDS: i64 = 1_000_000;
    let port = procs::free_port();
    // The gateway creates the trail's tables; the records go in directly.
    let _gateway =
        start_as(dir, "gateway-million", "gateway", &gateway_config(port, procs::free_port(), vault, secrets));
    wait_serving(port).await;
    let url = format!("sqlite://{}/audit-{port}.db?mode=rwc", dir.display());
    let db = connect_database(&url).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let month = 30 * 24 * 3600 * 1000i64;
    let started = Instant::now();
    let mut n = 0i64;
    while n < RECORDS {
        let txn = db.begin().await.unwrap();
        for _ in 0..40 {
            let (mut records, mut references) = (Vec::new(), Vec::new());
            for _ in 0..500 {
                let at = now - month + n * month / RECORDS;
                let (domain, principal) = (format!("d{}", n % 50), format!("user:u{}", (n * 7) % 200));
                let (key, denied) = (format!("k{}", (n * 13) % 100), n % 20 == 0);
                let decision = if denied { "DENIED" } else { "ALLOWED" };
                records.push(audit_record::ActiveModel {
                    gateway: Set("gateway-bench".into()),
                    sequence: Set(n),
                    at_ms: Set(at),
                    rpc: Set("ResolveSecrets".into()),
                    caller: Set("service:spark".into()),
                    principal: Set(principal),
                    domain: Set(domain.clone()),
                    workload_kind: Set(String::new()),
                    workload_id: Set(String::new()),
                    decision: Set(decision.into()),
                    trace_id: Set(String::new()),
                    detail: Set(String::new()),
                });
                references.push(audit_reference::ActiveModel {
                    gateway: Set("gateway-bench".into()),
                    sequence: Set(n),
                    position: Set(0),
                    at_ms: Set(at),
                    source_type: Set("KUBERNETES".into()),
                    source_id: Set(domain),
                    key: Set(key),
                    version: Set(String::new()),
                    decision: Set(decision.into()),
                    item: Set("envVars.DB_PASSWORD".into()),
                });
                n += 1;
            }
            audit_record::Entity::insert_many(records).exec_without_returning(&txn).await.unwrap();
            audit_reference::Entity::insert_many(references).exec_without_returning(&txn).await.unwrap();
        }
        txn.commit().await.unwrap();
    }
    let last: Vec<_> = (0..5_000)
        .map(|i| audit_last_access::ActiveModel {
            domain: Set(format!("d{}", i % 50)),
            source_type: Set("KUBERNETES".into()),
            source_id: Set(format!("d{}", i % 50)),
            key: Set(format!("k{}", i / 50)),
            at_ms: Set(now - (i as i64) * 1_000),
            principal: Set("user:u1".into()),
            caller: Set("service:spark".into()),
        })
        .collect();
    for chunk in last.chunks(500) {
        audit_last_access::Entity::insert_many(chunk.to_vec()).exec_without_returning(&db).await.unwrap();
    }
    let filled = started.elapsed();

    let admin = Clients::new(&format!("http://127.0.0.1:{port}"), Some(admin_token), None);
    let week_ago = prost_types::Timestamp { seconds: (now - month / 4) / 1_000, nanos: 0 };
    let day_ago = prost_types::Timestamp { seconds: (now - month / 30) / 1_000, nanos: 0 };
    let queries: Vec<(&str, pb::QueryAuditRecordsRequest)> = vec![
        (
            "who resolved secret X (of 5,000) in the last 7 days, first page",
            pb::QueryAuditRecordsRequest {
                source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: "d7".into() }),
                key: "k91".into(),
                from: Some(week_ago),
                ..Default::default()
            },
        ),
        (
            "what principal Y (of 200) received in the last 7 days, first page",
            pb::QueryAuditRecordsRequest {
                principal: "user:u42".into(),
                rpcs: vec!["ResolveSecrets".into()],
                from: Some(week_ago),
                ..Default::default()
            },
        ),
        (
            "a domain's denied resolutions in the last day",
            pb::QueryAuditRecordsRequest {
                domain: "d0".into(),
                decision: pb::AuditDecision::AuditDenied as i32,
                from: Some(day_ago),
                ..Default::default()
            },
        ),
        ("everything, newest first, first page", pb::QueryAuditRecordsRequest::default()),
    ];
    println!();
    println!(
        "Audit queries over {RECORDS} records (filled in {:.0} s), 100 calls each through QueryAuditRecords:",
        filled.as_secs_f64()
    );
    println!("| query | records on the page | p50 ms | p95 ms |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, request) in queries {
        let mut times = Vec::new();
        let mut found = 0;
        for _ in 0..100 {
            let t = Instant::now();
            let answer = admin.gateway.clone().query_audit_records(request.clone()).await.expect("query");
            times.push(t.elapsed());
            found = answer.into_inner().records.len();
        }
        times.sort();
        println!("| {name} | {found} | {:.1} | {:.1} |", percentile(&times, 0.5), percentile(&times, 0.95));
    }
    let mut times = Vec::new();
    let mut found = 0;
    for _ in 0..100 {
        let t = Instant::now();
        let request = pb::ListSecretLastAccessRequest { domain: "d7".into() };
        found = admin
            .gateway
            .clone()
            .list_secret_last_access(request)
            .await
            .expect("last access")
            .into_inner()
            .secrets
            .len();
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "| last access of each of a domain's secrets | {found} | {:.1} | {:.1} |",
        percentile(&times, 0.5),
        percentile(&times, 0.95)
    );
}
