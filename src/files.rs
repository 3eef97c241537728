//! Durable files and their digests, the one way every part of the program writes what must
//! survive a crash (checkpoints, run configs, datasets, model versions): write under a temporary
//! name, fsync the file, rename it into place, fsync the folder (whose entry list is data too).
//! A reader sees the old file or the new one, never half of one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Writes `bytes` to `path` durably (see the module documentation).
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_durably(path, |tmp| {
        let mut file = File::create(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// Lets `write` create the file at a temporary path next to `path`, then fsyncs it, renames it
/// over `path` and fsyncs the folder. On any error the temporary file is removed.
pub fn replace_durably(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary_path(path);
    let result = write(&tmp).and_then(|()| commit(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Fsyncs the finished file `tmp`, renames it to `path` and fsyncs the folder.
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
    File::open(tmp).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", tmp.display()))?;
    std::fs::rename(tmp, path).with_context(|| format!("cannot move {} into place", path.display()))?;
    sync_dir(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Makes renames and new entries in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync the folder {}", dir.display()))
}

/// `path` with `.tmp` appended to its file name.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Lowercase hexadecimal of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, as lowercase hexadecimal.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Size and SHA-256 (lowercase hexadecimal) of a file, read in a stream.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok((bytes, hex(&hasher.finalize())))
}

/// Whether `path` was last modified at least `age` ago (false when that cannot be read, except
/// that a zero age is always true).
pub fn older_than(path: &Path, age: std::time::Duration) -> bool {
    if age.is_zero() {
        return true;
    }
    std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .is_some_and(|elapsed| elapsed >= age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_inputs() -> Result<()> {
        // FIPS 180-2 test vectors.
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc")?;
        assert_eq!(sha256_file(&path)?, (3, sha256_hex(b"abc")));
        Ok(())
    }

    #[test]
    fn durable_writes_replace_whole_files_and_leave_nothing_on_failure() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state.json");
        write_durably(&path, b"one")?;
        write_durably(&path, b"two")?;
        assert_eq!(std::fs::read(&path)?, b"two");
        let err = replace_durably(&path, |tmp| {
            std::fs::write(tmp, b"half")?;
            anyhow::bail!("interrupted")
        })
        .unwrap_err();
        assert!(err.to_string().contains("interrupted"));
        assert_eq!(std::fs::read(&path)?, b"two", "the old file stays");
        let names: Vec<_> = std::fs::read_dir(dir.path())?.map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")], "no temporary file left");
        Ok(())
    }
}
