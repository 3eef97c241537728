//! In-batch pairs (SimCLR, Chen et al. 2020): the views of one sample are positives of each other
//! and every other view in the batch is a negative. Expressed as instance labels so that NT-Xent
//! and SupCon share one positive construction ([`super::label_positive_mask`]).

use candle_core::{bail, Device, Result, Tensor};

/// Instance-discrimination labels for `views` views of `batch_size` samples, in view-major order
/// (all samples' view 0, then all samples' view 1, ...): `[0, 1, .., B-1, 0, 1, .., B-1, ..]`,
/// U32, shape [views · batch_size]. Sample i's views all carry label i.
pub fn view_labels(batch_size: usize, views: usize, device: &Device) -> Result<Tensor> {
    if batch_size == 0 || views == 0 {
        bail!("view_labels needs at least one sample and one view, got batch_size {batch_size}, views {views}")
    }
    let labels: Vec<u32> = (0..views).flat_map(|_| 0..batch_size as u32).collect();
    Tensor::from_vec(labels, views * batch_size, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::pairs::label_positive_mask;

    #[test]
    fn labels_are_view_major() -> Result<()> {
        let labels = view_labels(3, 2, &Device::Cpu)?.to_vec1::<u32>()?;
        assert_eq!(labels, vec![0, 1, 2, 0, 1, 2]);
        Ok(())
    }

    #[test]
    fn each_view_positive_is_the_same_sample_in_the_other_views() -> Result<()> {
        let (n, views) = (3, 3);
        let mask = label_positive_mask(&view_labels(n, views, &Device::Cpu)?)?.to_vec2::<f32>()?;
        for (i, row) in mask.iter().enumerate() {
            for (j, &value) in row.iter().enumerate() {
                let expected = i != j && i % n == j % n;
                assert_eq!(value, if expected { 1.0 } else { 0.0 }, "mask[{i}][{j}]");
            }
        }
        Ok(())
    }
}
