use clap::Parser;
use kdedup::cli::{self, Cli, LogFormat};

// Every record allocates (its copy out of librdkafka, its key, its output
// headers) on many threads at once; glibc's malloc spent a third of the
// pipeline's CPU time on it (perf, `kdedup bench`). mimalloc's thread-local
// free lists make those allocations cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    // mimalloc's own accounting (linked in through the global allocator above).
    fn mi_process_info(
        elapsed_msecs: *mut usize,
        user_msecs: *mut usize,
        system_msecs: *mut usize,
        current_rss: *mut usize,
        peak_rss: *mut usize,
        current_commit: *mut usize,
        peak_commit: *mut usize,
        page_faults: *mut usize,
    );
    // Frees what mimalloc holds but no block uses, on every thread when `force`.
    fn mi_collect(force: bool);
}

/// The bytes mimalloc holds committed now: the Rust heap, live blocks and the
/// allocator's slack (librdkafka's C heap is glibc's, outside it).
fn mimalloc_committed() -> Option<u64> {
    let mut v = [0usize; 8];
    let [a, b, c, d, e, f, g, h] = &mut v;
    // SAFETY: mi_process_info writes one size_t through each pointer, all valid here.
    unsafe { mi_process_info(a, b, c, d, e, f, g, h) };
    Some(v[5] as u64)
}

/// Gives mimalloc's free memory back to the system now, not after its purge delay.
fn mimalloc_release_free() {
    // SAFETY: mi_collect only frees memory no live block uses.
    unsafe { mi_collect(true) };
}

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
    cli::set_heap_probe(cli::HeapProbe { committed: mimalloc_committed, release_free: mimalloc_release_free });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(cli::max_blocking_threads())
        .enable_all()
        .build()
    {
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
