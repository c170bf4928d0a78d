//! `Netns`: a network namespace of the test's own (`ip netns add`), so a
//! test can use port 25 on several loopback addresses and a `resolv.conf`
//! of its own (`/etc/netns/NAME/resolv.conf`, which `ip netns exec` puts in
//! place for the programs it starts) without touching the machine's port
//! 25 or DNS.
//!
//! [`Netns::enter`] moves the calling thread into the namespace: every
//! socket it opens and every process it starts from then on (Redis,
//! MariaDB, the nodes, dnsmasq, smtp-sink, smtp-source) lives there, and
//! only there. Programs that resolve through libc (Postfix) are started
//! with [`Netns::exec`]. Needs root (CI and sessions run as root); without
//! a usable `ip netns` the test fails with a message saying so, it never
//! skips.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub struct Netns {
    pub name: String,
    /// The thread's namespace before [`Netns::enter`], to go back on drop.
    home: File,
}

impl Netns {
    /// A new namespace with `lo` up and a `resolv.conf` naming
    /// `127.0.0.1` (a dnsmasq the test starts on port 53), entered by the
    /// calling thread.
    pub fn enter() -> Netns {
        let name = super::unique("mxrt");
        let home = File::open("/proc/thread-self/ns/net").expect("/proc/thread-self/ns/net");
        ip(&["netns", "add", &name]);
        let ns = Netns { name, home };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        std::fs::create_dir_all(ns.etc()).expect("/etc/netns/NAME");
        std::fs::write(ns.etc().join("resolv.conf"), "nameserver 127.0.0.1\noptions attempts:2 timeout:1\n")
            .expect("resolv.conf of the namespace");
        let target = File::open(format!("/run/netns/{}", ns.name)).expect("/run/netns/NAME");
        // SAFETY: setns on a namespace file we opened; it changes only the
        // calling thread's network namespace.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {}: {} (the topology tests need root)", ns.name, std::io::Error::last_os_error());
        ns
    }

    fn etc(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.name)
    }

    /// `program` started through `ip netns exec`, so that it resolves
    /// names with the namespace's `resolv.conf`.
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // SAFETY: as in `enter`, back to the namespace the thread came from.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        // Whatever still runs inside dies with its owners' Drop; the
        // namespace goes once its last process has.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(self.etc());
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`ip {}`: {e} (the topology tests need iproute2 and root)", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed (the topology tests need root and network namespaces): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
