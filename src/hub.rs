//! Hub: who is online, and on which sessions. The loop's map of user → live sessions, used to route messages.
//!
//! Owns: the online map, the members of every open room, and who watches whom for presence. A user is online
//! while at least one of their sessions is in the online map ([HB-7.5]). Room membership is kept here, in
//! memory, so fanning a room message out costs no database read per member; the store is the record of it
//! and the loop changes this copy only from store completions, in the store's order.
//! Users are keyed by the integer id resolved at login, so routing never hashes a name per frame; a second map
//! from username finds online users by name.
//!
//! Must not: hold sessions themselves (the slab does; the hub keeps `(session id, slot)` handles, checked by the
//! caller against the slab), do I/O, or outlive a session: the reactor calls `leave` in its one disconnect path.

use crate::store::UserId;
use std::collections::{HashMap, HashSet};

/// A handle to a live session: its slab slot, and its never-reused id to tell a reused slot apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionRef {
    pub id: u64,
    pub slot: usize,
}

#[derive(Debug)]
struct OnlineUser {
    username: String,
    /// In login order: the first is the oldest, closed first when the user has too many.
    sessions: Vec<SessionRef>,
}

/// An open room as routing needs it.
#[derive(Debug)]
pub struct Room {
    pub name: String,
    pub members: HashSet<UserId>,
}

/// The online map, rooms and presence subscriptions.
#[derive(Debug, Default)]
pub struct Hub {
    users: HashMap<UserId, OnlineUser>,
    by_name: HashMap<String, UserId>,
    rooms: HashMap<u64, Room>,
    room_ids: HashMap<String, u64>,
    /// For each watched user, the sessions watching them ([HB-11]): a status change costs work in proportion to
    /// its watchers, never to the number of users online.
    watchers: HashMap<UserId, Vec<SessionRef>>,
}

impl Hub {
    /// Adds a session of `user`. If that makes more than `max_sessions`, the oldest session is taken out and
    /// returned, for the caller to tell and close ([HB-7.6]).
    pub fn join(
        &mut self,
        user: UserId,
        username: &str,
        session: SessionRef,
        max_sessions: usize,
    ) -> Option<SessionRef> {
        let online = self.users.entry(user).or_insert_with(|| OnlineUser {
            username: username.to_owned(),
            sessions: Vec::new(),
        });
        if online.sessions.is_empty() {
            self.by_name.insert(username.to_owned(), user);
        }
        online.sessions.push(session);
        if online.sessions.len() > max_sessions {
            Some(online.sessions.remove(0))
        } else {
            None
        }
    }

    /// Removes a session; the user goes offline with their last one, and then `true` is returned. Unknown
    /// sessions are ignored, so calling this twice is harmless.
    pub fn leave(&mut self, user: UserId, session_id: u64) -> bool {
        let Some(online) = self.users.get_mut(&user) else {
            return false;
        };
        online.sessions.retain(|s| s.id != session_id);
        // A user is in the map only while they have a session, so an empty list means that was the last.
        if online.sessions.is_empty() {
            if let Some(gone) = self.users.remove(&user) {
                self.by_name.remove(&gone.username);
            }
            return true;
        }
        false
    }

    // --- rooms ---

    /// Records an open room and its members (at startup, and when a room is created).
    pub fn add_room(
        &mut self,
        room_id: u64,
        name: &str,
        members: impl IntoIterator<Item = UserId>,
    ) {
        self.room_ids.insert(name.to_owned(), room_id);
        self.rooms.insert(
            room_id,
            Room {
                name: name.to_owned(),
                members: members.into_iter().collect(),
            },
        );
    }

    /// Forgets a closed room.
    pub fn remove_room(&mut self, room_id: u64) {
        if let Some(room) = self.rooms.remove(&room_id) {
            self.room_ids.remove(&room.name);
        }
    }

    pub fn add_member(&mut self, room_id: u64, user: UserId) {
        if let Some(room) = self.rooms.get_mut(&room_id) {
            room.members.insert(user);
        }
    }

    pub fn remove_member(&mut self, room_id: u64, user: UserId) {
        if let Some(room) = self.rooms.get_mut(&room_id) {
            room.members.remove(&user);
        }
    }

    pub fn room(&self, room_id: u64) -> Option<&Room> {
        self.rooms.get(&room_id)
    }

    pub fn room_id(&self, name: &str) -> Option<u64> {
        self.room_ids.get(name).copied()
    }

    /// Whether `user` is a current member of the open room `room_id`.
    pub fn is_member(&self, room_id: u64, user: UserId) -> bool {
        self.rooms
            .get(&room_id)
            .is_some_and(|r| r.members.contains(&user))
    }

    /// Appends the slots of the live sessions of every member of a room, except one (the sender's own).
    pub fn room_sessions(&self, room_id: u64, except: Option<usize>, into: &mut Vec<usize>) {
        let Some(room) = self.rooms.get(&room_id) else {
            return;
        };
        for member in &room.members {
            let slots = self.sessions_of(*member).iter().map(|s| s.slot);
            into.extend(slots.filter(|slot| Some(*slot) != except));
        }
    }

    // --- presence ---

    /// Subscribes a session to a user's presence. Watching twice is one subscription.
    pub fn watch(&mut self, watched: UserId, watcher: SessionRef) {
        let list = self.watchers.entry(watched).or_default();
        if !list.contains(&watcher) {
            list.push(watcher);
        }
    }

    pub fn unwatch(&mut self, watched: UserId, watcher_id: u64) {
        if let Some(list) = self.watchers.get_mut(&watched) {
            list.retain(|w| w.id != watcher_id);
            if list.is_empty() {
                self.watchers.remove(&watched);
            }
        }
    }

    /// The sessions watching a user.
    pub fn watchers_of(&self, user: UserId) -> &[SessionRef] {
        self.watchers
            .get(&user)
            .map(|w| w.as_slice())
            .unwrap_or(&[])
    }

    /// The live sessions of a user, oldest first (empty when offline).
    pub fn sessions_of(&self, user: UserId) -> &[SessionRef] {
        self.users
            .get(&user)
            .map(|u| u.sessions.as_slice())
            .unwrap_or(&[])
    }

    /// The id of an online user, by canonical username.
    pub fn online_user(&self, username: &str) -> Option<UserId> {
        self.by_name.get(username).copied()
    }

    pub fn is_online(&self, user: UserId) -> bool {
        self.users.contains_key(&user)
    }

    /// Users with at least one live session.
    pub fn users_online(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: u64) -> SessionRef {
        SessionRef {
            id,
            slot: id as usize,
        }
    }

    #[test]
    fn a_user_is_online_while_any_session_is() {
        let mut hub = Hub::default();
        hub.join(1, "alice", s(10), 8);
        hub.join(1, "alice", s(11), 8);
        assert_eq!(hub.sessions_of(1), &[s(10), s(11)]);
        assert_eq!(hub.online_user("alice"), Some(1));
        hub.leave(1, 10);
        assert!(hub.is_online(1));
        hub.leave(1, 11);
        assert!(!hub.is_online(1));
        assert_eq!(hub.online_user("alice"), None);
        assert_eq!(hub.users_online(), 0);
        hub.leave(1, 11);
    }

    // [HB-7.6] one login past the limit evicts the oldest session.
    #[test]
    fn hb_7_6_oldest_session_is_evicted_past_the_limit() {
        let mut hub = Hub::default();
        assert_eq!(hub.join(1, "a", s(1), 2), None);
        assert_eq!(hub.join(1, "a", s(2), 2), None);
        assert_eq!(hub.join(1, "a", s(3), 2), Some(s(1)));
        assert_eq!(hub.sessions_of(1), &[s(2), s(3)]);
    }
}
