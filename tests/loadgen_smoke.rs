//! Smoke tests of the load generator (`examples/loadgen.rs`): every scenario at `--smoke` size, against the
//! real server binary. They check that each scenario runs to the end, passes its own checks and prints its
//! table (or JSON); they assert no speed.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Far more than a smoke run needs, even on a slow, busy machine; a run that takes this long has hung.
const LIMIT: Duration = Duration::from_secs(180);

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hubbub"))
}

fn loadgen_bin() -> PathBuf {
    let dir = server_bin()
        .parent()
        .expect("the binary is in a directory")
        .to_path_buf();
    dir.join("examples")
        .join(format!("loadgen{}", std::env::consts::EXE_SUFFIX))
}

/// Runs `loadgen SCENARIO --smoke --server-bin <hubbub> [extra]`, asserts it exits 0, and returns its stdout.
fn run(scenario: &str, extra: &[&str]) -> String {
    let bin = loadgen_bin();
    assert!(
        bin.is_file(),
        "{} is missing: `cargo test` builds the examples (with `--test loadgen_smoke` alone, run \
         `cargo build --examples` first)",
        bin.display()
    );
    let mut child = Command::new(&bin)
        .arg(scenario)
        .arg("--smoke")
        .arg("--server-bin")
        .arg(server_bin())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start loadgen");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for loadgen") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "loadgen {scenario} --smoke did not finish within {LIMIT:?}; stderr:\n{}",
                err.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.success(),
        "loadgen {scenario} --smoke exited with {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    out
}

/// The value printed after `label` on its table row.
fn row<'a>(table: &'a str, label: &str) -> &'a str {
    table
        .lines()
        .map(str::trim_start)
        .find_map(|line| {
            line.strip_prefix(label)
                .filter(|rest| rest.starts_with("  "))
        })
        .map(str::trim)
        .unwrap_or_else(|| panic!("no row `{label}` in:\n{table}"))
}

fn assert_number(table: &str, label: &str) {
    let value = row(table, label);
    assert!(
        value.parse::<f64>().is_ok(),
        "row `{label}` is `{value}`, not a number, in:\n{table}"
    );
}

#[test]
fn dm_throughput() {
    let out = run("dm-throughput", &[]);
    assert!(out.contains("== dm-throughput =="), "{out}");
    assert_number(&out, "acked msgs/s");
    assert_number(&out, "delivered msgs/s");
    assert_number(&out, "send->deliver p99 (us)");
    assert_eq!(
        row(&out, "exactly once (every acked message delivered once)"),
        "yes"
    );
    assert_eq!(row(&out, "result"), "ok");
}

#[test]
fn dm_latency() {
    let out = run("dm-latency", &[]);
    assert_number(&out, "offered msgs/s");
    assert_number(&out, "send->deliver p50 (us)");
    assert_number(&out, "send->deliver p99.9 (us)");
    assert_number(&out, "send->ack max (us)");
    assert_number(&out, "relay send->ack p50 (us)");
    assert_number(&out, "relay send->deliver p50 (us)");
    assert_number(&out, "relay send->deliver p99.9 (us)");
    assert_number(&out, "relay send->deliver max (us)");
    assert_number(&out, "send->deliver p99 server/relay");
    // Where the server's one core went: the figures the latency target is argued from (README, Benchmarks).
    assert_number(&out, "server CPU per acked msg: loop (us)");
    assert_number(&out, "server CPU per acked msg: store (us)");
    assert_number(&out, "server CPU (% of one core)");
    assert_eq!(row(&out, "result"), "ok");
}

#[test]
fn dm_latency_no_relay() {
    let out = run("dm-latency", &["--no-relay"]);
    assert_number(&out, "send->deliver p99 (us)");
    assert!(!out.contains("relay send->deliver"), "{out}");
    assert_eq!(row(&out, "result"), "ok");
}

#[test]
fn idle() {
    let out = run("idle", &[]);
    assert_eq!(row(&out, "connections (logged in)"), "50");
    assert_number(&out, "server RSS per connection (bytes)");
    assert_eq!(row(&out, "all connections alive"), "yes");
    assert_eq!(row(&out, "result"), "ok");
}

#[test]
fn login_storm() {
    let out = run("login-storm", &[]);
    assert_eq!(row(&out, "logins succeeded"), "20");
    assert_eq!(row(&out, "all logins succeeded"), "yes");
    assert_number(&out, "probe ping at rest p99 (us)");
    assert_number(&out, "probe ping during storm p99 (us)");
    assert_number(&out, "probe p99 storm/rest");
    assert_eq!(row(&out, "result"), "ok");
}

#[test]
fn backlog() {
    let out = run("backlog", &[]);
    assert_eq!(row(&out, "backlog messages received"), "500");
    assert_number(&out, "backlog drain msgs/s");
    assert_number(&out, "pair round trip before p99 (us)");
    assert_eq!(row(&out, "backlog complete, in order, none twice"), "yes");
    assert_eq!(row(&out, "result"), "ok");
}

#[test]
fn room_fanout() {
    let out = run("room-fanout", &[]);
    if row(&out, "rooms") == "not supported by this server" {
        return;
    }
    assert_eq!(row(&out, "deliveries"), "400");
    assert_number(&out, "deliveries/s");
    assert_number(&out, "send->last member p99 (us)");
    assert_eq!(
        row(&out, "exactly once (every member got every message once)"),
        "yes"
    );
    assert_eq!(row(&out, "result"), "ok");
}

#[test]
fn store_ceiling() {
    let out = run("store-ceiling", &["--batch", "1,16"]);
    assert_number(&out, "batch 1: rows/s");
    assert_number(&out, "batch 16: rows/s");
    assert_number(&out, "batch 16, server-like jobs: rows/s");
    assert_number(&out, "hubbub store thread (group commit <= 1024): msgs/s");
    assert_number(&out, "best batch size");
    assert_eq!(row(&out, "result"), "ok");
}

#[test]
fn relay_ceiling() {
    let out = run("relay-ceiling", &[]);
    assert_number(&out, "acked msgs/s");
    assert_eq!(row(&out, "frames relayed by the relay"), "400");
    assert_eq!(
        row(&out, "exactly once (every acked message delivered once)"),
        "yes"
    );
    assert_eq!(row(&out, "result"), "ok");
}

#[test]
fn json_output() {
    let out = run("dm-throughput", &["--json"]);
    let out = out.trim();
    assert!(out.starts_with('{') && out.ends_with('}'), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("\"scenario\":\"dm-throughput\""), "{out}");
    assert!(out.contains("\"ok\":true"), "{out}");
    assert!(out.contains("\"acked_per_sec\":"), "{out}");
}

#[test]
fn all_in_one() {
    let out = run("all", &["--json", "--batch", "1,16"]);
    let out = out.trim();
    assert!(out.starts_with('{') && out.ends_with('}'), "{out}");
    assert!(
        out.starts_with("{\"scenario\":\"all\",\"ok\":true,"),
        "{out}"
    );
    for part in [
        "store-ceiling",
        "relay-ceiling",
        "dm-throughput",
        "dm-latency",
        "room-fanout",
        "summary",
    ] {
        assert!(
            out.contains(&format!("\"scenario\":\"{part}\"")),
            "{part} missing: {out}"
        );
    }
    assert!(out.contains("\"dm_over_store\":"), "{out}");
    assert!(
        out.contains("\"dm_latency_relay_deliver_p99_us\":"),
        "{out}"
    );
}
