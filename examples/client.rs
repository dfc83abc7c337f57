//! `client`: the hubbub command-line chat client.
//!
//! ```text
//! cargo run --example client -- --user alice [--register] [--server HOST:PORT] [--state PATH]
//!                                            [--password-file PATH] [--device NAME]
//! ```
//!
//! It connects (`--server`, else `HUBBUB_SERVER`, else 127.0.0.1:7878), registers first if asked, logs in, and
//! then shows messages, receipts, presence, typing and room events as they arrive while you type commands:
//!
//! ```text
//! /msg USER [TEXT]      send to a user; it becomes the current conversation
//! /room ROOM [TEXT]     post to a room; it becomes the current conversation
//! /join ROOM            join a room (and make it current)      /leave ROOM   leave it
//! /create ROOM [TOPIC]  create a room (and make it current)
//! /history NAME [N]     the last N (20) messages: NAME is a user, #NAME a room
//! /rooms [AFTER]        list rooms          /who [ROOM]        a room's members
//! /watch USER...        follow users' presence                 /stats    server counters
//! /help   /quit         (end of input quits too)
//! TEXT                  to the current conversation; start it with "//" to send a line beginning with "/"
//! ```
//!
//! Naming convention: room names never contain `#` (they follow the username rules), so `#lounge` always means
//! the room. `/history bob` asks for the conversation with the user `bob`; if there is no such user it tries the
//! room `bob`. `/history #bob` asks for the room only. Room commands accept the name with or without `#`.
//!
//! Password: `HUBBUB_PASSWORD`, else the first line of `--password-file`, else a prompt on the terminal with
//! echo turned off (`stty -echo`). With no terminal and no password source the client exits with a message. A
//! password is needed only to register or when there is no usable saved session token.
//!
//! State: a small `key=value` file (`--state`, default `~/.hubbub/<user>@<server>.state`, or
//! `./.hubbub-<user>.state` without a HOME), private to its owner (mode 0600), replaced atomically (temp file,
//! fsync, rename) whenever something in it changes that matters, and on exit:
//!
//! * `token` — the session token: the next start Resumes with it, and logs in with the password if it is refused;
//! * `last_seen` — the highest message id shown (or sent by us once live), passed to Login/Resume so a restart
//!   neither repeats nor misses a message ([HB-5.3]);
//! * `device` — this device's name (default `cli-<hostname>`, or `cli-<random>`);
//! * `next_client_msg_id` — the next Send's `client_msg_id`. The upper 32 bits are a random per-state-file prefix
//!   (so two devices of one user never collide, [HB-5.2]) and the counter is saved *before* each Send, so a
//!   restart never reuses an id.
//!
//! Design: after login, `Client::split` gives the connection's reading half to one thread, which prints every
//! push and reply as a line (starting with whatever arrived with the login); it also sends `Received(up_to)` for
//! what it has printed (after CaughtUp, then every few messages or seconds) and a Ping every `idle_timeout / 3`
//! of quiet. The main thread reads stdin and sends requests through the writing half, shared behind a mutex. When
//! stdin is not a terminal no prompt is printed and stdout is flushed after each line, so scripts and tests can
//! drive it. Exit status: 0 after `/quit` or end of input, 1 when the login fails or the connection is lost, 2 for
//! bad arguments, 130 after SIGINT/SIGTERM (which still save the state first).

use clap::Parser;
use hubbub::client::{Client, ClientError, FrameReader, LoginInfo, RequestWriter};
use hubbub::protocol::{
    code, presence, room_event, Member, Message, Packet, PresenceEntry, Request, RoomInfo,
    RoomMessage, Token, DEVICE_MAX, HISTORY_LIMIT_MAX,
};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long quitting waits for the Acks of messages still in flight.
const QUIT_WAIT: Duration = Duration::from_secs(3);
/// How long quitting waits for the Ok to its last Received.
const RECEIVED_WAIT: Duration = Duration::from_secs(1);
/// Messages printed, while live, before a Received is sent.
const RECEIPT_BATCH_LIVE: u32 = 10;
/// Messages printed, while catching up, before a Received is sent (CaughtUp sends one anyway).
const RECEIPT_BATCH_CATCHING_UP: u32 = 100;
/// Longest a printed message waits to be confirmed with Received.
const RECEIPT_DELAY: Duration = Duration::from_secs(2);
/// How often the reader thread wakes up to look at its timers when nothing arrives.
const TICK: Duration = Duration::from_millis(200);
/// A write that cannot finish in this time means the connection is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages `/history` shows when no count is given.
const HISTORY_DEFAULT: u16 = 20;
/// Rooms one `/rooms` asks for.
const ROOMS_PAGE: u16 = 100;

#[derive(Parser, Debug)]
#[command(
    name = "client",
    version,
    about = "The hubbub command-line chat client.",
    after_help = "Password: HUBBUB_PASSWORD, else --password-file, else a prompt on the terminal.\n\
                  Type /help once connected for the commands."
)]
struct Args {
    /// Your username.
    #[arg(long)]
    user: String,
    /// The server's address.
    #[arg(
        long,
        env = "HUBBUB_SERVER",
        default_value = "127.0.0.1:7878",
        value_name = "HOST:PORT"
    )]
    server: String,
    /// Create the account first (an existing account with that name is logged in to instead).
    #[arg(long)]
    register: bool,
    /// Read the password from the first line of this file.
    #[arg(long, value_name = "PATH")]
    password_file: Option<PathBuf>,
    /// The state file [default: ~/.hubbub/<user>@<server>.state].
    #[arg(long, value_name = "PATH")]
    state: Option<PathBuf>,
    /// This device's name, as the server lists it [default: the saved one, else cli-<hostname>].
    #[arg(long, value_name = "NAME")]
    device: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------------------------

/// True when a person is typing at a terminal: then a prompt is kept at the bottom.
static INTERACTIVE: OnceLock<bool> = OnceLock::new();
/// True while the password prompt has turned echo off (a signal must turn it back on).
static PROMPTING: AtomicBool = AtomicBool::new(false);
/// Set once quitting: no prompt is redrawn after the last lines.
static NO_PROMPT: AtomicBool = AtomicBool::new(false);
/// The live connection, for the signal thread.
static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();

fn interactive() -> bool {
    INTERACTIVE.get().copied().unwrap_or(false)
}

/// Prints one line and flushes. At a terminal the half-typed prompt line is replaced and the prompt redrawn.
fn say(line: impl AsRef<str>) {
    let mut out = io::stdout().lock();
    let _ = if interactive() && !NO_PROMPT.load(Ordering::SeqCst) {
        write!(out, "\r\x1b[2K{}\n> ", line.as_ref())
    } else {
        writeln!(out, "{}", line.as_ref())
    };
    let _ = out.flush();
}

/// Text from other people, made safe for one terminal line: newlines become " ↵ ", and control and
/// direction-override characters are shown escaped instead of acting on the terminal.
fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str(" ↵ "),
            '\t' => out.push(' '),
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => out.extend(c.escape_unicode()),
            c if c.is_control() => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// `HH:MM:SS` in local time for today, `YYYY-MM-DD HH:MM:SS` for other days.
fn clock(timestamp_ms: u64) -> String {
    let then = civil((timestamp_ms / 1000) as i64);
    let now = civil(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    );
    let (y, mo, d, h, mi, s) = then;
    if (y, mo, d) == (now.0, now.1, now.2) {
        format!("{h:02}:{mi:02}:{s:02}")
    } else {
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
    }
}

type Civil = (i64, u32, u32, u32, u32, u32);

/// Seconds since the epoch as local (year, month, day, hour, minute, second).
#[cfg(unix)]
fn civil(secs: i64) -> Civil {
    let t = secs as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value of that plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads the time_t we pass and writes only into the `tm` we own.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return utc_civil(secs);
    }
    (
        tm.tm_year as i64 + 1900,
        (tm.tm_mon + 1) as u32,
        tm.tm_mday as u32,
        tm.tm_hour as u32,
        tm.tm_min as u32,
        tm.tm_sec as u32,
    )
}

#[cfg(not(unix))]
fn civil(secs: i64) -> Civil {
    utc_civil(secs)
}

/// The same in UTC, from the day count (proleptic Gregorian calendar, in 400-year eras).
fn utc_civil(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rest / 3600, rest / 60 % 60, rest % 60)
}

// ---------------------------------------------------------------------------------------------------------------
// The state file
// ---------------------------------------------------------------------------------------------------------------

/// What survives a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Saved {
    user: String,
    device: String,
    token: Option<Token>,
    last_seen: u64,
    next_client_msg_id: u64,
}

impl Saved {
    /// Reads `key=value` lines; unknown keys, comments and unreadable values are skipped.
    fn parse(text: &str) -> Saved {
        let mut saved = Saved::default();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "user" => saved.user = value.to_owned(),
                "device" => saved.device = value.to_owned(),
                "token" => saved.token = parse_token(value),
                "last_seen" => saved.last_seen = value.parse().unwrap_or(0),
                "next_client_msg_id" => saved.next_client_msg_id = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        saved
    }

    fn render(&self) -> String {
        let token = self.token.as_ref().map(hex).unwrap_or_default();
        format!(
            "# hubbub client state; the token is a password-equivalent secret\n\
             user={}\ndevice={}\ntoken={}\nlast_seen={}\nnext_client_msg_id={}\n",
            self.user, self.device, token, self.last_seen, self.next_client_msg_id
        )
    }

    /// Replaces the file atomically: a private temp file beside it, fsync, rename.
    fn save(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state".into());
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut options = fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&tmp)?;
            file.write_all(self.render().as_bytes())?;
            file.sync_all()
        })();
        match written.and_then(|()| fs::rename(&tmp, path)) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn default_state_path(user: &str, server: &str) -> PathBuf {
    let server: String = server
        .chars()
        .map(|c| if c == '/' || c == '\\' { '_' } else { c })
        .collect();
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home)
            .join(".hubbub")
            .join(format!("{user}@{server}.state")),
        None => PathBuf::from(format!(".hubbub-{user}.state")),
    }
}

fn hex(token: &Token) -> String {
    token.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_token(s: &str) -> Option<Token> {
    if s.len() != 32 {
        return None;
    }
    let mut token = [0u8; 16];
    for (i, byte) in token.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(token)
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok()
    {
        return u64::from_le_bytes(bytes);
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A fresh counter: a random 32-bit prefix for this state file, counting from 1.
fn fresh_client_msg_id() -> u64 {
    (random_u64() & 0xffff_ffff_0000_0000) | 1
}

#[cfg(unix)]
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end])
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    (!name.is_empty()).then_some(name)
}

#[cfg(not(unix))]
fn hostname() -> Option<String> {
    std::env::var("COMPUTERNAME").ok().filter(|h| !h.is_empty())
}

fn default_device() -> String {
    let suffix = hostname().unwrap_or_else(|| format!("{:08x}", random_u64() as u32));
    let mut device = format!("cli-{suffix}");
    device.truncate(DEVICE_MAX); // ASCII only, so any cut is a character boundary
    device
}

// ---------------------------------------------------------------------------------------------------------------
// Passwords
// ---------------------------------------------------------------------------------------------------------------

/// Where the password comes from; asked at most once.
struct Passwords<'a> {
    file: Option<&'a Path>,
    stdin_is_tty: bool,
    confirm: bool,
    label: String,
    cached: Option<String>,
}

impl Passwords<'_> {
    fn get(&mut self) -> Result<String, String> {
        if let Some(p) = &self.cached {
            return Ok(p.clone());
        }
        let password = if let Some(p) = std::env::var("HUBBUB_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty())
        {
            p
        } else if let Some(path) = self.file {
            let text = fs::read_to_string(path)
                .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?;
            let first = text.lines().next().unwrap_or("").to_owned();
            if first.is_empty() {
                return Err(format!("the password file {} is empty", path.display()));
            }
            first
        } else if self.stdin_is_tty {
            let p = prompt_password(&format!("password for {}", self.label))?;
            if self.confirm && prompt_password("the same password again")? != p {
                return Err("the passwords differ".into());
            }
            p
        } else {
            return Err(
                "a password is needed but stdin is not a terminal, so there is no prompt: \
                 set HUBBUB_PASSWORD or pass --password-file PATH"
                    .into(),
            );
        };
        self.cached = Some(password.clone());
        Ok(password)
    }
}

/// Runs `stty` on our terminal (its stdin is ours).
fn stty(arg: &str) -> bool {
    Command::new("stty")
        .arg(arg)
        .stdin(Stdio::inherit())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn prompt_password(label: &str) -> Result<String, String> {
    PROMPTING.store(true, Ordering::SeqCst);
    let echo_off = stty("-echo");
    if echo_off {
        eprint!("{label}: ");
    } else {
        eprint!("{label} (warning: it will be shown as you type): ");
    }
    let _ = io::stderr().flush();
    let mut line = String::new();
    let read = io::stdin().lock().read_line(&mut line);
    if echo_off {
        stty("echo");
    }
    PROMPTING.store(false, Ordering::SeqCst);
    eprintln!();
    match read {
        Ok(0) => Err("no password given".into()),
        Ok(_) => Ok(line.trim_end_matches(['\n', '\r']).to_owned()),
        Err(e) => Err(format!("cannot read the password: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The shared session: what both threads see
// ---------------------------------------------------------------------------------------------------------------

/// Where plain text goes, and what a request was about.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    User(String),
    Room(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::User(u) => write!(f, "{u}"),
            Target::Room(r) => write!(f, "#{r}"),
        }
    }
}

/// A request waiting for its reply, by request id.
#[derive(Clone, Debug)]
enum Pending {
    Send {
        to: Target,
        text: String,
    },
    Join(String),
    Create(String),
    Leave(String),
    History {
        target: Target,
        limit: u16,
        /// This is the second try of a bare name: no user had it, so the room of that name was asked for.
        instead_of_user: bool,
    },
    Rooms,
    Who(String),
    Watch,
    Stats,
    Received,
    Ping,
}

impl Pending {
    /// The command, for error lines.
    fn context(&self) -> String {
        match self {
            Pending::Send {
                to: Target::User(u),
                ..
            } => format!("/msg {u}"),
            Pending::Send {
                to: Target::Room(r),
                ..
            } => format!("/room {r}"),
            Pending::Join(r) => format!("/join {r}"),
            Pending::Create(r) => format!("/create {r}"),
            Pending::Leave(r) => format!("/leave {r}"),
            Pending::History {
                target,
                instead_of_user: false,
                ..
            } => format!("/history {target}"),
            Pending::History { target, .. } => {
                format!("/history {}", target.to_string().trim_start_matches('#'))
            }
            Pending::Rooms => "/rooms".into(),
            Pending::Who(r) => format!("/who {r}"),
            Pending::Watch => "/watch".into(),
            Pending::Stats => "/stats".into(),
            Pending::Received => "receipt".into(),
            Pending::Ping => "ping".into(),
        }
    }
}

/// Both threads' state, behind one mutex.
struct Session {
    /// Our canonical username.
    me: String,
    saved: Saved,
    path: PathBuf,
    pending: HashMap<u32, Pending>,
    current: Option<Target>,
    /// Seen CaughtUp: new messages now arrive live.
    live: bool,
    /// Our own messages acknowledged in this run whose Deliver may still come through catch-up ([HB-5.9]).
    acked: HashSet<u64>,
    /// Highest id of a message printed (the Received we may send).
    shown: u64,
    /// Highest `up_to` sent in a Received.
    confirmed: u64,
    unconfirmed: u32,
    first_unconfirmed: Option<Instant>,
    receipt_now: bool,
    /// The connection is gone.
    closed: bool,
}

struct Writer {
    requests: RequestWriter,
    last_sent: Instant,
}

struct Shared {
    session: Mutex<Session>,
    /// Signalled whenever a reply is handled or the connection closes.
    changed: Condvar,
    writer: Mutex<Writer>,
    quitting: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits at most `limit` while the connection is open and `waiting` holds; returns the lock.
    fn wait_while(
        &self,
        limit: Duration,
        waiting: impl Fn(&Session) -> bool,
    ) -> MutexGuard<'_, Session> {
        self.changed
            .wait_timeout_while(self.lock(), limit, |s| !s.closed && waiting(s))
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Sends a request and remembers what it was for; false (with a line said) if it could not be written.
    fn send(&self, request: Request, pending: Pending) -> bool {
        // Holding the writer, the next request id is this request's: it is recorded before the request is
        // written, so the reply finds it even when it arrives before the write returns.
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let rid = w.requests.next_request_id();
        {
            let mut s = self.lock();
            if s.closed {
                say("! not connected");
                return false;
            }
            s.pending.insert(rid, pending);
        }
        w.last_sent = Instant::now();
        let written = w.requests.send_request(&request);
        drop(w);
        if let Err(e) = written {
            self.lock().pending.remove(&rid);
            let why = match e {
                ClientError::Io(e) => e.to_string(),
                ClientError::Timeout => "the write timed out".into(),
                other => other.to_string(),
            };
            say(format!("! could not send: {why}"));
            return false;
        }
        true
    }

    /// Sends a message with the next client message id, saved first so that no restart can reuse it.
    fn send_text(&self, to: Target, text: &str) {
        let text = text.to_owned();
        let client_msg_id = {
            let mut s = self.lock();
            let id = s.saved.next_client_msg_id;
            s.saved.next_client_msg_id = id.wrapping_add(1).max(1);
            s.save();
            id
        };
        let request = match &to {
            Target::User(u) => Request::Send {
                recipient: u.clone(),
                client_msg_id,
                text: text.clone(),
            },
            Target::Room(r) => Request::SendRoom {
                room: r.clone(),
                client_msg_id,
                text: text.clone(),
            },
        };
        self.send(request, Pending::Send { to, text });
    }
}

impl Session {
    fn save(&self) {
        if let Err(e) = self.saved.save(&self.path) {
            say(format!(
                "! cannot save the state file {}: {e}",
                self.path.display()
            ));
        }
    }

    fn who(&self, name: &str) -> String {
        if name == self.me {
            "you".into()
        } else {
            name.to_owned()
        }
    }

    fn unacked(&self) -> Vec<String> {
        self.pending
            .values()
            .filter_map(|p| match p {
                Pending::Send { to, text } => {
                    Some(format!("your message to {to}: {}", clean(text)))
                }
                _ => None,
            })
            .collect()
    }

    fn awaits(&self, what: impl Fn(&Pending) -> bool) -> bool {
        self.pending.values().any(what)
    }

    fn expects_room_reply(&self, room: &str) -> bool {
        self.pending.values().any(
            |p| matches!(p, Pending::Join(r) | Pending::Create(r) | Pending::Leave(r) if r == room),
        )
    }

    /// A message has been printed (or matched to its Ack): it counts for `last_seen` and the next Received.
    fn shown(&mut self, id: u64) {
        if id <= self.shown {
            return;
        }
        self.shown = id;
        self.saved.last_seen = self.saved.last_seen.max(id);
        self.unconfirmed += 1;
        self.first_unconfirmed.get_or_insert_with(Instant::now);
        // Deliver ids only increase on a session, so acknowledged ids below this one will not come again.
        self.acked.retain(|&a| a > id);
    }

    /// The Received to send now, if one is due; marks it sent and saves `last_seen`.
    fn receipt_due(&mut self) -> Option<u64> {
        let forced = std::mem::take(&mut self.receipt_now);
        if self.closed || self.shown <= self.confirmed {
            return None;
        }
        let batch = if self.live {
            RECEIPT_BATCH_LIVE
        } else {
            RECEIPT_BATCH_CATCHING_UP
        };
        let old = self
            .first_unconfirmed
            .is_some_and(|t| t.elapsed() >= RECEIPT_DELAY);
        if !(forced || old || self.unconfirmed >= batch) {
            return None;
        }
        self.confirmed = self.shown;
        self.unconfirmed = 0;
        self.first_unconfirmed = None;
        self.save();
        Some(self.shown)
    }

    fn direct_line(&self, m: &Message) -> String {
        format!(
            "[{}] {} → {}: {}",
            clock(m.timestamp_ms),
            self.who(&m.sender),
            self.who(&m.recipient),
            clean(&m.text)
        )
    }

    fn room_line(&self, room: &str, sender: &str, timestamp_ms: u64, text: &str) -> String {
        format!(
            "[{}] [#{room}] {}: {}",
            clock(timestamp_ms),
            self.who(sender),
            clean(text)
        )
    }

    /// A push (request id 0).
    fn push(&mut self, packet: Packet) {
        match packet {
            Packet::Deliver(m) => {
                // Our own message from this run, already printed at its Ack: matched by id, not shown twice.
                let line = (!(m.sender == self.me && self.acked.contains(&m.id)))
                    .then(|| self.direct_line(&m));
                self.shown(m.id);
                if let Some(line) = line {
                    say(line);
                }
            }
            Packet::RoomDeliver(RoomMessage {
                id,
                room,
                sender,
                timestamp_ms,
                text,
            }) => {
                let line = (!(sender == self.me && self.acked.contains(&id)))
                    .then(|| self.room_line(&room, &sender, timestamp_ms, &text));
                self.shown(id);
                if let Some(line) = line {
                    say(line);
                }
            }
            Packet::CaughtUp { cursor } => {
                self.live = true;
                self.receipt_now = true;
                say(format!("* caught up to #{cursor}"));
            }
            Packet::DeliveryReceipt { peer, up_to } => {
                say(format!("✓ delivered to {peer} up to #{up_to}"))
            }
            Packet::ReadReceipt { peer, up_to } => {
                say(format!("✓✓ {peer} has read up to #{up_to}"))
            }
            Packet::Presence(p) => say(presence_line(&p, true)),
            Packet::TypingNotice { from, room } if room.is_empty() => {
                say(format!("* {from} is typing…"))
            }
            Packet::TypingNotice { from, room } => say(format!("* {from} is typing in #{room}…")),
            Packet::RoomEvent { room, event, user } => {
                let me = user == self.me;
                if me && self.expects_room_reply(&room) {
                    return; // the reply says it
                }
                let who = self.who(&user);
                let line = match event {
                    room_event::JOINED => format!("* {who} joined #{room}"),
                    room_event::LEFT => format!("* {who} left #{room}"),
                    room_event::KICKED if me => format!("* you were removed from #{room}"),
                    room_event::KICKED => format!("* {who} was removed from #{room}"),
                    other => format!("* {who}: event {other} in #{room}"),
                };
                if me && event != room_event::JOINED {
                    self.forget_room(&room);
                }
                say(line);
            }
            Packet::RoomClosed { room } => {
                self.forget_room(&room);
                say(format!("* #{room} was closed by its host"));
            }
            Packet::Shutdown { text } => {
                say(format!("* the server is shutting down: {}", clean(&text)))
            }
            Packet::Error { code, text } if code::closes_connection(code) => say(format!(
                "error {code}: {} (the server is closing the connection)",
                clean(&text)
            )),
            Packet::Error { code, text } => say(format!("error {code}: {}", clean(&text))),
            other => say(format!("? unexpected push from the server: {other:?}")),
        }
    }

    fn forget_room(&mut self, room: &str) {
        if self.current == Some(Target::Room(room.to_owned())) {
            self.current = None;
        }
    }

    /// A reply. Returns a follow-up request to send (the room try of `/history NAME`).
    fn reply(&mut self, pending: Option<Pending>, packet: Packet) -> Option<(Request, Pending)> {
        let Some(pending) = pending else {
            if let Packet::Error { code, text } = packet {
                say(format!("error {code}: {}", clean(&text)));
            }
            return None;
        };
        if let Packet::Error { code, text } = packet {
            return self.failed(pending, code, &text);
        }
        match (pending, packet) {
            (
                Pending::Send { to, text },
                Packet::Ack {
                    message_id,
                    timestamp_ms,
                },
            ) => {
                if message_id > self.shown {
                    self.acked.insert(message_id);
                }
                // Live, the server does not echo our own message to this session, and every message with a
                // smaller id has already reached us: the id can count as seen. Catching up, it comes later.
                if self.live {
                    self.saved.last_seen = self.saved.last_seen.max(message_id);
                }
                let line = match &to {
                    Target::User(u) => format!(
                        "[{}] you → {}: {}",
                        clock(timestamp_ms),
                        self.who(u),
                        clean(&text)
                    ),
                    Target::Room(r) => self.room_line(r, &self.me, timestamp_ms, &text),
                };
                say(format!("{line}  (#{message_id})"));
            }
            (Pending::Join(_), Packet::RoomInfo(info)) => {
                say(format!("* joined {}", room_summary(&info)))
            }
            (Pending::Create(_), Packet::RoomInfo(info)) => {
                say(format!("* created {}", room_summary(&info)))
            }
            (Pending::Leave(room), Packet::Ok) => {
                self.forget_room(&room);
                say(format!("* left #{room}"));
            }
            (Pending::History { target, limit, .. }, Packet::HistoryPage { messages, more }) => {
                let with = match &target {
                    Target::User(u) => format!("with {u}"),
                    Target::Room(r) => format!("of #{r}"),
                };
                if messages.is_empty() {
                    say(format!("--- no history {with} ---"));
                    return None;
                }
                say(format!(
                    "--- history {with}: {} message(s), oldest first ---",
                    messages.len()
                ));
                for m in messages.iter().rev() {
                    match &target {
                        Target::User(_) => say(self.direct_line(m)),
                        Target::Room(r) => {
                            say(self.room_line(r, &m.sender, m.timestamp_ms, &m.text))
                        }
                    }
                }
                if more {
                    let hint = if limit < HISTORY_LIMIT_MAX {
                        format!("/history {target} {HISTORY_LIMIT_MAX} shows more")
                    } else {
                        "older messages exist".into()
                    };
                    say(format!("--- end of history ({hint}) ---"));
                } else {
                    say("--- end of history ---");
                }
            }
            (Pending::Rooms, Packet::RoomList { rooms, more }) => {
                if rooms.is_empty() {
                    say("* no rooms");
                }
                for info in &rooms {
                    say(format!("* {}", room_summary(info)));
                }
                if more {
                    if let Some(last) = rooms.last() {
                        say(format!("* more: /rooms {}", last.name));
                    }
                }
            }
            (Pending::Who(_), Packet::RoomMemberList { room, members }) => {
                say(format!("* #{room}: {}", member_list(&members)))
            }
            (Pending::Watch, Packet::PresenceList(list)) => {
                for p in &list {
                    say(presence_line(p, false));
                }
            }
            (Pending::Stats, Packet::StatsReply(counters)) => {
                let all: Vec<String> = counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
                say(format!("* stats: {}", all.join(", ")));
            }
            (Pending::Received, Packet::Ok) | (Pending::Ping, Packet::Pong) => {}
            (pending, other) => say(format!(
                "? unexpected answer to {}: {other:?}",
                pending.context()
            )),
        }
        None
    }

    fn failed(&mut self, pending: Pending, code: u16, text: &str) -> Option<(Request, Pending)> {
        match pending {
            // A bare name is a user first; if no user has it, try the room of that name.
            Pending::History {
                target: Target::User(name),
                limit,
                ..
            } if code == code::UNKNOWN_RECIPIENT => {
                return Some((
                    Request::RoomHistory {
                        room: name.clone(),
                        before_id: 0,
                        limit,
                    },
                    Pending::History {
                        target: Target::Room(name),
                        limit,
                        instead_of_user: true,
                    },
                ));
            }
            // Only "no such room" means the name was neither; any other refusal of the room try (not a member,
            // rate limited, server error) is reported as what it is.
            Pending::History {
                instead_of_user: true,
                ..
            } if code == code::NO_SUCH_ROOM => say(format!(
                "error {}: no such user or room ({})",
                code::UNKNOWN_RECIPIENT,
                pending.context()
            )),
            pending => say(format!(
                "error {code}: {} ({})",
                clean(text),
                pending.context()
            )),
        }
        None
    }
}

fn room_summary(info: &RoomInfo) -> String {
    let mut s = format!("#{}", info.name);
    if !info.topic.is_empty() {
        s.push_str(&format!(" — {}", clean(&info.topic)));
    }
    s.push_str(&format!(
        " (host {}, {} member{}{})",
        info.host,
        info.member_count,
        if info.member_count == 1 { "" } else { "s" },
        if info.closed { ", closed" } else { "" }
    ));
    s
}

fn member_list(members: &[Member]) -> String {
    if members.is_empty() {
        return "no members".into();
    }
    let names: Vec<String> = members
        .iter()
        .map(|m| {
            if m.online {
                format!("{} (online)", m.username)
            } else {
                m.username.clone()
            }
        })
        .collect();
    names.join(", ")
}

/// One user's presence; `change` for a push (the user just came or went), else a state.
fn presence_line(p: &PresenceEntry, change: bool) -> String {
    match p.state {
        presence::ONLINE => format!("* {} is online", p.username),
        presence::OFFLINE if change => format!("* {} went offline", p.username),
        presence::OFFLINE if p.last_seen_ms == 0 => format!("* {} is offline", p.username),
        presence::OFFLINE => format!(
            "* {} is offline (last seen {})",
            p.username,
            clock(p.last_seen_ms)
        ),
        _ => format!("* {}: no such user", p.username),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The reader thread
// ---------------------------------------------------------------------------------------------------------------

fn handle(shared: &Shared, rid: u32, packet: Packet) {
    let follow_up = {
        let mut s = shared.lock();
        let follow_up = if rid == 0 {
            s.push(packet);
            None
        } else {
            let pending = s.pending.remove(&rid);
            s.reply(pending, packet)
        };
        shared.changed.notify_all();
        follow_up
    };
    if let Some((request, pending)) = follow_up {
        shared.send(request, pending);
    }
}

/// Timers: a due Received, and a Ping when nothing has been sent for a third of the idle timeout.
fn tick(shared: &Shared, ping_every: Option<Duration>) {
    let receipt = shared.lock().receipt_due();
    if let Some(up_to) = receipt {
        shared.send(Request::Received { up_to }, Pending::Received);
    }
    if let Some(every) = ping_every {
        let quiet = shared
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_sent
            .elapsed();
        if quiet >= every {
            shared.send(Request::Ping, Pending::Ping);
        }
    }
}

fn read_loop(shared: Arc<Shared>, mut reader: FrameReader, ping_every: Option<Duration>) {
    let why = loop {
        // Every frame already read first; then the timers; then wait up to a tick for more.
        let next = match reader.recv(Duration::ZERO) {
            Err(ClientError::Timeout) => {
                tick(&shared, ping_every);
                reader.recv(TICK)
            }
            next => next,
        };
        match next {
            Ok((rid, packet)) => handle(&shared, rid, packet),
            Err(ClientError::Timeout) => {}
            Err(ClientError::Undecodable { reason, .. }) => say(format!(
                "? an answer from the server did not decode: {reason}"
            )),
            Err(ClientError::Protocol(e)) => break format!("the server sent a bad frame: {e}"),
            Err(e) => break e.to_string(),
        }
    };
    connection_lost(&shared, &why);
}

fn connection_lost(shared: &Shared, why: &str) {
    let mut s = shared.lock();
    s.closed = true;
    shared.changed.notify_all();
    if shared.quitting.swap(true, Ordering::SeqCst) {
        return; // a quit is under way: it finishes up
    }
    NO_PROMPT.store(true, Ordering::SeqCst);
    let lost = s.unacked();
    s.save();
    drop(s);
    say(format!("* disconnected: {why}"));
    for l in lost {
        say(format!(
            "! no acknowledgement for {l}: it may or may not have been stored"
        ));
    }
    std::process::exit(1);
}

/// Quits cleanly: waits a little for outstanding Acks, confirms what was shown, saves the state, closes.
/// False if another thread is already doing it.
fn finish(shared: &Shared) -> bool {
    if shared.quitting.swap(true, Ordering::SeqCst) {
        return false;
    }
    NO_PROMPT.store(true, Ordering::SeqCst);
    let mut s = shared.wait_while(QUIT_WAIT, |s| {
        s.awaits(|p| matches!(p, Pending::Send { .. }))
    });
    let lost = s.unacked();
    let receipt = (!s.closed && s.shown > s.confirmed).then(|| {
        s.confirmed = s.shown;
        s.shown
    });
    drop(s);
    for l in lost {
        say(format!(
            "! no acknowledgement for {l}: it may or may not have been stored"
        ));
    }
    if let Some(up_to) = receipt {
        if shared.send(Request::Received { up_to }, Pending::Received) {
            drop(shared.wait_while(RECEIVED_WAIT, |s| {
                s.awaits(|p| matches!(p, Pending::Received))
            }));
        }
    }
    shared.lock().save();
    let w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
    let _ = w.requests.shutdown();
    true
}

#[cfg(unix)]
fn install_signal_handler() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        let mut first = true;
        for _ in signals.forever() {
            if PROMPTING.load(Ordering::SeqCst) {
                stty("echo");
                eprintln!();
                std::process::exit(130);
            }
            match SHARED.get() {
                // The first signal quits cleanly (on another thread, so a second one can cut it short).
                Some(shared) if first => {
                    first = false;
                    let shared = Arc::clone(shared);
                    std::thread::spawn(move || {
                        finish(&shared);
                        say("* bye");
                        std::process::exit(130);
                    });
                }
                _ => std::process::exit(130),
            }
        }
    });
}

#[cfg(not(unix))]
fn install_signal_handler() {}

// ---------------------------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------------------------

const HELP: &[&str] = &[
    "commands:",
    "  /msg USER [TEXT]       send to USER (it becomes the current conversation)",
    "  /room ROOM [TEXT]      post to ROOM (it becomes the current conversation)",
    "  /join ROOM             join ROOM            /leave ROOM      leave ROOM",
    "  /create ROOM [TOPIC]   create ROOM",
    "  /history NAME [N]      last N (20) messages with user NAME; #NAME for a room",
    "  /rooms [AFTER]         list rooms           /who [ROOM]      who is in ROOM",
    "  /watch USER...         follow users' presence",
    "  /stats                 server counters      /quit            leave (end of input too)",
    "  TEXT                   to the current conversation (\"//x\" sends \"/x\")",
];

/// The first word and the rest, both trimmed.
fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim();
    match s.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim_start()),
        None => (s, ""),
    }
}

fn room_arg(s: &str) -> String {
    s.trim_start_matches('#').to_lowercase()
}

/// Runs one input line; false to quit.
fn command(shared: &Shared, line: &str) -> bool {
    let line = line.trim();
    if line.is_empty() {
        return true;
    }
    let Some(body) = line.strip_prefix('/').filter(|b| !b.starts_with('/')) else {
        // Plain text ("//..." is text that starts with "/").
        let text = line.strip_prefix('/').unwrap_or(line);
        let current = shared.lock().current.clone();
        match current {
            Some(to) => shared.send_text(to, text),
            None => {
                say("! no current conversation: use /msg USER TEXT, /room ROOM TEXT or /join ROOM")
            }
        }
        return true;
    };
    let (cmd, rest) = split_word(body);
    let cmd = cmd.to_lowercase();
    let cmd = cmd.as_str();
    match cmd {
        "msg" | "m" | "room" | "r" => {
            let (name, text) = split_word(rest);
            if name.is_empty() {
                say(format!("! usage: /{cmd} NAME [TEXT]"));
                return true;
            }
            let to = if cmd.starts_with('r') || name.starts_with('#') {
                Target::Room(room_arg(name))
            } else {
                Target::User(name.to_lowercase())
            };
            shared.lock().current = Some(to.clone());
            if text.is_empty() {
                say(format!("* talking to {to}"));
            } else {
                shared.send_text(to, text);
            }
        }
        "join" | "j" | "create" | "leave" | "part" => {
            let (name, topic) = split_word(rest);
            if name.is_empty() {
                say(format!("! usage: /{cmd} ROOM"));
                return true;
            }
            let room = room_arg(name);
            match cmd {
                "create" => {
                    shared.lock().current = Some(Target::Room(room.clone()));
                    let request = Request::CreateRoom {
                        name: room.clone(),
                        topic: topic.to_owned(),
                    };
                    shared.send(request, Pending::Create(room));
                }
                "leave" | "part" => {
                    let request = Request::LeaveRoom { name: room.clone() };
                    shared.send(request, Pending::Leave(room));
                }
                _ => {
                    shared.lock().current = Some(Target::Room(room.clone()));
                    let request = Request::JoinRoom { name: room.clone() };
                    shared.send(request, Pending::Join(room));
                }
            }
        }
        "history" | "h" => {
            let (name, count) = split_word(rest);
            let limit = if count.is_empty() {
                Ok(HISTORY_DEFAULT)
            } else {
                count.parse::<u16>()
            };
            let (Ok(limit), false) = (limit, name.is_empty()) else {
                say("! usage: /history USER|#ROOM [COUNT]");
                return true;
            };
            let limit = limit.clamp(1, HISTORY_LIMIT_MAX);
            if name.starts_with('#') {
                let room = room_arg(name);
                let request = Request::RoomHistory {
                    room: room.clone(),
                    before_id: 0,
                    limit,
                };
                let pending = Pending::History {
                    target: Target::Room(room),
                    limit,
                    instead_of_user: false,
                };
                shared.send(request, pending);
            } else {
                let user = name.to_lowercase();
                let request = Request::History {
                    peer: user.clone(),
                    before_id: 0,
                    limit,
                };
                let pending = Pending::History {
                    target: Target::User(user),
                    limit,
                    instead_of_user: false,
                };
                shared.send(request, pending);
            }
        }
        "rooms" => {
            let request = Request::ListRooms {
                after: room_arg(rest),
                limit: ROOMS_PAGE,
            };
            shared.send(request, Pending::Rooms);
        }
        "who" => {
            let room = if rest.is_empty() {
                match shared.lock().current.clone() {
                    Some(Target::Room(r)) => r,
                    _ => {
                        say("! usage: /who ROOM");
                        return true;
                    }
                }
            } else {
                room_arg(split_word(rest).0)
            };
            let request = Request::RoomMembers { name: room.clone() };
            shared.send(request, Pending::Who(room));
        }
        "watch" => {
            let users: Vec<String> = rest.split_whitespace().map(str::to_lowercase).collect();
            if users.is_empty() {
                say("! usage: /watch USER...");
                return true;
            }
            shared.send(Request::Watch { users }, Pending::Watch);
        }
        "stats" => {
            shared.send(Request::Stats, Pending::Stats);
        }
        "help" | "?" => HELP.iter().for_each(say),
        "quit" | "exit" | "q" => return false,
        _ => say(format!(
            "! unknown command /{cmd}: /help lists the commands"
        )),
    }
    true
}

// ---------------------------------------------------------------------------------------------------------------
// Start
// ---------------------------------------------------------------------------------------------------------------

fn describe(e: ClientError) -> String {
    match e {
        ClientError::Server { code, text } => format!("error {code}: {}", clean(&text)),
        other => other.to_string(),
    }
}

/// Registers if asked, then Resumes with the saved token or logs in with the password.
/// Returns the connection, the login, and whether it was a Resume.
fn log_in(
    args: &Args,
    saved: &mut Saved,
    passwords: &mut Passwords<'_>,
) -> Result<(Client, LoginInfo, bool), String> {
    let connect = || {
        Client::connect(args.server.as_str())
            .map_err(|e| format!("cannot connect to {}: {}", args.server, describe(e)))
    };
    let mut client = connect()?;
    if args.register {
        let password = passwords.get()?;
        match client.register(&saved.user, &password) {
            Ok(()) => say(format!("* registered {}", saved.user)),
            Err(ClientError::Server {
                code: code::USERNAME_TAKEN,
                ..
            }) => say(format!(
                "* {} is already registered; logging in",
                saved.user
            )),
            Err(e) => return Err(format!("cannot register: {}", describe(e))),
        }
    } else if let Some(token) = saved.token {
        match client.resume(token, &saved.device, saved.last_seen) {
            Ok(info) => return Ok((client, info, true)),
            Err(ClientError::Server {
                code: code::BAD_TOKEN,
                ..
            }) => {
                say("* the saved session is no longer valid; logging in with the password");
                saved.token = None;
                passwords.get()?;
                // A fresh connection: the prompt may have outlasted this one's auth timeout.
                client = connect()?;
            }
            Err(e) => return Err(format!("cannot resume the session: {}", describe(e))),
        }
    }
    let password = passwords.get()?;
    let info = client
        .login(&saved.user, &password, &saved.device, saved.last_seen)
        .map_err(|e| format!("cannot log in: {}", describe(e)))?;
    Ok((client, info, false))
}

fn run(args: Args) -> Result<i32, String> {
    let stdin_is_tty = io::stdin().is_terminal();
    let _ = INTERACTIVE.set(stdin_is_tty && io::stdout().is_terminal());
    let user = args.user.trim().to_lowercase();
    if user.is_empty() {
        return Err("--user must not be empty".into());
    }
    let path = args
        .state
        .clone()
        .unwrap_or_else(|| default_state_path(&user, &args.server));
    let mut saved = match fs::read_to_string(&path) {
        Ok(text) => Saved::parse(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Saved::default(),
        Err(e) => {
            return Err(format!(
                "cannot read the state file {}: {e}",
                path.display()
            ))
        }
    };
    if !saved.user.is_empty() && saved.user != user {
        say(format!(
            "* the state file {} belongs to {}; starting afresh for {user}",
            path.display(),
            saved.user
        ));
        saved.token = None;
        saved.last_seen = 0;
    }
    saved.user = user.clone();
    if let Some(device) = &args.device {
        saved.device = device.clone();
    } else if saved.device.is_empty() {
        saved.device = default_device();
    }
    if saved.device.len() > DEVICE_MAX || saved.device.chars().any(char::is_control) {
        return Err(format!(
            "the device name must be at most {DEVICE_MAX} bytes, without control characters"
        ));
    }
    if saved.next_client_msg_id == 0 {
        saved.next_client_msg_id = fresh_client_msg_id();
    }
    install_signal_handler();

    let mut passwords = Passwords {
        file: args.password_file.as_deref(),
        stdin_is_tty,
        confirm: args.register,
        label: format!("{user}@{}", args.server),
        cached: None,
    };
    // Ask before connecting when the password will surely be needed: the server's auth timeout is short.
    if args.register || saved.token.is_none() {
        passwords.get()?;
    }
    let (client, info, resumed) = log_in(&args, &mut saved, &mut passwords)?;
    saved.user = info.username.clone();
    saved.token = Some(info.token);
    if let Err(e) = saved.save(&path) {
        say(format!(
            "! cannot save the state file {}: {e}",
            path.display()
        ));
    }
    say(format!(
        "* {} as {} on {} (device {}); /help lists the commands",
        if resumed {
            "resumed the session"
        } else {
            "logged in"
        },
        info.username,
        args.server,
        saved.device
    ));

    let idle = client.hello().idle_timeout_ms;
    let ping_every = (idle > 0).then(|| Duration::from_millis(u64::from(idle / 3).max(100)));
    // The write timeout is the socket's, so it holds for the writing half too.
    client
        .stream()
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    // Frames that arrived with LoginOk come first out of the reading half.
    let (reader, requests) = client
        .split()
        .map_err(|e| format!("cannot use the connection: {}", describe(e)))?;

    let last_seen = saved.last_seen;
    let shared = Arc::new(Shared {
        session: Mutex::new(Session {
            me: info.username.clone(),
            saved,
            path,
            pending: HashMap::new(),
            current: None,
            live: false,
            acked: HashSet::new(),
            shown: last_seen,
            // Confirm what an earlier run showed, in case its last Received was lost.
            confirmed: 0,
            unconfirmed: 0,
            first_unconfirmed: None,
            receipt_now: false,
            closed: false,
        }),
        changed: Condvar::new(),
        writer: Mutex::new(Writer {
            requests,
            last_sent: Instant::now(),
        }),
        quitting: AtomicBool::new(false),
    });
    let _ = SHARED.set(Arc::clone(&shared));
    {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("reader".into())
            .spawn(move || read_loop(shared, reader, ping_every))
            .map_err(|e| format!("cannot start the reader thread: {e}"))?;
    }

    let stdin = io::stdin();
    let mut buf = Vec::new();
    loop {
        if interactive() {
            let mut out = io::stdout().lock();
            let _ = write!(out, "\r\x1b[2K> ");
            let _ = out.flush();
        }
        buf.clear();
        match stdin.lock().read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                say(format!("! cannot read input: {e}"));
                break;
            }
        }
        let line = String::from_utf8_lossy(&buf);
        if !command(&shared, &line) {
            break;
        }
    }
    if finish(&shared) {
        say("* bye");
        Ok(0)
    } else {
        // A signal or a lost connection is already finishing up and will exit.
        loop {
            std::thread::park();
        }
    }
}

fn main() {
    let args = Args::parse();
    let code = match run(args) {
        Ok(code) => code,
        Err(message) => {
            if interactive() {
                println!();
            }
            eprintln!("client: {message}");
            1
        }
    };
    std::process::exit(code);
}
