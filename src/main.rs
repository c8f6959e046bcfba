//! The `wschat` binary: flags and environment into a [`Config`], logging, signals (SIGTERM and
//! SIGINT stop it; SIGHUP reloads the TLS pair, or stops a build without TLS), and the one line
//! that tells a person where to point a browser.

use std::process::ExitCode;

use crossbeam_channel::Receiver;
use wschat::config::{self, Parsed};
use wschat::{Config, Handle, Server, StartError};

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
    if config.echo {
        log::info!("echo mode: /echo sends every message back (--echo)");
    }
    run(config)
}

fn run(config: Config) -> ExitCode {
    let signals = match signals() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("wschat: cannot install the signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = match Server::start(config) {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("wschat: {e}");
            return start_failure(&e);
        }
    };
    println!(
        "wschat listening: {} (websocket {})",
        handle.page_url(),
        handle.ws_url()
    );
    if handle.addr().ip().is_unspecified() {
        let scheme = if handle.is_tls() { "https" } else { "http" };
        print_lan_urls(scheme, handle.addr().port());
    }
    wait_for_stop(&handle, &signals);
    log::info!("signal received: shutting down");
    handle.shutdown();
    ExitCode::SUCCESS
}

/// A bad TLS pair is a configuration error like a bad flag (status 2); the rest are failures.
fn start_failure(e: &StartError) -> ExitCode {
    #[cfg(feature = "tls")]
    if matches!(e, StartError::Tls(_)) {
        return ExitCode::from(2);
    }
    let _ = e;
    ExitCode::FAILURE
}

/// What a signal asks of the server.
enum Signal {
    /// SIGINT, SIGTERM: shut down cleanly (and SIGHUP in a build without TLS).
    Stop,
    /// SIGHUP: read the TLS pair again.
    Reload,
}

/// The signals, as messages on a channel: a thread of signal-hook's receives them, and the main
/// thread acts on them (a signal handler itself may do almost nothing).
fn signals() -> std::io::Result<Receiver<Signal>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let (tx, rx) = crossbeam_channel::bounded(4);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let asked = match signal {
                    SIGHUP if cfg!(feature = "tls") => Signal::Reload,
                    _ => Signal::Stop,
                };
                let _ = tx.try_send(asked); // a full queue already holds what to do
            }
        })?;
    Ok(rx)
}

/// Runs until SIGTERM or SIGINT; each SIGHUP meanwhile reloads the TLS pair.
fn wait_for_stop(handle: &Handle, signals: &Receiver<Signal>) {
    while let Ok(Signal::Reload) = signals.recv() {
        reload(handle);
    }
}

#[cfg(feature = "tls")]
fn reload(handle: &Handle) {
    if !handle.is_tls() {
        return log::info!("SIGHUP: no TLS pair to reload (no --tls-cert)");
    }
    match handle.reload_tls() {
        Ok(()) => log::info!("SIGHUP: TLS pair reloaded; new connections get it"),
        Err(e) => log::error!("SIGHUP: {e}; still serving the previous pair"),
    }
}

#[cfg(not(feature = "tls"))]
fn reload(_: &Handle) {}

/// Bound to every address: say where the machine's neighbours can open the page too.
fn print_lan_urls(scheme: &str, port: u16) {
    let addresses = if_addrs::get_if_addrs().unwrap_or_default();
    let lan: Vec<String> = addresses
        .iter()
        .filter(|a| !a.is_loopback() && a.ip().is_ipv4())
        .map(|a| format!("{scheme}://{}:{port}/", a.ip()))
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
