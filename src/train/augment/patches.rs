//! Patches of a regular grid over an image: PIRL's jigsaw cells and CPC's overlapping patches.

use candle_core::{bail, Result, Tensor};

/// The start offsets of `size`-long windows stepping by `stride` from 0 while they fit in
/// `extent` (28, 10, 6 → 0, 6, 12, 18).
pub fn grid_starts(extent: usize, size: usize, stride: usize) -> Vec<usize> {
    if size == 0 || stride == 0 || size > extent {
        return Vec::new();
    }
    (0..=extent - size).step_by(stride).collect()
}

/// The `size`×`size` patches of images `[N, C, H, W]` on the grid of [`grid_starts`] in both
/// directions, `[N, G, C, size, size]` with the G = rows·columns patches row-major, and the
/// grid's (rows, columns).
pub fn patch_grid(images: &Tensor, size: usize, stride: usize) -> Result<(Tensor, usize, usize)> {
    let [_, _, height, width] = images.dims() else {
        bail!("patch_grid: images must be [N, C, H, W], got {:?}", images.dims())
    };
    let (rows, columns) = (grid_starts(*height, size, stride), grid_starts(*width, size, stride));
    if rows.is_empty() || columns.is_empty() {
        bail!("patch_grid: no {size}×{size} patch with stride {stride} fits a {height}×{width} image")
    }
    let mut patches = Vec::with_capacity(rows.len() * columns.len());
    for &top in &rows {
        let band = images.narrow(2, top, size)?;
        for &left in &columns {
            patches.push(band.narrow(3, left, size)?);
        }
    }
    Ok((Tensor::stack(&patches, 1)?, rows.len(), columns.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn windows_step_from_the_corner_while_they_fit() {
        assert_eq!(grid_starts(28, 10, 6), vec![0, 6, 12, 18]);
        assert_eq!(grid_starts(28, 9, 9), vec![0, 9, 18]);
        assert_eq!(grid_starts(4, 4, 3), vec![0]);
        assert!(grid_starts(4, 5, 1).is_empty());
    }

    /// On a 4×4 image of values 0..16, the 2×2 patches with stride 2 are its quadrants.
    #[test]
    fn patches_are_the_image_windows_in_row_major_order() -> Result<()> {
        let image = Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 1, 4, 4))?;
        let (patches, rows, columns) = patch_grid(&image, 2, 2)?;
        assert_eq!((rows, columns), (2, 2));
        assert_eq!(patches.dims(), &[1, 4, 1, 2, 2]);
        let flat = patches.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(flat, vec![0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.]);
        let err = patch_grid(&image, 5, 1).unwrap_err().to_string();
        assert!(err.contains("no 5×5 patch"), "{err}");
        Ok(())
    }
}
