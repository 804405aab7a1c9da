//! The API socket file's life: bound at start (replacing a stale one, refusing a live one
//! or anything that is not a socket) and removed at exit.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::ApiError;

/// Binds the API socket at `path`. A socket file left by a dead process is replaced; one
/// that a live process answers is an error, as is any other kind of file at `path`.
pub(super) fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let owned = || path.to_path_buf();
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(ApiError::NotASocket(owned())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiError::SocketInUse(owned())),
            // Nobody listens: the file is left over from a process that died.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                log::info!("replacing the stale API socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| ApiError::RemoveStale(owned(), e))?;
            }
            Err(e) => return Err(ApiError::Probe(owned(), e)),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(ApiError::Probe(owned(), e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| ApiError::Bind(owned(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ApiError::Bind(owned(), e))?;
    Ok(listener)
}

/// Removes the API socket at exit. Only a socket is removed, and a missing one is fine.
pub fn remove_socket(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("cannot remove the API socket {}: {e}", path.display());
            }
        }
        Ok(_) => log::warn!("{} is no longer a socket; left in place", path.display()),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot check the API socket {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("ember-sock-{}-{tag}", std::process::id()))
    }

    #[test]
    fn live_stale_and_foreign_files() {
        // A live socket is refused.
        let live = temp_path("live");
        let _ = std::fs::remove_file(&live);
        let listener = bind(&live).unwrap();
        assert!(matches!(bind(&live), Err(ApiError::SocketInUse(_))));
        drop(listener);

        // Its listener is gone: the file is stale and replaced.
        assert!(live.exists());
        let again = bind(&live).unwrap();
        assert!(UnixStream::connect(&live).is_ok());
        drop(again);
        remove_socket(&live);
        assert!(!live.exists());
        // Removing a missing socket is fine.
        remove_socket(&live);

        // Anything else is left alone.
        let file = temp_path("file");
        std::fs::write(&file, "precious").unwrap();
        let e = bind(&file).unwrap_err();
        assert!(matches!(e, ApiError::NotASocket(_)), "{e}");
        remove_socket(&file);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
        std::fs::remove_file(&file).unwrap();
    }
}
