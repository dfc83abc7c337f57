//! What a worker's answer means: the second half of every request that needed the store or the hashing pool.
//!
//! Every completion carries the `Ticket` of its request. The session it names may have closed while the worker
//! was busy, and its slot may already belong to a new connection: a completion whose session id does not match
//! the slot's current session gets no reply. What the store committed takes effect all the same: room changes
//! reach the room, a stored message is routed live and its receipts sent, a revoked token closes its sessions;
//! only the reply depends on the asking session.
//!
//! Must not: block, or call a worker synchronously. Wakes coalesce, so each wake drains *every* completion.

use super::messages::FEED;
use super::Reactor;
use crate::auth::{HashDone, HashJob, HashOp, HashOutcome};
use crate::hub::SessionRef;
use crate::protocol::{code, Packet, TokenEntry};
use crate::session::{Feed, Identity, PendingAuth, State, Ticket};
use crate::store::{self, Account, Op, Outcome};
use log::{error, info, warn};

impl Reactor {
    /// Phase 2: take every answer the workers have sent since the last turn.
    pub(super) fn drain_completions(&mut self) {
        while let Ok(done) = self.hash_done.try_recv() {
            self.on_hash_done(done);
        }
        while let Ok(done) = self.store_done.try_recv() {
            self.on_store_done(done);
        }
        // The store took jobs off its queue: hand it what waited, and let parked sessions read again.
        self.pump_store_backlog();
    }

    /// Takes the context kept for a request in flight (the oldest, if a client reused a request id).
    pub(super) fn take_awaiting(&mut self, ticket: Ticket) -> Option<super::Awaiting> {
        let at = self.awaiting.iter().position(|(t, _)| *t == ticket)?;
        Some(self.awaiting.remove(at).1)
    }

    /// Sends a reply to the asking session, if it is still there.
    pub(super) fn answer(&mut self, slot: Option<usize>, rid: u32, packet: &Packet) {
        if let Some(slot) = slot {
            self.send(slot, rid, packet);
        }
    }

    /// Sends an Error reply to the asking session, if it is still there.
    pub(super) fn refuse(&mut self, slot: Option<usize>, rid: u32, code: u16, text: &str) {
        if let Some(slot) = slot {
            self.fail(slot, rid, code, text);
        }
    }

    /// The slot of the session a ticket names, if that session is still open.
    fn live_slot(&self, ticket: &Ticket) -> Option<usize> {
        self.sessions
            .get(ticket.slot)
            .filter(|s| s.id == ticket.session && !s.is_closing())
            .map(|_| ticket.slot)
    }

    // -----------------------------------------------------------------------------------------------------------
    // The hashing pool
    // -----------------------------------------------------------------------------------------------------------

    fn on_hash_done(&mut self, done: HashDone) {
        let Some(slot) = self.live_slot(&done.ticket) else {
            return;
        };
        let rid = done.ticket.request_id;
        let pending = std::mem::replace(&mut self.sessions[slot].state, State::Connected);
        match (pending, done.outcome) {
            (
                State::Authenticating(PendingAuth::Register { username }),
                HashOutcome::Hashed(Ok(phc)),
            ) => {
                let job = store::Job {
                    ticket: done.ticket,
                    op: Op::CreateUser {
                        username: username.clone(),
                        phc,
                    },
                };
                self.sessions[slot].state =
                    State::Authenticating(PendingAuth::Register { username });
                self.submit_store(job);
            }
            (State::Authenticating(PendingAuth::Register { .. }), HashOutcome::Hashed(Err(e))) => {
                error!("hashing failed: {e}");
                self.fail(
                    slot,
                    rid,
                    code::SERVER_ERROR,
                    "server error while hashing; try again",
                );
            }
            (
                State::Authenticating(PendingAuth::Login {
                    username,
                    device,
                    last_seen,
                    account,
                    ..
                }),
                HashOutcome::Verified(ok),
            ) => match account.filter(|_| ok) {
                Some(account) => {
                    let ttl_ms = self.config.token_ttl.as_millis().min(u64::MAX as u128) as u64;
                    let op = Op::IssueToken {
                        user_id: account.user_id,
                        device: device.clone(),
                        ttl_ms,
                    };
                    self.sessions[slot].state = State::Authenticating(PendingAuth::Login {
                        username,
                        password: String::new(),
                        device,
                        last_seen,
                        account: Some(account),
                    });
                    self.submit_store(store::Job {
                        ticket: done.ticket,
                        op,
                    });
                }
                None => self.login_failed(slot, rid, username),
            },
            (other, outcome) => {
                warn!("hash answer {outcome:?} does not fit session state; ignored");
                self.sessions[slot].state = other;
            }
        }
    }

    /// The same answer whether the user is unknown or the password wrong ([HB-7.4]); both count as a failure
    /// for the name and for the client's address.
    fn login_failed(&mut self, slot: usize, rid: u32, username: String) {
        let ip = self.sessions[slot].peer.ip();
        info!("login refused {} for {username}", self.sessions[slot].uuid);
        self.addr_throttle.record_failure(ip, self.now);
        self.name_throttle.record_failure(username, self.now);
        self.restart_auth_clock(slot);
        self.fail(slot, rid, code::BAD_CREDENTIALS, "bad username or password");
    }

    // -----------------------------------------------------------------------------------------------------------
    // The store
    // -----------------------------------------------------------------------------------------------------------

    fn on_store_done(&mut self, done: store::Done) {
        if let Outcome::Stopped = done.outcome {
            if let Some(progress) = &mut self.shutdown {
                progress.store_stopped = true;
            }
            return;
        }
        // Taken even when the session has gone, so that nothing is left behind in `awaiting`.
        let mut awaiting = self.take_awaiting(done.ticket);
        let mut revoked_token = None;
        if let Some(super::Awaiting::Revoke { user, token_id }) = awaiting {
            awaiting = None;
            revoked_token = Some(token_id);
            if let Outcome::Revoked(true) = done.outcome {
                self.close_sessions_of_token(user, token_id);
            }
        }
        let slot = self.live_slot(&done.ticket);
        // What the store committed takes effect for everyone else whether or not the asker is still here to
        // hear the answer (it may have sent the request and hung up in the same breath): only the reply
        // depends on the asking session.
        let outcome = match self.on_room_done(slot, done.ticket, done.outcome, awaiting) {
            Some(other) => other,
            None => return,
        };
        let outcome = match self.on_shared_message_done(slot, done.ticket.request_id, outcome) {
            Some(other) => other,
            None => return,
        };
        let Some(slot) = slot else {
            return;
        };
        let done = store::Done {
            ticket: done.ticket,
            outcome,
        };
        let rid = done.ticket.request_id;
        if let Outcome::Failed(e) = &done.outcome {
            error!("store failed for session {}: {e}", self.sessions[slot].uuid);
            if rid == FEED {
                return self.feed_page_failed(slot);
            }
            self.undo_pending(slot);
            return self.fail(
                slot,
                rid,
                code::SERVER_ERROR,
                "server error: the database failed; try again",
            );
        }
        match done.outcome {
            Outcome::UserCreated { user_id } => {
                self.sessions[slot].state = State::Connected;
                info!(
                    "registered user {user_id} from {}",
                    self.sessions[slot].uuid
                );
                self.send(slot, rid, &Packet::Ok);
            }
            Outcome::UsernameTaken => {
                self.sessions[slot].state = State::Connected;
                self.fail(slot, rid, code::USERNAME_TAKEN, "that username is taken");
            }
            Outcome::Credentials(found) => self.verify_credentials(slot, done.ticket, found),
            Outcome::TokenIssued {
                token,
                token_id,
                account,
            } => self.logged_in(slot, rid, token, token_id, account),
            Outcome::Resumed(Some((account, token_id))) => {
                self.resumed(slot, rid, account, token_id)
            }
            Outcome::Resumed(None) => {
                self.sessions[slot].state = State::Connected;
                let ip = self.sessions[slot].peer.ip();
                self.addr_throttle.record_failure(ip, self.now);
                self.fail(
                    slot,
                    rid,
                    code::BAD_TOKEN,
                    "unknown, expired or revoked token; log in with a password",
                );
            }
            Outcome::Revoked(found) => self.revoked(slot, rid, found, revoked_token),
            Outcome::Tokens(list) => self.send_token_list(slot, rid, list),
            other => self.on_message_done(slot, rid, other),
        }
    }

    /// A client's request failed in the store: put the session back where it was before it.
    fn undo_pending(&mut self, slot: usize) {
        let session = &mut self.sessions[slot];
        match std::mem::replace(&mut session.state, State::Connected) {
            State::Authenticating(PendingAuth::Logout { mut identity }) => {
                // Still logged in. Live pushes and pages skipped it while the Logout was pending, so it
                // catches up from its cursor: the feed brings exactly what it missed.
                identity.feed = Feed::Behind {
                    page_in_flight: false,
                };
                session.state = State::Ready(identity);
                self.request_page_if_drained(slot);
            }
            State::Authenticating(_) => {}
            other => session.state = other,
        }
    }

    /// The store found (or did not find) the user: verify the password on the hash pool either way, so an
    /// unknown name costs the same time as a wrong password.
    fn verify_credentials(
        &mut self,
        slot: usize,
        ticket: Ticket,
        found: Option<(Account, String)>,
    ) {
        let State::Authenticating(PendingAuth::Login {
            password, account, ..
        }) = &mut self.sessions[slot].state
        else {
            return;
        };
        let (found_account, phc) = match found {
            Some((a, phc)) => (Some(a), Some(phc)),
            None => (None, None),
        };
        *account = found_account;
        let password = std::mem::take(password);
        let job = HashJob {
            ticket,
            op: HashOp::Verify { phc, password },
        };
        self.submit_hash(slot, ticket.request_id, job);
    }

    fn logged_in(
        &mut self,
        slot: usize,
        rid: u32,
        token: [u8; 16],
        token_id: u64,
        account: Account,
    ) {
        let State::Authenticating(PendingAuth::Login {
            username,
            device,
            last_seen,
            ..
        }) = std::mem::replace(&mut self.sessions[slot].state, State::Connected)
        else {
            return;
        };
        self.name_throttle.record_success(&username);
        self.enter(slot, rid, token, token_id, account, device, last_seen);
    }

    fn resumed(&mut self, slot: usize, rid: u32, account: Account, token_id: u64) {
        let State::Authenticating(PendingAuth::Resume {
            device,
            last_seen,
            token,
        }) = std::mem::replace(&mut self.sessions[slot].state, State::Connected)
        else {
            return;
        };
        self.enter(slot, rid, token, token_id, account, device, last_seen);
    }

    /// The session is logged in: it joins the hub (closing the user's oldest session past the limit), gets
    /// LoginOk, and starts its catch-up from its cursor.
    #[allow(clippy::too_many_arguments)]
    fn enter(
        &mut self,
        slot: usize,
        rid: u32,
        token: [u8; 16],
        token_id: u64,
        account: Account,
        device: String,
        last_seen: u64,
    ) {
        let session_ref = self.session_ref(slot);
        let max = self.config.max_sessions_per_user;
        info!(
            "login {} user {} device {device:?}",
            self.sessions[slot].uuid, account.username
        );
        let came_online = !self.hub.is_online(account.user_id);
        if let Some(oldest) = self
            .hub
            .join(account.user_id, &account.username, session_ref, max)
        {
            self.replace_session(oldest);
        }
        if came_online {
            self.announce_presence(account.user_id, &account.username, true, 0);
        }
        self.sessions[slot].state = State::Ready(Identity {
            user_id: account.user_id,
            username: account.username.clone(),
            token_id,
            cursor: 0,
            feed: Feed::Live,
            watching: Vec::new(),
            typing: Vec::new(),
        });
        self.send(
            slot,
            rid,
            &Packet::LoginOk {
                token,
                user_id: account.user_id,
                username: account.username.clone(),
                max_message_id: account.max_message_id,
                delivered_cursor: account.delivered_cursor,
            },
        );
        self.start_feed(slot, &account, last_seen);
    }

    fn replace_session(&mut self, oldest: SessionRef) {
        if self
            .sessions
            .get(oldest.slot)
            .is_some_and(|s| s.id == oldest.id)
        {
            self.fail(
                oldest.slot,
                0,
                code::SESSION_REPLACED,
                "logged in from too many places; this session was closed",
            );
        }
    }

    /// The answer to a RevokeToken or Logout, for the session that asked. (Closing the token's other
    /// sessions has already happened in `on_store_done`, whether or not the asker is still here.)
    fn revoked(&mut self, slot: usize, rid: u32, found: bool, token_id: Option<u64>) {
        let own_logout = matches!(
            (&self.sessions[slot].state, token_id),
            (State::Authenticating(PendingAuth::Logout { identity }), Some(t)) if identity.token_id == t
        );
        if own_logout {
            let State::Authenticating(PendingAuth::Logout { identity }) =
                std::mem::replace(&mut self.sessions[slot].state, State::Connected)
            else {
                return;
            };
            // Logged out, with a fresh login deadline ([HB-7.12]).
            info!(
                "logout {} user {}",
                self.sessions[slot].uuid, identity.username
            );
            self.leave_hub(self.sessions[slot].id, &identity);
            self.restart_auth_clock(slot);
            return self.send(slot, rid, &Packet::Ok);
        }
        if found {
            self.send(slot, rid, &Packet::Ok);
        } else {
            self.fail(slot, rid, code::NOT_FOUND, "no such token");
        }
    }

    /// Sessions logged in with a token that was just revoked end now, not at their next request ([HB-7.9]).
    fn close_sessions_of_token(&mut self, user: store::UserId, token_id: u64) {
        let holders: Vec<usize> = self
            .hub
            .sessions_of(user)
            .iter()
            .filter(|s| {
                self.sessions
                    .get(s.slot)
                    .and_then(|s| s.identity())
                    .is_some_and(|i| i.token_id == token_id)
            })
            .map(|s| s.slot)
            .collect();
        for holder in holders {
            self.fail(
                holder,
                0,
                code::TOKEN_REVOKED,
                "this session's token was revoked",
            );
        }
    }

    fn send_token_list(&mut self, slot: usize, rid: u32, list: Vec<store::TokenInfo>) {
        let current = self.sessions[slot].identity().map(|i| i.token_id);
        let entries = list
            .into_iter()
            .map(|t| TokenEntry {
                token_id: t.token_id,
                device: t.device,
                created_at_ms: t.created_at_ms,
                last_used_at_ms: t.last_used_at_ms,
                expires_at_ms: t.expires_at_ms,
                current: Some(t.token_id) == current,
            })
            .collect();
        self.send(slot, rid, &Packet::Tokens(entries));
    }

    /// After a logout or a refused login the connection gets a fresh login deadline, not what was left of the old.
    fn restart_auth_clock(&mut self, slot: usize) {
        self.sessions[slot].auth_started_at = self.now;
        self.arm_timer(slot);
    }
}
