//! Reading what `/metrics` serves, strictly (a malformed line fails the
//! test), and a real Prometheus that scrapes it.

use std::collections::HashMap;

/// Parses Prometheus text: every sample line is `name{labels} value`,
/// every comment a `# HELP` or `# TYPE`; no family declared twice, no series
/// twice.
pub fn parse(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            assert!(line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "), "{line}");
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("no type: {line}"));
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(typed.insert(name.to_owned()), "family {name} declared twice");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels in {line}");
        }
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
        assert!(samples.insert(series.to_owned(), value).is_none(), "duplicate series {series}");
    }
    samples
}

/// A real Prometheus (Debian's `prometheus`) on a free loopback port with
/// its data in a temp dir; killed when dropped.
pub struct Prometheus {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl Prometheus {
    /// Starts `prometheus --config.file=CONFIG` and waits until it is ready.
    pub async fn start(config: &std::path::Path, data: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let port = crate::free_port();
        let log = std::fs::File::create(data.with_extension("log"))?;
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus: run deploy/local/install-deps.sh")?;
        let prometheus = Self { child, addr: format!("127.0.0.1:{port}").parse()? };
        let ready = crate::eventually("prometheus is ready", std::time::Duration::from_secs(20), || async {
            prometheus.get("/-/ready").await.ok().filter(|r| r.status == 200).map(|_| ())
        });
        ready.await;
        Ok(prometheus)
    }

    /// `GET path` over HTTP/1.1 (with the `Host` header Go's server requires).
    async fn get(&self, path: &str) -> anyhow::Result<crate::http::Reply> {
        let mut request = crate::http::json_request("GET", self.addr, path, "");
        request.headers_mut().insert(http::header::HOST, self.addr.to_string().parse()?);
        crate::http::send(self.addr, request).await
    }

    /// `GET /api/v1/{path}` → the `data` of a successful answer.
    pub async fn api(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let body = self.get(&format!("/api/v1/{path}")).await?.json();
        anyhow::ensure!(body["status"] == "success", "{path}: {body}");
        Ok(body["data"].clone())
    }

    /// An instant query's result vector.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let encoded: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let data = self.api(&format!("query?query={encoded}")).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
