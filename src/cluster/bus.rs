//! The node bus: one OS thread (`torpor-bus`) running a current-thread tokio runtime and an
//! `async-nats` client of core NATS. Commands come in over a bounded crossbeam channel
//! ([`Bus::send`]), everything received goes out over another ([`BusEvent`]).
//!
//! Subjects: node `<id>` (its 4-byte gateway id, lower-case hex) receives on
//! `torpor.node.<id>` (and on the hello subject, below). What a bus has for one node after a
//! round of work (the commands that were waiting, the acknowledgements of a batch of received
//! frames, the resends that fell due) goes out as one NATS message of up to [`BATCH_BYTES`]:
//! a sequence of frames, each `kind` (1 byte: 1 `ctl`, 2 `tun`), length (4 bytes, LE) and the
//! frame, in the order they were sent. Frames of kind `ctl` are the reliable links'; `tun` is
//! tunnel traffic. The sender is named in each frame (below).
//!
//! Delivery. `tun` messages are at most once: NATS loses them on a reconnect or a slow
//! consumer, the bus drops them when a queue is full (counted in [`BusStats`]). `ctl` messages
//! go through a control link per peer node ([`LinkTx`] to it, [`LinkRx`] from it, see
//! [`super::link`]): they arrive exactly once and in order, acknowledgements travel back to
//! the sender's subject, and the link's timer (resends, tails) runs in the bus
//! thread.
//!
//! Each bus start picks a random *instance* id carried by every `ctl` frame. A frame from a
//! peer with a new instance means the peer restarted: the links to and from it start over (a
//! new sending session; what the old one had not got acknowledged is dropped) and
//! [`BusEvent::PeerRestarted`] is reported before anything of the new instance. A starting bus
//! announces its instance on [`HELLO_SUBJECT`] (every bus subscribes to it). As the hello is
//! at most once, a receiver that gets frames of a link session it does not know (it restarted
//! and the sender goes on with the old session) answers with a `Reset` frame, which carries
//! its new instance back to the sender. Frames of a peer's replaced instances are ignored.
//! A link session that starts over without a new instance is reported as a restart too.
//!
//! Limit: a peer that restarts before any frame of it reached this node is not detected (there
//! is no earlier instance to compare with): the new instance gets the link's messages from the
//! first unacknowledged one, which its old instance may have had too.
//!
//! Wire encoding of a `ctl` frame (integers little-endian), a fixed 29-byte header then the
//! message (a hello is one such frame in a message of its own):
//!
//! | bytes | field |
//! | --- | --- |
//! | 1 | type: 1 `Data`, 2 `Ack`, 3 `Tail`, 4 `Reset`, 5 `Hello` (on the hello subject) |
//! | 4 | sender's node id |
//! | 8 | sender's bus instance |
//! | 8 | link session (`Reset`: the session the receiver does not know; `Hello`: 0) |
//! | 8 | `Data`: seq; `Ack`: upto; `Tail`: next; `Reset`, `Hello`: 0 |
//! | rest | `Data`: the message; empty otherwise |
//!
//! A `tun` frame is a 20-byte header then the message: the sender's node id (4 bytes), the
//! session of its control link to the receiver (8) and how many control messages it had sent
//! on it (8). The receiver holds a `tun` message until its end of that link delivered those
//! control messages ([`TunGate`]): a runner's first message on a WebSocket never overtakes
//! the socket's `Open`. Held: at most [`TUN_HELD_MSGS`] messages and [`TUN_HELD_BYTES`] bytes
//! per peer; past that, or when the session was replaced, they are dropped (counted as
//! `tun_dropped_in`).
//!
//! Bounds (defaults in [`BusConfig`]):
//! - commands from the caller: [`BusConfig::command_queue`] (65,536); [`Bus::send`] refuses
//!   past it. The thread takes commands only while the outgoing queue has room, so a slow
//!   NATS connection holds commands back instead of dropping them.
//! - outgoing queue to the NATS client: [`BusConfig::out_queue`] (4,096 publishes), plus the
//!   client's own command buffer ([`BusConfig::client_capacity`], 1,024). Link resends, tails,
//!   acks and resets that find it full are dropped (the link sends them again later).
//! - each peer's link: at most `max_unacked` control messages (65,536) wait for an ack; past
//!   that a control message is refused (dropped, counted) and [`BusEvent::PeerUnreachable`]
//!   is reported (once, until the peer acknowledges again).
//! - incoming: NATS's subscription buffer ([`BusConfig::subscription_capacity`], 8,192; NATS
//!   drops past it and reports a slow consumer) and the channel to the caller
//!   ([`BusConfig::in_queue`], 8,192 events). When the channel is full, `tun` messages are
//!   dropped (counted); control messages and events wait in the bus thread (at most what one
//!   batch of frames released) and the bus stops reading NATS until the caller catches up;
//!   frames NATS drops meanwhile are resent by their links.
//!
//! NATS disconnects and reconnects are reported ([`BusEvent::Disconnected`],
//! [`BusEvent::Reconnected`]); the client reconnects forever, resubscribing.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::link::{Frame, LinkConfig, LinkRx, LinkTx, TunGate};
use super::nats_addr::NatsAuth;

/// A node's id: its 4-byte gateway id.
pub type NodeId = [u8; 4];

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Control: reliable, exactly once and in order per peer.
    Ctl,
    /// Tunnel traffic: at most once.
    Tun,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Ctl => "ctl",
            Kind::Tun => "tun",
        }
    }
}

/// What the bus reports, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// A message from node `from`.
    Message {
        from: NodeId,
        kind: Kind,
        data: Bytes,
    },
    /// `node` restarted: control messages sent to its old instance and not acknowledged are
    /// gone, and what follows from it comes from the new instance.
    PeerRestarted(NodeId),
    /// The control link to `node` is full: it acknowledged nothing for `max_unacked`
    /// messages; further control messages to it are refused until it does.
    PeerUnreachable(NodeId),
    /// The NATS connection dropped (the link is interrupted; the client reconnects).
    Disconnected,
    /// The NATS connection is back.
    Reconnected,
}

/// Limits of a bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusConfig {
    /// The control links' limits and timing.
    pub link: LinkConfig,
    /// Most commands waiting for the bus thread.
    pub command_queue: usize,
    /// Most publishes waiting for the NATS client.
    pub out_queue: usize,
    /// The NATS client's own command buffer.
    pub client_capacity: usize,
    /// Most messages NATS buffers for the subscription.
    pub subscription_capacity: usize,
    /// Most events waiting for the caller.
    pub in_queue: usize,
    /// PEM file of the certificate authorities that sign the NATS servers' certificates:
    /// TLS is required, verified against these only (`None`: TLS only for `tls://`
    /// addresses or a server that asks for it, verified against the system's roots).
    pub tls_ca_file: Option<std::path::PathBuf>,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            link: LinkConfig::default(),
            command_queue: 65_536,
            out_queue: 4_096,
            client_capacity: 1_024,
            subscription_capacity: 8_192,
            in_queue: 8_192,
            tls_ca_file: None,
        }
    }
}

/// Counters of what the bus sent, dropped or refused (rendered as `torpor_cluster_bus_*`).
#[derive(Debug, Default)]
pub struct BusStats {
    /// `tun` messages dropped because the outgoing queue was full.
    pub tun_dropped_out: AtomicU64,
    /// `tun` messages dropped on the way in: the caller's channel was full, the gate behind
    /// the control link was full, or they came from a replaced link session.
    pub tun_dropped_in: AtomicU64,
    /// Control messages refused because the peer's link was full.
    pub ctl_refused: AtomicU64,
    /// Link frames (resends, acks, tails, resets) not queued because the outgoing queue was
    /// full (sent again by the link later).
    pub frames_dropped_out: AtomicU64,
    /// Publishes the NATS client refused (too large, client closed).
    pub publish_failed: AtomicU64,
    /// Link frames sent again (resends and tails, by the links' timer).
    pub frames_resent: AtomicU64,
    /// Payloads that did not parse (wrong subject or header).
    pub malformed_in: AtomicU64,
    /// NATS messages handed to the client, and the frames they carried.
    pub messages_out: AtomicU64,
    pub frames_out: AtomicU64,
}

/// [`Bus::send`] refused: the command queue is full or the bus thread is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusFull;

struct Command {
    to: NodeId,
    kind: Kind,
    data: Bytes,
}

/// The handle of the bus thread. Dropping it shuts the thread down and joins it.
pub struct Bus {
    node: NodeId,
    commands: Sender<Command>,
    notify: Arc<Notify>,
    shutdown: Arc<AtomicBool>,
    stats: Arc<BusStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("node", &hex(self.node))
            .finish()
    }
}

/// `id` as subjects spell it.
pub fn hex(id: NodeId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The subject node `to` receives on.
pub fn subject(to: NodeId) -> String {
    format!("torpor.node.{}", hex(to))
}

/// Most bytes of frames one NATS message carries (a single larger frame goes alone).
pub const BATCH_BYTES: usize = 64 << 10;
const K_CTL: u8 = 1;
const K_TUN: u8 = 2;

/// The frames of one NATS message: `(kind, frame)` each, or `Err` at the first one that is
/// cut short or of an unknown kind (nothing after it is read).
fn records(p: &Bytes) -> impl Iterator<Item = Result<(Kind, Bytes), ()>> + '_ {
    let mut at = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at == p.len() {
            return None;
        }
        let head = p.get(at..at + 5);
        let kind = head.and_then(|h| match h[0] {
            K_CTL => Some(Kind::Ctl),
            K_TUN => Some(Kind::Tun),
            _ => None,
        });
        let len = head.map(|h| u32::from_le_bytes(h[1..5].try_into().expect("4 bytes")) as usize);
        match (kind, len) {
            (Some(kind), Some(len)) if p.len() - at - 5 >= len => {
                let frame = p.slice(at + 5..at + 5 + len);
                at += 5 + len;
                Some(Ok((kind, frame)))
            }
            _ => {
                failed = true;
                Some(Err(()))
            }
        }
    })
}

impl Bus {
    /// Connects to NATS at `url` as node `node`, subscribes to its subjects and starts the
    /// thread; returns once the subscription is in place (messages published from then on
    /// reach this bus). Fails if the first connection fails; later drops reconnect forever.
    pub fn start(url: &str, node: NodeId, cfg: BusConfig) -> io::Result<(Bus, Receiver<BusEvent>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (commands, command_rx) = crossbeam_channel::bounded(cfg.command_queue);
        let (event_tx, events) = crossbeam_channel::bounded(cfg.in_queue);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let notify = Arc::new(Notify::new());
        let stats = Arc::new(BusStats::default());
        let url = url.to_string();
        let shell_notify = notify.clone();
        let shutdown = Arc::new(AtomicBool::new(false));
        let shell_shutdown = shutdown.clone();
        let shell_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("torpor-bus".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let ends = Ends {
                        commands: command_rx,
                        notify: shell_notify,
                        shutdown: shell_shutdown,
                        events: event_tx,
                        stats: shell_stats,
                    };
                    let shell = match Shell::connect(&url, node, cfg, ends).await {
                        Ok(shell) => {
                            let _ = ready_tx.send(Ok(()));
                            shell
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    shell.run().await;
                });
                runtime.shutdown_background();
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok((
                Bus {
                    node,
                    commands,
                    notify,
                    shutdown,
                    stats,
                    thread: Some(thread),
                },
                events,
            )),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("the bus thread ended during start-up"))
            }
        }
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Counters of what was sent, dropped or refused.
    pub fn stats(&self) -> &BusStats {
        &self.stats
    }

    /// The counters, shared (for the metrics page).
    pub fn stats_handle(&self) -> Arc<BusStats> {
        self.stats.clone()
    }

    /// Sends `data` to node `to`: `Ctl` over the control link to it (exactly once, in
    /// order), `Tun` as one plain publish (at most once). Refused when the command queue is
    /// full.
    pub fn send(&self, to: NodeId, kind: Kind, data: Bytes) -> Result<(), BusFull> {
        let r = self.queue(to, kind, data);
        self.wake();
        r
    }

    /// [`Self::send`] without waking the bus thread: a caller with several messages queues
    /// them and then calls [`Self::wake`] once (a wake-up of a parked thread is a system
    /// call).
    pub fn queue(&self, to: NodeId, kind: Kind, data: Bytes) -> Result<(), BusFull> {
        let r = self.commands.try_send(Command { to, kind, data });
        match r {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                if kind == Kind::Tun {
                    self.stats.tun_dropped_out.fetch_add(1, Ordering::Relaxed);
                }
                Err(BusFull)
            }
        }
    }

    /// Wakes the bus thread to take what was queued.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Shuts the thread down and waits for it.
    pub fn shutdown(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.shutdown.store(true, Ordering::Relaxed);
            self.notify.notify_one();
            let _ = thread.join();
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

// ---------------------------------------------------------------------------------------------
// Wire encoding of control frames
// ---------------------------------------------------------------------------------------------

const HEADER: usize = 29;
const T_DATA: u8 = 1;
const T_ACK: u8 = 2;
const T_TAIL: u8 = 3;
const T_RESET: u8 = 4;
const T_HELLO: u8 = 5;

/// Where every bus announces its new instance when it starts.
pub const HELLO_SUBJECT: &str = "torpor.nodes.hello";

/// A control frame as it travels: a link frame, or a `Reset` (the receiver does not know
/// `session`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wire {
    Link(Frame<Bytes>),
    Reset {
        session: u64,
    },
    /// On [`HELLO_SUBJECT`]: the sender started (with the instance in the header).
    Hello,
}

fn encode_ctl(from: NodeId, instance: u64, w: &Wire) -> Bytes {
    let (t, session, n, msg) = ctl_fields(w);
    let mut b = BytesMut::with_capacity(HEADER + msg.len());
    put_ctl(&mut b, t, from, instance, session, n, msg);
    b.freeze()
}

fn ctl_fields(w: &Wire) -> (u8, u64, u64, &[u8]) {
    match w {
        Wire::Link(Frame::Data { session, seq, msg }) => (T_DATA, *session, *seq, &msg[..]),
        Wire::Link(Frame::Ack { session, upto }) => (T_ACK, *session, *upto, &[]),
        Wire::Link(Frame::Tail { session, next }) => (T_TAIL, *session, *next, &[]),
        Wire::Reset { session } => (T_RESET, *session, 0, &[]),
        Wire::Hello => (T_HELLO, 0, 0, &[]),
    }
}

fn put_ctl(b: &mut BytesMut, t: u8, from: NodeId, instance: u64, session: u64, n: u64, msg: &[u8]) {
    b.put_u8(t);
    b.put_slice(&from);
    b.put_u64_le(instance);
    b.put_u64_le(session);
    b.put_u64_le(n);
    b.put_slice(msg);
}

/// `(from, instance, frame)`, or `None` for a malformed payload.
fn decode_ctl(p: &Bytes) -> Option<(NodeId, u64, Wire)> {
    if p.len() < HEADER {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    let from: NodeId = p[1..5].try_into().expect("4 bytes");
    let instance = u64_at(5);
    let session = u64_at(13);
    let n = u64_at(21);
    let bare = p.len() == HEADER;
    let w = match p[0] {
        T_DATA => Wire::Link(Frame::Data {
            session,
            seq: n,
            msg: p.slice(HEADER..),
        }),
        T_ACK if bare => Wire::Link(Frame::Ack { session, upto: n }),
        T_TAIL if bare => Wire::Link(Frame::Tail { session, next: n }),
        T_RESET if bare => Wire::Reset { session },
        T_HELLO if bare => Wire::Hello,
        _ => return None,
    };
    Some((from, instance, w))
}

const TUN_HEADER: usize = 20;
/// Most `tun` messages held per peer behind control messages not yet delivered.
pub const TUN_HELD_MSGS: usize = 1_024;
/// Most bytes of `tun` messages held per peer.
pub const TUN_HELD_BYTES: usize = 8 << 20;

#[cfg(test)]
fn encode_tun(from: NodeId, session: u64, after: u64, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(TUN_HEADER + data.len());
    put_tun(&mut b, from, session, after, data);
    b.freeze()
}

fn put_tun(b: &mut BytesMut, from: NodeId, session: u64, after: u64, data: &[u8]) {
    b.put_slice(&from);
    b.put_u64_le(session);
    b.put_u64_le(after);
    b.put_slice(data);
}

/// `(from, session, after, message)`, or `None` for a payload shorter than the header.
fn decode_tun(p: &Bytes) -> Option<(NodeId, u64, u64, Bytes)> {
    if p.len() < TUN_HEADER {
        return None;
    }
    let from: NodeId = p[..4].try_into().expect("4 bytes");
    let session = u64::from_le_bytes(p[4..12].try_into().expect("8 bytes"));
    let after = u64::from_le_bytes(p[12..20].try_into().expect("8 bytes"));
    Some((from, session, after, p.slice(TUN_HEADER..)))
}

// ---------------------------------------------------------------------------------------------
// The thread
// ---------------------------------------------------------------------------------------------

/// Replaced instances of a peer remembered (their late frames are ignored).
const RETIRED_INSTANCES: usize = 16;
/// Most commands taken before what they produced is published.
const COMMANDS_PER_FLUSH: usize = 256;
/// Most NATS messages handled before pending acks are flushed.
const BATCH: usize = 256;
/// How often a caller's full channel is tried again.
const RETRY_DELIVERY: Duration = Duration::from_millis(5);

struct Peer {
    /// The peer's instance last heard from.
    instance: Option<u64>,
    retired: VecDeque<u64>,
    tx: LinkTx<Bytes>,
    rx: LinkRx<Bytes>,
    /// `tun` messages from the peer waiting for control messages sent before them.
    gate: TunGate<Bytes>,
    /// PeerUnreachable was reported and the peer acknowledged nothing since.
    unreachable: bool,
    /// An ack or reset to send after the current batch.
    reply: Option<Wire>,
}

impl Peer {
    fn new(cfg: LinkConfig) -> Peer {
        Peer {
            instance: None,
            retired: VecDeque::new(),
            tx: LinkTx::new(cfg, rand::random()),
            rx: LinkRx::new(cfg),
            gate: TunGate::new(TUN_HELD_MSGS, TUN_HELD_BYTES),
            unreachable: false,
            reply: None,
        }
    }

    /// The peer runs a new instance: both links start over.
    fn restart(&mut self, instance: u64, link: LinkConfig) {
        if let Some(old) = self.instance.replace(instance) {
            if self.retired.len() == RETIRED_INSTANCES {
                self.retired.pop_front();
            }
            self.retired.push_back(old);
        }
        self.tx = LinkTx::new(link, rand::random());
        self.rx = LinkRx::new(link);
        // What the old instance sent is void (and counted as dropped).
        let dropped = self.gate.dropped + self.gate.held() as u64;
        self.gate = TunGate::new(TUN_HELD_MSGS, TUN_HELD_BYTES);
        self.gate.dropped = dropped;
        self.unreachable = false;
        self.reply = None;
    }
}

/// Frames on their way to one node.
struct Batch {
    to: NodeId,
    subject: async_nats::Subject,
    buf: BytesMut,
    ctl: u64,
    tun: u64,
}

/// The thread's ends of what it shares with the handle.
struct Ends {
    commands: Receiver<Command>,
    notify: Arc<Notify>,
    shutdown: Arc<AtomicBool>,
    events: Sender<BusEvent>,
    stats: Arc<BusStats>,
}

struct Shell {
    node: NodeId,
    instance: u64,
    cfg: BusConfig,
    commands: Receiver<Command>,
    /// A command taken while the outgoing queue was full.
    held: Option<Command>,
    notify: Arc<Notify>,
    shutdown: Arc<AtomicBool>,
    events: Sender<BusEvent>,
    /// Events the caller's channel had no room for, in order.
    overflow: VecDeque<BusEvent>,
    stats: Arc<BusStats>,
    out: mpsc::Sender<(async_nats::Subject, Bytes)>,
    /// This node's subjects and the hello subject.
    subscriber: futures_util::stream::Select<async_nats::Subscriber, async_nats::Subscriber>,
    nats_events: mpsc::UnboundedReceiver<async_nats::Event>,
    connected_once: bool,
    peers: HashMap<NodeId, Peer>,
    /// Frames for each node not yet published (one NATS message per node and round).
    batches: Vec<Batch>,
    /// Peers with a reply pending.
    replies: Vec<NodeId>,
    _client: async_nats::Client,
}

impl Shell {
    async fn connect(url: &str, node: NodeId, cfg: BusConfig, ends: Ends) -> io::Result<Shell> {
        let Ends {
            commands,
            notify,
            shutdown,
            events,
            stats,
        } = ends;
        let (nats_tx, nats_events) = mpsc::unbounded_channel();
        let target = super::nats_addr::parse(url).map_err(io::Error::other)?;
        let options = match target.auth {
            Some(NatsAuth::UserPassword { user, password }) => {
                async_nats::ConnectOptions::with_user_and_password(user, password)
            }
            Some(NatsAuth::Token(token)) => async_nats::ConnectOptions::with_token(token),
            None => async_nats::ConnectOptions::new(),
        };
        let options = match &cfg.tls_ca_file {
            Some(ca) => options.add_root_certificates(ca.clone()).require_tls(true),
            None => options,
        };
        let client = options
            .name(format!("torpor-{}", hex(node)))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 20).min(1_000))
            })
            .connection_timeout(Duration::from_secs(5))
            .client_capacity(cfg.client_capacity)
            .subscription_capacity(cfg.subscription_capacity)
            .event_callback(move |e| {
                let tx = nats_tx.clone();
                async move {
                    let _ = tx.send(e);
                }
            })
            .connect(target.servers)
            .await
            .map_err(io::Error::other)?;
        let subscriber = client
            .subscribe(subject(node))
            .await
            .map_err(io::Error::other)?;
        let hellos = client
            .subscribe(HELLO_SUBJECT)
            .await
            .map_err(io::Error::other)?;
        // The server has the subscriptions once it answered a ping sent after them.
        client.flush().await.map_err(io::Error::other)?;
        let instance: u64 = rand::random();
        client
            .publish(HELLO_SUBJECT, encode_ctl(node, instance, &Wire::Hello))
            .await
            .map_err(io::Error::other)?;
        client.flush().await.map_err(io::Error::other)?;
        let subscriber = futures_util::stream::select(subscriber, hellos);
        let (out, mut out_rx) = mpsc::channel::<(async_nats::Subject, Bytes)>(cfg.out_queue);
        let publisher = client.clone();
        let publish_stats = stats.clone();
        tokio::spawn(async move {
            while let Some((subject, payload)) = out_rx.recv().await {
                if publisher.publish(subject, payload).await.is_err() {
                    publish_stats.publish_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Shell {
            node,
            instance,
            cfg,
            commands,
            held: None,
            notify,
            shutdown,
            events,
            overflow: VecDeque::new(),
            stats,
            out,
            subscriber,
            nats_events,
            connected_once: false,
            peers: HashMap::new(),
            batches: Vec::new(),
            replies: Vec::new(),
            _client: client,
        })
    }

    async fn run(mut self) {
        let notify = self.notify.clone();
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                return;
            }
            if !self.take_commands() {
                return;
            }
            self.flush_batches();
            let deadline = self
                .peers
                .values()
                .filter_map(|p| p.tx.deadline())
                .min()
                .map(Instant::from_std);
            let blocked = self.held.is_some();
            let reading = self.overflow.is_empty();
            let retry = !self.overflow.is_empty();
            let out = self.out.clone();
            tokio::select! {
                _ = notify.notified() => {}
                permit = out.reserve(), if blocked => drop(permit),
                msg = self.subscriber.next(), if reading => match msg {
                    Some(msg) => {
                        self.incoming(msg);
                        // A batch of what is already there, then the acks.
                        for _ in 1..BATCH {
                            if !self.overflow.is_empty() {
                                break;
                            }
                            match futures_util::FutureExt::now_or_never(self.subscriber.next()) {
                                Some(Some(msg)) => self.incoming(msg),
                                _ => break,
                            }
                        }
                        self.flush_replies();
                    }
                    None => return,
                },
                e = self.nats_events.recv() => if let Some(e) = e { self.nats_event(e) },
                _ = sleep_until(deadline) => self.poll_links(),
                _ = tokio::time::sleep(RETRY_DELIVERY), if retry => {}
            }
            self.flush_batches();
            self.drain_overflow();
        }
    }

    /// Takes commands while the outgoing queue has room; false once the handle is gone.
    fn take_commands(&mut self) -> bool {
        let mut taken = 0;
        loop {
            if taken == COMMANDS_PER_FLUSH {
                // Publish what was taken so far: the outgoing queue's room is checked again.
                self.flush_batches();
                taken = 0;
            }
            if self.out.capacity() == 0 {
                if self.held.is_none() {
                    match self.commands.try_recv() {
                        Ok(c) => self.held = Some(c),
                        Err(TryRecvError::Empty) => {}
                        Err(TryRecvError::Disconnected) => return false,
                    }
                }
                return true;
            }
            let c = match self.held.take() {
                Some(c) => c,
                None => match self.commands.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => return true,
                    Err(TryRecvError::Disconnected) => return false,
                },
            };
            self.send(c.to, c.kind, c.data);
            taken += 1;
        }
    }

    fn send(&mut self, to: NodeId, kind: Kind, data: Bytes) {
        match kind {
            Kind::Tun => {
                let link = self.cfg.link;
                let peer = self.peers.entry(to).or_insert_with(|| Peer::new(link));
                let (session, after) = (peer.tx.session(), peer.tx.next_seq());
                let from = self.node;
                self.queue(to, Kind::Tun, TUN_HEADER + data.len(), |b| {
                    put_tun(b, from, session, after, &data)
                });
            }
            Kind::Ctl => {
                let now = std::time::Instant::now();
                let link = self.cfg.link;
                let peer = self.peers.entry(to).or_insert_with(|| Peer::new(link));
                match peer.tx.send(data, now) {
                    Ok(frame) => self.publish(to, &Wire::Link(frame)),
                    Err(_full) => {
                        self.stats.ctl_refused.fetch_add(1, Ordering::Relaxed);
                        if !peer.unreachable {
                            peer.unreachable = true;
                            self.deliver(BusEvent::PeerUnreachable(to));
                        }
                    }
                }
            }
        }
    }

    /// Queues a control frame for node `to`.
    fn publish(&mut self, to: NodeId, w: &Wire) {
        let (t, session, n, msg) = ctl_fields(w);
        let (from, instance) = (self.node, self.instance);
        self.queue(to, Kind::Ctl, HEADER + msg.len(), |b| {
            put_ctl(b, t, from, instance, session, n, msg)
        });
    }

    /// Appends a frame of `len` bytes (written by `put`) to the batch for node `to`; a batch
    /// that would grow past [`BATCH_BYTES`] is published first.
    fn queue(&mut self, to: NodeId, kind: Kind, len: usize, put: impl FnOnce(&mut BytesMut)) {
        let i = match self.batches.iter().position(|b| b.to == to) {
            Some(i) => i,
            None => {
                self.batches.push(Batch {
                    to,
                    subject: subject(to).into(),
                    buf: BytesMut::new(),
                    ctl: 0,
                    tun: 0,
                });
                self.batches.len() - 1
            }
        };
        if !self.batches[i].buf.is_empty() && self.batches[i].buf.len() + 5 + len > BATCH_BYTES {
            self.publish_batch(i);
        }
        let b = &mut self.batches[i];
        b.buf.reserve(5 + len);
        b.buf.put_u8(match kind {
            Kind::Ctl => K_CTL,
            Kind::Tun => K_TUN,
        });
        b.buf.put_u32_le(len as u32);
        let start = b.buf.len();
        put(&mut b.buf);
        debug_assert_eq!(b.buf.len() - start, len);
        match kind {
            Kind::Ctl => b.ctl += 1,
            Kind::Tun => b.tun += 1,
        }
    }

    /// Hands batch `i` to the NATS client (its frames are dropped and counted when the
    /// outgoing queue is full: control frames are sent again by their links).
    fn publish_batch(&mut self, i: usize) {
        let b = &mut self.batches[i];
        if b.buf.is_empty() {
            return;
        }
        let payload = b.buf.split().freeze();
        let (ctl, tun) = (std::mem::take(&mut b.ctl), std::mem::take(&mut b.tun));
        self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
        self.stats
            .frames_out
            .fetch_add(ctl + tun, Ordering::Relaxed);
        if self.out.try_send((b.subject.clone(), payload)).is_err() {
            self.stats
                .frames_dropped_out
                .fetch_add(ctl, Ordering::Relaxed);
            self.stats.tun_dropped_out.fetch_add(tun, Ordering::Relaxed);
        }
    }

    /// Publishes every batch.
    fn flush_batches(&mut self) {
        for i in 0..self.batches.len() {
            self.publish_batch(i);
        }
    }

    fn incoming(&mut self, msg: async_nats::Message) {
        if msg.subject.as_str() == HELLO_SUBJECT {
            match decode_ctl(&msg.payload) {
                Some((from, instance, Wire::Hello)) => self.hello(from, instance),
                _ => {
                    self.stats.malformed_in.fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        for r in records(&msg.payload) {
            match r {
                Ok((Kind::Ctl, frame)) => match decode_ctl(&frame) {
                    Some((from, instance, w)) => self.ctl_frame(from, instance, w),
                    None => {
                        self.stats.malformed_in.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Ok((Kind::Tun, frame)) => self.tun_frame(&frame),
                Err(()) => {
                    self.stats.malformed_in.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn tun_frame(&mut self, frame: &Bytes) {
        let Some((from, session, after, data)) = decode_tun(frame) else {
            self.stats.malformed_in.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let link = self.cfg.link;
        let peer = self.peers.entry(from).or_insert_with(|| Peer::new(link));
        let Some(data) = peer.gate.offer(&peer.rx, session, after, data) else {
            self.count_gate_drops(from);
            return;
        };
        if self.overflow.is_empty() {
            match self.events.try_send(BusEvent::Message {
                from,
                kind: Kind::Tun,
                data,
            }) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(_)) => {}
            }
        }
        self.stats.tun_dropped_in.fetch_add(1, Ordering::Relaxed);
    }

    /// A bus started somewhere: a peer known under another instance restarted.
    fn hello(&mut self, from: NodeId, instance: u64) {
        if instance == self.instance {
            return;
        }
        let link = self.cfg.link;
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        if peer.retired.contains(&instance) || peer.instance == Some(instance) {
            return;
        }
        if peer.instance.is_none() {
            // Never heard from: whatever this node sent is still unacknowledged and goes to
            // the new instance from the link's first message on.
            peer.instance = Some(instance);
            return;
        }
        peer.restart(instance, link);
        self.deliver(BusEvent::PeerRestarted(from));
    }

    fn ctl_frame(&mut self, from: NodeId, instance: u64, w: Wire) {
        let link = self.cfg.link;
        let peer = self.peers.entry(from).or_insert_with(|| Peer::new(link));
        if peer.retired.contains(&instance) {
            return;
        }
        let mut restarted = false;
        match peer.instance {
            None => peer.instance = Some(instance),
            Some(old) if old != instance => {
                peer.restart(instance, link);
                restarted = true;
            }
            Some(_) => {}
        }
        let now = std::time::Instant::now();
        let mut delivered = Vec::new();
        match w {
            Wire::Reset { .. } | Wire::Hello => {}
            Wire::Link(Frame::Ack { session, upto }) => {
                peer.tx.on_ack(session, upto, now);
                if peer.tx.unacked() < link.max_unacked {
                    peer.unreachable = false;
                }
            }
            Wire::Link(frame) => {
                let session = match &frame {
                    Frame::Data { session, .. } | Frame::Tail { session, .. } => *session,
                    Frame::Ack { .. } => unreachable!("handled above"),
                };
                let r = peer.rx.on_frame(frame);
                // The peer's sender started over without a new instance (it took this node
                // for restarted): what its old session sent and was not delivered is gone.
                restarted |= r.new_session;
                delivered = r.delivered;
                let reply = match r.ack {
                    Some(ack) => Wire::Link(ack),
                    // A session this end does not know: say who this end is now.
                    None => Wire::Reset { session },
                };
                if peer.reply.replace(reply).is_none() {
                    self.replies.push(from);
                }
            }
        }
        let released = peer.gate.release(&peer.rx);
        self.count_gate_drops(from);
        if restarted {
            self.deliver(BusEvent::PeerRestarted(from));
        }
        for data in delivered {
            self.deliver(BusEvent::Message {
                from,
                kind: Kind::Ctl,
                data,
            });
        }
        for data in released {
            self.deliver(BusEvent::Message {
                from,
                kind: Kind::Tun,
                data,
            });
        }
    }

    /// Moves what a peer's gate dropped into the counters.
    fn count_gate_drops(&mut self, from: NodeId) {
        if let Some(peer) = self.peers.get_mut(&from) {
            let n = std::mem::take(&mut peer.gate.dropped);
            if n > 0 {
                self.stats.tun_dropped_in.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    fn flush_replies(&mut self) {
        for node in std::mem::take(&mut self.replies) {
            let Some(peer) = self.peers.get_mut(&node) else {
                continue;
            };
            if let Some(w) = peer.reply.take() {
                self.publish(node, &w);
            }
        }
    }

    fn poll_links(&mut self) {
        let now = std::time::Instant::now();
        let mut out = Vec::new();
        for (node, peer) in self.peers.iter_mut() {
            for f in peer.tx.poll(now) {
                out.push((*node, Wire::Link(f)));
            }
        }
        self.stats
            .frames_resent
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        for (node, w) in out {
            self.publish(node, &w);
        }
    }

    fn nats_event(&mut self, e: async_nats::Event) {
        match e {
            async_nats::Event::Disconnected => self.deliver(BusEvent::Disconnected),
            async_nats::Event::Connected => {
                if self.connected_once {
                    self.deliver(BusEvent::Reconnected);
                }
                self.connected_once = true;
            }
            other => tracing::debug!(node = %hex(self.node), event = %other, "nats event"),
        }
    }

    /// Hands an event to the caller, keeping it (in order) while the channel is full.
    fn deliver(&mut self, e: BusEvent) {
        if self.overflow.is_empty() {
            match self.events.try_send(e) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(e)) => self.overflow.push_back(e),
            }
        } else {
            self.overflow.push_back(e);
        }
    }

    fn drain_overflow(&mut self) {
        while let Some(e) = self.overflow.pop_front() {
            match self.events.try_send(e) {
                Ok(()) => {}
                Err(TrySendError::Disconnected(_)) => {
                    self.overflow.clear();
                    return;
                }
                Err(TrySendError::Full(e)) => {
                    self.overflow.push_front(e);
                    return;
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctl_frames_round_trip() {
        let from = [1, 2, 3, 0xff];
        for w in [
            Wire::Link(Frame::Data {
                session: 7,
                seq: u64::MAX,
                msg: Bytes::from_static(b"hello"),
            }),
            Wire::Link(Frame::Data {
                session: 7,
                seq: 0,
                msg: Bytes::new(),
            }),
            Wire::Link(Frame::Ack {
                session: 1,
                upto: 2,
            }),
            Wire::Link(Frame::Tail {
                session: 3,
                next: 4,
            }),
            Wire::Reset { session: 9 },
            Wire::Hello,
        ] {
            let b = encode_ctl(from, 42, &w);
            assert_eq!(decode_ctl(&b), Some((from, 42, w)));
        }
        let ack = encode_ctl(from, 1, &Wire::Reset { session: 1 });
        assert_eq!(ack.len(), HEADER);
        assert_eq!(decode_ctl(&ack.slice(..HEADER - 1)), None);
        let mut long = BytesMut::from(&ack[..]);
        long.put_u8(0);
        assert_eq!(
            decode_ctl(&long.freeze()),
            None,
            "trailing bytes after a reset"
        );
        let mut bad = BytesMut::from(&ack[..]);
        bad[0] = 9;
        assert_eq!(decode_ctl(&bad.freeze()), None, "unknown type");
    }

    #[test]
    fn tun_payloads_round_trip() {
        let p = encode_tun([9, 8, 7, 6], u64::MAX, 3, b"data");
        assert_eq!(p.len(), TUN_HEADER + 4);
        assert_eq!(
            decode_tun(&p),
            Some(([9, 8, 7, 6], u64::MAX, 3, Bytes::from_static(b"data")))
        );
        assert_eq!(decode_tun(&p.slice(..TUN_HEADER - 1)), None);
        assert_eq!(
            decode_tun(&p.slice(..TUN_HEADER)).map(|t| t.3.len()),
            Some(0)
        );
    }

    #[test]
    fn subjects() {
        assert_eq!(subject([0, 0xab, 1, 0x10]), "torpor.node.00ab0110");
    }

    #[test]
    fn a_message_carries_frames_in_order_and_stops_at_a_bad_one() {
        let mut b = BytesMut::new();
        for (k, f) in [(K_CTL, &b"abc"[..]), (K_TUN, b""), (K_TUN, b"xyz1")] {
            b.put_u8(k);
            b.put_u32_le(f.len() as u32);
            b.put_slice(f);
        }
        let p = b.clone().freeze();
        let got: Vec<_> = records(&p).collect();
        assert_eq!(
            got,
            vec![
                Ok((Kind::Ctl, Bytes::from_static(b"abc"))),
                Ok((Kind::Tun, Bytes::new())),
                Ok((Kind::Tun, Bytes::from_static(b"xyz1"))),
            ]
        );
        assert_eq!(records(&Bytes::new()).count(), 0);
        // Cut short: the frames before it, then one error and nothing more.
        let cut = p.slice(..p.len() - 1);
        let got: Vec<_> = records(&cut).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], Err(()));
        // An unknown kind.
        let mut bad = b.clone();
        bad.put_u8(9);
        bad.put_u32_le(0);
        bad.put_u8(K_CTL);
        bad.put_u32_le(0);
        let got: Vec<_> = records(&bad.freeze()).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[3], Err(()));
        // A header cut short.
        assert_eq!(
            records(&Bytes::from_static(&[K_CTL, 1, 0])).collect::<Vec<_>>(),
            vec![Err(())]
        );
    }
}
