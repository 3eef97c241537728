//! Datasets stored as `root/<class>/<image>` files, like torchvision's `ImageFolder`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use image::imageops::FilterType;
use image::{DynamicImage, ImageReader};

use super::{Dataset, ImageShape};

/// File extensions read as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Loads `root/<class>/*.{png,jpg,jpeg}`: one class per sub-folder, labels in sorted folder-name
/// order, images within a class in sorted file-name order.
///
/// Each image is converted to grayscale (`shape.channels == 1`) or RGB (`3`) and resized with
/// bilinear (triangle) filtering to `shape.height x shape.width`. Other files and folders whose
/// names start with `.` are ignored. Errors name the offending path: a missing root, a root
/// with no class folders, a class folder with no images, a file that does not decode.
pub fn load_image_folder(root: &Path, shape: ImageShape) -> Result<Dataset> {
    ensure!(
        shape.channels == 1 || shape.channels == 3,
        "image folders load as 1 (grayscale) or 3 (RGB) channels, not {}",
        shape.channels
    );
    ensure!(shape.height > 0 && shape.width > 0, "image shape {shape:?} has a zero side");
    ensure!(root.is_dir(), "image folder {} does not exist or is not a directory", root.display());

    let class_dirs = sorted_entries(root, |path| path.is_dir())?;
    ensure!(
        !class_dirs.is_empty(),
        "image folder {} has no class sub-folders (expected {}/<class>/<image>.png)",
        root.display(),
        root.display()
    );

    let mut class_names = Vec::with_capacity(class_dirs.len());
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (label, class_dir) in class_dirs.iter().enumerate() {
        let files = sorted_entries(class_dir, |path| path.is_file() && has_image_extension(path))?;
        ensure!(
            !files.is_empty(),
            "class folder {} has no images (looked for {})",
            class_dir.display(),
            IMAGE_EXTENSIONS.map(|e| format!("*.{e}")).join(", ")
        );
        for file in &files {
            images.extend(load_image_file(file, shape)?);
            labels.push(label as u32);
        }
        class_names.push(class_dir.file_name().unwrap_or_default().to_string_lossy().into_owned());
    }
    Dataset::new(images, labels, shape, class_names)
}

/// Decodes one image file, converts and resizes it to `shape`; returns CHW pixels in `[0, 1]`.
pub fn load_image_file(path: &Path, shape: ImageShape) -> Result<Vec<f32>> {
    let decoded = ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))?;
    Ok(image_to_chw(&decoded, shape))
}

/// Converts a decoded image to `shape.channels` channels, resizes it bilinearly to
/// `shape.height x shape.width`, and lays it out channel-first in `[0, 1]`.
pub fn image_to_chw(image: &DynamicImage, shape: ImageShape) -> Vec<f32> {
    let (w, h) = (shape.width as u32, shape.height as u32);
    let interleaved: Vec<u8> = match shape.channels {
        1 => resize(image.to_luma8(), w, h).into_raw(),
        3 => resize(image.to_rgb8(), w, h).into_raw(),
        c => panic!("image_to_chw supports 1 or 3 channels, not {c}"),
    };
    // Interleaved HWC bytes to planar CHW floats.
    let plane = shape.height * shape.width;
    let mut chw = vec![0.0; shape.numel()];
    for (i, &value) in interleaved.iter().enumerate() {
        let (pixel, channel) = (i / shape.channels, i % shape.channels);
        chw[channel * plane + pixel] = value as f32 / 255.0;
    }
    chw
}

fn resize<P: image::Pixel<Subpixel = u8> + 'static>(
    buffer: image::ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
) -> image::ImageBuffer<P, Vec<u8>> {
    if buffer.dimensions() == (width, height) {
        buffer
    } else {
        image::imageops::resize(&buffer, width, height, FilterType::Triangle)
    }
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|known| known.eq_ignore_ascii_case(e)))
}

/// Entries of `dir` that pass `keep`, skipping hidden names, sorted by file name.
fn sorted_entries(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry.with_context(|| format!("cannot list {}", dir.display()))?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden && keep(&path) {
            paths.push(path);
        }
    }
    if paths.is_empty() && !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    fn touch_dir(path: &Path) {
        fs::create_dir_all(path).unwrap();
    }

    /// root/cat: a gray PNG (value 200) and an upper-case .JPG; root/dog: a pure-red RGB PNG.
    fn sample_folder() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        touch_dir(&root.path().join("dog"));
        touch_dir(&root.path().join("cat"));
        touch_dir(&root.path().join(".hidden"));
        GrayImage::from_pixel(8, 8, Luma([200])).save(root.path().join("cat/a.png")).unwrap();
        GrayImage::from_pixel(16, 12, Luma([50]))
            .save_with_format(root.path().join("cat/b.JPG"), image::ImageFormat::Jpeg)
            .unwrap();
        fs::write(root.path().join("cat/notes.txt"), "not an image").unwrap();
        RgbImage::from_pixel(4, 4, Rgb([255, 0, 0])).save(root.path().join("dog/red.png")).unwrap();
        root
    }

    #[test]
    fn loads_sorted_classes_in_rgb() {
        let root = sample_folder();
        let ds = load_image_folder(root.path(), ImageShape::new(3, 4, 4)).unwrap();
        assert_eq!(ds.class_names, vec!["cat", "dog"]);
        assert_eq!(ds.labels, vec![0, 0, 1]);
        let gray = 200.0 / 255.0;
        assert!(ds.image(0).iter().all(|&p| (p - gray).abs() < 1e-6));
        // JPEG is lossy: a flat 50 comes back within a couple of levels.
        assert!(ds.image(1).iter().all(|&p| (p - 50.0 / 255.0).abs() < 3.0 / 255.0));
        // Red planar: first channel all 1, the other two all 0.
        let red = ds.image(2);
        assert!(red[..16].iter().all(|&p| p == 1.0) && red[16..].iter().all(|&p| p == 0.0));
    }

    #[test]
    fn loads_in_grayscale_with_luma_weights() {
        let root = sample_folder();
        let ds = load_image_folder(root.path(), ImageShape::new(1, 2, 2)).unwrap();
        assert_eq!(ds.shape.numel(), 4);
        // The image crate's luma of pure red: 0.2126 * 255 (Rec. 709), rounded to a byte.
        let expected = (0.2126f32 * 255.0).round() / 255.0;
        assert!(ds.image(2).iter().all(|&p| (p - expected).abs() < 1.5 / 255.0), "{:?}", ds.image(2));
    }

    #[test]
    fn bilinear_resize_of_a_horizontal_ramp_is_monotone() {
        let root = tempfile::tempdir().unwrap();
        touch_dir(&root.path().join("ramp"));
        let ramp = GrayImage::from_fn(32, 4, |x, _| Luma([(x * 8) as u8]));
        ramp.save(root.path().join("ramp/r.png")).unwrap();
        let ds = load_image_folder(root.path(), ImageShape::new(1, 2, 8)).unwrap();
        let row = &ds.image(0)[..8];
        assert!(row.windows(2).all(|w| w[1] > w[0]), "{row:?}");
        // Each output pixel averages a 4-wide source block around its centre: about (4x + 1.5) * 8.
        for (x, &p) in row.iter().enumerate().skip(1).take(6) {
            let expected = (4.0 * x as f32 + 1.5) * 8.0 / 255.0;
            assert!((p - expected).abs() < 3.0 / 255.0, "x={x}: {p} vs {expected}");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let shape = ImageShape::new(1, 4, 4);
        let missing = Path::new("/nonexistent/image/root");
        let err = load_image_folder(missing, shape).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/image/root") && err.contains("does not exist"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        let err = load_image_folder(empty.path(), shape).unwrap_err().to_string();
        assert!(err.contains("no class sub-folders"), "{err}");

        touch_dir(&empty.path().join("lonely"));
        let err = format!("{:#}", load_image_folder(empty.path(), shape).unwrap_err());
        assert!(err.contains("lonely") && err.contains("has no images"), "{err}");

        fs::write(empty.path().join("lonely/broken.png"), b"this is not a png").unwrap();
        let err = format!("{:#}", load_image_folder(empty.path(), shape).unwrap_err());
        assert!(err.contains("broken.png"), "{err}");
    }
}
