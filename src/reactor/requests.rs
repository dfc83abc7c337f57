//! What each client request means: checked against the session's state, answered at once when no worker is
//! needed (Ping), or turned into a job for the store or the hashing pool whose completion finishes it
//! (see `completions.rs`).
//!
//! Must not: block, or answer a request that needs a worker before that worker has answered.

use super::Reactor;
use crate::auth::{canonical_username, check_password, HashJob, HashOp, RuleError};
use crate::framing::Header;
use crate::protocol::{code, Packet, Request, DEVICE_MAX};
use crate::session::{PendingAuth, State, Ticket};
use crate::store::{self, Op};
use log::debug;

impl Reactor {
    /// Decodes one frame's body and acts on it. A body that does not decode is answered with MALFORMED and the
    /// connection stays open: the frame boundary is known, so the stream is still in step ([HB-4.1]).
    pub(super) fn handle_frame(&mut self, slot: usize, header: Header, body: &[u8]) {
        let request = match Request::decode(header.kind, body) {
            Ok(request) => request,
            Err(e) => return self.fail(slot, header.request_id, code::MALFORMED, &e.to_string()),
        };
        let rid = header.request_id;
        if rid == 0 {
            return self.fail(
                slot,
                0,
                code::MALFORMED,
                "request id 0 is reserved for server pushes",
            );
        }
        let logged_in = self.sessions[slot].identity().is_some();
        match request {
            Request::Ping => self.send(slot, rid, &Packet::Pong),
            Request::Register { .. } | Request::Login { .. } | Request::Resume { .. }
                if logged_in =>
            {
                self.fail(
                    slot,
                    rid,
                    code::ALREADY_AUTHENTICATED,
                    "already logged in; Logout first",
                )
            }
            Request::Register { username, password } => {
                self.register(slot, rid, username, password)
            }
            Request::Login {
                username,
                password,
                device,
                last_seen,
            } => self.login(slot, rid, username, password, device, last_seen),
            Request::Resume {
                token,
                device,
                last_seen,
            } => self.resume(slot, rid, token, device, last_seen),
            _ if !logged_in => self.fail(slot, rid, code::NOT_AUTHENTICATED, "log in first"),
            Request::Logout => self.logout(slot, rid),
            Request::ListTokens => self.list_tokens(slot, rid),
            Request::RevokeToken { token_id } => self.revoke_token(slot, rid, token_id),
            Request::Send {
                recipient,
                client_msg_id,
                text,
            } => self.send_message(slot, rid, recipient, client_msg_id, text),
            Request::Received { up_to } => self.received(slot, rid, up_to),
            Request::Read { peer, up_to } => self.read_receipt(slot, rid, peer, up_to),
            Request::History {
                peer,
                before_id,
                limit,
            } => self.history(slot, rid, peer, before_id, limit),
            Request::Stats => self.send_stats(slot, rid),
            _ => self.rooms_and_presence(slot, rid, request),
        }
    }

    pub(super) fn ticket(&self, slot: usize, request_id: u32) -> Ticket {
        Ticket {
            session: self.sessions[slot].id,
            slot,
            request_id,
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // Accounts
    // -----------------------------------------------------------------------------------------------------------

    /// Register: check the rules here, hash on the pool, then create the user in the store.
    fn register(&mut self, slot: usize, rid: u32, username: String, password: String) {
        let username = match canonical_username(&username) {
            Ok(name) => name,
            Err(_) => return self.fail(slot, rid, code::INVALID_USERNAME, USERNAME_RULE),
        };
        if check_password(&password) == Err(RuleError::InvalidPassword) {
            return self.fail(slot, rid, code::INVALID_PASSWORD, PASSWORD_RULE);
        }
        let job = HashJob {
            ticket: self.ticket(slot, rid),
            op: HashOp::Hash { password },
        };
        if self.submit_hash(slot, rid, job) {
            self.sessions[slot].state = State::Authenticating(PendingAuth::Register { username });
        }
    }

    /// Login: throttle, then fetch the credentials from the store; the completion verifies on the hash pool.
    fn login(
        &mut self,
        slot: usize,
        rid: u32,
        username: String,
        password: String,
        device: String,
        last_seen: u64,
    ) {
        let Some(device) = self.check_device(slot, rid, device) else {
            return;
        };
        // A name that breaks the rules cannot exist: answer exactly as for an unknown user ([HB-7.4]).
        let name = canonical_username(&username).unwrap_or(username);
        if self.throttled(slot, rid, Some(&name)) || self.hash_queue_full(slot, rid) {
            return;
        }
        let job = store::Job {
            ticket: self.ticket(slot, rid),
            op: Op::LookupUser {
                username: name.clone(),
            },
        };
        self.sessions[slot].state = State::Authenticating(PendingAuth::Login {
            username: name,
            password,
            device,
            last_seen,
            account: None,
        });
        self.submit_store(job);
    }

    /// Resume: a token needs no hash, so a reconnect storm after a restart costs one store lookup per client.
    fn resume(&mut self, slot: usize, rid: u32, token: [u8; 16], device: String, last_seen: u64) {
        let Some(device) = self.check_device(slot, rid, device) else {
            return;
        };
        if self.throttled(slot, rid, None) {
            return;
        }
        let job = store::Job {
            ticket: self.ticket(slot, rid),
            op: Op::ResumeToken {
                token,
                device: device.clone(),
            },
        };
        self.sessions[slot].state = State::Authenticating(PendingAuth::Resume {
            token,
            device,
            last_seen,
        });
        self.submit_store(job);
    }

    /// Logout revokes this session's token; the session stays connected, logged out.
    fn logout(&mut self, slot: usize, rid: u32) {
        let Some(identity) = self.sessions[slot].identity() else {
            return;
        };
        let op = Op::RevokeToken {
            user_id: identity.user_id,
            token_id: identity.token_id,
        };
        let job = store::Job {
            ticket: self.ticket(slot, rid),
            op,
        };
        let State::Ready(identity) =
            std::mem::replace(&mut self.sessions[slot].state, State::Connected)
        else {
            return;
        };
        let awaiting = super::Awaiting::Revoke {
            user: identity.user_id,
            token_id: identity.token_id,
        };
        self.awaiting.push((job.ticket, awaiting));
        // The session stays in the hub until the store confirms: if the revoke fails it is still logged in.
        self.sessions[slot].state = State::Authenticating(PendingAuth::Logout { identity });
        self.submit_store(job);
    }

    fn list_tokens(&mut self, slot: usize, rid: u32) {
        let Some(identity) = self.sessions[slot].identity() else {
            return;
        };
        let op = Op::ListTokens {
            user_id: identity.user_id,
        };
        self.store_job(slot, rid, op);
    }

    fn revoke_token(&mut self, slot: usize, rid: u32, token_id: u64) {
        let Some(identity) = self.sessions[slot].identity() else {
            return;
        };
        if identity.token_id == token_id {
            return self.logout(slot, rid);
        }
        let job = store::Job {
            ticket: self.ticket(slot, rid),
            op: Op::RevokeToken {
                user_id: identity.user_id,
                token_id,
            },
        };
        let awaiting = super::Awaiting::Revoke {
            user: identity.user_id,
            token_id,
        };
        self.awaiting.push((job.ticket, awaiting));
        self.submit_store(job);
    }

    /// A device name is optional (empty means "unnamed"), at most DEVICE_MAX bytes, without control characters.
    fn check_device(&mut self, slot: usize, rid: u32, device: String) -> Option<String> {
        if device.len() > DEVICE_MAX || device.chars().any(char::is_control) {
            self.fail(
                slot,
                rid,
                code::INVALID_DEVICE,
                "device names are at most 64 bytes, without control characters",
            );
            return None;
        }
        Some(if device.is_empty() {
            "unnamed".to_owned()
        } else {
            device
        })
    }

    /// Refuses an attempt while its username or client address is locked out after repeated failures ([HB-7.7]).
    fn throttled(&mut self, slot: usize, rid: u32, username: Option<&String>) -> bool {
        let now = self.now;
        let ip = self.sessions[slot].peer.ip();
        let by_addr = self.addr_throttle.check(&ip, now);
        let by_name = username.map_or(Ok(()), |name| self.name_throttle.check(name, now));
        let wait = match (by_addr, by_name) {
            (Ok(()), Ok(())) => return false,
            (Err(a), Err(b)) => a.max(b),
            (Err(a), _) | (_, Err(a)) => a,
        };
        let text = format!(
            "too many failed attempts; retry in {} ms",
            wait.as_millis().max(1)
        );
        self.fail(slot, rid, code::RATE_LIMITED, &text);
        true
    }

    // -----------------------------------------------------------------------------------------------------------
    // Handing work to the workers
    // -----------------------------------------------------------------------------------------------------------

    /// Queues `op` for the store, answered to request `rid` of this session.
    pub(super) fn store_job(&mut self, slot: usize, rid: u32, op: Op) {
        let ticket = self.ticket(slot, rid);
        self.submit_store(store::Job { ticket, op });
    }

    /// Queues a job for the store. Never blocks and never drops: what the bounded job queue (`store/queue.rs`) will not take waits in
    /// the backlog, and while the backlog is non-empty the loop reads no new frames (see `may_take_frames`).
    pub(super) fn submit_store(&mut self, job: store::Job) {
        if !self.store_backlog.is_empty() {
            self.store_backlog.push_back(job);
            return;
        }
        let Some(store) = &self.store else { return };
        if let Err(job) = store.try_submit(job) {
            debug!("store queue full: backpressure on");
            self.store_backlog.push_back(job);
        }
    }

    /// Moves backlogged jobs into the store's queue, in order, as far as it takes them.
    pub(super) fn pump_store_backlog(&mut self) {
        let Some(store) = &self.store else { return };
        while let Some(job) = self.store_backlog.pop_front() {
            if let Err(job) = store.try_submit(job) {
                self.store_backlog.push_front(job);
                return;
            }
        }
    }

    /// Answers SERVER_BUSY at once when the hashing queue is full, before any other work is spent on a login
    /// that would be refused anyway ([HB-7.8]). True if it was full.
    fn hash_queue_full(&mut self, slot: usize, rid: u32) -> bool {
        let full = self
            .hasher
            .as_ref()
            .is_some_and(|h| h.queue_depth() >= self.config.hash_queue);
        if full {
            self.fail(slot, rid, code::SERVER_BUSY, "server busy, try again");
        }
        full
    }

    /// Queues a job for the hashing pool; when its queue is full the client is told "server busy" at once rather
    /// than waiting without end ([HB-7.8]). True if the job was queued.
    pub(super) fn submit_hash(&mut self, slot: usize, rid: u32, mut job: HashJob) -> bool {
        let Some(hasher) = &self.hasher else {
            job.op.wipe();
            return false;
        };
        // The pool's channel holds `hash_queue` jobs, so a full queue shows here; the job comes back with its
        // password, which is wiped before it is dropped.
        match hasher.try_submit(job) {
            Ok(()) => true,
            Err(mut job) => {
                job.op.wipe();
                self.sessions[slot].state = State::Connected;
                self.fail(slot, rid, code::SERVER_BUSY, "server busy, try again");
                false
            }
        }
    }
}

pub(super) const USERNAME_RULE: &str =
    "usernames are 3-32 characters of a-z 0-9 _ . - (capitals are accepted and folded to lowercase)";
pub(super) const PASSWORD_RULE: &str = "passwords are 8-1024 bytes";
