//! meshctl: services, instances and leases from etcd, and the pools and
//! event pipelines of running processes from their admin endpoints. See `meshctl --help`.

use std::process::ExitCode;

use meshkit_meshctl as cmd;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut settings = match cmd::CtlConfig::load() {
        Ok(config) => config.etcd,
        Err(e) => return usage(&e.to_string()),
    };
    while let Some(flag) = args.first().filter(|a| a.starts_with("--")).cloned() {
        args.remove(0);
        match flag.as_str() {
            "--help" | "-h" => {
                println!("{}", cmd::USAGE);
                return ExitCode::SUCCESS;
            }
            "--etcd" | "--prefix" if !args.is_empty() => {
                let value = args.remove(0);
                if flag == "--etcd" {
                    settings.endpoints =
                        value.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
                } else {
                    settings.prefix = value;
                }
            }
            _ => return usage(&format!("unknown or incomplete option {flag:?}")),
        }
    }
    let (endpoints, prefix) = (settings.endpoints.join(","), settings.prefix.clone());
    let command = args.first().map(String::as_str);
    if command == Some("certs") {
        return certs(&args[1..]);
    }
    if command == Some("xds") && args.get(1).map(String::as_str) == Some("bootstrap") {
        return xds_bootstrap(&args[2..]);
    }
    if !matches!(
        command,
        Some(
            "services"
                | "instances"
                | "audit"
                | "leases"
                | "pools"
                | "events"
                | "prometheus-sd"
                | "config"
                | "governance"
                | "jobs"
                | "split"
                | "xds"
        )
    ) {
        return usage(&match command {
            Some(c) => format!("unknown command {c:?}"),
            None => "a command is required".into(),
        });
    }
    if matches!(command, Some("pools" | "governance")) && args.len() != 2 {
        return usage("pools and governance take one INSTANCE_ID or ADMIN_ADDR");
    }
    let mut client = match meshkit_common::etcd::connect(&settings).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshctl: cannot reach etcd at {endpoints}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if command == Some("prometheus-sd") {
        return prometheus_sd(&mut client, &prefix, &args[1..]).await;
    }
    if command == Some("config") {
        return config(&mut client, &prefix, &args[1..]).await;
    }
    if command == Some("jobs") {
        return jobs(&mut client, &prefix, &args[1..]).await;
    }
    if command == Some("split") {
        return split(&mut client, &prefix, &args[1..]).await;
    }
    if command == Some("events") && args.len() > 1 {
        return events(&mut client, &prefix, &args[1..]).await;
    }
    if command == Some("instances") && matches!(args.get(1).map(String::as_str), Some("drain" | "undrain" | "weight")) {
        return instance_control(&mut client, &prefix, &args[1..]).await;
    }
    if command == Some("audit") {
        let limit = match args.get(1..).unwrap_or_default() {
            [] => 50,
            [flag, n] if flag == "--limit" => match n.parse::<i64>() {
                Ok(n) if (1..=10_000).contains(&n) => n,
                _ => return usage(&format!("--limit: {n:?} is not a number within 1..=10000")),
            },
            _ => return usage("audit [--limit N]"),
        };
        return finish(cmd::audit(&mut client, &prefix, limit).await);
    }
    if command == Some("etcd-user") || command == Some("etcd-auth-enable") {
        let Some(password) = read_password() else {
            return usage("the password is read from standard input (one line, at least 8 characters)");
        };
        let result = if command == Some("etcd-auth-enable") {
            cmd::etcd_auth_enable(&mut client, &password).await
        } else if args.len() >= 2 {
            let services: Vec<&str> = args[2..].iter().map(String::as_str).collect();
            cmd::etcd_user(&mut client, &prefix, &args[1], &services, &password).await
        } else {
            return usage("etcd-user COMPONENT [SERVICE…] (password on standard input)");
        };
        return finish(result);
    }
    if command == Some("xds") {
        if args.len() != 2 || args[1] != "clients" {
            return usage("xds bootstrap [--server HOST:PORT] [--node ID] [--zone ZONE] | xds clients");
        }
        return finish(cmd::xds::xds_clients(&mut client, &prefix).await);
    }
    let result = match command {
        Some("services") => cmd::services(&mut client, &prefix).await,
        Some("instances") => cmd::instances(&mut client, &prefix, args.get(1).map(String::as_str)).await,
        Some("leases") => cmd::leases(&mut client, &prefix).await,
        Some("events") => cmd::events(&mut client, &prefix).await,
        Some("governance") => cmd::governance(&mut client, &prefix, &args[1]).await,
        _ => cmd::pools(&mut client, &prefix, &args[1]).await,
    };
    finish(result)
}

/// `split SERVICE [VERSION=PERCENT …] [--clear]`.
async fn split(client: &mut etcd_client::Client, prefix: &str, args: &[String]) -> ExitCode {
    const USAGE: &str = "split SERVICE [VERSION=PERCENT …] [--clear]";
    let Some((service, shares)) = args.split_first() else { return usage(USAGE) };
    let result = match shares {
        [] => cmd::split_show(client, prefix, service).await,
        [clear] if clear == "--clear" => cmd::split_set(client, prefix, service, None).await,
        shares => match cmd::parse_shares(shares) {
            Ok(shares) => cmd::split_set(client, prefix, service, Some(shares)).await,
            Err(e) => return usage(&format!("split: {e}")),
        },
    };
    finish(result)
}

/// `instances drain|undrain INSTANCE_ID [--service S]`, `instances weight INSTANCE_ID WEIGHT|default [--service S]`.
async fn instance_control(client: &mut etcd_client::Client, prefix: &str, args: &[String]) -> ExitCode {
    use meshkit_common::control::Change;
    const USAGE: &str =
        "instances drain|undrain INSTANCE_ID [--service S] | instances weight INSTANCE_ID WEIGHT|default [--service S]";
    let mut positional = Vec::new();
    let mut service = None;
    let mut rest = args.iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--service" => match rest.next() {
                Some(s) => service = Some(s.clone()),
                None => return usage("--service needs a SERVICE"),
            },
            _ => positional.push(a.as_str()),
        }
    }
    let change = match positional.as_slice() {
        ["drain", _] => Change::Drain,
        ["undrain", _] => Change::Undrain,
        ["weight", _, "default"] => Change::Weight(None),
        ["weight", _, w] => match w.parse::<u32>() {
            Ok(w) if meshkit_common::control::WEIGHTS.contains(&w) => Change::Weight(Some(w)),
            _ => return usage(&format!("weight: {w:?} is not a number within 1..=10000, or `default`")),
        },
        _ => return usage(USAGE),
    };
    let by = cmd::operator();
    finish(cmd::instance_control(client, prefix, positional[1], service.as_deref(), change, &by).await)
}

/// `config get|set|delete|history|diff|rollback|watch COMPONENT [PATH [VALUE]]`.
async fn config(client: &mut etcd_client::Client, prefix: &str, args: &[String]) -> ExitCode {
    let arg = |i: usize| args.get(i).map(String::as_str);
    let by = cmd::operator();
    let revision = |i: usize| arg(i).map(|r| r.parse::<i64>().ok().filter(|r| *r > 0).ok_or(r));
    let result = match (arg(0), args.len()) {
        (Some("get"), 2) => cmd::config_get(client, prefix, &args[1]).await,
        (Some("set"), 4) => cmd::config_set(client, prefix, &args[1], &args[2], &args[3], &by).await,
        (Some("delete"), 3) => cmd::config_delete(client, prefix, &args[1], &args[2], &by).await,
        (Some("history"), 3) => cmd::config_history(client, prefix, &args[1], &args[2]).await,
        (Some("diff"), 3 | 4) => match (revision(2), revision(3)) {
            (Some(Ok(from)), None) => cmd::config_diff(client, prefix, &args[1], from, None).await,
            (Some(Ok(from)), Some(Ok(to))) => cmd::config_diff(client, prefix, &args[1], from, Some(to)).await,
            (Some(Err(r)), _) | (_, Some(Err(r))) => return usage(&format!("config diff: {r:?} is not a revision")),
            _ => return usage("config diff COMPONENT FROM [TO]"),
        },
        (Some("rollback"), 4) => match revision(3) {
            Some(Ok(to)) => cmd::config_rollback(client, prefix, &args[1], &args[2], to, &by).await,
            _ => return usage(&format!("config rollback: {:?} is not a revision", args[3])),
        },
        (Some("watch"), 2) => {
            cmd::config_watch(client, prefix, &args[1], None, |line| println!("{line}")).await.map(|()| String::new())
        }
        _ => {
            return usage(
                "config get COMPONENT | set COMPONENT PATH VALUE | delete COMPONENT PATH | history COMPONENT PATH | diff COMPONENT FROM [TO] | rollback COMPONENT PATH REVISION | watch COMPONENT",
            );
        }
    };
    finish(result)
}

/// `events dead-letters [TOPIC] [--limit N] | replay DLQ_TOPIC PARTITION OFFSET`.
async fn events(client: &mut etcd_client::Client, prefix: &str, args: &[String]) -> ExitCode {
    const EVENTS: &str = "events | events dead-letters [TOPIC] [--limit N] | events replay DLQ_TOPIC PARTITION OFFSET";
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["dead-letters", rest @ ..] => {
            let (mut topic, mut limit) = (None, 50usize);
            let mut rest = rest.iter();
            while let Some(a) = rest.next() {
                match (*a, rest.clone().next()) {
                    ("--limit", Some(n)) => match n.parse::<usize>() {
                        Ok(n) if (1..=meshkit_common::events::dead_letters::MAX_READ).contains(&n) => {
                            limit = n;
                            rest.next();
                        }
                        _ => {
                            return usage(&format!(
                                "--limit: {n:?} is not a number within 1..={}",
                                meshkit_common::events::dead_letters::MAX_READ
                            ));
                        }
                    },
                    (t, _) if topic.is_none() && !t.starts_with("--") => topic = Some(t),
                    (other, _) => return usage(&format!("events dead-letters: unexpected argument {other:?}")),
                }
            }
            finish(cmd::events_dead_letters(topic, limit).await)
        }
        ["replay", topic, partition, offset] => {
            let Ok(partition) = partition.parse::<i32>() else {
                return usage(&format!("events replay: partition {partition:?} is not a number"));
            };
            let Ok(offset) = offset.parse::<i64>() else {
                return usage(&format!("events replay: offset {offset:?} is not a number"));
            };
            finish(cmd::events_replay(client, prefix, topic, partition, offset, &cmd::operator()).await)
        }
        _ => usage(EVENTS),
    }
}

/// `jobs list | trigger NAME [PARAM] | pause NAME | resume NAME | history [NAME] [--limit N]`.
async fn jobs(client: &mut etcd_client::Client, prefix: &str, args: &[String]) -> ExitCode {
    let arg = |i: usize| args.get(i).map(String::as_str);
    let result = match (arg(0), args.len()) {
        (Some("list"), 1) => cmd::jobs_list(client, prefix).await,
        (Some("trigger"), 2 | 3) => cmd::jobs_trigger(client, prefix, &args[1], arg(2), &cmd::operator()).await,
        (Some("pause"), 2) => cmd::jobs_pause(client, prefix, &args[1], true, &cmd::operator()).await,
        (Some("resume"), 2) => cmd::jobs_pause(client, prefix, &args[1], false, &cmd::operator()).await,
        (Some("history"), _) => {
            let mut job = None;
            let mut limit = 50;
            let mut rest = args[1..].iter();
            while let Some(a) = rest.next() {
                match (a.as_str(), rest.clone().next()) {
                    ("--limit", Some(n)) => match n.parse::<i32>() {
                        Ok(n) if (1..=1000).contains(&n) => {
                            limit = n;
                            rest.next();
                        }
                        _ => return usage(&format!("--limit: {n:?} is not a number within 1..=1000")),
                    },
                    (name, _) if job.is_none() && !name.starts_with("--") => job = Some(name.to_owned()),
                    (other, _) => return usage(&format!("jobs history: unexpected argument {other:?}")),
                }
            }
            cmd::jobs_history(client, prefix, job.as_deref(), limit).await
        }
        _ => return usage("jobs list | trigger NAME [PARAM] | pause NAME | resume NAME | history [NAME] [--limit N]"),
    };
    finish(result)
}

/// `prometheus-sd [--out FILE] [--watch]`.
async fn prometheus_sd(client: &mut etcd_client::Client, prefix: &str, args: &[String]) -> ExitCode {
    let (mut out, mut watch) = (None, false);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--out" => match rest.next() {
                Some(path) => out = Some(std::path::PathBuf::from(path)),
                None => return usage("--out needs a FILE"),
            },
            "--watch" => watch = true,
            other => return usage(&format!("prometheus-sd: unknown argument {other:?}")),
        }
    }
    let result = match (&out, watch) {
        (None, true) => return usage("--watch needs --out FILE"),
        (None, false) => cmd::prometheus_targets(client, prefix).await,
        (Some(path), false) => cmd::write_prometheus_targets(client, prefix, path).await.map(|_| String::new()),
        (Some(path), true) => cmd::watch_prometheus_targets(client, prefix, path, std::time::Duration::from_secs(30))
            .await
            .map(|()| String::new()),
    };
    finish(result)
}

/// One line from standard input: passwords never go on the command line.
fn read_password() -> Option<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).ok()?;
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    (!line.is_empty()).then_some(line)
}

/// `certs --dir DIR [--trust-domain D] [--days N] NAME…`.
fn certs(args: &[String]) -> ExitCode {
    let (mut dir, mut domain, mut days, mut names) = (None, "meshkit".to_owned(), 365u32, Vec::new());
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--dir" => dir = rest.next().cloned(),
            "--trust-domain" => match rest.next() {
                Some(d) => domain = d.clone(),
                None => return usage("--trust-domain needs a value"),
            },
            "--days" => match rest.next().and_then(|d| d.parse().ok()).filter(|d| (1..=3650).contains(d)) {
                Some(d) => days = d,
                None => return usage("--days needs a number within 1..=3650"),
            },
            name => names.push(name.to_owned()),
        }
    }
    let Some(dir) = dir else { return usage("certs needs --dir DIR") };
    if names.is_empty() {
        return usage("certs needs at least one NAME (user-service, gateway, …)");
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    finish(cmd::certs::issue(std::path::Path::new(&dir), &domain, &names, days).map(|issued| {
        issued.iter().map(|i| format!("{}  {}  {}\n", i.identity, i.cert.display(), i.key.display())).collect()
    }))
}

/// Prints a command's text, or its error, and the exit code that goes with it.
fn finish(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // An outage is said as one, not as a gRPC status to decode.
            match e
                .chain()
                .find_map(|c| c.downcast_ref::<etcd_client::Error>())
                .and_then(meshkit_common::etcd::unavailable)
            {
                Some(reason) => eprintln!("meshctl: etcd is unavailable: {reason} ({e:#})"),
                None => eprintln!("meshctl: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("meshctl: {problem}\n\n{}", cmd::USAGE);
    ExitCode::from(2)
}

/// `xds bootstrap [--server HOST:PORT] [--node ID] [--zone ZONE]`: printed, no etcd needed.
fn xds_bootstrap(args: &[String]) -> ExitCode {
    let (mut server, mut node, mut zone) = ("127.0.0.1:18000".to_owned(), "grpc-client".to_owned(), String::new());
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let Some(value) = rest.next() else { return usage(&format!("xds bootstrap: {flag} needs a value")) };
        match flag.as_str() {
            "--server" => server.clone_from(value),
            "--node" => node.clone_from(value),
            "--zone" => zone.clone_from(value),
            other => return usage(&format!("xds bootstrap: unknown option {other:?}")),
        }
    }
    if server.parse::<std::net::SocketAddr>().is_err() && !server.contains(':') {
        return usage(&format!("xds bootstrap: --server {server:?} is not HOST:PORT"));
    }
    let tls = match cmd::CtlConfig::load() {
        Ok(config) => config.tls.enabled.then_some(config.tls),
        Err(e) => return usage(&e.to_string()),
    };
    print!("{}", cmd::xds::bootstrap(&server, &node, &zone, tls.as_ref()));
    ExitCode::SUCCESS
}
