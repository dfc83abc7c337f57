//! `Client::split`: a logged-in client split into a `FrameReader` and a `RequestWriter` on two threads.
//!
//! Nothing the client received before the split is lost (it comes out of the reading half first, in arrival
//! order), and requests written on one thread are answered on the other with the ids the writer returned.

mod common;

use hubbub::client::{ClientError, DEFAULT_TIMEOUT};
use hubbub::protocol::{Packet, Request};
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn frames_received_before_the_split_come_first_in_arrival_order() {
    let server = common::start();
    let mut alice = server.user("alice");
    let mut bob = server.user("bob");
    // Live from here: a message to bob is pushed to him when it is stored.
    loop {
        if let Packet::CaughtUp { .. } = bob.next_push(DEFAULT_TIMEOUT).unwrap() {
            break;
        }
    }
    // The server queues the Deliver to bob before the Ack to alice, so it is ahead of anything bob asks next.
    alice.send_message("bob", 1, "before the split").unwrap();
    let first = bob.send_request(&Request::Ping).unwrap();
    let second = bob.send_request(&Request::Ping).unwrap();
    // Waiting for the second Pong keeps the Deliver (a push) and the first Pong (a reply) in the client.
    assert_eq!(
        bob.wait_reply(second, DEFAULT_TIMEOUT).unwrap(),
        Packet::Pong
    );

    let (mut reader, mut writer) = bob.split().unwrap();
    match reader.recv(Duration::ZERO).unwrap() {
        (0, Packet::Deliver(m)) => {
            assert_eq!(
                (m.sender.as_str(), m.text.as_str()),
                ("alice", "before the split")
            )
        }
        other => panic!("expected the Deliver kept before the split, got {other:?}"),
    }
    assert_eq!(reader.recv(Duration::ZERO).unwrap(), (first, Packet::Pong));
    // Nothing else is waiting, and the writer carries on the ids used before the split.
    assert!(matches!(
        reader.recv(Duration::from_millis(100)),
        Err(ClientError::Timeout)
    ));
    assert_eq!(writer.next_request_id(), second + 1);
    let third = writer.send_request(&Request::Ping).unwrap();
    assert_eq!(third, second + 1);
    assert_eq!(reader.recv(DEFAULT_TIMEOUT).unwrap(), (third, Packet::Pong));
}

#[test]
fn requests_from_the_writing_thread_are_answered_on_the_reading_half() {
    let server = common::start();
    let mut alice = server.user("alice");
    let bob = server.user("bob");
    let (mut reader, mut writer) = bob.split().unwrap();

    const REQUESTS: usize = 50;
    let sender = std::thread::spawn(move || {
        (0..REQUESTS)
            .map(|i| {
                let request = if i % 2 == 0 {
                    Request::Ping
                } else {
                    Request::Stats
                };
                (writer.send_request(&request).unwrap(), i % 2 == 0)
            })
            .collect::<Vec<(u32, bool)>>()
    });
    // A push interleaved with the replies is delivered on the same half.
    alice.send_message("bob", 1, "while bob is busy").unwrap();

    let mut replies = Vec::new();
    let mut delivered = false;
    while replies.len() < REQUESTS || !delivered {
        match reader.recv(DEFAULT_TIMEOUT).unwrap() {
            (0, Packet::Deliver(m)) => {
                assert_eq!(m.text, "while bob is busy");
                delivered = true;
            }
            (0, _) => {} // CaughtUp, presence and the like
            (id, packet) => replies.push((id, packet)),
        }
    }
    let sent = sender.join().unwrap();
    let ids: Vec<u32> = replies.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        sent.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        "one reply per request, in order"
    );
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), REQUESTS);
    for ((_, packet), (_, ping)) in replies.iter().zip(&sent) {
        match packet {
            Packet::Pong => assert!(ping, "a Pong answered a Stats"),
            Packet::StatsReply(_) => assert!(!ping, "a StatsReply answered a Ping"),
            other => panic!("unexpected reply {other:?}"),
        }
    }
}
