//! The Spring Boot reference UserService (`services/user-spring`) run as a
//! real JVM process, the way a team migrating from Spring runs it beside
//! the Rust instances: the same environment variables, the same etcd, the
//! same PostgreSQL tables.

use std::{path::Path, process::Command};

use crate::{ServiceProcess, free_port};

/// The version the Spring service registers (its application.properties).
pub const SPRING_VERSION: &str = "spring-1";

/// The service's jar and its runtime classpath, as the Maven build
/// (`mvn -f common/java/pom.xml package`) left them.
pub fn user_spring_classpath() -> anyhow::Result<String> {
    crate::maven_classpath("../user-spring/target", "meshkit-user-spring-0.1.0.jar", "the Spring service is")
}

/// Starts the Spring UserService as instance `id` on PostgreSQL `database_url`
/// (the Rust user-service must have created the tables), on a free port, with
/// a 2 s lease and a short drain, like [`crate::fleet::spawn`].
pub fn spawn_user_spring(
    etcd_endpoints: &str,
    dir: &Path,
    id: &str,
    database_url: &str,
    extra: &[(&'static str, String)],
) -> ServiceProcess {
    let classpath = match user_spring_classpath() {
        Ok(classpath) => classpath,
        Err(e) => panic!("{e:#}"),
    };
    let mut java = Command::new("java");
    // A small heap and the C1 compiler only: what a test needs, started fast.
    java.args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", &classpath])
        .arg("io.meshkit.user.UserApplication");
    let mut env = vec![
        ("MESHKIT_ETCD_ENDPOINTS", etcd_endpoints.to_owned()),
        ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{}", free_port())),
        ("MESHKIT_DATABASE_URL", database_url.to_owned()),
        ("MESHKIT_REGISTRY_INSTANCE_ID", id.to_owned()),
        ("MESHKIT_REGISTRY_TTL_SECS", "2".to_owned()),
        ("MESHKIT_SERVER_DRAIN_DELAY_MS", "200".to_owned()),
    ];
    env.extend_from_slice(extra);
    match ServiceProcess::spawn_command("user-spring", java, &env, dir) {
        Ok(process) => process,
        Err(e) => panic!("starting the Spring UserService {id}: {e:#}"),
    }
}
