//! The real `hubbub` binary under load, killed (SIGKILL) or stopped (SIGTERM) in the middle, then restarted on
//! the same database: every acknowledged message survives exactly once ([HB-5.1] "Ack only after the store
//! commits", [HB-5.2] resends, [HB-5.3] catch-up from the store). Also: a second server on a database that one
//! serves refuses to start, and a killed server leaves no lock behind.

mod common;

use common::process::{integrity_check, ServerProcess};
use hubbub::client::{Client, ClientError};
use hubbub::protocol::{Message, Packet, Request};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);
const SENDERS: usize = 4;
const RECIPIENTS: usize = 3;
/// Sends in flight per sender connection.
const WINDOW: usize = 32;

// -------------------------------------------------------------------------------------------------------------
// The server process
// -------------------------------------------------------------------------------------------------------------

/// The binary on `db`, with send rates far above the default 50 messages/s per session (the load below needs it).
fn start_server(db: &Path) -> ServerProcess {
    ServerProcess::launch(db)
        .args(["--send-rate", "1000000", "--send-burst", "1000000"])
        .start()
}

// -------------------------------------------------------------------------------------------------------------
// Load
// -------------------------------------------------------------------------------------------------------------

fn sender_name(i: usize) -> String {
    format!("sender{i}")
}

fn recipient_name(i: usize) -> String {
    format!("recipient{i}")
}

/// One Send a sender made, and what became of it.
#[derive(Clone, Debug)]
struct Sent {
    sender: String,
    recipient: String,
    client_msg_id: u64,
    text: String,
    /// The acknowledged message id; None if no Ack arrived.
    acked: Option<u64>,
}

/// Registers every sender, then every recipient.
fn register_all(server: &ServerProcess) {
    let senders = (0..SENDERS).map(sender_name);
    let recipients = (0..RECIPIENTS).map(recipient_name);
    server.register_all(&senders.chain(recipients).collect::<Vec<_>>());
}

/// Starts the sender threads: each sends pipelined bursts (client ids from `first_cid` on) until `stop` is set
/// or its connection fails, and returns every Send it made. `acked` counts Acks across all senders.
fn start_senders(
    server: &ServerProcess,
    first_cid: u64,
    stop: &Arc<AtomicBool>,
    acked: &Arc<AtomicUsize>,
) -> Vec<JoinHandle<Vec<Sent>>> {
    (0..SENDERS)
        .map(|i| {
            let (mut client, _) = server.login(&sender_name(i), "load", 0);
            let stop = Arc::clone(stop);
            let acked = Arc::clone(acked);
            std::thread::spawn(move || {
                let me = sender_name(i);
                let mut made: Vec<Sent> = Vec::new();
                let mut next_cid = first_cid;
                let deadline = Instant::now() + Duration::from_secs(60);
                'bursts: while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let mut in_flight = Vec::new();
                    for _ in 0..WINDOW {
                        let cid = next_cid;
                        next_cid += 1;
                        let recipient = recipient_name((cid as usize + i) % RECIPIENTS);
                        let text = format!("{me} #{cid} {}", "x".repeat((cid % 7) as usize * 50));
                        let request = Request::Send {
                            recipient: recipient.clone(),
                            client_msg_id: cid,
                            text: text.clone(),
                        };
                        made.push(Sent {
                            sender: me.clone(),
                            recipient,
                            client_msg_id: cid,
                            text,
                            acked: None,
                        });
                        match client.send_request(&request) {
                            Ok(rid) => in_flight.push((rid, made.len() - 1)),
                            Err(_) => break 'bursts,
                        }
                    }
                    for (rid, at) in in_flight {
                        match client.wait_reply(rid, WAIT) {
                            Ok(Packet::Ack { message_id, .. }) => {
                                made[at].acked = Some(message_id);
                                acked.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(other) => panic!("{me}: unexpected answer to a Send: {other:?}"),
                            // The server went away (killed or shutting down): this Send is unacknowledged.
                            Err(ClientError::Server { code, text }) => {
                                panic!("{me}: Send refused: {code} {text}")
                            }
                            Err(_) => break 'bursts,
                        }
                    }
                }
                made
            })
        })
        .collect()
}

/// Waits until at least `n` Acks (or 20 s).
fn wait_for_acks(acked: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.load(Ordering::SeqCst) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        acked.load(Ordering::SeqCst) >= n,
        "the load made only {} acks",
        acked.load(Ordering::SeqCst)
    );
}

fn join_senders(threads: Vec<JoinHandle<Vec<Sent>>>) -> Vec<Sent> {
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("a sender thread panicked"))
        .collect()
}

/// Logs each recipient in on a fresh device with last_seen 0 and reads until CaughtUp.
fn read_all(server: &ServerProcess) -> Vec<Message> {
    let mut all = Vec::new();
    for i in 0..RECIPIENTS {
        let name = recipient_name(i);
        let (mut c, _) = server.login(&name, "after-restart", 0);
        all.extend(read_feed(&mut c, &name));
    }
    all
}

/// The messages `name`'s fresh session catches up on (logged in with last_seen 0), up to CaughtUp.
fn read_feed(c: &mut Client, name: &str) -> Vec<Message> {
    let mut feed = Vec::new();
    loop {
        match c.next_push(WAIT) {
            Ok(Packet::Deliver(m)) => {
                assert_eq!(
                    m.recipient, name,
                    "{name}'s feed has only messages to {name}"
                );
                feed.push(m);
            }
            Ok(Packet::CaughtUp { .. }) => return feed,
            Ok(_) => {}
            Err(e) => panic!("{name} catching up after {} messages: {e}", feed.len()),
        }
    }
}

/// Checks the delivered messages against what was sent: every acked message exactly once with its id and text,
/// unacked ones at most once, nothing else. Returns the text → id map of what is in the store.
fn check_delivered(sent: &[Sent], delivered: &[Message]) -> HashMap<String, u64> {
    let mut ids = HashSet::new();
    for m in delivered {
        assert!(ids.insert(m.id), "message id {} delivered twice", m.id);
    }
    let mut by_text: HashMap<String, u64> = HashMap::new();
    for m in delivered {
        if let Some(first) = by_text.insert(m.text.clone(), m.id) {
            panic!("{:?} stored twice: ids {first} and {}", m.text, m.id);
        }
    }
    let made: HashMap<&str, &Sent> = sent.iter().map(|s| (s.text.as_str(), s)).collect();
    for m in delivered {
        let s = made
            .get(m.text.as_str())
            .unwrap_or_else(|| panic!("delivered a message nobody sent: {m:?}"));
        assert_eq!((&m.sender, &m.recipient), (&s.sender, &s.recipient));
    }
    let mut acked = 0;
    for s in sent {
        if let Some(id) = s.acked {
            acked += 1;
            assert_eq!(
                by_text.get(&s.text),
                Some(&id),
                "acknowledged message {} #{} (id {id}) was lost or changed id",
                s.sender,
                s.client_msg_id
            );
        }
    }
    println!(
        "{} sends, {acked} acknowledged, {} stored",
        sent.len(),
        delivered.len()
    );
    by_text
}

// -------------------------------------------------------------------------------------------------------------
// Tests
// -------------------------------------------------------------------------------------------------------------

// [HB-5.1] [HB-5.2] SIGKILL in the middle of pipelined bursts from several senders, three times over on the
// same database: after the last restart every acknowledged message is delivered exactly once, unacknowledged
// ones at most once, resends of acknowledged client ids get the original id, and the database passes its
// integrity check.
#[test]
fn hb_5_1_kill_9_mid_load_loses_no_acknowledged_message() {
    const CYCLES: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hubbub.db");
    let mut sent = Vec::new();
    for cycle in 0..CYCLES {
        let mut server = start_server(&db);
        if cycle == 0 {
            register_all(&server);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let senders = start_senders(&server, cycle * 1_000_000 + 1, &stop, &acked);
        wait_for_acks(&acked, 500 + 400 * cycle as usize);
        server.kill();
        let killed_at = acked.load(Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
        let made = join_senders(senders);
        println!(
            "cycle {cycle}: SIGKILL after {killed_at} acks, {} sends unanswered",
            made.iter().filter(|s| s.acked.is_none()).count()
        );
        sent.extend(made);
    }

    let server = start_server(&db);
    let delivered = read_all(&server);
    let stored = check_delivered(&sent, &delivered);
    let unacked_stored = sent
        .iter()
        .filter(|s| s.acked.is_none() && stored.contains_key(&s.text))
        .count();
    println!("{unacked_stored} unacknowledged sends were committed before the kill");

    // [HB-5.2] Resends after the restart: an acknowledged client id answers the original id; an unacknowledged
    // one answers the stored id if it was committed, else a new one — never a second copy.
    for i in 0..SENDERS {
        let me = sender_name(i);
        let mine: Vec<&Sent> = sent.iter().filter(|s| s.sender == me).collect();
        let (mut c, _) = server.login(&me, "resend", 0);
        for s in mine.iter().filter(|s| s.acked.is_some()).rev().take(3) {
            let (id, _) = c
                .send_message(&s.recipient, s.client_msg_id, &s.text)
                .unwrap();
            assert_eq!(
                Some(id),
                s.acked,
                "{me} #{} resent after restart",
                s.client_msg_id
            );
        }
        for s in mine.iter().filter(|s| s.acked.is_none()).take(3) {
            let (id, _) = c
                .send_message(&s.recipient, s.client_msg_id, &s.text)
                .unwrap();
            if let Some(&stored_id) = stored.get(&s.text) {
                assert_eq!(
                    id, stored_id,
                    "{me} #{} was committed: same id",
                    s.client_msg_id
                );
            } else {
                assert!(delivered.iter().all(|m| m.id != id));
            }
        }
    }
    // Still exactly once each, after the resends.
    let again = read_all(&server);
    let mut texts = HashSet::new();
    for m in &again {
        assert!(
            texts.insert(m.text.clone()),
            "{:?} twice after resends",
            m.text
        );
    }
    assert!(again.len() >= delivered.len());

    drop(server); // SIGKILL again; the database must still be sound
    integrity_check(&db);
}

// [HB-5.1] SIGTERM during load: the server exits with status 0 within 5 s, and after a restart every
// acknowledged message is there exactly once.
#[test]
fn hb_5_1_sigterm_mid_load_exits_cleanly_and_keeps_every_ack() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hubbub.db");
    let mut server = start_server(&db);
    register_all(&server);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let senders = start_senders(&server, 1, &stop, &acked);
    wait_for_acks(&acked, 1500);
    let started = Instant::now();
    let status = server.terminate(Duration::from_secs(5));
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let sent = join_senders(senders);
    let Some(status) = status else {
        let log = server.log_text();
        server.kill();
        panic!("no exit within 5 s of SIGTERM; stderr:\n{log}");
    };
    println!("SIGTERM: exit {status:?} after {took:?}");
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.log_text());
    assert!(
        server.log_text().contains("hubbub stopped"),
        "stderr:\n{}",
        server.log_text()
    );

    let restarted = start_server(&db);
    let delivered = read_all(&restarted);
    check_delivered(&sent, &delivered);
    drop(restarted);
    integrity_check(&db);
}

/// The message index's mark, read from its file (`<db>-index`, see README "Storage").
fn index_mark(db: &Path) -> u64 {
    hubbub::store::IndexWriter::open(db)
        .unwrap()
        .indexed_up_to()
        .unwrap()
}

/// The message index trails the messages on purpose ([HB-5.3]); a kill before it caught up loses nothing. The
/// next start indexes what it lacked, and the catch-up feed, history, the account's newest id and delivery
/// receipts all see every acknowledged message exactly once.
#[test]
fn hb_5_3_a_kill_before_the_message_index_caught_up_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hubbub.db");
    let mut server = ServerProcess::launch(&db)
        .args(["--index-batch", "1000000", "--index-delay", "1h"])
        .args(["--send-rate", "1000000", "--send-burst", "1000000"])
        .start();
    server.register_all(&["alice", "bob"]);
    let (mut alice, _) = server.login("alice", "laptop", 0);
    let acked: Vec<u64> = (1..=40)
        .map(|n| {
            alice
                .send_message("bob", n, &format!("note {n}"))
                .unwrap()
                .0
        })
        .collect();
    server.kill();
    assert_eq!(index_mark(&db), 0, "nothing was indexed before the kill");
    integrity_check(&db);

    let server = start_server(&db);
    assert_eq!(
        index_mark(&db),
        acked[39],
        "the start indexed every message"
    );
    let (mut bob, info) = server.login("bob", "phone", 0);
    assert_eq!(info.max_message_id, acked[39]);
    let mut fed = Vec::new();
    loop {
        match bob.next_push(WAIT).unwrap() {
            Packet::Deliver(m) => fed.push(m.id),
            Packet::CaughtUp { .. } => break,
            _ => {}
        }
    }
    assert_eq!(fed, acked, "the feed: every acked message once, in order");
    let (page, more) = bob.history("alice", 0, 100).unwrap();
    let mut newest_first = acked.clone();
    newest_first.reverse();
    assert_eq!(page.iter().map(|m| m.id).collect::<Vec<_>>(), newest_first);
    assert!(!more);
    let (mut alice, _) = server.login("alice", "laptop", acked[39]);
    bob.received(acked[39]).unwrap();
    loop {
        match alice.next_push(WAIT).unwrap() {
            Packet::DeliveryReceipt { peer, up_to } => {
                assert_eq!((peer.as_str(), up_to), ("bob", acked[39]));
                break;
            }
            _ => continue,
        }
    }
}

// -------------------------------------------------------------------------------------------------------------
// One server per database
// -------------------------------------------------------------------------------------------------------------

/// Runs the binary on `db` where it should refuse to start: its exit status and stderr. Panics if it is still
/// running after WAIT, i.e. it was not refused.
fn start_refused(db: &Path) -> (ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["--listen", "127.0.0.1:0", "--db"])
        .arg(db)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a second server on {} kept running", db.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr).unwrap();
    }
    (status, stderr)
}

/// A second server on a database that another one serves would store resends twice and never deliver live what
/// the other stored: it refuses to start and names the first. A SIGKILL leaves no lock behind to clear by hand.
#[test]
fn a_second_server_on_a_served_database_refuses_to_start_until_the_first_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hubbub.db");
    let mut first = start_server(&db);
    first.register_all(&["ann", "bob"]);
    let (mut ann, _) = first.login("ann", "laptop", 0);
    let (acked, _) = ann
        .send_message("bob", 1, "before the second server")
        .unwrap();

    let (status, stderr) = start_refused(&db);
    assert!(!status.success(), "{stderr}");
    let expected = format!(
        "{} is in use by another hubbub (pid {})",
        db.display(),
        first.pid()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("hubbub.db-lock"), "{stderr}");

    // The refused start changed nothing for the first server's clients.
    let (again, _) = ann.send_message("bob", 2, "after it").unwrap();
    assert!(again > acked);
    first.assert_no_panics();

    first.kill();
    let next = start_server(&db);
    let (mut bob, _) = next.login("bob", "phone", 0);
    let texts: Vec<String> = read_feed(&mut bob, "bob")
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["before the second server", "after it"]);
}
