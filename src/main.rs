//! The `wschat` binary: flags and environment into a [`Config`], logging, signals, and the one
//! line that tells a person where to point a browser.

use std::process::ExitCode;

use wschat::config::{self, Parsed};
use wschat::{Config, Server};

fn main() -> ExitCode {
    one_malloc_arena_per_core();
    let config = match config::parse_args(std::env::args_os(), |k| std::env::var(k).ok()) {
        Ok(Parsed::Run(config)) => *config,
        Ok(Parsed::Help) => {
            print!("{}", config::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("wschat {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("wschat: {e} (see --help)");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if config.load_test {
        log::warn!(
            "load-test mode: rate limits and per-address caps are off; do not expose this server"
        );
    }
    run(config)
}

fn run(config: Config) -> ExitCode {
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = stop_tx.try_send(());
    }) {
        eprintln!("wschat: cannot install the signal handler: {e}");
        return ExitCode::FAILURE;
    }
    let handle = match Server::start(config) {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("wschat: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "wschat listening: {} (websocket {})",
        handle.page_url(),
        handle.ws_url()
    );
    if handle.addr().ip().is_unspecified() {
        print_lan_urls(handle.addr().port());
    }
    let _ = stop_rx.recv();
    log::info!("signal received: shutting down");
    handle.shutdown();
    ExitCode::SUCCESS
}

/// Bound to every address: say where the machine's neighbours can open the page too.
fn print_lan_urls(port: u16) {
    let addresses = if_addrs::get_if_addrs().unwrap_or_default();
    let lan: Vec<String> = addresses
        .iter()
        .filter(|a| !a.is_loopback() && a.ip().is_ipv4())
        .map(|a| format!("http://{}:{port}/", a.ip()))
        .collect();
    if lan.is_empty() {
        println!(
            "  listening on all addresses, but this machine has no network address besides loopback"
        );
    } else {
        println!("  from other machines: {}", lan.join("  "));
    }
}

/// glibc gives threads up to 8 malloc arenas per core, and keeps what a thread freed in its own
/// arena. With a thread per connection, connection churn then leaves ~100 MB resident after a
/// 60 s soak where one arena per core leaves 36 MB, for about the same throughput (BENCHMARKS.md).
fn one_malloc_arena_per_core() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: mallopt only sets an allocator tunable; it is called before any thread starts.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, cores as libc::c_int) };
    }
}
