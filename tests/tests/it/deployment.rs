//! docker-compose.yml and the Dockerfile agree with the binaries as tested:
//! every service's environment is loaded and checked by the real binary
//! (unknown or misspelled variables are errors there), its health check is a
//! real subcommand, its published port is the port it listens on, and the
//! Dockerfile builds every binary the compose file runs.

use std::{collections::BTreeMap, process::Command};

use integration_tests::procs::binary;
use serde_yaml::Value;

const COMPOSE: &str = include_str!("../../../docker-compose.yml");
const DOCKERFILE: &str = include_str!("../../../Dockerfile");
const OURS: [&str; 4] = ["authz-service", "secret-service", "vault-config-service", "gateway"];

/// Replaces `${VAR}`, `${VAR:?msg}` and `${VAR:-default}` as compose does,
/// with a plausible value for each variable.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${...}") + start;
        let inner = &rest[start + 2..end];
        let name = inner.split([':', '-', '?']).next().unwrap_or(inner);
        out.push_str(&if name.ends_with("_SHA256") {
            "ab".repeat(32)
        } else {
            format!("value-of-{}", name.to_lowercase())
        });
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn services() -> serde_yaml::Mapping {
    let doc: Value = serde_yaml::from_str(COMPOSE).expect("docker-compose.yml is valid YAML");
    doc["services"].as_mapping().expect("services").clone()
}

fn environment(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .expect("environment is a map")
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap().trim().to_string(),
            };
            (k.as_str().unwrap().to_string(), interpolate(&value))
        })
        .collect()
}

#[test]
fn each_compose_service_environment_is_accepted_by_its_binary() {
    let services = services();
    for name in OURS {
        let service = &services[name];
        let command = service["command"].as_sequence().expect("command");
        assert_eq!(command[0].as_str(), Some(name), "{name} runs its own binary");
        let env = environment(service);
        let output =
            Command::new(binary(name)).arg("check-config").env_clear().envs(&env).output().expect("run check-config");
        assert!(
            output.status.success(),
            "{name} refuses its compose environment {env:#?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn a_misspelled_variable_is_caught_by_check_config() {
    let services = services();
    let mut env = environment(&services["gateway"]);
    let value = env.remove("GATEWAY_SECRET_SERVICE_URL").unwrap();
    env.insert("GATEWAY_SECRET_SERVICE_ULR".into(), value);
    let output = Command::new(binary("gateway")).arg("check-config").env_clear().envs(&env).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("secret_service_ulr"));
}

#[test]
fn health_checks_ports_and_dependencies_match_the_binaries() {
    let services = services();
    for name in OURS {
        let service = &services[name];
        let test: Vec<&str> = service["healthcheck"]["test"]
            .as_sequence()
            .expect("healthcheck")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(test[..2], ["CMD", name], "{name}");
        let status = Command::new(binary(name)).args(&test[2..]).arg("--help").output().unwrap().status;
        assert!(status.success(), "{name}: {:?} is not a subcommand", &test[2..]);

        let env = environment(service);
        let prefix = name.to_uppercase().replace('-', "_") + "_";
        let prefix = if name == "gateway" { "GATEWAY_".to_string() } else { prefix };
        let listen = &env[&format!("{prefix}SERVER__LISTEN_ADDR")];
        let metrics = &env[&format!("{prefix}SERVER__METRICS_ADDR")];
        assert!(metrics.starts_with("0.0.0.0:"), "{name}'s metrics must be reachable from other containers");
        let ports: Vec<&str> = [listen, metrics].iter().map(|a| a.rsplit(':').next().unwrap()).collect();
        for p in service["ports"].as_sequence().into_iter().flatten() {
            let published = p.as_str().unwrap();
            assert!(
                ports.iter().any(|port| published.ends_with(&format!(":{port}"))),
                "{name} publishes {published} but listens on {listen} and {metrics}"
            );
        }
        for url in env.iter().filter(|(k, _)| k.ends_with("_URL") && !k.contains("DATABASE")).map(|(_, v)| v) {
            let host = url.trim_start_matches("http://").split(':').next().unwrap();
            assert!(services.contains_key(host), "{name} calls {url}, which is no compose service");
        }
        for dep in service["depends_on"].as_mapping().into_iter().flatten() {
            assert!(services.contains_key(dep.0.as_str().unwrap()), "{name} depends on a missing service");
        }
        assert!(DOCKERFILE.contains(&format!("--bin {name}")), "the Dockerfile does not build {name}");
        assert!(DOCKERFILE.contains(&format!("/target/release/{name}")), "the Dockerfile does not ship {name}");
    }
    for peer in ["postgres", "openbao", "jaeger"] {
        assert!(services[peer]["healthcheck"]["test"].is_sequence(), "{peer} has a health check");
    }
    // Nothing is published beyond this machine.
    for (name, service) in &services {
        for p in service["ports"].as_sequence().into_iter().flatten() {
            let published = p.as_str().unwrap();
            assert!(published.starts_with("127.0.0.1:"), "{name:?} publishes {published} on every interface");
        }
    }
}

#[test]
fn in_a_cluster_the_embedded_backend_needs_an_explicit_opt_in() {
    let check = |extra: &[(&str, &str)]| {
        let output = Command::new(binary("secret-service"))
            .arg("check-config")
            .env_clear()
            .env("SECRET_SERVICE_INTERNAL_TOKEN", "t")
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .envs(extra.iter().copied())
            .output()
            .unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (ok, stderr) = check(&[("SECRET_SERVICE_BACKEND", "embedded")]);
    assert!(!ok, "embedded in a cluster was accepted");
    assert!(stderr.contains("SECRET_SERVICE_EMBEDDED__ALLOW_IN_CLUSTER=true"), "{stderr}");
    let (ok, stderr) =
        check(&[("SECRET_SERVICE_BACKEND", "embedded"), ("SECRET_SERVICE_EMBEDDED__ALLOW_IN_CLUSTER", "true")]);
    assert!(ok, "{stderr}");
    let (ok, stderr) = check(&[]);
    assert!(ok, "the in-cluster default (kubernetes) is valid: {stderr}");
}

#[test]
fn an_empty_metrics_or_health_address_turns_that_endpoint_off() {
    let services = services();
    for name in OURS {
        let prefix = name.to_ascii_uppercase().replace('-', "_");
        let mut env = environment(&services[name]);
        env.insert(format!("{prefix}_SERVER__METRICS_ADDR"), String::new());
        env.insert(format!("{prefix}_SERVER__HEALTH_ADDR"), String::new());
        let output = Command::new(binary(name)).arg("check-config").env_clear().envs(&env).output().unwrap();
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        env.insert(format!("{prefix}_SERVER__METRICS_ADDR"), "not-an-address".into());
        let output = Command::new(binary(name)).arg("check-config").env_clear().envs(&env).output().unwrap();
        assert!(!output.status.success(), "{name} accepted a bad metrics_addr");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.to_lowercase().contains("metrics_addr") && stderr.contains("empty: off"), "{name}: {stderr}");
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "[server]\nmetrics_addr = \"\"\n").unwrap();
    let defaults = gateway::Config::default().server;
    let config: gateway::Config =
        secrets_common::config::load(Some(file.path()), "GATEWAY_NOT_SET_", &defaults).unwrap();
    assert_eq!(config.server.metrics_addr, None, "no metrics endpoint is served");
    let config: gateway::Config = secrets_common::config::load(None, "GATEWAY_NOT_SET_", &defaults).unwrap();
    assert!(config.server.metrics_addr.is_some(), "on by default");
}
