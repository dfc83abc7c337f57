//! The real server over loopback TCP: the pump (bytes in, frames out), connection lifecycle, limits and
//! shutdown. Raw `TcpStream`s where the test is about bytes, `hubbub::client::Client` elsewhere.
//!
//! Every read has a timeout; timeouts are configured short (hundreds of milliseconds to a second) and every
//! bound asserted is generous, so the tests hold on a slow, busy machine.

mod common;

use common::{code_of, eventually, start, start_with, PASSWORD};
use hubbub::client::{Client, ClientError};
use hubbub::framing::{put_header, split_frame, Header, HEADER_LEN};
use hubbub::protocol::{code, is_packet_kind, is_request_kind, kind, Packet, Request};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long any single read waits before the test fails.
const READ_WAIT: Duration = Duration::from_secs(5);

// -----------------------------------------------------------------------------------------------------------------
// Helpers
// -----------------------------------------------------------------------------------------------------------------

/// One frame's bytes: header then body.
fn frame(kind: u8, request_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    put_header(&mut out, kind, request_id, body.len() as u32);
    out.extend_from_slice(body);
    out
}

fn request_frame(request: &Request, request_id: u32) -> Vec<u8> {
    let mut out = Vec::new();
    request.encode(request_id, &mut out);
    out
}

/// A Register of `name` with the test password.
fn register_request(name: &str) -> Request {
    Request::Register {
        username: name.into(),
        password: PASSWORD.into(),
    }
}

fn ping(request_id: u32) -> Vec<u8> {
    frame(kind::PING, request_id, b"")
}

/// A u16-length-prefixed string, as the wire spells it.
fn wire_str(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// A connection that speaks bytes: the test writes exactly what it wants and reads frames back.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects without reading anything.
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream.set_write_timeout(Some(READ_WAIT)).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and checks that the first frame is a Hello ([HB-7.1]).
    fn greeted(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr);
        let (header, packet) = raw.frame();
        assert_eq!(header.kind, kind::HELLO, "first frame: {packet:?}");
        assert_eq!(header.request_id, 0);
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
        self.stream.flush().unwrap();
    }

    /// The next frame, `Ok(None)` at a clean end of stream, `Err` on a timeout or a socket error.
    fn next(&mut self, timeout: Duration) -> io::Result<Option<(Header, Packet)>> {
        let deadline = Instant::now() + timeout;
        loop {
            match split_frame(&self.buf, 16 << 20, is_packet_kind) {
                Ok(Some(f)) => {
                    let packet = Packet::decode(&f.header, f.body)
                        .unwrap_or_else(|e| panic!("server sent an undecodable body: {e}"));
                    let (header, used) = (f.header, f.len);
                    self.buf.drain(..used);
                    return Ok(Some((header, packet)));
                }
                Ok(None) => {}
                Err(e) => panic!("server sent a bad frame: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    assert!(
                        self.buf.is_empty(),
                        "stream ended inside a frame ({} bytes)",
                        self.buf.len()
                    );
                    return Ok(None);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock) => {
                    return Err(io::ErrorKind::TimedOut.into())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next frame; fails the test on end of stream, timeout or socket error.
    fn frame(&mut self) -> (Header, Packet) {
        match self.next(READ_WAIT) {
            Ok(Some(f)) => f,
            Ok(None) => panic!("connection closed while a frame was expected"),
            Err(e) => panic!("no frame: {e}"),
        }
    }

    /// Expects a reply to `request_id` (nothing else may come first).
    fn reply(&mut self, request_id: u32) -> Packet {
        let (header, packet) = self.frame();
        assert_eq!(header.request_id, request_id, "reply {packet:?}");
        packet
    }

    fn expect_pong(&mut self, request_id: u32) {
        let (header, packet) = self.frame();
        assert_eq!(packet, Packet::Pong, "reply to ping {request_id}");
        assert_eq!(header.kind, kind::PONG);
        assert_eq!(header.request_id, request_id);
    }

    /// Expects an Error with `code` answering `request_id`; the connection must stay open (checked by a Ping).
    fn expect_error_and_alive(&mut self, request_id: u32, expected: u16, ping_id: u32) {
        match self.reply(request_id) {
            Packet::Error { code, .. } => assert_eq!(code, expected),
            other => panic!("expected Error {expected}, got {other:?}"),
        }
        self.send(&ping(ping_id));
        self.expect_pong(ping_id);
    }

    /// Expects an Error frame with `expected` code, then a clean end of stream with nothing after it ([HB-6.1]).
    fn expect_fatal(&mut self, expected: u16) {
        let (header, packet) = self.frame();
        assert_eq!(header.kind, kind::ERROR, "got {packet:?}");
        match packet {
            Packet::Error { code, text } => {
                assert_eq!(code, expected, "error text: {text}");
                assert!(!text.is_empty());
            }
            other => panic!("expected Error {expected}, got {other:?}"),
        }
        self.expect_eof();
    }

    /// Expects an Error frame with `expected` code instead of a Hello, then a clean end of stream: the
    /// connection was refused at accept.
    fn expect_refused(&mut self, expected: u16) {
        let (header, packet) = self.frame();
        assert_eq!(
            header.kind,
            kind::ERROR,
            "no Hello for a refused connection"
        );
        match packet {
            Packet::Error { code, .. } => assert_eq!(code, expected),
            other => panic!("expected Error {expected}, got {other:?}"),
        }
        self.expect_eof();
    }

    /// Expects the server to close the connection, with no further frame.
    fn expect_eof(&mut self) {
        match self.next(READ_WAIT) {
            Ok(None) => {}
            Ok(Some(f)) => panic!("expected the connection to close, got {f:?}"),
            Err(e) => panic!("expected a clean close (EOF), got: {e}"),
        }
    }

    /// Nothing arrives for `wait` (the connection stays open and silent).
    fn expect_silence(&mut self, wait: Duration) {
        match self.next(wait) {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }
}

/// Reads a Client's pushes until a Shutdown notice; other pushes (CaughtUp after login) are skipped.
fn wait_for_shutdown_notice(client: &mut Client) -> String {
    loop {
        match client.next_push(READ_WAIT) {
            Ok(Packet::Shutdown { text }) => return text,
            Ok(Packet::Error { code, text }) => panic!("error {code} before Shutdown: {text}"),
            Ok(_) => continue,
            Err(e) => panic!("no Shutdown notice: {e}"),
        }
    }
}

/// Reads a Client's pushes until an Error push, skipping others (CaughtUp after login).
fn wait_for_error_push(client: &mut Client, within: Duration) -> u16 {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_push(left) {
            Ok(Packet::Error { code, .. }) => return code,
            Ok(_) => continue,
            Err(e) => panic!("no Error push: {e}"),
        }
    }
}

/// After a closing Error, the client's next read is the end of the stream.
fn assert_closed(client: &mut Client) {
    match client.recv(READ_WAIT) {
        Err(ClientError::Closed) => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}

/// A connection admitted within `within` (retried while the server refuses), or None.
fn connect_eventually(addr: SocketAddr, within: Duration) -> Option<Client> {
    let mut admitted = None;
    eventually(within, || match Client::connect(addr) {
        Ok(c) => {
            admitted = Some(c);
            true
        }
        Err(_) => false,
    });
    admitted
}

fn is_version_4_uuid(id: &[u8; 16]) -> bool {
    id[6] >> 4 == 4 && id[8] & 0xC0 == 0x80
}

// -----------------------------------------------------------------------------------------------------------------
// The pump
// -----------------------------------------------------------------------------------------------------------------

// [HB-2.1] The reply header, byte for byte: "HB", version 1, kind, request id BE, body length BE.
#[test]
fn hb_2_1_pong_header_layout_byte_for_byte() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);
    raw.send(&ping(0x0A0B_0C0D));
    let mut header = [0u8; HEADER_LEN];
    raw.stream.set_read_timeout(Some(READ_WAIT)).unwrap();
    raw.stream.read_exact(&mut header).expect("pong header");
    assert_eq!(
        header,
        [
            b'H',
            b'B',
            1,
            kind::PONG,
            0x0A,
            0x0B,
            0x0C,
            0x0D,
            0,
            0,
            0,
            0
        ]
    );
}

// [HB-2.2] A Ping written one byte at a time is answered once, when its last byte arrives, with its request id.
#[test]
fn hb_2_2_ping_one_byte_at_a_time_gets_pong() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);
    let bytes = ping(0xDEAD_BEEF);
    let (last, head) = bytes.split_last().unwrap();
    for b in head {
        raw.send(&[*b]);
        sleep(Duration::from_millis(5));
    }
    // 11 of 12 header bytes: the server must wait, not answer and not fail.
    raw.expect_silence(Duration::from_millis(200));
    raw.send(&[*last]);
    raw.expect_pong(0xDEAD_BEEF);
    raw.expect_silence(Duration::from_millis(100));
}

// [HB-2.2] A frame with a body, written one byte at a time, is reassembled whole: it decodes (a History before
// login is answered NOT_AUTHENTICATED, not MALFORMED), and its request id is echoed.
#[test]
fn hb_2_2_frame_with_body_one_byte_at_a_time_is_reassembled() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);
    let bytes = request_frame(
        &Request::History {
            peer: "somebody".into(),
            before_id: 7,
            limit: 20,
        },
        4242,
    );
    assert!(bytes.len() > HEADER_LEN + 10);
    for b in &bytes {
        raw.send(&[*b]);
        sleep(Duration::from_millis(2));
    }
    raw.expect_error_and_alive(4242, code::NOT_AUTHENTICATED, 4243);
}

// [HB-2.1] [HB-2.2] Many frames in one write are all answered, in order.
#[test]
fn hb_2_2_hundred_pings_in_one_write_get_hundred_pongs_in_order() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);
    let ids: Vec<u32> = (0..100u32).map(|i| 1 + i * 7919).collect();
    let mut bytes = Vec::new();
    for id in &ids {
        bytes.extend(ping(*id));
    }
    raw.send(&bytes);
    for id in &ids {
        raw.expect_pong(*id);
    }
    raw.expect_silence(Duration::from_millis(100));
}

// [HB-2.2] Frames followed at once by the client's FIN, all arriving before the server reads: every frame is
// answered and the session ends when its end is read, not at a timeout. The server stops reading a socket after a
// read that did not fill its buffer; this is the case where that read must not be the last one.
#[test]
fn hb_2_2_frames_then_an_immediate_half_close_are_answered_then_the_session_ends() {
    let server = start_with(|c| {
        c.auth_timeout = Duration::from_secs(60);
        c.idle_timeout = Duration::from_secs(60);
    });
    for round in 0..5u32 {
        let mut raw = Raw::greeted(server.addr);
        let ids: Vec<u32> = (1..=3).map(|i| round * 10 + i).collect();
        let bytes: Vec<u8> = ids.iter().flat_map(|id| ping(*id)).collect();
        raw.send(&bytes);
        raw.stream.shutdown(std::net::Shutdown::Write).unwrap();
        for id in &ids {
            raw.expect_pong(*id);
        }
        // Within READ_WAIT (5 s), while both timeouts are 60 s: only reading the FIN can end the session this soon.
        raw.expect_eof();
    }
}

// [HB-2.2] A header split across two writes at several points, including header/body boundary and mid-body.
#[test]
fn hb_2_2_header_split_across_two_writes() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);
    let mut rid = 100;
    for cut in [1, 2, 3, 4, 7, 8, 11] {
        rid += 1;
        let bytes = ping(rid);
        raw.send(&bytes[..cut]);
        sleep(Duration::from_millis(30));
        raw.send(&bytes[cut..]);
        raw.expect_pong(rid);
    }
    let history = Request::History {
        peer: "bob".into(),
        before_id: 0,
        limit: 1,
    };
    for cut in [5, 12, 13, 16] {
        rid += 1;
        let bytes = request_frame(&history, rid);
        assert!(cut < bytes.len());
        raw.send(&bytes[..cut]);
        sleep(Duration::from_millis(30));
        raw.send(&bytes[cut..]);
        match raw.reply(rid) {
            Packet::Error { code, .. } => assert_eq!(code, code::NOT_AUTHENTICATED, "cut {cut}"),
            other => panic!("cut {cut}: {other:?}"),
        }
    }
}

/// A server with a small frame limit for the [HB-2.5] tests.
fn small_frame_server() -> common::TestServer {
    start_with(|c| {
        c.max_frame = 4096;
        c.max_text = 1024;
    })
}

/// A server with a short idle timeout for the [HB-7.11] tests; the auth timeout is long so it never interferes.
fn idle_server(idle: Duration) -> common::TestServer {
    start_with(|c| {
        c.idle_timeout = idle;
        c.auth_timeout = Duration::from_secs(30);
    })
}

// [HB-2.5] A body of exactly max_frame is accepted: a Send padded to the limit decodes (NOT_AUTHENTICATED before
// login proves the whole body was read and decoded), a Ping with a 4096-byte body gets MALFORMED (accepted, but
// it does not decode), and the connection stays.
#[test]
fn hb_2_5_body_at_max_frame_is_accepted() {
    let server = small_frame_server();
    let mut raw = Raw::connect(server.addr);
    match raw.frame().1 {
        Packet::Hello { max_frame, .. } => assert_eq!(max_frame, 4096),
        other => panic!("expected Hello, got {other:?}"),
    }

    let recipient = b"bob";
    let fixed = 2 + recipient.len() + 8 + 2;
    let text = vec![b'x'; 4096 - fixed];
    let mut body = wire_str(recipient);
    body.extend_from_slice(&9u64.to_be_bytes());
    body.extend(wire_str(&text));
    assert_eq!(body.len(), 4096);
    raw.send(&frame(kind::SEND, 11, &body));
    raw.expect_error_and_alive(11, code::NOT_AUTHENTICATED, 12);

    raw.send(&frame(kind::PING, 13, &[0u8; 4096]));
    raw.expect_error_and_alive(13, code::MALFORMED, 14);

    // A Register at the limit is also taken and answered (its password is over the rules, not the frame limit).
    let username = b"alice";
    let password = vec![b'p'; 4096 - 2 - username.len() - 2];
    let mut body = wire_str(username);
    body.extend(wire_str(&password));
    assert_eq!(body.len(), 4096);
    raw.send(&frame(kind::REGISTER, 15, &body));
    match raw.reply(15) {
        Packet::Error { code, .. } => assert_ne!(code, code::FRAME_TOO_LARGE),
        Packet::Ok => {}
        other => panic!("unexpected reply to Register: {other:?}"),
    }
    raw.send(&ping(16));
    raw.expect_pong(16);
}

// [HB-2.5] One byte over max_frame: Error FRAME_TOO_LARGE, then the server closes. Refused from the header alone:
// a connection that sends only the header gets the same answer without sending any body.
#[test]
fn hb_2_5_body_one_over_max_frame_is_refused_then_closed() {
    let server = small_frame_server();

    let mut whole = Raw::greeted(server.addr);
    whole.send(&frame(kind::SEND, 21, &[b'x'; 4097]));
    whole.expect_fatal(code::FRAME_TOO_LARGE);

    let mut header_only = Raw::greeted(server.addr);
    let bytes = frame(kind::SEND, 22, &[b'x'; 4097]);
    header_only.send(&bytes[..HEADER_LEN]);
    header_only.expect_fatal(code::FRAME_TOO_LARGE);

    // A hostile length (4 GiB) is refused the same way.
    let mut huge = Raw::greeted(server.addr);
    let mut header = Vec::new();
    put_header(&mut header, kind::REGISTER, 23, u32::MAX);
    huge.send(&header);
    huge.expect_fatal(code::FRAME_TOO_LARGE);
}

// [HB-2.3] [HB-6.1] Bad magic (a stray HTTP client): Error BAD_MAGIC, then closed.
#[test]
fn hb_2_3_bad_magic_is_refused_then_closed() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);
    raw.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    raw.expect_fatal(code::BAD_MAGIC);

    // Bad magic after a good frame in the same write: the good one is answered first.
    let mut raw = Raw::greeted(server.addr);
    let mut bytes = ping(5);
    bytes.extend_from_slice(b"XB\x01\x01\0\0\0\x06\0\0\0\0");
    raw.send(&bytes);
    raw.expect_pong(5);
    raw.expect_fatal(code::BAD_MAGIC);
}

// [HB-2.3] [HB-6.1] A version other than 1: Error BAD_VERSION, then closed.
#[test]
fn hb_2_3_bad_version_is_refused_then_closed() {
    let server = start();
    for version in [0u8, 2, 0xff] {
        let mut raw = Raw::greeted(server.addr);
        let mut bytes = ping(9);
        bytes[2] = version;
        raw.send(&bytes);
        raw.expect_fatal(code::BAD_VERSION);
    }
}

// [HB-2.4] [HB-6.1] Unknown kinds: never assigned (0x7f, 0x00, 0x3f), reserved for later features (0x20 rooms,
// 0x14 sync, 0x30 presence, 0x38 stats — each tested while this build does not take it) and server kinds (0x81
// Pong, 0xBF Shutdown) all get UNKNOWN_KIND, then the connection is closed.
#[test]
fn hb_2_4_unknown_kinds_are_refused_then_closed() {
    let server = start();
    let never_assigned = [0x7f, 0x00, 0x3f];
    let server_kinds = [kind::PONG, kind::SHUTDOWN];
    let reserved = [kind::CREATE_ROOM, kind::SYNC, kind::WATCH, kind::STATS];
    let still_reserved = reserved.iter().filter(|k| !is_request_kind(**k));
    let kinds: Vec<u8> = never_assigned
        .iter()
        .chain(&server_kinds)
        .chain(still_reserved)
        .copied()
        .collect();
    for k in kinds {
        let mut raw = Raw::greeted(server.addr);
        raw.send(&frame(k, 3, b""));
        let (header, packet) = raw.frame();
        match packet {
            Packet::Error { code, .. } => {
                assert_eq!(code, code::UNKNOWN_KIND, "kind 0x{k:02x}")
            }
            other => panic!("kind 0x{k:02x}: {other:?}"),
        }
        assert_eq!(header.kind, kind::ERROR);
        raw.expect_eof();
    }
    // An unknown kind with a body is refused from its header alone, before the body arrives.
    let mut raw = Raw::greeted(server.addr);
    let bytes = frame(0x7f, 4, &[0u8; 100]);
    raw.send(&bytes[..HEADER_LEN]);
    raw.expect_fatal(code::UNKNOWN_KIND);
}

// [HB-2.2] Twenty thousand Pings (240 KB, written from another thread while replies are read) cross the server's
// read-chunk boundaries mid-frame; every one is answered, in order.
#[test]
fn hb_2_2_frames_straddling_read_chunks_are_all_answered_in_order() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);
    const N: u32 = 20_000;
    let mut bytes = Vec::with_capacity(N as usize * HEADER_LEN);
    for id in 1..=N {
        bytes.extend(ping(id));
    }
    let mut writer = raw.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        // Uneven pieces, so frames are also split across writes.
        for piece in bytes.chunks(7_777) {
            writer.write_all(piece).unwrap();
        }
    });
    for id in 1..=N {
        raw.expect_pong(id);
    }
    sender.join().unwrap();
    raw.expect_silence(Duration::from_millis(100));
}

// [HB-2.2] [HB-7.3] Frames that arrive behind a Register in the same write wait while it is worked on, then are
// served in order: the Register's Ok comes before the Ping's Pong.
#[test]
fn hb_2_2_frames_behind_a_register_are_served_after_it_in_order() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);
    let mut bytes = request_frame(&register_request("pipeliner"), 1);
    bytes.extend(ping(2));
    bytes.extend(ping(3));
    raw.send(&bytes);
    assert_eq!(raw.reply(1), Packet::Ok);
    raw.expect_pong(2);
    raw.expect_pong(3);
}

// [HB-7.1] [HB-2.3] A client that writes garbage before it has read anything still gets its Hello, then
// BAD_MAGIC, then a clean close (the server does not reset the connection and lose the frames).
#[test]
fn hb_2_3_garbage_before_reading_hello_gets_hello_then_bad_magic() {
    let server = start();
    for _ in 0..10 {
        let mut raw = Raw::connect(server.addr);
        raw.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (header, packet) = raw.frame();
        assert_eq!(header.kind, kind::HELLO, "got {packet:?}");
        raw.expect_fatal(code::BAD_MAGIC);
    }
}

// -----------------------------------------------------------------------------------------------------------------
// Connection lifecycle
// -----------------------------------------------------------------------------------------------------------------

// [HB-7.1] Hello comes first, unasked, with a UUID v4 connection id (different per connection) and the limits
// from the configuration.
#[test]
fn hb_7_1_hello_first_with_uuid_v4_and_configured_limits() {
    let server = start_with(|c| {
        c.max_frame = 8192;
        c.max_text = 2048;
        c.idle_timeout = Duration::from_millis(45_500);
        c.auth_timeout = Duration::from_millis(12_250);
    });
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut raw = Raw::connect(server.addr);
        let (header, packet) = raw.frame();
        assert_eq!(header.kind, kind::HELLO);
        assert_eq!(header.request_id, 0);
        let Packet::Hello {
            connection_id,
            server_version,
            max_frame,
            idle_timeout_ms,
            auth_timeout_ms,
        } = packet
        else {
            panic!("expected Hello, got {packet:?}");
        };
        assert!(
            is_version_4_uuid(&connection_id),
            "not a UUID v4: {connection_id:02x?}"
        );
        assert_eq!(max_frame, 8192);
        assert_eq!(idle_timeout_ms, 45_500);
        assert_eq!(auth_timeout_ms, 12_250);
        assert_eq!(server_version, env!("CARGO_PKG_VERSION"));
        // Nothing else is sent unasked.
        raw.expect_silence(Duration::from_millis(100));
        ids.push(connection_id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "connection ids must differ");

    let client = server.connect();
    assert!(is_version_4_uuid(&client.hello().connection_id));
    assert_eq!(client.hello().max_frame, 8192);
}

// [HB-7.2] Ping gets Pong with the same request id, in any state: before login, logged in, after logout.
#[test]
fn hb_7_2_ping_gets_pong_with_same_request_id_in_any_state() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);
    for id in [1, 0x0102_0304, u32::MAX] {
        raw.send(&ping(id));
        raw.expect_pong(id);
    }

    let mut client = server.user("pinger");
    client.ping().expect("ping while logged in");
    let id = client.send_request(&Request::Ping).unwrap();
    assert_eq!(client.wait_reply(id, READ_WAIT).unwrap(), Packet::Pong);
    client.logout().unwrap();
    client.ping().expect("ping after logout");
}

// [HB-2.6] [HB-6.1] A client sending garbage gets an Error and is closed; another client, connected before and
// after, is not disturbed.
#[test]
fn hb_2_6_garbage_client_is_closed_and_others_keep_working() {
    let server = start();
    let mut good = server.connect();
    good.ping().unwrap();

    let mut bad = Raw::greeted(server.addr);
    bad.send(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0xaa, 0xbb,
    ]);
    bad.expect_fatal(code::BAD_MAGIC);

    for _ in 0..5 {
        good.ping().expect("the other client keeps getting Pongs");
    }
    let mut later = server.connect();
    later.ping().unwrap();
}

// [HB-7.11] A logged-in client that sends nothing is closed after the idle timeout with IDLE_TIMEOUT, then EOF,
// and not before the timeout.
#[test]
fn hb_7_11_idle_timeout_closes_a_silent_logged_in_client() {
    let idle = Duration::from_millis(1000);
    let server = idle_server(idle);
    let mut client = server.connect();
    client.register("sleepy", PASSWORD).unwrap();
    let last_frame_sent = Instant::now();
    client.login("sleepy", PASSWORD, "test", 0).unwrap();
    assert_eq!(
        wait_for_error_push(&mut client, Duration::from_secs(10)),
        code::IDLE_TIMEOUT
    );
    let waited = last_frame_sent.elapsed();
    assert!(
        waited >= idle.mul_f32(0.9),
        "closed after {waited:?}, before the idle timeout {idle:?}"
    );
    assert_closed(&mut client);
}

// [HB-7.11] Bytes that never complete a frame are not activity: a logged-in client trickling one byte of a frame
// at a time (a slowloris) is still closed with IDLE_TIMEOUT.
#[test]
fn hb_7_11_trickling_a_partial_frame_does_not_count_as_activity() {
    let idle = Duration::from_millis(1000);
    let server = idle_server(idle);
    let mut client = server.user("trickler");
    let bytes = request_frame(
        &Request::Send {
            recipient: "trickler".into(),
            client_msg_id: 1,
            text: "x".repeat(200),
        },
        99,
    );
    let mut stream = client.stream().try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_trickle = Arc::clone(&stop);
    let started = Instant::now();
    // 100 bytes, one per 50 ms: five seconds of trickle, far longer than the idle timeout.
    let trickle = std::thread::spawn(move || {
        for b in bytes.iter().take(100) {
            if stop_trickle.load(Ordering::SeqCst) || stream.write_all(&[*b]).is_err() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
    });
    assert_eq!(
        wait_for_error_push(&mut client, Duration::from_secs(10)),
        code::IDLE_TIMEOUT
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "trickled bytes kept the connection alive for {:?}",
        started.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    assert_closed(&mut client);
    trickle.join().unwrap();
}

// [HB-7.11] A logged-in client that pings keeps its connection well past the idle timeout.
#[test]
fn hb_7_11_pinging_client_is_not_idle() {
    let idle = Duration::from_millis(1000);
    let server = idle_server(idle);
    let mut client = server.user("chatty");
    let start = Instant::now();
    while start.elapsed() < idle * 3 {
        sleep(Duration::from_millis(200));
        client
            .ping()
            .expect("a client that pings is not closed as idle");
    }
    client.ping().unwrap();
}

// [HB-7.10] A connection that never logs in is closed with AUTH_TIMEOUT even while it keeps pinging (activity
// does not replace logging in); a client that logged in is not.
#[test]
fn hb_7_10_auth_timeout_closes_a_connection_that_never_logs_in() {
    let auth = Duration::from_millis(700);
    let server = start_with(|c| {
        c.auth_timeout = auth;
        c.idle_timeout = Duration::from_secs(30);
    });
    let opened = Instant::now();
    let mut anonymous = server.connect();
    let mut member = server.user("member");

    // The anonymous client pings until the server closes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "never closed for AUTH_TIMEOUT");
        match anonymous.ping() {
            Ok(()) => sleep(Duration::from_millis(50)),
            Err(ClientError::Closed) => break,
            Err(e) => panic!("unexpected ping failure: {e}"),
        }
    }
    let closed_after = opened.elapsed();
    assert!(
        closed_after >= auth.mul_f32(0.9),
        "closed after {closed_after:?}, before the auth timeout {auth:?}"
    );
    match anonymous.next_push(READ_WAIT) {
        Ok(Packet::Error { code, .. }) => assert_eq!(code, code::AUTH_TIMEOUT),
        other => panic!("expected an AUTH_TIMEOUT push, got {other:?}"),
    }

    // Well past the auth timeout, the logged-in client is still served.
    while opened.elapsed() < auth * 3 {
        sleep(Duration::from_millis(100));
    }
    member
        .ping()
        .expect("a logged-in client is not closed by the auth timeout");
}

// [HB-8] With max_connections = 3 the 4th connection gets Error SERVER_FULL instead of Hello and is closed; once
// one closes, a new connection is accepted.
#[test]
fn hb_8_max_connections_refuses_with_server_full() {
    let server = start_with(|c| c.max_connections = 3);
    let mut clients: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    for c in &mut clients {
        c.ping().unwrap();
    }

    let mut fourth = Raw::connect(server.addr);
    fourth.expect_refused(code::SERVER_FULL);
    assert_eq!(
        code_of(Client::connect(server.addr)),
        code::SERVER_FULL,
        "the client library reports the refusal"
    );

    // The refusals did not disturb the admitted clients.
    for c in &mut clients {
        c.ping().unwrap();
    }

    drop(clients.pop());
    let admitted = connect_eventually(server.addr, Duration::from_secs(5));
    assert!(
        admitted.is_some(),
        "a connection is accepted again after one closed"
    );
    admitted.unwrap().ping().unwrap();
    for c in &mut clients {
        c.ping().unwrap();
    }
}

// [HB-8] A refused client that sent its first request before reading still gets SERVER_FULL and a clean close.
#[test]
fn hb_8_refused_client_that_pipelined_a_request_still_gets_server_full() {
    let server = start_with(|c| c.max_connections = 1);
    let mut only = server.connect();
    for _ in 0..10 {
        let mut raw = Raw::connect(server.addr);
        raw.send(&ping(1));
        raw.expect_fatal(code::SERVER_FULL);
    }
    only.ping().unwrap();
}

// [HB-8] With max_per_ip = 2 the third connection from 127.0.0.1 gets TOO_MANY_FROM_ADDRESS and is closed; after
// one closes, the address may connect again. (A second address such as 127.0.0.2 is not tested: std cannot bind
// a client socket before connecting.)
#[test]
fn hb_8_max_per_ip_refuses_with_too_many_from_address() {
    let server = start_with(|c| {
        c.max_per_ip = 2;
        c.max_connections = 100;
    });
    let mut first = server.connect();
    let mut second = server.connect();

    let mut third = Raw::connect(server.addr);
    third.expect_refused(code::TOO_MANY_FROM_ADDRESS);
    first.ping().unwrap();
    second.ping().unwrap();

    drop(first);
    let admitted = connect_eventually(server.addr, Duration::from_secs(5));
    assert!(
        admitted.is_some(),
        "the address may connect again after one of its connections closed"
    );
    admitted.unwrap().ping().unwrap();
    second.ping().unwrap();
}

// [HB-9] A graceful shutdown sends every connected client (anonymous, logged in, raw) a Shutdown push (kind 0xBF,
// request id 0) before closing, completes within 5 s (well inside a long grace time, so it finished rather than
// timed out), and accepts no connection afterwards.
#[test]
fn hb_9_shutdown_notifies_every_client_then_closes() {
    let server = start_with(|c| c.shutdown_grace = Duration::from_secs(30));
    let addr = server.addr;
    let mut anonymous = server.connect();
    let mut member = server.user("stayer");
    let mut raw = Raw::greeted(addr);
    anonymous.ping().unwrap();
    member.ping().unwrap();

    let started = Instant::now();
    server.stop();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");

    let text = wait_for_shutdown_notice(&mut anonymous);
    assert!(!text.is_empty());
    assert_closed(&mut anonymous);
    wait_for_shutdown_notice(&mut member);
    assert_closed(&mut member);

    let (header, packet) = raw.frame();
    assert_eq!(header.kind, kind::SHUTDOWN, "got {packet:?}");
    assert_eq!(header.kind, 0xBF);
    assert_eq!(header.request_id, 0);
    assert!(matches!(packet, Packet::Shutdown { .. }));
    raw.expect_eof();

    assert!(
        TcpStream::connect(addr).is_err(),
        "no connection is accepted after shutdown"
    );
}

// [HB-9] Shutdown through `RunningServer::shutdown` directly, with a client that is not reading: it still
// completes in time, and the notice is waiting in the socket.
#[test]
fn hb_9_running_server_shutdown_completes_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(&dir);
    config.shutdown_grace = Duration::from_secs(30);
    let running = hubbub::Server::bind(config).unwrap().spawn().unwrap();
    let mut raw = Raw::greeted(running.addr);
    raw.send(&ping(1));
    raw.expect_pong(1);

    let started = Instant::now();
    running.shutdown().expect("clean shutdown");
    assert!(started.elapsed() < Duration::from_secs(5));
    let (header, _) = raw.frame();
    assert_eq!(header.kind, kind::SHUTDOWN);
    raw.expect_eof();
}

// [HB-4.1] An undecodable body (a Register whose string claims more bytes than the body has, a Ping with a body,
// invalid UTF-8) is answered MALFORMED and the connection stays open.
#[test]
fn hb_4_1_malformed_body_gets_malformed_and_connection_stays() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);

    raw.send(&frame(kind::REGISTER, 77, &[0x00, 0x0a, b'a', b'b']));
    raw.expect_error_and_alive(77, code::MALFORMED, 78);

    raw.send(&frame(kind::PING, 79, b"extra"));
    raw.expect_error_and_alive(79, code::MALFORMED, 80);

    let mut body = wire_str(&[0xff, 0xfe, 0xfd]);
    body.extend(wire_str(PASSWORD.as_bytes()));
    raw.send(&frame(kind::REGISTER, 81, &body));
    raw.expect_error_and_alive(81, code::MALFORMED, 82);

    // A malformed frame in the middle of a batch does not lose the frames after it.
    let mut batch = ping(83);
    batch.extend(frame(kind::RECEIVED, 84, &[1, 2, 3]));
    batch.extend(ping(85));
    raw.send(&batch);
    raw.expect_pong(83);
    match raw.reply(84) {
        Packet::Error { code, .. } => assert_eq!(code, code::MALFORMED),
        other => panic!("{other:?}"),
    }
    raw.expect_pong(85);
}

// [HB-2.7] Request id 0 is reserved for server pushes: a request carrying it is answered MALFORMED, is not acted
// on, and the connection stays.
#[test]
fn hb_2_7_request_id_zero_gets_malformed_and_connection_stays() {
    let server = start();
    let mut raw = Raw::greeted(server.addr);

    raw.send(&ping(0));
    raw.expect_error_and_alive(0, code::MALFORMED, 5);

    let register = register_request("zero_user");
    raw.send(&request_frame(&register, 0));
    raw.expect_error_and_alive(0, code::MALFORMED, 6);

    // The refused Register did nothing: the name is still free.
    raw.send(&request_frame(&register, 7));
    assert_eq!(raw.reply(7), Packet::Ok, "the id-0 Register must not run");
}

// [HB-7.13] Chat requests before login are answered NOT_AUTHENTICATED and the connection stays.
#[test]
fn hb_7_13_chat_requests_before_login_get_not_authenticated() {
    let server = start();
    let mut client = server.connect();
    assert_eq!(
        code_of(client.send_message("bob", 1, "hi")),
        code::NOT_AUTHENTICATED
    );
    assert_eq!(
        code_of(client.history("bob", 0, 10)),
        code::NOT_AUTHENTICATED
    );
    assert_eq!(code_of(client.received(1)), code::NOT_AUTHENTICATED);
    assert_eq!(code_of(client.read("bob", 1)), code::NOT_AUTHENTICATED);
    assert_eq!(code_of(client.list_tokens()), code::NOT_AUTHENTICATED);
    assert_eq!(code_of(client.revoke_token(1)), code::NOT_AUTHENTICATED);
    assert_eq!(code_of(client.logout()), code::NOT_AUTHENTICATED);
    client.ping().expect("the connection stays open");

    // The same requests are served once logged in.
    client.register("carol", PASSWORD).unwrap();
    client.login("carol", PASSWORD, "test", 0).unwrap();
    let (messages, _) = client.history("carol", 0, 10).expect("history after login");
    assert!(messages.is_empty());
}

// [HB-2.6] Peers that vanish mid-frame — one resets the connection (it closes with the Hello unread, so the
// kernel sends RST), one closes cleanly — do not disturb another client, and their slots are freed.
#[test]
fn hb_2_6_peer_vanishing_mid_frame_does_not_disturb_others() {
    let server = start_with(|c| c.max_connections = 3);
    let mut steady = server.connect();
    steady.ping().unwrap();

    let half = request_frame(&register_request("ghost"), 9);
    let half = &half[..half.len() / 2];

    let mut resetter = Raw::connect(server.addr);
    // Wait until the Hello is in our receive buffer without reading it, so closing resets the connection.
    sleep(Duration::from_millis(100));
    resetter.send(half);
    drop(resetter);

    let mut closer = Raw::greeted(server.addr);
    closer.send(half);
    closer.stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(closer);

    for _ in 0..5 {
        steady.ping().expect("the steady client is not disturbed");
    }
    // Both vanished sessions were freed: two more connections fit under max_connections = 3.
    let mut extra: Vec<Client> = Vec::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            while extra.len() < 2 {
                match Client::connect(server.addr) {
                    Ok(c) => extra.push(c),
                    Err(_) => return false,
                }
            }
            true
        }),
        "the vanished peers' slots were not freed"
    );
    for c in &mut extra {
        c.ping().unwrap();
    }
    steady.ping().unwrap();
}
