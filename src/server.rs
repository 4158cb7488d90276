//! Process assembly: binds the listeners, starts the control-plane thread and one pinned
//! shard thread per core, and handles SIGTERM/SIGINT: a graceful drain (readiness 503, no new
//! connections, in-flight work finishes within `timeouts.drain_ms`, then 1001 closes whose
//! handshakes complete), the store flushed, exit 0; a second signal exits at once.

use crate::config::Config;
use crate::gateway::{ControlMsg, ShardMsg};
use crate::metrics::Metrics;
use crate::net::{bind_reuseport, ensure_port_free, run_shard};
use crate::shard::control::run_control;
use crate::shard::{pin_to_core, Shared};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(cfg: Config) -> std::io::Result<()> {
    let sigs = block_signals();
    let n = cfg.shard_count();
    let cfg = Arc::new(cfg);
    let metrics = Metrics::new(n);
    let gateway_id: [u8; 4] = rand::random();

    // Listeners: one SO_REUSEPORT socket per shard on the same port (port 0 → the port the
    // first one got), plus the optional per-shard ports.
    raise_fd_limit();
    ensure_port_free(cfg.listen)?;
    if cfg.shard_port_base != 0 {
        for i in 0..n {
            let mut a = cfg.listen;
            a.set_port(cfg.shard_port_base + i as u16);
            ensure_port_free(a)?;
        }
    }
    let mut listeners: Vec<Vec<std::net::TcpListener>> = Vec::with_capacity(n);
    let first = bind_reuseport(cfg.listen)?;
    let addr: SocketAddr = first.local_addr()?;
    listeners.push(vec![first]);
    for _ in 1..n {
        listeners.push(vec![bind_reuseport(addr)?]);
    }
    if cfg.shard_port_base != 0 {
        for (i, l) in listeners.iter_mut().enumerate() {
            let mut a = addr;
            a.set_port(cfg.shard_port_base + i as u16);
            l.push(bind_reuseport(a)?);
        }
    }

    // Kept to shut the listeners down at SIGTERM: an io_uring accept still in flight holds a
    // listener open after the process exits (the ring is torn down later), and while it lives
    // a restarted torpor on the same port shares the SO_REUSEPORT group with it, so some new
    // connections would be reset.
    let listen_fds: Vec<std::os::fd::RawFd> = listeners
        .iter()
        .flatten()
        .map(std::os::fd::AsRawFd::as_raw_fd)
        .collect();

    let (mut shared, (inboxes, control_rx)) =
        Shared::new(cfg.clone(), metrics.clone(), gateway_id, n)?;
    let control_tx = shared.control.clone();

    // The store: actor KV spaces and the control plane's records, in the embedded redb file
    // (default) or in PostgreSQL (`[store]`). A damaged file, or an emptied one in a data
    // directory that held a store (`torpor.id`), a bad PostgreSQL URL or an unreachable server
    // is refused here with a message saying what to do (exit 1, nothing listens yet).
    let (kv, store_name) = match cfg.store.backend.as_str() {
        "postgres" => {
            let settings = cfg.store.postgres();
            let name = crate::kv::pg_store::redacted(&settings.url);
            let kv = crate::kv::pg_store::spawn(settings, cfg.kv_limits())
                .map_err(|e| std::io::Error::other(format!("cannot open the store: {e}")))?;
            (kv, name)
        }
        _ => {
            let kv = crate::kv::spawn(&cfg.store_path(), cfg.kv_limits())
                .map_err(|e| std::io::Error::other(format!("cannot open the store: {e}")))?;
            (kv, cfg.store_path().display().to_string())
        }
    };
    let records = kv
        .load_meta_blocking()
        .map_err(|e| std::io::Error::other(format!("cannot read the store {store_name}: {e}")))?;
    let _ = metrics.kv.set(kv.clone());
    // Several nodes: the bus to the others, the thread that hands what arrives to the
    // shards and the control plane, and the thread that seeks the placement lease.
    let mut cluster_rx = None;
    let lease_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if cfg.cluster.enabled {
        let c = &cfg.cluster;
        let (node, events) =
            crate::cluster::node::Node::start(&c.nats_url, c.nats_tls_ca_file.clone(), gateway_id)
                .map_err(|e| {
                    let at = crate::cluster::nats_addr::redacted(&c.nats_url);
                    std::io::Error::other(format!("cannot reach NATS at {at}: {e}"))
                })?;
        shared.node = Some(node.clone());
        let _ = metrics.bus.set(node.bus_stats_handle());
        let (ctx, crx) = crossbeam_channel::unbounded();
        cluster_rx = Some(crx);
        let mailboxes = shared.shards.clone();
        let bridge_tx = ctx.clone();
        let bridge_node = node.clone();
        let connected = metrics.nats_connected.clone();
        std::thread::Builder::new()
            .name("torpor-node".into())
            .spawn(move || {
                crate::cluster::node::run_bridge(
                    bridge_node,
                    mailboxes,
                    events,
                    bridge_tx,
                    connected,
                )
            })?;
        let pg = crate::cluster::pg_lease::PgLease::new(
            cfg.store.postgres_url.clone(),
            Duration::from_millis(cfg.store.statement_timeout_ms),
        );
        let (lease, stop) = (c.lease(), lease_stop.clone());
        std::thread::Builder::new()
            .name("torpor-lease".into())
            .spawn(move || crate::cluster::node::run_lease(pg, lease, node, ctx, stop))?;
        tracing::info!(node = %crate::cluster::bus::hex(gateway_id), nats = %crate::cluster::nats_addr::redacted(&c.nats_url), "cluster node started");
    }
    let control = {
        let shared = shared.clone();
        let kv = kv.clone();
        std::thread::Builder::new()
            .name("torpor-control".into())
            .spawn(move || run_control(shared, control_rx, kv, records, cluster_rx))?
    };
    let mut threads = Vec::with_capacity(n);
    for (i, (inbox, ls)) in inboxes.into_iter().zip(listeners).enumerate() {
        let shared = shared.clone();
        let pin = cfg.pin_threads;
        threads.push(
            std::thread::Builder::new()
                .name(format!("torpor-shard-{i}"))
                .spawn(move || {
                    if pin && !pin_to_core(i) {
                        tracing::warn!(shard = i, "could not pin the shard thread");
                    }
                    run_shard(i as u16, shared, inbox, ls)
                })?,
        );
    }
    // One start-up line, in the chosen format: a JSON log line, or this plain line on stdout
    // (what scripts and the tests wait for).
    if cfg.log_format == "json" {
        tracing::info!(%addr, shards = n, gateway_id = ?gateway_id, "torpor listening");
    } else {
        println!("torpor listening on {addr} shards={n}");
    }
    if shared.access.protected_mode() {
        tracing::info!(
            "protected mode: no auth.admin_token is configured, so the engine API and runner connections are accepted from loopback peers only (gateway traffic to actors is open)"
        );
    } else {
        tracing::info!("authentication on: the engine API and runners need the admin token");
    }

    wait_for_signal(sigs);
    tracing::info!("draining: readiness 503, no new connections");
    shared.draining.store(true, Ordering::SeqCst);
    for fd in &listen_fds {
        // SAFETY: shutting down a socket this process owns; it leaves the listening state
        // (and its SO_REUSEPORT group) at once and the pending accepts fail.
        unsafe {
            libc::shutdown(*fd, libc::SHUT_RDWR);
        }
    }
    for mb in shared.shards.iter() {
        mb.send(ShardMsg::Shutdown);
    }
    // The shards drain (see `Gateway::begin_drain`) while the control plane keeps answering them (an
    // in-flight request may still be waiting for its actor). A second signal stops at once:
    // every acknowledged change is already durable.
    let t = &cfg.timeouts;
    let bound = Duration::from_millis(t.drain_ms + t.close_handshake_ms) + Duration::from_secs(2);
    let deadline = std::time::Instant::now() + bound;
    while shared.drained.load(Ordering::SeqCst) < n {
        if std::time::Instant::now() >= deadline {
            tracing::warn!("the drain did not finish in time; stopping anyway");
            break;
        }
        if wait_for_signal_for(sigs, Duration::from_millis(20)) {
            tracing::warn!("second signal: stopping at once");
            std::process::exit(1);
        }
    }
    let _ = control_tx.send(ControlMsg::Shutdown);
    let _ = control.join();
    lease_stop.store(true, Ordering::SeqCst);
    // Everything queued is committed before the process exits; if that fails the exit
    // status says so.
    let flushed = kv.flush_blocking();
    kv.shutdown();
    drop(threads);
    match flushed {
        Ok(()) => {
            tracing::info!("stopped");
            Ok(())
        }
        Err(e) => Err(std::io::Error::other(format!(
            "stopped, but flushing the store failed: {e}"
        ))),
    }
}

/// Raises the soft open-files limit to the hard one (as nginx's `worker_rlimit_nofile`):
/// every connection is a descriptor, and the default soft limit (1024) would cap a gateway
/// far below what the machine can hold. The connection caps derive from the result.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write the struct passed by pointer.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-mask calls on a zeroed sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for one of the blocked signals; true if one arrived.
fn wait_for_signal_for(set: libc::sigset_t, timeout: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: waits for one of the blocked signals, writing nothing we own but `set`'s copy.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) > 0 }
}

fn wait_for_signal(set: libc::sigset_t) {
    let mut sig: libc::c_int = 0;
    // SAFETY: waits for one of the blocked signals.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
}
