//! The command-line client (`examples/client.rs`) against the real server, driven through pipes.
//!
//! Each test starts a server in-process on 127.0.0.1:0 and runs the example binary with piped stdin/stdout,
//! `HUBBUB_PASSWORD` in its environment and `--state` in a temporary directory. Every wait is bounded, and the
//! child is killed when its guard drops (also when a test fails).

mod common;

use common::{TestServer, PASSWORD};
use hubbub::client::Client;
use hubbub::protocol::Packet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Longest any single wait may take.
const WAIT: Duration = Duration::from_secs(10);

/// The example binary, next to the package's binaries. `cargo test` builds examples, but a run of this target
/// alone (`cargo test --test cli`) does not, and would find a missing or stale one: so it is (re)built here once,
/// which is a quick no-op when it is fresh. If cargo cannot run, an existing binary is used as it is.
fn client_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_BIN_EXE_hubbub")).parent().unwrap();
        let path = dir
            .join("examples")
            .join(format!("client{}", std::env::consts::EXE_SUFFIX));
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "--example", "client"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        match build.output() {
            Ok(out) if out.status.success() => {}
            Ok(out) if !path.exists() => panic!(
                "cargo build --example client failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) if !path.exists() => panic!("cannot run cargo to build the client: {e}"),
            _ => eprintln!("could not rebuild the client; using {}", path.display()),
        }
        assert!(path.exists(), "no client binary at {}", path.display());
        path
    })
    .clone()
}

/// A running CLI. Its stdout and stderr lines (the latter prefixed with "stderr: ") arrive on one channel.
struct Cli {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line read so far, for assertions and for failure messages.
    transcript: Vec<String>,
}

impl Cli {
    /// The CLI for `user`, with the test password in `HUBBUB_PASSWORD`.
    fn start(server: &TestServer, user: &str, state: &Path, extra: &[&str]) -> Cli {
        Cli::start_with(server, user, state, extra, Some(PASSWORD))
    }

    fn start_with(
        server: &TestServer,
        user: &str,
        state: &Path,
        extra: &[&str],
        password: Option<&str>,
    ) -> Cli {
        let mut command = Command::new(client_binary());
        command
            .args(["--user", user, "--server", &server.addr.to_string()])
            .arg("--state")
            .arg(state)
            .args(extra)
            .env_remove("HUBBUB_PASSWORD")
            .env_remove("HUBBUB_SERVER")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(password) = password {
            command.env("HUBBUB_PASSWORD", password);
        }
        let mut child = command.spawn().expect("start the client");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let tx_err = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx_err.send(format!("stderr: {line}")).is_err() {
                    break;
                }
            }
        });
        Cli {
            stdin: child.stdin.take(),
            child,
            lines,
            transcript: Vec::new(),
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").expect("write to the client");
        stdin.flush().unwrap();
    }

    /// Lines up to and including the first that contains `needle`.
    fn until(&mut self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.transcript.push(line.clone());
                    let found = line.contains(needle);
                    got.push(line);
                    if found {
                        return got;
                    }
                }
                Err(e) => panic!(
                    "no line containing {needle:?} ({e:?}); the client printed:\n{}",
                    self.transcript.join("\n")
                ),
            }
        }
    }

    /// The first line that contains `needle`.
    fn expect(&mut self, needle: &str) -> String {
        self.until(needle).pop().unwrap()
    }

    /// Waits (bounded) for the process to end, then collects what it printed last.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "the client did not exit within {WAIT:?}; it printed:\n{}",
                    self.transcript.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.transcript.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("the client's output did not end"),
            }
        }
        status
    }

    /// `/quit`, then the exit status.
    fn quit(&mut self) -> ExitStatus {
        self.send("/quit");
        self.wait_exit()
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next push matching `pick`, skipping others.
fn next_push_where<T>(client: &mut Client, mut pick: impl FnMut(Packet) -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let packet = client.next_push(left).expect("a push in time");
        if let Some(found) = pick(packet) {
            return found;
        }
    }
}

fn state_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("cli.state")
}

#[test]
fn registers_logs_in_sends_and_receives_direct_messages() {
    let server = common::start();
    let mut bob = server.user("bob");
    let dir = tempfile::tempdir().unwrap();
    let mut cli = Cli::start(&server, "alice", &state_in(&dir), &["--register"]);
    cli.expect("* registered alice");
    cli.expect("logged in as alice");
    cli.expect("caught up");

    cli.send("/msg bob hi");
    let m = bob.next_message(WAIT).unwrap();
    assert_eq!((m.sender.as_str(), m.text.as_str()), ("alice", "hi"));
    cli.expect("you → bob: hi");

    let (id, _) = bob.send_message("alice", 1, "hello alice").unwrap();
    cli.expect("bob → you: hello alice");
    // The CLI confirms what it printed, so bob hears that it was delivered.
    let up_to = next_push_where(&mut bob, |p| match p {
        Packet::DeliveryReceipt { peer, up_to } if peer == "alice" => Some(up_to),
        _ => None,
    });
    assert_eq!(up_to, id);

    // Plain text goes to the current conversation: the last /msg peer.
    cli.send("how are you?");
    let m = bob.next_message(WAIT).unwrap();
    assert_eq!(m.text, "how are you?");
    cli.expect("you → bob: how are you?");

    assert!(cli.quit().success(), "{}", cli.transcript.join("\n"));
    let state = std::fs::read_to_string(state_in(&dir)).unwrap();
    let token = state
        .lines()
        .find_map(|l| l.strip_prefix("token="))
        .unwrap();
    assert_eq!(token.len(), 32, "{state}");
    assert!(state.contains("user=alice"), "{state}");
    let last_seen: u64 = state
        .lines()
        .find_map(|l| l.strip_prefix("last_seen="))
        .unwrap()
        .parse()
        .unwrap();
    // At least bob's message; our own later one counts too once acknowledged while live.
    assert!(last_seen > id, "{state}");
}

#[test]
fn rooms_create_join_and_post() {
    let server = common::start();
    let mut carol = server.user("carol");
    let dir = tempfile::tempdir().unwrap();
    let mut cli = Cli::start(&server, "alice", &state_in(&dir), &["--register"]);
    cli.expect("caught up");

    cli.send("/create lounge a quiet place");
    let line = cli.expect("* created #lounge");
    assert!(line.contains("a quiet place"), "{line}");
    carol.join_room("lounge").unwrap();
    cli.expect("* carol joined #lounge");

    cli.send("/room lounge hello room");
    let m = next_push_where(&mut carol, |p| match p {
        Packet::RoomDeliver(m) => Some(m),
        _ => None,
    });
    assert_eq!(
        (m.room.as_str(), m.sender.as_str(), m.text.as_str()),
        ("lounge", "alice", "hello room")
    );
    cli.expect("[#lounge] you: hello room");

    carol.send_room("lounge", 1, "hi alice").unwrap();
    cli.expect("[#lounge] carol: hi alice");

    cli.send("/who lounge");
    let who = cli.expect("* #lounge:");
    assert!(
        who.contains("alice") && who.contains("carol (online)"),
        "{who}"
    );

    // Joining makes the room the current conversation for plain text.
    carol.create_room("den", "").unwrap();
    cli.send("/join #den");
    cli.expect("* joined #den");
    cli.send("in the den");
    let m = next_push_where(&mut carol, |p| match p {
        Packet::RoomDeliver(m) if m.room == "den" => Some(m),
        _ => None,
    });
    assert_eq!(
        (m.sender.as_str(), m.text.as_str()),
        ("alice", "in the den")
    );

    assert!(cli.quit().success());
}

#[test]
fn history_prints_earlier_messages_oldest_first() {
    let server = common::start();
    let mut alice = server.user("alice");
    let mut bob = server.user("bob");
    bob.send_message("alice", 1, "first").unwrap();
    bob.send_message("alice", 2, "second").unwrap();
    alice.send_message("bob", 1, "third").unwrap();
    drop(alice);

    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let file_arg = password_file.to_str().unwrap();
    // The password comes from --password-file here.
    let mut cli = Cli::start_with(
        &server,
        "alice",
        &state_in(&dir),
        &["--password-file", file_arg],
        None,
    );
    cli.expect("caught up");
    cli.send("/history bob");
    let lines = cli.until("--- end of history");
    let start = lines
        .iter()
        .position(|l| l.contains("--- history with bob: 3 message"))
        .unwrap_or_else(|| panic!("no history header in {lines:#?}"));
    let page = &lines[start + 1..lines.len() - 1];
    assert_eq!(page.len(), 3, "{page:#?}");
    assert!(page[0].ends_with("bob → you: first"), "{page:#?}");
    assert!(page[1].ends_with("bob → you: second"), "{page:#?}");
    assert!(page[2].ends_with("you → bob: third"), "{page:#?}");

    // A room's history is asked for as #ROOM.
    // (a member reads what was posted while they were in)
    bob.create_room("lounge", "").unwrap();
    cli.send("/join lounge");
    cli.expect("* joined #lounge");
    bob.send_room("lounge", 3, "room note").unwrap();
    cli.expect("[#lounge] bob: room note");
    cli.send("/history #lounge");
    let lines = cli.until("--- end of history");
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("[#lounge] bob: room note")),
        "{lines:#?}"
    );
    assert!(cli.quit().success());
}

#[test]
fn a_server_error_is_one_line_with_its_code() {
    let server = common::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cli = Cli::start(&server, "alice", &state_in(&dir), &["--register"]);
    cli.expect("caught up");
    cli.send("/msg nosuchuser hi");
    let line = cli.expect("error");
    assert!(line.starts_with("error 120: "), "{line}");
    assert!(line.contains("nosuchuser"), "{line}");
    assert!(cli.quit().success());
    let errors = cli
        .transcript
        .iter()
        .filter(|l| l.contains("error"))
        .count();
    assert_eq!(errors, 1, "{}", cli.transcript.join("\n"));
    // The message was refused, so nothing waits for an Ack at the end.
    assert!(
        !cli.transcript
            .iter()
            .any(|l| l.contains("no acknowledgement")),
        "{}",
        cli.transcript.join("\n")
    );
}

#[test]
fn a_restart_neither_repeats_nor_misses_messages() {
    let server = common::start();
    let mut bob = server.user("bob");
    let dir = tempfile::tempdir().unwrap();
    let state = state_in(&dir);

    let mut cli = Cli::start(&server, "alice", &state, &["--register"]);
    cli.expect("logged in as alice");
    cli.expect("caught up");
    for (n, text) in ["m1", "m2", "m3"].into_iter().enumerate() {
        bob.send_message("alice", n as u64 + 1, text).unwrap();
        cli.expect(&format!("bob → you: {text}"));
    }
    cli.send("/msg bob one");
    assert_eq!(bob.next_message(WAIT).unwrap().text, "one");
    cli.expect("you → bob: one");
    assert!(cli.quit().success(), "{}", cli.transcript.join("\n"));
    drop(cli);

    bob.send_message("alice", 4, "m4").unwrap();
    let (last, _) = bob.send_message("alice", 5, "m5").unwrap();

    let mut cli = Cli::start(&server, "alice", &state, &[]);
    let shown = cli.until("caught up");
    assert!(
        shown
            .iter()
            .any(|l| l.contains("resumed the session as alice")),
        "{shown:#?}"
    );
    let messages: Vec<&String> = shown.iter().filter(|l| l.contains(" → ")).collect();
    assert_eq!(messages.len(), 2, "{shown:#?}");
    assert!(messages[0].ends_with("bob → you: m4"), "{shown:#?}");
    assert!(messages[1].ends_with("bob → you: m5"), "{shown:#?}");

    // The saved counter means a fresh client_msg_id: a reused one would be taken as a resend and dropped.
    cli.send("/msg bob two");
    assert_eq!(bob.next_message(WAIT).unwrap().text, "two");
    cli.expect("you → bob: two");
    assert!(cli.quit().success());
    let saved = std::fs::read_to_string(&state).unwrap();
    let last_seen: u64 = saved
        .lines()
        .find_map(|l| l.strip_prefix("last_seen="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(last_seen > last, "{saved}");
}

#[test]
fn end_of_input_quits_cleanly_after_the_ack() {
    let server = common::start();
    let mut bob = server.user("bob");
    let dir = tempfile::tempdir().unwrap();
    let mut cli = Cli::start(&server, "alice", &state_in(&dir), &["--register"]);
    cli.expect("caught up");
    cli.send("/msg bob last words");
    drop(cli.stdin.take());
    let status = cli.wait_exit();
    assert!(status.success(), "{}", cli.transcript.join("\n"));
    assert!(
        cli.transcript
            .iter()
            .any(|l| l.contains("you → bob: last words")),
        "{}",
        cli.transcript.join("\n")
    );
    assert_eq!(bob.next_message(WAIT).unwrap().text, "last words");
}

#[test]
fn a_refused_token_falls_back_to_the_password() {
    let server = common::start();
    server.user("alice");
    let dir = tempfile::tempdir().unwrap();
    let state = state_in(&dir);
    std::fs::write(
        &state,
        "user=alice\ntoken=000102030405060708090a0b0c0d0e0f\nlast_seen=0\n",
    )
    .unwrap();
    let mut cli = Cli::start(&server, "alice", &state, &[]);
    cli.expect("no longer valid");
    cli.expect("logged in as alice");
    assert!(cli.quit().success());
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(
        !saved.contains("token=000102030405060708090a0b0c0d0e0f"),
        "{saved}"
    );
    assert!(saved.contains("next_client_msg_id="), "{saved}");
}

#[test]
fn without_a_terminal_or_a_password_it_exits_with_a_clear_message() {
    let server = common::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cli = Cli::start_with(&server, "alice", &state_in(&dir), &[], None);
    let status = cli.wait_exit();
    assert_eq!(status.code(), Some(1));
    assert!(
        cli.transcript
            .iter()
            .any(|l| l.starts_with("stderr: ") && l.contains("HUBBUB_PASSWORD")),
        "{}",
        cli.transcript.join("\n")
    );
}
