//! Client: a small blocking client over `std::net::TcpStream`, with one typed call per request.
//!
//! Owns: the client's half of the protocol — request ids, waiting for the reply that matches one, and keeping
//! the server's pushes (request id 0) in arrival order for `next_push`. Tests, examples and the load generator
//! all speak the protocol through it, so there is one client implementation to keep right.
//!
//! Must not: be used on the server's loop thread (it blocks), or hide a server Error: every Error frame becomes
//! `ClientError::Server` with its code and text.

use crate::framing::{split_frame, Frame, Header};
use crate::protocol::{
    is_packet_kind, Member, Message, Packet, PresenceEntry, Request, RoomInfo, Token, TokenEntry,
};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
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
    input: Vec<u8>,
    next_request_id: u32,
    /// Server pushes not yet taken by `next_push`, in arrival order.
    pushes: VecDeque<Packet>,
    /// Replies that arrived while waiting for another request's reply (pipelined calls).
    replies: VecDeque<(u32, Packet)>,
    hello: Hello,
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
        let mut client = Client {
            stream,
            input: Vec::with_capacity(4096),
            next_request_id: 1,
            pushes: VecDeque::new(),
            replies: VecDeque::new(),
            hello: Hello {
                connection_id: [0; 16],
                server_version: String::new(),
                max_frame: 0,
                idle_timeout_ms: 0,
                auth_timeout_ms: 0,
            },
        };
        match client.recv(DEFAULT_TIMEOUT)? {
            (
                _,
                Packet::Hello {
                    connection_id,
                    server_version,
                    max_frame,
                    idle_timeout_ms,
                    auth_timeout_ms,
                },
            ) => {
                client.hello = Hello {
                    connection_id,
                    server_version,
                    max_frame,
                    idle_timeout_ms,
                    auth_timeout_ms,
                };
                Ok(client)
            }
            (_, Packet::Error { code, text }) => Err(ClientError::Server { code, text }),
            (_, other) => Err(ClientError::Unexpected(other)),
        }
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
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.checked_add(1).unwrap_or(1);
        let mut frame = Vec::with_capacity(64);
        request.encode(id, &mut frame);
        self.stream.write_all(&frame)?;
        Ok(id)
    }

    /// Writes raw bytes (for tests of hostile input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads the next frame off the socket, whatever it is.
    pub fn recv(&mut self, timeout: Duration) -> Result<(u32, Packet)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((header, packet, used)) = self.parse_buffered()? {
                self.input.drain(..used);
                return Ok((header.request_id, packet));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout);
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ClientError::Closed)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn parse_buffered(&self) -> Result<Option<(Header, Packet, usize)>> {
        match split_frame(&self.input, MAX_INCOMING, is_packet_kind) {
            Ok(None) => Ok(None),
            Ok(Some(Frame {
                header,
                body,
                len: used,
            })) => {
                let packet = Packet::decode(&header, body)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                Ok(Some((header, packet, used)))
            }
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    /// Waits for the reply to request `id`, keeping pushes and other replies for later.
    pub fn wait_reply(&mut self, id: u32, timeout: Duration) -> Result<Packet> {
        if let Some(at) = self.replies.iter().position(|(rid, _)| *rid == id) {
            return into_result(
                self.replies
                    .remove(at)
                    .map(|(_, p)| p)
                    .ok_or(ClientError::Timeout)?,
            );
        }
        let deadline = Instant::now() + timeout;
        loop {
            let (rid, packet) = self.recv(deadline.saturating_duration_since(Instant::now()))?;
            if rid == id {
                return into_result(packet);
            }
            self.stash(rid, packet);
        }
    }

    /// Waits for the next server push (request id 0): Deliver, receipts, CaughtUp, Shutdown, closing Errors.
    pub fn next_push(&mut self, timeout: Duration) -> Result<Packet> {
        if let Some(p) = self.pushes.pop_front() {
            return Ok(p);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let (rid, packet) = self.recv(deadline.saturating_duration_since(Instant::now()))?;
            if rid == 0 {
                return Ok(packet);
            }
            self.stash(rid, packet);
        }
    }

    /// Takes the next reply to any request (for pipelined senders), keeping pushes for `next_push`.
    pub fn next_reply(&mut self, timeout: Duration) -> Result<(u32, Packet)> {
        if let Some(r) = self.replies.pop_front() {
            return Ok(r);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let (rid, packet) = self.recv(deadline.saturating_duration_since(Instant::now()))?;
            if rid != 0 {
                return Ok((rid, packet));
            }
            self.pushes.push_back(packet);
        }
    }

    fn stash(&mut self, rid: u32, packet: Packet) {
        if rid == 0 {
            self.pushes.push_back(packet);
        } else {
            self.replies.push_back((rid, packet));
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
        match self.call(&request)? {
            Packet::Ack {
                message_id,
                timestamp_ms,
            } => Ok((message_id, timestamp_ms)),
            other => Err(ClientError::Unexpected(other)),
        }
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
        match self.call(&Request::History {
            peer: peer.into(),
            before_id,
            limit,
        })? {
            Packet::HistoryPage { messages, more } => Ok((messages, more)),
            other => Err(ClientError::Unexpected(other)),
        }
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
        match self.call(&request)? {
            Packet::Ack {
                message_id,
                timestamp_ms,
            } => Ok((message_id, timestamp_ms)),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// One page of a room's history, newest first (messages carry the room's name as recipient).
    pub fn room_history(
        &mut self,
        room: &str,
        before_id: u64,
        limit: u16,
    ) -> Result<(Vec<Message>, bool)> {
        match self.call(&Request::RoomHistory {
            room: room.into(),
            before_id,
            limit,
        })? {
            Packet::HistoryPage { messages, more } => Ok((messages, more)),
            other => Err(ClientError::Unexpected(other)),
        }
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

fn into_result(packet: Packet) -> Result<Packet> {
    match packet {
        Packet::Error { code, text } => Err(ClientError::Server { code, text }),
        other => Ok(other),
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
