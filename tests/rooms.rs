//! Rooms ([HB-10]), presence ([HB-11]), typing ([HB-12]) and stats ([HB-13]) end to end, against a real server
//! on 127.0.0.1:0: membership and its events, room messages through the cursor feed, history windows, listing,
//! the configured limits at their edges, watch/unwatch, typing notices and their rate limit, and the counters.

mod common;

use common::{code_of, eventually, start, start_in, start_with, TestServer, PASSWORD};
use hubbub::client::{Client, ClientError};
use hubbub::protocol::{
    code, presence, room_event, Member, Message, Packet, PresenceEntry, Request, RoomInfo,
    RoomMessage,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WAIT: Duration = Duration::from_secs(10);

// -------------------------------------------------------------------------------------------------------------
// Helpers
// -------------------------------------------------------------------------------------------------------------

/// One message of the cursor feed: a direct message (Deliver) or a room message (RoomDeliver).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Item {
    Direct(Message),
    Room(RoomMessage),
}

impl Item {
    fn id(&self) -> u64 {
        match self {
            Item::Direct(m) => m.id,
            Item::Room(m) => m.id,
        }
    }
}

/// A new user, registered, logged in, and past the CaughtUp that ends its (empty) catch-up.
fn online(server: &TestServer, name: &str) -> Client {
    let mut c = server.user(name);
    let (items, _) = catch_up(&mut c);
    assert!(items.is_empty(), "a new user has no messages: {items:?}");
    c
}

/// Another session of an existing user, past its catch-up (whatever that brought).
fn device(server: &TestServer, name: &str, device: &str) -> Client {
    let mut c = server.login(name, device);
    catch_up(&mut c);
    c
}

/// Reads pushes until CaughtUp: the feed items pushed before it, in arrival order, and its cursor. Receipts are
/// skipped; anything else fails the test.
fn catch_up(c: &mut Client) -> (Vec<Item>, u64) {
    let mut items = Vec::new();
    loop {
        match c.next_push(WAIT) {
            Ok(Packet::Deliver(m)) => items.push(Item::Direct(m)),
            Ok(Packet::RoomDeliver(m)) => items.push(Item::Room(m)),
            Ok(Packet::CaughtUp { cursor }) => return (items, cursor),
            Ok(Packet::DeliveryReceipt { .. }) | Ok(Packet::ReadReceipt { .. }) => {}
            other => panic!("while catching up (after {} items): {other:?}", items.len()),
        }
    }
}

/// Every push that reached `c` before the answer to a Ping sent now. Whatever the server did for requests
/// already answered (to any client) is in this client's output before the Pong: the loop is one thread and
/// each session's output is in order. So this is "everything pushed so far", without waiting for a quiet spell.
fn settle(c: &mut Client) -> Vec<Packet> {
    c.ping().unwrap();
    let mut got = Vec::new();
    loop {
        match c.next_push(Duration::ZERO) {
            Ok(p) => got.push(p),
            Err(ClientError::Timeout) => return got,
            Err(e) => panic!("while settling: {e}"),
        }
    }
}

/// Waits for the first push that `pick` accepts; other pushes are skipped. Fails the test after WAIT.
fn wait_for<T>(c: &mut Client, what: &str, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_push(left) {
            Ok(p) => {
                if let Some(t) = pick(&p) {
                    return t;
                }
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

/// `settle` for several clients, in the order given, when only the draining matters.
fn settle_all<'a>(cs: impl IntoIterator<Item = &'a mut Client>) {
    for c in cs {
        settle(c);
    }
}

// One picker per push type: for `wait_for` and for the lists below.

fn as_room_msg(p: &Packet) -> Option<RoomMessage> {
    match p {
        Packet::RoomDeliver(m) => Some(m.clone()),
        _ => None,
    }
}

fn as_room_event(p: &Packet) -> Option<(String, u8, String)> {
    match p {
        Packet::RoomEvent { room, event, user } => Some((room.clone(), *event, user.clone())),
        _ => None,
    }
}

fn as_room_closed(p: &Packet) -> Option<String> {
    match p {
        Packet::RoomClosed { room } => Some(room.clone()),
        _ => None,
    }
}

fn as_typing(p: &Packet) -> Option<(String, String)> {
    match p {
        Packet::TypingNotice { from, room } => Some((from.clone(), room.clone())),
        _ => None,
    }
}

fn as_presence(p: &Packet) -> Option<PresenceEntry> {
    match p {
        Packet::Presence(e) => Some(e.clone()),
        _ => None,
    }
}

fn next_room_msg(c: &mut Client) -> RoomMessage {
    wait_for(c, "a RoomDeliver", as_room_msg)
}

fn room_delivers(pushes: &[Packet]) -> Vec<RoomMessage> {
    pushes.iter().filter_map(as_room_msg).collect()
}

fn room_events(pushes: &[Packet]) -> Vec<(String, u8, String)> {
    pushes.iter().filter_map(as_room_event).collect()
}

fn room_closed(pushes: &[Packet]) -> Vec<String> {
    pushes.iter().filter_map(as_room_closed).collect()
}

fn typing_notices(pushes: &[Packet]) -> Vec<(String, String)> {
    pushes.iter().filter_map(as_typing).collect()
}

fn presences(pushes: &[Packet]) -> Vec<PresenceEntry> {
    pushes.iter().filter_map(as_presence).collect()
}

/// How many members `room` has now, as `c` is told.
fn member_count(c: &mut Client, room: &str) -> usize {
    c.room_members(room).unwrap().len()
}

fn event(room: &str, kind: u8, user: &str) -> (String, u8, String) {
    (room.to_owned(), kind, user.to_owned())
}

fn member(username: &str, online: bool) -> Member {
    Member {
        username: username.to_owned(),
        online,
    }
}

fn room_msg(id: u64, room: &str, sender: &str, timestamp_ms: u64, text: &str) -> RoomMessage {
    RoomMessage {
        id,
        room: room.to_owned(),
        sender: sender.to_owned(),
        timestamp_ms,
        text: text.to_owned(),
    }
}

fn ids_of(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.id).collect()
}

fn names_of(rooms: &[RoomInfo]) -> Vec<String> {
    rooms.iter().map(|r| r.name.clone()).collect()
}

fn stats_map(c: &mut Client) -> BTreeMap<String, u64> {
    c.stats().unwrap().into_iter().collect()
}

fn stat(c: &mut Client, name: &str) -> u64 {
    *stats_map(c)
        .get(name)
        .unwrap_or_else(|| panic!("no counter named {name}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A room hosted by `host` with the given members joined (each member's JoinRoom answered).
fn room_with(host: &mut Client, name: &str, members: &mut [&mut Client]) {
    host.create_room(name, "").unwrap();
    for m in members.iter_mut() {
        m.join_room(name).unwrap();
    }
}

// -------------------------------------------------------------------------------------------------------------
// [HB-10] Create, join, leave, kick, close
// -------------------------------------------------------------------------------------------------------------

// [HB-10] CreateRoom answers RoomInfo; the creator is the host and only member. Names follow the username rules
// and are case-insensitive ([HB-10.1]); a taken name, a bad name and a long topic are refused and store nothing.
#[test]
fn hb_10_create_room_makes_the_caller_host_and_member() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");

    let info = alice.create_room("Lounge", "about things").unwrap();
    assert!(info.room_id > 0);
    assert_eq!(
        info,
        RoomInfo {
            room_id: info.room_id,
            name: "lounge".into(),
            topic: "about things".into(),
            host: "alice".into(),
            member_count: 1,
            closed: false,
        }
    );
    assert_eq!(
        alice.room_members("lounge").unwrap(),
        vec![member("alice", true)]
    );
    // The host is a member: they may post, and the room's history has it.
    let (id, _) = alice.send_room("LOUNGE", 1, "first").unwrap();
    let (page, more) = alice.room_history("lounge", 0, 10).unwrap();
    assert_eq!(ids_of(&page), vec![id]);
    assert!(!more);
    assert_eq!(page[0].recipient, "lounge");

    // Taken, whoever asks and however it is spelled.
    assert_eq!(
        code_of(bob.create_room("LOUNGE", "")),
        code::ROOM_NAME_TAKEN
    );
    assert_eq!(
        code_of(alice.create_room("lounge", "")),
        code::ROOM_NAME_TAKEN
    );
    // Names: 3-32 of a-z 0-9 _ . -
    let too_long = "r".repeat(33);
    for bad in [
        "",
        "ab",
        "has space",
        "émigré",
        "semi;colon",
        too_long.as_str(),
    ] {
        assert_eq!(
            code_of(bob.create_room(bad, "")),
            code::INVALID_ROOM_NAME,
            "room name {bad:?}"
        );
    }
    let longest = "r".repeat(32);
    assert_eq!(bob.create_room(&longest, "").unwrap().name, longest);
    assert_eq!(bob.create_room("a.b-c_9", "").unwrap().name, "a.b-c_9");
    // Topics: at most 256 bytes, without control characters.
    let topic = "t".repeat(256);
    assert_eq!(bob.create_room("topical", &topic).unwrap().topic, topic);
    let topic = "t".repeat(257);
    assert_eq!(
        code_of(bob.create_room("too-topical", &topic)),
        code::TEXT_TOO_LONG
    );
    assert_eq!(
        code_of(bob.create_room("bell", "ding\u{7}")),
        code::TEXT_TOO_LONG
    );

    // Only the rooms that were accepted exist.
    let (rooms, more) = bob.list_rooms("", 100).unwrap();
    assert!(!more);
    let mut expected = vec![
        "a.b-c_9".to_owned(),
        "lounge".to_owned(),
        longest,
        "topical".to_owned(),
    ];
    expected.sort();
    assert_eq!(names_of(&rooms), expected);
}

// [HB-10] JoinRoom answers RoomInfo and tells the members online a RoomEvent JOINED. Joining again is harmless:
// the same answer, no event. An unknown room is NO_SUCH_ROOM.
#[test]
fn hb_10_join_announces_to_online_members_and_twice_is_harmless() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    let mut carol = online(&server, "carol");
    let created = alice.create_room("lounge", "hi").unwrap();

    let info = bob.join_room("Lounge").unwrap();
    assert_eq!(
        info,
        RoomInfo {
            member_count: 2,
            ..created.clone()
        }
    );
    assert_eq!(
        room_events(&settle(&mut alice)),
        vec![event("lounge", room_event::JOINED, "bob")]
    );
    settle(&mut bob);

    let info = carol.join_room("lounge").unwrap();
    assert_eq!(info.member_count, 3);
    assert_eq!(info.host, "alice");
    for (who, c) in [("alice", &mut alice), ("bob", &mut bob)] {
        assert_eq!(
            room_events(&settle(c)),
            vec![event("lounge", room_event::JOINED, "carol")],
            "{who}"
        );
    }
    settle(&mut carol);

    // Again: the room as it is, and nobody is told anything.
    let again = bob.join_room("lounge").unwrap();
    assert_eq!(again.member_count, 3);
    assert_eq!(again.room_id, created.room_id);
    for (who, c) in [
        ("alice", &mut alice),
        ("bob", &mut bob),
        ("carol", &mut carol),
    ] {
        let pushes = settle(c);
        assert!(room_events(&pushes).is_empty(), "{who}: {pushes:?}");
    }
    assert_eq!(
        alice.room_members("lounge").unwrap(),
        vec![
            member("alice", true),
            member("bob", true),
            member("carol", true)
        ]
    );

    assert_eq!(code_of(bob.join_room("nowhere")), code::NO_SUCH_ROOM);
    assert_eq!(code_of(bob.join_room("no")), code::INVALID_ROOM_NAME);
}

// [HB-10] LeaveRoom answers Ok and the members are told LEFT; the leaver gets no more room messages and can no
// longer post. Leaving a room one is not in is NOT_MEMBER.
#[test]
fn hb_10_leave_announces_and_stops_delivery() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    let mut carol = online(&server, "carol");
    let mut dave = online(&server, "dave");
    room_with(&mut alice, "lounge", &mut [&mut bob, &mut carol]);
    settle_all([&mut alice, &mut bob, &mut carol]);

    bob.leave_room("Lounge").unwrap();
    for (who, c) in [("alice", &mut alice), ("carol", &mut carol)] {
        assert_eq!(
            room_events(&settle(c)),
            vec![event("lounge", room_event::LEFT, "bob")],
            "{who}"
        );
    }
    settle(&mut bob);

    let (id, ts) = alice.send_room("lounge", 1, "bob is gone").unwrap();
    assert_eq!(
        room_delivers(&settle(&mut carol)),
        vec![room_msg(id, "lounge", "alice", ts, "bob is gone")]
    );
    let pushes = settle(&mut bob);
    assert!(room_delivers(&pushes).is_empty(), "bob: {pushes:?}");
    assert_eq!(
        code_of(bob.send_room("lounge", 1, "still here?")),
        code::NOT_MEMBER
    );

    assert_eq!(code_of(bob.leave_room("lounge")), code::NOT_MEMBER);
    assert_eq!(code_of(dave.leave_room("lounge")), code::NOT_MEMBER);
    assert_eq!(code_of(dave.leave_room("nowhere")), code::NO_SUCH_ROOM);
    assert_eq!(
        alice.room_members("lounge").unwrap(),
        vec![member("alice", true), member("carol", true)]
    );
    // The host may leave too; the room stays open with the same host.
    alice.leave_room("lounge").unwrap();
    assert_eq!(
        room_events(&settle(&mut carol)),
        vec![event("lounge", room_event::LEFT, "alice")]
    );
    let (rooms, _) = carol.list_rooms("", 10).unwrap();
    assert_eq!(rooms.len(), 1);
    assert_eq!(
        (rooms[0].host.as_str(), rooms[0].member_count),
        ("alice", 1)
    );
    assert!(!rooms[0].closed);
}

// [HB-10] Kick is the host's alone (NOT_HOST for anyone else). Every session of the kicked user gets RoomEvent
// KICKED and no more room messages; the members are told too. The host cannot be kicked. A kick is not a ban:
// the kicked user may join again and then gets the room's new messages.
#[test]
fn hb_10_kick_by_host_only_and_the_kicked_may_rejoin() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob1 = online(&server, "bob");
    let mut bob2 = device(&server, "bob", "phone");
    let mut carol = online(&server, "carol");
    room_with(&mut alice, "lounge", &mut [&mut bob1, &mut carol]);
    settle_all([&mut alice, &mut bob1, &mut bob2, &mut carol]);

    assert_eq!(code_of(carol.kick("lounge", "bob")), code::NOT_HOST);
    assert_eq!(code_of(bob2.kick("lounge", "carol")), code::NOT_HOST);
    // The host names themselves: refused (they leave instead), and they stay host and member.
    assert_eq!(code_of(alice.kick("lounge", "alice")), code::NOT_MEMBER);
    assert_eq!(
        code_of(alice.kick("lounge", "nobody")),
        code::UNKNOWN_RECIPIENT
    );
    assert_eq!(code_of(alice.kick("nowhere", "bob")), code::NO_SUCH_ROOM);
    assert_eq!(member_count(&mut alice, "lounge"), 3);
    for c in [&mut alice, &mut bob1, &mut bob2, &mut carol] {
        let pushes = settle(c);
        assert!(room_events(&pushes).is_empty(), "{pushes:?}");
    }

    alice.kick("lounge", "Bob").unwrap();
    let kicked = vec![event("lounge", room_event::KICKED, "bob")];
    for (who, c) in [
        ("bob1", &mut bob1),
        ("bob2", &mut bob2),
        ("carol", &mut carol),
    ] {
        assert_eq!(room_events(&settle(c)), kicked, "{who}");
    }
    assert_eq!(
        alice.room_members("lounge").unwrap(),
        vec![member("alice", true), member("carol", true)]
    );

    let (id, _) = alice.send_room("lounge", 1, "without bob").unwrap();
    assert_eq!(next_room_msg(&mut carol).id, id);
    for (who, c) in [("bob1", &mut bob1), ("bob2", &mut bob2)] {
        let pushes = settle(c);
        assert!(room_delivers(&pushes).is_empty(), "{who}: {pushes:?}");
    }
    assert_eq!(
        code_of(bob1.send_room("lounge", 1, "hey")),
        code::NOT_MEMBER
    );
    assert_eq!(code_of(alice.kick("lounge", "bob")), code::NOT_MEMBER);

    // Not a ban.
    assert_eq!(bob2.join_room("lounge").unwrap().member_count, 3);
    let (id2, ts2) = alice.send_room("lounge", 2, "welcome back").unwrap();
    let expected = room_msg(id2, "lounge", "alice", ts2, "welcome back");
    for (who, c) in [("bob1", &mut bob1), ("bob2", &mut bob2)] {
        assert_eq!(room_delivers(&settle(c)), vec![expected.clone()], "{who}");
    }
    // What was posted while bob was out stays out of his reach.
    let (page, _) = bob1.room_history("lounge", 0, 100).unwrap();
    assert_eq!(ids_of(&page), vec![id2]);
}

// [HB-10] CloseRoom is the host's alone; every member's sessions get RoomClosed. A closed room takes no more
// messages or members (ROOM_CLOSED), keeps its name, is listed as closed, and its history stays readable to
// those who were members.
#[test]
fn hb_10_close_notifies_members_and_freezes_the_room() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob1 = online(&server, "bob");
    let mut bob2 = device(&server, "bob", "phone");
    let mut carol = online(&server, "carol");
    let mut dave = online(&server, "dave");
    let mut erin = online(&server, "erin");
    room_with(
        &mut alice,
        "lounge",
        &mut [&mut bob1, &mut carol, &mut erin],
    );
    let (m1, _) = alice.send_room("lounge", 1, "before the end").unwrap();
    erin.leave_room("lounge").unwrap();
    let (m2, _) = bob1.send_room("lounge", 1, "last words").unwrap();
    settle_all([&mut alice, &mut bob1, &mut bob2, &mut carol, &mut erin]);

    assert_eq!(code_of(bob1.close_room("lounge")), code::NOT_HOST);
    assert_eq!(code_of(dave.close_room("lounge")), code::NOT_HOST);
    assert_eq!(code_of(alice.close_room("nowhere")), code::NO_SUCH_ROOM);

    alice.close_room("Lounge").unwrap();
    for (who, c) in [
        ("alice", &mut alice),
        ("bob1", &mut bob1),
        ("bob2", &mut bob2),
        ("carol", &mut carol),
    ] {
        assert_eq!(room_closed(&settle(c)), vec!["lounge".to_owned()], "{who}");
    }
    // Erin had left and dave never joined: not told.
    for (who, c) in [("dave", &mut dave), ("erin", &mut erin)] {
        let pushes = settle(c);
        assert!(room_closed(&pushes).is_empty(), "{who}: {pushes:?}");
    }

    assert_eq!(
        code_of(alice.send_room("lounge", 2, "hello?")),
        code::ROOM_CLOSED
    );
    assert_eq!(
        code_of(carol.send_room("lounge", 1, "hello?")),
        code::ROOM_CLOSED
    );
    assert_eq!(code_of(dave.join_room("lounge")), code::ROOM_CLOSED);
    assert_eq!(code_of(erin.join_room("lounge")), code::ROOM_CLOSED);
    assert_eq!(code_of(alice.close_room("lounge")), code::ROOM_CLOSED);
    assert_eq!(
        code_of(dave.create_room("lounge", "")),
        code::ROOM_NAME_TAKEN
    );
    for c in [&mut alice, &mut bob1, &mut carol] {
        let pushes = settle(c);
        assert!(room_delivers(&pushes).is_empty(), "{pushes:?}");
    }

    // History: the members at close read all of it, erin what was posted while she was in, dave nothing.
    for c in [&mut alice, &mut bob2, &mut carol] {
        let (page, more) = c.room_history("lounge", 0, 10).unwrap();
        assert_eq!(ids_of(&page), vec![m2, m1]);
        assert!(!more);
    }
    let (page, _) = erin.room_history("lounge", 0, 10).unwrap();
    assert_eq!(ids_of(&page), vec![m1]);
    assert_eq!(
        code_of(dave.room_history("lounge", 0, 10)),
        code::NOT_MEMBER
    );

    let (rooms, _) = dave.list_rooms("", 10).unwrap();
    assert_eq!(rooms.len(), 1);
    assert!(rooms[0].closed);
    assert_eq!(rooms[0].member_count, 3, "the members at close");
}

// [HB-10] Only current members post; only members (current or former) read the history.
#[test]
fn hb_10_non_members_cannot_post_or_read() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut dave = online(&server, "dave");
    alice.create_room("lounge", "").unwrap();
    alice.send_room("lounge", 1, "members only").unwrap();

    assert_eq!(
        code_of(dave.send_room("lounge", 1, "let me in")),
        code::NOT_MEMBER
    );
    assert_eq!(
        code_of(dave.room_history("lounge", 0, 10)),
        code::NOT_MEMBER
    );
    assert_eq!(
        code_of(dave.send_room("nowhere", 2, "anyone?")),
        code::NO_SUCH_ROOM
    );
    assert_eq!(
        code_of(dave.room_history("nowhere", 0, 10)),
        code::NO_SUCH_ROOM
    );
    assert_eq!(
        code_of(dave.send_room("x", 3, "bad")),
        code::INVALID_ROOM_NAME
    );
    // The refused post was not stored: alice's history has one message, and dave's client id 1 is still free.
    let (page, _) = alice.room_history("lounge", 0, 10).unwrap();
    assert_eq!(page.len(), 1);
    dave.join_room("lounge").unwrap();
    let (id, _) = dave.send_room("lounge", 1, "now I'm in").unwrap();
    let (page, _) = alice.room_history("lounge", 0, 10).unwrap();
    assert_eq!(page[0].id, id);
    assert_eq!(page[0].text, "now I'm in");
}

// -------------------------------------------------------------------------------------------------------------
// [HB-10] Room messages through the cursor feed
// -------------------------------------------------------------------------------------------------------------

// [HB-10] A member who was offline gets the room's messages at the next login, as RoomDeliver pushes then
// CaughtUp — from the delivered cursor (last_seen 0) or from an explicit last_seen — and none posted before
// they joined. Afterwards they are live.
#[test]
fn hb_10_offline_member_catches_up_on_room_messages() {
    let server = start();
    let mut alice = online(&server, "alice");
    alice.create_room("lounge", "").unwrap();
    let (first, _) = alice.send_room("lounge", 1, "before bob").unwrap();
    let (before, _) = alice.send_room("lounge", 2, "also before bob").unwrap();
    {
        let mut bob = online(&server, "bob");
        bob.join_room("lounge").unwrap();
        bob.logout().unwrap();
    }
    let mut sent = Vec::new();
    for i in 0..3u64 {
        let text = format!("while bob is away {i}");
        let (id, ts) = alice.send_room("lounge", 10 + i, &text).unwrap();
        sent.push(Item::Room(room_msg(id, "lounge", "alice", ts, &text)));
    }
    assert!(sent.iter().all(|m| m.id() > before));

    // last_seen 0: from the delivered cursor (nothing confirmed yet).
    let mut bob = server.login("bob", "laptop");
    let (items, cursor) = catch_up(&mut bob);
    assert_eq!(items, sent);
    assert_eq!(cursor, sent[2].id());

    // An explicit last_seen: only what is past it.
    let mut bob2 = server.login_at("bob", "phone", sent[0].id());
    let (items, cursor) = catch_up(&mut bob2);
    assert_eq!(items, sent[1..].to_vec());
    assert_eq!(cursor, sent[2].id());

    // The delivered cursor covers room messages too.
    bob.received(sent[1].id()).unwrap();
    let mut bob3 = server.login("bob", "tablet");
    let (items, _) = catch_up(&mut bob3);
    assert_eq!(items, sent[2..].to_vec());

    // A last_seen from before joining does not reach back past the join.
    let mut bob4 = server.login_at("bob", "watch", first);
    let (items, _) = catch_up(&mut bob4);
    assert_eq!(items, sent);

    // Then live, on every session.
    let (id, ts) = alice.send_room("lounge", 20, "live").unwrap();
    let live = room_msg(id, "lounge", "alice", ts, "live");
    for (who, c) in [
        ("bob", &mut bob),
        ("bob2", &mut bob2),
        ("bob3", &mut bob3),
        ("bob4", &mut bob4),
    ] {
        assert_eq!(room_delivers(&settle(c)), vec![live.clone()], "{who}");
    }
}

// [HB-10] Room messages and direct messages share one id sequence and one feed: the catch-up brings them
// interleaved, in id order.
#[test]
fn hb_10_room_and_direct_messages_interleave_in_the_catch_up() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut carol = online(&server, "carol");
    alice.create_room("lounge", "").unwrap();
    carol.join_room("lounge").unwrap();
    {
        let mut bob = online(&server, "bob");
        bob.join_room("lounge").unwrap();
        bob.logout().unwrap();
    }
    let mut expected = Vec::new();
    let direct = |id: u64, sender: &str, ts: u64, text: &str| {
        Item::Direct(Message {
            id,
            sender: sender.into(),
            recipient: "bob".into(),
            timestamp_ms: ts,
            text: text.into(),
        })
    };
    let (id, ts) = alice.send_message("bob", 1, "d1").unwrap();
    expected.push(direct(id, "alice", ts, "d1"));
    let (id, ts) = alice.send_room("lounge", 2, "r1").unwrap();
    expected.push(Item::Room(room_msg(id, "lounge", "alice", ts, "r1")));
    let (id, ts) = carol.send_room("lounge", 1, "r2").unwrap();
    expected.push(Item::Room(room_msg(id, "lounge", "carol", ts, "r2")));
    let (id, ts) = carol.send_message("bob", 2, "d2").unwrap();
    expected.push(direct(id, "carol", ts, "d2"));
    // Not bob's: a direct message between the others.
    alice.send_message("carol", 3, "not for bob").unwrap();
    let (id, ts) = alice.send_room("lounge", 4, "r3").unwrap();
    expected.push(Item::Room(room_msg(id, "lounge", "alice", ts, "r3")));
    let (id, ts) = alice.send_message("bob", 5, "d3").unwrap();
    expected.push(direct(id, "alice", ts, "d3"));

    let mut bob = server.login("bob", "laptop");
    let (items, cursor) = catch_up(&mut bob);
    assert_eq!(items, expected);
    assert!(items.windows(2).all(|w| w[0].id() < w[1].id()));
    assert_eq!(cursor, expected.last().unwrap().id());
}

// [HB-10] A resend (same client id) gets the original id and timestamp, and the other members receive the
// message once.
#[test]
fn hb_10_resend_of_a_room_message_is_delivered_once() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut alice2 = device(&server, "alice", "phone");
    let mut bob = online(&server, "bob");
    room_with(&mut alice, "lounge", &mut [&mut bob]);
    settle_all([&mut alice2, &mut bob]);

    let first = alice.send_room("lounge", 7, "only once").unwrap();
    assert_eq!(alice.send_room("lounge", 7, "only once").unwrap(), first);
    // From another device of the same user, even with other text: the same message.
    assert_eq!(alice2.send_room("lounge", 7, "changed").unwrap(), first);
    // The client id space is shared with direct messages.
    assert_eq!(alice.send_message("bob", 7, "direct?").unwrap(), first);

    let expected = vec![room_msg(first.0, "lounge", "alice", first.1, "only once")];
    assert_eq!(room_delivers(&settle(&mut bob)), expected);
    let pushes = settle(&mut bob);
    assert!(pushes.is_empty(), "{pushes:?}");
    let (page, _) = bob.room_history("lounge", 0, 10).unwrap();
    assert_eq!(ids_of(&page), vec![first.0]);
}

// [HB-10] The sender's other devices get the room message; the sending session gets only its Ack.
#[test]
fn hb_10_own_other_device_receives_the_room_message() {
    let server = start();
    let mut alice1 = online(&server, "alice");
    let mut alice2 = device(&server, "alice", "phone");
    let mut bob = online(&server, "bob");
    room_with(&mut alice1, "lounge", &mut [&mut bob]);
    settle_all([&mut alice1, &mut alice2, &mut bob]);

    let (id, ts) = alice1.send_room("lounge", 1, "from my laptop").unwrap();
    let expected = vec![room_msg(id, "lounge", "alice", ts, "from my laptop")];
    assert_eq!(room_delivers(&settle(&mut alice2)), expected);
    assert_eq!(room_delivers(&settle(&mut bob)), expected);
    let pushes = settle(&mut alice1);
    assert!(pushes.is_empty(), "the sending session: {pushes:?}");
}

// [HB-10] RoomHistory: newest first, pages without gap or overlap, only inside the member's window (nothing from
// before joining, nothing after leaving); after a rejoin the window starts again.
#[test]
fn hb_10_room_history_pages_within_the_membership_window() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    alice.create_room("lounge", "").unwrap();
    let mut early = Vec::new();
    for i in 0..2u64 {
        early.push(
            alice
                .send_room("lounge", i + 1, &format!("early {i}"))
                .unwrap()
                .0,
        );
    }
    bob.join_room("lounge").unwrap();
    let mut ids = Vec::new();
    for i in 0..7u64 {
        let c = if i % 2 == 0 { &mut alice } else { &mut bob };
        ids.push(c.send_room("lounge", 100 + i, &format!("m{i}")).unwrap().0);
    }

    let mut pages = Vec::new();
    let mut before = 0;
    loop {
        let (page, more) = bob.room_history("lounge", before, 3).unwrap();
        assert!(page.iter().all(|m| m.recipient == "lounge"));
        pages.push((ids_of(&page), more));
        if !more {
            break;
        }
        before = page.last().unwrap().id;
    }
    let newest_first: Vec<u64> = ids.iter().rev().copied().collect();
    assert_eq!(
        pages,
        vec![
            (newest_first[0..3].to_vec(), true),
            (newest_first[3..6].to_vec(), true),
            (newest_first[6..7].to_vec(), false),
        ]
    );
    // The host was there from the start.
    let (all, more) = alice.room_history("lounge", 0, 100).unwrap();
    assert!(!more);
    let mut expected = newest_first.clone();
    expected.extend(early.iter().rev());
    assert_eq!(ids_of(&all), expected);
    // before_id inside the window.
    let (page, more) = bob.room_history("lounge", ids[3], 100).unwrap();
    assert_eq!(ids_of(&page), vec![ids[2], ids[1], ids[0]]);
    assert!(!more);

    // After leaving: what was posted meanwhile is out of reach, the rest still readable.
    bob.leave_room("lounge").unwrap();
    let (after, _) = alice.send_room("lounge", 200, "after bob left").unwrap();
    let (page, _) = bob.room_history("lounge", 0, 100).unwrap();
    assert_eq!(ids_of(&page), newest_first);
    // A rejoin starts a new window: only what comes after it.
    bob.join_room("lounge").unwrap();
    let (page, more) = bob.room_history("lounge", 0, 100).unwrap();
    assert!(page.is_empty() && !more, "{page:?}");
    let (rejoined, _) = alice.send_room("lounge", 201, "welcome back").unwrap();
    let (page, _) = bob.room_history("lounge", 0, 100).unwrap();
    assert_eq!(ids_of(&page), vec![rejoined]);
    assert!(rejoined > after);
}

// -------------------------------------------------------------------------------------------------------------
// [HB-10] Listing
// -------------------------------------------------------------------------------------------------------------

// [HB-10] ListRooms pages by name (ascending), `more` until the last page; member counts are the current
// members; closed rooms are listed with closed = true.
#[test]
fn hb_10_list_rooms_pages_by_name() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    let mut carol = online(&server, "carol");
    for name in [
        "delta", "alpha", "golf", "charlie", "echo", "bravo", "foxtrot",
    ] {
        alice.create_room(name, &format!("about {name}")).unwrap();
    }
    for name in ["alpha", "charlie", "echo"] {
        bob.join_room(name).unwrap();
    }
    carol.join_room("alpha").unwrap();
    carol.join_room("delta").unwrap();
    carol.leave_room("delta").unwrap();
    alice.close_room("foxtrot").unwrap();

    let mut pages = Vec::new();
    let mut after = String::new();
    loop {
        let (rooms, more) = carol.list_rooms(&after, 3).unwrap();
        pages.push((names_of(&rooms), more));
        for r in &rooms {
            assert_eq!(r.host, "alice");
            assert_eq!(r.topic, format!("about {}", r.name));
            let count = match r.name.as_str() {
                "alpha" => 3,
                "charlie" | "echo" => 2,
                _ => 1,
            };
            assert_eq!(r.member_count, count, "{}", r.name);
            assert_eq!(r.closed, r.name == "foxtrot", "{}", r.name);
        }
        if !more {
            break;
        }
        after = rooms.last().unwrap().name.clone();
    }
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        pages,
        vec![
            (names(&["alpha", "bravo", "charlie"]), true),
            (names(&["delta", "echo", "foxtrot"]), true),
            (names(&["golf"]), false),
        ]
    );
    let (rooms, more) = carol.list_rooms("golf", 3).unwrap();
    assert!(rooms.is_empty() && !more);
    // `after` need not be a room's name.
    let (rooms, more) = carol.list_rooms("d", 2).unwrap();
    assert_eq!((names_of(&rooms), more), (names(&["delta", "echo"]), true));
}

// [HB-10] RoomMembers lists the current members by name with their online flag; anyone logged in may ask.
#[test]
fn hb_10_room_members_with_online_flags() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut carol = online(&server, "carol");
    alice.create_room("lounge", "").unwrap();
    {
        let mut bob = online(&server, "bob");
        bob.join_room("lounge").unwrap();
        assert_eq!(
            carol.room_members("lounge").unwrap(),
            vec![member("alice", true), member("bob", true)]
        );
        bob.logout().unwrap();
    }
    assert_eq!(
        carol.room_members("Lounge").unwrap(),
        vec![member("alice", true), member("bob", false)]
    );
    assert_eq!(code_of(carol.room_members("nowhere")), code::NO_SUCH_ROOM);
    // The answer names the room.
    let reply = carol
        .call(&Request::RoomMembers {
            name: "LOUNGE".into(),
        })
        .unwrap();
    assert!(
        matches!(&reply, Packet::RoomMemberList { room, .. } if room == "lounge"),
        "{reply:?}"
    );
}

// -------------------------------------------------------------------------------------------------------------
// [HB-10] Limits at their edges
// -------------------------------------------------------------------------------------------------------------

// [HB-10] max_room_members = 3: the fourth join is ROOM_FULL; a member joining again is not refused; a leave
// makes room.
#[test]
fn hb_10_max_room_members_at_the_edge() {
    let server = start_with(|c| c.max_room_members = 3);
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    let mut carol = online(&server, "carol");
    let mut dave = online(&server, "dave");
    alice.create_room("lounge", "").unwrap();
    assert_eq!(bob.join_room("lounge").unwrap().member_count, 2);
    assert_eq!(carol.join_room("lounge").unwrap().member_count, 3);
    assert_eq!(code_of(dave.join_room("lounge")), code::ROOM_FULL);
    assert_eq!(bob.join_room("lounge").unwrap().member_count, 3);
    assert_eq!(code_of(dave.send_room("lounge", 1, "hi")), code::NOT_MEMBER);
    carol.leave_room("lounge").unwrap();
    assert_eq!(dave.join_room("lounge").unwrap().member_count, 3);
    assert_eq!(code_of(carol.join_room("lounge")), code::ROOM_FULL);
}

// [HB-10] max_rooms_per_user = 2: creating or joining a third is TOO_MANY_ROOMS (and stores nothing); leaving
// one, or its closing, frees a place.
#[test]
fn hb_10_max_rooms_per_user_at_the_edge() {
    let server = start_with(|c| c.max_rooms_per_user = 2);
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    alice.create_room("one", "").unwrap();
    alice.create_room("two", "").unwrap();
    bob.create_room("bobs", "").unwrap();
    assert_eq!(
        code_of(alice.create_room("three", "")),
        code::TOO_MANY_ROOMS
    );
    assert_eq!(code_of(alice.join_room("bobs")), code::TOO_MANY_ROOMS);
    let (rooms, _) = bob.list_rooms("", 10).unwrap();
    assert_eq!(names_of(&rooms), vec!["bobs", "one", "two"]);
    assert_eq!(rooms[0].member_count, 1);

    alice.leave_room("one").unwrap();
    alice.join_room("bobs").unwrap();
    assert_eq!(
        code_of(alice.create_room("three", "")),
        code::TOO_MANY_ROOMS
    );
    // A closed room no longer counts.
    alice.close_room("two").unwrap();
    alice.create_room("three", "").unwrap();
    assert_eq!(code_of(alice.join_room("one")), code::TOO_MANY_ROOMS);
}

// [HB-11] max_watch = 2: watching three users is TOO_MANY_WATCHES; so is a third after two; Unwatch frees a
// place.
#[test]
fn hb_11_max_watch_at_the_edge() {
    let server = start_with(|c| c.max_watch = 2);
    let mut alice = online(&server, "alice");
    for name in ["bob", "carol", "dave"] {
        server.register(name);
    }
    assert_eq!(
        code_of(alice.watch(&["bob", "carol", "dave"])),
        code::TOO_MANY_WATCHES
    );
    assert_eq!(alice.watch(&["bob", "carol"]).unwrap().len(), 2);
    assert_eq!(code_of(alice.watch(&["dave"])), code::TOO_MANY_WATCHES);
    alice.unwatch(&["bob"]).unwrap();
    let list = alice.watch(&["dave"]).unwrap();
    assert_eq!(list[0].username, "dave");
    assert_eq!(list[0].state, presence::OFFLINE);
}

// -------------------------------------------------------------------------------------------------------------
// [HB-11] Presence
// -------------------------------------------------------------------------------------------------------------

// [HB-11] After Watch, the watched user's login pushes Presence online and their last session ending pushes
// Presence offline with the time it ended.
#[test]
fn hb_11_watch_then_login_and_logout_push_presence() {
    let server = start();
    let mut alice = online(&server, "alice");
    server.register("bob");
    let list = alice.watch(&["bob"]).unwrap();
    assert_eq!(
        list,
        vec![PresenceEntry {
            username: "bob".into(),
            state: presence::OFFLINE,
            last_seen_ms: 0,
        }]
    );

    let mut bob = server.login("bob", "laptop");
    assert_eq!(
        presences(&settle(&mut alice)),
        vec![PresenceEntry {
            username: "bob".into(),
            state: presence::ONLINE,
            last_seen_ms: 0,
        }]
    );

    // Logout ends the session: offline, with when.
    let t0 = now_ms();
    bob.logout().unwrap();
    let t1 = now_ms();
    let pushes = settle(&mut alice);
    let entries = presences(&pushes);
    assert_eq!(entries.len(), 1, "{pushes:?}");
    assert_eq!(
        (entries[0].username.as_str(), entries[0].state),
        ("bob", presence::OFFLINE)
    );
    let seen = entries[0].last_seen_ms;
    assert!(
        seen >= t0.saturating_sub(2000) && seen <= t1 + 2000,
        "{t0} <= {seen} <= {t1}"
    );

    // A dropped connection ends it too.
    let mut bob = server.login("bob", "laptop");
    assert_eq!(presences(&settle(&mut alice))[0].state, presence::ONLINE);
    catch_up(&mut bob);
    let t0 = now_ms();
    drop(bob);
    let entry = wait_for(&mut alice, "Presence offline", as_presence);
    assert_eq!(
        (entry.username.as_str(), entry.state),
        ("bob", presence::OFFLINE)
    );
    assert!(entry.last_seen_ms >= t0.saturating_sub(2000) && entry.last_seen_ms <= now_ms() + 2000);
    assert!(entry.last_seen_ms >= seen);
}

// [HB-11] The Watch answer: state 2 for an online user, 1 with last_seen for one who was seen, 0 for a name that
// is no user — in the order asked.
#[test]
fn hb_11_watch_answers_each_users_state() {
    let server = start();
    let mut alice = online(&server, "alice");
    let _carol = online(&server, "carol");
    let t0 = now_ms();
    online(&server, "bob").logout().unwrap();
    let t1 = now_ms();

    let list = alice.watch(&["Carol", "bob", "ghost", "no"]).unwrap();
    assert_eq!(list.len(), 4, "{list:?}");
    assert_eq!(
        list[0],
        PresenceEntry {
            username: "carol".into(),
            state: presence::ONLINE,
            last_seen_ms: 0,
        }
    );
    assert_eq!(
        (list[1].username.as_str(), list[1].state),
        ("bob", presence::OFFLINE)
    );
    assert!(
        list[1].last_seen_ms >= t0.saturating_sub(2000) && list[1].last_seen_ms <= t1 + 2000,
        "{t0} <= {} <= {t1}",
        list[1].last_seen_ms
    );
    for entry in &list[2..] {
        assert_eq!((entry.state, entry.last_seen_ms), (presence::UNKNOWN, 0));
    }
    assert_eq!(list[2].username, "ghost");
}

// [HB-11] A user with two sessions is online while either lasts: no Presence when one of them ends, offline when
// the last does. The second login pushes nothing either.
#[test]
fn hb_11_offline_only_when_the_last_session_ends() {
    let server = start();
    let mut alice = online(&server, "alice");
    server.register("bob");
    alice.watch(&["bob"]).unwrap();

    let mut bob1 = server.login("bob", "laptop");
    catch_up(&mut bob1);
    assert_eq!(presences(&settle(&mut alice)).len(), 1);
    let mut bob2 = server.login("bob", "phone");
    catch_up(&mut bob2);
    let pushes = settle(&mut alice);
    assert!(presences(&pushes).is_empty(), "second login: {pushes:?}");

    drop(bob1);
    // The server has seen bob1's close once it counts two connections (alice, bob2).
    assert!(
        eventually(WAIT, || stat(&mut alice, "connections") == 2),
        "the server never noticed bob1's close"
    );
    let pushes = settle(&mut alice);
    assert!(
        presences(&pushes).is_empty(),
        "one session left: {pushes:?}"
    );
    assert_eq!(stat(&mut alice, "users_online"), 2);

    drop(bob2);
    let entry = wait_for(&mut alice, "Presence offline", as_presence);
    assert_eq!(
        (entry.username.as_str(), entry.state),
        ("bob", presence::OFFLINE)
    );
    assert!(entry.last_seen_ms > 0);
}

/// Sends a Ping and asserts that the very next frame on the wire is its Pong: nothing was pushed before it.
fn assert_next_frame_is_pong(c: &mut Client, who: &str) {
    let rid = c.send_request(&Request::Ping).unwrap();
    let (got_rid, packet) = c.recv(WAIT).unwrap();
    assert_eq!(
        (got_rid, &packet),
        (rid, &Packet::Pong),
        "{who}: expected only the Pong"
    );
}

// [HB-11] Presence goes only to watchers: a user who watches nobody gets no Presence push.
#[test]
fn hb_11_no_presence_without_watch() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut carol = online(&server, "carol");
    server.register("bob");
    alice.watch(&["bob"]).unwrap();

    let mut bob = server.login("bob", "laptop");
    catch_up(&mut bob);
    assert_eq!(presences(&settle(&mut alice))[0].state, presence::ONLINE);
    assert_next_frame_is_pong(&mut carol, "carol after bob's login");

    drop(bob);
    let entry = wait_for(&mut alice, "Presence offline", as_presence);
    assert_eq!(entry.state, presence::OFFLINE);
    assert_next_frame_is_pong(&mut carol, "carol after bob's close");
}

// [HB-11] Unwatch stops the pushes (a second watcher shows the events still happen).
#[test]
fn hb_11_unwatch_stops_presence_pushes() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut dave = online(&server, "dave");
    server.register("bob");
    alice.watch(&["bob"]).unwrap();
    dave.watch(&["bob"]).unwrap();

    let mut bob = server.login("bob", "laptop");
    assert_eq!(presences(&settle(&mut alice)).len(), 1);
    assert_eq!(presences(&settle(&mut dave)).len(), 1);

    alice.unwatch(&["BOB", "ghost"]).unwrap();
    bob.logout().unwrap();
    assert_eq!(presences(&settle(&mut dave))[0].state, presence::OFFLINE);
    assert_next_frame_is_pong(&mut alice, "alice after unwatching bob's logout");
    let _bob = server.login("bob", "laptop");
    assert_eq!(presences(&settle(&mut dave))[0].state, presence::ONLINE);
    assert_next_frame_is_pong(&mut alice, "alice after unwatching bob's login");
}

// -------------------------------------------------------------------------------------------------------------
// [HB-12] Typing
// -------------------------------------------------------------------------------------------------------------

// [HB-12] Typing to a user reaches that user's online sessions as TypingNotice{from, room: ""}; to a room, the
// room's other members as TypingNotice{from, room}.
#[test]
fn hb_12_typing_reaches_peer_sessions_and_room_members() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob1 = online(&server, "bob");
    let mut bob2 = device(&server, "bob", "phone");
    let mut carol = online(&server, "carol");
    let mut dave = online(&server, "dave");
    room_with(&mut alice, "lounge", &mut [&mut bob1, &mut carol]);
    settle_all([&mut alice, &mut bob1, &mut bob2, &mut carol, &mut dave]);

    alice.typing(false, "Bob").unwrap();
    alice.ping().unwrap();
    let direct = vec![("alice".to_owned(), String::new())];
    assert_eq!(typing_notices(&settle(&mut bob1)), direct);
    assert_eq!(typing_notices(&settle(&mut bob2)), direct);
    for c in [&mut carol, &mut dave] {
        let pushes = settle(c);
        assert!(typing_notices(&pushes).is_empty(), "{pushes:?}");
    }

    alice.typing(true, "lounge").unwrap();
    alice.ping().unwrap();
    let in_room = vec![("alice".to_owned(), "lounge".to_owned())];
    for (who, c) in [
        ("bob1", &mut bob1),
        ("bob2", &mut bob2),
        ("carol", &mut carol),
    ] {
        assert_eq!(typing_notices(&settle(c)), in_room, "{who}");
    }
    for (who, c) in [("alice", &mut alice), ("dave", &mut dave)] {
        let pushes = settle(c);
        assert!(typing_notices(&pushes).is_empty(), "{who}: {pushes:?}");
    }
}

// [HB-12] Typing has no reply: a Ping sent after it gets the next reply. That holds for a typing that goes
// nowhere (offline or unknown peer, bad name, unknown room) too.
#[test]
fn hb_12_typing_has_no_reply() {
    let server = start();
    let mut alice = online(&server, "alice");
    let _bob = online(&server, "bob");
    server.register("carol");
    for (room, to) in [
        (false, "bob"),
        (false, "carol"),
        (false, "ghost"),
        (false, "x"),
        (true, "nowhere"),
        (true, ""),
    ] {
        let typing = alice
            .send_request(&Request::Typing {
                room,
                to: to.into(),
            })
            .unwrap();
        let ping = alice.send_request(&Request::Ping).unwrap();
        let (rid, packet) = alice.next_reply(WAIT).unwrap();
        assert_eq!(
            (rid, packet),
            (ping, Packet::Pong),
            "typing {to:?} (request {typing})"
        );
    }
}

// [HB-12] Typing is never stored: not in History, not in the catch-up of a later login, not counted.
#[test]
fn hb_12_typing_is_not_stored() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    alice.create_room("lounge", "").unwrap();
    bob.join_room("lounge").unwrap();
    settle(&mut bob);
    alice.typing(false, "bob").unwrap();
    alice.typing(true, "lounge").unwrap();
    alice.ping().unwrap();
    assert_eq!(typing_notices(&settle(&mut bob)).len(), 2);

    let (page, more) = bob.history("alice", 0, 10).unwrap();
    assert!(page.is_empty() && !more);
    let (page, more) = bob.room_history("lounge", 0, 10).unwrap();
    assert!(page.is_empty() && !more);
    assert_eq!(stat(&mut bob, "messages_stored"), 0);
    drop(bob);
    let mut bob = server.connect();
    let info = bob.login("bob", PASSWORD, "phone", 0).unwrap();
    assert_eq!(info.max_message_id, 0);
    let (items, cursor) = catch_up(&mut bob);
    assert!(items.is_empty(), "{items:?}");
    assert_eq!(cursor, 0);
    let pushes = settle(&mut bob);
    assert!(typing_notices(&pushes).is_empty(), "{pushes:?}");
}

// [HB-12] At most one notice per target per typing_interval: two Typings in a row deliver one; after the
// interval another is delivered. Targets are limited separately.
#[test]
fn hb_12_typing_rate_limit_per_target() {
    let interval = Duration::from_millis(500);
    let server = start_with(|c| c.typing_interval = interval);
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    let mut carol = online(&server, "carol");
    room_with(&mut alice, "lounge", &mut [&mut bob]);
    settle(&mut bob);

    let started = Instant::now();
    alice.typing(false, "bob").unwrap();
    alice.typing(false, "bob").unwrap();
    alice.typing(true, "lounge").unwrap();
    alice.typing(false, "carol").unwrap();
    alice.typing(false, "carol").unwrap();
    alice.ping().unwrap();
    let quick = started.elapsed() < interval;
    let got = typing_notices(&settle(&mut bob));
    if quick {
        assert_eq!(
            got,
            vec![
                ("alice".to_owned(), String::new()),
                ("alice".to_owned(), "lounge".to_owned()),
            ]
        );
        assert_eq!(typing_notices(&settle(&mut carol)).len(), 1);
    } else {
        // A machine so slow that the burst itself took longer than the interval can only be checked loosely.
        assert!(got.len() >= 2, "{got:?}");
    }

    std::thread::sleep(interval + Duration::from_millis(200));
    alice.typing(false, "bob").unwrap();
    alice.ping().unwrap();
    assert_eq!(
        typing_notices(&settle(&mut bob)),
        vec![("alice".to_owned(), String::new())]
    );
}

// [HB-12] Typing to a room one is not a member of delivers nothing.
#[test]
fn hb_12_typing_to_a_room_without_membership_delivers_nothing() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    let mut dave = online(&server, "dave");
    room_with(&mut alice, "lounge", &mut [&mut bob]);
    bob.leave_room("lounge").unwrap();
    settle_all([&mut alice, &mut bob]);

    dave.typing(true, "lounge").unwrap();
    bob.typing(true, "lounge").unwrap();
    dave.ping().unwrap();
    bob.ping().unwrap();
    for (who, c) in [("alice", &mut alice), ("bob", &mut bob)] {
        let pushes = settle(c);
        assert!(typing_notices(&pushes).is_empty(), "{who}: {pushes:?}");
    }
    // A member's typing still goes through (the same server, a moment later).
    let mut carol = online(&server, "carol");
    carol.join_room("lounge").unwrap();
    settle(&mut alice);
    carol.typing(true, "lounge").unwrap();
    carol.ping().unwrap();
    assert_eq!(
        typing_notices(&settle(&mut alice)),
        vec![("carol".to_owned(), "lounge".to_owned())]
    );
}

// [HB-12.2] [HB-12.3] A notice dropped because the sender is not a member does not count against the rate: typing
// in a room, joining it, and typing again at once delivers the second notice.
#[test]
fn hb_12_a_dropped_non_member_notice_does_not_use_the_rate_slot() {
    let server = start_with(|c| c.typing_interval = Duration::from_secs(60));
    let mut alice = online(&server, "alice");
    let mut dave = online(&server, "dave");
    alice.create_room("lounge", "").unwrap();
    dave.typing(true, "lounge").unwrap();
    dave.join_room("lounge").unwrap();
    settle(&mut alice);
    dave.typing(true, "lounge").unwrap();
    dave.ping().unwrap();
    assert_eq!(
        typing_notices(&settle(&mut alice)),
        vec![("dave".to_owned(), "lounge".to_owned())]
    );
}

// -------------------------------------------------------------------------------------------------------------
// [HB-13] Stats
// -------------------------------------------------------------------------------------------------------------

/// The counters `src/reactor/stats.rs` names.
const COUNTERS: [&str; 17] = [
    "connections",
    "users_online",
    "messages_stored",
    "messages_delivered",
    "messages_per_sec_10s",
    "store_queue_depth",
    "store_backlog",
    "commit_batch_size",
    "commit_latency_us",
    "duplicates_absorbed",
    "feed_fallbacks",
    "largest_output_bytes",
    "bytes_in",
    "bytes_out",
    "hash_queue_depth",
    "sessions_parked",
    "uptime_secs",
];

// [HB-13] Stats answers every named counter, in a fixed order; messages_stored grows by the messages sent (direct
// and room, not resends), duplicates_absorbed counts resends, connections and users_online follow the sessions.
#[test]
fn hb_13_stats_counters() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob1 = online(&server, "bob");
    let bob2 = device(&server, "bob", "phone");
    let anonymous = server.connect();

    let first = alice.stats().unwrap();
    let names: Vec<&str> = first.iter().map(|(n, _)| n.as_str()).collect();
    for counter in COUNTERS {
        assert!(names.contains(&counter), "missing {counter} in {names:?}");
    }
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        names.len(),
        "a counter named twice: {names:?}"
    );
    let s = stats_map(&mut alice);
    assert_eq!(s["connections"], 4, "alice, bob twice, one not logged in");
    assert_eq!(s["users_online"], 2);
    assert_eq!(s["messages_stored"], 0);
    assert_eq!(s["duplicates_absorbed"], 0);
    assert!(s["bytes_in"] > 0 && s["bytes_out"] > 0);

    alice.create_room("lounge", "").unwrap();
    bob1.join_room("lounge").unwrap();
    for i in 0..3u64 {
        alice.send_message("bob", i + 1, "direct").unwrap();
    }
    for i in 0..2u64 {
        bob1.send_room("lounge", i + 1, "room").unwrap();
    }
    let s = stats_map(&mut alice);
    assert_eq!(s["messages_stored"], 5);
    assert_eq!(s["duplicates_absorbed"], 0);
    // Every copy pushed: each direct message to bob's two sessions, each room message to alice and bob2.
    assert!(s["messages_delivered"] >= 10, "{s:?}");

    alice.send_message("bob", 1, "direct").unwrap();
    bob1.send_room("lounge", 2, "room").unwrap();
    let s = stats_map(&mut alice);
    assert_eq!(s["messages_stored"], 5);
    assert_eq!(s["duplicates_absorbed"], 2);

    // Fixed order: a second reply names the same counters in the same order.
    let again: Vec<String> = alice.stats().unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(again, names);

    drop(anonymous);
    assert!(eventually(WAIT, || stat(&mut alice, "connections") == 3));
    assert_eq!(stat(&mut alice, "users_online"), 2);
    drop((bob1, bob2));
    assert!(eventually(WAIT, || {
        let s = stats_map(&mut alice);
        s["connections"] == 1 && s["users_online"] == 1
    }));
}

// -------------------------------------------------------------------------------------------------------------
// [HB-10] Fan-out and restarts
// -------------------------------------------------------------------------------------------------------------

// [HB-10] One message to a room of 50 online members reaches every other session exactly once (the sender's
// other device included), and not the sending session.
#[test]
fn hb_10_fan_out_to_fifty_members_exactly_once() {
    let server = start();
    let mut members: Vec<Client> = (0..50)
        .map(|i| online(&server, &format!("user{i:02}")))
        .collect();
    members[0].create_room("crowd", "").unwrap();
    for c in members.iter_mut().skip(1) {
        c.join_room("crowd").unwrap();
    }
    let mut sender_phone = device(&server, "user00", "phone");
    settle_all(members.iter_mut());
    settle(&mut sender_phone);
    assert_eq!(
        member_count(&mut members[0], "crowd"),
        50,
        "everyone joined"
    );

    let (id, ts) = members[0].send_room("crowd", 1, "hello crowd").unwrap();
    let expected = vec![room_msg(id, "crowd", "user00", ts, "hello crowd")];
    for (i, c) in members.iter_mut().enumerate().skip(1) {
        assert_eq!(room_delivers(&settle(c)), expected, "user{i:02}");
    }
    assert_eq!(room_delivers(&settle(&mut sender_phone)), expected);
    let pushes = settle(&mut members[0]);
    assert!(room_delivers(&pushes).is_empty(), "{pushes:?}");
    // And nothing more comes later.
    for (i, c) in members.iter_mut().enumerate() {
        let pushes = settle(c);
        assert!(pushes.is_empty(), "user{i:02}: {pushes:?}");
    }
}

// [HB-10] Rooms and memberships survive a restart: the server loads them and routes live messages at once.
#[test]
fn hb_10_rooms_survive_a_restart() {
    let server = start();
    let config = server.config.clone();
    {
        let mut alice = online(&server, "alice");
        let mut bob = online(&server, "bob");
        let mut carol = online(&server, "carol");
        room_with(&mut alice, "lounge", &mut [&mut bob, &mut carol]);
        carol.leave_room("lounge").unwrap();
        alice.create_room("shut", "").unwrap();
        alice.close_room("shut").unwrap();
    }
    let dir = server.stop();
    let server = start_in(dir, config);
    let mut alice = device(&server, "alice", "laptop");
    let mut bob = device(&server, "bob", "laptop");
    let mut carol = device(&server, "carol", "laptop");

    let (id, ts) = alice.send_room("lounge", 1, "after the restart").unwrap();
    assert_eq!(
        room_delivers(&settle(&mut bob)),
        vec![room_msg(id, "lounge", "alice", ts, "after the restart")]
    );
    let pushes = settle(&mut carol);
    assert!(room_delivers(&pushes).is_empty(), "{pushes:?}");
    assert_eq!(code_of(bob.send_room("shut", 1, "x")), code::ROOM_CLOSED);
    assert_eq!(code_of(alice.send_room("shut", 2, "x")), code::ROOM_CLOSED);
    assert_eq!(code_of(carol.join_room("shut")), code::ROOM_CLOSED);
    let (rooms, _) = carol.list_rooms("", 10).unwrap();
    assert_eq!(
        rooms
            .iter()
            .map(|r| (r.name.as_str(), r.member_count, r.closed))
            .collect::<Vec<_>>(),
        vec![("lounge", 2, false), ("shut", 1, true)]
    );
    carol.join_room("lounge").unwrap();
    alice.kick("lounge", "bob").unwrap();
    assert_eq!(
        room_events(&settle(&mut bob)),
        vec![
            event("lounge", room_event::JOINED, "carol"),
            event("lounge", room_event::KICKED, "bob")
        ]
    );
}

// -------------------------------------------------------------------------------------------------------------
// [HB-10] A session that goes away before the store answers its request
// -------------------------------------------------------------------------------------------------------------

/// Sends `request` on a fresh session of `user` and closes the connection at once, without waiting for the
/// answer (a phone losing its network right after tapping "send").
fn fire_and_vanish(server: &TestServer, user: &str, request: Request) {
    let mut c = device(server, user, "flaky");
    c.send_request(&request).unwrap();
    drop(c);
}

// [HB-10] A room message is stored whether or not its sender stays for the Ack, and a stored message reaches
// the room's online members.
#[test]
fn hb_10_room_message_from_a_vanished_sender_still_reaches_members() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    room_with(&mut alice, "lounge", &mut [&mut bob]);
    settle(&mut bob);

    fire_and_vanish(
        &server,
        "alice",
        Request::SendRoom {
            room: "lounge".into(),
            client_msg_id: 1,
            text: "sent from a tunnel".into(),
        },
    );
    let m = next_room_msg(&mut bob);
    assert_eq!(
        (m.sender.as_str(), m.text.as_str()),
        ("alice", "sent from a tunnel")
    );
    // No gap either: the next live message follows it.
    let (id, _) = alice.send_room("lounge", 2, "next").unwrap();
    assert_eq!(next_room_msg(&mut bob).id, id);
}

// [HB-10] A room created by a session that vanished before the answer is a working room: members who join get
// its messages live.
#[test]
fn hb_10_room_created_by_a_vanished_session_routes_live() {
    let server = start();
    let _alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    fire_and_vanish(
        &server,
        "alice",
        Request::CreateRoom {
            name: "lounge".into(),
            topic: String::new(),
        },
    );
    assert!(eventually(WAIT, || bob.list_rooms("", 10).unwrap().0.len() == 1));
    let mut alice = device(&server, "alice", "laptop");
    bob.join_room("lounge").unwrap();
    let (id, _) = bob.send_room("lounge", 1, "anyone here?").unwrap();
    assert_eq!(next_room_msg(&mut alice).id, id);
}

// [HB-10] A join whose session vanished before the answer still makes the user a member live: their other
// sessions get the room's messages from then on.
#[test]
fn hb_10_join_by_a_vanished_session_takes_effect_live() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    alice.create_room("lounge", "").unwrap();
    fire_and_vanish(
        &server,
        "bob",
        Request::JoinRoom {
            name: "lounge".into(),
        },
    );
    assert!(eventually(WAIT, || member_count(&mut alice, "lounge") == 2));
    let (id, _) = alice.send_room("lounge", 1, "welcome").unwrap();
    assert_eq!(next_room_msg(&mut bob).id, id);
}

// [HB-10] A kick by a host whose session vanished before the answer still takes effect live: the kicked user is
// told, and gets no more of the room's messages.
#[test]
fn hb_10_kick_by_a_vanished_host_takes_effect_live() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    room_with(&mut alice, "lounge", &mut [&mut bob]);
    settle(&mut bob);
    fire_and_vanish(
        &server,
        "alice",
        Request::Kick {
            room: "lounge".into(),
            user: "bob".into(),
        },
    );
    assert!(eventually(WAIT, || member_count(&mut alice, "lounge") == 1));
    alice.send_room("lounge", 1, "not for bob").unwrap();
    let pushes = settle(&mut bob);
    assert!(room_delivers(&pushes).is_empty(), "{pushes:?}");
    assert_eq!(
        room_events(&pushes),
        vec![event("lounge", room_event::KICKED, "bob")]
    );
}

// [HB-10] A leave whose session vanished before the answer still takes effect live: the user's other sessions
// get no more of the room's messages.
#[test]
fn hb_10_leave_by_a_vanished_session_takes_effect_live() {
    let server = start();
    let mut alice = online(&server, "alice");
    let mut bob = online(&server, "bob");
    room_with(&mut alice, "lounge", &mut [&mut bob]);
    settle(&mut bob);
    fire_and_vanish(
        &server,
        "bob",
        Request::LeaveRoom {
            name: "lounge".into(),
        },
    );
    assert!(eventually(WAIT, || member_count(&mut alice, "lounge") == 1));
    alice.send_room("lounge", 1, "not for bob").unwrap();
    let pushes = settle(&mut bob);
    assert!(room_delivers(&pushes).is_empty(), "{pushes:?}");
}
