//! TLS on the gateway and mutual TLS between the services, with
//! certificates made in the test: real clients (tonic, grpcurl, a bare
//! rustls handshake), plaintext refused, certificates from another CA or
//! with a name not allowed refused, and rotation without a restart.

use std::{process::Command, sync::Arc, time::Duration};

use integration_tests::{pki::Pki, procs::grpcurl, *};
use secrets_proto::{
    internal::v1::{SecretLookup, secret_reader_client::SecretReaderClient},
    v1 as pb,
};
use tonic::Request;

const DOMAIN: &str = "finance";

fn tls_options() -> Options {
    Options { tls: true, ..Default::default() }
}

/// The leaf certificate a TLS server at `addr` presents, from a bare rustls
/// handshake trusting `ca_file` (and presenting `identity` when given).
async fn presented_certificate(
    addr: &str,
    ca_file: &std::path::Path,
    identity: Option<&pki::Issued>,
) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    let roots = secrets_common::tls::read_roots(ca_file)?;
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        Some(i) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&i.cert_file).unwrap().map(Result::unwrap).collect(),
                PrivateKeyDer::from_pem_file(&i.key_file).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = stream.get_ref();
    Ok(session.peer_certificates().expect("server certificate")[0].to_vec())
}

/// A call the TLS layer refused: the connection failed or was closed by
/// the server after the handshake (TLS 1.3 reports a refused client
/// certificate after the client has finished).
fn assert_refused_by_tls(status: &tonic::Status) {
    assert!(
        // A plaintext HTTP/2 client reads the TLS alert as a bad frame: INTERNAL.
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Internal
        ),
        "{status:?}"
    );
    assert!(
        !status.message().contains("internal credential") && !status.message().contains("permission"),
        "refused by the application, not by TLS: {status:?}"
    );
}

fn host_port(url: &str) -> String {
    url.split("://").nth(1).expect("url").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_stack_works_over_tls_and_mutual_tls_without_an_internal_token() {
    let app = TestApp::spawn_with(tls_options()).await;
    assert!(app.gateway_url.starts_with("https://") && app.secret_service_url.starts_with("https://"));
    app.setup_domain(DOMAIN).await;
    app.as_user(OWNER).create(DOMAIN, "db-password", "s3cr3t-over-tls").await.expect("create over TLS");
    let resolved = app
        .as_service(Some(&format!("user:{OWNER}")))
        .resolve(DOMAIN, vec![text_item("url", "jdbc:pg://db?password=${secrets.db-password}")])
        .await
        .expect("resolve across mutual-TLS hops");
    let value = match &resolved[0].result {
        Some(pb::resolved_item::Result::Text(t)) => t.clone(),
        other => panic!("not resolved: {other:?}"),
    };
    assert_eq!(value, "jdbc:pg://db?password=s3cr3t-over-tls");

    // The public listener speaks only TLS: a plaintext client gets nowhere.
    let plaintext = Clients::new(&app.gateway_url.replace("https://", "http://"), Some(app.token(OWNER)), None)
        .list(DOMAIN)
        .await
        .expect_err("plaintext call to a TLS listener");
    assert_refused_by_tls(&plaintext);
    // So do the internal listeners.
    let direct = Clients::new(&app.secret_service_url.replace("https://", "http://"), None, None)
        .list(DOMAIN)
        .await
        .expect_err("plaintext call to an internal listener");
    assert_refused_by_tls(&direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_services_accept_only_certificates_of_the_internal_ca_with_an_allowed_name() {
    let app = TestApp::spawn_with(tls_options()).await;
    app.setup_domain(DOMAIN).await;
    app.as_user(OWNER).create(DOMAIN, "api-key", "k-canary-91").await.expect("create");
    let pki = app.pki.as_ref().expect("pki");
    let read = |identity: Option<&pki::Issued>| {
        let identity = identity
            .map(|i| (std::fs::read_to_string(&i.cert_file).unwrap(), std::fs::read_to_string(&i.key_file).unwrap()));
        let ch = tls_channel(&app.secret_service_url, &pki.internal.ca_pem(), identity);
        async move {
            let mut request = Request::new(secrets_proto::internal::v1::ReadSecretsRequest {
                lookups: vec![SecretLookup {
                    scope: pb::Scope::Domain as i32,
                    domain: DOMAIN.into(),
                    key: "api-key".into(),
                    global_fallback: false,
                }],
                max_value_bytes: 1 << 20,
                presence_only: false,
            });
            secrets_common::auth::act_as(&mut request, &secrets_common::Principal::user(OWNER), None, &[]);
            SecretReaderClient::new(ch).read_secrets(request).await
        }
    };

    // The gateway's own certificate: accepted, and no internal token is needed.
    let ok = read(Some(&pki.services["gateway"])).await.expect("the gateway's certificate is accepted");
    assert!(ok.into_inner().results[0].found);

    // No client certificate: the handshake is refused.
    let none = read(None).await.expect_err("no client certificate");
    assert_refused_by_tls(&none);

    // A certificate from another CA, with the gateway's very name: refused.
    let foreign = Pki::new(&app.dir.path().join("foreign"), "foreign");
    let impostor = foreign.issue("gateway", &service_dns_name("gateway"));
    let refused = read(Some(&impostor)).await.expect_err("a certificate of another CA");
    assert_refused_by_tls(&refused);

    // The internal CA's certificate for a name the secret service does not list.
    let vault = read(Some(&pki.services["vault-config-service"])).await.expect_err("a name not allowed");
    assert_refused_by_tls(&vault);

    // The server logs a refusal as it happens; the client may hear of it first.
    let logs = logs::eventually(&["refused a TLS handshake", "names none of allowed_clients"]).await;
    assert!(logs.contains("refused a TLS handshake"), "refusals are logged");
    assert!(logs.contains("UnknownIssuer") || logs.contains("unknown issuer"), "the reason is logged");
    assert!(logs.contains("names none of allowed_clients"), "the name refusal is logged");
    assert!(!logs.contains("k-canary-91"), "the value reached the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_served_without_a_restart() {
    let app = TestApp::spawn_with(tls_options()).await;
    app.setup_domain(DOMAIN).await;
    let owner = app.as_user(OWNER);
    owner.create(DOMAIN, "before", "v").await.expect("create before rotation");
    let pki = app.pki.as_ref().expect("pki");
    let gateway = host_port(&app.gateway_url);
    let secret_service = host_port(&app.secret_service_url);
    let old_public = Pki::leaf_der(&pki.gateway_public.cert_file);
    assert_eq!(presented_certificate(&gateway, &pki.public.ca_file(), None).await.unwrap(), old_public);

    // cert-manager writes new files in place: the public certificate and
    // every service's internal one.
    let new_public = pki.public.issue("gateway-public", "gateway.example.test");
    for service in ["gateway", "secret-service", "authz-service", "vault-config-service"] {
        pki.internal.issue(service, &service_dns_name(service));
    }
    let new_public_der = Pki::leaf_der(&new_public.cert_file);
    assert_ne!(old_public, new_public_der);
    // Each service looks at its files every 100 ms (reload_interval_ms here),
    // in the background: wait for the new ones, however busy the machine.
    let new_internal = Pki::leaf_der(&pki.services["secret-service"].cert_file);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let presented = presented_certificate(&gateway, &pki.public.ca_file(), None).await.unwrap();
        let internal = presented_certificate(&secret_service, &pki.internal.ca_file(), Some(&pki.services["gateway"]))
            .await
            .unwrap();
        if presented == new_public_der && internal == new_internal {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new certificates were never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The connection made before the rotation and new ones keep working.
    owner.create(DOMAIN, "after", "v").await.expect("old connection after rotation");
    let keys = app.as_user(OWNER).list(DOMAIN).await.expect("new connection after rotation");
    assert_eq!(keys, ["after", "before"]);

    // A half-written file keeps the last good certificate.
    std::fs::write(&new_public.key_file, "-----BEGIN PRIVATE KEY-----\ntruncated").unwrap();
    let logs = logs::eventually(&["kept the previous TLS certificate"]).await;
    assert!(logs.contains("kept the previous TLS certificate"), "the broken pair is noticed and kept out");
    let presented = presented_certificate(&gateway, &pki.public.ca_file(), None).await.unwrap();
    assert_eq!(presented, new_public_der, "a broken key file does not take the listener down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_calls_the_tls_gateway_with_the_ca_and_fails_in_plaintext() {
    let app = TestApp::spawn_with(tls_options()).await;
    let pki = app.pki.as_ref().expect("pki");
    let addr = host_port(&app.gateway_url);
    let ca = pki.public.ca_file();
    let out = tokio::task::block_in_place(|| {
        Command::new(grpcurl())
            .args(["-cacert", ca.to_str().unwrap(), "-servername", "gateway.example.test", &addr, "list"])
            .output()
            .expect("grpcurl")
    });
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(listed.contains("iomete.secrets.v1.Gateway"), "{listed}");

    let plain = tokio::task::block_in_place(|| {
        Command::new(grpcurl()).args(["-plaintext", "-max-time", "5", &addr, "list"]).output().expect("grpcurl")
    });
    assert!(!plain.status.success(), "grpcurl -plaintext reached a TLS listener");
    let untrusted = tokio::task::block_in_place(|| {
        Command::new(grpcurl()).args(["-max-time", "5", &addr, "list"]).output().expect("grpcurl")
    });
    assert!(!untrusted.status.success(), "a client not trusting the CA got through");
    assert!(String::from_utf8_lossy(&untrusted.stderr).contains("certificate"), "{untrusted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_service_answers_plaintext_health_checks_on_its_health_port_only() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "public");
    let issued = pki.issue("gw", "gateway.example.test");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = gateway::Config {
        internal_token: Some(secrecy::SecretString::from(secrets_common::auth::generate_token())),
        server: secrets_common::server::ServerConfig {
            metrics_addr: None,
            health_addr: Some(([127, 0, 0, 1], 0).into()),
            tls: Some(secrets_common::tls::TlsConfig {
                cert_file: issued.cert_file.clone(),
                key_file: issued.key_file.clone(),
                reload_interval_ms: 1_000,
            }),
            ..secrets_common::server::ServerConfig::local(0, 0)
        },
        audit: integration_tests::audit_in(dir.path()),
        ..Default::default()
    };
    let app = gateway::Application::build_with_listener(config, listener).await.expect("gateway");
    let health = std::net::SocketAddr::from(([127, 0, 0, 1], app.health_port().expect("health port")));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    secrets_common::server::probe(health).await.expect("plaintext health check on the health port");
    assert!(secrets_common::server::probe(addr).await.is_err(), "plaintext health check on the TLS port");
    let _ = tx.send(());
    let _ = task.await;
}

#[test]
fn tls_configuration_errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "public");
    let a = pki.issue("a", "a.example.test");
    let b = pki.issue("b", "b.example.test");
    let config = |cert: &std::path::Path, key: &std::path::Path| gateway::Config {
        internal_token: Some(secrecy::SecretString::from("t".to_string())),
        server: secrets_common::server::ServerConfig {
            tls: Some(secrets_common::tls::TlsConfig {
                cert_file: cert.to_path_buf(),
                key_file: key.to_path_buf(),
                reload_interval_ms: 1_000,
            }),
            ..gateway::Config::default().server
        },
        ..Default::default()
    };
    let missing = config(&dir.path().join("nope.pem"), &a.key_file).validate().unwrap_err().to_string();
    assert!(missing.starts_with("server.tls: ") && missing.contains("nope.pem"), "{missing}");
    let mismatched = config(&a.cert_file, &b.key_file).validate().unwrap_err().to_string();
    assert!(mismatched.contains("does not belong to the certificate"), "{mismatched}");

    // With mutual TLS the internal URLs must be https://, and https:// needs it.
    let internal = secrets_common::tls::InternalTlsConfig {
        ca_file: pki.ca_file(),
        cert_file: a.cert_file.clone(),
        key_file: a.key_file.clone(),
        allowed_clients: vec![],
        reload_interval_ms: 1_000,
    };
    let plain_url = gateway::Config { internal_tls: Some(internal), internal_token: None, ..Default::default() };
    let e = plain_url.validate().unwrap_err().to_string();
    assert!(e.contains("secret_service_url") && e.contains("must start with https://"), "{e}");
    let https_without = gateway::Config {
        internal_token: Some(secrecy::SecretString::from("t".to_string())),
        secret_service_url: "https://secret-service:50052".into(),
        ..Default::default()
    };
    let e = https_without.validate().unwrap_err().to_string();
    assert!(e.contains("configure internal_tls"), "{e}");
    let neither = gateway::Config::default().validate().unwrap_err().to_string();
    assert!(neither.contains("internal_token or internal_tls is required"), "{neither}");
}

#[test]
fn an_internal_service_refuses_listener_tls_it_would_not_serve() {
    let dir = tempfile::tempdir().unwrap();
    let issued = Pki::new(dir.path(), "public").issue("s", "secret-service.example.test");
    let tls = Some(secrets_common::tls::TlsConfig {
        cert_file: issued.cert_file.clone(),
        key_file: issued.key_file.clone(),
        reload_interval_ms: 1_000,
    });
    let token = Some(secrecy::SecretString::from("t".to_string()));
    let server = secrets_common::server::ServerConfig { tls, ..secrets_common::server::ServerConfig::local(0, 0) };
    let errors = [
        authz_service::Config { internal_token: token.clone(), server: server.clone(), ..Default::default() }
            .validate()
            .unwrap_err(),
        secret_service::Config { internal_token: token.clone(), server: server.clone(), ..Default::default() }
            .validate()
            .unwrap_err(),
        vault_config_service::Config { internal_token: token, server, ..Default::default() }.validate().unwrap_err(),
    ];
    for e in errors {
        let e = e.to_string();
        assert!(e.starts_with("server.tls: ") && e.contains("internal_tls"), "{e}");
    }
}
