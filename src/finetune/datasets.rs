//! Uploaded datasets on disk: one checksummed file per dataset, written atomically.
//!
//! A dataset is `<root>/<id>.ds`, written under a temporary name, synced and renamed into place,
//! so a crash never leaves a half-written file under a dataset's name. The file format, all
//! integers little-endian:
//!
//! ```text
//! magic  b"CTRDSET\0"  (8 bytes)
//! version u32 = 1
//! per image, until the end of the file:
//!     u32 label length, label bytes (UTF-8)
//!     u32 image length, image bytes (the encoded PNG/JPEG as uploaded)
//! ```
//!
//! The SHA-256 over the whole file is kept in the dataset's record; `load` checks it, so a job
//! never trains on a file that changed after it was uploaded. Image bytes are not decoded here:
//! the job runner validates them, and this module only enforces sizes and labels.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use super::store::DatasetRecord;
use crate::registry::manifest::now_rfc3339;

const MAGIC: &[u8; 8] = b"CTRDSET\0";
const FORMAT_VERSION: u32 = 1;
const EXTENSION: &str = "ds";
/// Image file endings read from a server folder (compared case-insensitively).
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// A dataset over one of its [`DatasetLimits`] (the server answers RESOURCE_EXHAUSTED).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LimitExceeded(pub String);

/// What one dataset may hold; every upload and server folder is checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetLimits {
    pub max_images: usize,
    pub max_image_bytes: usize,
    /// Over all image bytes (labels and framing not counted).
    pub max_total_bytes: u64,
    pub max_label_bytes: usize,
}

impl Default for DatasetLimits {
    fn default() -> Self {
        Self { max_images: 10_000, max_image_bytes: 4 << 20, max_total_bytes: 512 << 20, max_label_bytes: 128 }
    }
}

/// One encoded image and its class label.
#[derive(Clone, PartialEq, Eq)]
pub struct LabeledImage {
    pub bytes: Vec<u8>,
    pub label: String,
}

impl std::fmt::Debug for LabeledImage {
    /// The label and the size: the bytes themselves would flood a test failure.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LabeledImage {{ label: {:?}, bytes: {} }}", self.label, self.bytes.len())
    }
}

/// The folder of dataset files.
#[derive(Debug, Clone)]
pub struct DatasetStore {
    root: PathBuf,
    limits: DatasetLimits,
}

impl DatasetStore {
    pub fn new(root: impl Into<PathBuf>, limits: DatasetLimits) -> Self {
        Self { root: root.into(), limits }
    }

    pub fn limits(&self) -> &DatasetLimits {
        &self.limits
    }

    /// Removes the temporary files of uploads that a killed server left unfinished and that last
    /// changed at least `min_age` ago; returns how many. Call before the server accepts uploads
    /// (every temporary file is a leftover then, unless other servers share the folder: they
    /// need a `min_age` past which an upload in progress has surely written again).
    pub fn remove_unfinished_uploads(&self, min_age: std::time::Duration) -> Result<usize> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", self.root.display())),
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let leftover = name.starts_with('.') && name.ends_with(&format!(".{EXTENSION}.partial"));
            if leftover && crate::files::older_than(&entry.path(), min_age) {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("cannot remove {}", entry.path().display()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Starts a streamed upload (the gRPC UploadDataset handler feeds chunks into it).
    pub fn begin(&self, name: &str) -> Result<DatasetWriter> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating the dataset folder {}", self.root.display()))?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let temp_path = self.root.join(format!(".{id}.{EXTENSION}.partial"));
        let final_path = self.root.join(format!("{id}.{EXTENSION}"));
        let file = File::create_new(&temp_path)
            .with_context(|| format!("creating the dataset file {}", temp_path.display()))?;
        let mut writer = DatasetWriter {
            id,
            name: name.to_owned(),
            tally: Tally::new(self.limits.clone()),
            temp_path,
            final_path,
            file: Some(BufWriter::new(file)),
            hasher: Sha256::new(),
            failed: None,
        };
        writer.put(MAGIC)?;
        writer.put(&FORMAT_VERSION.to_le_bytes())?;
        Ok(writer)
    }

    /// Reads a dataset back, verifying size and SHA-256 against the record (a mismatch is an error naming the file).
    pub fn load(&self, record: &DatasetRecord) -> Result<Vec<LabeledImage>> {
        let path = &record.path;
        let bytes = std::fs::read(path).with_context(|| format!("reading the dataset file {}", path.display()))?;
        let sha256 = crate::files::sha256_hex(&bytes);
        if sha256 != record.sha256 {
            bail!(
                "dataset file {} is corrupt: its SHA-256 is {sha256}, the record of dataset {} says {}",
                path.display(),
                record.id,
                record.sha256
            );
        }
        let images = parse(&bytes).with_context(|| format!("reading the dataset file {}", path.display()))?;
        if images.len() as u64 != record.size {
            bail!(
                "dataset file {} holds {} images, the record of dataset {} says {}",
                path.display(),
                images.len(),
                record.id,
                record.size
            );
        }
        let class_counts = count_classes(&images);
        if class_counts != record.class_counts {
            bail!(
                "dataset file {} holds classes {class_counts:?}, the record of dataset {} says {:?}",
                path.display(),
                record.id,
                record.class_counts
            );
        }
        Ok(images)
    }

    /// Convenience: begin + add all + finish.
    pub fn save(&self, name: &str, images: &[LabeledImage]) -> Result<DatasetRecord> {
        let mut writer = self.begin(name)?;
        for image in images {
            writer.add(&image.bytes, &image.label)?;
        }
        writer.finish()
    }
}

/// A dataset being written. Dropping an unfinished writer removes its temporary file.
pub struct DatasetWriter {
    id: String,
    name: String,
    tally: Tally,
    temp_path: PathBuf,
    final_path: PathBuf,
    /// `None` once finished.
    file: Option<BufWriter<File>>,
    /// Over every byte written so far, i.e. the whole file once finished.
    hasher: Sha256,
    /// Set when a write failed part-way: the file is then unusable and `finish` refuses it.
    failed: Option<String>,
}

impl DatasetWriter {
    /// Appends one image; refuses (with a precise message naming the limit and the value) an empty image, an empty or
    /// too-long label, an image over max_image_bytes, or going over max_images / max_total_bytes.
    /// A refused image leaves the writer as it was, so the caller may report it and stop or go on.
    pub fn add(&mut self, image: &[u8], label: &str) -> Result<()> {
        self.tally.check(image.len() as u64, label)?;
        // The limits are usize, but the format frames lengths as u32.
        let label_len =
            u32::try_from(label.len()).map_err(|_| anyhow!("label of {} bytes is too long", label.len()))?;
        let image_len =
            u32::try_from(image.len()).map_err(|_| anyhow!("image of {} bytes is too large", image.len()))?;
        self.put(&label_len.to_le_bytes())?;
        self.put(label.as_bytes())?;
        self.put(&image_len.to_le_bytes())?;
        self.put(image)?;
        self.tally.count(image.len() as u64, label);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.tally.images
    }

    pub fn is_empty(&self) -> bool {
        self.tally.images == 0
    }

    /// Syncs and renames into place; returns the record (new id = uuid v4 simple string, class counts, size, sha256, created_at).
    /// An empty dataset is an error.
    pub fn finish(mut self) -> Result<DatasetRecord> {
        if let Some(failure) = &self.failed {
            bail!("dataset {:?} cannot be finished: an earlier write failed ({failure})", self.name);
        }
        if self.tally.images == 0 {
            bail!("dataset {:?} has no images", self.name);
        }
        let file = self.file.take().expect("a writer is finished only once, by value");
        if let Err(error) = self.sync_and_rename(file) {
            // Drop no longer sees a file to clean up (it was taken above), so clean up here.
            let _ = std::fs::remove_file(&self.temp_path);
            return Err(error);
        }
        Ok(DatasetRecord {
            id: self.id.clone(),
            name: std::mem::take(&mut self.name),
            size: self.tally.images as u64,
            class_counts: std::mem::take(&mut self.tally.class_counts),
            sha256: crate::files::hex(&std::mem::take(&mut self.hasher).finalize()),
            path: self.final_path.clone(),
            created_at: now_rfc3339(),
        })
    }

    /// Flushes the temporary file and commits it durably under its final name.
    fn sync_and_rename(&self, file: BufWriter<File>) -> Result<()> {
        let temp = self.temp_path.display();
        drop(file.into_inner().map_err(|e| anyhow!("writing the dataset file {temp}: {}", e.error()))?);
        crate::files::commit(&self.temp_path, &self.final_path)
    }

    /// Writes to the file and the checksum; a failure marks the writer as failed.
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        let file = self.file.as_mut().expect("an unfinished writer has its file");
        if let Err(error) = file.write_all(bytes) {
            let message = format!("writing the dataset file {}: {error}", self.temp_path.display());
            self.failed = Some(message.clone());
            bail!(message);
        }
        self.hasher.update(bytes);
        Ok(())
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            drop(file);
            if let Err(error) = std::fs::remove_file(&self.temp_path) {
                tracing::warn!("removing the unfinished dataset file {}: {error}", self.temp_path.display());
            }
        }
    }
}

/// Counts images, bytes and classes against the limits; shared by uploads and server folders.
struct Tally {
    limits: DatasetLimits,
    images: usize,
    image_bytes: u64,
    class_counts: BTreeMap<String, u64>,
}

impl Tally {
    fn new(limits: DatasetLimits) -> Self {
        Self { limits, images: 0, image_bytes: 0, class_counts: BTreeMap::new() }
    }

    /// Whether one more image of `len` bytes labelled `label` fits; changes nothing.
    fn check(&self, len: u64, label: &str) -> Result<()> {
        let limits = &self.limits;
        let number = self.images + 1;
        if self.images >= limits.max_images {
            return Err(
                LimitExceeded(format!("image {number} is one too many: max_images is {}", limits.max_images)).into()
            );
        }
        if label.is_empty() {
            bail!("image {number} has an empty label");
        }
        if label.len() > limits.max_label_bytes {
            let shown: String = label.chars().take(32).collect();
            bail!(
                "image {number}: label {shown:?}{} is {} bytes, over max_label_bytes {}",
                if shown.len() < label.len() { "..." } else { "" },
                label.len(),
                limits.max_label_bytes
            );
        }
        if len == 0 {
            bail!("image {number} (label {label:?}) is empty");
        }
        if len > limits.max_image_bytes as u64 {
            return Err(LimitExceeded(format!(
                "image {number} (label {label:?}) is {len} bytes, over max_image_bytes {}",
                limits.max_image_bytes
            ))
            .into());
        }
        let total = self.image_bytes + len;
        if total > limits.max_total_bytes {
            return Err(LimitExceeded(format!(
                "image {number} (label {label:?}) brings the dataset to {total} image bytes, over max_total_bytes {}",
                limits.max_total_bytes
            ))
            .into());
        }
        Ok(())
    }

    fn count(&mut self, len: u64, label: &str) {
        self.images += 1;
        self.image_bytes += len;
        *self.class_counts.entry(label.to_owned()).or_default() += 1;
    }
}

/// The images of a dataset file's bytes (see the module documentation for the format).
pub fn parse(bytes: &[u8]) -> Result<Vec<LabeledImage>> {
    let mut reader = Reader { bytes, pos: 0 };
    let magic = reader.take(MAGIC.len()).context("the file is shorter than its header")?;
    if magic != MAGIC {
        bail!("not a dataset file: it starts with {magic:?}, not {MAGIC:?}");
    }
    let version = reader.u32().context("the file is shorter than its header")?;
    if version != FORMAT_VERSION {
        bail!("dataset format version {version} is not the supported version {FORMAT_VERSION}");
    }
    let mut images = Vec::new();
    while reader.pos < bytes.len() {
        let number = images.len() + 1;
        let truncated = || format!("the file ends inside image {number}");
        let label_len = reader.u32().with_context(truncated)? as usize;
        let label = reader.take(label_len).with_context(truncated)?;
        let label =
            String::from_utf8(label.to_vec()).with_context(|| format!("the label of image {number} is not UTF-8"))?;
        let image_len = reader.u32().with_context(truncated)? as usize;
        let image = reader.take(image_len).with_context(truncated)?.to_vec();
        images.push(LabeledImage { bytes: image, label });
    }
    Ok(images)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.pos..self.pos.checked_add(len)?)?;
        self.pos += len;
        Some(slice)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

fn count_classes(images: &[LabeledImage]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for image in images {
        *counts.entry(image.label.clone()).or_default() += 1;
    }
    counts
}

/// Reads `<data_root>/<folder>/<class>/<files>` (files ending .png/.jpg/.jpeg, case-insensitive; classes = sub-folder
/// names, sorted) for CreateJob's server_folder. `folder` must be relative and stay inside `data_root` after resolving
/// symlinks (canonicalize both); `..`, absolute paths, or escaping links are refused with an error that says the folder
/// is outside the data root. Limits apply as in DatasetWriter.
///
/// Hidden entries (names starting with '.') are skipped, as are other files and deeper folders; images within a class
/// are read in file-name order, so the same folder always gives the same dataset.
pub fn read_server_folder(data_root: &Path, folder: &str, limits: &DatasetLimits) -> Result<Vec<LabeledImage>> {
    let outside =
        |what: &str| anyhow!("server folder {folder:?} is outside the data root {}{what}", data_root.display());
    if folder.is_empty() {
        bail!("server folder is empty: name a folder under the data root {}", data_root.display());
    }
    let relative = Path::new(folder);
    // Checked before touching the file system, so a refused name reveals nothing about what exists.
    if relative.has_root() || relative.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(outside(""));
    }
    let root = data_root.canonicalize().with_context(|| format!("resolving the data root {}", data_root.display()))?;
    let dir = root.join(relative).canonicalize().with_context(|| {
        format!("server folder {folder:?} does not exist under the data root {}", data_root.display())
    })?;
    if !dir.starts_with(&root) {
        return Err(outside(""));
    }
    if !dir.is_dir() {
        bail!("server folder {folder:?} under the data root {} is not a folder", data_root.display());
    }

    let mut classes = Vec::new();
    for (name, path) in visible_entries(&dir)? {
        let resolved = path.canonicalize().with_context(|| format!("resolving {}", path.display()))?;
        if !resolved.is_dir() {
            continue;
        }
        if !resolved.starts_with(&root) {
            return Err(outside(&format!(": its class folder {name:?} links to {}", resolved.display())));
        }
        classes.push((name, resolved));
    }
    classes.sort();

    let mut tally = Tally::new(limits.clone());
    let mut images = Vec::new();
    for (class, class_dir) in classes {
        for (name, path) in visible_entries(&class_dir)? {
            let is_image = Path::new(&name)
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|known| e.eq_ignore_ascii_case(known)));
            if !is_image {
                continue;
            }
            let resolved = path.canonicalize().with_context(|| format!("resolving {}", path.display()))?;
            if !resolved.starts_with(&root) {
                return Err(outside(&format!(": its image {class}/{name} links to {}", resolved.display())));
            }
            if !resolved.is_file() {
                continue;
            }
            let in_folder = || format!("server folder {folder:?}: {class}/{name}");
            // The size on disk first, so an oversized file is refused without reading it.
            let len = std::fs::metadata(&resolved).with_context(in_folder)?.len();
            tally.check(len, &class).with_context(in_folder)?;
            let bytes = std::fs::read(&resolved).with_context(in_folder)?;
            tally.check(bytes.len() as u64, &class).with_context(in_folder)?;
            tally.count(bytes.len() as u64, &class);
            images.push(LabeledImage { bytes, label: class.clone() });
        }
    }
    if images.is_empty() {
        bail!(
            "server folder {folder:?} holds no images: expected <class>/<image>.png|.jpg|.jpeg under {}",
            dir.display()
        );
    }
    Ok(images)
}

/// The entries of `dir` whose names do not start with '.', sorted by name; names must be UTF-8
/// (they become labels).
fn visible_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|name| anyhow!("{} has an entry whose name {name:?} is not UTF-8", dir.display()))?;
        if !name.starts_with('.') {
            entries.push((name, path));
        }
    }
    entries.sort();
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn image(label: &str, bytes: &[u8]) -> LabeledImage {
        LabeledImage { bytes: bytes.to_vec(), label: label.to_owned() }
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    fn error_of<T: std::fmt::Debug>(result: Result<T>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = DatasetStore::new(dir.path().join("datasets"), DatasetLimits::default());
        let images = vec![image("cat", b"\x89PNG-one"), image("dog", b"jpeg-two!"), image("cat", b"3")];
        let record = store.save("pets", &images).unwrap();

        assert_eq!(record.name, "pets");
        assert_eq!(record.size, 3);
        assert_eq!(record.class_counts, BTreeMap::from([("cat".to_owned(), 2), ("dog".to_owned(), 1)]));
        assert_eq!(record.id.len(), 32);
        assert!(record.id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(record.path, dir.path().join("datasets").join(format!("{}.ds", record.id)));
        assert!(!record.created_at.is_empty());
        assert_eq!(files_in(&dir.path().join("datasets")), vec![format!("{}.ds", record.id)]);

        // The layout by hand: header 12 bytes, then (4 + 3 + 4 + 8) + (4 + 3 + 4 + 9) + (4 + 3 + 4 + 1).
        let bytes = std::fs::read(&record.path).unwrap();
        assert_eq!(bytes.len(), 12 + 19 + 20 + 12);
        assert_eq!(&bytes[..8], b"CTRDSET\0");
        assert_eq!(&bytes[8..12], &[1, 0, 0, 0]);
        assert_eq!(&bytes[12..19], &[3, 0, 0, 0, b'c', b'a', b't']);
        assert_eq!(&bytes[19..23], &[8, 0, 0, 0]);

        let mut expected_sha = String::new();
        for b in Sha256::digest(&bytes) {
            expected_sha.push_str(&format!("{b:02x}"));
        }
        assert_eq!(record.sha256, expected_sha);

        assert_eq!(store.load(&record).unwrap(), images);
    }

    #[test]
    fn corrupted_file_or_record_fails_to_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = DatasetStore::new(dir.path(), DatasetLimits::default());
        let record = store.save("x", &[image("a", b"abcdef"), image("b", b"ghijkl")]).unwrap();

        let mut bytes = std::fs::read(&record.path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&record.path, &bytes).unwrap();
        let message = error_of(store.load(&record));
        assert!(message.contains(&record.path.display().to_string()), "{message}");
        assert!(message.contains("SHA-256"), "{message}");

        bytes[last] ^= 0x01;
        std::fs::write(&record.path, &bytes).unwrap();
        store.load(&record).unwrap();
        let wrong_size = DatasetRecord { size: 3, ..record.clone() };
        let message = error_of(store.load(&wrong_size));
        assert!(message.contains("holds 2 images") && message.contains("says 3"), "{message}");

        std::fs::remove_file(&record.path).unwrap();
        let message = error_of(store.load(&record));
        assert!(message.contains(&record.path.display().to_string()), "{message}");
    }

    #[test]
    fn limits_are_refused_with_their_values() {
        let dir = tempfile::tempdir().unwrap();
        let limits = DatasetLimits { max_images: 3, max_image_bytes: 10, max_total_bytes: 25, max_label_bytes: 5 };
        let store = DatasetStore::new(dir.path(), limits.clone());
        assert_eq!(store.limits(), &limits);
        let mut writer = store.begin("limited").unwrap();

        assert!(error_of(writer.add(b"", "cat")).contains("image 1 (label \"cat\") is empty"));
        assert!(error_of(writer.add(b"x", "")).contains("image 1 has an empty label"));
        let message = error_of(writer.add(b"x", "sixsix"));
        assert!(message.contains("is 6 bytes, over max_label_bytes 5"), "{message}");
        let message = error_of(writer.add(&[7; 11], "cat"));
        assert!(message.contains("is 11 bytes, over max_image_bytes 10"), "{message}");

        writer.add(&[1; 10], "cat").unwrap();
        writer.add(&[2; 10], "dog").unwrap();
        let message = error_of(writer.add(&[3; 6], "cat"));
        assert!(
            message.contains("image 3") && message.contains("26 image bytes, over max_total_bytes 25"),
            "{message}"
        );
        writer.add(&[3; 5], "cat").unwrap();
        assert_eq!(writer.len(), 3);
        let message = error_of(writer.add(&[4; 1], "cat"));
        assert!(message.contains("image 4 is one too many: max_images is 3"), "{message}");

        // The refused images left no trace: the file holds the three accepted ones.
        let record = writer.finish().unwrap();
        assert_eq!(record.size, 3);
        let loaded = store.load(&record).unwrap();
        assert_eq!(loaded, vec![image("cat", &[1; 10]), image("dog", &[2; 10]), image("cat", &[3; 5])]);

        let defaults = DatasetLimits::default();
        assert_eq!(
            (defaults.max_images, defaults.max_image_bytes, defaults.max_total_bytes, defaults.max_label_bytes),
            (10_000, 4 * 1024 * 1024, 512 * 1024 * 1024, 128)
        );
    }

    #[test]
    fn leftovers_of_killed_uploads_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let store = DatasetStore::new(root.path(), DatasetLimits::default());
        assert_eq!(store.remove_unfinished_uploads(Duration::ZERO).unwrap(), 0, "no folder yet");
        let record = store.save("kept", &[image("a", b"x"), image("b", b"y")]).unwrap();
        // What a writer killed mid-upload leaves (its Drop never ran).
        std::fs::write(root.path().join(format!(".{}.ds.partial", "0123abcd")), b"CTRDSET\0half").unwrap();
        assert_eq!(store.remove_unfinished_uploads(Duration::from_secs(3600)).unwrap(), 0, "too recent");
        assert_eq!(store.remove_unfinished_uploads(Duration::ZERO).unwrap(), 1);
        assert_eq!(files_in(root.path()), vec![format!("{}.ds", record.id)]);
        assert_eq!(store.load(&record).unwrap().len(), 2);
    }

    #[test]
    fn unfinished_or_empty_writers_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = DatasetStore::new(dir.path(), DatasetLimits::default());
        let mut writer = store.begin("abandoned").unwrap();
        writer.add(b"bytes", "a").unwrap();
        assert_eq!(files_in(dir.path()).len(), 1);
        drop(writer);
        assert!(files_in(dir.path()).is_empty());

        let empty = store.begin("empty").unwrap();
        assert!(empty.is_empty());
        let message = error_of(empty.finish());
        assert!(message.contains("dataset \"empty\" has no images"), "{message}");
        assert!(files_in(dir.path()).is_empty());
    }

    /// `<root>/set/{cat,dog}` with images, a non-image file and a hidden folder.
    fn server_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let set = dir.path().join("root/set");
        for class in ["dog", "cat", ".hidden"] {
            std::fs::create_dir_all(set.join(class)).unwrap();
        }
        std::fs::write(set.join("cat/b.JPG"), b"cat-b").unwrap();
        std::fs::write(set.join("cat/a.png"), b"cat-a").unwrap();
        std::fs::write(set.join("dog/c.jpeg"), b"dog-c").unwrap();
        std::fs::write(set.join("dog/notes.txt"), b"not an image").unwrap();
        std::fs::write(set.join(".hidden/x.png"), b"hidden").unwrap();
        std::fs::write(set.join("README.png"), b"top-level file, not a class").unwrap();
        dir
    }

    #[test]
    fn server_folder_reads_classes_in_order() {
        let dir = server_tree();
        let root = dir.path().join("root");
        let images = read_server_folder(&root, "set", &DatasetLimits::default()).unwrap();
        assert_eq!(images, vec![image("cat", b"cat-a"), image("cat", b"cat-b"), image("dog", b"dog-c")]);
        assert_eq!(read_server_folder(&root, "./set/", &DatasetLimits::default()).unwrap(), images);

        let small = DatasetLimits { max_images: 2, ..DatasetLimits::default() };
        let message = error_of(read_server_folder(&root, "set", &small));
        assert!(message.contains("dog/c.jpeg") && message.contains("max_images is 2"), "{message}");

        let message = error_of(read_server_folder(&root, "missing", &DatasetLimits::default()));
        assert!(message.contains("\"missing\" does not exist"), "{message}");
        std::fs::create_dir_all(root.join("bare/empty_class")).unwrap();
        let message = error_of(read_server_folder(&root, "bare", &DatasetLimits::default()));
        assert!(message.contains("holds no images"), "{message}");
    }

    #[test]
    fn server_folder_outside_the_root_is_refused() {
        let dir = server_tree();
        let root = dir.path().join("root");
        for folder in ["../x", "set/../../root/set", "/abs", &dir.path().join("root/set").display().to_string()] {
            let message = error_of(read_server_folder(&root, folder, &DatasetLimits::default()));
            assert!(message.contains("is outside the data root"), "{folder}: {message}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn server_folder_links_leading_outside_are_refused() {
        let dir = server_tree();
        let root = dir.path().join("root");
        let outside = dir.path().join("elsewhere");
        std::fs::create_dir_all(outside.join("cat")).unwrap();
        std::fs::write(outside.join("cat/secret.png"), b"secret").unwrap();

        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        let message = error_of(read_server_folder(&root, "escape", &DatasetLimits::default()));
        assert!(message.contains("\"escape\" is outside the data root"), "{message}");

        std::os::unix::fs::symlink(outside.join("cat"), root.join("set/stolen")).unwrap();
        let message = error_of(read_server_folder(&root, "set", &DatasetLimits::default()));
        assert!(message.contains("is outside the data root") && message.contains("stolen"), "{message}");

        // A link that stays inside the root is fine.
        std::fs::remove_file(root.join("set/stolen")).unwrap();
        std::os::unix::fs::symlink(root.join("set"), root.join("alias")).unwrap();
        assert_eq!(read_server_folder(&root, "alias", &DatasetLimits::default()).unwrap().len(), 3);
    }
}
