//! `torpor`: the daemon's command line. `torpor serve` runs the gateway with its embedded
//! defaults; `torpor check-config` validates a configuration and prints it.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use torpor::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "torpor",
    version,
    about = "io_uring thread-per-core gateway for stateful actors"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// TOML configuration file (defaults apply to every key it leaves out).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address for clients and runners [default: 0.0.0.0:6420].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Number of shards (threads, one per core) [default: one per core].
    #[arg(long)]
    shards: Option<usize>,
    /// Data directory of the embedded store [default: ./torpor-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log format: human or json.
    #[arg(long)]
    log_format: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Serve(Common),
    /// Validate the configuration (file, TORPOR_* environment, flags) and print it.
    CheckConfig(Common),
}

fn load(c: &Common) -> Result<Config, String> {
    let mut cfg = Config::load(c.config.as_deref()).map_err(|e| e.to_string())?;
    if let Some(l) = c.listen {
        cfg.listen = l;
    }
    if let Some(s) = c.shards {
        cfg.shards = s;
    }
    if let Some(d) = &c.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(f) = &c.log_format {
        cfg.log_format = f.clone();
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig(c) => match load(&c) {
            Ok(cfg) => {
                println!("{}", toml::to_string_pretty(&cfg).unwrap_or_default());
            }
            Err(e) => {
                eprintln!("torpor: {e}");
                std::process::exit(2);
            }
        },
        Cmd::Serve(c) => {
            let cfg = match load(&c) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("torpor: {e}");
                    std::process::exit(2);
                }
            };
            torpor::logging::init(&cfg.log_format);
            match torpor::server::run(cfg) {
                Ok(()) => {}
                Err(e) => {
                    eprintln!("torpor: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
}
