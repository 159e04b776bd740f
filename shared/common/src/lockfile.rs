//! Files whose OS lock (`flock`) stands for something shared between
//! processes: a store object, a database file, a data directory.

use std::{fs::File, path::Path};

/// Opens the lock file at `path`: created when missing, readable and
/// writable by its owner only, never truncated (its content is nothing;
/// its lock is everything). Blocking: call it at start-up or in the
/// blocking pool.
pub fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    #[expect(clippy::disallowed_methods, reason = "callers run it at start-up or in spawn_blocking")]
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)
}
