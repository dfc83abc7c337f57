//! hubbub: a small chat server built around one hand-rolled `mio` reactor.
//!
//! # Layout
//!
//! * [`framing`] — the 12-byte header and the two-step frame splitter (bytes → whole frames).
//! * [`protocol`] — every packet as typed Rust, encode and decode, kind numbers and error codes (proto.md).
//! * [`reactor`] — **the loop**: one thread, one `mio::Poll`, every session; read `reactor/mod.rs` top to
//!   bottom. `reactor/requests.rs`, `reactor/messages.rs` and `reactor/completions.rs` say what requests and
//!   worker answers mean.
//! * [`session`] — one connection: its state machine, input tail, output buffer, socket I/O.
//! * [`hub`] — who is online and on which sessions (routing).
//! * [`store`] — the SQLite thread: schema, migrations, group commit; jobs in, completions out.
//! * [`auth`] — name and password rules, the argon2id hashing pool, login throttling.
//! * [`config`] — every setting and limit, with its flag and environment variable.
//! * [`client`] — a small blocking client used by tests, examples and the load generator.
//!
//! # Embedding
//!
//! A server binds from a [`Config`], runs on a thread of its own, and stops through its handle:
//!
//! ```
//! let dir = tempfile::tempdir()?;
//! let config = hubbub::Config {
//!     listen: "127.0.0.1:0".parse()?,
//!     db: dir.path().join("hubbub.db"),
//!     hash_params: hubbub::auth::HashParams::TEST,
//!     ..Default::default()
//! };
//! let server = hubbub::Server::bind(config)?.spawn()?;
//! let mut alice = hubbub::client::Client::connect(server.addr)?;
//! alice.register("alice", "correct horse")?;
//! alice.login("alice", "correct horse", "doc", 0)?;
//! alice.ping()?;
//! server.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_debug_implementations, rust_2018_idioms, unused_imports)]

pub mod auth;
pub mod client;
pub mod config;
pub mod framing;
pub mod hub;
pub mod protocol;
pub mod reactor;
pub mod session;
pub mod store;

pub use config::Config;
pub use reactor::{RunningServer, Server, ShutdownHandle, StartError};

/// Gives the calling thread the Linux `nice` value `nice` (higher is politer). The worker threads use it so
/// that, where they share a core with the loop, the loop preempts them. Best effort: if the kernel says no,
/// or elsewhere than Linux, the thread keeps its priority.
pub(crate) fn lower_thread_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority takes plain integers and, with PRIO_PROCESS and 0 on Linux (where nice is per thread),
    // changes only the calling thread's priority.
    unsafe {
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}
