//! The socket's file and the directories the daemon trusts: binding the socket privately,
//! telling a live daemon's socket from a stale one, and removing only our own on the way
//! out. Serving connections is `server`'s.
use super::DaemonError;
use crate::handoff::protocol;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Refuses `dir` unless it is owned by this process's user and writable by nobody else:
/// whoever can write there can plant files the daemon trusts (spooled paths it signs and
/// uploads, or a socket the hook talks to).
pub(super) fn check_private_dir(what: &'static str, dir: &Path) -> Result<(), DaemonError> {
    let meta = std::fs::metadata(dir).map_err(|source| DaemonError::StateDir {
        path: dir.to_owned(),
        source,
    })?;
    let me = rustix::process::geteuid().as_raw();
    let why = if meta.uid() != me {
        format!(
            "owned by uid {}, not by the daemon's uid {me}; chown it, or use another",
            meta.uid()
        )
    } else if meta.mode() & 0o022 != 0 {
        format!(
            "writable by group or others (mode {:o}); chmod go-w it, or use another",
            meta.mode() & 0o7777
        )
    } else {
        return Ok(());
    };
    Err(DaemonError::Unsafe {
        what,
        path: dir.to_owned(),
        why,
    })
}

/// Removes the socket at `path` only if it is the one we bound (`id`): another daemon may
/// have bound the path since.
pub(super) fn remove_socket_if_ours(path: &Path, id: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == id => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => tracing::info!(
            "{}: the socket is another's now; left in place",
            path.display()
        ),
        Err(_) => {}
    }
}

/// Binds the socket at `path` with mode 0600 (0660 and group `group` when given),
/// replacing a stale socket file but never a live daemon's (one that accepts, or whose
/// backlog is full because it is busy or stopped). Returns the listener and the socket's
/// (device, inode).
pub(super) fn bind_socket(
    path: &Path,
    group: Option<u32>,
) -> Result<(std::os::unix::net::UnixListener, (u64, u64)), DaemonError> {
    let err = |source| DaemonError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(err)?;
        check_private_dir("socket directory", parent)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if protocol::is_listening(path).map_err(err)? {
            return Err(DaemonError::SocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // The umask makes the socket private from the moment it exists; the process has no
    // other threads yet, so no other file is created under it.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.map_err(err)?;
    if let Some(gid) = group {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    }
    let m = std::fs::symlink_metadata(path).map_err(err)?;
    Ok((listener, (m.dev(), m.ino())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_directories_are_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_private_dir("state directory", &open).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("writable by group or others (mode 775)"),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1);
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_private_dir("state directory", &open).is_ok());
    }
}
