//! A memory bank of one representation per training image (Wu et al. 2018, as PIRL uses it):
//! each image's entry is a running average of its past projections,
//! `m_i ← normalise(μ m_i + (1 − μ) z_i)`, and negatives are drawn from the other images'
//! entries. Unlike a queue, every image has an entry, and the positive of an anchor can be its
//! own image's entry, smoothed over epochs.

use candle_core::{bail, DType, Device, Result, Tensor};
use rand::seq::index::sample;
use rand::Rng;

use super::Contrast;

pub struct MemoryBank {
    /// `[size × dim]`, row-major, unit rows.
    entries: Vec<f32>,
    dim: usize,
    momentum: f32,
}

impl MemoryBank {
    pub fn len(&self) -> usize {
        self.entries.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries of `indices`, `[indices.len(), dim]`.
    pub fn rows(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let mut out = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            if i >= self.len() {
                bail!("memory bank index {i} is out of range for {} entries", self.len())
            }
            out.extend_from_slice(&self.entries[i * self.dim..(i + 1) * self.dim]);
        }
        Tensor::from_vec(out, (indices.len(), self.dim), device)
    }

    /// NCE's problem for anchors `[A, D]` of the images `own`: each anchor's positive is its
    /// image's entry; the other anchors' entries and the `negatives` drawn by
    /// [`MemoryBank::draw_negatives`] are its negatives, except copies of its own entry.
    pub fn contrast(&self, anchors: &Tensor, own: &[usize], negatives: &[usize]) -> Result<Contrast> {
        let device = anchors.device();
        let mut candidates = own.to_vec();
        candidates.extend_from_slice(negatives);
        let (count, total) = (own.len(), candidates.len());
        let mut positives = vec![0f32; count * total];
        let mut denominator = vec![0f32; count * total];
        for (a, &image) in own.iter().enumerate() {
            positives[a * total + a] = 1.0;
            // Other images' entries are negatives; another copy of its own is not.
            for (c, &candidate) in candidates.iter().enumerate() {
                denominator[a * total + c] = f32::from(c == a || candidate != image);
            }
        }
        let dtype = anchors.dtype();
        let candidates = self.rows(&candidates, device)?.to_dtype(dtype)?;
        let positives = Tensor::from_vec(positives, (count, total), device)?.to_dtype(dtype)?;
        let denominator = Tensor::from_vec(denominator, (count, total), device)?.to_dtype(dtype)?;
        Ok(Contrast::new(contrastive_kernels::l2_normalize(anchors)?, candidates, positives, denominator))
    }

    /// `count` distinct entries drawn uniformly (all of them when the bank is smaller).
    pub fn draw_negatives(&self, count: usize, rng: &mut impl Rng) -> Vec<usize> {
        sample(rng, self.len(), count.min(self.len())).into_vec()
    }

    /// `m_i ← normalise(μ m_i + (1 − μ) z_i)` for the images `indices` and projections `z`
    /// `[indices.len(), dim]` (normalised first).
    pub fn update(&mut self, indices: &[usize], z: &Tensor) -> Result<()> {
        let z = contrastive_kernels::l2_normalize(&z.detach().to_dtype(DType::F32)?)?.to_vec2::<f32>()?;
        if z.len() != indices.len() {
            bail!("memory bank update: {} rows for {} indices", z.len(), indices.len())
        }
        let (mu, dim) = (self.momentum, self.dim);
        for (&i, row) in indices.iter().zip(&z) {
            let entry = &mut self.entries[i * dim..(i + 1) * dim];
            for (m, &v) in entry.iter_mut().zip(row) {
                *m = mu * *m + (1.0 - mu) * v;
            }
            normalise(entry);
        }
        Ok(())
    }

    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.entries, (self.len(), self.dim), device)
    }

    /// A bank with the entries `[size, dim]` of [`MemoryBank::to_tensor`] (a checkpoint's).
    pub fn from_tensor(entries: &Tensor, momentum: f64) -> Result<Self> {
        let (size, dim) = entries.dims2()?;
        let mut bank = Self { entries: vec![0.0; size * dim], dim, momentum: momentum as f32 };
        bank.load(entries)?;
        Ok(bank)
    }

    /// Restores the entries of [`MemoryBank::to_tensor`]; the shape must match.
    pub fn load(&mut self, entries: &Tensor) -> Result<()> {
        if entries.dims() != [self.len(), self.dim] {
            bail!("memory bank of {}×{} cannot load entries of shape {:?}", self.len(), self.dim, entries.dims())
        }
        self.entries = entries.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(())
    }
}

fn normalise(row: &mut [f32]) {
    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    row.iter_mut().for_each(|v| *v /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn entries_average_with_the_new_projection_and_stay_unit() -> Result<()> {
        let mut bank = MemoryBank::from_tensor(&Tensor::new(&[[1f32, 0.], [0., 1.], [0.6, 0.8]], &Device::Cpu)?, 0.5)?;
        bank.update(&[1], &Tensor::new(&[[2f32, 0.]], &Device::Cpu)?)?;
        // (0.5·(0, 1) + 0.5·(1, 0)) normalised.
        let h = 0.5f32.sqrt();
        let rows = bank.rows(&[0, 1, 2], &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(rows[0], vec![1., 0.]);
        assert!((rows[1][0] - h).abs() < 1e-6 && (rows[1][1] - h).abs() < 1e-6, "{rows:?}");
        assert_eq!(rows[2], vec![0.6, 0.8]);
        Ok(())
    }

    /// Anchors of images 2 and 0 against drawn entries 0 and 1, so candidates 2, 0, 0, 1: anchor
    /// 0 (image 2) has its own entry positive and the three others negative; anchor 1 (image 0)
    /// leaves the drawn copy of its own entry out.
    #[test]
    fn the_own_entry_is_the_positive_and_a_drawn_copy_of_it_is_left_out() -> Result<()> {
        let bank = MemoryBank::from_tensor(&Tensor::new(&[[1f32, 0.], [0., 1.], [0.6, 0.8]], &Device::Cpu)?, 0.5)?;
        let anchors = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?;
        let c = bank.contrast(&anchors, &[2, 0], &[0, 1])?;
        assert_eq!(c.positives.to_vec2::<f32>()?, vec![vec![1., 0., 0., 0.], vec![0., 1., 0., 0.]]);
        assert_eq!(c.denominator.to_vec2::<f32>()?, vec![vec![1., 1., 1., 1.], vec![1., 1., 0., 1.]]);
        let drawn = bank.draw_negatives(10, &mut StdRng::seed_from_u64(1));
        let mut sorted = drawn.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2], "a small bank gives all of its entries once");
        Ok(())
    }
}
