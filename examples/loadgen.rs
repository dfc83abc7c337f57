//! loadgen: hubbub's benchmark.
//!
//! ```text
//! cargo run --release --example loadgen -- dm-throughput [--pairs 100 --window 64 --size 64 --seconds 10]
//! cargo run --release --example loadgen -- dm-latency [--rate 20000 --no-relay]
//! cargo run --release --example loadgen -- idle [--connections 10000]
//! cargo run --release --example loadgen -- login-storm [--logins 500]
//! cargo run --release --example loadgen -- backlog [--backlog 50000 --pairs 10]
//! cargo run --release --example loadgen -- room-fanout [--members 1000 --messages 1000]
//! cargo run --release --example loadgen -- store-ceiling [--batch 1,64,1024 --sync normal]
//! cargo run --release --example loadgen -- relay-ceiling
//! cargo run --release --example loadgen -- all [--json]
//! ```
//!
//! Each network scenario starts its own server (the `hubbub` binary next to this executable, or `--server-bin`)
//! on 127.0.0.1:0 with a fresh database, cheap argon2 (except login-storm) and a send rate limit too high to
//! matter; `--server ADDR` uses a running server instead. When `taskset` exists and there are two cores, the
//! server runs on core 0 and the load generator on core 1. Clients are driven by one mio loop on one thread, so
//! the generator costs as little as it can. Everything is bounded in time and count; the spawned server is
//! killed on every way out. Progress goes to stderr, the results (a table, or one JSON object with `--json`) to
//! stdout. The exit status is 0 when every check passed, 1 when a check failed, 2 when the run could not be
//! carried out.

use clap::{Parser, ValueEnum};
use hubbub::client::Client;
use hubbub::framing::{patch_body_len, put_header, split_frame, Header};
use hubbub::protocol::{code, kind, Packet, Request};
use hubbub::store::{
    configure_connection, file_client_ids, ClientId, IndexEntry, IndexSettings, IndexWriter,
    StoreConfig, StoreHandle, SyncMode, CLIENT_IDS_FILE_AT,
};
use mio::net::{TcpListener as MioListener, TcpStream as MioStream};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    DmThroughput,
    DmLatency,
    Idle,
    LoginStorm,
    Backlog,
    RoomFanout,
    StoreCeiling,
    RelayCeiling,
    All,
}

/// The command line. Sizes left unset take the scenario's default (or its `--smoke` default).
#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "hubbub's load generator: throughput, latency, memory, login storms, backlog, fan-out, ceilings."
)]
struct Opts {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Use the server running at ADDR instead of starting one (its memory cannot be read then).
    #[arg(long)]
    server: Option<SocketAddr>,
    /// The hubbub binary to start (default: `hubbub` next to this executable).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// How long a timed phase runs (store-ceiling: per batch size).
    #[arg(long)]
    seconds: Option<f64>,
    /// SQLite durability, passed to the server and used by store-ceiling.
    #[arg(long, default_value = "full", value_parser = ["full", "normal"])]
    sync: String,
    /// Tiny sizes and short phases: checks that everything works, measures nothing.
    #[arg(long)]
    smoke: bool,
    /// Sender/receiver pairs (dm-*, relay-ceiling: 100; backlog: 10 chatting pairs).
    #[arg(long)]
    pairs: Option<usize>,
    /// Unacknowledged messages per sender (64; room-fanout 16).
    #[arg(long)]
    window: Option<usize>,
    /// Message text size in bytes.
    #[arg(long)]
    size: Option<usize>,
    /// Messages per sender (dm-throughput; instead of --seconds), or in all (room-fanout, 1000).
    #[arg(long)]
    messages: Option<u64>,
    /// Offered messages per second over all pairs (dm-latency 20000; backlog chatter 200).
    #[arg(long)]
    rate: Option<f64>,
    /// Idle logged-in connections (idle: 10000).
    #[arg(long)]
    connections: Option<usize>,
    /// Simultaneous logins (login-storm: 500).
    #[arg(long)]
    logins: Option<usize>,
    /// Messages waiting for the offline user (backlog: 50000).
    #[arg(long)]
    backlog: Option<usize>,
    /// Idle connections per source address 127.0.0.x (idle: 25000, below the ~28k ephemeral ports of one).
    #[arg(long)]
    per_source: Option<usize>,
    /// Online room members (room-fanout: 1000).
    #[arg(long)]
    members: Option<usize>,
    /// Room senders (room-fanout: 1).
    #[arg(long)]
    senders: Option<usize>,
    /// Transaction sizes for store-ceiling, comma separated (1,64,1024).
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// argon2 memory for login-storm (production: 19456; --smoke: 1024).
    #[arg(long)]
    argon2_memory_kib: Option<u32>,
    /// argon2 iterations for login-storm (production: 2; --smoke: 1).
    #[arg(long)]
    argon2_iterations: Option<u32>,
    /// Do not pin the server and the generator to cores.
    #[arg(long)]
    no_pin: bool,
    /// dm-latency: skip the same paced run against the in-process relay (relay-ceiling's) after the server's.
    #[arg(long)]
    no_relay: bool,
    /// Directory for temporary databases (default: the system's temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// What every scenario needs to know about the run.
struct Ctx {
    opts: Opts,
    /// Whether the spawned server goes to core 0 (the generator is already on core 1).
    pin: bool,
    pin_note: String,
    nofile: (u64, u64),
    /// Prefix of every user and room name, so runs against a long-lived server never collide; each scenario
    /// adds a number of its own (see `new_prefix`).
    prefix: String,
    scenarios_run: AtomicUsize,
}

impl Ctx {
    fn size<T: Copy>(&self, given: Option<T>, normal: T, smoke: T) -> T {
        given.unwrap_or(if self.opts.smoke { smoke } else { normal })
    }
    fn seconds(&self, normal: f64, smoke: f64) -> Duration {
        Duration::from_secs_f64(self.size(self.opts.seconds, normal, smoke).max(0.05))
    }
    fn sync(&self) -> SyncMode {
        if self.opts.sync == "normal" {
            SyncMode::Normal
        } else {
            SyncMode::Full
        }
    }
    /// A name prefix no other scenario of this run (or, very likely, of another run) uses.
    fn new_prefix(&self) -> String {
        let n = self.scenarios_run.fetch_add(1, Ordering::Relaxed);
        format!("{}{n}", self.prefix)
    }
    fn temp_dir(&self) -> Result<tempfile::TempDir, String> {
        let made = match &self.opts.dir {
            Some(dir) => tempfile::Builder::new().prefix("loadgen").tempdir_in(dir),
            None => tempfile::Builder::new().prefix("loadgen").tempdir(),
        };
        made.map_err(|e| format!("cannot make a temporary directory: {e}"))
    }
}

const PASSWORD: &str = "loadgen-password";
const SETUP_THREADS: usize = 16;
/// Largest frame the generator accepts from a server.
const MAX_IN_FRAME: u32 = 64 << 20;

// ---------------------------------------------------------------------------------------------------------------
// Small utilities: clock, pinning, limits
// ---------------------------------------------------------------------------------------------------------------

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the generator started: the one clock senders and receivers share.
fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Pins the calling thread (and the threads it starts later) to one core.
fn pin_current_thread(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data, zeroed is a valid empty set, and the pointer passed is to a live local.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Raises this process's open-file limit to its hard limit (children started later inherit it).
fn raise_nofile() -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (0, 0);
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
        (lim.rlim_cur, lim.rlim_max)
    }
}

/// A line of /proc/PID/status such as `VmRSS:  1234 kB`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU seconds the server's threads have used so far, by role: the loop is the main thread, the store thread is
/// named `hubbub-store`, everything else (hash workers, signals) is "other". Linux only (`/proc`).
#[derive(Clone, Copy, Default)]
struct ServerCpu {
    loop_s: f64,
    store_s: f64,
    other_s: f64,
}

impl ServerCpu {
    fn read(pid: u32) -> Option<ServerCpu> {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks <= 0 {
            return None;
        }
        let mut cpu = ServerCpu::default();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let Some((tid, seconds)) = thread_cpu_seconds(&task.path(), ticks as f64) else {
                continue;
            };
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if tid == pid {
                cpu.loop_s += seconds;
            } else if name.trim() == "hubbub-store" {
                cpu.store_s += seconds;
            } else {
                cpu.other_s += seconds;
            }
        }
        Some(cpu)
    }

    fn since(self, earlier: ServerCpu) -> ServerCpu {
        ServerCpu {
            loop_s: self.loop_s - earlier.loop_s,
            store_s: self.store_s - earlier.store_s,
            other_s: self.other_s - earlier.other_s,
        }
    }
}

/// A thread's id and user+system CPU seconds from its `stat` file. The name field may hold spaces, so the fields
/// are counted from the `)` that ends it: utime and stime are the 12th and 13th after it.
fn thread_cpu_seconds(task: &Path, ticks_per_s: f64) -> Option<(u32, f64)> {
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    let tid = stat.split_whitespace().next()?.parse().ok()?;
    let mut after_name = stat[stat.rfind(')')? + 1..].split_whitespace();
    let utime: f64 = after_name.nth(11)?.parse().ok()?;
    let stime: f64 = after_name.next()?.parse().ok()?;
    Some((tid, (utime + stime) / ticks_per_s))
}

/// Where the server's CPU went during a run, per acknowledged message: what makes latency rise is the loop and
/// the store sharing one core, so their sum against the offered rate tells how busy that core was.
fn report_server_cpu(report: &mut Report, used: ServerCpu, acked: u64, seconds: f64) {
    if acked == 0 || seconds <= 0.0 {
        return;
    }
    let per_msg = |s: f64| s * 1e6 / acked as f64;
    report.num(
        "server_cpu_loop_us_per_msg",
        "server CPU per acked msg: loop (us)",
        per_msg(used.loop_s),
        1,
    );
    report.num(
        "server_cpu_store_us_per_msg",
        "server CPU per acked msg: store (us)",
        per_msg(used.store_s),
        1,
    );
    report.num(
        "server_cpu_other_us_per_msg",
        "server CPU per acked msg: other threads (us)",
        per_msg(used.other_s),
        1,
    );
    let busy = (used.loop_s + used.store_s + used.other_s) / seconds * 100.0;
    report.num("server_cpu_percent", "server CPU (% of one core)", busy, 0);
}

fn proc_nofile(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The filesystem type a path lives on (longest mount point that is a prefix of it).
fn fs_type(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_dev), Some(mount), Some(fs)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if path.starts_with(mount) && best.as_ref().is_none_or(|(len, _)| mount.len() > *len) {
            best = Some((mount.len(), fs.to_owned()));
        }
    }
    best.map_or_else(|| "unknown".into(), |(_, fs)| fs)
}

/// Runs `f(i)` for i in 0..n on a few threads; the results come back in index order. Stops at the first error.
fn par_map<T: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<T, String> + Sync,
) -> Result<Vec<T>, String> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    thread::scope(|scope| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || failed.load(Ordering::Relaxed) {
                    break;
                }
                match f(i) {
                    Ok(v) => slots.lock().unwrap()[i] = Some(v),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok(slots
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|v| v.expect("every index ran"))
        .collect())
}

// ---------------------------------------------------------------------------------------------------------------
// Results: a table or one JSON object
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Val {
    Int(i64),
    Num(f64, usize),
    Text(String),
    Flag(bool),
}

impl Val {
    fn show(&self) -> String {
        match self {
            Val::Int(v) => v.to_string(),
            Val::Num(v, d) if v.is_finite() => format!("{v:.d$}", d = *d),
            Val::Num(..) => "n/a".into(),
            Val::Text(s) => s.clone(),
            Val::Flag(b) => if *b { "yes" } else { "no" }.into(),
        }
    }
    fn json(&self) -> String {
        match self {
            Val::Int(v) => v.to_string(),
            Val::Num(v, d) if v.is_finite() => format!("{v:.d$}", d = *d),
            Val::Num(..) => "null".into(),
            Val::Text(s) => json_str(s),
            Val::Flag(b) => b.to_string(),
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Val::Int(v) => Some(*v as f64),
            Val::Num(v, _) => Some(*v),
            _ => None,
        }
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Debug)]
struct Report {
    scenario: String,
    rows: Vec<(String, String, Val)>,
    failures: Vec<String>,
}

impl Report {
    fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.into(),
            rows: Vec::new(),
            failures: Vec::new(),
        }
    }
    fn put(&mut self, key: &str, label: &str, value: Val) {
        self.rows.push((key.into(), label.into(), value));
    }
    fn int(&mut self, key: &str, label: &str, value: u64) {
        self.put(key, label, Val::Int(value.min(i64::MAX as u64) as i64));
    }
    fn num(&mut self, key: &str, label: &str, value: f64, decimals: usize) {
        self.put(key, label, Val::Num(value, decimals));
    }
    fn text(&mut self, key: &str, label: &str, value: impl Into<String>) {
        self.put(key, label, Val::Text(value.into()));
    }
    fn flag(&mut self, key: &str, label: &str, value: bool) {
        self.put(key, label, Val::Flag(value));
    }
    fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }
    fn get(&self, key: &str) -> Option<&Val> {
        self.rows
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, v)| v)
    }
    fn f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Val::as_f64)
    }
    /// p50, p99, p99.9 and max of a latency sample, in microseconds.
    fn latency(&mut self, key: &str, label: &str, samples: &mut [u32], fine: bool) {
        let p = Percentiles::of(samples);
        self.int(
            &format!("{key}_samples"),
            &format!("{label} samples"),
            p.n as u64,
        );
        self.int(
            &format!("{key}_p50_us"),
            &format!("{label} p50 (us)"),
            p.p50 as u64,
        );
        self.int(
            &format!("{key}_p99_us"),
            &format!("{label} p99 (us)"),
            p.p99 as u64,
        );
        if fine {
            self.int(
                &format!("{key}_p999_us"),
                &format!("{label} p99.9 (us)"),
                p.p999 as u64,
            );
        }
        self.int(
            &format!("{key}_max_us"),
            &format!("{label} max (us)"),
            p.max as u64,
        );
    }
    fn ok(&self) -> bool {
        self.failures.is_empty()
    }
    fn table(&self) -> String {
        let mut out = format!("== {} ==\n", self.scenario);
        let width = self.rows.iter().map(|(_, l, _)| l.len()).max().unwrap_or(0);
        for (_, label, value) in &self.rows {
            let _ = writeln!(out, "  {label:<width$}  {}", value.show());
        }
        for f in &self.failures {
            let _ = writeln!(out, "  CHECK FAILED: {f}");
        }
        let _ = writeln!(
            out,
            "  {:<width$}  {}",
            "result",
            if self.ok() { "ok" } else { "FAILED" }
        );
        out
    }
    fn json(&self) -> String {
        let mut out = format!(
            "{{\"scenario\":{},\"ok\":{},\"failures\":[{}]",
            json_str(&self.scenario),
            self.ok(),
            self.failures
                .iter()
                .map(|f| json_str(f))
                .collect::<Vec<_>>()
                .join(",")
        );
        for (key, _, value) in &self.rows {
            let _ = write!(out, ",{}:{}", json_str(key), value.json());
        }
        out.push('}');
        out
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Percentiles {
    n: usize,
    p50: u32,
    p99: u32,
    p999: u32,
    max: u32,
}

impl Percentiles {
    fn of(samples: &mut [u32]) -> Percentiles {
        samples.sort_unstable();
        let n = samples.len();
        if n == 0 {
            return Percentiles::default();
        }
        let at = |q: f64| samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        Percentiles {
            n,
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: samples[n - 1],
        }
    }
}

fn per_sec(count: u64, micros: u64) -> f64 {
    if micros == 0 {
        0.0
    } else {
        count as f64 * 1e6 / micros as f64
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------------------------------

#[derive(Default)]
struct LogTail {
    lines: VecDeque<String>,
    warnings: u64,
    first_warnings: Vec<String>,
}

/// A hubbub process started for one scenario; killed when dropped.
struct ServerProc {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    bin: PathBuf,
    log: Arc<Mutex<LogTail>>,
    _dir: tempfile::TempDir,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProc {
    fn tail(&self, lines: usize) -> String {
        let log = self.log.lock().unwrap();
        let skip = log.lines.len().saturating_sub(lines);
        log.lines
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// How the server hashes passwords.
#[derive(Clone, Copy)]
enum Hashing {
    /// argon2's cheapest setting: logins cost nothing, so they do not hide what is measured.
    Cheap,
    /// The given memory (KiB) and iterations.
    Real(u32, u32),
}

/// The server a scenario talks to: one it started, or one given with --server.
enum Target {
    Spawned(ServerProc),
    External(SocketAddr),
}

impl Target {
    fn addr(&self) -> SocketAddr {
        match self {
            Target::Spawned(s) => s.addr,
            Target::External(a) => *a,
        }
    }
    fn pid(&self) -> Option<u32> {
        match self {
            Target::Spawned(s) => Some(s.pid),
            Target::External(_) => None,
        }
    }
    fn describe(&self) -> String {
        match self {
            Target::Spawned(s) => format!("{} (pid {}) on {}", s.bin.display(), s.pid, s.addr),
            Target::External(a) => format!("external server at {a}"),
        }
    }
    /// An error if the server process has died.
    fn check_alive(&mut self) -> Result<(), String> {
        if let Target::Spawned(s) = self {
            if let Ok(Some(status)) = s.child.try_wait() {
                return Err(format!(
                    "the server exited ({status}); its last log lines:\n{}",
                    s.tail(30)
                ));
            }
        }
        Ok(())
    }
    /// Adds the rows every network scenario reports about its server, and fails the report if it died.
    fn finish(&mut self, ctx: &Ctx, report: &mut Report) {
        report.text("server", "server", self.describe());
        report.text("pinning", "pinning", ctx.pin_note.clone());
        if let Err(e) = self.check_alive() {
            report.fail(e);
        }
        if let Target::Spawned(s) = self {
            let log = s.log.lock().unwrap();
            report.int(
                "server_log_warnings",
                "server log warnings/errors",
                log.warnings,
            );
            for line in &log.first_warnings {
                eprintln!("loadgen: server said: {line}");
            }
        }
    }
}

fn find_server_bin(ctx: &Ctx) -> Result<PathBuf, String> {
    if let Some(bin) = &ctx.opts.server_bin {
        return Ok(bin.clone());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [dir.join("hubbub"), dir.join("..").join("hubbub")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| {
            format!(
                "no hubbub binary next to {} (build it with `cargo build --release`, or pass --server-bin)",
                exe.display()
            )
        })
}

/// Starts (or, with --server, names) the server for one scenario. `extra` flags replace the defaults.
fn start_target(ctx: &Ctx, extra: &[(&str, String)], hashing: Hashing) -> Result<Target, String> {
    if let Some(addr) = ctx.opts.server {
        return Ok(Target::External(addr));
    }
    let bin = find_server_bin(ctx)?;
    let dir = ctx.temp_dir()?;
    let db = dir.path().join("hubbub.db");
    let mut flags: Vec<(String, String)> = vec![
        ("--listen".into(), "127.0.0.1:0".into()),
        ("--db".into(), db.display().to_string()),
        ("--sync".into(), ctx.opts.sync.clone()),
        ("--send-rate".into(), "1000000".into()),
        ("--send-burst".into(), "1000000".into()),
        ("--idle-timeout".into(), "1h".into()),
        ("--auth-timeout".into(), "10m".into()),
        ("--max-connections".into(), "5000".into()),
        ("--max-per-ip".into(), "5000".into()),
        ("--max-sessions-per-user".into(), "1000".into()),
    ];
    match hashing {
        Hashing::Cheap => {
            flags.push(("--argon2-memory-kib".into(), "8".into()));
            flags.push(("--argon2-iterations".into(), "1".into()));
        }
        Hashing::Real(memory, iterations) => {
            flags.push(("--argon2-memory-kib".into(), memory.to_string()));
            flags.push(("--argon2-iterations".into(), iterations.to_string()));
        }
    }
    for (flag, value) in extra {
        match flags.iter_mut().find(|(f, _)| f == flag) {
            Some(slot) => slot.1 = value.clone(),
            None => flags.push(((*flag).into(), value.clone())),
        }
    }
    let mut cmd = if ctx.pin {
        let mut c = Command::new("taskset");
        c.arg("-c").arg("0").arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    for (flag, value) in &flags {
        cmd.arg(flag).arg(value);
    }
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The server must not outlive the generator, even if the generator is killed outright.
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's state.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr is piped");
    let log = Arc::new(Mutex::new(LogTail::default()));
    let (addr_tx, addr_rx) = mpsc::channel();
    {
        let log = Arc::clone(&log);
        thread::spawn(move || drain_server_log(stderr, log, addr_tx));
    }
    let mut server = ServerProc {
        child,
        pid,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        bin,
        log,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match addr_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(addr) => {
                server.addr = addr;
                return Ok(Target::Spawned(server));
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                if let Ok(Some(status)) = server.child.try_wait() {
                    return Err(format!(
                        "the server exited at startup ({status}):\n{}",
                        server.tail(20)
                    ));
                }
            }
            Err(_) => {
                return Err(format!(
                    "the server did not say `listening on` in time:\n{}",
                    server.tail(20)
                ))
            }
        }
    }
}

/// Reads the server's stderr to its end (so the pipe never fills), keeping a tail and counting warnings; the
/// first `listening on ADDR` line is sent to `addr_tx`.
fn drain_server_log(
    stderr: impl Read,
    log: Arc<Mutex<LogTail>>,
    addr_tx: mpsc::Sender<SocketAddr>,
) {
    let mut sent = false;
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if !sent {
            if let Some(addr) = line
                .rsplit("listening on ")
                .next()
                .filter(|_| line.contains("listening on "))
                .and_then(|a| a.trim().parse().ok())
            {
                let _ = addr_tx.send(addr);
                sent = true;
            }
        }
        let mut log = log.lock().unwrap();
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            log.warnings += 1;
            if log.first_warnings.len() < 5 {
                log.first_warnings.push(line.clone());
            }
        }
        if log.lines.len() >= 200 {
            log.lines.pop_front();
        }
        log.lines.push_back(line);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Frames: encoding the hot requests by hand, reading the hot replies without allocating
// ---------------------------------------------------------------------------------------------------------------

fn any_kind(_: u8) -> bool {
    true
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A Send (or SendRoom) frame whose text is `tag` (three numbers) padded with 'x' to `size` bytes.
fn put_tagged_send(
    out: &mut Vec<u8>,
    frame_kind: u8,
    rid: u32,
    to: &str,
    client_msg_id: u64,
    tag: [u64; 3],
    size: usize,
) {
    let start = out.len();
    put_header(out, frame_kind, rid, 0);
    put_str(out, to.as_bytes());
    out.extend_from_slice(&client_msg_id.to_be_bytes());
    let len_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let text_at = out.len();
    let _ = write!(out, "{}.{}.{}.", tag[0], tag[1], tag[2]);
    if out.len() - text_at < size {
        out.resize(text_at + size, b'x');
    }
    let text_len = (out.len() - text_at) as u16;
    out[len_at..len_at + 2].copy_from_slice(&text_len.to_be_bytes());
    patch_body_len(out, start);
}

/// A Send frame with a given text.
fn put_send(out: &mut Vec<u8>, rid: u32, to: &str, client_msg_id: u64, text: &[u8]) {
    let start = out.len();
    put_header(out, kind::SEND, rid, 0);
    put_str(out, to.as_bytes());
    out.extend_from_slice(&client_msg_id.to_be_bytes());
    put_str(out, text);
    patch_body_len(out, start);
}

struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    fn str(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// (message id, text) of a Deliver or RoomDeliver body: both are id, two names, timestamp, text.
fn parse_deliver(body: &[u8]) -> Option<(u64, &[u8])> {
    let mut f = Fields(body);
    let id = f.u64()?;
    f.str()?;
    f.str()?;
    f.u64()?;
    Some((id, f.str()?))
}

fn parse_error(body: &[u8]) -> (u16, String) {
    let mut f = Fields(body);
    let code = f.u16().unwrap_or(0);
    let text = f
        .str()
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .unwrap_or_default();
    (code, text)
}

/// The three numbers at the start of a tagged text.
fn parse_tag(text: &[u8]) -> Option<[u64; 3]> {
    let mut tag = [0u64; 3];
    let mut parts = text.split(|b| *b == b'.');
    for slot in &mut tag {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 20 {
            return None;
        }
        let mut v: u64 = 0;
        for &b in part {
            if !b.is_ascii_digit() {
                return None;
            }
            v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        }
        *slot = v;
    }
    Some(tag)
}

// ---------------------------------------------------------------------------------------------------------------
// Wire: a small blocking connection for setup, whose unread bytes can be handed to the mio loop
// ---------------------------------------------------------------------------------------------------------------

const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug)]
enum WireError {
    Server(u16, String),
    Other(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Server(code, text) => write!(f, "server error {code}: {text}"),
            WireError::Other(e) => f.write_str(e),
        }
    }
}

fn other(e: impl std::fmt::Display) -> WireError {
    WireError::Other(e.to_string())
}

type WResult<T> = Result<T, WireError>;

fn open_stream(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(10))?,
        Some(ip) => {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.bind(&SocketAddr::new(ip, 0).into())?;
            socket.connect_timeout(&addr.into(), Duration::from_secs(10))?;
            socket.into()
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
    next_rid: u32,
}

impl Wire {
    /// Connects (from `source`, if given) and reads the Hello.
    fn connect(addr: SocketAddr, source: Option<IpAddr>) -> WResult<Wire> {
        let stream = open_stream(addr, source).map_err(|e| other(format!("connect: {e}")))?;
        let mut wire = Wire {
            stream,
            buf: Vec::with_capacity(512),
            next_rid: 1,
        };
        let (header, body) = wire.frame()?;
        match header.kind {
            kind::HELLO => Ok(wire),
            kind::ERROR => {
                let (code, text) = parse_error(&body);
                Err(WireError::Server(code, text))
            }
            k => Err(other(format!("expected Hello, got kind 0x{k:02x}"))),
        }
    }

    fn frame(&mut self) -> WResult<(Header, Vec<u8>)> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        loop {
            if let Some(f) = split_frame(&self.buf, MAX_IN_FRAME, any_kind).map_err(other)? {
                let got = (f.header, f.body.to_vec());
                let used = f.len;
                self.buf.drain(..used);
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(other("timed out waiting for the server"));
            }
            self.stream.set_read_timeout(Some(left)).map_err(other)?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(other("the server closed the connection")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(other(e)),
            }
        }
    }

    fn send(&mut self, request: &Request) -> WResult<u32> {
        let rid = self.next_rid;
        self.next_rid += 1;
        let mut frame = Vec::with_capacity(64);
        request.encode(rid, &mut frame);
        self.stream.write_all(&frame).map_err(other)?;
        Ok(rid)
    }

    /// The reply to `rid`; pushes are skipped, but a closing Error (code < 100) ends the wait.
    fn reply(&mut self, rid: u32) -> WResult<Packet> {
        loop {
            let (header, body) = self.frame()?;
            let closing = header.kind == kind::ERROR && header.request_id == 0 && {
                let (code, _) = parse_error(&body);
                code::closes_connection(code)
            };
            if header.request_id == rid || closing {
                return match Packet::decode(&header, &body).map_err(other)? {
                    Packet::Error { code, text } => Err(WireError::Server(code, text)),
                    packet => Ok(packet),
                };
            }
        }
    }

    fn call(&mut self, request: &Request) -> WResult<Packet> {
        let rid = self.send(request)?;
        self.reply(rid)
    }

    /// Waits for a push of the given kind.
    fn push(&mut self, want: u8) -> WResult<()> {
        loop {
            let (header, body) = self.frame()?;
            if header.kind == want && header.request_id == 0 {
                return Ok(());
            }
            if header.kind == kind::ERROR && header.request_id == 0 {
                let (code, text) = parse_error(&body);
                return Err(WireError::Server(code, text));
            }
        }
    }

    fn register(&mut self, username: &str) -> WResult<()> {
        match self.call(&Request::Register {
            username: username.into(),
            password: PASSWORD.into(),
        })? {
            Packet::Ok => Ok(()),
            p => Err(other(format!("Register answered {p:?}"))),
        }
    }

    /// Logs in and waits for CaughtUp, so nothing of the login is left unread. Returns the token.
    fn login(&mut self, username: &str, device: &str) -> WResult<[u8; 16]> {
        match self.call(&Request::Login {
            username: username.into(),
            password: PASSWORD.into(),
            device: device.into(),
            last_seen: 0,
        })? {
            Packet::LoginOk { token, .. } => {
                self.push(kind::CAUGHT_UP)?;
                Ok(token)
            }
            p => Err(other(format!("Login answered {p:?}"))),
        }
    }

    fn resume(&mut self, token: [u8; 16], device: &str) -> WResult<()> {
        match self.call(&Request::Resume {
            token,
            device: device.into(),
            last_seen: 0,
        })? {
            Packet::LoginOk { .. } => self.push(kind::CAUGHT_UP),
            p => Err(other(format!("Resume answered {p:?}"))),
        }
    }

    /// The server's counters, if it answers Stats.
    fn stats(&mut self) -> Option<Vec<(String, u64)>> {
        match self.call(&Request::Stats) {
            Ok(Packet::StatsReply(counters)) => Some(counters),
            _ => None,
        }
    }

    fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }
}

fn setup_err(what: &str) -> impl Fn(WireError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A fresh connection (from `source`, if given) that has registered `name`, not logged in.
fn registered_wire(addr: SocketAddr, source: Option<IpAddr>, name: &str) -> Result<Wire, String> {
    let mut wire = Wire::connect(addr, source).map_err(setup_err("connect"))?;
    wire.register(name)
        .map_err(|e| format!("register {name}: {e}"))?;
    Ok(wire)
}

/// A registered, logged-in user on a fresh connection.
fn user_wire(addr: SocketAddr, name: &str) -> Result<Wire, String> {
    let mut wire = registered_wire(addr, None, name)?;
    wire.login(name, "loadgen")
        .map_err(|e| format!("login {name}: {e}"))?;
    Ok(wire)
}

/// Adds the server's own counters (if it answers Stats) to a report.
fn server_stats(report: &mut Report, ctl: &mut Wire) {
    let Some(counters) = ctl.stats() else {
        return;
    };
    let get = |name: &str| counters.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    for (name, key, label) in [
        (
            "messages_stored",
            "server_messages_stored",
            "server: messages stored",
        ),
        (
            "messages_delivered",
            "server_messages_delivered",
            "server: messages delivered",
        ),
        (
            "commit_batch_size",
            "server_last_commit_batch",
            "server: last commit batch (jobs)",
        ),
        (
            "commit_latency_us",
            "server_last_commit_us",
            "server: last commit latency (us)",
        ),
        (
            "feed_fallbacks",
            "server_feed_fallbacks",
            "server: feed fallbacks",
        ),
    ] {
        if let Some(v) = get(name) {
            report.int(key, label, v);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Net: many non-blocking connections driven by one mio loop
// ---------------------------------------------------------------------------------------------------------------

/// Bytes read from one connection in one turn before the others get theirs.
const READ_BUDGET: usize = 1 << 20;

struct NetConn {
    stream: MioStream,
    input: Vec<u8>,
    open: bool,
    queued: bool,
}

struct OutBuf {
    data: Vec<u8>,
    pos: usize,
    queued: bool,
    blocked: bool,
}

/// Every connection's pending output; a handler writes frames into any of them.
struct Outs {
    bufs: Vec<OutBuf>,
    dirty: Vec<usize>,
}

impl Outs {
    fn buf(&mut self, i: usize) -> &mut Vec<u8> {
        let b = &mut self.bufs[i];
        if !b.queued {
            b.queued = true;
            self.dirty.push(i);
        }
        &mut b.data
    }
}

struct Net {
    poll: Poll,
    events: Events,
    conns: Vec<NetConn>,
    outs: Outs,
    scratch: Vec<u8>,
    ready: Vec<usize>,
    closed: Vec<(usize, String)>,
}

impl Net {
    fn new() -> Result<Net, String> {
        Ok(Net {
            poll: Poll::new().map_err(|e| format!("mio poll: {e}"))?,
            events: Events::with_capacity(4096),
            conns: Vec::new(),
            outs: Outs {
                bufs: Vec::new(),
                dirty: Vec::new(),
            },
            scratch: vec![0; 256 * 1024],
            ready: Vec::new(),
            closed: Vec::new(),
        })
    }

    fn len(&self) -> usize {
        self.conns.len()
    }

    /// Takes over a connected stream, with the bytes already read from it.
    fn add(&mut self, (stream, leftover): (TcpStream, Vec<u8>)) -> Result<usize, String> {
        let i = self.conns.len();
        stream
            .set_nonblocking(true)
            .map_err(|e| format!("set_nonblocking: {e}"))?;
        let mut stream = MioStream::from_std(stream);
        self.poll
            .registry()
            .register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| format!("register: {e}"))?;
        self.conns.push(NetConn {
            stream,
            input: leftover,
            open: true,
            queued: true,
        });
        self.outs.bufs.push(OutBuf {
            data: Vec::new(),
            pos: 0,
            queued: false,
            blocked: false,
        });
        self.ready.push(i);
        Ok(i)
    }

    fn add_wire(&mut self, wire: Wire) -> Result<usize, String> {
        self.add(wire.into_parts())
    }

    /// Connections that closed since the last call, with why.
    fn take_closed(&mut self) -> Vec<(usize, String)> {
        std::mem::take(&mut self.closed)
    }

    /// An error naming the connections (by `name`) that closed since the last call, if any did.
    fn check_closed(&mut self, name: impl Fn(usize) -> String) -> Result<(), String> {
        let closed = self.take_closed();
        if closed.is_empty() {
            Ok(())
        } else {
            Err(closed_error(&closed, name))
        }
    }

    /// One turn: write what is pending, wait for events (at most `timeout`), read every readable connection and
    /// hand each whole frame to `on_frame(connection, header, body, outputs)`, then write again.
    fn turn<F>(&mut self, timeout: Duration, mut on_frame: F) -> Result<(), String>
    where
        F: FnMut(usize, &Header, &[u8], &mut Outs),
    {
        self.flush();
        let timeout = if self.ready.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        for event in self.events.iter() {
            let i = event.token().0;
            if i >= self.conns.len() {
                continue;
            }
            if event.is_writable() {
                let b = &mut self.outs.bufs[i];
                b.blocked = false;
                if b.pos < b.data.len() && !b.queued {
                    b.queued = true;
                    self.outs.dirty.push(i);
                }
            }
            if (event.is_readable() || event.is_read_closed() || event.is_error())
                && !self.conns[i].queued
            {
                self.conns[i].queued = true;
                self.ready.push(i);
            }
        }
        let ready = std::mem::take(&mut self.ready);
        for &i in &ready {
            self.conns[i].queued = false;
            if self.read_conn(i, &mut on_frame) {
                self.conns[i].queued = true;
                self.ready.push(i);
            }
        }
        self.flush();
        Ok(())
    }

    /// Reads and handles frames until the socket is drained (false) or the budget is spent (true: read again).
    fn read_conn<F>(&mut self, i: usize, on_frame: &mut F) -> bool
    where
        F: FnMut(usize, &Header, &[u8], &mut Outs),
    {
        let Net {
            conns,
            outs,
            scratch,
            closed,
            poll,
            ..
        } = self;
        let conn = &mut conns[i];
        if !conn.open {
            return false;
        }
        let mut budget = READ_BUDGET;
        loop {
            let mut pos = 0;
            loop {
                match split_frame(&conn.input[pos..], MAX_IN_FRAME, any_kind) {
                    Ok(Some(f)) => {
                        on_frame(i, &f.header, f.body, outs);
                        pos += f.len;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        conn.open = false;
                        let _ = poll.registry().deregister(&mut conn.stream);
                        closed.push((i, format!("bad frame from the server: {e}")));
                        return false;
                    }
                }
            }
            if pos > 0 {
                conn.input.drain(..pos);
            }
            if budget == 0 {
                return true;
            }
            match conn.stream.read(scratch) {
                Ok(0) => {
                    conn.open = false;
                    let _ = poll.registry().deregister(&mut conn.stream);
                    closed.push((i, "the server closed the connection".into()));
                    return false;
                }
                Ok(n) => {
                    conn.input.extend_from_slice(&scratch[..n]);
                    budget = budget.saturating_sub(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    conn.open = false;
                    let _ = poll.registry().deregister(&mut conn.stream);
                    closed.push((i, format!("read: {e}")));
                    return false;
                }
            }
        }
    }

    fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.outs.dirty);
        for &i in &dirty {
            let b = &mut self.outs.bufs[i];
            b.queued = false;
            let conn = &mut self.conns[i];
            if !conn.open {
                b.data.clear();
                b.pos = 0;
                continue;
            }
            if b.blocked {
                continue;
            }
            while b.pos < b.data.len() {
                match conn.stream.write(&b.data[b.pos..]) {
                    Ok(0) => break,
                    Ok(n) => b.pos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        b.blocked = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        conn.open = false;
                        let _ = self.poll.registry().deregister(&mut conn.stream);
                        self.closed.push((i, format!("write: {e}")));
                        break;
                    }
                }
            }
            if b.pos == b.data.len() {
                b.data.clear();
                b.pos = 0;
            } else if b.pos > (1 << 20) {
                b.data.drain(..b.pos);
                b.pos = 0;
            }
        }
        dirty.clear();
        self.outs.dirty = dirty;
    }
}

fn closed_error(closed: &[(usize, String)], what: impl Fn(usize) -> String) -> String {
    let (i, why) = &closed[0];
    format!(
        "{} connection(s) lost; first: {} ({why})",
        closed.len(),
        what(*i)
    )
}

// ---------------------------------------------------------------------------------------------------------------
// Probe: one logged-in client pinging on its own thread
// ---------------------------------------------------------------------------------------------------------------

struct Probe {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Vec<(u64, u32)>, String>>,
}

impl Probe {
    /// Registers and logs in `username`, then pings every `interval` until finished: (sent at, round trip).
    fn start(addr: SocketAddr, username: &str, interval: Duration) -> Result<Probe, String> {
        let mut client = Client::connect(addr).map_err(|e| format!("probe connect: {e}"))?;
        client
            .register(username, PASSWORD)
            .map_err(|e| format!("probe register: {e}"))?;
        client
            .login(username, PASSWORD, "probe", 0)
            .map_err(|e| format!("probe login: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut samples = Vec::with_capacity(1 << 16);
            let hard_end = Instant::now() + Duration::from_secs(900);
            while !stopped.load(Ordering::Relaxed) && Instant::now() < hard_end {
                let started = Instant::now();
                let t = now_us();
                client.ping().map_err(|e| format!("probe ping: {e}"))?;
                samples.push((t, now_us().saturating_sub(t) as u32));
                if let Some(rest) = interval.checked_sub(started.elapsed()) {
                    thread::sleep(rest);
                }
            }
            Ok(samples)
        });
        Ok(Probe { stop, handle })
    }

    fn finish(self) -> Result<Vec<(u64, u32)>, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| "the probe thread panicked".to_string())?
    }
}

/// Round trips of the samples sent in [from, to).
fn in_window(samples: &[(u64, u32)], from: u64, to: u64) -> Vec<u32> {
    samples
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, rtt)| *rtt)
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// The pair engine: P senders pipelining to P receivers (dm-throughput, dm-latency, relay-ceiling)
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Pace {
    /// Keep `window` messages unacknowledged per sender.
    Window,
    /// One message per sender every `interval_us`. Each is stamped when it is written; how late the generator is
    /// against the schedule is reported on its own row.
    Rate { interval_us: f64 },
}

struct PairSpec {
    pairs: usize,
    window: usize,
    size: usize,
    pace: Pace,
    /// Messages per sender at most.
    limit: u64,
    /// How long senders send (None: until `limit`).
    duration: Option<Duration>,
    /// The name each sender sends to.
    recipients: Vec<String>,
}

#[derive(Default)]
struct PairOutcome {
    sent: u64,
    acked: u64,
    failed: u64,
    delivered: u64,
    /// Acks and deliveries inside the timed window (duration runs only).
    acked_in_window: u64,
    delivered_in_window: u64,
    window_us: u64,
    last_ack_us: u64,
    last_delivery_us: u64,
    errors: BTreeMap<u16, u64>,
    missing: u64,
    duplicates: u64,
    misrouted: u64,
    out_of_order: u64,
    ack_us: Vec<u32>,
    deliver_us: Vec<u32>,
    /// Paced runs: how late each message left against its schedule (the generator's own lag).
    late_us: Vec<u32>,
}

impl PairOutcome {
    fn acked_rate(&self) -> f64 {
        if self.window_us > 0 {
            per_sec(self.acked_in_window, self.window_us)
        } else {
            per_sec(self.acked, self.last_ack_us)
        }
    }
    fn delivered_rate(&self) -> f64 {
        if self.window_us > 0 {
            per_sec(self.delivered_in_window, self.window_us)
        } else {
            per_sec(self.delivered, self.last_delivery_us)
        }
    }
    fn exactly_once(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.misrouted == 0
    }
    fn errors_text(&self) -> String {
        errors_text(&self.errors)
    }
    fn report(&self, report: &mut Report, fine: bool) {
        report.int("sent", "messages sent", self.sent);
        report.int("acked", "messages acked", self.acked);
        report.int("delivered", "messages delivered", self.delivered);
        report.num("acked_per_sec", "acked msgs/s", self.acked_rate(), 0);
        report.num(
            "delivered_per_sec",
            "delivered msgs/s",
            self.delivered_rate(),
            0,
        );
        self.report_latencies(report, "", "", fine);
        report.text("send_errors", "send errors", self.errors_text());
        report.int("missing", "acked but never delivered", self.missing);
        report.int("duplicates", "delivered twice", self.duplicates);
        report.int(
            "misrouted",
            "delivered to the wrong receiver",
            self.misrouted,
        );
        report.int("out_of_order", "ids not increasing", self.out_of_order);
        report.flag(
            "exactly_once",
            "exactly once (every acked message delivered once)",
            self.exactly_once(),
        );
        self.check(report, "");
    }
    /// send->ack and send->deliver percentiles, and how late the generator itself was; keys and labels start
    /// with the prefixes (the relay run's rows say "relay").
    fn report_latencies(&self, report: &mut Report, key: &str, label: &str, fine: bool) {
        report.latency(
            &format!("{key}ack"),
            &format!("{label}send->ack"),
            &mut self.ack_us.clone(),
            fine,
        );
        report.latency(
            &format!("{key}deliver"),
            &format!("{label}send->deliver"),
            &mut self.deliver_us.clone(),
            fine,
        );
        if !self.late_us.is_empty() {
            let late = Percentiles::of(&mut self.late_us.clone());
            report.int(
                &format!("{key}generator_late_p99_us"),
                &format!("{label}generator lateness vs schedule p99 (us)"),
                late.p99 as u64,
            );
        }
    }
    /// Fails the report if delivery was not exactly once or sends failed; `what` starts each failure's text.
    fn check(&self, report: &mut Report, what: &str) {
        if !self.exactly_once() {
            report.fail(format!(
                "{what}delivery not exactly once: {} missing, {} duplicates, {} misrouted",
                self.missing, self.duplicates, self.misrouted
            ));
        }
        if self.failed > 0 {
            report.fail(format!(
                "{what}{} sends failed: {}",
                self.failed,
                self.errors_text()
            ));
        }
    }
}

/// Error replies counted by code, as "3 x code 108, 1 x code 110" ("none" when there were none).
fn errors_text(errors: &BTreeMap<u16, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    errors
        .iter()
        .map(|(code, n)| format!("{n} x code {code}"))
        .collect::<Vec<_>>()
        .join(", ")
}

struct SenderState {
    sent: u64,
    outstanding: usize,
    /// When each message was (meant to be) sent, by sequence number.
    sent_at: Vec<u64>,
    /// 0 pending, 1 acked, 2 failed.
    state: Vec<u8>,
    next_due: f64,
}

struct ReceiverState {
    got: Vec<u8>,
    last_id: u64,
}

/// Runs the pair workload on a Net whose connection 2p is sender p and 2p+1 its receiver.
fn run_pairs(net: &mut Net, spec: &PairSpec) -> Result<PairOutcome, String> {
    let pairs = spec.pairs;
    let start = now_us();
    let mut senders: Vec<SenderState> = (0..pairs)
        .map(|p| SenderState {
            sent: 0,
            outstanding: 0,
            sent_at: Vec::new(),
            state: Vec::new(),
            next_due: match spec.pace {
                Pace::Window => 0.0,
                Pace::Rate { interval_us } => {
                    start as f64 + interval_us * (p as f64 / pairs as f64)
                }
            },
        })
        .collect();
    let mut receivers: Vec<ReceiverState> = (0..pairs)
        .map(|_| ReceiverState {
            got: Vec::new(),
            last_id: 0,
        })
        .collect();
    let mut out = PairOutcome::default();
    let end = spec.duration.map(|d| start + d.as_micros() as u64);
    if let Some(e) = end {
        out.window_us = e - start;
    }
    let limit_secs = spec.duration.map_or(600.0, |d| d.as_secs_f64() + 60.0);
    let hard_end = start + (limit_secs * 1e6) as u64;
    let mut sending = true;
    let mut drain_deadline = u64::MAX;
    // Acked messages that have also been delivered: when it reaches `out.acked`, nothing is in flight.
    let mut acked_and_got: u64 = 0;
    loop {
        let now = now_us();
        if sending
            && (end.is_some_and(|e| now >= e) || senders.iter().all(|s| s.sent >= spec.limit))
        {
            sending = false;
            drain_deadline = now + 30_000_000;
        }
        if sending {
            for (p, s) in senders.iter_mut().enumerate() {
                let buf = net.outs.buf(2 * p);
                loop {
                    if s.sent >= spec.limit || s.outstanding >= spec.window {
                        break;
                    }
                    // Stamped with the time the frame is written: the schedule only sets the offered
                    // rate, and how late the generator is against it is reported on its own.
                    let stamp = now;
                    if let Pace::Rate { interval_us } = spec.pace {
                        if s.next_due > now as f64 {
                            break;
                        }
                        out.late_us.push((now as f64 - s.next_due).max(0.0) as u32);
                        s.next_due += interval_us;
                    }
                    let seq = s.sent;
                    put_tagged_send(
                        buf,
                        kind::SEND,
                        (seq + 1) as u32,
                        &spec.recipients[p],
                        seq + 1,
                        [p as u64, seq, stamp],
                        spec.size,
                    );
                    s.sent_at.push(stamp);
                    s.state.push(0);
                    s.sent += 1;
                    s.outstanding += 1;
                }
            }
        } else if senders.iter().all(|s| s.outstanding == 0)
            && (acked_and_got >= out.acked || now >= drain_deadline)
        {
            break;
        }
        if now >= hard_end {
            return Err("the pair workload did not finish in time".into());
        }
        let wait = match spec.pace {
            Pace::Rate { .. } if sending => {
                let next = senders
                    .iter()
                    .filter(|s| s.sent < spec.limit)
                    .map(|s| s.next_due)
                    .fold(f64::MAX, f64::min);
                Duration::from_micros((next - now as f64).clamp(0.0, 5_000.0) as u64)
            }
            _ => Duration::from_millis(20),
        };
        net.turn(wait, |i, header, body, _outs| {
            let p = i / 2;
            let now = now_us();
            if i % 2 == 0 {
                let s = &mut senders[p];
                let rid = header.request_id;
                let seq = (rid as u64).wrapping_sub(1) as usize;
                match header.kind {
                    kind::ACK if rid != 0 && seq < s.state.len() && s.state[seq] == 0 => {
                        s.state[seq] = 1;
                        s.outstanding -= 1;
                        out.acked += 1;
                        if end.is_none_or(|e| now <= e) {
                            out.acked_in_window += 1;
                        }
                        out.last_ack_us = now - start;
                        out.ack_us.push(now.saturating_sub(s.sent_at[seq]) as u32);
                        if receivers[p].got.get(seq).is_some_and(|g| *g > 0) {
                            acked_and_got += 1;
                        }
                    }
                    kind::ERROR => {
                        let (code, _) = parse_error(body);
                        *out.errors.entry(code).or_default() += 1;
                        if rid != 0 && seq < s.state.len() && s.state[seq] == 0 {
                            s.state[seq] = 2;
                            s.outstanding -= 1;
                            out.failed += 1;
                        }
                    }
                    _ => {}
                }
            } else if header.kind == kind::DELIVER {
                let r = &mut receivers[p];
                out.delivered += 1;
                if end.is_none_or(|e| now <= e) {
                    out.delivered_in_window += 1;
                }
                out.last_delivery_us = now - start;
                let Some((id, text)) = parse_deliver(body) else {
                    out.misrouted += 1;
                    return;
                };
                if id <= r.last_id {
                    out.out_of_order += 1;
                }
                r.last_id = id;
                match parse_tag(text) {
                    Some([tp, seq, stamp]) if tp as usize == p && seq < (1 << 32) => {
                        let seq = seq as usize;
                        if r.got.len() <= seq {
                            r.got.resize(seq + 1, 0);
                        }
                        r.got[seq] = r.got[seq].saturating_add(1);
                        if r.got[seq] > 1 {
                            out.duplicates += 1;
                        } else if senders[p].state.get(seq) == Some(&1) {
                            acked_and_got += 1;
                        }
                        out.deliver_us.push(now.saturating_sub(stamp) as u32);
                    }
                    _ => out.misrouted += 1,
                }
            } else if header.kind == kind::ERROR {
                let (code, _) = parse_error(body);
                *out.errors.entry(code).or_default() += 1;
            }
        })?;
        net.check_closed(|i| {
            format!(
                "{} {}",
                if i % 2 == 0 { "sender" } else { "receiver" },
                i / 2
            )
        })?;
    }
    for (s, r) in senders.iter().zip(&receivers) {
        out.sent += s.sent;
        for (seq, state) in s.state.iter().enumerate() {
            if *state == 1 && r.got.get(seq).is_none_or(|g| *g == 0) {
                out.missing += 1;
            }
        }
    }
    Ok(out)
}

/// Registers and logs in P senders and P receivers and puts them in a Net (sender p at 2p, receiver at 2p+1).
fn setup_pairs(pre: &str, addr: SocketAddr, pairs: usize) -> Result<(Net, Vec<String>), String> {
    let names: Vec<String> = (0..2 * pairs)
        .map(|i| {
            let role = if i % 2 == 0 { 's' } else { 'r' };
            format!("{}{role}{}", pre, i / 2)
        })
        .collect();
    let wires = par_map(2 * pairs, SETUP_THREADS, |i| user_wire(addr, &names[i]))?;
    let mut net = Net::new()?;
    for wire in wires {
        net.add_wire(wire)?;
    }
    let recipients = (0..pairs).map(|p| names[2 * p + 1].clone()).collect();
    Ok((net, recipients))
}

fn scenario_dm(ctx: &Ctx, latency: bool) -> Result<Report, String> {
    let pre = ctx.new_prefix();
    let name = if latency {
        "dm-latency"
    } else {
        "dm-throughput"
    };
    let mut report = Report::new(name);
    let pairs = ctx.size(ctx.opts.pairs, 100, 4).max(1);
    let window = ctx.size(ctx.opts.window, 64, 16).max(1);
    let size = ctx.size(ctx.opts.size, 64, 64).max(1);
    let mut target = start_target(ctx, &[], Hashing::Cheap)?;
    let addr = target.addr();
    eprintln!("loadgen: {name}: setting up {pairs} pairs on {addr}");
    let (mut net, recipients) = setup_pairs(&pre, addr, pairs)?;
    let mut ctl = user_wire(addr, &format!("{}ctl", pre))?;
    let spec = if latency {
        let rate = ctx.size(ctx.opts.rate, 20_000.0, 500.0).max(1.0);
        let duration = ctx.seconds(TIMED_SECS, 1.0);
        report.num("offered_per_sec", "offered msgs/s", rate, 0);
        PairSpec {
            pairs,
            window: 100_000,
            size,
            pace: Pace::Rate {
                interval_us: pairs as f64 * 1e6 / rate,
            },
            limit: ctx.opts.messages.unwrap_or(u64::MAX),
            duration: Some(duration),
            recipients,
        }
    } else {
        window_spec(ctx, pairs, window, size, recipients)
    };
    report.int("pairs", "pairs", pairs as u64);
    if !latency {
        report.int("window", "window per sender", window as u64);
    }
    report.int("size", "text size (bytes)", size as u64);
    report.text("sync", "sync", ctx.opts.sync.clone());
    match spec.duration {
        Some(d) => report.num("seconds", "seconds", d.as_secs_f64(), 1),
        None => report.int("messages_per_sender", "messages per sender", spec.limit),
    }
    eprintln!("loadgen: {name}: running");
    let cpu_before = target.pid().and_then(ServerCpu::read);
    let started = Instant::now();
    let outcome = run_pairs(&mut net, &spec)?;
    let seconds = started.elapsed().as_secs_f64();
    outcome.report(&mut report, latency);
    if let (Some(before), Some(after)) = (cpu_before, target.pid().and_then(ServerCpu::read)) {
        report_server_cpu(&mut report, after.since(before), outcome.acked, seconds);
    }
    server_stats(&mut report, &mut ctl);
    target.finish(ctx, &mut report);
    if latency && !ctx.opts.no_relay {
        // The server is stopped first, so the relay gets core 0 (when pinned) to itself, as the server had.
        drop((net, ctl, target));
        relay_latency(ctx, &mut report, &spec, &outcome)?;
    }
    Ok(report)
}

/// dm-latency's paced workload, same rate and pairs, against the in-process relay: its latency beside the
/// server's (this machine's own pauses show in both), and server/relay ratios.
fn relay_latency(
    ctx: &Ctx,
    report: &mut Report,
    server_spec: &PairSpec,
    server: &PairOutcome,
) -> Result<(), String> {
    let pairs = server_spec.pairs;
    let (relay, mut net) = connect_relay(ctx, pairs)?;
    let spec = PairSpec {
        recipients: (0..pairs).map(|p| format!("peer{p}")).collect(),
        ..*server_spec
    };
    eprintln!("loadgen: dm-latency: running the same paced workload against the relay");
    let outcome = run_pairs(&mut net, &spec)?;
    drop(net);
    report.text(
        "relay",
        "relay",
        format!(
            "relay-ceiling's mio thread in the generator{}, same rate and pairs",
            if ctx.pin { ", pinned to core 0" } else { "" }
        ),
    );
    report.num(
        "relay_acked_per_sec",
        "relay acked msgs/s",
        outcome.acked_rate(),
        0,
    );
    outcome.report_latencies(report, "relay_", "relay ", true);
    let ratio = |a: u32, b: u32| if b > 0 { a as f64 / b as f64 } else { f64::NAN };
    for (key, label, s, r) in [
        ("ack", "send->ack", &server.ack_us, &outcome.ack_us),
        (
            "deliver",
            "send->deliver",
            &server.deliver_us,
            &outcome.deliver_us,
        ),
    ] {
        let (s, r) = (
            Percentiles::of(&mut s.clone()),
            Percentiles::of(&mut r.clone()),
        );
        report.num(
            &format!("{key}_p50_over_relay"),
            &format!("{label} p50 server/relay"),
            ratio(s.p50, r.p50),
            2,
        );
        report.num(
            &format!("{key}_p99_over_relay"),
            &format!("{label} p99 server/relay"),
            ratio(s.p99, r.p99),
            2,
        );
    }
    report.int(
        "relay_relayed",
        "frames relayed by the relay",
        relay.relayed.load(Ordering::Relaxed),
    );
    outcome.check(report, "relay run: ");
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// relay-ceiling: a bare mio relay in this process, same framing, no accounts, no store
// ---------------------------------------------------------------------------------------------------------------

const RELAY_LISTENER: Token = Token(usize::MAX - 1);
const RELAY_WAKE: Token = Token(usize::MAX - 2);

struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    relayed: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct RelayConn {
    stream: MioStream,
    input: Vec<u8>,
    out: Vec<u8>,
    pos: usize,
    blocked: bool,
    dirty: bool,
}

fn start_relay(pin_core: Option<usize>) -> Result<Relay, String> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let addr = std_listener.local_addr().map_err(|e| e.to_string())?;
    let mut listener = MioListener::from_std(std_listener);
    let poll = Poll::new().map_err(|e| e.to_string())?;
    poll.registry()
        .register(&mut listener, RELAY_LISTENER, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    let waker = Arc::new(Waker::new(poll.registry(), RELAY_WAKE).map_err(|e| e.to_string())?);
    let stop = Arc::new(AtomicBool::new(false));
    let relayed = Arc::new(AtomicU64::new(0));
    let handle = {
        let (stop, relayed) = (Arc::clone(&stop), Arc::clone(&relayed));
        thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                if let Some(core) = pin_core {
                    pin_current_thread(core);
                }
                if let Err(e) = relay_loop(poll, listener, &stop, &relayed) {
                    eprintln!("loadgen: relay failed: {e}");
                }
            })
            .map_err(|e| e.to_string())?
    };
    Ok(Relay {
        addr,
        stop,
        waker,
        relayed,
        handle: Some(handle),
    })
}

fn relay_loop(
    mut poll: Poll,
    listener: MioListener,
    stop: &AtomicBool,
    relayed: &AtomicU64,
) -> io::Result<()> {
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<RelayConn> = Vec::new();
    let mut dirty: Vec<usize> = Vec::new();
    let mut scratch = vec![0u8; 256 * 1024];
    let mut next_id: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let timestamp_ms = wall_ms();
        for event in events.iter() {
            match event.token() {
                RELAY_WAKE => {}
                RELAY_LISTENER => loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let i = conns.len();
                            stream.set_nodelay(true)?;
                            poll.registry().register(
                                &mut stream,
                                Token(i),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            let mut out = Vec::new();
                            let mut id = [0u8; 16];
                            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                            Packet::Hello {
                                connection_id: id,
                                server_version: "relay".into(),
                                max_frame: 65536,
                                idle_timeout_ms: 0,
                                auth_timeout_ms: 0,
                            }
                            .encode(0, &mut out);
                            conns.push(RelayConn {
                                stream,
                                input: Vec::new(),
                                out,
                                pos: 0,
                                blocked: false,
                                dirty: true,
                            });
                            dirty.push(i);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                },
                Token(i) if i < conns.len() => {
                    if event.is_writable() {
                        conns[i].blocked = false;
                        if !conns[i].dirty {
                            conns[i].dirty = true;
                            dirty.push(i);
                        }
                    }
                    if event.is_readable() {
                        let frames = relay_read(&mut conns[i], &mut scratch);
                        let mut input = std::mem::take(&mut conns[i].input);
                        let mut pos = 0;
                        while let Ok(Some(f)) = split_frame(&input[pos..], 1 << 20, any_kind) {
                            pos += f.len;
                            match Request::decode(f.header.kind, f.body) {
                                Ok(Request::Send {
                                    recipient, text, ..
                                }) => {
                                    next_id += 1;
                                    Packet::Ack {
                                        message_id: next_id,
                                        timestamp_ms,
                                    }
                                    .encode(f.header.request_id, &mut conns[i].out);
                                    let peer = i ^ 1;
                                    if peer < conns.len() {
                                        hubbub::protocol::encode_deliver(
                                            &mut conns[peer].out,
                                            next_id,
                                            "relay",
                                            &recipient,
                                            timestamp_ms,
                                            &text,
                                        );
                                        if !conns[peer].dirty {
                                            conns[peer].dirty = true;
                                            dirty.push(peer);
                                        }
                                    }
                                    relayed.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(Request::Ping) => {
                                    Packet::Pong.encode(f.header.request_id, &mut conns[i].out)
                                }
                                _ => {}
                            }
                        }
                        input.drain(..pos);
                        conns[i].input = input;
                        if pos > 0 && !conns[i].dirty {
                            conns[i].dirty = true;
                            dirty.push(i);
                        }
                        if !frames {
                            let _ = poll.registry().deregister(&mut conns[i].stream);
                        }
                    }
                }
                _ => {}
            }
        }
        for &i in &dirty {
            let c = &mut conns[i];
            c.dirty = false;
            if c.blocked {
                continue;
            }
            while c.pos < c.out.len() {
                match c.stream.write(&c.out[c.pos..]) {
                    Ok(n) if n > 0 => c.pos += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        c.blocked = true;
                        break;
                    }
                    _ => {
                        c.out.clear();
                        c.pos = 0;
                        break;
                    }
                }
            }
            if c.pos == c.out.len() {
                c.out.clear();
                c.pos = 0;
            }
        }
        dirty.clear();
    }
    Ok(())
}

/// Reads until the socket would block; false if the peer closed.
fn relay_read(conn: &mut RelayConn, scratch: &mut [u8]) -> bool {
    loop {
        match conn.stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => conn.input.extend_from_slice(&scratch[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Starts the relay (pinned to core 0, where the server goes, when pinning is on) and connects P pairs to it.
fn connect_relay(ctx: &Ctx, pairs: usize) -> Result<(Relay, Net), String> {
    let relay = start_relay(ctx.pin.then_some(0))?;
    let mut net = Net::new()?;
    // Connected one at a time, each waiting for its Hello, so the relay pairs 2p with 2p+1 as we do.
    for _ in 0..2 * pairs {
        let wire = Wire::connect(relay.addr, None).map_err(setup_err("relay connect"))?;
        net.add_wire(wire)?;
    }
    Ok((relay, net))
}

/// The windowed pair workload dm-throughput and relay-ceiling share: `--messages` per sender (100 with
/// `--smoke`), or 10 seconds.
fn window_spec(
    ctx: &Ctx,
    pairs: usize,
    window: usize,
    size: usize,
    recipients: Vec<String>,
) -> PairSpec {
    let limit = ctx
        .opts
        .messages
        .or(if ctx.opts.smoke { Some(100) } else { None });
    PairSpec {
        pairs,
        window,
        size,
        pace: Pace::Window,
        limit: limit.unwrap_or(u64::MAX),
        duration: if limit.is_some() {
            None
        } else {
            Some(ctx.seconds(TIMED_SECS, 1.0))
        },
        recipients,
    }
}

fn scenario_relay(ctx: &Ctx) -> Result<Report, String> {
    let mut report = Report::new("relay-ceiling");
    let pairs = ctx.size(ctx.opts.pairs, 100, 4).max(1);
    let window = ctx.size(ctx.opts.window, 64, 16).max(1);
    let size = ctx.size(ctx.opts.size, 64, 64).max(1);
    let (relay, mut net) = connect_relay(ctx, pairs)?;
    let recipients = (0..pairs).map(|p| format!("peer{p}")).collect();
    let spec = window_spec(ctx, pairs, window, size, recipients);
    report.int("pairs", "pairs", pairs as u64);
    report.int("window", "window per sender", window as u64);
    report.int("size", "text size (bytes)", size as u64);
    eprintln!("loadgen: relay-ceiling: running {pairs} pairs");
    let outcome = run_pairs(&mut net, &spec)?;
    outcome.report(&mut report, false);
    report.int(
        "relayed",
        "frames relayed by the relay",
        relay.relayed.load(Ordering::Relaxed),
    );
    report.text(
        "relay",
        "relay",
        format!(
            "one mio thread in the generator{}",
            if ctx.pin { ", pinned to core 0" } else { "" }
        ),
    );
    report.text("pinning", "pinning", ctx.pin_note.clone());
    Ok(report)
}

// ---------------------------------------------------------------------------------------------------------------
// store-ceiling: SQLite alone, the same schema and pragmas as the server
// ---------------------------------------------------------------------------------------------------------------

/// A fresh database with the server's schema, made by starting the server's own store once and stopping it.
fn fresh_store_db(dir: &Path, name: &str, sync: SyncMode) -> Result<PathBuf, String> {
    let path = dir.join(name);
    let (handle, done) = StoreHandle::start(
        StoreConfig {
            path: path.clone(),
            sync,
            queue_capacity: 4,
            max_batch: 1,
            index: IndexSettings::default(),
        },
        Arc::new(|| {}),
    )
    .map_err(|e| format!("store: {e}"))?;
    handle.join();
    drop(done);
    Ok(path)
}

/// A message text of `size` bytes tagged like the network scenarios' texts.
fn bench_text(pair: usize, seq: u64, size: usize) -> String {
    let mut text = format!("{pair}.{seq}.0.");
    if text.len() < size {
        text.extend(std::iter::repeat_n('x', size - text.len()));
    }
    text
}

/// What the store runs insert: `pairs` conversations, rows of `size` bytes, in runs of `run_len` consecutive
/// rows per sender (how pipelining senders reach the store), for `duration`.
struct StoreSpec {
    sync: SyncMode,
    pairs: usize,
    size: usize,
    run_len: usize,
    duration: Duration,
}

impl StoreSpec {
    /// The `PRAGMA synchronous` value the server uses for `sync`.
    fn pragma_synchronous(sync: SyncMode) -> &'static str {
        match sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        }
    }
    /// The conversation of the `row`th row.
    fn pair_of(&self, row: u64) -> usize {
        (row as usize / self.run_len) % self.pairs
    }
}

/// Result of one timed store run.
struct StoreRun {
    rows: u64,
    seconds: f64,
    commit_us: Vec<u32>,
}

/// Inserts message rows straight through rusqlite, `batch` per transaction, for `duration`, and keeps the message
/// index up to date as the server's index thread does (the entries of `IndexSettings::default().batch` rows per
/// transaction, on this thread and inside the timed run: the index is part of storing a message). `like_server` adds what the
/// server's store does per message besides the INSERT: a savepoint, the resend check and two user lookups.
fn rusqlite_run(
    path: &Path,
    spec: &StoreSpec,
    batch: usize,
    like_server: bool,
) -> Result<StoreRun, String> {
    let (pairs, size) = (spec.pairs, spec.size);
    use rusqlite::OptionalExtension;
    let sql = |e: rusqlite::Error| format!("sqlite: {e}");
    let conn = rusqlite::Connection::open(path).map_err(sql)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
    configure_connection(&conn, spec.sync).map_err(sql)?;
    let mut users = Vec::with_capacity(2 * pairs);
    for i in 0..2 * pairs {
        conn.execute(
            "INSERT INTO users (username, phc, created_at_ms) VALUES (?1, 'x', ?2)",
            rusqlite::params![format!("u{i}"), wall_ms() as i64],
        )
        .map_err(sql)?;
        users.push((conn.last_insert_rowid(), format!("u{i}")));
    }
    let mut next_id = vec![0i64; pairs];
    let mut run = StoreRun {
        rows: 0,
        seconds: 0.0,
        commit_us: Vec::new(),
    };
    let mut index = IndexWriter::open(path)?;
    let index_batch = IndexSettings::default().batch;
    let mut unindexed: Vec<IndexEntry> = Vec::with_capacity(index_batch + batch);
    // Client ids are filed as the server files them: in sorted runs, inside a commit.
    let mut unfiled: Vec<ClientId> = Vec::with_capacity(CLIENT_IDS_FILE_AT + batch);
    let started = Instant::now();
    while started.elapsed() < spec.duration {
        conn.execute_batch("BEGIN").map_err(sql)?;
        for k in 0..batch {
            let pair = spec.pair_of(run.rows + k as u64);
            let (sender, _) = &users[2 * pair];
            let (recipient, recipient_name) = &users[2 * pair + 1];
            next_id[pair] += 1;
            let client_msg_id = next_id[pair];
            let text = bench_text(pair, client_msg_id as u64, size);
            if like_server {
                conn.execute_batch("SAVEPOINT job").map_err(sql)?;
                // The resend check's slow path; the server's fast path needs no query.
                conn.prepare_cached(
                    "SELECT id FROM client_ids WHERE sender_id = ?1 AND client_msg_id = ?2",
                )
                .and_then(|mut s| {
                    s.query_row(rusqlite::params![sender, client_msg_id], |r| {
                        r.get::<_, i64>(0)
                    })
                    .optional()
                })
                .map_err(sql)?;
                conn.prepare_cached("SELECT id FROM users WHERE username = ?1")
                    .and_then(|mut s| s.query_row([recipient_name], |r| r.get::<_, i64>(0)))
                    .map_err(sql)?;
                conn.prepare_cached("SELECT username FROM users WHERE id = ?1")
                    .and_then(|mut s| s.query_row([sender], |r| r.get::<_, String>(0)))
                    .map_err(sql)?;
            }
            conn.prepare_cached(
                "INSERT INTO messages (sender_id, recipient_id, client_msg_id, timestamp_ms, text)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| {
                s.execute(rusqlite::params![
                    sender,
                    recipient,
                    client_msg_id,
                    wall_ms() as i64,
                    text
                ])
            })
            .map_err(sql)?;
            let id = conn.last_insert_rowid();
            unindexed.push(IndexEntry {
                id: id as u64,
                sender_id: *sender as u64,
                recipient_id: *recipient as u64,
            });
            unfiled.push(ClientId {
                sender_id: *sender,
                client_msg_id,
                id,
            });
            if like_server {
                conn.execute_batch("RELEASE job").map_err(sql)?;
            }
        }
        let t = Instant::now();
        if unfiled.len() >= CLIENT_IDS_FILE_AT {
            file_client_ids(&conn, &mut unfiled).map_err(sql)?;
            unfiled.clear();
        }
        conn.execute_batch("COMMIT").map_err(sql)?;
        run.commit_us.push(t.elapsed().as_micros() as u32);
        run.rows += batch as u64;
        if unindexed.len() >= index_batch {
            let newest = unindexed.last().map_or(0, |entry| entry.id);
            index.index_entries(&mut unindexed, newest).map_err(sql)?;
            unindexed.clear();
        }
    }
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

/// Feeds StoreMessage jobs to the server's own store thread (group commit, at most `max_batch` per commit),
/// keeping its queue full, for `duration`; no network and no loop in between.
fn store_thread_run(path: &Path, spec: &StoreSpec, max_batch: usize) -> Result<StoreRun, String> {
    let (pairs, size) = (spec.pairs, spec.size);
    use hubbub::session::Ticket;
    use hubbub::store::{Job, Op, Outcome};
    let (handle, done) = StoreHandle::start(
        StoreConfig {
            path: path.to_path_buf(),
            sync: spec.sync,
            queue_capacity: 4096,
            max_batch,
            index: IndexSettings::default(),
        },
        // Like the server's loop, the producer is woken once per committed batch, not by each completion:
        // waking on every completion would charge the store thread context switches the server never pays.
        {
            let producer = thread::current();
            Arc::new(move || producer.unpark())
        },
    )
    .map_err(|e| format!("store: {e}"))?;
    let ticket = Ticket {
        session: 1,
        slot: 0,
        request_id: 1,
    };
    let wait = Duration::from_secs(30);
    let mut ids = Vec::with_capacity(2 * pairs);
    for i in 0..2 * pairs {
        let job = Job {
            ticket,
            op: Op::CreateUser {
                username: format!("u{i}"),
                phc: "x".into(),
            },
        };
        handle
            .try_submit(job)
            .map_err(|_| "the store refused a job".to_string())?;
        match done.recv_timeout(wait).map(|d| d.outcome) {
            Ok(Outcome::UserCreated { user_id }) => ids.push(user_id),
            other => return Err(format!("creating a user: {other:?}")),
        }
    }
    let mut next_id = vec![0u64; pairs];
    let mut run = StoreRun {
        rows: 0,
        seconds: 0.0,
        commit_us: Vec::new(),
    };
    let mut made = 0u64;
    let mut pending: Option<Job> = None;
    let started = Instant::now();
    while started.elapsed() < spec.duration {
        loop {
            let job = pending.take().unwrap_or_else(|| {
                let pair = spec.pair_of(made);
                made += 1;
                next_id[pair] += 1;
                Job {
                    ticket,
                    op: Op::StoreMessage {
                        sender: ids[2 * pair],
                        recipient: format!("u{}", 2 * pair + 1),
                        client_msg_id: next_id[pair],
                        text: bench_text(pair, next_id[pair], size),
                    },
                }
            });
            match handle.try_submit(job) {
                Ok(()) => {}
                Err(job) => {
                    pending = Some(job);
                    break;
                }
            }
        }
        thread::park_timeout(Duration::from_millis(1));
        loop {
            match done.try_recv() {
                Ok(d) => match d.outcome {
                    Outcome::Stored { .. } => run.rows += 1,
                    other => return Err(format!("storing a message: {other:?}")),
                },
                Err(mpsc::TryRecvError::Empty) => break,
                Err(e) => return Err(format!("the store thread stopped: {e}")),
            }
        }
    }
    run.seconds = started.elapsed().as_secs_f64();
    drop(done);
    handle.join();
    Ok(run)
}

/// How long a timed run lasts: dm-throughput, dm-latency, and each of store-ceiling's runs, which must
/// last as long as the run they bound. SQLite slows as the database, its WAL and its checkpoints grow:
/// 3-second ceiling runs measured 20-25 % more rows/s than 10-second ones on the same machine, a bound
/// the 10-second dm-throughput could never reach.
const TIMED_SECS: f64 = 10.0;

fn scenario_store(ctx: &Ctx) -> Result<Report, String> {
    let mut report = Report::new("store-ceiling");
    let size = ctx.size(ctx.opts.size, 64, 64).max(1);
    let pairs = ctx.size(ctx.opts.pairs, 100, 4).max(1);
    let per_batch = ctx.seconds(TIMED_SECS, 0.3);
    let batches = if ctx.opts.batch.is_empty() {
        vec![1, 64, 1024]
    } else {
        ctx.opts.batch.iter().map(|b| (*b).max(1)).collect()
    };
    let largest = *batches.iter().max().unwrap_or(&1024);
    let dir = ctx.temp_dir()?;
    report.text(
        "database",
        "database directory",
        format!("{} ({})", dir.path().display(), fs_type(dir.path())),
    );
    let sync = ctx.sync();
    report.text("sync", "synchronous", StoreSpec::pragma_synchronous(sync));
    report.int("size", "text size (bytes)", size as u64);
    report.int("pairs", "senders (= recipients)", pairs as u64);
    report.num(
        "seconds_per_batch",
        "seconds per run",
        per_batch.as_secs_f64(),
        1,
    );
    let run_len = ctx.size(ctx.opts.window, 64, 16).max(1);
    report.text(
        "index",
        "message index",
        format!(
            "kept up on the same thread, a transaction per {} rows, inside the timed run",
            IndexSettings::default().batch
        ),
    );
    report.text(
        "row_order",
        "row order",
        format!("runs of {run_len} rows per sender (--window), like pipelined senders"),
    );
    let spec = StoreSpec {
        sync,
        pairs,
        size,
        run_len,
        duration: per_batch,
    };
    let round_robin = StoreSpec { run_len: 1, ..spec };
    let mut best = (0.0f64, 0usize);
    // Each run gets a fresh database, so no run pays for the rows of the one before.
    let mut runs: Vec<(String, String, usize, bool, &StoreSpec)> = batches
        .iter()
        .map(|b| (format!("batch_{b}"), format!("batch {b}"), *b, false, &spec))
        .collect();
    runs.push((
        format!("server_like_{largest}"),
        format!("batch {largest}, server-like jobs"),
        largest,
        true,
        &spec,
    ));
    runs.push((
        format!("round_robin_{largest}"),
        format!("batch {largest}, every row another sender"),
        largest,
        false,
        &round_robin,
    ));
    for (n, (key, label, batch, like_server, spec)) in runs.into_iter().enumerate() {
        eprintln!("loadgen: store-ceiling: {label}");
        let path = fresh_store_db(dir.path(), &format!("run{n}.db"), ctx.sync())?;
        let mut run = rusqlite_run(&path, spec, batch, like_server)?;
        let rate = run.rows as f64 / run.seconds;
        let p = Percentiles::of(&mut run.commit_us);
        report.num(
            &format!("{key}_rows_per_sec"),
            &format!("{label}: rows/s"),
            rate,
            0,
        );
        report.int(
            &format!("{key}_commit_p50_us"),
            &format!("{label}: commit p50 (us)"),
            p.p50 as u64,
        );
        report.int(
            &format!("{key}_commit_p99_us"),
            &format!("{label}: commit p99 (us)"),
            p.p99 as u64,
        );
        if !like_server && spec.run_len == run_len && rate > best.0 {
            best = (rate, batch);
        }
    }
    eprintln!("loadgen: store-ceiling: the server's store thread");
    let path = fresh_store_db(dir.path(), "thread.db", ctx.sync())?;
    let run = store_thread_run(&path, &spec, 1024)?;
    report.num(
        "store_thread_rows_per_sec",
        "hubbub store thread (group commit <= 1024): msgs/s",
        run.rows as f64 / run.seconds,
        0,
    );
    report.num(
        "best_rows_per_sec",
        "best rows/s (plain inserts)",
        best.0,
        0,
    );
    report.int("best_batch", "best batch size", best.1 as u64);
    report.text("pinning", "pinning", ctx.pin_note.clone());
    Ok(report)
}

// ---------------------------------------------------------------------------------------------------------------
// idle: memory per logged-in idle connection
// ---------------------------------------------------------------------------------------------------------------

/// Connections per source address: below the ~28k ephemeral ports one address has towards one server port.
const PER_SOURCE: usize = 25_000;
/// Source addresses the idle scenario may use: 127.0.0.1 up to 127.0.0.250.
const MAX_SOURCES: usize = 250;

fn scenario_idle(ctx: &Ctx) -> Result<Report, String> {
    let pre = ctx.new_prefix();
    let mut report = Report::new("idle");
    let n = ctx.size(ctx.opts.connections, 10_000, 50).max(1);
    let (soft, _) = ctx.nofile;
    if soft < (n + 256) as u64 {
        return Err(format!(
            "{n} connections need about {} open files; this process may have {soft} (raise `ulimit -Hn`)",
            n + 256
        ));
    }
    let cap = (n + 256).to_string();
    let mut target = start_target(
        ctx,
        &[
            ("--max-connections", cap.clone()),
            ("--max-per-ip", cap),
            ("--hash-queue", "4096".into()),
        ],
        Hashing::Cheap,
    )?;
    let addr = target.addr();
    let mut server_nofile = target.pid().and_then(proc_nofile);
    if let (Some(pid), Some(limit)) = (target.pid(), server_nofile) {
        if limit < (n + 64) as u64 && which("prlimit").is_some() {
            let _ = Command::new("prlimit")
                .arg("--pid")
                .arg(pid.to_string())
                .arg(format!("--nofile={}:{}", n + 256, n + 256))
                .status();
            server_nofile = proc_nofile(pid);
        }
    }
    let per_source = ctx.opts.per_source.unwrap_or(PER_SOURCE).max(1);
    let sources = n.div_ceil(per_source);
    if sources > MAX_SOURCES {
        return Err(format!(
            "{n} connections at {per_source} per source address need {sources} addresses; at most {MAX_SOURCES}"
        ));
    }
    let source_of = |i: usize| -> Option<IpAddr> {
        (sources > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i / per_source) as u8)))
    };
    // A started server allows 1000 sessions per user; one given with --server may have the default, 8.
    let per_user = if ctx.opts.server.is_some() { 8 } else { 500 };
    let users = n.div_ceil(per_user).max(1);
    let rss = |pid: Option<u32>| pid.and_then(|p| proc_status_bytes(p, "VmRSS:"));
    thread::sleep(Duration::from_millis(200));
    let rss_before = rss(target.pid());
    eprintln!(
        "loadgen: idle: opening {n} connections ({users} users, {sources} source address(es))"
    );
    let started = Instant::now();
    let firsts = par_map(users, SETUP_THREADS.min(users), |u| {
        let name = format!("{}i{u}", pre);
        let mut wire = registered_wire(addr, source_of(u), &name)?;
        let token = wire
            .login(&name, "idle")
            .map_err(|e| format!("login {name}: {e}"))?;
        Ok((wire, token))
    })?;
    let tokens: Vec<[u8; 16]> = firsts.iter().map(|(_, t)| *t).collect();
    let mut wires: Vec<Wire> = firsts.into_iter().map(|(w, _)| w).collect();
    let progress = AtomicUsize::new(0);
    let rest = par_map(n - users, 2 * SETUP_THREADS, |j| {
        let i = users + j;
        let mut wire = Wire::connect(addr, source_of(i))
            .map_err(|e| format!("connection {i}: connect: {e}"))?;
        wire.resume(tokens[i % users], "idle")
            .map_err(|e| format!("connection {i}: resume: {e}"))?;
        let done = progress.fetch_add(1, Ordering::Relaxed) + 1;
        if done.is_multiple_of(2000) {
            eprintln!("loadgen: idle: {done} resumed");
        }
        Ok(wire)
    })?;
    wires.extend(rest);
    let setup = started.elapsed();
    let rss_after = rss(target.pid());
    thread::sleep(ctx.seconds(2.0, 0.2).min(Duration::from_secs(2)));
    let rss_settled = rss(target.pid());
    // Every connection must still be there: one Ping each, all sent before any answer is read.
    let mut rids = Vec::with_capacity(wires.len());
    for w in &mut wires {
        rids.push(w.send(&Request::Ping).ok());
    }
    let mut alive = 0u64;
    for (w, rid) in wires.iter_mut().zip(&rids) {
        if let Some(rid) = rid {
            if matches!(w.reply(*rid), Ok(Packet::Pong)) {
                alive += 1;
            }
        }
    }
    report.int("connections", "connections (logged in)", n as u64);
    report.int("users", "users (sessions spread over them)", users as u64);
    report.int("source_addresses", "source addresses", sources as u64);
    report.num(
        "setup_s",
        "connect + login time (s)",
        setup.as_secs_f64(),
        2,
    );
    report.num(
        "logins_per_sec",
        "connect + login per second",
        n as f64 / setup.as_secs_f64(),
        0,
    );
    report.int("loadgen_nofile", "loadgen open-file limit", soft);
    match server_nofile {
        Some(v) => report.int("server_nofile", "server open-file limit", v),
        None => report.text("server_nofile", "server open-file limit", "n/a"),
    }
    match (rss_before, rss_after, rss_settled) {
        (Some(before), Some(after), Some(settled)) => {
            report.int("rss_before_kib", "server RSS before (KiB)", before / 1024);
            report.int(
                "rss_after_kib",
                "server RSS all logged in (KiB)",
                after / 1024,
            );
            report.int(
                "rss_settled_kib",
                "server RSS after settle (KiB)",
                settled / 1024,
            );
            report.int(
                "rss_per_connection_bytes",
                "server RSS per connection (bytes)",
                settled.saturating_sub(before) / n as u64,
            );
        }
        _ => report.text(
            "rss_per_connection_bytes",
            "server RSS per connection (bytes)",
            "n/a (external server)",
        ),
    }
    report.int("alive", "connections answering Ping after settle", alive);
    report.flag("all_alive", "all connections alive", alive == n as u64);
    if alive != n as u64 {
        report.fail(format!("only {alive} of {n} connections answered Ping"));
    }
    target.finish(ctx, &mut report);
    drop(wires);
    Ok(report)
}

// ---------------------------------------------------------------------------------------------------------------
// login-storm: N logins with real argon2 at once, while a probe pings
// ---------------------------------------------------------------------------------------------------------------

fn scenario_login_storm(ctx: &Ctx) -> Result<Report, String> {
    let pre = ctx.new_prefix();
    let mut report = Report::new("login-storm");
    let n = ctx.size(ctx.opts.logins, 500, 20).max(1);
    let memory = ctx.size(ctx.opts.argon2_memory_kib, 19_456, 1024);
    let iterations = ctx.size(ctx.opts.argon2_iterations, 2, 1);
    let cap = (n + 256).to_string();
    let mut target = start_target(
        ctx,
        &[
            ("--hash-queue", (n + 64).max(256).to_string()),
            ("--max-connections", cap.clone()),
            ("--max-per-ip", cap),
        ],
        Hashing::Real(memory, iterations),
    )?;
    let addr = target.addr();
    let names: Vec<String> = (0..n).map(|i| format!("{}l{i}", pre)).collect();
    eprintln!(
        "loadgen: login-storm: registering {n} users (argon2 m={memory} KiB, t={iterations})"
    );
    let started = Instant::now();
    par_map(n, SETUP_THREADS, |i| {
        registered_wire(addr, None, &names[i]).map(drop)
    })?;
    let register_s = started.elapsed().as_secs_f64();
    let wires = par_map(n, SETUP_THREADS, |_| {
        Wire::connect(addr, None).map_err(setup_err("connect"))
    })?;
    let mut net = Net::new()?;
    for wire in wires {
        net.add_wire(wire)?;
    }
    let probe = Probe::start(addr, &format!("{}probe", pre), Duration::from_millis(1))?;
    let rest = ctx.seconds(2.0, 0.5).min(Duration::from_secs(5));
    thread::sleep(rest);
    eprintln!("loadgen: login-storm: {n} logins at once");
    let storm_start = now_us();
    for (i, name) in names.iter().enumerate() {
        Request::Login {
            username: name.clone(),
            password: PASSWORD.into(),
            device: "storm".into(),
            last_seen: 0,
        }
        .encode(1, net.outs.buf(i));
    }
    let mut answered = vec![false; n];
    let (mut ok, mut replies, mut last) = (0u64, 0usize, storm_start);
    let mut errors: BTreeMap<u16, u64> = BTreeMap::new();
    let hard_end = Instant::now() + Duration::from_secs(600);
    while replies < n {
        if Instant::now() > hard_end {
            return Err(format!("only {replies} of {n} logins answered in time"));
        }
        net.turn(Duration::from_millis(50), |i, header, body, _| {
            let reply =
                header.request_id == 1 || (header.kind == kind::ERROR && header.request_id == 0);
            if !reply || answered[i] {
                return;
            }
            answered[i] = true;
            replies += 1;
            last = now_us();
            match header.kind {
                kind::LOGIN_OK => ok += 1,
                kind::ERROR => *errors.entry(parse_error(body).0).or_default() += 1,
                _ => *errors.entry(0).or_default() += 1,
            }
        })?;
        let closed = net.take_closed();
        for (i, why) in closed {
            if !answered[i] {
                answered[i] = true;
                replies += 1;
                *errors.entry(0).or_default() += 1;
                eprintln!("loadgen: login-storm: connection {i} lost: {why}");
            }
        }
    }
    let storm_end = last;
    thread::sleep(Duration::from_millis(100));
    let samples = probe.finish()?;
    let mut at_rest = in_window(
        &samples,
        storm_start.saturating_sub(rest.as_micros() as u64),
        storm_start,
    );
    let mut during = in_window(&samples, storm_start, storm_end + 1);
    let rest_p = Percentiles::of(&mut at_rest);
    let storm_p = Percentiles::of(&mut during);
    report.int("logins", "logins", n as u64);
    report.text(
        "argon2",
        "argon2id",
        format!("m={memory} KiB, t={iterations}, p=1"),
    );
    report.num("register_s", "registration time (s)", register_s, 2);
    report.num(
        "storm_s",
        "storm duration (s)",
        (storm_end - storm_start) as f64 / 1e6,
        3,
    );
    report.num(
        "logins_per_sec",
        "logins/s",
        per_sec(n as u64, storm_end - storm_start),
        1,
    );
    report.int("succeeded", "logins succeeded", ok);
    report.latency("ping_rest", "probe ping at rest", &mut at_rest, false);
    report.latency("ping_storm", "probe ping during storm", &mut during, false);
    report.num(
        "ping_p99_ratio",
        "probe p99 storm/rest",
        storm_p.p99 as f64 / rest_p.p99.max(1) as f64,
        2,
    );
    let all_ok = ok == n as u64;
    report.flag("all_succeeded", "all logins succeeded", all_ok);
    if !all_ok {
        report.fail(format!(
            "{} of {n} logins failed: {}",
            n as u64 - ok,
            errors_text(&errors)
        ));
    }
    target.finish(ctx, &mut report);
    Ok(report)
}

// ---------------------------------------------------------------------------------------------------------------
// backlog: one user catches up on N stored messages while others chat
// ---------------------------------------------------------------------------------------------------------------

fn scenario_backlog(ctx: &Ctx) -> Result<Report, String> {
    let pre = ctx.new_prefix();
    let mut report = Report::new("backlog");
    let backlog = ctx.size(ctx.opts.backlog, 50_000, 500).max(1);
    let pairs = ctx.size(ctx.opts.pairs, 10, 2).max(1);
    let rate = ctx.size(ctx.opts.rate, 200.0, 100.0).max(1.0);
    let size = ctx.size(ctx.opts.size, 64, 64).max(1);
    let window = ctx.size(ctx.opts.window, 64, 16).max(1);
    let fillers = 4usize.min(backlog);
    let mut target = start_target(ctx, &[], Hashing::Cheap)?;
    let addr = target.addr();
    let sink = format!("{}sink", pre);
    // Connections: fillers [0, F), chatting pairs [F, F + 2P) (A at even offsets, B at odd), the sink last.
    let mut names: Vec<String> = (0..fillers).map(|k| format!("{}f{k}", pre)).collect();
    for p in 0..pairs {
        names.push(format!("{}a{p}", pre));
        names.push(format!("{}b{p}", pre));
    }
    eprintln!("loadgen: backlog: setting up {fillers} fillers, {pairs} chatting pairs, the sink");
    let wires = par_map(names.len(), SETUP_THREADS, |i| user_wire(addr, &names[i]))?;
    let sink_wire = registered_wire(addr, None, &sink)?;
    let mut net = Net::new()?;
    for wire in wires {
        net.add_wire(wire)?;
    }
    let sink_conn = net.add_wire(sink_wire)?;
    let mut ctl = user_wire(addr, &format!("{}ctl", pre))?;

    // 1. Fill: the fillers send the backlog to the offline sink, pipelined.
    let quota: Vec<u64> = (0..fillers)
        .map(|k| (backlog / fillers + usize::from(k < backlog % fillers)) as u64)
        .collect();
    let mut sent = vec![0u64; fillers];
    let mut outstanding = vec![0usize; fillers];
    let mut acked = 0u64;
    let mut fill_errors: BTreeMap<u16, u64> = BTreeMap::new();
    eprintln!("loadgen: backlog: storing {backlog} messages for the offline user");
    let fill_start = now_us();
    let hard_end = Instant::now() + Duration::from_secs(600);
    while acked + fill_errors.values().sum::<u64>() < backlog as u64 {
        if Instant::now() > hard_end {
            return Err("the backlog was not stored in time".into());
        }
        for k in 0..fillers {
            while sent[k] < quota[k] && outstanding[k] < window {
                let seq = sent[k];
                put_tagged_send(
                    net.outs.buf(k),
                    kind::SEND,
                    (seq + 1) as u32,
                    &sink,
                    seq + 1,
                    [k as u64, seq, 0],
                    size,
                );
                sent[k] += 1;
                outstanding[k] += 1;
            }
        }
        net.turn(Duration::from_millis(20), |i, header, body, _| {
            if i >= fillers || header.request_id == 0 {
                return;
            }
            match header.kind {
                kind::ACK => {
                    acked += 1;
                    outstanding[i] = outstanding[i].saturating_sub(1);
                }
                kind::ERROR => {
                    *fill_errors.entry(parse_error(body).0).or_default() += 1;
                    outstanding[i] = outstanding[i].saturating_sub(1);
                }
                _ => {}
            }
        })?;
        net.check_closed(|i| names.get(i).cloned().unwrap_or(sink.clone()))?;
    }
    let fill_us = now_us() - fill_start;
    if !fill_errors.is_empty() {
        return Err(format!("storing the backlog failed: {fill_errors:?}"));
    }

    // 2. Chat, probe, then log the sink in and read until CaughtUp.
    let probe = Probe::start(addr, &format!("{}probe", pre), Duration::from_millis(1))?;
    let interval_us = pairs as f64 * 1e6 / rate;
    let chat_start = now_us();
    let mut next_due: Vec<f64> = (0..pairs)
        .map(|p| chat_start as f64 + interval_us * p as f64 / pairs as f64)
        .collect();
    let mut chat_seq = vec![0u64; pairs];
    let mut echo_seq = vec![0u64; pairs];
    let mut rtts: Vec<(u64, u32)> = Vec::new();
    let mut chat_errors: BTreeMap<u16, u64> = BTreeMap::new();
    let before = ctx.seconds(2.0, 0.5).min(Duration::from_secs(5));
    let login_at = chat_start + before.as_micros() as u64;
    let mut login_sent: Option<u64> = None;
    let mut login_ok: Option<u64> = None;
    let mut caught_up: Option<u64> = None;
    let mut sink_error: Option<(u16, String)> = None;
    // The sink's checks: per filler the next expected sequence number, ids strictly increasing.
    let mut expect = vec![0u64; fillers];
    let (mut received, mut dups, mut out_of_order, mut foreign, mut last_id) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let hard_end = Instant::now() + before + Duration::from_secs(600);
    while caught_up.is_none() {
        let now = now_us();
        if Instant::now() > hard_end {
            return Err(format!(
                "the backlog did not drain in time ({received} of {backlog} received)"
            ));
        }
        if login_sent.is_none() && now >= login_at {
            eprintln!("loadgen: backlog: the offline user logs in");
            Request::Login {
                username: sink.clone(),
                password: PASSWORD.into(),
                device: "backlog".into(),
                last_seen: 0,
            }
            .encode(1, net.outs.buf(sink_conn));
            login_sent = Some(now);
        }
        for p in 0..pairs {
            while next_due[p] <= now as f64 {
                let due = next_due[p] as u64;
                next_due[p] += interval_us;
                chat_seq[p] += 1;
                put_tagged_send(
                    net.outs.buf(fillers + 2 * p),
                    kind::SEND,
                    chat_seq[p] as u32,
                    &names[fillers + 2 * p + 1],
                    chat_seq[p],
                    [p as u64, chat_seq[p], due],
                    size,
                );
            }
        }
        let next = next_due.iter().copied().fold(f64::MAX, f64::min);
        let wait = Duration::from_micros((next - now as f64).clamp(0.0, 5_000.0) as u64);
        net.turn(wait, |i, header, body, outs| {
            let now = now_us();
            if header.kind == kind::ERROR && (i != sink_conn || header.request_id == 0) {
                *chat_errors.entry(parse_error(body).0).or_default() += 1;
                return;
            }
            if i == sink_conn {
                match header.kind {
                    kind::LOGIN_OK => login_ok = Some(now),
                    kind::ERROR => sink_error = Some(parse_error(body)),
                    kind::CAUGHT_UP if login_ok.is_some() => caught_up = Some(now),
                    kind::DELIVER => {
                        received += 1;
                        let Some((id, text)) = parse_deliver(body) else {
                            foreign += 1;
                            return;
                        };
                        if id <= last_id {
                            out_of_order += 1;
                        }
                        last_id = id;
                        match parse_tag(text) {
                            Some([k, seq, _]) if (k as usize) < fillers => {
                                let k = k as usize;
                                if seq < expect[k] {
                                    dups += 1;
                                } else if seq > expect[k] {
                                    out_of_order += 1;
                                    expect[k] = seq + 1;
                                } else {
                                    expect[k] += 1;
                                }
                            }
                            _ => foreign += 1,
                        }
                    }
                    _ => {}
                }
                return;
            }
            if i < fillers || header.kind != kind::DELIVER {
                return;
            }
            let p = (i - fillers) / 2;
            let Some((_, text)) = parse_deliver(body) else {
                return;
            };
            if (i - fillers) % 2 == 1 {
                // B echoes A's message back, text and all.
                echo_seq[p] += 1;
                put_send(
                    outs.buf(i),
                    echo_seq[p] as u32,
                    &names[i - 1],
                    echo_seq[p],
                    text,
                );
            } else if let Some([_, _, stamp]) = parse_tag(text) {
                rtts.push((stamp, now.saturating_sub(stamp) as u32));
            }
        })?;
        if let Some((code, text)) = sink_error.take() {
            return Err(format!(
                "the offline user's login failed: error {code}: {text}"
            ));
        }
        net.check_closed(|i| names.get(i).cloned().unwrap_or(sink.clone()))?;
    }
    let samples = probe.finish()?;
    let (login_sent, caught_up) = (login_sent.unwrap_or(0), caught_up.unwrap_or(0));
    let drain_us = caught_up - login_sent;
    let mut chat_before = in_window(&rtts, chat_start, login_sent);
    let mut chat_during = in_window(&rtts, login_sent, caught_up + 1);
    let mut ping_before = in_window(&samples, chat_start, login_sent);
    let mut ping_during = in_window(&samples, login_sent, caught_up + 1);
    report.int("backlog", "backlog (messages)", backlog as u64);
    report.int("size", "text size (bytes)", size as u64);
    report.num(
        "fill_per_sec",
        "backlog stored, msgs/s (recipient offline)",
        per_sec(backlog as u64, fill_us),
        0,
    );
    report.num(
        "drain_s",
        "backlog drain time (s)",
        drain_us as f64 / 1e6,
        3,
    );
    report.num(
        "drain_per_sec",
        "backlog drain msgs/s",
        per_sec(received, drain_us),
        0,
    );
    report.int("received", "backlog messages received", received);
    report.int("pairs", "chatting pairs", pairs as u64);
    report.num("chat_rate", "chat msgs/s offered (plus echoes)", rate, 0);
    report.latency(
        "rtt_before",
        "pair round trip before",
        &mut chat_before,
        false,
    );
    report.latency(
        "rtt_during",
        "pair round trip during drain",
        &mut chat_during,
        false,
    );
    report.latency("ping_before", "probe ping before", &mut ping_before, false);
    report.latency(
        "ping_during",
        "probe ping during drain",
        &mut ping_during,
        false,
    );
    let complete = received == backlog as u64
        && dups == 0
        && out_of_order == 0
        && foreign == 0
        && expect.iter().zip(&quota).all(|(e, q)| e == q);
    report.flag(
        "in_order",
        "backlog complete, in order, none twice",
        complete,
    );
    if !complete {
        report.fail(format!(
            "backlog: {received} of {backlog} received, {dups} twice, {out_of_order} out of order, {foreign} unexpected"
        ));
    }
    if !chat_errors.is_empty() {
        report.fail(format!("errors while chatting: {chat_errors:?}"));
    }
    server_stats(&mut report, &mut ctl);
    target.finish(ctx, &mut report);
    Ok(report)
}

// ---------------------------------------------------------------------------------------------------------------
// room-fanout: one room, M online members, a few senders
// ---------------------------------------------------------------------------------------------------------------

/// True if an error says the server has no rooms.
fn rooms_unsupported(e: &WireError) -> bool {
    match e {
        WireError::Server(c, text) => {
            *c == code::UNKNOWN_KIND || (*c == code::MALFORMED && text.contains("not implemented"))
        }
        WireError::Other(_) => false,
    }
}

fn scenario_room(ctx: &Ctx) -> Result<Report, String> {
    let pre = ctx.new_prefix();
    let mut report = Report::new("room-fanout");
    let members = ctx.size(ctx.opts.members, 1000, 20).max(1);
    let senders = ctx.size(ctx.opts.senders, 1, 1).max(1);
    let messages = ctx
        .size(ctx.opts.messages.map(|m| m as usize), 200, 20)
        .max(1);
    let window = ctx.size(ctx.opts.window, 16, 8).max(1);
    let size = ctx.size(ctx.opts.size, 64, 64).max(1);
    let cap = (members + senders + 256).to_string();
    let mut target = start_target(
        ctx,
        &[
            ("--max-room-members", (members + senders + 8).to_string()),
            ("--max-connections", cap.clone()),
            ("--max-per-ip", cap),
            ("--hash-queue", "4096".into()),
        ],
        Hashing::Cheap,
    )?;
    let addr = target.addr();
    let room = format!("{}room", pre);
    let host = format!("{}h0", pre);
    let mut host_wire = user_wire(addr, &host)?;
    match host_wire.call(&Request::CreateRoom {
        name: room.clone(),
        topic: "loadgen".into(),
    }) {
        Ok(_) => {}
        Err(e) if rooms_unsupported(&e) => {
            report.text("rooms", "rooms", "not supported by this server");
            report.text("detail", "server said", e.to_string());
            target.finish(ctx, &mut report);
            return Ok(report);
        }
        Err(e) => return Err(format!("CreateRoom: {e}")),
    }
    eprintln!("loadgen: room-fanout: {members} members join {room}");
    let join = |name: &str| -> Result<Wire, String> {
        let mut wire = user_wire(addr, name)?;
        wire.call(&Request::JoinRoom { name: room.clone() })
            .map_err(|e| format!("{name} joins: {e}"))?;
        Ok(wire)
    };
    let mut extra_senders = par_map(senders - 1, SETUP_THREADS, |s| {
        join(&format!("{}h{}", pre, s + 1))
    })?;
    let member_wires = par_map(members, SETUP_THREADS, |m| join(&format!("{}m{m}", pre)))?;
    let mut ctl = user_wire(addr, &format!("{}ctl", pre))?;
    // Connections: senders [0, S), members [S, S + M).
    let mut net = Net::new()?;
    net.add_wire(host_wire)?;
    for wire in extra_senders.drain(..) {
        net.add_wire(wire)?;
    }
    for wire in member_wires {
        net.add_wire(wire)?;
    }
    // Barrier: a Ping on every connection, so the join announcements are read before timing starts.
    const BARRIER: u32 = u32::MAX - 1;
    for i in 0..net.len() {
        Request::Ping.encode(BARRIER, net.outs.buf(i));
    }
    let mut pongs = 0;
    let barrier_end = Instant::now() + Duration::from_secs(120);
    while pongs < net.len() {
        if Instant::now() > barrier_end {
            return Err("room members did not answer Ping in time".into());
        }
        net.turn(Duration::from_millis(20), |_, header, _, _| {
            if header.kind == kind::PONG && header.request_id == BARRIER {
                pongs += 1;
            }
        })?;
        net.check_closed(|i| format!("connection {i}"))?;
    }
    let share: Vec<usize> = (0..senders)
        .map(|s| messages / senders + usize::from(s < messages % senders))
        .collect();
    let offset: Vec<usize> = share
        .iter()
        .scan(0, |acc, n| {
            let at = *acc;
            *acc += n;
            Some(at)
        })
        .collect();
    let track_each = (members as u64) * (messages as u64) <= 256 << 20;
    let mut got: Vec<u8> = if track_each {
        vec![0; members * messages]
    } else {
        Vec::new()
    };
    let mut sent_at = vec![0u64; messages];
    let mut receipts = vec![0u32; messages];
    let mut first_at = vec![0u64; messages];
    let mut last_at = vec![0u64; messages];
    let mut sent = vec![0usize; senders];
    let mut outstanding = vec![0usize; senders];
    let mut acked = 0usize;
    let mut errors: BTreeMap<u16, u64> = BTreeMap::new();
    let (mut deliveries, mut dups, mut foreign) = (0u64, 0u64, 0u64);
    let mut ack_us: Vec<u32> = Vec::with_capacity(messages);
    eprintln!("loadgen: room-fanout: {senders} sender(s) post {messages} messages");
    let start = now_us();
    let expected = members as u64 * messages as u64;
    let mut drain_deadline = u64::MAX;
    let hard_end = Instant::now() + Duration::from_secs(600);
    loop {
        let now = now_us();
        let all_sent = sent.iter().zip(&share).all(|(s, n)| s >= n);
        if all_sent && outstanding.iter().all(|o| *o == 0) {
            if deliveries >= expected + dups || now >= drain_deadline {
                break;
            }
            drain_deadline = drain_deadline.min(now + 30_000_000);
        }
        if Instant::now() > hard_end {
            return Err("room fan-out did not finish in time".into());
        }
        for s in 0..senders {
            while sent[s] < share[s] && outstanding[s] < window {
                let g = offset[s] + sent[s];
                sent_at[g] = now_us();
                put_tagged_send(
                    net.outs.buf(s),
                    kind::SEND_ROOM,
                    (sent[s] + 1) as u32,
                    &room,
                    (sent[s] + 1) as u64,
                    [s as u64, sent[s] as u64, sent_at[g]],
                    size,
                );
                sent[s] += 1;
                outstanding[s] += 1;
            }
        }
        net.turn(Duration::from_millis(20), |i, header, body, _| {
            let now = now_us();
            if i < senders {
                match header.kind {
                    kind::ACK if header.request_id != 0 => {
                        let g = offset[i] + header.request_id as usize - 1;
                        outstanding[i] = outstanding[i].saturating_sub(1);
                        acked += 1;
                        if let Some(t) = sent_at.get(g) {
                            ack_us.push(now.saturating_sub(*t) as u32);
                        }
                    }
                    kind::ERROR => {
                        *errors.entry(parse_error(body).0).or_default() += 1;
                        if header.request_id != 0 {
                            outstanding[i] = outstanding[i].saturating_sub(1);
                        }
                    }
                    _ => {}
                }
                return;
            }
            match header.kind {
                kind::ROOM_DELIVER => {
                    deliveries += 1;
                    let m = i - senders;
                    let tag = parse_deliver(body).and_then(|(_, text)| parse_tag(text));
                    let Some([s, seq, _]) = tag.filter(|[s, seq, _]| {
                        (*s as usize) < senders && (*seq as usize) < share[*s as usize]
                    }) else {
                        foreign += 1;
                        return;
                    };
                    let g = offset[s as usize] + seq as usize;
                    if track_each {
                        let cell = &mut got[m * messages + g];
                        *cell = cell.saturating_add(1);
                        if *cell > 1 {
                            dups += 1;
                            return;
                        }
                    }
                    receipts[g] += 1;
                    if first_at[g] == 0 {
                        first_at[g] = now;
                    }
                    last_at[g] = now;
                }
                kind::ERROR => *errors.entry(parse_error(body).0).or_default() += 1,
                _ => {}
            }
        })?;
        net.check_closed(|i| {
            if i < senders {
                format!("sender {i}")
            } else {
                format!("member {}", i - senders)
            }
        })?;
    }
    let end = last_at.iter().copied().max().unwrap_or(start);
    let mut to_last: Vec<u32> = (0..messages)
        .filter(|g| receipts[*g] > 0)
        .map(|g| last_at[g].saturating_sub(sent_at[g]) as u32)
        .collect();
    let mut to_first: Vec<u32> = (0..messages)
        .filter(|g| receipts[*g] > 0)
        .map(|g| first_at[g].saturating_sub(sent_at[g]) as u32)
        .collect();
    let complete = receipts.iter().all(|r| *r as usize == members);
    report.text("rooms", "rooms", "supported");
    report.int("members", "online members", members as u64);
    report.int("senders", "senders", senders as u64);
    report.int("messages", "messages posted", messages as u64);
    report.int("window", "window per sender", window as u64);
    report.int("size", "text size (bytes)", size as u64);
    report.int("acked", "messages acked", acked as u64);
    report.int("deliveries", "deliveries", deliveries);
    report.num(
        "deliveries_per_sec",
        "deliveries/s",
        per_sec(deliveries, end.saturating_sub(start)),
        0,
    );
    report.latency("ack", "send->ack", &mut ack_us, false);
    report.latency("first_member", "send->first member", &mut to_first, false);
    report.latency("last_member", "send->last member", &mut to_last, false);
    report.flag(
        "exactly_once",
        "exactly once (every member got every message once)",
        complete && dups == 0 && foreign == 0,
    );
    if !complete || dups > 0 || foreign > 0 {
        let short = receipts.iter().filter(|r| (**r as usize) < members).count();
        report.fail(format!(
            "room delivery: {short} messages missed some member, {dups} duplicates, {foreign} unexpected"
        ));
    }
    if !errors.is_empty() {
        report.fail(format!("errors: {errors:?}"));
    }
    server_stats(&mut report, &mut ctl);
    target.finish(ctx, &mut report);
    Ok(report)
}

// ---------------------------------------------------------------------------------------------------------------
// all: the ceilings and the server side by side
// ---------------------------------------------------------------------------------------------------------------

fn scenario_all(ctx: &Ctx) -> Vec<Report> {
    type Run = fn(&Ctx) -> Result<Report, String>;
    let runs: [(&str, Run); 5] = [
        ("store-ceiling", scenario_store),
        ("relay-ceiling", scenario_relay),
        ("dm-throughput", |c| scenario_dm(c, false)),
        ("dm-latency", |c| scenario_dm(c, true)),
        ("room-fanout", scenario_room),
    ];
    let mut reports = Vec::new();
    for (name, run) in runs {
        eprintln!("loadgen: all: {name}");
        reports.push(run(ctx).unwrap_or_else(|e| {
            let mut r = Report::new(name);
            r.fail(e);
            r
        }));
    }
    let find = |name: &str| reports.iter().find(|r| r.scenario == name);
    let value = |name: &str, key: &str| find(name).and_then(|r| r.f64(key));
    let mut summary = Report::new("summary");
    let dm = value("dm-throughput", "acked_per_sec");
    let store = value("store-ceiling", "best_rows_per_sec");
    let relay = value("relay-ceiling", "acked_per_sec");
    let room = value("room-fanout", "deliveries_per_sec");
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => a / b,
        _ => f64::NAN,
    };
    summary.num(
        "store_ceiling_rows_per_sec",
        "store-ceiling, best batch (rows/s)",
        store.unwrap_or(f64::NAN),
        0,
    );
    if let Some(b) = value("store-ceiling", "best_batch") {
        summary.int("store_ceiling_batch", "  best batch size", b as u64);
    }
    summary.num(
        "relay_ceiling_per_sec",
        "relay-ceiling (msgs/s)",
        relay.unwrap_or(f64::NAN),
        0,
    );
    summary.num(
        "dm_throughput_per_sec",
        "dm-throughput (acked msgs/s)",
        dm.unwrap_or(f64::NAN),
        0,
    );
    summary.num(
        "dm_over_store",
        "dm-throughput / store-ceiling",
        ratio(dm, store),
        3,
    );
    summary.num(
        "dm_over_relay",
        "dm-throughput / relay-ceiling",
        ratio(dm, relay),
        3,
    );
    if let Some(rate) = value("dm-latency", "offered_per_sec") {
        summary.num(
            "dm_latency_rate",
            "dm-latency offered rate (msgs/s)",
            rate,
            0,
        );
    }
    for (key, label) in [
        ("deliver_p50_us", "dm-latency send->deliver p50 (us)"),
        ("deliver_p99_us", "dm-latency send->deliver p99 (us)"),
        ("deliver_p999_us", "dm-latency send->deliver p99.9 (us)"),
        (
            "relay_deliver_p50_us",
            "relay at dm-latency rate send->deliver p50 (us)",
        ),
        (
            "relay_deliver_p99_us",
            "relay at dm-latency rate send->deliver p99 (us)",
        ),
        (
            "relay_deliver_p999_us",
            "relay at dm-latency rate send->deliver p99.9 (us)",
        ),
        (
            "deliver_p50_over_relay",
            "dm-latency send->deliver p50 server/relay",
        ),
        (
            "deliver_p99_over_relay",
            "dm-latency send->deliver p99 server/relay",
        ),
    ] {
        match find("dm-latency").and_then(|r| r.get(key)) {
            Some(Val::Int(v)) => summary.int(&format!("dm_latency_{key}"), label, *v as u64),
            Some(Val::Num(v, d)) => summary.num(&format!("dm_latency_{key}"), label, *v, *d),
            _ => {}
        }
    }
    match room {
        Some(room) => {
            summary.num(
                "room_deliveries_per_sec",
                "room-fanout (deliveries/s)",
                room,
                0,
            );
            summary.num(
                "room_over_relay",
                "room-fanout / relay-ceiling",
                ratio(Some(room), relay),
                3,
            );
        }
        None => {
            let unsupported = find("room-fanout")
                .and_then(|r| r.get("rooms"))
                .is_some_and(|v| matches!(v, Val::Text(t) if t.starts_with("not supported")));
            summary.text(
                "room_deliveries_per_sec",
                "room-fanout (deliveries/s)",
                if unsupported {
                    "not supported by this server"
                } else {
                    "n/a (room-fanout failed)"
                },
            )
        }
    }
    reports.push(summary);
    reports
}

// ---------------------------------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let opts = Opts::parse();
    now_us();
    let nofile = raise_nofile();
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let (pin, pin_note) = if opts.server.is_some() {
        (false, "off (external server)".to_string())
    } else if opts.no_pin {
        (false, "off (--no-pin)".to_string())
    } else if cpus < 2 {
        (false, "off (one core)".to_string())
    } else if which("taskset").is_none() {
        (false, "off (no taskset)".to_string())
    } else if pin_current_thread(1) {
        (true, "server on core 0, loadgen on core 1".to_string())
    } else {
        (false, "off (sched_setaffinity failed)".to_string())
    };
    let prefix = {
        let mut x = (wall_ms() ^ (u64::from(std::process::id()) << 20)) % 36u64.pow(5);
        let mut s = String::new();
        for _ in 0..5 {
            s.push(char::from_digit((x % 36) as u32, 36).unwrap_or('x'));
            x /= 36;
        }
        s
    };
    let ctx = Ctx {
        opts,
        pin,
        pin_note,
        nofile,
        prefix,
        scenarios_run: AtomicUsize::new(0),
    };
    let run = |f: fn(&Ctx) -> Result<Report, String>| f(&ctx).map(|r| vec![r]);
    let result = match ctx.opts.scenario {
        Scenario::DmThroughput => run(|c| scenario_dm(c, false)),
        Scenario::DmLatency => run(|c| scenario_dm(c, true)),
        Scenario::Idle => run(scenario_idle),
        Scenario::LoginStorm => run(scenario_login_storm),
        Scenario::Backlog => run(scenario_backlog),
        Scenario::RoomFanout => run(scenario_room),
        Scenario::StoreCeiling => run(scenario_store),
        Scenario::RelayCeiling => run(scenario_relay),
        Scenario::All => Ok(scenario_all(&ctx)),
    };
    let reports = match result {
        Ok(reports) => reports,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let ok = reports.iter().all(Report::ok);
    if ctx.opts.json {
        if ctx.opts.scenario == Scenario::All {
            println!(
                "{{\"scenario\":\"all\",\"ok\":{ok},\"results\":[{}]}}",
                reports
                    .iter()
                    .map(Report::json)
                    .collect::<Vec<_>>()
                    .join(",")
            );
        } else {
            println!("{}", reports[0].json());
        }
    } else {
        for r in &reports {
            println!("{}", r.table());
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
