//! One shard's shell around its gateway core: the core in a `RefCell`, the tasks' wake-ups
//! by connection, the answers awaited from the control plane, and the pump that carries out
//! what the core asks after every call ([`Shard::with`]): wake a writer or a reader, reset a
//! socket, send to another shard's mailbox or to the control plane, deliver an answer,
//! re-arm the shard's one timer.

use crate::gateway::{ConnId, Gateway, Notice, Output, Reply, Settings};
use crate::metrics::ShardMetrics;
use crate::shard::Shared;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::{oneshot, Notify};
use tokio_uring::net::TcpStream;

/// The wake-ups of one connection's tasks.
struct Wakers {
    gen: u32,
    reader: Rc<Notify>,
    writer: Rc<Notify>,
    stream: Option<Weak<TcpStream>>,
}

pub struct Shard {
    id: u16,
    pub shared: Shared,
    core: RefCell<Gateway>,
    wakers: RefCell<Vec<Option<Wakers>>>,
    replies: RefCell<HashMap<u32, oneshot::Sender<Option<Reply>>>>,
    /// Woken when the core set a deadline earlier than the timer sleeps until.
    pub(super) timer: Notify,
}

impl Shard {
    pub fn new(id: u16, shared: Shared) -> Shard {
        let settings = Settings {
            shard: id,
            shards: shared.shards.len(),
            config: shared.config.clone(),
            metrics: shared.metrics.clone(),
            gateway_id: shared.gateway_id,
            clustered: shared.config.cluster.enabled,
        };
        let core = Gateway::new(
            settings,
            rand::random(),
            Instant::now(),
            crate::shard::unix_ms(),
        );
        Shard {
            id,
            shared,
            core: RefCell::new(core),
            wakers: RefCell::new(Vec::new()),
            replies: RefCell::new(HashMap::new()),
            timer: Notify::new(),
        }
    }

    pub fn metrics(&self) -> &ShardMetrics {
        &self.shared.metrics.shards[self.id as usize]
    }

    /// Calls the core with the time now, then carries out what it asked.
    pub fn with<R>(&self, f: impl FnOnce(&mut Gateway, Instant) -> R) -> R {
        let core = &mut *self.core.borrow_mut();
        let now = Instant::now();
        let r = f(core, now);
        if core.draining() {
            core.drain_step(now);
        }
        self.carry_out(core);
        r
    }

    /// Calls the core where no time is needed (no clock read), then does what it asked.
    pub fn call<R>(&self, f: impl FnOnce(&mut Gateway) -> R) -> R {
        let core = &mut *self.core.borrow_mut();
        let r = f(core);
        // While draining, every call may be what the drain waits for.
        if core.draining() {
            core.drain_step(Instant::now());
        }
        self.carry_out(core);
        r
    }

    /// Reads the core without calling it (nothing to carry out).
    pub fn peek<R>(&self, f: impl FnOnce(&Gateway) -> R) -> R {
        f(&self.core.borrow())
    }

    /// Carries out the core's outputs. Nothing here calls back into the core (a wake-up
    /// or an answer only schedules a task; a mailbox send and a reset are system calls),
    /// so the core stays borrowed throughout.
    #[inline]
    fn carry_out(&self, core: &mut Gateway) {
        // Mail is pushed, and each receiving shard woken once per run of messages for it
        // (a wake-up is an atomic swap, and a system call when it was asleep).
        let shards = &self.shared.shards;
        let mut pending: Option<usize> = None;
        while let Some((shard, msg)) = core.poll_mail() {
            let to = shard as usize;
            let Some(mb) = shards.get(to) else {
                continue;
            };
            if let Some(p) = pending.filter(|&p| p != to) {
                shards[p].wake();
            }
            pending = mb.push(msg).then_some(to);
        }
        if let Some(p) = pending {
            shards[p].wake();
        }
        let mut to_nodes = false;
        while let Some(o) = core.poll_message() {
            match o {
                Output::ToControl(msg) => {
                    let _ = self.shared.control.send(*msg);
                }
                Output::ToNode(node, shard, msg) => match &self.shared.node {
                    Some(n) => {
                        n.send_from_shard(node, shard, msg);
                        to_nodes = true;
                    }
                    None => self
                        .metrics()
                        .inc(crate::metrics::Counter::UnroutableTunnelMessages),
                },
                Output::Reply(waiter, reply) => {
                    if let Some(tx) = self.replies.borrow_mut().remove(&waiter) {
                        let _ = tx.send(reply);
                    }
                }
                // `poll_message` yields messages only; the rest come from the other polls.
                _ => debug_assert!(false, "not a message"),
            }
        }
        if to_nodes {
            // One wake-up of the bus thread for the run of messages to other nodes.
            if let Some(n) = &self.shared.node {
                n.wake_bus();
            }
        }
        while let Some(n) = core.poll_notice() {
            match n {
                Notice::Flush(id) => {
                    if let Some(w) = self.wakers.borrow().get(id.slot as usize) {
                        if let Some(w) = w.as_ref().filter(|w| w.gen == id.gen) {
                            w.writer.notify_one();
                        }
                    }
                }
                Notice::Wake(id) => {
                    if let Some(w) = self.wakers.borrow().get(id.slot as usize) {
                        if let Some(w) = w.as_ref().filter(|w| w.gen == id.gen) {
                            w.reader.notify_one();
                        }
                    }
                }
                Notice::Reset(id) => {
                    let stream = self.wakers.borrow().get(id.slot as usize).and_then(|w| {
                        w.as_ref()
                            .filter(|w| w.gen == id.gen)
                            .and_then(|w| w.stream.as_ref()?.upgrade())
                    });
                    if let Some(s) = stream {
                        super::writer::reset(&s);
                    }
                }
                Notice::Rearm => self.timer.notify_one(),
                Notice::Drained => {
                    self.shared.drained.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    pub fn wakers(&self, id: ConnId) -> Option<(Rc<Notify>, Rc<Notify>)> {
        let w = self.wakers.borrow();
        let w = w
            .get(id.slot as usize)?
            .as_ref()
            .filter(|w| w.gen == id.gen)?;
        Some((w.reader.clone(), w.writer.clone()))
    }

    /// Registers a new connection's tasks: (reader, writer) wake-ups, and the socket a reset
    /// ends.
    pub fn register(&self, id: ConnId, stream: Option<&Rc<TcpStream>>) -> (Rc<Notify>, Rc<Notify>) {
        let mut all = self.wakers.borrow_mut();
        let i = id.slot as usize;
        if all.len() <= i {
            all.resize_with(i + 1, || None);
        }
        let w = Wakers {
            gen: id.gen,
            reader: Rc::new(Notify::new()),
            writer: Rc::new(Notify::new()),
            stream: stream.map(Rc::downgrade),
        };
        let pair = (w.reader.clone(), w.writer.clone());
        all[i] = Some(w);
        pair
    }

    /// The connection's entry is gone: its tasks are woken to notice.
    pub fn unregister(&self, id: ConnId) {
        let mut all = self.wakers.borrow_mut();
        if let Some(slot) = all.get_mut(id.slot as usize) {
            if slot.as_ref().is_some_and(|w| w.gen == id.gen) {
                let w = slot.take().expect("checked");
                w.reader.notify_one();
                w.writer.notify_one();
            }
        }
    }

    /// Asks the control plane and waits for its answer (`None` after `timeout`).
    pub async fn ask(
        &self,
        make: impl FnOnce(u64) -> crate::gateway::ControlMsg,
        timeout: std::time::Duration,
    ) -> Option<Reply> {
        let (tx, rx) = oneshot::channel();
        let waiter = self.with(|c, now| c.ask(make, timeout, now));
        self.replies.borrow_mut().insert(waiter, tx);
        rx.await.ok().flatten()
    }
}
