//! meshkit service binaries run as real processes, for tests that signal them.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::Context;

use crate::bin_dir;

/// A service binary started with `MESHKIT_*` settings; killed when dropped.
pub struct ServiceProcess {
    child: Child,
    pub name: String,
    log: std::path::PathBuf,
}

impl ServiceProcess {
    /// Starts `target/<profile>/<binary>` with `env` (plus `RUST_LOG=warn`
    /// unless given), logging to `log_dir/<binary>-<pid>.log`.
    pub fn spawn(binary: &str, env: &[(&str, String)], log_dir: &Path) -> anyhow::Result<Self> {
        let path = bin_dir().join(binary);
        anyhow::ensure!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
        let mut command = Command::new(&path);
        command.env("RUST_LOG", "warn").env("RUST_BACKTRACE", "0");
        Self::spawn_command(binary, command, env, log_dir)
    }

    /// Starts `target/<profile>/<binary>` in `host`'s network namespace, as [`spawn`](Self::spawn) does.
    pub fn spawn_in(
        host: &crate::netns::Host,
        binary: &str,
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let path = bin_dir().join(binary);
        anyhow::ensure!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
        let mut command = host.command(&path);
        command.env("RUST_LOG", "warn").env("RUST_BACKTRACE", "0");
        Self::spawn_command(binary, command, env, log_dir)
    }

    /// Starts `command` (a program in another language: the Spring Boot
    /// service) as `name`, with `env` and the same isolation and logging.
    pub fn spawn_command(
        name: &str,
        mut command: Command,
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let (log, log_path) =
            tempfile::Builder::new().prefix(&format!("{name}-")).suffix(".log").tempfile_in(log_dir)?.keep()?;
        let path = std::path::PathBuf::from(command.get_program());
        command.env_remove("MESHKIT_CONFIG");
        // No broker unless the test names one: never a broker a local cluster runs.
        command.env("MESHKIT_EVENTS_BROKERS", format!("127.0.0.1:{}", crate::free_port()));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        Ok(Self { child, name: name.to_owned(), log: log_path })
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal (SIGTERM, SIGKILL, SIGSTOP, SIGCONT…).
    pub fn signal(&self, signal: i32) {
        // kill(2) through the `kill` command keeps this crate free of unsafe code.
        let _ = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
    }

    /// Waits for exit, up to `timeout`; None if it is still running.
    pub async fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
