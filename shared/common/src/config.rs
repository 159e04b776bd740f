//! Layered configuration: built-in defaults, then an optional TOML file,
//! then environment variables with the service's prefix (`__` for nesting).

use std::path::Path;

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use serde::de::DeserializeOwned;

/// Loads a service's configuration. Unknown keys in the file or in prefixed
/// environment variables are errors (the config structs deny them), so a
/// typo fails at start-up instead of being ignored.
pub fn load<T: DeserializeOwned>(file: Option<&Path>, env_prefix: &str) -> Result<T, String> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        if !path.exists() {
            return Err(format!("config file {} does not exist", path.display()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Env::prefixed(env_prefix).split("__"));
    figment.extract().map_err(|e| {
        let mut msg = String::from("invalid configuration");
        for err in e {
            msg.push_str(&format!("; {err}"));
        }
        msg
    })
}

#[cfg(test)]
// figment's Jail closures return its large Error type by design.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        listen_addr: String,
        nested: Nested,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Nested {
        timeout_ms: u64,
    }

    impl Default for Demo {
        fn default() -> Self {
            Self { listen_addr: "127.0.0.1:1".into(), nested: Nested::default() }
        }
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.toml");
        std::fs::write(&path, "listen_addr = \"0.0.0.0:9\"\n[nested]\ntimeout_ms = 5\n").unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("DEMOCFG_NESTED__TIMEOUT_MS", "7");
            let demo: Demo = load(Some(&path), "DEMOCFG_").unwrap();
            assert_eq!(demo, Demo { listen_addr: "0.0.0.0:9".into(), nested: Nested { timeout_ms: 7 } });
            Ok(())
        });
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(default, deny_unknown_fields)]
    struct WithList {
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
            let cfg: WithList = load(None, "LISTCFG_").unwrap();
            assert_eq!(cfg.tokens.len(), 2);
            assert_eq!(cfg.tokens[1], Entry { name: "spark".into(), kind: "service".into() });
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DEMOCFG_LISTEN_ADRR", "x");
            let err = load::<Demo>(None, "DEMOCFG_").unwrap_err();
            assert!(err.contains("listen_adrr"), "{err}");
            Ok(())
        });
        let err = load::<Demo>(Some(Path::new("/nonexistent/demo.toml")), "DEMOCFG_").unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
    }
}
