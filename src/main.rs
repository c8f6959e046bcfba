//! The `wschat` binary: flags and environment into a [`Config`], logging, signals, and the one
//! line that tells a person where to point a browser.

use std::process::ExitCode;

use wschat::config::{self, Parsed};
use wschat::{Config, Server};

fn main() -> ExitCode {
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
    let _ = stop_rx.recv();
    log::info!("signal received: shutting down");
    handle.shutdown();
    ExitCode::SUCCESS
}
