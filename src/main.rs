//! `socialcard`: the all-in-one binary. `socialcard up` runs every service in one process over SQLite
//! under a data directory (the embedded default); the other subcommands drive the running system's
//! gRPC API for a demo or a bureau clerk's quick look.

mod cli;
mod postal;
mod up;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "socialcard",
    version,
    about = "The social security card system: registry, banks, postal, loss coordination"
)]
struct Args {
    #[command(flatten)]
    connection: cli::Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system in this process (embedded default: SQLite under --data-dir, nothing to install).
    Up(up::UpArgs),
    /// Import a courier's CSV batch file into the running postal service (progress on stderr).
    PostalImport(postal::ImportArgs),
    #[command(flatten)]
    Client(cli::Action),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Up(a) => {
            init_tracing();
            up::run(a).await
        }
        Command::PostalImport(a) => postal::import(a).await,
        Command::Client(action) => cli::run(&args.connection, action).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn,tower=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
