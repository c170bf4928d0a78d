//! `Prometheus`: a real Prometheus server (Debian's) on loopback scraping
//! nodes' `/metrics` every second, queried through its HTTP API.

use std::time::Duration;

use super::{KillOnDrop, start_on_free_port, wait_listening, wait_until};

pub struct Prometheus {
    port: u16,
    /// Dropped (killed) before its directory goes.
    _child: KillOnDrop,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `targets` (`host:port` of admin listeners) as job `mxrelay`.
    pub fn start(targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let list = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: mxrelay\n    static_configs:\n      - targets: [{list}]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let log = dir.path().join("prometheus.log");
        let (port, child) = start_on_free_port("prometheus", |port| {
            let mut child = KillOnDrop(
                std::process::Command::new("/usr/bin/prometheus")
                    .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
                    .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .expect("prometheus (scripts/test.sh installs it)"),
            );
            let log = || std::fs::read_to_string(&log).unwrap_or_default();
            wait_listening("prometheus", &mut child, port, Duration::from_secs(30), log)?;
            Ok((port, child))
        });
        let p = Prometheus { port, _child: child, _dir: dir };
        wait_until("prometheus ready", Duration::from_secs(30), || p.get("/-/ready").starts_with("HTTP/1.1 200"));
        p
    }

    fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return String::new() };
        let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// An instant query through the HTTP API; the `data.result` array.
    pub fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        self.try_query(promql).unwrap_or_else(|e| panic!("{promql}: {e}"))
    }

    /// As [`Prometheus::query`]; Prometheus's error (a query that does not
    /// parse or cannot run) as `Err`.
    pub fn try_query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let encoded: String = promql
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"_-.".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let reply = self.get(&format!("/api/v1/query?query={encoded}"));
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
        // Chunked or not, the JSON object is the outermost {...}.
        let json = &body[body.find('{').unwrap_or(0)..=body.rfind('}').unwrap_or(0)];
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("{e}: {reply}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of each series of `promql`, by its `instance` label.
    pub fn by_instance(&self, promql: &str) -> Vec<(String, f64)> {
        self.query(promql)
            .iter()
            .filter_map(|r| {
                Some((r["metric"]["instance"].as_str()?.to_string(), r["value"][1].as_str()?.parse().ok()?))
            })
            .collect()
    }
}
