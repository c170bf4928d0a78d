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
    /// Exit 0 when this node's admin listener answers /healthz (for container
    /// health checks; no curl needed in the image).
    Healthcheck,
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
    /// Which recipients of a listed domain are accepted (Postfix's
    /// relay_recipient_maps; from any node).
    Recipients {
        #[command(subcommand)]
        command: RecipientsCmd,
    },
    /// Manage the SMTP AUTH users (`relay_users`; from any node).
    Users {
        #[command(subcommand)]
        command: UsersCmd,
    },
}

#[derive(Subcommand)]
enum RecipientsCmd {
    /// How a domain's recipients are checked: none (every recipient, the
    /// default), table (only the addresses added here) or verify (what the
    /// domain's relay_host accepts, asked at RCPT).
    Check { domain: String, method: String },
    /// Accept these addresses (user@example.org, or @example.org for all).
    Add {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Stop accepting an address.
    Remove { address: String },
    /// The checks and addresses, of one domain or all.
    List {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Add the addresses of a CSV file (first column, one per line).
    Import { file: PathBuf },
    /// The answers of `verify` domains' servers, kept for every node.
    VerifyCache {
        #[command(subcommand)]
        command: VerifyCacheCmd,
    },
}

#[derive(Subcommand)]
enum VerifyCacheCmd {
    /// The answers kept: of one address, of one domain, or all.
    Show {
        address: Option<String>,
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Forget answers (the next RCPT asks the server again).
    Clear {
        address: Option<String>,
        #[arg(long)]
        domain: Option<String>,
        /// Every answer, of every domain.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum UsersCmd {
    /// Add a user; the password is the first line of standard input.
    Add { username: String },
    /// Set a user's password (first line of standard input).
    Passwd { username: String },
    /// Remove a user.
    Remove { username: String },
    /// Every user name and when it was added.
    List {
        #[arg(long)]
        json: bool,
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
    /// Counts by state and destination, oldest message age.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// The messages in the queue (like `mailq`).
    List {
        /// Only messages with a recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
        /// active, deferred or held.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One message: envelope, per-recipient state, attempts, last reply.
    Show {
        id: String,
        /// Print the message itself too.
        #[arg(long)]
        body: bool,
        #[arg(long)]
        json: bool,
    },
    /// Make deferred messages due now (all, or one domain's; like `postqueue -f`).
    Flush {
        /// Only this domain's destination.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Remove messages from the queue (like `postsuper -d`).
    Delete { ids: Vec<String> },
    /// Keep messages from being delivered (like `postsuper -h`).
    Hold { ids: Vec<String> },
    /// Let held messages be delivered again (like `postsuper -H`).
    Release { ids: Vec<String> },
    /// Bounce what is still pending of messages, with a DSN to the sender.
    Bounce { ids: Vec<String> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Serving (and checking for it) also needs the files the configuration names.
    let loaded = match cli.command {
        Cmd::CheckConfig | Cmd::Serve => Config::load_with(cli.config.as_deref(), mxrelay::server::file_problems),
        _ => Config::load(cli.config.as_deref()),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("config error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Cmd::Healthcheck => match healthcheck(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::CheckConfig => {
            print!("{}", config.to_masked_toml());
            eprintln!("configuration OK");
            ExitCode::SUCCESS
        }
        Cmd::Serve => {
            let path = cli.config.clone();
            run(config, |c| async move { mxrelay::server::serve(c, path).await })
        }
        Cmd::Domains { command } => run(config, |c| async move { domains(&c, command).await }),
        Cmd::Recipients { command } => run(config, |c| async move { recipients(&c, command).await }),
        Cmd::Queue { command } => run(config, |c| async move { queue(&c, command).await }),
        Cmd::Users { command } => run(config, |c| async move { users(&c, command).await }),
        Cmd::Migrate => run(config, |c| async move {
            mxrelay::domains::open(&c.domains.url)?.migrate().await?;
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

/// When the nodes see a change to the domains database.
fn picked_up(config: &Config) -> String {
    format!(
        "nodes pick this up within domains.refresh ({}) or at once on SIGHUP",
        humantime_serde::re::humantime::format_duration(config.domains.refresh)
    )
}

async fn recipients(config: &Config, command: RecipientsCmd) -> anyhow::Result<()> {
    use mxrelay::admin::recipients as cmd;
    let store = mxrelay::domains::open(&config.domains.url)?;
    let store = store.as_ref();
    let refresh = picked_up(config);
    let domain_name = |d: &str| {
        mxrelay::proto::address::normalise_domain(d.trim().trim_end_matches('.'))
            .ok_or_else(|| anyhow::anyhow!("{d:?} is not a valid domain name"))
    };
    match command {
        RecipientsCmd::Check { domain, method } => {
            let (name, method) = (domain_name(&domain)?, cmd::method(&method).map_err(anyhow::Error::msg)?);
            store.set_recipient_check(&name, method).await?;
            let listed = mxrelay::admin::domains::list(store).await?.iter().any(|r| r.domain == name);
            let note = if listed { String::new() } else { format!(" ({name} is not listed yet)") };
            println!("{name}: recipients checked by {method}{note}; {refresh}");
        }
        RecipientsCmd::Add { addresses } => {
            let addresses: Vec<String> =
                addresses.iter().map(|a| cmd::normalise(a)).collect::<Result<_, _>>().map_err(anyhow::Error::msg)?;
            let added = store.add_recipients(&addresses).await?;
            println!("added {added} address(es) ({} already there); {refresh}", addresses.len() - added);
        }
        RecipientsCmd::Remove { address } => {
            let address = cmd::normalise(&address).map_err(anyhow::Error::msg)?;
            if !store.remove_recipient(&address).await? {
                anyhow::bail!("{address} is not in the table (see `mxrelay recipients list`)");
            }
            println!("removed {address}; {refresh}");
        }
        RecipientsCmd::List { domain, json } => {
            let domain = domain.as_deref().map(domain_name).transpose()?;
            let listing = cmd::list(store, domain.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", cmd::table(&listing));
            }
        }
        RecipientsCmd::VerifyCache { command } => verify_cache(config, command).await?,
        RecipientsCmd::Import { file } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let addresses = cmd::parse_csv(&text)
                .map_err(|errors| anyhow::anyhow!("{}: nothing imported\n{}", file.display(), errors.join("\n")))?;
            let added = store.add_recipients(&addresses).await?;
            println!("imported {added} new address(es) of {}; {refresh}", addresses.len());
        }
    }
    Ok(())
}

async fn verify_cache(config: &Config, command: VerifyCacheCmd) -> anyhow::Result<()> {
    use mxrelay::admin::recipients as cmd;
    let cache = cmd::verify_cache(config).await?;
    match command {
        VerifyCacheCmd::Show { address, domain, json } => {
            let scope = cmd::verify_scope(address.as_deref(), domain.as_deref()).map_err(anyhow::Error::msg)?;
            let answers = cache.recall(&scope).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answers)?);
            } else {
                print!("{}", cmd::verdicts_table(&answers));
            }
        }
        VerifyCacheCmd::Clear { address, domain, all } => {
            if all == (address.is_some() || domain.is_some()) {
                anyhow::bail!("name an address, --domain D, or --all");
            }
            let scope = cmd::verify_scope(address.as_deref(), domain.as_deref()).map_err(anyhow::Error::msg)?;
            let forgotten = cache.forget(&scope).await?;
            println!("forgot {forgotten} answer(s); the next RCPT for them asks the server again");
        }
    }
    Ok(())
}

async fn domains(config: &Config, command: DomainsCmd) -> anyhow::Result<()> {
    use mxrelay::admin::domains as cmd;
    let store = mxrelay::domains::open(&config.domains.url)?;
    let store = store.as_ref();
    let refresh = picked_up(config);
    match command {
        DomainsCmd::Add { domain, relay_host, relay_port, scan: _, no_scan } => {
            let row = cmd::validate(&domain, &relay_host, &relay_port, !no_scan).map_err(anyhow::Error::msg)?;
            cmd::add(store, std::slice::from_ref(&row)).await?;
            println!("added {} → [{}]:{}; {refresh}", row.domain, row.relay_host, row.relay_port);
        }
        DomainsCmd::Remove { domain } => {
            let name = mxrelay::proto::address::normalise_domain(&domain)
                .ok_or_else(|| anyhow::anyhow!("{domain:?} is not a valid domain name"))?;
            if !store.remove(&name).await? {
                anyhow::bail!("{name} is not listed (see `mxrelay domains list`)");
            }
            println!("removed {name}; {refresh}");
        }
        DomainsCmd::List { json } => {
            let rows = cmd::list(store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", cmd::table(&rows));
            }
        }
        DomainsCmd::Show { domain, json } => {
            let name = mxrelay::proto::address::normalise_domain(&domain)
                .ok_or_else(|| anyhow::anyhow!("{domain:?} is not a valid domain name"))?;
            let rows = cmd::list(store).await?;
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
            let text =
                std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let rows = cmd::parse_csv(&text)
                .map_err(|errors| anyhow::anyhow!("{}: nothing imported\n{}", file.display(), errors.join("\n")))?;
            cmd::add(store, &rows).await?;
            println!("imported {} domain(s); {refresh}", rows.len());
        }
    }
    Ok(())
}

async fn queue(config: &Config, command: QueueCmd) -> anyhow::Result<()> {
    use mxrelay::admin::queue as cmd;
    use mxrelay::spool::AdminAction;
    let act = |action: AdminAction, ids: Vec<String>| async move {
        if ids.is_empty() {
            anyhow::bail!("name at least one queue id (see `mxrelay queue list`)");
        }
        let done = cmd::act(config, action, &ids).await?;
        let mut missed = 0;
        for (id, ok) in &done {
            if *ok {
                println!("{id}: {}", action.as_str());
            } else {
                missed += 1;
                eprintln!("{id}: not in the queue (or not held, for release)");
            }
        }
        if missed > 0 { anyhow::bail!("{missed} of {} id(s) not found", done.len()) } else { Ok(()) }
    };
    match command {
        QueueCmd::Stats { json } => {
            let s = cmd::stats(config).await?;
            if json { println!("{}", serde_json::to_string_pretty(&s)?) } else { print!("{}", cmd::stats_table(&s)) }
        }
        QueueCmd::List { domain, state, json } => {
            let rows = cmd::list(config, domain.as_deref(), state.as_deref()).await?;
            if json {
                let v: Vec<_> = rows.iter().map(|(e, s)| serde_json::json!({"envelope": e, "state": s})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", cmd::list_table(&rows));
            }
        }
        QueueCmd::Show { id, body, json } => {
            let (env, state, content) = cmd::show(config, &id, body).await?;
            if json {
                let body = content.as_ref().map(|c| String::from_utf8_lossy(c).into_owned());
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"envelope": env, "state": state, "body": body}))?
                );
            } else {
                print!("{}", cmd::show_text(&env, &state));
                if let Some(c) = content {
                    println!("--- message ---");
                    std::io::Write::write_all(&mut std::io::stdout(), &c)?;
                }
            }
        }
        QueueCmd::Flush { domain } => {
            let n = cmd::flush(config, domain.as_deref()).await?;
            println!("released {n} deferred message(s)");
        }
        QueueCmd::Delete { ids } => act(AdminAction::Delete, ids).await?,
        QueueCmd::Hold { ids } => act(AdminAction::Hold, ids).await?,
        QueueCmd::Release { ids } => act(AdminAction::Release, ids).await?,
        QueueCmd::Bounce { ids } => act(AdminAction::Bounce, ids).await?,
    }
    Ok(())
}

/// GET /healthz on `admin.listen` (a wildcard address means loopback).
fn healthcheck(config: &Config) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut addr = config.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let timeout = std::time::Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.take(4096).read_to_string(&mut response)?;
    match response.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        other => anyhow::bail!("GET http://{addr}/healthz answered {}", other.unwrap_or("nothing")),
    }
}

/// Reads a password from the first line of standard input (never from the
/// command line, where `ps` and shell history would show it).
fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        anyhow::bail!("no password on standard input (e.g. `printf '%s\\n' \"$PW\" | mxrelay users add alice`)");
    }
    if password.len() > mxrelay::users::PASSWORD_LIMIT {
        anyhow::bail!("password longer than {} bytes", mxrelay::users::PASSWORD_LIMIT);
    }
    Ok(password)
}

async fn users(config: &Config, command: UsersCmd) -> anyhow::Result<()> {
    if config.migrate_on_start {
        mxrelay::domains::open(&config.domains.url)?.migrate().await?;
    }
    let store = mxrelay::users::open(&config.domains.url)?;
    match command {
        UsersCmd::Add { username } => {
            mxrelay::users::validate_name(&username)?;
            let hash = mxrelay::users::hash_password(&read_password()?)?;
            store.add(&username, &hash).await?;
            println!("added {username}");
        }
        UsersCmd::Passwd { username } => {
            let hash = mxrelay::users::hash_password(&read_password()?)?;
            if !store.set_password(&username, &hash).await? {
                anyhow::bail!("{username} does not exist (see `mxrelay users list`)");
            }
            println!("password of {username} changed");
        }
        UsersCmd::Remove { username } => {
            if !store.remove(&username).await? {
                anyhow::bail!("{username} does not exist (see `mxrelay users list`)");
            }
            println!("removed {username}");
        }
        UsersCmd::List { json } => {
            let rows = store.list().await?;
            if json {
                let v: Vec<_> = rows.iter().map(|(u, c)| serde_json::json!({"username": u, "created_at": c})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<40} CREATED", "USERNAME");
                for (u, c) in &rows {
                    println!("{u:<40} {c}");
                }
            }
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
    if config.log.format == mxrelay::config::LogFormat::Json {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}
