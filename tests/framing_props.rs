//! Property tests for the framing pump and the protocol codecs: no sockets, just bytes.
//!
//! Rules exercised: [HB-2.1] header layout, [HB-2.2] partial input waits, [HB-2.3]/[HB-2.4]/[HB-2.5]/[HB-2.6]
//! header checks, [HB-4.1] decoding is total (a bad body is a `DecodeError`, never a panic).

use hubbub::framing::{put_header, split_frame, FrameError, Header, HEADER_LEN, MAGIC, VERSION};
use hubbub::protocol::{
    is_packet_kind, is_request_kind, kind, DecodeError, Message, Packet, Request, TokenEntry,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// Every kind a client may send in protocol v1, spelled out independently of `is_request_kind`.
const REQUEST_KINDS: [u8; 11] = [
    kind::PING,
    kind::REGISTER,
    kind::LOGIN,
    kind::RESUME,
    kind::LOGOUT,
    kind::LIST_TOKENS,
    kind::REVOKE_TOKEN,
    kind::SEND,
    kind::RECEIVED,
    kind::READ,
    kind::HISTORY,
];

/// The body limit the stream properties run under: bodies are generated up to exactly this size, so frames at
/// the limit are part of the input space ([HB-2.5]).
const MAX_BODY: u32 = 300;

fn encode_frame(kind: u8, request_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    put_header(&mut out, kind, request_id, body.len() as u32);
    out.extend_from_slice(body);
    out
}

/// A raw frame: (kind, request id, body).
type RawFrame = (u8, u32, Vec<u8>);

fn raw_frame() -> impl Strategy<Value = RawFrame> {
    (
        prop::sample::select(REQUEST_KINDS.to_vec()),
        any::<u32>(),
        prop_oneof![
            4 => prop::collection::vec(any::<u8>(), 0..=MAX_BODY as usize),
            1 => prop::collection::vec(any::<u8>(), MAX_BODY as usize..=MAX_BODY as usize),
        ],
    )
}

/// The accumulate-and-split loop a reader runs: append each chunk to a buffer, then take every whole frame off
/// its front. A header is only ever checked, never an error, because every generated frame is valid.
fn pump(chunks: &[&[u8]], max_body: u32) -> (Vec<RawFrame>, Vec<u8>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let split = split_frame(&buf, max_body, is_request_kind);
            let frame = match split {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => panic!("valid stream refused: {e} (buffered {})", buf.len()),
            };
            assert!(frame.len <= buf.len(), "claimed more bytes than given");
            assert_eq!(frame.len, HEADER_LEN + frame.body.len());
            let item = (
                frame.header.kind,
                frame.header.request_id,
                frame.body.to_vec(),
            );
            let used = frame.len;
            out.push(item);
            buf.drain(..used);
        }
    }
    (out, buf)
}

/// Turns sorted, deduplicated cut positions into chunks covering all of `bytes`.
fn cut<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

fn short_string() -> impl Strategy<Value = String> {
    // Any Unicode, including multi-byte characters, kept short (strings travel with a u16 length).
    ".{0,24}"
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Ping),
        (short_string(), short_string())
            .prop_map(|(username, password)| Request::Register { username, password }),
        (short_string(), short_string(), short_string(), any::<u64>()).prop_map(
            |(username, password, device, last_seen)| Request::Login {
                username,
                password,
                device,
                last_seen
            }
        ),
        (any::<[u8; 16]>(), short_string(), any::<u64>()).prop_map(|(token, device, last_seen)| {
            Request::Resume {
                token,
                device,
                last_seen,
            }
        }),
        Just(Request::Logout),
        Just(Request::ListTokens),
        any::<u64>().prop_map(|token_id| Request::RevokeToken { token_id }),
        (short_string(), any::<u64>(), short_string()).prop_map(
            |(recipient, client_msg_id, text)| Request::Send {
                recipient,
                client_msg_id,
                text
            }
        ),
        any::<u64>().prop_map(|up_to| Request::Received { up_to }),
        (short_string(), any::<u64>()).prop_map(|(peer, up_to)| Request::Read { peer, up_to }),
        (short_string(), any::<u64>(), any::<u16>()).prop_map(|(peer, before_id, limit)| {
            Request::History {
                peer,
                before_id,
                limit,
            }
        }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<u64>(),
        short_string(),
        short_string(),
        any::<u64>(),
        short_string(),
    )
        .prop_map(|(id, sender, recipient, timestamp_ms, text)| Message {
            id,
            sender,
            recipient,
            timestamp_ms,
            text,
        })
}

fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        (
            any::<[u8; 16]>(),
            short_string(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |(connection_id, server_version, max_frame, idle_timeout_ms, auth_timeout_ms)| {
                    Packet::Hello {
                        connection_id,
                        server_version,
                        max_frame,
                        idle_timeout_ms,
                        auth_timeout_ms,
                    }
                }
            ),
        Just(Packet::Pong),
        (any::<u16>(), short_string()).prop_map(|(code, text)| Packet::Error { code, text }),
        Just(Packet::Ok),
        (
            any::<[u8; 16]>(),
            any::<u64>(),
            short_string(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(token, user_id, username, max_message_id, delivered_cursor)| Packet::LoginOk {
                    token,
                    user_id,
                    username,
                    max_message_id,
                    delivered_cursor,
                }
            ),
        prop::collection::vec(
            (
                any::<u64>(),
                short_string(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(
                    |(token_id, device, created_at_ms, last_used_at_ms, expires_at_ms, current)| {
                        TokenEntry {
                            token_id,
                            device,
                            created_at_ms,
                            last_used_at_ms,
                            expires_at_ms,
                            current,
                        }
                    }
                ),
            0..5
        )
        .prop_map(Packet::Tokens),
        (any::<u64>(), any::<u64>()).prop_map(|(message_id, timestamp_ms)| Packet::Ack {
            message_id,
            timestamp_ms
        }),
        message().prop_map(Packet::Deliver),
        (short_string(), any::<u64>())
            .prop_map(|(peer, up_to)| Packet::DeliveryReceipt { peer, up_to }),
        (short_string(), any::<u64>())
            .prop_map(|(peer, up_to)| Packet::ReadReceipt { peer, up_to }),
        (prop::collection::vec(message(), 0..5), any::<bool>())
            .prop_map(|(messages, more)| Packet::HistoryPage { messages, more }),
        any::<u64>().prop_map(|cursor| Packet::CaughtUp { cursor }),
        short_string().prop_map(|text| Packet::Shutdown { text }),
    ]
}

/// Checks what `split_frame` may claim about any input, whatever it returns.
fn check_split_contract(bytes: &[u8], max_body: u32, known: fn(u8) -> bool) {
    match split_frame(bytes, max_body, known) {
        Ok(None) => {}
        Ok(Some(frame)) => {
            assert!(frame.len <= bytes.len(), "claims more bytes than given");
            assert_eq!(frame.len, HEADER_LEN + frame.body.len());
            assert_eq!(frame.header.body_len as usize, frame.body.len());
            assert!(frame.header.body_len <= max_body);
            assert!(known(frame.header.kind));
            assert_eq!(frame.body, &bytes[HEADER_LEN..frame.len]);
            assert_eq!(&bytes[..2], &MAGIC);
            assert_eq!(bytes[2], VERSION);
        }
        Err(_) => assert!(
            bytes.len() >= HEADER_LEN,
            "an error from fewer than {HEADER_LEN} bytes: {} given",
            bytes.len()
        ),
    }
}

// [HB-2.4] Every v1 request kind is accepted, every server kind (high bit set) is refused, and split_frame
// refuses exactly the kinds `is_request_kind` does not know.
#[test]
fn hb_2_4_request_kinds_are_accepted_and_others_refused() {
    for k in REQUEST_KINDS {
        assert!(is_request_kind(k), "v1 request kind 0x{k:02x} refused");
    }
    for k in 0..=255u8 {
        let frame = encode_frame(k, 1, b"");
        let result = split_frame(&frame, MAX_BODY, is_request_kind);
        if k >= 0x80 || k == 0 {
            assert!(!is_request_kind(k), "kind 0x{k:02x} must not be a request");
        }
        if is_request_kind(k) {
            assert!(matches!(result, Ok(Some(_))), "kind 0x{k:02x}: {result:?}");
        } else {
            assert_eq!(result, Err(FrameError::UnknownKind(k)), "kind 0x{k:02x}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // No regression files: this suite must not write into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    // [HB-2.1] [HB-2.2] Any sequence of valid frames, cut anywhere into chunks and run through the
    // accumulate-and-split loop, comes out as exactly the same frames in the same order, with nothing left over.
    #[test]
    fn hb_2_2_frames_survive_arbitrary_chunking(
        frames in prop::collection::vec(raw_frame(), 0..12),
        cuts in prop::collection::vec(any::<Index>(), 0..40),
    ) {
        let mut stream = Vec::new();
        for (k, rid, body) in &frames {
            stream.extend(encode_frame(*k, *rid, body));
        }
        let chunks = cut(&stream, &cuts);
        prop_assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), stream.len());
        let (out, left) = pump(&chunks, MAX_BODY);
        prop_assert_eq!(out, frames);
        prop_assert!(left.is_empty(), "{} bytes left over", left.len());
    }

    // [HB-2.2] Every strict prefix of a valid stream's first frame is "wait", never an error or a frame.
    #[test]
    fn hb_2_2_every_prefix_of_a_frame_waits(frame in raw_frame()) {
        let (k, rid, body) = frame;
        let bytes = encode_frame(k, rid, &body);
        for end in 0..bytes.len() {
            prop_assert_eq!(split_frame(&bytes[..end], MAX_BODY, is_request_kind), Ok(None), "cut at {}", end);
        }
        let whole = split_frame(&bytes, MAX_BODY, is_request_kind).unwrap().unwrap();
        prop_assert_eq!(whole.header, Header { kind: k, request_id: rid, body_len: body.len() as u32 });
        prop_assert_eq!(whole.body, &body[..]);
        prop_assert_eq!(whole.len, bytes.len());
    }

    // [HB-2.6] Arbitrary bytes never make split_frame panic, and it never claims more bytes than it was given.
    #[test]
    fn hb_2_6_split_frame_is_total_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        max_body in any::<u32>(),
    ) {
        check_split_contract(&bytes, max_body, is_request_kind);
        check_split_contract(&bytes, max_body, is_packet_kind);
        check_split_contract(&bytes, max_body, |_| true);
    }

    // [HB-2.3]..[HB-2.5] A well-formed header with arbitrary fields, followed by arbitrary bytes: the result is
    // exactly what the header rules say (so the Ok(Some) path is exercised, not only the BadMagic one).
    #[test]
    fn hb_2_5_header_rules_on_arbitrary_headers(
        k in any::<u8>(),
        rid in any::<u32>(),
        body_len in 0u32..128,
        tail in prop::collection::vec(any::<u8>(), 0..160),
        max_body in 0u32..128,
    ) {
        let mut bytes = Vec::new();
        put_header(&mut bytes, k, rid, body_len);
        bytes.extend_from_slice(&tail);
        let result = split_frame(&bytes, max_body, is_request_kind);
        check_split_contract(&bytes, max_body, is_request_kind);
        if !is_request_kind(k) {
            prop_assert_eq!(result, Err(FrameError::UnknownKind(k)));
        } else if body_len > max_body {
            prop_assert_eq!(result, Err(FrameError::TooLarge { len: body_len, max: max_body }));
        } else if tail.len() < body_len as usize {
            prop_assert_eq!(result, Ok(None));
        } else {
            let frame = result.unwrap().unwrap();
            prop_assert_eq!(frame.header, Header { kind: k, request_id: rid, body_len });
            prop_assert_eq!(frame.body, &tail[..body_len as usize]);
            prop_assert_eq!(frame.len, HEADER_LEN + body_len as usize);
        }
    }

    // [HB-2.3] A header whose magic or version is wrong is refused whatever follows.
    #[test]
    fn hb_2_3_bad_magic_or_version_is_always_refused(
        magic in any::<[u8; 2]>(),
        version in any::<u8>(),
        rest in prop::collection::vec(any::<u8>(), 9..64),
    ) {
        let mut bytes = vec![magic[0], magic[1], version];
        bytes.extend_from_slice(&rest);
        let result = split_frame(&bytes, u32::MAX, |_| true);
        if magic != MAGIC {
            prop_assert_eq!(result, Err(FrameError::BadMagic));
        } else if version != VERSION {
            prop_assert_eq!(result, Err(FrameError::BadVersion(version)));
        } else {
            prop_assert!(result.is_ok());
        }
    }

    // [HB-4.1] Decoding is total: arbitrary bytes under any kind give a value or a DecodeError, never a panic.
    #[test]
    fn hb_4_1_decoders_are_total_on_arbitrary_bytes(
        k in any::<u8>(),
        rid in any::<u32>(),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        // The high bit says who sends a kind ([HB-3]): no server kind decodes as a request, and no client kind
        // decodes as a packet.
        let request = Request::decode(k, &body);
        if k >= 0x80 {
            prop_assert_eq!(request, Err(DecodeError::WrongKind(k)));
        }
        let header = Header { kind: k, request_id: rid, body_len: body.len() as u32 };
        let packet = Packet::decode(&header, &body);
        if k < 0x80 {
            prop_assert_eq!(packet, Err(DecodeError::WrongKind(k)));
        }
    }

    // [HB-4.1] Bodies near a valid one (the same bytes with a few flipped) never panic either; this reaches the
    // string and list paths that random bytes rarely get past.
    #[test]
    fn hb_4_1_decoders_are_total_on_mutated_bodies(
        req in request(),
        pkt in packet(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..6),
    ) {
        let mut frame = Vec::new();
        req.encode(1, &mut frame);
        let mut body = frame[HEADER_LEN..].to_vec();
        if !body.is_empty() {
            for (at, byte) in &flips {
                let i = at.index(body.len());
                body[i] ^= byte;
            }
        }
        let _ = Request::decode(req.kind(), &body);

        let mut frame = Vec::new();
        pkt.encode(0, &mut frame);
        let header = split_frame(&frame, u32::MAX, is_packet_kind).unwrap().unwrap().header;
        let mut body = frame[HEADER_LEN..].to_vec();
        if !body.is_empty() {
            for (at, byte) in &flips {
                let i = at.index(body.len());
                body[i] ^= byte;
            }
        }
        let _ = Packet::decode(&header, &body);
    }

    // [HB-4.1] A strict prefix of a valid body is Truncated, and one extra byte is TrailingBytes.
    #[test]
    fn hb_4_1_truncated_and_trailing_request_bodies(req in request(), at in any::<Index>(), extra in any::<u8>()) {
        let mut frame = Vec::new();
        req.encode(1, &mut frame);
        let body = &frame[HEADER_LEN..];
        if !body.is_empty() {
            let end = at.index(body.len());
            prop_assert_eq!(Request::decode(req.kind(), &body[..end]), Err(DecodeError::Truncated));
        }
        let mut longer = body.to_vec();
        longer.push(extra);
        prop_assert_eq!(Request::decode(req.kind(), &longer), Err(DecodeError::TrailingBytes));
    }

    // [HB-2.1] [HB-4] Any Request round-trips through encode, split_frame and decode, with its request id.
    #[test]
    fn hb_4_requests_roundtrip(req in request(), rid in any::<u32>()) {
        let mut out = Vec::new();
        req.encode(rid, &mut out);
        prop_assert_eq!(&out[..2], &MAGIC);
        prop_assert_eq!(out[2], VERSION);
        prop_assert_eq!(out[3], req.kind());
        prop_assert_eq!(&out[4..8], &rid.to_be_bytes());
        prop_assert_eq!(&out[8..12], &((out.len() - HEADER_LEN) as u32).to_be_bytes());
        let frame = split_frame(&out, u32::MAX, is_request_kind).unwrap().unwrap();
        prop_assert_eq!(frame.len, out.len());
        prop_assert_eq!(frame.header.request_id, rid);
        prop_assert_eq!(frame.header.kind, req.kind());
        prop_assert_eq!(Request::decode(frame.header.kind, frame.body), Ok(req));
    }

    // [HB-4] Any Packet round-trips the same way (the client library decodes with this code).
    #[test]
    fn hb_4_packets_roundtrip(pkt in packet(), rid in any::<u32>()) {
        let mut out = Vec::new();
        pkt.encode(rid, &mut out);
        let frame = split_frame(&out, u32::MAX, is_packet_kind).unwrap().unwrap();
        prop_assert_eq!(frame.len, out.len());
        prop_assert_eq!(frame.header.request_id, rid);
        prop_assert_eq!(frame.header.kind, pkt.kind());
        prop_assert_eq!(Packet::decode(&frame.header, frame.body), Ok(pkt));
    }
}
