//! meshctl: services, instances and leases from etcd, and the pools and
//! event pipelines of running processes from their admin endpoints. See `meshctl --help`.

use std::process::ExitCode;

use meshkit_common::config::EtcdSettings;
use meshkit_meshctl as cmd;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut endpoints = std::env::var("MESHKIT_ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into());
    let mut prefix = std::env::var("MESHKIT_ETCD_PREFIX").unwrap_or_else(|_| "/meshkit".into());
    while let Some(flag) = args.first().filter(|a| a.starts_with("--")).cloned() {
        args.remove(0);
        match flag.as_str() {
            "--help" | "-h" => {
                println!("{}", cmd::USAGE);
                return ExitCode::SUCCESS;
            }
            "--etcd" | "--prefix" if !args.is_empty() => {
                let value = args.remove(0);
                if flag == "--etcd" { endpoints = value } else { prefix = value }
            }
            _ => return usage(&format!("unknown or incomplete option {flag:?}")),
        }
    }
    let settings = EtcdSettings {
        endpoints: endpoints.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
        ..Default::default()
    };
    let command = args.first().map(String::as_str);
    if !matches!(command, Some("services" | "instances" | "leases" | "pools" | "events")) {
        return usage(&match command {
            Some(c) => format!("unknown command {c:?}"),
            None => "a command is required".into(),
        });
    }
    if command == Some("pools") && args.len() != 2 {
        return usage("pools takes one INSTANCE_ID or ADMIN_ADDR");
    }
    let mut client = match meshkit_common::etcd::connect(&settings).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshctl: cannot reach etcd at {endpoints}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        Some("services") => cmd::services(&mut client, &prefix).await,
        Some("instances") => cmd::instances(&mut client, &prefix, args.get(1).map(String::as_str)).await,
        Some("leases") => cmd::leases(&mut client, &prefix).await,
        Some("events") => cmd::events(&mut client, &prefix).await,
        _ => cmd::pools(&mut client, &prefix, &args[1]).await,
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("meshctl: {problem}\n\n{}", cmd::USAGE);
    ExitCode::from(2)
}
