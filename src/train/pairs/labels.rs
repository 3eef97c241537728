//! Positive pairs from labels: two views are positives when they carry the same label. With
//! class labels this is SupCon's positive expansion (Khosla et al. 2020); with the
//! instance labels of [`super::view_labels`] it is SimCLR's instance discrimination.

use candle_core::{bail, DType, Result, Tensor};

/// The `[M, M]` F32 positive mask of `labels` (`[M]`, any integer or float dtype):
/// `mask[i][j] = 1` when `labels[i] == labels[j]` and `i != j`, else 0 (an anchor is never its
/// own positive).
pub fn label_positive_mask(labels: &Tensor) -> Result<Tensor> {
    let m = match labels.dims() {
        [m] => *m,
        dims => bail!("labels must be a 1-D [M] tensor (one label per view), got shape {dims:?}"),
    };
    let as_column = labels.reshape((m, 1))?.broadcast_as((m, m))?.contiguous()?;
    let as_row = labels.reshape((1, m))?.broadcast_as((m, m))?.contiguous()?;
    let same_label = as_column.eq(&as_row)?.to_dtype(DType::F32)?;
    same_label - Tensor::eye(m, DType::F32, labels.device())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn same_labels_are_positive_except_on_the_diagonal() -> Result<()> {
        for labels in [
            Tensor::new(&[3u32, 1, 3, 2], &Device::Cpu)?,
            Tensor::new(&[3i64, 1, 3, 2], &Device::Cpu)?,
            Tensor::new(&[3u8, 1, 3, 2], &Device::Cpu)?,
        ] {
            let mask = label_positive_mask(&labels)?.to_vec2::<f32>()?;
            let expected = vec![
                vec![0.0, 0.0, 1.0, 0.0],
                vec![0.0, 0.0, 0.0, 0.0],
                vec![1.0, 0.0, 0.0, 0.0],
                vec![0.0, 0.0, 0.0, 0.0],
            ];
            assert_eq!(mask, expected);
        }
        Ok(())
    }

    #[test]
    fn rejects_a_matrix_of_labels() -> Result<()> {
        let labels = Tensor::zeros((2, 2), DType::U32, &Device::Cpu)?;
        let err = label_positive_mask(&labels).unwrap_err().to_string();
        assert!(err.contains("1-D"), "{err}");
        Ok(())
    }
}
