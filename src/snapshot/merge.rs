//! `ember snapshot-merge --base BASE --diff DIFF`: writes the pages a Diff snapshot's
//! memory file holds onto the memory file of the snapshot it was taken after, so the
//! result restores with the Diff snapshot's state file (Firecracker ships the same as
//! `snapshot-editor edit-memory rebase`).
//!
//! A Diff memory file has the full size with only the written pages allocated; the rest
//! are holes. The pages are found with SEEK_DATA / SEEK_HOLE, so a written page of zeros
//! is copied like any other.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

pub const USAGE: &str = "usage: ember snapshot-merge --base BASE_MEMORY_FILE --diff DIFF_MEMORY_FILE\n\
Writes the pages of a Diff snapshot's memory file onto its base memory file (in place).\n";

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{0}")]
    Usage(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("the diff file is {diff} bytes and the base {base}: they are not of one VM")]
    SizeMismatch { base: u64, diff: u64 },
}

fn io(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> MergeError {
    let path = path.to_string();
    move |source| MergeError::Io { what, path, source }
}

/// lseek that reports ENXIO ("no more data") as None.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor owned by `file`; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// Copies every data extent of `diff` onto `base`; returns the bytes copied.
pub fn merge(base: &str, diff: &str) -> Result<u64, MergeError> {
    let d = File::open(diff).map_err(io("cannot open", diff))?;
    let b = OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(io("cannot open", base))?;
    let dlen = d.metadata().map_err(io("cannot stat", diff))?.len();
    let blen = b.metadata().map_err(io("cannot stat", base))?.len();
    if dlen != blen {
        return Err(MergeError::SizeMismatch {
            base: blen,
            diff: dlen,
        });
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    let mut at = 0u64;
    while at < dlen {
        let Some(start) = seek(&d, at, libc::SEEK_DATA).map_err(io("cannot read", diff))? else {
            break;
        };
        let end = seek(&d, start, libc::SEEK_HOLE)
            .map_err(io("cannot read", diff))?
            .unwrap_or(dlen)
            .min(dlen);
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            let chunk = &mut buf[..n];
            d.read_exact_at(chunk, pos)
                .map_err(io("cannot read", diff))?;
            b.write_all_at(chunk, pos)
                .map_err(io("cannot write", base))?;
            pos += n as u64;
        }
        copied += end - start;
        at = end;
    }
    b.sync_data().map_err(io("cannot sync", base))?;
    Ok(copied)
}

/// The subcommand: arguments after `snapshot-merge`.
pub fn run(args: &[String]) -> Result<u64, MergeError> {
    let mut base = None;
    let mut diff = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--base" => base = it.next().cloned(),
            "--diff" => diff = it.next().cloned(),
            other => return Err(MergeError::Usage(format!("unknown argument `{other}`"))),
        }
    }
    match (base, diff) {
        (Some(b), Some(d)) => merge(&b, &d),
        _ => Err(MergeError::Usage(
            "both --base and --diff are needed".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_written_pages_only() {
        let dir = std::env::temp_dir().join(format!("ember-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base").to_string_lossy().into_owned();
        let diff = dir.join("diff").to_string_lossy().into_owned();
        std::fs::write(&base, vec![1u8; 64 << 10]).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&diff)
            .unwrap();
        f.set_len(64 << 10).unwrap();
        f.write_all_at(&[0u8; 4096], 8192).unwrap();
        f.write_all_at(&[7u8; 4096], 32768).unwrap();
        drop(f);
        merge(&base, &diff).unwrap();
        let out = std::fs::read(&base).unwrap();
        assert_eq!(out[0], 1);
        assert_eq!(out[8192], 0, "a written page of zeros is merged too");
        assert_eq!(out[16384], 1);
        assert_eq!(out[32768], 7);
        std::fs::write(&diff, b"short").unwrap();
        assert!(matches!(
            merge(&base, &diff),
            Err(MergeError::SizeMismatch { .. })
        ));
        assert!(run(&["--base".into(), base.clone()]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
