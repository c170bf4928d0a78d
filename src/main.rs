//! The `mxrelay` binary: CLI → subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mxrelay::config::Config;

#[derive(Parser)]
#[command(name = "mxrelay", version, about = "A clustered, closed SMTP relay")]
struct Cli {
    /// TOML configuration file; every key can be overridden by MXRELAY_<KEY_PATH>.
    #[arg(long, short, global = true, env = "MXRELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a relay node.
    Serve,
    /// Create or update the database tables mxrelay needs, then exit.
    Migrate,
    /// Print the effective configuration (secrets masked) and every problem.
    CheckConfig,
    /// Manage the listed domains (from any node).
    Domains {
        #[command(subcommand)]
        command: DomainsCmd,
    },
    /// Work on the shared queue (from any node).
    Queue {
        #[command(subcommand)]
        command: QueueCmd,
    },
}

#[derive(Subcommand)]
enum DomainsCmd {
    /// List a domain and where its mail goes.
    Add {
        /// The domain (Unicode names are stored as A-labels).
        domain: String,
        /// The domain's own mail server: IPv4, IPv6 or host name.
        #[arg(long)]
        relay_host: String,
        #[arg(long, default_value = "25")]
        relay_port: String,
        /// Scan its mail for viruses and spam (enable_virus_spam_scan = '1', the default).
        #[arg(long, overrides_with = "no_scan")]
        scan: bool,
        /// Do not scan its mail (enable_virus_spam_scan = '0').
        #[arg(long)]
        no_scan: bool,
    },
    /// Stop relaying for a domain.
    Remove { domain: String },
    /// Every listed domain.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One domain.
    Show {
        domain: String,
        #[arg(long)]
        json: bool,
    },
    /// Add domains from a CSV file: domain,relay_host,relay_port[,scan].
    Import { file: PathBuf },
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Make deferred messages due now (all, or one domain's).
    Flush {
        /// Only this domain's destination.
        #[arg(long)]
        domain: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // MXRELAY_CONFIG names the file; it is not a config key.
    let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k != "MXRELAY_CONFIG").collect();
    let config = match Config::load_from(cli.config.as_deref(), &env) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("config error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Cmd::CheckConfig => {
            print!("{}", config.to_masked_toml());
            eprintln!("configuration OK");
            ExitCode::SUCCESS
        }
        Cmd::Serve => run(config, |c| async move { mxrelay::server::serve(c).await }),
        Cmd::Domains { command } => run(config, |c| async move { domains(&c, command).await }),
        Cmd::Queue { command: QueueCmd::Flush { domain } } => run(config, |c| async move {
            let n = mxrelay::admin::queue::flush(&c, domain.as_deref()).await?;
            println!("released {n} deferred message(s)");
            Ok(())
        }),
        Cmd::Migrate => run(config, |c| async move {
            let store = mxrelay::domains::mysql::MySqlDomains::connect(&c.domains.url, std::time::Duration::from_secs(10))?;
            mxrelay::domains::DomainStore::migrate(&store).await?;
            eprintln!("migrations applied to {}", mxrelay::config::mask_url(&c.domains.url));
            Ok(())
        }),
    }
}

fn run<F, Fut>(config: Config, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    init_tracing(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn domains(config: &Config, command: DomainsCmd) -> anyhow::Result<()> {
    use mxrelay::admin::domains as cmd;
    let store = mxrelay::domains::mysql::MySqlDomains::connect(&config.domains.url, std::time::Duration::from_secs(10))?;
    let refresh = format!(
        "nodes pick this up within domains.refresh ({}) or at once on SIGHUP",
        humantime_serde::re::humantime::format_duration(config.domains.refresh)
    );
    match command {
        DomainsCmd::Add { domain, relay_host, relay_port, scan: _, no_scan } => {
            let row = cmd::validate(&domain, &relay_host, &relay_port, !no_scan).map_err(anyhow::Error::msg)?;
            cmd::add(&store, std::slice::from_ref(&row)).await?;
            println!("added {} → [{}]:{}; {refresh}", row.domain, row.relay_host, row.relay_port);
        }
        DomainsCmd::Remove { domain } => {
            let name = mxrelay::policy::address::normalise_domain(&domain)
                .ok_or_else(|| anyhow::anyhow!("{domain:?} is not a valid domain name"))?;
            if !mxrelay::domains::DomainStore::remove(&store, &name).await? {
                anyhow::bail!("{name} is not listed (see `mxrelay domains list`)");
            }
            println!("removed {name}; {refresh}");
        }
        DomainsCmd::List { json } => {
            let rows = cmd::list(&store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", cmd::table(&rows));
            }
        }
        DomainsCmd::Show { domain, json } => {
            let name = mxrelay::policy::address::normalise_domain(&domain)
                .ok_or_else(|| anyhow::anyhow!("{domain:?} is not a valid domain name"))?;
            let rows = cmd::list(&store).await?;
            let row = rows
                .iter()
                .find(|r| r.domain == name)
                .ok_or_else(|| anyhow::anyhow!("{name} is not listed (see `mxrelay domains list`)"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(row)?);
            } else {
                print!("{}", cmd::table(std::slice::from_ref(row)));
            }
        }
        DomainsCmd::Import { file } => {
            let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let rows = cmd::parse_csv(&text).map_err(|errors| anyhow::anyhow!("{}: nothing imported\n{}", file.display(), errors.join("\n")))?;
            cmd::add(&store, &rows).await?;
            println!("imported {} domain(s); {refresh}", rows.len());
        }
    }
    Ok(())
}

fn init_tracing(config: &Config) {
    // Transcripts of debug_peer_list clients are always shown.
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{},mxrelay::transcript=debug", config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}
