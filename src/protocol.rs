//! Protocol v1: every packet as typed Rust, with encode and decode for both directions.
//!
//! Owns: kind numbers ([HB-3]), body layouts ([HB-4]), error codes ([HB-6]) and the value rules a body must meet to
//! decode (string lengths, UTF-8). The server decodes `Request`s and encodes `Packet`s; the client library does
//! the reverse with the same code, so the two can never disagree.
//!
//! Must not: do I/O, keep state, or decide what a request *means* (the reactor does). Decoding is total: every
//! byte sequence gives a value or a `DecodeError`, never a panic.
//!
//! Conventions ([HB-1]): integers are big-endian; a string is a u16 byte length then that many bytes of UTF-8;
//! a token is 16 raw bytes; a list is a u16 count then its items.

use crate::framing::{patch_body_len, put_header, Header};
use byteorder::{BigEndian, ByteOrder};

/// Kind numbers. Client requests use 0x01–0x3F, server packets 0x80–0xBF: the high bit says who may send it.
pub mod kind {
    // --- client → server
    pub const PING: u8 = 0x01;
    pub const REGISTER: u8 = 0x02;
    pub const LOGIN: u8 = 0x03;
    pub const RESUME: u8 = 0x04;
    pub const LOGOUT: u8 = 0x05;
    pub const LIST_TOKENS: u8 = 0x06;
    pub const REVOKE_TOKEN: u8 = 0x07;
    pub const SEND: u8 = 0x10;
    pub const RECEIVED: u8 = 0x11;
    pub const READ: u8 = 0x12;
    pub const HISTORY: u8 = 0x13;
    /// Reserved: an explicit "feed me from id N" for clients that want to re-sync without logging in again.
    pub const SYNC: u8 = 0x14;
    /// Rooms (0x20–0x28), presence and typing (0x30–0x32) and stats (0x38).
    pub const CREATE_ROOM: u8 = 0x20;
    pub const JOIN_ROOM: u8 = 0x21;
    pub const LEAVE_ROOM: u8 = 0x22;
    pub const KICK: u8 = 0x23;
    pub const CLOSE_ROOM: u8 = 0x24;
    pub const LIST_ROOMS: u8 = 0x25;
    pub const ROOM_MEMBERS: u8 = 0x26;
    pub const SEND_ROOM: u8 = 0x27;
    pub const ROOM_HISTORY: u8 = 0x28;
    pub const WATCH: u8 = 0x30;
    pub const UNWATCH: u8 = 0x31;
    pub const TYPING: u8 = 0x32;
    pub const STATS: u8 = 0x38;

    // --- server → client
    pub const HELLO: u8 = 0x80;
    pub const PONG: u8 = 0x81;
    pub const ERROR: u8 = 0x82;
    pub const OK: u8 = 0x83;
    pub const LOGIN_OK: u8 = 0x84;
    pub const TOKENS: u8 = 0x85;
    pub const ACK: u8 = 0x90;
    pub const DELIVER: u8 = 0x91;
    pub const DELIVERY_RECEIPT: u8 = 0x92;
    pub const READ_RECEIPT: u8 = 0x93;
    pub const HISTORY_PAGE: u8 = 0x94;
    pub const CAUGHT_UP: u8 = 0x95;
    /// Rooms (0xA0–0xA5), presence and typing (0xB0–0xB2) and stats (0xB8).
    pub const ROOM_EVENT: u8 = 0xA0;
    pub const ROOM_CLOSED: u8 = 0xA1;
    pub const ROOM_LIST: u8 = 0xA2;
    pub const ROOM_MEMBER_LIST: u8 = 0xA3;
    pub const ROOM_INFO: u8 = 0xA4;
    pub const ROOM_DELIVER: u8 = 0xA5;
    pub const PRESENCE: u8 = 0xB0;
    pub const TYPING_NOTICE: u8 = 0xB1;
    pub const PRESENCE_LIST: u8 = 0xB2;
    pub const STATS_REPLY: u8 = 0xB8;
    pub const SHUTDOWN: u8 = 0xBF;
}

/// Kinds a client may send to this version of the server. Reserved kinds are not in it yet: a client that
/// sends one is told "unknown kind" ([HB-2.4]), exactly as for a number that was never assigned.
pub fn is_request_kind(k: u8) -> bool {
    use kind::*;
    matches!(
        k,
        PING | REGISTER
            | LOGIN
            | RESUME
            | LOGOUT
            | LIST_TOKENS
            | REVOKE_TOKEN
            | SEND
            | RECEIVED
            | READ
            | HISTORY
            | CREATE_ROOM
            | JOIN_ROOM
            | LEAVE_ROOM
            | KICK
            | CLOSE_ROOM
            | LIST_ROOMS
            | ROOM_MEMBERS
            | SEND_ROOM
            | ROOM_HISTORY
            | WATCH
            | UNWATCH
            | TYPING
            | STATS
    )
}

/// Kinds this version of the server sends.
pub fn is_packet_kind(k: u8) -> bool {
    use kind::*;
    matches!(
        k,
        HELLO
            | PONG
            | ERROR
            | OK
            | LOGIN_OK
            | TOKENS
            | ACK
            | DELIVER
            | DELIVERY_RECEIPT
            | READ_RECEIPT
            | HISTORY_PAGE
            | CAUGHT_UP
            | ROOM_EVENT
            | ROOM_CLOSED
            | ROOM_LIST
            | ROOM_MEMBER_LIST
            | ROOM_INFO
            | ROOM_DELIVER
            | PRESENCE
            | PRESENCE_LIST
            | TYPING_NOTICE
            | STATS_REPLY
            | SHUTDOWN
    )
}

/// Error codes ([HB-6]). Codes below 100 are sent just before the server closes the connection; codes from 100
/// up answer one request and the connection stays open.
pub mod code {
    pub const BAD_MAGIC: u16 = 1;
    pub const BAD_VERSION: u16 = 2;
    pub const UNKNOWN_KIND: u16 = 3;
    pub const FRAME_TOO_LARGE: u16 = 4;
    pub const SERVER_FULL: u16 = 5;
    pub const TOO_MANY_FROM_ADDRESS: u16 = 6;
    pub const IDLE_TIMEOUT: u16 = 7;
    pub const AUTH_TIMEOUT: u16 = 8;
    pub const SESSION_REPLACED: u16 = 9;
    pub const TOKEN_REVOKED: u16 = 10;
    pub const SLOW_CONSUMER: u16 = 11;

    pub const MALFORMED: u16 = 100;
    pub const NOT_AUTHENTICATED: u16 = 101;
    pub const ALREADY_AUTHENTICATED: u16 = 102;
    pub const USERNAME_TAKEN: u16 = 103;
    pub const INVALID_USERNAME: u16 = 104;
    pub const INVALID_PASSWORD: u16 = 105;
    pub const BAD_CREDENTIALS: u16 = 106;
    pub const BAD_TOKEN: u16 = 107;
    pub const RATE_LIMITED: u16 = 108;
    pub const SERVER_BUSY: u16 = 109;
    pub const SERVER_ERROR: u16 = 110;
    pub const NOT_FOUND: u16 = 111;
    pub const UNKNOWN_RECIPIENT: u16 = 120;
    pub const EMPTY_TEXT: u16 = 121;
    pub const TEXT_TOO_LONG: u16 = 122;
    pub const INVALID_DEVICE: u16 = 123;
    pub const NO_SUCH_ROOM: u16 = 130;
    pub const ROOM_NAME_TAKEN: u16 = 131;
    pub const NOT_MEMBER: u16 = 132;
    pub const NOT_HOST: u16 = 133;
    pub const ROOM_CLOSED: u16 = 134;
    pub const ROOM_FULL: u16 = 135;
    pub const TOO_MANY_ROOMS: u16 = 136;
    pub const INVALID_ROOM_NAME: u16 = 137;
    pub const TOO_MANY_WATCHES: u16 = 138;

    /// True for the codes after which the server closes the connection.
    pub fn closes_connection(code: u16) -> bool {
        code < 100
    }
}

/// Longest device name, in bytes ([HB-4.4]).
pub const DEVICE_MAX: usize = 64;
/// Most messages one History request may ask for ([HB-5.7]).
pub const HISTORY_LIMIT_MAX: u16 = 100;

/// A 16-byte session token (a UUID v4 made by the server).
pub type Token = [u8; 16];

/// A request from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Ping,
    Register {
        username: String,
        password: String,
    },
    Login {
        username: String,
        password: String,
        device: String,
        last_seen: u64,
    },
    Resume {
        token: Token,
        device: String,
        last_seen: u64,
    },
    Logout,
    ListTokens,
    RevokeToken {
        token_id: u64,
    },
    Send {
        recipient: String,
        client_msg_id: u64,
        text: String,
    },
    Received {
        up_to: u64,
    },
    Read {
        peer: String,
        up_to: u64,
    },
    History {
        peer: String,
        before_id: u64,
        limit: u16,
    },
    CreateRoom {
        name: String,
        topic: String,
    },
    JoinRoom {
        name: String,
    },
    LeaveRoom {
        name: String,
    },
    Kick {
        room: String,
        user: String,
    },
    CloseRoom {
        name: String,
    },
    /// Rooms by name, after `after` ("" = from the start), at most `limit`.
    ListRooms {
        after: String,
        limit: u16,
    },
    RoomMembers {
        name: String,
    },
    SendRoom {
        room: String,
        client_msg_id: u64,
        text: String,
    },
    RoomHistory {
        room: String,
        before_id: u64,
        limit: u16,
    },
    Watch {
        users: Vec<String>,
    },
    Unwatch {
        users: Vec<String>,
    },
    /// "I am typing" to a user (`room` false) or a room (`room` true). It has no reply.
    Typing {
        room: bool,
        to: String,
    },
    /// The server's counters.
    Stats,
}

/// A room as listed or answered to Create/Join ([HB-10]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomInfo {
    pub room_id: u64,
    pub name: String,
    pub topic: String,
    pub host: String,
    pub member_count: u32,
    pub closed: bool,
}

/// A message posted to a room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomMessage {
    pub id: u64,
    pub room: String,
    pub sender: String,
    pub timestamp_ms: u64,
    pub text: String,
}

/// One member in a RoomMemberList.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub username: String,
    pub online: bool,
}

/// What happened in a room, in a RoomEvent push.
pub mod room_event {
    pub const JOINED: u8 = 1;
    pub const LEFT: u8 = 2;
    pub const KICKED: u8 = 3;
}

/// A user's presence ([HB-11]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceEntry {
    pub username: String,
    /// `presence::UNKNOWN`, `OFFLINE` or `ONLINE`.
    pub state: u8,
    /// When the user's last session ended (0 if never seen, or online now).
    pub last_seen_ms: u64,
}

pub mod presence {
    pub const UNKNOWN: u8 = 0;
    pub const OFFLINE: u8 = 1;
    pub const ONLINE: u8 = 2;
}

/// One message as the server pushes or pages it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u64,
    pub sender: String,
    pub recipient: String,
    pub timestamp_ms: u64,
    pub text: String,
}

/// One row of a token listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenEntry {
    pub token_id: u64,
    pub device: String,
    pub created_at_ms: u64,
    pub last_used_at_ms: u64,
    pub expires_at_ms: u64,
    /// True for the token the asking session logged in with.
    pub current: bool,
}

/// A packet from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Hello {
        connection_id: [u8; 16],
        server_version: String,
        max_frame: u32,
        idle_timeout_ms: u32,
        auth_timeout_ms: u32,
    },
    Pong,
    Error {
        code: u16,
        text: String,
    },
    Ok,
    LoginOk {
        token: Token,
        user_id: u64,
        username: String,
        max_message_id: u64,
        delivered_cursor: u64,
    },
    Tokens(Vec<TokenEntry>),
    Ack {
        message_id: u64,
        timestamp_ms: u64,
    },
    Deliver(Message),
    DeliveryReceipt {
        peer: String,
        up_to: u64,
    },
    ReadReceipt {
        peer: String,
        up_to: u64,
    },
    HistoryPage {
        messages: Vec<Message>,
        more: bool,
    },
    CaughtUp {
        cursor: u64,
    },
    RoomInfo(RoomInfo),
    RoomList {
        rooms: Vec<RoomInfo>,
        more: bool,
    },
    RoomMemberList {
        room: String,
        members: Vec<Member>,
    },
    RoomEvent {
        room: String,
        event: u8,
        user: String,
    },
    RoomClosed {
        room: String,
    },
    RoomDeliver(RoomMessage),
    Presence(PresenceEntry),
    PresenceList(Vec<PresenceEntry>),
    TypingNotice {
        from: String,
        /// The room typed in, or "" for a direct conversation.
        room: String,
    },
    /// Named counters, in a fixed order ([HB-13]); a client shows those it knows and may ignore the rest.
    StatsReply(Vec<(String, u64)>),
    Shutdown {
        text: String,
    },
}

/// Why a body did not decode. Never fatal for the connection: the frame boundary is known, so the server answers
/// `MALFORMED` and reads on ([HB-4.1]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The body ended before a field did.
    Truncated,
    /// Bytes were left after the last field.
    TrailingBytes,
    /// A string was not valid UTF-8.
    InvalidUtf8,
    /// The kind is not one this side decodes.
    WrongKind(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "malformed body: it ends before its last field"),
            DecodeError::TrailingBytes => {
                write!(f, "malformed body: bytes left after the last field")
            }
            DecodeError::InvalidUtf8 => write!(f, "malformed body: a string is not valid UTF-8"),
            DecodeError::WrongKind(k) => write!(f, "kind 0x{k:02x} cannot be decoded here"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Field readers and writers: the whole vocabulary of the wire format.
// ---------------------------------------------------------------------------------------------------------------

/// A cursor over a body. Every read checks the length first, so a short body is `Truncated`, never a panic.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(BigEndian::read_u16(self.take(2)?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(BigEndian::read_u32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(BigEndian::read_u64(self.take(8)?))
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        Ok(self.u8()? != 0)
    }
    fn token(&mut self) -> Result<Token, DecodeError> {
        let mut t = [0u8; 16];
        t.copy_from_slice(self.take(16)?);
        Ok(t)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8)
    }
    /// A u16 count, then that many items. The count is not trusted for the first allocation: a hostile one
    /// gets at most `LIST_PREALLOC` slots up front, and the vector grows only as items actually decode.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = self.u16()? as usize;
        let mut items = Vec::with_capacity(count.min(LIST_PREALLOC));
        for _ in 0..count {
            items.push(item(self)?);
        }
        Ok(items)
    }
    fn finish<T>(self, value: T) -> Result<T, DecodeError> {
        if self.rest.is_empty() {
            Ok(value)
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

/// Most list items reserved before any of them has decoded (see `Reader::list`).
const LIST_PREALLOC: usize = 256;

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
/// Strings longer than u16::MAX bytes cannot be sent; callers enforce smaller limits long before this, so the
/// cut here (at a UTF-8 boundary) only guards against a bug turning into a malformed frame.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_u16(out, end as u16);
    out.extend_from_slice(&s.as_bytes()[..end]);
}
/// A u16 count, then the items (at most u16::MAX of them; callers keep lists far shorter).
fn put_list<T>(out: &mut Vec<u8>, items: &[T], mut put: impl FnMut(&mut Vec<u8>, &T)) {
    let count = items.len().min(u16::MAX as usize);
    put_u16(out, count as u16);
    for item in &items[..count] {
        put(out, item);
    }
}
fn put_room_info(out: &mut Vec<u8>, r: &RoomInfo) {
    put_u64(out, r.room_id);
    put_str(out, &r.name);
    put_str(out, &r.topic);
    put_str(out, &r.host);
    put_u32(out, r.member_count);
    out.push(r.closed as u8);
}
fn read_room_info(r: &mut Reader<'_>) -> Result<RoomInfo, DecodeError> {
    Ok(RoomInfo {
        room_id: r.u64()?,
        name: r.string()?,
        topic: r.string()?,
        host: r.string()?,
        member_count: r.u32()?,
        closed: r.bool()?,
    })
}
fn put_presence(out: &mut Vec<u8>, p: &PresenceEntry) {
    put_str(out, &p.username);
    out.push(p.state);
    put_u64(out, p.last_seen_ms);
}
fn read_presence(r: &mut Reader<'_>) -> Result<PresenceEntry, DecodeError> {
    Ok(PresenceEntry {
        username: r.string()?,
        state: r.u8()?,
        last_seen_ms: r.u64()?,
    })
}
/// The layout every message shares on the wire, direct or room: id, two names (sender and recipient, or room and
/// sender), timestamp, text. Borrowed fields, so the hot path encodes without copying the text first.
fn put_message_fields(
    out: &mut Vec<u8>,
    id: u64,
    first: &str,
    second: &str,
    timestamp_ms: u64,
    text: &str,
) {
    put_u64(out, id);
    put_str(out, first);
    put_str(out, second);
    put_u64(out, timestamp_ms);
    put_str(out, text);
}
/// The fields `put_message_fields` wrote, in the same order.
fn read_message_fields(
    r: &mut Reader<'_>,
) -> Result<(u64, String, String, u64, String), DecodeError> {
    Ok((r.u64()?, r.string()?, r.string()?, r.u64()?, r.string()?))
}
fn put_message(out: &mut Vec<u8>, m: &Message) {
    put_message_fields(out, m.id, &m.sender, &m.recipient, m.timestamp_ms, &m.text);
}
fn read_message(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let (id, sender, recipient, timestamp_ms, text) = read_message_fields(r)?;
    Ok(Message {
        id,
        sender,
        recipient,
        timestamp_ms,
        text,
    })
}
fn put_token_entry(out: &mut Vec<u8>, e: &TokenEntry) {
    put_u64(out, e.token_id);
    put_str(out, &e.device);
    put_u64(out, e.created_at_ms);
    put_u64(out, e.last_used_at_ms);
    put_u64(out, e.expires_at_ms);
    out.push(e.current as u8);
}
fn read_token_entry(r: &mut Reader<'_>) -> Result<TokenEntry, DecodeError> {
    Ok(TokenEntry {
        token_id: r.u64()?,
        device: r.string()?,
        created_at_ms: r.u64()?,
        last_used_at_ms: r.u64()?,
        expires_at_ms: r.u64()?,
        current: r.bool()?,
    })
}

/// Appends a Deliver frame from borrowed fields: the hot path of routing, with no copy of the text before it
/// lands in the output buffer. Byte for byte the same as `Packet::Deliver(..).encode(0, out)`.
pub fn encode_deliver(
    out: &mut Vec<u8>,
    id: u64,
    sender: &str,
    recipient: &str,
    timestamp_ms: u64,
    text: &str,
) {
    put_frame(out, kind::DELIVER, 0, |out| {
        put_message_fields(out, id, sender, recipient, timestamp_ms, text)
    });
}

/// Appends a RoomDeliver frame from borrowed fields (room fan-out encodes once, then copies the bytes).
pub fn encode_room_deliver(
    out: &mut Vec<u8>,
    id: u64,
    room: &str,
    sender: &str,
    timestamp_ms: u64,
    text: &str,
) {
    put_frame(out, kind::ROOM_DELIVER, 0, |out| {
        put_message_fields(out, id, room, sender, timestamp_ms, text)
    });
}

/// Appends one frame: header, then whatever `body` writes, then the real length patched into the header.
fn put_frame(out: &mut Vec<u8>, kind: u8, request_id: u32, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    put_header(out, kind, request_id, 0);
    body(out);
    patch_body_len(out, start);
}

// ---------------------------------------------------------------------------------------------------------------
// Requests (client → server)
// ---------------------------------------------------------------------------------------------------------------

impl Request {
    /// The kind number this request travels under.
    pub fn kind(&self) -> u8 {
        match self {
            Request::Ping => kind::PING,
            Request::Register { .. } => kind::REGISTER,
            Request::Login { .. } => kind::LOGIN,
            Request::Resume { .. } => kind::RESUME,
            Request::Logout => kind::LOGOUT,
            Request::ListTokens => kind::LIST_TOKENS,
            Request::RevokeToken { .. } => kind::REVOKE_TOKEN,
            Request::Send { .. } => kind::SEND,
            Request::Received { .. } => kind::RECEIVED,
            Request::Read { .. } => kind::READ,
            Request::History { .. } => kind::HISTORY,
            Request::CreateRoom { .. } => kind::CREATE_ROOM,
            Request::JoinRoom { .. } => kind::JOIN_ROOM,
            Request::LeaveRoom { .. } => kind::LEAVE_ROOM,
            Request::Kick { .. } => kind::KICK,
            Request::CloseRoom { .. } => kind::CLOSE_ROOM,
            Request::ListRooms { .. } => kind::LIST_ROOMS,
            Request::RoomMembers { .. } => kind::ROOM_MEMBERS,
            Request::SendRoom { .. } => kind::SEND_ROOM,
            Request::RoomHistory { .. } => kind::ROOM_HISTORY,
            Request::Watch { .. } => kind::WATCH,
            Request::Unwatch { .. } => kind::UNWATCH,
            Request::Typing { .. } => kind::TYPING,
            Request::Stats => kind::STATS,
        }
    }

    /// Appends this request as a whole frame.
    pub fn encode(&self, request_id: u32, out: &mut Vec<u8>) {
        put_frame(out, self.kind(), request_id, |out| match self {
            Request::Ping | Request::Logout | Request::ListTokens | Request::Stats => {}
            Request::Register { username, password } => {
                put_str(out, username);
                put_str(out, password);
            }
            Request::Login {
                username,
                password,
                device,
                last_seen,
            } => {
                put_str(out, username);
                put_str(out, password);
                put_str(out, device);
                put_u64(out, *last_seen);
            }
            Request::Resume {
                token,
                device,
                last_seen,
            } => {
                out.extend_from_slice(token);
                put_str(out, device);
                put_u64(out, *last_seen);
            }
            Request::RevokeToken { token_id } => put_u64(out, *token_id),
            Request::Send {
                recipient,
                client_msg_id,
                text,
            } => {
                put_str(out, recipient);
                put_u64(out, *client_msg_id);
                put_str(out, text);
            }
            Request::Received { up_to } => put_u64(out, *up_to),
            Request::Read { peer, up_to } => {
                put_str(out, peer);
                put_u64(out, *up_to);
            }
            Request::History {
                peer,
                before_id,
                limit,
            } => {
                put_str(out, peer);
                put_u64(out, *before_id);
                put_u16(out, *limit);
            }
            Request::CreateRoom { name, topic } => {
                put_str(out, name);
                put_str(out, topic);
            }
            Request::JoinRoom { name }
            | Request::LeaveRoom { name }
            | Request::CloseRoom { name }
            | Request::RoomMembers { name } => put_str(out, name),
            Request::Kick { room, user } => {
                put_str(out, room);
                put_str(out, user);
            }
            Request::ListRooms { after, limit } => {
                put_str(out, after);
                put_u16(out, *limit);
            }
            Request::SendRoom {
                room,
                client_msg_id,
                text,
            } => {
                put_str(out, room);
                put_u64(out, *client_msg_id);
                put_str(out, text);
            }
            Request::RoomHistory {
                room,
                before_id,
                limit,
            } => {
                put_str(out, room);
                put_u64(out, *before_id);
                put_u16(out, *limit);
            }
            Request::Watch { users } | Request::Unwatch { users } => {
                put_list(out, users, |out, u| put_str(out, u))
            }
            Request::Typing { room, to } => {
                out.push(*room as u8);
                put_str(out, to);
            }
        });
    }

    /// Decodes the body of a frame whose header has already passed `framing`.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Request, DecodeError> {
        let mut r = Reader { rest: body };
        let request = match kind {
            kind::PING => Request::Ping,
            kind::REGISTER => Request::Register {
                username: r.string()?,
                password: r.string()?,
            },
            kind::LOGIN => Request::Login {
                username: r.string()?,
                password: r.string()?,
                device: r.string()?,
                last_seen: r.u64()?,
            },
            kind::RESUME => Request::Resume {
                token: r.token()?,
                device: r.string()?,
                last_seen: r.u64()?,
            },
            kind::LOGOUT => Request::Logout,
            kind::LIST_TOKENS => Request::ListTokens,
            kind::REVOKE_TOKEN => Request::RevokeToken { token_id: r.u64()? },
            kind::SEND => Request::Send {
                recipient: r.string()?,
                client_msg_id: r.u64()?,
                text: r.string()?,
            },
            kind::RECEIVED => Request::Received { up_to: r.u64()? },
            kind::READ => Request::Read {
                peer: r.string()?,
                up_to: r.u64()?,
            },
            kind::HISTORY => Request::History {
                peer: r.string()?,
                before_id: r.u64()?,
                limit: r.u16()?,
            },
            kind::CREATE_ROOM => Request::CreateRoom {
                name: r.string()?,
                topic: r.string()?,
            },
            kind::JOIN_ROOM => Request::JoinRoom { name: r.string()? },
            kind::LEAVE_ROOM => Request::LeaveRoom { name: r.string()? },
            kind::KICK => Request::Kick {
                room: r.string()?,
                user: r.string()?,
            },
            kind::CLOSE_ROOM => Request::CloseRoom { name: r.string()? },
            kind::LIST_ROOMS => Request::ListRooms {
                after: r.string()?,
                limit: r.u16()?,
            },
            kind::ROOM_MEMBERS => Request::RoomMembers { name: r.string()? },
            kind::SEND_ROOM => Request::SendRoom {
                room: r.string()?,
                client_msg_id: r.u64()?,
                text: r.string()?,
            },
            kind::ROOM_HISTORY => Request::RoomHistory {
                room: r.string()?,
                before_id: r.u64()?,
                limit: r.u16()?,
            },
            kind::WATCH => Request::Watch {
                users: r.list(Reader::string)?,
            },
            kind::UNWATCH => Request::Unwatch {
                users: r.list(Reader::string)?,
            },
            kind::TYPING => Request::Typing {
                room: r.bool()?,
                to: r.string()?,
            },
            kind::STATS => Request::Stats,
            other => return Err(DecodeError::WrongKind(other)),
        };
        r.finish(request)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Packets (server → client)
// ---------------------------------------------------------------------------------------------------------------

impl Packet {
    /// The kind number this packet travels under.
    pub fn kind(&self) -> u8 {
        match self {
            Packet::Hello { .. } => kind::HELLO,
            Packet::Pong => kind::PONG,
            Packet::Error { .. } => kind::ERROR,
            Packet::Ok => kind::OK,
            Packet::LoginOk { .. } => kind::LOGIN_OK,
            Packet::Tokens(_) => kind::TOKENS,
            Packet::Ack { .. } => kind::ACK,
            Packet::Deliver(_) => kind::DELIVER,
            Packet::DeliveryReceipt { .. } => kind::DELIVERY_RECEIPT,
            Packet::ReadReceipt { .. } => kind::READ_RECEIPT,
            Packet::HistoryPage { .. } => kind::HISTORY_PAGE,
            Packet::CaughtUp { .. } => kind::CAUGHT_UP,
            Packet::RoomInfo(_) => kind::ROOM_INFO,
            Packet::RoomList { .. } => kind::ROOM_LIST,
            Packet::RoomMemberList { .. } => kind::ROOM_MEMBER_LIST,
            Packet::RoomEvent { .. } => kind::ROOM_EVENT,
            Packet::RoomClosed { .. } => kind::ROOM_CLOSED,
            Packet::RoomDeliver(_) => kind::ROOM_DELIVER,
            Packet::Presence(_) => kind::PRESENCE,
            Packet::PresenceList(_) => kind::PRESENCE_LIST,
            Packet::TypingNotice { .. } => kind::TYPING_NOTICE,
            Packet::StatsReply(_) => kind::STATS_REPLY,
            Packet::Shutdown { .. } => kind::SHUTDOWN,
        }
    }

    /// Appends this packet as a whole frame — straight into a session's output buffer, with no temporary.
    pub fn encode(&self, request_id: u32, out: &mut Vec<u8>) {
        put_frame(out, self.kind(), request_id, |out| match self {
            Packet::Hello {
                connection_id,
                server_version,
                max_frame,
                idle_timeout_ms,
                auth_timeout_ms,
            } => {
                out.extend_from_slice(connection_id);
                put_str(out, server_version);
                put_u32(out, *max_frame);
                put_u32(out, *idle_timeout_ms);
                put_u32(out, *auth_timeout_ms);
            }
            Packet::Pong | Packet::Ok => {}
            Packet::Error { code, text } => {
                put_u16(out, *code);
                put_str(out, text);
            }
            Packet::LoginOk {
                token,
                user_id,
                username,
                max_message_id,
                delivered_cursor,
            } => {
                out.extend_from_slice(token);
                put_u64(out, *user_id);
                put_str(out, username);
                put_u64(out, *max_message_id);
                put_u64(out, *delivered_cursor);
            }
            Packet::Tokens(entries) => put_list(out, entries, put_token_entry),
            Packet::Ack {
                message_id,
                timestamp_ms,
            } => {
                put_u64(out, *message_id);
                put_u64(out, *timestamp_ms);
            }
            Packet::Deliver(m) => put_message(out, m),
            Packet::DeliveryReceipt { peer, up_to } | Packet::ReadReceipt { peer, up_to } => {
                put_str(out, peer);
                put_u64(out, *up_to);
            }
            Packet::HistoryPage { messages, more } => {
                put_list(out, messages, put_message);
                out.push(*more as u8);
            }
            Packet::CaughtUp { cursor } => put_u64(out, *cursor),
            Packet::RoomInfo(info) => put_room_info(out, info),
            Packet::RoomList { rooms, more } => {
                put_list(out, rooms, put_room_info);
                out.push(*more as u8);
            }
            Packet::RoomMemberList { room, members } => {
                put_str(out, room);
                put_list(out, members, |out, m| {
                    put_str(out, &m.username);
                    out.push(m.online as u8);
                });
            }
            Packet::RoomEvent { room, event, user } => {
                put_str(out, room);
                out.push(*event);
                put_str(out, user);
            }
            Packet::RoomClosed { room } => put_str(out, room),
            Packet::RoomDeliver(m) => {
                put_message_fields(out, m.id, &m.room, &m.sender, m.timestamp_ms, &m.text)
            }
            Packet::Presence(p) => put_presence(out, p),
            Packet::PresenceList(list) => put_list(out, list, put_presence),
            Packet::TypingNotice { from, room } => {
                put_str(out, from);
                put_str(out, room);
            }
            Packet::StatsReply(counters) => put_list(out, counters, |out, (name, value)| {
                put_str(out, name);
                put_u64(out, *value);
            }),
            Packet::Shutdown { text } => put_str(out, text),
        });
    }

    /// Decodes a server packet (the client library's side).
    pub fn decode(header: &Header, body: &[u8]) -> Result<Packet, DecodeError> {
        let mut r = Reader { rest: body };
        let packet = match header.kind {
            kind::HELLO => Packet::Hello {
                connection_id: r.token()?,
                server_version: r.string()?,
                max_frame: r.u32()?,
                idle_timeout_ms: r.u32()?,
                auth_timeout_ms: r.u32()?,
            },
            kind::PONG => Packet::Pong,
            kind::ERROR => Packet::Error {
                code: r.u16()?,
                text: r.string()?,
            },
            kind::OK => Packet::Ok,
            kind::LOGIN_OK => Packet::LoginOk {
                token: r.token()?,
                user_id: r.u64()?,
                username: r.string()?,
                max_message_id: r.u64()?,
                delivered_cursor: r.u64()?,
            },
            kind::TOKENS => Packet::Tokens(r.list(read_token_entry)?),
            kind::ACK => Packet::Ack {
                message_id: r.u64()?,
                timestamp_ms: r.u64()?,
            },
            kind::DELIVER => Packet::Deliver(read_message(&mut r)?),
            kind::DELIVERY_RECEIPT => Packet::DeliveryReceipt {
                peer: r.string()?,
                up_to: r.u64()?,
            },
            kind::READ_RECEIPT => Packet::ReadReceipt {
                peer: r.string()?,
                up_to: r.u64()?,
            },
            kind::HISTORY_PAGE => Packet::HistoryPage {
                messages: r.list(read_message)?,
                more: r.bool()?,
            },
            kind::CAUGHT_UP => Packet::CaughtUp { cursor: r.u64()? },
            kind::ROOM_INFO => Packet::RoomInfo(read_room_info(&mut r)?),
            kind::ROOM_LIST => Packet::RoomList {
                rooms: r.list(read_room_info)?,
                more: r.bool()?,
            },
            kind::ROOM_MEMBER_LIST => Packet::RoomMemberList {
                room: r.string()?,
                members: r.list(|r| {
                    Ok(Member {
                        username: r.string()?,
                        online: r.bool()?,
                    })
                })?,
            },
            kind::ROOM_EVENT => Packet::RoomEvent {
                room: r.string()?,
                event: r.u8()?,
                user: r.string()?,
            },
            kind::ROOM_CLOSED => Packet::RoomClosed { room: r.string()? },
            kind::ROOM_DELIVER => {
                let (id, room, sender, timestamp_ms, text) = read_message_fields(&mut r)?;
                Packet::RoomDeliver(RoomMessage {
                    id,
                    room,
                    sender,
                    timestamp_ms,
                    text,
                })
            }
            kind::PRESENCE => Packet::Presence(read_presence(&mut r)?),
            kind::PRESENCE_LIST => Packet::PresenceList(r.list(read_presence)?),
            kind::TYPING_NOTICE => Packet::TypingNotice {
                from: r.string()?,
                room: r.string()?,
            },
            kind::STATS_REPLY => Packet::StatsReply(r.list(|r| Ok((r.string()?, r.u64()?)))?),
            kind::SHUTDOWN => Packet::Shutdown { text: r.string()? },
            other => return Err(DecodeError::WrongKind(other)),
        };
        r.finish(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::{split_frame, Frame};

    fn roundtrip_request(req: Request) {
        let mut out = Vec::new();
        req.encode(42, &mut out);
        let Frame {
            header: h,
            body,
            len: used,
        } = split_frame(&out, 1 << 20, is_request_kind)
            .unwrap()
            .unwrap();
        assert_eq!(used, out.len());
        assert_eq!(h.request_id, 42);
        assert_eq!(Request::decode(h.kind, body).unwrap(), req);
    }

    fn roundtrip_packet(p: Packet) {
        let mut out = Vec::new();
        p.encode(7, &mut out);
        let frame = split_frame(&out, 1 << 20, is_packet_kind).unwrap().unwrap();
        assert_eq!(Packet::decode(&frame.header, frame.body).unwrap(), p);
    }

    #[test]
    fn every_request_roundtrips() {
        for req in [
            Request::Ping,
            Request::Register {
                username: "alice".into(),
                password: "hunter22".into(),
            },
            Request::Login {
                username: "a".into(),
                password: "p".into(),
                device: "phone".into(),
                last_seen: 9,
            },
            Request::Resume {
                token: [3; 16],
                device: "laptop".into(),
                last_seen: u64::MAX,
            },
            Request::Logout,
            Request::ListTokens,
            Request::RevokeToken { token_id: 5 },
            Request::Send {
                recipient: "bob".into(),
                client_msg_id: 1,
                text: "héllo 👋".into(),
            },
            Request::Received { up_to: 77 },
            Request::Read {
                peer: "bob".into(),
                up_to: 78,
            },
            Request::History {
                peer: "bob".into(),
                before_id: 0,
                limit: 100,
            },
            Request::CreateRoom {
                name: "lounge".into(),
                topic: "tea".into(),
            },
            Request::JoinRoom {
                name: "lounge".into(),
            },
            Request::LeaveRoom {
                name: "lounge".into(),
            },
            Request::Kick {
                room: "lounge".into(),
                user: "bob".into(),
            },
            Request::CloseRoom {
                name: "lounge".into(),
            },
            Request::ListRooms {
                after: "".into(),
                limit: 10,
            },
            Request::RoomMembers {
                name: "lounge".into(),
            },
            Request::SendRoom {
                room: "lounge".into(),
                client_msg_id: 9,
                text: "hi all".into(),
            },
            Request::RoomHistory {
                room: "lounge".into(),
                before_id: 5,
                limit: 3,
            },
            Request::Watch {
                users: vec!["a".into(), "b".into()],
            },
            Request::Unwatch { users: vec![] },
            Request::Typing {
                room: true,
                to: "lounge".into(),
            },
            Request::Stats,
        ] {
            roundtrip_request(req);
        }
    }

    #[test]
    fn every_packet_roundtrips() {
        let room = RoomInfo {
            room_id: 1,
            name: "lounge".into(),
            topic: "tea".into(),
            host: "a".into(),
            member_count: 2,
            closed: false,
        };
        let seen = PresenceEntry {
            username: "b".into(),
            state: presence::OFFLINE,
            last_seen_ms: 77,
        };
        let m = Message {
            id: 1,
            sender: "a".into(),
            recipient: "b".into(),
            timestamp_ms: 2,
            text: "t".into(),
        };
        for p in [
            Packet::Hello {
                connection_id: [1; 16],
                server_version: "0.1.0".into(),
                max_frame: 65536,
                idle_timeout_ms: 60_000,
                auth_timeout_ms: 10_000,
            },
            Packet::Pong,
            Packet::Error {
                code: code::SERVER_BUSY,
                text: "busy".into(),
            },
            Packet::Ok,
            Packet::LoginOk {
                token: [9; 16],
                user_id: 3,
                username: "a".into(),
                max_message_id: 4,
                delivered_cursor: 2,
            },
            Packet::Tokens(vec![TokenEntry {
                token_id: 1,
                device: "d".into(),
                created_at_ms: 1,
                last_used_at_ms: 2,
                expires_at_ms: 3,
                current: true,
            }]),
            Packet::Ack {
                message_id: 5,
                timestamp_ms: 6,
            },
            Packet::Deliver(m.clone()),
            Packet::DeliveryReceipt {
                peer: "b".into(),
                up_to: 1,
            },
            Packet::ReadReceipt {
                peer: "b".into(),
                up_to: 1,
            },
            Packet::HistoryPage {
                messages: vec![m.clone(), m],
                more: true,
            },
            Packet::CaughtUp { cursor: 8 },
            Packet::RoomInfo(room.clone()),
            Packet::RoomList {
                rooms: vec![room.clone(), room],
                more: false,
            },
            Packet::RoomMemberList {
                room: "lounge".into(),
                members: vec![Member {
                    username: "a".into(),
                    online: true,
                }],
            },
            Packet::RoomEvent {
                room: "lounge".into(),
                event: room_event::KICKED,
                user: "b".into(),
            },
            Packet::RoomClosed {
                room: "lounge".into(),
            },
            Packet::RoomDeliver(RoomMessage {
                id: 4,
                room: "lounge".into(),
                sender: "a".into(),
                timestamp_ms: 5,
                text: "t".into(),
            }),
            Packet::Presence(seen.clone()),
            Packet::PresenceList(vec![seen.clone(), seen]),
            Packet::TypingNotice {
                from: "a".into(),
                room: "".into(),
            },
            Packet::StatsReply(vec![("connections".into(), 3)]),
            Packet::Shutdown { text: "bye".into() },
        ] {
            roundtrip_packet(p);
        }
    }

    // [HB-1.2] invalid UTF-8 in a string is a decode error.
    #[test]
    fn hb_1_2_invalid_utf8_is_refused() {
        let body = [0x00, 0x02, 0xff, 0xfe, 0x00, 0x00];
        assert_eq!(
            Request::decode(kind::REGISTER, &body),
            Err(DecodeError::InvalidUtf8)
        );
    }

    // [HB-4.1] a short body, or bytes left over, is a decode error, not a panic.
    #[test]
    fn hb_4_1_truncated_and_trailing_bodies() {
        assert_eq!(
            Request::decode(kind::RECEIVED, &[0, 0, 0]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            Request::decode(kind::PING, &[1]),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(
            Request::decode(kind::SEND, &[0x00, 0x09, b'a']),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn kinds_are_partitioned_by_the_high_bit() {
        for k in 0..=255u8 {
            assert!(!(is_request_kind(k) && is_packet_kind(k)));
            if is_request_kind(k) {
                assert!(k < 0x80);
            }
            if is_packet_kind(k) {
                assert!(k >= 0x80);
            }
        }
    }
}
