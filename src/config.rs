//! Configuration: every setting and limit, its default, its flag and its environment variable.
//!
//! Owns: the `Config` the server is built from, and the command line that fills it (`Config::from_args`).
//! A flag on the command line wins over its environment variable, which wins over the default. A value out of
//! range is refused at startup with a message that names the flag.
//!
//! Must not: read files other than the command line and environment, or hold runtime state.

use crate::auth::HashParams;
use crate::store::{IndexSettings, SyncMode};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything a `Server` needs to start. `Config::default()` is the production default; tests change fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Address to listen on. The default is loopback only; use `0.0.0.0:7878` to serve a LAN.
    pub listen: SocketAddr,
    /// The SQLite database file, created if missing.
    pub db: PathBuf,
    /// `full`: an acknowledged write survives power loss. `normal`: it survives a crash of the process only.
    pub sync: SyncMode,
    /// Largest frame body a client may send, in bytes. Bigger frames close the connection ([HB-2.5]).
    pub max_frame: u32,
    /// Most client connections at once; the next one gets "server full" and is closed.
    pub max_connections: usize,
    /// Most connections from one IP address at once.
    pub max_per_ip: usize,
    /// Connections the kernel queues for us before the loop accepts them (the listen backlog).
    pub listen_backlog: u32,
    /// A connection that sends no frame for this long is closed. Clients send Ping to stay connected.
    pub idle_timeout: Duration,
    /// A connection that has not logged in after this long is closed.
    pub auth_timeout: Duration,
    /// Most jobs waiting for the store thread; past it the loop stops reading from clients (backpressure).
    pub store_queue: usize,
    /// Most jobs the store commits in one transaction (group commit).
    pub commit_batch: usize,
    /// How the message index keeps up with the messages stored (batch, delay, most lag).
    pub index: IndexSettings,
    /// Threads that hash passwords.
    pub hash_threads: usize,
    /// Most password hashes waiting; past it Login and Register answer "server busy" at once.
    pub hash_queue: usize,
    /// argon2id cost.
    pub hash_params: HashParams,
    /// How long a session token stays valid after it is issued.
    pub token_ttl: Duration,
    /// Most live sessions of one user; logging in once more closes the oldest.
    pub max_sessions_per_user: usize,
    /// Failed logins for one username or one address, inside `login_window`, before attempts are refused.
    pub login_max_failures: u32,
    /// The window in which failed logins are counted.
    pub login_window: Duration,
    /// First lockout after too many failures; it doubles with each further failure.
    pub login_lockout: Duration,
    /// Longest lockout.
    pub login_lockout_max: Duration,
    /// Most usernames and addresses the login throttle remembers (its memory bound).
    pub throttle_entries: usize,
    /// Longest message text in bytes.
    pub max_text: usize,
    /// Bytes waiting in one session's output before it stops getting live pushes (it catches up from the store).
    pub out_high_water: usize,
    /// Output below which a session that is catching up gets its next page.
    pub out_low_water: usize,
    /// Messages per page when a session catches up from the store.
    pub feed_page: u32,
    /// Messages a session may send per second (sustained), and the burst it may send at once.
    pub send_rate: u32,
    pub send_burst: u32,
    /// How long a graceful shutdown may take before the server exits anyway.
    pub shutdown_grace: Duration,
    /// Most members in one room.
    pub max_room_members: u32,
    /// Most rooms one user may be a member of.
    pub max_rooms_per_user: u32,
    /// Most users one session may watch for presence.
    pub max_watch: usize,
    /// Typing notices are forwarded at most once per target per this interval.
    pub typing_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            db: PathBuf::from("./hubbub.db"),
            sync: SyncMode::Full,
            max_frame: 64 * 1024,
            max_connections: 10_000,
            max_per_ip: 64,
            listen_backlog: 4096,
            idle_timeout: Duration::from_secs(60),
            auth_timeout: Duration::from_secs(10),
            store_queue: 4096,
            commit_batch: 1024,
            index: IndexSettings::default(),
            hash_threads: 2,
            hash_queue: 256,
            hash_params: HashParams::PRODUCTION,
            token_ttl: Duration::from_secs(30 * 24 * 3600),
            max_sessions_per_user: 8,
            login_max_failures: 5,
            login_window: Duration::from_secs(60),
            login_lockout: Duration::from_secs(2),
            login_lockout_max: Duration::from_secs(300),
            throttle_entries: 100_000,
            max_text: 8 * 1024,
            out_high_water: 1024 * 1024,
            out_low_water: 64 * 1024,
            feed_page: 50,
            send_rate: 50,
            send_burst: 200,
            shutdown_grace: Duration::from_secs(4),
            max_room_members: 1000,
            max_rooms_per_user: 100,
            max_watch: 1000,
            typing_interval: Duration::from_secs(2),
        }
    }
}

/// Smallest `--max-frame`: a Login with the longest name, password and device must fit.
pub const MIN_MAX_FRAME: u32 = 2048;
/// Largest `--max-text`: a string on the wire has a u16 length, and room is left for the other fields.
pub const MAX_MAX_TEXT: u64 = 60_000;
/// Largest `--max-frame`.
pub const MAX_MAX_FRAME: u32 = 16 * 1024 * 1024;

impl Config {
    /// Fills a `Config` from the command line and environment. Exits with a usage message (naming the flag) on
    /// a bad value, and prints help for `--help`.
    pub fn from_args() -> Config {
        Cli::parse().into_config()
    }

    /// The same, from an explicit argument list (for tests). Errors carry clap's message.
    pub fn try_from_args<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args).map(Cli::into_config)
    }

    /// The most output one session may hold before it is closed as a slow consumer: the high-water mark, plus
    /// one feed page of the longest messages (a page is appended whole once output is below the low-water
    /// mark), plus the high-water mark again as room for other users' pushes (receipts, presence, events).
    pub fn out_hard_limit(&self) -> usize {
        let longest_deliver = self.max_text + 2 * 32 + 64;
        2 * self.out_high_water + self.feed_page as usize * longest_deliver
    }

    /// Cross-field checks that a single flag's parser cannot make.
    pub fn validate(&self) -> Result<(), String> {
        if self.out_low_water >= self.out_high_water {
            return Err("--out-low-water must be below --out-high-water".into());
        }
        if self.max_text + 64 > self.max_frame as usize {
            return Err("--max-text must leave room for the Send header inside --max-frame".into());
        }
        self.hash_params
            .validate()
            .map_err(|e| format!("--argon2-*: {e}"))
    }
}

/// Parses durations such as `500ms`, `10s`, `5m`, `2h`, `30d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 500ms, 10s, 5m, 2h or 30d"))?;
    let scale_ms = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "unknown unit '{unit}' in '{text}': use ms, s, m, h or d"
            ))
        }
    };
    n.checked_mul(scale_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("'{text}' is too long"))
}

fn parse_sync(text: &str) -> Result<SyncMode, String> {
    match text {
        "full" => Ok(SyncMode::Full),
        "normal" => Ok(SyncMode::Normal),
        _ => Err("expected full or normal".into()),
    }
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

/// The command line. Each field maps one-to-one onto `Config`; defaults are the ones in `Config::default`.
#[derive(Parser, Debug)]
#[command(
    name = "hubbub",
    version,
    about = "A small, fast chat server: one mio reactor, SQLite on a worker thread."
)]
struct Cli {
    /// Address to listen on (0.0.0.0:7878 serves the LAN).
    #[arg(long, env = "HUBBUB_LISTEN", default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// SQLite database file.
    #[arg(long, env = "HUBBUB_DB", default_value = "./hubbub.db")]
    db: PathBuf,
    /// full (an ack survives power loss) or normal (it survives a crash of the process).
    #[arg(long, env = "HUBBUB_SYNC", default_value = "full", value_parser = parse_sync)]
    sync: SyncMode,
    /// Largest frame body a client may send, in bytes.
    #[arg(long, env = "HUBBUB_MAX_FRAME", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(MIN_MAX_FRAME as i64..=MAX_MAX_FRAME as i64))]
    max_frame: u32,
    /// Most client connections at once.
    #[arg(long, env = "HUBBUB_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// Most connections from one IP address.
    #[arg(long, env = "HUBBUB_MAX_PER_IP", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_per_ip: u64,
    /// Connections the kernel queues before the server accepts them (listen backlog; the kernel caps it at
    /// net.core.somaxconn).
    #[arg(long, env = "HUBBUB_LISTEN_BACKLOG", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    listen_backlog: u32,
    /// Close a connection that sends no frame for this long.
    #[arg(long, env = "HUBBUB_IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    idle_timeout: Duration,
    /// Close a connection that has not logged in after this long.
    #[arg(long, env = "HUBBUB_AUTH_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    auth_timeout: Duration,
    /// Most jobs waiting for the store thread before the loop stops reading from clients.
    #[arg(long, env = "HUBBUB_STORE_QUEUE", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    store_queue: u64,
    /// Most jobs the store commits in one transaction.
    #[arg(long, env = "HUBBUB_COMMIT_BATCH", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    commit_batch: u64,
    /// Most messages the index thread adds to the message index in one transaction.
    #[arg(long, env = "HUBBUB_INDEX_BATCH", default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    index_batch: u64,
    /// How long fewer than --index-batch new messages wait for more before they are indexed.
    #[arg(long, env = "HUBBUB_INDEX_DELAY", default_value = "100ms", value_parser = parse_duration)]
    index_delay: Duration,
    /// Most stored messages the message index may lack before the store waits for it.
    #[arg(long, env = "HUBBUB_INDEX_MAX_LAG", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    index_max_lag: u64,
    /// Threads that hash passwords.
    #[arg(long, env = "HUBBUB_HASH_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    hash_threads: u64,
    /// Most password hashes waiting before Login and Register answer "server busy".
    #[arg(long, env = "HUBBUB_HASH_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    hash_queue: u64,
    /// argon2id memory cost in KiB.
    #[arg(long, env = "HUBBUB_ARGON2_MEMORY_KIB", default_value_t = HashParams::PRODUCTION.memory_kib)]
    argon2_memory_kib: u32,
    /// argon2id iterations.
    #[arg(long, env = "HUBBUB_ARGON2_ITERATIONS", default_value_t = HashParams::PRODUCTION.iterations)]
    argon2_iterations: u32,
    /// argon2id lanes.
    #[arg(long, env = "HUBBUB_ARGON2_PARALLELISM", default_value_t = HashParams::PRODUCTION.parallelism)]
    argon2_parallelism: u32,
    /// How long a session token stays valid.
    #[arg(long, env = "HUBBUB_TOKEN_TTL", default_value = "30d", value_parser = positive_duration)]
    token_ttl: Duration,
    /// Most live sessions of one user; one more closes the oldest.
    #[arg(long, env = "HUBBUB_MAX_SESSIONS_PER_USER", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1000))]
    max_sessions_per_user: u64,
    /// Failed logins (per username and per address) inside the window before attempts are refused.
    #[arg(long, env = "HUBBUB_LOGIN_MAX_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    login_max_failures: u32,
    /// The window in which failed logins are counted.
    #[arg(long, env = "HUBBUB_LOGIN_WINDOW", default_value = "60s", value_parser = positive_duration)]
    login_window: Duration,
    /// First lockout after too many failed logins (it doubles with each further failure).
    #[arg(long, env = "HUBBUB_LOGIN_LOCKOUT", default_value = "2s", value_parser = positive_duration)]
    login_lockout: Duration,
    /// Longest lockout.
    #[arg(long, env = "HUBBUB_LOGIN_LOCKOUT_MAX", default_value = "5m", value_parser = positive_duration)]
    login_lockout_max: Duration,
    /// Most usernames and addresses the login throttle remembers.
    #[arg(long, env = "HUBBUB_THROTTLE_ENTRIES", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(16..=10_000_000))]
    throttle_entries: u64,
    /// Longest message text in bytes.
    #[arg(long, env = "HUBBUB_MAX_TEXT", default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..=MAX_MAX_TEXT))]
    max_text: u64,
    /// Output bytes waiting for one session before it stops getting live pushes.
    #[arg(long, env = "HUBBUB_OUT_HIGH_WATER", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(4096..=1 << 30))]
    out_high_water: u64,
    /// Output below which a session catching up gets its next page.
    #[arg(long, env = "HUBBUB_OUT_LOW_WATER", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    out_low_water: u64,
    /// Messages per page when a session catches up from the store.
    #[arg(long, env = "HUBBUB_FEED_PAGE", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    feed_page: u32,
    /// Messages a session may send per second.
    #[arg(long, env = "HUBBUB_SEND_RATE", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    send_rate: u32,
    /// Messages a session may send in one burst.
    #[arg(long, env = "HUBBUB_SEND_BURST", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    send_burst: u32,
    /// How long a graceful shutdown may take.
    #[arg(long, env = "HUBBUB_SHUTDOWN_GRACE", default_value = "4s", value_parser = positive_duration)]
    shutdown_grace: Duration,
    /// Most members in one room.
    #[arg(long, env = "HUBBUB_MAX_ROOM_MEMBERS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(2..=65_535))]
    max_room_members: u32,
    /// Most rooms one user may be a member of.
    #[arg(long, env = "HUBBUB_MAX_ROOMS_PER_USER", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_rooms_per_user: u32,
    /// Most users one session may watch for presence.
    #[arg(long, env = "HUBBUB_MAX_WATCH", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_watch: u64,
    /// Typing notices are forwarded at most once per target per this interval.
    #[arg(long, env = "HUBBUB_TYPING_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    typing_interval: Duration,
}

impl Cli {
    fn into_config(self) -> Config {
        Config {
            listen: self.listen,
            db: self.db,
            sync: self.sync,
            max_frame: self.max_frame,
            max_connections: self.max_connections as usize,
            max_per_ip: self.max_per_ip as usize,
            listen_backlog: self.listen_backlog,
            idle_timeout: self.idle_timeout,
            auth_timeout: self.auth_timeout,
            store_queue: self.store_queue as usize,
            commit_batch: self.commit_batch as usize,
            index: IndexSettings {
                batch: self.index_batch as usize,
                delay: self.index_delay,
                max_lag: self.index_max_lag,
            },
            hash_threads: self.hash_threads as usize,
            hash_queue: self.hash_queue as usize,
            hash_params: HashParams {
                memory_kib: self.argon2_memory_kib,
                iterations: self.argon2_iterations,
                parallelism: self.argon2_parallelism,
            },
            token_ttl: self.token_ttl,
            max_sessions_per_user: self.max_sessions_per_user as usize,
            login_max_failures: self.login_max_failures,
            login_window: self.login_window,
            login_lockout: self.login_lockout,
            login_lockout_max: self.login_lockout_max,
            throttle_entries: self.throttle_entries as usize,
            max_text: self.max_text as usize,
            out_high_water: self.out_high_water as usize,
            out_low_water: self.out_low_water as usize,
            feed_page: self.feed_page,
            send_rate: self.send_rate,
            send_burst: self.send_burst,
            shutdown_grace: self.shutdown_grace,
            max_room_members: self.max_room_members,
            max_rooms_per_user: self.max_rooms_per_user,
            max_watch: self.max_watch as usize,
            typing_interval: self.typing_interval,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::try_from_args(["hubbub"]).unwrap();
        let d = Config::default();
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.max_frame, 65536);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.max_per_ip, 64);
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.auth_timeout, Duration::from_secs(10));
        assert_eq!(c.token_ttl, d.token_ttl);
        assert_eq!(c.hash_params, d.hash_params);
        assert!(c.validate().is_ok());
    }

    // Every default is written twice, in the flag attributes and in Config::default (for embedding and tests):
    // this keeps the two from drifting apart, all of them at once.
    #[test]
    fn command_line_defaults_are_config_default() {
        let c = Config::try_from_args(["hubbub"]).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn a_bad_value_names_its_flag() {
        let err = Config::try_from_args(["hubbub", "--max-frame", "10"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--max-frame"), "{err}");
        let err = Config::try_from_args(["hubbub", "--idle-timeout", "0s"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--idle-timeout"), "{err}");
        let err = Config::try_from_args(["hubbub", "--listen", "nowhere"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--listen"), "{err}");
    }

    #[test]
    fn flags_set_fields() {
        let c = Config::try_from_args([
            "hubbub",
            "--listen",
            "0.0.0.0:9000",
            "--sync",
            "normal",
            "--max-per-ip",
            "3",
            "--index-batch",
            "1",
            "--index-delay",
            "0ms",
            "--index-max-lag",
            "1",
        ])
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.sync, SyncMode::Normal);
        assert_eq!(c.max_per_ip, 3);
        assert_eq!(
            c.index,
            IndexSettings {
                batch: 1,
                delay: Duration::ZERO,
                max_lag: 1,
            }
        );
        for bad in [["--index-batch", "0"], ["--index-max-lag", "0"]] {
            let error = Config::try_from_args(["hubbub", bad[0], bad[1]]).unwrap_err();
            assert!(error.to_string().contains(bad[0]), "{error}");
        }
    }
}
