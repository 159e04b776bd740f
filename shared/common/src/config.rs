//! Layered configuration: built-in defaults, then an optional TOML file,
//! then environment variables with the service's prefix (`__` for nesting).

use std::path::Path;

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::de::DeserializeOwned;

/// Loads a service's configuration. Unknown keys in the file or in prefixed
/// environment variables are errors (the config structs deny them), so a
/// typo fails at start-up instead of being ignored.
///
/// `server` is the service's own `[server]` defaults: a file or variable
/// that sets one of its keys keeps the others.
#[expect(clippy::disallowed_methods, reason = "loads the configuration once, at startup")]
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env_prefix: &str,
    server: &crate::server::ServerConfig,
) -> Result<T, String> {
    let mut figment = Figment::from(Serialized::default("server", server));
    if let Some(path) = file {
        if !path.exists() {
            return Err(format!("config file {} does not exist", path.display()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let links = std::sync::Arc::new(service_links(env_prefix));
    let env = Env::prefixed(env_prefix).filter(move |k| !links.contains(&k.as_str().to_ascii_lowercase()));
    figment = figment.merge(env.split("__"));
    figment.extract().map_err(|e| {
        let mut msg = String::from("invalid configuration");
        for err in e {
            msg.push_str(&format!("; {err}"));
            if let figment::error::Kind::UnknownField(field, _) = &err.kind
                && err.path.len() <= 1
                && MOVED_TO_SERVER.contains(&field.to_ascii_lowercase().as_str())
            {
                let field = field.to_ascii_lowercase();
                msg.push_str(&format!(
                    " ({field} is in the [server] table now: `[server]` then `{field} = ...` in a file, \
                     {env_prefix}SERVER__{} in the environment)",
                    field.to_ascii_uppercase()
                ));
            }
        }
        msg
    })
}

/// The keys that moved from the top level into the `[server]` table.
const MOVED_TO_SERVER: [&str; 5] = ["listen_addr", "metrics_addr", "health_addr", "shutdown_drain_ms", "tls"];

/// An optional listen address where an empty value turns it off: with a
/// default address, `metrics_addr = ""` under `[server]` (or `GATEWAY_SERVER__METRICS_ADDR=`) is
/// how an operator says "no endpoint".
pub fn optional_addr<'de, D>(deserializer: D) -> Result<Option<std::net::SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize;
    match Option::<String>::deserialize(deserializer)? {
        None => Ok(None),
        Some(text) if text.trim().is_empty() => Ok(None),
        Some(text) => text.trim().parse().map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a socket address such as 127.0.0.1:9101 (empty: off): {e}"
            ))
        }),
    }
}

/// Whether a prefixed variable (prefix removed) is one of the service links
/// Kubernetes injects into every pod for every Service of the namespace:
/// `<NAME>_SERVICE_HOST=<ip>`, `<NAME>_SERVICE_PORT[_<PORT NAME>]=<port>`,
/// `<NAME>_PORT=tcp://<ip>:<port>` and `<NAME>_PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]`.
/// A Service named like a service's prefix (`secret-service` →
/// `SECRET_SERVICE_...`) would otherwise turn them into unknown
/// configuration keys and stop the pod. Name and value must both have the
/// link's shape, so a mistyped key (`LISTEN_PORT=1`) is still refused.
pub fn is_service_link(key: &str, value: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if key.contains("__") {
        return false;
    }
    let words: Vec<&str> = key.split('_').collect();
    let proto = |w: &str| matches!(w, "tcp" | "udp" | "sctp");
    let number = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit());
    let port = |v: &str| v.parse::<u16>().is_ok();
    let ip = |v: &str| v.parse::<std::net::IpAddr>().is_ok();
    let url = |v: &str| {
        v.split_once("://").is_some_and(|(scheme, addr)| proto(scheme) && addr.parse::<std::net::SocketAddr>().is_ok())
    };
    (0..words.len()).any(|start| {
        let named = words[..start].iter().all(|w| !w.is_empty());
        named
            && match &words[start..] {
                ["service", "host"] => ip(value),
                ["service", "port", name @ ..] => name.iter().all(|w| !w.is_empty()) && port(value),
                ["port"] => url(value),
                ["port", n, t] => number(n) && proto(t) && url(value),
                ["port", n, t, "proto"] => number(n) && proto(t) && proto(value),
                ["port", n, t, "port"] => number(n) && proto(t) && port(value),
                ["port", n, t, "addr"] => number(n) && proto(t) && ip(value),
                _ => false,
            }
    })
}

/// The environment variables with `prefix` that are Kubernetes service
/// links, as figment sees them (prefix removed, lower case).
fn service_links(prefix: &str) -> std::collections::BTreeSet<String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter_map(|(k, v)| {
            let key = k.get(..prefix.len()).filter(|p| p.eq_ignore_ascii_case(prefix)).map(|_| &k[prefix.len()..])?;
            is_service_link(key, &v).then(|| key.to_ascii_lowercase())
        })
        .collect()
}

#[cfg(test)]
// figment's Jail closures return its large Error type by design.
#[allow(clippy::result_large_err)]
#[allow(clippy::disallowed_methods, reason = "tests may block")]
mod tests {
    use super::*;
    use crate::server::ServerConfig;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        server: ServerConfig,
        nested: Nested,
    }

    fn defaults() -> ServerConfig {
        ServerConfig::local(1, 9101)
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Nested {
        timeout_ms: u64,
    }

    impl Default for Demo {
        fn default() -> Self {
            Self { server: defaults(), nested: Nested::default() }
        }
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.toml");
        std::fs::write(&path, "[server]\nlisten_addr = \"0.0.0.0:9\"\n[nested]\ntimeout_ms = 5\n").unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("DEMOCFG_NESTED__TIMEOUT_MS", "7");
            jail.set_env("DEMOCFG_SERVER__SHUTDOWN_DRAIN_MS", "250");
            let demo: Demo = load(Some(&path), "DEMOCFG_", &defaults()).unwrap();
            assert_eq!(demo.nested, Nested { timeout_ms: 7 });
            assert_eq!(demo.server.listen_addr, "0.0.0.0:9".parse().unwrap());
            assert_eq!(demo.server.shutdown_drain_ms, 250);
            // Keys of [server] nobody set keep the service's defaults.
            assert_eq!(demo.server.metrics_addr, Some("127.0.0.1:9101".parse().unwrap()));
            assert_eq!(demo.server.health_addr, None);
            Ok(())
        });
    }

    #[test]
    fn an_empty_metrics_address_turns_the_endpoint_off_and_a_bad_one_names_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DEMOCFG_SERVER__METRICS_ADDR", "");
            jail.set_env("DEMOCFG_SERVER__HEALTH_ADDR", "0.0.0.0:8081");
            let demo: Demo = load(None, "DEMOCFG_", &defaults()).unwrap();
            assert_eq!(demo.server.metrics_addr, None);
            assert_eq!(demo.server.probe_addr(), "0.0.0.0:8081".parse().unwrap());
            jail.set_env("DEMOCFG_SERVER__LISTEN_ADDR", "nine");
            let err = load::<Demo>(None, "DEMOCFG_", &defaults()).unwrap_err();
            assert!(err.to_lowercase().contains("server.listen_addr"), "{err}");
            Ok(())
        });
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct WithList {
        #[allow(dead_code)]
        server: Option<ServerConfig>,
        tokens: Vec<Entry>,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        name: String,
        kind: String,
    }

    #[test]
    fn a_list_of_tables_can_come_from_one_environment_variable() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LISTCFG_TOKENS", r#"[{name="admin",kind="user"},{name="spark",kind="service"}]"#);
            let cfg: WithList = load(None, "LISTCFG_", &defaults()).unwrap();
            assert_eq!(cfg.tokens.len(), 2);
            assert_eq!(cfg.tokens[1], Entry { name: "spark".into(), kind: "service".into() });
            Ok(())
        });
    }

    #[test]
    fn kubernetes_service_links_are_ignored_and_everything_else_is_checked() {
        for (link, value) in [
            ("service_host", "10.96.0.7"),
            ("service_host", "fd00::7"),
            ("service_port", "50052"),
            ("service_port_grpc", "50052"),
            ("service_port_health_check", "8086"),
            ("port", "tcp://10.96.0.7:50052"),
            ("port", "tcp://[fd00::7]:50052"),
            ("port_50052_tcp", "tcp://10.96.0.7:50052"),
            ("port_50052_tcp_proto", "tcp"),
            ("port_50052_tcp_port", "50052"),
            ("port_50052_tcp_addr", "10.96.0.7"),
            ("port_9102_udp", "udp://10.96.0.7:9102"),
            ("metrics_service_host", "10.96.0.8"),
            ("METRICS_PORT_9102_TCP_ADDR", "10.96.0.8"),
        ] {
            assert!(is_service_link(link, value), "{link}={value} is a service link");
        }
        for (key, value) in [
            ("listen_addr", "0.0.0.0:9"),
            ("listen_port", "1"),
            ("port", "50052"),
            ("service_host", "gateway"),
            ("service_port", "grpc"),
            ("port_50052", "tcp://10.96.0.7:50052"),
            ("port_x_tcp", "tcp://10.96.0.7:50052"),
            ("port_1_http", "http://10.96.0.7:1"),
            ("server__port", "tcp://10.96.0.7:1"),
            ("secret_service_url", "https://secret-service:50052"),
        ] {
            assert!(!is_service_link(key, value), "{key}={value} is configuration");
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("DEMOCFG_SERVICE_HOST", "10.96.0.7");
            jail.set_env("DEMOCFG_PORT", "tcp://10.96.0.7:50052");
            jail.set_env("DEMOCFG_PORT_50052_TCP_ADDR", "10.96.0.7");
            jail.set_env("DEMOCFG_SERVICE_PORT_GRPC", "50052");
            jail.set_env("DEMOCFG_SERVER__LISTEN_ADDR", "0.0.0.0:9");
            let demo: Demo = load(None, "DEMOCFG_", &defaults()).unwrap();
            assert_eq!(demo.server.listen_addr, "0.0.0.0:9".parse().unwrap());
            jail.set_env("DEMOCFG_LISTEN_PORT", "1");
            let err = load::<Demo>(None, "DEMOCFG_", &defaults()).unwrap_err();
            assert!(err.contains("listen_port"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_listener_key_at_the_top_level_says_where_it_moved() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DEMOCFG_LISTEN_ADDR", "0.0.0.0:9");
            let err = load::<Demo>(None, "DEMOCFG_", &defaults()).unwrap_err();
            assert!(err.contains("listen_addr is in the [server] table now"), "{err}");
            assert!(err.contains("DEMOCFG_SERVER__LISTEN_ADDR"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DEMOCFG_LISTEN_ADRR", "x");
            let err = load::<Demo>(None, "DEMOCFG_", &defaults()).unwrap_err();
            assert!(err.contains("listen_adrr"), "{err}");
            Ok(())
        });
        let err = load::<Demo>(Some(Path::new("/nonexistent/demo.toml")), "DEMOCFG_", &defaults()).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
    }
}
