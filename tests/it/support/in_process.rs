//! A node run inside the test process, as mini-redis's `start_server()`:
//! [`mxrelay::server::Node`] bound on port 0 with the embedded SQLite
//! stores in a temporary directory, served on a runtime of its own thread,
//! stopped (the real drain) on drop. No binary is spawned and neither
//! MariaDB nor Redis is needed: for tests of the protocol and the policy.
//! Tests that kill or signal a node, run clusters or need the shared
//! stores for what they check keep [`super::Relay`].
//!
//! The node's log is the test process's `tracing` output, kept in a buffer
//! ([`InProcessNode::log`]); its metrics are the process's registry. nextest
//! runs every test in a process of its own, so both belong to the test's
//! nodes alone.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use mxrelay::config::Config;
use mxrelay::domains::RawDomain;
use mxrelay::server::{ConfigSource, Node, Reloader};
use mxrelay::spool::{Envelope, MessageState, QueueId, Spool};

use super::{Dns, LISTED, base_config, wait_rcpt, world_dns};

/// The tracing output of this test process.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static LOG: OnceLock<LogBuffer> = OnceLock::new();

/// Installs the process's subscriber once (the level the binary logs at,
/// SMTP transcripts included) and returns its buffer.
fn log_buffer() -> &'static LogBuffer {
    LOG.get_or_init(|| {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,mxrelay::transcript=debug"))
            .with_ansi(false)
            .with_target(false)
            .with_writer(move || writer.clone())
            .try_init();
        buffer
    })
}

/// A running in-process node; stopped (drained) on drop.
pub struct InProcessNode {
    pub smtp: SocketAddr,
    /// The implicit-TLS listener, when `tls.implicit_listen` is set (port 0 allowed).
    pub smtps: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub config: Config,
    reloader: Reloader,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    /// For the test's own store access (domains, queue).
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl InProcessNode {
    /// Starts a node with `config` (TOML, as for [`super::Relay`]) and the
    /// `MXRELAY_*` overrides in `env`; it listens on 127.0.0.1, ports chosen
    /// by the system, with its data directory in a temporary directory.
    pub fn start(config: &str, env: &[(&str, &str)]) -> InProcessNode {
        log_buffer();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mxrelay.toml");
        std::fs::write(&path, config).unwrap();
        let mut vars: Vec<(String, String)> = vec![
            ("MXRELAY_SMTP_LISTEN".into(), "127.0.0.1:0".into()),
            ("MXRELAY_ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
            ("MXRELAY_DATA_DIR".into(), dir.path().display().to_string()),
        ];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::load_from(Some(&path), &vars).unwrap_or_else(|errors| {
            panic!(
                "test configuration refused: {}",
                errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
            )
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let node_config = config.clone();
        let source = ConfigSource { file: Some(path), env: vars };
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async move {
                let node = match Node::bind(node_config, source).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                let _ = ready_tx.send(Ok((node.addrs()?, node.reloader())));
                node.run(async {
                    let _ = stop_rx.await;
                })
                .await
            })
        });
        let (addrs, reloader) = ready_rx
            .recv()
            .expect("the node thread ended before binding")
            .unwrap_or_else(|e| panic!("the node did not start: {e}"));
        InProcessNode {
            smtp: addrs.smtp,
            smtps: addrs.smtps,
            admin: addrs.admin,
            config,
            reloader,
            stop: Some(stop_tx),
            thread: Some(thread),
            runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
            _dir: dir,
        }
    }

    pub fn addr(&self) -> String {
        self.smtp.to_string()
    }

    /// Lists `domain` (relayed to `host:port`, not scanned) in the node's
    /// domain store and asks the node to reload its snapshot.
    pub fn add_domain(&self, domain: &str, host: &str, port: u16) {
        let row =
            RawDomain { domain: domain.into(), relay_host: host.into(), relay_port: port.into(), scan: "0".into() };
        self.runtime
            .block_on(async {
                let store = mxrelay::domains::open(&self.config.domains.url).expect("the embedded domain store");
                store.add(&[row]).await
            })
            .expect("domain added");
        self.reloader.reload_domains();
    }

    /// SIGHUP's work: the configuration file again, the domain snapshot.
    pub fn reload(&self) {
        self.reloader.reload();
    }

    /// Replaces the configuration file (applied by [`InProcessNode::reload`]).
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(self._dir.path().join("mxrelay.toml"), config).unwrap();
    }

    pub fn http_get(&self, path: &str) -> String {
        super::http_get(self.admin.port(), path)
    }

    /// One sample from `/metrics`, as [`super::Relay::metric`].
    pub fn metric(&self, sample: &str) -> Option<f64> {
        super::metric_sample(&self.http_get("/metrics"), sample)
    }

    pub fn value(&self, sample: &str) -> f64 {
        self.metric(sample).unwrap_or_else(|| panic!("{} exports no sample {sample}", self.addr()))
    }

    /// What this test process logged so far (its nodes' log lines).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&log_buffer().0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// The node's queue, read through the embedded spool itself.
    pub fn queue(&self) -> LocalQueue<'_> {
        LocalQueue {
            spool: self
                .runtime
                .block_on(async { mxrelay::spool::open(&self.config.queue) })
                .expect("the embedded spool"),
            runtime: &self.runtime,
        }
    }

    /// Stops the node as SIGTERM would and waits for `run` to return; its
    /// result.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the node thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for InProcessNode {
    fn drop(&mut self) {
        let stopped = self.stop();
        if std::thread::panicking() {
            eprintln!("--- mxrelay log (in process) ---\n{}", self.log());
        } else if let Err(e) = stopped {
            panic!("the node failed: {e:#}");
        }
    }
}

/// Read access to an in-process node's queue, the counterpart of
/// [`super::Queue`] for the embedded spool.
pub struct LocalQueue<'a> {
    spool: Arc<dyn Spool>,
    runtime: &'a tokio::runtime::Runtime,
}

impl LocalQueue<'_> {
    fn all(&self) -> Vec<(Envelope, MessageState)> {
        self.runtime.block_on(self.spool.list()).expect("queue list")
    }

    /// Every message waiting for delivery now.
    pub fn ready_ids(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|(_, s)| matches!(s, MessageState::Active))
            .map(|(e, _)| e.id.to_string())
            .collect()
    }

    pub fn envelope(&self, id: &str) -> Envelope {
        self.all()
            .into_iter()
            .map(|(e, _)| e)
            .find(|e| e.id.as_str() == id)
            .unwrap_or_else(|| panic!("no message {id}"))
    }

    pub fn recipients(&self, id: &str) -> Vec<String> {
        self.envelope(id).recipients.into_iter().map(|r| r.address).collect()
    }

    /// The message as queued: our `Received:` and the content.
    pub fn body(&self, id: &str) -> Vec<u8> {
        let size = self.envelope(id).size;
        self.runtime.block_on(async {
            let lease = self.spool.locate(&QueueId::from(id.to_string())).await.expect("locate").expect("queued");
            self.spool.read_body(&lease, 0, size as usize).await.expect("body")
        })
    }

    pub fn message_count(&self) -> usize {
        self.all().len()
    }
}

/// The in-process test world: DNS (dnsmasq) and an in-process node on the
/// embedded stores with [`LISTED`] relayed to 127.0.0.1:2526, as
/// [`super::World`] sets up with a spawned binary, MariaDB and Redis.
pub struct InProcessWorld {
    pub dns: Dns,
    pub relay: InProcessNode,
    /// The embedded store's URL (domains and queue).
    pub url: String,
    _store: tempfile::TempDir,
}

impl InProcessWorld {
    pub fn start() -> InProcessWorld {
        Self::start_with(&[])
    }

    /// `env`: `MXRELAY_*` overrides on top of the test configuration.
    pub fn start_with(env: &[(&str, &str)]) -> InProcessWorld {
        Self::start_to(2526, env)
    }

    /// As [`InProcessWorld::start_with`], [`LISTED`] relayed to 127.0.0.1:`port`.
    pub fn start_to(port: u16, env: &[(&str, &str)]) -> InProcessWorld {
        let dns = world_dns();
        let store = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/mxrelay.db", store.path().display());
        let relay = InProcessNode::start(&base_config(&url, &url, &dns), env);
        relay.add_domain(LISTED, "127.0.0.1", port);
        let world = InProcessWorld { dns, relay, url, _store: store };
        world.wait_rcpt(&format!("probe@{LISTED}"), 250);
        world
    }

    /// Waits until RCPT TO:<rcpt> from an untrusted client gets `code`.
    pub fn wait_rcpt(&self, rcpt: &str, code: u16) {
        wait_rcpt(&self.relay.addr(), rcpt, code);
    }

    pub fn queue(&self) -> LocalQueue<'_> {
        self.relay.queue()
    }
}
