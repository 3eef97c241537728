//! Reader for the IDX files that MNIST and Fashion-MNIST ship in (<http://yann.lecun.com/exdb/mnist/>).
//!
//! An IDX file is a 4-byte magic number `00 00 <type> <ndims>`, then `ndims` big-endian `u32`
//! dimension sizes, then the data. Only unsigned bytes (`type = 0x08`) are read here. Files may be
//! gzip-compressed or raw; which one is decided from the first bytes, not the file name.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use flate2::read::GzDecoder;

use super::{Dataset, ImageShape};

/// Where the `dataset-fashion-mnist` system package installs the (gzipped) IDX files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// The side of MNIST-format images (MNIST, Fashion-MNIST, KMNIST and EMNIST are all 28×28).
pub const IMAGE_SIDE: usize = 28;

/// Fashion-MNIST's class names, indexed by label (Xiao, Rasul & Vollgraf 2017, Zalando).
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const IDX_TYPE_U8: u8 = 0x08;

/// Which half of an MNIST-format dataset to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `train-*` files (60 000 images for (Fashion-)MNIST).
    Train,
    /// `t10k-*` files (10 000 images).
    Test,
}

impl Split {
    /// The file-name prefix the original distribution uses for this split.
    pub fn file_prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// An IDX array of unsigned bytes: its dimension sizes and its values, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses an IDX array of unsigned bytes from file contents, gunzipping them first if they
/// start with the gzip magic bytes. `what` names the source in error messages.
pub fn parse_idx(bytes: &[u8], what: &str) -> Result<IdxArray> {
    let raw;
    let bytes = if bytes.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        GzDecoder::new(bytes).read_to_end(&mut out).with_context(|| format!("{what}: corrupt gzip stream"))?;
        raw = out;
        &raw[..]
    } else {
        bytes
    };
    ensure!(bytes.len() >= 4, "{what}: {} bytes is too short for an IDX header", bytes.len());
    ensure!(
        bytes[0] == 0 && bytes[1] == 0,
        "{what}: not an IDX file (magic starts {:02x} {:02x}, expected 00 00)",
        bytes[0],
        bytes[1]
    );
    ensure!(
        bytes[2] == IDX_TYPE_U8,
        "{what}: IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
        bytes[2]
    );
    let ndims = bytes[3] as usize;
    ensure!(ndims >= 1, "{what}: IDX file declares 0 dimensions");
    let header_len = 4 + 4 * ndims;
    ensure!(bytes.len() >= header_len, "{what}: truncated IDX header ({ndims} dimensions declared)");
    let dims: Vec<usize> =
        bytes[4..header_len].chunks_exact(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize).collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .with_context(|| format!("{what}: IDX dimensions {dims:?} overflow"))?;
    let data = &bytes[header_len..];
    ensure!(
        data.len() == expected,
        "{what}: IDX dimensions {dims:?} need {expected} data bytes but the file has {}",
        data.len()
    );
    Ok(IdxArray { dims, data: data.to_vec() })
}

/// Reads an IDX file (gzipped or raw) from disk.
pub fn read_idx_file(path: &Path) -> Result<IdxArray> {
    let bytes = fs::read(path).with_context(|| format!("cannot read IDX file {}", path.display()))?;
    parse_idx(&bytes, &path.display().to_string())
}

/// Loads an image IDX file (`N x H x W` bytes) and a label IDX file (`N` bytes) into a
/// one-channel [`Dataset`], pixels scaled from `0..=255` to `[0, 1]`.
pub fn load_idx_dataset(images: &Path, labels: &Path, class_names: Vec<String>) -> Result<Dataset> {
    let image_array = read_idx_file(images)?;
    let label_array = read_idx_file(labels)?;
    ensure!(
        image_array.dims.len() == 3,
        "{}: expected 3 dimensions (count, height, width) for images, found {:?}",
        images.display(),
        image_array.dims
    );
    ensure!(
        label_array.dims.len() == 1,
        "{}: expected 1 dimension (count) for labels, found {:?}",
        labels.display(),
        label_array.dims
    );
    let (count, height, width) = (image_array.dims[0], image_array.dims[1], image_array.dims[2]);
    ensure!(
        label_array.dims[0] == count,
        "{} holds {count} images but {} holds {} labels",
        images.display(),
        labels.display(),
        label_array.dims[0]
    );
    let pixels = image_array.data.iter().map(|&p| p as f32 / 255.0).collect();
    let labels_u32 = label_array.data.iter().map(|&l| l as u32).collect();
    Dataset::new(pixels, labels_u32, ImageShape::new(1, height, width), class_names)
        .with_context(|| format!("building a dataset from {} and {}", images.display(), labels.display()))
}

/// Loads one split of an MNIST-format directory: `train-images-idx3-ubyte[.gz]` and
/// `train-labels-idx1-ubyte[.gz]`, or the `t10k-` pair for [`Split::Test`].
///
/// Class names are Fashion-MNIST's when the labels span 10 classes (so plain MNIST also gets
/// them: pass names yourself through [`load_idx_dataset`] if that matters), otherwise
/// `"0"`, `"1"`, ... up to the largest label.
pub fn load_mnist_format_dir(dir: &Path, split: Split) -> Result<Dataset> {
    let prefix = split.file_prefix();
    let images = find_idx_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels = find_idx_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    // Class names depend on the labels, so read them with a placeholder first.
    let mut dataset = load_idx_dataset(&images, &labels, vec![String::new(); 256])?;
    let num_classes = dataset.labels.iter().max().map_or(0, |&m| m as usize + 1);
    dataset.class_names = default_class_names(num_classes);
    Ok(dataset)
}

/// Fashion-MNIST's names for 10 classes, decimal numbers otherwise.
pub fn default_class_names(num_classes: usize) -> Vec<String> {
    if num_classes == FASHION_MNIST_CLASSES.len() {
        FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        (0..num_classes).map(|i| i.to_string()).collect()
    }
}

/// `dir/stem.gz` if present, else `dir/stem`; the error names both paths and how to get them.
fn find_idx_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    let gz = dir.join(format!("{stem}.gz"));
    let raw = dir.join(stem);
    if gz.is_file() {
        return Ok(gz);
    }
    if raw.is_file() {
        return Ok(raw);
    }
    bail!(
        "missing IDX file: neither {} nor {} exists. Install Fashion-MNIST with \
         `sudo apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}), \
         or pass `--data DIR` pointing at a folder with the MNIST-format files",
        gz.display(),
        raw.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;

    const SUBSET_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/fashion-mnist-subset");

    /// Builds IDX bytes by hand: magic, big-endian dims, data.
    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, IDX_TYPE_U8, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn parses_raw_and_gzipped_identically() {
        let raw = idx_bytes(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let expected = IdxArray { dims: vec![2, 3], data: vec![1, 2, 3, 4, 5, 6] };
        assert_eq!(parse_idx(&raw, "raw").unwrap(), expected);
        assert_eq!(parse_idx(&gzip(&raw), "gz").unwrap(), expected);
    }

    #[test]
    fn rejects_bad_magic_type_and_length() {
        let err = parse_idx(&[1, 0, 8, 1, 0, 0, 0, 0], "f").unwrap_err().to_string();
        assert!(err.contains("not an IDX file"), "{err}");
        let err = parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 0], "f").unwrap_err().to_string();
        assert!(err.contains("0x0d"), "{err}");
        let err = parse_idx(&idx_bytes(&[2, 2], &[1, 2, 3]), "f").unwrap_err().to_string();
        assert!(err.contains("need 4 data bytes but the file has 3"), "{err}");
        let err = parse_idx(&[0, 0, 8, 2, 0, 0], "f").unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn loads_dataset_scaled_and_detects_format_by_content() {
        let dir = tempfile::tempdir().unwrap();
        // Raw content under a ".gz"-less name and gzipped content under a misleading name.
        let images = dir.path().join("images.bin");
        let labels = dir.path().join("labels.txt");
        fs::write(&images, idx_bytes(&[2, 1, 2], &[0, 255, 51, 102])).unwrap();
        fs::write(&labels, gzip(&idx_bytes(&[2], &[1, 0]))).unwrap();
        let ds = load_idx_dataset(&images, &labels, vec!["a".into(), "b".into()]).unwrap();
        assert_eq!(ds.shape, ImageShape::new(1, 1, 2));
        assert_eq!(ds.labels, vec![1, 0]);
        assert_eq!(ds.images, vec![0.0, 1.0, 0.2, 0.4]);
    }

    #[test]
    fn count_mismatch_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("i");
        let labels = dir.path().join("l");
        fs::write(&images, idx_bytes(&[2, 1, 1], &[0, 1])).unwrap();
        fs::write(&labels, idx_bytes(&[3], &[0, 0, 0])).unwrap();
        let err = load_idx_dataset(&images, &labels, vec!["a".into()]).unwrap_err().to_string();
        assert!(err.contains("2 images") && err.contains("3 labels"), "{err}");
    }

    #[test]
    fn missing_dir_names_paths_and_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_mnist_format_dir(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(err.contains("t10k-images-idx3-ubyte.gz"), "{err}");
        assert!(err.contains(&dir.path().join("t10k-images-idx3-ubyte").display().to_string()), "{err}");
        assert!(err.contains("apt-get install dataset-fashion-mnist") && err.contains("--data"), "{err}");
    }

    #[test]
    fn non_ten_class_dir_gets_numbered_names() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("train-images-idx3-ubyte"), idx_bytes(&[3, 1, 1], &[0, 1, 2])).unwrap();
        fs::write(dir.path().join("train-labels-idx1-ubyte.gz"), gzip(&idx_bytes(&[3], &[0, 2, 1]))).unwrap();
        let ds = load_mnist_format_dir(dir.path(), Split::Train).unwrap();
        assert_eq!(ds.class_names, vec!["0", "1", "2"]);
    }

    #[test]
    fn committed_subset_loads_with_fashion_names() {
        let train = load_mnist_format_dir(Path::new(SUBSET_DIR), Split::Train).unwrap();
        let test = load_mnist_format_dir(Path::new(SUBSET_DIR), Split::Test).unwrap();
        assert_eq!((train.len(), test.len()), (1000, 500));
        assert_eq!(train.shape, ImageShape::new(1, 28, 28));
        assert_eq!(train.class_names[9], "Ankle boot");
        // Every class present in both splits, no class starved.
        for ds in [&train, &test] {
            let mut counts = [0usize; 10];
            ds.labels.iter().for_each(|&l| counts[l as usize] += 1);
            assert!(counts.iter().all(|&c| c >= ds.len() / 20), "{counts:?}");
        }
        assert!(train.images.iter().all(|&p| (0.0..=1.0).contains(&p)));
        assert!(train.images.contains(&1.0));
    }

    /// The full dataset, when the system package is installed; skipped otherwise.
    #[test]
    fn system_fashion_mnist_when_installed() {
        let dir = Path::new(FASHION_MNIST_DIR);
        if !dir.is_dir() {
            eprintln!("skipping: {FASHION_MNIST_DIR} not installed");
            return;
        }
        let test = load_mnist_format_dir(dir, Split::Test).unwrap();
        assert_eq!(test.len(), 10_000);
        assert_eq!(test.num_classes(), 10);
        // The committed subset is the head of the real test split.
        let subset = load_mnist_format_dir(Path::new(SUBSET_DIR), Split::Test).unwrap();
        assert_eq!(subset.labels[..], test.labels[..500]);
        assert_eq!(subset.images[..], test.images[..500 * 784]);
    }
}
