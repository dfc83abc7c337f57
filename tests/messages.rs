//! Direct messages end to end ([HB-5]): Send/Ack/Deliver, resends, the cursor feed, offline delivery, receipts,
//! slow consumers, history and the error codes — against a real server on 127.0.0.1:0.

mod common;

use common::process::rss_of;
use common::{code_of, start, start_in, start_with, TestServer, PASSWORD};
use hubbub::client::{Client, ClientError};
use hubbub::protocol::{code, Message, Packet, Request};
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

// -------------------------------------------------------------------------------------------------------------
// Helpers
// -------------------------------------------------------------------------------------------------------------

/// A new user, registered, logged in, and past the CaughtUp that ends its (empty) catch-up.
fn online(server: &TestServer, name: &str) -> Client {
    let mut c = server.user(name);
    let (messages, _) = catch_up(&mut c);
    assert!(messages.is_empty(), "a new user has no messages");
    c
}

/// Reads pushes until CaughtUp: the messages pushed before it (in arrival order) and its cursor. Receipts are
/// skipped; an Error or Shutdown push fails the test.
fn catch_up(c: &mut Client) -> (Vec<Message>, u64) {
    let mut messages = Vec::new();
    loop {
        match c.next_push(WAIT) {
            Ok(Packet::Deliver(m)) => messages.push(m),
            Ok(Packet::CaughtUp { cursor }) => return (messages, cursor),
            Ok(Packet::DeliveryReceipt { .. }) | Ok(Packet::ReadReceipt { .. }) => {}
            other => panic!(
                "while catching up (after {} messages): {other:?}",
                messages.len()
            ),
        }
    }
}

/// Reads pushes until `n` messages have arrived and a CaughtUp follows the last of them. A session that falls
/// behind more than once ([HB-5.6]) may see a CaughtUp before that as well: returns the messages, the final
/// cursor and how many CaughtUp pushes arrived in all.
fn read_all_then_caught_up(c: &mut Client, n: usize) -> (Vec<Message>, u64, usize) {
    let mut messages = Vec::new();
    let mut catch_ups = 0;
    loop {
        match c.next_push(WAIT) {
            Ok(Packet::Deliver(m)) => messages.push(m),
            Ok(Packet::CaughtUp { cursor }) => {
                catch_ups += 1;
                if messages.len() >= n {
                    return (messages, cursor, catch_ups);
                }
            }
            Ok(Packet::DeliveryReceipt { .. }) | Ok(Packet::ReadReceipt { .. }) => {}
            other => panic!(
                "after {} of {n} messages and {catch_ups} CaughtUp: {other:?}",
                messages.len()
            ),
        }
    }
}

/// Every push that arrives within `within` (the connection staying quiet ends the wait).
fn pushes_within(c: &mut Client, within: Duration) -> Vec<Packet> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        match c.next_push(left) {
            Ok(p) => got.push(p),
            Err(ClientError::Timeout) => return got,
            Err(e) => panic!("while watching for pushes: {e}"),
        }
    }
}

/// Asserts that no Deliver reaches `c` (a Ping round trip first, so anything already sent is in).
fn assert_no_deliver(c: &mut Client, who: &str) {
    c.ping().unwrap();
    let pushes = pushes_within(c, QUIET);
    assert!(
        !pushes.iter().any(|p| matches!(p, Packet::Deliver(_))),
        "{who} got an unexpected Deliver: {pushes:?}"
    );
}

/// The next Deliver, skipping receipts and CaughtUp.
fn next_msg(c: &mut Client) -> Message {
    c.next_message(WAIT).unwrap()
}

fn send_req(recipient: &str, client_msg_id: u64, text: &str) -> Request {
    Request::Send {
        recipient: recipient.into(),
        client_msg_id,
        text: text.into(),
    }
}

/// Waits for the answer to the Send with request id `rid`: the acked message id. Any non-Ack answer fails the
/// test.
fn ack_id(c: &mut Client, rid: u32) -> u64 {
    match c.wait_reply(rid, WAIT) {
        Ok(Packet::Ack { message_id, .. }) => message_id,
        other => panic!("Send {rid} was not acked: {other:?}"),
    }
}

/// Sends `(client id, text)` pairs pipelined, `window` requests in flight at a time; returns the acked message
/// ids in order. Any non-Ack answer fails the test.
fn send_pipelined(
    c: &mut Client,
    recipient: &str,
    items: &[(u64, String)],
    window: usize,
) -> Vec<u64> {
    let mut ids = Vec::with_capacity(items.len());
    for chunk in items.chunks(window) {
        let rids: Vec<u32> = chunk
            .iter()
            .map(|(cid, text)| c.send_request(&send_req(recipient, *cid, text)).unwrap())
            .collect();
        ids.extend(rids.into_iter().map(|rid| ack_id(c, rid)));
    }
    ids
}

/// `n` numbered texts for [`send_pipelined`]: client id `i` with a text of `len` bytes tagged `{tag}{i}`.
fn texts(tag: &str, n: u64, len: usize) -> Vec<(u64, String)> {
    (1..=n)
        .map(|i| (i, text_of(&format!("{tag}{i}"), len)))
        .collect()
}

/// A text of exactly `len` bytes that starts with `tag` (so it can be told apart).
fn text_of(tag: &str, len: usize) -> String {
    let mut t = String::with_capacity(len);
    t.push_str(tag);
    t.push(':');
    while t.len() < len {
        t.push((b'a' + (t.len() % 26) as u8) as char);
    }
    t.truncate(len);
    t
}

fn ids_of(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.id).collect()
}

fn assert_strictly_increasing(ids: &[u64], what: &str) {
    for w in ids.windows(2) {
        assert!(
            w[0] < w[1],
            "{what}: ids not strictly increasing: {} then {}",
            w[0],
            w[1]
        );
    }
}

fn fast_senders(cfg: &mut hubbub::Config) {
    cfg.send_rate = 1_000_000;
    cfg.send_burst = 1_000_000;
}

// -------------------------------------------------------------------------------------------------------------
// [HB-5.1] Send, Ack, Deliver
// -------------------------------------------------------------------------------------------------------------

// [HB-5.1] The Ack carries the stored message's id and timestamp; the recipient gets the same message pushed
// (request id 0), and it is already in the store (History sees it, and it survives a restart).
#[test]
fn hb_5_1_ack_then_deliver_to_recipient() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");

    let (id, ts) = alice.send_message("Bob", 1, "hello bob").unwrap();
    assert!(id > 0 && ts > 0);

    let (rid, packet) = bob.recv(WAIT).unwrap();
    assert_eq!(rid, 0, "Deliver is a push");
    let Packet::Deliver(m) = packet else {
        panic!("expected Deliver, got {packet:?}")
    };
    assert_eq!(
        m,
        Message {
            id,
            sender: "alice".into(),
            recipient: "bob".into(),
            timestamp_ms: ts,
            text: "hello bob".into(),
        }
    );

    // Acked means stored: the history already has it...
    let (page, more) = bob.history("alice", 0, 10).unwrap();
    assert_eq!(ids_of(&page), vec![id]);
    assert!(!more);

    // ...and so does the database after a restart.
    let config = server.config.clone();
    drop((alice, bob));
    let dir = server.stop();
    let server = start_in(dir, config);
    let mut bob = server.login("bob", "laptop");
    let (messages, cursor) = catch_up(&mut bob);
    assert_eq!(ids_of(&messages), vec![id]);
    assert_eq!(messages[0].text, "hello bob");
    assert_eq!(cursor, id);
}

// [HB-5.1] Two devices of the recipient both get a live message; the sender's second device gets a copy; the
// sending device gets only its Ack.
#[test]
fn hb_5_1_every_other_session_gets_the_live_copy() {
    let server = start();
    let mut alice1 = online(&server, "alice");
    let mut bob1 = online(&server, "bob");
    let mut alice2 = server.login("alice", "tablet");
    assert!(catch_up(&mut alice2).0.is_empty());
    let mut bob2 = server.login("bob", "tablet");
    assert!(catch_up(&mut bob2).0.is_empty());

    let (id, _) = alice1.send_message("bob", 10, "to both of you").unwrap();
    for (who, c) in [
        ("bob1", &mut bob1),
        ("bob2", &mut bob2),
        ("alice2", &mut alice2),
    ] {
        let m = next_msg(c);
        assert_eq!(
            (m.id, m.sender.as_str(), m.text.as_str()),
            (id, "alice", "to both of you"),
            "{who}"
        );
    }
    assert_no_deliver(&mut alice1, "the sending session");

    // The other way round, from bob's second device.
    let (id2, _) = bob2.send_message("alice", 11, "reply").unwrap();
    for (who, c) in [
        ("alice1", &mut alice1),
        ("alice2", &mut alice2),
        ("bob1", &mut bob1),
    ] {
        let m = next_msg(c);
        assert_eq!(
            (m.id, m.sender.as_str(), m.recipient.as_str()),
            (id2, "bob", "alice"),
            "{who}"
        );
    }
    assert_no_deliver(&mut bob2, "the sending session");
    for (who, c) in [
        ("alice1", &mut alice1),
        ("alice2", &mut alice2),
        ("bob1", &mut bob1),
    ] {
        assert_no_deliver(c, who);
    }
}

// -------------------------------------------------------------------------------------------------------------
// [HB-5.2] Resends
// -------------------------------------------------------------------------------------------------------------

// [HB-5.2] The same (sender, client_msg_id) again answers the original Ack and delivers nothing twice — also
// from the sender's other device, and even with a different text.
#[test]
fn hb_5_2_resend_gets_the_original_ack_and_is_delivered_once() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");

    let first = alice.send_message("bob", 42, "only once").unwrap();
    let again = alice.send_message("bob", 42, "only once").unwrap();
    assert_eq!(
        again, first,
        "a resend answers the original Ack (id and timestamp)"
    );
    let changed = alice.send_message("bob", 42, "a different text").unwrap();
    assert_eq!(changed, first);
    let mut alice2 = server.login("alice", "phone");
    catch_up(&mut alice2);
    assert_eq!(alice2.send_message("bob", 42, "only once").unwrap(), first);

    let (next, _) = alice.send_message("bob", 43, "next one").unwrap();
    assert!(next > first.0);

    let m = next_msg(&mut bob);
    assert_eq!((m.id, m.text.as_str()), (first.0, "only once"));
    let m = next_msg(&mut bob);
    assert_eq!(m.id, next, "the resends delivered nothing");
    assert_no_deliver(&mut bob, "bob");

    let (page, _) = bob.history("alice", 0, 100).unwrap();
    assert_eq!(ids_of(&page), vec![next, first.0]);

    // Another sender may use the same client id: it is per sender.
    let mut carol = online(&server, "carol");
    let (carol_id, _) = carol.send_message("bob", 42, "carol's 42").unwrap();
    assert_ne!(carol_id, first.0);
    assert_eq!(next_msg(&mut bob).id, carol_id);
}

// -------------------------------------------------------------------------------------------------------------
// [HB-5.3] The cursor feed
// -------------------------------------------------------------------------------------------------------------

// [HB-5.3] A session that is behind is fed in pages (feed_page), the pages include the user's own sent
// messages, then CaughtUp { cursor } and live pushes from then on.
#[test]
fn hb_5_3_catch_up_in_pages_with_own_messages_then_live() {
    let server = start_with(|cfg| {
        cfg.feed_page = 7;
        fast_senders(cfg);
    });
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    let (own, _) = bob.send_message("alice", 1, "bob's own").unwrap();
    assert_eq!(next_msg(&mut alice).id, own);
    drop(bob);

    let items: Vec<(u64, String)> = (1..=30).map(|i| (i, format!("offline {i}"))).collect();
    let sent = send_pipelined(&mut alice, "bob", &items, 10);
    assert_strictly_increasing(&sent, "acks");

    let mut bob = server.connect();
    let info = bob.login("bob", PASSWORD, "laptop", 0).unwrap();
    assert_eq!(info.max_message_id, *sent.last().unwrap());
    assert_eq!(info.delivered_cursor, 0);
    let (messages, cursor) = catch_up(&mut bob);
    let mut expected = vec![own];
    expected.extend(&sent);
    assert_eq!(
        ids_of(&messages),
        expected,
        "own sent message first, then all 30 in order"
    );
    assert_eq!(messages[0].sender, "bob");
    assert_eq!(messages[0].text, "bob's own");
    for (m, (_, text)) in messages[1..].iter().zip(&items) {
        assert_eq!(
            (m.sender.as_str(), m.text.as_str()),
            ("alice", text.as_str())
        );
    }
    assert_eq!(cursor, *sent.last().unwrap());

    // Live from now on.
    let (live, _) = alice.send_message("bob", 100, "live").unwrap();
    let m = next_msg(&mut bob);
    assert_eq!((m.id, m.text.as_str()), (live, "live"));
    assert_no_deliver(&mut bob, "bob");
}

// [HB-5.3] last_seen 0 starts from the user's delivered cursor (which Received raises); a nonzero last_seen
// starts there; a last_seen past the newest message is clamped, so later messages still arrive.
#[test]
fn hb_5_3_last_seen_and_the_delivered_cursor() {
    let server = start();
    let mut alice = online(&server, "alice");
    server.register("bob");
    let m: Vec<u64> = (1..=3)
        .map(|i| alice.send_message("bob", i, &format!("m{i}")).unwrap().0)
        .collect();

    let mut bob = server.login("bob", "phone");
    let (got, cursor) = catch_up(&mut bob);
    assert_eq!(ids_of(&got), m);
    assert_eq!(cursor, m[2]);
    bob.received(m[2]).unwrap();
    drop(bob);

    let m45: Vec<u64> = (4..=5)
        .map(|i| alice.send_message("bob", i, &format!("m{i}")).unwrap().0)
        .collect();

    let mut bob = server.connect();
    let info = bob.login("bob", PASSWORD, "phone", 0).unwrap();
    assert_eq!(
        info.delivered_cursor, m[2],
        "Received raised the delivered cursor"
    );
    let (got, cursor) = catch_up(&mut bob);
    assert_eq!(
        ids_of(&got),
        m45,
        "last_seen 0 resumes from the delivered cursor"
    );
    assert_eq!(cursor, m45[1]);
    drop(bob);

    let mut bob = server.login_at("bob", "tablet", m[0]);
    let (got, _) = catch_up(&mut bob);
    assert_eq!(
        ids_of(&got),
        vec![m[1], m[2], m45[0], m45[1]],
        "an explicit last_seen wins"
    );
    drop(bob);

    let mut bob = server.login_at("bob", "tablet", m45[1]);
    let (got, cursor) = catch_up(&mut bob);
    assert!(got.is_empty());
    assert_eq!(cursor, m45[1]);
    drop(bob);

    let mut bob = server.login_at("bob", "tablet", m45[1] + 1_000_000);
    let (got, cursor) = catch_up(&mut bob);
    assert!(got.is_empty());
    assert_eq!(
        cursor, m45[1],
        "a cursor past the newest message is clamped"
    );
    let (later, _) = alice.send_message("bob", 6, "later").unwrap();
    assert_eq!(next_msg(&mut bob).id, later);
}

// -------------------------------------------------------------------------------------------------------------
// [HB-5.4] Offline recipients
// -------------------------------------------------------------------------------------------------------------

// [HB-5.4] A sends to B while B is offline; B logs in and gets it.
#[test]
fn hb_5_4_offline_recipient_gets_message_at_next_login() {
    let server = start();
    let mut alice = online(&server, "alice");
    server.register("bob");
    let (id, ts) = alice.send_message("bob", 1, "while you were out").unwrap();

    let mut bob = server.login("bob", "phone");
    let (messages, cursor) = catch_up(&mut bob);
    assert_eq!(
        messages,
        vec![Message {
            id,
            sender: "alice".into(),
            recipient: "bob".into(),
            timestamp_ms: ts,
            text: "while you were out".into(),
        }]
    );
    assert_eq!(cursor, id);
    assert_no_deliver(&mut bob, "bob");
}

// [HB-5.4] [HB-5.3] A 2,000-message offline backlog arrives complete, in order, once, then CaughtUp — while
// another pair keeps chatting with prompt round trips.
#[test]
fn hb_5_4_two_thousand_message_backlog_while_others_chat() {
    const N: u64 = 2_000;
    let server = start_with(fast_senders);
    let mut alice = online(&server, "alice");
    server.register("bob");
    let carol = online(&server, "carol");
    let dave = online(&server, "dave");

    let items = texts("b", N, 1500);
    let started = Instant::now();
    let sent = send_pipelined(&mut alice, "bob", &items, 100);
    println!("2000 sends acked in {:?}", started.elapsed());

    // carol <-> dave round trips, while bob catches up.
    let stop = Arc::new(AtomicBool::new(false));
    let chatter = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut carol, mut dave) = (carol, dave);
            let mut rounds = 0u64;
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) || rounds < 5 {
                let t = Instant::now();
                let (id, _) = carol.send_message("dave", 2 * rounds + 1, "ping").unwrap();
                assert_eq!(dave.next_message(Duration::from_secs(2)).unwrap().id, id);
                let (id, _) = dave.send_message("carol", 2 * rounds + 2, "pong").unwrap();
                assert_eq!(carol.next_message(Duration::from_secs(2)).unwrap().id, id);
                let rtt = t.elapsed();
                assert!(
                    rtt < Duration::from_secs(2),
                    "round trip {rounds} took {rtt:?}"
                );
                worst = worst.max(rtt);
                rounds += 1;
            }
            (rounds, worst)
        })
    };

    let started = Instant::now();
    let mut bob = server.login("bob", "phone");
    let (messages, cursor) = catch_up(&mut bob);
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (rounds, worst) = chatter.join().expect("the other pair kept chatting");
    println!("backlog of {N} caught up in {took:?}; {rounds} carol/dave round trips meanwhile, worst {worst:?}");

    assert_eq!(messages.len() as u64, N, "every message once");
    assert_eq!(
        ids_of(&messages),
        sent,
        "in order, none twice, none missing"
    );
    for (m, (_, text)) in messages.iter().zip(&items) {
        assert_eq!(&m.text, text);
    }
    assert_eq!(cursor, *sent.last().unwrap());
    assert_no_deliver(&mut bob, "bob");
}

// -------------------------------------------------------------------------------------------------------------
// [HB-5.5] Receipts
// -------------------------------------------------------------------------------------------------------------

// [HB-5.5] Received(up_to) → Ok; each sender concerned gets DeliveryReceipt { peer: reader, up_to } on every
// online session; the cursor never goes back and is cut to what the session was sent.
#[test]
fn hb_5_5_delivery_receipts_reach_the_sender() {
    let server = start();
    let mut alice1 = online(&server, "alice");
    let mut alice2 = server.login("alice", "tablet");
    catch_up(&mut alice2);
    let mut carol = online(&server, "carol");
    let mut bob = online(&server, "bob");

    let (m1, _) = alice1.send_message("bob", 1, "one").unwrap();
    let (m2, _) = alice1.send_message("bob", 2, "two").unwrap();
    assert_eq!(next_msg(&mut bob).id, m1);
    assert_eq!(next_msg(&mut bob).id, m2);

    bob.received(m2).unwrap();
    for (who, c) in [("alice1", &mut alice1), ("alice2", &mut alice2)] {
        let receipts: Vec<Packet> = pushes_within(c, QUIET)
            .into_iter()
            .filter(|p| matches!(p, Packet::DeliveryReceipt { .. }))
            .collect();
        assert_eq!(
            receipts,
            vec![Packet::DeliveryReceipt {
                peer: "bob".into(),
                up_to: m2
            }],
            "{who}"
        );
    }
    // Nothing new: Ok, and no second receipt.
    bob.received(m1).unwrap();
    bob.received(m2).unwrap();
    assert!(pushes_within(&mut alice1, QUIET).is_empty());

    // A claim beyond what the session was sent is cut to its cursor; only carol's message is passed.
    let (m3, _) = carol.send_message("bob", 1, "three").unwrap();
    assert_eq!(next_msg(&mut bob).id, m3);
    bob.received(m3 + 1000).unwrap();
    let receipts: Vec<Packet> = pushes_within(&mut carol, QUIET)
        .into_iter()
        .filter(|p| matches!(p, Packet::DeliveryReceipt { .. }))
        .collect();
    assert_eq!(
        receipts,
        vec![Packet::DeliveryReceipt {
            peer: "bob".into(),
            up_to: m3
        }]
    );
    assert!(
        pushes_within(&mut alice1, QUIET).is_empty(),
        "no receipt for alice"
    );
    let (m4, _) = alice1.send_message("bob", 3, "four").unwrap();
    assert_eq!(next_msg(&mut bob).id, m4);
    let info = server.connect().login("bob", PASSWORD, "x", 0).unwrap();
    assert_eq!(
        info.delivered_cursor, m3,
        "the cursor stopped at what bob was sent"
    );
}

// [HB-5.5] Read(peer, up_to) → Ok; the peer's online sessions get ReadReceipt { peer: reader, up_to }; it is
// not stored (an offline peer never gets it).
#[test]
fn hb_5_5_read_receipts_reach_the_peer_and_are_not_stored() {
    let server = start();
    let mut alice1 = online(&server, "alice");
    let mut alice2 = server.login("alice", "tablet");
    catch_up(&mut alice2);
    let mut bob = online(&server, "bob");
    let (m1, _) = alice1.send_message("bob", 1, "read me").unwrap();
    assert_eq!(next_msg(&mut bob).id, m1);

    bob.read("Alice", m1).unwrap();
    for (who, c) in [("alice1", &mut alice1), ("alice2", &mut alice2)] {
        let receipts: Vec<Packet> = pushes_within(c, QUIET)
            .into_iter()
            .filter(|p| !matches!(p, Packet::Deliver(_)))
            .collect();
        assert_eq!(
            receipts,
            vec![Packet::ReadReceipt {
                peer: "bob".into(),
                up_to: m1
            }],
            "{who}"
        );
    }
    assert!(
        pushes_within(&mut bob, QUIET).is_empty(),
        "the reader gets no receipt"
    );

    // Offline peer: Ok, and nothing waits for alice at her next login.
    drop((alice1, alice2));
    std::thread::sleep(QUIET);
    bob.read("alice", m1).unwrap();
    let mut alice = server.login("alice", "laptop");
    catch_up(&mut alice);
    let pushes = pushes_within(&mut alice, QUIET);
    assert!(
        !pushes
            .iter()
            .any(|p| matches!(p, Packet::ReadReceipt { .. })),
        "read receipts are not stored: {pushes:?}"
    );
}

// -------------------------------------------------------------------------------------------------------------
// [HB-5.6] Slow consumers
// -------------------------------------------------------------------------------------------------------------

// [HB-5.6] A reader that never reads: every Send is still acked, the server stops pushing to it past the
// high-water mark, and once it reads it gets every message exactly once, in id order, ending with CaughtUp.
#[test]
fn hb_5_6_reader_that_never_reads_catches_up_from_the_store() {
    const N: u64 = 2_000;
    const TEXT: usize = 8_000;
    let server = start_with(|cfg| {
        cfg.out_high_water = 16 * 1024;
        cfg.out_low_water = 4 * 1024;
        cfg.max_text = 8 * 1024;
        cfg.idle_timeout = Duration::from_secs(300);
        fast_senders(cfg);
    });
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    // From here bob reads nothing until every Send is acked.

    let rss_before = rss_of(std::process::id());
    let items = texts("s", N, TEXT);
    let started = Instant::now();
    let sent = send_pipelined(&mut alice, "bob", &items, 64);
    let send_time = started.elapsed();
    let rss_mid = rss_of(std::process::id());
    assert_eq!(sent.len() as u64, N, "every Send acked");
    assert_strictly_increasing(&sent, "acks");

    let started = Instant::now();
    let (messages, cursor, catch_ups) = read_all_then_caught_up(&mut bob, N as usize);
    let read_time = started.elapsed();
    let rss_after = rss_of(std::process::id());
    println!(
        "{N} x {TEXT} B ({} MiB) to a reader that did not read: sends {send_time:?}, catch-up {read_time:?}; \
         VmRSS KiB before {rss_before:?}, after sending {rss_mid:?}, after reading {rss_after:?}; \
         {catch_ups} CaughtUp pushes on the way",
        (N as usize * TEXT) >> 20
    );
    assert_strictly_increasing(&ids_of(&messages), "bob's deliveries");
    assert_eq!(
        ids_of(&messages),
        sent,
        "every message exactly once, in id order"
    );
    for (m, (_, text)) in messages.iter().zip(&items) {
        assert_eq!(&m.text, text);
    }
    assert_eq!(
        cursor,
        *sent.last().unwrap(),
        "ends with CaughtUp at the newest id"
    );

    // Live again.
    let (live, _) = alice.send_message("bob", N + 1, "live again").unwrap();
    assert_eq!(next_msg(&mut bob).id, live);
}

// [HB-5.6] The server stops reading a session whose own output is over the high-water mark: a client that
// pipelines Pings and never reads the Pongs is eventually blocked in its writes (the server does not buffer
// without end), and gets every Pong once it reads.
#[test]
fn hb_5_6_server_stops_reading_a_session_that_does_not_read_its_answers() {
    let server = start_with(|cfg| {
        cfg.out_high_water = 16 * 1024;
        cfg.out_low_water = 4 * 1024;
        cfg.idle_timeout = Duration::from_secs(300);
    });
    let mut client = online(&server, "alice");
    let mut ping = Vec::new();
    Request::Ping.encode(7, &mut ping);
    let chunk: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 4096)
        .collect();

    let mut writer = client.stream().try_clone().unwrap();
    writer.set_nonblocking(true).unwrap();
    let limit: usize = 256 << 20;
    let mut written = 0usize;
    let mut last_progress = Instant::now();
    let blocked = loop {
        let at = written % chunk.len();
        match writer.write(&chunk[at..]) {
            Ok(n) => {
                written += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if last_progress.elapsed() > Duration::from_secs(1) {
                    break true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("write: {e}"),
        }
        if written >= limit {
            break false;
        }
    };
    println!(
        "the server stopped reading after {written} bytes of Pings ({} frames)",
        written / ping.len()
    );
    assert!(
        blocked,
        "the server read {written} bytes of Pings without the client reading a Pong"
    );

    // Finish the last partial frame, then read every Pong.
    let rest = (ping.len() - written % ping.len()) % ping.len();
    writer.set_nonblocking(false).unwrap();
    let tail = ping[ping.len() - rest..].to_vec();
    let finisher = std::thread::spawn(move || writer.write_all(&tail).unwrap());
    let frames = written.div_ceil(ping.len());
    for i in 0..frames {
        match client.recv(WAIT) {
            Ok((7, Packet::Pong)) => {}
            other => panic!("frame {i} of {frames}: {other:?}"),
        }
    }
    finisher.join().unwrap();
    client.ping().unwrap();
}

/// A server with small output limits (high water 16 KiB, low water 4 KiB), the given idle timeout and fast
/// senders; alice and bob online on it.
fn small_output_limits_and(idle: Duration) -> (TestServer, Client, Client) {
    let server = start_with(|cfg| {
        cfg.out_high_water = 16 * 1024;
        cfg.out_low_water = 4 * 1024;
        cfg.idle_timeout = idle;
        fast_senders(cfg);
    });
    let alice = online(&server, "alice");
    let bob = online(&server, "bob");
    (server, alice, bob)
}

// [HB-5.6] A session whose output cannot drain for idle_timeout is closed (SLOW_CONSUMER); its messages are
// not lost.
#[test]
fn hb_5_6_output_that_cannot_drain_is_closed_as_slow_consumer() {
    let idle = Duration::from_secs(2);
    let (server, mut alice, bob) = small_output_limits_and(idle);
    let bob_peer = bob.stream().try_clone().unwrap();

    // Enough to fill the kernel buffers between the server and bob.
    let items = texts("s", 600, 8000);
    let started = Instant::now();
    let sent = send_pipelined(&mut alice, "bob", &items, 64);

    // Bob keeps sending Pings (so he is not idle) but reads nothing.
    let mut ping = Vec::new();
    Request::Ping.encode(9, &mut ping);
    let mut w = bob_peer.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while started.elapsed() < idle + Duration::from_millis(500) {
        let _ = w.write_all(&ping);
        alice.ping().unwrap(); // alice stays served, and stays not idle
        std::thread::sleep(Duration::from_millis(200));
    }

    // Now read: some of the messages, then the end of the connection within a bound.
    let mut bob = bob;
    let deadline = Instant::now() + idle + Duration::from_secs(5);
    let mut delivered = 0usize;
    let end = loop {
        assert!(
            Instant::now() < deadline,
            "bob was never closed as a slow consumer"
        );
        match bob.recv(Duration::from_secs(1)) {
            Ok((0, Packet::Deliver(_))) => delivered += 1,
            Ok((0, Packet::Error { code, .. })) => break Some(code),
            Ok(_) => {}
            Err(ClientError::Closed) | Err(ClientError::Io(_)) | Err(ClientError::Protocol(_)) => {
                break None
            }
            Err(ClientError::Timeout) => {}
            Err(e) => panic!("{e}"),
        }
    };
    println!(
        "bob closed after {delivered} of {} deliveries (error frame: {end:?})",
        sent.len()
    );
    assert!(delivered < sent.len(), "bob was not cut off");
    if let Some(c) = end {
        assert_eq!(c, code::SLOW_CONSUMER);
    }
    // Nothing lost: a new session catches up from the store.
    let mut bob = server.login("bob", "phone");
    let (messages, _) = catch_up(&mut bob);
    assert_eq!(ids_of(&messages), sent);
}

/// Bob logs in, then reads nothing while alice sends him `messages` of 8,000 bytes. Once they are sent he
/// sends one Ping if `ping` (else nothing); after twice the idle timeout he reads what reached him. Returns
/// how his connection ended: None for a FIN, else the error. (He must not write more: data sent to a closed
/// socket is answered with a reset, however it was closed.) Nothing may be lost: a new session of his catches
/// up every message. The idle timeout (3 s, counted from his login or his Ping) leaves the sends several
/// times the 0.4 s they take on a 2-core machine.
fn stop_reading_then_see_how_the_connection_ends(messages: u64, ping: bool) -> Option<ErrorKind> {
    let idle = Duration::from_secs(3);
    let (server, mut alice, bob) = small_output_limits_and(idle);
    let items = texts("s", messages, 8000);
    let sent = send_pipelined(&mut alice, "bob", &items, 64);
    let mut raw = bob.stream().try_clone().unwrap();
    if ping {
        let mut frame = Vec::new();
        Request::Ping.encode(9, &mut frame);
        if let Err(e) = raw.write_all(&frame) {
            panic!(
                "bob was closed before his Ping ({e}): the sends took longer than the idle timeout"
            );
        }
    }
    std::thread::sleep(idle * 2);

    raw.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    let end = loop {
        assert!(Instant::now() < deadline, "bob's connection never ended");
        match raw.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => read += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => break Some(e.kind()),
        }
    };
    println!("{messages} messages: bob read {read} bytes, then {end:?}");
    assert!(read > 0, "bob had received some of his messages");
    let mut bob = server.login("bob", "phone");
    let (caught_up, _) = catch_up(&mut bob);
    assert_eq!(ids_of(&caught_up), sent);
    end
}

// [HB-5.6] (f) A client that stopped reading is reset when its session ends, not closed with a FIN behind its
// unread output. Bob sends nothing after his login, so he is closed for idleness, while the kernel holds about
// 4 MB of his messages (on Linux; the rest waits in the store); after a FIN the server's kernel would keep them,
// and the socket, for minutes. What bob had already received he can still read; then the connection says it
// was reset.
#[test]
fn hb_5_6_a_silent_client_whose_output_the_kernel_still_holds_is_reset() {
    assert_eq!(
        stop_reading_then_see_how_the_connection_ends(600, false),
        Some(ErrorKind::ConnectionReset),
        "a client that stopped reading is reset, not sent a FIN"
    );
}

// [HB-5.6] (f) The same with more than the kernel's buffers take, and one Ping once they are full: bob's output
// waits in the server, so his Ping waits unread ((b)) and he is not closed for idleness but as a slow consumer.
// That close is a reset too.
#[test]
fn hb_5_6_a_slow_consumer_is_reset() {
    assert_eq!(
        stop_reading_then_see_how_the_connection_ends(1500, true),
        Some(ErrorKind::ConnectionReset),
        "a slow consumer is reset, not sent a FIN"
    );
}

// [HB-5.6] A reader that is slow but keeps reading (and pinging) is not a slow consumer: it catches up a
// backlog that takes several idle timeouts to read, and is not closed.
#[test]
fn hb_5_6_slow_but_steady_reader_is_not_a_slow_consumer() {
    let idle = Duration::from_secs(2);
    let server = start_with(|cfg| {
        cfg.idle_timeout = idle;
        fast_senders(cfg);
    });
    let mut alice = online(&server, "alice");
    server.register("bob");
    let items = texts("s", 400, 8000);
    let sent = send_pipelined(&mut alice, "bob", &items, 64);

    // Bob on a raw socket, so that every byte he reads is accounted for here.
    let mut raw = std::net::TcpStream::connect(server.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut login = Vec::new();
    Request::Login {
        username: "bob".into(),
        password: PASSWORD.into(),
        device: "phone".into(),
        last_seen: 0,
    }
    .encode(1, &mut login);
    raw.write_all(&login).unwrap();
    let mut ping = Vec::new();
    Request::Ping.encode(5, &mut ping);

    // Read at about 400 KB/s (the backlog is 3.2 MB: about 8 s, four idle timeouts), pinging every 300 ms.
    let mut bytes = Vec::new();
    let mut parsed = 0;
    let mut messages = Vec::new();
    let mut caught_up = false;
    let mut buf = [0u8; 16 * 1024];
    let started = Instant::now();
    let mut last_ping = Instant::now();
    let closed = loop {
        if last_ping.elapsed() > Duration::from_millis(300) {
            if raw.write_all(&ping).is_err() {
                break true;
            }
            last_ping = Instant::now();
        }
        match raw.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break false
            }
            Err(_) => break true,
        }
        while let Ok(Some(frame)) = hubbub::framing::split_frame(
            &bytes[parsed..],
            16 << 20,
            hubbub::protocol::is_packet_kind,
        ) {
            match Packet::decode(&frame.header, frame.body).unwrap() {
                Packet::Deliver(m) => messages.push(m.id),
                Packet::CaughtUp { .. } => caught_up = true,
                Packet::Error { code, text } => panic!(
                    "error {code} ({text}) after {} of {} messages, {:?}",
                    messages.len(),
                    sent.len(),
                    started.elapsed()
                ),
                _ => {}
            }
            parsed += frame.len;
        }
        if caught_up || started.elapsed() > Duration::from_secs(40) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(40));
    };
    println!(
        "slow reader: {} bytes, {} messages in {:?}, closed: {closed}",
        bytes.len(),
        messages.len(),
        started.elapsed()
    );
    assert!(
        !closed,
        "a reader making steady progress was closed after {:?} and {} of {} messages",
        started.elapsed(),
        messages.len(),
        sent.len()
    );
    assert_eq!(messages, sent, "every message, in order");
    assert!(caught_up);
}

// [HB-5.6] A message whose frame alone is bigger than out_high_water, to an idle session with empty output,
// still arrives: the session falls back to the feed, and with its output already below out_low_water it must
// get its page at once.
#[test]
fn hb_5_6_message_bigger_than_the_high_water_mark_still_arrives() {
    let server = start_with(|cfg| {
        cfg.out_high_water = 4096;
        cfg.out_low_water = 1024;
        cfg.max_text = 8192;
    });
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    let big = text_of("big", 6000);
    let (id, _) = alice.send_message("bob", 1, &big).unwrap();
    match bob.next_message(Duration::from_secs(3)) {
        Ok(m) => assert_eq!((m.id, m.text.len()), (id, 6000)),
        Err(e) => {
            // Diagnosis: any frame from bob makes the server flush his (empty) output, which asks for the page.
            bob.ping().unwrap();
            let after_ping = bob
                .next_message(Duration::from_secs(3))
                .map(|m| (m.id, m.text.len()));
            panic!(
                "a 6000-byte message to an idle session with a 4 KiB high-water mark did not arrive in 3 s \
                 ({e}); after bob sent a Ping: {after_ping:?}"
            );
        }
    }
}

// [HB-5.6] One catch-up page far bigger than what the loop writes to a socket in one turn (256 KiB): the rest goes
// out over the following turns without the client sending anything, so the whole backlog and its CaughtUp arrive.
#[test]
fn hb_5_6_a_page_larger_than_several_write_turns_arrives_whole() {
    let server = start_with(|cfg| {
        cfg.feed_page = 200;
        cfg.max_text = 8192;
        fast_senders(cfg);
    });
    let mut alice = online(&server, "alice");
    server.register("bob");
    send_pipelined(&mut alice, "bob", &texts("page", 200, 8000), 50);
    let mut bob = server.login("bob", "laptop");
    let (messages, _) = catch_up(&mut bob);
    assert_eq!(messages.len(), 200, "1.6 MB in one page, all of it");
    assert!(messages.iter().all(|m| m.text.len() == 8000));
}

// -------------------------------------------------------------------------------------------------------------
// [HB-5.7] History
// -------------------------------------------------------------------------------------------------------------

// [HB-5.7] Pages of 100 walk a 250-message conversation (both directions) newest first without gap or
// overlap; `more` is false on the last page; other conversations are not included.
#[test]
fn hb_5_7_history_pages_cover_the_conversation() {
    let server = start_with(fast_senders);
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    let mut carol = online(&server, "carol");
    let mut all = Vec::new();
    for round in 0..25u64 {
        let a: Vec<(u64, String)> = (0..5)
            .map(|i| (round * 10 + i, format!("a{round}.{i}")))
            .collect();
        all.extend(send_pipelined(&mut alice, "bob", &a, 5));
        let b: Vec<(u64, String)> = (0..5)
            .map(|i| (round * 10 + i, format!("b{round}.{i}")))
            .collect();
        all.extend(send_pipelined(&mut bob, "alice", &b, 5));
        carol
            .send_message("alice", round, "not in this conversation")
            .unwrap();
    }
    assert_eq!(all.len(), 250);

    for (who, c, peer) in [("alice", &mut alice, "bob"), ("bob", &mut bob, "alice")] {
        let mut seen: Vec<u64> = Vec::new();
        let mut before = 0;
        let mut pages = Vec::new();
        loop {
            let (page, more) = c.history(peer, before, 100).unwrap();
            pages.push((page.len(), more));
            for m in &page {
                assert!(
                    (m.sender == "alice" && m.recipient == "bob")
                        || (m.sender == "bob" && m.recipient == "alice"),
                    "{who}: {m:?}"
                );
                if before != 0 {
                    assert!(m.id < before);
                }
                if let Some(&last) = seen.last() {
                    assert!(
                        m.id < last,
                        "{who}: ids must strictly decrease across pages"
                    );
                }
                seen.push(m.id);
            }
            if !more {
                break;
            }
            before = page.last().expect("a page with more is not empty").id;
        }
        assert_eq!(pages, vec![(100, true), (100, true), (50, false)], "{who}");
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        let mut expected = all.clone();
        expected.sort_unstable();
        assert_eq!(
            sorted, expected,
            "{who}: the pages are the whole conversation"
        );
    }

    // Clamping: 0 means 1, above 100 means 100; before the oldest there is nothing.
    let (page, more) = alice.history("bob", 0, 0).unwrap();
    assert_eq!(
        (ids_of(&page), more),
        (vec![*all.iter().max().unwrap()], true)
    );
    let (page, more) = alice.history("bob", 0, 1000).unwrap();
    assert_eq!((page.len(), more), (100, true));
    let (page, more) = alice
        .history("bob", *all.iter().min().unwrap(), 100)
        .unwrap();
    assert!(page.is_empty() && !more);
    let (page, more) = alice.history("bob", u64::MAX, 100).unwrap();
    assert_eq!((page.len(), more), (100, true));
    // A conversation with someone never written to is empty, not an error.
    server.register("dave");
    let (page, more) = alice.history("dave", 0, 10).unwrap();
    assert!(page.is_empty() && !more);
}

// -------------------------------------------------------------------------------------------------------------
// [HB-5.8] Errors
// -------------------------------------------------------------------------------------------------------------

// [HB-5.8] NOT_AUTHENTICATED (101) for every message request before login; the connection stays usable.
#[test]
fn hb_5_8_not_authenticated() {
    let server = start();
    server.register("bob");
    let mut c = server.connect();
    assert_eq!(
        code_of(c.send_message("bob", 1, "hi")),
        code::NOT_AUTHENTICATED
    );
    assert_eq!(code_of(c.received(1)), code::NOT_AUTHENTICATED);
    assert_eq!(code_of(c.read("bob", 1)), code::NOT_AUTHENTICATED);
    assert_eq!(code_of(c.history("bob", 0, 10)), code::NOT_AUTHENTICATED);
    c.ping().unwrap();
    c.login("bob", PASSWORD, "phone", 0).unwrap();
}

// [HB-5.8] UNKNOWN_RECIPIENT (120), EMPTY_TEXT (121), TEXT_TOO_LONG (122, in bytes, at max_text); none of them
// stores or delivers anything, and the connection stays open.
#[test]
fn hb_5_8_error_codes_for_bad_sends() {
    let server = start_with(|cfg| cfg.max_text = 100);
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");

    assert_eq!(
        code_of(alice.send_message("nobody", 1, "hi")),
        code::UNKNOWN_RECIPIENT
    );
    assert_eq!(
        code_of(alice.send_message("not a name!", 2, "hi")),
        code::UNKNOWN_RECIPIENT
    );
    assert_eq!(
        code_of(alice.send_message("x", 3, "hi")),
        code::UNKNOWN_RECIPIENT
    );
    assert_eq!(
        code_of(alice.history("nobody", 0, 10)),
        code::UNKNOWN_RECIPIENT
    );
    assert_eq!(code_of(alice.send_message("bob", 4, "")), code::EMPTY_TEXT);
    assert_eq!(
        code_of(alice.send_message("bob", 5, &"x".repeat(101))),
        code::TEXT_TOO_LONG
    );
    assert_eq!(
        code_of(alice.send_message("bob", 6, &"é".repeat(51))),
        code::TEXT_TOO_LONG,
        "bytes, not chars"
    );
    assert_no_deliver(&mut bob, "bob");

    let (a, _) = alice.send_message("bob", 7, &"x".repeat(100)).unwrap();
    let (b, _) = alice.send_message("bob", 8, &"é".repeat(50)).unwrap();
    assert_eq!(next_msg(&mut bob).id, a);
    assert_eq!(next_msg(&mut bob).text, "é".repeat(50));
    // A refused client id was not used up: it can be sent for real afterwards.
    let (c, _) = alice.send_message("bob", 4, "now with text").unwrap();
    assert!(c > b);
    let (page, _) = bob.history("alice", 0, 100).unwrap();
    assert_eq!(ids_of(&page), vec![c, b, a]);
}

// [HB-5.8] RATE_LIMITED (108): with send_rate 5 and send_burst 5 the sixth immediate Send is refused; after a
// second, sends work again. Refused sends are not stored.
#[test]
fn hb_5_8_rate_limit() {
    let server = start_with(|cfg| {
        cfg.send_rate = 5;
        cfg.send_burst = 5;
    });
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");

    let mut burst = Vec::new();
    for i in 1..=6u64 {
        send_req("bob", i, &format!("burst {i}")).encode(i as u32 + 100, &mut burst);
    }
    alice.send_raw(&burst).unwrap();
    let mut acked: Vec<u64> = (1..=5u32).map(|i| ack_id(&mut alice, i + 100)).collect();
    assert_eq!(code_of(alice.wait_reply(106, WAIT)), code::RATE_LIMITED);

    std::thread::sleep(Duration::from_millis(1100));
    let (later, _) = alice.send_message("bob", 7, "after a second").unwrap();
    acked.push(later);

    let got: Vec<u64> = (0..6).map(|_| next_msg(&mut bob).id).collect();
    assert_eq!(got, acked);
    assert_no_deliver(&mut bob, "bob");
    let (page, _) = bob.history("alice", 0, 100).unwrap();
    assert_eq!(page.len(), 6, "the refused send was not stored");
    assert!(page.iter().all(|m| m.text != "burst 6"));
    // The refused client id was not used up.
    let (freed, _) = alice.send_message("bob", 6, "burst 6, again").unwrap();
    assert!(freed > later);
}

// [HB-5.3] [HB-5.5] A live session's own acknowledged message moves its cursor: Received for the acked id
// raises the delivered cursor, so a later login from the delivered cursor does not replay the user's own
// messages to them.
#[test]
fn hb_5_3_an_ack_moves_a_live_senders_cursor() {
    let server = start();
    server.register("bob");
    let mut alice = online(&server, "alice");
    let (id, _) = alice.send_message("bob", 1, "mine").unwrap();
    alice.received(id).unwrap();
    drop(alice);
    let mut again = server.login("alice", "test");
    let (replayed, cursor) = catch_up(&mut again);
    assert!(replayed.is_empty(), "own message replayed: {replayed:?}");
    assert_eq!(cursor, id);
}

// [HB-5.1] [HB-8] The store queue at its edge: while the store cannot take more jobs (its queue of 2 is full
// and the database is locked by someone else), the loop stops reading frames — from every session, so even a
// Ping waits — and drops nothing; once the database is free every Send is acked and delivered exactly once.
#[test]
fn hb_8_a_full_store_queue_pauses_reading_and_loses_nothing() {
    let server = start_with(|cfg| {
        cfg.store_queue = 2;
        cfg.commit_batch = 1;
        fast_senders(cfg);
    });
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    let mut probe = online(&server, "carol");

    // Another connection holds the write lock: the store thread waits in its busy handler.
    let locker = rusqlite::Connection::open(&server.config.db).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();

    let rids: Vec<u32> = (1..=50u64)
        .map(|cid| {
            alice
                .send_request(&send_req("bob", cid, &format!("m{cid}")))
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let ping = probe.send_request(&Request::Ping).unwrap();
    assert!(
        matches!(
            probe.wait_reply(ping, Duration::from_millis(400)),
            Err(ClientError::Timeout)
        ),
        "a Ping was answered while the store queue was full: the loop kept reading"
    );

    locker.execute_batch("COMMIT").unwrap();
    assert!(matches!(probe.wait_reply(ping, WAIT), Ok(Packet::Pong)));
    let acked: Vec<u64> = rids
        .into_iter()
        .map(|rid| ack_id(&mut alice, rid))
        .collect();
    let delivered: Vec<u64> = (0..50).map(|_| next_msg(&mut bob).id).collect();
    assert_eq!(delivered, acked, "every acked message, once, in order");
    assert_strictly_increasing(&acked, "acked ids");
}
