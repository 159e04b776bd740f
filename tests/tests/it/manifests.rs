//! deploy/kubernetes agrees with the Kubernetes schemas (kubernetes-validate)
//! and with the binaries: each Deployment's config file, as mounted, passes
//! its binary's check-config; ports, probes, Services, URLs, certificates,
//! NetworkPolicies and RBAC match what the services really do.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::{pki::Pki, procs::binary, *};
use serde_yaml::Value;

const SERVICES: [&str; 4] = ["gateway", "secret-service", "authz-service", "vault-config-service"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every document of every resource file the kustomization lists.
fn documents() -> Vec<(String, Value)> {
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir().join("kustomization.yaml")).unwrap()).unwrap();
    let mut out = Vec::new();
    for file in kustomization["resources"].as_sequence().expect("resources") {
        let file = file.as_str().unwrap();
        let text = std::fs::read_to_string(dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
            if !value.is_null() {
                out.push((file.to_string(), value));
            }
        }
    }
    out
}

use serde::Deserialize;

fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn all<'a>(docs: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter().map(|(_, d)| d).filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

fn config(docs: &[(String, Value)], service: &str) -> toml_text::Table {
    let text = find(docs, "ConfigMap", "iomete-secrets-config")["data"][format!("{service}.toml").as_str()]
        .as_str()
        .unwrap_or_else(|| panic!("no config for {service}"))
        .to_string();
    toml_text::parse(&text)
}

/// A small view of the TOML config files: top-level and table string and
/// string-array values, enough to cross-check ports and names.
mod toml_text {
    pub type Table = std::collections::BTreeMap<String, String>;

    pub fn parse(text: &str) -> Table {
        let mut out = Table::new();
        let mut table = String::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with("[[") {
                table = line.trim_matches(['[', ']']).to_string() + "[]";
            } else if line.starts_with('[') {
                table = line.trim_matches(['[', ']']).to_string();
            } else if let Some((k, v)) = line.split_once(" = ") {
                let key = if table.is_empty() { k.to_string() } else { format!("{table}.{k}") };
                let entry = out.entry(key).or_default();
                if !entry.is_empty() {
                    entry.push('\n');
                }
                entry.push_str(v.trim_matches('"'));
            }
        }
        out
    }
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap_or_else(|_| panic!("port of {addr}"))
}

fn container<'a>(docs: &'a [(String, Value)], service: &str) -> &'a Value {
    &find(docs, "Deployment", service)["spec"]["template"]["spec"]["containers"][0]
}

fn container_port(docs: &[(String, Value)], service: &str, name: &str) -> u64 {
    container(docs, service)["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{service} has no {name} port"))["containerPort"]
        .as_u64()
        .unwrap()
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    let tool = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("kubernetes-validate"))
        .find(|p| p.is_file())
        .expect("kubernetes-validate is not on PATH: run scripts/test.sh, or `pip install kubernetes-validate`");
    let listed: BTreeSet<String> = documents().into_iter().map(|(f, _)| f).collect();
    let present: BTreeSet<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "every manifest is in the kustomization, and only those");
    for file in listed.iter().filter(|f| *f != "certificates.yaml") {
        let output = Command::new(&tool).args(["--strict", "--quiet"]).arg(dir().join(file)).output().unwrap();
        assert!(
            output.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The validator does catch what it should.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  portz: []\n").unwrap();
    assert!(!Command::new(&tool).args(["--strict", "--quiet"]).arg(bad.path()).output().unwrap().status.success());
}

#[test]
fn each_deployment_config_as_mounted_passes_its_binarys_check_config() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let docs = documents();
    let tmp = tempfile::tempdir().unwrap();
    let internal = Pki::new(&tmp.path().join("pki"), "internal");
    let public = Pki::new(&tmp.path().join("pki"), "public");
    for service in SERVICES {
        let deployment = find(&docs, "Deployment", service);
        let pod = &deployment["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let command: Vec<&str> = c["command"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(command[0], service, "{service} runs its own binary");
        // Each mount becomes a directory with what Kubernetes would put there.
        let root = tmp.path().join(service);
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for m in c["volumeMounts"].as_sequence().unwrap() {
            let mount = m["mountPath"].as_str().unwrap().to_string();
            let name = m["name"].as_str().unwrap();
            let volume = pod["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("{service} mounts a missing volume {name}"));
            let target = root.join(name);
            std::fs::create_dir_all(&target).unwrap();
            if volume["emptyDir"].is_mapping() {
                continue;
            }
            if let Some(map) = volume["configMap"]["name"].as_str() {
                for (k, v) in find(&docs, "ConfigMap", map)["data"].as_mapping().unwrap() {
                    std::fs::write(target.join(k.as_str().unwrap()), v.as_str().unwrap()).unwrap();
                }
            } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
                let (ca, issued) = if secret == "gateway-tls" {
                    (&public, public.issue(&format!("{service}-public"), "gateway.iomete-secrets.svc"))
                } else {
                    assert_eq!(secret, format!("{service}-internal-tls"), "{service} mounts its own certificate");
                    (&internal, internal.issue(service, service))
                };
                // cert-manager's Secret keys.
                std::fs::copy(&issued.cert_file, target.join("tls.crt")).unwrap();
                std::fs::copy(&issued.key_file, target.join("tls.key")).unwrap();
                std::fs::copy(ca.ca_file(), target.join("ca.crt")).unwrap();
            }
            mounts.push((mount, target));
        }
        if pod["automountServiceAccountToken"].as_bool() == Some(true) {
            let sa = root.join("serviceaccount");
            std::fs::create_dir_all(&sa).unwrap();
            std::fs::copy(internal.ca_file(), sa.join("ca.crt")).unwrap();
            std::fs::write(sa.join("token"), "projected-token").unwrap();
            mounts.push(("/var/run/secrets/kubernetes.io/serviceaccount".into(), sa));
        }
        let relocate = |text: &str| {
            mounts.iter().fold(text.to_string(), |t, (from, to)| t.replace(from.as_str(), to.to_str().unwrap()))
        };
        for (_, dir) in &mounts {
            for file in std::fs::read_dir(dir).unwrap() {
                let path = file.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    std::fs::write(&path, relocate(&text)).unwrap();
                }
            }
        }
        let mut env = BTreeMap::new();
        env.insert("KUBERNETES_SERVICE_HOST".to_string(), "10.0.0.1".to_string());
        for e in c["env"].as_sequence().into_iter().flatten() {
            let value = match e["value"].as_str() {
                Some(v) => v.to_string(),
                None => {
                    assert_eq!(e["valueFrom"]["secretKeyRef"]["name"].as_str(), Some("iomete-secrets-database"));
                    "postgres://authz:password@postgres:5432/authz".to_string()
                }
            };
            env.insert(e["name"].as_str().unwrap().to_string(), value);
        }
        let args: Vec<String> = command[1..].iter().map(|a| relocate(a)).collect();
        let output =
            Command::new(binary(service)).args(&args).arg("check-config").env_clear().envs(&env).output().unwrap();
        assert!(
            output.status.success(),
            "{service} refuses its manifest's configuration: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn ports_probes_services_and_urls_agree_with_the_configs() {
    let docs = documents();
    for service in SERVICES {
        let cfg = config(&docs, service);
        let grpc = port_of(&cfg["listen_addr"]);
        let health = port_of(&cfg["health_addr"]);
        assert_eq!(container_port(&docs, service, "grpc"), grpc, "{service}");
        assert_eq!(container_port(&docs, service, "metrics"), port_of(&cfg["metrics_addr"]), "{service}");
        assert_eq!(container_port(&docs, service, "health"), health, "{service}");
        let c = container(&docs, service);
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                c[probe]["grpc"]["port"].as_u64(),
                Some(health),
                "{service} {probe} is a gRPC probe of health_addr"
            );
        }
        let svc = find(&docs, "Service", service);
        let grpc_port = svc["spec"]["ports"].as_sequence().unwrap().iter().find(|p| p["name"].as_str() == Some("grpc"));
        assert_eq!(grpc_port.unwrap()["port"].as_u64(), Some(grpc), "{service}'s Service port");
        // Every internal hop is https:// to a Service of this installation.
        // (Top-level keys: the issuers' discovery URLs are outside.)
        for (key, url) in cfg.iter().filter(|(k, _)| k.ends_with("_url") && !k.contains('.')) {
            let rest = url.strip_prefix("https://").unwrap_or_else(|| panic!("{service}.{key} = {url} is not https"));
            let (host, port) = rest.split_once(':').unwrap();
            let target = find(&docs, "Service", host);
            let ports: Vec<u64> =
                target["spec"]["ports"].as_sequence().unwrap().iter().map(|p| p["port"].as_u64().unwrap()).collect();
            assert!(ports.contains(&port.parse().unwrap()), "{service}.{key}: {host} has no port {port}");
        }
    }
}

#[test]
fn certificates_carry_the_names_the_urls_and_allowed_clients_use() {
    let docs = documents();
    let certificates = all(&docs, "Certificate");
    let by_secret = |secret: &str| {
        *certificates
            .iter()
            .find(|c| c["spec"]["secretName"].as_str() == Some(secret))
            .unwrap_or_else(|| panic!("no Certificate issues {secret}"))
    };
    let names = |c: &Value| -> Vec<String> {
        c["spec"]["dnsNames"].as_sequence().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect()
    };
    for service in SERVICES {
        let cert = by_secret(&format!("{service}-internal-tls"));
        let usages: Vec<&str> =
            cert["spec"]["usages"].as_sequence().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
        assert!(usages.contains(&"client auth") && usages.contains(&"server auth"), "{service}: {usages:?}");
        assert!(names(cert).contains(&service.to_string()), "{service}'s certificate lacks the name its callers dial");
        assert_eq!(cert["spec"]["issuerRef"]["name"].as_str(), Some("internal-ca"));
        let cfg = config(&docs, service);
        for client in
            cfg.get("internal_tls.allowed_clients").map(String::as_str).unwrap_or("").split(['[', ']', ',', '"', ' '])
        {
            if client.is_empty() {
                continue;
            }
            assert!(
                names(by_secret(&format!("{client}-internal-tls"))).contains(&client.to_string()),
                "{service} allows {client}, whose certificate does not carry that name"
            );
        }
    }
    by_secret("gateway-tls");
    // Each service allows exactly those that call it.
    for service in SERVICES {
        let allowed = config(&docs, service).get("internal_tls.allowed_clients").cloned().unwrap_or_default();
        let callers: BTreeSet<&str> = SERVICES
            .iter()
            .copied()
            .filter(|caller| {
                config(&docs, caller)
                    .iter()
                    .any(|(k, url)| k.ends_with("_url") && url.contains(&format!("//{service}:")))
            })
            .collect();
        for caller in &callers {
            assert!(
                allowed.contains(&format!("\"{caller}\"")) || allowed.contains(caller),
                "{service} refuses its caller {caller}"
            );
        }
        if service != "gateway" {
            assert!(!callers.is_empty(), "nothing calls {service}");
        }
    }
}

#[test]
fn network_policies_open_internal_ports_only_to_their_callers() {
    let docs = documents();
    let policies = all(&docs, "NetworkPolicy");
    assert!(
        policies
            .iter()
            .any(|p| p["spec"]["podSelector"].as_mapping().is_some_and(|m| m.is_empty())
                && p["spec"]["ingress"].is_null()),
        "a default-deny ingress policy"
    );
    for service in SERVICES.iter().filter(|s| **s != "gateway") {
        let port = port_of(&config(&docs, service)["listen_addr"]);
        let callers: BTreeSet<String> = SERVICES
            .iter()
            .filter(|caller| {
                config(&docs, caller)
                    .iter()
                    .any(|(k, url)| k.ends_with("_url") && url.contains(&format!("//{service}:")))
            })
            .map(|s| s.to_string())
            .collect();
        // Every rule that opens this service's port, across all policies.
        let mut allowed = BTreeSet::new();
        for p in &policies {
            let selects = match p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str() {
                Some(name) => name == *service,
                None => p["spec"]["podSelector"].as_mapping().is_some_and(|m| m.is_empty()),
            };
            if !selects {
                continue;
            }
            for rule in p["spec"]["ingress"].as_sequence().into_iter().flatten() {
                let opens =
                    rule["ports"].as_sequence().is_none_or(|ps| ps.iter().any(|x| x["port"].as_u64() == Some(port)));
                if !opens {
                    continue;
                }
                let from = rule["from"].as_sequence().unwrap_or_else(|| panic!("{service}:{port} is open to everyone"));
                for peer in from {
                    let name = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{service}:{port} is open beyond named pods: {peer:?}"));
                    assert!(peer["namespaceSelector"].is_null(), "{service}:{port} is open to other namespaces");
                    allowed.insert(name.to_string());
                }
            }
        }
        assert_eq!(allowed, callers, "{service}:{port} is open to exactly its callers");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_grants_exactly_the_verbs_the_kubernetes_store_uses() {
    let docs = documents();
    let roles = all(&docs, "Role");
    assert_eq!(roles.len(), 1, "one Role");
    assert!(all(&docs, "ClusterRole").is_empty(), "no cluster-wide permissions of our own");
    let rules = roles[0]["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    let strings = |v: &Value| -> BTreeSet<String> {
        v.as_sequence().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    assert_eq!(strings(&rules[0]["apiGroups"]), BTreeSet::from([String::new()]));
    assert_eq!(strings(&rules[0]["resources"]), BTreeSet::from(["secrets".to_string()]));
    let granted = strings(&rules[0]["verbs"]);
    let binding = find(&docs, "RoleBinding", roles[0]["metadata"]["name"].as_str().unwrap());
    let bound: BTreeSet<&str> =
        binding["subjects"].as_sequence().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(bound, BTreeSet::from(["secret-service", "vault-config-service"]), "only the services that store");

    // Every operation the secret service offers, with the store objects
    // watched as in production, against the API-server emulator, which
    // records the verb of each request.
    let fixture = stores::Fixture::kubernetes_watching().await;
    let app = TestApp::spawn_with(Options { backend: Some(fixture.backend.clone()), ..Default::default() }).await;
    app.setup_domain("finance").await;
    let owner = app.as_user(OWNER);
    owner.create("finance", "a", "1").await.unwrap();
    owner.create("finance", "b", "2").await.unwrap();
    owner.update("finance", "a", "3").await.unwrap();
    owner.delete("finance", "b").await.unwrap();
    owner.list("finance").await.unwrap();
    app.as_service(Some(&format!("user:{OWNER}")))
        .resolve("finance", vec![text_item("x", "${secrets.a}")])
        .await
        .unwrap();
    let used = fixture.kube.as_ref().unwrap().counters().verbs;
    assert_eq!(used, granted, "the Role grants {granted:?}, the store uses {used:?}");
}

#[test]
fn the_readme_shows_the_gateway_configuration_the_manifests_run() {
    let readme = include_str!("../../../README.md");
    let from = readme.find("## Production (Kubernetes)").expect("a production section");
    let rest = &readme[from..];
    let start = rest.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let shown = &rest[start..start + rest[start..].find("```").unwrap()];
    let docs = documents();
    let mounted = find(&docs, "ConfigMap", "iomete-secrets-config")["data"]["gateway.toml"].as_str().unwrap();
    assert_eq!(shown.trim(), mounted.trim(), "README and deploy/kubernetes/config.yaml disagree");
}
