//! MoCo's memory queue (He et al. 2020): a FIFO of the K most recent momentum-encoder keys, used
//! as negatives so that their number is decoupled from the batch size (K = 4096..65536).

use candle_core::{bail, DType, Device, Result, Tensor};

use contrastive_kernels::l2_normalize;

/// A fixed-size FIFO of past keys (`[K, D]`, F32). It starts full of random unit vectors, as in
/// MoCo, so every slot is always a valid negative; each [`push`](Self::push) overwrites the oldest
/// entries. Stored keys never carry gradient.
pub struct MemoryQueue {
    keys: Tensor,
    /// Row that the next pushed key overwrites; the oldest key lives here.
    next: usize,
}

impl MemoryQueue {
    /// A queue of `size` random L2-normalised `dim`-dimensional F32 vectors.
    pub fn new(size: usize, dim: usize, device: &Device) -> Result<Self> {
        if size == 0 || dim == 0 {
            bail!("a memory queue needs size > 0 and dim > 0, got size {size}, dim {dim}")
        }
        let random = Tensor::randn(0f32, 1f32, (size, dim), device)?;
        Ok(Self { keys: l2_normalize(&random)?, next: 0 })
    }

    /// Restores a queue saved by [`to_tensor`](Self::to_tensor): `keys` `[K, D]`, oldest first.
    pub fn from_tensor(keys: &Tensor) -> Result<Self> {
        match keys.dims() {
            [size, dim] if *size > 0 && *dim > 0 => {}
            dims => {
                bail!("a memory queue tensor must be a non-empty [K, D] matrix, got shape {dims:?}")
            }
        }
        Ok(Self { keys: keys.detach().to_dtype(DType::F32)?.contiguous()?, next: 0 })
    }

    /// The queue's keys in FIFO order, oldest first, for checkpointing.
    pub fn to_tensor(&self) -> Result<Tensor> {
        if self.next == 0 {
            return Ok(self.keys.clone());
        }
        let size = self.len();
        let oldest = self.keys.narrow(0, self.next, size - self.next)?;
        let newest = self.keys.narrow(0, 0, self.next)?;
        Tensor::cat(&[oldest, newest], 0)
    }

    /// The stored keys `[K, D]` in storage order (a ring buffer: the order does not matter to a loss
    /// that uses them as a set of negatives).
    pub fn keys(&self) -> &Tensor {
        &self.keys
    }

    /// The number of keys, K (the queue is always full).
    pub fn len(&self) -> usize {
        self.keys.dims()[0]
    }

    /// Always false: a queue holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key dimension D.
    pub fn dim(&self) -> usize {
        self.keys.dims()[1]
    }

    /// Enqueues `keys` (`[B, D]`, detached here, stored as F32) over the oldest entries, in order,
    /// wrapping around the end. When B > K only the last K keys survive, as if pushed one by one.
    /// The caller pushes keys already normalised (MoCo enqueues its normalised keys).
    pub fn push(&mut self, keys: &Tensor) -> Result<()> {
        let batch = match keys.dims() {
            [batch, dim] if *dim == self.dim() => *batch,
            dims => bail!("pushed keys must be [B, {}], got shape {dims:?}", self.dim()),
        };
        let keys = keys.detach().to_dtype(DType::F32)?;
        let size = self.len();
        let mut written = 0;
        while written < batch {
            let chunk = (batch - written).min(size - self.next);
            let incoming = keys.narrow(0, written, chunk)?;
            self.keys = self.with_rows_replaced(self.next, &incoming)?;
            written += chunk;
            self.next = (self.next + chunk) % size;
        }
        Ok(())
    }

    /// A copy of the stored keys with rows `start..start + rows.len()` replaced. Builds a new
    /// tensor rather than writing in place, so a `keys()` tensor still used by a loss's graph
    /// keeps its values.
    fn with_rows_replaced(&self, start: usize, rows: &Tensor) -> Result<Tensor> {
        let size = self.len();
        let count = rows.dims()[0];
        let mut parts = Vec::with_capacity(3);
        if start > 0 {
            parts.push(self.keys.narrow(0, 0, start)?);
        }
        parts.push(rows.clone());
        if start + count < size {
            parts.push(self.keys.narrow(0, start + count, size - start - count)?);
        }
        Tensor::cat(&parts, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys whose every entry is `id`, so the queue's contents read as a list of ids.
    fn keys_with_ids(ids: &[f32], dim: usize) -> Result<Tensor> {
        let values: Vec<f32> = ids.iter().flat_map(|&id| std::iter::repeat_n(id, dim)).collect();
        Tensor::from_vec(values, (ids.len(), dim), &Device::Cpu)
    }

    fn ids_oldest_first(queue: &MemoryQueue) -> Result<Vec<f32>> {
        Ok(queue.to_tensor()?.to_vec2::<f32>()?.iter().map(|row| row[0]).collect())
    }

    #[test]
    fn starts_with_random_unit_vectors() -> Result<()> {
        let queue = MemoryQueue::new(16, 8, &Device::Cpu)?;
        assert_eq!((queue.len(), queue.dim()), (16, 8));
        for row in queue.keys().to_vec2::<f32>()? {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        }
        Ok(())
    }

    #[test]
    fn push_overwrites_the_oldest_keys_in_order_and_wraps() -> Result<()> {
        let mut queue = MemoryQueue::from_tensor(&keys_with_ids(&[0., 0., 0., 0.], 2)?)?;
        queue.push(&keys_with_ids(&[1., 2., 3.], 2)?)?;
        assert_eq!(ids_oldest_first(&queue)?, vec![0., 1., 2., 3.]);
        // Three more: the last slot, then wrap to the front (over 1 and 2).
        queue.push(&keys_with_ids(&[4., 5., 6.], 2)?)?;
        assert_eq!(ids_oldest_first(&queue)?, vec![3., 4., 5., 6.]);
        let storage: Vec<f32> = queue.keys().to_vec2::<f32>()?.iter().map(|r| r[0]).collect();
        assert_eq!(storage, vec![5., 6., 3., 4.]);
        Ok(())
    }

    #[test]
    fn a_batch_larger_than_the_queue_keeps_its_last_keys() -> Result<()> {
        let mut queue = MemoryQueue::from_tensor(&keys_with_ids(&[0., 0., 0.], 2)?)?;
        queue.push(&keys_with_ids(&[1.], 2)?)?;
        queue.push(&keys_with_ids(&[2., 3., 4., 5., 6., 7., 8.], 2)?)?;
        assert_eq!(ids_oldest_first(&queue)?, vec![6., 7., 8.]);
        Ok(())
    }

    #[test]
    fn checkpoint_round_trip_keeps_fifo_order() -> Result<()> {
        let mut queue = MemoryQueue::from_tensor(&keys_with_ids(&[0., 0., 0.], 1)?)?;
        queue.push(&keys_with_ids(&[1., 2., 3., 4.], 1)?)?;
        let mut restored = MemoryQueue::from_tensor(&queue.to_tensor()?)?;
        assert_eq!(ids_oldest_first(&restored)?, vec![2., 3., 4.]);
        restored.push(&keys_with_ids(&[5.], 1)?)?;
        queue.push(&keys_with_ids(&[5.], 1)?)?;
        assert_eq!(ids_oldest_first(&restored)?, ids_oldest_first(&queue)?);
        assert_eq!(ids_oldest_first(&restored)?, vec![3., 4., 5.]);
        Ok(())
    }

    #[test]
    fn pushed_keys_carry_no_gradient() -> Result<()> {
        let mut queue = MemoryQueue::new(4, 2, &Device::Cpu)?;
        let var = candle_core::Var::from_tensor(&keys_with_ids(&[1., 2.], 2)?)?;
        queue.push(var.as_tensor())?;
        let grads = queue.keys().sum_all()?.backward()?;
        assert!(grads.get(var.as_tensor()).is_none());
        Ok(())
    }

    #[test]
    fn rejects_keys_of_the_wrong_dimension() -> Result<()> {
        let mut queue = MemoryQueue::new(4, 3, &Device::Cpu)?;
        let err = queue.push(&keys_with_ids(&[1.], 2)?).unwrap_err().to_string();
        assert!(err.contains("[B, 3]"), "{err}");
        Ok(())
    }
}
