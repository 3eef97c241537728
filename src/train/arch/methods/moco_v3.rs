//! MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
//! Transformers"): asynchronous asymmetric, no queue.
//!
//! - query branch: encoder + projector (batch norm on every layer, the output's too) +
//!   predictor, trained by gradient;
//! - key branch: encoder + projector, an EMA of the query's with momentum rising from
//!   `base_momentum` to 1 on a cosine schedule;
//! - pairs: in the batch: query i's positive is the key of the other view of sample i, the
//!   other keys of that view its negatives (large batches replace MoCo's queue);
//! - loss: `2τ · (ctr(q₁, k₂) + ctr(q₂, k₁))`, `ctr` the InfoNCE cross-entropy
//!   ([`loss::info_nce_in_batch`]); the 2τ factor keeps the gradient's scale independent of τ;
//! - a ViT keeps its patch projection at its random start by default (the paper's fix for the
//!   instability of the first layer, §4.2).

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::{ema::cosine_momentum, EmaPairs, Encoder, Mlp, MlpConfig};
use crate::train::loss;

pub struct MocoV3 {
    config: MethodConfig,
    temperature: f64,
    base_momentum: f64,
    query: Branch,
    predictor: Mlp,
    key: Branch,
    ema: EmaPairs,
}

impl MocoV3 {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::MocoV3 { temperature, base_momentum, predictor_hidden, frozen_patch_embedding } = config
        else {
            candle_core::bail!("not a MoCo v3 config")
        };
        let projector = MlpConfig { output_batch_norm: true, ..parts.projector_config() };
        let mut query = parts.branch(&projector)?;
        if let (true, Encoder::Vit(vit)) = (frozen_patch_embedding, &mut query.encoder) {
            vit.freeze_patch_embedding();
        }
        let out = projector.out_dim();
        let predictor =
            Mlp::new(parts.vb.pp("predictor"), &MlpConfig::new(&[out, predictor_hidden, out]), parts.backend)?;
        let (key, ema) = parts.target_branch(&projector)?;
        Ok(Self { config, temperature, base_momentum, query, predictor, key, ema })
    }
}

impl Method for MocoV3 {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], _step: usize) -> Result<Tensor> {
        let z = self.query.project_views(views, true)?;
        let q = self.predictor.forward_t(&Tensor::cat(&z, 0)?, true)?.chunk(2, 0)?;
        let k = self.key.project_views(views, true)?;
        let t = self.temperature;
        let symmetric = (loss::info_nce_in_batch(&q[0], &k[1], t)? + loss::info_nce_in_batch(&q[1], &k[0], t)?)?;
        symmetric * (2.0 * t)
    }

    fn after_step(&mut self, progress: f64) -> Result<()> {
        self.ema.update(cosine_momentum(self.base_momentum, progress))
    }

    fn encoder(&self) -> &Encoder {
        &self.query.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.query.encoder
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use crate::train::arch::methods::trainable_vars;
    use crate::train::arch::{EncoderConfig, VitConfig};

    fn small_vit() -> EncoderConfig {
        VitConfig { in_channels: 1, patch: 4, position_grid: [2, 2], dim: 8, depth: 1, heads: 2, mlp_ratio: 2 }.into()
    }

    /// One step's gradient reaches the query branch and its predictor, never the keys; with the
    /// frozen patch projection it does not reach the projection either, and the EMA moves the
    /// keys towards the query.
    #[test]
    fn the_query_branch_trains_and_the_key_branch_follows() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let encoder = small_vit();
        let parts = MethodParts::for_test(&varmap, &encoder);
        let mut method = MocoV3::new(MethodConfig::default_for("moco-v3")?, &parts)?;
        let views: Vec<Tensor> =
            (0..2).map(|_| Tensor::rand(0f32, 1f32, (6, 1, 8, 8), &Device::Cpu)).collect::<candle_core::Result<_>>()?;
        let labels = Tensor::zeros(6, DType::U32, &Device::Cpu)?;
        let loss = method.loss(&views, &labels, &[0, 1, 2, 3, 4, 5], 0)?;
        let grads = loss.backward()?;
        for (name, var) in trainable_vars(&varmap) {
            let reached = grads.get(var.as_tensor()).is_some();
            assert_eq!(reached, !name.starts_with("encoder.patch_embed."), "gradient of {name}");
        }
        let named = crate::train::arch::methods::named_vars(&varmap);
        let value = |name: &str| named.iter().find(|(n, _)| n == name).unwrap().1.as_tensor().flatten_all();
        // A copy: the tensor of a variable shares its storage, which the update overwrites.
        let before = value("target.encoder.blocks.0.attn.qkv.weight")?.copy()?;
        assert_eq!(before.to_vec1::<f32>()?, value("encoder.blocks.0.attn.qkv.weight")?.to_vec1::<f32>()?);
        let online = varmap.data().lock().unwrap()["encoder.blocks.0.attn.qkv.weight"].clone();
        online.set(&(online.as_tensor() + 1.0)?)?;
        method.after_step(0.0)?;
        // m = 0.99 at the start: the key weights move 1 % of the way, by 0.01.
        let moved = (value("target.encoder.blocks.0.attn.qkv.weight")? - before)?.to_vec1::<f32>()?;
        assert!(moved.iter().all(|d| (d - 0.01).abs() < 1e-5), "{moved:?}");
        Ok(())
    }
}
