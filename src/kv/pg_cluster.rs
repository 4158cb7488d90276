//! A throwaway PostgreSQL cluster for tests: `initdb` into a fresh temporary directory, one
//! `postgres` server on a free loopback port (its unix socket in that directory), stopped and
//! removed on drop. Each test process starts its own, so test binaries run in parallel.
//!
//! The binaries are found on `PATH` or under `/usr/lib/postgresql/*/bin` (Debian's layout;
//! `scripts/test.sh` installs `postgresql-15` when neither has them). PostgreSQL refuses to run
//! as root: under root, `initdb` and `postgres` run as the `postgres` user (the child switches
//! its group and user before `exec`), and the directory is handed to that user.
//!
//! Settings are for speed, not safety: `initdb --no-sync`, `fsync=off`, trust authentication
//! for the superuser `postgres` on loopback only.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long start-up may take before it is reported as a failure.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A running (or stopped) test cluster.
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    /// uid/gid to run the server as (when this process is root).
    run_as: Option<(libc::uid_t, libc::gid_t)>,
    port: Mutex<u16>,
    child: Mutex<Option<Child>>,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("dir", &self.dir)
            .field("port", &self.port())
            .finish()
    }
}

/// The directory holding `initdb`, `postgres` and `pg_ctl`.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").is_file() && d.join("postgres").is_file() {
                return Some(d);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
        .collect();
    found.sort();
    found.pop()
}

fn postgres_user() -> io::Result<(libc::uid_t, libc::gid_t)> {
    let name = std::ffi::CString::new("postgres").expect("static name");
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(io::Error::other(
            "running as root and there is no `postgres` user to run PostgreSQL as (install Debian's postgresql package)",
        ));
    }
    // SAFETY: non-null pointer from getpwnam.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn chown_tree(path: &Path, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

impl PgCluster {
    /// Creates and starts a cluster with a database named `torpor`.
    pub fn start() -> io::Result<PgCluster> {
        static N: AtomicU64 = AtomicU64::new(0);
        let bin = find_bin_dir().ok_or_else(|| {
            io::Error::other(
                "PostgreSQL's initdb/postgres were found neither on PATH nor in /usr/lib/postgresql/*/bin (scripts/test.sh installs postgresql-15)",
            )
        })?;
        // SAFETY: geteuid has no preconditions.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_user()?)
        } else {
            None
        };
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("torpor-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if let Some((uid, gid)) = run_as {
            chown_tree(&dir, uid, gid)?;
        }
        let c = PgCluster {
            dir,
            bin,
            run_as,
            port: Mutex::new(0),
            child: Mutex::new(None),
        };
        let out = c
            .command("initdb")
            .arg("-D")
            .arg(c.data_dir())
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C"])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        c.start_server()?;
        c.create_database("torpor")?;
        Ok(c)
    }

    /// A cluster shared by every test of this process (started on first use, stopped and
    /// removed when the process exits).
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let c = PgCluster::start().expect("start the shared test PostgreSQL cluster");
            extern "C" fn at_exit() {
                if let Some(c) = SHARED.get() {
                    c.cleanup();
                }
            }
            // SAFETY: registers a plain function run at normal process exit.
            unsafe {
                libc::atexit(at_exit);
            }
            c
        })
    }

    /// A fresh database with a unique name in this cluster; returns its connection string.
    pub fn fresh_database(&self, tag: &str) -> io::Result<String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!("t_{tag}_{}", N.fetch_add(1, Ordering::Relaxed));
        self.create_database(&name)?;
        Ok(self.url(&name))
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.current_dir(&self.dir);
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.env("HOME", &self.dir).env("USER", "postgres");
        }
        cmd
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server's TCP port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        *self.port.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A `key=value` connection string for database `db` over TCP.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port()
        )
    }

    /// The same over the unix socket in the cluster's directory.
    pub fn socket_url(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.display(),
            self.port()
        )
    }

    /// Creates database `name`.
    pub fn create_database(&self, name: &str) -> io::Result<()> {
        let mut client = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .map_err(io::Error::other)?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .map_err(io::Error::other)
    }

    /// Starts the server (again, after [`PgCluster::stop`] or [`PgCluster::kill`]) and waits
    /// until it accepts connections. The first start picks a free port; a restart keeps it
    /// (URLs stay valid), retrying while the old server's resources are still being released.
    pub fn start_server(&self) -> io::Result<()> {
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
                .open(self.log_path())?;
            let mut child = self
                .command("postgres")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-k")
                .arg(&self.dir)
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
                .args(["-c", "max_connections=200", "-c", "shared_buffers=16MB"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            match self.wait_ready(&mut child, deadline) {
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
                    // The server exited: a port taken meanwhile, or the previous server's
                    // shared memory not yet released. Try again (a fresh port if it is ours
                    // to choose).
                }
            }
        }
    }

    fn wait_ready(&self, child: &mut Child, deadline: Instant) -> io::Result<()> {
        let url = self.url("postgres");
        let mut cfg: postgres::Config = url.parse().map_err(io::Error::other)?;
        cfg.connect_timeout(Duration::from_secs(2));
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let tail: String = log.lines().rev().take(10).collect::<Vec<_>>().join("\n");
                return Err(io::Error::other(format!(
                    "postgres exited ({status}) during start-up: {tail}"
                )));
            }
            if let Ok(mut c) = cfg.connect(postgres::NoTls) {
                if c.simple_query("SELECT 1").is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(
                    "postgres did not accept connections in time",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal_and_wait(&self, sig: libc::c_int) {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            // SAFETY: signals a child process this cluster started and has not reaped.
            unsafe {
                libc::kill(child.id() as libc::pid_t, sig);
                // A frozen server takes the signal once it runs again.
                libc::kill(child.id() as libc::pid_t, libc::SIGCONT);
            }
            let _ = child.wait();
        }
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: SIGQUIT to the postmaster, no
    /// checkpoint; committed data is recovered from the WAL at the next start).
    pub fn stop(&self) {
        self.signal_and_wait(libc::SIGQUIT);
    }

    /// Kills the postmaster (SIGKILL); its backends notice and exit.
    pub fn kill(&self) {
        self.signal_and_wait(libc::SIGKILL);
    }

    /// Freezes the postmaster (SIGSTOP): new connections are accepted by the kernel and never
    /// answered; connections already open keep working (their backends run on).
    pub fn freeze(&self) {
        self.signal_running(libc::SIGSTOP);
    }

    /// Lets a frozen postmaster run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal_running(libc::SIGCONT);
    }

    fn signal_running(&self, sig: libc::c_int) {
        if let Some(child) = self
            .child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            // SAFETY: signals a child process this cluster started and has not reaped.
            unsafe {
                libc::kill(child.id() as libc::pid_t, sig);
            }
        }
    }

    /// True while the server process runs.
    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn cleanup(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.cleanup();
    }
}
