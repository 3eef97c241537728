//! Optimisers and schedules: SGD with momentum and weight decay (PyTorch's semantics), LARS
//! (You et al. 2017, as used by SimCLR and BYOL), AdamW (Loshchilov & Hutter 2019); cosine
//! learning-rate decay with linear warm-up; per-parameter gradient clipping (DINO's). candle's
//! own SGD has neither momentum nor decay.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum OptimizerConfig {
    /// `g ← ∇ + λθ; b ← μb + g; θ ← θ − η (nesterov ? g + μb : b)`, decay on every parameter.
    Sgd { momentum: f64, weight_decay: f64, nesterov: bool },
    /// SGD momentum on `g · trust`, `trust = η_t ‖θ‖ / ‖∇ + λθ‖`; biases and norm scales (1-d
    /// parameters) get neither decay nor adaptation, as in SimCLR.
    Lars { momentum: f64, weight_decay: f64, trust_coefficient: f64 },
    /// Adam with decoupled weight decay on matrices and kernels (not on 1-d parameters).
    AdamW { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
}

impl OptimizerConfig {
    pub fn sgd(momentum: f64, weight_decay: f64) -> Self {
        Self::Sgd { momentum, weight_decay, nesterov: false }
    }
    pub fn lars(weight_decay: f64) -> Self {
        Self::Lars { momentum: 0.9, weight_decay, trust_coefficient: 0.001 }
    }
    pub fn adamw(weight_decay: f64) -> Self {
        Self::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }

    /// A peak learning rate for the canonical encoder when nothing else is known: SGD 0.12 (the
    /// PyTorch reference recipe), LARS 4.0 (its step is `η · trust`, with trust ≈ 10⁻³ of each
    /// layer's norm), AdamW 10⁻³.
    pub fn default_learning_rate(&self) -> f64 {
        match self {
            Self::Sgd { .. } => 0.12,
            Self::Lars { .. } => 4.0,
            Self::AdamW { .. } => 1e-3,
        }
    }

    pub fn weight_decay(&self) -> f64 {
        match self {
            Self::Sgd { weight_decay, .. } | Self::Lars { weight_decay, .. } | Self::AdamW { weight_decay, .. } => {
                *weight_decay
            }
        }
    }

    pub fn set_weight_decay(&mut self, value: f64) {
        match self {
            Self::Sgd { weight_decay, .. } | Self::Lars { weight_decay, .. } | Self::AdamW { weight_decay, .. } => {
                *weight_decay = value
            }
        }
    }
}

struct Param {
    name: String,
    var: Var,
    /// Multiplier of the step's learning rate for this parameter.
    lr_scale: f64,
    /// SGD/LARS: `[momentum]`; AdamW: `[m, v]`. Empty until the first step.
    state: Vec<Tensor>,
}

/// A named set of parameters and their optimiser state.
pub struct Optimizer {
    config: OptimizerConfig,
    params: Vec<Param>,
    steps: usize,
    gradient_clip: Option<f64>,
    /// Weight decay at the start and at the end of training, when it follows a schedule.
    weight_decay_schedule: Option<(f64, f64)>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig, params: Vec<(String, Var)>) -> Self {
        let params =
            params.into_iter().map(|(name, var)| Param { name, var, lr_scale: 1.0, state: Vec::new() }).collect();
        Self { config, params, steps: 0, gradient_clip: None, weight_decay_schedule: None }
    }

    /// Scales each parameter's gradient down to L2 norm `max_norm` where it is longer, before
    /// decay and momentum: `g ← g · min(1, max_norm / (‖g‖ + 10⁻⁶))`, one norm per parameter
    /// tensor as DINO's `clip_gradients` (Caron et al. 2021, 3.0 for its ViTs), not one global
    /// norm.
    pub fn with_gradient_clip(mut self, max_norm: Option<f64>) -> Self {
        self.gradient_clip = max_norm;
        self
    }

    /// Moves the weight decay from the configured value to `end` over training by a half cosine,
    /// `λ_t = λ_end + (λ_0 − λ_end)(1 + cos(π t/T))/2`, as DINO's ViT recipe (Caron et al. 2021:
    /// 0.04 → 0.4); [`Optimizer::schedule_weight_decay`] sets it before each step.
    pub fn with_weight_decay_schedule(mut self, end: Option<f64>) -> Self {
        self.weight_decay_schedule = end.map(|end| (self.config.weight_decay(), end));
        self
    }

    /// The scheduled weight decay for step `step` of `total_steps` (nothing without a schedule).
    pub fn schedule_weight_decay(&mut self, step: usize, total_steps: usize) {
        if let Some((start, end)) = self.weight_decay_schedule {
            self.config.set_weight_decay(half_cosine(start, end, step as f64 / total_steps.max(1) as f64));
        }
    }

    /// The weight decay the next step uses.
    pub fn weight_decay(&self) -> f64 {
        self.config.weight_decay()
    }

    /// Multiplies the learning rate of every parameter whose name starts with `prefix` by
    /// `factor` (a method's faster predictor); returns how many parameters it applies to.
    pub fn scale_learning_rate(&mut self, prefix: &str, factor: f64) -> usize {
        let matching = self.params.iter_mut().filter(|p| p.name.starts_with(prefix));
        matching.map(|p| p.lr_scale *= factor).count()
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for param in &mut self.params {
            let Some(grad) = grads.get(param.var.as_tensor()) else { continue };
            // Gradients carry the step's backward graph; optimiser state built from them would
            // keep every step's graph alive through the momentum chain.
            let grad = &match self.gradient_clip {
                Some(max_norm) => clipped(&grad.detach(), max_norm)?,
                None => grad.detach(),
            };
            let theta = &param.var.as_tensor().detach();
            let is_vector = theta.rank() <= 1;
            let update = match self.config {
                OptimizerConfig::Sgd { momentum, weight_decay, nesterov } => {
                    let g = with_decay(grad, theta, weight_decay)?;
                    let buf = momentum_buffer(&mut param.state, &g, momentum)?;
                    if nesterov {
                        (g + (&buf * momentum)?)?
                    } else {
                        buf
                    }
                }
                OptimizerConfig::Lars { momentum, weight_decay, trust_coefficient } => {
                    let g = if is_vector {
                        grad.clone()
                    } else {
                        let g = with_decay(grad, theta, weight_decay)?;
                        let (w_norm, g_norm) = (l2_norm(theta)?, l2_norm(&g)?);
                        let trust =
                            if w_norm > 0.0 && g_norm > 0.0 { trust_coefficient * w_norm / g_norm } else { 1.0 };
                        (g * trust)?
                    };
                    momentum_buffer(&mut param.state, &g, momentum)?
                }
                OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay } => {
                    if param.state.is_empty() {
                        param.state = vec![grad.zeros_like()?, grad.zeros_like()?];
                    }
                    let m = ((&param.state[0] * beta1)? + (grad * (1.0 - beta1))?)?;
                    let v = ((&param.state[1] * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
                    let m_hat = (&m / (1.0 - beta1.powi(t)))?;
                    let v_hat = (&v / (1.0 - beta2.powi(t)))?;
                    param.state = vec![m, v];
                    let adam = (m_hat / (v_hat.sqrt()? + eps)?)?;
                    if is_vector {
                        adam
                    } else {
                        (adam + (theta * weight_decay)?)?
                    }
                }
            };
            param.var.set(&(theta - (update * (lr * param.lr_scale))?)?)?;
        }
        Ok(())
    }

    /// Optimiser state by name, for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for param in &self.params {
            for (i, t) in param.state.iter().enumerate() {
                out.insert(format!("{}.{}", param.name, i), t.clone());
            }
        }
        out.insert("steps".into(), Tensor::new(&[self.steps as u32], &candle_core::Device::Cpu).expect("a scalar"));
        out
    }

    /// Restores state saved by [`Optimizer::state_tensors`]; parameters missing from it start
    /// fresh.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>) -> Result<()> {
        if let Some(steps) = tensors.remove("steps") {
            self.steps = steps.to_vec1::<u32>()?[0] as usize;
        }
        for param in &mut self.params {
            let device = param.var.device().clone();
            param.state = (0..)
                .map_while(|i| tensors.remove(&format!("{}.{}", param.name, i)))
                .map(|t| t.to_device(&device))
                .collect::<Result<_>>()?;
        }
        Ok(())
    }
}

fn clipped(grad: &Tensor, max_norm: f64) -> Result<Tensor> {
    let coefficient = max_norm / (l2_norm(grad)? + 1e-6);
    if coefficient < 1.0 {
        grad * coefficient
    } else {
        Ok(grad.clone())
    }
}

fn with_decay(grad: &Tensor, theta: &Tensor, weight_decay: f64) -> Result<Tensor> {
    if weight_decay == 0.0 {
        Ok(grad.clone())
    } else {
        grad + (theta * weight_decay)?
    }
}

/// `b ← μb + g` (the first step sets `b = g`, as PyTorch); returns the new buffer.
fn momentum_buffer(state: &mut Vec<Tensor>, g: &Tensor, momentum: f64) -> Result<Tensor> {
    let buf = match state.first() {
        Some(b) => ((b * momentum)? + g)?,
        None => g.clone(),
    };
    *state = vec![buf.clone()];
    Ok(buf)
}

fn l2_norm(t: &Tensor) -> Result<f64> {
    t.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>().map(f64::sqrt)
}

/// Linear warm-up to `base` over `warmup_steps`, then cosine decay to `base · final_fraction`
/// at `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub base: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub final_fraction: f64,
}

impl LrSchedule {
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        half_cosine(self.base, self.base * self.final_fraction, (step - self.warmup_steps) as f64 / span)
    }
}

/// From `start` at progress 0 to `end` at progress 1 (and after) along a half cosine:
/// `end + (start − end)(1 + cos(π p))/2`, the shape of the learning-rate and weight-decay schedules.
fn half_cosine(start: f64, end: f64, progress: f64) -> f64 {
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
    end + (start - end) * cosine
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn quadratic_grads(var: &Var) -> Result<GradStore> {
        // f(θ) = ½ Σ θ², so ∇ = θ.
        (var.as_tensor().sqr()?.sum_all()? * 0.5)?.backward()
    }

    #[test]
    fn sgd_momentum_and_decay_follow_pytorch() -> Result<()> {
        let var = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
        let mut opt = Optimizer::new(OptimizerConfig::sgd(0.9, 0.1), vec![("w".into(), var.clone())]);
        // Step 1: g = θ + 0.1θ = 1.1θ; b = g; θ ← θ − 0.5·1.1θ = 0.45θ.
        opt.step(&quadratic_grads(&var)?, 0.5)?;
        let w1 = var.as_tensor().to_vec1::<f64>()?;
        assert!((w1[0] - 0.45).abs() < 1e-12 && (w1[1] + 0.9).abs() < 1e-12, "{w1:?}");
        // Step 2: g = 1.1·0.45 = 0.495; b = 0.9·1.1 + 0.495 = 1.485; θ = 0.45 − 0.5·1.485 = −0.2925.
        opt.step(&quadratic_grads(&var)?, 0.5)?;
        let w2 = var.as_tensor().to_vec1::<f64>()?;
        assert!((w2[0] + 0.2925).abs() < 1e-12, "{w2:?}");
        Ok(())
    }

    /// Two parameters, clip 2.5: ∇ = θ = [3, 4] (‖∇‖ = 5) is scaled by 2.5/(5 + 10⁻⁶) to about
    /// [1.5, 2]; ∇ = [0.6, 0.8] (‖∇‖ = 1) is left alone. Plain SGD at lr 1 subtracts them.
    #[test]
    fn gradient_clipping_bounds_each_parameters_norm() -> Result<()> {
        let long = Var::new(&[3.0f64, 4.0], &Device::Cpu)?;
        let short = Var::new(&[0.6f64, 0.8], &Device::Cpu)?;
        let params = vec![("long".into(), long.clone()), ("short".into(), short.clone())];
        let mut opt = Optimizer::new(OptimizerConfig::sgd(0.0, 0.0), params).with_gradient_clip(Some(2.5));
        let loss = ((long.as_tensor().sqr()?.sum_all()? + short.as_tensor().sqr()?.sum_all()?)? * 0.5)?;
        opt.step(&loss.backward()?, 1.0)?;
        let scale = 2.5 / (5.0 + 1e-6);
        let expected = [3.0 - 3.0 * scale, 4.0 - 4.0 * scale];
        let got = long.as_tensor().to_vec1::<f64>()?;
        assert!(got.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-12), "{got:?}");
        assert!((got[0] - 1.5).abs() < 1e-6 && (got[1] - 2.0).abs() < 1e-6, "{got:?}");
        assert_eq!(short.as_tensor().to_vec1::<f64>()?, vec![0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn lars_scales_the_step_by_the_trust_ratio() -> Result<()> {
        let var = Var::new(&[[3.0f64, 4.0]], &Device::Cpu)?; // ‖θ‖ = 5
        let mut opt = Optimizer::new(
            OptimizerConfig::Lars { momentum: 0.9, weight_decay: 0.0, trust_coefficient: 0.1 },
            vec![("w".into(), var.clone())],
        );
        // ∇ = θ, ‖∇‖ = 5: trust = 0.1·5/5 = 0.1; θ ← θ − 1·0.1θ = 0.9θ.
        opt.step(&quadratic_grads(&var)?, 1.0)?;
        let w = var.as_tensor().to_vec2::<f64>()?;
        assert!((w[0][0] - 2.7).abs() < 1e-12 && (w[0][1] - 3.6).abs() < 1e-12, "{w:?}");
        Ok(())
    }

    #[test]
    fn a_scaled_prefix_steps_that_much_further() -> Result<()> {
        let (encoder, predictor) = (Var::new(&[1.0f64], &Device::Cpu)?, Var::new(&[1.0f64], &Device::Cpu)?);
        let mut opt = Optimizer::new(
            OptimizerConfig::sgd(0.0, 0.0),
            vec![("encoder.w".into(), encoder.clone()), ("predictor.w".into(), predictor.clone())],
        );
        assert_eq!(opt.scale_learning_rate("predictor.", 10.0), 1);
        let loss = ((encoder.as_tensor().sqr()? + predictor.as_tensor().sqr()?)?.sum_all()? * 0.5)?;
        // ∇ = θ = 1: the encoder moves by lr = 0.01, the predictor by 10·lr.
        opt.step(&loss.backward()?, 0.01)?;
        assert!((encoder.as_tensor().to_vec1::<f64>()?[0] - 0.99).abs() < 1e-12);
        assert!((predictor.as_tensor().to_vec1::<f64>()?[0] - 0.9).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr() -> Result<()> {
        // With bias correction the first Adam step is lr · sign(∇) (up to eps).
        let var = Var::new(&[[2.0f64, -0.5]], &Device::Cpu)?;
        let mut opt = Optimizer::new(OptimizerConfig::adamw(0.0), vec![("w".into(), var.clone())]);
        opt.step(&quadratic_grads(&var)?, 0.1)?;
        let w = var.as_tensor().to_vec2::<f64>()?;
        assert!((w[0][0] - 1.9).abs() < 1e-6 && (w[0][1] + 0.4).abs() < 1e-6, "{w:?}");
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let var = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
        let mut a = Optimizer::new(OptimizerConfig::sgd(0.9, 0.0), vec![("w".into(), var.clone())]);
        a.step(&quadratic_grads(&var)?, 0.1)?;
        let mut b = Optimizer::new(OptimizerConfig::sgd(0.9, 0.0), vec![("w".into(), var.clone())]);
        b.load_state(a.state_tensors())?;
        assert_eq!(b.steps(), 1);
        let grads = quadratic_grads(&var)?;
        let before = var.as_tensor().to_vec1::<f64>()?;
        b.step(&grads, 0.1)?;
        // b = 0.9·b₁ + θ₁ where b₁ = θ₀ = [1, −2] and θ₁ = 0.9·θ₀.
        let expected = before[0] - 0.1 * (0.9 * 1.0 + before[0]);
        assert!((var.as_tensor().to_vec1::<f64>()?[0] - expected).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn optimiser_state_holds_no_backward_graph() -> Result<()> {
        // State built from gradients that still carried their graph kept every step's graph
        // alive through the momentum chain (memory grew ~10 MB a step in a full run).
        let var = Var::new(&[[1.0f64, -2.0]], &Device::Cpu)?;
        for config in [OptimizerConfig::sgd(0.9, 1e-4), OptimizerConfig::lars(1e-4), OptimizerConfig::adamw(1e-4)] {
            let mut opt = Optimizer::new(config, vec![("w".into(), var.clone())]);
            let loss = var.as_tensor().matmul(&var.as_tensor().t()?)?.sum_all()?;
            opt.step(&loss.backward()?, 0.1)?;
            assert!(opt.state_tensors().values().all(|t| !t.track_op()));
        }
        Ok(())
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = LrSchedule { base: 1.0, warmup_steps: 10, total_steps: 110, final_fraction: 0.0 };
        assert!((s.at(0) - 0.1).abs() < 1e-12);
        assert!((s.at(9) - 1.0).abs() < 1e-12);
        assert!((s.at(10) - 1.0).abs() < 1e-12);
        assert!((s.at(60) - 0.5).abs() < 1e-12);
        assert!(s.at(110).abs() < 1e-12);
    }

    #[test]
    fn weight_decay_follows_a_half_cosine() {
        let var = candle_core::Var::new(&[1.0f64], &candle_core::Device::Cpu).unwrap();
        let mut optimizer =
            Optimizer::new(OptimizerConfig::adamw(0.04), vec![("w".into(), var)]).with_weight_decay_schedule(Some(0.4));
        // DINO's cosine_scheduler: 0.04 at the start, 0.22 half-way, 0.4 at the end.
        for (step, expected) in [(0, 0.04), (50, 0.22), (100, 0.4), (25, 0.4 - 0.36 * (1.0 + 0.5f64.sqrt()) / 2.0)] {
            optimizer.schedule_weight_decay(step, 100);
            assert!((optimizer.weight_decay() - expected).abs() < 1e-12, "step {step}: {}", optimizer.weight_decay());
        }
        let mut constant = Optimizer::new(OptimizerConfig::adamw(0.05), Vec::new());
        constant.schedule_weight_decay(50, 100);
        assert_eq!(constant.weight_decay(), 0.05);
    }
}
