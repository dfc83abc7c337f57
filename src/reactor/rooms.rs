//! Rooms, presence and typing ([HB-10], [HB-11], [HB-12]).

use super::Reactor;
use crate::protocol::{code, Request};

impl Reactor {
    pub(super) fn rooms_and_presence(&mut self, slot: usize, rid: u32, request: Request) {
        let _ = request;
        self.fail(
            slot,
            rid,
            code::MALFORMED,
            "not implemented by this version",
        );
    }
}
