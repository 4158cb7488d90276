//! WebSocket frame headers (RFC 6455 §5.2): parse, encode, and the masking transform.
//!
//! What it is for: turning the first 2–14 bytes of a frame into a [`FrameHeader`] (rejecting
//! everything the RFC forbids at this level: unknown opcodes, non-minimal or 64-bit-overflowing
//! lengths, fragmented or oversized control frames), encoding headers into a small inline
//! array, and XOR-ing payloads with a masking key in place, a machine word at a time.
//! What it must never do: panic on any input, allocate, or look at payload bytes while
//! parsing a header.

use std::fmt;

/// Largest payload a control frame (close, ping, pong) may carry.
pub const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Largest possible frame header: 2 bytes + 8-byte extended length + 4-byte mask.
pub const MAX_HEADER_LEN: usize = 14;

/// A frame opcode known to RFC 6455. Reserved opcodes never become an `OpCode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// 0x0: continues a fragmented data message.
    Continuation = 0x0,
    /// 0x1: first (or only) frame of a text message.
    Text = 0x1,
    /// 0x2: first (or only) frame of a binary message.
    Binary = 0x2,
    /// 0x8: close.
    Close = 0x8,
    /// 0x9: ping.
    Ping = 0x9,
    /// 0xA: pong.
    Pong = 0xA,
}

impl OpCode {
    /// The opcode for a 4-bit value, or `None` for the reserved values 0x3–0x7 and 0xB–0xF.
    pub fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Whether this is a control opcode (close, ping, pong).
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message.
    pub fin: bool,
    /// The three RSV bits, right-aligned (RSV1 = 0b100, RSV2 = 0b010, RSV3 = 0b001).
    pub rsv: u8,
    /// Frame opcode.
    pub opcode: OpCode,
    /// Masking key, present iff the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes (at most 2^63 - 1).
    pub payload_len: u64,
    /// Bytes taken by the header itself (2 to 14); the payload starts here.
    pub header_len: usize,
}

/// A header that violates RFC 6455 framing. Every variant is a 1002 protocol error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WsError {
    /// Reserved opcode (0x3–0x7, 0xB–0xF).
    UnknownOpcode(u8),
    /// Length encoded in more bytes than needed (16-bit form for < 126, 64-bit for < 65536).
    NonMinimalLength,
    /// 64-bit length with the most significant bit set.
    LengthOverflow,
    /// Control frame with FIN clear.
    FragmentedControl,
    /// Control frame with a payload over 125 bytes.
    ControlTooLong,
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WsError::UnknownOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            WsError::NonMinimalLength => f.write_str("non-minimal payload length encoding"),
            WsError::LengthOverflow => f.write_str("64-bit payload length with top bit set"),
            WsError::FragmentedControl => f.write_str("fragmented control frame"),
            WsError::ControlTooLong => f.write_str("control frame payload over 125 bytes"),
        }
    }
}

impl std::error::Error for WsError {}

/// Bytes the header starting at `buf` occupies, if `buf` holds enough to know it
/// (the first two bytes); otherwise 2, the least any header needs.
pub fn header_len_hint(buf: &[u8]) -> usize {
    match buf {
        [_, b1, ..] => {
            let ext = match b1 & 0x7F {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
            2 + ext + mask
        }
        _ => 2,
    }
}

/// Parses the frame header at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold the whole header. Checks that need no
/// connection state are done here: reserved opcodes, minimal length encoding, the 64-bit top
/// bit, and the control-frame rules (FIN set, payload ≤ 125). RSV bits and the masking rule
/// depend on the connection and are left to the caller.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, WsError> {
    let (b0, b1) = match buf {
        [b0, b1, ..] => (*b0, *b1),
        _ => return Ok(None),
    };
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0x7;
    let raw_op = b0 & 0x0F;
    let opcode = OpCode::from_u8(raw_op).ok_or(WsError::UnknownOpcode(raw_op))?;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;

    if opcode.is_control() {
        if !fin {
            return Err(WsError::FragmentedControl);
        }
        if u64::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(WsError::ControlTooLong);
        }
    }

    let (payload_len, mut pos) = match len7 {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            let len = u64::from(u16::from_be_bytes([b[0], b[1]]));
            if len < 126 {
                return Err(WsError::NonMinimalLength);
            }
            (len, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let len = u64::from_be_bytes(a);
            if len & (1 << 63) != 0 {
                return Err(WsError::LengthOverflow);
            }
            if len <= u64::from(u16::MAX) {
                return Err(WsError::NonMinimalLength);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };

    let mask = if masked {
        let Some(b) = buf.get(pos..pos + 4) else {
            return Ok(None);
        };
        pos += 4;
        Some([b[0], b[1], b[2], b[3]])
    } else {
        None
    };

    Ok(Some(FrameHeader {
        fin,
        rsv,
        opcode,
        mask,
        payload_len,
        header_len: pos,
    }))
}

/// XORs `buf` with `mask` in place. `offset` is the position of `buf[0]` within the frame
/// payload, so a payload can be unmasked in pieces as it arrives: byte `i` of `buf` is XOR-ed
/// with `mask[(offset + i) % 4]`. Masking and unmasking are the same operation.
///
/// On x86-64 CPUs with AVX2 (detected at run time; the build targets the baseline, SSE2)
/// large payloads go 32 bytes at a time, which halves the instructions of this pass, the
/// one the gateway cannot avoid for every byte a client or a runner sends. Elsewhere it works
/// on 8-byte words; only the last < 8 bytes are done one at a time.
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    #[cfg(target_arch = "x86_64")]
    if buf.len() >= 64 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { apply_mask_avx2(buf, mask, offset) };
        return;
    }
    apply_mask_words(buf, mask, offset);
}

/// [`apply_mask`] compiled for AVX2: the byte-wise XOR of 32-byte blocks becomes one vector
/// load, XOR and store per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_mask_avx2(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let r = offset & 3;
    let m: [u8; 32] = std::array::from_fn(|i| mask[(r + i) & 3]);
    let mut blocks = buf.chunks_exact_mut(32);
    for block in &mut blocks {
        for (b, k) in block.iter_mut().zip(m) {
            *b ^= k;
        }
    }
    // Every block is a multiple of 4 bytes long: the tail starts at mask phase 0 again.
    for (b, k) in blocks.into_remainder().iter_mut().zip(m) {
        *b ^= k;
    }
}

/// The mask as it applies from payload position `offset` on: byte `i` of the result masks
/// payload byte `offset + i`.
#[inline]
pub fn rotate_mask(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let r = offset & 3;
    [
        mask[r],
        mask[(r + 1) & 3],
        mask[(r + 2) & 3],
        mask[(r + 3) & 3],
    ]
}

/// [`apply_mask`] for any CPU: 8-byte words.
#[inline]
fn apply_mask_words(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let m = rotate_mask(mask, offset);
    let m64 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);

    let mut blocks = buf.chunks_exact_mut(32);
    for block in &mut blocks {
        for word in block.chunks_exact_mut(8) {
            xor_word(word, m64);
        }
    }
    let rest = blocks.into_remainder();
    let mut words = rest.chunks_exact_mut(8);
    for word in &mut words {
        xor_word(word, m64);
    }
    // Every block and word above is a multiple of 4 bytes long, so the tail starts at mask
    // phase 0 again.
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

#[inline(always)]
fn xor_word(word: &mut [u8], m64: u64) {
    if let Ok(w) = <&mut [u8; 8]>::try_from(word) {
        *w = (u64::from_ne_bytes(*w) ^ m64).to_ne_bytes();
    }
}

/// An encoded frame header: an inline array and its used length. Derefs to `&[u8]`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HeaderBuf {
    buf: [u8; MAX_HEADER_LEN],
    len: u8,
}

impl HeaderBuf {
    /// The encoded header bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::ops::Deref for HeaderBuf {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for HeaderBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for HeaderBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HeaderBuf").field(&self.as_slice()).finish()
    }
}

/// Encodes a frame header with the minimal length form. RSV bits are zero.
///
/// Server frames pass `mask: None` (RFC 6455: a server never masks); client frames (the
/// test client, the runner side) pass a key and must mask the payload with [`apply_mask`].
/// Lengths above 2^63 - 1 cannot be represented and are clamped to it; callers never have
/// such payloads.
#[inline]
pub fn encode_header(
    fin: bool,
    opcode: OpCode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
) -> HeaderBuf {
    let mut buf = [0u8; MAX_HEADER_LEN];
    buf[0] = (if fin { 0x80 } else { 0 }) | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let payload_len = payload_len.min(i64::MAX as u64);
    let mut len = if payload_len < 126 {
        buf[1] = mask_bit | payload_len as u8;
        2
    } else if payload_len <= u64::from(u16::MAX) {
        buf[1] = mask_bit | 126;
        buf[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        buf[1] = mask_bit | 127;
        buf[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    };
    if let Some(m) = mask {
        buf[len..len + 4].copy_from_slice(&m);
        len += 4;
    }
    HeaderBuf {
        buf,
        len: len as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= mask[(offset + i) % 4];
        }
    }

    #[test]
    fn parse_7bit_lengths() {
        for len in [0u64, 1, 125] {
            let h = encode_header(true, OpCode::Binary, len, None);
            assert_eq!(h.len(), 2);
            let p = parse_header(&h).unwrap().unwrap();
            assert_eq!(p.payload_len, len);
            assert_eq!(p.header_len, 2);
            assert!(p.fin);
            assert_eq!(p.opcode, OpCode::Binary);
            assert_eq!(p.mask, None);
            assert_eq!(p.rsv, 0);
        }
    }

    #[test]
    fn parse_16bit_lengths() {
        for len in [126u64, 127, 1000, 65535] {
            let h = encode_header(false, OpCode::Text, len, Some([1, 2, 3, 4]));
            assert_eq!(h.len(), 8);
            let p = parse_header(&h).unwrap().unwrap();
            assert_eq!(p.payload_len, len);
            assert_eq!(p.header_len, 8);
            assert!(!p.fin);
            assert_eq!(p.mask, Some([1, 2, 3, 4]));
            // every strict prefix needs more bytes
            for cut in 0..h.len() {
                assert_eq!(parse_header(&h[..cut]), Ok(None), "cut {cut}");
            }
        }
    }

    #[test]
    fn parse_64bit_lengths() {
        for len in [65536u64, 1 << 32, i64::MAX as u64] {
            let h = encode_header(true, OpCode::Binary, len, None);
            assert_eq!(h.len(), 10);
            let p = parse_header(&h).unwrap().unwrap();
            assert_eq!(p.payload_len, len);
            assert_eq!(p.header_len, 10);
            for cut in 0..h.len() {
                assert_eq!(parse_header(&h[..cut]), Ok(None));
            }
        }
        let h = encode_header(true, OpCode::Binary, 70000, Some([9, 9, 9, 9]));
        assert_eq!(h.len(), 14);
        assert_eq!(parse_header(&h).unwrap().unwrap().header_len, 14);
    }

    #[test]
    fn parse_rejects_non_minimal() {
        // 16-bit form carrying 125
        assert_eq!(
            parse_header(&[0x82, 126, 0, 125]),
            Err(WsError::NonMinimalLength)
        );
        // 64-bit form carrying 65535
        assert_eq!(
            parse_header(&[0x82, 127, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF]),
            Err(WsError::NonMinimalLength)
        );
        // 64-bit form carrying 0
        assert_eq!(
            parse_header(&[0x82, 127, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(WsError::NonMinimalLength)
        );
    }

    #[test]
    fn parse_rejects_top_bit() {
        assert_eq!(
            parse_header(&[0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            Err(WsError::LengthOverflow)
        );
        assert_eq!(
            parse_header(&[0x82, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(WsError::LengthOverflow)
        );
    }

    #[test]
    fn parse_rejects_reserved_opcodes() {
        for op in (0x3..=0x7).chain(0xB..=0xF) {
            assert_eq!(
                parse_header(&[0x80 | op, 0]),
                Err(WsError::UnknownOpcode(op))
            );
        }
    }

    #[test]
    fn parse_control_rules() {
        assert_eq!(
            parse_header(&[0x09, 0]),
            Err(WsError::FragmentedControl),
            "ping without FIN"
        );
        assert_eq!(
            parse_header(&[0x88, 126, 0, 126]),
            Err(WsError::ControlTooLong)
        );
        assert_eq!(parse_header(&[0x8A, 126]), Err(WsError::ControlTooLong));
        let p = parse_header(&[0x89, 125]).unwrap().unwrap();
        assert_eq!(p.opcode, OpCode::Ping);
        assert_eq!(p.payload_len, 125);
    }

    #[test]
    fn parse_rsv_bits_reported() {
        let p = parse_header(&[0xF2, 0]).unwrap().unwrap();
        assert_eq!(p.rsv, 0b111);
        let p = parse_header(&[0xC1, 0]).unwrap().unwrap();
        assert_eq!(p.rsv, 0b100);
    }

    #[test]
    fn header_len_hint_forms() {
        assert_eq!(header_len_hint(&[]), 2);
        assert_eq!(header_len_hint(&[0x82]), 2);
        assert_eq!(header_len_hint(&[0x82, 5]), 2);
        assert_eq!(header_len_hint(&[0x82, 0x85]), 6);
        assert_eq!(header_len_hint(&[0x82, 126]), 4);
        assert_eq!(header_len_hint(&[0x82, 0xFF]), 14);
    }

    #[test]
    fn mask_small_cases() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        // RFC 6455 §5.7: masked "Hello"
        let mut b = *b"Hello";
        apply_mask(&mut b, mask, 0);
        assert_eq!(b, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        apply_mask(&mut b, mask, 0);
        assert_eq!(&b, b"Hello");
    }

    proptest! {
        #[test]
        fn mask_matches_naive(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            mask in any::<[u8; 4]>(),
            offset in 0usize..64,
            start in 0usize..8,
        ) {
            let start = start.min(data.len());
            let mut fast = data.clone();
            let mut slow = data.clone();
            // unaligned start inside the buffer
            apply_mask(&mut fast[start..], mask, offset);
            naive_mask(&mut slow[start..], mask, offset);
            prop_assert_eq!(&fast, &slow);
            // The portable path too, whatever this CPU has.
            let mut words = data.clone();
            apply_mask_words(&mut words[start..], mask, offset);
            prop_assert_eq!(words, slow);
        }

        #[test]
        fn mask_in_pieces_equals_whole(
            data in proptest::collection::vec(any::<u8>(), 0..200),
            mask in any::<[u8; 4]>(),
            cut in 0usize..200,
        ) {
            let cut = cut.min(data.len());
            let mut whole = data.clone();
            apply_mask(&mut whole, mask, 0);
            let mut pieces = data.clone();
            let (a, b) = pieces.split_at_mut(cut);
            apply_mask(a, mask, 0);
            apply_mask(b, mask, cut);
            prop_assert_eq!(whole, pieces);
        }

        #[test]
        fn encode_parse_roundtrip(
            fin in any::<bool>(),
            op in prop::sample::select(vec![OpCode::Continuation, OpCode::Text, OpCode::Binary]),
            len in prop_oneof![0u64..200, 60000u64..70000, any::<u64>()],
            mask in any::<Option<[u8; 4]>>(),
        ) {
            let len = len & (i64::MAX as u64);
            let h = encode_header(fin, op, len, mask);
            let p = parse_header(&h).unwrap().unwrap();
            prop_assert_eq!(p.fin, fin);
            prop_assert_eq!(p.opcode, op);
            prop_assert_eq!(p.payload_len, len);
            prop_assert_eq!(p.mask, mask);
            prop_assert_eq!(p.header_len, h.len());
            prop_assert_eq!(header_len_hint(&h), h.len());
        }

        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Ok(Some(h)) = parse_header(&data) {
                prop_assert!(h.header_len <= data.len());
                prop_assert_eq!(h.header_len, header_len_hint(&data));
            }
        }
    }
}
