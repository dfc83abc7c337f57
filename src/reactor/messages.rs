//! Direct messages: Send, Ack, Deliver, the cursor feed, receipts and history ([HB-5]).
//!
//! The one rule everything here leans on: **the store thread runs jobs in the order they were queued, and the
//! loop handles their completions in that same order.** From it follow the two properties users care about:
//!
//! * *No gap, no duplicate, when a session switches from catching up to live.* A feed page is a read that runs
//!   at one point in the store's order. Every message committed before it is in that page (or, if the page says
//!   `more`, in a later page, read later still); every message committed after it has its completion handled
//!   after the page's completion — by which time the session is live and gets it as a push. While a session is
//!   behind, live pushes skip it: the next page, read after those messages committed, brings them.
//! * *Nothing acknowledged is lost.* An Ack is sent only from the completion of the job that stored the
//!   message, and the store answers only after its transaction committed.
//!
//! Each session's cursor (the highest id it has been sent, or of its own messages acknowledged while it is live,
//! [HB-5.10]) only moves forward, and nothing at or below it is
//! sent again: a message reached by both a page and a push goes out once.
//!
//! Must not: block, or do per-recipient database work when routing (one stored row, one encoded frame, copied
//! into each recipient's output).

use super::Reactor;
use crate::auth::canonical_username;
use crate::protocol::{
    code, encode_deliver, encode_room_deliver, Message, Packet, HISTORY_LIMIT_MAX,
};
use crate::session::{Feed, PendingAuth, State};
use crate::store::{self, Account, Op, Outcome, StoredMessage};
use log::{debug, warn};

/// Request id of feed pages: they are the server's own reads, answered as pushes (request id 0).
pub(super) const FEED: u32 = 0;

/// How long a session waits before asking again for a feed page whose read failed.
const FEED_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

impl Reactor {
    // -----------------------------------------------------------------------------------------------------------
    // Requests
    // -----------------------------------------------------------------------------------------------------------

    /// Send: check it, then store it; the Ack and the pushes wait for the commit ([HB-5.1]).
    pub(super) fn send_message(
        &mut self,
        slot: usize,
        rid: u32,
        recipient: String,
        client_msg_id: u64,
        text: String,
    ) {
        let Some(sender) = self.sessions[slot].identity().map(|i| i.user_id) else {
            return;
        };
        let Ok(recipient) = canonical_username(&recipient) else {
            return self.fail(slot, rid, code::UNKNOWN_RECIPIENT, "no such user");
        };
        if !self.message_allowed(slot, rid, &text) {
            return;
        }
        let op = Op::StoreMessage {
            sender,
            recipient,
            client_msg_id,
            text,
        };
        self.store_job(slot, rid, op);
    }

    /// The checks every message passes before it is stored ([HB-5.8]): some text, not too much, and within the
    /// session's rate. False (with the error sent) if it fails one.
    pub(super) fn message_allowed(&mut self, slot: usize, rid: u32, text: &str) -> bool {
        if text.is_empty() {
            self.fail(slot, rid, code::EMPTY_TEXT, "a message needs some text");
            return false;
        }
        if text.len() > self.config.max_text {
            let msg = format!(
                "text is {} bytes; the limit is {}",
                text.len(),
                self.config.max_text
            );
            self.fail(slot, rid, code::TEXT_TOO_LONG, &msg);
            return false;
        }
        let (rate, burst) = (self.config.send_rate, self.config.send_burst);
        if !self.sessions[slot].take_send_token(self.now, rate, burst) {
            let msg = format!("sending too fast: at most {rate} messages/s with bursts of {burst}");
            self.fail(slot, rid, code::RATE_LIMITED, &msg);
            return false;
        }
        true
    }

    /// Received: the client has shown everything up to `up_to`; the store raises the user's delivered cursor
    /// and the senders concerned get a delivery receipt ([HB-5.5]). Claims beyond what this session was sent
    /// are cut to its cursor.
    pub(super) fn received(&mut self, slot: usize, rid: u32, up_to: u64) {
        let Some(identity) = self.sessions[slot].identity() else {
            return;
        };
        let op = Op::MarkDelivered {
            user_id: identity.user_id,
            up_to: up_to.min(identity.cursor),
        };
        self.store_job(slot, rid, op);
    }

    /// Read: forwarded at once to the peer's live sessions as a read receipt; never stored ([HB-5.5]).
    pub(super) fn read_receipt(&mut self, slot: usize, rid: u32, peer: String, up_to: u64) {
        // Receipts land in another user's output: they share the sender's rate limit.
        let (rate, burst) = (self.config.send_rate, self.config.send_burst);
        if !self.sessions[slot].take_send_token(self.now, rate, burst) {
            return self.fail(slot, rid, code::RATE_LIMITED, "sending too fast");
        }
        let Some(reader) = self.sessions[slot].identity().map(|i| i.username.clone()) else {
            return;
        };
        let peer_id = canonical_username(&peer)
            .ok()
            .and_then(|p| self.hub.online_user(&p));
        if let Some(peer_id) = peer_id {
            let receipt = Packet::ReadReceipt {
                peer: reader,
                up_to,
            };
            self.push_to_user(peer_id, &receipt);
        }
        self.send(slot, rid, &Packet::Ok);
    }

    /// History: one page of the conversation with `peer`, newest first, older than `before_id` ([HB-5.7]).
    pub(super) fn history(
        &mut self,
        slot: usize,
        rid: u32,
        peer: String,
        before_id: u64,
        limit: u16,
    ) {
        let Some(user_id) = self.sessions[slot].identity().map(|i| i.user_id) else {
            return;
        };
        let Ok(peer) = canonical_username(&peer) else {
            return self.fail(slot, rid, code::UNKNOWN_RECIPIENT, "no such user");
        };
        let limit = limit.clamp(1, HISTORY_LIMIT_MAX) as u32;
        let op = Op::History {
            user_id,
            peer,
            before_id,
            limit,
        };
        self.store_job(slot, rid, op);
    }

    // -----------------------------------------------------------------------------------------------------------
    // Completions
    // -----------------------------------------------------------------------------------------------------------

    /// Answers whose effects reach other users — a stored message is routed, delivery receipts go to its
    /// senders — whether or not the asking session is still open. Returns other outcomes untouched.
    pub(super) fn on_shared_message_done(
        &mut self,
        slot: Option<usize>,
        rid: u32,
        outcome: Outcome,
    ) -> Option<Outcome> {
        match outcome {
            Outcome::Stored { message, duplicate } => {
                // The original Ack for a resend; nothing is delivered twice ([HB-5.2]).
                let ack = Packet::Ack {
                    message_id: message.id,
                    timestamp_ms: message.timestamp_ms,
                };
                self.answer(slot, rid, &ack);
                if duplicate {
                    self.stats.duplicates += 1;
                } else {
                    self.stats.message_stored(self.now);
                    self.advance_sender_cursor(slot, message.id);
                    self.route(slot, &message);
                }
                None
            }
            Outcome::Delivered {
                reader, receipts, ..
            } => {
                self.answer(slot, rid, &Packet::Ok);
                self.send_delivery_receipts(&reader, receipts);
                None
            }
            other => Some(other),
        }
    }

    /// A live sending session has been sent everything before its own message (store order: every earlier
    /// message's completion came first), so its cursor may move past the message it just sent. Then a
    /// Received for the acked id counts, and a later login does not replay the session's own messages.
    fn advance_sender_cursor(&mut self, slot: Option<usize>, id: u64) {
        let Some(State::Ready(identity)) = slot.map(|slot| &mut self.sessions[slot].state) else {
            return;
        };
        if identity.feed == Feed::Live && id > identity.cursor {
            identity.cursor = id;
        }
    }

    /// Answers that only mean something to the asking session.
    pub(super) fn on_message_done(&mut self, slot: usize, rid: u32, outcome: Outcome) {
        match outcome {
            Outcome::UnknownRecipient => {
                self.fail(slot, rid, code::UNKNOWN_RECIPIENT, "no such user")
            }
            Outcome::Page { messages, more } if rid == FEED => self.feed_page(slot, messages, more),
            Outcome::Page { messages, more } => {
                let messages = messages.into_iter().map(to_wire).collect();
                self.send(slot, rid, &Packet::HistoryPage { messages, more });
            }
            other => warn!("store answer {other:?} does not fit a request; ignored"),
        }
    }

    /// Pushes a just-stored message to every live session of the recipient, and to the sender's other sessions
    /// so each device shows the whole conversation. The frame is encoded once and copied into each buffer.
    fn route(&mut self, origin: Option<usize>, m: &StoredMessage) {
        let mut frame = std::mem::take(&mut self.frame_scratch);
        frame.clear();
        encode_stored(&mut frame, m);
        let mut targets = std::mem::take(&mut self.targets_scratch);
        targets.clear();
        match &m.room {
            // A room message goes to every online member's sessions: the members are in memory ([HB-10.4]).
            Some((room_id, _)) => self.hub.room_sessions(*room_id, origin, &mut targets),
            None => {
                targets.extend(self.hub.sessions_of(m.recipient_id).iter().map(|s| s.slot));
                if m.sender_id != m.recipient_id {
                    targets.extend(self.hub.sessions_of(m.sender_id).iter().map(|s| s.slot));
                }
            }
        }
        for &target in &targets {
            if Some(target) != origin {
                self.push_live(target, m.id, &frame);
            }
        }
        self.targets_scratch = targets;
        self.frame_scratch = frame;
    }

    /// Appends a live message to a session that is caught up. A session over its high-water mark stops getting
    /// pushes and falls back to the feed ([HB-5.6]): memory stays bounded and nothing is lost.
    fn push_live(&mut self, slot: usize, id: u64, frame: &[u8]) {
        let high_water = self.config.out_high_water;
        let Some(session) = self.sessions.get_mut(slot) else {
            return;
        };
        let over = session.pending_output() + frame.len() > high_water;
        let State::Ready(identity) = &mut session.state else {
            return;
        };
        if identity.feed != Feed::Live || id <= identity.cursor {
            return;
        }
        if over {
            debug!(
                "session {} is a slow reader: falling back to the feed at {}",
                session.id, identity.cursor
            );
            identity.feed = Feed::Behind {
                page_in_flight: false,
            };
            self.stats.fallen_back += 1;
            // If the output is already below the low-water mark (one huge message), fetch it now.
            self.request_page_if_drained(slot);
            return;
        }
        identity.cursor = id;
        session.output.extend_from_slice(frame);
        self.stats.delivered += 1;
        self.queue_flush(slot);
    }

    fn send_delivery_receipts(
        &mut self,
        reader: &str,
        receipts: Vec<(store::UserId, String, u64)>,
    ) {
        for (sender_id, _, up_to) in receipts {
            let receipt = Packet::DeliveryReceipt {
                peer: reader.to_owned(),
                up_to,
            };
            self.push_to_user(sender_id, &receipt);
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // The cursor feed
    // -----------------------------------------------------------------------------------------------------------

    /// Places a freshly logged-in session: its cursor is the client's last seen id, or the user's delivered
    /// cursor when the client says 0 ([HB-5.3]); if the store holds newer messages it starts behind.
    pub(super) fn start_feed(&mut self, slot: usize, account: &Account, last_seen: u64) {
        let State::Ready(identity) = &mut self.sessions[slot].state else {
            return;
        };
        let start = if last_seen == 0 {
            account.delivered_cursor
        } else {
            last_seen
        };
        // A client cannot claim to have seen more than exists: that would hide the next messages from it.
        identity.cursor = start.min(account.max_message_id);
        if identity.cursor < account.max_message_id {
            identity.feed = Feed::Behind {
                page_in_flight: false,
            };
            self.request_page_if_drained(slot);
        } else {
            identity.feed = Feed::Live;
            let cursor = identity.cursor;
            self.send(slot, 0, &Packet::CaughtUp { cursor });
        }
    }

    /// A feed page (the server's own read) failed: nobody asked, so nobody is told. Whatever the session is doing
    /// meanwhile, it no longer has a page on the way, and the page is asked for again after FEED_RETRY_DELAY (a
    /// full disk fails every job of its batch, reads included).
    pub(super) fn feed_page_failed(&mut self, slot: usize) {
        let session = &mut self.sessions[slot];
        if let State::Ready(identity) | State::Authenticating(PendingAuth::Logout { identity }) =
            &mut session.state
        {
            if identity.feed
                == (Feed::Behind {
                    page_in_flight: true,
                })
            {
                identity.feed = Feed::Behind {
                    page_in_flight: false,
                };
            }
        }
        let id = session.id;
        self.feed_retries
            .push((self.now + FEED_RETRY_DELAY, id, slot));
    }

    /// Asks the store for the next page of a session that is behind, once its output is below the low-water
    /// mark and no page is already on its way.
    pub(super) fn request_page_if_drained(&mut self, slot: usize) {
        // A shutdown finishes what is pending and starts nothing new: the reader resumes from its cursor
        // after the restart.
        if self.shutdown.is_some() {
            return;
        }
        let low_water = self.config.out_low_water;
        let limit = self.config.feed_page;
        let Some(session) = self.sessions.get_mut(slot) else {
            return;
        };
        let pending = session.pending_output();
        let State::Ready(identity) = &mut session.state else {
            return;
        };
        if identity.feed
            != (Feed::Behind {
                page_in_flight: false,
            })
            || pending >= low_water
        {
            return;
        }
        identity.feed = Feed::Behind {
            page_in_flight: true,
        };
        let op = Op::FetchFeed {
            user_id: identity.user_id,
            after_id: identity.cursor,
            limit,
        };
        self.store_job(slot, FEED, op);
    }

    /// A page arrived: send what is past the cursor; then either wait for the output to drain before the next
    /// page, or — when the page was the last — go live and say so with CaughtUp.
    fn feed_page(&mut self, slot: usize, messages: Vec<StoredMessage>, more: bool) {
        let session = &mut self.sessions[slot];
        let State::Ready(identity) = &mut session.state else {
            return;
        };
        // A page for an earlier login of this connection (it logged out and in again meanwhile) is stale.
        if identity.feed
            != (Feed::Behind {
                page_in_flight: true,
            })
        {
            return;
        }
        // Encoded straight into the session's output: the page is already bounded by feed_page, and the
        // output limit allows for one (see Config::out_hard_limit).
        for m in &messages {
            if m.id <= identity.cursor {
                continue;
            }
            encode_stored(&mut session.output, m);
            identity.cursor = m.id;
            self.stats.delivered += 1;
        }
        let cursor = identity.cursor;
        identity.feed = if more {
            Feed::Behind {
                page_in_flight: false,
            }
        } else {
            Feed::Live
        };
        self.queue_flush(slot);
        if more {
            self.request_page_if_drained(slot);
        } else {
            self.send(slot, 0, &Packet::CaughtUp { cursor });
        }
    }
}

/// A stored message as the frame that pushes it: RoomDeliver for a room's, Deliver for a direct one.
fn encode_stored(out: &mut Vec<u8>, m: &StoredMessage) {
    match &m.room {
        Some((_, room)) => encode_room_deliver(out, m.id, room, &m.sender, m.timestamp_ms, &m.text),
        None => encode_deliver(out, m.id, &m.sender, &m.recipient, m.timestamp_ms, &m.text),
    }
}

fn to_wire(m: StoredMessage) -> Message {
    Message {
        id: m.id,
        sender: m.sender,
        recipient: m.recipient,
        timestamp_ms: m.timestamp_ms,
        text: m.text,
    }
}
