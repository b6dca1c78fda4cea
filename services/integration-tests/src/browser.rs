//! Runs a script of `services/console/browser-tests` in Debian's Chromium
//! (through playwright-core) and returns what it printed, one line per step.

use std::time::{Duration, Instant};

use crate::cluster;

/// Runs `node SCRIPT` with `env` (and `SHOTS_DIR`, target/console-shots)
/// within four minutes; panics with its output unless it succeeds.
pub async fn run(script: &str, env: &[(&str, String)]) -> String {
    let root = cluster::root();
    let tests = root.join("services/console/browser-tests");
    assert!(
        tests.join("node_modules/playwright-core").exists() && std::path::Path::new("/usr/bin/chromium").exists(),
        "playwright-core and Debian's chromium: deploy/local/install-deps.sh --test installs them"
    );
    let shots = root.join("target/console-shots");
    let started = Instant::now();
    let mut command = tokio::process::Command::new("node");
    command.arg(script).current_dir(&tests).env("SHOTS_DIR", &shots).kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let out = tokio::time::timeout(Duration::from_secs(240), command.output())
        .await
        .expect("the browser run ends within 4 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    println!(
        "{stdout}{script}: {:.1} s in the browser, screenshots in {}",
        started.elapsed().as_secs_f64(),
        shots.display()
    );
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}
