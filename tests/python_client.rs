//! The Python client in `examples/client.py`, written from proto.md alone, against the real server.
//!
//! It runs `python3 examples/client.py --selftest 127.0.0.1:PORT`, which registers two users, sends direct and
//! room messages, checks resends, receipts, history, presence, typing, stats, Resume and catch-up, and an error
//! code, then prints `selftest ok`. Without `python3` on PATH the test is skipped with a message.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long the self-test may take before it is killed.
const TIMEOUT: Duration = Duration::from_secs(60);

fn python3_available() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Reads a child's pipe to the end on a thread, so a full pipe can never block the child.
fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

/// Waits for the child until `timeout`; kills it if it is still running then. Returns its exit code, if any.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().expect("try_wait on python3") {
            Some(status) => return status.code(),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            None => thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn python_client_selftest() {
    if !python3_available() {
        eprintln!("skipping python_client_selftest: python3 is not on PATH");
        return;
    }
    let server = common::start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join("client.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg("--selftest")
        .arg(format!("127.0.0.1:{}", server.addr.port()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3");
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let code = wait_with_timeout(&mut child, TIMEOUT);
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();

    let report = format!("--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
    match code {
        None => panic!(
            "the Python self-test did not finish within {TIMEOUT:?} and was killed\n{report}"
        ),
        Some(0) => {}
        Some(c) => panic!("the Python self-test exited with {c}\n{report}"),
    }
    assert!(
        stdout.contains("selftest ok"),
        "no `selftest ok` in the output\n{report}"
    );
    println!("{stdout}");
}
