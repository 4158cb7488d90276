//! Measurement plumbing of the load generator: the shared latency histogram (fed in batches
//! so connections do not contend on it), run-wide counters, `/proc` samples of a target
//! process (CPU seconds, RSS), and the final report (text summary + one JSON line).
//!
//! It must never sit on a message's hot path with a lock or an allocation per sample.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies are recorded in nanoseconds; the trackable range is 1 ns .. 60 s at three
/// significant digits (covers the 1 µs .. 60 s range with sub-µs resolution at the low end).
pub const HIST_MAX_NS: u64 = 60_000_000_000;

pub type SharedHist = Arc<Mutex<Histogram<u64>>>;

pub fn new_hist() -> SharedHist {
    Arc::new(Mutex::new(
        Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("static histogram bounds"),
    ))
}

/// Per-connection front of the shared histogram: samples are buffered and merged in batches.
pub struct Recorder {
    buf: Vec<u64>,
    shared: SharedHist,
}

const BATCH: usize = 512;

impl Recorder {
    pub fn new(shared: &SharedHist) -> Recorder {
        Recorder {
            buf: Vec::new(),
            shared: shared.clone(),
        }
    }

    #[inline]
    pub fn record(&mut self, d: Duration) {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(BATCH);
        }
        self.buf.push((d.as_nanos() as u64).clamp(1, HIST_MAX_NS));
        if self.buf.len() == BATCH {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut h = match self.shared.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        for &v in &self.buf {
            h.saturating_record(v);
        }
        self.buf.clear();
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Run-wide counters, shared by every connection.
#[derive(Default)]
pub struct Totals {
    /// Echoes received (counted ones: inside the measured window / measured phase).
    pub messages: AtomicU64,
    /// Payload bytes of those echoes (flood: payload bytes sent).
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub late: AtomicU64,
    pub reconnects: AtomicU64,
    /// Flood: messages written completely.
    pub sent: AtomicU64,
    /// Idle: connections that completed their first echo.
    pub connected: AtomicU64,
    /// Rate: messages whose echo never came before the drain deadline.
    pub lost: AtomicU64,
}

impl Totals {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}

/// One look at a process in `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// utime + stime in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// utime + stime from the text of `/proc/PID/stat` (fields 14 and 15; the command name in
/// parentheses may itself contain spaces or parentheses).
pub fn parse_stat_cpu(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field N is at index N - 3.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` field of `/proc/PID/status` (e.g. `VmRSS`).
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub fn sample_pid(pid: i32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        cpu_ticks: parse_stat_cpu(&stat)?,
        rss_kib: parse_status_kib(&status, "VmRSS")?,
        hwm_kib: parse_status_kib(&status, "VmHWM").unwrap_or(0),
    })
}

pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds (user + system) this process has used so far.
pub fn self_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Target-process figures over the measured window.
#[derive(Debug, Default, Clone, Copy)]
pub struct PidWindow {
    pub cpu_s: Option<f64>,
    pub rss_start: Option<u64>,
    pub rss_end: Option<u64>,
    pub rss_peak: Option<u64>,
}

impl PidWindow {
    pub fn from(start: Option<ProcSample>, end: Option<ProcSample>) -> PidWindow {
        match (start, end) {
            (Some(s), Some(e)) => PidWindow {
                cpu_s: Some(e.cpu_ticks.saturating_sub(s.cpu_ticks) as f64 / clk_tck()),
                rss_start: Some(s.rss_kib),
                rss_end: Some(e.rss_kib),
                rss_peak: Some(e.hwm_kib),
            },
            _ => PidWindow::default(),
        }
    }
}

/// Everything one run reports.
#[derive(Debug, Default)]
pub struct Report {
    pub mode: &'static str,
    pub connections: usize,
    pub size: usize,
    pub messages: u64,
    pub seconds: f64,
    /// Payload bytes echoed back (flood: sent).
    pub bytes: u64,
    /// Latency percentiles in µs, when anything was recorded.
    pub lat: Option<Lat>,
    pub errors: u64,
    pub late: Option<u64>,
    pub reconnects: Option<u64>,
    pub connected: Option<u64>,
    pub pid: PidWindow,
    pub rss_per_conn_bytes: Option<f64>,
    /// Mode-specific extras (go into the JSON as they are and into the text line).
    pub extra: Vec<(&'static str, serde_json::Value)>,
    pub loadgen_cpu_s: f64,
    /// Length of the window `pid` covers when it is not `seconds` (idle: open + hold).
    pub pid_window_s: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
pub struct Lat {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

pub fn latencies(h: &SharedHist) -> Option<Lat> {
    let h = match h.lock() {
        Ok(h) => h,
        Err(p) => p.into_inner(),
    };
    if h.is_empty() {
        return None;
    }
    let us = |v: u64| (v as f64 / 100.0).round() / 10.0;
    Some(Lat {
        p50: us(h.value_at_quantile(0.5)),
        p90: us(h.value_at_quantile(0.9)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        max: us(h.max()),
        count: h.len(),
    })
}

impl Report {
    pub fn msgs_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.messages as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn mb_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e6
        } else {
            0.0
        }
    }

    pub fn text(&self) -> String {
        let mut s = format!(
            "{} c={} s={}: {} msgs in {:.3}s = {:.0} msg/s, {:.2} MB/s; errors={}",
            self.mode,
            self.connections,
            self.size,
            self.messages,
            self.seconds,
            self.msgs_per_sec(),
            self.mb_per_sec(),
            self.errors
        );
        if let Some(l) = &self.lat {
            s += &format!(
                "\n  latency us (n={}): p50={} p90={} p99={} p99.9={} max={}",
                l.count, l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        for (k, v) in [
            ("late", self.late),
            ("reconnects", self.reconnects),
            ("connected", self.connected),
        ] {
            if let Some(v) = v {
                s += &format!("\n  {k}={v}");
            }
        }
        for (k, v) in &self.extra {
            s += &format!("\n  {k}={v}");
        }
        if let Some(cpu) = self.pid.cpu_s {
            s += &format!(
                "\n  target: cpu {:.2}s ({:.0}% of a core), rss KiB start={} end={} peak={}",
                cpu,
                match self.pid_window_s.unwrap_or(self.seconds) {
                    w if w > 0.0 => cpu / w * 100.0,
                    _ => 0.0,
                },
                self.pid.rss_start.unwrap_or(0),
                self.pid.rss_end.unwrap_or(0),
                self.pid.rss_peak.unwrap_or(0)
            );
        }
        if let Some(b) = self.rss_per_conn_bytes {
            s += &format!("\n  target rss per connection: {b:.0} bytes");
        }
        s += &format!("\n  loadgen cpu {:.2}s", self.loadgen_cpu_s);
        s
    }

    pub fn json(&self) -> serde_json::Value {
        let l = self.lat;
        let mut v = serde_json::json!({
            "mode": self.mode,
            "connections": self.connections,
            "size": self.size,
            "messages": self.messages,
            "seconds": self.seconds,
            "msgs_per_sec": self.msgs_per_sec(),
            "mb_per_sec": self.mb_per_sec(),
            "p50_us": l.map(|l| l.p50),
            "p90_us": l.map(|l| l.p90),
            "p99_us": l.map(|l| l.p99),
            "p999_us": l.map(|l| l.p999),
            "max_us": l.map(|l| l.max),
            "errors": self.errors,
            "late": self.late,
            "reconnects": self.reconnects,
            "connected": self.connected,
            "pid_cpu_s": self.pid.cpu_s,
            "pid_rss_kib_start": self.pid.rss_start,
            "pid_rss_kib_end": self.pid.rss_end,
            "pid_rss_kib_peak": self.pid.rss_peak,
            "rss_per_conn_bytes": self.rss_per_conn_bytes,
            "loadgen_cpu_s": self.loadgen_cpu_s,
        });
        if let Some(o) = v.as_object_mut() {
            for (k, x) in &self.extra {
                o.insert((*k).to_string(), x.clone());
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_skips_a_command_with_spaces_and_parens() {
        let stat = "4242 (tor por) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    1234 567 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_stat_cpu(stat), Some(1234 + 567));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn status_fields_in_kib() {
        let status = "Name:\ttorpor\nVmHWM:\t  20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(10240));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(20480));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn recorder_batches_reach_the_histogram_on_drop() {
        let h = new_hist();
        {
            let mut r = Recorder::new(&h);
            for i in 1..=1000u64 {
                r.record(Duration::from_micros(i));
            }
        }
        let l = latencies(&h).unwrap();
        assert_eq!(l.count, 1000);
        assert!((l.p50 - 500.0).abs() < 1.0, "{}", l.p50);
        assert!((l.max - 1000.0).abs() < 1.0, "{}", l.max);
    }

    #[test]
    fn json_has_every_key_with_nulls_for_what_does_not_apply() {
        let r = Report {
            mode: "closed",
            connections: 2,
            size: 10,
            messages: 100,
            seconds: 2.0,
            bytes: 1000,
            ..Default::default()
        };
        let v = r.json();
        for k in [
            "mode",
            "connections",
            "size",
            "messages",
            "seconds",
            "msgs_per_sec",
            "mb_per_sec",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
            "errors",
            "late",
            "reconnects",
            "connected",
            "pid_cpu_s",
            "pid_rss_kib_start",
            "pid_rss_kib_end",
            "pid_rss_kib_peak",
            "rss_per_conn_bytes",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["msgs_per_sec"], 50.0);
        assert_eq!(v["mb_per_sec"], 0.0005);
        assert!(v["p50_us"].is_null());
        assert!(v["late"].is_null());
    }
}
