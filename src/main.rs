//! The `hubbub` server binary: parse the command line, start the server, stop it gracefully on SIGINT/SIGTERM.

use hubbub::{Config, Server};
use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::process::ExitCode;

/// Buffers of 32 KiB and more (a session's unfinished large frame, a busy session's output) come straight
/// from mmap and go back to the OS when freed. Otherwise glibc keeps them in a heap that fragments and is never
/// trimmed, and a burst of such sessions leaves the server's memory high long after they have gone.
fn return_large_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a malloc tuning parameter; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024);
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = Config::from_args();
    return_large_buffers_to_the_os();
    // A file-size limit (ulimit -f) must make a write fail — which the store reports as a server error and
    // recovers from — not kill the server with SIGXFSZ.
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGXFSZ, Default::default()) {
        eprintln!("hubbub: cannot ignore SIGXFSZ: {e}");
    }
    let server = match Server::bind(config) {
        Ok(server) => server,
        Err(e) => {
            error!("{e}");
            eprintln!("hubbub: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Signals are caught on a thread of their own, which only asks the loop to stop: the loop itself never
    // waits on anything but its poll.
    let handle = server.shutdown_handle();
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("hubbub: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = std::thread::Builder::new()
        .name("hubbub-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                info!("signal {signal}: shutting down gracefully");
                handle.shutdown();
            }
        });
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("the event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}
