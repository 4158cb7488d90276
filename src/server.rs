//! Process assembly: binds the listeners, starts the control-plane thread and one pinned
//! shard thread per core, and handles SIGTERM/SIGINT (drain, tell runners, close clients with
//! 1001, exit 0 within the grace period).

use crate::config::Config;
use crate::metrics::Metrics;
use crate::net::{bind_reuseport, ensure_port_free, run_shard};
use crate::shard::control::{run_control, ControlMsg};
use crate::shard::{pin_to_core, ShardMsg, Shared};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long shards get to flush close frames after SIGTERM.
const GRACE: Duration = Duration::from_millis(500);

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

    let (shared, (inboxes, control_rx)) = Shared::new(cfg.clone(), metrics.clone(), gateway_id, n)?;
    let control_tx = shared.control.clone();

    // The embedded store: actor KV spaces and the control plane's records. A damaged file, or
    // an emptied one in a data directory that held a store (`torpor.id`), is refused here with
    // a message naming the file and what to do (exit 1, nothing listens yet).
    let kv = crate::kv::spawn(&cfg.store_path(), cfg.kv_limits())
        .map_err(|e| std::io::Error::other(format!("cannot open the store: {e}")))?;
    let records = kv.load_meta_blocking().map_err(|e| {
        std::io::Error::other(format!(
            "cannot read the store {}: {e}",
            cfg.store_path().display()
        ))
    })?;
    let _ = metrics.kv.set(kv.clone());
    let control = {
        let shared = shared.clone();
        let kv = kv.clone();
        std::thread::Builder::new()
            .name("torpor-control".into())
            .spawn(move || run_control(shared, control_rx, kv, records))?
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
    tracing::info!(%addr, shards = n, gateway_id = ?gateway_id, "torpor listening");
    if shared.access.protected_mode() {
        tracing::info!(
            "protected mode: no auth.admin_token is configured, so the engine API and runner connections are accepted from loopback peers only (gateway traffic to actors is open)"
        );
    } else {
        tracing::info!("authentication on: the engine API and runners need the admin token");
    }
    println!("torpor listening on {addr} shards={n}");

    wait_for_signal(sigs);
    tracing::info!("shutting down");
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
    let _ = control_tx.send(ControlMsg::Shutdown);
    std::thread::sleep(GRACE);
    let _ = control.join();
    // Everything queued is committed before the process exits.
    if let Err(e) = kv.flush_blocking() {
        tracing::error!(error = %e, "flushing the store failed");
    }
    kv.shutdown();
    drop(threads);
    Ok(())
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

fn wait_for_signal(set: libc::sigset_t) {
    let mut sig: libc::c_int = 0;
    // SAFETY: waits for one of the blocked signals.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
}
