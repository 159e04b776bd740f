//! Operators debug with grpcurl and no proto files: reflection must list and
//! describe everything the gateway serves, and calls must work.

use std::process::Command;

use integration_tests::{procs::grpcurl, *};

fn run(args: &[&str]) -> String {
    let output = Command::new(grpcurl()).args(args).output().expect("run grpcurl");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "grpcurl {args:?} failed: {}{stdout}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_describes_the_gateway_and_creates_and_resolves_a_secret() {
    let app = TestApp::spawn().await;
    let addr = app.gateway_url.trim_start_matches("http://").to_string();
    let admin = format!("authorization: Bearer {}", app.token(ADMIN));
    let service = format!("authorization: Bearer {}", app.token(SPARK));

    let listed = tokio::task::block_in_place(|| run(&["-plaintext", &addr, "list"]));
    let services: Vec<&str> = listed.lines().collect();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "iomete.secrets.v1.AuthzService",
            "iomete.secrets.v1.Gateway",
            "iomete.secrets.v1.SecretService",
            "iomete.secrets.v1.VaultConfigService"
        ],
        "the internal SecretReader is not exposed"
    );
    let internal = tokio::task::block_in_place(|| {
        Command::new(grpcurl())
            .args(["-plaintext", &addr, "describe", "iomete.secrets.internal.v1.SecretReader"])
            .output()
            .expect("run grpcurl")
    });
    assert!(!internal.status.success(), "the gateway describes the internal SecretReader");
    let described =
        tokio::task::block_in_place(|| run(&["-plaintext", &addr, "describe", "iomete.secrets.v1.Gateway"]));
    assert!(described.contains("rpc ResolveSecrets"), "{described}");
    let described = tokio::task::block_in_place(|| {
        run(&["-plaintext", &addr, "describe", "iomete.secrets.v1.CreateSecretRequest"])
    });
    assert!(described.contains(".iomete.secrets.v1.SecretValue value = 4"), "{described}");

    let created = tokio::task::block_in_place(|| {
        run(&[
            "-plaintext",
            "-H",
            &admin,
            "-d",
            r#"{"scope":"SCOPE_DOMAIN","domain":"finance","key":"db_password","value":{"text":"from-grpcurl"}}"#,
            &addr,
            "iomete.secrets.v1.SecretService/CreateSecret",
        ])
    });
    assert!(created.contains(r#""key": "db_password""#), "{created}");
    let resolved = tokio::task::block_in_place(|| {
        run(&[
            "-plaintext",
            "-H",
            &service,
            "-H",
            "x-on-behalf-of: user:admin",
            "-d",
            r#"{"domain":"finance","items":[{"id":"envVars.DB","text":"pw=${secrets.db_password}"}]}"#,
            &addr,
            "iomete.secrets.v1.Gateway/ResolveSecrets",
        ])
    });
    assert!(resolved.contains(r#""text": "pw=from-grpcurl""#), "{resolved}");

    // A refused call shows the code and the decoded field violation.
    let output = tokio::task::block_in_place(|| {
        Command::new(grpcurl())
            .args([
                "-plaintext",
                "-H",
                &admin,
                "-d",
                r#"{"scope":"SCOPE_DOMAIN","domain":"finance","key":"bad key","value":{"text":"x"}}"#,
                &addr,
                "iomete.secrets.v1.SecretService/CreateSecret",
            ])
            .output()
            .expect("run grpcurl")
    });
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Code: InvalidArgument"), "{stderr}");
    assert!(stderr.contains(r#""fieldViolations":[{"field":"key""#), "details decoded: {stderr}");
}
