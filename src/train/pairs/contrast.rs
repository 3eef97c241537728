//! One contrastive problem, the meeting point of the pair layer and the loss layer: every anchor
//! against a set of candidates, some of them its positives, the rest its negatives.
//!
//! The methods build it from their projections ([`Contrast::in_batch`] for SimCLR,
//! [`Contrast::with_queue`] for MoCo); the pair strategies of this folder rewrite it (add
//! synthetic negatives, replace positives, drop false negatives); the instance losses of
//! `loss/` score it. Each stage only sees this form, so every strategy works with every loss.

use candle_core::{bail, DType, Result, Tensor, D};

use super::{label_positive_mask, view_labels};
use contrastive_kernels::l2_normalize;

/// Anchors `[A, D]` against shared candidates `[C, D]` and per-anchor private candidates.
/// Every vector is a unit row; weights are constants (no gradient).
#[derive(Debug, Clone)]
pub struct Contrast {
    /// The anchors, with gradient.
    pub anchors: Tensor,
    /// Candidates shared by every anchor (in-batch views, queue keys).
    pub candidates: Tensor,
    /// `[A, C]`: how much candidate c is anchor a's positive (one-hot for instance
    /// discrimination; several or fractional after positive expansion).
    pub positives: Tensor,
    /// `[A, C]`: 1 where candidate c enters anchor a's denominator, 0 where it is left out (the
    /// anchor itself, an eliminated false negative).
    pub denominator: Tensor,
    /// Candidates of one anchor only, `[A, E, D]`, with their positive weights `[A, E]`; all of
    /// them enter their anchor's denominator (MoCHi's synthetic negatives, NNCLR's neighbours).
    pub private: Option<(Tensor, Tensor)>,
    /// Chuang et al.'s class prior τ⁺: the share of negatives that are really positives, for the
    /// debiased estimate of the negative term (set by the `debiased` strategy).
    pub class_prior: Option<f64>,
    /// Each anchor's support views `[A, S, D]`, detached (FNC looks for false negatives with them).
    pub support: Option<Tensor>,
}

/// Which candidates enter an anchor's denominator in [`Contrast::in_batch_views`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denominator {
    /// Every other row of every view (SimCLR, SelfCon).
    AllViews,
    /// Only the rows of the other views: an anchor is contrasted across views, never with its
    /// own view's other samples (CMC).
    OtherViews,
}

/// The scores a loss reads: similarities with the private candidates appended to the shared ones.
pub struct Scores {
    /// Cosine similarities `[A, C + E]`.
    pub cosines: Tensor,
    /// Positive weights `[A, C + E]`.
    pub positives: Tensor,
    /// Denominator weights `[A, C + E]`.
    pub denominator: Tensor,
}

impl Contrast {
    /// SimCLR's problem (Chen et al. 2020): the 2N views of two `[N, D]` batches (normalised
    /// here) are both the anchors and the candidates, view-major; each view's positive is the
    /// other view of its sample, and every view but itself is in its denominator.
    pub fn in_batch(z1: &Tensor, z2: &Tensor) -> Result<Self> {
        Self::in_batch_views(&[z1.clone(), z2.clone()], Denominator::AllViews)
    }

    /// The in-batch problem over any number of views, `views[v]` `[N, D]` each: the V·N rows
    /// (view-major, normalised here) are both the anchors and the candidates, and the other
    /// views of an anchor's sample are its positives (V − 1 of them, weighted equally: SupCon's
    /// L_out over instance labels, as SelfCon's four vectors of two views and two exits).
    /// The denominator holds every row but the anchor ([`Denominator::AllViews`]) or only the
    /// rows of the other views ([`Denominator::OtherViews`], CMC's cross-view contrast).
    pub fn in_batch_views(views: &[Tensor], denominator: Denominator) -> Result<Self> {
        let Some(first) = views.first() else { bail!("the in-batch contrast needs at least two views, got none") };
        if views.len() < 2 {
            bail!("the in-batch contrast needs at least two views, got {}", views.len())
        }
        let batch = expect_matrix("views[0]", first)?.0;
        if let Some(other) = views.iter().find(|v| v.dims() != first.dims()) {
            bail!("every view must have the same shape as the first, {:?}; got {:?}", first.dims(), other.dims())
        }
        let count = views.len();
        let z = l2_normalize(&Tensor::cat(views, 0)?)?;
        let (dtype, device) = (z.dtype(), z.device().clone());
        let positives = label_positive_mask(&view_labels(batch, count, &device)?)?.to_dtype(dtype)?;
        let rows = count * batch;
        let denominator = match denominator {
            Denominator::AllViews => (1.0 - Tensor::eye(rows, dtype, &device)?)?,
            Denominator::OtherViews => {
                let view_of: Vec<u32> = (0..rows).map(|r| (r / batch) as u32).collect();
                let same_view = label_positive_mask(&Tensor::new(view_of, &device)?)?;
                (1.0 - (same_view + Tensor::eye(rows, DType::F32, &device)?)?)?.to_dtype(dtype)?
            }
        };
        Ok(Self::new(z.clone(), z, positives, denominator))
    }

    /// MoCo's problem (He et al. 2020): queries `q` `[N, D]` against their own keys `k` (the
    /// positives) and the queue's keys (negatives); keys and queue carry no gradient. The other
    /// queries' keys are not candidates of a query (MoCo's logits are `[q·k⁺, q·queue]`).
    pub fn with_queue(q: &Tensor, k: &Tensor, queue: &Tensor) -> Result<Self> {
        let (batch, dim) = expect_matrix("q", q)?;
        if k.dims() != q.dims() {
            bail!("q and k must have the same shape, got {:?} and {:?}", q.dims(), k.dims())
        }
        let (size, queue_dim) = expect_matrix("queue", queue)?;
        if queue_dim != dim {
            bail!("queue keys must have the query dimension {dim}, got {queue_dim}")
        }
        let anchors = l2_normalize(q)?;
        let (dtype, device) = (anchors.dtype(), anchors.device().clone());
        let keys = l2_normalize(&k.detach())?;
        let candidates = Tensor::cat(&[&keys, &queue.detach().to_dtype(dtype)?], 0)?;
        let own_key = Tensor::eye(batch, dtype, &device)?;
        let positives = Tensor::cat(&[&own_key, &Tensor::zeros((batch, size), dtype, &device)?], 1)?;
        let denominator = Tensor::cat(&[&own_key, &Tensor::ones((batch, size), dtype, &device)?], 1)?;
        Ok(Self::new(anchors, candidates, positives, denominator))
    }

    pub fn new(anchors: Tensor, candidates: Tensor, positives: Tensor, denominator: Tensor) -> Self {
        Self { anchors, candidates, positives, denominator, private: None, class_prior: None, support: None }
    }

    pub fn anchor_count(&self) -> usize {
        self.anchors.dims()[0]
    }

    /// The negatives of each anchor, `[A, C]`: in its denominator and not its positive.
    pub fn negatives(&self) -> Result<Tensor> {
        negative_weights(&self.positives, &self.denominator)
    }

    /// Each anchor's positive centre `[A, D]`: the positive-weighted mean of its candidates,
    /// private ones included, detached and normalised.
    pub fn positive_centres(&self) -> Result<Tensor> {
        let mut centre = self.positives.matmul(&self.candidates.detach())?;
        if let Some((private, weights)) = &self.private {
            centre = (centre + weights.unsqueeze(1)?.matmul(private)?.squeeze(1)?)?;
        }
        l2_normalize(&centre)
    }

    /// Adds private candidates `[A, E, D]` with positive weights `[A, E]` after those already there.
    pub fn add_private(&mut self, candidates: Tensor, positive_weights: Tensor) -> Result<()> {
        let (candidates, weights) = (candidates.detach(), positive_weights.to_dtype(self.positives.dtype())?);
        self.private = Some(match self.private.take() {
            None => (candidates, weights),
            Some((old, old_weights)) => {
                (Tensor::cat(&[&old, &candidates], 1)?, Tensor::cat(&[&old_weights, &weights], 1)?)
            }
        });
        Ok(())
    }

    /// Makes `replacement` (`[A, D]`, one unit row per anchor, detached here) each anchor's only
    /// positive; the old positives leave both of its sums (NNCLR, feature-space hard pairs).
    pub fn replace_positives(&mut self, replacement: &Tensor) -> Result<()> {
        self.denominator = self.negatives()?;
        self.positives = self.positives.zeros_like()?;
        if let Some((_, weights)) = &mut self.private {
            *weights = weights.zeros_like()?;
        }
        let weights = Tensor::ones((self.anchor_count(), 1), self.positives.dtype(), replacement.device())?;
        self.add_private(replacement.unsqueeze(1)?, weights)
    }

    /// Every similarity and weight the losses need, the private candidates appended.
    pub fn scores(&self) -> Result<Scores> {
        let dims = (self.anchor_count(), self.candidates.dims()[0]);
        for (name, weights) in [("positives", &self.positives), ("denominator", &self.denominator)] {
            if weights.dims() != [dims.0, dims.1] {
                bail!("{name} weights must be [{}, {}], got {:?}", dims.0, dims.1, weights.dims())
            }
        }
        let dtype = self.anchors.dtype();
        let shared = self.anchors.matmul(&self.candidates.to_dtype(dtype)?.t()?)?;
        let positives = self.positives.to_dtype(dtype)?;
        let denominator = self.denominator.to_dtype(dtype)?;
        Ok(match &self.private {
            None => Scores { cosines: shared, positives, denominator },
            Some((private, weights)) => {
                // [A, 1, D] x [A, D, E] -> [A, E]
                let own = self.anchors.unsqueeze(1)?.matmul(&private.to_dtype(dtype)?.transpose(1, 2)?)?.squeeze(1)?;
                Scores {
                    cosines: Tensor::cat(&[&shared, &own], 1)?,
                    positives: Tensor::cat(&[&positives, &weights.to_dtype(dtype)?], 1)?,
                    denominator: Tensor::cat(&[&denominator, &weights.ones_like()?.to_dtype(dtype)?], 1)?,
                }
            }
        })
    }
}

impl Scores {
    /// The negatives' indicator `[A, C + E]`.
    pub fn negatives(&self) -> Result<Tensor> {
        negative_weights(&self.positives, &self.denominator)
    }

    /// Each anchor's positive-weighted mean cosine `[A]` and whether it has a positive `[A]`.
    pub fn positive_cosine(&self) -> Result<(Tensor, Tensor)> {
        let total = self.positives.sum(D::Minus1)?;
        let has_positive = total.gt(0.0)?.to_dtype(self.cosines.dtype())?;
        let mean = ((&self.cosines * &self.positives)?.sum(D::Minus1)? / total.maximum(1e-30)?)?;
        Ok((mean, has_positive))
    }
}

/// The candidates in an anchor's denominator that are not its positives.
fn negative_weights(positives: &Tensor, denominator: &Tensor) -> Result<Tensor> {
    denominator * positives.eq(0.0)?.to_dtype(denominator.dtype())?
}

fn expect_matrix(name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match (t.dims(), t.dtype()) {
        ([rows, cols], DType::F32 | DType::F64 | DType::F16 | DType::BF16) if *rows > 0 && *cols > 0 => {
            Ok((*rows, *cols))
        }
        (dims, dtype) => bail!("{name} must be a non-empty float [N, D] matrix, got shape {dims:?} of {dtype:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(values: &[[f64; 2]]) -> Tensor {
        let flat: Vec<f64> = values.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (values.len(), 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn in_batch_pairs_each_view_with_the_other_view_of_its_sample() -> Result<()> {
        let c = Contrast::in_batch(&rows(&[[1., 0.], [0., 2.]]), &rows(&[[3., 0.], [0., 1.]]))?;
        assert_eq!(
            c.positives.to_vec2::<f64>()?,
            vec![vec![0., 0., 1., 0.], vec![0., 0., 0., 1.], vec![1., 0., 0., 0.], vec![0., 1., 0., 0.]]
        );
        let negatives = c.negatives()?.to_vec2::<f64>()?;
        assert_eq!(negatives[0], vec![0., 1., 0., 1.]);
        let s = c.scores()?;
        // Unit rows: view 0 of sample 0 is (1, 0), its positive (1, 0).
        assert_eq!(s.cosines.to_vec2::<f64>()?[0], vec![1., 0., 1., 0.]);
        Ok(())
    }

    #[test]
    fn views_beyond_two_are_all_positives_and_cmc_contrasts_across_views_only() -> Result<()> {
        let z = [rows(&[[1., 0.], [0., 1.]]), rows(&[[2., 0.], [0., 3.]]), rows(&[[1., 1.], [1., -1.]])];
        let all = Contrast::in_batch_views(&z, Denominator::AllViews)?;
        // Rows: view-major, so row 0 is sample 0 of view 0, row 3 sample 1 of view 1.
        assert_eq!(all.positives.to_vec2::<f64>()?[0], vec![0., 0., 1., 0., 1., 0.]);
        assert_eq!(all.positives.to_vec2::<f64>()?[3], vec![0., 1., 0., 0., 0., 1.]);
        assert_eq!(all.denominator.to_vec2::<f64>()?[3], vec![1., 1., 1., 0., 1., 1.]);
        let across = Contrast::in_batch_views(&z[..2], Denominator::OtherViews)?;
        assert_eq!(
            across.denominator.to_vec2::<f64>()?,
            vec![vec![0., 0., 1., 1.], vec![0., 0., 1., 1.], vec![1., 1., 0., 0.], vec![1., 1., 0., 0.]]
        );
        assert_eq!(across.negatives()?.to_vec2::<f64>()?[0], vec![0., 0., 0., 1.]);
        let err = Contrast::in_batch_views(&z[..1], Denominator::AllViews).unwrap_err().to_string();
        assert!(err.contains("at least two views"), "{err}");
        Ok(())
    }

    #[test]
    fn with_queue_keeps_other_queries_keys_out() -> Result<()> {
        let q = rows(&[[1., 0.], [0., 1.]]);
        let c = Contrast::with_queue(&q, &q, &rows(&[[0.6, 0.8]]))?;
        assert_eq!(c.positives.to_vec2::<f64>()?, vec![vec![1., 0., 0.], vec![0., 1., 0.]]);
        assert_eq!(c.denominator.to_vec2::<f64>()?, vec![vec![1., 0., 1.], vec![0., 1., 1.]]);
        Ok(())
    }

    #[test]
    fn private_candidates_are_scored_against_their_own_anchor_only() -> Result<()> {
        let q = rows(&[[1., 0.], [0., 1.]]);
        let mut c = Contrast::with_queue(&q, &q, &rows(&[[0.6, 0.8]]))?;
        // Anchor 0 gets (0, 1) and anchor 1 gets (0.6, 0.8), the second one a positive.
        let private = Tensor::new(&[[[0., 1.]], [[0.6, 0.8]]], &Device::Cpu)?;
        c.add_private(private, Tensor::new(&[[0.], [1.]], &Device::Cpu)?)?;
        let s = c.scores()?;
        assert_eq!(s.cosines.to_vec2::<f64>()?, vec![vec![1., 0., 0.6, 0.], vec![0., 1., 0.8, 0.8]]);
        assert_eq!(s.positives.to_vec2::<f64>()?[1], vec![0., 1., 0., 1.]);
        assert_eq!(s.denominator.to_vec2::<f64>()?[1], vec![0., 1., 1., 1.]);
        let (mean, has) = s.positive_cosine()?;
        assert_eq!(mean.to_vec1::<f64>()?, vec![1.0, 0.9]);
        assert_eq!(has.to_vec1::<f64>()?, vec![1.0, 1.0]);
        Ok(())
    }
}
