//! The real `hubbub` binary as a child process, for the crash and fault suites.
//!
//! [`ServerProcess::launch`] returns a [`Launch`] builder; [`Launch::start`] runs the binary on `127.0.0.1:0` with
//! the given database and cheap argon2 parameters, reads its stderr on a thread (so the pipe never fills), learns
//! the port from the `listening on 127.0.0.1:PORT` line and keeps the log: a tail of it, every line that mentions a
//! panic, and the first warnings and errors. Dropping a [`ServerProcess`] kills (SIGKILL) and reaps the child on
//! every path the test takes, panics included.
//!
//! ```ignore
//! let server = ServerProcess::launch(dir.path().join("hubbub.db"))
//!     .nofile(20_000)
//!     .args(["--max-per-ip", "10"])
//!     .start();
//! let c = Client::connect(server.addr);
//! ```
//!
//! Client sessions on it: [`ServerProcess::connect`], [`ServerProcess::login`] and [`ServerProcess::register_all`],
//! all with the common [`PASSWORD`].
//!
//! Also here: readers of `/proc/PID/…` ([`status_kib`], [`rss_of`], [`fd_count`], [`nofile_of`]), [`send_signal`]
//! through `kill(1)`, [`raise_nofile`] for the test process itself, and [`integrity_check`] of a database the
//! server has left.

use super::PASSWORD;
use hubbub::client::{Client, LoginInfo};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long [`Launch::start`] waits for the `listening on` line.
const STARTUP: Duration = Duration::from_secs(30);
/// Warning and error lines kept whole (past the tail).
const WARNINGS_KEPT: usize = 200;

/// How to start the server: see [`ServerProcess::launch`].
#[must_use]
pub struct Launch {
    db: PathBuf,
    nofile: Option<u32>,
    args: Vec<OsString>,
    rust_log: String,
    clear_hubbub_env: bool,
    keep_lines: usize,
}

impl Launch {
    /// Runs the server under `sh -c 'ulimit -n N || ulimit -n <hard limit>; exec hubbub …'`, so it may hold
    /// thousands of descriptors; its pid is still the server's own (`exec`).
    pub fn nofile(mut self, n: u32) -> Launch {
        self.nofile = Some(n);
        self
    }

    /// Flags after the standard ones (`--listen 127.0.0.1:0 --db DB --argon2-memory-kib 8 --argon2-iterations 1`);
    /// may be called more than once.
    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The server's `RUST_LOG` (default `info`).
    pub fn rust_log(mut self, filter: impl Into<String>) -> Launch {
        self.rust_log = filter.into();
        self
    }

    /// Removes every `HUBBUB_*` variable from the server's environment, so a stray setting cannot change what is
    /// not flagged.
    pub fn clear_hubbub_env(mut self) -> Launch {
        self.clear_hubbub_env = true;
        self
    }

    /// How many of the last stderr lines to keep (default 400).
    pub fn keep_lines(mut self, n: usize) -> Launch {
        self.keep_lines = n;
        self
    }

    /// Starts the binary and waits (up to 30 s) for its `listening on` line; panics with its stderr otherwise.
    pub fn start(self) -> ServerProcess {
        let mut command = match self.nofile {
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!(
                        r#"ulimit -n {n} 2>/dev/null || ulimit -n "$(ulimit -H -n)"; exec "$0" "$@""#
                    ))
                    .arg(env!("CARGO_BIN_EXE_hubbub"));
                sh
            }
            None => Command::new(env!("CARGO_BIN_EXE_hubbub")),
        };
        command
            .args(["--listen", "127.0.0.1:0", "--db"])
            .arg(&self.db)
            .args(["--argon2-memory-kib", "8", "--argon2-iterations", "1"])
            .args(&self.args)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if self.clear_hubbub_env {
            for (key, _) in std::env::vars() {
                if key.starts_with("HUBBUB_") {
                    command.env_remove(key);
                }
            }
        }
        let mut child = command.spawn().expect("start the hubbub binary");
        let pid = child.id();
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(ServerLog::default()));
        let (tx, rx) = mpsc::channel();
        let keep = self.keep_lines;
        // Reads stderr to its end, so the pipe never fills; the first "listening on" line gives the address.
        let drain = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(at) = line.find("listening on ") {
                        let addr = line[at + "listening on ".len()..]
                            .split_whitespace()
                            .next()
                            .and_then(|a| a.parse::<SocketAddr>().ok());
                        if let (Some(addr), Some(tx)) = (addr, tx.take()) {
                            let _ = tx.send(addr);
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.lines += 1;
                    if line.contains("panicked") || line.contains("RUST_BACKTRACE") {
                        log.panics.push(line.clone());
                    }
                    if (line.contains(" WARN ") || line.contains(" ERROR "))
                        && log.warnings.len() < WARNINGS_KEPT
                    {
                        log.warnings.push(line.clone());
                    }
                    if log.tail.len() >= keep {
                        log.tail.pop_front();
                    }
                    log.tail.push_back(line);
                }
            })
        };
        let mut process = ServerProcess {
            child,
            pid,
            addr: "127.0.0.1:0".parse().unwrap(),
            log,
            drain: Some(drain),
            status: None,
        };
        match rx.recv_timeout(STARTUP) {
            Ok(addr) => process.addr = addr,
            Err(_) => {
                process.kill();
                panic!(
                    "the server did not say where it listens; stderr:\n{}",
                    process.log_tail(50)
                );
            }
        }
        process
    }
}

/// What the server wrote to stderr.
#[derive(Default)]
struct ServerLog {
    /// The last lines (up to [`Launch::keep_lines`]).
    tail: VecDeque<String>,
    /// Lines seen in all.
    lines: u64,
    /// Every line that mentions a panic.
    panics: Vec<String>,
    /// The first WARN and ERROR lines.
    warnings: Vec<String>,
}

/// A running `hubbub` process. Dropping it kills it (SIGKILL) and reaps it, whatever path the test took.
pub struct ServerProcess {
    child: Child,
    pid: u32,
    /// Where it listens (learnt from its stderr).
    pub addr: SocketAddr,
    log: Arc<Mutex<ServerLog>>,
    drain: Option<JoinHandle<()>>,
    /// Its exit status, once reaped.
    status: Option<ExitStatus>,
}

impl ServerProcess {
    /// A builder for a server on the database file `db` (created if missing).
    pub fn launch(db: impl Into<PathBuf>) -> Launch {
        Launch {
            db: db.into(),
            nofile: None,
            args: Vec::new(),
            rust_log: "info".into(),
            clear_hubbub_env: false,
            keep_lines: 400,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A new client connection; panics (saying where) if it cannot connect.
    pub fn connect(&self) -> Client {
        Client::connect(self.addr).unwrap_or_else(|e| panic!("connect to {}: {e}", self.addr))
    }

    /// A session of `name` (registered with [`PASSWORD`]) on `device`, logged in with `last_seen`; its catch-up is
    /// left to the caller.
    pub fn login(&self, name: &str, device: &str, last_seen: u64) -> (Client, LoginInfo) {
        let mut c = self.connect();
        let info = c
            .login(name, PASSWORD, device, last_seen)
            .unwrap_or_else(|e| panic!("{name} logs in on {device}: {e}"));
        (c, info)
    }

    /// Registers `names` (with [`PASSWORD`]), in order, on one connection, without logging in.
    pub fn register_all<S: AsRef<str>>(&self, names: &[S]) {
        let mut c = self.connect();
        for name in names {
            let name = name.as_ref();
            c.register(name, PASSWORD)
                .unwrap_or_else(|e| panic!("register {name}: {e}"));
        }
    }

    /// The kept tail of its stderr.
    pub fn log_text(&self) -> String {
        let log = self.log.lock().unwrap();
        log.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The last `n` lines of its stderr.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        let skip = log.tail.len().saturating_sub(n);
        log.tail
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Lines of stderr seen so far.
    pub fn log_line_count(&self) -> u64 {
        self.log.lock().unwrap().lines
    }

    /// Lines of stderr (kept, no longer kept).
    pub fn log_lines(&self) -> (usize, usize) {
        let log = self.log.lock().unwrap();
        (log.tail.len(), log.lines as usize - log.tail.len())
    }

    /// Every stderr line so far that mentions a panic.
    pub fn panics(&self) -> Vec<String> {
        self.log.lock().unwrap().panics.clone()
    }

    /// The first WARN and ERROR lines of its stderr.
    pub fn warnings(&self) -> Vec<String> {
        self.log.lock().unwrap().warnings.clone()
    }

    /// No stderr line mentions a panic. Call it once the process has exited if every line must have been read.
    pub fn assert_no_panics(&self) {
        let panics = self.panics();
        assert!(
            panics.is_empty(),
            "the server panicked: {panics:?}\nstderr:\n{}",
            self.log_text()
        );
    }

    /// The server is alive, has not panicked, and still greets and answers a Ping on a new connection.
    pub fn assert_healthy(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the server exited ({status}); stderr tail:\n{}",
                self.log_tail(80)
            );
        }
        let panics = self.panics();
        assert!(
            panics.is_empty(),
            "the server panicked:\n{}",
            panics.join("\n")
        );
        let mut c = Client::connect(self.addr).expect("connect a client");
        c.ping().expect("the server still answers Ping");
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.status.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Its resident set size (VmRSS of /proc/PID/status), in KiB; panics if it cannot be read.
    pub fn rss_kib(&self) -> u64 {
        rss_of(self.pid).expect("VmRSS of the server from /proc/PID/status")
    }

    /// Its open file descriptors (the entries of /proc/PID/fd; 0 if unreadable).
    pub fn open_fds(&self) -> usize {
        fd_count(self.pid)
    }

    /// Waits until the descriptor count has not changed for `quiet` (and is at most `at_most`, if given), or
    /// `within` has passed; returns it.
    pub fn settled_fds(&self, quiet: Duration, within: Duration, at_most: Option<usize>) -> usize {
        let deadline = Instant::now() + within;
        let mut last = self.open_fds();
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.open_fds();
            if now != last {
                last = now;
                since = Instant::now();
            }
            let low_enough = at_most.is_none_or(|m| last <= m);
            if (since.elapsed() >= quiet && low_enough) || Instant::now() >= deadline {
                return last;
            }
        }
    }

    /// SIGKILL, and reap it (no-op once it has been reaped).
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.finish_drain();
    }

    /// SIGTERM through `kill -TERM PID`, then wait up to `within` for the exit; None if it did not exit in time
    /// (the process is still running then; Drop kills it).
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        send_signal(self.pid, "-TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                self.finish_drain();
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish_drain(&mut self) {
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Checks a database the server has left (none may be running on it): SQLite's `PRAGMA integrity_check` says "ok",
/// and no (sender, client_msg_id) is stored twice (a resend must get the original message, [HB-5.2]).
pub fn integrity_check(db: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(result, "ok", "PRAGMA integrity_check of {}", db.display());
    let dupes: i64 = conn
        .query_row(
            "SELECT count(*) FROM (SELECT 1 FROM messages GROUP BY sender_id, client_msg_id HAVING count(*) > 1)",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(
        dupes,
        0,
        "a (sender, client_msg_id) is stored twice in {}",
        db.display()
    );
}

/// Sends `signal` (e.g. "-TERM", "-STOP", "-CONT") to a process with kill(1); panics if kill fails.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// A `kB` field of /proc/PID/status (e.g. "VmRSS:", "VmHWM:"), in KiB; None if unreadable.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The resident set size of a process (VmRSS), in KiB; None if unreadable.
pub fn rss_of(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Open descriptors of a process: the entries of /proc/PID/fd (0 if unreadable).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The soft "Max open files" of a process, from /proc/PID/limits (0 if unreadable).
pub fn nofile_of(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}
