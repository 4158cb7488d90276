//! Inbound tunnel message indices: duplicate dropping and gap detection for one WebSocket.
//!
//! The gateway numbers its `WebSocketMessage`s per request with a wrapping `u16` (the
//! `WebSocketOpen` carries 0, the first message 1). After a reconnect or a wake it replays its
//! unacknowledged messages with their original indices, so the runner must drop every index
//! that is not after the last one it delivered, and must treat a hole as an error. This module
//! only decides; it never sends, closes or logs anything itself.

/// `a` comes after `b` in the wrapping 16-bit sequence (half the ring ahead of `b`).
#[inline]
pub fn after(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 32768
}

/// What to do with one inbound message index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next message in sequence: deliver it to the actor.
    Deliver,
    /// Already delivered (index not after the last one): drop it silently.
    Duplicate,
    /// One or more messages are missing: the socket can no longer be trusted.
    Gap {
        /// The index that was expected (`last + 1`).
        expected: u16,
        /// The index that arrived.
        got: u16,
    },
}

/// Per-request tracker of the last delivered gateway→runner message index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundIndex {
    /// `None` when the socket was restored without a known last index: the first message
    /// that arrives becomes the baseline.
    last: Option<u16>,
}

impl InboundIndex {
    /// A socket opened by `WebSocketOpen` (which itself carries index 0).
    pub fn opened() -> Self {
        Self { last: Some(0) }
    }

    /// A socket restored from hibernation; `last` is the last index the actor processed,
    /// when it knows it.
    pub fn restored(last: Option<u16>) -> Self {
        Self { last }
    }

    /// The last delivered index, if known.
    pub fn last(&self) -> Option<u16> {
        self.last
    }

    /// Classifies `index` and, when it is delivered, records it as the last one.
    pub fn check(&mut self, index: u16) -> Verdict {
        let Some(last) = self.last else {
            self.last = Some(index);
            return Verdict::Deliver;
        };
        if !after(index, last) {
            return Verdict::Duplicate;
        }
        let expected = last.wrapping_add(1);
        if index != expected {
            return Verdict::Gap {
                expected,
                got: index,
            };
        }
        self.last = Some(index);
        Verdict::Deliver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_wraps() {
        assert!(after(1, 0));
        assert!(after(0, 65535));
        assert!(after(5, 65530));
        assert!(!after(0, 0));
        assert!(!after(65535, 0));
        assert!(after(32767, 0));
        assert!(!after(32768, 0));
        assert!(!after(65530, 5));
    }

    #[test]
    fn sequence_from_open_delivers_in_order() {
        let mut ix = InboundIndex::opened();
        for i in 1..=10u16 {
            assert_eq!(ix.check(i), Verdict::Deliver);
        }
        assert_eq!(ix.last(), Some(10));
    }

    #[test]
    fn duplicates_are_dropped_and_do_not_move_last() {
        let mut ix = InboundIndex::opened();
        for i in 1..=5u16 {
            assert_eq!(ix.check(i), Verdict::Deliver);
        }
        // A replay of everything from the start.
        for i in 0..=5u16 {
            assert_eq!(ix.check(i), Verdict::Duplicate, "index {i}");
        }
        assert_eq!(ix.last(), Some(5));
        assert_eq!(ix.check(6), Verdict::Deliver);
    }

    #[test]
    fn gap_is_reported_and_does_not_move_last() {
        let mut ix = InboundIndex::opened();
        assert_eq!(ix.check(1), Verdict::Deliver);
        assert_eq!(
            ix.check(3),
            Verdict::Gap {
                expected: 2,
                got: 3
            }
        );
        assert_eq!(ix.last(), Some(1));
    }

    #[test]
    fn wraps_through_u16_max() {
        let mut ix = InboundIndex::restored(Some(65533));
        assert_eq!(ix.check(65534), Verdict::Deliver);
        assert_eq!(ix.check(65535), Verdict::Deliver);
        assert_eq!(ix.check(0), Verdict::Deliver);
        assert_eq!(ix.check(1), Verdict::Deliver);
        // Replayed messages from before the wrap are duplicates, not gaps.
        assert_eq!(ix.check(65534), Verdict::Duplicate);
        assert_eq!(ix.check(65535), Verdict::Duplicate);
        assert_eq!(ix.check(0), Verdict::Duplicate);
        assert_eq!(ix.check(1), Verdict::Duplicate);
        // A hole right after the wrap.
        assert_eq!(
            ix.check(3),
            Verdict::Gap {
                expected: 2,
                got: 3
            }
        );
    }

    #[test]
    fn many_wraps_match_a_u64_model() {
        // Deliver 200k messages with a replay of the last few every 1000 messages.
        let mut ix = InboundIndex::opened();
        let mut delivered: u64 = 0;
        let mut dups: u64 = 0;
        for seq in 1u64..=200_000 {
            if seq % 1000 == 0 {
                for back in (seq.saturating_sub(20)).max(1)..seq {
                    if ix.check(back as u16) == Verdict::Duplicate {
                        dups += 1;
                    }
                }
            }
            assert_eq!(ix.check(seq as u16), Verdict::Deliver, "seq {seq}");
            delivered += 1;
        }
        assert_eq!(delivered, 200_000);
        assert_eq!(dups, 200 * 20);
    }

    #[test]
    fn restored_without_index_takes_first_as_baseline() {
        let mut ix = InboundIndex::restored(None);
        assert_eq!(ix.check(4711), Verdict::Deliver);
        assert_eq!(ix.check(4711), Verdict::Duplicate);
        assert_eq!(ix.check(4712), Verdict::Deliver);
    }
}
