//! Rooms, presence and typing ([HB-10], [HB-11], [HB-12]).
//!
//! Rooms: every change of membership goes through the store, and the hub's in-memory copy of the members is
//! changed only when the store's answer arrives — in the store's order, like everything else — so a member
//! gets live room messages from exactly the point the store says they joined (see `messages.rs` for why the
//! order makes this exact). Room messages themselves are sent by `messages.rs` (`route`), the same path as
//! direct messages: one stored row, one encoded frame copied into each online member's output.
//!
//! Presence: a session subscribes with Watch; a user's first session coming online and last session going
//! offline notify that user's watchers, and nobody else.
//!
//! Typing: forwarded, never stored, at most one per target every `typing_interval`; the excess is dropped.
//!
//! Must not: block, or read the database per member when fanning out.

use super::{Awaiting, Reactor};
use crate::auth::canonical_username;
use crate::protocol::{
    code, presence, room_event, Member, Packet, PresenceEntry, Request, RoomInfo,
};
use crate::session::{State, Ticket};
use crate::store::{self, Op, Outcome, UserId};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest room topic, in bytes.
pub const TOPIC_MAX: usize = 256;
/// Most rooms one ListRooms page returns.
pub const ROOM_LIST_MAX: u16 = 100;
/// Typing targets a session remembers for its rate limit (oldest forgotten first).
const TYPING_MEMORY: usize = 16;

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Reactor {
    /// Requests about rooms, presence and typing (the caller has checked the session is logged in).
    pub(super) fn rooms_and_presence(&mut self, slot: usize, rid: u32, request: Request) {
        let Some(user_id) = self.sessions[slot].identity().map(|i| i.user_id) else {
            return;
        };
        match request {
            Request::CreateRoom { name, topic } => {
                let Some(name) = self.room_name(slot, rid, &name) else {
                    return;
                };
                if topic.len() > TOPIC_MAX || topic.chars().any(char::is_control) {
                    let text =
                        format!("topics are at most {TOPIC_MAX} bytes, without control characters");
                    return self.fail(slot, rid, code::TEXT_TOO_LONG, &text);
                }
                let max_rooms_per_user = self.config.max_rooms_per_user;
                self.awaiting.push((
                    self.ticket(slot, rid),
                    self.room_actor(slot, user_id, &name),
                ));
                self.store_job(
                    slot,
                    rid,
                    Op::CreateRoom {
                        user_id,
                        name,
                        topic,
                        max_rooms_per_user,
                    },
                );
            }
            Request::JoinRoom { name } => {
                let Some(name) = self.room_name(slot, rid, &name) else {
                    return;
                };
                let (max_members, max_rooms_per_user) =
                    (self.config.max_room_members, self.config.max_rooms_per_user);
                self.awaiting.push((
                    self.ticket(slot, rid),
                    self.room_actor(slot, user_id, &name),
                ));
                self.store_job(
                    slot,
                    rid,
                    Op::JoinRoom {
                        user_id,
                        name,
                        max_members,
                        max_rooms_per_user,
                    },
                );
            }
            Request::LeaveRoom { name } => {
                let Some(name) = self.room_name(slot, rid, &name) else {
                    return;
                };
                self.awaiting.push((
                    self.ticket(slot, rid),
                    self.room_actor(slot, user_id, &name),
                ));
                self.store_job(slot, rid, Op::LeaveRoom { user_id, name });
            }
            Request::Kick { room, user } => {
                let Some(name) = self.room_name(slot, rid, &room) else {
                    return;
                };
                let Ok(target) = canonical_username(&user) else {
                    return self.fail(slot, rid, code::UNKNOWN_RECIPIENT, "no such user");
                };
                let awaiting = Awaiting::Kick {
                    room: name.clone(),
                    target: target.clone(),
                };
                self.awaiting.push((self.ticket(slot, rid), awaiting));
                self.store_job(
                    slot,
                    rid,
                    Op::Kick {
                        host_id: user_id,
                        name,
                        target,
                    },
                );
            }
            Request::CloseRoom { name } => {
                let Some(name) = self.room_name(slot, rid, &name) else {
                    return;
                };
                self.store_job(
                    slot,
                    rid,
                    Op::CloseRoom {
                        host_id: user_id,
                        name,
                    },
                );
            }
            Request::ListRooms { after, limit } => {
                let limit = limit.clamp(1, ROOM_LIST_MAX) as u32;
                self.store_job(
                    slot,
                    rid,
                    Op::ListRooms {
                        after_name: after.to_lowercase(),
                        limit,
                    },
                );
            }
            Request::RoomMembers { name } => {
                let Some(name) = self.room_name(slot, rid, &name) else {
                    return;
                };
                self.store_job(slot, rid, Op::RoomMembers { name });
            }
            Request::SendRoom {
                room,
                client_msg_id,
                text,
            } => {
                let Some(room) = self.room_name(slot, rid, &room) else {
                    return;
                };
                if !self.message_allowed(slot, rid, &text) {
                    return;
                }
                self.store_job(
                    slot,
                    rid,
                    Op::StoreRoomMessage {
                        sender: user_id,
                        room,
                        client_msg_id,
                        text,
                    },
                );
            }
            Request::RoomHistory {
                room,
                before_id,
                limit,
            } => {
                let Some(name) = self.room_name(slot, rid, &room) else {
                    return;
                };
                let limit = limit.clamp(1, crate::protocol::HISTORY_LIMIT_MAX) as u32;
                self.store_job(
                    slot,
                    rid,
                    Op::RoomHistory {
                        user_id,
                        name,
                        before_id,
                        limit,
                    },
                );
            }
            Request::Watch { users } => self.watch(slot, rid, users),
            Request::Unwatch { users } => self.unwatch(slot, rid, users),
            Request::Typing { room, to } => self.typing(slot, room, to),
            other => self.fail(
                slot,
                rid,
                code::MALFORMED,
                &format!("unexpected request {other:?}"),
            ),
        }
    }

    /// Who creates, joins or leaves a room, kept for the answer: it must take effect even if this session is gone
    /// by then. Only those three requests need the name, so it is copied here rather than for every room request.
    fn room_actor(&self, slot: usize, user_id: UserId, room: &str) -> Awaiting {
        let username = self.sessions[slot]
            .identity()
            .map(|i| i.username.clone())
            .unwrap_or_default();
        Awaiting::Room {
            user: user_id,
            username,
            room: room.to_owned(),
        }
    }

    /// Room names follow the username rules ([HB-10.1]).
    fn room_name(&mut self, slot: usize, rid: u32, name: &str) -> Option<String> {
        match canonical_username(name) {
            Ok(name) => Some(name),
            Err(_) => {
                self.fail(
                    slot,
                    rid,
                    code::INVALID_ROOM_NAME,
                    "room names are 3-32 characters of a-z 0-9 _ . - (capitals are accepted and folded to lowercase)",
                );
                None
            }
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // Store answers
    // -----------------------------------------------------------------------------------------------------------

    /// Answers to room and presence jobs. Changes of membership take effect (hub, events) whether or not the
    /// asking session is still open — `slot` is `None` when it is not; only the reply needs it. Returns other
    /// outcomes untouched.
    pub(super) fn on_room_done(
        &mut self,
        slot: Option<usize>,
        ticket: Ticket,
        outcome: Outcome,
        awaiting: Option<Awaiting>,
    ) -> Option<Outcome> {
        let rid = ticket.request_id;
        match (outcome, awaiting) {
            (Outcome::RoomCreated(room), Some(Awaiting::Room { user, .. })) => {
                self.hub.add_room(room.room_id, &room.name, [user]);
                self.answer(slot, rid, &Packet::RoomInfo(wire_room(room)));
            }
            (
                Outcome::Joined {
                    room,
                    already_member,
                },
                Some(Awaiting::Room { user, username, .. }),
            ) => {
                if !already_member {
                    self.hub.add_member(room.room_id, user);
                    self.room_event(
                        room.room_id,
                        &room.name,
                        room_event::JOINED,
                        &username,
                        None,
                    );
                }
                self.answer(slot, rid, &Packet::RoomInfo(wire_room(room)));
            }
            (
                Outcome::Left { room_id },
                Some(Awaiting::Room {
                    user,
                    username,
                    room,
                }),
            ) => {
                self.room_event(room_id, &room, room_event::LEFT, &username, Some(user));
                self.hub.remove_member(room_id, user);
                self.answer(slot, rid, &Packet::Ok);
            }
            (Outcome::Kicked { room_id, target_id }, Some(Awaiting::Kick { room, target })) => {
                self.room_event(room_id, &room, room_event::KICKED, &target, Some(target_id));
                self.hub.remove_member(room_id, target_id);
                self.answer(slot, rid, &Packet::Ok);
            }
            (Outcome::RoomClosedOk { room_id, members }, _) => {
                let name = self
                    .hub
                    .room(room_id)
                    .map(|r| r.name.clone())
                    .unwrap_or_default();
                let notice = Packet::RoomClosed { room: name };
                for member in members {
                    self.push_to_user(member, &notice);
                }
                self.hub.remove_room(room_id);
                self.answer(slot, rid, &Packet::Ok);
            }
            (Outcome::RoomList { rooms, more }, _) => {
                let rooms = rooms.into_iter().map(wire_room).collect();
                self.answer(slot, rid, &Packet::RoomList { rooms, more });
            }
            (Outcome::Members { room, members }, _) => {
                let members = members
                    .into_iter()
                    .map(|(id, username)| Member {
                        username,
                        online: self.hub.is_online(id),
                    })
                    .collect();
                self.answer(
                    slot,
                    rid,
                    &Packet::RoomMemberList {
                        room: room.name,
                        members,
                    },
                );
            }
            (Outcome::Users(found), _) => {
                if let Some(slot) = slot {
                    self.watched(slot, rid, found);
                }
            }
            (Outcome::RoomNameTaken, _) => {
                self.refuse(slot, rid, code::ROOM_NAME_TAKEN, "that room name is taken")
            }
            (Outcome::TooManyRooms, _) => {
                let text = format!(
                    "you are in {} rooms already",
                    self.config.max_rooms_per_user
                );
                self.refuse(slot, rid, code::TOO_MANY_ROOMS, &text)
            }
            (Outcome::NoSuchRoom, _) => self.refuse(slot, rid, code::NO_SUCH_ROOM, "no such room"),
            (Outcome::RoomIsClosed, _) => {
                self.refuse(slot, rid, code::ROOM_CLOSED, "that room is closed")
            }
            (Outcome::RoomFull, _) => self.refuse(slot, rid, code::ROOM_FULL, "that room is full"),
            (Outcome::CannotKickHost, _) => {
                self.refuse(slot, rid, code::NOT_MEMBER, "the host cannot be kicked")
            }
            (Outcome::NotMember, _) => {
                self.refuse(slot, rid, code::NOT_MEMBER, "not a member of that room")
            }
            (Outcome::NotHost, _) => self.refuse(
                slot,
                rid,
                code::NOT_HOST,
                "only the room's host may do that",
            ),
            (Outcome::NoSuchUser, _) => {
                self.refuse(slot, rid, code::UNKNOWN_RECIPIENT, "no such user")
            }
            (other, _) => return Some(other),
        }
        None
    }

    /// Tells a room's online members (and, for a leave or kick, the user concerned) what happened.
    fn room_event(
        &mut self,
        room_id: u64,
        room: &str,
        event: u8,
        user: &str,
        also: Option<UserId>,
    ) {
        let mut targets = std::mem::take(&mut self.targets_scratch);
        targets.clear();
        self.hub.room_sessions(room_id, None, &mut targets);
        if let Some(also) = also.filter(|u| !self.hub.is_member(room_id, *u)) {
            targets.extend(self.hub.sessions_of(also).iter().map(|s| s.slot));
        }
        let packet = Packet::RoomEvent {
            room: room.to_owned(),
            event,
            user: user.to_owned(),
        };
        for &target in &targets {
            self.send(target, 0, &packet);
        }
        self.targets_scratch = targets;
    }

    // -----------------------------------------------------------------------------------------------------------
    // Presence
    // -----------------------------------------------------------------------------------------------------------

    fn watch(&mut self, slot: usize, rid: u32, users: Vec<String>) {
        let watching = self.sessions[slot]
            .identity()
            .map_or(0, |i| i.watching.len());
        if self.too_many_watches(slot, rid, watching + users.len()) {
            return;
        }
        // Names that break the rules cannot exist; they are looked up as given and come back unknown.
        let names = users
            .into_iter()
            .map(|u| canonical_username(&u).unwrap_or(u))
            .collect();
        self.store_job(slot, rid, Op::LookupUsers { names });
    }

    /// Refuses a Watch that would take the session to `total` watched users, past max_watch ([HB-11]).
    fn too_many_watches(&mut self, slot: usize, rid: u32, total: usize) -> bool {
        let max = self.config.max_watch;
        if total <= max {
            return false;
        }
        let text = format!("a session may watch at most {max} users");
        self.fail(slot, rid, code::TOO_MANY_WATCHES, &text);
        true
    }

    /// The store resolved the watched names: subscribe, and answer with each one's current status.
    fn watched(&mut self, slot: usize, rid: u32, found: Vec<(String, Option<(UserId, u64)>)>) {
        let me = self.session_ref(slot);
        // A session that logged out meanwhile watches nobody; pipelined Watches are held to the limit here,
        // where the subscriptions are made.
        let Some(watching) = self.sessions[slot].identity().map(|i| i.watching.len()) else {
            return self.fail(slot, rid, code::NOT_AUTHENTICATED, "log in first");
        };
        let adding = found.iter().filter(|(_, user)| user.is_some()).count();
        if self.too_many_watches(slot, rid, watching + adding) {
            return;
        }
        let mut entries = Vec::with_capacity(found.len());
        for (username, user) in found {
            let Some((user_id, last_seen_ms)) = user else {
                entries.push(PresenceEntry {
                    username,
                    state: presence::UNKNOWN,
                    last_seen_ms: 0,
                });
                continue;
            };
            self.hub.watch(user_id, me);
            if let State::Ready(identity) = &mut self.sessions[slot].state {
                if !identity.watching.iter().any(|(id, _)| *id == user_id) {
                    identity.watching.push((user_id, username.clone()));
                }
            }
            let (state, last_seen_ms) = if self.hub.is_online(user_id) {
                (presence::ONLINE, 0)
            } else {
                (presence::OFFLINE, last_seen_ms)
            };
            entries.push(PresenceEntry {
                username,
                state,
                last_seen_ms,
            });
        }
        self.send(slot, rid, &Packet::PresenceList(entries));
    }

    fn unwatch(&mut self, slot: usize, rid: u32, users: Vec<String>) {
        let session_id = self.sessions[slot].id;
        let State::Ready(identity) = &mut self.sessions[slot].state else {
            return;
        };
        let mut dropped = Vec::new();
        for name in users {
            let name = canonical_username(&name).unwrap_or(name);
            if let Some(at) = identity.watching.iter().position(|(_, n)| *n == name) {
                dropped.push(identity.watching.swap_remove(at).0);
            }
        }
        for user in dropped {
            self.hub.unwatch(user, session_id);
        }
        self.send(slot, rid, &Packet::Ok);
    }

    /// Tells a user's watchers that they came online or went offline.
    pub(super) fn announce_presence(
        &mut self,
        user: UserId,
        username: &str,
        online: bool,
        last_seen_ms: u64,
    ) {
        let state = if online {
            presence::ONLINE
        } else {
            presence::OFFLINE
        };
        let packet = Packet::Presence(PresenceEntry {
            username: username.to_owned(),
            state,
            last_seen_ms,
        });
        for watcher in self.hub.watchers_of(user).to_vec() {
            if self
                .sessions
                .get(watcher.slot)
                .is_some_and(|s| s.id == watcher.id)
            {
                self.send(watcher.slot, 0, &packet);
            }
        }
    }

    /// A user's last session ended: record when, and tell the watchers.
    pub(super) fn went_offline(&mut self, user: UserId, username: &str) {
        let at_ms = now_ms();
        self.submit_store(store::Job {
            ticket: super::LOOP_TICKET,
            op: Op::SetLastSeen {
                user_id: user,
                at_ms,
            },
        });
        self.announce_presence(user, username, false, at_ms);
    }

    /// A session leaves: it stops watching anyone.
    pub(super) fn drop_watches(&mut self, session_id: u64, watching: &[(UserId, String)]) {
        for (user, _) in watching {
            self.hub.unwatch(*user, session_id);
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // Typing
    // -----------------------------------------------------------------------------------------------------------

    /// Forwards "typing" to the peer's or the room's online sessions; never stored, at most one per target per
    /// `typing_interval`, the excess dropped silently ([HB-12]). Typing has no reply.
    fn typing(&mut self, slot: usize, room: bool, to: String) {
        let Ok(to) = canonical_username(&to) else {
            return;
        };
        let (now, interval) = (self.now, self.config.typing_interval);
        let Some(user_id) = self.sessions[slot].identity().map(|i| i.user_id) else {
            return;
        };
        // Who may be told is settled before the rate memory is touched, so a notice dropped for not being a
        // member does not use up the slot of a room the user joins a moment later.
        let room_id = if room {
            match self.hub.room_id(&to) {
                Some(room_id) if self.hub.is_member(room_id, user_id) => Some(room_id),
                _ => return,
            }
        } else {
            None
        };
        let State::Ready(identity) = &mut self.sessions[slot].state else {
            return;
        };
        let from = identity.username.clone();
        match identity
            .typing
            .iter_mut()
            .find(|(r, t, _)| *r == room && *t == to)
        {
            Some((_, _, at)) if now.saturating_duration_since(*at) < interval => return,
            Some((_, _, at)) => *at = now,
            None => {
                if identity.typing.len() >= TYPING_MEMORY {
                    identity.typing.remove(0);
                }
                identity.typing.push((room, to.clone(), now));
            }
        }
        let mut targets = std::mem::take(&mut self.targets_scratch);
        targets.clear();
        let notice = if let Some(room_id) = room_id {
            self.hub.room_sessions(room_id, None, &mut targets);
            targets.retain(|s| *s != slot);
            Packet::TypingNotice { from, room: to }
        } else {
            if let Some(peer) = self.hub.online_user(&to) {
                targets.extend(self.hub.sessions_of(peer).iter().map(|s| s.slot));
            }
            // Typing to yourself reaches your other devices, not the one typing.
            targets.retain(|s| *s != slot);
            Packet::TypingNotice {
                from,
                room: String::new(),
            }
        };
        for &target in &targets {
            self.send(target, 0, &notice);
        }
        self.targets_scratch = targets;
    }
}

fn wire_room(r: store::RoomInfo) -> RoomInfo {
    RoomInfo {
        room_id: r.room_id,
        name: r.name,
        topic: r.topic,
        host: r.host,
        member_count: r.member_count,
        closed: r.closed,
    }
}
