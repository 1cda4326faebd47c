//! `socialcard`: the all-in-one binary. `socialcard up` runs every service in one process over SQLite
//! under a data directory (the embedded default); the other subcommands drive the running system's
//! gRPC API for a demo or a bureau clerk's quick look.

mod bank_tools;
mod cli;
mod loss;
mod ops;
mod postal;
mod serve;
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
    // Boxed: its flags outweigh every other command's.
    Up(Box<up::UpArgs>),
    /// Run one service in this process (the distributed shape: one process per service, events through Kafka).
    Serve(Box<serve::ServeArgs>),
    /// Exit 0 when the server at --endpoint answers gRPC health SERVING (containers' health checks).
    Health(serve::HealthArgs),
    /// Import a courier's CSV batch file into the running postal service (progress on stderr).
    PostalImport(postal::ImportArgs),
    #[command(flatten)]
    Client(cli::Action),
    #[command(flatten)]
    Bank(bank_tools::BankTool),
}

/// mimalloc instead of glibc's allocator: the services allocate and free many small buffers from
/// several threads at once (a batch import spent a quarter of its CPU in glibc's malloc and free,
/// consolidating its arenas); see docs/benchmarks.md, batch.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Up(mut a) => {
            let _telemetry = init_tracing();
            a.tls_dir = args.connection.tls_dir.clone();
            up::run(*a).await
        }
        Command::Serve(mut a) => {
            let _telemetry = socialcard_telemetry::init(&a.service_name(), DEFAULT_LOG_FILTER);
            a.set_tls_dir(args.connection.tls_dir.clone());
            serve::run(*a).await
        }
        Command::Health(a) => serve::health(&args.connection.endpoint, args.connection.tls_dir.as_deref(), a).await,
        Command::Bank(tool) => bank_tools::run(&args.connection, tool).await,
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

/// Logs on stderr (`RUST_LOG`) and, when the standard `OTEL_*` variables ask for it, traces over OTLP.
/// The guard flushes the last spans when `up` returns.
fn init_tracing() -> socialcard_telemetry::Telemetry {
    socialcard_telemetry::init("socialcard", DEFAULT_LOG_FILTER)
}

const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,h2=warn,tower=warn,opentelemetry=warn";
