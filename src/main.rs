//! The `tiergate` command line: `serve`, `check`, `demo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use clap::{Parser, Subcommand, ValueEnum};
use http::Method;
use tiergate::client::AdminClient;
use tiergate::config::Config;

#[derive(Parser)]
#[command(
    name = "tiergate",
    version,
    about = "Per-tenant, tier-aware rate-limiting reverse proxy"
)]
struct Cli {
    /// Log format (default: text on a terminal, json otherwise). Level from RUST_LOG (default info).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and the admin listener.
    Serve {
        /// Config file (default: $TIERGATE_CONFIG, then config/tiergate.yaml).
        #[arg(long, env = "TIERGATE_CONFIG", default_value = "config/tiergate.yaml")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 with a summary, or 1 with every error.
    Check {
        /// Config file (default: $TIERGATE_CONFIG, then config/tiergate.yaml).
        #[arg(long, env = "TIERGATE_CONFIG", default_value = "config/tiergate.yaml")]
        config: PathBuf,
    },
    /// Zero-setup demo: echo upstream, example tiers, memory backend.
    Demo,
    /// Manage per-tenant overrides through the admin API.
    Override {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: OverrideAction,
    },
    /// Show a tenant's effective tier, limits, remaining tokens and override.
    Tenant {
        #[command(flatten)]
        admin: AdminArgs,
        /// Tenant id.
        tenant: String,
    },
    /// Live view of per-tier traffic, the most throttled tenants and backend state.
    Top {
        /// Admin API base URL.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Refresh interval (rates are computed over it).
        #[arg(long, default_value = "2s", value_parser = parse_interval)]
        interval: std::time::Duration,
        /// Print one snapshot (two scrapes `--interval` apart) and exit.
        #[arg(long)]
        once: bool,
        /// How many tenants to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Exit 0 when the admin listener answers /healthz (container health checks).
    Health {
        /// Admin API base URL.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Admin API base URL. The token comes from $TIERGATE_ADMIN_TOKEN.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum OverrideAction {
    /// Create or replace a tenant's override (give at least one of --tier, --rate, --burst).
    Set {
        /// Tenant id.
        tenant: String,
        /// Tier to put the tenant on.
        #[arg(long)]
        tier: Option<String>,
        /// Refill rate, e.g. 100/s.
        #[arg(long)]
        rate: Option<String>,
        /// Bucket capacity.
        #[arg(long)]
        burst: Option<i64>,
        /// When the override stops applying (RFC 3339, e.g. 2026-12-31T00:00:00Z).
        #[arg(long)]
        expires: Option<String>,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove a tenant's override.
    Rm {
        /// Tenant id.
        tenant: String,
    },
    /// List every active override.
    Ls,
}

fn init_logging(format: Option<LogFormat>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let is_server = matches!(cli.command, Command::Serve { .. } | Command::Demo);
    let result = match cli.command {
        Command::Check { config } => return check(&config),
        Command::Serve { config } => runtime().and_then(|rt| rt.block_on(serve(config))),
        Command::Demo => runtime().and_then(|rt| rt.block_on(demo())),
        Command::Override { admin, action } => {
            runtime().and_then(|rt| rt.block_on(override_cmd(admin, action)))
        }
        Command::Tenant { admin, tenant } => {
            runtime().and_then(|rt| rt.block_on(tenant_cmd(admin, tenant)))
        }
        Command::Top {
            admin,
            interval,
            once,
            top,
        } => runtime().and_then(|rt| {
            rt.block_on(async {
                let client = AdminClient::new(&admin, None)?;
                tiergate::top::run(&client, &admin, interval, once, top).await?;
                Ok(())
            })
        }),
        Command::Health { admin } => runtime().and_then(|rt| rt.block_on(health(admin))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if is_server {
                tracing::error!("{e:#}");
            }
            eprintln!("tiergate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The control runtime: admin listener, signals, background tasks. Proxy
/// workers run on runtimes of their own.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

fn check(path: &std::path::Path) -> ExitCode {
    // Secrets come from the environment only at serve time: check with a
    // placeholder so an unset variable is not an error here.
    let env: Arc<tiergate::EnvFn> = Arc::new(|_: &str| Some("tiergate-check-placeholder".into()));
    let result = Config::from_file(path).and_then(|cfg| {
        // Load key files too (a bad PEM is a config error); secrets from the
        // environment are only required at serve time.
        tiergate::Live::new(
            Arc::new(cfg.clone()),
            &*env,
            &tiergate::metrics::Metrics::new(prometheus::Registry::new()),
        )
        .map(|_| cfg)
        .map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })
    });
    match result {
        Ok(cfg) => {
            println!("{}: {}", path.display(), cfg.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", path.display(), errors.errors.len());
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::from_file(&path)?;
    let signals = Signals::install()?;
    let env: Arc<tiergate::EnvFn> = Arc::new(tiergate::process_env);
    let running = tiergate::start(config, env, Some(path.clone()))
        .await
        .map_err(|e| match e {
            tiergate::StartError::Config(mut errors) => {
                errors.file = Some(path.clone());
                tiergate::StartError::Config(errors)
            }
            other => other,
        })?;
    tracing::info!(
        proxy = %running.proxy_addr,
        admin = %running.admin_addr,
        backend = running.app.backend_name(),
        "ready"
    );
    wait_for_signals(signals, &running, Some(&path)).await?;
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// The signals tiergate handles, installed before it reports ready so that
/// a signal sent right after `ready` is never taken with its default action.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Returns on SIGTERM or SIGINT; reloads the config on SIGHUP.
async fn wait_for_signals(
    signals: Signals,
    running: &tiergate::Running,
    reload_from: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); return Ok(()); }
            _ = hup.recv() => match reload_from {
                Some(path) => match running.app.reload(path) {
                    Ok(restart) if restart.is_empty() => tracing::info!("config reloaded"),
                    Ok(restart) => tracing::warn!(needs_restart = ?restart, "config reloaded; some changed settings only apply after a restart"),
                    Err(e) => tracing::error!(errors = %e, "config reload refused; keeping the old config"),
                },
                None => tracing::info!("SIGHUP ignored (no config file)"),
            },
        }
    }
}

async fn demo() -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let echo = tiergate::demo::start_echo()
        .await
        .context("cannot start the echo upstream")?;
    // The usual ports when they are free, any free port otherwise.
    let mut listen: SocketAddr = "127.0.0.1:8080".parse().expect("valid address");
    let mut admin: SocketAddr = "127.0.0.1:9090".parse().expect("valid address");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let running = loop {
        let cfg = tiergate::demo::config(echo, listen, admin);
        match tiergate::start(cfg, tiergate::demo::env(), None).await {
            Ok(r) => break r,
            Err(tiergate::StartError::Bind { addr, .. }) if addr == listen && listen != any => {
                listen = any
            }
            Err(tiergate::StartError::Bind { addr, .. }) if addr == admin && admin != any => {
                admin = any
            }
            Err(e) => return Err(e.into()),
        }
    };
    tracing::info!(proxy = %running.proxy_addr, admin = %running.admin_addr, "ready");
    println!(
        "{}",
        tiergate::demo::instructions(running.proxy_addr, running.admin_addr)
    );
    wait_for_signals(signals, &running, None).await?;
    running.shutdown().await;
    Ok(())
}

fn admin_client(url: &str) -> anyhow::Result<AdminClient> {
    let token = std::env::var("TIERGATE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    Ok(AdminClient::new(url, token)?)
}

/// Tenant ids go into the URL path as they are: their alphabet needs no
/// escaping, and the server rejects anything else with a clear 400.
fn tenant_path(tenant: &str, suffix: &str) -> String {
    let escaped: String = tenant
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._:@-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("/v1/tenants/{escaped}{suffix}")
}

async fn override_cmd(args: AdminArgs, action: OverrideAction) -> anyhow::Result<()> {
    let client = admin_client(&args.admin)?;
    match action {
        OverrideAction::Set {
            tenant,
            tier,
            rate,
            burst,
            expires,
            reason,
        } => {
            let mut body = serde_json::Map::new();
            let mut put = |k: &str, v: Option<serde_json::Value>| {
                if let Some(v) = v {
                    body.insert(k.to_string(), v);
                }
            };
            put("tier", tier.map(Into::into));
            put("rate", rate.map(Into::into));
            put("burst", burst.map(Into::into));
            put("expires_at", expires.map(Into::into));
            put("reason", reason.map(Into::into));
            let (_, v) = client
                .call(
                    Method::PUT,
                    &tenant_path(&tenant, "/override"),
                    Some(body.into()),
                )
                .await?;
            if args.json {
                println!("{v}");
            } else {
                print!(
                    "{}",
                    tiergate::client::override_rows(std::slice::from_ref(&v))
                );
            }
        }
        OverrideAction::Rm { tenant } => {
            client
                .call(Method::DELETE, &tenant_path(&tenant, "/override"), None)
                .await?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "tenant": tenant, "removed": true })
                );
            } else {
                println!("override for {tenant} removed");
            }
        }
        OverrideAction::Ls => {
            let (_, v) = client.call(Method::GET, "/v1/overrides", None).await?;
            if args.json {
                println!("{v}");
            } else {
                let list = v["overrides"].as_array().cloned().unwrap_or_default();
                print!("{}", tiergate::client::override_rows(&list));
            }
        }
    }
    Ok(())
}

async fn tenant_cmd(args: AdminArgs, tenant: String) -> anyhow::Result<()> {
    let client = admin_client(&args.admin)?;
    let (_, v) = client
        .call(Method::GET, &tenant_path(&tenant, ""), None)
        .await?;
    if args.json {
        println!("{v}");
    } else {
        print!("{}", tiergate::client::tenant_view(&v));
    }
    Ok(())
}

async fn health(admin: String) -> anyhow::Result<()> {
    let client = AdminClient::new(&admin, None)?;
    client.call(Method::GET, "/healthz", None).await?;
    Ok(())
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = tiergate::config::parse_duration(s)?;
    if d < std::time::Duration::from_millis(100) {
        return Err("interval must be at least 100ms".into());
    }
    Ok(d)
}
