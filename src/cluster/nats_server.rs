//! A throwaway `nats-server` for tests: core NATS only (no JetStream, nothing on disk), on a
//! free loopback port, killed on drop. Each test starts its own, so tests and test binaries
//! run in parallel.
//!
//! The binary is found on `PATH` (or at Debian's `/usr/sbin/nats-server`; `scripts/test.sh`
//! installs Debian's `nats-server` package when it is missing).
//!
//! Start-up waits until the server answers on its port: a TCP connection that reads the
//! server's `INFO` line, which must carry this server's unique name (so another process that
//! took the port meanwhile is not mistaken for it). A port taken between choosing and binding
//! makes the server exit; the start is then retried on another port (the first start) or on
//! the same one (a restart: clients reconnect to the URL they know) until a deadline.

use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a start may take before it is reported as a failure.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A running (or stopped) test server.
pub struct NatsServer {
    bin: PathBuf,
    /// Unique per server: checked in the `INFO` line.
    name: String,
    log: PathBuf,
    /// More `nats-server` arguments (e.g. `--user`/`--pass`), at every start.
    extra: Vec<String>,
    port: Mutex<u16>,
    child: Mutex<Option<Child>>,
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("name", &self.name)
            .field("port", &self.port())
            .finish()
    }
}

/// The `nats-server` binary, if installed.
pub fn find_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("nats-server");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from("/usr/sbin/nats-server");
    p.is_file().then_some(p)
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl NatsServer {
    /// Starts a server on a free loopback port and waits until it accepts clients.
    pub fn start() -> io::Result<NatsServer> {
        Self::start_with(&[])
    }

    /// [`start`](Self::start) with more `nats-server` arguments, e.g. `["--user", "u",
    /// "--pass", "p"]` or `["--auth", "token"]` for a server that wants credentials.
    pub fn start_with(extra: &[&str]) -> io::Result<NatsServer> {
        static N: AtomicU64 = AtomicU64::new(0);
        let bin = find_bin().ok_or_else(|| {
            io::Error::other(
                "nats-server was not found on PATH (scripts/test.sh installs Debian's nats-server)",
            )
        })?;
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("torpor-test-{}-{n}", std::process::id());
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let s = NatsServer {
            bin,
            name,
            log,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            port: Mutex::new(0),
            child: Mutex::new(None),
        };
        s.start_server()?;
        Ok(s)
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        *self.port.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The URL clients connect to (the same across restarts).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    /// Starts the server (again, after [`stop`](Self::stop) or [`kill`](Self::kill)) and
    /// waits until it accepts clients. The first start picks a free port; later starts keep
    /// it, retrying while it is not yet free again.
    fn start_server(&self) -> io::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        let keep_port = self.port() != 0;
        loop {
            if !keep_port {
                *self.port.lock().unwrap_or_else(|p| p.into_inner()) = free_port()?;
            }
            let port = self.port();
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)?;
            let mut child = Command::new(&self.bin)
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .args(["-n", &self.name])
                .args(&self.extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            match self.wait_ready(&mut child, port, deadline) {
                Ok(()) => {
                    *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
                    return Ok(());
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    // The port was taken (by another process, or not yet released): try
                    // again, on a fresh port if it is ours to choose.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn wait_ready(&self, child: &mut Child, port: u16, deadline: Instant) -> io::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let want = format!("\"server_name\":\"{}\"", self.name);
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                return Err(io::Error::other(format!(
                    "nats-server exited ({status}) during start-up: {tail}"
                )));
            }
            if let Ok(info) = read_info(addr) {
                if info.contains(&want) {
                    return Ok(());
                }
                // Someone else answers on this port; our server will exit (port in use).
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(
                    "nats-server did not accept connections in time",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal_and_wait(&self, sig: libc::c_int) {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            // SAFETY: signals a child process this server started and has not reaped.
            unsafe {
                libc::kill(child.id() as libc::pid_t, sig);
            }
            let _ = child.wait();
        }
    }

    /// Stops the server (SIGTERM: it closes its clients' connections and exits).
    pub fn stop(&self) {
        self.signal_and_wait(libc::SIGTERM);
    }

    /// Kills the server (SIGKILL): clients see their connections reset.
    pub fn kill(&self) {
        self.signal_and_wait(libc::SIGKILL);
    }

    /// Starts the server again on the same port (stopping it first if it runs).
    pub fn restart(&self) -> io::Result<()> {
        self.stop();
        self.start_server()
    }

    /// True while the server process runs.
    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// The first line a NATS server sends on a new connection (`INFO {...}`).
fn read_info(addr: SocketAddr) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    // The `INFO` line is small; read no more than 64 KiB of whatever answers.
    BufReader::new(io::Read::take(stream, 64 * 1024)).read_line(&mut line)?;
    Ok(line)
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_restarts_on_the_same_port_and_stops() {
        let s = NatsServer::start().expect("start nats-server");
        let port = s.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(read_info(addr).unwrap().starts_with("INFO "));
        s.kill();
        assert!(!s.is_running());
        s.restart().unwrap();
        assert_eq!(s.port(), port);
        assert!(s.is_running());
        assert!(read_info(addr).unwrap().starts_with("INFO "));
        s.stop();
        assert!(!s.is_running());
    }
}
