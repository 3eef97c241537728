//! MoCo v2 (He et al. 2020, "Momentum Contrast"; Chen et al. 2020, "Improved Baselines"):
//! asynchronous symmetric.
//!
//! - query branch: encoder + MLP projector, trained by gradient;
//! - key branch: the same architecture, updated as `θ_k ← m θ_k + (1 − m) θ_q`, no gradient;
//! - pairs: the key of the other view is the positive, a FIFO queue of past keys the negatives;
//! - loss: InfoNCE against the queue, symmetrised over the two views (as in MoCo v2+/v3);
//! - after each step: momentum update, then the batch's keys enter the queue.
//!
//! Single-device training runs without MoCo's shuffled batch norm.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::init::seeded_randn;
use crate::train::arch::{EmaPairs, MlpConfig, ResNet};
use crate::train::loss;
use crate::train::pairs::MemoryQueue;

pub struct MocoV2 {
    config: MethodConfig,
    temperature: f64,
    momentum: f64,
    query: Branch,
    key: Branch,
    ema: EmaPairs,
    queue: MemoryQueue,
    pending_keys: Option<Tensor>,
}

impl MocoV2 {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::MocoV2 { temperature, queue_size, momentum } = config else {
            candle_core::bail!("not a MoCo v2 config")
        };
        // MoCo v2's projector has no batch norm.
        let projector = MlpConfig { hidden_batch_norm: false, ..parts.projector_config() };
        let query = parts.branch(&projector)?;
        let (key, ema) = parts.target_branch(&projector)?;
        // MoCo starts the queue with random unit vectors; drawn from the seed so runs repeat.
        let random = seeded_randn(queue_size, projector.out_dim(), parts.seed, "buffer.queue", parts.vb.device())?;
        let queue = MemoryQueue::from_tensor(&loss::l2_normalize(&random)?)?;
        Ok(Self { config, temperature, momentum, query, key, ema, queue, pending_keys: None })
    }
}

impl Method for MocoV2 {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _step: usize) -> Result<Tensor> {
        let q = self.query.project_views(views, true)?;
        let k: Vec<Tensor> = self.key.project_views(views, true)?.iter().map(Tensor::detach).collect();
        let queue = self.queue.keys();
        let l1 = loss::info_nce_with_queue(&q[0], &k[1], queue, self.temperature)?;
        let l2 = loss::info_nce_with_queue(&q[1], &k[0], queue, self.temperature)?;
        self.pending_keys = Some(Tensor::cat(&k, 0)?);
        (l1 + l2)? / 2.0
    }

    fn after_step(&mut self, _progress: f64) -> Result<()> {
        self.ema.update(self.momentum)?;
        if let Some(keys) = self.pending_keys.take() {
            self.queue.push(&loss::l2_normalize(&keys)?)?;
        }
        Ok(())
    }

    fn encoder(&self) -> &ResNet {
        &self.query.encoder
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![("queue".to_string(), self.queue.to_tensor()?)])
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(queue) = buffers.get("queue") {
            self.queue = MemoryQueue::from_tensor(queue)?;
        }
        Ok(())
    }
}
