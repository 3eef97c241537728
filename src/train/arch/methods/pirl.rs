//! PIRL (Misra & van der Maaten 2020, "Self-Supervised Learning of Pretext-Invariant
//! Representations"): synchronous asymmetric.
//!
//! - image branch: encoder f and projector g on one view, `z_I = g(f(v_I))`;
//! - jigsaw branch: the other view cut into a `grid`×`grid` jigsaw, every cell through the same
//!   encoder f and a shared linear head h, the cells' codes concatenated in a random order per
//!   image and mapped by a linear layer j: `z_J = j([h(f(p_π(1))), …, h(f(p_π(G)))])`. The two
//!   branches differ, both are trained by gradient: asymmetric;
//! - pairs: a memory bank holds a running average `m_i` of each image's `z_I`
//!   ([`MemoryBank`], momentum 0.5, starting from the untrained network's projections); each branch's positive is its image's entry, the negatives
//!   `negatives` entries of other images drawn each step;
//! - loss: `L = λ ℓ(z_J, m) + (1 − λ) ℓ(z_I, m)` with λ = `jigsaw_weight` (0.5) and ℓ the
//!   InfoNCE form of the paper's NCE, `−log( e^{z·m_i/τ} / Σ_{k ∈ {i} ∪ negatives} e^{z·m_k/τ} )`,
//!   or the run's instance loss;
//! - after the step: `m_i ← normalise(0.5 m_i + 0.5 z_I)`.
//!
//! The cells are ⌊side/grid⌋ pixels (9 for 28×28), without the paper's random crop inside each
//! cell (85 → 64 pixels), which 9 pixels cannot spare. The jigsaw pass leaves the encoder's
//! batch-norm running statistics as they were: the served encoder sees whole images.

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{Branch, Method, MethodConfig, MethodParts, RunningStats};
use crate::data::Dataset;
use crate::train::arch::Encoder;
use crate::train::augment::patches::patch_grid;
use crate::train::loader::mix_seed;
use crate::train::pairs::MemoryBank;

const BANK: &str = "pirl.memory_bank";

pub struct Pirl {
    config: MethodConfig,
    image: Branch,
    /// h: each cell's features to the projection size.
    cell_head: Linear,
    /// j: the concatenated cells to one vector.
    jigsaw_head: Linear,
    encoder_stats: RunningStats,
    bank: Option<MemoryBank>,
    seed: u64,
    /// The batch's images and image-branch projections, entering the bank after the step.
    pending: Option<(Vec<usize>, Tensor)>,
}

impl Pirl {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Pirl { grid, .. } = &config else { candle_core::bail!("not a PIRL config") };
        if *grid < 2 {
            candle_core::bail!("pirl: the jigsaw grid must be at least 2×2, got {grid}")
        }
        let projector = parts.projector_config();
        let image = parts.branch(&projector)?;
        let dim = projector.out_dim();
        let cell_head = candle_nn::linear(parts.encoder.feature_dim(), dim, parts.vb.pp("jigsaw.cell_head"))?;
        let jigsaw_head = candle_nn::linear(grid * grid * dim, dim, parts.vb.pp("jigsaw.head"))?;
        let encoder_stats = RunningStats::of(parts.varmap, "encoder.");
        Ok(Self { config, image, cell_head, jigsaw_head, encoder_stats, bank: None, seed: parts.seed, pending: None })
    }

    /// `z_J` of every image `[N, C, H, W]`: cells through f and h, concatenated in the order of
    /// `orders[n]` (a permutation of the cells), then j.
    fn jigsaw(&self, images: &Tensor, orders: &[Vec<usize>]) -> Result<Tensor> {
        let MethodConfig::Pirl { grid, .. } = &self.config else { unreachable!("a PIRL config") };
        let [n, c, height, width] = images.dims() else { candle_core::bail!("images must be [N, C, H, W]") };
        let cell = (*height).min(*width) / grid;
        let (cells, rows, columns) = patch_grid(images, cell, cell)?;
        let count = rows * columns;
        let cells = cells.reshape((n * count, *c, cell, cell))?;
        let features = self.encoder_stats.held(|| self.image.encoder.forward_t(&cells, true))?;
        let codes = self.cell_head.forward(&features)?;
        let shuffled: Vec<u32> = orders
            .iter()
            .enumerate()
            .flat_map(|(i, order)| order.iter().map(move |&p| (i * count + p) as u32))
            .collect();
        let shuffled = codes.index_select(&Tensor::new(shuffled, codes.device())?, 0)?;
        self.jigsaw_head.forward(&shuffled.reshape((*n, ()))?)
    }
}

impl Method for Pirl {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, indices: &[usize], step: usize) -> Result<Tensor> {
        let MethodConfig::Pirl { temperature, negatives, jigsaw_weight, grid, loss, .. } = &self.config else {
            unreachable!("a PIRL config")
        };
        let Some(bank) = &self.bank else { candle_core::bail!("pirl: the memory bank is made before the first epoch") };
        let mut rng = StdRng::seed_from_u64(mix_seed(&[self.seed, 0x9121, step as u64]));
        let cells: Vec<usize> = (0..grid * grid).collect();
        let orders: Vec<Vec<usize>> = (0..indices.len())
            .map(|_| {
                let mut order = cells.clone();
                order.shuffle(&mut rng);
                order
            })
            .collect();
        let drawn = bank.draw_negatives(*negatives, &mut rng);
        let z_jigsaw = self.jigsaw(&views[1], &orders)?;
        let z_image = self.image.projector.forward_t(&self.image.encoder.forward_t(&views[0], true)?, true)?;
        let jigsaw_loss = loss.loss(&bank.contrast(&z_jigsaw, indices, &drawn)?, *temperature)?;
        let image_loss = loss.loss(&bank.contrast(&z_image, indices, &drawn)?, *temperature)?;
        self.pending = Some((indices.to_vec(), z_image.detach()));
        (jigsaw_loss * *jigsaw_weight)? + (image_loss * (1.0 - jigsaw_weight))?
    }

    /// Makes the bank when the run starts (not when a checkpoint brought one of the right size):
    /// every image's entry is the untrained network's projection of it. The paper starts from
    /// random vectors, which a short run spends its first epoch learning to match.
    fn before_epoch(&mut self, train: &Dataset, _epoch: usize) -> Result<()> {
        let MethodConfig::Pirl { bank_momentum, .. } = &self.config else { unreachable!("a PIRL config") };
        if self.bank.as_ref().is_none_or(|bank| bank.len() != train.len()) {
            let device = self.jigsaw_head.weight().device().clone();
            let image = &self.image;
            let projections = crate::eval::encode(train, &device, 512, |x| {
                image.projector.forward_t(&image.encoder.forward_t(x, false)?, false)
            })?;
            let entries = contrastive_kernels::l2_normalize(&projections)?;
            self.bank = Some(MemoryBank::from_tensor(&entries, *bank_momentum)?);
        }
        Ok(())
    }

    fn after_step(&mut self, _progress: f64) -> Result<()> {
        if let (Some(bank), Some((indices, z))) = (&mut self.bank, self.pending.take()) {
            bank.update(&indices, &z)?;
        }
        Ok(())
    }

    fn encoder(&self) -> &Encoder {
        &self.image.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.image.encoder
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let device = self.jigsaw_head.weight().device();
        self.bank.iter().map(|bank| Ok((BANK.to_string(), bank.to_tensor(device)?))).collect()
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        let MethodConfig::Pirl { bank_momentum, .. } = &self.config else { unreachable!("a PIRL config") };
        if let Some(entries) = buffers.get(BANK) {
            self.bank = Some(MemoryBank::from_tensor(entries, *bank_momentum)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use crate::data::ImageShape;
    use crate::train::arch::methods::named_vars;
    use crate::train::arch::ResNetConfig;

    fn build(varmap: &VarMap) -> Result<Pirl> {
        let encoder = ResNetConfig { widths: vec![4, 8, 8], ..ResNetConfig::canonical(1) }.into();
        let parts = MethodParts::for_test(varmap, &encoder);
        Pirl::new(MethodConfig::default_for("pirl").unwrap(), &parts)
    }

    fn dataset(n: usize) -> Dataset {
        Dataset {
            images: vec![0.5; n * 12 * 12],
            labels: vec![0; n],
            shape: ImageShape::new(1, 12, 12),
            class_names: vec!["one".into()],
        }
    }

    /// The jigsaw branch reads the cells in the given order: swapping the order of two cells is
    /// the same as swapping the cells in the image.
    #[test]
    fn the_jigsaw_code_follows_the_cell_order() -> Result<()> {
        let varmap = VarMap::new();
        let pirl = build(&varmap)?;
        let x = Tensor::randn(0f32, 1., (1, 1, 12, 12), &Device::Cpu)?;
        let identity: Vec<usize> = (0..9).collect();
        let mut swapped = identity.clone();
        swapped.swap(0, 8);
        // The image with its first and last 4×4 cells exchanged.
        let (top, bottom) = (x.narrow(2, 0, 4)?, x.narrow(2, 8, 4)?);
        let first = top.narrow(3, 0, 4)?;
        let last = bottom.narrow(3, 8, 4)?;
        let top = Tensor::cat(&[&last, &top.narrow(3, 4, 8)?], 3)?;
        let bottom = Tensor::cat(&[&bottom.narrow(3, 0, 8)?, &first], 3)?;
        let exchanged = Tensor::cat(&[&top, &x.narrow(2, 4, 4)?, &bottom], 2)?;
        // Evaluation-mode statistics would differ between passes; batch statistics of one image
        // do not depend on the cells' order.
        let a = pirl.jigsaw(&x, &[swapped])?.to_vec2::<f32>()?;
        let b = pirl.jigsaw(&exchanged, &[identity])?.to_vec2::<f32>()?;
        for (u, v) in a[0].iter().zip(&b[0]) {
            assert!((u - v).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        Ok(())
    }

    /// A step trains both heads and the encoder, leaves the running statistics to the image
    /// pass, moves the batch's bank entries, and the bank survives a checkpoint.
    #[test]
    fn a_step_moves_the_batch_entries_and_the_bank_is_checkpointed() -> Result<()> {
        let varmap = VarMap::new();
        let mut pirl = build(&varmap)?;
        pirl.before_epoch(&dataset(6), 0)?;
        let before = pirl.bank.as_ref().unwrap().rows(&(0..6).collect::<Vec<_>>(), &Device::Cpu)?.to_vec2::<f32>()?;
        let views = vec![Tensor::randn(0f32, 1., (2, 1, 12, 12), &Device::Cpu)?; 2];
        let loss = pirl.loss(&views, &Tensor::zeros(2, DType::U32, &Device::Cpu)?, &[1, 4], 0)?;
        let grads = loss.backward()?;
        for name in [
            "encoder.stem.conv.weight",
            "projector.layer1.linear.weight",
            "jigsaw.cell_head.weight",
            "jigsaw.head.weight",
        ] {
            let var = named_vars(&varmap).into_iter().find(|(n, _)| n == name).expect(name).1;
            assert!(grads.get(var.as_tensor()).is_some(), "no gradient reached {name}");
        }
        pirl.after_step(0.0)?;
        let after = pirl.bank.as_ref().unwrap().rows(&(0..6).collect::<Vec<_>>(), &Device::Cpu)?.to_vec2::<f32>()?;
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(b != a, i == 1 || i == 4, "entry {i}");
        }
        let buffers: HashMap<String, Tensor> = pirl.buffers()?.into_iter().collect();
        let mut restored = build(&VarMap::new())?;
        restored.load_buffers(&buffers)?;
        restored.before_epoch(&dataset(6), 1)?;
        let again =
            restored.bank.as_ref().unwrap().rows(&(0..6).collect::<Vec<_>>(), &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(again, after);
        Ok(())
    }
}
