//! The README's examples, run as printed: the grpcurl walkthrough against the
//! local stack on its default ports, and the token hashing command.
//!
//! A test binary of its own: cargo runs test binaries one after another, so
//! no other test's listener or connection can hold one of the default ports
//! (which lie in the kernel's ephemeral range) while the stack starts.

#![allow(
    clippy::disallowed_methods,
    reason = "test set-up may block: it runs before and beside the servers, not in them"
)]

use std::process::{Command, Stdio};

use integration_tests::procs::binary;

const README: &str = include_str!("../../README.md");

/// The first ```sh block after `heading`.
fn sh_block(heading: &str) -> &'static str {
    let from = README.find(heading).unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = &README[from..];
    let start = rest.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = rest[start..].find("```").expect("closed block") + start;
    &rest[start..end]
}

/// Runs a README block with bash (`-euo pipefail`) in `dir`, after the
/// first block's variables; its stdout and stderr, once it succeeded.
fn run_block(dir: &std::path::Path, name: &str, block: &str) -> (String, String) {
    // secretsctl as installed: the workspace's build of it on PATH.
    let bin = binary("secretsctl");
    let bin_dir = bin.parent().expect("the binaries' directory").display();
    let script = format!(
        "export PATH=\"{bin_dir}:$PATH\"\nexport ADMIN_TOKEN=$(cat .local-stack/admin.token) SERVICE_TOKEN=$(cat .local-stack/platform-service.token)\nGW=127.0.0.1:50051\n{block}"
    );
    let output =
        Command::new("bash").args(["-euo", "pipefail", "-c", &script]).current_dir(dir).output().expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "the README's {name} block failed:\n{stderr}\n{stdout}");
    (stdout, stderr)
}

struct Stack(std::process::Child);

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_grpcurl_walkthrough_runs_as_printed_against_the_local_stack() {
    let dir = tempfile::tempdir().unwrap();
    // The quick start's first command, from its own directory, default
    // ports. Those ports lie in the kernel's ephemeral range, so another
    // process's connection may hold one for a moment: start again if so.
    let start = || {
        Stack(
            Command::new(binary("local-stack"))
                .current_dir(dir.path())
                .env_remove("DATABASE_URL")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("local-stack.log")).expect("log file"))
                .spawn()
                .expect("start local-stack"),
        )
    };
    // A connection holds its port until it is closed, which may take some
    // seconds after its process ended: keep trying for a minute, and say
    // who holds the ports if that is not enough.
    let mut stack = start();
    let mut started = false;
    let mut attempts = 1;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect("127.0.0.1:50051").is_ok()
            && std::net::TcpStream::connect("127.0.0.1:50054").is_ok()
            && dir.path().join(".local-stack/admin.token").exists()
            // Written once the services are built, a moment after the ports open.
            && dir.path().join(".local-stack/secretsctl.toml").exists()
        {
            started = true;
            break;
        }
        if let Ok(Some(status)) = stack.0.try_wait() {
            if std::time::Instant::now() + std::time::Duration::from_secs(1) >= deadline {
                let why = std::fs::read_to_string(dir.path().join("local-stack.log")).unwrap_or_default();
                let sockets = Command::new("ss").arg("-tanp").output().map(|o| o.stdout).unwrap_or_default();
                let holders: Vec<String> = String::from_utf8_lossy(&sockets)
                    .lines()
                    .filter(|l| (50051..=50054).any(|p| l.contains(&format!(":{p} "))))
                    .map(str::to_string)
                    .collect();
                panic!("local-stack exited with {status} {attempts} times; sockets on its ports: {holders:#?}\n{why}");
            }
            attempts += 1;
            std::thread::sleep(std::time::Duration::from_millis(500));
            stack = start();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(started, "local-stack did not start");

    // The block stops its OpenBao itself; this stops it if the block fails first.
    struct StopBao;
    impl Drop for StopBao {
        fn drop(&mut self) {
            let _ = Command::new("pkill").args(["-f", "dev-root-token-id=dev-only-root-token"]).status();
        }
    }

    // The secretsctl walkthrough first: it leaves nothing behind that the
    // grpcurl one creates.
    let (stdout, stderr) = run_block(dir.path(), "secretsctl", sh_block("## Using it with secretsctl"));
    assert!(stdout.contains("created secret db_password of domain finance"), "{stdout}");
    assert!(stdout.contains("updated secret db_password of domain finance"), "{stdout}");
    assert!(stdout.contains(r#""key": "db_password""#) && stdout.contains(r#""scope": "domain""#), "json: {stdout}");
    assert!(stdout.contains("refused: exit code 1"), "{stdout}");
    assert!(stderr.contains("a value on the command line is refused"), "{stderr}");
    assert!(
        !stdout.contains("not-a-good-idea") && !stderr.contains("not-a-good-idea"),
        "the refused value is repeated"
    );
    assert!(stdout.contains("denied: user:alice MANAGE_SECRETS"), "{stdout}");
    assert!(stdout.contains("deleted secret db_password of domain finance"), "{stdout}");
    assert!(stdout.contains("allowed: user:bob LIST_SECRETS"), "bob lists finance's secrets: {stdout}");
    assert!(stdout.contains("subject: group:analysts") && stdout.contains("permission: USE"), "the grant: {stdout}");
    assert!(stdout.contains("removed user:bob from domain finance"), "{stdout}");

    // Vault, workloads, the change feed and the audit trail with secretsctl
    // alone, in the same stack; it removes what it made, bundle and all.
    let _stop_bao = StopBao;
    let block = sh_block("### Vault, workloads, rotation and audit with secretsctl");
    let (stdout, stderr) = run_block(dir.path(), "secretsctl Vault and workload", block);
    assert!(stdout.contains("CONNECTION_OK"), "tested: {stdout}");
    assert!(stdout.contains("problems: exit code 4"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with(r#"template.envVars["API_TOKEN"]"#) && l.contains("not-found")),
        "the missing key is a problem on its field: {stdout}"
    );
    assert!(stdout.contains("saved finance WORKLOAD_KIND_SPARK_JOB hourly-report"), "{stdout}");
    assert!(stdout.contains("1 saved workload(s) reference it"), "usages: {stdout}");
    assert!(stdout.contains(r#""text": "token-1""#) && stdout.contains(r#""text": "vault-pw-1""#), "launch: {stdout}");
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with(r#"{"cursor""#))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|m: &serde_json::Value| m.get("change").is_some())
        .collect();
    let origins: Vec<&str> = events.iter().map(|m| m["change"]["origin"].as_str().unwrap_or_default()).collect();
    assert_eq!(origins, ["api", "vault"], "the API rotation, then Vault's new version: {stdout}\n{stderr}");
    assert_eq!(events[1]["change"]["version"], "2");
    for m in &events {
        assert_eq!(m["change"]["reach"]["workloads"][0]["id"], "hourly-report", "each names the job: {m}");
    }
    assert!(stdout.contains("ResolveWorkload") && stdout.contains("user:carol"), "the trail: {stdout}");
    assert!(stdout.contains("deleted Vault config") && stdout.contains("deleted bundle reports-vault"), "{stdout}");
    assert!(!stdout.contains("dev-only-root-token") && !stderr.contains("dev-only-root-token"), "the Vault token");

    // The migration walkthrough, in the same stack; it removes what it made.
    let (stdout, stderr) = run_block(dir.path(), "migration", sh_block("## Migrating to secret objects"));
    assert!(stdout.contains("2 workload(s) still to migrate"), "status before: {stdout}");
    assert!(
        stdout.lines().any(|l| l.contains("spark.smtp.password") && l.contains("smtp_relay_password (global)")),
        "the global fallback is named: {stdout}"
    );
    assert!(stdout.lines().any(|l| l.contains("JDBC_URL") && l.contains("embedded-in-text")), "{stdout}");
    assert!(
        stdout.lines().filter(|l| *l == "created secret lake_secret_key").count() == 1,
        "created by the first apply only: {stdout}"
    );
    assert!(stdout.contains("same values"), "{stdout}");
    assert!(
        stdout.contains("1 workload(s) still to migrate"),
        "the embedded placeholder keeps etl-nightly listed: {stdout}"
    );
    assert!(
        !stdout.contains("lake-plaintext-key") && !stderr.contains("lake-plaintext-key"),
        "the plaintext is echoed"
    );

    let (stdout, _) = run_block(dir.path(), "grpcurl", sh_block("## Using it with grpcurl"));
    assert!(stdout.contains("iomete.secrets.v1.Gateway"), "list: {stdout}");
    assert!(stdout.contains(r#""text": "jdbc:postgresql://etl:rotated@db/warehouse""#), "resolved text: {stdout}");
    // Create, update, then the same update twice with one requestId: the
    // retry answers the first outcome (the same updatedAt).
    let update_times: Vec<&str> = stdout
        .match_indices(r#""updatedAt": ""#)
        .map(|(i, m)| {
            let value = &stdout[i + m.len()..];
            &value[..value.find('"').unwrap_or(value.len())]
        })
        .collect();
    assert!(update_times.len() >= 4, "{stdout}");
    assert_eq!(update_times[2], update_times[3], "the retried update was answered with its first outcome: {stdout}");
    assert!(stdout.contains(r#""value": "c210cC1wYXNz""#), "the global smtp_password through finance: {stdout}");
    assert!(stdout.contains(r#""code": 5"#) && stdout.contains(r#"secret \"s3_secret\" does not exist"#), "{stdout}");
    assert!(stdout.contains("user:alice does not hold MANAGE_SECRETS"), "alice may not manage secrets: {stdout}");
    assert!(
        stdout.contains("user:alice ∈ group:data-eng ∈ group:eng; group:eng holds USE on bundle finance-vault"),
        "the bundle check names the path: {stdout}"
    );

    // The Vault walkthrough, in the same stack, with the variables the
    // first block exported.
    let vault = sh_block("### Vault integrations with grpcurl");
    let _stop_bao = StopBao;
    let (stdout, _) = run_block(dir.path(), "Vault", vault);
    assert!(stdout.contains(r#""outcome": "CONNECTION_OK""#), "tested: {stdout}");
    assert!(stdout.contains(r#""api_key""#) && stdout.contains(r#""db_password""#), "keys: {stdout}");
    assert!(stdout.contains(r#""credentialsSet": true"#), "get: {stdout}");
    assert!(!stdout.contains("dev-only-root-token"), "no answer shows the token: {stdout}");
    assert!(stdout.contains(r#""value": "dmF1bHQtcHc=""#), "resolved vault-pw for alice: {stdout}");
    assert_eq!(
        stdout.matches(r#""label": "prod""#).count(),
        2,
        "the selector lists the config's two keys for alice and none for bob: {stdout}"
    );
    assert!(stdout.matches(r#""label": "global""#).count() >= 2, "both see the global keys: {stdout}");

    // The saved-workload walkthrough, in the same stack.
    let (stdout, stderr) = run_block(dir.path(), "workload", sh_block("### Saved workloads with grpcurl"));
    assert!(
        stdout.contains(r#""field": "template.envVars[\"TOKEN\"]""#)
            && stdout.contains(r#""type": "PROBLEM_NOT_FOUND""#),
        "the draft's missing key is a typed problem on its field: {stdout}"
    );
    assert_eq!(stdout.matches(r#""saved": true"#).count(), 1, "the draft is not saved, the job is: {stdout}");
    for value in ["wh-pass", "smtp-pass", "AKIA-finance"] {
        assert!(stdout.contains(&format!(r#""text": "{value}""#)), "resolved {value}: {stdout}");
    }
    assert!(stdout.contains(r#""id": "nightly-etl""#) && stdout.contains(r#""total": 1"#), "usages: {stdout}");
    assert!(stdout.contains("refused: nightly-etl uses it"), "{stdout}");
    assert!(
        stderr.contains("secret \"warehouse_password\" of domain \"finance\" is referenced by 1 saved workload: finance/SPARK_JOB/nightly-etl"),
        "the refusal names the job: {stderr}"
    );
    assert!(stdout.contains(r#""removed": true"#), "{stdout}");

    // The rotation and audit walkthrough, in the same stack.
    let _stop_bao = StopBao;
    let (stdout, stderr) = run_block(dir.path(), "rotation", sh_block("### Rotation and audit with grpcurl"));
    let Some(start) = stdout.find(r#""caughtUp": true"#) else {
        panic!("the feed's first message is not in the output:\n{stderr}\n{stdout}");
    };
    let feed = &stdout[start..];
    for origin in ["CHANGE_ORIGIN_API", "CHANGE_ORIGIN_VAULT"] {
        assert!(feed.contains(&format!(r#""origin": "{origin}""#)), "the feed reports the {origin} change: {feed}");
    }
    assert!(feed.contains(r#""version": "2""#), "the Vault change carries the new version: {feed}");
    assert!(feed.matches(r#""id": "hourly-sync""#).count() >= 2, "each change names the job: {feed}");
    assert!(
        stdout.contains(r#""rpc": "ResolveWorkload""#) && stdout.contains(r#""principal": "user:alice""#),
        "{stdout}"
    );
    assert!(stdout.contains(r#""rpc": "UpdateSecret""#), "the rotation is in the trail: {stdout}");
    assert!(stdout.contains(r#""lastResolved""#), "last access: {stdout}");
    for rotated in ["token-2", "vault-pw-2"] {
        assert!(!stdout.contains(rotated), "no answer shows a rotated value: {stdout}");
    }
}

#[test]
fn the_token_hash_example_prints_the_sha256_the_gateway_expects() {
    let config = README.find("gateway hash-token").expect("README shows hash-token");
    assert!(README[..config].contains("sha256 = "), "the example belongs to the token configuration");
    let mut child =
        Command::new(binary("gateway")).arg("hash-token").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"example-token").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        secrets_common::auth::TokenHash::of("example-token").to_hex()
    );
}
