//! The 16-bit tunnel message index and its wrap-aware comparison (SPEC §2.5).
//!
//! Every gateway→runner tunnel message of one client WebSocket carries a `u16` index that wraps
//! modulo 2^16 and is never reset. Comparing two indices is only meaningful while they are less
//! than half the index space apart, which is why the pending window is capped at
//! [`MAX_WINDOW_MESSAGES`] entries. This module must never compare indices with `<`/`>` directly.

/// The index carried by `WebSocketOpen`; the first `WebSocketMessage` gets 1.
pub const OPEN_INDEX: u16 = 0;

/// Half the index space: `after` is only sound for indices closer than this.
pub const HALF_RANGE: u16 = 32768;

/// The largest pending window that keeps [`after`] sound: fewer than 32768 messages.
pub const MAX_WINDOW_MESSAGES: usize = (HALF_RANGE - 1) as usize;

/// `true` when index `a` comes strictly after index `b`, modulo 2^16.
///
/// `after(a, b)` ⇔ `a != b && a.wrapping_sub(b) < 32768`.
#[inline]
pub fn after(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < HALF_RANGE
}

/// The wire index (low 16 bits) of an internal 64-bit message sequence number.
#[inline]
pub fn index_of(seq: u64) -> u16 {
    seq as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_basic() {
        assert!(after(1, 0));
        assert!(!after(0, 1));
        assert!(!after(5, 5));
        assert!(after(0, 65535), "wrap: 0 follows 65535");
        assert!(!after(65535, 0));
        assert!(after(32767, 0), "32767 ahead is still after");
        assert!(!after(32768, 0), "exactly half the space is not after");
        assert!(after(0, 32769), "32767 ahead across the wrap");
        assert!(!after(0, 32768));
    }

    #[test]
    fn after_is_antisymmetric_except_at_half() {
        for a in (0u16..=65535).step_by(97) {
            for d in [1u16, 2, 100, 32766, 32767, 32768, 32769, 65535] {
                let b = a.wrapping_add(d);
                if d == 32768 {
                    assert!(!after(a, b) && !after(b, a));
                } else {
                    assert_ne!(after(a, b), after(b, a), "a={a} b={b}");
                }
            }
        }
    }

    #[test]
    fn after_agrees_with_u64_order_within_half_range() {
        let mut s: u64 = 0x1234_5678;
        for _ in 0..10_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = s % (1 << 40);
            let d = (s >> 40) % u64::from(HALF_RANGE);
            let y = x + d;
            assert_eq!(after(index_of(y), index_of(x)), d != 0);
            assert!(!after(index_of(x), index_of(y)));
        }
    }

    #[test]
    fn index_of_takes_low_bits() {
        assert_eq!(index_of(65535), 65535);
        assert_eq!(index_of(65536), 0);
        assert_eq!(index_of(3 * 65536 + 7), 7);
    }
}
