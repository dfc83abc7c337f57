//! Accounts, logins and tokens ([HB-7]): registration rules, password and token logins, token management,
//! throttling, timeouts, session limits, pipelining behind a login, hash-pool overload, a login storm and a
//! database the server cannot write.
//!
//! Every wait is bounded. Durations that are days or seconds in production are configured down to around a
//! second here, and no test asserts on speed: the bounds are generous enough for a slow, busy 2-core machine.

mod common;

use common::{code_of, start, start_with, TestServer, PASSWORD};
use hubbub::auth::HashParams;
use hubbub::client::{Client, ClientError, LoginInfo};
use hubbub::protocol::{code, Packet, Request, TokenEntry};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// How long to wait for something that should happen promptly (generous: slow machines).
const LONG: Duration = Duration::from_secs(30);

// -------------------------------------------------------------------------------------------------------------
// Helpers
// -------------------------------------------------------------------------------------------------------------

/// A fresh connection logged in as `name` (already registered) from `device`.
fn login_as(server: &TestServer, name: &str, device: &str) -> (Client, LoginInfo) {
    let mut c = server.connect();
    let info = c
        .login(name, PASSWORD, device, 0)
        .unwrap_or_else(|e| panic!("login {name}/{device}: {e}"));
    (c, info)
}

/// The server error (code and text) of a failed call.
fn error_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (u16, String) {
    match result {
        Err(ClientError::Server { code, text }) => (code, text),
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Waits for the server's next Error push (request id 0), skipping other pushes such as CaughtUp; returns its
/// code and text. Panics if the connection ends or nothing comes within `within`.
fn closing_error(c: &mut Client, within: Duration) -> (u16, String) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_push(left) {
            Ok(Packet::Error { code, text }) => return (code, text),
            Ok(_) => continue,
            Err(e) => panic!("expected an Error push, got {e:?}"),
        }
    }
}

/// Asserts the server closes this connection (after whatever it still had to say).
fn assert_closed(c: &mut Client) {
    let deadline = Instant::now() + LONG;
    loop {
        match c.recv(deadline.saturating_duration_since(Instant::now())) {
            Err(ClientError::Closed) | Err(ClientError::Io(_)) => return,
            Ok(_) => continue,
            Err(e) => panic!("expected the server to close the connection, got {e:?}"),
        }
    }
}

/// The token entry marked `current`; asserts there is exactly one.
fn current_of(list: &[TokenEntry]) -> &TokenEntry {
    let current: Vec<&TokenEntry> = list.iter().filter(|t| t.current).collect();
    assert_eq!(current.len(), 1, "exactly one current token in {list:?}");
    current[0]
}

/// Encodes several requests back to back, for one write.
fn frames(requests: &[(u32, Request)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, request) in requests {
        request.encode(*id, &mut out);
    }
    out
}

/// Replies (request id != 0) in arrival order until `n` have come; pushes are skipped.
fn replies_in_order(c: &mut Client, n: usize) -> Vec<(u32, Packet)> {
    let deadline = Instant::now() + LONG;
    let mut out = Vec::new();
    while out.len() < n {
        let (rid, packet) = c
            .recv(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|e| panic!("waiting for reply {} of {n}: {e:?}", out.len() + 1));
        if rid != 0 {
            out.push((rid, packet));
        }
    }
    out
}

fn login_request(name: &str, password: &str, device: &str) -> Request {
    Request::Login {
        username: name.into(),
        password: password.into(),
        device: device.into(),
        last_seen: 0,
    }
}

/// A Register of `name` with the test password.
fn register_request(name: &str) -> Request {
    Request::Register {
        username: name.into(),
        password: PASSWORD.into(),
    }
}

/// The id of the token listed for `device`.
fn token_id_of(list: &[TokenEntry], device: &str) -> u64 {
    list.iter()
        .find(|t| t.device == device)
        .unwrap_or_else(|| panic!("no {device} token listed in {list:?}"))
        .token_id
}

/// Sleeps until `t` (at once if it has passed).
fn sleep_until(t: Instant) {
    thread::sleep(t.saturating_duration_since(Instant::now()));
}

/// Parses the "retry in N ms" of a RATE_LIMITED text.
fn retry_ms(text: &str) -> u64 {
    let after = text
        .split("retry in ")
        .nth(1)
        .unwrap_or_else(|| panic!("no 'retry in' in {text:?}"));
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number of ms in {text:?}"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// -------------------------------------------------------------------------------------------------------------
// Registration
// -------------------------------------------------------------------------------------------------------------

#[test]
fn register_then_login_returns_token_user_id_and_canonical_name() {
    let server = start();
    let mut c = server.connect();
    c.register("Alice", PASSWORD).unwrap();
    let info = c.login("ALICE", PASSWORD, "laptop", 0).unwrap();
    assert_eq!(info.username, "alice", "the canonical (lowercase) name");
    assert_ne!(info.token, [0u8; 16], "a real token, not zeros");
    assert!(info.user_id > 0, "user id {}", info.user_id);

    // A second user gets another id; a second login another token.
    server.register("bob");
    let (_b, bob) = login_as(&server, "bob", "phone");
    assert_ne!(bob.user_id, info.user_id);
    let (_a2, again) = login_as(&server, "alice", "phone");
    assert_eq!(again.user_id, info.user_id);
    assert_ne!(again.token, info.token, "each login issues its own token");
}

#[test]
fn duplicate_register_is_username_taken_whatever_the_case() {
    let server = start();
    let mut c = server.connect();
    c.register("alice", PASSWORD).unwrap();
    assert_eq!(code_of(c.register("alice", PASSWORD)), code::USERNAME_TAKEN);
    // "Alice" and "alice" are the same name.
    assert_eq!(
        code_of(c.register("Alice", "another-password")),
        code::USERNAME_TAKEN
    );
    let mut other = server.connect();
    assert_eq!(
        code_of(other.register("ALICE", PASSWORD)),
        code::USERNAME_TAKEN
    );
    // The connection stays usable after the refusals, and the original password is the one that works.
    c.ping().unwrap();
    assert_eq!(
        code_of(other.login("alice", "another-password", "d", 0)),
        code::BAD_CREDENTIALS
    );
    other.login("Alice", PASSWORD, "d", 0).unwrap();
}

#[test]
fn invalid_usernames_are_refused_and_edges_accepted() {
    let server = start();
    let mut c = server.connect();
    let invalid = [
        "ab".to_string(),         // 2 characters
        "a".repeat(33),           // 33 characters
        "has space".to_string(),  // space
        "ünïcode".to_string(),    // unicode
        "a/b".to_string(),        // slash
        "".to_string(),           // empty
        "tab\tname".to_string(),  // control character
        "émile".to_string(),      // 5 chars, 6 bytes: unicode within the length limits
        "a\u{0}bc".to_string(),   // NUL
        "semi;colon".to_string(), // punctuation outside _ . -
    ];
    for name in &invalid {
        let (code, text) = error_of(c.register(name, PASSWORD));
        assert_eq!(code, code::INVALID_USERNAME, "{name:?}");
        assert!(!text.is_empty(), "{name:?}: the error says why");
    }
    let valid = [
        "abc".to_string(), // 3 characters
        "b".repeat(32),    // 32 characters
        "az09_.-".to_string(),
        "0123456789".to_string(),
        "___".to_string(),
        "...".to_string(),
        "---".to_string(),
        "MiXeD.Case".to_string(), // accepted and folded to lowercase
    ];
    for name in &valid {
        c.register(name, PASSWORD)
            .unwrap_or_else(|e| panic!("{name:?} should be accepted: {e}"));
    }
    for name in &valid {
        let (_s, info) = login_as(&server, name, "d");
        assert_eq!(info.username, name.to_ascii_lowercase());
    }
}

#[test]
fn invalid_passwords_are_refused_and_edges_accepted() {
    let server = start();
    let mut c = server.connect();
    let invalid = [
        "x".repeat(7),
        "x".repeat(1025),
        String::new(),
        "éééa".to_string(), // 4 characters but 7 bytes: the limit counts bytes
    ];
    for (i, pw) in invalid.iter().enumerate() {
        let (code, text) = error_of(c.register(&format!("bad{i}"), pw));
        assert_eq!(
            code,
            code::INVALID_PASSWORD,
            "password of {} bytes",
            pw.len()
        );
        assert!(!text.is_empty());
    }
    let valid = [
        ("eight", "y".repeat(8)),
        ("kilo", "z".repeat(1024)),
        ("bytes8", "éééé".to_string()), // 4 characters, 8 bytes
    ];
    for (name, pw) in &valid {
        c.register(name, pw)
            .unwrap_or_else(|e| panic!("password of {} bytes: {e}", pw.len()));
    }
    // The accepted passwords really are the passwords: each logs in, and a one-byte-shorter one does not.
    for (name, pw) in &valid {
        let mut s = server.connect();
        s.login(name, pw, "d", 0)
            .unwrap_or_else(|e| panic!("login with {} bytes: {e}", pw.len()));
    }
    let mut s = server.connect();
    assert_eq!(
        code_of(s.login("kilo", &"z".repeat(1023), "d", 0)),
        code::BAD_CREDENTIALS
    );
    // None of the refused names was created.
    for i in 0..invalid.len() {
        c.register(&format!("bad{i}"), PASSWORD).unwrap();
    }
}

// -------------------------------------------------------------------------------------------------------------
// Logging in
// -------------------------------------------------------------------------------------------------------------

/// [HB-7.4] unknown user and wrong password get the same code and the same text.
#[test]
fn hb_7_4_wrong_password_and_unknown_user_answer_alike() {
    let server = start();
    server.register("alice");
    let mut c = server.connect();
    let wrong = error_of(c.login("alice", "not-the-password", "d", 0));
    let unknown = error_of(c.login("nobody", PASSWORD, "d", 0));
    let invalid_name = error_of(c.login("no such name!", PASSWORD, "d", 0));
    assert_eq!(wrong.0, code::BAD_CREDENTIALS, "{wrong:?}");
    assert_eq!(
        unknown, wrong,
        "unknown user must look like a wrong password"
    );
    assert_eq!(invalid_name, wrong, "a name that cannot exist, likewise");
    // The connection is still open and not logged in; the right password then works.
    assert_eq!(code_of(c.list_tokens()), code::NOT_AUTHENTICATED);
    let info = c.login("alice", PASSWORD, "d", 0).unwrap();
    assert_eq!(info.username, "alice");
}

#[test]
fn resume_on_a_new_connection_gives_the_same_user_and_token() {
    let server = start();
    server.register("alice");
    let (mut first, info) = login_as(&server, "alice", "laptop");
    first.ping().unwrap();
    drop(first);

    let mut c = server.connect();
    let resumed = c.resume(info.token, "laptop", 0).unwrap();
    assert_eq!(resumed.user_id, info.user_id);
    assert_eq!(resumed.token, info.token);
    assert_eq!(resumed.username, "alice");
    // It is a real login: logged-in requests work, and it is the same token (one entry, current).
    let list = c.list_tokens().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].current);
    let before = list[0].clone();

    // [HB-7.14] resuming again (as another device name) issues nothing new and does not move the expiry; the
    // token takes the new device name.
    let mut d = server.connect();
    let again = d.resume(info.token, "tablet", 0).unwrap();
    assert_eq!(again.token, info.token);
    let list = d.list_tokens().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].token_id, before.token_id);
    assert_eq!(list[0].device, "tablet");
    assert_eq!(list[0].expires_at_ms, before.expires_at_ms);
    assert_eq!(list[0].created_at_ms, before.created_at_ms);
    assert!(list[0].last_used_at_ms >= before.last_used_at_ms);

    // A token that was never issued does not resume.
    let mut stranger = server.connect();
    assert_eq!(code_of(stranger.resume([7u8; 16], "x", 0)), code::BAD_TOKEN);
}

/// [HB-7.12] logout revokes the token; the connection stays open, logged out.
#[test]
fn hb_7_12_logout_revokes_the_token_and_keeps_the_connection() {
    let server = start();
    server.register("alice");
    let (mut c, info) = login_as(&server, "alice", "laptop");
    c.logout().unwrap();
    // Still connected, but logged out.
    c.ping().unwrap();
    assert_eq!(code_of(c.list_tokens()), code::NOT_AUTHENTICATED);
    assert_eq!(code_of(c.logout()), code::NOT_AUTHENTICATED);
    // The token is dead, from a new connection and from this one.
    let mut other = server.connect();
    assert_eq!(
        code_of(other.resume(info.token, "laptop", 0)),
        code::BAD_TOKEN
    );
    assert_eq!(code_of(c.resume(info.token, "laptop", 0)), code::BAD_TOKEN);
    // The same connection can log in again, with a new token.
    let again = c.login("alice", PASSWORD, "laptop", 0).unwrap();
    assert_ne!(again.token, info.token);
    let list = c.list_tokens().unwrap();
    assert_eq!(
        list.len(),
        1,
        "the logged-out token is not listed: {list:?}"
    );
}

#[test]
fn expired_token_is_bad_token() {
    let ttl = Duration::from_secs(2);
    let server = start_with(|c| c.token_ttl = ttl);
    server.register("alice");
    let (_c, info) = login_as(&server, "alice", "laptop");
    let issued_by = Instant::now();
    // Well inside its lifetime the token resumes ...
    let mut early = server.connect();
    early.resume(info.token, "laptop", 0).unwrap();
    // ... and once the lifetime is over it does not.
    sleep_until(issued_by + ttl + Duration::from_millis(700));
    let mut late = server.connect();
    let (code, text) = error_of(late.resume(info.token, "laptop", 0));
    assert_eq!(code, code::BAD_TOKEN, "{text}");
    // An expired token is not listed either; a password login still works.
    let (mut fresh, _) = login_as(&server, "alice", "phone");
    let list = fresh.list_tokens().unwrap();
    assert_eq!(list.len(), 1, "only the new token: {list:?}");
    assert_eq!(list[0].device, "phone");
}

/// [HB-7.14] a token is valid for `token_ttl` from issue: exactly that, not cut down to whole seconds.
#[test]
fn hb_7_14_token_lifetime_is_the_configured_ttl_to_the_millisecond() {
    let ttl = Duration::from_millis(1500);
    let server = start_with(|c| c.token_ttl = ttl);
    server.register("alice");
    let (mut c, _) = login_as(&server, "alice", "laptop");
    let list = c.list_tokens().unwrap();
    let t = current_of(&list);
    assert_eq!(
        t.expires_at_ms - t.created_at_ms,
        ttl.as_millis() as u64,
        "{t:?}"
    );

    // Sub-second: the token must at least be usable right away.
    let short = start_with(|c| c.token_ttl = Duration::from_millis(900));
    short.register("bob");
    let (_b, info) = login_as(&short, "bob", "laptop");
    let mut again = short.connect();
    again.resume(info.token, "laptop", 0).unwrap();
}

// -------------------------------------------------------------------------------------------------------------
// Tokens: listing and revoking
// -------------------------------------------------------------------------------------------------------------

#[test]
fn list_tokens_shows_each_device_with_current_for_the_asker() {
    let server = start();
    server.register("alice");
    server.register("bob");
    let (mut laptop, _) = login_as(&server, "alice", "laptop");
    let (mut phone, _) = login_as(&server, "alice", "phone");
    let (mut bob, _) = login_as(&server, "bob", "desk");

    let from_laptop = laptop.list_tokens().unwrap();
    let from_phone = phone.list_tokens().unwrap();
    // Oldest first: the laptop logged in first.
    let order: Vec<&str> = from_phone.iter().map(|t| t.device.as_str()).collect();
    assert_eq!(order, ["laptop", "phone"], "{from_phone:?}");
    assert!(from_phone[0].created_at_ms <= from_phone[1].created_at_ms);
    let mut devices: Vec<&str> = from_laptop.iter().map(|t| t.device.as_str()).collect();
    devices.sort_unstable();
    assert_eq!(
        devices,
        ["laptop", "phone"],
        "only alice's tokens: {from_laptop:?}"
    );
    assert_eq!(current_of(&from_laptop).device, "laptop");
    assert_eq!(current_of(&from_phone).device, "phone");
    // Same tokens, seen from either side.
    let ids = |l: &[TokenEntry]| {
        let mut v: Vec<u64> = l.iter().map(|t| t.token_id).collect();
        v.sort_unstable();
        v
    };
    assert_eq!(ids(&from_laptop), ids(&from_phone));
    for t in &from_laptop {
        assert!(
            t.created_at_ms > 0 && t.expires_at_ms > t.created_at_ms,
            "{t:?}"
        );
        assert!(t.last_used_at_ms >= t.created_at_ms, "{t:?}");
    }
    let bobs = bob.list_tokens().unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!(current_of(&bobs).device, "desk");

    // An empty device name is listed as "unnamed".
    let (mut anon, _) = login_as(&server, "alice", "");
    let list = anon.list_tokens().unwrap();
    assert_eq!(current_of(&list).device, "unnamed");
}

/// [HB-7.9] revoking another device's token closes that device's session with TOKEN_REVOKED.
#[test]
fn hb_7_9_revoking_another_devices_token_closes_its_session() {
    let server = start();
    server.register("alice");
    let (mut laptop, laptop_info) = login_as(&server, "alice", "laptop");
    let (mut phone, _) = login_as(&server, "alice", "phone");
    let list = phone.list_tokens().unwrap();
    let laptop_id = token_id_of(&list, "laptop");
    assert!(
        !list
            .iter()
            .find(|t| t.token_id == laptop_id)
            .unwrap()
            .current
    );

    phone.revoke_token(laptop_id).unwrap();
    let (code, _) = closing_error(&mut laptop, LONG);
    assert_eq!(code, code::TOKEN_REVOKED);
    assert_closed(&mut laptop);

    // Its resume fails; the phone is untouched and sees one token left.
    let mut c = server.connect();
    assert_eq!(
        code_of(c.resume(laptop_info.token, "laptop", 0)),
        code::BAD_TOKEN
    );
    phone.ping().unwrap();
    let list = phone.list_tokens().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(current_of(&list).device, "phone");
    // Revoking it again: it is gone.
    assert_eq!(code_of(phone.revoke_token(laptop_id)), code::NOT_FOUND);
}

#[test]
fn revoke_of_an_unknown_or_foreign_token_is_not_found() {
    let server = start();
    server.register("alice");
    server.register("bob");
    let (mut alice, _) = login_as(&server, "alice", "laptop");
    let (mut bob, _) = login_as(&server, "bob", "desk");
    assert_eq!(code_of(alice.revoke_token(999_999)), code::NOT_FOUND);
    assert_eq!(code_of(alice.revoke_token(0)), code::NOT_FOUND);
    // Bob cannot revoke (or even learn about) Alice's token.
    let alice_id = current_of(&alice.list_tokens().unwrap()).token_id;
    assert_eq!(code_of(bob.revoke_token(alice_id)), code::NOT_FOUND);
    alice.ping().unwrap();
    assert_eq!(alice.list_tokens().unwrap().len(), 1);
    bob.ping().unwrap();
}

#[test]
fn revoking_ones_own_token_logs_out_and_keeps_the_connection() {
    let server = start();
    server.register("alice");
    let (mut c, info) = login_as(&server, "alice", "laptop");
    let own = current_of(&c.list_tokens().unwrap()).token_id;
    c.revoke_token(own).unwrap();
    c.ping().unwrap();
    assert_eq!(code_of(c.list_tokens()), code::NOT_AUTHENTICATED);
    let mut other = server.connect();
    assert_eq!(
        code_of(other.resume(info.token, "laptop", 0)),
        code::BAD_TOKEN
    );
}

/// [HB-7.9] the revocation is committed whether or not the revoking device stays to hear the answer, so the
/// sessions using the token must end all the same.
#[test]
fn hb_7_9_revoked_session_closes_even_if_the_revoker_disconnects_at_once() {
    let server = start();
    server.register("alice");
    let (mut laptop, laptop_info) = login_as(&server, "alice", "laptop");
    let (mut phone, _) = login_as(&server, "alice", "phone");
    let laptop_id = token_id_of(&phone.list_tokens().unwrap(), "laptop");
    phone
        .send_request(&Request::RevokeToken {
            token_id: laptop_id,
        })
        .unwrap();
    phone.stream().shutdown(std::net::Shutdown::Both).unwrap();
    drop(phone);

    // The revocation was committed: the token no longer resumes ...
    // (A fresh connection per try: a try that still resumed would leave its connection logged in.)
    assert!(
        common::eventually(LONG, || matches!(
            server.connect().resume(laptop_info.token, "laptop", 0),
            Err(ClientError::Server {
                code: code::BAD_TOKEN,
                ..
            })
        )),
        "the token was revoked"
    );
    // ... so the session using it must have been closed with TOKEN_REVOKED.
    let (code, _) = closing_error(&mut laptop, Duration::from_secs(5));
    assert_eq!(code, code::TOKEN_REVOKED);
}

/// Pipelining is allowed: "sign out everywhere" as RevokeToken(other device) then Logout in one write must get
/// both answers, in order, and end the other device's session.
#[test]
fn pipelined_revoke_then_logout_answers_both_and_closes_the_revoked_session() {
    let server = start();
    server.register("alice");
    let (mut laptop, _) = login_as(&server, "alice", "laptop");
    let (mut phone, _) = login_as(&server, "alice", "phone");
    let laptop_id = token_id_of(&phone.list_tokens().unwrap(), "laptop");
    phone
        .send_raw(&frames(&[
            (
                1001,
                Request::RevokeToken {
                    token_id: laptop_id,
                },
            ),
            (1002, Request::Logout),
        ]))
        .unwrap();
    let replies = replies_in_order(&mut phone, 2);
    assert_eq!(replies[0], (1001, Packet::Ok));
    assert_eq!(replies[1], (1002, Packet::Ok));
    let (code, _) = closing_error(&mut laptop, LONG);
    assert_eq!(code, code::TOKEN_REVOKED);
    phone.ping().unwrap();
    assert_eq!(code_of(phone.list_tokens()), code::NOT_AUTHENTICATED);
}

// -------------------------------------------------------------------------------------------------------------
// Throttling
// -------------------------------------------------------------------------------------------------------------

/// [HB-7.7] after `login_max_failures` failures the name (and the address) is locked out, even for the right
/// password, until the lockout passes.
#[test]
fn hb_7_7_failed_logins_lock_out_then_the_lockout_passes() {
    let lockout = Duration::from_secs(1);
    let server = start_with(|c| {
        c.login_max_failures = 3;
        c.login_lockout = lockout;
        c.login_window = Duration::from_secs(60);
    });
    server.register("alice");
    server.register("bob");
    let mut c = server.connect();
    for i in 0..3 {
        assert_eq!(
            code_of(c.login("alice", "wrong-password", "d", 0)),
            code::BAD_CREDENTIALS,
            "failure {}",
            i + 1
        );
    }
    let locked_at = Instant::now();
    // The right password is refused while locked out, on this and on a new connection.
    let (code, text) = error_of(c.login("alice", PASSWORD, "d", 0));
    assert_eq!(code, code::RATE_LIMITED, "{text}");
    let wait = retry_ms(&text);
    assert!(
        wait >= 1 && wait <= lockout.as_millis() as u64,
        "retry in {wait} ms for a {lockout:?} lockout"
    );
    let mut other = server.connect();
    assert_eq!(
        code_of(other.login("ALICE", PASSWORD, "d", 0)),
        code::RATE_LIMITED,
        "the name is locked whatever its case"
    );
    // The failures all came from one address (loopback): it is locked out too.
    assert_eq!(
        code_of(other.login("bob", PASSWORD, "d", 0)),
        code::RATE_LIMITED
    );
    // The connection itself is fine.
    c.ping().unwrap();

    // After the lockout the right password works.
    sleep_until(locked_at + lockout + Duration::from_millis(300));
    let info = c.login("alice", PASSWORD, "d", 0).unwrap();
    assert_eq!(info.username, "alice");
    other.login("bob", PASSWORD, "d", 0).unwrap();
}

/// [HB-7.7] a failure after a lockout locks out again for twice as long.
#[test]
fn hb_7_7_lockout_doubles_on_further_failures() {
    let lockout = Duration::from_secs(2);
    let server = start_with(|c| {
        c.login_max_failures = 2;
        c.login_lockout = lockout;
        c.login_lockout_max = Duration::from_secs(60);
    });
    server.register("alice");
    let mut c = server.connect();
    for _ in 0..2 {
        assert_eq!(
            code_of(c.login("alice", "wrong-password", "d", 0)),
            code::BAD_CREDENTIALS
        );
    }
    let locked_at = Instant::now();
    assert_eq!(
        code_of(c.login("alice", PASSWORD, "d", 0)),
        code::RATE_LIMITED
    );
    sleep_until(locked_at + lockout + Duration::from_millis(300));
    // One more failure after the first lockout: locked again, for 2 × lockout.
    assert_eq!(
        code_of(c.login("alice", "wrong-password", "d", 0)),
        code::BAD_CREDENTIALS
    );
    let (code, text) = error_of(c.login("alice", PASSWORD, "d", 0));
    assert_eq!(code, code::RATE_LIMITED, "{text}");
    let wait = retry_ms(&text);
    assert!(
        wait > lockout.as_millis() as u64 && wait <= 2 * lockout.as_millis() as u64,
        "the second lockout is twice the first: retry in {wait} ms"
    );
    thread::sleep(Duration::from_millis(wait + 300));
    c.login("alice", PASSWORD, "d", 0).unwrap();
}

/// [HB-7.7] a failed Resume (BAD_TOKEN) counts for the address: enough of them lock out Resume and Login from
/// that address, even with a good token or password, until the lockout passes.
#[test]
fn hb_7_7_failed_resumes_lock_out_the_address() {
    let lockout = Duration::from_secs(1);
    let server = start_with(|c| {
        c.login_max_failures = 3;
        c.login_lockout = lockout;
    });
    server.register("alice");
    let (_keep, info) = login_as(&server, "alice", "laptop");
    let mut c = server.connect();
    for i in 0..3u8 {
        assert_eq!(
            code_of(c.resume([i + 1; 16], "x", 0)),
            code::BAD_TOKEN,
            "failure {}",
            i + 1
        );
    }
    let locked_at = Instant::now();
    let (code, text) = error_of(c.resume(info.token, "laptop", 0));
    assert_eq!(code, code::RATE_LIMITED, "{text}");
    assert!(retry_ms(&text) <= lockout.as_millis() as u64, "{text}");
    assert_eq!(
        code_of(c.login("alice", PASSWORD, "d", 0)),
        code::RATE_LIMITED
    );

    sleep_until(locked_at + lockout + Duration::from_millis(300));
    let resumed = c.resume(info.token, "laptop", 0).unwrap();
    assert_eq!(resumed.user_id, info.user_id);
}

// -------------------------------------------------------------------------------------------------------------
// Timeouts, state and pipelining
// -------------------------------------------------------------------------------------------------------------

/// [HB-7.10] a connection that never logs in is closed with AUTH_TIMEOUT (Ping does not count as logging in);
/// one that logs in in time is not; one that logs out gets a fresh deadline.
#[test]
fn hb_7_10_auth_timeout_closes_only_connections_that_are_not_logged_in() {
    let auth_timeout = Duration::from_millis(500);
    let server = start_with(|c| c.auth_timeout = auth_timeout);
    server.register("alice");

    let started = Instant::now();
    let mut silent = server.connect();
    let mut pinger = server.connect();
    let (mut logged_in, _) = login_as(&server, "alice", "laptop");
    assert_eq!(silent.hello().auth_timeout_ms, 500);

    let (code, text) = closing_error(&mut silent, LONG);
    assert_eq!(code, code::AUTH_TIMEOUT, "{text}");
    assert!(
        started.elapsed() + Duration::from_millis(50) >= auth_timeout,
        "closed after {:?}, before the {auth_timeout:?} deadline",
        started.elapsed()
    );
    assert_closed(&mut silent);

    // Pinging is not logging in.
    let deadline = Instant::now() + LONG;
    loop {
        assert!(Instant::now() < deadline, "the pinger was never closed");
        if pinger.ping().is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let (code, _) = closing_error(&mut pinger, LONG);
    assert_eq!(code, code::AUTH_TIMEOUT);

    // The logged-in connection is well past the deadline and still served.
    sleep_until(started + 3 * auth_timeout);
    logged_in.ping().unwrap();
    logged_in.list_tokens().unwrap();

    // [HB-7.12] after logout it stays open (a fresh deadline, not the long-gone one from connect) ...
    logged_in.logout().unwrap();
    logged_in.ping().unwrap();
    // ... until that new deadline passes without a login.
    let (code, _) = closing_error(&mut logged_in, LONG);
    assert_eq!(code, code::AUTH_TIMEOUT);
    assert_closed(&mut logged_in);
}

/// [HB-7.13] login (register, resume) while logged in is ALREADY_AUTHENTICATED; account requests before login
/// are NOT_AUTHENTICATED. Neither closes the connection.
#[test]
fn hb_7_13_already_authenticated_and_not_authenticated() {
    let server = start();
    server.register("alice");
    let mut c = server.connect();
    assert_eq!(code_of(c.list_tokens()), code::NOT_AUTHENTICATED);
    assert_eq!(code_of(c.logout()), code::NOT_AUTHENTICATED);
    assert_eq!(code_of(c.revoke_token(1)), code::NOT_AUTHENTICATED);
    c.ping().unwrap();

    let info = c.login("alice", PASSWORD, "laptop", 0).unwrap();
    assert_eq!(
        code_of(c.login("alice", PASSWORD, "laptop", 0)),
        code::ALREADY_AUTHENTICATED
    );
    assert_eq!(
        code_of(c.register("carol", PASSWORD)),
        code::ALREADY_AUTHENTICATED
    );
    assert_eq!(
        code_of(c.resume(info.token, "laptop", 0)),
        code::ALREADY_AUTHENTICATED
    );
    // Still logged in as before, with just the one token.
    let list = c.list_tokens().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    // "carol" was not registered by the refused request.
    let mut other = server.connect();
    other.register("carol", PASSWORD).unwrap();
}

/// [HB-7.3] frames sent right behind a Login are processed after it, in order.
#[test]
fn hb_7_3_frames_pipelined_behind_a_login_run_after_it_in_order() {
    let server = start();
    server.register("alice");
    let mut c = server.connect();
    // Ping needs no worker, so it is answered the moment it is processed: after LoginOk only if it waited for
    // the login. ListTokens needs the store and succeeds only if it runs once the login is done.
    c.send_raw(&frames(&[
        (1001, login_request("alice", PASSWORD, "laptop")),
        (1002, Request::Ping),
        (1003, Request::ListTokens),
    ]))
    .unwrap();
    let replies = replies_in_order(&mut c, 3);
    let ids: Vec<u32> = replies.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [1001, 1002, 1003], "{replies:?}");
    assert!(
        matches!(replies[0].1, Packet::LoginOk { .. }),
        "{replies:?}"
    );
    assert_eq!(replies[1].1, Packet::Pong);
    match &replies[2].1 {
        Packet::Tokens(list) => {
            assert_eq!(list.len(), 1);
            assert_eq!(current_of(list).device, "laptop");
        }
        other => panic!("ListTokens ran before the login finished: {other:?}"),
    }

    // Register, Login and ListTokens in one write; and a failed login's followers see it failed.
    let mut d = server.connect();
    d.send_raw(&frames(&[
        (2001, register_request("bob")),
        (2002, login_request("bob", PASSWORD, "desk")),
        (2003, Request::ListTokens),
        (2004, Request::Logout),
        (2005, login_request("bob", "wrong-password", "desk")),
        (2006, Request::ListTokens),
    ]))
    .unwrap();
    let replies = replies_in_order(&mut d, 6);
    let ids: Vec<u32> = replies.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [2001, 2002, 2003, 2004, 2005, 2006], "{replies:?}");
    assert_eq!(replies[0].1, Packet::Ok);
    assert!(matches!(&replies[1].1, Packet::LoginOk { username, .. } if username == "bob"));
    assert!(matches!(&replies[2].1, Packet::Tokens(l) if l.len() == 1));
    assert_eq!(replies[3].1, Packet::Ok);
    assert!(
        matches!(&replies[4].1, Packet::Error { code, .. } if *code == code::BAD_CREDENTIALS),
        "{replies:?}"
    );
    assert!(
        matches!(&replies[5].1, Packet::Error { code, .. } if *code == code::NOT_AUTHENTICATED),
        "{replies:?}"
    );
}

// -------------------------------------------------------------------------------------------------------------
// Several sessions of one user
// -------------------------------------------------------------------------------------------------------------

/// [HB-7.5] a user is online while any session is: two devices both work, and after one logs out the other
/// still gets live messages.
#[test]
fn hb_7_5_two_devices_at_once_both_stay_usable() {
    let server = start();
    server.register("alice");
    server.register("bob");
    let (mut laptop, a1) = login_as(&server, "alice", "laptop");
    let (mut phone, a2) = login_as(&server, "alice", "phone");
    assert_eq!(a1.user_id, a2.user_id);
    for _ in 0..3 {
        laptop.ping().unwrap();
        phone.ping().unwrap();
    }
    assert_eq!(current_of(&laptop.list_tokens().unwrap()).device, "laptop");
    assert_eq!(current_of(&phone.list_tokens().unwrap()).device, "phone");

    let (mut bob, _) = login_as(&server, "bob", "desk");
    bob.send_message("alice", 1, "to both").unwrap();
    assert_eq!(laptop.next_message(LONG).unwrap().text, "to both");
    assert_eq!(phone.next_message(LONG).unwrap().text, "to both");

    laptop.logout().unwrap();
    bob.send_message("alice", 2, "phone only").unwrap();
    assert_eq!(phone.next_message(LONG).unwrap().text, "phone only");
    phone.ping().unwrap();
    // The logged-out laptop gets nothing more.
    match laptop.next_message(Duration::from_millis(500)) {
        Err(ClientError::Timeout) => {}
        other => panic!("a logged-out session got {other:?}"),
    }
}

/// [HB-7.6] with at most 2 sessions per user, a third login closes the oldest with SESSION_REPLACED.
#[test]
fn hb_7_6_a_login_past_the_limit_replaces_the_oldest_session() {
    let server = start_with(|c| c.max_sessions_per_user = 2);
    server.register("alice");
    server.register("bob");
    let (mut first, _) = login_as(&server, "alice", "one");
    let (mut second, _) = login_as(&server, "alice", "two");
    let (mut bob, _) = login_as(&server, "bob", "desk");
    first.ping().unwrap();
    second.ping().unwrap();

    let (mut third, _) = login_as(&server, "alice", "three");
    let (code, text) = closing_error(&mut first, LONG);
    assert_eq!(code, code::SESSION_REPLACED, "{text}");
    assert_closed(&mut first);
    second.ping().unwrap();
    third.ping().unwrap();
    bob.ping().unwrap();

    // One more: now "two" is the oldest and goes; "three" stays.
    let (mut fourth, _) = login_as(&server, "alice", "four");
    let (code, _) = closing_error(&mut second, LONG);
    assert_eq!(code, code::SESSION_REPLACED);
    third.ping().unwrap();
    fourth.ping().unwrap();
    // Another user's sessions do not count against alice's limit.
    bob.ping().unwrap();
}

// -------------------------------------------------------------------------------------------------------------
// Overload and failures
// -------------------------------------------------------------------------------------------------------------

/// [HB-7.8] with one hash thread and a queue of one, a burst of Registers gets SERVER_BUSY for what does not
/// fit, Ok for the rest, and the loop keeps answering Ping meanwhile.
#[test]
fn hb_7_8_full_hash_queue_answers_server_busy() {
    let server = start_with(|c| {
        c.hash_threads = 1;
        c.hash_queue = 1;
        // Expensive hashes in a debug build take seconds: registered-but-not-logged-in clients must stay.
        c.auth_timeout = Duration::from_secs(300);
        c.hash_params = HashParams {
            memory_kib: 65536,
            iterations: 3,
            parallelism: 1,
        };
    });
    const N: usize = 12;
    let mut clients: Vec<Client> = (0..N).map(|_| server.connect()).collect();
    let ids: Vec<u32> = clients
        .iter_mut()
        .enumerate()
        .map(|(i, c)| {
            c.send_request(&register_request(&format!("busy{i}")))
                .unwrap()
        })
        .collect();
    // The loop does not hash: a Ping is answered while the pool is saturated.
    let mut pinger = server.connect();
    let t = Instant::now();
    pinger.ping().unwrap();
    eprintln!("ping while hashing: {:?}", t.elapsed());

    let (mut ok, mut busy) = (Vec::new(), Vec::new());
    for (i, (c, id)) in clients.iter_mut().zip(&ids).enumerate() {
        match c.wait_reply(*id, Duration::from_secs(180)) {
            Ok(Packet::Ok) => ok.push(i),
            Err(ClientError::Server { code, text }) if code == code::SERVER_BUSY => {
                assert!(!text.is_empty());
                busy.push(i)
            }
            other => panic!("register {i}: expected Ok or SERVER_BUSY, got {other:?}"),
        }
        c.ping().unwrap();
    }
    eprintln!("{} Ok, {} SERVER_BUSY", ok.len(), busy.len());
    assert!(!busy.is_empty(), "a burst of {N} never hit the full queue");
    assert!(!ok.is_empty(), "the first request always fits");
    pinger.ping().unwrap();

    // A refused registration created nothing: the name is still free.
    // (An expensive hash in a debug build on a busy machine can outlast the client's default timeout.)
    let refused = busy[0];
    let c = &mut clients[refused];
    let id = c
        .send_request(&register_request(&format!("busy{refused}")))
        .unwrap();
    assert_eq!(
        c.wait_reply(id, Duration::from_secs(180)).unwrap(),
        Packet::Ok
    );
}

/// [HB-7.3] [HB-7.6] a storm of 200 logins at once: all succeed, and a client pinging meanwhile is always
/// answered. Prints the ping round trips and the storm's duration.
#[test]
fn login_storm_of_200_while_another_client_pings() {
    const THREADS: usize = 20;
    const PER_THREAD: usize = 10;
    const USERS: usize = THREADS * PER_THREAD;
    let server = Arc::new(start_with(|c| {
        c.max_per_ip = 1000;
        c.max_connections = 1000;
        // Slow machines: the registering connections never log in.
        c.auth_timeout = Duration::from_secs(300);
    }));

    // Registration beforehand, a few connections in parallel.
    let registrars: Vec<_> = (0..8)
        .map(|t| {
            let server = Arc::clone(&server);
            thread::spawn(move || {
                let mut c = server.connect();
                for u in (t..USERS).step_by(8) {
                    c.register(&format!("storm{u}"), PASSWORD).unwrap();
                }
            })
        })
        .collect();
    for r in registrars {
        r.join().unwrap();
    }
    server.register("pinger");

    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let server = Arc::clone(&server);
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let (mut c, _) = login_as(&server, "pinger", "p");
            let mut rtts = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if let Err(e) = c.ping() {
                    return Err(format!("ping {} failed: {e}", rtts.len() + 1));
                }
                rtts.push(t.elapsed());
                thread::sleep(Duration::from_millis(5));
            }
            Ok(rtts)
        })
    };

    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let server = Arc::clone(&server);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let mut sessions = Vec::new();
                for k in 0..PER_THREAD {
                    let name = format!("storm{}", t * PER_THREAD + k);
                    let mut c = server.connect();
                    let id = c
                        .send_request(&login_request(&name, PASSWORD, "storm"))
                        .unwrap();
                    sessions.push((name, c, id));
                }
                let mut logged_in = 0;
                for (name, c, id) in &mut sessions {
                    match c.wait_reply(*id, Duration::from_secs(120)) {
                        Ok(Packet::LoginOk { username, .. }) if username == *name => logged_in += 1,
                        other => panic!("login {name}: {other:?}"),
                    }
                }
                // Keep every session open until all threads are done, so all 200 are online at once.
                (logged_in, sessions)
            })
        })
        .collect();
    barrier.wait();
    let storm_started = Instant::now();
    let mut logged_in = 0;
    let mut kept = Vec::new();
    for w in workers {
        let (n, sessions) = w.join().expect("a storm thread failed");
        logged_in += n;
        kept.push(sessions);
    }
    let storm = storm_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut rtts = pinger.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(logged_in, USERS);
    assert!(!rtts.is_empty(), "the pinger never got to ping");

    // Every stormer is still served after the storm.
    for sessions in &mut kept {
        for (name, c, _) in sessions.iter_mut() {
            c.ping()
                .unwrap_or_else(|e| panic!("{name} after the storm: {e}"));
        }
    }
    rtts.sort_unstable();
    eprintln!(
        "login storm: {USERS} logins in {storm:?}; {} pings, rtt max {:?}, p99 {:?}, median {:?}",
        rtts.len(),
        rtts[rtts.len() - 1],
        percentile(&rtts, 0.99),
        percentile(&rtts, 0.5),
    );
}

/// A database the server cannot write (another connection holds SQLite's write lock): Register answers
/// SERVER_ERROR after the store's busy timeout, the connection and the server carry on, and once the lock is
/// released Register works.
#[test]
fn unwritable_database_answers_server_error_and_recovers() {
    // The test connection stays logged out through a 5 s busy timeout: keep it clear of the auth timeout.
    let server = start_with(|c| c.auth_timeout = Duration::from_secs(300));
    server.register("alice");
    let mut c = server.connect();
    c.ping().unwrap();

    let blocker = rusqlite::Connection::open(&server.config.db).unwrap();
    blocker.busy_timeout(Duration::from_secs(30)).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let id = c.send_request(&register_request("bob")).unwrap();
    // The store waits out its busy timeout (5 s) first: wait well beyond the client's default.
    let (code, text) = error_of(c.wait_reply(id, Duration::from_secs(60)));
    assert_eq!(code, code::SERVER_ERROR, "{text}");
    assert_eq!(code, 110);
    assert!(
        text.contains("database") && text.len() > 10,
        "a clear text: {text:?}"
    );
    // The connection stays open and usable, and the server still serves others.
    c.ping().unwrap();
    let mut other = server.connect();
    other.ping().unwrap();

    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);

    c.register("bob", PASSWORD).unwrap();
    let info = c.login("bob", PASSWORD, "desk", 0).unwrap();
    assert_eq!(info.username, "bob");
    let (_a, alice) = login_as(&server, "alice", "laptop");
    assert_ne!(alice.user_id, info.user_id);
}
