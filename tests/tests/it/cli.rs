//! `secretsctl`, the real binary, against a stack started in the test.

use std::{io::Write, os::unix::fs::PermissionsExt, process::Stdio, time::Duration};

use integration_tests::{payloads::object, *};
use secrets_proto::v1::{self as pb, workload_payload::Kind};

const DOMAIN: &str = "finance";
const CANARY: &str = "cli-canary-7d1f0c9e";

/// The binary, pointed at the stack's gateway as `user` (the token in the
/// environment, never on the command line), with no profiles file.
fn ctl(app: &TestApp, user: &str) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new(procs::binary("secretsctl"));
    cmd.env_clear()
        .env("SECRETS_ADDR", &app.gateway_url)
        .env("SECRETS_TOKEN", app.token(user))
        .env("HOME", "/nonexistent");
    cmd
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut assert_cmd::Command) -> Run {
    let out = cmd.output().expect("secretsctl runs");
    Run {
        code: out.status.code().expect("an exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json_of(r: Run) -> serde_json::Value {
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

async fn stored(app: &TestApp, key: &str) -> Option<String> {
    let spark = app.as_service(Some(&format!("user:{OWNER}")));
    let items = spark.resolve(DOMAIN, vec![object_item("x", DOMAIN, key)]).await.unwrap();
    match &items[0].result {
        Some(pb::resolved_item::Result::Value(v)) => Some(String::from_utf8(v.clone()).unwrap()),
        _ => None,
    }
}

async fn save_job(app: &TestApp, id: &str, key: &str) {
    let request = pb::SaveWorkloadRequest {
        domain: DOMAIN.into(),
        id: id.into(),
        name: format!("job {id}"),
        payload: Some(pb::WorkloadPayload {
            kind: Some(Kind::SparkJob(pb::SparkJobPayload {
                template: Some(pb::EnvAndConf {
                    env_vars: [("DB".to_string(), object(DOMAIN, key))].into(),
                    spark_conf: Default::default(),
                }),
            })),
        }),
        validate_only: false,
    };
    let spark = app.as_service(Some(&format!("user:{OWNER}")));
    let saved = spark.gateway.clone().save_workload(request).await.unwrap().into_inner();
    assert!(saved.saved, "{:?}", saved.problems);
}

/// Create from stdin, a file (`@PATH` and --from-file), update, list as a
/// table and as JSON and YAML with the documented fields, delete refused
/// while in use (exit 4, naming the workload), then forced (printing it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_created_listed_updated_and_deleted_with_values_from_stdin_and_files() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value.txt");
    std::fs::write(&file, "from-a-file\n").unwrap();

    let r = run(ctl(&app, OWNER).args(["secret", "create", "db_password", "-d", DOMAIN, "-"]).write_stdin("s3cret\n"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("created secret db_password of domain finance"), "{}", r.stdout);
    assert_eq!(stored(&app, "db_password").await.as_deref(), Some("s3cret"), "one trailing newline dropped");
    let at = format!("@{}", file.display());
    let r = run(ctl(&app, OWNER).args(["secret", "create", "from_file", "-d", DOMAIN, &at]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(stored(&app, "from_file").await.as_deref(), Some("from-a-file\n"), "a file is taken as it is");
    let r = run(ctl(&app, OWNER).args(["secret", "update", "from_file", "-d", DOMAIN, "--from-file"]).arg(&file));
    assert_eq!(r.code, 0, "{}", r.stderr);

    save_job(&app, "etl", "db_password").await;
    let r = run(ctl(&app, OWNER)
        .args(["secret", "update", "db_password", "-d", DOMAIN, "-o", "json", "-"])
        .write_stdin("v2"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let json: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (json["key"].as_str(), json["scope"].as_str(), json["domain"].as_str()),
        (Some("db_password"), Some("domain"), Some(DOMAIN))
    );
    assert_eq!(json["reach"]["total"], 1);
    assert_eq!(json["reach"]["workloads"][0]["id"], "etl");
    assert!(json["updated_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(stored(&app, "db_password").await.as_deref(), Some("v2"));
    // A retry with the first call's --request-id answers its outcome again.
    let retry = || {
        let mut cmd = ctl(&app, OWNER);
        cmd.args(["secret", "update", "from_file", "-d", DOMAIN, "--request-id", "retry-1", "-o", "json", "-"]);
        cmd.write_stdin("once");
        json_of(run(&mut cmd))["updated_at"].as_str().unwrap().to_string()
    };
    let first = retry();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(retry(), first, "answered with the first outcome");

    let r = run(ctl(&app, OWNER).args(["secret", "list", "-d", DOMAIN]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("KEY"), "{}", r.stdout);
    assert!(r.stdout.contains("db_password") && r.stdout.contains("from_file"));
    let r = run(ctl(&app, LISTER).args(["secret", "list", "-d", DOMAIN, "-o", "yaml"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let yaml: serde_yaml::Value = serde_yaml::from_str(&r.stdout).unwrap();
    let keys: Vec<_> = yaml.as_sequence().unwrap().iter().map(|s| s["key"].as_str().unwrap().to_string()).collect();
    assert_eq!(keys, ["db_password", "from_file"]);
    for field in ["key", "scope", "domain", "created_at", "updated_at"] {
        assert!(yaml[0].get(field).is_some(), "{field} in {yaml:?}");
    }

    let r = run(ctl(&app, OWNER).args(["secret", "delete", "db_password", "-d", DOMAIN]));
    assert_eq!(r.code, 4, "in use: {} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("etl"), "the refusal names the workload: {}", r.stderr);
    assert_eq!(stored(&app, "db_password").await.as_deref(), Some("v2"), "nothing deleted");
    let r = run(ctl(&app, OWNER).args(["secret", "delete", "db_password", "-d", DOMAIN, "--force"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("1 saved workload(s) referenced it") && r.stdout.contains("etl"), "{}", r.stdout);
    assert_eq!(stored(&app, "db_password").await, None);
}

/// A value given as an argument is refused with a message saying how to
/// pass it, and repeated nowhere; nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_on_the_command_line_is_refused_and_repeated_nowhere() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    for args in [
        vec!["secret", "create", "api_key", "-d", DOMAIN, CANARY],
        vec!["secret", "update", "api_key", "-d", DOMAIN, CANARY],
    ] {
        let r = run(ctl(&app, OWNER).args(&args));
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("refused") && r.stderr.contains("stdin") && r.stderr.contains("@PATH"),
            "{}",
            r.stderr
        );
        assert!(!r.stdout.contains(CANARY) && !r.stderr.contains(CANARY), "the value is repeated");
    }
    assert!(app.as_user(OWNER).list(DOMAIN).await.unwrap().is_empty());
    assert!(!logs::captured().contains(CANARY), "the value reached a log");
}

/// While a create waits for its value on stdin, the value is in no
/// process's command line; once sent it is stored and printed nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_value_is_in_no_process_list_and_no_output() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    let mut child = std::process::Command::new(procs::binary("secretsctl"))
        .env_clear()
        .env("SECRETS_ADDR", &app.gateway_url)
        .env("SECRETS_TOKEN", app.token(OWNER))
        .env("HOME", "/nonexistent")
        .args(["secret", "create", "api_key", "-d", DOMAIN, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(CANARY.as_bytes()).unwrap();
    // Still running (stdin open): every command line on the machine.
    let mut seen = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            seen += 1;
            assert!(!String::from_utf8_lossy(&cmdline).contains(CANARY), "in a process list: {:?}", entry.path());
        }
    }
    assert!(seen > 1);
    assert!(child.try_wait().unwrap().is_none(), "it waits for the value");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!printed.contains(CANARY), "{printed}");
    assert_eq!(stored(&app, "api_key").await.as_deref(), Some(CANARY));
    assert!(!logs::captured().contains(CANARY), "the value reached a log");
}

/// One exit code per class, each with the server's message on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_class_of_failure_has_its_exit_code() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    app.as_user(OWNER).create(DOMAIN, "exists", "v").await.unwrap();
    let create = |user: &str, key: &str| {
        let mut cmd = ctl(&app, user);
        cmd.args(["secret", "create", key, "-d", DOMAIN, "-"]).write_stdin("v");
        cmd
    };
    // 1: usage (no scope given).
    let r = run(ctl(&app, OWNER).args(["secret", "list"]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    // 2: unauthenticated, and permission denied.
    let r = run(create(OWNER, "k").env("SECRETS_TOKEN", "not-a-token"));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("unauthenticated"), "{}", r.stderr);
    let r = run(&mut create(LISTER, "k"));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("permission denied"), "{}", r.stderr);
    // 3: not found.
    let r = run(ctl(&app, OWNER).args(["secret", "update", "missing", "-d", DOMAIN, "-"]).write_stdin("v"));
    assert_eq!(r.code, 3, "{}", r.stderr);
    // 4: exists.
    let r = run(&mut create(OWNER, "exists"));
    assert_eq!(r.code, 4, "{}", r.stderr);
    // 5: unavailable (nothing listens there).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let r = run(create(OWNER, "k").env("SECRETS_ADDR", format!("http://{closed}")));
    assert_eq!(r.code, 5, "{}", r.stderr);
    // 6: another refusal by the server, with its field violation.
    let r = run(&mut create(OWNER, "bad/key"));
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("key:") && r.stderr.contains("letters, digits"), "{}", r.stderr);
}

/// A profiles file or token file others can read is refused, saying
/// `chmod 600`; once private, the profile connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profiles_or_token_file_others_can_read_is_refused() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, token) = (dir.path().join("config.toml"), dir.path().join("owner.token"));
    std::fs::write(&token, format!("{}\n", app.token(OWNER))).unwrap();
    std::fs::write(
        &config,
        format!(
            "current = \"test\"\n[profiles.test]\naddr = \"{}\"\ntoken_file = \"{}\"\n",
            app.gateway_url,
            token.display()
        ),
    )
    .unwrap();
    let mode =
        |path: &std::path::Path, mode| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    let list = || {
        let mut cmd = assert_cmd::Command::new(procs::binary("secretsctl"));
        cmd.env_clear()
            .env("HOME", "/nonexistent")
            .env("SECRETSCTL_CONFIG", &config)
            .args(["secret", "list", "-d", DOMAIN]);
        cmd
    };
    mode(&config, 0o644);
    mode(&token, 0o600);
    let r = run(&mut list());
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("chmod 600") && r.stderr.contains("config.toml"), "{}", r.stderr);
    mode(&config, 0o600);
    mode(&token, 0o640);
    let r = run(&mut list());
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("chmod 600") && r.stderr.contains("owner.token"), "{}", r.stderr);
    mode(&token, 0o600);
    let r = run(&mut list());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(list().arg("--profile").arg("nope"));
    assert!(r.code == 1 && r.stderr.contains("no profile \"nope\""), "{}", r.stderr);
}

/// `check` prints the decision and its reason, as text and as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_the_decision_and_the_reason() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    let r = run(ctl(&app, ADMIN).args(["check", &format!("user:{MANAGER}"), "manage-secrets", "-d", DOMAIN]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("allowed: user:max MANAGE_SECRETS: "), "{}", r.stdout);
    let r =
        run(ctl(&app, ADMIN).args(["check", &format!("user:{LISTER}"), "manage-secrets", "-d", DOMAIN, "-o", "json"]));
    let json: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(json["allowed"], false);
    assert!(!json["reason"].as_str().unwrap().is_empty());
}

/// Completions for bash, zsh and fish name the subcommands; the help of the
/// tool and of each subcommand has examples and the exit codes.
#[test]
fn completions_generate_and_every_help_has_examples() {
    for shell in ["bash", "zsh", "fish"] {
        let out = assert_cmd::Command::new(procs::binary("secretsctl")).args(["completion", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains("secretsctl") && script.contains("secret") && script.contains("check"), "{shell}");
    }
    let help = assert_cmd::Command::new(procs::binary("secretsctl")).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("Examples:") && help.contains("Exit codes: 0 ok"), "{help}");
    for sub in [
        &["secret"][..],
        &["member"],
        &["permission"],
        &["admin"],
        &["group"],
        &["bundle"],
        &["vault"],
        &["workload"],
        &["audit"],
        &["member", "add"],
        &["member", "list"],
        &["member", "remove"],
        &["permission", "grant"],
        &["permission", "revoke"],
        &["admin", "list"],
        &["admin", "grant"],
        &["admin", "revoke"],
        &["group", "list"],
        &["group", "create"],
        &["group", "delete"],
        &["group", "add-member"],
        &["group", "remove-member"],
        &["bundle", "list"],
        &["bundle", "get"],
        &["bundle", "create"],
        &["bundle", "update"],
        &["bundle", "delete"],
        &["bundle", "grant"],
        &["bundle", "revoke"],
        &["vault", "list"],
        &["vault", "get"],
        &["vault", "keys"],
        &["vault", "test"],
        &["vault", "create"],
        &["vault", "update"],
        &["vault", "delete"],
        &["secret", "create"],
        &["secret", "update"],
        &["secret", "list"],
        &["secret", "delete"],
        &["secret", "usages"],
        &["secret", "selectable"],
        &["check"],
        &["vault", "usages"],
        &["workload", "validate"],
        &["workload", "save"],
        &["workload", "references"],
        &["workload", "delete"],
        &["resolve"],
        &["watch"],
        &["migrate"],
        &["migrate", "plan"],
        &["migrate", "apply"],
        &["migrate", "status"],
        &["audit", "query"],
        &["audit", "last-access"],
        &["completion"],
    ] {
        let out = assert_cmd::Command::new(procs::binary("secretsctl")).args(sub).arg("--help").output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8(out.stdout).unwrap().contains("Examples:"), "{sub:?}");
    }
}

/// Members, permissions, platform admins, groups and bundles: each command
/// does what it says, as the next `check` shows, with the documented JSON
/// fields; a refusal (a non-admin creating a group) exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_is_managed_with_members_permissions_admins_groups_and_bundles() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    let json = |r: Run| -> serde_json::Value {
        assert_eq!(r.code, 0, "{}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
    };
    let check = |subject: &str, permission: &str, extra: &[&str]| {
        let mut cmd = ctl(&app, ADMIN);
        cmd.args(["check", subject, permission, "-o", "json"]).args(extra);
        json(run(&mut cmd))["allowed"].as_bool().unwrap()
    };
    let member = json(run(ctl(&app, OWNER).args(["member", "add", "user:bob", "-d", DOMAIN, "-o", "json"])));
    assert_eq!((member[0]["subject"].as_str(), member[0]["role"].as_str()), (Some("user:bob"), Some("MEMBER")));
    assert!(!check("user:bob", "list-secrets", &["-d", DOMAIN]));
    let granted = json(run(ctl(&app, OWNER).args([
        "permission",
        "grant",
        "user:bob",
        "list-secrets",
        "-d",
        DOMAIN,
        "-o",
        "json",
    ])));
    assert_eq!(granted[0]["permissions"], serde_json::json!(["LIST_SECRETS"]));
    assert!(check("user:bob", "list-secrets", &["-d", DOMAIN]));
    let listed = run(ctl(&app, OWNER).args(["member", "list", "-d", DOMAIN]));
    assert!(
        listed.stdout.lines().any(|l| l.starts_with("user:bob") && l.contains("LIST_SECRETS")),
        "{}",
        listed.stdout
    );
    run(ctl(&app, OWNER).args(["permission", "revoke", "user:bob", "list-secrets", "-d", DOMAIN]));
    assert!(!check("user:bob", "list-secrets", &["-d", DOMAIN]));
    let removed = run(ctl(&app, OWNER).args(["member", "remove", "user:bob", "-d", DOMAIN]));
    assert!(removed.code == 0 && removed.stdout.contains("removed user:bob from domain finance"), "{}", removed.stderr);

    assert!(!check("user:carol", "platform-admin", &[]));
    run(ctl(&app, ADMIN).args(["admin", "grant", "user:carol"]));
    assert!(check("user:carol", "platform-admin", &[]));
    let admins = json(run(ctl(&app, ADMIN).args(["admin", "list", "-o", "json"])));
    let carol = admins.as_array().unwrap().iter().find(|a| a["subject"] == "user:carol").expect("carol listed");
    assert_eq!(carol["from_configuration"], false);
    run(ctl(&app, ADMIN).args(["admin", "revoke", "user:carol"]));
    assert!(!check("user:carol", "platform-admin", &[]));

    let r = run(ctl(&app, OWNER).args(["group", "create", "analysts"]));
    assert_eq!(r.code, 2, "only platform admins create groups: {}", r.stderr);
    run(ctl(&app, ADMIN).args(["group", "create", "analysts", "--description", "finance analysts"]));
    let group = json(run(ctl(&app, ADMIN).args(["group", "add-member", "analysts", "user:dave", "-o", "json"])));
    assert_eq!((group[0]["name"].as_str(), group[0]["members"][0].as_str()), (Some("analysts"), Some("user:dave")));
    let bundle = json(run(ctl(&app, ADMIN).args([
        "bundle",
        "create",
        "analysts-vault",
        "--owner",
        "user:olivia",
        "-o",
        "json",
    ])));
    assert_eq!(bundle[0]["owner"], "user:olivia");
    run(ctl(&app, OWNER).args(["bundle", "grant", "analysts-vault", "group:analysts", "use"]));
    assert!(check("user:dave", "use", &["--bundle", "analysts-vault"]), "through the group");
    let got = json(run(ctl(&app, OWNER).args(["bundle", "get", "analysts-vault", "-o", "json"])));
    assert_eq!(got[0]["grants"], serde_json::json!([{"subject": "group:analysts", "permission": "USE"}]));
    assert_eq!(got[0]["resources"], serde_json::json!([]));
    let updated =
        json(run(ctl(&app, OWNER).args(["bundle", "update", "analysts-vault", "--description", "d", "-o", "json"])));
    assert_eq!(updated[0]["description"], "d");
    run(ctl(&app, ADMIN).args(["group", "remove-member", "analysts", "user:dave"]));
    assert!(!check("user:dave", "use", &["--bundle", "analysts-vault"]));
    run(ctl(&app, OWNER).args(["bundle", "revoke", "analysts-vault", "group:analysts", "use"]));
    assert_eq!(run(ctl(&app, ADMIN).args(["bundle", "delete", "analysts-vault"])).code, 0);
    assert_eq!(run(ctl(&app, ADMIN).args(["group", "delete", "analysts"])).code, 0);
    let r = run(ctl(&app, ADMIN).args(["bundle", "get", "analysts-vault"]));
    assert_eq!(r.code, 3, "{}", r.stderr);
    let groups = json(run(ctl(&app, ADMIN).args(["group", "list", "-o", "json"])));
    assert!(groups.as_array().unwrap().iter().all(|g| g["name"] != "analysts"));
}

/// Vault configs with secretsctl against a real OpenBao: created with the
/// token on stdin (in no output), tested (CONNECTION_OK, exit 0), keys
/// listed, shown without credentials, pointed at a missing secret
/// (SECRET_NOT_FOUND, exit 3), given a bad token from a file
/// (INVALID_CREDENTIALS, exit 2), listed and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_configs_are_created_tested_listed_and_deleted_with_credentials_never_shown() {
    let bao = integration_tests::openbao::OpenBao::start();
    bao.bao(&["kv", "put", "secret/production", "db_password=from-vault", "api_key=k"]);
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    assert_eq!(
        run(ctl(&app, ADMIN).args(["bundle", "create", "finance-vault", "--owner", &format!("user:{OWNER}")])).code,
        0
    );
    let path = "/v1/secret/data/production";
    let r = run(ctl(&app, OWNER)
        .args([
            "vault",
            "create",
            "prod",
            "-d",
            DOMAIN,
            "--bundle",
            "finance-vault",
            "--host",
            &bao.addr,
            "--path",
            path,
        ])
        .args(["--auth", "token", "-", "-o", "json"])
        .write_stdin(format!("{}\n", bao.root_token)));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let created: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let id = created[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        (created[0]["auth_method"].as_str(), created[0]["credentials_set"].as_bool()),
        (Some("TOKEN"), Some(true))
    );
    let mut printed = r.stdout + &r.stderr;

    let r = run(ctl(&app, OWNER).args(["vault", "test", &id]));
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with("CONNECTION_OK") && r.stdout.contains("2 key(s)"), "{}", r.stdout);
    printed += &r.stdout;
    let r = run(ctl(&app, OWNER).args(["vault", "keys", &id]));
    let mut keys: Vec<_> = r.stdout.lines().collect();
    keys.sort();
    assert_eq!(keys, ["api_key", "db_password"], "{}", r.stderr);
    let r = run(ctl(&app, OWNER).args(["vault", "get", &id, "-o", "yaml"]));
    assert!(r.code == 0 && r.stdout.contains("name: prod"), "{}", r.stderr);
    printed += &r.stdout;

    let r = run(ctl(&app, OWNER).args(["vault", "update", &id, "--path", "/v1/secret/data/missing"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(ctl(&app, OWNER).args(["vault", "test", &id, "-o", "json"]));
    assert_eq!(r.code, 3, "{}", r.stdout);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()["outcome"], "SECRET_NOT_FOUND");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.token");
    std::fs::write(&bad, "not-the-token").unwrap();
    let at = format!("@{}", bad.display());
    let r = run(ctl(&app, OWNER).args(["vault", "update", &id, "--path", path, "--auth", "token", &at]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(ctl(&app, OWNER).args(["vault", "test", &id]));
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(r.stdout.starts_with("INVALID_CREDENTIALS"), "{}", r.stdout);
    // A credential file's trailing newline is not part of the token.
    let good = dir.path().join("good.token");
    std::fs::write(&good, format!("{}\n", bao.root_token)).unwrap();
    let r = run(ctl(&app, OWNER).args(["vault", "update", &id, "--auth", "token", "--credentials-file"]).arg(&good));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(ctl(&app, OWNER).args(["vault", "test", &id]));
    assert_eq!(r.code, 0, "{}", r.stdout);
    // A credential given as an argument is refused like a value.
    let r = run(ctl(&app, OWNER).args(["vault", "update", &id, "--auth", "token", &bao.root_token]));
    assert_eq!(r.code, 1);
    printed += &r.stdout;
    printed += &r.stderr;

    let r = run(ctl(&app, OWNER).args(["vault", "list", "-d", DOMAIN]));
    assert!(r.stdout.lines().any(|l| l.starts_with(&id) && l.contains("prod")), "{}", r.stdout);
    assert_eq!(run(ctl(&app, OWNER).args(["vault", "delete", &id])).code, 0);
    assert_eq!(run(ctl(&app, OWNER).args(["vault", "get", &id])).code, 3);
    assert!(!printed.contains(&bao.root_token), "the token was printed");
    assert!(!logs::captured().contains(&bao.root_token), "the token reached a log");
}

/// A profiles file with a relative token path, beside the environment:
/// the address and the token always come from one place (`--profile` wins
/// over the environment; the environment's address never gets the
/// profile's token); TLS files with an http address, and a token over plain
/// http to another machine, are refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_and_the_token_come_from_one_place_and_never_travel_in_clear_text() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, token) = (dir.path().join("config.toml"), dir.path().join("owner.token"));
    std::fs::write(&token, format!("{}\n", app.token(OWNER))).unwrap();
    let profile =
        format!("current = \"test\"\n[profiles.test]\naddr = \"{}\"\ntoken_file = \"owner.token\"\n", app.gateway_url);
    std::fs::write(&config, profile).unwrap();
    for path in [&config, &token] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let list = || {
        let mut cmd = assert_cmd::Command::new(procs::binary("secretsctl"));
        cmd.env_clear().env("HOME", "/nonexistent").env("SECRETSCTL_CONFIG", &config).current_dir("/");
        cmd.args(["secret", "list", "-d", DOMAIN]);
        cmd
    };
    let r = run(&mut list());
    assert_eq!(r.code, 0, "a token_file relative to the profiles file: {}", r.stderr);

    // The environment names the address: the profile's token is not sent there.
    let r = run(list().env("SECRETS_ADDR", &app.gateway_url));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("unauthenticated"), "{}", r.stderr);
    // --profile wins over the environment, address and token together.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let r = run(list()
        .env("SECRETS_ADDR", format!("http://{closed}"))
        .env("SECRETS_TOKEN", "not-a-token")
        .args(["--profile", "test"]));
    assert_eq!(r.code, 0, "{}", r.stderr);

    // --addr elsewhere than the profile's: its token is not sent there.
    let elsewhere = format!("http://{closed}");
    let r = run(list().args(["--addr", &elsewhere]));
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not the profile's address") && r.stderr.contains("--token-file"), "{}", r.stderr);
    let r = run(list().args(["--addr", &elsewhere, "--token-file"]).arg(&token));
    assert_eq!(r.code, 5, "with its own token it is sent (and nobody answers there): {}", r.stderr);

    // TLS files with plain http would be ignored: refused.
    let r = run(list().args(["--ca-file", "/etc/hostname"]));
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("plain http") && r.stderr.contains("https://"), "{}", r.stderr);
    // A token over plain http to another machine: refused unless --insecure.
    let remote = "http://192.0.2.1:50051";
    let r = run(list().args(["--addr", remote, "--token-file"]).arg(&token));
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("clear text") && r.stderr.contains("--insecure"), "{}", r.stderr);
    let r = run(list().args(["--addr", remote, "--insecure", "--timeout", "1", "--token-file"]).arg(&token));
    assert_eq!(r.code, 5, "sent, and nobody answers there: {}", r.stderr);

    // A token file of another user is refused (the check needs root to chown).
    if std::process::Command::new("chown").arg("65534").arg(&token).status().is_ok_and(|s| s.success()) {
        let r = run(&mut list());
        assert_eq!(r.code, 1);
        assert!(r.stderr.contains("belongs to another user"), "{}", r.stderr);
    }
}

/// What is typed in a wrong place is never repeated (it may be a value:
/// `-s3cret` or an `@` name), a typo'd flag still gets its suggestion, and
/// a reader that closes the pipe early ends the program quietly.
#[test]
fn mistyped_arguments_are_not_repeated_and_a_closed_pipe_is_no_failure() {
    let ctl = || {
        let mut cmd = assert_cmd::Command::new(procs::binary("secretsctl"));
        cmd.env_clear().env("HOME", "/nonexistent");
        cmd
    };
    let dash = format!("-{CANARY}");
    let at = format!("@{CANARY}");
    for args in [
        vec!["secret", "create", "k", "-d", DOMAIN, dash.as_str()],
        vec!["secret", "create", "k", "-d", DOMAIN, "-", CANARY],
        vec!["secret", "create", "k", "-d", DOMAIN, at.as_str()],
        vec!["vault", "update", "id", "--auth", "token", dash.as_str()],
        vec![CANARY],
    ] {
        let r = run(ctl().args(&args));
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        assert!(!r.stderr.contains(CANARY) && !r.stdout.contains(CANARY), "{args:?} repeated: {}", r.stderr);
    }
    let r = run(ctl().args(["secret", "list", "-d", DOMAIN, "--ouptut", "json"]));
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("did you mean --output"), "{}", r.stderr);

    let mut child = std::process::Command::new(procs::binary("secretsctl"))
        .args(["completion", "zsh"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// On a terminal the value is asked for twice with echo off, with or
/// without `-`; two different answers send nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_masked_prompt_asks_twice_and_echoes_nothing() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    let (url, token) = (app.gateway_url.clone(), app.token(OWNER).to_string());
    let prompt = move |key: &str, dash: bool, second: &str| {
        let mut cmd = std::process::Command::new(procs::binary("secretsctl"));
        cmd.env_clear().env("SECRETS_ADDR", &url).env("SECRETS_TOKEN", &token).env("HOME", "/nonexistent");
        cmd.args(["secret", "create", key, "-d", DOMAIN]);
        if dash {
            cmd.arg("-");
        }
        let mut p = expectrl::Session::spawn(cmd).unwrap();
        p.set_expect_timeout(Some(std::time::Duration::from_secs(60)));
        let mut seen = String::new();
        // The prompt is printed before echo goes off: each answer waits
        // for the terminal to stop echoing, as a person's typing would.
        let echo_off = |p: &expectrl::Session| {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while p.get_process().get_echo().unwrap() {
                assert!(std::time::Instant::now() < deadline, "echo never went off");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let asked = p.expect(format!("Value for {key}: ").as_str()).unwrap();
        seen.push_str(&String::from_utf8_lossy(asked.before()));
        echo_off(&p);
        p.send_line(CANARY).unwrap();
        let again = p.expect("Again, to confirm: ").unwrap();
        seen.push_str(&String::from_utf8_lossy(again.before()));
        echo_off(&p);
        p.send_line(second).unwrap();
        // Everything printed up to the end: Eof matches all of it.
        let rest = p.expect(expectrl::Eof).unwrap();
        seen.push_str(&String::from_utf8_lossy(rest.as_bytes()));
        seen
    };
    let p = prompt.clone();
    let seen = tokio::task::spawn_blocking(move || p("prompted", false, CANARY)).await.unwrap();
    assert!(seen.contains("created secret prompted"), "{seen}");
    assert!(!seen.contains(CANARY), "echoed: {seen}");
    assert_eq!(stored(&app, "prompted").await.as_deref(), Some(CANARY));

    let p = prompt.clone();
    let seen = tokio::task::spawn_blocking(move || p("dashed", true, CANARY)).await.unwrap();
    assert!(seen.contains("created secret dashed") && !seen.contains(CANARY), "`-` on a terminal prompts: {seen}");

    let seen = tokio::task::spawn_blocking(move || prompt("differs", false, "something-else")).await.unwrap();
    assert!(seen.contains("the two values differ") && !seen.contains(CANARY), "{seen}");
    assert_eq!(stored(&app, "differs").await, None, "nothing was sent");
}

/// Workloads: a payload file validated (problems per field path, exit 4),
/// saved by a platform service for a user, its references and the secret's
/// usages listed, resolved (values only with --reveal, and only for
/// platform services), deleted; a mistake in the file names its field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_are_validated_saved_resolved_and_deleted() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    app.as_user(OWNER).create(DOMAIN, "db_password", CANARY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("nightly.json");
    let draft = r#"{"sparkJob": {"template": {"envVars": {
        "DB": {"secretObject": {"key": "db_password", "source": {"type": "KUBERNETES", "id": "finance"}}},
        "TOKEN": "${secrets.no_such_key}"}}}}"#;
    std::fs::write(&job, draft).unwrap();
    let json = |r: &Run| -> serde_json::Value {
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {} {}", r.stdout, r.stderr))
    };
    let platform = || {
        let mut cmd = ctl(&app, SPARK);
        cmd.args(["--on-behalf-of", &format!("user:{OWNER}")]);
        cmd
    };

    let r = run(ctl(&app, OWNER).args(["workload", "validate", "-d", DOMAIN, "-f"]).arg(&job));
    assert_eq!(r.code, 4, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.lines().any(|l| l.starts_with(r#"template.envVars["TOKEN"]"#) && l.contains("not-found")),
        "{}",
        r.stdout
    );
    let r = run(ctl(&app, OWNER).args(["workload", "validate", "-d", DOMAIN, "-o", "json", "-f"]).arg(&job));
    let v = json(&r);
    assert_eq!((v["saved"].as_bool(), v["id"].as_str()), (Some(false), Some("nightly")));
    assert_eq!(v["problems"][0]["type"], "not-found");
    assert_eq!(v["kind"], "WORKLOAD_KIND_SPARK_JOB");

    std::fs::write(
        &job,
        draft
            .replace(r#","TOKEN": "${secrets.no_such_key}""#, "")
            .replace(",\n        \"TOKEN\": \"${secrets.no_such_key}\"", ""),
    )
    .unwrap();
    let r = run(ctl(&app, OWNER).args(["workload", "validate", "-d", DOMAIN, "-f"]).arg(&job));
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("1 reference(s), no problem"), "{}", r.stdout);
    let r = run(ctl(&app, OWNER).args(["workload", "save", "-d", DOMAIN, "--id", "nightly", "-f"]).arg(&job));
    assert_eq!(r.code, 2, "a user may only validate: {}", r.stderr);
    let r = run(platform()
        .args(["workload", "save", "-d", DOMAIN, "--id", "nightly", "--name", "Nightly", "-f"])
        .arg(&job));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("saved finance WORKLOAD_KIND_SPARK_JOB nightly"), "{}", r.stdout);

    let r = run(platform().args(["workload", "references", "spark-job", "nightly", "-d", DOMAIN, "-o", "json"]));
    let v = json(&r);
    assert_eq!(v["references"][0]["field"], r#"template.envVars["DB"]"#);
    assert_eq!((v["owner"].as_str(), v["saved_by"].as_str()), (Some("service:spark"), Some("user:olivia")));
    let r = run(ctl(&app, OWNER).args(["secret", "usages", "db_password", "-d", DOMAIN, "-o", "json"]));
    let v = json(&r);
    assert_eq!((v["total"].as_u64(), v["usages"][0]["workload"]["id"].as_str()), (Some(1), Some("nightly")));

    let r = run(platform().args(["resolve", "-d", DOMAIN, "db_password"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("db_password: resolved (value not shown") && !r.stdout.contains(CANARY), "{}", r.stdout);
    let r = run(platform().args(["resolve", "-d", DOMAIN, "db_password", "missing", "--reveal"]));
    assert_eq!(r.code, 4, "one item did not resolve: {}", r.stdout);
    assert!(
        r.stdout.contains(&format!("db_password: {CANARY}")) && r.stdout.contains("missing: error:"),
        "{}",
        r.stdout
    );
    let r = run(platform().args(["resolve", "-d", DOMAIN, "--reveal", "-o", "json", "-f"]).arg(&job));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(json(&r)["payload"]["sparkJob"]["template"]["envVars"]["DB"]["text"], CANARY);
    let text = "postgres://etl:${secrets.db_password}@db";
    let r = run(platform().args(["resolve", "-d", DOMAIN, "--text", text, "--reveal", "-o", "json"]));
    assert_eq!(json(&r)[0]["value"], format!("postgres://etl:{CANARY}@db"));
    let r = run(platform().args(["secret", "selectable", "-d", DOMAIN, "-o", "json"]));
    let picked = json(&r)["secrets"].as_array().unwrap().iter().find(|s| s["key"] == "db_password").cloned();
    let picked = picked.unwrap_or_else(|| panic!("db_password selectable: {}", r.stdout));
    assert_eq!(
        (picked["label"].as_str(), picked["placeholder"].as_str()),
        (Some(DOMAIN), Some("${secrets.db_password}"))
    );
    let r = run(ctl(&app, OWNER).args(["resolve", "-d", DOMAIN, "db_password", "--reveal"]));
    assert_eq!(r.code, 2, "values only for platform services: {}", r.stderr);
    assert!(!r.stdout.contains(CANARY));

    let r = run(platform().args(["workload", "delete", "spark-job", "nightly", "-d", DOMAIN]));
    assert!(r.code == 0 && r.stdout.contains("removed finance WORKLOAD_KIND_SPARK_JOB nightly"), "{}", r.stderr);
    let r = run(ctl(&app, OWNER).args(["secret", "usages", "db_password", "-d", DOMAIN, "-o", "json"]));
    assert_eq!(json(&r)["total"], 0);

    std::fs::write(&job, r#"{"sparkJob": {"template": {"envVars": {"PW": 42}}}}"#).unwrap();
    let r = run(ctl(&app, OWNER).args(["workload", "validate", "-d", DOMAIN, "-f"]).arg(&job));
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains(r#"sparkJob.template.envVars["PW"]: expected a string"#), "{}", r.stderr);
    assert!(!logs::captured().contains(CANARY), "the value reached a log");
}

/// `watch` prints each change once, in order, as JSON lines or text, and
/// when its gateway goes away it reconnects after the last cursor: a change
/// made meanwhile arrives once the gateway is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_the_feed_and_resumes_after_its_cursor_when_the_gateway_returns() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    let owner = app.as_user(OWNER);
    let start = owner.create(DOMAIN, "k0", "v").await.unwrap().reach.unwrap().revision;
    let gateway = app.another_gateway_on(0, |_| {}).await;
    let port = gateway.port;
    let mut child = std::process::Command::new(procs::binary("secretsctl"))
        .env_clear()
        .env("SECRETS_ADDR", format!("http://127.0.0.1:{port}"))
        .env("SECRETS_TOKEN", app.token(SPARK))
        .env("HOME", "/nonexistent")
        .args(["watch", "-d", DOMAIN, "--after", &start.to_string(), "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str::<serde_json::Value>(&line).expect("a JSON line"));
        }
    });
    let one = owner.update(DOMAIN, "k0", "v1").await.unwrap().reach.unwrap().revision;
    let m = next_change(&mut rx).await;
    assert_eq!((m["change"]["key"].as_str(), m["change"]["revision"].as_u64()), (Some("k0"), Some(one)));
    assert_eq!((m["change"]["kind"].as_str(), m["change"]["origin"].as_str()), (Some("updated"), Some("api")));
    assert_eq!(m["cursor"].as_u64(), Some(one));

    gateway.stop().await;
    let two = owner.update(DOMAIN, "k0", "v2").await.unwrap().reach.unwrap().revision;
    let three = owner.create(DOMAIN, "k1", "v").await.unwrap().reach.unwrap().revision;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let gateway = app.another_gateway_on(port, |_| {}).await;
    let m = next_change(&mut rx).await;
    assert_eq!(m["change"]["revision"].as_u64(), Some(two), "nothing missed, nothing repeated: {m}");
    let m = next_change(&mut rx).await;
    assert_eq!((m["change"]["revision"].as_u64(), m["change"]["kind"].as_str()), (Some(three), Some("created")));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reconnecting") && stderr.contains(&format!("after cursor {one}")), "{stderr}");

    // Text, up to where the feed stands.
    let r = run(ctl(&app, SPARK).env("SECRETS_ADDR", format!("http://127.0.0.1:{port}")).args([
        "watch",
        "-d",
        DOMAIN,
        "--after",
        &start.to_string(),
        "--until-caught-up",
    ]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines[0].starts_with(&format!("#{one} updated api k0 (domain finance) by user:olivia")), "{}", r.stdout);
    assert!(lines.last().unwrap().starts_with(&format!("-- caught up at {three}")), "{}", r.stdout);
    // --count stops after that many changes; --max-time gives up (exit 5).
    let r = run(ctl(&app, SPARK).args(["watch", "-d", DOMAIN, "--after", &start.to_string(), "--count", "2"]));
    assert_eq!((r.code, r.stdout.lines().filter(|l| l.starts_with('#')).count()), (0, 2), "{}", r.stdout);
    let r = run(ctl(&app, SPARK)
        .args(["watch", "-d", DOMAIN, "--after", &three.to_string(), "--count", "1"])
        .args(["--max-time", "2"]));
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(r.stderr.contains("fewer changes than --count") && r.stdout.contains("caught up"), "{}", r.stderr);
    let r = run(ctl(&app, STRANGER).args(["watch", "-d", DOMAIN]));
    assert_eq!(r.code, 2, "a refusal ends the watch: {}", r.stderr);
    gateway.stop().await;
}

/// The next `change` event a `watch -o json` printed.
async fn next_change(rx: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>) -> serde_json::Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(90), rx.recv()).await.expect("an event").expect("open");
        if m.get("change").is_some() {
            return m;
        }
    }
}

/// The audit trail with secretsctl: who resolved a secret, for whom, and
/// when each secret was last resolved; never a value. Domain owners query
/// their domain only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_queries_say_who_received_which_secret_and_never_its_value() {
    let app = TestApp::spawn().await;
    app.setup_domain(DOMAIN).await;
    app.as_user(OWNER).create(DOMAIN, "api_token", CANARY).await.unwrap();
    assert_eq!(stored(&app, "api_token").await.as_deref(), Some(CANARY));
    let json = |r: Run| -> serde_json::Value {
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(!r.stdout.contains(CANARY), "a value in the trail: {}", r.stdout);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
    };
    let records = json(run(ctl(&app, OWNER).args([
        "audit",
        "query",
        "-d",
        DOMAIN,
        "--key",
        "api_token",
        "--since",
        "1h",
        "-o",
        "json",
    ])));
    let records = records.as_array().unwrap();
    let resolved =
        records.iter().find(|r| r["rpc"] == "ResolveSecrets").unwrap_or_else(|| panic!("no resolve in {records:?}"));
    assert_eq!(
        (resolved["principal"].as_str(), resolved["caller"].as_str()),
        (Some("user:olivia"), Some("service:spark"))
    );
    assert_eq!(
        (resolved["decision"].as_str(), resolved["references"][0]["key"].as_str()),
        (Some("allowed"), Some("api_token"))
    );
    assert!(records.iter().any(|r| r["rpc"] == "CreateSecret"), "{records:?}");
    let only =
        json(run(ctl(&app, ADMIN).args(["audit", "query", "--rpc", "CreateSecret", "--limit", "1", "-o", "json"])));
    assert_eq!(only.as_array().unwrap().len(), 1);
    let last = json(run(ctl(&app, OWNER).args(["audit", "last-access", "-d", DOMAIN, "-o", "json"])));
    let entry = last.as_array().unwrap().iter().find(|s| s["key"] == "api_token").expect("api_token listed");
    assert_eq!((entry["principal"].as_str(), entry["source"].as_str()), (Some("user:olivia"), Some("kubernetes")));
    let r = run(ctl(&app, OWNER).args(["audit", "query"]));
    assert_eq!(r.code, 2, "every domain is for platform admins: {}", r.stderr);
    for since in ["5x", "100000000000000d"] {
        let r = run(ctl(&app, OWNER).args(["audit", "query", "-d", DOMAIN, "--since", since]));
        assert!(r.code == 1 && r.stderr.contains("90s, 15m, 2h or 7d"), "{since}: {}", r.stderr);
    }
    let r = run(ctl(&app, OWNER).args(["audit", "query", "-d", DOMAIN, "--since", "100000000d"]));
    assert!(r.code == 1 && r.stderr.contains("--since reaches back"), "{}", r.stderr);
}
