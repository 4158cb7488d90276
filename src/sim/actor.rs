//! The runner side of the simulation: the real runner state machine ([`Core`]) hosting
//! [`SimActor`]s, and the actors' durable store ([`Store`]) that outlives runner processes and
//! generations (what a real actor persists, e.g. in its KV space).
//!
//! The actor checks every delivery against the store: the payload names its socket and its
//! client sequence number, so a duplicate, a gap, a reorder or a misrouted message is caught
//! at the moment it reaches the actor. It never decides anything about the gateway; it only
//! records and reports.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::runner::core::{Core, Ctl, InitInfo};
use crate::runner::{
    AckPolicy, Actor, ActorCx, ActorHandle, ActorInfo, RequestKey, WsOpen, WsOpenReply, WsRestore,
};

/// The gateway id of the simulated gateway (node 0; node `k` has `k` added to the last byte).
pub(super) const GATEWAY_ID: [u8; 4] = [0x5a, 0x17, 0x00, 0x01];

/// The gateway id of node `node`.
pub(super) fn gateway_id(node: usize) -> [u8; 4] {
    let mut id = GATEWAY_ID;
    id[3] = id[3].wrapping_add(node as u8);
    id
}

/// Reason an actor uses when it closes a socket itself (a legitimate close).
pub(super) const ACTOR_CLOSE_REASON: &str = "sim.actor_close";

/// The client socket that holds request `key` now. Should the gateway ever give an id to a
/// second socket (it numbers requests by a 24-bit counter per shard, so not within a run), a
/// message for the old socket that reached the new one is caught as misrouted.
pub(super) fn sock_of(store: &Store, key: &RequestKey) -> Option<u32> {
    store
        .reqs
        .get(&(key.gateway_id, key.request_id))?
        .last()
        .copied()
}

/// The socket a delivery on `key` carrying socket `pid`'s payload is for: `pid` if the
/// request id ever named it (a message sent before the id was reused), else the socket that
/// holds the id now (so a message of another socket shows as misrouted).
fn delivery_sock(store: &Store, key: &RequestKey, pid: u32) -> Option<u32> {
    let held = store.reqs.get(&(key.gateway_id, key.request_id))?;
    if held.contains(&pid) {
        return Some(pid);
    }
    sock_of(store, key)
}

/// Payload of client message `seq` on socket `id`: 8 header bytes, then `pad` filler bytes.
pub(super) fn payload(id: u32, seq: u32, pad: usize) -> Bytes {
    let mut v = Vec::with_capacity(8 + pad);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v.resize(8 + pad, (seq as u8) ^ 0xa5);
    Bytes::from(v)
}

pub(super) fn parse(data: &[u8]) -> Option<(u32, u32)> {
    let id = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?);
    let seq = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?);
    Some((id, seq))
}

/// What the actor has durably processed for one client socket.
#[derive(Debug, Clone)]
pub(super) struct Durable {
    pub actor: String,
    /// The gateway id of the node the client connected to.
    pub gw: [u8; 4],
    /// The request id the gateway gave the socket (all zero until its tunnel opened).
    pub req: [u8; 4],
    /// The actor accepts this socket as hibernatable (decided by the client generator).
    pub want_hib: bool,
    /// `WebSocketOpen` reached an actor.
    pub opened: bool,
    /// Client sequence number of the last delivered message (0: none).
    pub last_seq: u32,
    /// Tunnel index of the last delivered message (the open carried 0).
    pub last_index: u16,
    /// The gateway closed the client socket (restores of it are refused).
    pub gw_closed: bool,
    /// The actor closed this socket itself (its close may have been lost with a connection,
    /// so the gateway may still hold the client open until its ack timeout).
    pub actor_closed: bool,
    /// The last ack the current actor instance asked for: (runner, generation, index).
    pub acked_by: Option<(usize, u32, u16)>,
    /// Messages the actor sent to the client so far (the next one carries this + 1).
    pub sent: u32,
}

/// State shared by every actor of every runner and the simulation driver.
#[derive(Default)]
pub(super) struct Store {
    pub socks: BTreeMap<u32, Durable>,
    /// (Gateway id, request id) → the client sockets that held it, in order (the last holds
    /// it now).
    pub reqs: BTreeMap<([u8; 4], [u8; 4]), Vec<u32>>,
    /// Actor instances started and not stopped: actor id → (runner number, generation).
    /// More than one runner at once is a violation (checked when `single_instance`), a
    /// draining runner's included (it runs its actors until their `CommandStopActor`).
    pub instances: BTreeMap<String, BTreeSet<(usize, u32)>>,
    /// Check that no actor ever runs on two runners at once.
    pub single_instance: bool,
    /// Actors send to their clients: a greeting when a socket opens, an echo of every
    /// message (runner → client traffic: at most once between nodes).
    pub actor_sends: bool,
    /// Running actor instances: actor id → (runner number, generation, handle).
    pub handles: BTreeMap<String, (usize, u32, ActorHandle)>,
    /// Violations found inside actor callbacks.
    pub failures: Vec<String>,
    /// Messages delivered to actors (all sockets).
    pub delivered: u64,
    /// Sockets handed back on start (`on_websocket_restore`).
    pub restores: u64,
    /// Generations that started after a newer one of the same actor had started.
    pub stale_starts: u64,
    /// Restores where the runner's remembered index was not what the actor processed.
    pub stale_remembered: u64,
}

pub(super) type Shared = Arc<Mutex<Store>>;

pub(super) fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Store> {
    // Callbacks never panic while holding the lock, so poisoning cannot happen; recover anyway.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// A simulated actor instance (one generation on one runner).
pub(super) struct SimActor {
    shared: Shared,
    runner: usize,
    actor_id: String,
    generation: u32,
    policy: AckPolicy,
    ack_on_restore: bool,
    trust_runner_memory: bool,
}

impl Actor for SimActor {
    fn on_start(&mut self, cx: &mut ActorCx<'_>) {
        let h = cx.handle();
        let mut store = lock(&self.shared);
        let (runner, generation) = (self.runner, self.generation);
        let set = store.instances.entry(self.actor_id.clone()).or_default();
        set.insert((runner, generation));
        let others: Vec<(usize, u32)> = set.iter().filter(|(r, _)| *r != runner).copied().collect();
        if store.single_instance && !others.is_empty() {
            let msg = format!(
                "actor {} g{generation} started on runner {runner} while it still runs on \
                 (runner, generation) {others:?}: one actor on two runners at once",
                self.actor_id
            );
            store.failures.push(msg);
        }
        // An older generation that starts late (its start reached its runner after a newer
        // one was placed, and its stop follows) does not take the newer one's place.
        let newer = store
            .handles
            .get(&self.actor_id)
            .is_some_and(|(_, g, _)| *g > self.generation);
        if newer {
            store.stale_starts += 1;
            return;
        }
        store
            .handles
            .insert(self.actor_id.clone(), (self.runner, self.generation, h));
    }

    fn on_stop(&mut self, _cx: &mut ActorCx<'_>) {
        let mut guard = lock(&self.shared);
        let s = &mut *guard;
        if let Some(set) = s.instances.get_mut(&self.actor_id) {
            set.remove(&(self.runner, self.generation));
        }
        let mine = s
            .handles
            .get(&self.actor_id)
            .is_some_and(|(r, g, _)| *r == self.runner && *g == self.generation);
        if mine {
            s.handles.remove(&self.actor_id);
        }
    }

    fn ack_policy(&self) -> AckPolicy {
        self.policy
    }

    fn on_websocket_open(&mut self, cx: &mut ActorCx<'_>, open: &WsOpen<'_>) -> WsOpenReply {
        let mut guard = lock(&self.shared);
        let s = &mut *guard;
        let Some(id) = sock_of(s, &open.key) else {
            s.failures
                .push(format!("open for a foreign request {}", open.key));
            return WsOpenReply::Reject {
                code: 1011,
                reason: "sim.unknown".into(),
            };
        };
        let actor_id = self.actor_id.clone();
        let Some(d) = s.socks.get_mut(&id) else {
            s.failures
                .push(format!("socket {id}: WebSocketOpen for an unknown socket"));
            return WsOpenReply::Reject {
                code: 1011,
                reason: "sim.unknown".into(),
            };
        };
        if d.actor != actor_id {
            let msg = format!(
                "socket {id}: opened on actor {actor_id}, belongs to {}",
                d.actor
            );
            s.failures.push(msg);
            return WsOpenReply::Reject {
                code: 1011,
                reason: "sim.misrouted".into(),
            };
        }
        if d.opened {
            s.failures.push(format!(
                "socket {id}: a second WebSocketOpen reached the actor (SPEC 2.6: never re-open)"
            ));
        }
        d.opened = true;
        if s.actor_sends {
            // A greeting right away: it goes out just after the open answer.
            d.sent += 1;
            cx.send(open.key, payload(id, d.sent, 3), true);
        }
        WsOpenReply::Accept {
            can_hibernate: d.want_hib,
        }
    }

    fn on_websocket_restore(
        &mut self,
        cx: &mut ActorCx<'_>,
        key: RequestKey,
        remembered: Option<u16>,
    ) -> WsRestore {
        let mut guard = lock(&self.shared);
        let s = &mut *guard;
        s.restores += 1;
        let Some(id) = sock_of(s, &key) else {
            s.failures
                .push(format!("restore of a foreign request {key}"));
            return WsRestore::Close;
        };
        let actor_id = self.actor_id.clone();
        let generation = self.generation;
        let Some(d) = s.socks.get(&id).cloned() else {
            s.failures
                .push(format!("socket {id}: restored but never created"));
            return WsRestore::Close;
        };
        if d.actor != actor_id || !d.want_hib || !d.opened {
            s.failures.push(format!(
                "socket {id}: restored on {actor_id} g{generation} but it belongs to {} \
                 (hibernatable {}, opened {})",
                d.actor, d.want_hib, d.opened
            ));
            return WsRestore::Close;
        }
        if d.gw_closed || d.actor_closed {
            // The client left while the wake was under way, or the actor had closed it:
            // nothing to restore.
            return WsRestore::Close;
        }
        // The runner's memory is per process: after the socket ran on another runner it is
        // stale. The actor restores from what it persisted, unless told to trust the runner
        // (the library's default restore).
        let stale = remembered.is_some_and(|r| r != d.last_index);
        if stale {
            s.stale_remembered += 1;
        }
        let last_index = match remembered {
            Some(r) if self.trust_runner_memory => r,
            _ => d.last_index,
        };
        drop(guard);
        if self.ack_on_restore && d.last_seq > 0 {
            // What this actor persisted is processed: acknowledge it, in case the earlier
            // acknowledgement was lost with a connection.
            cx.ack(key, d.last_index);
        }
        WsRestore::Resume {
            last_index: Some(last_index),
        }
    }

    fn on_websocket_message(
        &mut self,
        cx: &mut ActorCx<'_>,
        key: RequestKey,
        index: u16,
        data: Bytes,
        _binary: bool,
    ) {
        let mut guard = lock(&self.shared);
        let s = &mut *guard;
        let actor_id = self.actor_id.clone();
        let generation = self.generation;
        let Some((pid, seq)) = parse(&data) else {
            s.failures
                .push(format!("undecodable delivery on {key} index {index}"));
            return;
        };
        let Some(id) = delivery_sock(s, &key, pid) else {
            s.failures
                .push(format!("undecodable delivery on {key} index {index}"));
            return;
        };
        let Some(d) = s.socks.get_mut(&id) else {
            s.failures
                .push(format!("socket {id}: delivery for an unknown socket"));
            return;
        };
        let mut err = None;
        if pid != id {
            err = Some(format!(
                "socket {id}: got socket {pid}'s message seq {seq} (misrouted)"
            ));
        } else if d.actor != actor_id {
            err = Some(format!(
                "socket {id}: message seq {seq} delivered to actor {actor_id}, socket belongs to {}",
                d.actor
            ));
        } else if seq <= d.last_seq {
            err = Some(format!(
                "socket {id}: DUPLICATE delivery of seq {seq} (index {index}) on {actor_id} \
                 g{generation}; already processed up to seq {}",
                d.last_seq
            ));
        } else if seq != d.last_seq + 1 {
            err = Some(format!(
                "socket {id}: GAP, delivered seq {seq} (index {index}) after seq {} on {actor_id} \
                 g{generation}",
                d.last_seq
            ));
        } else if index != seq as u16 || index != d.last_index.wrapping_add(1) {
            err = Some(format!(
                "socket {id}: seq {seq} carried index {index}, expected {} (last index {})",
                seq as u16, d.last_index
            ));
        } else {
            d.last_seq = seq;
            d.last_index = index;
            if s.actor_sends && seq % 2 == 1 {
                d.sent += 1;
                cx.send(key, payload(id, d.sent, 5), true);
            }
        }
        match err {
            Some(e) => s.failures.push(e),
            None => s.delivered += 1,
        }
    }
}

/// One simulated runner process: the real runner core plus its control channel.
pub(super) struct SimRunner {
    pub key: String,
    pub core: Core,
    pub ctl_rx: UnboundedReceiver<Ctl>,
    /// Generation of the connection this runner holds (its view), if any.
    pub conn: Option<u32>,
    /// It sent `Stopping`.
    pub draining: bool,
    pub policy: AckPolicy,
}

impl SimRunner {
    pub fn new(
        no: usize,
        incarnation: u32,
        slots: u32,
        policy: AckPolicy,
        ack_on_restore: bool,
        trust_runner_memory: bool,
        shared: &Shared,
    ) -> SimRunner {
        let (tx, rx) = unbounded_channel();
        let sh = shared.clone();
        let factory = move |info: &ActorInfo| -> Box<dyn Actor> {
            Box::new(SimActor {
                shared: sh.clone(),
                runner: no,
                actor_id: info.actor_id.clone(),
                generation: info.generation,
                policy,
                ack_on_restore,
                trust_runner_memory,
            })
        };
        let core = Core::new(
            InitInfo {
                name: "default".into(),
                version: 1,
                total_slots: slots,
                metadata: None,
            },
            Box::new(factory),
            Arc::default(),
            tx,
        );
        SimRunner {
            key: format!("runner-{no}.{incarnation}"),
            core,
            ctl_rx: rx,
            conn: None,
            draining: false,
            policy,
        }
    }

    /// Applies the operations actor handles queued (the runner task would do this).
    pub fn drain_ctl(&mut self) {
        while let Ok(c) = self.ctl_rx.try_recv() {
            if let Ctl::Actor {
                actor_id,
                generation,
                op,
            } = c
            {
                self.core.handle_actor_op(&actor_id, generation, op);
            }
        }
    }
}
