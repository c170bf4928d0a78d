//! The Helm chart in `deploy/k8s/mxrelay`, checked without a cluster:
//! `helm lint --strict`; `helm template` with the switches off and on; every
//! rendered object against the Kubernetes JSON schemas
//! (`kubernetes-validate --strict`, oldest supported and newest known
//! Kubernetes; the ServiceMonitor is a CRD they do not cover and is checked
//! field by field here); the specifics of the issue (image, probes, ports,
//! env, drain, Service, PDB, HPA, hook Job); the rendered configuration and
//! environment through `mxrelay check-config`; and the rendered containers
//! run for real: the migration Job's command against MariaDB, then the
//! Deployment's against MariaDB and Redis, answering its probes and draining
//! on SIGTERM. Plus the example DNS zone.
//!
//! helm, kubernetes-validate and a python3 with PyYAML (to turn the rendered
//! multi-document YAML into JSON) come from the virtualenv `scripts/test.sh`
//! puts on PATH; a missing tool fails the test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::pki::TestPki;
use crate::support::*;
use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s/mxrelay");
const ZONE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s/dns-zone.example");
const RELEASE: &str = "mxrelay";
const NAMESPACE: &str = "mail";
/// The chart's kubeVersion floor and the newest Kubernetes the validator knows.
const KUBE_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// What the pods read from the Secret, in the tests that do not run them.
const FAKE_DOMAINS_URL: &str = "mysql://mail:secret@mysql.mail.svc:3306/mail";
const FAKE_QUEUE_URL: &str = "redis://:secret@redis.mail.svc:6379/0";
/// A pod name, for `fieldRef: metadata.name`.
const POD_NAME: &str = "mxrelay-6d4cf9b7c5-x2x9q";

const PROXY: &[&str] = &["service.proxyProtocol=true", "service.proxyNetworks={10.0.0.0/8,192.0.2.0/24}"];
/// Every switch on at once.
const EVERYTHING: &[&str] = &[
    "service.proxyProtocol=true",
    "service.proxyNetworks={10.0.0.0/8}",
    "serviceMonitor.enabled=true",
    "serviceMonitor.labels.release=kube-prometheus-stack",
    "tls.enabled=true",
    "tls.secretName=mx-example-org-tls",
    "tls.implicit.enabled=true",
    "secret.create=true",
    "secret.domainsUrl=mysql://mail:pw@mysql:3306/mail",
    "secret.queueUrl=redis://redis:6379/0",
    "autoscaling.targetMemoryUtilizationPercentage=80",
    "config.smtp.connection_rate_limit=60",
    "config.delivery.tls_policy_map.\\.example\\.net=verify",
];

// ---------------------------------------------------------------- tools

/// The directory on PATH that holds helm (the test command's virtualenv).
fn tools_dir() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).find(|dir| dir.join("helm").is_file()).unwrap_or_else(|| {
        panic!(
            "helm is not on PATH: scripts/test.sh installs it with kubernetes-validate into \
             ~/.cache/mxrelay-test-tools and puts its bin/ on PATH"
        )
    })
}

/// A tool next to helm: kubernetes-validate, or the virtualenv's python3.
fn tool(name: &str) -> PathBuf {
    let path = tools_dir().join(name);
    assert!(path.is_file(), "{} is missing (scripts/test.sh installs it next to helm)", path.display());
    path
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn helm_template(sets: &[&str], kube_version: &str) -> Output {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", RELEASE, CHART, "--namespace", NAMESPACE, "--kube-version", kube_version]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    run(&mut cmd)
}

/// The objects `helm template` renders with `sets`.
fn render(sets: &[&str]) -> Vec<Value> {
    let out = helm_template(sets, KUBE_VERSIONS[0]);
    assert!(out.ok, "helm template {sets:?} failed:\n{}", out.stderr);
    yaml_documents(&out.stdout)
}

/// Multi-document YAML → JSON values, with PyYAML (serde_yaml is not a dependency).
fn yaml_documents(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(tool("python3"))
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(sys.stdin.read()) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 next to helm");
    child.stdin.take().expect("stdin").write_all(yaml.as_bytes()).expect("write YAML to python3");
    let out = child.wait_with_output().expect("python3 output");
    assert!(out.status.success(), "PyYAML could not parse the YAML:\n{}", String::from_utf8_lossy(&out.stderr));
    match serde_json::from_slice(&out.stdout).expect("JSON from python3") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

// ---------------------------------------------------------------- lookups

fn all_of<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<_> = all_of(objects, kind).into_iter().filter(|o| o["metadata"]["name"] == name).collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}, rendered: {:?}", kinds_and_names(objects));
    found[0]
}

fn kinds_and_names(objects: &[Value]) -> Vec<String> {
    objects.iter().map(|o| format!("{}/{}", str_at(o, "/kind"), str_at(o, "/metadata/name"))).collect()
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("no string at {pointer} in {v:#}"))
}

fn int_at(v: &Value, pointer: &str) -> i64 {
    v.pointer(pointer).and_then(Value::as_i64).unwrap_or_else(|| panic!("no integer at {pointer} in {v:#}"))
}

fn array_at<'a>(v: &'a Value, pointer: &str) -> &'a Vec<Value> {
    v.pointer(pointer).and_then(Value::as_array).unwrap_or_else(|| panic!("no array at {pointer} in {v:#}"))
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    array_at(workload, "/spec/template/spec/containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {workload:#}"))
}

fn env_var<'a>(container: &'a Value, name: &str) -> &'a Value {
    array_at(container, "/env")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name} in {:#}", container["env"]))
}

/// The number of a container port, by number or by name.
fn container_port(container: &Value, port: &Value) -> i64 {
    if let Some(n) = port.as_i64() {
        return n;
    }
    let name = port.as_str().expect("port is a number or a name");
    array_at(container, "/ports")
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| int_at(p, "/containerPort"))
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// `selector` (a label map) picks the pods of `workload`.
fn selects(selector: &Value, workload: &Value) -> bool {
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    let selector = selector.as_object().expect("selector is a label map");
    !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
}

fn config_toml(objects: &[Value]) -> String {
    str_at(one(objects, "ConfigMap", RELEASE), "/data/mxrelay.toml").to_string()
}

fn config_table(objects: &[Value]) -> toml::Table {
    let text = config_toml(objects);
    toml::from_str(&text).unwrap_or_else(|e| panic!("the ConfigMap's mxrelay.toml is not TOML: {e}\n{text}"))
}

fn toml_str<'a>(table: &'a toml::Table, path: &str) -> &'a str {
    toml_at(table, path).as_str().unwrap_or_else(|| panic!("{path} is not a string"))
}

fn toml_at<'a>(table: &'a toml::Table, path: &str) -> &'a toml::Value {
    let (parents, last) = match path.rsplit_once('.') {
        Some((parents, last)) => (parents.split('.').collect::<Vec<_>>(), last),
        None => (vec![], path),
    };
    let mut t = table;
    for p in parents {
        t = t.get(p).and_then(toml::Value::as_table).unwrap_or_else(|| panic!("no table {p} in mxrelay.toml"));
    }
    t.get(last).unwrap_or_else(|| panic!("no key {path} in mxrelay.toml"))
}

fn port_of(listen: &str) -> i64 {
    listen.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("no port in {listen}"))
}

/// Where the file at a container path comes from, through the container's
/// volume mounts and the pod's projected volume: ("configMap" or "secret",
/// its name, its key).
fn mounted_source(workload: &Value, container: &Value, path: &str) -> (String, String, String) {
    let mount = array_at(container, "/volumeMounts")
        .iter()
        .find(|m| path.starts_with(&format!("{}/", str_at(m, "/mountPath"))))
        .unwrap_or_else(|| panic!("no volume mounted over {path}"));
    let relative = &path[str_at(mount, "/mountPath").len() + 1..];
    let volume = array_at(workload, "/spec/template/spec/volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    for source in array_at(volume, "/projected/sources") {
        for kind in ["configMap", "secret"] {
            let Some(items) = source[kind]["items"].as_array() else { continue };
            if let Some(item) = items.iter().find(|i| i["path"] == relative) {
                return (
                    kind.to_string(),
                    str_at(&source[kind], "/name").to_string(),
                    str_at(item, "/key").to_string(),
                );
            }
        }
    }
    panic!("nothing in volume {} projects {relative}", mount["name"]);
}

/// The container's environment as a pod would get it: plain values, the
/// Secret's keys from `secret`, the pod name for `metadata.name`.
fn resolve_env(container: &Value, secret: &[(&str, &str)]) -> Vec<(String, String)> {
    array_at(container, "/env")
        .iter()
        .map(|e| {
            let name = str_at(e, "/name").to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(key) = e.pointer("/valueFrom/secretKeyRef/key").and_then(Value::as_str) {
                let (_, v) = secret.iter().find(|(k, _)| *k == key).unwrap_or_else(|| panic!("secret key {key}"));
                v.to_string()
            } else if e.pointer("/valueFrom/fieldRef/fieldPath") == Some(&Value::from("metadata.name")) {
                POD_NAME.to_string()
            } else {
                panic!("cannot resolve env {e}")
            };
            (name, value)
        })
        .collect()
}

// ---------------------------------------------------------------- lint and schemas

#[test]
fn chart_lints_strictly() {
    for sets in [&[][..], PROXY, EVERYTHING] {
        let mut cmd = Command::new(tool("helm"));
        cmd.args(["lint", "--strict", CHART, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSIONS[0]]);
        for set in sets {
            cmd.args(["--set", set]);
        }
        let out = run(&mut cmd);
        assert!(out.ok, "helm lint --strict {sets:?}:\n{}{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("0 chart(s) failed"), "{}", out.stdout);
    }
}

#[test]
fn every_rendered_object_passes_the_kubernetes_schemas() {
    // (values, objects with a schema, ServiceMonitors)
    let variants: [(&[&str], usize, usize); 5] = [
        (&[], 7, 0),
        (&["redis.passwordSecret.name=redis-auth", "redis.caSecret.name=redis-ca"], 7, 0),
        (PROXY, 7, 0),
        (EVERYTHING, 8, 1),
        (&["autoscaling.enabled=false", "podDisruptionBudget.minAvailable=2"], 6, 0),
    ];
    for (sets, with_schema, service_monitors) in variants {
        let objects = render(sets);
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for (i, object) in objects.iter().enumerate() {
            if object["kind"] == "ServiceMonitor" {
                continue; // a CRD: checked by `service_monitor_only_when_enabled`
            }
            let file = dir.path().join(format!("{i:02}-{}.json", str_at(object, "/kind").to_lowercase()));
            std::fs::write(&file, serde_json::to_string_pretty(object).unwrap()).unwrap();
            files.push(file);
        }
        assert_eq!(all_of(&objects, "ServiceMonitor").len(), service_monitors, "{sets:?}");
        assert_eq!(files.len(), with_schema, "{sets:?}: {:?}", kinds_and_names(&objects));

        let mut cmd = Command::new(tool("kubernetes-validate"));
        cmd.arg("--strict");
        for version in KUBE_VERSIONS {
            cmd.args(["-k", version]);
        }
        cmd.args(&files);
        let out = run(&mut cmd);
        let report = format!("{sets:?}\n{}{}", out.stdout, out.stderr);
        // A kind without a schema is only a WARN with exit 0: every object must be reported as passed.
        assert!(out.ok && !out.stdout.contains("WARN") && !out.stdout.contains("ERROR"), "{report}");
        let passed =
            out.stdout.lines().filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource ")).count();
        assert_eq!(passed, files.len() * KUBE_VERSIONS.len(), "{report}");
    }
}

// ---------------------------------------------------------------- what the objects say

#[test]
fn deployment_runs_three_spread_relay_pods_with_probes_and_drain() {
    let objects = render(&[]);
    let deployment = one(&objects, "Deployment", RELEASE);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(int_at(deployment, "/spec/replicas"), 3);
    assert!(selects(&deployment["spec"]["selector"]["matchLabels"], deployment));

    let anti = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(str_at(anti, "/podAffinityTerm/topologyKey"), "kubernetes.io/hostname");
    assert!(selects(&anti["podAffinityTerm"]["labelSelector"]["matchLabels"], deployment), "{anti:#}");
    let hard = render(&["podAntiAffinity=hard"]);
    let hard = one(&hard, "Deployment", RELEASE);
    let term = &hard["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        [0];
    assert_eq!(str_at(term, "/topologyKey"), "kubernetes.io/hostname");

    let relay = container(deployment, "mxrelay");
    let chart = std::fs::read_to_string(Path::new(CHART).join("Chart.yaml")).unwrap();
    assert!(
        chart.contains(&format!("appVersion: \"{}\"", env!("CARGO_PKG_VERSION"))),
        "the chart's appVersion (the default image tag) should be the crate's version"
    );
    assert_eq!(str_at(relay, "/image"), format!("ghcr.io/mxrelay/mxrelay:{}", env!("CARGO_PKG_VERSION")));
    let tagged = render(&["image.tag=0.2.0-rc1"]);
    assert_eq!(
        str_at(container(one(&tagged, "Deployment", RELEASE), "mxrelay"), "/image"),
        "ghcr.io/mxrelay/mxrelay:0.2.0-rc1"
    );
    assert_eq!(relay["command"], serde_json::json!(["mxrelay"]));
    assert_eq!(relay["args"], serde_json::json!(["serve", "--config", "/etc/mxrelay/mxrelay.toml"]));
    assert_eq!(
        mounted_source(deployment, relay, "/etc/mxrelay/mxrelay.toml"),
        ("configMap".to_string(), RELEASE.to_string(), "mxrelay.toml".to_string())
    );

    // Ports: the ones the configuration listens on.
    let config = config_table(&objects);
    let ports: Vec<(&str, i64, &str)> = array_at(relay, "/ports")
        .iter()
        .map(|p| (str_at(p, "/name"), int_at(p, "/containerPort"), str_at(p, "/protocol")))
        .collect();
    assert_eq!(ports, [("smtp", 2525, "TCP"), ("admin", 9425, "TCP")]);
    assert_eq!(toml_str(&config, "smtp.listen"), "0.0.0.0:2525");
    assert_eq!(toml_str(&config, "admin.listen"), "0.0.0.0:9425");

    // Probes on the admin listener.
    let readiness = &relay["readinessProbe"]["httpGet"];
    assert_eq!(str_at(readiness, "/path"), "/readyz");
    assert_eq!(container_port(relay, &readiness["port"]), 9425);
    let liveness = &relay["livenessProbe"]["httpGet"];
    assert_eq!(str_at(liveness, "/path"), "/healthz");
    assert_eq!(container_port(relay, &liveness["port"]), 9425);

    // Environment: per-pod node_id, URLs from the Secret, migrations by the Job.
    assert_eq!(str_at(env_var(relay, "MXRELAY_NODE_ID"), "/valueFrom/fieldRef/fieldPath"), "metadata.name");
    for (name, key) in [("MXRELAY_DOMAINS_URL", "domains-url"), ("MXRELAY_QUEUE_URL", "queue-url")] {
        let secret = &env_var(relay, name)["valueFrom"]["secretKeyRef"];
        assert_eq!((str_at(secret, "/name"), str_at(secret, "/key")), ("mxrelay-urls", key), "{name}");
    }
    assert_eq!(str_at(env_var(relay, "MXRELAY_MIGRATE_ON_START"), "/value"), "false");
    // `kubectl exec … mxrelay queue stats` reads the same file as serve.
    assert_eq!(str_at(env_var(relay, "MXRELAY_CONFIG"), "/value"), "/etc/mxrelay/mxrelay.toml");
    let own = render(&["secret.name=relay-db", "secret.domainsUrlKey=mysql", "migration.enabled=false"]);
    let own = container(one(&own, "Deployment", RELEASE), "mxrelay");
    assert_eq!(str_at(env_var(own, "MXRELAY_DOMAINS_URL"), "/valueFrom/secretKeyRef/name"), "relay-db");
    assert_eq!(str_at(env_var(own, "MXRELAY_DOMAINS_URL"), "/valueFrom/secretKeyRef/key"), "mysql");
    assert_eq!(str_at(env_var(own, "MXRELAY_MIGRATE_ON_START"), "/value"), "true");
    // Service links would inject MXRELAY_SERVICE_HOST & co., which mxrelay refuses as unknown keys.
    assert_eq!(pod["enableServiceLinks"], false);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(int_at(pod, "/securityContext/runAsUser"), 10001);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    // Drain: preStop, then 30 s of sessions and delivery.stop_grace (10 s) within the grace period.
    let pre_stop = int_at(relay, "/lifecycle/preStop/sleep/seconds");
    assert!(pre_stop > 0);
    let grace = int_at(pod, "/terminationGracePeriodSeconds");
    assert!(grace > 40 + pre_stop, "terminationGracePeriodSeconds {grace} vs preStop {pre_stop} + 40");
    assert_eq!(grace, 60);
    assert_eq!(int_at(deployment, "/spec/strategy/rollingUpdate/maxUnavailable"), 0, "no capacity lost in a rollout");
}

#[test]
fn service_keeps_client_addresses_or_speaks_proxy_protocol() {
    let objects = render(&[]);
    let deployment = one(&objects, "Deployment", RELEASE);
    let relay = container(deployment, "mxrelay");
    let service = one(&objects, "Service", RELEASE);
    assert_eq!(str_at(service, "/spec/type"), "LoadBalancer");
    assert_eq!(str_at(service, "/spec/externalTrafficPolicy"), "Local");
    assert!(selects(&service["spec"]["selector"], deployment));
    let ports = array_at(service, "/spec/ports");
    assert_eq!(ports.len(), 1, "only SMTP on the load balancer: {ports:?}");
    assert_eq!((int_at(&ports[0], "/port"), container_port(relay, &ports[0]["targetPort"])), (25, 2525));
    let config = config_table(&objects);
    assert_eq!(toml_at(&config, "smtp.proxy_protocol").as_bool(), Some(false));

    // The admin listener stays inside the cluster.
    let admin = one(&objects, "Service", "mxrelay-admin");
    assert_eq!(str_at(admin, "/spec/type"), "ClusterIP");
    assert!(selects(&admin["spec"]["selector"], deployment));
    let admin_port = &array_at(admin, "/spec/ports")[0];
    assert_eq!((int_at(admin_port, "/port"), container_port(relay, &admin_port["targetPort"])), (9425, 9425));

    let proxied = render(PROXY);
    let service = one(&proxied, "Service", RELEASE);
    assert_eq!(str_at(service, "/spec/externalTrafficPolicy"), "Cluster");
    let text = config_toml(&proxied);
    assert!(text.contains("proxy_protocol = true"), "{text}");
    let config = config_table(&proxied);
    assert_eq!(toml_at(&config, "smtp.proxy_protocol").as_bool(), Some(true));
    let networks: Vec<&str> =
        toml_at(&config, "smtp.proxy_networks").as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(networks, ["10.0.0.0/8", "192.0.2.0/24"]);
}

#[test]
fn budget_autoscaler_and_configmap() {
    let objects = render(&[]);
    let deployment = one(&objects, "Deployment", RELEASE);

    let pdb = one(&objects, "PodDisruptionBudget", RELEASE);
    assert_eq!(str_at(pdb, "/apiVersion"), "policy/v1");
    assert_eq!(int_at(pdb, "/spec/maxUnavailable"), 1);
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], deployment));

    let hpa = one(&objects, "HorizontalPodAutoscaler", RELEASE);
    assert_eq!(str_at(hpa, "/apiVersion"), "autoscaling/v2");
    assert_eq!(
        (str_at(hpa, "/spec/scaleTargetRef/kind"), str_at(hpa, "/spec/scaleTargetRef/name")),
        ("Deployment", RELEASE)
    );
    assert_eq!(int_at(hpa, "/spec/minReplicas"), 3);
    assert!(int_at(hpa, "/spec/maxReplicas") >= 3);
    assert_eq!(str_at(hpa, "/spec/metrics/0/resource/name"), "cpu");
    assert!(container(deployment, "mxrelay").pointer("/resources/requests/cpu").is_some(), "HPA needs a CPU request");

    let fixed = render(&["autoscaling.enabled=false", "replicaCount=5", "podDisruptionBudget.minAvailable=2"]);
    assert!(all_of(&fixed, "HorizontalPodAutoscaler").is_empty());
    assert_eq!(int_at(one(&fixed, "Deployment", RELEASE), "/spec/replicas"), 5);
    let pdb = one(&fixed, "PodDisruptionBudget", RELEASE);
    assert_eq!(int_at(pdb, "/spec/minAvailable"), 2);
    assert!(pdb["spec"].get("maxUnavailable").is_none());

    // The ConfigMap is TOML from values; integers stay integers (Helm reads YAML numbers as floats).
    let config = config_table(&objects);
    assert_eq!(toml_str(&config, "myhostname"), "mx.example.org");
    assert_eq!(toml_at(&config, "message_size_limit").as_integer(), Some(52428800));
    assert_eq!(toml_str(&config, "log.format"), "json");
    for key in ["node_id", "migrate_on_start", "domains", "queue"] {
        assert!(!config.contains_key(key), "{key} comes from the environment, not the ConfigMap");
    }
    let tuned = render(&[
        "myhostname=mx1.example.org",
        "config.message_size_limit=524288000",
        "config.smtp.connection_rate_limit=60",
        "config.smtp.rate_window=2m",
        "config.delivery.tls_policy_map.\\.example\\.net=encrypt",
        "config.dns.nameservers={10.96.0.10}",
    ]);
    let config = config_table(&tuned);
    assert_eq!(toml_str(&config, "myhostname"), "mx1.example.org");
    assert_eq!(toml_at(&config, "message_size_limit").as_integer(), Some(524288000));
    assert_eq!(toml_at(&config, "smtp.connection_rate_limit").as_integer(), Some(60));
    assert_eq!(toml_str(&config, "smtp.rate_window"), "2m");
    assert_eq!(toml_str(&config, "smtp.listen"), "0.0.0.0:2525", "chart-owned keys survive values");
    assert_eq!(
        toml_at(&config, "delivery.tls_policy_map").as_table().unwrap()[".example.net"].as_str(),
        Some("encrypt")
    );
    assert_eq!(toml_at(&config, "dns.nameservers").as_array().unwrap()[0].as_str(), Some("10.96.0.10"));
    // A changed configuration rolls the pods.
    let checksum = |objects: &[Value]| {
        str_at(one(objects, "Deployment", RELEASE), "/spec/template/metadata/annotations/checksum~1config").to_string()
    };
    assert_ne!(checksum(&objects), checksum(&tuned));
}

#[test]
fn migration_job_is_a_helm_hook_running_migrate() {
    let objects = render(&[]);
    let job = one(&objects, "Job", "mxrelay-migrate");
    let annotations = &job["metadata"]["annotations"];
    let hooks: Vec<&str> = str_at(annotations, "/helm.sh~1hook").split(',').collect();
    assert_eq!(hooks, ["pre-install", "pre-upgrade"]);
    assert!(str_at(annotations, "/helm.sh~1hook-delete-policy").contains("before-hook-creation"));
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(str_at(pod, "/restartPolicy"), "Never");
    assert_eq!(pod["enableServiceLinks"], false);
    let migrate = container(job, "migrate");
    assert_eq!(migrate["command"], serde_json::json!(["mxrelay"]));
    assert_eq!(migrate["args"], serde_json::json!(["migrate"]));
    let deployment = one(&objects, "Deployment", RELEASE);
    assert_eq!(migrate["image"], container(deployment, "mxrelay")["image"]);
    for name in ["MXRELAY_DOMAINS_URL", "MXRELAY_QUEUE_URL", "MXRELAY_NODE_ID"] {
        assert_eq!(env_var(migrate, name), env_var(container(deployment, "mxrelay"), name), "{name}");
    }
    // Its pods are not the relay's.
    assert!(!selects(&deployment["spec"]["selector"]["matchLabels"], job));

    let off = render(&["migration.enabled=false"]);
    assert!(all_of(&off, "Job").is_empty());

    // A Secret made by the chart must exist before the Job: an earlier hook.
    let made = render(&["secret.create=true", "secret.domainsUrl=mysql://a:b@db/mail", "secret.queueUrl=redis://r/0"]);
    let secret = one(&made, "Secret", "mxrelay-urls");
    assert_eq!(str_at(secret, "/metadata/annotations/helm.sh~1hook"), "pre-install,pre-upgrade");
    let weight = |o: &Value| str_at(o, "/metadata/annotations/helm.sh~1hook-weight").parse::<i64>().unwrap();
    assert!(weight(secret) < weight(one(&made, "Job", "mxrelay-migrate")));
    assert_eq!(str_at(secret, "/stringData/domains-url"), "mysql://a:b@db/mail");
    assert!(all_of(&objects, "Secret").is_empty(), "no Secret unless secret.create");
}

#[test]
fn service_monitor_only_when_enabled() {
    assert!(all_of(&render(&[]), "ServiceMonitor").is_empty());
    let objects = render(&["serviceMonitor.enabled=true", "serviceMonitor.labels.release=kube-prometheus-stack"]);
    let monitor = one(&objects, "ServiceMonitor", RELEASE);
    assert_eq!(str_at(monitor, "/apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(str_at(monitor, "/metadata/labels/release"), "kube-prometheus-stack");
    assert_eq!(array_at(monitor, "/spec/namespaceSelector/matchNames")[0], NAMESPACE);
    // It selects the admin Service (only), by a port name that Service has.
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let services: Vec<&Value> = all_of(&objects, "Service")
        .into_iter()
        .filter(|s| selector.iter().all(|(k, v)| &s["metadata"]["labels"][k] == v))
        .collect();
    assert_eq!(services.len(), 1);
    assert_eq!(str_at(services[0], "/metadata/name"), "mxrelay-admin");
    let endpoint = &array_at(monitor, "/spec/endpoints")[0];
    assert_eq!(str_at(endpoint, "/path"), "/metrics");
    let port = str_at(endpoint, "/port");
    assert!(array_at(services[0], "/spec/ports").iter().any(|p| p["name"] == port), "port {port}");
    assert!(endpoint["interval"].is_string() && endpoint["scrapeTimeout"].is_string());
}

#[test]
fn tls_switch_mounts_the_certificate_and_opens_465() {
    let objects = render(&[]);
    assert!(config_table(&objects).get("tls").and_then(|t| t.get("cert")).is_none());
    assert!(!config_toml(&objects).contains("implicit_listen"));

    let objects = render(&["tls.enabled=true", "tls.secretName=mx-tls", "tls.implicit.enabled=true"]);
    let deployment = one(&objects, "Deployment", RELEASE);
    let relay = container(deployment, "mxrelay");
    let config = config_table(&objects);
    for (key, secret_key) in [("tls.cert", "tls.crt"), ("tls.key", "tls.key")] {
        let path = toml_str(&config, key);
        assert_eq!(
            mounted_source(deployment, relay, path),
            ("secret".to_string(), "mx-tls".to_string(), secret_key.to_string()),
            "{key} = {path}"
        );
    }
    let implicit = toml_str(&config, "tls.implicit_listen");
    let smtps = array_at(relay, "/ports").iter().find(|p| p["name"] == "smtps").expect("smtps port");
    assert_eq!(int_at(smtps, "/containerPort"), port_of(implicit));
    let service = one(&objects, "Service", RELEASE);
    let port = array_at(service, "/spec/ports").iter().find(|p| p["name"] == "smtps").expect("smtps on the Service");
    assert_eq!((int_at(port, "/port"), container_port(relay, &port["targetPort"])), (465, port_of(implicit)));
}

/// A Sentinel set or a TLS Redis with its password and CA in Secrets of
/// their own: the files the node is told about are those Secrets' keys.
#[test]
fn redis_passwords_and_ca_come_from_their_own_secrets() {
    let objects = render(&[]);
    let relay = container(one(&objects, "Deployment", RELEASE), "mxrelay");
    let names: Vec<&str> = array_at(relay, "/env").iter().map(|e| str_at(e, "/name")).collect();
    for var in ["MXRELAY_QUEUE_PASSWORD_FILE", "MXRELAY_QUEUE_SENTINEL_PASSWORD_FILE", "MXRELAY_QUEUE_TLS_CA_FILE"] {
        assert!(!names.contains(&var), "{var} without its Secret");
    }

    let objects = render(&[
        "redis.passwordSecret.name=redis-auth",
        "redis.passwordSecret.key=app-password",
        "redis.sentinelPasswordSecret.name=sentinel-auth",
        "redis.caSecret.name=redis-ca",
    ]);
    let deployment = one(&objects, "Deployment", RELEASE);
    let relay = container(deployment, "mxrelay");
    for (var, secret, key) in [
        ("MXRELAY_QUEUE_PASSWORD_FILE", "redis-auth", "app-password"),
        ("MXRELAY_QUEUE_SENTINEL_PASSWORD_FILE", "sentinel-auth", "sentinel-password"),
        ("MXRELAY_QUEUE_TLS_CA_FILE", "redis-ca", "ca.crt"),
    ] {
        let path = str_at(env_var(relay, var), "/value");
        assert_eq!(mounted_source(deployment, relay, path), ("secret".into(), secret.into(), key.into()), "{var}");
    }
}

#[test]
fn chart_refuses_values_that_cannot_work() {
    let cases: &[(&[&str], &str)] = &[
        (&["service.proxyProtocol=true"], "service.proxyProtocol needs service.proxyNetworks"),
        (&["tls.enabled=true"], "tls.enabled needs tls.secretName"),
        (&["tls.implicit.enabled=true"], "tls.implicit.enabled needs tls.enabled"),
        (&["terminationGracePeriodSeconds=45"], "terminationGracePeriodSeconds (45) must be above"),
        (&["secret.create=true"], "secret.create needs secret.domainsUrl"),
        (&["config.domains.url=mysql://u:pw@db/mail"], "config.domains.url would put a password into the ConfigMap"),
        (&["config.node_id=relay-1"], "config.node_id is set by the chart"),
        (&["podAntiAffinity=always"], "podAntiAffinity \"always\" is unknown"),
        (&["autoscaling.maxReplicas=2"], "autoscaling.maxReplicas must not be below"),
    ];
    for (sets, message) in cases {
        let out = helm_template(sets, KUBE_VERSIONS[0]);
        assert!(!out.ok && out.stderr.contains(message), "{sets:?} should fail with {message:?}:\n{}", out.stderr);
    }
    let out = helm_template(&[], "1.29.0");
    assert!(!out.ok && out.stderr.contains("kubeVersion"), "older than the chart's kubeVersion:\n{}", out.stderr);
}

// ---------------------------------------------------------------- the binary with the rendered files

/// `mxrelay check-config` on the rendered mxrelay.toml with the relay
/// container's rendered environment: every key and every MXRELAY_* name
/// must be one mxrelay knows, with a valid value.
#[test]
fn rendered_config_and_env_pass_mxrelay_check_config() {
    let pki = TestPki::localhost();
    for sets in [&[][..], PROXY, EVERYTHING] {
        let objects = render(sets);
        let deployment = one(&objects, "Deployment", RELEASE);
        let relay = container(deployment, "mxrelay");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mxrelay.toml");
        std::fs::write(&file, config_toml(&objects)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mxrelay"));
        cmd.env_clear()
            .args(["check-config", "--config"])
            .arg(&file)
            .envs(resolve_env(relay, &[("domains-url", FAKE_DOMAINS_URL), ("queue-url", FAKE_QUEUE_URL)]));
        if config_toml(&objects).contains("/etc/mxrelay/tls/") {
            // The pod's files are checked against the volume by tls_switch_mounts_the_certificate_and_opens_465.
            cmd.env("MXRELAY_TLS_CERT", &pki.cert).env("MXRELAY_TLS_KEY", &pki.key);
        }
        let out = run(&mut cmd);
        assert!(out.ok, "check-config {sets:?}:\n{}{}", out.stderr, config_toml(&objects));
        let effective: toml::Table = toml::from_str(&out.stdout).expect("check-config prints TOML");
        assert_eq!(toml_str(&effective, "node_id"), POD_NAME);
        assert_eq!(toml_at(&effective, "migrate_on_start").as_bool(), Some(false));
        assert_eq!(toml_str(&effective, "domains.url"), "mysql://mail:***@mysql.mail.svc:3306/mail");
        assert_eq!(toml_str(&effective, "smtp.listen"), "0.0.0.0:2525");
        assert_eq!(toml_at(&effective, "smtp.proxy_protocol").as_bool(), Some(sets.contains(&PROXY[0])));

        // The migration Job's container: no file, the same Secret. (On in
        // every render here: migration.enabled defaults to true.)
        let jobs = all_of(&objects, "Job");
        assert_eq!(jobs.len(), 1, "one migration Job with {sets:?}");
        let out = run(Command::new(env!("CARGO_BIN_EXE_mxrelay")).env_clear().arg("check-config").envs(resolve_env(
            container(jobs[0], "migrate"),
            &[("domains-url", FAKE_DOMAINS_URL), ("queue-url", FAKE_QUEUE_URL)],
        )));
        assert!(out.ok, "migration Job's environment {sets:?}:\n{}", out.stderr);
    }
}

/// A child process killed when the test ends.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// The rendered containers run: the Job's `migrate` creates the tables, the
/// relay pod (MXRELAY_MIGRATE_ON_START=false) becomes ready on its readiness
/// probe, stays live on its liveness probe, answers an idle session 421 on
/// SIGTERM, and exits well within the grace period. The listeners move to
/// loopback ports the system picks (port 0, read back from the log); the test
/// above checked that the rendered ones match the probes and ports.
#[test]
fn rendered_containers_migrate_then_serve_and_drain() {
    let objects = render(&[]);
    let db = TestDb::create(&MysqlServer::shared());
    let db_url = db.url();
    let secret = [("domains-url", db_url.as_str()), ("queue-url", SHARED_REDIS)];

    let job = one(&objects, "Job", "mxrelay-migrate");
    let migrate = container(job, "migrate");
    assert_eq!(str_at(migrate, "/command/0"), "mxrelay");
    let out = run(Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .env_clear()
        .args(array_at(migrate, "/args").iter().map(|a| a.as_str().unwrap()))
        .envs(resolve_env(migrate, &secret)));
    assert!(out.ok, "the migration Job's command failed:\n{}", out.stderr);
    assert_eq!(db.exec("SELECT COUNT(*) FROM domains"), "0\n");

    let deployment = one(&objects, "Deployment", RELEASE);
    let relay = container(deployment, "mxrelay");
    let pod = &deployment["spec"]["template"]["spec"];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mxrelay.toml");
    std::fs::write(&file, config_toml(&objects)).unwrap();
    let args: Vec<String> = array_at(relay, "/args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .map(|a| if a == "/etc/mxrelay/mxrelay.toml" { file.to_string_lossy().into_owned() } else { a.to_string() })
        .collect();
    let log = std::fs::File::create(dir.path().join("mxrelay.log")).unwrap();
    // Port 0: the ports the system picks, read back from the log.
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_mxrelay"))
            .env_clear()
            .args(&args)
            .envs(resolve_env(relay, &secret))
            .env("MXRELAY_SMTP_LISTEN", "127.0.0.1:0")
            .env("MXRELAY_ADMIN_LISTEN", "127.0.0.1:0")
            .env("MXRELAY_QUEUE_PREFIX", unique("mxrk8s"))
            .env("MXRELAY_SMTP_PEERNAME_LOOKUP", "false")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mxrelay binary"),
    );
    let log = || std::fs::read_to_string(dir.path().join("mxrelay.log")).unwrap_or_default();
    let readiness = str_at(relay, "/readinessProbe/httpGet/path");
    let liveness = str_at(relay, "/livenessProbe/httpGet/path");
    let exited = |child: &mut KillOnDrop| {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the relay pod's command exited with {status}:\n{}", log());
        }
    };
    let (smtp_port, admin_port) = wait_until_value("the relay pod's listeners", Duration::from_secs(30), || {
        exited(&mut child);
        listening_addrs(&log()).map(|(smtp, admin)| (smtp.port(), admin.port()))
    });
    let start = Instant::now();
    while http_status(admin_port, readiness) != Some(200) {
        exited(&mut child);
        assert!(start.elapsed() < Duration::from_secs(30), "never ready on {readiness}:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_status(admin_port, liveness), Some(200));
    assert!(log().contains(POD_NAME), "node_id from the pod name in the log:\n{}", log());

    // SIGTERM: an idle session is told at once (tests/it/ops.rs checks that
    // the pod is unready but live while a message is still coming in).
    let mut session = TcpStream::connect(("127.0.0.1", smtp_port)).unwrap();
    session.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 512];
    let n = session.read(&mut greeting).unwrap();
    assert!(greeting[..n].starts_with(b"220 mx.example.org"), "{}", String::from_utf8_lossy(&greeting[..n]));
    let stopping = Instant::now();
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let mut told = [0u8; 512];
    let n = session.read(&mut told).unwrap();
    assert!(
        told[..n].starts_with(b"421 4.3.0 mx.example.org Service shutting down"),
        "{}",
        String::from_utf8_lossy(&told[..n])
    );
    let budget = Duration::from_secs(
        (int_at(pod, "/terminationGracePeriodSeconds") - int_at(relay, "/lifecycle/preStop/sleep/seconds")) as u64,
    );
    let status = wait_until_value("the relay to exit after SIGTERM", budget, || child.try_wait().ok().flatten());
    assert!(status.success(), "exit {status}:\n{}", log());
    assert!(stopping.elapsed() < budget);
}

// ---------------------------------------------------------------- DNS

/// The zone snippet: three MX records of equal preference for example.org,
/// each naming a host with an A record in the snippet. (Parsed here: no
/// zone checker such as named-checkzone is installed by the test command.)
#[test]
fn dns_zone_example_has_three_equal_mx_records_with_addresses() {
    let zone = std::fs::read_to_string(ZONE).unwrap();
    let mut origin = String::new();
    // (owner, type, data fields)
    let mut records: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in zone.lines() {
        let line = line.split(';').next().unwrap_or_default().trim();
        if let Some(o) = line.strip_prefix("$ORIGIN") {
            origin = o.trim().to_string();
            continue;
        }
        if line.is_empty() || line.starts_with('$') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 4 && fields[1] == "IN", "owner IN TYPE DATA expected: {line}");
        records.push((
            absolute(fields[0], &origin),
            fields[2].to_string(),
            fields[3..].iter().map(|f| f.to_string()).collect(),
        ));
    }
    assert_eq!(origin, "example.org.");
    let mx: Vec<(&str, String)> = records
        .iter()
        .filter(|(owner, kind, _)| owner == "example.org." && kind == "MX")
        .map(|(_, _, data)| (data[0].as_str(), absolute(&data[1], &origin)))
        .collect();
    assert_eq!(mx.len(), 3, "{mx:?}");
    assert!(mx.iter().all(|(preference, _)| *preference == mx[0].0), "equal preference: {mx:?}");
    for (_, target) in &mx {
        let a: Vec<_> = records.iter().filter(|(owner, kind, _)| owner == target && kind == "A").collect();
        assert_eq!(a.len(), 1, "one A record for {target}");
        assert!(a[0].2[0].parse::<std::net::Ipv4Addr>().is_ok(), "{target} A {}", a[0].2[0]);
    }
}

fn absolute(name: &str, origin: &str) -> String {
    match name {
        "@" => origin.to_string(),
        n if n.ends_with('.') => n.to_string(),
        n => format!("{n}.{origin}"),
    }
}
