//! Multi-view pairs, CMC (Tian et al. 2020, "Contrastive Multiview Coding"): one sample seen
//! through several sources, each source's view of a sample a positive of the others'.
//!
//! The paper splits a colour image into its L and ab channels. Fashion-MNIST has one channel,
//! so the second source here is the image's Sobel edge map (the suggestion for
//! grayscale), computed from the channel mean so that any image has one: the first source stays
//! the whole image, which is what the served encoder reads.

use candle_core::{bail, Result, Tensor};

/// The Sobel gradient magnitude of images `[N, C, H, W]`, `[N, 1, H, W]`:
/// `√(G_x² + G_y²)` of the channel mean with the 3×3 kernels `G_x = [[−1, 0, 1], [−2, 0, 2],
/// [−1, 0, 1]]` and `G_y = G_xᵀ`, zero padding. Carries no gradient (it is an input).
pub fn sobel_edges(images: &Tensor) -> Result<Tensor> {
    let [_, _, height, width] = images.dims() else {
        bail!("sobel_edges: images must be [N, C, H, W], got {:?}", images.dims())
    };
    if *height < 3 || *width < 3 {
        bail!("sobel_edges: images must be at least 3×3, got {height}×{width}")
    }
    let gray = images.detach().mean_keepdim(1)?;
    let kernels: [f32; 18] = [-1., 0., 1., -2., 0., 2., -1., 0., 1., -1., -2., -1., 0., 0., 0., 1., 2., 1.];
    let kernels = Tensor::from_slice(&kernels, (2, 1, 3, 3), images.device())?.to_dtype(images.dtype())?;
    let gradients = gray.conv2d(&kernels, 1, 1, 1, 1)?;
    gradients.sqr()?.sum_keepdim(1)?.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A vertical step from 0 to 1 between columns 1 and 2 of a 4×4 image: on the rows away
    /// from the top and bottom (where zero padding adds a vertical gradient) G_y = 0 and
    /// G_x = (1 + 2 + 1)·(x[c+1] − x[c−1]): 0, 4, 4 and, the zero padding beyond the last
    /// column being a step down, −4.
    #[test]
    fn a_step_edge_has_magnitude_four_beside_it_and_none_away_from_it() -> Result<()> {
        let row = [0f32, 0., 1., 1.];
        let image: Vec<f32> = (0..4).flat_map(|_| row).collect();
        let x = Tensor::from_vec(image, (1, 1, 4, 4), &Device::Cpu)?;
        let edges = sobel_edges(&x)?.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        for (r, row) in edges.iter().enumerate().take(3).skip(1) {
            assert_eq!(row, &vec![0., 4., 4., 4.], "row {r}");
        }
        // Channels are averaged first: two channels of the same image give the same edges.
        let two = Tensor::cat(&[&x, &x], 1)?;
        assert_eq!(sobel_edges(&two)?.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?, edges);
        Ok(())
    }
}
