use clap::Parser;
use kdedup::cli::{self, Cli, LogFormat};

// Every record allocates (its copy out of librdkafka, its key, its output
// headers) on many threads at once; glibc's malloc spent a third of the
// pipeline's CPU time on it (perf, `kdedup bench`). mimalloc's thread-local
// free lists make those allocations cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let default_level = match cli.command {
        cli::Command::Demo { .. }
        | cli::Command::Bench { .. }
        | cli::Command::Check { .. }
        | cli::Command::Replay(_) => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_new(cli::log_filter(cli.log.as_deref(), default_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli::log_filter(None, default_level)));
    // Colours only for a person at a terminal, never into a redirected log.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cli::error_chain(&e));
            2
        }
    };
    drop(runtime);
    std::process::exit(code);
}
