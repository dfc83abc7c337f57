//! Client: a small blocking client over `std::net::TcpStream`, with one typed call per request.
//!
//! Owns: the client's half of the protocol — request ids, waiting for the reply that matches one, and keeping
//! the server's pushes (request id 0) in arrival order for `next_push`. Tests, examples and the load generator
//! all speak the protocol through it, so there is one client implementation to keep right.
//!
//! A `Client` reads and writes through `&mut self`, which suits request-then-reply use on one thread. A program
//! that must read while it writes (the CLI prints pushes while its user types) calls `Client::split` once logged
//! in: a `FrameReader` for one thread and a `RequestWriter` for another, over the same socket, still with one
//! frame-reading loop (`read_frame`) and one request encoder (`write_request`) in this file.
//!
//! Must not: be used on the server's loop thread (it blocks), or hide a server Error: every Error frame becomes
//! `ClientError::Server` with its code and text.

use crate::framing::{split_frame, Frame};
use crate::protocol::{
    is_packet_kind, Member, Message, Packet, PresenceEntry, Request, RoomInfo, Token, TokenEntry,
};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long typed calls wait for their reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame body the client accepts from a server (a history page of 100 long messages fits).
const MAX_INCOMING: u32 = 16 * 1024 * 1024;

/// What went wrong with a call.
#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// The server closed the connection.
    Closed,
    /// No reply in time.
    Timeout,
    /// The server sent bytes that are not a valid frame or packet.
    Protocol(String),
    /// The server answered with an Error frame.
    Server {
        code: u16,
        text: String,
    },
    /// The server answered with a packet the call did not expect.
    Unexpected(Packet),
    /// A whole frame arrived but its body did not decode as the packet its kind names. The frame has been
    /// consumed, so the connection can go on (unlike `Protocol`, after which the input cannot be framed).
    Undecodable {
        request_id: u32,
        reason: String,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "connection error: {e}"),
            ClientError::Closed => write!(f, "the server closed the connection"),
            ClientError::Timeout => write!(f, "no answer from the server in time"),
            ClientError::Protocol(e) => write!(f, "protocol error: {e}"),
            ClientError::Server { code, text } => write!(f, "server error {code}: {text}"),
            ClientError::Unexpected(p) => write!(f, "unexpected answer: {p:?}"),
            ClientError::Undecodable { request_id, reason } => {
                write!(f, "undecodable frame (request id {request_id}): {reason}")
            }
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
            _ => ClientError::Io(e),
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// What the server said when it greeted us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub connection_id: [u8; 16],
    pub server_version: String,
    pub max_frame: u32,
    pub idle_timeout_ms: u32,
    pub auth_timeout_ms: u32,
}

/// The answer to a successful Login or Resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginInfo {
    pub token: Token,
    pub user_id: u64,
    pub username: String,
    pub max_message_id: u64,
    pub delivered_cursor: u64,
}

/// A connection to a hubbub server.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    /// Bytes read but not yet a whole frame.
    input: Vec<u8>,
    next_request_id: u32,
    /// Frames read while waiting for something else.
    stash: Stash,
    hello: Hello,
}

/// Frames read while waiting for something else: server pushes not yet taken by `next_push`, and replies that
/// arrived while waiting for another request's reply (pipelined calls). Each carries its arrival number, so
/// that `Client::split` can hand them over in the order they came.
#[derive(Debug, Default)]
struct Stash {
    pushes: VecDeque<(u64, Packet)>,
    replies: VecDeque<(u64, u32, Packet)>,
    arrivals: u64,
}

impl Stash {
    fn keep(&mut self, rid: u32, packet: Packet) {
        let n = self.arrivals;
        self.arrivals += 1;
        if rid == 0 {
            self.pushes.push_back((n, packet));
        } else {
            self.replies.push_back((n, rid, packet));
        }
    }

    fn take_push(&mut self) -> Option<Packet> {
        self.pushes.pop_front().map(|(_, p)| p)
    }

    fn take_reply(&mut self) -> Option<(u32, Packet)> {
        self.replies.pop_front().map(|(_, rid, p)| (rid, p))
    }

    fn take_reply_to(&mut self, id: u32) -> Option<Packet> {
        let at = self.replies.iter().position(|(_, rid, _)| *rid == id)?;
        self.replies.remove(at).map(|(_, _, p)| p)
    }

    /// Everything kept, pushes and replies together, in arrival order.
    fn into_arrival_order(self) -> VecDeque<(u32, Packet)> {
        let mut all: Vec<(u64, u32, Packet)> = self
            .pushes
            .into_iter()
            .map(|(n, p)| (n, 0, p))
            .chain(self.replies)
            .collect();
        all.sort_unstable_by_key(|(n, _, _)| *n);
        all.into_iter().map(|(_, rid, p)| (rid, p)).collect()
    }
}

impl Client {
    /// Connects and reads the server's Hello.
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Client> {
        let stream = TcpStream::connect(addr)?;
        Client::from_stream(stream)
    }

    /// Wraps a connected stream and reads the Hello.
    pub fn from_stream(stream: TcpStream) -> Result<Client> {
        stream.set_nodelay(true)?;
        let mut input = Vec::with_capacity(4096);
        let hello = match read_frame(&stream, &mut input, DEFAULT_TIMEOUT)? {
            (
                _,
                Packet::Hello {
                    connection_id,
                    server_version,
                    max_frame,
                    idle_timeout_ms,
                    auth_timeout_ms,
                },
            ) => Hello {
                connection_id,
                server_version,
                max_frame,
                idle_timeout_ms,
                auth_timeout_ms,
            },
            (_, Packet::Error { code, text }) => return Err(ClientError::Server { code, text }),
            (_, other) => return Err(ClientError::Unexpected(other)),
        };
        Ok(Client {
            stream,
            input,
            next_request_id: 1,
            stash: Stash::default(),
            hello,
        })
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The underlying socket (for tests that need to misbehave).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends a request without waiting; returns its request id.
    pub fn send_request(&mut self, request: &Request) -> Result<u32> {
        write_request(&self.stream, &mut self.next_request_id, request)
    }

    /// Writes raw bytes (for tests of hostile input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads the next frame off the socket, whatever it is. Frames already kept for `next_push`, `next_reply`
    /// or `wait_reply` stay there.
    pub fn recv(&mut self, timeout: Duration) -> Result<(u32, Packet)> {
        read_frame(&self.stream, &mut self.input, timeout)
    }

    /// Splits the connection into a reading half and a writing half that can live on two threads.
    ///
    /// Why: `recv` and the typed calls need `&mut self`, so one thread cannot wait for pushes while another
    /// sends requests. A program that must do both (the CLI prints messages while its user types) logs in
    /// with the typed calls, then splits. The `FrameReader` takes the unparsed input and every push and reply
    /// already kept, and gives them out first, in arrival order, so nothing received before the split is lost.
    /// The `RequestWriter` writes on a `try_clone` of the socket and carries on the request-id counter, so its
    /// ids never repeat one used before the split. Socket options (timeouts, `shutdown`) are shared by both.
    pub fn split(self) -> Result<(FrameReader, RequestWriter)> {
        let writer = RequestWriter {
            stream: self.stream.try_clone()?,
            next_request_id: self.next_request_id,
        };
        let reader = FrameReader {
            stream: self.stream,
            input: self.input,
            queued: self.stash.into_arrival_order(),
        };
        Ok((reader, writer))
    }

    /// Waits for the reply to request `id`, keeping pushes and other replies for later.
    pub fn wait_reply(&mut self, id: u32, timeout: Duration) -> Result<Packet> {
        if let Some(packet) = self.stash.take_reply_to(id) {
            return into_result(packet);
        }
        let (_, packet) = self.recv_until(timeout, |rid| rid == id)?;
        into_result(packet)
    }

    /// Waits for the next server push (request id 0): Deliver, receipts, CaughtUp, Shutdown, closing Errors.
    pub fn next_push(&mut self, timeout: Duration) -> Result<Packet> {
        if let Some(p) = self.stash.take_push() {
            return Ok(p);
        }
        let (_, packet) = self.recv_until(timeout, |rid| rid == 0)?;
        Ok(packet)
    }

    /// Takes the next reply to any request (for pipelined senders), keeping pushes for `next_push`.
    pub fn next_reply(&mut self, timeout: Duration) -> Result<(u32, Packet)> {
        if let Some(r) = self.stash.take_reply() {
            return Ok(r);
        }
        self.recv_until(timeout, |rid| rid != 0)
    }

    /// Reads frames until one whose request id `wanted` accepts, keeping the others for later calls.
    fn recv_until(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(u32) -> bool,
    ) -> Result<(u32, Packet)> {
        let deadline = Instant::now() + timeout;
        loop {
            let (rid, packet) = self.recv(deadline.saturating_duration_since(Instant::now()))?;
            if wanted(rid) {
                return Ok((rid, packet));
            }
            self.stash.keep(rid, packet);
        }
    }

    /// Sends a request and waits for its reply; an Error reply is `Err(ClientError::Server)`.
    pub fn call(&mut self, request: &Request) -> Result<Packet> {
        let id = self.send_request(request)?;
        self.wait_reply(id, DEFAULT_TIMEOUT)
    }

    fn call_ok(&mut self, request: &Request) -> Result<()> {
        match self.call(request)? {
            Packet::Ok => Ok(()),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    pub fn ping(&mut self) -> Result<()> {
        match self.call(&Request::Ping)? {
            Packet::Pong => Ok(()),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    pub fn register(&mut self, username: &str, password: &str) -> Result<()> {
        self.call_ok(&Request::Register {
            username: username.into(),
            password: password.into(),
        })
    }

    pub fn login(
        &mut self,
        username: &str,
        password: &str,
        device: &str,
        last_seen: u64,
    ) -> Result<LoginInfo> {
        let request = Request::Login {
            username: username.into(),
            password: password.into(),
            device: device.into(),
            last_seen,
        };
        into_login(self.call(&request)?)
    }

    pub fn resume(&mut self, token: Token, device: &str, last_seen: u64) -> Result<LoginInfo> {
        into_login(self.call(&Request::Resume {
            token,
            device: device.into(),
            last_seen,
        })?)
    }

    pub fn logout(&mut self) -> Result<()> {
        self.call_ok(&Request::Logout)
    }

    pub fn list_tokens(&mut self) -> Result<Vec<TokenEntry>> {
        match self.call(&Request::ListTokens)? {
            Packet::Tokens(list) => Ok(list),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    pub fn revoke_token(&mut self, token_id: u64) -> Result<()> {
        self.call_ok(&Request::RevokeToken { token_id })
    }

    /// Sends a direct message and waits for its Ack: (message id, timestamp in ms).
    pub fn send_message(
        &mut self,
        recipient: &str,
        client_msg_id: u64,
        text: &str,
    ) -> Result<(u64, u64)> {
        let request = Request::Send {
            recipient: recipient.into(),
            client_msg_id,
            text: text.into(),
        };
        into_ack(self.call(&request)?)
    }

    pub fn received(&mut self, up_to: u64) -> Result<()> {
        self.call_ok(&Request::Received { up_to })
    }

    pub fn read(&mut self, peer: &str, up_to: u64) -> Result<()> {
        self.call_ok(&Request::Read {
            peer: peer.into(),
            up_to,
        })
    }

    /// One page of history with `peer`, newest first, older than `before_id` (0: from the newest).
    pub fn history(
        &mut self,
        peer: &str,
        before_id: u64,
        limit: u16,
    ) -> Result<(Vec<Message>, bool)> {
        into_page(self.call(&Request::History {
            peer: peer.into(),
            before_id,
            limit,
        })?)
    }

    // --- rooms ---

    pub fn create_room(&mut self, name: &str, topic: &str) -> Result<RoomInfo> {
        into_room(self.call(&Request::CreateRoom {
            name: name.into(),
            topic: topic.into(),
        })?)
    }

    pub fn join_room(&mut self, name: &str) -> Result<RoomInfo> {
        into_room(self.call(&Request::JoinRoom { name: name.into() })?)
    }

    pub fn leave_room(&mut self, name: &str) -> Result<()> {
        self.call_ok(&Request::LeaveRoom { name: name.into() })
    }

    pub fn kick(&mut self, room: &str, user: &str) -> Result<()> {
        self.call_ok(&Request::Kick {
            room: room.into(),
            user: user.into(),
        })
    }

    pub fn close_room(&mut self, name: &str) -> Result<()> {
        self.call_ok(&Request::CloseRoom { name: name.into() })
    }

    /// One page of rooms by name after `after` ("" = from the start): (rooms, more).
    pub fn list_rooms(&mut self, after: &str, limit: u16) -> Result<(Vec<RoomInfo>, bool)> {
        match self.call(&Request::ListRooms {
            after: after.into(),
            limit,
        })? {
            Packet::RoomList { rooms, more } => Ok((rooms, more)),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    pub fn room_members(&mut self, name: &str) -> Result<Vec<Member>> {
        match self.call(&Request::RoomMembers { name: name.into() })? {
            Packet::RoomMemberList { members, .. } => Ok(members),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Posts to a room and waits for its Ack: (message id, timestamp in ms).
    pub fn send_room(&mut self, room: &str, client_msg_id: u64, text: &str) -> Result<(u64, u64)> {
        let request = Request::SendRoom {
            room: room.into(),
            client_msg_id,
            text: text.into(),
        };
        into_ack(self.call(&request)?)
    }

    /// One page of a room's history, newest first (messages carry the room's name as recipient).
    pub fn room_history(
        &mut self,
        room: &str,
        before_id: u64,
        limit: u16,
    ) -> Result<(Vec<Message>, bool)> {
        into_page(self.call(&Request::RoomHistory {
            room: room.into(),
            before_id,
            limit,
        })?)
    }

    // --- presence, typing, stats ---

    pub fn watch(&mut self, users: &[&str]) -> Result<Vec<PresenceEntry>> {
        let users = users.iter().map(|u| (*u).to_owned()).collect();
        match self.call(&Request::Watch { users })? {
            Packet::PresenceList(list) => Ok(list),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    pub fn unwatch(&mut self, users: &[&str]) -> Result<()> {
        self.call_ok(&Request::Unwatch {
            users: users.iter().map(|u| (*u).to_owned()).collect(),
        })
    }

    /// Says "typing" to a user or a room. There is no reply.
    pub fn typing(&mut self, room: bool, to: &str) -> Result<()> {
        self.send_request(&Request::Typing {
            room,
            to: to.into(),
        })
        .map(drop)
    }

    pub fn stats(&mut self) -> Result<Vec<(String, u64)>> {
        match self.call(&Request::Stats)? {
            Packet::StatsReply(counters) => Ok(counters),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Waits for the next Deliver push, skipping other pushes (receipts, CaughtUp).
    pub fn next_message(&mut self, timeout: Duration) -> Result<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_push(deadline.saturating_duration_since(Instant::now()))? {
                Packet::Deliver(m) => return Ok(m),
                Packet::Error { code, text } => return Err(ClientError::Server { code, text }),
                _ => continue,
            }
        }
    }
}

/// The reading half of a split `Client` (see `Client::split`): everything the server sends, pushes and replies
/// alike, in arrival order.
#[derive(Debug)]
pub struct FrameReader {
    stream: TcpStream,
    input: Vec<u8>,
    /// Frames the `Client` had read and kept before the split, in arrival order; given out first.
    queued: VecDeque<(u32, Packet)>,
}

impl FrameReader {
    /// The next frame, whatever it is: (request id, packet), the id 0 for a push. Frames received before the
    /// split come first. With a zero timeout it only parses what has already been read and never waits.
    /// `Err(Undecodable)` skips one bad frame and the reader can go on; `Closed`, `Io` and `Protocol` end it.
    pub fn recv(&mut self, timeout: Duration) -> Result<(u32, Packet)> {
        if let Some(frame) = self.queued.pop_front() {
            return Ok(frame);
        }
        read_frame(&self.stream, &mut self.input, timeout)
    }
}

/// The writing half of a split `Client` (see `Client::split`). Replies to its requests arrive on the
/// `FrameReader`, with the ids `send_request` returned.
#[derive(Debug)]
pub struct RequestWriter {
    stream: TcpStream,
    next_request_id: u32,
}

impl RequestWriter {
    /// The id the next `send_request` will use: a caller that shares this writer records what the request is
    /// for under that id before sending, so the reply, which may arrive before `send_request` returns, finds it.
    pub fn next_request_id(&self) -> u32 {
        self.next_request_id
    }

    /// Sends a request without waiting; returns its request id.
    pub fn send_request(&mut self, request: &Request) -> Result<u32> {
        write_request(&self.stream, &mut self.next_request_id, request)
    }

    /// Writes raw bytes (for tests of hostile input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Shuts the connection down both ways: the `FrameReader` then sees `Closed`.
    pub fn shutdown(&self) -> Result<()> {
        self.stream.shutdown(Shutdown::Both)?;
        Ok(())
    }
}

/// Encodes `request` with the next request id (ids wrap past `u32::MAX` to 1; 0 is for the server's pushes) and
/// writes it; returns the id. The one request writer, for `Client` and `RequestWriter`.
fn write_request(mut stream: &TcpStream, next_id: &mut u32, request: &Request) -> Result<u32> {
    let id = *next_id;
    *next_id = next_id.checked_add(1).unwrap_or(1);
    let mut frame = Vec::with_capacity(64);
    request.encode(id, &mut frame);
    stream.write_all(&frame)?;
    Ok(id)
}

/// The one frame-reading loop, for `Client::recv` and `FrameReader::recv`: takes the next whole frame from
/// `input`, reading more from `stream` until `timeout` passes.
fn read_frame(
    mut stream: &TcpStream,
    input: &mut Vec<u8>,
    timeout: Duration,
) -> Result<(u32, Packet)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(frame) = take_frame(input)? {
            return Ok(frame);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout);
        }
        stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk) {
            Ok(0) => return Err(ClientError::Closed),
            Ok(n) => input.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ClientError::Closed)
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The first whole frame in `input`, removed from it, if there is one. A frame that does not decode is
/// removed too (`Undecodable`); input that cannot be framed stays (`Protocol`, and every later call says so).
fn take_frame(input: &mut Vec<u8>) -> Result<Option<(u32, Packet)>> {
    let (request_id, used, decoded) = match split_frame(input, MAX_INCOMING, is_packet_kind) {
        Ok(None) => return Ok(None),
        Ok(Some(Frame { header, body, len })) => (
            header.request_id,
            len,
            Packet::decode(&header, body).map_err(|e| e.to_string()),
        ),
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    };
    input.drain(..used);
    match decoded {
        Ok(packet) => Ok(Some((request_id, packet))),
        Err(reason) => Err(ClientError::Undecodable { request_id, reason }),
    }
}

fn into_result(packet: Packet) -> Result<Packet> {
    match packet {
        Packet::Error { code, text } => Err(ClientError::Server { code, text }),
        other => Ok(other),
    }
}

/// The Ack that answers Send and SendRoom: (message id, timestamp in ms).
fn into_ack(packet: Packet) -> Result<(u64, u64)> {
    match packet {
        Packet::Ack {
            message_id,
            timestamp_ms,
        } => Ok((message_id, timestamp_ms)),
        other => Err(ClientError::Unexpected(other)),
    }
}

/// The HistoryPage that answers History and RoomHistory: (messages newest first, more).
fn into_page(packet: Packet) -> Result<(Vec<Message>, bool)> {
    match packet {
        Packet::HistoryPage { messages, more } => Ok((messages, more)),
        other => Err(ClientError::Unexpected(other)),
    }
}

fn into_room(packet: Packet) -> Result<RoomInfo> {
    match packet {
        Packet::RoomInfo(info) => Ok(info),
        other => Err(ClientError::Unexpected(other)),
    }
}

fn into_login(packet: Packet) -> Result<LoginInfo> {
    match packet {
        Packet::LoginOk {
            token,
            user_id,
            username,
            max_message_id,
            delivered_cursor,
        } => Ok(LoginInfo {
            token,
            user_id,
            username,
            max_message_id,
            delivered_cursor,
        }),
        other => Err(ClientError::Unexpected(other)),
    }
}
