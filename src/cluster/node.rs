//! One node of several (`[cluster] enabled`): its bus to the other nodes, the thread that
//! hands what arrives to the shards and the control plane (`torpor-node`), and the thread
//! that holds or seeks the placement lease (`torpor-lease`).
//!
//! What goes where (both straight from the shard that made it to the receiving node's
//! shard, through the bus):
//! - *A runner's WebSocket messages for a client of another node* are one `tun` publish each:
//!   at most once, as protocol v7 allows runner → client.
//! - *Everything else* goes over the reliable `ctl` link, exactly once and in order per pair
//!   of nodes, also across NATS reconnects and restarts: the frames for a runner connected to
//!   another node (a hole in a socket's indices would make the runner close it), a runner's
//!   opens, closes and acks, a shard's questions and runner sessions for the leader's engine,
//!   the leader's answers, commands and broadcasts, heartbeats. What a node that dies held
//!   is recovered by the pending windows' replay to the runner's next connection.
//!
//! Nothing here decides placement: the control thread (`shard::control`) runs the engine
//! while this node leads and forwards to the leader otherwise.

use super::bus::{Bus, BusConfig, BusEvent, Kind, NodeId};
use super::lease::{Lease, LeaseAction, LeaseConfig, Role, StoreAnswer};
use super::pg_lease::{Acquire, PgLease, Renew};
use super::wire::{self, NodeMsg, ALL_SHARDS};
use crate::gateway::{ControlMsg, ShardMsg};
use crate::shard::mailbox::Mailbox;
use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the node's threads tell the control thread.
pub enum ClusterIn {
    /// A control-plane message of a shard of node `from` (for the leader).
    Control {
        from: NodeId,
        msg: ControlMsg,
    },
    /// Node `from` is alive with `shards` shards and follows the lease `epoch` (0: none yet).
    Heartbeat {
        from: NodeId,
        shards: u16,
        epoch: u64,
    },
    /// Node `from` says it leads with `epoch`.
    Leader {
        from: NodeId,
        epoch: u64,
    },
    /// This node leads from now on with `epoch` (its writes are fenced with it).
    BecameLeader {
        epoch: u64,
    },
    /// This node no longer leads.
    StepDown {
        epoch: u64,
    },
    /// The lease row names `node` as the leader with `epoch`.
    LeaderIs {
        node: NodeId,
        epoch: u64,
    },
    /// `node` restarted (what it had is gone).
    PeerGone(NodeId),
    /// The NATS connection dropped / came back.
    BusDown,
    BusUp,
}

/// Counters of the node's traffic.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Messages sent to other nodes (tunnel, control).
    pub tun_out: AtomicU64,
    pub ctl_out: AtomicU64,
    /// Messages received from other nodes (tunnel, control).
    pub tun_in: AtomicU64,
    pub ctl_in: AtomicU64,
    /// Messages that could not be sent (bus full) or did not decode.
    pub dropped_out: AtomicU64,
    pub malformed_in: AtomicU64,
}

/// This node's handle: its id, its bus, and the numbers it gives other nodes' waiters while
/// it leads (see [`crate::plane::waiter_from_peer`]).
pub struct Node {
    pub id: NodeId,
    bus: Bus,
    peers: Mutex<Vec<NodeId>>,
    members: Mutex<Vec<NodeId>>,
    /// Until when this node may place (its lease, as the lease thread last believed it).
    lease_until: Mutex<Option<Instant>>,
    pub stats: NodeStats,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &super::bus::hex(self.id))
            .finish()
    }
}

impl Node {
    /// Connects to NATS as node `id` (`tls_ca_file`: see [`BusConfig::tls_ca_file`]).
    pub fn start(
        nats_url: &str,
        tls_ca_file: Option<std::path::PathBuf>,
        id: NodeId,
    ) -> io::Result<(Arc<Node>, Receiver<BusEvent>)> {
        let cfg = BusConfig {
            tls_ca_file,
            ..BusConfig::default()
        };
        let (bus, events) = Bus::start(nats_url, id, cfg)?;
        let node = Node {
            id,
            bus,
            peers: Mutex::new(Vec::new()),
            members: Mutex::new(Vec::new()),
            lease_until: Mutex::new(None),
            stats: NodeStats::default(),
        };
        Ok((Arc::new(node), events))
    }

    /// Sends `msg` to node `to` (`Tun`: at most once; `Ctl`: exactly once, in order).
    /// Returns false when it could not be encoded or queued (counted).
    pub fn send(&self, to: NodeId, kind: Kind, msg: &NodeMsg) -> bool {
        let sent = self.queue(to, kind, msg);
        self.bus.wake();
        sent
    }

    /// [`Self::send`] without waking the bus thread; the caller calls [`Self::wake_bus`]
    /// after its last message.
    fn queue(&self, to: NodeId, kind: Kind, msg: &NodeMsg) -> bool {
        let mut out = BytesMut::new();
        if let Err(e) = wire::encode(msg, &mut out) {
            tracing::error!(?e, "a message that cannot cross to another node");
            self.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let counter = match kind {
            Kind::Tun => &self.stats.tun_out,
            Kind::Ctl => &self.stats.ctl_out,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.bus.queue(to, kind, out.freeze()).is_err() {
            self.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// A shard's message for shard `shard` of node `to`. A runner's WebSocket message for a
    /// client of that node is one `tun` publish: at most once, as protocol v7 allows in that
    /// direction. Everything else — above all the frames for a runner, whose indices must
    /// reach it without a hole — goes over the control link, exactly once and in order,
    /// through NATS reconnects and restarts; only the death of a node loses what it held,
    /// and then the pending windows replay to the runner's next connection.
    /// The bus thread is woken by [`Self::wake_bus`], once after a run of these.
    pub fn send_from_shard(&self, to: NodeId, shard: u16, msg: ShardMsg) -> bool {
        self.queue(to, kind_of(&msg), &NodeMsg::Shard { shard, msg })
    }

    /// Wakes the bus thread to take what [`Self::send_from_shard`] queued.
    pub fn wake_bus(&self) {
        self.bus.wake();
    }

    /// A control message for shard `shard` of node `to` (`ALL_SHARDS`: every shard).
    pub fn send_shard_ctl(&self, to: NodeId, shard: u16, msg: ShardMsg) -> bool {
        self.send(to, Kind::Ctl, &NodeMsg::Shard { shard, msg })
    }

    /// The number this node gives `node` in waiter ids (1..), stable while the process lives.
    pub fn peer_number(&self, node: NodeId) -> Option<u16> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = peers.iter().position(|p| *p == node) {
            return Some(i as u16 + 1);
        }
        if peers.len() >= u16::MAX as usize - 1 {
            return None;
        }
        peers.push(node);
        Some(peers.len() as u16)
    }

    /// The node a peer number names.
    pub fn peer(&self, n: u16) -> Option<NodeId> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get((n as usize).checked_sub(1)?).copied()
    }

    /// The other nodes the leader's broadcasts go to.
    pub fn members(&self) -> Vec<NodeId> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets them (the leader's control thread, as nodes join and are lost).
    pub fn set_members(&self, nodes: Vec<NodeId>) {
        *self.members.lock().unwrap_or_else(|p| p.into_inner()) = nodes;
    }

    /// True while this node's lease lets it place at `now`. Checked by the control thread
    /// before every round, so a leader that was paused past its lease does nothing more
    /// once it runs again, even before its lease thread notices.
    pub fn may_place(&self, now: Instant) -> bool {
        self.lease_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| now < until)
    }

    fn set_lease_until(&self, until: Option<Instant>) {
        *self.lease_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }

    /// The bus's counters.
    pub fn bus_stats(&self) -> &super::bus::BusStats {
        self.bus.stats()
    }

    /// The bus's counters, shared (for the metrics page).
    pub fn bus_stats_handle(&self) -> Arc<super::bus::BusStats> {
        self.bus.stats_handle()
    }
}

/// How a shard's message crosses to another node (see [`Node::send_from_shard`]): a
/// runner's WebSocket message for a client is `Tun` (at most once), everything else `Ctl`.
pub fn kind_of(msg: &ShardMsg) -> Kind {
    match msg {
        ShardMsg::Tunnel {
            msg: crate::gateway::TunnelIn::Message { .. },
            ..
        } => Kind::Tun,
        _ => Kind::Ctl,
    }
}

/// Hands what the bus receives to this node's shards (tunnel traffic, the leader's shard
/// messages) and to the control thread (everything else), until the bus ends.
pub fn run_bridge(
    node: Arc<Node>,
    shards: Arc<[Mailbox<ShardMsg>]>,
    events: Receiver<BusEvent>,
    control: Sender<ClusterIn>,
    connected: Arc<std::sync::atomic::AtomicI64>,
) {
    // The bus reports its first connection by starting at all.
    connected.store(1, Ordering::Relaxed);
    let deliver = |shard: u16, msg: ShardMsg| {
        if shard == ALL_SHARDS {
            for mb in shards.iter() {
                mb.send(crate::plane::copy_for_broadcast(&msg));
            }
        } else if let Some(mb) = shards.get(shard as usize) {
            mb.send(msg);
        }
    };
    for ev in events.iter() {
        let (from, kind, data) = match ev {
            BusEvent::Message { from, kind, data } => (from, kind, data),
            BusEvent::PeerRestarted(n) => {
                let _ = control.send(ClusterIn::PeerGone(n));
                continue;
            }
            BusEvent::PeerUnreachable(n) => {
                tracing::warn!(node = %super::bus::hex(n), "a node acknowledges nothing: control messages to it are refused");
                continue;
            }
            BusEvent::Disconnected => {
                connected.store(0, Ordering::Relaxed);
                tracing::warn!("NATS connection lost; reconnecting");
                let _ = control.send(ClusterIn::BusDown);
                continue;
            }
            BusEvent::Reconnected => {
                connected.store(1, Ordering::Relaxed);
                tracing::info!("NATS connection back");
                let _ = control.send(ClusterIn::BusUp);
                continue;
            }
        };
        let counter = match kind {
            Kind::Tun => &node.stats.tun_in,
            Kind::Ctl => &node.stats.ctl_in,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let msg = match wire::decode(data) {
            Ok(m) => m,
            Err(e) => {
                node.stats.malformed_in.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %super::bus::hex(from), ?e, "a message from another node did not decode");
                continue;
            }
        };
        let sent = match msg {
            NodeMsg::Shard { shard, msg } => {
                deliver(shard, msg);
                Ok(())
            }
            NodeMsg::Control(msg) => control.send(ClusterIn::Control { from, msg }),
            NodeMsg::Heartbeat { shards, epoch } => control.send(ClusterIn::Heartbeat {
                from,
                shards,
                epoch,
            }),
            NodeMsg::Leader { epoch } => control.send(ClusterIn::Leader { from, epoch }),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Parses a node id from its hex spelling (the lease row's holder).
pub fn parse_hex(s: &str) -> Option<NodeId> {
    if s.len() != 8 {
        return None;
    }
    let mut id = [0u8; 4];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// Seeks and holds the placement lease in PostgreSQL for node `id` until `stop`: tells the
/// control thread when this node starts and stops leading, and which node leads otherwise.
pub fn run_lease(
    mut pg: PgLease,
    cfg: LeaseConfig,
    node: Arc<Node>,
    control: Sender<ClusterIn>,
    stop: Arc<AtomicBool>,
) {
    let id = node.id;
    let me = super::bus::hex(id);
    let mut lease = Lease::new(cfg, Instant::now());
    let tick = cfg
        .retry_every
        .min(cfg.renew_every)
        .min(Duration::from_millis(100));
    let mut known: Option<(NodeId, u64)> = None;
    // Renewals that failed in a row (for the log).
    let mut failures: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut actions: VecDeque<LeaseAction> = lease.tick(Instant::now()).into();
        while let Some(a) = actions.pop_front() {
            let report = match a {
                LeaseAction::TryAcquire => {
                    let answer = match pg.acquire(&me, cfg.ttl) {
                        Ok(Acquire::Acquired { epoch }) => StoreAnswer::Acquired { epoch },
                        Ok(Acquire::Held { holder, epoch, .. }) => {
                            if let Some(node) = parse_hex(&holder) {
                                if known != Some((node, epoch)) && node != id {
                                    known = Some((node, epoch));
                                    let _ = control.send(ClusterIn::LeaderIs { node, epoch });
                                }
                            }
                            StoreAnswer::Held
                        }
                        Ok(Acquire::Busy) => StoreAnswer::Held,
                        Err(e) => {
                            tracing::debug!(error = %e, "lease acquire failed");
                            StoreAnswer::Error
                        }
                    };
                    Some(answer)
                }
                LeaseAction::Renew { epoch } => Some(match pg.renew(&me, epoch, cfg.ttl) {
                    Ok(Renew::Renewed) => {
                        failures = 0;
                        StoreAnswer::Renewed
                    }
                    Ok(Renew::Lost) => StoreAnswer::Lost,
                    Err(e) => {
                        failures += 1;
                        // The first failure, then every power of two: not every retry.
                        if failures.is_power_of_two() {
                            tracing::warn!(error = %e, failures, epoch, "lease renew failed");
                        }
                        StoreAnswer::Error
                    }
                }),
                LeaseAction::BecameLeader { epoch } => {
                    tracing::info!(epoch, "this node leads placement");
                    known = Some((id, epoch));
                    let _ = control.send(ClusterIn::BecameLeader { epoch });
                    None
                }
                LeaseAction::StepDown { epoch } => {
                    tracing::warn!(epoch, "this node no longer leads placement");
                    known = None;
                    let _ = control.send(ClusterIn::StepDown { epoch });
                    None
                }
            };
            if let Some(answer) = report {
                // The answer's actions come before anything still queued.
                for more in lease.on_answer(Instant::now(), answer).into_iter().rev() {
                    actions.push_front(more);
                }
            }
            node.set_lease_until(match lease.role() {
                Role::Leader { valid_until, .. } => Some(valid_until),
                Role::Follower => None,
            });
        }
        std::thread::sleep(tick);
    }
}
