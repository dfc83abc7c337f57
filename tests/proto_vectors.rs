//! Every hex example in `proto.md` is a test vector.
//!
//! Each example is a fenced block with the info string `hex`, on the line right after an HTML comment that names
//! it (`<!-- vector: NAME -->`). Inside a block, `#` starts a comment that runs to the end of the line; everything
//! else must be two-digit hex bytes. The table in [`vectors`] says, for each name, which frames the bytes hold:
//!
//! * a request or a packet: the bytes must split ([HB-2.1]) and decode to exactly that value and request id, and
//!   encoding that value must give exactly those bytes;
//! * a header the server refuses ([HB-2.3]..[HB-2.5]): splitting must fail with exactly that framing error;
//! * a whole frame whose body does not decode ([HB-4.1], [HB-1.2]): decoding must fail with exactly that error.
//!
//! The test fails on a hex block without a name, a name used twice, a name missing from the table, a table entry
//! missing from `proto.md`, or a request or packet kind of this version without any vector ([HB-3]). A last test
//! asks a real server for its counters and checks that the StatsReply vector and the table of [HB-13] name the
//! same counters in the same order.

use hubbub::auth::HashParams;
use hubbub::client::Client;
use hubbub::config::Config;
use hubbub::framing::{split_frame, FrameError, HEADER_LEN};
use hubbub::protocol::{
    code, is_packet_kind, is_request_kind, kind, presence, room_event, DecodeError, Member,
    Message, Packet, PresenceEntry, Request, RoomInfo, RoomMessage, Token, TokenEntry,
};
use hubbub::Server;
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// What one frame of a vector is.
#[derive(Debug)]
enum Expect {
    /// A client request with its request id.
    Request(u32, Request),
    /// A server packet with its request id.
    Packet(u32, Packet),
    /// The server refuses this header at the framing step; it is the last thing in its block.
    Refused(FrameError),
    /// A whole request frame (header accepted) whose body does not decode.
    Malformed {
        request_id: u32,
        kind: u8,
        error: DecodeError,
    },
}

use Expect::{Malformed, Packet as P, Refused, Request as R};

/// The server's default body limit for client frames ([HB-2.5], [HB-8]).
fn max_request_body() -> u32 {
    Config::default().max_frame
}

/// Server frames are not bounded by `max_frame` ([HB-2.10]); the vectors are small anyway.
const MAX_PACKET_BODY: u32 = 16 * 1024 * 1024;

const CONNECTION_ID: [u8; 16] = [
    0x3f, 0x47, 0x5b, 0x48, 0x9e, 0x4a, 0x4c, 0xa3, 0x82, 0x93, 0xe1, 0xc2, 0x0b, 0x73, 0x6b, 0x93,
];
const TOKEN: Token = [
    0xa1, 0xd8, 0x6c, 0xd9, 0x60, 0x4d, 0x41, 0xe4, 0xa2, 0x9c, 0xe9, 0x6c, 0xb1, 0xb8, 0xf1, 0xb0,
];
/// 2026-01-01T00:00:00Z in Unix milliseconds.
const T0: u64 = 1_767_225_600_000;

fn s(text: &str) -> String {
    text.to_owned()
}

fn msg(id: u64, sender: &str, recipient: &str, timestamp_ms: u64, text: &str) -> Message {
    Message {
        id,
        sender: s(sender),
        recipient: s(recipient),
        timestamp_ms,
        text: s(text),
    }
}

fn err(request_id: u32, code: u16, text: &str) -> Expect {
    P(
        request_id,
        Packet::Error {
            code,
            text: s(text),
        },
    )
}

fn hello() -> Packet {
    Packet::Hello {
        connection_id: CONNECTION_ID,
        server_version: s("0.1.0"),
        max_frame: 65_536,
        idle_timeout_ms: 60_000,
        auth_timeout_ms: 10_000,
    }
}

fn room(
    room_id: u64,
    name: &str,
    topic: &str,
    host: &str,
    member_count: u32,
    closed: bool,
) -> RoomInfo {
    RoomInfo {
        room_id,
        name: s(name),
        topic: s(topic),
        host: s(host),
        member_count,
        closed,
    }
}

fn room_msg(id: u64, room: &str, sender: &str, timestamp_ms: u64, text: &str) -> RoomMessage {
    RoomMessage {
        id,
        room: s(room),
        sender: s(sender),
        timestamp_ms,
        text: s(text),
    }
}

fn member(username: &str, online: bool) -> Member {
    Member {
        username: s(username),
        online,
    }
}

fn seen(username: &str, state: u8, last_seen_ms: u64) -> PresenceEntry {
    PresenceEntry {
        username: s(username),
        state,
        last_seen_ms,
    }
}

/// The counters of a StatsReply, in the server's order ([HB-13]), with made-up values.
const STATS: [(&str, u64); 17] = [
    ("connections", 3),
    ("users_online", 2),
    ("messages_stored", 44),
    ("messages_delivered", 61),
    ("messages_per_sec_10s", 0),
    ("store_queue_depth", 0),
    ("store_backlog", 0),
    ("commit_batch_size", 1),
    ("commit_latency_us", 850),
    ("duplicates_absorbed", 1),
    ("feed_fallbacks", 0),
    ("largest_output_bytes", 0),
    ("bytes_in", 4_096),
    ("bytes_out", 9_216),
    ("hash_queue_depth", 0),
    ("sessions_parked", 0),
    ("uptime_secs", 3_600),
];

fn stats_reply() -> Packet {
    Packet::StatsReply(STATS.iter().map(|(n, v)| (s(n), *v)).collect())
}

/// A kind number that no client may send: 0x14 (Sync) is reserved ([HB-3]).
const REFUSED_KIND: u8 = kind::SYNC;

/// NAME → the frames its hex block holds, in order.
fn vectors() -> Vec<(&'static str, Vec<Expect>)> {
    vec![
        // ---- requests
        ("ping", vec![R(4, Request::Ping)]),
        (
            "register",
            vec![R(
                1,
                Request::Register {
                    username: s("alice"),
                    password: s("correct horse"),
                },
            )],
        ),
        (
            "login",
            vec![R(
                2,
                Request::Login {
                    username: s("alice"),
                    password: s("correct horse"),
                    device: s("laptop"),
                    last_seen: 40,
                },
            )],
        ),
        (
            "resume",
            vec![R(
                1,
                Request::Resume {
                    token: TOKEN,
                    device: s("phone"),
                    last_seen: 0,
                },
            )],
        ),
        ("logout", vec![R(11, Request::Logout)]),
        ("list-tokens", vec![R(5, Request::ListTokens)]),
        (
            "revoke-token",
            vec![R(6, Request::RevokeToken { token_id: 7 })],
        ),
        (
            "send",
            vec![R(
                3,
                Request::Send {
                    recipient: s("bob"),
                    client_msg_id: 1,
                    text: s("hi bob"),
                },
            )],
        ),
        ("received", vec![R(8, Request::Received { up_to: 42 })]),
        (
            "read",
            vec![R(
                9,
                Request::Read {
                    peer: s("alice"),
                    up_to: 42,
                },
            )],
        ),
        (
            "history",
            vec![R(
                10,
                Request::History {
                    peer: s("bob"),
                    before_id: 0,
                    limit: 20,
                },
            )],
        ),
        (
            "create-room",
            vec![R(
                20,
                Request::CreateRoom {
                    name: s("lounge"),
                    topic: s("off-topic talk"),
                },
            )],
        ),
        (
            "join-room",
            vec![R(21, Request::JoinRoom { name: s("lounge") })],
        ),
        (
            "leave-room",
            vec![R(22, Request::LeaveRoom { name: s("lounge") })],
        ),
        (
            "kick",
            vec![R(
                23,
                Request::Kick {
                    room: s("lounge"),
                    user: s("carol"),
                },
            )],
        ),
        (
            "close-room",
            vec![R(24, Request::CloseRoom { name: s("lounge") })],
        ),
        (
            "list-rooms",
            vec![R(
                25,
                Request::ListRooms {
                    after: s(""),
                    limit: 20,
                },
            )],
        ),
        (
            "room-members",
            vec![R(26, Request::RoomMembers { name: s("lounge") })],
        ),
        (
            "send-room",
            vec![R(
                27,
                Request::SendRoom {
                    room: s("lounge"),
                    client_msg_id: 2,
                    text: s("hello room"),
                },
            )],
        ),
        (
            "room-history",
            vec![R(
                28,
                Request::RoomHistory {
                    room: s("lounge"),
                    before_id: 0,
                    limit: 20,
                },
            )],
        ),
        (
            "watch",
            vec![R(
                30,
                Request::Watch {
                    users: vec![s("bob"), s("carol"), s("nobody")],
                },
            )],
        ),
        (
            "unwatch",
            vec![R(
                31,
                Request::Unwatch {
                    users: vec![s("carol")],
                },
            )],
        ),
        (
            "typing",
            vec![R(
                32,
                Request::Typing {
                    room: false,
                    to: s("bob"),
                },
            )],
        ),
        (
            "typing-room",
            vec![R(
                33,
                Request::Typing {
                    room: true,
                    to: s("lounge"),
                },
            )],
        ),
        ("stats", vec![R(34, Request::Stats)]),
        // ---- packets
        ("hello", vec![P(0, hello())]),
        ("pong", vec![P(4, Packet::Pong)]),
        (
            "error",
            vec![err(3, code::UNKNOWN_RECIPIENT, "no such user")],
        ),
        ("ok", vec![P(1, Packet::Ok)]),
        (
            "login-ok",
            vec![P(
                2,
                Packet::LoginOk {
                    token: TOKEN,
                    user_id: 2,
                    username: s("alice"),
                    max_message_id: 42,
                    delivered_cursor: 40,
                },
            )],
        ),
        (
            "tokens",
            vec![P(
                5,
                Packet::Tokens(vec![
                    TokenEntry {
                        token_id: 6,
                        device: s("laptop"),
                        created_at_ms: T0,
                        last_used_at_ms: T0,
                        expires_at_ms: T0 + 30 * 86_400_000,
                        current: true,
                    },
                    TokenEntry {
                        token_id: 7,
                        device: s("phone"),
                        created_at_ms: T0 + 60_000,
                        last_used_at_ms: T0 + 120_000,
                        expires_at_ms: T0 + 60_000 + 30 * 86_400_000,
                        current: false,
                    },
                ]),
            )],
        ),
        (
            "ack",
            vec![P(
                3,
                Packet::Ack {
                    message_id: 43,
                    timestamp_ms: T0 + 5_000,
                },
            )],
        ),
        (
            "deliver",
            vec![P(
                0,
                Packet::Deliver(msg(43, "alice", "bob", T0 + 5_000, "hi bob")),
            )],
        ),
        (
            "delivery-receipt",
            vec![P(
                0,
                Packet::DeliveryReceipt {
                    peer: s("bob"),
                    up_to: 43,
                },
            )],
        ),
        (
            "read-receipt",
            vec![P(
                0,
                Packet::ReadReceipt {
                    peer: s("bob"),
                    up_to: 43,
                },
            )],
        ),
        (
            "history-page",
            vec![P(
                10,
                Packet::HistoryPage {
                    messages: vec![
                        msg(43, "alice", "bob", T0 + 5_000, "hi bob"),
                        msg(41, "bob", "alice", T0 + 1_000, "yo"),
                    ],
                    more: true,
                },
            )],
        ),
        ("caught-up", vec![P(0, Packet::CaughtUp { cursor: 43 })]),
        (
            "room-event",
            vec![P(
                0,
                Packet::RoomEvent {
                    room: s("lounge"),
                    event: room_event::JOINED,
                    user: s("bob"),
                },
            )],
        ),
        (
            "room-closed",
            vec![P(0, Packet::RoomClosed { room: s("lounge") })],
        ),
        (
            "room-list",
            vec![P(
                25,
                Packet::RoomList {
                    rooms: vec![
                        room(2, "attic", "", "bob", 2, true),
                        room(1, "lounge", "off-topic talk", "alice", 3, false),
                    ],
                    more: false,
                },
            )],
        ),
        (
            "room-member-list",
            vec![P(
                26,
                Packet::RoomMemberList {
                    room: s("lounge"),
                    members: vec![
                        member("alice", true),
                        member("bob", false),
                        member("carol", true),
                    ],
                },
            )],
        ),
        (
            "room-info",
            vec![P(
                20,
                Packet::RoomInfo(room(1, "lounge", "off-topic talk", "alice", 1, false)),
            )],
        ),
        (
            "room-deliver",
            vec![P(
                0,
                Packet::RoomDeliver(room_msg(44, "lounge", "alice", T0 + 6_000, "hello room")),
            )],
        ),
        (
            "room-history-page",
            vec![P(
                28,
                Packet::HistoryPage {
                    messages: vec![
                        msg(44, "alice", "lounge", T0 + 6_000, "hello room"),
                        msg(40, "carol", "lounge", T0 - 60_000, "first!"),
                    ],
                    more: false,
                },
            )],
        ),
        (
            "presence",
            vec![P(
                0,
                Packet::Presence(seen("bob", presence::OFFLINE, T0 + 7_000)),
            )],
        ),
        (
            "typing-notice",
            vec![P(
                0,
                Packet::TypingNotice {
                    from: s("alice"),
                    room: s(""),
                },
            )],
        ),
        (
            "typing-notice-room",
            vec![P(
                0,
                Packet::TypingNotice {
                    from: s("alice"),
                    room: s("lounge"),
                },
            )],
        ),
        (
            "presence-list",
            vec![P(
                30,
                Packet::PresenceList(vec![
                    seen("bob", presence::ONLINE, 0),
                    seen("carol", presence::OFFLINE, T0 - 3_600_000),
                    seen("nobody", presence::UNKNOWN, 0),
                ]),
            )],
        ),
        ("stats-reply", vec![P(34, stats_reply())]),
        (
            "shutdown",
            vec![P(
                0,
                Packet::Shutdown {
                    text: s("server shutting down"),
                },
            )],
        ),
        // ---- catch-up after a login with last_seen 40
        (
            "catch-up",
            vec![
                P(
                    2,
                    Packet::LoginOk {
                        token: TOKEN,
                        user_id: 2,
                        username: s("alice"),
                        max_message_id: 42,
                        delivered_cursor: 40,
                    },
                ),
                P(
                    0,
                    Packet::Deliver(msg(41, "bob", "alice", T0 + 1_000, "yo")),
                ),
                P(
                    0,
                    Packet::Deliver(msg(42, "alice", "bob", T0 + 2_000, "hey")),
                ),
                P(0, Packet::CaughtUp { cursor: 42 }),
            ],
        ),
        // ---- errors
        ("bad-magic", vec![Refused(FrameError::BadMagic)]),
        (
            "bad-magic-answer",
            vec![err(0, code::BAD_MAGIC, &FrameError::BadMagic.to_string())],
        ),
        ("bad-version", vec![Refused(FrameError::BadVersion(2))]),
        (
            "bad-version-answer",
            vec![err(
                0,
                code::BAD_VERSION,
                &FrameError::BadVersion(2).to_string(),
            )],
        ),
        (
            "unknown-kind",
            vec![Refused(FrameError::UnknownKind(REFUSED_KIND))],
        ),
        (
            "unknown-kind-answer",
            vec![err(
                12,
                code::UNKNOWN_KIND,
                &FrameError::UnknownKind(REFUSED_KIND).to_string(),
            )],
        ),
        (
            "too-large",
            vec![Refused(FrameError::TooLarge {
                len: 65_537,
                max: 65_536,
            })],
        ),
        (
            "too-large-answer",
            vec![err(
                13,
                code::FRAME_TOO_LARGE,
                &FrameError::TooLarge {
                    len: 65_537,
                    max: 65_536,
                }
                .to_string(),
            )],
        ),
        (
            "malformed-utf8",
            vec![Malformed {
                request_id: 14,
                kind: kind::REGISTER,
                error: DecodeError::InvalidUtf8,
            }],
        ),
        (
            "malformed-utf8-answer",
            vec![err(
                14,
                code::MALFORMED,
                &DecodeError::InvalidUtf8.to_string(),
            )],
        ),
        (
            "malformed-truncated",
            vec![Malformed {
                request_id: 15,
                kind: kind::RECEIVED,
                error: DecodeError::Truncated,
            }],
        ),
        (
            "malformed-truncated-answer",
            vec![err(
                15,
                code::MALFORMED,
                &DecodeError::Truncated.to_string(),
            )],
        ),
        ("request-id-zero", vec![R(0, Request::Ping)]),
        (
            "request-id-zero-answer",
            vec![err(
                0,
                code::MALFORMED,
                "request id 0 is reserved for server pushes",
            )],
        ),
        (
            "server-full",
            vec![err(0, code::SERVER_FULL, "server full, try again later")],
        ),
        (
            "idle-timeout",
            vec![err(
                0,
                code::IDLE_TIMEOUT,
                "no frame within the idle timeout; send Ping to stay connected",
            )],
        ),
        (
            "session-replaced",
            vec![err(
                0,
                code::SESSION_REPLACED,
                "logged in from too many places; this session was closed",
            )],
        ),
        (
            "not-host",
            vec![err(24, code::NOT_HOST, "only the room's host may do that")],
        ),
        // ---- the transcript
        ("t01-hello", vec![P(0, hello())]),
        (
            "t02-register",
            vec![R(
                1,
                Request::Register {
                    username: s("alice"),
                    password: s("correct horse"),
                },
            )],
        ),
        ("t03-ok", vec![P(1, Packet::Ok)]),
        (
            "t04-login",
            vec![R(
                2,
                Request::Login {
                    username: s("alice"),
                    password: s("correct horse"),
                    device: s("laptop"),
                    last_seen: 0,
                },
            )],
        ),
        (
            "t05-login-ok",
            vec![
                P(
                    2,
                    Packet::LoginOk {
                        token: TOKEN,
                        user_id: 2,
                        username: s("alice"),
                        max_message_id: 0,
                        delivered_cursor: 0,
                    },
                ),
                P(0, Packet::CaughtUp { cursor: 0 }),
            ],
        ),
        (
            "t06-send",
            vec![R(
                3,
                Request::Send {
                    recipient: s("bob"),
                    client_msg_id: 1,
                    text: s("hi bob"),
                },
            )],
        ),
        (
            "t07-ack",
            vec![P(
                3,
                Packet::Ack {
                    message_id: 1,
                    timestamp_ms: T0,
                },
            )],
        ),
        (
            "t08-deliver",
            vec![P(0, Packet::Deliver(msg(1, "alice", "bob", T0, "hi bob")))],
        ),
        ("t09-received", vec![R(7, Request::Received { up_to: 1 })]),
        ("t10-ok", vec![P(7, Packet::Ok)]),
        (
            "t11-delivery-receipt",
            vec![P(
                0,
                Packet::DeliveryReceipt {
                    peer: s("bob"),
                    up_to: 1,
                },
            )],
        ),
        (
            "t12-read",
            vec![R(
                8,
                Request::Read {
                    peer: s("alice"),
                    up_to: 1,
                },
            )],
        ),
        ("t13-ok", vec![P(8, Packet::Ok)]),
        (
            "t14-read-receipt",
            vec![P(
                0,
                Packet::ReadReceipt {
                    peer: s("bob"),
                    up_to: 1,
                },
            )],
        ),
        ("t15-ping", vec![R(4, Request::Ping)]),
        ("t16-pong", vec![P(4, Packet::Pong)]),
        // ---- a room: alice creates it, bob joins, alice posts
        (
            "r01-create-room",
            vec![R(
                5,
                Request::CreateRoom {
                    name: s("lounge"),
                    topic: s("off-topic talk"),
                },
            )],
        ),
        (
            "r02-room-info",
            vec![P(
                5,
                Packet::RoomInfo(room(1, "lounge", "off-topic talk", "alice", 1, false)),
            )],
        ),
        (
            "r03-join-room",
            vec![R(9, Request::JoinRoom { name: s("lounge") })],
        ),
        (
            "r04-room-event",
            vec![P(
                0,
                Packet::RoomEvent {
                    room: s("lounge"),
                    event: room_event::JOINED,
                    user: s("bob"),
                },
            )],
        ),
        (
            "r05-room-event-and-info",
            vec![
                P(
                    0,
                    Packet::RoomEvent {
                        room: s("lounge"),
                        event: room_event::JOINED,
                        user: s("bob"),
                    },
                ),
                P(
                    9,
                    Packet::RoomInfo(room(1, "lounge", "off-topic talk", "alice", 2, false)),
                ),
            ],
        ),
        (
            "r06-send-room",
            vec![R(
                6,
                Request::SendRoom {
                    room: s("lounge"),
                    client_msg_id: 2,
                    text: s("welcome, bob"),
                },
            )],
        ),
        (
            "r07-ack",
            vec![P(
                6,
                Packet::Ack {
                    message_id: 2,
                    timestamp_ms: T0 + 60_000,
                },
            )],
        ),
        (
            "r08-room-deliver",
            vec![P(
                0,
                Packet::RoomDeliver(room_msg(2, "lounge", "alice", T0 + 60_000, "welcome, bob")),
            )],
        ),
    ]
}

// -------------------------------------------------------------------------------------------------------------
// Reading proto.md
// -------------------------------------------------------------------------------------------------------------

/// One named hex block: its name, the line of its fence, and its bytes.
struct Block {
    name: String,
    line: usize,
    bytes: Vec<u8>,
}

fn parse_vector_comment(line: &str) -> Option<&str> {
    line.trim()
        .strip_prefix("<!-- vector:")?
        .strip_suffix("-->")
        .map(str::trim)
}

fn parse_hex_line(text: &str, line: usize) -> Vec<u8> {
    let data = text.split('#').next().unwrap_or("");
    data.split_whitespace()
        .map(|tok| {
            assert!(
                tok.len() == 2 && tok.chars().all(|c| c.is_ascii_hexdigit()),
                "proto.md line {line}: {tok:?} is not a two-digit hex byte"
            );
            u8::from_str_radix(tok, 16).unwrap()
        })
        .collect()
}

/// Every hex block of the document. Panics on a hex block without a name, or a name without a hex block.
fn hex_blocks(doc: &str) -> Vec<Block> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line_no = i + 1;
        let trimmed = lines[i].trim();
        if let Some(name) = parse_vector_comment(trimmed) {
            assert!(
                !name.is_empty(),
                "proto.md line {line_no}: empty vector name"
            );
            let next = lines.get(i + 1).map(|l| l.trim());
            assert_eq!(
                next,
                Some("```hex"),
                "proto.md line {line_no}: vector {name:?} must be followed by a ```hex block"
            );
        } else if let Some(info) = trimmed.strip_prefix("```") {
            let info = info.trim();
            let name = if info == "hex" {
                let previous = i.checked_sub(1).map(|p| lines[p]);
                let name = previous.and_then(parse_vector_comment);
                let Some(name) = name else {
                    panic!("proto.md line {line_no}: hex block without a <!-- vector: NAME --> line right before it")
                };
                Some(name.to_owned())
            } else {
                None
            };
            // Find the closing fence.
            let mut j = i + 1;
            let mut bytes = Vec::new();
            while j < lines.len() && lines[j].trim() != "```" {
                if name.is_some() {
                    bytes.extend(parse_hex_line(lines[j], j + 1));
                }
                j += 1;
            }
            assert!(j < lines.len(), "proto.md line {line_no}: unclosed fence");
            if let Some(name) = name {
                assert!(
                    !bytes.is_empty(),
                    "proto.md line {line_no}: empty hex block {name:?}"
                );
                blocks.push(Block {
                    name,
                    line: line_no,
                    bytes,
                });
            }
            i = j;
        }
        i += 1;
    }
    blocks
}

fn read_doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/proto.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

// -------------------------------------------------------------------------------------------------------------
// Checking one block
// -------------------------------------------------------------------------------------------------------------

fn check_block(block: &Block, expects: &[Expect]) {
    let name = &block.name;
    let bytes = &block.bytes[..];
    let mut pos = 0;
    for (n, expect) in expects.iter().enumerate() {
        let rest = &bytes[pos..];
        let at = format!("vector {name:?} (proto.md line {}), frame {n}", block.line);
        match expect {
            R(request_id, request) => {
                let frame = split_frame(rest, max_request_body(), is_request_kind)
                    .unwrap_or_else(|e| panic!("{at}: framing error {e}"))
                    .unwrap_or_else(|| panic!("{at}: incomplete frame"));
                assert_eq!(frame.header.request_id, *request_id, "{at}: request id");
                assert_eq!(frame.header.kind, request.kind(), "{at}: kind");
                let decoded = Request::decode(frame.header.kind, frame.body)
                    .unwrap_or_else(|e| panic!("{at}: {e}"));
                assert_eq!(&decoded, request, "{at}: decoded value");
                let mut encoded = Vec::new();
                request.encode(*request_id, &mut encoded);
                assert_eq!(encoded, &rest[..frame.len], "{at}: encoding");
                pos += frame.len;
            }
            P(request_id, packet) => {
                let frame = split_frame(rest, MAX_PACKET_BODY, is_packet_kind)
                    .unwrap_or_else(|e| panic!("{at}: framing error {e}"))
                    .unwrap_or_else(|| panic!("{at}: incomplete frame"));
                assert_eq!(frame.header.request_id, *request_id, "{at}: request id");
                assert_eq!(frame.header.kind, packet.kind(), "{at}: kind");
                let decoded = Packet::decode(&frame.header, frame.body)
                    .unwrap_or_else(|e| panic!("{at}: {e}"));
                assert_eq!(&decoded, packet, "{at}: decoded value");
                let mut encoded = Vec::new();
                packet.encode(*request_id, &mut encoded);
                assert_eq!(encoded, &rest[..frame.len], "{at}: encoding");
                pos += frame.len;
            }
            Refused(error) => {
                assert_eq!(
                    n + 1,
                    expects.len(),
                    "{at}: a refused header must come last"
                );
                assert!(
                    rest.len() >= HEADER_LEN,
                    "{at}: a refused header needs 12 bytes"
                );
                // Refused from the header alone: the body (if any) need not be there.
                assert_eq!(
                    split_frame(&rest[..HEADER_LEN], max_request_body(), is_request_kind),
                    Err(*error),
                    "{at}"
                );
                pos = bytes.len();
            }
            Malformed {
                request_id,
                kind,
                error,
            } => {
                let frame = split_frame(rest, max_request_body(), is_request_kind)
                    .unwrap_or_else(|e| panic!("{at}: framing error {e}"))
                    .unwrap_or_else(|| panic!("{at}: incomplete frame"));
                assert_eq!(frame.header.request_id, *request_id, "{at}: request id");
                assert_eq!(frame.header.kind, *kind, "{at}: kind");
                assert_eq!(
                    Request::decode(frame.header.kind, frame.body),
                    Err(error.clone()),
                    "{at}"
                );
                pos += frame.len;
            }
        }
    }
    assert_eq!(
        pos,
        bytes.len(),
        "vector {name:?} (proto.md line {}): bytes left after the expected frames",
        block.line
    );
}

#[test]
fn every_hex_example_in_proto_md_is_a_test_vector() {
    let doc = read_doc();
    let blocks = hex_blocks(&doc);
    let table = vectors();

    let mut expected: BTreeMap<&str, &[Expect]> = BTreeMap::new();
    for (name, expects) in &table {
        assert!(
            expected.insert(name, expects).is_none(),
            "vector {name:?} is twice in the table"
        );
    }
    let mut seen = BTreeSet::new();
    for block in &blocks {
        assert!(
            seen.insert(block.name.as_str()),
            "proto.md line {}: vector {:?} is named twice",
            block.line,
            block.name
        );
        let Some(expects) = expected.get(block.name.as_str()) else {
            panic!(
                "proto.md line {}: vector {:?} is not in the table of tests/proto_vectors.rs",
                block.line, block.name
            )
        };
        check_block(block, expects);
    }
    let missing: Vec<&str> = expected
        .keys()
        .copied()
        .filter(|name| !seen.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "vectors missing from proto.md: {missing:?}"
    );
}

// [HB-3] every kind this version speaks, and every way framing can fail, has at least one vector.
#[test]
fn every_kind_and_framing_error_has_a_vector() {
    let table = vectors();
    let mut kinds = BTreeSet::new();
    let mut framing = HashSet::new();
    for (_, expects) in &table {
        for expect in expects {
            match expect {
                R(_, request) => {
                    kinds.insert(request.kind());
                }
                P(_, packet) => {
                    kinds.insert(packet.kind());
                }
                Refused(error) => {
                    framing.insert(std::mem::discriminant(error));
                }
                Malformed { .. } => {}
            }
        }
    }
    let spoken: BTreeSet<u8> = (0..=255u8)
        .filter(|&k| is_request_kind(k) || is_packet_kind(k))
        .collect();
    let without: Vec<String> = spoken
        .difference(&kinds)
        .map(|k| format!("0x{k:02x}"))
        .collect();
    assert!(without.is_empty(), "kinds without a vector: {without:?}");
    for error in [
        FrameError::BadMagic,
        FrameError::BadVersion(0),
        FrameError::UnknownKind(0),
        FrameError::TooLarge { len: 0, max: 0 },
    ] {
        assert!(
            framing.contains(&std::mem::discriminant(&error)),
            "no vector for {error:?}"
        );
    }
}

// [HB-13] the StatsReply vector and the table of [HB-13] name exactly the counters a real server sends, in its
// order.
#[test]
fn stats_vector_and_table_follow_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: dir.path().join("hubbub.db"),
        hash_params: HashParams::TEST,
        hash_threads: 1,
        ..Config::default()
    };
    let server = Server::bind(config).unwrap().spawn().unwrap();
    let mut client = Client::connect(server.addr).unwrap();
    client.register("counter", "password123").unwrap();
    client.login("counter", "password123", "test", 0).unwrap();
    let live: Vec<String> = client
        .stats()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    drop(client);
    server.shutdown().unwrap();

    let vector: Vec<String> = STATS.iter().map(|(n, _)| s(n)).collect();
    assert_eq!(
        vector, live,
        "the stats-reply vector is not what the server sends"
    );
    let doc = read_doc();
    let mut last = 0;
    for name in &live {
        let row = format!("| `{name}` |");
        let Some(at) = doc.find(&row) else {
            panic!("proto.md has no table row for the counter {name:?}")
        };
        assert!(
            at > last,
            "proto.md lists the counter {name:?} out of order"
        );
        last = at;
    }
}
