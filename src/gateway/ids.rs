//! Names of things on a shard: a connection ([`ConnId`], slab slot plus generation), a
//! request id that routes ([`RequestKey`]: the owning shard and a 24-bit serial in the 4
//! bytes of a `RequestId`, found again through [`RequestIds`]), and a control-plane waiter.
//!
//! Request ids come from a per-shard counter, not from slab slots: a runner (and the actor
//! code on it) may still hold a request id after the gateway freed it (a late ack, a
//! persisted hibernation entry of a socket that closed while its actor slept), so an id
//! comes back only after the counter went round all 2^24 serials, and never while it is
//! in use. The slab is bounded by [`MAX_SLOTS`]; the shell caps connections below it and
//! the table asserts it.

/// Most connections one shard's table holds (slots `0..MAX_SLOTS`).
pub const MAX_SLOTS: usize = 1 << 20;
/// Bits of a request id's serial (the three bytes after the shard byte).
pub const SERIAL_BITS: u32 = 24;
pub const SERIAL_MASK: u32 = (1 << SERIAL_BITS) - 1;

/// One connection of a shard: its slab slot and the generation it was given when inserted
/// (a slot is reused; the generation tells a later connection from an earlier one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId {
    pub slot: u32,
    pub gen: u32,
}

/// The routing content of a 4-byte `RequestId`: byte 0 is the owning shard, the next three
/// bytes (little endian) the serial that shard's [`RequestIds`] maps to a slab slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestKey {
    pub shard: u16,
    pub serial: u32,
}

impl RequestKey {
    pub fn encode(self) -> [u8; 4] {
        debug_assert!(
            self.serial <= SERIAL_MASK,
            "serial {} too wide",
            self.serial
        );
        let b = self.serial.to_le_bytes();
        [self.shard as u8, b[0], b[1], b[2]]
    }

    pub fn decode(id: [u8; 4]) -> RequestKey {
        RequestKey {
            shard: id[0] as u16,
            serial: u32::from_le_bytes([id[1], id[2], id[3], 0]),
        }
    }
}

const EMPTY: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Bucket {
    serial: u32,
    slot: u32,
}

/// A shard's live request ids: a counter for new serials and a direct-mapped table from a
/// serial's low bits to (serial, slot), so a runner's message finds its request with one
/// array index and one comparison.
///
/// The table holds at most half its buckets. A new serial is the counter's next value
/// whose bucket is free (a serial still in use has its own bucket taken, so it is never
/// issued twice). The table only grows, doubling: two serials in different buckets stay in
/// different buckets under a wider mask, so growing never moves one onto another.
pub struct RequestIds {
    next: u32,
    live: usize,
    table: Vec<Bucket>,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds::with_buckets(256)
    }
}

impl RequestIds {
    fn with_buckets(n: usize) -> RequestIds {
        debug_assert!(n.is_power_of_two());
        RequestIds {
            next: 0,
            live: 0,
            table: vec![
                Bucket {
                    serial: EMPTY,
                    slot: 0
                };
                n
            ],
        }
    }

    fn mask(&self) -> u32 {
        self.table.len() as u32 - 1
    }

    /// A serial for the request in `slot`, unique among the live ones.
    pub fn issue(&mut self, slot: u32) -> u32 {
        if (self.live + 1) * 2 > self.table.len() {
            self.grow();
        }
        let mask = self.mask();
        loop {
            let serial = self.next;
            self.next = (serial + 1) & SERIAL_MASK;
            let b = &mut self.table[(serial & mask) as usize];
            if b.serial == EMPTY {
                *b = Bucket { serial, slot };
                self.live += 1;
                return serial;
            }
        }
    }

    /// The slot of a live serial.
    #[inline]
    pub fn slot(&self, serial: u32) -> Option<u32> {
        let b = self.table[(serial & self.mask()) as usize];
        (b.serial == serial).then_some(b.slot)
    }

    /// Frees a serial (its request ended).
    pub fn free(&mut self, serial: u32) {
        let mask = self.mask();
        let b = &mut self.table[(serial & mask) as usize];
        if b.serial == serial {
            b.serial = EMPTY;
            self.live -= 1;
        }
    }

    pub fn live(&self) -> usize {
        self.live
    }

    fn grow(&mut self) {
        let n = self.table.len() * 2;
        assert!(
            n <= 1 << SERIAL_BITS,
            "request ids: {} live serials do not fit",
            self.live
        );
        let mut wider = RequestIds::with_buckets(n);
        wider.next = self.next;
        let mask = wider.mask();
        for b in self.table.iter().filter(|b| b.serial != EMPTY) {
            wider.table[(b.serial & mask) as usize] = *b;
        }
        wider.live = self.live;
        *self = wider;
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
        for &(shard, serial) in &[(0u16, 0u32), (3, 12345), (255, SERIAL_MASK)] {
            let k = RequestKey { shard, serial };
            assert_eq!(RequestKey::decode(k.encode()), k);
        }
    }

    /// Against a model (a map of live serials): serials are unique among the live ones,
    /// each maps to its slot, a freed one is gone, and none comes back within the run (far
    /// fewer issues than 2^24), across the counter's wrap (it starts near the top).
    #[test]
    fn request_ids_are_unique_while_live_and_come_back_late() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        use std::collections::HashMap;
        let mut rng = StdRng::seed_from_u64(7);
        let mut ids = RequestIds {
            next: SERIAL_MASK - 50_000,
            ..RequestIds::default()
        };
        let mut model: HashMap<u32, u32> = HashMap::new();
        let mut ever = std::collections::HashSet::new();
        let mut wrapped = false;
        for step in 0..400_000u32 {
            let grow = model.len() < 3000 && rng.random_bool(0.52);
            if grow || model.is_empty() {
                let s = ids.issue(step);
                assert!(s <= SERIAL_MASK);
                assert!(
                    model.insert(s, step).is_none(),
                    "serial {s} issued twice while live"
                );
                assert!(
                    ever.insert(s),
                    "serial {s} came back before the counter went round"
                );
                wrapped |= s < 1000;
            } else {
                let k = *model.keys().nth(rng.random_range(0..model.len())).unwrap();
                model.remove(&k);
                ids.free(k);
                assert_eq!(ids.slot(k), None);
            }
            if step % 997 == 0 {
                for (s, slot) in &model {
                    assert_eq!(ids.slot(*s), Some(*slot));
                }
            }
            assert_eq!(ids.live(), model.len());
        }
        assert!(wrapped, "the run crossed the counter's wrap");
    }

    #[test]
    fn waiter_ids_round_trip() {
        let id = waiter_id(12345, 0xABC);
        assert_eq!(waiter_slot(id), (12345, 0xABC));
    }
}
