#!/usr/bin/env python3
"""A hubbub client in Python, written from proto.md alone (standard library only).

hubbub speaks a binary protocol over TCP (proto.md, "The hubbub protocol, version 1"). Every frame, in both
directions, is a 12-byte header followed by a body:

    magic "HB" | version 0x01 | kind u8 | request id u32 BE | body length u32 BE | body

Integers are big-endian, strings are a u16 byte length then UTF-8, lists are a u16 count then the items, a token
is 16 raw bytes and a bool is one byte. The client picks a non-zero request id for each request and the server
echoes it in the one reply; frames the server sends on its own ("pushes": messages, receipts, room events,
presence, ...) carry request id 0 and may arrive between any two replies.

`Client` below keeps a byte buffer, cuts whole frames out of it (a frame may arrive over many reads, and one read
may hold several frames), and while it waits for the reply to a request it queues every push it sees, so that
`next_message()` and `next_push()` can hand them out later. Replies are matched by request id, never by
position, so several requests may be outstanding at once (`Client.submit()` / `Client.wait()`).

Usage:

    python3 examples/client.py --server 127.0.0.1:7878 --user alice --password 'correct horse' \\
        --register --send bob "hello"
    python3 examples/client.py --server 127.0.0.1:7878 --user bob --password 'correct horse' --listen 30
    python3 examples/client.py --selftest 127.0.0.1:7878     # the end-to-end check run by tests/python_client.rs
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import socket
import struct
import sys
import time
import traceback

# ---------------------------------------------------------------------------------------------------------------
# Protocol constants (proto.md §3, §4, §12)
# ---------------------------------------------------------------------------------------------------------------

MAGIC = b"HB"
VERSION = 1
HEADER = struct.Struct(">2sBBII")  # magic, version, kind, request id, body length [HB-2.1]
assert HEADER.size == 12

# Server frames are not bounded by max_frame; clients SHOULD accept at least 16 MiB [HB-2.10].
MAX_SERVER_BODY = 64 * 1024 * 1024

# Client kinds [HB-3]
PING = 0x01
REGISTER = 0x02
LOGIN = 0x03
RESUME = 0x04
LOGOUT = 0x05
LIST_TOKENS = 0x06
REVOKE_TOKEN = 0x07
SEND = 0x10
RECEIVED = 0x11
READ = 0x12
HISTORY = 0x13
CREATE_ROOM = 0x20
JOIN_ROOM = 0x21
LEAVE_ROOM = 0x22
KICK = 0x23
CLOSE_ROOM = 0x24
LIST_ROOMS = 0x25
ROOM_MEMBERS = 0x26
SEND_ROOM = 0x27
ROOM_HISTORY = 0x28
WATCH = 0x30
UNWATCH = 0x31
TYPING = 0x32
STATS = 0x38

# Server kinds [HB-3]
HELLO = 0x80
PONG = 0x81
ERROR = 0x82
OK = 0x83
LOGIN_OK = 0x84
TOKENS = 0x85
ACK = 0x90
DELIVER = 0x91
DELIVERY_RECEIPT = 0x92
READ_RECEIPT = 0x93
HISTORY_PAGE = 0x94
CAUGHT_UP = 0x95
ROOM_EVENT = 0xA0
ROOM_CLOSED = 0xA1
ROOM_LIST = 0xA2
ROOM_MEMBER_LIST = 0xA3
ROOM_INFO = 0xA4
ROOM_DELIVER = 0xA5
PRESENCE = 0xB0
TYPING_NOTICE = 0xB1
PRESENCE_LIST = 0xB2
STATS_REPLY = 0xB8
SHUTDOWN = 0xBF

# Error codes [HB-6]. Below 100 the server closes the connection after the Error frame.
ERROR_NAMES = {
    1: "BAD_MAGIC", 2: "BAD_VERSION", 3: "UNKNOWN_KIND", 4: "FRAME_TOO_LARGE", 5: "SERVER_FULL",
    6: "TOO_MANY_FROM_ADDRESS", 7: "IDLE_TIMEOUT", 8: "AUTH_TIMEOUT", 9: "SESSION_REPLACED",
    10: "TOKEN_REVOKED", 11: "SLOW_CONSUMER",
    100: "MALFORMED", 101: "NOT_AUTHENTICATED", 102: "ALREADY_AUTHENTICATED", 103: "USERNAME_TAKEN",
    104: "INVALID_USERNAME", 105: "INVALID_PASSWORD", 106: "BAD_CREDENTIALS", 107: "BAD_TOKEN",
    108: "RATE_LIMITED", 109: "SERVER_BUSY", 110: "SERVER_ERROR", 111: "NOT_FOUND",
    120: "UNKNOWN_RECIPIENT", 121: "EMPTY_TEXT", 122: "TEXT_TOO_LONG", 123: "INVALID_DEVICE",
    130: "NO_SUCH_ROOM", 131: "ROOM_NAME_TAKEN", 132: "NOT_MEMBER", 133: "NOT_HOST", 134: "ROOM_CLOSED",
    135: "ROOM_FULL", 136: "TOO_MANY_ROOMS", 137: "INVALID_ROOM_NAME", 138: "TOO_MANY_WATCHES",
}
USERNAME_TAKEN = 103
BAD_CREDENTIALS = 106
UNKNOWN_RECIPIENT = 120

# RoomEvent.event [§5.37] and PresenceEntry.state [§5.43]
ROOM_EVENT_NAMES = {1: "joined", 2: "left", 3: "kicked"}
PRESENCE_UNKNOWN, PRESENCE_OFFLINE, PRESENCE_ONLINE = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


class ServerError(Exception):
    """An Error frame from the server (0x82): a failed request, or a reason for closing the connection."""

    def __init__(self, code: int, text: str, request_id: int = 0):
        self.code = code
        self.text = text
        self.request_id = request_id
        super().__init__(f"{ERROR_NAMES.get(code, 'UNKNOWN')} ({code}): {text}")

    @property
    def fatal(self) -> bool:
        """Codes below 100 mean the server closes the connection [HB-6.1], [HB-6.3]."""
        return self.code < 100


class ProtocolError(Exception):
    """The server sent something this client cannot make sense of (bad header, undecodable body, wrong kind)."""


class ConnectionClosed(Exception):
    """The server closed the connection."""


# ---------------------------------------------------------------------------------------------------------------
# Packets the server sends (proto.md §5.25–§5.47)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Hello:
    connection_id: bytes
    server_version: str
    max_frame: int
    idle_timeout_ms: int
    auth_timeout_ms: int


@dataclasses.dataclass
class LoginOk:
    token: bytes
    user_id: int
    username: str
    max_message_id: int
    delivered_cursor: int


@dataclasses.dataclass
class TokenEntry:
    token_id: int
    device: str
    created_at_ms: int
    last_used_at_ms: int
    expires_at_ms: int
    current: bool


@dataclasses.dataclass
class Ack:
    message_id: int
    timestamp_ms: int


@dataclasses.dataclass
class Message:
    """A direct message (Deliver), or an item of a HistoryPage (where `recipient` may be a room's name)."""

    id: int
    sender: str
    recipient: str
    timestamp_ms: int
    text: str


@dataclasses.dataclass
class RoomMessage:
    """A room message (RoomDeliver)."""

    id: int
    room: str
    sender: str
    timestamp_ms: int
    text: str


@dataclasses.dataclass
class DeliveryReceipt:
    peer: str
    up_to: int


@dataclasses.dataclass
class ReadReceipt:
    peer: str
    up_to: int


@dataclasses.dataclass
class HistoryPage:
    messages: list
    more: bool


@dataclasses.dataclass
class CaughtUp:
    cursor: int


@dataclasses.dataclass
class RoomEvent:
    room: str
    event: int  # 1 joined, 2 left, 3 kicked
    user: str

    @property
    def event_name(self) -> str:
        return ROOM_EVENT_NAMES.get(self.event, f"event {self.event}")


@dataclasses.dataclass
class RoomClosed:
    room: str


@dataclasses.dataclass
class RoomInfo:
    room_id: int
    name: str
    topic: str
    host: str
    member_count: int
    closed: bool


@dataclasses.dataclass
class RoomList:
    rooms: list
    more: bool


@dataclasses.dataclass
class Member:
    username: str
    online: bool


@dataclasses.dataclass
class RoomMemberList:
    room: str
    members: list


@dataclasses.dataclass
class PresenceEntry:
    """A Presence push, or an item of a PresenceList. state: 0 unknown user, 1 offline, 2 online."""

    username: str
    state: int
    last_seen_ms: int


@dataclasses.dataclass
class TypingNotice:
    from_user: str
    room: str  # "" for a direct conversation


@dataclasses.dataclass
class Shutdown:
    text: str


# ---------------------------------------------------------------------------------------------------------------
# Encoding and decoding of bodies [HB-1]
# ---------------------------------------------------------------------------------------------------------------


class Writer:
    """Builds a body field by field."""

    def __init__(self):
        self.buf = bytearray()

    def u8(self, v: int) -> "Writer":
        self.buf += struct.pack(">B", v)
        return self

    def u16(self, v: int) -> "Writer":
        self.buf += struct.pack(">H", v)
        return self

    def u32(self, v: int) -> "Writer":
        self.buf += struct.pack(">I", v)
        return self

    def u64(self, v: int) -> "Writer":
        self.buf += struct.pack(">Q", v)
        return self

    def bool(self, v: bool) -> "Writer":
        return self.u8(1 if v else 0)

    def string(self, s: str) -> "Writer":
        data = s.encode("utf-8")
        if len(data) > 0xFFFF:
            raise ValueError("a string is at most 65,535 bytes of UTF-8 [HB-1.2]")
        self.u16(len(data))
        self.buf += data
        return self

    def token(self, t: bytes) -> "Writer":
        if len(t) != 16:
            raise ValueError("a token is exactly 16 bytes [HB-1.3]")
        self.buf += t
        return self

    def string_list(self, items) -> "Writer":
        items = list(items)
        self.u16(len(items))
        for s in items:
            self.string(s)
        return self

    def bytes(self) -> bytes:
        return bytes(self.buf)


class Reader:
    """Reads a body field by field; any shortfall, leftover or bad UTF-8 is a ProtocolError [HB-4.1]."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("body ends before its last field")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self._take(8))[0]

    def bool(self) -> bool:
        return self.u8() != 0

    def string(self) -> str:
        raw = self._take(self.u16())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"a string is not valid UTF-8: {e}") from None

    def token(self) -> bytes:
        return self._take(16)

    def list(self, item):
        return [item(self) for _ in range(self.u16())]

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} bytes left after the last field")


def _message(r: Reader) -> Message:
    return Message(r.u64(), r.string(), r.string(), r.u64(), r.string())


def _room_info(r: Reader) -> RoomInfo:
    return RoomInfo(r.u64(), r.string(), r.string(), r.string(), r.u32(), r.bool())


def _presence_entry(r: Reader) -> PresenceEntry:
    return PresenceEntry(r.string(), r.u8(), r.u64())


# How to decode the body of each server kind. Pong and Ok have empty bodies and decode to None.
DECODERS = {
    HELLO: lambda r: Hello(r.token(), r.string(), r.u32(), r.u32(), r.u32()),
    PONG: lambda r: None,
    ERROR: lambda r: ServerError(r.u16(), r.string()),
    OK: lambda r: None,
    LOGIN_OK: lambda r: LoginOk(r.token(), r.u64(), r.string(), r.u64(), r.u64()),
    TOKENS: lambda r: r.list(lambda r: TokenEntry(r.u64(), r.string(), r.u64(), r.u64(), r.u64(), r.bool())),
    ACK: lambda r: Ack(r.u64(), r.u64()),
    DELIVER: _message,
    DELIVERY_RECEIPT: lambda r: DeliveryReceipt(r.string(), r.u64()),
    READ_RECEIPT: lambda r: ReadReceipt(r.string(), r.u64()),
    HISTORY_PAGE: lambda r: HistoryPage(r.list(_message), r.bool()),
    CAUGHT_UP: lambda r: CaughtUp(r.u64()),
    ROOM_EVENT: lambda r: RoomEvent(r.string(), r.u8(), r.string()),
    ROOM_CLOSED: lambda r: RoomClosed(r.string()),
    ROOM_LIST: lambda r: RoomList(r.list(_room_info), r.bool()),
    ROOM_MEMBER_LIST: lambda r: RoomMemberList(r.string(), r.list(lambda r: Member(r.string(), r.bool()))),
    ROOM_INFO: _room_info,
    ROOM_DELIVER: lambda r: RoomMessage(r.u64(), r.string(), r.string(), r.u64(), r.string()),
    PRESENCE: _presence_entry,
    TYPING_NOTICE: lambda r: TypingNotice(r.string(), r.string()),
    PRESENCE_LIST: lambda r: r.list(_presence_entry),
    STATS_REPLY: lambda r: dict(r.list(lambda r: (r.string(), r.u64()))),
    SHUTDOWN: lambda r: Shutdown(r.string()),
}


def encode_frame(kind: int, request_id: int, body: bytes = b"") -> bytes:
    """One whole frame: the 12-byte header [HB-2.1], then the body."""
    return HEADER.pack(MAGIC, VERSION, kind, request_id, len(body)) + body


def split_frame(buf: bytearray):
    """Cuts one whole frame off the front of `buf`.

    Returns (kind, request_id, body), or None when more bytes are needed: fewer than 12 bytes, or a header
    without its whole body, is never an error [HB-2.2].
    """
    if len(buf) < HEADER.size:
        return None
    magic, version, kind, request_id, length = HEADER.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"bad frame header {bytes(buf[:12]).hex(' ')}")
    if kind < 0x80:
        raise ProtocolError(f"the server sent a client kind 0x{kind:02x}")
    if length > MAX_SERVER_BODY:
        raise ProtocolError(f"server frame body of {length} bytes is too large for this client")
    if len(buf) < HEADER.size + length:
        return None
    body = bytes(buf[HEADER.size:HEADER.size + length])
    del buf[:HEADER.size + length]
    return kind, request_id, body


def decode_body(kind: int, body: bytes):
    """Decodes a server body into one of the packet objects above."""
    decoder = DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError(f"unknown server kind 0x{kind:02x}")
    r = Reader(body)
    value = decoder(r)
    r.end()
    return value


# ---------------------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------------------


class Client:
    """A blocking hubbub client over one TCP connection.

    Every typed method sends one request and waits for its reply, queueing the pushes that arrive meanwhile.
    A reply that is an Error frame raises ServerError. `timeout` (seconds) bounds every wait.
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._next_request_id = 1
        self._pushes = collections.deque()  # decoded pushes (request id 0), oldest first
        self._replies = {}  # request id -> (kind, decoded value), for replies nobody is waiting for yet
        self.closed = False
        self.session = None  # the LoginOk of the current login, if any
        # The first frame is Hello, or a single Error (SERVER_FULL, TOO_MANY_FROM_ADDRESS) [HB-7.1].
        kind, request_id, value = self._read_frame(time.monotonic() + timeout)
        if kind == ERROR:
            raise value
        if kind != HELLO:
            raise ProtocolError(f"expected Hello, got kind 0x{kind:02x}")
        self.hello: Hello = value

    # -- the socket and framing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_frame(self, deadline: float):
        """Returns the next whole frame as (kind, request_id, decoded value), reading as much as needed."""
        while True:
            frame = split_frame(self._buf)
            if frame is not None:
                kind, request_id, body = frame
                value = decode_body(kind, body)
                if kind == ERROR:
                    value.request_id = request_id
                return kind, request_id, value
            if self.closed:
                raise ConnectionClosed("the connection is closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for the server")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("timed out waiting for the server") from None
            if not chunk:
                self.closed = True
                raise ConnectionClosed("the server closed the connection")
            self._buf += chunk

    def _pump(self, deadline: float) -> None:
        """Reads one frame and files it: a push into the queue, a reply under its request id."""
        kind, request_id, value = self._read_frame(deadline)
        if request_id == 0:
            if kind == ERROR and value.fatal:
                # IDLE_TIMEOUT, AUTH_TIMEOUT, SESSION_REPLACED, ...: the server closes after this [HB-6.1].
                self.closed = True
                raise value
            self._pushes.append(value)
        else:
            self._replies[request_id] = (kind, value)

    # -- requests -----------------------------------------------------------------------------------------------

    def submit(self, kind: int, body: bytes = b"") -> int:
        """Sends one request and returns its request id, without waiting (pipelining)."""
        request_id = self._next_request_id
        self._next_request_id = request_id % 0xFFFFFFFF + 1  # never 0: reserved for pushes [HB-2.7]
        self.sock.sendall(encode_frame(kind, request_id, body))
        return request_id

    def wait(self, request_id: int, expect: int):
        """Waits for the reply to `request_id`, queueing pushes meanwhile. Raises ServerError for an Error."""
        deadline = time.monotonic() + self.timeout
        while request_id not in self._replies:
            self._pump(deadline)
        kind, value = self._replies.pop(request_id)
        if kind == ERROR:
            raise value
        if kind != expect:
            raise ProtocolError(f"expected kind 0x{expect:02x} in reply to request {request_id}, got 0x{kind:02x}")
        return value

    def request(self, kind: int, body: bytes, expect: int):
        return self.wait(self.submit(kind, body), expect)

    # -- pushes -------------------------------------------------------------------------------------------------

    def next_push(self, timeout: float = None, types=None):
        """The oldest queued push (of one of `types`, if given), reading until one arrives or `timeout` passes.

        Other pushes stay queued in order. Returns None on timeout.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, push in enumerate(self._pushes):
                if types is None or isinstance(push, types):
                    del self._pushes[i]
                    return push
            try:
                self._pump(deadline)
            except TimeoutError:
                return None

    def next_message(self, timeout: float = None):
        """The next Deliver (Message) or RoomDeliver (RoomMessage) push, or None on timeout."""
        return self.next_push(timeout, (Message, RoomMessage))

    def pending_pushes(self) -> list:
        """The pushes queued so far, without reading or removing any."""
        return list(self._pushes)

    def wait_caught_up(self, timeout: float = None) -> CaughtUp:
        """Waits for CaughtUp [§5.36]: catch-up is done and new messages now arrive live.

        The Deliver/RoomDeliver frames of the catch-up before it stay queued for next_message().
        """
        push = self.next_push(timeout, CaughtUp)
        if push is None:
            raise TimeoutError("no CaughtUp")
        return push

    # -- typed requests: session --------------------------------------------------------------------------------

    def ping(self) -> float:
        """Ping/Pong [§5.1]; returns the round trip in seconds."""
        start = time.monotonic()
        self.request(PING, b"", PONG)
        return time.monotonic() - start

    def register(self, username: str, password: str) -> None:
        """Creates an account [§5.2]. Does not log in."""
        self.request(REGISTER, Writer().string(username).string(password).bytes(), OK)

    def login(self, username: str, password: str, device: str = "python", last_seen: int = 0) -> LoginOk:
        """Logs in with a password [§5.3]. Catch-up messages and CaughtUp follow as pushes."""
        body = Writer().string(username).string(password).string(device).u64(last_seen).bytes()
        self.session = self.request(LOGIN, body, LOGIN_OK)
        return self.session

    def resume(self, token: bytes, device: str = "python", last_seen: int = 0) -> LoginOk:
        """Logs in with the token of an earlier LoginOk [§5.4]."""
        body = Writer().token(token).string(device).u64(last_seen).bytes()
        self.session = self.request(RESUME, body, LOGIN_OK)
        return self.session

    def logout(self) -> None:
        """Revokes this session's token; the connection stays open, not logged in [§5.5]."""
        self.request(LOGOUT, b"", OK)
        self.session = None

    def list_tokens(self) -> list:
        return self.request(LIST_TOKENS, b"", TOKENS)

    def revoke_token(self, token_id: int) -> None:
        self.request(REVOKE_TOKEN, Writer().u64(token_id).bytes(), OK)

    # -- typed requests: direct messages ------------------------------------------------------------------------

    @staticmethod
    def new_client_msg_id() -> int:
        """A random non-zero 64-bit client message id, as [HB-5.2] recommends."""
        return random.getrandbits(64) or 1

    def send_ack(self, recipient: str, text: str, client_msg_id: int = None) -> Ack:
        """Sends a direct message [§5.8]; returns the Ack (message id and timestamp)."""
        if client_msg_id is None:
            client_msg_id = self.new_client_msg_id()
        body = Writer().string(recipient).u64(client_msg_id).string(text).bytes()
        return self.request(SEND, body, ACK)

    def send(self, recipient: str, text: str, client_msg_id: int = None) -> int:
        """Sends a direct message [§5.8]; returns its message id."""
        return self.send_ack(recipient, text, client_msg_id).message_id

    def received(self, up_to: int) -> None:
        """Confirms receipt up to a message id [§5.9]; senders get DeliveryReceipt."""
        self.request(RECEIVED, Writer().u64(up_to).bytes(), OK)

    def read(self, peer: str, up_to: int) -> None:
        """Tells `peer` the conversation is read up to `up_to` [§5.10]."""
        self.request(READ, Writer().string(peer).u64(up_to).bytes(), OK)

    def history(self, peer: str, before_id: int = 0, limit: int = 20) -> HistoryPage:
        """One page of the conversation with `peer`, newest first [§5.11]."""
        body = Writer().string(peer).u64(before_id).u16(limit).bytes()
        return self.request(HISTORY, body, HISTORY_PAGE)

    # -- typed requests: rooms ----------------------------------------------------------------------------------

    def create_room(self, name: str, topic: str = "") -> RoomInfo:
        return self.request(CREATE_ROOM, Writer().string(name).string(topic).bytes(), ROOM_INFO)

    def join_room(self, name: str) -> RoomInfo:
        return self.request(JOIN_ROOM, Writer().string(name).bytes(), ROOM_INFO)

    def leave_room(self, name: str) -> None:
        self.request(LEAVE_ROOM, Writer().string(name).bytes(), OK)

    def kick(self, room: str, user: str) -> None:
        self.request(KICK, Writer().string(room).string(user).bytes(), OK)

    def close_room(self, name: str) -> None:
        self.request(CLOSE_ROOM, Writer().string(name).bytes(), OK)

    def list_rooms(self, after: str = "", limit: int = 100) -> RoomList:
        return self.request(LIST_ROOMS, Writer().string(after).u16(limit).bytes(), ROOM_LIST)

    def room_members(self, name: str) -> RoomMemberList:
        return self.request(ROOM_MEMBERS, Writer().string(name).bytes(), ROOM_MEMBER_LIST)

    def send_room(self, room: str, text: str, client_msg_id: int = None) -> int:
        """Posts to a room [§5.19]; returns the message id. Shares the client id space with send()."""
        if client_msg_id is None:
            client_msg_id = self.new_client_msg_id()
        body = Writer().string(room).u64(client_msg_id).string(text).bytes()
        return self.request(SEND_ROOM, body, ACK).message_id

    def room_history(self, room: str, before_id: int = 0, limit: int = 20) -> HistoryPage:
        body = Writer().string(room).u64(before_id).u16(limit).bytes()
        return self.request(ROOM_HISTORY, body, HISTORY_PAGE)

    # -- typed requests: presence, typing, stats ----------------------------------------------------------------

    def watch(self, users) -> list:
        """Subscribes to users' presence [§5.21]; returns one PresenceEntry per name, in order."""
        return self.request(WATCH, Writer().string_list(users).bytes(), PRESENCE_LIST)

    def unwatch(self, users) -> None:
        self.request(UNWATCH, Writer().string_list(users).bytes(), OK)

    def typing(self, to: str, room: bool = False) -> int:
        """"I am typing" [§5.23]. There is no success reply, so this does not wait; returns the request id.

        A failure (MALFORMED, NOT_AUTHENTICATED) would come back as an Error with that id, filed by request id.
        """
        return self.submit(TYPING, Writer().bool(room).string(to).bytes())

    def stats(self) -> dict:
        """The server's counters [§5.24], name -> value."""
        return self.request(STATS, b"", STATS_REPLY)


# ---------------------------------------------------------------------------------------------------------------
# --selftest: an end-to-end check against a running server (run by tests/python_client.rs)
# ---------------------------------------------------------------------------------------------------------------


class SelftestFailure(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SelftestFailure(what)


def expect_error(code: int, call, *args) -> ServerError:
    try:
        result = call(*args)
    except ServerError as e:
        check(e.code == code, f"{call.__name__}: expected error {code} ({ERROR_NAMES[code]}), got {e}")
        check(not e.fatal, f"{call.__name__}: error {e.code} should not close the connection")
        return e
    raise SelftestFailure(f"{call.__name__}: expected error {code} ({ERROR_NAMES[code]}), got {result!r}")


def selftest(host: str, port: int) -> None:
    suffix = "%06x" % random.getrandbits(24)
    alice, bob, room = "alice_" + suffix, "bob_" + suffix, "room_" + suffix
    password = "password123"
    step = lambda text: print(f"  {text}", flush=True)  # noqa: E731

    a = Client(host, port)
    b = Client(host, port)
    check(a.hello.max_frame >= 2048, f"Hello max_frame {a.hello.max_frame}")
    check(len(a.hello.connection_id) == 16 and a.hello.connection_id != b.hello.connection_id,
          "Hello connection ids should be 16 bytes and differ")
    step(f"hello: server {a.hello.server_version}, max_frame {a.hello.max_frame}, "
         f"idle {a.hello.idle_timeout_ms} ms, auth {a.hello.auth_timeout_ms} ms")

    # Register (names are case-insensitive; the server sends the lowercase form) [HB-1.8]
    a.register(alice.upper(), password)
    b.register(bob, password)
    expect_error(USERNAME_TAKEN, b.register, bob.capitalize(), password)
    expect_error(BAD_CREDENTIALS, b.login, bob, "wrong password")
    step(f"registered {alice} and {bob}")

    la = a.login(alice, password, "selftest-a", 0)
    lb = b.login(bob.upper(), password, "selftest-b", 0)
    check(la.username == alice and lb.username == bob, f"canonical names: {la.username!r}, {lb.username!r}")
    check(la.user_id != lb.user_id, "two users should have two user ids")
    check(len(la.token) == 16, "a token is 16 bytes")
    check(la.max_message_id == 0 and la.delivered_cursor == 0, f"fresh user LoginOk: {la}")
    a.wait_caught_up()
    b.wait_caught_up()
    step(f"logged in: {alice} is user {la.user_id}, {bob} is user {lb.user_id}")

    # Ping/Pong
    rtt = a.ping()
    step(f"ping: pong in {rtt * 1000:.1f} ms")

    # A direct message, received live as Deliver after CaughtUp [HB-5.1]
    cid = Client.new_client_msg_id()
    ack = a.send_ack(bob, "hello bob \N{WAVING HAND SIGN}", cid)
    msg = b.next_message()
    check(isinstance(msg, Message), f"bob should get a Deliver, got {msg!r}")
    check((msg.id, msg.sender, msg.recipient, msg.text) == (ack.message_id, alice, bob, "hello bob \N{WAVING HAND SIGN}"),
          f"Deliver {msg} does not match Ack {ack}")
    check(msg.timestamp_ms == ack.timestamp_ms, "Deliver and Ack timestamps differ")
    step(f"send: message {ack.message_id} delivered to {bob}")

    # A resend with the same client message id gets the original Ack and is not delivered again [HB-5.2]
    again = a.send_ack(bob, "hello bob (resent)", cid)
    check(again == ack, f"resend: got {again}, expected the original {ack}")
    second = a.send(bob, "second message")
    check(second > ack.message_id, "message ids increase")
    msg = b.next_message()
    check(isinstance(msg, Message) and msg.id == second and msg.text == "second message",
          f"after a resend bob's next message should be {second} (no duplicate), got {msg!r}")
    step(f"resend: same id {again.message_id}, not delivered twice")

    # Received -> DeliveryReceipt to the sender [HB-5.5]; Read -> ReadReceipt
    b.received(second)
    receipt = a.next_push(types=DeliveryReceipt)
    check(receipt == DeliveryReceipt(bob, second), f"DeliveryReceipt: {receipt!r}")
    b.read(alice, second)
    receipt = a.next_push(types=ReadReceipt)
    check(receipt == ReadReceipt(bob, second), f"ReadReceipt: {receipt!r}")
    step("receipts: delivery and read receipts reached the sender")

    # History, newest first [HB-5.7]
    page = b.history(alice.upper(), 0, 10)
    check([m.id for m in page.messages] == [second, ack.message_id], f"history ids: {[m.id for m in page.messages]}")
    check(not page.more, "history: no more pages")
    check(page.messages[1].text == "hello bob \N{WAVING HAND SIGN}", "history text (UTF-8) round trip")
    page = b.history(alice, second, 10)
    check([m.id for m in page.messages] == [ack.message_id], "history with before_id")
    page = b.history(alice, 0, 1)
    check([m.id for m in page.messages] == [second] and page.more, "history with limit 1 says more")
    step("history: newest first, paging works")

    # A bad request: an unknown recipient [HB-5.8] -> UNKNOWN_RECIPIENT (120), the connection stays open
    expect_error(UNKNOWN_RECIPIENT, a.send, "nobody_" + suffix, "anyone there?")
    expect_error(UNKNOWN_RECIPIENT, a.send, "x!", "a name that breaks the rules")
    a.ping()
    step("errors: unknown recipient raised ServerError 120, connection still open")

    # Rooms [HB-10]
    info = a.create_room(room.upper(), "selftest room")
    check((info.name, info.topic, info.host, info.member_count, info.closed) == (room, "selftest room", alice, 1, False),
          f"CreateRoom: {info}")
    joined = b.join_room(room)
    check(joined.room_id == info.room_id and joined.member_count == 2, f"JoinRoom: {joined}")
    check(RoomEvent(room, 1, bob) in b.pending_pushes(), "the joiner gets RoomEvent(joined) before RoomInfo")
    event = a.next_push(types=RoomEvent)
    check(event == RoomEvent(room, 1, bob), f"the host should see {bob} join, got {event!r}")
    step(f"rooms: {alice} created {room}, {bob} joined")

    r1 = a.send_room(room, "first in the room")
    r2 = a.send_room(room, "second in the room")
    for expected_id, text in ((r1, "first in the room"), (r2, "second in the room")):
        msg = b.next_message()
        check(isinstance(msg, RoomMessage), f"bob should get a RoomDeliver, got {msg!r}")
        check((msg.id, msg.room, msg.sender, msg.text) == (expected_id, room, alice, text), f"RoomDeliver: {msg}")
    a.ping()
    check(not any(isinstance(p, RoomMessage) for p in a.pending_pushes()), "the sending session gets no copy")
    page = b.room_history(room, 0, 10)
    check([m.id for m in page.messages] == [r2, r1], f"room history ids {[m.id for m in page.messages]}")
    check(all(m.recipient == room and m.sender == alice for m in page.messages), "room history recipient is the room")
    members = a.room_members(room)
    check([m.username for m in members.members] == sorted([alice, bob]), f"RoomMembers: {members}")
    check(all(m.online for m in members.members), "both members are online")
    rooms, after = [], ""
    while True:
        listing = a.list_rooms(after, 100)
        rooms += listing.rooms
        if not listing.more or not listing.rooms:
            break
        after = listing.rooms[-1].name
    check(any(r.name == room and r.member_count == 2 for r in rooms), f"ListRooms should list {room}")
    step("rooms: RoomDeliver, room history newest first, members, list")

    # Presence [HB-11]
    entries = a.watch([bob.upper(), "nobody_" + suffix])
    check([(e.username, e.state) for e in entries] == [(bob, PRESENCE_ONLINE), ("nobody_" + suffix, PRESENCE_UNKNOWN)],
          f"PresenceList: {entries}")
    step("watch: presence list correct")

    # Typing has no success reply; the notice reaches the peer [HB-12]
    b.typing(alice)
    notice = a.next_push(types=TypingNotice)
    check(notice == TypingNotice(bob, ""), f"TypingNotice: {notice!r}")

    # Stats [HB-13]
    counters = a.stats()
    check(counters.get("users_online", 0) >= 2 and "uptime_secs" in counters, f"Stats: {counters}")
    step(f"stats: {len(counters)} counters, {counters.get('connections')} connections")

    # Resume on a third connection: same token; catch-up of everything alice may see, ids ascending [HB-5.3]
    c = Client(host, port)
    resumed = c.resume(la.token, "selftest-c", 0)
    check(resumed.token == la.token and resumed.user_id == la.user_id, f"Resume: {resumed}")
    check(resumed.max_message_id == r2, f"Resume max_message_id {resumed.max_message_id}, expected {r2}")
    caught = c.wait_caught_up()
    caught_up_ids = [m.id for m in c.pending_pushes() if isinstance(m, (Message, RoomMessage))]
    check(caught_up_ids == [ack.message_id, second, r1, r2], f"catch-up ids {caught_up_ids}")
    check(caught.cursor == r2, f"CaughtUp cursor {caught.cursor}")
    step(f"resume: same token, caught up {len(caught_up_ids)} messages")

    # Presence push when bob goes offline
    b.close()
    presence = a.next_push(types=PresenceEntry)
    check(presence is not None and presence.username == bob and presence.state == PRESENCE_OFFLINE,
          f"Presence when {bob} left: {presence!r}")
    step(f"presence: {bob} went offline")

    c.logout()
    a.close()
    c.close()


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_addr(text: str):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def describe(push) -> str:
    if isinstance(push, Message):
        return f"[{push.id}] {push.sender} -> {push.recipient}: {push.text}"
    if isinstance(push, RoomMessage):
        return f"[{push.id}] #{push.room} {push.sender}: {push.text}"
    if isinstance(push, CaughtUp):
        return f"(caught up to {push.cursor})"
    if isinstance(push, DeliveryReceipt):
        return f"({push.peer} received up to {push.up_to})"
    if isinstance(push, ReadReceipt):
        return f"({push.peer} read up to {push.up_to})"
    if isinstance(push, RoomEvent):
        return f"(#{push.room}: {push.user} {push.event_name})"
    if isinstance(push, RoomClosed):
        return f"(#{push.room} was closed)"
    if isinstance(push, PresenceEntry):
        return f"({push.username} is {'online' if push.state == PRESENCE_ONLINE else 'offline'})"
    if isinstance(push, TypingNotice):
        return f"({push.from_user} is typing{' in #' + push.room if push.room else ''})"
    if isinstance(push, Shutdown):
        return f"(server: {push.text})"
    return repr(push)


def demo(args) -> int:
    host, port = args.server
    with Client(host, port) as c:
        print(f"connected to hubbub {c.hello.server_version} at {host}:{port}")
        if args.register:
            try:
                c.register(args.user, args.password)
                print(f"registered {args.user}")
            except ServerError as e:
                if e.code != USERNAME_TAKEN:
                    raise
                print(f"{args.user} is already registered")
        login = c.login(args.user, args.password, args.device, 0)
        print(f"logged in as {login.username} (user {login.user_id}), newest message {login.max_message_id}")
        c.wait_caught_up()
        for push in c.pending_pushes():
            print(describe(push))
        if args.send:
            recipient, text = args.send
            message_id = c.send(recipient, text)
            print(f"sent to {recipient}: message {message_id}")
        if args.history:
            page = c.history(args.history, 0, 20)
            print(f"history with {args.history} (newest first{', more' if page.more else ''}):")
            for m in page.messages:
                print("  " + describe(m))
        if args.rooms:
            for r in c.list_rooms("", 100).rooms:
                print(f"  #{r.name} host {r.host}, {r.member_count} members{' (closed)' if r.closed else ''}: {r.topic}")
        if args.listen:
            print(f"listening for {args.listen:g} s ...")
            deadline = time.monotonic() + args.listen
            c._pushes.clear()
            while time.monotonic() < deadline:
                push = c.next_push(timeout=min(deadline - time.monotonic(), c.hello.idle_timeout_ms / 2000))
                if push is None:
                    c.ping()  # keep the connection from idling out [HB-7.11]
                    continue
                print(describe(push))
                if isinstance(push, Shutdown):
                    break
        return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="A hubbub client in Python (see proto.md).")
    p.add_argument("--selftest", type=parse_addr, metavar="HOST:PORT", help="run the end-to-end self-test")
    p.add_argument("--server", type=parse_addr, default=("127.0.0.1", 7878), metavar="HOST:PORT")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--device", default="python-demo")
    p.add_argument("--register", action="store_true", help="register the user first")
    p.add_argument("--send", nargs=2, metavar=("RECIPIENT", "TEXT"), help="send a direct message")
    p.add_argument("--history", metavar="PEER", help="show the conversation with PEER")
    p.add_argument("--rooms", action="store_true", help="list rooms")
    p.add_argument("--listen", type=float, metavar="SECONDS", help="print what arrives for this long")
    args = p.parse_args(argv)

    if args.selftest:
        try:
            selftest(*args.selftest)
        except Exception as e:  # report any failure, including a bug in this script, and exit 1
            traceback.print_exc()
            print(f"selftest FAILED: {type(e).__name__}: {e}")
            return 1
        print("selftest ok")
        return 0

    if not args.user or not args.password:
        p.error("--user and --password are required (or use --selftest HOST:PORT)")
    try:
        return demo(args)
    except (ServerError, ProtocolError, ConnectionClosed, OSError) as e:
        print(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
