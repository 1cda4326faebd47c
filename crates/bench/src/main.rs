//! `cargo run --release -p socialcard-bench -- <scenario> [--json] [--quick]`
//!
//! Each scenario prints a table (or one JSON object with `--json`). The machines are shared and noisy,
//! so every figure stands beside a baseline measured in the same run. `--quick` runs a tiny size, for CI
//! to keep the benchmarks working; its figures mean nothing.

mod activation;
mod batch;
mod ingest;
mod memory;
mod propagation;
mod scale;
mod scratch;
mod stats;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Dual activation through the bank-facing gRPC API beside the raw database writes it needs.
    Activation,
    /// Commit-to-consumer-applied latency through the embedded log and through Kafka.
    Propagation,
    /// Courier status updates per second through postal's gRPC stream beside a bulk insert of the same rows.
    Ingest,
    /// An employer batch of 1,000,000 applications into production beside raw multi-row inserts of its rows.
    Batch,
    /// Peak and idle RSS of the all-in-one process and its start-up time to SERVING.
    Memory,
    /// Point lookups and activations against a registry of 10,000,000 cards beside an empty one.
    Scale,
    All,
}

#[derive(Debug, Parser)]
#[command(name = "socialcard-bench")]
struct Args {
    scenario: Scenario,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// A tiny run that only proves the scenario works.
    #[arg(long)]
    quick: bool,
    /// A real Kafka-protocol broker; default: librdkafka's mock broker in this process.
    #[arg(long, env = "SOCIALCARD_BENCH_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// PostgreSQL for the registry's rows (a fresh schema per run); SQLite is always measured.
    #[arg(long, env = "SOCIALCARD_BENCH_DATABASE_URL")]
    database_url: Option<String>,
}

/// A scenario's size from the environment variable `name` (to profile at another size), else `default`.
fn size_from_env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// mimalloc instead of glibc's allocator: the services allocate and free many small buffers from
/// several threads at once (a batch import spent a quarter of its CPU in glibc's malloc and free,
/// consolidating its arenas); see docs/benchmarks.md, batch.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The memory scenario starts this binary again serving one service alone.
    if let Ok(what) = std::env::var(memory::SERVE_ENV) {
        return memory::serve_alone(&what).await;
    }
    let args = Args::parse();
    let mut results = Vec::new();
    if matches!(args.scenario, Scenario::Activation | Scenario::All) {
        results.push(activation::run(args.quick, args.database_url.clone()).await?);
    }
    if matches!(args.scenario, Scenario::Propagation | Scenario::All) {
        results.push(propagation::run(args.quick, args.kafka_brokers.clone()).await?);
    }
    if matches!(args.scenario, Scenario::Ingest | Scenario::All) {
        results.push(ingest::run(args.quick).await?);
    }
    if matches!(args.scenario, Scenario::Batch | Scenario::All) {
        results.push(batch::run(args.quick, args.database_url.clone()).await?);
    }
    if matches!(args.scenario, Scenario::Memory | Scenario::All) {
        results.push(memory::run(args.quick).await?);
    }
    if matches!(args.scenario, Scenario::Scale | Scenario::All) {
        results.push(scale::run(args.quick, args.database_url.clone()).await?);
    }
    if args.json {
        println!("{{{}}}", results.iter().map(|r| r.json()).collect::<Vec<_>>().join(","));
    } else {
        for r in &results {
            r.print();
        }
    }
    Ok(())
}
