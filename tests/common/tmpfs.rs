//! A tmpfs mounted for one test (a disk that can be filled), for the store-fault tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::temp_dir;

/// A tmpfs mounted for one test; unmounted on drop (also when the test panics).
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "20m"). `None` when this machine cannot mount (not
    /// root, no privilege): the caller skips, except under CI where it must work.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = temp_dir("tmpfs");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir)),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                let _ = std::fs::remove_dir(&dir);
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("CI=true but a tmpfs cannot be mounted: {why}");
                }
                eprintln!("SKIPPED: cannot mount a tmpfs here ({why}); run as root");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds it (a daemon not reaped yet): detach it lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Fills the filesystem of `dir` with one file until the disk is full; returns its path.
pub fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0xa5u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(n) if n == chunk => continue,
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    let _ = f.sync_all();
    path
}
