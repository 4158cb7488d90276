//! The load patterns of the load generator. Each runs one task per connection on the tokio
//! runtime and fills the shared counters and histogram; the caller prints the report.
//!
//! - closed / pipeline: `depth` messages in flight per connection (closed = 1), latency
//!   send→echo with FIFO matching; either a fixed count per connection or a time window.
//! - rate: open loop, messages at exact intended times (one periodic `timerfd` paces all
//!   connections with µs precision), latency from the intended time (no coordinated
//!   omission).
//! - idle: many connections, one echo each, then held open (pings answered).
//! - flood: write as fast as the socket takes, never read, reconnect when dropped. Never
//!   reading, it cannot see a close frame: it notices the close when a write fails (the
//!   server resets the connection once its close handshake times out).
//!
//! Nothing here panics on what the server does: failures are counted in `Totals::errors`.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch, Barrier, Notify, Semaphore};
use tokio::time::{sleep, sleep_until, timeout};

use crate::stats::{
    latencies, sample_pid, self_cpu_s, PidWindow, Recorder, Report, SharedHist, Totals,
};
use crate::ws::{client_frame, Conn, OP_BINARY, OP_TEXT};

/// How long a connect + upgrade may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Count mode: a connection with no echo for this long is given up.
const STALL: Duration = Duration::from_secs(10);
/// Rate: a message written more than this after its intended time counts as late.
pub const LATE_AFTER: Duration = Duration::from_millis(1);
/// Rate: how long after the window echoes of messages sent in it are still awaited.
const DRAIN: Duration = Duration::from_secs(5);

/// Where to connect and what to send.
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    pub size: usize,
    pub text: bool,
    pub pid: Option<i32>,
}

impl Target {
    fn op(&self) -> u8 {
        if self.text {
            OP_TEXT
        } else {
            OP_BINARY
        }
    }

    /// The message frame, masked with this connection's key (built once per connection).
    fn frame(&self, conn: &Conn) -> Vec<u8> {
        client_frame(self.op(), &vec![0x5a; self.size], conn.mask())
    }

    async fn connect(&self, source: Option<IpAddr>, rbuf: usize) -> io::Result<Conn> {
        let mut c = timeout(
            CONNECT_TIMEOUT,
            Conn::connect(self.addr, &self.host, &self.path, source, rbuf),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect/upgrade timed out"))??;
        c.expect = self.size as u64;
        Ok(c)
    }
}

/// Shared state of one run.
pub struct Run {
    pub t: Target,
    pub totals: Totals,
    pub hist: SharedHist,
    /// Rate: how long after its intended time each measured message was written.
    pub lag: SharedHist,
    pub verbose: bool,
}

impl Run {
    fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        Totals::add(&self.totals.errors, 1);
        if self.verbose {
            eprintln!("torpor-load: {what}: {e}");
        }
    }

    fn report(&self, mode: &'static str, connections: usize, seconds: f64) -> Report {
        let t = &self.totals;
        Report {
            mode,
            connections,
            size: self.t.size,
            messages: Totals::get(&t.messages),
            seconds,
            bytes: Totals::get(&t.bytes),
            lat: latencies(&self.hist),
            errors: Totals::get(&t.errors),
            loadgen_cpu_s: self_cpu_s(),
            ..Default::default()
        }
    }

    fn sample(&self) -> Option<crate::stats::ProcSample> {
        self.t.pid.and_then(sample_pid)
    }
}

// ---------------------------------------------------------------------------------------
// closed / pipeline

/// Closed loop (`depth` 1) or pipelined load.
pub struct LoopCfg {
    pub connections: usize,
    pub depth: usize,
    /// Count mode: round trips per connection before / during measuring.
    pub warmup: u64,
    pub count: u64,
    /// Window mode (when set): measure for this long after `warmup_time`.
    pub duration: Option<Duration>,
    pub warmup_time: Duration,
}

#[derive(Clone, Copy)]
enum Limit {
    /// Exactly `total` messages, recorded or not.
    Count { total: u64, record: bool },
    /// Until `end`; echoes arriving in `[meas, end)` are recorded.
    Window { meas: Instant, end: Instant },
}

/// Keeps `depth` messages in flight on one connection under `limit`.
async fn pump(
    run: &Run,
    conn: &mut Conn,
    frame: &[u8],
    depth: usize,
    limit: Limit,
    rec: &mut Recorder,
) -> io::Result<()> {
    let mut fifo: VecDeque<Instant> = VecDeque::with_capacity(depth);
    let (total, end) = match limit {
        Limit::Count { total, .. } => (total, None),
        Limit::Window { end, .. } => (u64::MAX, Some(end)),
    };
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let stop = sleep_until(end.unwrap_or(far).into());
    tokio::pin!(stop);
    let stall = sleep(STALL);
    tokio::pin!(stall);
    let mut stall_reset = Instant::now();
    let (mut sent, mut got, mut counted) = (0u64, 0u64, 0u64);
    let now = Instant::now();
    while sent < total && fifo.len() < depth {
        fifo.push_back(now);
        conn.queue(frame);
        sent += 1;
    }
    conn.flush()?;
    let result = loop {
        if got >= total {
            break Ok(());
        }
        let p = tokio::select! {
            biased;
            p = conn.io() => p,
            _ = &mut stop => break Ok(()),
            _ = &mut stall, if end.is_none() => {
                break Err(io::Error::new(io::ErrorKind::TimedOut, "no echo for 10 s"));
            }
        };
        let p = match p {
            Ok(p) => p,
            Err(e) => break Err(e),
        };
        if p.msgs > 0 {
            let now = Instant::now();
            let record = match limit {
                Limit::Count { record, .. } => record,
                Limit::Window { meas, end } => now >= meas && now < end,
            };
            for _ in 0..p.msgs {
                let Some(t) = fifo.pop_front() else {
                    break;
                };
                got += 1;
                if record {
                    rec.record(now - t);
                    counted += 1;
                }
            }
            if p.bad_size > 0 {
                Totals::add(&run.totals.errors, p.bad_size as u64);
            }
            let mut failed = None;
            while sent < total && fifo.len() < depth {
                fifo.push_back(now);
                if let Err(e) = conn.send(frame) {
                    failed = Some(e);
                    break;
                }
                sent += 1;
            }
            if let Some(e) = failed {
                break Err(e);
            }
            if end.is_none() && now - stall_reset > Duration::from_secs(1) {
                stall_reset = now;
                stall.as_mut().reset((now + STALL).into());
            }
        }
        if p.closed {
            break Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server closed",
            ));
        }
    };
    Totals::add(&run.totals.messages, counted);
    Totals::add(&run.totals.bytes, counted * run.t.size as u64);
    result
}

pub async fn run_loop(run: Arc<Run>, cfg: LoopCfg) -> Report {
    let n = cfg.connections;
    let connected = Arc::new(Barrier::new(n + 1));
    let warmed = Arc::new(Barrier::new(n + 1));
    let (times_tx, times_rx) = watch::channel(None::<(Instant, Instant)>);
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (run, connected, warmed, mut times_rx) = (
            run.clone(),
            connected.clone(),
            warmed.clone(),
            times_rx.clone(),
        );
        let depth = cfg.depth;
        let (warmup, count, window) = (cfg.warmup, cfg.count, cfg.duration.is_some());
        tasks.push(tokio::spawn(async move {
            let conn = run.t.connect(None, 64 * 1024).await;
            connected.wait().await;
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    run.error("connect", &e);
                    if !window {
                        warmed.wait().await;
                    }
                    return;
                }
            };
            let frame = run.t.frame(&conn);
            let mut rec = Recorder::new(&run.hist);
            let r = if window {
                let Ok(times) = times_rx.wait_for(|t| t.is_some()).await.map(|t| *t) else {
                    return;
                };
                let Some((meas, end)) = times else { return };
                pump(
                    &run,
                    &mut conn,
                    &frame,
                    depth,
                    Limit::Window { meas, end },
                    &mut rec,
                )
                .await
            } else {
                let w = pump(
                    &run,
                    &mut conn,
                    &frame,
                    depth,
                    Limit::Count {
                        total: warmup,
                        record: false,
                    },
                    &mut rec,
                )
                .await;
                warmed.wait().await;
                match w {
                    Ok(()) => {
                        pump(
                            &run,
                            &mut conn,
                            &frame,
                            depth,
                            Limit::Count {
                                total: count,
                                record: true,
                            },
                            &mut rec,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = r {
                run.error("connection", &e);
            }
            conn.close();
        }));
    }
    connected.wait().await;
    let (s0, s1, cpu0, seconds);
    if let Some(d) = cfg.duration {
        let meas = Instant::now() + cfg.warmup_time;
        let end = meas + d;
        let _ = times_tx.send(Some((meas, end)));
        sleep_until(meas.into()).await;
        s0 = run.sample();
        cpu0 = self_cpu_s();
        sleep_until(end.into()).await;
        s1 = run.sample();
        seconds = d.as_secs_f64();
        for t in tasks {
            let _ = t.await;
        }
    } else {
        warmed.wait().await;
        let start = Instant::now();
        s0 = run.sample();
        cpu0 = self_cpu_s();
        for t in tasks {
            let _ = t.await;
        }
        s1 = run.sample();
        seconds = start.elapsed().as_secs_f64();
    }
    let mode = if cfg.depth == 1 { "closed" } else { "pipeline" };
    let mut r = run.report(mode, n, seconds);
    r.pid = PidWindow::from(s0, s1);
    r.loadgen_cpu_s -= cpu0;
    if cfg.depth > 1 {
        r.extra.push(("depth", cfg.depth.into()));
    }
    r
}

// ---------------------------------------------------------------------------------------
// rate

/// A periodic `timerfd` (CLOCK_MONOTONIC) watched by the runtime: µs-precise ticks where
/// tokio's own timers have millisecond granularity.
struct TimerFd {
    fd: AsyncFd<OwnedFd>,
}

impl TimerFd {
    fn new() -> io::Result<TimerFd> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd keeps the timerfd open for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }?;
        Ok(TimerFd { fd })
    }

    /// Ticks first at `first` (at once when it has passed), then every `every`.
    fn arm(&self, first: Instant, every: Duration) -> io::Result<()> {
        let ts = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        let its = libc::itimerspec {
            it_interval: ts(every.max(Duration::from_nanos(1))),
            it_value: ts(first
                .saturating_duration_since(Instant::now())
                .max(Duration::from_nanos(1))),
        };
        // SAFETY: valid timerfd and a fully initialised itimerspec.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &its, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the next tick(s).
    async fn wait(&self) -> io::Result<()> {
        loop {
            let mut g = self.fd.readable().await?;
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes into an 8-byte buffer from our timerfd.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    8,
                )
            };
            g.clear_ready();
            if r == 8 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

pub struct RateCfg {
    pub connections: usize,
    /// Messages per second over all connections.
    pub rate: f64,
    pub duration: Duration,
    pub warmup_time: Duration,
}

/// The open-loop schedule: global message `j` is due at `t0 + j / rate` and goes to
/// connection `j % connections` (so message k of connection i is `j = i + k * connections`).
#[derive(Clone, Copy)]
pub struct Schedule {
    pub t0: Instant,
    pub meas: Instant,
    pub end: Instant,
    pub rate: f64,
    pub connections: usize,
}

impl Schedule {
    pub fn due(&self, j: u64) -> Instant {
        self.t0 + Duration::from_secs_f64(j as f64 / self.rate)
    }

    /// Global messages due by `now` (the next index not yet due).
    pub fn due_by(&self, now: Instant) -> u64 {
        let e = now.saturating_duration_since(self.t0).as_secs_f64() * self.rate;
        let mut j = e as u64;
        // Float rounding either way: settle on the first index due after `now`.
        while self.due(j) <= now {
            j += 1;
        }
        while j > 0 && self.due(j - 1) > now {
            j -= 1;
        }
        j
    }
}

/// Wakes connections when their messages fall due: one periodic timer for the whole run,
/// ticking at the message interval, instead of a timer per connection.
async fn pacer(sched: Schedule, wake: Vec<Arc<Notify>>) -> io::Result<()> {
    let timer = TimerFd::new()?;
    let every = Duration::from_secs_f64(1.0 / sched.rate);
    timer.arm(sched.t0, every)?;
    let c = sched.connections as u64;
    let mut next = 0u64;
    loop {
        if sched.due(next) >= sched.end {
            // Let connections see that sending is over.
            for w in &wake {
                w.notify_one();
            }
            return Ok(());
        }
        timer.wait().await?;
        let upto = sched.due_by(Instant::now());
        if upto <= next {
            continue;
        }
        if upto - next >= c {
            for w in &wake {
                w.notify_one();
            }
        } else {
            for j in next..upto {
                wake[(j % c) as usize].notify_one();
            }
        }
        next = upto;
    }
}

/// One open-loop connection (index `i`): sends what is due when the pacer says so, records
/// latency from the intended time.
async fn rate_conn(
    run: &Run,
    conn: &mut Conn,
    i: usize,
    sched: Schedule,
    wake: &Notify,
) -> io::Result<()> {
    let frame = run.t.frame(conn);
    let c = sched.connections as u64;
    let mut rec = Recorder::new(&run.hist);
    let mut lag = Recorder::new(&run.lag);
    let mut fifo: VecDeque<(Instant, bool)> = VecDeque::new();
    let mut j = i as u64;
    let mut next = sched.due(j);
    let mut sending = next < sched.end;
    let (mut counted, mut late) = (0u64, 0u64);
    let drain = sleep_until((sched.end + DRAIN).into());
    tokio::pin!(drain);
    let result = loop {
        if !sending && fifo.is_empty() {
            break Ok(());
        }
        let p = tokio::select! {
            biased;
            _ = wake.notified(), if sending => {
                let now = Instant::now();
                let mut queued = false;
                while sending && next <= now {
                    let measured = next >= sched.meas;
                    if measured {
                        lag.record(now - next);
                        if now - next > LATE_AFTER {
                            late += 1;
                        }
                    }
                    fifo.push_back((next, measured));
                    conn.queue(&frame);
                    queued = true;
                    j += c;
                    next = sched.due(j);
                    sending = next < sched.end;
                }
                if queued {
                    if let Err(e) = conn.flush() {
                        break Err(e);
                    }
                }
                continue;
            }
            p = conn.io() => p,
            _ = &mut drain, if !sending => {
                let lost = fifo.iter().filter(|(_, m)| *m).count() as u64;
                Totals::add(&run.totals.lost, lost);
                Totals::add(&run.totals.errors, lost);
                break Ok(());
            }
        };
        let p = match p {
            Ok(p) => p,
            Err(e) => break Err(e),
        };
        if p.msgs > 0 {
            let now = Instant::now();
            for _ in 0..p.msgs {
                let Some((t, measured)) = fifo.pop_front() else {
                    break;
                };
                if measured {
                    rec.record(now - t);
                    counted += 1;
                }
            }
            if p.bad_size > 0 {
                Totals::add(&run.totals.errors, p.bad_size as u64);
            }
        }
        if p.closed {
            break Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server closed",
            ));
        }
    };
    Totals::add(&run.totals.messages, counted);
    Totals::add(&run.totals.bytes, counted * run.t.size as u64);
    Totals::add(&run.totals.late, late);
    result
}

pub async fn run_rate(run: Arc<Run>, cfg: RateCfg) -> Report {
    let n = cfg.connections;
    let connected = Arc::new(Barrier::new(n + 1));
    let (sched_tx, sched_rx) = watch::channel(None::<Schedule>);
    let wake: Vec<Arc<Notify>> = (0..n).map(|_| Arc::new(Notify::new())).collect();
    let mut tasks = Vec::with_capacity(n);
    for (i, w) in wake.iter().enumerate() {
        let (run, connected, mut sched_rx, w) =
            (run.clone(), connected.clone(), sched_rx.clone(), w.clone());
        tasks.push(tokio::spawn(async move {
            let conn = run.t.connect(None, 64 * 1024).await;
            connected.wait().await;
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => return run.error("connect", &e),
            };
            let Ok(sched) = sched_rx.wait_for(|t| t.is_some()).await.map(|t| *t) else {
                return;
            };
            let Some(sched) = sched else { return };
            if let Err(e) = rate_conn(&run, &mut conn, i, sched, &w).await {
                run.error("connection", &e);
            }
            conn.close();
        }));
    }
    connected.wait().await;
    // A little head start so every connection waits for its first message in time.
    let t0 = Instant::now() + Duration::from_millis(20);
    let meas = t0 + cfg.warmup_time;
    let sched = Schedule {
        t0,
        meas,
        end: meas + cfg.duration,
        rate: cfg.rate,
        connections: n,
    };
    let _ = sched_tx.send(Some(sched));
    let pacer = tokio::spawn(pacer(sched, wake));
    sleep_until(meas.into()).await;
    let s0 = run.sample();
    let cpu0 = self_cpu_s();
    sleep_until(sched.end.into()).await;
    let s1 = run.sample();
    match pacer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => run.error("pacer", &e),
        Err(e) => run.error("pacer", &e),
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut r = run.report("rate", n, cfg.duration.as_secs_f64());
    r.pid = PidWindow::from(s0, s1);
    r.loadgen_cpu_s -= cpu0;
    r.late = Some(Totals::get(&run.totals.late));
    r.extra.push(("rate", cfg.rate.into()));
    r.extra.push(("lost", Totals::get(&run.totals.lost).into()));
    if let Some(l) = latencies(&run.lag) {
        r.extra.push(("send_lag_p50_us", l.p50.into()));
        r.extra.push(("send_lag_p99_us", l.p99.into()));
        r.extra.push(("send_lag_max_us", l.max.into()));
    }
    r
}

// ---------------------------------------------------------------------------------------
// idle

pub struct IdleCfg {
    pub connections: usize,
    /// Source addresses 127.0.0.1 ..= 127.0.0.K (loopback targets only).
    pub sources: usize,
    pub hold: Duration,
}

/// How many connects + upgrades + first echoes are in progress at once.
const OPEN_CONCURRENCY: usize = 256;

/// Raises the soft open-files limit to the hard one; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur as u64
    }
}

/// The source address of connection `i` spread over `k` loopback addresses.
pub fn source_for(i: usize, k: usize) -> IpAddr {
    let base = u32::from(Ipv4Addr::new(127, 0, 0, 1));
    IpAddr::V4(Ipv4Addr::from(base + (i % k.max(1)) as u32))
}

pub async fn run_idle(run: Arc<Run>, cfg: IdleCfg) -> Report {
    let n = cfg.connections;
    let bind = matches!(run.t.addr.ip(), IpAddr::V4(v) if v.is_loopback());
    let s_base = run.sample();
    let cpu0 = self_cpu_s();
    let start = Instant::now();
    let sem = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<bool>();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (run, sem, done_tx, mut stop_rx) =
            (run.clone(), sem.clone(), done_tx.clone(), stop_rx.clone());
        let source = bind.then(|| source_for(i, cfg.sources));
        tasks.push(tokio::spawn(async move {
            let Ok(permit) = sem.acquire().await else {
                return;
            };
            let first = async {
                let mut conn = run.t.connect(source, 4096).await?;
                let frame = run.t.frame(&conn);
                let t = Instant::now();
                conn.send(&frame)?;
                loop {
                    let p = conn.io().await?;
                    if p.bad_size > 0 {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "echo size"));
                    }
                    if p.msgs > 0 {
                        break;
                    }
                    if p.closed {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "server closed",
                        ));
                    }
                }
                let mut rec = Recorder::new(&run.hist);
                rec.record(t.elapsed());
                Ok(conn)
            };
            let r = timeout(Duration::from_secs(30), first).await;
            drop(permit);
            let mut conn = match r {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    run.error("open", &e);
                    let _ = done_tx.send(false);
                    return;
                }
                Err(_) => {
                    run.error("open", &"timed out");
                    let _ = done_tx.send(false);
                    return;
                }
            };
            Totals::add(&run.totals.connected, 1);
            Totals::add(&run.totals.messages, 1);
            Totals::add(&run.totals.bytes, run.t.size as u64);
            let _ = done_tx.send(true);
            // Hold: answer pings until told to stop; anything else ending the socket is an
            // error (counted as dropped).
            loop {
                tokio::select! {
                    biased;
                    _ = stop_rx.wait_for(|s| *s) => break,
                    p = conn.io() => match p {
                        Ok(p) if !p.closed => {}
                        Ok(_) => {
                            Totals::add(&run.totals.lost, 1);
                            run.error("hold", &"server closed");
                            return;
                        }
                        Err(e) => {
                            Totals::add(&run.totals.lost, 1);
                            run.error("hold", &e);
                            return;
                        }
                    },
                }
            }
            conn.close();
        }));
    }
    drop(done_tx);
    let mut ok = 0u64;
    for _ in 0..n {
        match done_rx.recv().await {
            Some(true) => ok += 1,
            Some(false) => {}
            None => break,
        }
    }
    let open_secs = start.elapsed().as_secs_f64();
    let s_open = run.sample();
    let hold_start = Instant::now();
    sleep(cfg.hold).await;
    let s_end = run.sample();
    let held = hold_start.elapsed().as_secs_f64();
    let connected_end = Totals::get(&run.totals.connected) - Totals::get(&run.totals.lost);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = timeout(Duration::from_secs(5), t).await;
    }
    let mut r = run.report("idle", n, held);
    r.pid = PidWindow::from(s_base, s_end);
    r.loadgen_cpu_s -= cpu0;
    r.connected = Some(ok);
    if let (Some(a), Some(b)) = (s_base, s_end) {
        if ok > 0 {
            r.rss_per_conn_bytes = Some((b.rss_kib as f64 - a.rss_kib as f64) * 1024.0 / ok as f64);
        }
    }
    r.pid_window_s = Some(open_secs + held);
    r.extra.push(("open_secs", open_secs.into()));
    r.extra.push(("sources", cfg.sources.into()));
    r.extra.push(("open_at_end", connected_end.into()));
    if let Some(s) = s_open {
        r.extra.push(("pid_rss_kib_all_open", s.rss_kib.into()));
    }
    r
}

// ---------------------------------------------------------------------------------------
// flood

pub struct FloodCfg {
    pub connections: usize,
    pub duration: Duration,
}

pub async fn run_flood(run: Arc<Run>, cfg: FloodCfg) -> Report {
    let n = cfg.connections;
    let s0 = run.sample();
    let cpu0 = self_cpu_s();
    let start = Instant::now();
    let end = start + cfg.duration;
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let stop = sleep_until(end.into());
            tokio::pin!(stop);
            let (mut sent, mut first) = (0u64, true);
            'conn: while Instant::now() < end {
                if !first {
                    Totals::add(&run.totals.reconnects, 1);
                }
                first = false;
                let mut conn = tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    c = run.t.connect(None, 4096) => match c {
                        Ok(c) => c,
                        Err(e) => {
                            run.error("connect", &e);
                            sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                let frame = run.t.frame(&conn);
                let mut off = 0;
                loop {
                    let w = tokio::select! {
                        biased;
                        _ = &mut stop => break 'conn,
                        w = conn.write_from(&frame[off..]) => w,
                    };
                    match w {
                        Ok(k) => {
                            off += k;
                            if off == frame.len() {
                                off = 0;
                                sent += 1;
                            }
                        }
                        // Dropped by the server (the point of flooding): go again.
                        Err(_) => break,
                    }
                }
            }
            Totals::add(&run.totals.sent, sent);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let s1 = run.sample();
    let seconds = start.elapsed().as_secs_f64();
    let sent = Totals::get(&run.totals.sent);
    let mut r = run.report("flood", n, seconds);
    r.messages = sent;
    r.bytes = sent * run.t.size as u64;
    r.lat = None;
    r.pid = PidWindow::from(s0, s1);
    r.loadgen_cpu_s -= cpu0;
    r.reconnects = Some(Totals::get(&run.totals.reconnects));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_due_by_is_the_first_index_not_yet_due() {
        let t0 = Instant::now();
        let s = Schedule {
            t0,
            meas: t0,
            end: t0 + Duration::from_secs(10),
            rate: 3.0,
            connections: 2,
        };
        assert_eq!(s.due_by(t0), 1, "message 0 is due at t0");
        assert_eq!(s.due_by(t0 + Duration::from_millis(333)), 1);
        assert_eq!(s.due_by(t0 + Duration::from_millis(334)), 2);
        assert_eq!(s.due_by(t0 + Duration::from_secs(1)), 4);
        for j in 0..1000 {
            let at = s.due(j);
            assert_eq!(s.due_by(at), j + 1);
            assert_eq!(s.due_by(at - Duration::from_nanos(1)), j);
        }
    }

    #[test]
    fn sources_cycle_over_loopback_addresses() {
        assert_eq!(source_for(0, 3), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(source_for(2, 3), "127.0.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(source_for(3, 3), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(source_for(255, 300), "127.0.1.0".parse::<IpAddr>().unwrap());
        assert_eq!(source_for(7, 0), "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
