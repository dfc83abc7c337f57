//! Framing: the 12-byte header and the two-step frame splitter ("the pump" in the session uses it).
//!
//! Owns: the wire layout of a frame header ([HB-2.1]) and the rules that make a byte stream into whole frames
//! ([HB-2.2]..[HB-2.6]). It works on plain byte slices, so it is tested without any socket.
//!
//! Must not: allocate, look inside a body (that is `protocol`'s job), or know about sessions and sockets.
//!
//! ```text
//!  0      2      3      4              8              12
//!  +------+------+------+--------------+--------------+----------------+
//!  | "HB" | ver  | kind | request id   | body length  | body ...       |
//!  +------+------+------+--------------+--------------+----------------+
//!    u8×2   u8     u8     u32 BE         u32 BE         body length bytes
//! ```
//!
//! Splitting happens in two steps, as in mini-redis: first the header is checked on its own (magic, version,
//! kind, length limit) — so a hostile length is refused *before* any body bytes are awaited or buffered — and only
//! then do we ask whether the whole body has arrived. "Not enough bytes yet" is `Ok(None)`, an ordinary state of
//! a TCP stream, never an error.

use byteorder::{BigEndian, ByteOrder};

/// Bytes in every frame header.
pub const HEADER_LEN: usize = 12;
/// The first two bytes of every frame: ASCII "HB". Lets a server refuse a stray HTTP or TLS client at once.
pub const MAGIC: [u8; 2] = *b"HB";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Packet kind (see `protocol::kind`).
    pub kind: u8,
    /// Chosen by the client, echoed by every reply to that request; 0 in server pushes.
    pub request_id: u32,
    /// Bytes of body that follow the header.
    pub body_len: u32,
}

/// Why a byte stream cannot be framed. Every one of these is fatal for the connection ([HB-2.6]): after it the
/// stream position is unknown, so the server answers with an Error frame and closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The first two bytes are not "HB".
    BadMagic,
    /// A version this build does not speak.
    BadVersion(u8),
    /// A kind number that is not assigned.
    UnknownKind(u8),
    /// The header announces a body larger than the limit.
    TooLarge { len: u32, max: u32 },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadMagic => write!(f, "bad magic: frames start with \"HB\""),
            FrameError::BadVersion(v) => write!(
                f,
                "unsupported protocol version {v} (this server speaks {VERSION})"
            ),
            FrameError::UnknownKind(k) => write!(f, "unknown packet kind 0x{k:02x}"),
            FrameError::TooLarge { len, max } => {
                write!(f, "frame body of {len} bytes exceeds the limit of {max}")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Step one: check a header on its own. `known_kind` says which kind numbers exist; `max_body` is the limit the
/// session is under right now.
pub fn parse_header(
    bytes: &[u8; HEADER_LEN],
    max_body: u32,
    known_kind: fn(u8) -> bool,
) -> Result<Header, FrameError> {
    if bytes[0..2] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[2] != VERSION {
        return Err(FrameError::BadVersion(bytes[2]));
    }
    let header = Header {
        kind: bytes[3],
        request_id: BigEndian::read_u32(&bytes[4..8]),
        body_len: BigEndian::read_u32(&bytes[8..12]),
    };
    if !known_kind(header.kind) {
        return Err(FrameError::UnknownKind(header.kind));
    }
    if header.body_len > max_body {
        return Err(FrameError::TooLarge {
            len: header.body_len,
            max: max_body,
        });
    }
    Ok(header)
}

/// A whole frame found in a buffer. The body is borrowed from that buffer: splitting never copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: Header,
    pub body: &'a [u8],
    /// Bytes the frame occupies in the buffer (header and body): how far the caller advances.
    pub len: usize,
}

/// Step two: take the first whole frame from `buf`, if there is one.
///
/// ```
/// use hubbub::framing::split_frame;
/// let ping = [0x48, 0x42, 0x01, 0x01, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00];
/// let frame = split_frame(&ping, 65536, |_| true)?.ok_or("twelve bytes make a whole Ping")?;
/// assert_eq!((frame.header.kind, frame.header.request_id, frame.len), (0x01, 7, 12));
/// // Eleven bytes are not a frame yet: "wait for more", not an error.
/// assert_eq!(split_frame(&ping[..11], 65536, |_| true), Ok(None));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
/// `Ok(None)` means "wait for more bytes". A bad header is reported as soon as its
/// 12 bytes are present, even if the body never comes.
pub fn split_frame(
    buf: &[u8],
    max_body: u32,
    known_kind: fn(u8) -> bool,
) -> Result<Option<Frame<'_>>, FrameError> {
    let Some(header_bytes) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = parse_header(header_bytes, max_body, known_kind)?;
    let frame_len = HEADER_LEN + header.body_len as usize;
    if buf.len() < frame_len {
        return Ok(None);
    }
    Ok(Some(Frame {
        header,
        body: &buf[HEADER_LEN..frame_len],
        len: frame_len,
    }))
}

/// Writes a header for a body of `body_len` bytes. Encoders reserve the header, write the body, then patch the
/// length with [`patch_body_len`], so a frame is encoded straight into an output buffer with no temporary.
pub fn put_header(out: &mut Vec<u8>, kind: u8, request_id: u32, body_len: u32) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&request_id.to_be_bytes());
    out.extend_from_slice(&body_len.to_be_bytes());
}

/// Fixes the body length of the frame whose header starts at `frame_start` in `out`, now that its body has been
/// written behind it.
pub fn patch_body_len(out: &mut [u8], frame_start: usize) {
    let body_len = (out.len() - frame_start - HEADER_LEN) as u32;
    BigEndian::write_u32(&mut out[frame_start + 8..frame_start + 12], body_len);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_kind(_: u8) -> bool {
        true
    }

    fn frame(kind: u8, request_id: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_header(&mut out, kind, request_id, body.len() as u32);
        out.extend_from_slice(body);
        out
    }

    // [HB-2.1] the header layout, byte for byte.
    #[test]
    fn hb_2_1_header_layout() {
        let bytes = frame(0x01, 0x0102_0304, b"xyz");
        assert_eq!(
            &bytes[..12],
            &[0x48, 0x42, 0x01, 0x01, 0x01, 0x02, 0x03, 0x04, 0x00, 0x00, 0x00, 0x03]
        );
        let Frame {
            header: h,
            body,
            len: used,
        } = split_frame(&bytes, 64, any_kind).unwrap().unwrap();
        assert_eq!(
            h,
            Header {
                kind: 1,
                request_id: 0x0102_0304,
                body_len: 3
            }
        );
        assert_eq!(body, b"xyz");
        assert_eq!(used, 15);
    }

    // [HB-2.2] fewer than 12 bytes, or a header without its whole body, is "wait", not an error.
    #[test]
    fn hb_2_2_partial_input_waits() {
        let bytes = frame(2, 9, b"hello");
        for cut in 0..bytes.len() {
            assert_eq!(
                split_frame(&bytes[..cut], 64, any_kind),
                Ok(None),
                "cut at {cut}"
            );
        }
    }

    // [HB-2.3] a bad magic is refused from the header alone.
    #[test]
    fn hb_2_3_bad_magic() {
        let mut bytes = frame(1, 0, b"");
        bytes[0] = b'G';
        assert_eq!(split_frame(&bytes, 64, any_kind), Err(FrameError::BadMagic));
    }

    // [HB-2.3] a version other than 1 is refused.
    #[test]
    fn hb_2_3_bad_version() {
        let mut bytes = frame(1, 0, b"");
        bytes[2] = 2;
        assert_eq!(
            split_frame(&bytes, 64, any_kind),
            Err(FrameError::BadVersion(2))
        );
    }

    // [HB-2.4] an unassigned kind is refused.
    #[test]
    fn hb_2_4_unknown_kind() {
        let bytes = frame(0x7f, 0, b"");
        assert_eq!(
            split_frame(&bytes, 64, |k| k == 1),
            Err(FrameError::UnknownKind(0x7f))
        );
    }

    // [HB-2.5] a body exactly at the limit passes; one byte over is refused before the body arrives.
    #[test]
    fn hb_2_5_body_limit_edges() {
        let at_limit = frame(1, 0, &[7u8; 64]);
        assert!(split_frame(&at_limit, 64, any_kind).unwrap().is_some());
        let over = frame(1, 0, &[7u8; 65]);
        assert_eq!(
            split_frame(&over[..HEADER_LEN], 64, any_kind),
            Err(FrameError::TooLarge { len: 65, max: 64 })
        );
    }

    #[test]
    fn many_frames_in_one_buffer_come_out_in_order() {
        let mut bytes = Vec::new();
        for i in 0..10u32 {
            bytes.extend(frame(1, i, &vec![i as u8; i as usize]));
        }
        let mut pos = 0;
        let mut seen = Vec::new();
        while let Some(Frame {
            header: h,
            body,
            len: used,
        }) = split_frame(&bytes[pos..], 64, any_kind).unwrap()
        {
            assert_eq!(body.len() as u32, h.request_id);
            seen.push(h.request_id);
            pos += used;
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(pos, bytes.len());
    }

    #[test]
    fn patch_fixes_the_length_of_an_encoded_frame() {
        let mut out = vec![0xAA];
        put_header(&mut out, 3, 1, 0);
        out.extend_from_slice(b"body");
        patch_body_len(&mut out, 1);
        assert_eq!(
            split_frame(&out[1..], 64, any_kind).unwrap().unwrap().body,
            b"body"
        );
    }
}
