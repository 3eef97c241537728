//! The loaded side of the model repository. A scan (at start, then every poll interval) loads
//! newly published versions, keeps the newest `keep_versions` that load, and unloads the rest;
//! a version that fails to load is refused with a logged error and the previous one keeps
//! serving. An unloaded version's batcher finishes its queued work before its thread ends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};

use super::batcher::{Batcher, BatcherConfig};
use crate::metrics;
use crate::registry::{Manifest, ModelRepository, MODEL_FILE};
use crate::runtime::{OnnxEncoder, Provider, SessionOptions};

/// A version ready to serve.
pub struct LoadedVersion {
    pub name: String,
    pub version: u64,
    pub manifest: Manifest,
    pub provider: Provider,
    pub batcher: Batcher,
}

#[derive(Clone)]
pub enum VersionStatus {
    Ready(Arc<LoadedVersion>),
    /// Refused; the reason is logged and reported by GetModel. Retried when the version's files
    /// change (an operator fixed them), not before.
    Failed {
        reason: String,
        files: FilesFingerprint,
    },
}

/// Names, sizes and modification times of a version folder's files: what changes when someone
/// repairs a refused version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesFingerprint(Vec<(String, u64, Option<std::time::SystemTime>)>);

impl FilesFingerprint {
    fn of(dir: &std::path::Path) -> Self {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let meta = e.metadata().ok()?;
                        Some((e.file_name().to_string_lossy().into_owned(), meta.len(), meta.modified().ok()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        Self(files)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub session: SessionOptions,
    pub batcher: BatcherConfig,
    /// How many of the newest loadable versions of each model stay loaded.
    pub keep_versions: usize,
}

/// Why a request's model cannot be used; becomes NOT_FOUND.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LookupError {
    #[error("no model is loaded yet")]
    NoModels,
    #[error("model {name:?} is not in the repository (available: {available})")]
    UnknownModel { name: String, available: String },
    #[error("model {name:?} has no ready version")]
    NoReadyVersion { name: String },
    #[error("version {version} of {name:?} is not loaded (loaded: {loaded})")]
    UnknownVersion { name: String, version: u64, loaded: String },
    #[error("version {version} of {name:?} was refused: {reason}")]
    FailedVersion { name: String, version: u64, reason: String },
}

pub struct ModelStore {
    repository: ModelRepository,
    options: LoadOptions,
    /// The model a request that names none gets (see [`ModelStore::default_model`]).
    default: Mutex<Option<String>>,
    models: Mutex<BTreeMap<String, BTreeMap<u64, VersionStatus>>>,
    /// One scan at a time (the poller, and a fine-tune job that has just published).
    scanning: Mutex<()>,
}

impl ModelStore {
    /// `default_model` is the operator's choice (`--default-model`); without one, the
    /// repository's marker file names it, else the first model by name with a ready version at
    /// the first scan that finds one is pinned for the life of the process.
    pub fn new(repository: ModelRepository, options: LoadOptions, default_model: Option<String>) -> Self {
        let configured = default_model.or_else(|| repository.default_model_marker());
        Self {
            repository,
            options,
            default: Mutex::new(configured),
            models: Mutex::new(BTreeMap::new()),
            scanning: Mutex::new(()),
        }
    }

    pub fn repository(&self) -> &ModelRepository {
        &self.repository
    }

    /// The model an empty name means. It is explicit or pinned, never chosen per request, so a
    /// new folder in the repository (a fine-tune's output model, an empty `mkdir`) cannot take it
    /// over, and a model without a ready version never becomes it by default.
    pub fn default_model(&self) -> Option<String> {
        self.default.lock().expect("default lock").clone()
    }

    /// Pins the first model by name that has a ready version, when no default is pinned yet.
    fn pin_default(&self) {
        let mut default = self.default.lock().expect("default lock");
        if default.is_some() {
            return;
        }
        let models = self.models.lock().expect("models lock");
        let ready = models.iter().find(|(_, versions)| versions.values().any(|s| matches!(s, VersionStatus::Ready(_))));
        if let Some((name, _)) = ready {
            tracing::info!(model = %name, "default model (the first ready model by name; --default-model sets another)");
            *default = Some(name.clone());
        }
    }

    /// Ready versions across all models.
    pub fn ready_count(&self) -> usize {
        let models = self.models.lock().expect("models lock");
        models.values().flat_map(|v| v.values()).filter(|s| matches!(s, VersionStatus::Ready(_))).count()
    }

    /// Every model with each version's status, by name and version.
    pub fn snapshot(&self) -> BTreeMap<String, BTreeMap<u64, VersionStatus>> {
        self.models.lock().expect("models lock").clone()
    }

    /// The version a request asks for: `name` ("" = default), `version` (0 = latest ready).
    pub fn resolve(&self, name: &str, version: u64) -> Result<Arc<LoadedVersion>, LookupError> {
        let name = if name.is_empty() { self.default_model().ok_or(LookupError::NoModels)? } else { name.to_string() };
        let models = self.models.lock().expect("models lock");
        let Some(versions) = models.get(&name) else {
            let available = models.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(LookupError::UnknownModel { name, available });
        };
        let ready = |s: &VersionStatus| match s {
            VersionStatus::Ready(loaded) => Some(loaded.clone()),
            VersionStatus::Failed { .. } => None,
        };
        if version == 0 {
            return versions.values().rev().find_map(ready).ok_or(LookupError::NoReadyVersion { name });
        }
        match versions.get(&version) {
            Some(VersionStatus::Ready(loaded)) => Ok(loaded.clone()),
            Some(VersionStatus::Failed { reason, .. }) => {
                Err(LookupError::FailedVersion { name, version, reason: reason.clone() })
            }
            None => {
                let loaded = versions
                    .iter()
                    .filter(|(_, s)| ready(s).is_some())
                    .map(|(v, _)| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                Err(LookupError::UnknownVersion { name, version, loaded })
            }
        }
    }

    /// Brings the loaded set in line with the repository. Returns the number of ready versions.
    /// Loading happens outside the lock, so requests keep flowing during a scan.
    pub fn scan(&self) -> Result<usize> {
        let _scanning = self.scanning.lock().expect("scan lock");
        let names = self.repository.model_names()?;
        for name in &names {
            let on_disk = match self.repository.versions(name) {
                Ok(versions) => versions,
                Err(error) => {
                    tracing::warn!(model = %name, %error, "cannot list versions");
                    continue;
                }
            };
            self.sync_model(name, &on_disk);
        }
        // Models whose folder disappeared.
        let mut models = self.models.lock().expect("models lock");
        let gone: Vec<String> = models.keys().filter(|n| !names.contains(n)).cloned().collect();
        for name in gone {
            tracing::info!(model = %name, "model removed from the repository; unloading");
            for (version, status) in models.remove(&name).unwrap_or_default() {
                unloaded(&name, version, &status);
            }
        }
        drop(models);
        self.pin_default();
        let ready = self.ready_count();
        metrics::models_loaded(ready);
        Ok(ready)
    }

    /// Whether the default model has a ready version: what health reports as SERVING.
    pub fn default_ready(&self) -> bool {
        let Some(name) = self.default_model() else { return false };
        let models = self.models.lock().expect("models lock");
        models.get(&name).is_some_and(|versions| versions.values().any(|s| matches!(s, VersionStatus::Ready(_))))
    }

    fn sync_model(&self, name: &str, on_disk: &[u64]) {
        let known = self.models.lock().expect("models lock").get(name).cloned().unwrap_or_default();
        let mut next: BTreeMap<u64, VersionStatus> = BTreeMap::new();
        let mut ready = 0;
        // Newest first, until keep_versions have loaded.
        for &version in on_disk.iter().rev() {
            if ready == self.options.keep_versions {
                break;
            }
            let status = match known.get(&version) {
                Some(VersionStatus::Failed { files, .. })
                    if *files != FilesFingerprint::of(&self.repository.version_dir(name, version)) =>
                {
                    tracing::info!(model = name, version, "a refused version's files changed; loading it again");
                    self.load(name, version)
                }
                Some(status) => status.clone(),
                None => self.load(name, version),
            };
            if matches!(status, VersionStatus::Ready(_)) {
                ready += 1;
            }
            next.insert(version, status);
        }
        let mut models = self.models.lock().expect("models lock");
        for (version, status) in &known {
            if !next.contains_key(version) {
                unloaded(name, *version, status);
            }
        }
        models.insert(name.to_string(), next);
    }

    fn load(&self, name: &str, version: u64) -> VersionStatus {
        match self.try_load(name, version) {
            Ok(loaded) => {
                tracing::info!(model = name, version, provider = %loaded.provider, "version ready");
                metrics::model_version(name, version, &loaded.provider.to_string(), true);
                VersionStatus::Ready(Arc::new(loaded))
            }
            Err(error) => {
                let dir = self.repository.version_dir(name, version);
                tracing::error!(model = name, version, reason = %format!("{error:#}"), "version refused; earlier versions keep serving");
                // Clients see the version's own name for its folder, not the server's paths.
                let reason = format!("{error:#}").replace(&dir.display().to_string(), &format!("{name}/{version}"));
                VersionStatus::Failed { reason, files: FilesFingerprint::of(&dir) }
            }
        }
    }

    fn try_load(&self, name: &str, version: u64) -> Result<LoadedVersion> {
        let dir = self.repository.version_dir(name, version);
        let manifest = self.repository.verified_manifest(name, version)?;
        let mut encoder = OnnxEncoder::load(&dir.join(MODEL_FILE), self.options.session)?;
        // One real run before serving: catches a graph that loads but cannot execute.
        let dims = manifest.image_dims();
        let (_, width) = encoder.run(&vec![0.5; dims.iter().product()], 1, dims).context("a test inference failed")?;
        ensure!(
            width == manifest.output.dimensions,
            "the model returns {width}-d embeddings, its manifest says {}",
            manifest.output.dimensions
        );
        let provider = encoder.provider();
        let batcher = Batcher::start(format!("{name}:{version}"), encoder, dims, self.options.batcher);
        Ok(LoadedVersion { name: name.to_string(), version, manifest, provider, batcher })
    }

    /// Unloads everything; each batcher drains its queue as its last reference goes.
    pub fn clear(&self) {
        let models = std::mem::take(&mut *self.models.lock().expect("models lock"));
        for (name, versions) in models {
            for (version, status) in versions {
                unloaded(&name, version, &status);
            }
        }
        metrics::models_loaded(0);
    }
}

fn unloaded(name: &str, version: u64, status: &VersionStatus) {
    if let VersionStatus::Ready(loaded) = status {
        tracing::info!(model = name, version, "version unloaded (in-flight requests finish first)");
        metrics::model_version(name, version, &loaded.provider.to_string(), false);
    }
}
