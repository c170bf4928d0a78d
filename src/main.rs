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
    /// Work on the shared queue (from any node).
    Queue {
        #[command(subcommand)]
        command: QueueCmd,
    },
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
