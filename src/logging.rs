//! Log setup through `tracing`: human-readable or JSON lines on stderr, filtered by
//! `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: escape codes in a log file or a journal are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// At most one line a second from one call site; the lines held back in between are counted
/// (`torpor_log_lines_suppressed_total`) and their number is given on the next line written.
/// A peer that can make torpor log (a flood of failed accepts, say) must not be able to fill
/// the disk or bury the other lines.
pub struct RateLimit {
    /// Milliseconds since [`RateLimit::epoch`] of the last line written, plus one (0 = never).
    last_ms: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl RateLimit {
    pub const PERIOD_MS: u64 = 1000;

    pub const fn new() -> RateLimit {
        RateLimit {
            last_ms: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn epoch() -> std::time::Instant {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(std::time::Instant::now)
    }

    /// `Some(lines held back since the last one)` when a line may be written at `now_ms`
    /// (any monotonic milliseconds), `None` when it is held back.
    pub fn allow_at(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let stamp = now_ms + 1;
        let last = self.last_ms.load(Relaxed);
        if last != 0 && stamp < last + Self::PERIOD_MS {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        if self
            .last_ms
            .compare_exchange(last, stamp, Relaxed, Relaxed)
            .is_err()
        {
            // Another thread wrote the line for this period.
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }

    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Self::epoch().elapsed().as_millis() as u64)
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` at most once a second from this call site; lines held back are counted in
/// `$metrics` (a `ShardMetrics`) and their number is added to the next line as `suppressed`.
#[macro_export]
macro_rules! warn_limited {
    ($metrics:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::new();
        match LIMIT.allow() {
            Some(suppressed) => tracing::warn!(suppressed, $($arg)+),
            None => $metrics.inc($crate::metrics::Counter::LogLinesSuppressed),
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn one_line_a_period_and_the_rest_counted() {
        let l = RateLimit::new();
        assert_eq!(l.allow_at(0), Some(0));
        assert_eq!(l.allow_at(10), None);
        assert_eq!(l.allow_at(998), None);
        assert_eq!(l.allow_at(1000), Some(2));
        assert_eq!(l.allow_at(1500), None);
        assert_eq!(l.allow_at(5000), Some(1));
    }
}
