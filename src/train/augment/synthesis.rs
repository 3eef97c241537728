//! Image synthesis: a view made by pasting the image's foreground onto another training image,
//! so the object stays and its context changes — the survey's synthesis augmentation (copy-paste
//! of foregrounds onto other backgrounds, as in Zhao et al., "Distilling Localization for
//! Self-Supervised Representation Learning", AAAI 2021, with saliency masks). On grayscale
//! images with dark backgrounds, such as Fashion-MNIST, the mask is a threshold on intensity.

use super::Image;

/// Foreground pixels: the mean over channels is above `threshold`.
pub fn foreground_mask(image: &Image, threshold: f32) -> Vec<bool> {
    let plane = image.shape.height * image.shape.width;
    let channels = image.shape.channels as f32;
    (0..plane)
        .map(|p| (0..image.shape.channels).map(|c| image.data[c * plane + p]).sum::<f32>() / channels > threshold)
        .collect()
}

/// `foreground`'s pixels where its mask is set, `background`'s (same shape, CHW) elsewhere.
pub fn paste_foreground(foreground: &Image, background: &[f32], threshold: f32) -> Image {
    assert_eq!(background.len(), foreground.data.len(), "the background must have the image's shape");
    let mask = foreground_mask(foreground, threshold);
    let plane = mask.len();
    let data =
        (0..foreground.data.len()).map(|i| if mask[i % plane] { foreground.data[i] } else { background[i] }).collect();
    Image::new(foreground.shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageShape;

    #[test]
    fn pastes_the_bright_pixels_onto_the_background() {
        let shape = ImageShape::new(1, 2, 3);
        let object = Image::new(shape, vec![0.0, 0.8, 0.05, 0.5, 0.1, 0.9]);
        let background = [0.3, 0.3, 0.3, 0.6, 0.6, 0.6];
        // Threshold 0.1: 0.8, 0.5 and 0.9 are the object; 0.1 itself is not above it.
        assert_eq!(paste_foreground(&object, &background, 0.1).data, vec![0.3, 0.8, 0.3, 0.5, 0.6, 0.9]);
    }

    #[test]
    fn rgb_masks_use_the_mean_of_the_channels() {
        let shape = ImageShape::new(3, 1, 2);
        // Pixel 0: mean 0.3 (object); pixel 1: mean 0.05 (background).
        let object = Image::new(shape, vec![0.9, 0.0, 0.0, 0.15, 0.0, 0.0]);
        assert_eq!(foreground_mask(&object, 0.1), vec![true, false]);
        let pasted = paste_foreground(&object, &[0.5; 6], 0.1);
        assert_eq!(pasted.data, vec![0.9, 0.5, 0.0, 0.5, 0.0, 0.5]);
    }
}
