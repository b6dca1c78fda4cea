//! Layered settings: defaults < TOML file < `MESHKIT_*` environment.
//!
//! Every leaf setting `section.key` can be set from the environment as
//! `MESHKIT_SECTION_KEY` (for example `registry.ttl_secs` from
//! `MESHKIT_REGISTRY_TTL_SECS`, `etcd.endpoints` from `MESHKIT_ETCD_ENDPOINTS`,
//! a comma-separated list). Only known settings are looked up, so the mapping
//! is unambiguous, and an unknown key in a section the process reads is
//! refused by name. The environment is read through [`Env`] so tests can feed
//! a map.
//!
//! Each concern owns its section's type and implements [`Settings`] for it;
//! a binary composes the sections it reads into one type (the front crate's
//! `MeshConfig` plus its own) and loads that with [`load_process`]. One file
//! may hold every component's sections: a process ignores the sections it
//! does not read.
#![forbid(unsafe_code)]

use std::{collections::HashMap, path::Path};

use serde::{Serialize, de::DeserializeOwned};
use toml::{Table, Value};

/// Where environment variables come from.
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

/// A section of settings, or a process's whole set of them: it has
/// defaults, round-trips through TOML, and checks itself.
pub trait Settings:
    Serialize + DeserializeOwned + Default + Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    /// Checks ranges and formats; the error names the setting
    /// (`registry.ttl_secs: 1 is outside 2..=3600`).
    fn validate(&self) -> Result<()>;

    /// Fills in what depends on the process (its component name) or on a
    /// variable outside `MESHKIT_*` (`DATABASE_URL`), after loading and
    /// before validating.
    fn resolve(&mut self, component: &str, env: &dyn Env) {
        let _ = (component, env);
    }
}

/// A setting that is missing, malformed or out of range, or a configuration
/// file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A setting is missing, malformed or out of range; the message names it.
    #[error("invalid configuration: {0}")]
    Invalid(String),

    /// The configuration file could not be read or parsed.
    #[error("configuration file {path}: {message}")]
    File { path: std::path::PathBuf, message: String },
}

/// The result of loading or checking settings.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `setting: problem`, the form every check reports.
    pub fn invalid(setting: impl std::fmt::Display, problem: impl std::fmt::Display) -> Self {
        Self::Invalid(format!("{setting}: {problem}"))
    }
}

impl meshkit_base::ErrorExt for Error {
    fn status_code(&self) -> tonic::Code {
        tonic::Code::FailedPrecondition
    }

    fn is_retryable(&self) -> bool {
        false
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        meshkit_base::ErrorExt::to_status(&err)
    }
}

/// `Err(Error::invalid(setting, problem))`, for checks that return early.
pub fn bad<T>(setting: impl std::fmt::Display, problem: impl std::fmt::Display) -> Result<T> {
    Err(Error::invalid(setting, problem))
}

/// Loads a process's settings `T` for `component`: its defaults, then the
/// TOML file `MESHKIT_CONFIG` names (optional), then the environment;
/// [`Settings::resolve`], then [`Settings::validate`].
pub fn load_process<T: Settings>(component: &str, env: &dyn Env) -> Result<T> {
    let file = env.var("MESHKIT_CONFIG").filter(|s| !s.is_empty());
    let mut settings: T = load(file.as_deref().map(Path::new), env)?;
    settings.resolve(component, env);
    settings.validate()?;
    Ok(settings)
}

/// Loads `T` from its defaults, then `file` (if any), then the environment.
/// Sections of the file that `T` does not have are another component's and
/// are left alone; an unknown key inside a section `T` has is refused.
pub fn load<T>(file: Option<&Path>, env: &dyn Env) -> Result<T>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut table = defaults::<T>()?;
    if let Some(path) = file {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::File { path: path.to_owned(), message: e.to_string() })?;
        let from_file: Table =
            text.parse().map_err(|e: toml::de::Error| Error::File { path: path.to_owned(), message: e.to_string() })?;
        merge(&mut table, from_file, "").map_err(|message| Error::File { path: path.to_owned(), message })?;
    }
    apply_env(&mut table, "MESHKIT", env)?;
    from_table(table)
}

/// `T`'s defaults as a TOML table: what [`load`] lays the file over, and
/// the sections `T` reads (its keys).
pub fn defaults<T: Serialize + Default>() -> Result<Table> {
    match Value::try_from(T::default()) {
        Ok(Value::Table(t)) => Ok(t),
        _ => Err(Error::Invalid("defaults do not form a table".into())),
    }
}

/// `T` from a TOML table shaped like it (unknown keys of its sections refused).
pub fn from_table<T: DeserializeOwned>(table: Table) -> Result<T> {
    T::deserialize(Value::Table(table)).map_err(|e| Error::Invalid(e.to_string()))
}

/// Overlays `over` on `base`, refusing keys the defaults do not have.
fn merge(base: &mut Table, over: Table, path: &str) -> Result<(), String> {
    // An empty table in the defaults is a map (rules by method, …): any key
    // goes, and deserializing checks the entries.
    if base.is_empty() && !path.is_empty() {
        base.extend(over);
        return Ok(());
    }
    for (key, value) in over {
        let full = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o, &full)?,
            (Some(Value::Table(_)), _) => return Err(format!("`{full}` must be a table")),
            (Some(slot), v) => {
                if std::mem::discriminant(slot) != std::mem::discriminant(&v) {
                    return Err(format!("`{full}` must be {}, found {}", slot.type_str(), v.type_str()));
                }
                *slot = v;
            }
            // A whole section this process does not read: another component's.
            (None, Value::Table(_)) if path.is_empty() => {
                tracing::debug!(section = key, "configuration section not read by this process");
            }
            (None, _) => return Err(format!("unknown setting `{full}`")),
        }
    }
    Ok(())
}

fn apply_env(table: &mut Table, prefix: &str, env: &dyn Env) -> Result<()> {
    for (key, slot) in table.iter_mut() {
        let name = format!("{prefix}_{}", key.to_uppercase());
        if let Value::Table(inner) = slot {
            apply_env(inner, &name, env)?;
            continue;
        }
        let Some(raw) = env.var(&name) else { continue };
        *slot = parse_env_value(slot, &raw).map_err(|problem| Error::Invalid(format!("{name}={raw:?}: {problem}")))?;
    }
    Ok(())
}

fn parse_env_value(current: &Value, raw: &str) -> Result<Value, String> {
    let raw = raw.trim();
    Ok(match current {
        Value::String(_) => Value::String(raw.to_owned()),
        Value::Integer(_) => Value::Integer(raw.parse().map_err(|_| "expected a whole number".to_owned())?),
        Value::Float(_) => Value::Float(raw.parse().map_err(|_| "expected a number".to_owned())?),
        Value::Boolean(_) => Value::Boolean(match raw.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => return Err("expected true or false".into()),
        }),
        Value::Array(_) => Value::Array(
            raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| Value::String(s.to_owned())).collect(),
        ),
        other => return Err(format!("cannot be set from the environment ({})", other.type_str())),
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Section {
        count: i64,
        names: Vec<String>,
        on: bool,
    }

    impl Default for Section {
        fn default() -> Self {
            Self { count: 3, names: vec![], on: false }
        }
    }

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    struct Process {
        section: Section,
    }

    impl Settings for Process {
        fn validate(&self) -> Result<()> {
            if self.section.count > 10 {
                return bad("section.count", format!("{} is above 10", self.section.count));
            }
            Ok(())
        }
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("a temp file");
        std::fs::write(file.path(), text).expect("writable temp file");
        file
    }

    #[test]
    fn env_beats_file_beats_defaults() {
        let f = file("[section]\ncount = 5\nnames = [\"a\"]\n");
        let path = f.path().to_str().expect("a UTF-8 path");
        let p: Process = load_process("x", &env(&[("MESHKIT_CONFIG", path)])).expect("loads");
        assert_eq!((p.section.count, p.section.names.as_slice()), (5, ["a".to_owned()].as_slice()));
        let p: Process = load_process(
            "x",
            &env(&[("MESHKIT_CONFIG", path), ("MESHKIT_SECTION_COUNT", "7"), ("MESHKIT_SECTION_ON", "yes")]),
        )
        .expect("loads");
        assert_eq!((p.section.count, p.section.on), (7, true));
    }

    #[test]
    fn another_components_section_is_ignored_an_unknown_key_is_not() {
        let f = file("[section]\ncount = 4\n[gateway]\nlisten = \"127.0.0.1:1\"\n");
        let p: Process =
            load_process("x", &env(&[("MESHKIT_CONFIG", f.path().to_str().expect("UTF-8"))])).expect("loads");
        assert_eq!(p.section.count, 4);
        let f = file("[section]\ncuont = 4\n");
        let err = load_process::<Process>("x", &env(&[("MESHKIT_CONFIG", f.path().to_str().expect("UTF-8"))]))
            .expect_err("a misspelt key");
        assert!(err.to_string().contains("unknown setting `section.cuont`"), "{err}");
        let f = file("stray = 1\n");
        let err = load_process::<Process>("x", &env(&[("MESHKIT_CONFIG", f.path().to_str().expect("UTF-8"))]))
            .expect_err("a top-level value is no section");
        assert!(err.to_string().contains("unknown setting `stray`"), "{err}");
    }

    #[test]
    fn errors_name_the_variable_or_the_setting() {
        let err = load_process::<Process>("x", &env(&[("MESHKIT_SECTION_COUNT", "many")])).expect_err("not a number");
        assert!(err.to_string().contains("MESHKIT_SECTION_COUNT=\"many\": expected a whole number"), "{err}");
        let err = load_process::<Process>("x", &env(&[("MESHKIT_SECTION_COUNT", "11")])).expect_err("out of range");
        assert_eq!(err, Error::Invalid("section.count: 11 is above 10".into()));
        let err =
            load_process::<Process>("x", &env(&[("MESHKIT_CONFIG", "/nonexistent/x.toml")])).expect_err("no file");
        assert!(err.to_string().contains("/nonexistent/x.toml"), "{err}");
    }
}
