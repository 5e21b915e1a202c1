use clap::Parser;
use kdedup::cli::{self, Cli, LogFormat};

// Every record allocates (its copy out of librdkafka, its key, its output
// headers) on many threads at once; glibc's malloc spent a third of the
// pipeline's CPU time on it (perf, `kdedup bench`). mimalloc's thread-local
// free lists make those allocations cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    let default_level = match cli.command {
        cli::Command::Demo { .. }
        | cli::Command::Bench { .. }
        | cli::Command::Check { .. }
        | cli::Command::Replay(_) => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(default_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
            eprintln!("error: {e:#}");
            2
        }
    };
    drop(runtime);
    std::process::exit(code);
}

/// mimalloc asks for transparent huge pages on its arenas, so on a host whose
/// THP mode is `madvise` (this project's machine) or `always`, every fresh
/// region of memory faults in as a whole zeroed 2 MiB page. fjall's write
/// batches grow on the store's blocking threads into fresh memory on each
/// call: perf put a fifth of the pipeline threads' time in the kernel's
/// `clear_page`, and `kdedup bench` ran at 37–39k events/s with huge pages
/// and 60–68k without (2 cores, back-to-back pairs). Applies to this process
/// only, for every later fault.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
