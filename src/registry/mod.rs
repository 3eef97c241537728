//! The model repository: `root/<name>/<version>/` folders, each a complete model (see
//! [`manifest`]). Versions are positive integers; a version is published by writing it under a
//! hidden temporary name, syncing it to disk and renaming it into place, so readers see either no
//! version or a complete one.

pub mod input;
pub mod manifest;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Context, Result};

pub use manifest::{Manifest, MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE};

/// A file in the repository's root naming the model that requests without a model name get.
pub const DEFAULT_MODEL_FILE: &str = ".default-model";

/// [`ModelRepository::resolve`]'s error for a model or version the repository does not have.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotInRepository(pub String);

/// Prefix of in-progress publications; hidden from listings.
const STAGING_PREFIX: &str = ".staging-";

/// Called with the model name and version after each publish.
type PublishListener = Box<dyn Fn(&str, u64) + Send + Sync>;

/// A model repository; clones share their publish listeners.
#[derive(Clone)]
pub struct ModelRepository {
    root: PathBuf,
    listeners: Arc<Mutex<Vec<PublishListener>>>,
}

impl std::fmt::Debug for ModelRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRepository").field("root", &self.root).finish_non_exhaustive()
    }
}

/// Model names become folder names and appear in URLs and metrics labels.
pub fn validate_model_name(name: &str) -> Result<()> {
    let valid_chars =
        name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    let starts_well = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    ensure!(
        !name.is_empty() && name.len() <= 64 && valid_chars && starts_well,
        "invalid model name {name:?}: use 1–64 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
    );
    Ok(())
}

impl ModelRepository {
    /// A repository rooted at `root` (which need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), listeners: Arc::default() }
    }

    /// Calls `listener` after every version this repository value (or a clone) publishes, so
    /// that a server in the same process serves it at once rather than at its next scan.
    pub fn on_publish(&self, listener: impl Fn(&str, u64) + Send + Sync + 'static) {
        self.listeners.lock().expect("listeners lock").push(Box::new(listener));
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The model named by the repository's [`DEFAULT_MODEL_FILE`], when it names a valid one.
    pub fn default_model_marker(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.root.join(DEFAULT_MODEL_FILE)).ok()?;
        let name = text.trim();
        match validate_model_name(name) {
            Ok(()) => Some(name.to_string()),
            Err(error) => {
                tracing::warn!(%error, "{} ignored", self.root.join(DEFAULT_MODEL_FILE).display());
                None
            }
        }
    }

    pub fn version_dir(&self, name: &str, version: u64) -> PathBuf {
        self.root.join(name).join(version.to_string())
    }

    /// Model names, sorted; a missing root is an empty repository.
    pub fn model_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot list the model repository {}", self.root.display()))
            }
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() && validate_model_name(&name).is_ok() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Published versions of `name`, ascending; staging folders and other entries are ignored.
    pub fn versions(&self, name: &str) -> Result<Vec<u64>> {
        let dir = self.root.join(name);
        let mut versions = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(versions),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        for entry in entries {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(text) = file_name.to_str() else { continue };
            // Canonical positive integers only: "01" or "+1" would alias "1".
            if let Ok(v) = text.parse::<u64>() {
                if v > 0 && v.to_string() == text && entry.file_type()?.is_dir() {
                    versions.push(v);
                }
            }
        }
        versions.sort_unstable();
        Ok(versions)
    }

    pub fn next_version(&self, name: &str) -> Result<u64> {
        Ok(self.versions(name)?.last().map_or(1, |v| v + 1))
    }

    pub fn manifest(&self, name: &str, version: u64) -> Result<Manifest> {
        Manifest::load(&self.version_dir(name, version).join(MANIFEST_FILE))
    }

    /// The version of `name` that fine-tune job `job_id` published, if it published one.
    pub fn version_published_by(&self, name: &str, job_id: &str) -> Result<Option<u64>> {
        for version in self.versions(name)? {
            if self.manifest(name, version).is_ok_and(|m| m.fine_tune_job.as_deref() == Some(job_id)) {
                return Ok(Some(version));
            }
        }
        Ok(None)
    }

    /// The version a request names (0: the newest) with its manifest, once the manifest loads,
    /// describes that version and every file matches its recorded digest. With 0, versions that
    /// fail these checks are skipped for older ones. A model or version the repository lacks is a
    /// [`NotInRepository`] error (callers answer NOT_FOUND); one it has but cannot use is another.
    pub fn resolve(&self, name: &str, version: u64) -> Result<(u64, Manifest)> {
        let versions = self.versions(name)?;
        if versions.is_empty() {
            let names = self.model_names()?;
            if names.iter().any(|n| n == name) {
                return Err(NotInRepository(format!("model {name:?} has no version")).into());
            }
            let message = format!("model {name:?} is not in the repository (available: {})", names.join(", "));
            return Err(NotInRepository(message).into());
        }
        if version != 0 {
            if !versions.contains(&version) {
                let listed = versions.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
                let message = format!("model {name:?} has no version {version} (versions: {listed})");
                return Err(NotInRepository(message).into());
            }
            return Ok((version, self.verified_manifest(name, version)?));
        }
        let mut refused = Vec::new();
        for &v in versions.iter().rev() {
            match self.verified_manifest(name, v) {
                Ok(manifest) => return Ok((v, manifest)),
                Err(error) => refused.push(format!("version {v}: {error:#}")),
            }
        }
        bail!("model {name:?} has no intact version ({})", refused.join("; "))
    }

    pub fn verified_manifest(&self, name: &str, version: u64) -> Result<Manifest> {
        let manifest = self.manifest(name, version)?;
        ensure!(
            manifest.name == name && manifest.version == version,
            "the manifest describes {} version {}",
            manifest.name,
            manifest.version
        );
        manifest.verify_files(&self.version_dir(name, version))?;
        Ok(manifest)
    }

    /// Publishes a version of `name`: `version`, or the next one when `None`. `write` fills the
    /// staging folder it is given (with the version number it will get); when it succeeds, the
    /// folder is synced and renamed into place. On any error nothing becomes visible.
    pub fn publish(
        &self,
        name: &str,
        version: Option<u64>,
        write: impl FnOnce(&Path, u64) -> Result<()>,
    ) -> Result<u64> {
        validate_model_name(name)?;
        if self.root.exists() && !self.root.is_dir() {
            bail!("the model repository {} is not a folder", self.root.display());
        }
        let model_dir = self.root.join(name);
        std::fs::create_dir_all(&model_dir).with_context(|| format!("cannot create {}", model_dir.display()))?;
        let version = match version {
            Some(0) => bail!("versions are positive integers; 0 is not one"),
            Some(v) => v,
            None => self.next_version(name)?,
        };
        let target = self.version_dir(name, version);
        if target.exists() {
            bail!("{name} version {version} already exists at {}; versions are never overwritten", target.display());
        }
        let staging = model_dir.join(format!("{STAGING_PREFIX}{version}-{}-{}", std::process::id(), unique_suffix()));
        std::fs::create_dir(&staging)
            .with_context(|| format!("cannot write to the model repository at {}", model_dir.display()))?;
        let result = write(&staging, version).and_then(|()| sync_tree(&staging)).and_then(|()| {
            // rename(2) fails on a non-empty target, so a racing publisher cannot be overwritten.
            std::fs::rename(&staging, &target)
                .with_context(|| format!("cannot move the new version into place at {}", target.display()))?;
            crate::files::sync_dir(&model_dir)
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result?;
        for listener in self.listeners.lock().expect("listeners lock").iter() {
            listener(name, version);
        }
        Ok(version)
    }

    /// Removes staging folders left by publishers that were killed (their process is gone) and
    /// last changed at least `min_age` ago. Servers on other machines sharing the repository
    /// have process ids this one cannot see: they need a `min_age` longer than any publish.
    pub fn remove_abandoned_staging(&self, min_age: std::time::Duration) -> Result<usize> {
        let mut removed = 0;
        for name in self.model_names()? {
            let Ok(entries) = std::fs::read_dir(self.root.join(&name)) else { continue };
            for entry in entries.flatten() {
                let file_name = entry.file_name().to_string_lossy().into_owned();
                let Some(rest) = file_name.strip_prefix(STAGING_PREFIX) else { continue };
                let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                if !alive
                    && crate::files::older_than(&entry.path(), min_age)
                    && std::fs::remove_dir_all(entry.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Makes every file of `dir` world-readable (servers may run as another user), fsyncs each, then
/// `dir` itself.
fn sync_tree(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644))?;
            std::fs::File::open(entry.path())?
                .sync_all()
                .with_context(|| format!("cannot sync {}", entry.path().display()))?;
        }
    }
    crate::files::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_file(dir: &Path, name: &str) -> Result<()> {
        Ok(std::fs::write(dir.join(name), b"x")?)
    }

    #[test]
    fn versions_count_up_from_one() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let repo = ModelRepository::new(tmp.path().join("models"));
        assert_eq!(repo.versions("m")?, Vec::<u64>::new());
        assert_eq!(repo.publish("m", None, |d, _| write_file(d, "a"))?, 1);
        assert_eq!(repo.publish("m", None, |d, _| write_file(d, "a"))?, 2);
        assert_eq!(repo.publish("m", Some(7), |d, _| write_file(d, "a"))?, 7);
        assert_eq!(repo.publish("m", None, |d, v| write_file(d, &v.to_string()))?, 8);
        assert!(repo.version_dir("m", 8).join("8").is_file());
        assert_eq!(repo.versions("m")?, vec![1, 2, 7, 8]);
        assert_eq!(repo.model_names()?, vec!["m".to_string()]);
        Ok(())
    }

    #[test]
    fn listing_ignores_staging_and_non_canonical_names() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let repo = ModelRepository::new(tmp.path());
        for dir in ["m/3", "m/01", "m/0", "m/x", "m/.staging-4-1-1"] {
            std::fs::create_dir_all(tmp.path().join(dir))?;
        }
        std::fs::write(tmp.path().join("m/5"), b"a file, not a version")?;
        assert_eq!(repo.versions("m")?, vec![3]);
        assert_eq!(repo.next_version("m")?, 4);
        Ok(())
    }

    #[test]
    fn a_failed_write_leaves_no_version_and_no_staging() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let repo = ModelRepository::new(tmp.path());
        let err = repo
            .publish("m", None, |d, _| {
                write_file(d, "model.onnx")?;
                bail!("parity failed")
            })
            .unwrap_err();
        assert!(err.to_string().contains("parity failed"));
        assert_eq!(repo.versions("m")?, Vec::<u64>::new());
        assert_eq!(std::fs::read_dir(tmp.path().join("m"))?.count(), 0, "staging folder removed");
        Ok(())
    }

    #[test]
    fn an_interrupted_publish_is_invisible_and_cleaned_later() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let repo = ModelRepository::new(tmp.path());
        repo.publish("m", None, |d, _| write_file(d, "a"))?;
        // What a publisher killed before its rename leaves behind (pid 0 is never a live process).
        let leftover = tmp.path().join("m/.staging-2-0-123");
        std::fs::create_dir(&leftover)?;
        write_file(&leftover, "model.onnx")?;
        assert_eq!(repo.versions("m")?, vec![1]);
        assert_eq!(repo.next_version("m")?, 2);
        assert_eq!(repo.remove_abandoned_staging(std::time::Duration::from_secs(3600))?, 0, "too recent");
        assert_eq!(repo.remove_abandoned_staging(std::time::Duration::ZERO)?, 1);
        assert!(!leftover.exists());
        Ok(())
    }

    #[test]
    fn refuses_existing_versions_bad_names_and_unusable_roots() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let repo = ModelRepository::new(tmp.path());
        repo.publish("m", Some(1), |d, _| write_file(d, "a"))?;
        let err = repo.publish("m", Some(1), |d, _| write_file(d, "b")).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read(repo.version_dir("m", 1).join("a"))?, b"x");
        for bad in ["", "Upper", "../escape", "a/b", ".hidden", &"x".repeat(65)] {
            assert!(repo.publish(bad, None, |d, _| write_file(d, "a")).is_err(), "{bad:?}");
        }
        assert!(repo.publish("m", Some(0), |d, _| write_file(d, "a")).is_err());

        let file_root = tmp.path().join("not-a-folder");
        std::fs::write(&file_root, b"")?;
        let err = ModelRepository::new(&file_root).publish("m", None, |d, _| write_file(d, "a")).unwrap_err();
        assert!(err.to_string().contains("is not a folder"), "{err}");
        Ok(())
    }
}
