//! `Postfix`: a private, complete Postfix (master, smtpd, cleanup, qmgr,
//! virtual …) in a temporary directory, never the system one: its own
//! `main.cf`/`master.cf` (`postfix -c DIR start-fg`), queue, log file
//! (`maillog_file`) and one smtpd on an ephemeral port of 127.0.0.1. Mail
//! for the given domains is delivered by Postfix's `virtual` agent into
//! one Maildir, so a test reads what Postfix really accepted, headers added
//! by smtpd included (`Received: … (using TLSv1.3 …)` with TLS on).
//! Stopped with `postfix stop` on drop (SIGKILL to its process group if it
//! does not go).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pki::TestPki;

/// How long to wait for smtpd to greet, and for Postfix to stop.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports tried before giving up (another process may take one first).
const START_ATTEMPTS: usize = 5;
const HOSTNAME: &str = "postfix.test";

/// The services the tests need, none chrooted (the queue directory is a
/// temporary one, not a prepared jail). After the fixed smtpd line.
const MASTER_CF: &str = "\
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// What the private Postfix is set up with, on top of the defaults.
#[derive(Default)]
pub struct PostfixOptions<'a> {
    /// Recipient domains delivered into the Maildir.
    pub domains: &'a [&'a str],
    /// STARTTLS with this PKI's server certificate.
    pub tls: Option<&'a TestPki>,
    /// Extra `main.cf` lines, e.g. `message_size_limit = 20000`.
    pub main_cf: &'a [&'a str],
    /// Started inside this namespace with its `resolv.conf` (a sending
    /// Postfix that looks up MX records).
    pub netns: Option<&'a super::netns::Netns>,
}

pub struct Postfix {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Postfix {
    pub fn start(options: &PostfixOptions<'_>) -> Postfix {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(options, super::free_port()) {
                Ok(p) => return p,
                Err(e) => last_error = e,
            }
        }
        panic!("private Postfix did not start on {START_ATTEMPTS} ports: {last_error}");
    }

    fn try_start(options: &PostfixOptions<'_>, port: u16) -> Result<Postfix, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        // Postfix's daemons run as the `postfix` user and must reach inside.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        let (uid, gid) = (id("-u"), id("-g"));
        for sub in ["conf", "queue", "data", "mail"] {
            fs::create_dir(dir.path().join(sub)).map_err(|e| e.to_string())?;
        }
        for owned in ["data", "mail"] {
            std::os::unix::fs::chown(dir.path().join(owned), Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        let conf = dir.path().join("conf");
        fs::write(conf.join("main.cf"), main_cf(dir.path(), options, uid, gid)).map_err(|e| e.to_string())?;
        let master = format!("127.0.0.1:{port} inet n - n - - smtpd\n{MASTER_CF}");
        fs::write(conf.join("master.cf"), master).map_err(|e| e.to_string())?;
        let out = fs::File::create(dir.path().join("start-fg.out")).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut command = match options.netns {
            Some(ns) => ns.exec("/usr/sbin/postfix"),
            None => Command::new("/usr/sbin/postfix"),
        };
        let child = command
            .arg("-c")
            .arg(&conf)
            .arg("start-fg")
            // Its own process group: master and every daemon can be killed
            // together should `postfix stop` not end them.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("/usr/sbin/postfix (scripts/test.sh installs postfix): {e}"))?;
        let mut postfix = Postfix { port, dir, child: Some(child) };
        postfix.wait_ready()?;
        Ok(postfix)
    }

    /// Waits for smtpd's 220; an exited master (e.g. a busy port) is an
    /// error carrying the log.
    fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("postfix exited with {status}:\n{}{}", self.start_output(), self.log()));
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(format!("smtpd did not greet within {READY_TIMEOUT:?}:\n{}", self.log()));
            }
            if greets(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Postfix's mail log so far (`maillog_file`).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    fn start_output(&self) -> String {
        fs::read_to_string(self.dir.path().join("start-fg.out")).unwrap_or_default()
    }

    /// Every message delivered into the Maildir, as `virtual` wrote it
    /// (LF line endings, `Delivered-To:` and `Return-Path:` on top), oldest first.
    pub fn delivered(&self) -> Vec<Vec<u8>> {
        let new = self.dir.path().join("mail/box/new");
        let Ok(entries) = fs::read_dir(&new) else { return Vec::new() };
        // Maildir names start with the delivery time in seconds.
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        files.iter().filter_map(|f| fs::read(f).ok()).collect()
    }

    /// Waits until at least `n` messages are delivered; panics after `timeout`.
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let started = Instant::now();
        loop {
            let got = self.delivered();
            if got.len() >= n {
                return got;
            }
            if started.elapsed() > timeout {
                panic!("Postfix delivered {} of {n} message(s) within {timeout:?}:\n{}", got.len(), self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(self.dir.path().join("conf"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // start-fg's shell exits when master has.
        let started = Instant::now();
        while started.elapsed() < STOP_TIMEOUT {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Still there: the whole group, master's daemons included.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).stderr(Stdio::null()).status();
        let _ = child.wait();
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- private Postfix log ---\n{}", self.log());
        }
    }
}

fn main_cf(dir: &Path, options: &PostfixOptions<'_>, uid: u32, gid: u32) -> String {
    let d = dir.display();
    let mut cf = format!(
        "compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
myhostname = {HOSTNAME}
mydomain = {HOSTNAME}
myorigin = {HOSTNAME}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
alias_maps =
alias_database =
biff = no
virtual_mailbox_domains = {domains}
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
",
        domains = options.domains.join(" "),
    );
    if let Some(pki) = options.tls {
        cf.push_str(&format!(
            "smtpd_tls_security_level = may
smtpd_tls_chain_files = {}, {}
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
",
            pki.key.display(),
            pki.cert.display()
        ));
    }
    for line in options.main_cf {
        cf.push_str(line);
        cf.push('\n');
    }
    cf
}

/// `id -u postfix` / `id -g postfix`.
fn id(flag: &str) -> u32 {
    let out = Command::new("id").args([flag, "postfix"]).output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("the postfix user (the postfix package creates it)")
}

fn greets(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut greeting = String::new();
    let ok = stream.try_clone().map(BufReader::new).and_then(|mut r| r.read_line(&mut greeting)).is_ok();
    let _ = stream.write_all(b"QUIT\r\n");
    ok && greeting.starts_with("220 ")
}
