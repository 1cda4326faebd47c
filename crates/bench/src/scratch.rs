//! Where a scenario keeps its databases.

use std::path::PathBuf;

/// A scenario's own directory under the system's temporary directory, removed when dropped; kept
/// when `SOCIALCARD_BENCH_KEEP` is set, to look at the databases afterwards.
pub struct Dir(pub PathBuf);

impl Dir {
    /// Creates `socialcard-bench-<name>-<uuid>`.
    pub fn new(name: &str) -> std::io::Result<Self> {
        let dir = Self(std::env::temp_dir().join(format!("socialcard-bench-{name}-{}", uuid::Uuid::new_v4().simple())));
        std::fs::create_dir_all(&dir.0)?;
        Ok(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if std::env::var_os("SOCIALCARD_BENCH_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
