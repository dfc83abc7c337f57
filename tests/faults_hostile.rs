//! Fault suite: hostile clients against the real `hubbub` binary. One misbehaving client must never harm another,
//! bad input gets a clear error and never a panic, and memory stays bounded ([HB-2], [HB-5.6], [HB-6], [HB-7.10],
//! [HB-8]).
//!
//! Every test runs the server as its own process on `127.0.0.1:0` with a temporary database (thousands of
//! connections need their own open-file limit), keeps its stderr, and kills it on every path. The tests take a
//! lock so they run one at a time: their timing bounds hold on a slow, busy 2-core machine.
//!
//! The default run takes about a minute. Larger variants are `#[ignore]`d; run them with
//!
//! ```text
//! cargo test --release --test faults_hostile -- --ignored --nocapture
//! ```
//!
//! The hostile-bytes generator is seeded: the seed is printed, and `HUBBUB_FAULT_SEED=<n>` repeats a run.
//! `HUBBUB_FAULT_LOG=debug` runs the servers with that `RUST_LOG` (default `info`). Figures (RSS, timings,
//! counters) are printed; see them with `--nocapture`.

mod common;

use common::process::{raise_nofile, rss_of, ServerProcess};
use common::PASSWORD;
use hubbub::client::{Client, ClientError};
use hubbub::framing::{put_header, split_frame, HEADER_LEN};
use hubbub::protocol::{code, is_packet_kind, is_request_kind, kind, Message, Packet, Request};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

/// The longest any single read or reply may take before a check fails.
const WAIT: Duration = Duration::from_secs(10);
/// The bound on one round trip of the well-behaved pair (Send → Ack → Deliver).
const PAIR_RTT_BOUND: Duration = Duration::from_secs(2);
/// KiB in a MiB: RSS figures are read in KiB.
const MIB: u64 = 1024;

// -------------------------------------------------------------------------------------------------------------
// One test at a time
// -------------------------------------------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the tests of this file one after another (a failed test must not block the rest).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// -------------------------------------------------------------------------------------------------------------
// The server process
// -------------------------------------------------------------------------------------------------------------

/// Starts the binary on `dir/hubbub.db` with cheap hashing plus `extra` flags. It runs under `sh -c 'ulimit -n
/// 20000; exec hubbub …'`, so its pid is the server's own and it may hold thousands of connections.
fn start_server(dir: &Path, extra: &[&str]) -> ServerProcess {
    ServerProcess::launch(dir.join("hubbub.db"))
        .nofile(20_000)
        .args(extra)
        .rust_log(std::env::var("HUBBUB_FAULT_LOG").unwrap_or("info".into()))
        .keep_lines(200_000)
        .start()
}

fn fresh_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

// -------------------------------------------------------------------------------------------------------------
// Client helpers
// -------------------------------------------------------------------------------------------------------------

fn drain_until_caught_up(c: &mut Client) -> Vec<Packet> {
    let mut before = Vec::new();
    loop {
        match c.next_push(WAIT) {
            Ok(Packet::CaughtUp { .. }) => return before,
            Ok(p) => before.push(p),
            Err(e) => panic!("no CaughtUp after login: {e}"),
        }
    }
}

/// A session of `name` (registered with PASSWORD) on device "test", past its catch-up.
fn online(server: &ServerProcess, name: &str) -> Client {
    online_with(server, name, PASSWORD)
}

/// A session of `name` logged in with `password` on device "test", past its catch-up.
fn online_with(server: &ServerProcess, name: &str, password: &str) -> Client {
    let mut c = server.connect();
    c.login(name, password, "test", 0)
        .unwrap_or_else(|e| panic!("login {name}: {e}"));
    drain_until_caught_up(&mut c);
    c
}

fn stats(c: &mut Client) -> HashMap<String, u64> {
    c.stats().expect("Stats").into_iter().collect()
}

fn stat(c: &mut Client, name: &str) -> u64 {
    *stats(c)
        .get(name)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

#[track_caller]
fn code_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
    match r {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / MIB as f64
}

/// A socket connected to `addr`, from `local` if given, with the buffer sizes asked for, as a std stream.
fn socket_to(
    addr: SocketAddr,
    local: Option<Ipv4Addr>,
    rcvbuf: Option<usize>,
    sndbuf: Option<usize>,
) -> io::Result<TcpStream> {
    socket_with(addr, local, rcvbuf, sndbuf, None)
}

/// As `socket_to`, and with a small TCP_MAXSEG if `mss` is given. Loopback's MSS is 64 KiB, so the server's
/// kernel send buffer grows to megabytes at once and absorbs everything a non-reading client is sent; a small
/// MSS (as on a real network) and a small receive buffer keep the kernel's share to about 150 KB, so output
/// really waits in the server.
fn socket_with(
    addr: SocketAddr,
    local: Option<Ipv4Addr>,
    rcvbuf: Option<usize>,
    sndbuf: Option<usize>,
    mss: Option<u32>,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if let Some(mss) = mss {
        use std::os::fd::AsRawFd;
        let value = mss as libc::c_int;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int; the fd is the socket's own.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MAXSEG,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if let Some(ip) = local {
        socket.bind(&SockAddr::from(SocketAddrV4::new(ip, 0)))?;
    }
    if let Some(n) = rcvbuf {
        socket.set_recv_buffer_size(n)?;
    }
    if let Some(n) = sndbuf {
        socket.set_send_buffer_size(n)?;
    }
    socket.connect_timeout(&SockAddr::from(addr), WAIT)?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    Ok(stream)
}

// -------------------------------------------------------------------------------------------------------------
// Raw frames
// -------------------------------------------------------------------------------------------------------------

fn frame(kind: u8, rid: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    put_header(&mut out, kind, rid, body.len() as u32);
    out.extend_from_slice(body);
    out
}

/// A header with any version and any announced length (the body, if any, is appended as is).
fn raw_header(version: u8, kind: u8, rid: u32, len: u32) -> Vec<u8> {
    let mut out = b"HB".to_vec();
    out.push(version);
    out.push(kind);
    out.extend_from_slice(&rid.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

fn encode(request: &Request, rid: u32) -> Vec<u8> {
    let mut out = Vec::new();
    request.encode(rid, &mut out);
    out
}

fn put_wire_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// What one read of a raw connection gave. (Fields are read through `Debug`, in failure messages.)
#[derive(Debug)]
#[allow(dead_code)]
enum Ev {
    Frame(u32, Packet),
    Eof,
    Reset,
    Timeout,
    /// The server sent bytes that are not a valid frame or packet: always a server bug.
    Bad(String),
    Io(io::ErrorKind),
}

/// A connection that speaks bytes: the test writes exactly what it wants and reads frames back.
struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
}

impl Conn {
    fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, WAIT)?;
        stream.set_nodelay(true)?;
        Ok(Conn::new(stream))
    }

    fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            input: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("write failed: {e}"))
    }

    fn next(&mut self, timeout: Duration) -> Ev {
        let deadline = Instant::now() + timeout;
        loop {
            match split_frame(&self.input, 64 * 1024 * 1024, is_packet_kind) {
                Ok(Some(f)) => {
                    let (header, used) = (f.header, f.len);
                    let packet = Packet::decode(&header, f.body);
                    self.input.drain(..used);
                    return match packet {
                        Ok(p) => Ev::Frame(header.request_id, p),
                        Err(e) => Ev::Bad(format!("undecodable server packet: {e}")),
                    };
                }
                Ok(None) => {}
                Err(e) => return Ev::Bad(format!("bad server frame: {e}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ev::Timeout;
            }
            let _ = self.stream.set_read_timeout(Some(left));
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) if self.input.is_empty() => return Ev::Eof,
                Ok(0) => {
                    return Ev::Bad(format!("EOF inside a frame ({} bytes)", self.input.len()))
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ev::Timeout
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ev::Reset,
                Err(e) => return Ev::Io(e.kind()),
            }
        }
    }

    fn expect_hello(&mut self) -> Result<(), String> {
        match self.next(WAIT) {
            Ev::Frame(0, Packet::Hello { .. }) => Ok(()),
            other => Err(format!("expected Hello, got {other:?}")),
        }
    }

    /// Reads until the reply to `rid` (skipping pushes and other replies).
    fn wait_reply(&mut self, rid: u32) -> Result<Packet, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.next(deadline.saturating_duration_since(Instant::now())) {
                Ev::Frame(r, p) if r == rid => return Ok(p),
                Ev::Frame(..) => {}
                other => return Err(format!("waiting for reply {rid}: {other:?}")),
            }
        }
    }

    /// Hello, Login, LoginOk, CaughtUp: a logged-in raw session.
    fn login(addr: SocketAddr, stream: Option<TcpStream>, name: &str) -> Conn {
        let mut conn = match stream {
            Some(s) => Conn::new(s),
            None => Conn::connect(addr).expect("connect"),
        };
        conn.expect_hello().unwrap();
        let login = Request::Login {
            username: name.into(),
            password: PASSWORD.into(),
            device: "raw".into(),
            last_seen: 0,
        };
        conn.send(&encode(&login, 1)).unwrap();
        match conn.wait_reply(1) {
            Ok(Packet::LoginOk { .. }) => {}
            other => panic!("login {name}: {other:?}"),
        }
        loop {
            match conn.next(WAIT) {
                Ev::Frame(0, Packet::CaughtUp { .. }) => return conn,
                Ev::Frame(..) => {}
                other => panic!("login {name}: no CaughtUp: {other:?}"),
            }
        }
    }
}

// -------------------------------------------------------------------------------------------------------------
// A well-behaved pair that keeps chatting while others misbehave
// -------------------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct PairReport {
    rounds: u64,
    max_rtt: Duration,
    total_rtt: Duration,
    errors: Vec<String>,
}

impl PairReport {
    fn mean_ms(&self) -> f64 {
        if self.rounds == 0 {
            0.0
        } else {
            self.total_rtt.as_secs_f64() * 1000.0 / self.rounds as f64
        }
    }

    /// No error, some rounds, each round trip under the bound.
    fn assert_ok(&self, what: &str) {
        assert!(
            self.errors.is_empty(),
            "{what}: the well-behaved pair saw errors: {:?}",
            self.errors
        );
        assert!(
            self.rounds >= 5,
            "{what}: the pair made only {} round trips",
            self.rounds
        );
        assert!(
            self.max_rtt < PAIR_RTT_BOUND,
            "{what}: a round trip of the pair took {:?} (bound {PAIR_RTT_BOUND:?})",
            self.max_rtt
        );
    }
}

/// A sends B a message every `interval`; B checks that it arrives (same id as the Ack, same text).
struct Pair {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<PairReport>>,
}

impl Pair {
    /// `a` and `b` must be registered with PASSWORD.
    fn start(server: &ServerProcess, a: &str, b: &str, interval: Duration) -> Pair {
        let mut ca = online(server, a);
        let mut cb = online(server, b);
        let (a, b) = (a.to_owned(), b.to_owned());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut report = PairReport::default();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let text = format!("round {i} from {a}");
                    let t0 = Instant::now();
                    let ack = match ca.send_message(&b, i, &text) {
                        Ok((id, _)) => id,
                        Err(e) => {
                            report.errors.push(format!("round {i}: Send: {e}"));
                            break;
                        }
                    };
                    match cb.next_message(WAIT) {
                        Ok(m) if m.id == ack && m.text == text && m.sender == a => {}
                        Ok(m) => {
                            report
                                .errors
                                .push(format!("round {i}: wrong Deliver {m:?} (ack {ack})"));
                            break;
                        }
                        Err(e) => {
                            report.errors.push(format!("round {i}: Deliver: {e}"));
                            break;
                        }
                    }
                    let rtt = t0.elapsed();
                    report.rounds += 1;
                    report.total_rtt += rtt;
                    report.max_rtt = report.max_rtt.max(rtt);
                    sleep(interval);
                }
                report
            })
        };
        Pair {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> PairReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("the pair thread panicked")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// -------------------------------------------------------------------------------------------------------------
// The seeded generator
// -------------------------------------------------------------------------------------------------------------

/// xorshift64: tiny, fast, and the same sequence for the same seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for _ in 0..4 {
            r.next();
        }
        r
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn nonzero_rid(&mut self) -> u32 {
        (self.next() as u32).max(1)
    }
}

fn seed() -> u64 {
    if let Some(seed) = std::env::var("HUBBUB_FAULT_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return seed;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    nanos ^ ((std::process::id() as u64) << 32)
}

/// Names that break the name rules ([HB-1.8]): SQL metacharacters, NUL, control characters, bidi marks,
/// combining characters, emoji, wrong lengths.
const BAD_NAMES: &[&str] = &[
    "'; DROP TABLE users; --",
    "\" OR 1=1 --",
    "admin'--",
    "' OR '1'='1",
    "%",
    "_",
    "%%%",
    "a%b",
    "a b",
    "ab\\c",
    "ab;c",
    "ab\0c",
    "\0\0\0",
    "abc\n",
    "\x01\x02\x03",
    "\u{202E}abc",
    "ab\u{200F}c",
    "e\u{301}ve",
    "😀😀😀",
    "ａｂｃ",
    "éééééééééééééééé",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ab",
    "",
];

/// Every kind a client may send, in order.
fn request_kinds() -> Vec<u8> {
    (0x01..=0x3Fu8).filter(|k| is_request_kind(*k)).collect()
}

/// A well-formed request of `kind` and what a session that is not logged in gets for it ([HB-7.13]).
fn sample_request(kind_: u8, rng: &mut Rng) -> (Request, Want) {
    let name = || "bob".to_string();
    let text = || "hello".to_string();
    match kind_ {
        kind::PING => (Request::Ping, Want::Pong),
        kind::REGISTER => (
            Request::Register {
                username: (*rng.pick(BAD_NAMES)).into(),
                password: PASSWORD.into(),
            },
            Want::Code(code::INVALID_USERNAME),
        ),
        kind::LOGIN => (
            Request::Login {
                username: format!("ghost{}", rng.below(1_000_000)),
                password: "not-the-password".into(),
                device: "dev".into(),
                last_seen: 0,
            },
            Want::Code(code::BAD_CREDENTIALS),
        ),
        kind::RESUME => {
            let mut token = [0u8; 16];
            token.copy_from_slice(&rng.bytes(16));
            (
                Request::Resume {
                    token,
                    device: "dev".into(),
                    last_seen: 0,
                },
                Want::Code(code::BAD_TOKEN),
            )
        }
        _ => {
            let request = match kind_ {
                kind::LOGOUT => Request::Logout,
                kind::LIST_TOKENS => Request::ListTokens,
                kind::REVOKE_TOKEN => Request::RevokeToken { token_id: 1 },
                kind::SEND => Request::Send {
                    recipient: name(),
                    client_msg_id: rng.next(),
                    text: text(),
                },
                kind::RECEIVED => Request::Received { up_to: rng.next() },
                kind::READ => Request::Read {
                    peer: name(),
                    up_to: 1,
                },
                kind::HISTORY => Request::History {
                    peer: name(),
                    before_id: 0,
                    limit: 10,
                },
                kind::CREATE_ROOM => Request::CreateRoom {
                    name: "lounge".into(),
                    topic: "t".into(),
                },
                kind::JOIN_ROOM => Request::JoinRoom {
                    name: "lounge".into(),
                },
                kind::LEAVE_ROOM => Request::LeaveRoom {
                    name: "lounge".into(),
                },
                kind::KICK => Request::Kick {
                    room: "lounge".into(),
                    user: name(),
                },
                kind::CLOSE_ROOM => Request::CloseRoom {
                    name: "lounge".into(),
                },
                kind::LIST_ROOMS => Request::ListRooms {
                    after: String::new(),
                    limit: 10,
                },
                kind::ROOM_MEMBERS => Request::RoomMembers {
                    name: "lounge".into(),
                },
                kind::SEND_ROOM => Request::SendRoom {
                    room: "lounge".into(),
                    client_msg_id: rng.next(),
                    text: text(),
                },
                kind::ROOM_HISTORY => Request::RoomHistory {
                    room: "lounge".into(),
                    before_id: 0,
                    limit: 10,
                },
                kind::WATCH => Request::Watch {
                    users: vec![name()],
                },
                kind::UNWATCH => Request::Unwatch {
                    users: vec![name()],
                },
                kind::TYPING => Request::Typing {
                    room: rng.chance(50),
                    to: name(),
                },
                kind::STATS => Request::Stats,
                other => panic!("no sample for kind 0x{other:02x}"),
            };
            assert_eq!(request.kind(), kind_);
            (request, Want::Code(code::NOT_AUTHENTICATED))
        }
    }
}

/// Invalid UTF-8 in one string of an otherwise well-formed body: MALFORMED ([HB-1.2], [HB-4.1]).
fn bad_utf8_frame(rng: &mut Rng, rid: u32) -> Vec<u8> {
    const BAD: &[&[u8]] = &[
        b"\xff",
        b"al\xffce",
        b"\x80abc",
        b"\xc0\xaf",
        b"\xed\xa0\x80",
        b"\xe2\x82",
        b"\xf8\x88\x80\x80\x80",
        b"ok\xf4\x90\x80\x80",
        b"abc\xfe\xfe",
    ];
    let bad = *rng.pick(BAD);
    let ok = b"alice".as_slice();
    let which = rng.below(3);
    let s = |i: u64| if i == which { bad } else { ok };
    let mut body = Vec::new();
    let kind_ = match rng.below(7) {
        0 => {
            // Exactly one of the two strings is bad.
            put_wire_str(&mut body, if which == 0 { bad } else { ok });
            put_wire_str(
                &mut body,
                if which == 0 { PASSWORD.as_bytes() } else { bad },
            );
            kind::REGISTER
        }
        1 => {
            put_wire_str(&mut body, s(0));
            put_wire_str(&mut body, s(1));
            put_wire_str(&mut body, s(2));
            body.extend_from_slice(&0u64.to_be_bytes());
            kind::LOGIN
        }
        2 => {
            put_wire_str(&mut body, s(0));
            body.extend_from_slice(&7u64.to_be_bytes());
            put_wire_str(&mut body, if which == 0 { ok } else { bad });
            kind::SEND
        }
        3 => {
            put_wire_str(&mut body, s(0));
            put_wire_str(&mut body, if which == 0 { ok } else { bad });
            kind::CREATE_ROOM
        }
        4 => {
            body.extend_from_slice(&3u16.to_be_bytes());
            for i in 0..3 {
                put_wire_str(&mut body, s(i));
            }
            kind::WATCH
        }
        5 => {
            put_wire_str(&mut body, bad);
            body.extend_from_slice(&0u64.to_be_bytes());
            body.extend_from_slice(&20u16.to_be_bytes());
            kind::HISTORY
        }
        _ => {
            body.push(rng.below(2) as u8);
            put_wire_str(&mut body, bad);
            kind::TYPING
        }
    };
    frame(kind_, rid, &body)
}

// -------------------------------------------------------------------------------------------------------------
// One hostile connection: what it sends and what it must see
// -------------------------------------------------------------------------------------------------------------

/// The answer one request must get.
#[derive(Clone, Copy, Debug)]
enum Want {
    Pong,
    Code(u16),
    /// Exactly one reply, whatever it is, but not a closing Error.
    AnyOne,
}

/// What a hostile connection must see after Hello.
enum Expect {
    /// Exactly this Error, then the connection closes ([HB-2.6], [HB-6.1]).
    Close { code: u16, rid: u32 },
    /// One reply per request id; then a Ping of ours is answered: the connection is still in step.
    Replies(Vec<(u32, Want)>),
    /// We half-closed in the middle of a frame: no frame at all, then EOF.
    SilentEof,
}

#[derive(Default)]
struct WorkerReport {
    cases: HashMap<&'static str, usize>,
    failures: Vec<String>,
    lingering: Vec<TcpStream>,
    connections: usize,
}

const FINAL_PING: u32 = 0xFFFF_FF00;

fn hostile_worker(
    addr: SocketAddr,
    seed: u64,
    worker: usize,
    inputs: usize,
    linger_max: usize,
) -> WorkerReport {
    let mut rng = Rng::new(seed ^ ((worker as u64 + 1) << 40));
    let mut report = WorkerReport::default();
    let kinds = request_kinds();
    let unassigned: Vec<u8> = (0x00..=0xFFu8).filter(|k| !is_request_kind(*k)).collect();
    let unassigned_low: Vec<u8> = (0x01..=0x3Fu8).filter(|k| !is_request_kind(*k)).collect();
    for input in 0..inputs {
        let stream = match TcpStream::connect_timeout(&addr, WAIT) {
            Ok(s) => s,
            Err(e) => {
                report
                    .failures
                    .push(format!("worker {worker} input {input}: connect: {e}"));
                continue;
            }
        };
        report.connections += 1;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn::new(stream);
        // A client may send before Hello arrives ([HB-7.1]): half the time we do.
        let mut hello_pending = true;
        if rng.chance(50) {
            if let Err(e) = conn.expect_hello() {
                report
                    .failures
                    .push(format!("worker {worker} input {input}: {e}"));
                continue;
            }
            hello_pending = false;
        }
        let (name, bytes, expect): (&'static str, Vec<u8>, Expect) = match rng.below(16) {
            0 => {
                let n = rng.range(12, 4096) as usize;
                let mut b = rng.bytes(n);
                if b[0] == b'H' {
                    b[0] = b'G';
                }
                (
                    "random bytes",
                    b,
                    Expect::Close {
                        code: code::BAD_MAGIC,
                        rid: 0,
                    },
                )
            }
            1 => {
                let n = rng.range(1, 11) as usize;
                ("short garbage, half-close", rng.bytes(n), Expect::SilentEof)
            }
            2 => {
                let mut v = rng.next() as u8;
                if v == 1 {
                    v = 2;
                }
                let mut b = raw_header(v, rng.next() as u8, rng.next() as u32, rng.next() as u32);
                let extra = rng.below(100) as usize;
                b.extend(rng.bytes(extra));
                (
                    "bad version",
                    b,
                    Expect::Close {
                        code: code::BAD_VERSION,
                        rid: 0,
                    },
                )
            }
            3 => {
                let k = if rng.chance(50) {
                    *rng.pick(&unassigned)
                } else {
                    *rng.pick(&unassigned_low)
                };
                let rid = rng.next() as u32;
                let len = if rng.chance(50) {
                    rng.below(64) as u32
                } else {
                    rng.next() as u32
                };
                let mut b = raw_header(1, k, rid, len);
                let extra = rng.below(64) as usize;
                b.extend(rng.bytes(extra));
                (
                    "unknown kind",
                    b,
                    Expect::Close {
                        code: code::UNKNOWN_KIND,
                        rid,
                    },
                )
            }
            4 => {
                let rid = rng.next() as u32;
                let len = rng.range(65_537, u32::MAX as u64) as u32;
                let mut b = raw_header(1, *rng.pick(&kinds), rid, len);
                let extra = rng.below(1000) as usize;
                b.extend(rng.bytes(extra));
                (
                    "oversize length",
                    b,
                    Expect::Close {
                        code: code::FRAME_TOO_LARGE,
                        rid,
                    },
                )
            }
            5 => {
                let len = rng.range(1, 65_536) as u32;
                let mut b = raw_header(1, *rng.pick(&kinds), rng.nonzero_rid(), len);
                let part = rng.below((len as u64).min(4096)) as usize;
                b.extend(rng.bytes(part));
                if rng.chance(30) {
                    b.truncate(rng.range(1, 11) as usize);
                }
                if rng.chance(50) {
                    ("truncated frame, half-close", b, Expect::SilentEof)
                } else {
                    // Reset mid-frame: SO_LINGER 0, then drop.
                    let _ = conn.send(&b);
                    let _ = SockRef::from(&conn.stream).set_linger(Some(Duration::ZERO));
                    drop(conn);
                    *report.cases.entry("reset mid-frame").or_default() += 1;
                    continue;
                }
            }
            6 | 7 => {
                let rid = rng.nonzero_rid();
                let n = rng.below(600) as usize;
                let b = frame(*rng.pick(&kinds), rid, &rng.bytes(n));
                (
                    "garbage body",
                    b,
                    Expect::Replies(vec![(rid, Want::AnyOne)]),
                )
            }
            8 => {
                let rid = rng.nonzero_rid();
                let b = bad_utf8_frame(&mut rng, rid);
                (
                    "invalid UTF-8",
                    b,
                    Expect::Replies(vec![(rid, Want::Code(code::MALFORMED))]),
                )
            }
            9 => {
                // Every request kind before login, pipelined in a random order.
                let mut order = kinds.clone();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let mut bytes = Vec::new();
                let mut wants = Vec::new();
                for (i, k) in order.iter().enumerate() {
                    let rid = 1000 + i as u32;
                    let (request, want) = sample_request(*k, &mut rng);
                    bytes.extend(encode(&request, rid));
                    wants.push((rid, want));
                }
                ("every kind before login", bytes, Expect::Replies(wants))
            }
            10 => {
                let rid = rng.nonzero_rid();
                let k = *rng.pick(&unassigned_low);
                let n = rng.below(32) as usize;
                (
                    "unassigned kind 0x01-0x3F",
                    frame(k, rid, &rng.bytes(n)),
                    Expect::Close {
                        code: code::UNKNOWN_KIND,
                        rid,
                    },
                )
            }
            11 => {
                let (request, _) = sample_request(*rng.pick(&kinds), &mut rng);
                (
                    "request id 0",
                    encode(&request, 0),
                    Expect::Replies(vec![(0, Want::Code(code::MALFORMED))]),
                )
            }
            12 | 13 => {
                // Valid frames split at random points, with short pauses.
                let n = rng.range(1, 12);
                let mut bytes = Vec::new();
                let mut wants = Vec::new();
                for i in 0..n {
                    let rid = 1 + i as u32;
                    let k = if rng.chance(40) {
                        kind::PING
                    } else {
                        *rng.pick(&kinds)
                    };
                    let (request, want) = sample_request(k, &mut rng);
                    bytes.extend(encode(&request, rid));
                    wants.push((rid, want));
                }
                let mut at = 0;
                let mut failed = None;
                while at < bytes.len() {
                    let cut = (at + rng.range(1, 17) as usize).min(bytes.len());
                    if let Err(e) = conn.send(&bytes[at..cut]) {
                        failed = Some(e);
                        break;
                    }
                    if rng.chance(10) {
                        sleep(Duration::from_millis(1));
                    }
                    at = cut;
                }
                if let Some(e) = failed {
                    report
                        .failures
                        .push(format!("worker {worker} input {input}: split frames: {e}"));
                    continue;
                }
                ("split frames", Vec::new(), Expect::Replies(wants))
            }
            14 => {
                let n = rng.range(50, 400) as u32;
                let mut bytes = Vec::new();
                for rid in 1..=n {
                    bytes.extend(frame(kind::PING, rid, b""));
                }
                let wants = (1..=n).map(|rid| (rid, Want::Pong)).collect();
                ("pipelined pings", bytes, Expect::Replies(wants))
            }
            _ => {
                // Most of a maximal frame, then silence: the server holds up to max_frame for it.
                let mut b = raw_header(1, kind::SEND, rng.nonzero_rid(), 65_536);
                let part = rng.range(32_768, 65_535) as usize;
                b.extend(rng.bytes(part));
                if report.lingering.len() < linger_max {
                    if let Err(e) = conn.send(&b) {
                        report
                            .failures
                            .push(format!("worker {worker} input {input}: lingering: {e}"));
                        continue;
                    }
                    report.lingering.push(conn.stream);
                    *report
                        .cases
                        .entry("big partial frame, kept open")
                        .or_default() += 1;
                    continue;
                }
                ("big partial frame, half-close", b, Expect::SilentEof)
            }
        };
        *report.cases.entry(name).or_default() += 1;
        let result = run_expectation(&mut conn, &bytes, expect, hello_pending);
        if let Err(e) = result {
            if report.failures.len() < 30 {
                report
                    .failures
                    .push(format!("worker {worker} input {input} ({name}): {e}"));
            }
        }
    }
    report
}

fn run_expectation(
    conn: &mut Conn,
    bytes: &[u8],
    expect: Expect,
    mut hello_pending: bool,
) -> Result<(), String> {
    if !bytes.is_empty() {
        conn.send(bytes)?;
    }
    let mut take_hello = |conn: &mut Conn| -> Result<(), String> {
        if hello_pending {
            hello_pending = false;
            conn.expect_hello()?;
        }
        Ok(())
    };
    match expect {
        Expect::Close { code, rid } => {
            take_hello(conn)?;
            match conn.next(WAIT) {
                Ev::Frame(r, Packet::Error { code: c, .. }) if c == code && r == rid => {}
                other => return Err(format!("expected Error {code} (id {rid}), got {other:?}")),
            }
            match conn.next(WAIT) {
                Ev::Eof | Ev::Reset => Ok(()),
                other => Err(format!(
                    "expected the close after Error {code}, got {other:?}"
                )),
            }
        }
        Expect::SilentEof => {
            let _ = conn.stream.shutdown(Shutdown::Write);
            take_hello(conn)?;
            match conn.next(WAIT) {
                Ev::Eof | Ev::Reset => Ok(()),
                other => Err(format!("expected EOF after our half-close, got {other:?}")),
            }
        }
        Expect::Replies(wants) => {
            conn.send(&frame(kind::PING, FINAL_PING, b""))?;
            take_hello(conn)?;
            let mut open: HashMap<u32, Want> = wants.iter().copied().collect();
            let deadline = Instant::now() + WAIT;
            loop {
                let ev = conn.next(deadline.saturating_duration_since(Instant::now()));
                let (rid, packet) = match ev {
                    Ev::Frame(rid, packet) => (rid, packet),
                    other => return Err(format!("{} replies missing, then {other:?}", open.len())),
                };
                if rid == FINAL_PING && packet == Packet::Pong {
                    if open.is_empty() {
                        return Ok(());
                    }
                    return Err(format!("our Ping was answered before {:?}", open));
                }
                let Some(want) = open.remove(&rid) else {
                    return Err(format!("unexpected frame id {rid}: {packet:?}"));
                };
                let ok = match (want, &packet) {
                    (Want::Pong, Packet::Pong) => true,
                    (Want::Code(c), Packet::Error { code, .. }) => *code == c,
                    (Want::AnyOne, Packet::Error { code, .. }) => *code >= 100,
                    (Want::AnyOne, _) => true,
                    _ => false,
                };
                if !ok {
                    return Err(format!("request {rid}: wanted {want:?}, got {packet:?}"));
                }
            }
        }
    }
}

// -------------------------------------------------------------------------------------------------------------
// 1. Hostile bytes
// -------------------------------------------------------------------------------------------------------------

/// Every kind number once, deterministically: each one a client may not send closes its own connection with
/// UNKNOWN_KIND and its request id ([HB-2.4]); all the assigned ones, pipelined on one connection before login,
/// get their documented answers ([HB-7.13]). Returns what went wrong.
fn sweep_kinds(addr: SocketAddr, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    for k in (0x00..=0xFFu8).filter(|k| !is_request_kind(*k)) {
        let rid = 0x0100_0000 + k as u32;
        let result = Conn::connect(addr)
            .map_err(|e| e.to_string())
            .and_then(|mut conn| {
                run_expectation(
                    &mut conn,
                    &frame(k, rid, b""),
                    Expect::Close {
                        code: code::UNKNOWN_KIND,
                        rid,
                    },
                    true,
                )
            });
        if let Err(e) = result {
            failures.push(format!("kind 0x{k:02x}: {e}"));
        }
    }
    let mut bytes = Vec::new();
    let mut wants = Vec::new();
    for (i, k) in request_kinds().into_iter().enumerate() {
        let rid = 500 + i as u32;
        let (request, want) = sample_request(k, &mut rng);
        bytes.extend(encode(&request, rid));
        wants.push((rid, want));
    }
    let result = Conn::connect(addr)
        .map_err(|e| e.to_string())
        .and_then(|mut conn| run_expectation(&mut conn, &bytes, Expect::Replies(wants), true));
    if let Err(e) = result {
        failures.push(format!("every assigned kind before login: {e}"));
    }
    failures
}

/// Runs `rounds` rounds of `inputs` hostile connections each (from `workers` threads, each holding up to
/// `linger_per_worker` big partial frames open until its round ends) against one server, while a pair chats.
fn hostile_bytes(rounds: usize, inputs: usize, workers: usize, linger_per_worker: usize) {
    let _serial = serial();
    raise_nofile();
    let seed = seed();
    println!("hostile_bytes: seed {seed} (HUBBUB_FAULT_SEED={seed} repeats it)");
    let dir = fresh_dir();
    let mut server = start_server(
        dir.path(),
        &[
            "--max-per-ip",
            "1000000",
            "--login-max-failures",
            "1000000",
            "--send-rate",
            "100000",
            "--send-burst",
            "100000",
        ],
    );
    server.register_all(&["alice", "bob", "watcher"]);
    let mut watcher = online(&server, "watcher");
    let pair = Pair::start(&server, "alice", "bob", Duration::from_millis(5));
    sleep(Duration::from_millis(500));
    let baseline = server.rss_kib();
    println!(
        "hostile_bytes: server RSS baseline {:.1} MiB",
        mib(baseline)
    );

    let mut failures = sweep_kinds(server.addr, seed);
    let peak_rss = Arc::new(AtomicUsize::new(baseline as usize));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (Arc::clone(&peak_rss), Arc::clone(&done), server.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Some(kib) = rss_of(pid) {
                    peak.fetch_max(kib as usize, Ordering::SeqCst);
                }
                sleep(Duration::from_millis(50));
            }
        })
    };
    let mut cases: HashMap<&'static str, usize> = HashMap::new();
    let mut connections = 0;
    let mut after_rounds = Vec::new();
    let mut left = 0;
    let per_worker = inputs.div_ceil(workers);
    for round in 0..rounds {
        let started = Instant::now();
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let addr = server.addr;
                let worker = round * workers + w;
                std::thread::spawn(move || {
                    hostile_worker(addr, seed, worker, per_worker, linger_per_worker)
                })
            })
            .collect();
        let mut lingering = Vec::new();
        for h in handles {
            let r = h.join().expect("a hostile worker panicked");
            for (k, v) in r.cases {
                *cases.entry(k).or_default() += v;
            }
            failures.extend(r.failures);
            lingering.extend(r.lingering);
            connections += r.connections;
        }
        let hostile_time = started.elapsed();
        let with_lingering = server.rss_kib();
        let open_now = stat(&mut watcher, "connections");
        drop(lingering);
        // The hostile clients are gone once only the pair and the watcher are left.
        let deadline = Instant::now() + Duration::from_secs(20);
        left = stat(&mut watcher, "connections");
        while left > 3 && Instant::now() < deadline {
            sleep(Duration::from_millis(100));
            left = stat(&mut watcher, "connections");
        }
        sleep(Duration::from_millis(300));
        let after = server.rss_kib();
        after_rounds.push(after);
        println!(
            "hostile_bytes: round {}: {inputs} inputs in {hostile_time:?}; RSS {:.1} MiB with {open_now} connections \
             open, {:.1} MiB after they left ({left} left)",
            round + 1,
            mib(with_lingering),
            mib(after)
        );
    }
    done.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let report = pair.finish();
    server.assert_healthy();

    let mut names: Vec<_> = cases.iter().collect();
    names.sort();
    println!("hostile_bytes: {connections} hostile connections, cases {names:?}");
    println!(
        "hostile_bytes: server RSS baseline {:.1} MiB, peak {:.1} MiB, after each round {:?} MiB",
        mib(baseline),
        mib(peak_rss.load(Ordering::SeqCst) as u64),
        after_rounds
            .iter()
            .map(|k| (mib(*k) * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    println!(
        "hostile_bytes: pair {} round trips, mean {:.2} ms, max {:?}; server log {:?} lines (kept, dropped)",
        report.rounds,
        report.mean_ms(),
        report.max_rtt,
        server.log_lines()
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} hostile inputs were not answered as specified, e.g.:\n{}",
        failures.len(),
        failures.join("\n")
    );
    report.assert_ok("hostile bytes");
    assert_eq!(left, 3, "hostile connections still open on the server");
    for (round, after) in after_rounds.iter().enumerate() {
        assert!(
            *after <= baseline + 20 * MIB,
            "server RSS did not return near its baseline after round {}: {:.1} MiB vs {:.1} MiB before \
             (+20 MiB allowed)",
            round + 1,
            mib(*after),
            mib(baseline)
        );
    }
}

/// Memory held for unfinished frames is given back once their connections close: 600 connections each send
/// 60 KiB of a 64 KiB frame (the server must buffer it, [HB-2.2]) and then go away; the server's RSS must come
/// back near its baseline. It does not: the tails are kept in Vecs of 32–128 KiB, below glibc's mmap threshold,
/// so they come from the main heap, which fragments and is never trimmed.
#[test]
fn partial_frame_memory_is_given_back() {
    let _serial = serial();
    raise_nofile();
    let dir = fresh_dir();
    let mut server = start_server(dir.path(), &["--max-per-ip", "100000"]);
    server.register_all(&["watcher"]);
    let mut watcher = online(&server, "watcher");
    sleep(Duration::from_millis(300));
    let baseline = server.rss_kib();
    let n = 600;
    let mut held = Vec::with_capacity(n);
    let mut partial = raw_header(1, kind::SEND, 1, 65_536);
    partial.extend(std::iter::repeat_n(b'x', 60 * 1024));
    for _ in 0..n {
        let mut c = Conn::connect(server.addr).expect("connect");
        c.send(&partial).unwrap();
        held.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while stat(&mut watcher, "connections") < n as u64 + 1 {
        assert!(
            Instant::now() < deadline,
            "not all connections were admitted"
        );
        sleep(Duration::from_millis(50));
    }
    sleep(Duration::from_millis(500));
    let holding = server.rss_kib();
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stat(&mut watcher, "connections") > 1 {
        assert!(Instant::now() < deadline, "the connections were not closed");
        sleep(Duration::from_millis(50));
    }
    sleep(Duration::from_millis(500));
    let after = server.rss_kib();
    println!(
        "partial frames: server RSS baseline {:.1} MiB, holding {n} x 60 KiB {:.1} MiB, after they closed {:.1} MiB",
        mib(baseline),
        mib(holding),
        mib(after)
    );
    server.assert_healthy();
    assert!(
        holding >= baseline + 30 * MIB,
        "the partial frames were not buffered? {:.1} MiB",
        mib(holding)
    );
    assert!(
        after <= baseline + 20 * MIB,
        "server RSS stayed at {:.1} MiB after the partial frames' connections closed (baseline {:.1} MiB)",
        mib(after),
        mib(baseline)
    );
}

/// [HB-2], [HB-4.1], [HB-6], [HB-7.13]: thousands of hostile inputs over many connections, each answered as
/// specified; a chatting pair is not disturbed; the server does not panic and gives its memory back.
#[test]
fn hostile_bytes_do_not_harm_others() {
    hostile_bytes(3, 3000, 8, 40);
}

/// The same with 3 rounds of 10,000 inputs (about 600 big partial frames, 35 MiB, held at once). It currently
/// fails its RSS check for the reason `partial_frame_memory_is_given_back` isolates.
#[test]
#[ignore = "large variant: cargo test --release --test faults_hostile -- --ignored hostile_bytes_large \
            (fails the RSS check: see partial_frame_memory_is_given_back)"]
fn hostile_bytes_large() {
    hostile_bytes(3, 10_000, 16, 100);
}

// -------------------------------------------------------------------------------------------------------------
// 2. Slowloris
// -------------------------------------------------------------------------------------------------------------

/// One slow connection: when it opened, what it saw, when it closed.
struct Slow {
    stream: TcpStream,
    input: Vec<u8>,
    opened: Instant,
    next_byte: Instant,
    sent: usize,
    frames: Vec<Packet>,
    /// Hello (or the close) has been seen.
    welcomed: bool,
    closed: Option<(Instant, &'static str)>,
}

/// The bytes a slowloris trickles: the header of a Login with a 1000-byte body, then the body. At one byte a
/// second it never completes a frame before the auth timeout.
fn trickle_byte(i: usize) -> u8 {
    let header = raw_header(1, kind::LOGIN, 7, 1000);
    header.get(i).copied().unwrap_or(b'a')
}

/// Reads what arrived, sends the next byte when due. Keeps `open` (connections not yet closed) and `unwelcomed`
/// (connected, Hello not yet read) up to date.
fn poll_slow(s: &mut Slow, now: Instant, open: &AtomicUsize, unwelcomed: &AtomicUsize) {
    if s.closed.is_some() {
        return;
    }
    let mut chunk = [0u8; 4096];
    let mut closed = None;
    loop {
        match s.stream.read(&mut chunk) {
            Ok(0) => {
                closed = Some((now, "eof"));
                break;
            }
            Ok(n) => s.input.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                closed = Some((now, "reset"));
                break;
            }
        }
    }
    while let Ok(Some(f)) = split_frame(&s.input, 1 << 20, is_packet_kind) {
        let used = f.len;
        let packet = Packet::decode(&f.header, f.body).unwrap_or(Packet::Error {
            code: 0,
            text: "undecodable".into(),
        });
        s.frames.push(packet);
        s.input.drain(..used);
    }
    if !s.welcomed && (!s.frames.is_empty() || closed.is_some()) {
        s.welcomed = true;
        unwelcomed.fetch_sub(1, Ordering::SeqCst);
    }
    if closed.is_none() && now >= s.next_byte {
        match s.stream.write(&[trickle_byte(s.sent)]) {
            Ok(_) => s.sent += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => closed = Some((now, "write failed")),
        }
        s.next_byte = now + Duration::from_millis(1000);
    }
    if closed.is_some() {
        s.closed = closed;
        open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connects `count` slow connections and serves them until all are closed (or a deadline passes). Connections
/// are opened no faster than the server greets them (at most 64 waiting for Hello across all threads), so the
/// listen backlog never overflows and every connect is immediate.
fn slow_thread(
    addr: SocketAddr,
    count: usize,
    auth: Duration,
    open: Arc<AtomicUsize>,
    unwelcomed: Arc<AtomicUsize>,
) -> (Vec<Slow>, Vec<String>) {
    let mut slows: Vec<Slow> = Vec::with_capacity(count);
    let mut errors = Vec::new();
    let poll_all = |slows: &mut Vec<Slow>| {
        let now = Instant::now();
        for s in slows.iter_mut() {
            poll_slow(s, now, &open, &unwelcomed);
        }
    };
    let mut last_poll = Instant::now();
    for _ in 0..count {
        let wait_until = Instant::now() + WAIT;
        while unwelcomed.load(Ordering::SeqCst) >= 64 && Instant::now() < wait_until {
            poll_all(&mut slows);
            last_poll = Instant::now();
            sleep(Duration::from_millis(1));
        }
        let t0 = Instant::now();
        match TcpStream::connect_timeout(&addr, WAIT) {
            Ok(stream) => {
                stream.set_nonblocking(true).unwrap();
                let now = Instant::now();
                if now - t0 > Duration::from_millis(500) {
                    errors.push(format!("a paced connect took {:?}", now - t0));
                }
                unwelcomed.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                slows.push(Slow {
                    stream,
                    input: Vec::new(),
                    opened: now,
                    next_byte: now,
                    sent: 0,
                    frames: Vec::new(),
                    welcomed: false,
                    closed: None,
                });
            }
            Err(e) => errors.push(format!("connect: {e}")),
        }
        // Keep the earlier ones trickling while the rest connect.
        if last_poll.elapsed() >= Duration::from_millis(20) {
            poll_all(&mut slows);
            last_poll = Instant::now();
        }
    }
    let deadline = Instant::now() + auth + Duration::from_secs(20);
    loop {
        poll_all(&mut slows);
        if slows.iter().all(|s| s.closed.is_some()) || Instant::now() >= deadline {
            break;
        }
        sleep(Duration::from_millis(20));
    }
    (slows, errors)
}

fn slowloris(n: usize, threads: usize) {
    let _serial = serial();
    let nofile = raise_nofile();
    assert!(
        nofile as usize > n + 200,
        "the open-file limit ({nofile}) is too low for {n} connections"
    );
    let dir = fresh_dir();
    let max_conn = (n + 500).to_string();
    let mut server = start_server(
        dir.path(),
        &[
            "--auth-timeout",
            "2s",
            "--max-per-ip",
            "1000000",
            "--max-connections",
            &max_conn,
        ],
    );
    let auth = Duration::from_secs(2);
    let baseline = server.rss_kib();
    let open = Arc::new(AtomicUsize::new(0));
    let unwelcomed = Arc::new(AtomicUsize::new(0));
    let stop_normal = Arc::new(AtomicBool::new(false));
    // A normal client connects, registers and logs in again and again while the slow ones are there.
    let normal = {
        let (addr, open, stop) = (server.addr, Arc::clone(&open), Arc::clone(&stop_normal));
        std::thread::spawn(move || {
            let mut rounds: Vec<(usize, Duration)> = Vec::new();
            let mut errors = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let name = format!("normal{i}");
                let t0 = Instant::now();
                let slow_open = open.load(Ordering::SeqCst);
                let result = (|| -> Result<(), ClientError> {
                    let mut c = Client::connect(addr)?;
                    c.register(&name, PASSWORD)?;
                    c.login(&name, PASSWORD, "normal", 0)?;
                    c.ping()
                })();
                match result {
                    Ok(()) => rounds.push((slow_open, t0.elapsed())),
                    Err(e) => errors.push(format!("{name}: {e}")),
                }
                sleep(Duration::from_millis(200));
            }
            (rounds, errors)
        })
    };
    let started = Instant::now();
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (addr, open) = (server.addr, Arc::clone(&open));
            let count = per.min(n - (t * per).min(n));
            let unwelcomed = Arc::clone(&unwelcomed);
            std::thread::spawn(move || slow_thread(addr, count, auth, open, unwelcomed))
        })
        .collect();
    // The peak: sample while they are open.
    let mut peak_rss = baseline;
    let mut peak_open = 0;
    let mut peak_fds = 0;
    while handles.iter().any(|h| !h.is_finished()) {
        peak_rss = peak_rss.max(server.rss_kib());
        peak_open = peak_open.max(open.load(Ordering::SeqCst));
        peak_fds = peak_fds.max(server.open_fds());
        sleep(Duration::from_millis(100));
    }
    let mut slows = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        let (s, e) = h.join().expect("a slowloris thread panicked");
        slows.extend(s);
        errors.extend(e);
    }
    stop_normal.store(true, Ordering::SeqCst);
    let (rounds, normal_errors) = normal.join().expect("the normal client panicked");
    let elapsed = started.elapsed();
    sleep(Duration::from_millis(300));
    let after = server.rss_kib();
    server.assert_healthy();

    let mut lifetimes: Vec<Duration> = Vec::new();
    let mut with_auth_timeout = 0;
    let mut bad = Vec::new();
    for (i, s) in slows.iter().enumerate() {
        let Some((at, how)) = s.closed else {
            bad.push(format!(
                "slow {i}: still open after {:?}",
                s.opened.elapsed()
            ));
            continue;
        };
        let lived = at.duration_since(s.opened);
        lifetimes.push(lived);
        // Hello, then at most an AUTH_TIMEOUT Error (request id 0), then the close.
        match s.frames.as_slice() {
            [Packet::Hello { .. }] => {}
            [Packet::Hello { .. }, Packet::Error { code, .. }] if *code == code::AUTH_TIMEOUT => {
                with_auth_timeout += 1
            }
            other => bad.push(format!("slow {i} ({how}): frames {other:?}")),
        }
        if lived < auth - Duration::from_millis(500) {
            bad.push(format!(
                "slow {i}: closed after {lived:?}, before the auth timeout"
            ));
        }
        if lived > auth + Duration::from_secs(8) {
            bad.push(format!("slow {i}: closed only after {lived:?}"));
        }
    }
    lifetimes.sort();
    let pct = |p: usize| {
        lifetimes
            .get(lifetimes.len() * p / 100)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "slowloris: {} connections ({} errors) in {elapsed:?}; at most {peak_open} open at once, {peak_fds} server fds",
        slows.len(),
        errors.len()
    );
    println!(
        "slowloris: lifetime min {:?}, median {:?}, p99 {:?}, max {:?}; {with_auth_timeout} saw AUTH_TIMEOUT before EOF",
        lifetimes.first().copied().unwrap_or_default(),
        pct(50),
        pct(99),
        lifetimes.last().copied().unwrap_or_default()
    );
    let max_login = rounds.iter().map(|r| r.1).max().unwrap_or_default();
    println!(
        "slowloris: normal client logged in {} times (max {:?}; {:?} slow connections open at the busiest); \
         server RSS baseline {:.1} MiB, peak {:.1} MiB, after {:.1} MiB",
        rounds.len(),
        max_login,
        rounds.iter().map(|r| r.0).max(),
        mib(baseline),
        mib(peak_rss),
        mib(after)
    );
    assert!(errors.is_empty(), "slow connections failed: {errors:?}");
    assert_eq!(slows.len(), n);
    assert!(
        bad.is_empty(),
        "{} slow connections misbehaved, e.g.:\n{}",
        bad.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        normal_errors.is_empty(),
        "the normal client failed: {normal_errors:?}"
    );
    assert!(
        rounds.iter().any(|r| r.0 >= n / 4),
        "the normal client never logged in while many slow connections were open: {rounds:?}"
    );
    assert!(
        max_login < Duration::from_secs(5),
        "a normal connect + register + login took {max_login:?}"
    );
}

/// [HB-7.10]: 2,000 connections trickle a byte a second and never log in; the auth timeout closes all of them
/// while a normal client still connects and logs in.
#[test]
fn slowloris_is_closed_by_the_auth_timeout() {
    slowloris(2000, 4);
}

/// The same with 9,000 slow connections (this process and the server each hold 9,000 sockets).
#[test]
#[ignore = "large variant: cargo test --release --test faults_hostile -- --ignored slowloris_large"]
fn slowloris_large() {
    slowloris(9000, 8);
}

/// A storm of connections (clients reconnecting after a restart, say) is admitted without SYNs being dropped: no
/// connect waits for a SYN retransmission (1 s on Linux). Exposes the listen backlog of 128 that
/// `mio::net::TcpListener::bind` uses: one loop thread accepting (and greeting) each connection is slower than
/// eight clients connecting, the kernel's accept queue overflows and connects stall for 1 s, 3 s, 7 s.
#[test]
fn connect_storm_is_not_dropped() {
    let _serial = serial();
    raise_nofile();
    let dir = fresh_dir();
    let mut server = start_server(
        dir.path(),
        &["--max-per-ip", "1000000", "--auth-timeout", "60s"],
    );
    let (threads, per) = (8, 250);
    let overflows_before = listen_overflows();
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut held = Vec::with_capacity(per);
                let mut slowest = Duration::ZERO;
                let mut slow = 0;
                for _ in 0..per {
                    let t0 = Instant::now();
                    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
                        .expect("connect");
                    let took = t0.elapsed();
                    slowest = slowest.max(took);
                    slow += (took >= Duration::from_millis(900)) as usize;
                    held.push(stream);
                }
                (held, slowest, slow)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut slow = 0;
    for h in handles {
        let (streams, s, n) = h.join().expect("a connecting thread panicked");
        held.extend(streams);
        slowest = slowest.max(s);
        slow += n;
    }
    let elapsed = started.elapsed();
    let overflows = listen_overflows().saturating_sub(overflows_before);
    println!(
        "connect storm: {} connects in {elapsed:?}; slowest {slowest:?}; {slow} took 900 ms or more; \
         ListenOverflows +{overflows} (system-wide)",
        held.len()
    );
    // Every one of them is greeted.
    for (i, stream) in held.into_iter().enumerate() {
        let mut c = Conn::new(stream);
        if let Err(e) = c.expect_hello() {
            panic!("connection {i}: {e}");
        }
    }
    server.assert_healthy();
    assert_eq!(
        slow,
        0,
        "{slow} of {} connects waited for a SYN retransmission (slowest {slowest:?})",
        threads * per
    );
}

/// ListenOverflows from /proc/net/netstat (system-wide; 0 if unreadable).
fn listen_overflows() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/netstat") else {
        return 0;
    };
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        if let [names, values] = pair {
            if !names.starts_with("TcpExt:") {
                continue;
            }
            let names = names.split_whitespace();
            let values = values.split_whitespace();
            for (n, v) in names.zip(values) {
                if n == "ListenOverflows" {
                    return v.parse().unwrap_or(0);
                }
            }
        }
    }
    0
}

// -------------------------------------------------------------------------------------------------------------
// 3. Floods
// -------------------------------------------------------------------------------------------------------------

/// [HB-5.8] a Send flood is rate-limited (RATE_LIMITED past the burst, the sustained rate still served);
/// [HB-5.6](b) a Ping flood that never reads its Pongs stops being read at the high-water mark, nothing is
/// lost, and another pair's messages keep arriving promptly throughout.
#[test]
fn floods_are_rate_limited_and_parked() {
    let _serial = serial();
    raise_nofile();
    let dir = fresh_dir();
    let (rate, burst, high_water) = (20u64, 20u64, 65_536u64);
    let mut server = start_server(
        dir.path(),
        &[
            "--send-rate",
            "20",
            "--send-burst",
            "20",
            "--out-high-water",
            "65536",
            "--out-low-water",
            "16384",
        ],
    );
    let hard_limit = 2 * high_water + 50 * (8192 + 128);
    server.register_all(&["alice", "bob", "flooder", "sink", "pinger", "watcher"]);
    let mut watcher = online(&server, "watcher");
    let pair = Pair::start(&server, "alice", "bob", Duration::from_millis(100));
    let baseline = server.rss_kib();

    // --- Send flood: as fast as the socket takes it, for 3 s; a thread writes, this one reads the replies.
    let mut flooder = Conn::login(server.addr, None, "flooder");
    let mut writer = flooder.stream.try_clone().unwrap();
    let flood_for = Duration::from_secs(3);
    let (done_tx, done_rx) = mpsc::channel();
    let sender = std::thread::spawn(move || {
        let started = Instant::now();
        let mut rid = 0u32;
        let mut result = Ok(());
        while started.elapsed() < flood_for {
            let mut batch = Vec::new();
            for _ in 0..20 {
                rid += 1;
                Request::Send {
                    recipient: "sink".into(),
                    client_msg_id: rid as u64,
                    text: format!("flood {rid}"),
                }
                .encode(rid, &mut batch);
            }
            if let Err(e) = writer.write_all(&batch) {
                result = Err(e.to_string());
                break;
            }
            sleep(Duration::from_millis(2));
        }
        let _ = done_tx.send((rid, started.elapsed(), result));
    });
    let mut replies: HashMap<u32, Packet> = HashMap::new();
    let mut sent = None;
    let deadline = Instant::now() + flood_for + Duration::from_secs(30);
    loop {
        if sent.is_none() {
            sent = done_rx.try_recv().ok();
        }
        if let Some((n, _, _)) = &sent {
            if replies.len() as u32 >= *n {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "flood replies missing: {} of {:?}",
            replies.len(),
            sent.as_ref().map(|s| s.0)
        );
        match flooder.next(Duration::from_millis(200)) {
            Ev::Frame(0, _) | Ev::Timeout => {}
            Ev::Frame(rid, p) => {
                assert!(
                    replies.insert(rid, p).is_none(),
                    "two replies to flood request {rid}"
                );
            }
            other => panic!("the flooder's connection failed: {other:?}"),
        }
    }
    sender.join().expect("the flood writer panicked");
    let (n_sent, flood_time, result) = sent.unwrap();
    result.expect("flood writes");
    let mut acks = 0u64;
    let mut limited = 0u64;
    let mut first_limited = u32::MAX;
    for (rid, p) in &replies {
        match p {
            Packet::Ack { .. } => acks += 1,
            Packet::Error { code, .. } if *code == code::RATE_LIMITED => {
                limited += 1;
                first_limited = first_limited.min(*rid);
            }
            other => panic!("flood request {rid} got {other:?}"),
        }
    }
    let secs = flood_time.as_secs_f64();
    println!(
        "floods: {n_sent} Sends in {flood_time:?}: {acks} Acks, {limited} RATE_LIMITED (first at request {first_limited}); \
         allowed burst {burst} + {rate}/s"
    );
    for rid in 1..=burst as u32 {
        assert!(
            matches!(replies.get(&rid), Some(Packet::Ack { .. })),
            "Send {rid} is within the burst but got {:?}",
            replies.get(&rid)
        );
    }
    assert!(
        limited > 0,
        "a flood of {n_sent} Sends was never rate-limited"
    );
    assert!(
        acks as f64 <= burst as f64 + rate as f64 * (secs + 1.0),
        "{acks} Acks in {secs:.1} s is above burst {burst} + {rate}/s"
    );
    assert!(
        acks as f64 >= burst as f64 + rate as f64 * secs / 2.0,
        "only {acks} Acks in {secs:.1} s: the sustained rate {rate}/s was not served"
    );

    // --- Ping flood: Pings written and their Pongs never read, through small socket buffers.
    let stream = socket_to(server.addr, None, Some(4096), Some(4096)).unwrap();
    let pinger = Conn::login(server.addr, Some(stream), "pinger");
    let mut w = pinger.stream.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let first_rid = 100u32;
    let mut next_rid = first_rid;
    let mut chunk: Vec<u8> = Vec::new();
    let mut off = 0;
    let mut written = 0u64;
    let mut last_progress = Instant::now();
    let ping_started = Instant::now();
    loop {
        if off == chunk.len() {
            chunk.clear();
            off = 0;
            for _ in 0..1024 {
                chunk.extend(frame(kind::PING, next_rid, b""));
                next_rid += 1;
            }
        }
        match w.write(&chunk[off..]) {
            Ok(n) => {
                off += n;
                written += n as u64;
                last_progress = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if last_progress.elapsed() >= Duration::from_secs(2) {
                    break;
                }
            }
            Err(e) => panic!("the ping flood's write failed: {e}"),
        }
        assert!(
            written < 512 * 1024 * 1024,
            "the server read 512 MiB of Pings from a client that never reads its Pongs"
        );
    }
    let stall_after = ping_started.elapsed();
    // Parked now: the pair goes on meanwhile.
    let s1 = stats(&mut watcher);
    let rss_parked = server.rss_kib();
    sleep(Duration::from_secs(2));
    let s2 = stats(&mut watcher);
    println!(
        "floods: the ping flood stopped being read after {written} bytes ({} Pings) in {stall_after:?}; \
         sessions_parked {} / {}, largest_output_bytes {} / {} (high water {high_water}, hard limit {hard_limit}); \
         server RSS baseline {:.1} MiB, parked {:.1} MiB",
        written / 12,
        s1["sessions_parked"],
        s2["sessions_parked"],
        s1["largest_output_bytes"],
        s2["largest_output_bytes"],
        mib(baseline),
        mib(rss_parked)
    );
    for s in [&s1, &s2] {
        assert!(s["sessions_parked"] >= 1, "the pinger is not parked: {s:?}");
        assert!(
            s["largest_output_bytes"] >= high_water / 2 && s["largest_output_bytes"] <= hard_limit,
            "the pinger's output is {} bytes (high water {high_water}, hard limit {hard_limit})",
            s["largest_output_bytes"]
        );
    }
    assert!(
        rss_parked <= baseline + 50 * MIB,
        "server RSS {:.1} MiB with a parked ping flood (baseline {:.1} MiB)",
        mib(rss_parked),
        mib(baseline)
    );
    // Now it reads: every Ping it sent gets its Pong, in order, exactly once.
    let partial = (written % 12) as usize;
    let last_rid = first_rid + (written / 12) as u32 - 1 + (partial > 0) as u32;
    let reader = std::thread::spawn(move || {
        let mut pinger = pinger;
        let mut expect = first_rid;
        let deadline = Instant::now() + Duration::from_secs(60);
        while expect <= last_rid {
            match pinger.next(deadline.saturating_duration_since(Instant::now())) {
                Ev::Frame(0, _) => {}
                Ev::Frame(rid, Packet::Pong) if rid == expect => expect += 1,
                other => return Err(format!("waiting for Pong {expect}: {other:?}")),
            }
        }
        Ok(expect - first_rid)
    });
    if partial > 0 {
        w.set_write_timeout(Some(WAIT)).unwrap();
        w.write_all(&chunk[off..off + (12 - partial)])
            .expect("finish the last Ping");
    }
    let pongs = reader
        .join()
        .expect("the Pong reader panicked")
        .unwrap_or_else(|e| panic!("the ping flood's Pongs: {e}"));
    println!("floods: the pinger read back {pongs} Pongs, in order");

    let report = pair.finish();
    println!(
        "floods: pair {} round trips, mean {:.2} ms, max {:?}",
        report.rounds,
        report.mean_ms(),
        report.max_rtt
    );
    report.assert_ok("floods");
    server.assert_healthy();
}

// -------------------------------------------------------------------------------------------------------------
// 4. Connection limits
// -------------------------------------------------------------------------------------------------------------

/// Connects (from `local` if given) and reads the first frame: true for Hello; for a refusal, checks that it is
/// exactly `refusal` with request id 0 and that the connection then closes.
fn admitted(addr: SocketAddr, local: Option<Ipv4Addr>, refusal: u16) -> (bool, Option<Conn>) {
    let stream = socket_to(addr, local, None, None).expect("connect");
    let mut conn = Conn::new(stream);
    match conn.next(WAIT) {
        Ev::Frame(0, Packet::Hello { .. }) => (true, Some(conn)),
        Ev::Frame(0, Packet::Error { code, .. }) if code == refusal => {
            match conn.next(WAIT) {
                Ev::Eof | Ev::Reset => {}
                other => panic!("a refused connection was not closed: {other:?}"),
            }
            (false, None)
        }
        other => panic!("expected Hello or Error {refusal}, got {other:?}"),
    }
}

/// Retries for a while until a connection is admitted (the server notices closed ones within a turn or two).
fn admitted_soon(addr: SocketAddr, local: Option<Ipv4Addr>, refusal: u16) -> Conn {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let (true, Some(conn)) = admitted(addr, local, refusal) {
            return conn;
        }
        assert!(
            Instant::now() < deadline,
            "no connection admitted 5 s after others closed"
        );
        sleep(Duration::from_millis(50));
    }
}

/// [HB-7.1], [HB-8]: at `--max-connections 50` the 51st connection gets SERVER_FULL (5, request id 0) instead
/// of Hello and is closed; once some close, new ones are admitted again.
#[test]
fn connection_limit_refuses_then_recovers() {
    let _serial = serial();
    let dir = fresh_dir();
    let mut server = start_server(
        dir.path(),
        &["--max-connections", "50", "--max-per-ip", "1000"],
    );
    let mut held: Vec<Conn> = (0..50)
        .map(|i| match admitted(server.addr, None, code::SERVER_FULL) {
            (true, Some(c)) => c,
            _ => panic!("connection {} of 50 was refused", i + 1),
        })
        .collect();
    for _ in 0..3 {
        assert!(
            !admitted(server.addr, None, code::SERVER_FULL).0,
            "a 51st connection was admitted"
        );
    }
    // The held ones are unharmed.
    for (i, c) in held.iter_mut().enumerate().take(5) {
        c.send(&frame(kind::PING, 9, b"")).unwrap();
        assert!(
            matches!(c.wait_reply(9), Ok(Packet::Pong)),
            "held connection {i} lost its Pong"
        );
    }
    held.truncate(45);
    for _ in 0..5 {
        held.push(admitted_soon(server.addr, None, code::SERVER_FULL));
    }
    assert!(
        !admitted(server.addr, None, code::SERVER_FULL).0,
        "full again, yet admitted"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if admitted(server.addr, None, code::SERVER_FULL).0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server stayed full after all closed"
        );
        sleep(Duration::from_millis(50));
    }
    let _ = admitted_soon(server.addr, None, code::SERVER_FULL);
    server.assert_healthy();
}

/// [HB-8]: at `--max-per-ip 10` the 11th connection from 127.0.0.1 gets TOO_MANY_FROM_ADDRESS (6, request id 0)
/// and is closed, while 127.0.0.2 is admitted (and can log in); a freed place is reused.
#[test]
fn per_address_limit_refuses_the_eleventh() {
    let _serial = serial();
    let dir = fresh_dir();
    let mut server = start_server(dir.path(), &["--max-per-ip", "10"]);
    server.register_all(&["other"]);
    let one = Ipv4Addr::new(127, 0, 0, 1);
    let two = Ipv4Addr::new(127, 0, 0, 2);
    let too_many = code::TOO_MANY_FROM_ADDRESS;
    // register_all's connection may still be closing: wait until ten fit.
    let mut from_one: Vec<Conn> = (0..10)
        .map(|_| admitted_soon(server.addr, Some(one), too_many))
        .collect();
    for _ in 0..3 {
        assert!(
            !admitted(server.addr, Some(one), too_many).0,
            "an 11th connection from 127.0.0.1 was admitted"
        );
    }
    let (ok, conn) = admitted(server.addr, Some(two), too_many);
    assert!(ok, "127.0.0.2 was refused while 127.0.0.1 is at its limit");
    drop(conn);
    let stream = socket_to(server.addr, Some(two), None, None).unwrap();
    let mut c = Client::from_stream(stream).expect("Hello for 127.0.0.2");
    c.login("other", PASSWORD, "second address", 0)
        .expect("login from 127.0.0.2");
    c.ping().unwrap();
    // The ones from 127.0.0.1 are unharmed; a freed place is taken again.
    from_one[0].send(&frame(kind::PING, 5, b"")).unwrap();
    assert!(matches!(from_one[0].wait_reply(5), Ok(Packet::Pong)));
    from_one.pop();
    from_one.push(admitted_soon(server.addr, Some(one), too_many));
    assert!(!admitted(server.addr, Some(one), too_many).0);
    drop(from_one);
    drop(c);
    let _ = admitted_soon(server.addr, Some(one), too_many);
    server.assert_healthy();
}

// -------------------------------------------------------------------------------------------------------------
// 5. Slow readers
// -------------------------------------------------------------------------------------------------------------

fn room_text(i: usize, len: usize) -> String {
    let mut t = format!("message {i:05} ");
    while t.len() < len {
        t.push(char::from(b'a' + (t.len() % 26) as u8));
    }
    t
}

fn slow_readers(readers: usize, messages: usize) {
    let _serial = serial();
    raise_nofile();
    let dir = fresh_dir();
    let mut server = start_server(
        dir.path(),
        &[
            "--out-high-water",
            "65536",
            "--out-low-water",
            "16384",
            "--idle-timeout",
            "600s",
            "--send-rate",
            "1000000",
            "--send-burst",
            "1000000",
            "--max-per-ip",
            "100000",
        ],
    );
    let names: Vec<String> = (0..readers).map(|i| format!("reader{i:03}")).collect();
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push("poster");
    all.push("watcher");
    server.register_all(&all);
    let mut watcher = online(&server, "watcher");
    let mut poster = online(&server, "poster");
    poster.create_room("busy", "slow readers").unwrap();
    let mut clients: Vec<Client> = names
        .iter()
        .map(|name| {
            let stream = socket_with(server.addr, None, Some(8192), None, Some(1000)).unwrap();
            let mut c = Client::from_stream(stream).unwrap();
            c.login(name, PASSWORD, "slow", 0).unwrap();
            drain_until_caught_up(&mut c);
            c.join_room("busy").unwrap();
            c
        })
        .collect();
    for c in clients.iter_mut() {
        c.ping().unwrap();
    }
    sleep(Duration::from_millis(300));
    let baseline = server.rss_kib();

    // They stop reading; the poster posts.
    let started = Instant::now();
    let mut by_id: HashMap<u64, usize> = HashMap::new();
    let mut ids = Vec::with_capacity(messages);
    let mut in_flight: HashMap<u32, usize> = HashMap::new();
    let mut next = 0;
    let mut peak = baseline;
    while ids.len() < messages {
        while next < messages && in_flight.len() < 64 {
            let rid = poster
                .send_request(&Request::SendRoom {
                    room: "busy".into(),
                    client_msg_id: next as u64 + 1,
                    text: room_text(next, 1024),
                })
                .unwrap();
            in_flight.insert(rid, next);
            next += 1;
        }
        let (rid, packet) = poster.next_reply(WAIT).expect("a SendRoom reply");
        let i = in_flight
            .remove(&rid)
            .expect("a reply to a SendRoom in flight");
        match packet {
            Packet::Ack { message_id, .. } => {
                by_id.insert(message_id, i);
                ids.push(message_id);
            }
            other => panic!("SendRoom {i}: {other:?}"),
        }
        if ids.len() % 100 == 0 {
            peak = peak.max(server.rss_kib());
        }
    }
    let post_time = started.elapsed();
    for _ in 0..10 {
        peak = peak.max(server.rss_kib());
        sleep(Duration::from_millis(100));
    }
    ids.sort_unstable();
    let last_id = *ids.last().unwrap();
    let s = stats(&mut watcher);
    let bound = baseline + 100 * MIB;
    println!(
        "slow_readers: {readers} readers stopped, {messages} x 1 KiB posted in {post_time:?}; server RSS baseline {:.1} MiB, \
         peak {:.1} MiB (bound {:.1} MiB); feed_fallbacks {}, sessions_parked {}, largest_output_bytes {}",
        mib(baseline),
        mib(peak),
        mib(bound),
        s["feed_fallbacks"],
        s["sessions_parked"],
        s["largest_output_bytes"]
    );
    assert!(
        peak <= bound,
        "server RSS {:.1} MiB with {readers} stopped readers (baseline {:.1} MiB)",
        mib(peak),
        mib(baseline)
    );
    assert_eq!(
        s["connections"],
        readers as u64 + 2,
        "a stopped reader was closed"
    );

    // They read again: every message, in order, exactly once, then CaughtUp.
    let resumed = Instant::now();
    let expected = Arc::new(by_id);
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(r, mut c)| {
            let expected = Arc::clone(&expected);
            std::thread::spawn(move || -> Result<usize, String> {
                let mut last = 0u64;
                let mut got = 0usize;
                let mut mid_caught_up = 0;
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match c.next_push(left) {
                        Ok(Packet::RoomDeliver(m)) => {
                            let Some(&i) = expected.get(&m.id) else {
                                return Err(format!("reader {r}: unknown message {}", m.id));
                            };
                            if m.id <= last {
                                return Err(format!("reader {r}: id {} after {last}", m.id));
                            }
                            if m.text != room_text(i, 1024)
                                || m.room != "busy"
                                || m.sender != "poster"
                            {
                                return Err(format!("reader {r}: message {} altered", m.id));
                            }
                            last = m.id;
                            got += 1;
                        }
                        Ok(Packet::CaughtUp { cursor }) if got == expected.len() => {
                            return if cursor == last {
                                Ok(mid_caught_up)
                            } else {
                                Err(format!("reader {r}: CaughtUp({cursor}) after {last}"))
                            };
                        }
                        Ok(Packet::CaughtUp { .. }) => mid_caught_up += 1,
                        Ok(Packet::RoomEvent { .. }) => {}
                        Ok(other) => return Err(format!("reader {r}: unexpected {other:?}")),
                        Err(e) => {
                            return Err(format!(
                                "reader {r}: {e} after {got} of {} messages (last id {last})",
                                expected.len()
                            ))
                        }
                    }
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut mid = 0;
    for h in handles {
        match h.join().expect("a reader panicked") {
            Ok(n) => mid += n,
            Err(e) => failures.push(e),
        }
    }
    println!(
        "slow_readers: all {readers} read {messages} messages (last id {last_id}) in {:?}; {mid} CaughtUp before the end; \
         server RSS now {:.1} MiB",
        resumed.elapsed(),
        mib(server.rss_kib())
    );
    assert!(
        failures.is_empty(),
        "{} readers failed: {failures:?}",
        failures.len()
    );
    server.assert_healthy();
}

/// [HB-5.6]: 100 sessions in a busy room stop reading while 2,000 messages of 1 KiB are posted; the server's
/// memory stays bounded, then each reader gets every message in order, exactly once, then CaughtUp.
#[test]
fn slow_readers_are_bounded_and_catch_up() {
    slow_readers(100, 2000);
}

/// The same with 400 readers and 5,000 messages.
#[test]
#[ignore = "large variant: cargo test --release --test faults_hostile -- --ignored slow_readers_large"]
fn slow_readers_large() {
    slow_readers(400, 5000);
}

// -------------------------------------------------------------------------------------------------------------
// 6. Injection
// -------------------------------------------------------------------------------------------------------------

/// Message texts full of SQL metacharacters, NUL, control characters, bidi marks, combining characters and
/// emoji, some exactly `max_text` bytes long.
fn hostile_texts(max_text: usize) -> Vec<String> {
    let mut texts: Vec<String> = [
        "'; DROP TABLE users; --",
        "\" OR 1=1 --",
        "' OR '1'='1' /*",
        "Robert'); DROP TABLE messages;--",
        "%",
        "_",
        "%_%",
        "100% _sure_ LIKE '%a%' ESCAPE '\\'",
        "\\",
        "\\\\'\\\"\\0\\n",
        "C:\\temp\\new",
        "nul\0inside",
        "\0",
        "\0\0\0trailing\0",
        "ctrl \x01\x02\x07\x08\x1b[31mred\x1b[0m \x7f",
        "line1\r\nline2\n\tTab\u{85}",
        "\u{202E}rtl override\u{202C} \u{200F}mark \u{061C}",
        "e\u{0301}\u{0302}\u{0303} Z\u{0351}\u{0352}\u{0353}\u{0354}a\u{0308}",
        "😀 👩\u{200D}👩\u{200D}👧\u{200D}👦 🏳\u{FE0F}\u{200D}🌈 🇩🇪",
        "\u{FEFF}bom \u{200B}zwsp \u{FFFD}",
        "$1 ?1 :name @p ?",
        "\u{10FFFF}\u{E000}\u{FFFF}",
        " ",
        "a",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    texts.push("😀".repeat(max_text / 4));
    texts.push(format!("{}'\"", "é".repeat(max_text / 2 - 1)));
    texts.push(format!("{}ab", "\u{202E}".repeat((max_text - 2) / 3)));
    let mut mixed = String::new();
    let parts = ["'; --", "\0", "e\u{301}", "😀", "\u{202E}", "%_\\"];
    let mut i = 0;
    while mixed.len() + parts[i % parts.len()].len() <= max_text {
        mixed.push_str(parts[i % parts.len()]);
        i += 1;
    }
    while mixed.len() < max_text {
        mixed.push('x');
    }
    texts.push(mixed);
    for t in &texts[texts.len() - 4..] {
        assert_eq!(t.len(), max_text);
    }
    texts
}

fn too_long_texts(max_text: usize) -> Vec<String> {
    let texts = vec![
        format!("{}a", "😀".repeat(max_text / 4)),
        "é".repeat(max_text / 2 + 1),
        "'".repeat(max_text + 1),
        format!("{}\0\0\0", "\u{202E}".repeat(max_text / 3)),
    ];
    for t in &texts {
        assert!(t.len() > max_text);
    }
    texts
}

/// A message from the feed: (id, room or "", sender, recipient, text).
type FeedItem = (u64, String, String, String, String);

fn next_feed(c: &mut Client) -> FeedItem {
    let deadline = Instant::now() + WAIT;
    loop {
        match c.next_push(deadline.saturating_duration_since(Instant::now())) {
            Ok(Packet::Deliver(m)) => return (m.id, String::new(), m.sender, m.recipient, m.text),
            Ok(Packet::RoomDeliver(m)) => return (m.id, m.room.clone(), m.sender, m.room, m.text),
            Ok(Packet::Error { code, text }) => {
                panic!("Error {code} while waiting for a message: {text}")
            }
            Ok(_) => {}
            Err(e) => panic!("no message: {e}"),
        }
    }
}

fn all_history(c: &mut Client, peer: &str, room: bool) -> Vec<Message> {
    let mut out = Vec::new();
    let mut before = 0;
    loop {
        let (page, more) = if room {
            c.room_history(peer, before, 7)
        } else {
            c.history(peer, before, 7)
        }
        .unwrap_or_else(|e| panic!("history of {peer}: {e}"));
        if let Some(m) = page.last() {
            before = m.id;
        }
        out.extend(page);
        if !more {
            out.reverse();
            return out;
        }
    }
}

/// [HB-1.8], [HB-5.8], [HB-10.1], [HB-4.4]: names, room names, topics, devices, passwords and texts full of SQL
/// metacharacters and odd Unicode are stored and returned byte for byte, or refused with the documented code;
/// afterwards every user still logs in and the database passes `PRAGMA integrity_check`.
#[test]
fn injection_is_stored_byte_for_byte_or_refused() {
    let _serial = serial();
    let dir = fresh_dir();
    let flags = [
        "--login-max-failures",
        "1000000",
        "--send-rate",
        "1000000",
        "--send-burst",
        "1000000",
    ];
    let mut server = start_server(dir.path(), &flags);
    let max_text = 8192;
    // Valid names that hold SQL LIKE wildcards or punctuation, with hostile passwords.
    let accounts: [(&str, &str); 7] = [
        ("a_b", "'; DROP TABLE users; --"),
        ("axb", "\" OR 1=1 --"),
        ("a.b", "nul\0in\0password"),
        ("a-b", "%_\\%\\_ \\\\ 100%"),
        ("___", "e\u{301}\u{302} 😀 \u{202E}rtl"),
        ("...", "\x01\x02\x1b[0m ctrl pw"),
        ("---", "SELECT * FROM users; --"),
    ];
    let mut reg = server.connect();
    for (name, pw) in accounts {
        reg.register(name, pw)
            .unwrap_or_else(|e| panic!("register {name:?}: {e}"));
    }
    assert_eq!(
        code_of(reg.register("A_B", "another password")),
        code::USERNAME_TAKEN
    );
    assert_eq!(
        code_of(reg.register("AXB", "another password")),
        code::USERNAME_TAKEN
    );
    for bad in BAD_NAMES {
        assert_eq!(
            code_of(reg.register(bad, PASSWORD)),
            code::INVALID_USERNAME,
            "Register {bad:?}"
        );
    }
    let wrong = [
        ("a_b", "' OR '1'='1"),
        ("a_b", "' OR ''='"),
        ("a_b", "\" OR 1=1 --"),
        ("a_b", "'; DROP TABLE users; --\0"),
        ("a_b", "'; drop table users; --"),
        ("a_b' --", "'; DROP TABLE users; --"),
        ("a%b", "'; DROP TABLE users; --"),
        ("%", "%"),
        ("_", "_"),
        ("a.b", "nul"),
        ("' OR 1=1 --", "x"),
    ];
    for (name, pw) in wrong
        .iter()
        .copied()
        .chain(BAD_NAMES.iter().map(|n| (*n, PASSWORD)))
    {
        assert_eq!(
            code_of(reg.login(name, pw, "d", 0)),
            code::BAD_CREDENTIALS,
            "Login {name:?} / {pw:?}"
        );
    }
    drop(reg);

    // Devices.
    let dev_a = "'; DROP TABLE tokens; --";
    let mut a = server.connect();
    let info_a = a.login("A_B", accounts[0].1, dev_a, 0).expect("login a_b");
    assert_eq!(info_a.username, "a_b");
    drain_until_caught_up(&mut a);
    let tokens = a.list_tokens().unwrap();
    assert!(
        tokens.iter().any(|t| t.device == dev_a && t.current),
        "device name altered: {tokens:?}"
    );
    let mut d = server.connect();
    for bad_device in ["tab\there", "nul\0dev", &format!("{}a", "é".repeat(32))] {
        assert_eq!(
            code_of(d.login("a_b", accounts[0].1, bad_device, 0)),
            code::INVALID_DEVICE,
            "device {bad_device:?}"
        );
    }
    let long_device = "é".repeat(32);
    d.login("a_b", accounts[0].1, &long_device, 0)
        .expect("a 64-byte device name");
    assert!(d
        .list_tokens()
        .unwrap()
        .iter()
        .any(|t| t.device == long_device));
    drop(d);
    let mut b = server.connect();
    let info_b = b
        .login("axb", accounts[1].1, "\" OR 1=1 😀 e\u{301}", 0)
        .expect("login axb");
    assert_ne!(info_a.user_id, info_b.user_id);
    drain_until_caught_up(&mut b);
    let mut c = online_with(&server, "a.b", accounts[2].1);

    // Names that break the rules, as peers and rooms.
    let mut cid = 0u64;
    for bad in BAD_NAMES {
        cid += 1;
        assert_eq!(
            code_of(a.send_message(bad, cid, "x")),
            code::UNKNOWN_RECIPIENT,
            "Send to {bad:?}"
        );
        assert_eq!(
            code_of(a.history(bad, 0, 10)),
            code::UNKNOWN_RECIPIENT,
            "History {bad:?}"
        );
        assert_eq!(
            code_of(a.create_room(bad, "")),
            code::INVALID_ROOM_NAME,
            "CreateRoom {bad:?}"
        );
        assert_eq!(
            code_of(a.join_room(bad)),
            code::INVALID_ROOM_NAME,
            "JoinRoom {bad:?}"
        );
        assert_eq!(
            code_of(a.room_history(bad, 0, 10)),
            code::INVALID_ROOM_NAME,
            "RoomHistory {bad:?}"
        );
        assert_eq!(
            code_of(a.room_members(bad)),
            code::INVALID_ROOM_NAME,
            "RoomMembers {bad:?}"
        );
        cid += 1;
        assert_eq!(
            code_of(a.send_room(bad, cid, "x")),
            code::INVALID_ROOM_NAME,
            "SendRoom {bad:?}"
        );
        let w = a.watch(&[bad]).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(
            w[0].state,
            hubbub::protocol::presence::UNKNOWN,
            "Watch {bad:?}"
        );
    }

    // Rooms: LIKE wildcards in names, metacharacters in topics.
    let topic1 = "'; DROP TABLE rooms; -- 😀 e\u{301} \u{202E}rtl";
    let topic2 = "\" OR 1=1 -- %_\\";
    assert_eq!(a.create_room("rx1", topic1).unwrap().topic, topic1);
    let r1 = a.create_room("r_1", topic2).expect("r_1 is not rx1");
    assert_eq!((r1.name.as_str(), r1.topic.as_str()), ("r_1", topic2));
    assert_eq!(code_of(a.create_room("R_1", "")), code::ROOM_NAME_TAKEN);
    assert_eq!(
        code_of(a.create_room("r_2", "bad\u{7}topic")),
        code::TEXT_TOO_LONG
    );
    assert_eq!(
        code_of(a.create_room("r_3", "nul\0topic")),
        code::TEXT_TOO_LONG
    );
    assert_eq!(
        code_of(a.create_room("r_4", &format!("{}x", "é".repeat(128)))),
        code::TEXT_TOO_LONG
    );
    let long_topic = "é".repeat(128);
    assert_eq!(a.create_room("r_5", &long_topic).unwrap().topic, long_topic);
    let joined = b.join_room("R_1").unwrap();
    assert_eq!(
        (joined.name.as_str(), joined.topic.as_str()),
        ("r_1", topic2)
    );
    let (rooms, _) = a.list_rooms("", 100).unwrap();
    for (name, topic) in [
        ("rx1", topic1),
        ("r_1", topic2),
        ("r_5", long_topic.as_str()),
    ] {
        assert!(
            rooms.iter().any(|r| r.name == name && r.topic == topic),
            "room {name} altered in ListRooms: {rooms:?}"
        );
    }
    for after in ["'; DROP TABLE rooms; --", "%", "_", "\0", "😀"] {
        let (page, _) = a.list_rooms(after, 100).unwrap();
        assert!(
            page.iter().all(|r| r.name.as_str() > after),
            "ListRooms after {after:?} gave {page:?}"
        );
    }
    let members = a.room_members("r_1").unwrap();
    let mut member_names: Vec<_> = members.iter().map(|m| m.username.as_str()).collect();
    member_names.sort();
    assert_eq!(member_names, ["a_b", "axb"]);

    // Texts: Deliver and RoomDeliver byte for byte.
    let mut expected: Vec<FeedItem> = Vec::new();
    for t in hostile_texts(max_text) {
        cid += 1;
        let (id, _) = a
            .send_message("axb", cid, &t)
            .unwrap_or_else(|e| panic!("Send {:?}: {e}", t.get(..40.min(t.len())).unwrap_or("")));
        let item = (
            id,
            String::new(),
            "a_b".to_string(),
            "axb".to_string(),
            t.clone(),
        );
        assert_eq!(next_feed(&mut b), item, "Deliver altered");
        expected.push(item);
        cid += 1;
        let (id, _) = a.send_room("r_1", cid, &t).expect("SendRoom");
        let item = (
            id,
            "r_1".to_string(),
            "a_b".to_string(),
            "r_1".to_string(),
            t.clone(),
        );
        assert_eq!(next_feed(&mut b), item, "RoomDeliver altered");
        expected.push(item);
    }
    for t in too_long_texts(max_text) {
        cid += 1;
        assert_eq!(
            code_of(a.send_message("axb", cid, &t)),
            code::TEXT_TOO_LONG,
            "{} bytes",
            t.len()
        );
        cid += 1;
        assert_eq!(
            code_of(a.send_room("r_1", cid, &t)),
            code::TEXT_TOO_LONG,
            "{} bytes",
            t.len()
        );
    }
    cid += 1;
    assert_eq!(code_of(a.send_message("axb", cid, "")), code::EMPTY_TEXT);
    // "a_b" is not a pattern: a message to a_b does not reach axb.
    let (only_id, _) = c.send_message("A_B", 1, "for a_b only").unwrap();
    let got = next_feed(&mut a);
    assert_eq!(
        (got.0, got.3.as_str(), got.4.as_str()),
        (only_id, "a_b", "for a_b only")
    );
    assert!(
        b.history("a.b", 0, 100).unwrap().0.is_empty(),
        "axb sees a.b's message to a_b"
    );

    // History, RoomHistory and a fresh catch-up return the same bytes.
    let direct: Vec<&FeedItem> = expected.iter().filter(|e| e.1.is_empty()).collect();
    let room: Vec<&FeedItem> = expected.iter().filter(|e| !e.1.is_empty()).collect();
    let history = all_history(&mut a, "axb", false);
    assert_eq!(history.len(), direct.len());
    for (m, e) in history.iter().zip(&direct) {
        assert_eq!(
            (m.id, &m.sender, &m.recipient, &m.text),
            (e.0, &e.2, &e.3, &e.4),
            "History altered"
        );
    }
    let history = all_history(&mut b, "r_1", true);
    assert_eq!(history.len(), room.len());
    for (m, e) in history.iter().zip(&room) {
        assert_eq!(
            (m.id, &m.sender, &m.recipient, &m.text),
            (e.0, &e.2, &e.3, &e.4),
            "RoomHistory altered"
        );
    }
    let mut b2 = server.connect();
    b2.login("axb", accounts[1].1, "catch-up", 0).unwrap();
    let mut caught = Vec::new();
    loop {
        match b2.next_push(WAIT).expect("catch-up") {
            Packet::Deliver(m) => caught.push((m.id, String::new(), m.sender, m.recipient, m.text)),
            Packet::RoomDeliver(m) => caught.push((m.id, m.room.clone(), m.sender, m.room, m.text)),
            Packet::CaughtUp { .. } => break,
            _ => {}
        }
    }
    assert_eq!(caught.len(), expected.len(), "catch-up length");
    for (got, want) in caught.iter().zip(&expected) {
        assert_eq!(got, want, "catch-up altered");
    }
    drop((a, b, b2, c));

    // Every account still logs in; then the database is intact after a graceful stop, and after a restart.
    for (name, pw) in accounts {
        let mut x = server.connect();
        x.login(&name.to_uppercase(), pw, "final", 0)
            .unwrap_or_else(|e| panic!("final login {name:?}: {e}"));
    }
    server.assert_healthy();
    let status = server
        .terminate(Duration::from_secs(15))
        .expect("the server did not stop on SIGTERM");
    assert!(status.success(), "the server exited with {status}");
    let db_path: PathBuf = dir.path().join("hubbub.db");
    {
        let db = rusqlite::Connection::open(&db_path).expect("open the database");
        let check: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity_check");
        assert_eq!(check, "ok");
        let mut stmt = db
            .prepare("SELECT username FROM users ORDER BY username")
            .unwrap();
        let users: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut want: Vec<String> = accounts.iter().map(|a| a.0.to_string()).collect();
        want.sort();
        assert_eq!(users, want, "the users table");
        let count: i64 = db
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count as usize, expected.len() + 1, "stored messages");
        println!(
            "injection: integrity_check ok; {} users, {count} messages",
            users.len()
        );
    }
    let mut server = start_server(dir.path(), &flags);
    let mut a = online_with(&server, "a_b", accounts[0].1);
    let history = all_history(&mut a, "axb", false);
    assert_eq!(history.len(), direct.len());
    for (m, e) in history.iter().zip(&direct) {
        assert_eq!(
            (m.id, &m.text),
            (e.0, &e.4),
            "History altered after a restart"
        );
    }
    drop(a);
    server.assert_healthy();
    let status = server
        .terminate(Duration::from_secs(15))
        .expect("no stop after restart");
    assert!(status.success());
}
