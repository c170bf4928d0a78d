//! Real virus and spam scanners on loopback for end-to-end tests: a private
//! ClamAV `clamd` and a private `rspamd`, each on an ephemeral port of
//! 127.0.0.1, configured in a temporary directory, started in a few seconds
//! with nothing downloaded, and killed on drop. `scripts/test.sh` installs
//! the Debian packages (`clamav-daemon`, `clamav`, `rspamd`) with a
//! `policy-rc.d` that keeps the system services from starting.
//!
//! # clamd
//!
//! `clamd -c DIR/clamd.conf` in the foreground as the current user: TCP on
//! 127.0.0.1:PORT only (no local socket), the log, pid file and temporary
//! files in DIR, `SelfCheck 0` (no database reload checks) and `Bytecode no`
//! (there is no bytecode database). The signature database in DIR/db is made
//! by the test itself, with no freshclam:
//! - `mxrelay.ndb`: the body signature `Eicar-Test-Signature:0:*:HEX` of the
//!   EICAR string (target 0, any file: it matches the string in the plain
//!   text of a mail body as well as in a decoded attachment);
//! - `mxrelay.hdb`: `sigtool --md5` of [`TEST_FILE`], renamed
//!   `Mxrelay-Test-File`.
//!
//! clamd loads them in milliseconds and answers `PING` about 40 ms after it
//! is spawned. ClamAV appends `.UNOFFICIAL` to the name of every signature
//! that does not come from a database signed by Cisco-Talos (an unsigned
//! `.cud` container does not help, and a `.cld` needs Talos' signature), so
//! clamd reports `stream: Eicar-Test-Signature.UNOFFICIAL FOUND`: see
//! [`EICAR_FOUND`] and [`TEST_FILE_FOUND`].
//!
//! # rspamd
//!
//! `rspamd -f -i -c DIR/rspamd.conf --var=LOCAL_CONFDIR=DIR ...` in its own
//! process group, as the current user (`-i` lets it keep root's workers when
//! the tests run as root; `-u`/`-g` are not needed). DIR/rspamd.conf is the
//! packaged `/etc/rspamd/common.conf` without the Bayes classifier (its
//! backend is Redis) and with one worker only: `normal` on 127.0.0.1:PORT (no
//! controller, proxy or fuzzy worker on the fixed ports 11332..11335). The
//! packaged modules read DIR/local.d and DIR/override.d, where:
//! - every module that needs the network, DNS or Redis is disabled
//!   (`enabled = false`): fuzzy_check (it resolves rspamd.com's fuzzy servers
//!   through the system resolver when its configuration is read), rbl (with
//!   surbl and emails), dkim, spf, dmarc, arc, asn, hfilter, phishing,
//!   multimap and mid and whitelist (maps fetched from maps.rspamd.com),
//!   reputation, neural, ratelimit, greylist, history_redis, replies,
//!   url_redirector, bayes_expiry, dkim_signing, mx_check, rspamd_update and
//!   the external exporters and scanners; `filters` keeps only the C modules
//!   chartable and regexp;
//! - mime_types reads only the packaged map file (override.d), not
//!   maps.rspamd.com;
//! - `dns.nameserver` is a private dnsmasq ([`Dns`]) that answers NXDOMAIN
//!   to everything, so what is left (the PTR of an `IP:` header) is answered
//!   at once and nothing reaches the system resolver; RDNS_NONE and
//!   RDNS_DNSFAIL, which then only say there is no network, score 0;
//! - `hs_cache_dir` is shared by all the tests (in `CARGO_TARGET_TMPDIR`):
//!   before it listens, rspamd compiles the public-suffix list (9,600 TLDs)
//!   with Hyperscan, which takes about 10 s on this machine the first time
//!   and is then loaded from the cache in well under a second (its
//!   `hs_helper` compiles the regular expressions into the same cache in
//!   the background). The first start on a cold cache holds a lock so that
//!   parallel tests wait for it instead of compiling the same thing at
//!   once. A few small patterns are hashed with the instance's paths, so
//!   the cache grows by some 0.2 MB a start: past 512 MiB it is emptied.
//!
//! Warm, rspamd answers `/ping` about a second after it is spawned; a clean
//! short message is scanned in about a millisecond, the first scan of a
//! worker in some 100 ms (`scripts/bench-scan.sh` measures both:
//! docs/BENCHMARKS.md). GTUBE gives action `reject` (symbol GTUBE);
//! a short clean message with Date, Message-ID, From, To and Subject gives
//! `no action`. `stop` kills the whole process group (SIGKILL: an outage,
//! the port then refuses at once); `resume` starts it again on the same port.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Dns, start_on_free_port, wait_listening, wait_until};

/// The standard 68-byte EICAR anti-virus test string.
pub const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
/// The name of the EICAR body signature in the private database.
pub const EICAR_SIGNATURE: &str = "Eicar-Test-Signature";
/// The virus name clamd reports for EICAR (ClamAV marks signatures from an
/// unsigned database `.UNOFFICIAL`).
pub const EICAR_FOUND: &str = "Eicar-Test-Signature.UNOFFICIAL";
/// A harmless file that the private database knows by its MD5 hash.
pub const TEST_FILE: &[u8] = b"mxrelay scanner test file: harmless, known to the test clamd by its MD5 hash only.\n";
/// The name of [`TEST_FILE`]'s hash signature.
pub const TEST_FILE_SIGNATURE: &str = "Mxrelay-Test-File";
/// The virus name clamd reports for [`TEST_FILE`].
pub const TEST_FILE_FOUND: &str = "Mxrelay-Test-File.UNOFFICIAL";
/// The GTUBE anti-spam test string: rspamd rejects a message containing it.
pub const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// Kills `child` (SIGKILL) and reaps it.
fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The last `n` lines of a file (for failure messages).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until `ready` or panics when the process has exited or `timeout`
/// passed, with `log()` in the message.
fn wait_ready(
    what: &str,
    child: &mut Option<Child>,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
    log: impl Fn() -> String,
) {
    let start = Instant::now();
    loop {
        if ready() {
            return;
        }
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("{what} exited with {status} before it was ready:\n{}", log());
        }
        assert!(start.elapsed() < timeout, "{what} not ready after {timeout:?}:\n{}", log());
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn refuses(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

/// One clamd command (`z` form, NUL-terminated) and its reply, NUL and
/// trailing whitespace removed.
pub fn clamd_command(addr: &str, command: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("z{command}\0").as_bytes())?;
    read_clamd_reply(&mut s)
}

/// `zINSTREAM`: `data` in chunks of at most `chunk` bytes, each after its
/// 4-byte big-endian length, then a zero length; returns the reply, e.g.
/// `stream: OK` or `stream: NAME FOUND`.
pub fn clamd_instream(addr: &str, data: &[u8], chunk: usize) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"zINSTREAM\0")?;
    for part in data.chunks(chunk.max(1)) {
        s.write_all(&(part.len() as u32).to_be_bytes())?;
        s.write_all(part)?;
    }
    s.write_all(&0u32.to_be_bytes())?;
    read_clamd_reply(&mut s)
}

fn read_clamd_reply(s: &mut TcpStream) -> std::io::Result<String> {
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte)? == 1 && byte[0] != 0 {
        reply.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&reply).trim_end().to_string())
}

/// A private clamd on an ephemeral port with the test signatures.
pub struct ClamdServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ClamdServer {
    pub fn start() -> ClamdServer {
        Self::start_with(&[])
    }

    /// With extra `clamd.conf` lines, e.g. `StreamMaxLength 1M`.
    pub fn start_with(extra: &[&str]) -> ClamdServer {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let db = d.join("db");
        std::fs::create_dir_all(&db).unwrap();
        std::fs::create_dir_all(d.join("tmp")).unwrap();

        let hex: String = EICAR.bytes().map(|b| format!("{b:02x}")).collect();
        std::fs::write(db.join("mxrelay.ndb"), format!("{EICAR_SIGNATURE}:0:*:{hex}\n")).unwrap();

        // sigtool prints `md5:size:file name`; the name becomes the signature's.
        std::fs::write(d.join("test-file"), TEST_FILE).unwrap();
        let out = Command::new("sigtool")
            .args(["--md5", "test-file"])
            .current_dir(d)
            .output()
            .expect("sigtool (scripts/test.sh installs clamav)");
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let fields: Vec<&str> = line.trim().split(':').collect();
        assert!(
            out.status.success() && fields.len() == 3,
            "sigtool --md5 failed: {line}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(db.join("mxrelay.hdb"), format!("{}:{}:{TEST_FILE_SIGNATURE}\n", fields[0], fields[1])).unwrap();

        let extra: String = extra.iter().map(|line| format!("{line}\n")).collect();
        let mut server = ClamdServer { port: 0, dir, child: None };
        start_on_free_port("clamd", |port| {
            server.port = port;
            let d = server.dir.path();
            let conf = format!(
                "TCPSocket {port}\nTCPAddr 127.0.0.1\nForeground yes\nDatabaseDirectory {}\nLogFile {}\nLogTime yes\n\
                 PidFile {}\nTemporaryDirectory {}\nSelfCheck 0\nBytecode no\n{extra}",
                db.display(),
                d.join("clamd.log").display(),
                d.join("clamd.pid").display(),
                d.join("tmp").display(),
            );
            std::fs::write(d.join("clamd.conf"), conf).unwrap();
            server.try_resume()
        });
        server
    }

    /// Starts clamd again on the same port with the same database.
    pub fn resume(&mut self) {
        if let Err(log) = self.try_resume() {
            panic!("clamd did not start again on port {}:\n{log}", self.port);
        }
    }

    /// Starts clamd and waits until it listens itself and answers `PING`;
    /// its log if it exits before it listens.
    fn try_resume(&mut self) -> Result<(), String> {
        let d = self.dir.path();
        let stderr = File::create(d.join("clamd.stderr")).unwrap();
        let child = Command::new("clamd")
            .arg("-c")
            .arg(d.join("clamd.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("clamd (scripts/test.sh installs clamav-daemon)");
        let dir = d.to_path_buf();
        let log = || format!("{}\n{}", tail(&dir.join("clamd.stderr"), 20), tail(&dir.join("clamd.log"), 40));
        let timeout = Duration::from_secs(60);
        wait_listening("clamd", self.child.insert(child), self.port, timeout, log)?;
        let addr = self.addr();
        wait_ready("clamd", &mut self.child, timeout, || clamd_command(&addr, "PING").is_ok_and(|r| r == "PONG"), log);
        Ok(())
    }

    /// Kills clamd (SIGKILL): the port then refuses connections.
    pub fn stop(&mut self) {
        kill(&mut self.child);
        wait_until("clamd's port to refuse", Duration::from_secs(10), || refuses(self.port));
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// INSTREAM of `data` in 64 KiB chunks; the reply.
    pub fn scan(&self, data: &[u8]) -> String {
        clamd_instream(&self.addr(), data, 64 * 1024).expect("clamd INSTREAM")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("clamd.log")).unwrap_or_default()
    }
}

impl Drop for ClamdServer {
    fn drop(&mut self) {
        kill(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- clamd log (tail) ---\n{}", tail(&self.dir.path().join("clamd.log"), 30));
        }
    }
}

/// rspamd's Hyperscan cache, shared by all tests and runs (see the module
/// documentation).
fn rspamd_hs_cache() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rspamd-hs-cache");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn dir_size(dir: &Path) -> u64 {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    entries.filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

/// Modules that would use the network, DNS, Redis or external services.
const RSPAMD_DISABLED: &[&str] = &[
    "arc",
    "asn",
    "bayes_expiry",
    "bimi",
    "clickhouse",
    "dcc",
    "dkim",
    "dkim_signing",
    "dmarc",
    "elastic",
    "emails",
    "external_services",
    "fuzzy_check",
    "greylist",
    "hfilter",
    "history_redis",
    "metadata_exporter",
    "mid",
    "multimap",
    "mx_check",
    "neural",
    "p0f",
    "phishing",
    "ratelimit",
    "rbl",
    "replies",
    "reputation",
    "rspamd_update",
    "spamassassin",
    "spf",
    "surbl",
    "url_redirector",
    "whitelist",
];

/// A private rspamd (normal worker only) on an ephemeral port.
pub struct RspamdServer {
    pub port: u16,
    /// The DNS server rspamd asks (NXDOMAIN for every name).
    pub dns: Dns,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RspamdServer {
    pub fn start() -> RspamdServer {
        Self::start_with(&[])
    }

    /// With extra files in `local.d` (name, content), e.g.
    /// `("actions.conf", "reject = 10;")`; one named like a disabled
    /// module's replaces its `enabled = false` (and `options.inc` would
    /// replace the DNS and cache settings).
    pub fn start_with(local: &[(&str, &str)]) -> RspamdServer {
        let dns = Dns::start(&[], &[]);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["local.d", "override.d", "db", "run"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let conf = |port: u16| {
            format!(
                r#"# /etc/rspamd/common.conf without statistic.conf (Bayes needs Redis)
lua = "$RULESDIR/rspamd.lua";
.include "$CONFDIR/metrics.conf"
.include "$CONFDIR/actions.conf"
.include "$CONFDIR/groups.conf"
.include "$CONFDIR/composites.conf"
.include "$CONFDIR/modules.conf"
.include "$CONFDIR/settings.conf"
modules {{
  path = "${{PLUGINSDIR}}";
  fallback_path = "${{SHAREDIR}}/lua";
}}
options {{
  pidfile = "$RUNDIR/rspamd.pid";
  .include "$CONFDIR/options.inc"
  .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
  type = "file";
  filename = "$LOGDIR/rspamd.log";
  level = "info";
}}
worker "normal" {{
  bind_socket = "127.0.0.1:{port}";
  count = 1;
  mime = true;
}}
"#
            )
        };
        let local_d = d.join("local.d");
        std::fs::write(
            local_d.join("options.inc"),
            format!(
                "dns {{\n  nameserver = [\"{}\"];\n  timeout = 1s;\n  retransmits = 1;\n}}\n\
                 filters = \"chartable,regexp\";\nhs_cache_dir = \"{}\";\ntempdir = \"{}\";\n",
                dns.addr(),
                rspamd_hs_cache().display(),
                d.join("run").display()
            ),
        )
        .unwrap();
        for module in RSPAMD_DISABLED {
            std::fs::write(local_d.join(format!("{module}.conf")), "enabled = false;\n").unwrap();
        }
        std::fs::write(
            local_d.join("headers_group.conf"),
            "symbols {\n  \"RDNS_NONE\" { weight = 0.0; }\n  \"RDNS_DNSFAIL\" { weight = 0.0; }\n}\n",
        )
        .unwrap();
        std::fs::write(
            d.join("override.d").join("mime_types.conf"),
            "file = [\"${CONFDIR}/maps.d/mime_types.inc\"];\n",
        )
        .unwrap();
        for (name, content) in local {
            std::fs::write(local_d.join(name), content).unwrap();
        }

        let mut server = RspamdServer { port: 0, dns, dir, child: None };
        start_on_free_port("rspamd", |port| {
            server.port = port;
            std::fs::write(server.dir.path().join("rspamd.conf"), conf(port)).unwrap();
            server.try_resume()
        });
        server
    }

    /// Starts rspamd again on the same port with the same configuration.
    pub fn resume(&mut self) {
        if let Err(log) = self.try_resume() {
            panic!("rspamd did not start again on port {}:\n{log}", self.port);
        }
    }

    /// Starts rspamd and waits until its main process listens and it
    /// answers `/ping`; its log if it exits before it listens.
    fn try_resume(&mut self) -> Result<(), String> {
        let cache = rspamd_hs_cache();
        let warm = cache.join("warm");
        let lock = || {
            let f = File::create(cache.join("lock")).unwrap();
            f.lock().unwrap();
            f
        };
        // It grows with every start (see the module documentation).
        let too_big = || dir_size(&cache) > 512 << 20;
        if too_big() {
            let _held = lock();
            // Another test may have emptied and filled it meanwhile.
            if too_big() {
                for entry in std::fs::read_dir(&cache).unwrap().flatten() {
                    if entry.file_name() != "lock" {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        // On a cold cache one start compiles while the others wait for it.
        let lock = (!warm.exists()).then(lock);
        let d = self.dir.path();
        let stderr = File::create(d.join("rspamd.stderr")).unwrap();
        let child = Command::new("rspamd")
            .args(["-f", "-i", "-c"])
            .arg(d.join("rspamd.conf"))
            .arg(format!("--var=LOCAL_CONFDIR={}", d.display()))
            .arg(format!("--var=DBDIR={}", d.join("db").display()))
            .arg(format!("--var=RUNDIR={}", d.join("run").display()))
            .arg(format!("--var=LOGDIR={}", d.display()))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("rspamd (scripts/test.sh installs it)");
        let timeout = Duration::from_secs(if lock.is_some() { 180 } else { 120 });
        let port = self.port;
        let dir = d.to_path_buf();
        let log = || format!("{}\n{}", tail(&dir.join("rspamd.stderr"), 20), tail(&dir.join("rspamd.log"), 40));
        wait_listening("rspamd", self.child.insert(child), port, timeout, log)?;
        wait_ready(
            "rspamd",
            &mut self.child,
            timeout,
            || http(port, "GET", "/ping", &[], b"").is_ok_and(|(status, body)| status == 200 && body.trim() == "pong"),
            log,
        );
        if lock.is_some() {
            File::create(&warm).unwrap();
        }
        Ok(())
    }

    /// Kills rspamd and its workers (SIGKILL to the process group): the
    /// port then refuses connections.
    pub fn stop(&mut self) {
        if let Some(c) = &self.child {
            // The group's id is the main process's; it is not reaped yet.
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", c.id())]).status();
        }
        kill(&mut self.child);
        wait_until("rspamd's port to refuse", Duration::from_secs(10), || refuses(self.port));
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// POST /checkv2 with `headers` (e.g. `IP`, `From`, `Rcpt`); the HTTP
    /// status and the body.
    pub fn checkv2_raw(&self, message: &[u8], headers: &[(&str, &str)]) -> (u16, String) {
        http(self.port, "POST", "/checkv2", headers, message).expect("rspamd /checkv2")
    }

    /// POST /checkv2; the JSON reply (panics with the body if it is not 200
    /// and JSON).
    pub fn checkv2(&self, message: &[u8], headers: &[(&str, &str)]) -> serde_json::Value {
        let (status, body) = self.checkv2_raw(message, headers);
        assert_eq!(status, 200, "rspamd /checkv2: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("rspamd /checkv2 is not JSON ({e}): {body}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rspamd.log")).unwrap_or_default()
    }
}

impl Drop for RspamdServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", c.id())]).status();
        }
        kill(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- rspamd log (tail) ---\n{}", tail(&self.dir.path().join("rspamd.log"), 30));
        }
    }
}

/// A plain HTTP/1.1 request to 127.0.0.1:`port` (Connection: close); the
/// status code and the body.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, rest.to_string()))
}
