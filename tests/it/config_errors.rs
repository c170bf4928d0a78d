//! A bad configuration stops the real binary before it serves anything, and
//! its stderr names each bad key (with the variable, when the value came
//! from the environment), the bad value and the fix.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `mxrelay ARGS…` with only `env` set (no stray `MXRELAY_*` from the
/// caller), in an empty directory; returns (exit code, stderr). A process
/// still running after 30 s accepted the configuration: it is killed and
/// the test fails.
fn mxrelay(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mxrelay binary");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("mxrelay {args:?} with {env:?} accepted the configuration and kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status.code(), stderr)
}

fn refused(args: &[&str], env: &[(&str, &str)], expected: &[&str]) {
    let (code, stderr) = mxrelay(args, env);
    assert!(code.is_some_and(|c| c != 0), "{args:?} {env:?} exited {code:?}:\n{stderr}");
    for text in expected {
        assert!(stderr.contains(text), "{args:?} {env:?}: stderr lacks {text:?}:\n{stderr}");
    }
}

#[test]
fn bad_env_values_are_refused_naming_key_variable_and_value() {
    for (name, value, key) in [
        ("MXRELAY_MESSAGE_SIZE_LIMIT", "-5", "message_size_limit"),
        ("MXRELAY_MESSAGE_SIZE_LIMIT", "10MB", "message_size_limit"),
        ("MXRELAY_SMTP_COMMAND_TIMEOUT", "-3s", "smtp.command_timeout"),
        ("MXRELAY_SMTP_COMMAND_TIMEOUT", "0s", "smtp.command_timeout"),
        ("MXRELAY_SMTP_PROXY_PROTOCOL", "maybe", "smtp.proxy_protocol"),
    ] {
        refused(&["check-config"], &[(name, value)], &[&format!("config error: {key} ({name}): "), value, "(fix: "]);
    }
}

#[test]
fn every_bad_key_of_a_file_is_named_with_its_section() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mxrelay.toml");
    std::fs::write(
        &file,
        "message_size_limit = \"10MB\"\n\
         [smtp]\nlistn = \"127.0.0.1:25\"\ncommand_timeout = \"-3s\"\nproxy_protocol = \"maybe\"\n\
         [queue]\nlease = \"0s\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    refused(
        &["check-config", "--config", path],
        &[],
        &[
            "config error: message_size_limit: ",
            "\"10MB\"",
            "config error: smtp.listn: unknown field `listn`",
            "config error: smtp.command_timeout: ",
            "\"-3s\"",
            "config error: smtp.proxy_protocol: ",
            "\"maybe\"",
            "config error: queue.lease: ",
        ],
    );
}

#[test]
fn serve_refuses_a_zero_timeout_before_listening() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    refused(
        &["serve"],
        &[("MXRELAY_SMTP_LISTEN", &listen), ("MXRELAY_SMTP_COMMAND_TIMEOUT", "0s")],
        &["config error: smtp.command_timeout (MXRELAY_SMTP_COMMAND_TIMEOUT): 0s", "more than 0s"],
    );
}

#[test]
fn queue_urls_and_password_files_are_checked_naming_the_key() {
    refused(
        &["check-config"],
        &[("MXRELAY_QUEUE_URL", "redis+sentinel://127.0.0.1:26379")],
        &["config error: queue.url", "names no master", "(fix: use redis://"],
    );
    refused(
        &["check-config"],
        &[("MXRELAY_QUEUE_URL", "redis+cluster://127.0.0.1:7000,127.0.0.1:7001/2")],
        &["config error: queue.url", "names a database, but a Redis Cluster has only database 0"],
    );
    refused(
        &["check-config"],
        &[("MXRELAY_QUEUE_PASSWORD_FILE", "/nonexistent/redis-password")],
        &[
            "config error: queue.password_file (MXRELAY_QUEUE_PASSWORD_FILE): cannot read \"/nonexistent/redis-password\"",
        ],
    );
    refused(
        &["check-config"],
        &[
            ("MXRELAY_QUEUE_URL", "rediss+sentinel://127.0.0.1:26379/mxq"),
            ("MXRELAY_QUEUE_SENTINEL_PASSWORD_FILE", "/nonexistent/sentinel-password"),
        ],
        &[
            "config error: queue.sentinel_password_file (MXRELAY_QUEUE_SENTINEL_PASSWORD_FILE): cannot read",
            "(fix: point it at a readable file holding only the Sentinels' password)",
        ],
    );
    refused(
        &["check-config"],
        &[("MXRELAY_QUEUE_URL", "redis://127.0.0.1:6379/0"), ("MXRELAY_QUEUE_SENTINEL_USER", "watcher")],
        &["config error: queue.sentinel_user (MXRELAY_QUEUE_SENTINEL_USER)", "names no Sentinels"],
    );
    refused(
        &["check-config"],
        &[("MXRELAY_QUEUE_URL", "redis://127.0.0.1:6379/0"), ("MXRELAY_QUEUE_TLS_CA_FILE", "/etc/ssl/certs/ca.pem")],
        &["config error: queue.tls_ca_file (MXRELAY_QUEUE_TLS_CA_FILE)", "is not a rediss URL"],
    );
    refused(
        &["check-config"],
        &[("MXRELAY_DOMAINS_PASSWORD_FILE", "/nonexistent/db-password")],
        &["config error: domains.password_file (MXRELAY_DOMAINS_PASSWORD_FILE): cannot read"],
    );
    // A readable file: its password is used, and never shown.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("redis-password");
    std::fs::write(&secret, "Sup3r-s3cret\n").unwrap();
    let (code, stderr) = mxrelay(
        &["check-config"],
        &[
            ("MXRELAY_QUEUE_URL", "redis+sentinel://app@127.0.0.1:26379,127.0.0.1:26380/mxq"),
            ("MXRELAY_QUEUE_PASSWORD_FILE", secret.to_str().unwrap()),
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let shown = check_config_output(&[
        ("MXRELAY_QUEUE_URL", "redis+sentinel://app@127.0.0.1:26379,127.0.0.1:26380/mxq"),
        ("MXRELAY_QUEUE_PASSWORD_FILE", secret.to_str().unwrap()),
    ]);
    assert!(shown.contains("redis+sentinel://app:***@127.0.0.1:26379,127.0.0.1:26380/mxq"), "{shown}");
    assert!(!shown.contains("Sup3r"), "{shown}");
    let shown = check_config_output(&[
        ("MXRELAY_QUEUE_URL", "redis+cluster://app@127.0.0.1:7000,127.0.0.1:7001"),
        ("MXRELAY_QUEUE_PASSWORD_FILE", secret.to_str().unwrap()),
    ]);
    assert!(shown.contains("redis+cluster://app:***@127.0.0.1:7000,127.0.0.1:7001"), "{shown}");
    assert!(!shown.contains("Sup3r"), "{shown}");
    // TLS files go with every rediss form, the Sentinels' password with both Sentinel forms.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, crate::support::pki::TestPki::localhost().cert_pem).unwrap();
    for (url, extra) in [
        ("rediss+cluster://127.0.0.1:7000", ("MXRELAY_QUEUE_TLS_CA_FILE", ca.to_str().unwrap())),
        ("rediss+sentinel://127.0.0.1:26379/mxq", ("MXRELAY_QUEUE_SENTINEL_PASSWORD_FILE", secret.to_str().unwrap())),
    ] {
        let (code, stderr) = mxrelay(
            &["check-config"],
            &[("MXRELAY_QUEUE_URL", url), ("MXRELAY_QUEUE_TLS_CA_FILE", ca.to_str().unwrap()), extra],
        );
        assert_eq!(code, Some(0), "{url}: {stderr}");
    }
}

/// What `check-config` prints on stdout for a valid configuration.
fn check_config_output(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mxrelay"))
        .arg("check-config")
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .output()
        .expect("mxrelay binary");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}
