//! What ships in `deploy/` and the Dockerfile, checked with the real tools
//! the test command installs: promtool (config, rules, rule unit tests, and
//! the dashboard's PromQL), docker-compose (the Compose file), hadolint (the
//! Dockerfile); and every metric the dashboard and the alerts use exists on
//! a live node after a small workload, so renaming a metric fails here.
//! The Helm chart has its own file, `tests/it/deploy_k8s.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `program args` in `dir`; panics with its output unless it succeeds.
fn run_ok(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} (scripts/test.sh installs it): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

/// YAML → JSON through PyYAML (the test tools' Python has it).
fn yaml_to_json(yaml: &str) -> serde_json::Value {
    let mut child = Command::new("python3")
        .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "PyYAML could not parse the document");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/dashboards/mxrelay.json")).unwrap())
        .unwrap()
}

pub(crate) fn dashboard_exprs() -> Vec<String> {
    let d = dashboard();
    let panels = d["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    exprs
}

pub(crate) fn alert_exprs() -> Vec<String> {
    let rules = yaml_to_json(&std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap());
    let mut exprs = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    exprs
}

/// Every `mxrelay_…` name in a PromQL expression.
pub(crate) fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("mxrelay_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(expr[start..end].to_string());
        i = end;
    }
    names
}

#[test]
fn promtool_accepts_the_config_the_rules_and_their_tests() {
    let dir = repo().join("deploy/prometheus");
    run_ok(&dir, "promtool", &["check", "config", "prometheus.yml"]);
    let out = run_ok(&dir, "promtool", &["check", "rules", "alerts.yml"]);
    assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
    run_ok(&dir, "promtool", &["test", "rules", "alerts.test.yml"]);
    // The config scrapes exactly the compose file's relay nodes.
    let config = std::fs::read_to_string(dir.join("prometheus.yml")).unwrap();
    for node in ["relay1:9425", "relay2:9425", "relay3:9425"] {
        assert!(config.contains(node), "prometheus.yml does not scrape {node}");
    }
}

#[test]
fn the_dashboard_queries_are_valid_promql() {
    let d = dashboard();
    let panels = d["panels"].as_array().unwrap();
    let ids: BTreeSet<_> = panels.iter().map(|p| p["id"].as_u64().expect("panel id")).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids must be unique");
    let titles: Vec<&str> = panels.iter().map(|p| p["title"].as_str().unwrap()).collect();
    for wanted in
        ["Received per node", "Delivered per node", "Shared queue by state", "Oldest message", "RCPT outcomes"]
    {
        assert!(titles.iter().any(|t| t.starts_with(wanted)), "no panel {wanted:?} in {titles:?}");
    }
    // promtool checks PromQL in rule files: one recording rule per query.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, expr) in dashboard_exprs().iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "5m");
        rules.push_str(&format!(
            "      - record: dashboard:query{n}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    std::fs::write(dir.path().join("dashboard.rules.yml"), rules).unwrap();
    run_ok(dir.path(), "promtool", &["check", "rules", "dashboard.rules.yml"]);
}

#[test]
fn every_metric_in_the_dashboard_and_the_alerts_exists_on_a_live_node() {
    let w = World::start();
    // A small workload: one accepted message, one refused recipient.
    let (status, out) =
        swaks(&w.relay.addr(), &["--from", SENDER, "--to", "metrics@friet.pan", "--ehlo", "client.example"]);
    assert_eq!(status, 0, "{out}");
    let mut c = Raw::ehlo(&w.relay.addr());
    c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    assert!(c.cmd("RCPT TO:<x@other.example>").starts_with("454"));
    let text = w.relay.http_get("/metrics");
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let mut used = BTreeSet::new();
    for expr in dashboard_exprs().iter().chain(alert_exprs().iter()) {
        used.extend(metric_names(expr));
    }
    assert!(used.len() >= 20, "suspiciously few metrics found: {used:?}");
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "used in deploy/ but not exported by a node: {missing:?}");
}

#[test]
fn the_compose_file_is_valid_and_describes_the_cluster() {
    let dir = repo().join("deploy/compose");
    let rendered = run_ok(&dir, "docker-compose", &["--env-file", ".env.example", "-f", "compose.yaml", "config"]);
    let c = yaml_to_json(&rendered);
    let services = c["services"].as_object().unwrap();
    for name in ["redis", "mariadb", "migrate", "relay1", "relay2", "relay3", "prometheus", "grafana", "mailpit"] {
        assert!(services.contains_key(name), "compose has no service {name}");
    }
    let command = |s: &str| {
        c["services"][s]["command"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect::<Vec<_>>())
    };
    let redis = command("redis").unwrap().join(" ");
    assert!(redis.contains("--appendonly yes") && redis.contains("--appendfsync always"), "{redis}");
    assert_eq!(command("migrate").unwrap(), vec!["migrate"]);
    let mut published = BTreeSet::new();
    let mut node_ids = BTreeSet::new();
    for relay in ["relay1", "relay2", "relay3"] {
        let s = &c["services"][relay];
        assert_eq!(s["build"]["dockerfile"], "Dockerfile", "{relay} is built from the Dockerfile");
        assert!(s["image"].as_str().unwrap().starts_with("mxrelay"), "{relay} image");
        let ports = s["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0]["target"], 2525);
        published.insert(ports[0]["published"].to_string());
        let env = &s["environment"];
        node_ids.insert(env["MXRELAY_NODE_ID"].as_str().unwrap().to_string());
        assert!(
            env["MXRELAY_DOMAINS_URL"].as_str().unwrap().starts_with("mysql://mxrelay:change-me-mxrelay@mariadb:3306/")
        );
        assert_eq!(env["MXRELAY_QUEUE_URL"], "redis://redis:6379/");
        assert_eq!(env["MXRELAY_MIGRATE_ON_START"], "false");
        assert_eq!(s["depends_on"]["migrate"]["condition"], "service_completed_successfully");
        let health = s["healthcheck"]["test"].as_array().unwrap();
        assert_eq!(health.last().unwrap(), "healthcheck");
    }
    assert_eq!(published.len(), 3, "relay nodes must publish separate host ports");
    assert_eq!(node_ids.len(), 3, "relay nodes must have distinct node ids");
    // What Prometheus and Grafana mount exists.
    for mount in [
        "../prometheus/prometheus.yml",
        "../prometheus/alerts.yml",
        "../grafana/provisioning/datasources/prometheus.yml",
        "../grafana/provisioning/dashboards/mxrelay.yml",
        "../grafana/dashboards/mxrelay.json",
    ] {
        assert!(dir.join(mount).exists(), "{mount} is missing");
    }
    let volumes =
        |s: &str| c["services"][s]["volumes"].as_array().unwrap().iter().map(|v| v.to_string()).collect::<String>();
    assert!(volumes("prometheus").contains("deploy/prometheus:/etc/prometheus"));
    assert!(volumes("grafana").contains("deploy/grafana/provisioning:/etc/grafana/provisioning"));
    // Without the passwords the file refuses to start.
    let out = Command::new("docker-compose")
        .args(["-f", "compose.yaml", "--env-file", "/dev/null", "config"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "compose must insist on the passwords in .env");
}

/// `--profile ha`: a replica of the Redis and three Sentinels, each
/// configured as the real `redis-sentinel` accepts it (the rendered
/// command runs here against a local primary), and the nodes pointed at
/// the Sentinels through `QUEUE_URL`.
#[test]
fn the_compose_ha_profile_adds_a_replica_and_three_sentinels_the_nodes_can_use() {
    let dir = repo().join("deploy/compose");
    let sentinels = "redis+sentinel://sentinel1:26379,sentinel2:26379,sentinel3:26379/mxrelay";
    let out = Command::new("docker-compose")
        .args(["--env-file", ".env.example", "-f", "compose.yaml", "--profile", "ha", "config"])
        .env("QUEUE_URL", sentinels)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c = yaml_to_json(&String::from_utf8_lossy(&out.stdout));
    let words = |s: &str| -> Vec<String> {
        c["services"][s]["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    let replica = words("redis-replica").join(" ");
    assert!(replica.contains("--appendonly yes") && replica.contains("--replicaof redis 6379"), "{replica}");
    for relay in ["relay1", "relay2", "relay3"] {
        assert_eq!(c["services"][relay]["environment"]["MXRELAY_QUEUE_URL"], sentinels);
    }
    let primary = RedisServer::start();
    for s in ["sentinel1", "sentinel2", "sentinel3"] {
        let script = words(s)[2].clone();
        assert!(script.contains("sentinel monitor mxrelay redis 6379 2"), "{script}");
        let conf = tempfile::tempdir().unwrap();
        let path = conf.path().join("sentinel.conf");
        let log = conf.path().join("sentinel.log");
        let (port, sentinel) = start_on_free_port("redis-sentinel", |port| {
            let local = script
                .replace("/tmp/sentinel.conf", path.to_str().unwrap())
                .replace("exec redis-sentinel", "true")
                .replace("port 26379", &format!("port {port}"))
                .replace("redis 6379", &format!("127.0.0.1 {}", primary.port));
            assert!(Command::new("sh").args(["-c", &local]).status().unwrap().success());
            let mut sentinel = KillOnDrop(
                Command::new("redis-sentinel")
                    .arg(&path)
                    .stdout(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .expect("redis-sentinel"),
            );
            let log = || std::fs::read_to_string(&log).unwrap_or_default();
            wait_listening("redis-sentinel", &mut sentinel, port, std::time::Duration::from_secs(10), log)?;
            Ok((port, sentinel))
        });
        let named = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "SENTINEL", "get-master-addr-by-name", "mxrelay"])
            .output()
            .unwrap();
        drop(sentinel);
        let named = String::from_utf8_lossy(&named.stdout).to_string();
        assert!(named.contains(&primary.port.to_string()), "{s} does not watch the primary: {named}");
    }
}

#[test]
fn the_dockerfile_passes_hadolint_and_runs_non_root() {
    run_ok(&repo(), "hadolint", &["Dockerfile"]);
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: build, then run");
    assert!(froms[1].contains("debian:bookworm-slim"), "{froms:?}");
    assert!(text.contains("USER 10001"), "runs as a non-root user");
    assert!(text.contains("EXPOSE 2525 9425"));
    assert!(text.contains(r#"CMD ["mxrelay", "healthcheck"]"#));
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "target"), "the build context must not carry target/");
}

#[test]
fn the_healthcheck_command_reports_the_node() {
    let w = World::start();
    let check = |admin: &str| {
        Command::new(env!("CARGO_BIN_EXE_mxrelay"))
            .arg("healthcheck")
            .env("MXRELAY_ADMIN_LISTEN", admin)
            .env("MXRELAY_QUEUE_URL", SHARED_REDIS)
            .env("MXRELAY_DOMAINS_URL", w.db.url())
            .output()
            .unwrap()
    };
    assert!(check(&format!("0.0.0.0:{}", w.relay.admin_port)).status.success());
    let nothing = DownPort::new();
    let down = check(&format!("127.0.0.1:{}", nothing.port));
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("unhealthy"));
}
