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

/// The host names `caller`'s configuration dials `service` by: every host
/// of its `*_url` settings (several URLs may be listed) that is a Service
/// selecting `service`'s pods, headless or not.
fn dials(docs: &[(String, Value)], caller: &str, service: &str) -> Vec<String> {
    let services = all(docs, "Service");
    config(docs, caller)
        .iter()
        .filter(|(k, _)| k.ends_with("_url"))
        .flat_map(|(_, urls)| urls.trim_matches('"').split(',').map(str::to_string).collect::<Vec<_>>())
        .filter_map(|url| {
            let host = url.trim().split("//").nth(1)?.split([':', '/']).next()?.to_string();
            let target = services.iter().find(|s| s["metadata"]["name"].as_str() == Some(host.as_str()))?;
            (target["spec"]["selector"]["app.kubernetes.io/name"].as_str() == Some(service)).then_some(host)
        })
        .collect()
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

/// The variables Kubernetes puts into a pod for a Service of the pod's
/// namespace when service links are on (kubelet's `FromServices`), from the
/// Service's `spec.clusterIP` and every port.
fn service_link_variables(service: &Value) -> BTreeMap<String, String> {
    let env_name = |s: &str| s.to_ascii_uppercase().replace('-', "_");
    let name = env_name(service["metadata"]["name"].as_str().expect("a Service has a name"));
    let ip = service["spec"]["clusterIP"].as_str().unwrap_or_else(|| panic!("{name} has no clusterIP"));
    let mut out = BTreeMap::new();
    // Headless Services get none.
    if ip.is_empty() || ip == "None" {
        return out;
    }
    for (i, p) in service["spec"]["ports"].as_sequence().expect("ports").iter().enumerate() {
        let port = p["port"].as_u64().expect("a port number");
        let proto = p["protocol"].as_str().unwrap_or("TCP").to_ascii_lowercase();
        if i == 0 {
            out.insert(format!("{name}_SERVICE_HOST"), ip.to_string());
            out.insert(format!("{name}_SERVICE_PORT"), port.to_string());
            out.insert(format!("{name}_PORT"), format!("{proto}://{ip}:{port}"));
        }
        if let Some(port_name) = p["name"].as_str() {
            out.insert(format!("{name}_SERVICE_PORT_{}", env_name(port_name)), port.to_string());
        }
        let prefix = format!("{name}_PORT_{port}_{}", proto.to_ascii_uppercase());
        out.insert(prefix.clone(), format!("{proto}://{ip}:{port}"));
        out.insert(format!("{prefix}_PROTO"), proto.clone());
        out.insert(format!("{prefix}_PORT"), port.to_string());
        out.insert(format!("{prefix}_ADDR"), ip.to_string());
    }
    out
}

/// The Services of `namespace` as the cluster holds them: each with a
/// ClusterIP (10.96.0.10, .11, ... in manifest order) unless it names one.
fn services_with_cluster_ips(docs: &[(String, Value)], namespace: &str) -> Vec<Value> {
    all(docs, "Service")
        .into_iter()
        .filter(|s| s["metadata"]["namespace"].as_str() == Some(namespace))
        .enumerate()
        .map(|(i, s)| {
            let mut s = s.clone();
            if s["spec"]["clusterIP"].is_null() {
                s["spec"]["clusterIP"] = Value::String(format!("10.96.0.{}", 10 + i));
            }
            s
        })
        .collect()
}

/// The Service `kubernetes` of namespace `default`: its variables are in
/// every pod, service links or not.
fn api_server_service() -> Value {
    serde_yaml::from_str(
        "{metadata: {name: kubernetes, namespace: default}, \
         spec: {clusterIP: '10.96.0.1', ports: [{name: https, port: 443, protocol: TCP}]}}",
    )
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
    // The service links of one known Service, as Kubernetes writes them.
    let secret_service = services_with_cluster_ips(&docs, "iomete-secrets")
        .into_iter()
        .find(|s| s["metadata"]["name"].as_str() == Some("secret-service"))
        .expect("a Service secret-service in iomete-secrets");
    let ip = secret_service["spec"]["clusterIP"].as_str().unwrap().to_string();
    let links = service_link_variables(&secret_service);
    assert_eq!(links["SECRET_SERVICE_SERVICE_HOST"], ip);
    assert_eq!(links["SECRET_SERVICE_SERVICE_PORT"], "50052");
    assert_eq!(links["SECRET_SERVICE_SERVICE_PORT_GRPC"], "50052");
    assert_eq!(links["SECRET_SERVICE_SERVICE_PORT_METRICS"], "9102");
    assert_eq!(links["SECRET_SERVICE_PORT"], format!("tcp://{ip}:50052"));
    assert_eq!(links["SECRET_SERVICE_PORT_50052_TCP"], format!("tcp://{ip}:50052"));
    assert_eq!(links["SECRET_SERVICE_PORT_50052_TCP_PROTO"], "tcp");
    assert_eq!(links["SECRET_SERVICE_PORT_50052_TCP_PORT"], "50052");
    assert_eq!(links["SECRET_SERVICE_PORT_50052_TCP_ADDR"], ip);
    assert_eq!(links["SECRET_SERVICE_PORT_9102_TCP"], format!("tcp://{ip}:9102"));
    assert_eq!(links.len(), 13, "host, port, port URL, two named ports, four per port: {links:#?}");
    for service in SERVICES {
        let deployment = find(&docs, "Deployment", service);
        let namespace = deployment["metadata"]["namespace"]
            .as_str()
            .unwrap_or_else(|| panic!("Deployment {service} names no namespace"));
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(
            pod["enableServiceLinks"].as_bool(),
            Some(false),
            "{service}: no service-link variables for the Services of {namespace}"
        );
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
        // What every pod gets, service links or not, then the container's own.
        let mut env = service_link_variables(&api_server_service());
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
        let check = |env: &BTreeMap<String, String>| {
            Command::new(binary(service)).args(&args).arg("check-config").env_clear().envs(env).output().unwrap()
        };
        let output = check(&env);
        assert!(
            output.status.success(),
            "{service} refuses its manifest's configuration: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Were service links turned back on, the pod would also get the
        // variables of every Service of its namespace (the container's own
        // variables win over them).
        let mut linked = BTreeMap::new();
        for s in services_with_cluster_ips(&docs, namespace) {
            linked.extend(service_link_variables(&s));
        }
        let own_prefix = format!("{}_", service.to_ascii_uppercase().replace('-', "_"));
        assert!(
            linked.keys().any(|k| k.starts_with(&own_prefix)),
            "{service}: the links carry its own prefix {own_prefix}: {linked:#?}"
        );
        linked.extend(env.clone());
        let output = check(&linked);
        assert!(
            output.status.success(),
            "{service} refuses its manifest's configuration with service links on: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn ports_probes_services_and_urls_agree_with_the_configs() {
    let docs = documents();
    for service in SERVICES {
        let cfg = config(&docs, service);
        let grpc = port_of(&cfg["server.listen_addr"]);
        let health = port_of(&cfg["server.health_addr"]);
        assert_eq!(container_port(&docs, service, "grpc"), grpc, "{service}");
        assert_eq!(container_port(&docs, service, "metrics"), port_of(&cfg["server.metrics_addr"]), "{service}");
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
    // The internal CA signs through a ClusterIssuer, its key kept in
    // cert-manager's namespace.
    let issuers = all(&docs, "ClusterIssuer");
    assert_eq!(issuers.len(), 1, "one ClusterIssuer, the internal CA");
    let issuer = issuers[0]["metadata"]["name"].as_str().unwrap();
    let ca = by_secret(issuers[0]["spec"]["ca"]["secretName"].as_str().expect("a CA ClusterIssuer"));
    assert_eq!(ca["spec"]["isCA"].as_bool(), Some(true));
    assert_eq!(ca["metadata"]["namespace"].as_str(), Some("cert-manager"));
    let issued_by_the_internal_ca = |c: &Value| {
        c["spec"]["issuerRef"]["kind"].as_str() == Some("ClusterIssuer")
            && c["spec"]["issuerRef"]["name"].as_str() == Some(issuer)
    };
    for service in SERVICES {
        let cert = by_secret(&format!("{service}-internal-tls"));
        let usages: Vec<&str> =
            cert["spec"]["usages"].as_sequence().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
        assert!(usages.contains(&"client auth") && usages.contains(&"server auth"), "{service}: {usages:?}");
        assert!(names(cert).contains(&service.to_string()), "{service}'s certificate lacks the name its callers dial");
        assert!(issued_by_the_internal_ca(cert), "{service}: {:?}", cert["spec"]["issuerRef"]);
        // Issued where the pod that mounts it runs.
        let namespace = find(&docs, "Deployment", service)["metadata"]["namespace"].as_str().unwrap();
        assert_eq!(cert["metadata"]["namespace"].as_str(), Some(namespace), "{service}'s certificate");
        assert!(names(cert).contains(&format!("{service}.{namespace}.svc")), "{service}: {:?}", names(cert));
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
    let public = by_secret("gateway-tls");
    assert_eq!(public["metadata"]["namespace"].as_str(), Some("iomete-secrets"));
    assert!(issued_by_the_internal_ca(public), "gateway-tls: {:?}", public["spec"]["issuerRef"]);
    // Each service allows exactly those that call it.
    for service in SERVICES {
        let allowed = config(&docs, service).get("internal_tls.allowed_clients").cloned().unwrap_or_default();
        let callers: BTreeSet<&str> =
            SERVICES.iter().copied().filter(|caller| !dials(&docs, caller, service).is_empty()).collect();
        for caller in &callers {
            // Its certificate carries every name its callers dial it by.
            for host in dials(&docs, caller, service) {
                assert!(
                    names(by_secret(&format!("{service}-internal-tls"))).contains(&host),
                    "{caller} dials {service} as {host}, a name its certificate lacks"
                );
            }
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
        let port = port_of(&config(&docs, service)["server.listen_addr"]);
        let callers: BTreeSet<String> =
            SERVICES.iter().filter(|caller| !dials(&docs, caller, service).is_empty()).map(|s| s.to_string()).collect();
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
    assert_eq!(roles.len(), 2, "one Role per store namespace");
    assert_eq!(all(&docs, "RoleBinding").len(), roles.len(), "one RoleBinding per Role");
    assert!(all(&docs, "ClusterRole").is_empty(), "no cluster-wide permissions of our own");
    let strings = |v: &Value| -> BTreeSet<String> {
        v.as_sequence().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    // Each Role is in the namespace where one store service keeps its
    // objects, and bound to that service's ServiceAccount alone.
    let mut granted_by_role = BTreeMap::new();
    let mut bound = BTreeSet::new();
    for role in &roles {
        let name = role["metadata"]["name"].as_str().unwrap();
        let namespace =
            role["metadata"]["namespace"].as_str().unwrap_or_else(|| panic!("Role {name} names no namespace"));
        let rules = role["rules"].as_sequence().unwrap();
        assert_eq!(rules.len(), 1, "{name}");
        assert_eq!(strings(&rules[0]["apiGroups"]), BTreeSet::from([String::new()]), "{name}");
        assert_eq!(strings(&rules[0]["resources"]), BTreeSet::from(["secrets".to_string()]), "{name}");
        let bindings: Vec<&Value> = all(&docs, "RoleBinding")
            .into_iter()
            .filter(|b| {
                b["metadata"]["namespace"].as_str() == Some(namespace)
                    && b["roleRef"]["kind"].as_str() == Some("Role")
                    && b["roleRef"]["name"].as_str() == Some(name)
            })
            .collect();
        assert_eq!(bindings.len(), 1, "Role {name} has one RoleBinding");
        let subjects = bindings[0]["subjects"].as_sequence().unwrap();
        assert_eq!(subjects.len(), 1, "Role {name} is bound to one service");
        let service = subjects[0]["name"].as_str().unwrap();
        assert_eq!(subjects[0]["kind"].as_str(), Some("ServiceAccount"), "{name}");
        assert_eq!(subjects[0]["namespace"].as_str(), Some("iomete-secrets"), "{name}: {service}'s ServiceAccount");
        assert_eq!(
            config(&docs, service).get("kubernetes.namespace").map(String::as_str),
            Some(namespace),
            "{service} keeps its objects where its Role {name} is"
        );
        bound.insert(service.to_string());
        granted_by_role.insert(name.to_string(), strings(&rules[0]["verbs"]));
    }
    assert_eq!(
        bound,
        BTreeSet::from(["secret-service".to_string(), "vault-config-service".to_string()]),
        "only the services that store, each with a Role of its own"
    );

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
    // An edit made with kubectl whose watch event has not arrived: the next
    // write starts from a copy that is behind, is refused, and reads the object.
    let kube = fixture.kube.as_ref().unwrap();
    kube.hold_events(true);
    kube.edit(stores::NAMESPACE, "iomete-secret-store-finance", |s| {
        s.data.get_or_insert_with(Default::default).insert("edited".into(), k8s_openapi::ByteString(b"x".to_vec()));
    });
    owner.create("finance", "c", "4").await.unwrap();
    kube.hold_events(false);
    let used = kube.counters().verbs;
    for (role, granted) in &granted_by_role {
        assert_eq!(&used, granted, "the Role {role} grants {granted:?}, the store uses {used:?}");
    }
}

/// A namespace and a Secret name; `*` for any.
type SecretRef = (String, String);

/// ClusterRoles of Kubernetes itself, not defined here, that grant nothing
/// on Secrets.
const BUILT_IN_ROLES_WITHOUT_SECRETS: [&str; 1] = ["system:service-account-issuer-discovery"];

fn string_list(v: &Value) -> Vec<String> {
    v.as_sequence().into_iter().flatten().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// The Secrets that `rules` let one get, list or watch in `namespace`.
fn secrets_read_by(rules: &Value, namespace: &str) -> BTreeSet<SecretRef> {
    let mut out = BTreeSet::new();
    for rule in rules.as_sequence().into_iter().flatten() {
        let applies = string_list(&rule["apiGroups"]).iter().any(|g| g.is_empty() || g == "*")
            && string_list(&rule["resources"]).iter().any(|r| r == "secrets" || r == "*")
            && string_list(&rule["verbs"]).iter().any(|v| ["get", "list", "watch", "*"].contains(&v.as_str()));
        if !applies {
            continue;
        }
        let names = string_list(&rule["resourceNames"]);
        if names.is_empty() {
            out.insert((namespace.to_string(), "*".to_string()));
        }
        for name in names {
            out.insert((namespace.to_string(), name));
        }
    }
    out
}

/// Whether a RoleBinding or ClusterRoleBinding applies to a ServiceAccount.
fn binds(binding: &Value, namespace: &str, name: &str) -> bool {
    binding["subjects"].as_sequence().into_iter().flatten().any(|s| {
        let subject = s["name"].as_str().unwrap_or_default();
        match s["kind"].as_str() {
            // Without a namespace, a RoleBinding's ServiceAccount is in its own.
            Some("ServiceAccount") => {
                subject == name
                    && s["namespace"].as_str().or(binding["metadata"]["namespace"].as_str()) == Some(namespace)
            }
            Some("User") => subject == format!("system:serviceaccount:{namespace}:{name}"),
            Some("Group") => {
                ["system:serviceaccounts", "system:authenticated"].contains(&subject)
                    || subject == format!("system:serviceaccounts:{namespace}")
            }
            other => panic!("a subject of kind {other:?}"),
        }
    })
}

/// For each ServiceAccount of the manifests, (namespace, name), the Secrets
/// it may get, list or watch through Roles, ClusterRoles and their bindings.
fn readable_secrets(docs: &[(String, Value)]) -> BTreeMap<(String, String), BTreeSet<SecretRef>> {
    let bindings: Vec<(&str, &Value)> = all(docs, "RoleBinding")
        .into_iter()
        .map(|b| ("RoleBinding", b))
        .chain(all(docs, "ClusterRoleBinding").into_iter().map(|b| ("ClusterRoleBinding", b)))
        .collect();
    let mut out = BTreeMap::new();
    for account in all(docs, "ServiceAccount") {
        let name = account["metadata"]["name"].as_str().unwrap();
        let namespace = account["metadata"]["namespace"]
            .as_str()
            .unwrap_or_else(|| panic!("ServiceAccount {name} names no namespace"));
        let mut readable = BTreeSet::new();
        for (kind, binding) in &bindings {
            if !binds(binding, namespace, name) {
                continue;
            }
            let binding_name = binding["metadata"]["name"].as_str().unwrap();
            // A RoleBinding grants in its namespace, a ClusterRoleBinding in all.
            let scope = match *kind {
                "RoleBinding" => binding["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_else(|| panic!("RoleBinding {binding_name} names no namespace")),
                _ => "*",
            };
            let role_kind = binding["roleRef"]["kind"].as_str().unwrap();
            let role_name = binding["roleRef"]["name"].as_str().unwrap();
            let role = docs.iter().map(|(_, d)| d).find(|d| {
                d["kind"].as_str() == Some(role_kind)
                    && d["metadata"]["name"].as_str() == Some(role_name)
                    && (role_kind == "ClusterRole" || d["metadata"]["namespace"].as_str() == Some(scope))
            });
            match role {
                Some(role) => readable.extend(secrets_read_by(&role["rules"], scope)),
                None => {
                    assert_eq!(role_kind, "ClusterRole", "{kind} {binding_name}: no Role {role_name} in {scope}");
                    assert!(
                        BUILT_IN_ROLES_WITHOUT_SECRETS.contains(&role_name),
                        "{kind} {binding_name} binds the ClusterRole {role_name}, neither defined here nor \
                         known to grant nothing on Secrets"
                    );
                }
            }
        }
        out.insert((namespace.to_string(), name.to_string()), readable);
    }
    out
}

fn reads(readable: &BTreeSet<SecretRef>, namespace: &str, secret: &str) -> bool {
    readable.iter().any(|(n, s)| (n == namespace || n == "*") && (s == secret || s == "*"))
}

#[test]
fn no_service_account_can_read_the_ca_key_and_the_store_services_read_disjoint_secrets() {
    let docs = documents();
    let readable = readable_secrets(&docs);
    assert_eq!(readable.len(), SERVICES.len(), "one ServiceAccount per service: {readable:?}");
    let of = |service: &str| -> BTreeSet<SecretRef> {
        readable
            .get(&("iomete-secrets".to_string(), service.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("no ServiceAccount {service} in iomete-secrets"))
    };

    // The internal CA's key: the ClusterIssuer's Secret, in cert-manager's
    // cluster resource namespace. No namespaced Issuer holds a CA.
    let issuers = all(&docs, "ClusterIssuer");
    assert_eq!(issuers.len(), 1, "one ClusterIssuer, the internal CA");
    let ca_secret = issuers[0]["spec"]["ca"]["secretName"].as_str().expect("a CA ClusterIssuer");
    for issuer in all(&docs, "Issuer") {
        assert!(issuer["spec"]["ca"].is_null(), "a namespaced CA Issuer: {issuer:?}");
        assert_eq!(issuer["metadata"]["namespace"].as_str(), Some("cert-manager"), "{issuer:?}");
    }
    for (account, secrets) in &readable {
        assert!(!reads(secrets, "cert-manager", ca_secret), "{account:?} can read the CA key: {secrets:?}");
    }
    // The computation does see a grant that would reach it.
    let mut widened = docs.clone();
    for extra in [
        "{kind: ClusterRole, metadata: {name: too-broad}, \
         rules: [{apiGroups: ['*'], resources: ['*'], verbs: ['*']}]}",
        "{kind: RoleBinding, metadata: {name: too-broad, namespace: cert-manager}, \
         roleRef: {kind: ClusterRole, name: too-broad}, subjects: [{kind: ServiceAccount, name: secret-service, \
         namespace: iomete-secrets}]}",
    ] {
        widened.push(("extra.yaml".to_string(), serde_yaml::from_str(extra).unwrap()));
    }
    let widened = readable_secrets(&widened);
    assert!(reads(&widened[&("iomete-secrets".to_string(), "secret-service".to_string())], "cert-manager", ca_secret));

    // Each store service reads its own store's namespace and nothing else;
    // the two have nothing in common.
    for service in ["secret-service", "vault-config-service"] {
        let namespace = config(&docs, service)["kubernetes.namespace"].clone();
        assert_ne!(namespace, "iomete-secrets", "{service}'s store objects are apart from the installation");
        assert_eq!(
            of(service),
            BTreeSet::from([(namespace.clone(), "*".to_string())]),
            "{service} reads the Secrets of {namespace}, nothing else"
        );
    }
    let (secrets, vault) = (of("secret-service"), of("vault-config-service"));
    for (na, sa) in &secrets {
        for (nb, sb) in &vault {
            let namespaces = na == nb || na == "*" || nb == "*";
            let names = sa == sb || sa == "*" || sb == "*";
            assert!(!(namespaces && names), "both store services can read {na}/{sa} and {nb}/{sb}");
        }
    }

    // Neither reads the installation's own Secrets: certificates and keys,
    // database URLs.
    let mut installation: BTreeSet<String> = all(&docs, "Certificate")
        .into_iter()
        .filter(|c| c["metadata"]["namespace"].as_str() == Some("iomete-secrets"))
        .map(|c| c["spec"]["secretName"].as_str().unwrap().to_string())
        .collect();
    installation.extend(SERVICES.iter().map(|s| format!("{s}-internal-tls")));
    installation.insert("gateway-tls".to_string());
    installation.insert("iomete-secrets-database".to_string());
    for service in ["secret-service", "vault-config-service"] {
        for secret in &installation {
            assert!(!reads(&of(service), "iomete-secrets", secret), "{service} can read {secret} in iomete-secrets");
        }
    }

    // The others read no Secrets at all.
    for service in ["gateway", "authz-service"] {
        let read = of(service);
        assert!(read.is_empty(), "{service} reads Secrets: {read:?}");
    }
}

#[test]
fn every_namespaced_resource_names_its_namespace() {
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir().join("kustomization.yaml")).unwrap()).unwrap();
    assert!(
        kustomization["namespace"].is_null(),
        "a kustomization namespace would move every resource, store Roles and CA included, into one namespace"
    );
    let docs = documents();
    let created: BTreeSet<&str> =
        all(&docs, "Namespace").into_iter().map(|n| n["metadata"]["name"].as_str().unwrap()).collect();
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap();
        let name = doc["metadata"]["name"].as_str().unwrap();
        let namespace = doc["metadata"]["namespace"].as_str();
        if ["Namespace", "ClusterRole", "ClusterRoleBinding", "ClusterIssuer"].contains(&kind) {
            assert_eq!(namespace, None, "{file}: {kind} {name} is cluster-scoped");
            continue;
        }
        let namespace = namespace.unwrap_or_else(|| panic!("{file}: {kind} {name} names no namespace"));
        // Store Roles in the store namespaces; the internal CA in
        // cert-manager's; everything else where the services run.
        let elsewhere = match kind {
            "Role" | "RoleBinding" => created.contains(namespace),
            "Issuer" | "Certificate" => namespace == "cert-manager",
            _ => false,
        };
        assert!(namespace == "iomete-secrets" || elsewhere, "{file}: {kind} {name} is in {namespace}");
    }
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

/// Every service runs two replicas or more, spread over nodes and zones,
/// with a disruption budget that keeps all but one of them through drains.
#[test]
fn every_service_runs_spread_replicas_under_a_disruption_budget() {
    let docs = documents();
    for service in SERVICES {
        let deployment = find(&docs, "Deployment", service);
        let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
        assert!(replicas >= 2, "{service}: {replicas} replica(s)");
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        let selects_pods = |selector: &Value| {
            let wanted = selector["matchLabels"].as_mapping().unwrap_or_else(|| panic!("{service}: matchLabels"));
            !wanted.is_empty() && wanted.iter().all(|(k, v)| labels[k.as_str().unwrap()] == *v)
        };
        let spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{service}: no topologySpreadConstraints"));
        for key in ["kubernetes.io/hostname", "topology.kubernetes.io/zone"] {
            let c = spread
                .iter()
                .find(|c| c["topologyKey"].as_str() == Some(key))
                .unwrap_or_else(|| panic!("{service}: not spread over {key}"));
            assert_eq!(c["maxSkew"].as_u64(), Some(1), "{service} over {key}");
            assert!(selects_pods(&c["labelSelector"]), "{service}: the {key} spread counts other pods");
        }
        let budgets: Vec<&Value> =
            all(&docs, "PodDisruptionBudget").into_iter().filter(|b| selects_pods(&b["spec"]["selector"])).collect();
        assert_eq!(budgets.len(), 1, "{service}: one PodDisruptionBudget selects its pods");
        let budget = &budgets[0]["spec"];
        let keeps = match (budget["maxUnavailable"].as_u64(), budget["minAvailable"].as_u64()) {
            (Some(down), None) => replicas.saturating_sub(down),
            (None, Some(up)) => up,
            other => panic!("{service}: the budget sets {other:?}"),
        };
        assert!(keeps >= 1 && keeps < replicas, "{service}: the budget keeps {keeps} of {replicas} through a drain");
    }
}

/// The README's command that creates the database Secret gives exactly the
/// keys the manifests read from it.
#[test]
fn the_readme_creates_every_database_url_key_the_manifests_read() {
    let readme = include_str!("../../../README.md");
    let shown: BTreeSet<String> = readme
        .split("--from-literal=")
        .skip(1)
        .filter_map(|rest| rest.split_once('=').map(|(key, _)| key.to_string()))
        .collect();
    let docs = documents();
    let mut read = BTreeSet::new();
    for deployment in all(&docs, "Deployment") {
        for container in deployment["spec"]["template"]["spec"]["containers"].as_sequence().into_iter().flatten() {
            for e in container["env"].as_sequence().into_iter().flatten() {
                let reference = &e["valueFrom"]["secretKeyRef"];
                if reference["name"].as_str() == Some("iomete-secrets-database") {
                    read.insert(reference["key"].as_str().unwrap().to_string());
                }
            }
        }
    }
    assert!(read.contains("secret-replicas-url"), "{read:?}");
    assert_eq!(shown, read, "README's kubectl create secret and the manifests disagree");
}
