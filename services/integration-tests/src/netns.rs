//! Hosts of a test's own: network namespaces on one Linux bridge, so that one
//! host can be cut off from another while both keep running (on loopback a
//! process is either up or dead).
//!
//! The bridge lives in the test's namespace with the first address of the
//! subnet, so the test process itself is a host too: the client. Each
//! [`Host`] is a namespace with one veth on the bridge. Cuts and packet loss
//! are nftables rules inside the host's namespace (its own ruleset, nothing
//! outside it changes): dropped packets, never a reset. This kernel has no
//! `netem`, so delay is a userspace proxy ([`DelayProxy`]).
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables).

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (install iproute2 and nftables)"))?;
    ensure!(out.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// A bridge and the namespaces on it; all removed when dropped (processes
/// started in a namespace must be stopped first: drop them before this).
pub struct Network {
    id: u16,
    bridge: String,
    hosts: Mutex<Vec<String>>,
}

impl Network {
    /// A bridge on `10.213.<n>.0/24` with a name of this process's own (and
    /// of this network's, within it), so tests running side by side never
    /// share one.
    pub fn new() -> anyhow::Result<Self> {
        ensure!(
            Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0"),
            "network namespaces need root"
        );
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let nth = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 4;
        let id = 20 + (std::process::id() % 50) as u16 * 4 + nth;
        let bridge = format!("mkbr{id}");
        // A bridge left by a crashed run of a process with the same pid.
        let _ = run("ip", &["link", "del", &bridge]);
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        let net = Network { id, bridge, hosts: Mutex::default() };
        run("ip", &["addr", "add", &format!("{}/24", net.client_ip()), "dev", &net.bridge])?;
        run("ip", &["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// The test process's own address on the bridge: where its calls come from.
    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.id as u8, 1)
    }

    /// A new host `label` (a few letters) with the next address.
    pub fn host(&self, label: &str) -> anyhow::Result<Host> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let n = hosts.len() as u8 + 2;
        let ns = format!("meshkit-{}-{label}", self.id);
        let outside = format!("mk{}{label}", self.id);
        let inside = format!("{outside}i");
        ensure!(inside.len() <= 15, "host label {label:?} is too long for an interface name");
        let _ = run("ip", &["netns", "del", &ns]);
        run("ip", &["netns", "add", &ns])?;
        hosts.push(ns.clone());
        let ip = Ipv4Addr::new(10, 213, self.id as u8, n);
        run("ip", &["link", "add", &outside, "type", "veth", "peer", "name", &inside])?;
        run("ip", &["link", "set", &inside, "netns", &ns])?;
        run("ip", &["link", "set", &outside, "master", &self.bridge])?;
        run("ip", &["link", "set", &outside, "up"])?;
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        exec(&["ip", "link", "set", "lo", "up"])?;
        exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &inside])?;
        exec(&["ip", "link", "set", &inside, "up"])?;
        Ok(Host { ns, ip })
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self.hosts.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            // Deleting a namespace deletes its end of the veth, and so the pair.
            let _ = run("ip", &["netns", "del", &ns]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}

/// One namespace on the bridge, with one address.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl Host {
    /// `program` run in this host's namespace (`ip netns exec` execs it in
    /// place, so the pid is the program's and signals reach it).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns]).arg(program);
        command
    }

    /// A free port on this host (a new namespace has every port free, but
    /// processes started here earlier may hold some).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), crate::free_port())
    }

    fn nft(&self, script: &str) -> anyhow::Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (install nftables)")?;
        use std::io::Write;
        child.stdin.take().context("nft stdin")?.write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft: {}: {script}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Drops every packet between this host and `peers`, both ways, from now
    /// until [`heal`](Self::heal): the peers see silence, not a reset.
    pub fn cut_off_from(&self, peers: &[Ipv4Addr]) -> anyhow::Result<()> {
        let set = peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
        self.nft(&format!(
            "table ip meshkit_cut {{\n\
               chain input {{ type filter hook input priority 0; ip saddr {{ {set} }} drop; }}\n\
               chain output {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; }}\n\
             }}\n"
        ))
    }

    /// Drops `percent` of the packets this host exchanges with `peer`, at random, each way.
    pub fn lose(&self, percent: u32, peer: Ipv4Addr) -> anyhow::Result<()> {
        ensure!(percent <= 100, "loss of {percent}%");
        self.nft(&format!(
            "table ip meshkit_loss {{\n\
               chain input {{ type filter hook input priority 0; ip saddr {peer} numgen random mod 100 < {percent} drop; }}\n\
               chain output {{ type filter hook output priority 0; ip daddr {peer} numgen random mod 100 < {percent} drop; }}\n\
             }}\n"
        ))
    }

    /// Removes every cut and every loss rule.
    pub fn heal(&self) -> anyhow::Result<()> {
        let _ = self.nft("delete table ip meshkit_cut\n");
        let _ = self.nft("delete table ip meshkit_loss\n");
        Ok(())
    }
}

/// A TCP proxy that holds every chunk `delay` before passing it on, each way,
/// keeping order: a link with that much latency (one way per direction, so a
/// round trip through it costs twice `delay`).
pub struct DelayProxy {
    addr: SocketAddr,
    accept: JoinHandle<()>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl DelayProxy {
    /// Listens on `listen` (port 0 for a free one) and forwards to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let links_ = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let _ = inbound.set_nodelay(true);
                let link = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let _ = outbound.set_nodelay(true);
                    let (in_r, in_w) = inbound.into_split();
                    let (out_r, out_w) = outbound.into_split();
                    tokio::join!(pipe(in_r, out_w, delay), pipe(out_r, in_w, delay));
                });
                links_.lock().unwrap_or_else(|p| p.into_inner()).push(link);
            }
        });
        Ok(Self { addr, accept, links })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Reads as fast as data comes and writes each chunk once it is `delay` old.
async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for link in self.links.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            link.abort();
        }
    }
}
