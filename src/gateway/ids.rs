//! Names of things on a shard: a connection ([`ConnId`], slab slot plus generation), a
//! request id that routes ([`RequestKey`]: the owning shard, slot and generation bits in the
//! 4 bytes of a `RequestId`), and a control-plane waiter.
//!
//! The slab is bounded where ids are encoded: a slot must fit in [`SLOT_BITS`] bits, or two
//! connections would share a request id. [`MAX_SLOTS`] is that bound; the shell caps
//! connections below it and the table asserts it.

/// Slot bits in a request id; the rest of the low 24 bits is a generation against reuse.
pub const SLOT_BITS: u32 = 20;
pub const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
pub const GEN_MASK: u32 = 0xF;
/// Most connections one shard's table holds (slots `0..MAX_SLOTS`).
pub const MAX_SLOTS: usize = 1 << SLOT_BITS;

/// One connection of a shard: its slab slot and the generation it was given when inserted
/// (a slot is reused; the generation tells a later connection from an earlier one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId {
    pub slot: u32,
    pub gen: u32,
}

/// The routing content of a 4-byte `RequestId`: byte 0 is the owning shard, the next three
/// bytes (little endian) carry the slab slot (20 bits) and a 4-bit generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestKey {
    pub shard: u16,
    pub slot: u32,
    pub gen: u32,
}

impl RequestKey {
    pub fn encode(self) -> [u8; 4] {
        debug_assert!(
            self.slot <= SLOT_MASK,
            "slot {} does not fit a request id",
            self.slot
        );
        let low = (self.slot & SLOT_MASK) | ((self.gen & GEN_MASK) << SLOT_BITS);
        let b = low.to_le_bytes();
        [self.shard as u8, b[0], b[1], b[2]]
    }

    pub fn decode(id: [u8; 4]) -> RequestKey {
        let low = u32::from_le_bytes([id[1], id[2], id[3], 0]);
        RequestKey {
            shard: id[0] as u16,
            slot: low & SLOT_MASK,
            gen: (low >> SLOT_BITS) & GEN_MASK,
        }
    }
}

/// Waiter ids (a control-plane question's answer comes back with it): slot in the low
/// [`WAITER_SLOT_BITS`] bits, a generation above, so an answer that comes after its question
/// timed out never reaches a later question in the same slot.
pub const WAITER_SLOT_BITS: u32 = 20;

pub fn waiter_id(slot: usize, gen: u32) -> u32 {
    (slot as u32 & ((1 << WAITER_SLOT_BITS) - 1)) | (gen << WAITER_SLOT_BITS)
}

pub fn waiter_slot(id: u32) -> (usize, u32) {
    (
        (id & ((1 << WAITER_SLOT_BITS) - 1)) as usize,
        id >> WAITER_SLOT_BITS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_key_round_trip() {
        for &(shard, slot, gen) in &[(0u16, 0u32, 0u32), (3, 12345, 7), (255, SLOT_MASK, 15)] {
            let k = RequestKey { shard, slot, gen };
            assert_eq!(RequestKey::decode(k.encode()), k);
        }
    }

    #[test]
    fn waiter_ids_round_trip() {
        let id = waiter_id(12345, 0xABC);
        assert_eq!(waiter_slot(id), (12345, 0xABC));
    }
}
