//! The config loader: any TOML file and any `MESHKIT_*` variables give the
//! gateway's settings or an error naming the setting; never a panic.
#![no_main]

use std::collections::HashMap;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshkit_config::Env;
use meshkit_gateway::settings::GatewayConfig;

/// Variables from the input's first lines; `MESHKIT_CONFIG` names the file.
struct Vars(HashMap<String, String>);

impl Env for Vars {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

static FILE: LazyLock<std::path::PathBuf> =
    LazyLock::new(|| std::env::temp_dir().join(format!("meshkit-fuzz-config-{}.toml", std::process::id())));

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Lines `MESHKIT_X=value` up to a blank line, then the TOML file.
    let (vars, toml) = text.split_once("\n\n").unwrap_or(("", text));
    let mut env: HashMap<String, String> = vars
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("MESHKIT_") && *k != "MESHKIT_CONFIG")
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if std::fs::write(&*FILE, toml).is_err() {
        return;
    }
    env.insert("MESHKIT_CONFIG".into(), FILE.display().to_string());
    let _ = meshkit_config::load_process::<GatewayConfig>("gateway", &Vars(env));
});
