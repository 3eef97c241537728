//! Momentum (exponential moving average) updates of a target network, as in MoCo and BYOL:
//! `θ_target ← m θ_target + (1 − m) θ_online`.

use candle_core::{Result, Var};

/// Pairs of (target, online) parameters updated together.
#[derive(Debug, Clone, Default)]
pub struct EmaPairs {
    pairs: Vec<(Var, Var)>,
}

impl EmaPairs {
    /// Pairs each online parameter with the target parameter of the same name under `prefix`.
    /// Copies the online values into the target, which starts as an exact copy.
    pub fn new(named_online: &[(String, Var)], named_all: &[(String, Var)], target_prefix: &str) -> Result<Self> {
        let mut pairs = Vec::new();
        for (name, online) in named_online {
            let target_name = format!("{target_prefix}{name}");
            let target = named_all
                .iter()
                .find(|(n, _)| *n == target_name)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| candle_core::Error::Msg(format!("no target parameter {target_name} for {name}")))?;
            target.set(online.as_tensor())?;
            pairs.push((target, online.clone()));
        }
        Ok(Self { pairs })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// `θ_target ← m θ_target + (1 − m) θ_online` for every pair.
    pub fn update(&self, momentum: f64) -> Result<()> {
        for (target, online) in &self.pairs {
            let blended = ((target.as_tensor() * momentum)? + (online.as_tensor().detach() * (1.0 - momentum))?)?;
            target.set(&blended)?;
        }
        Ok(())
    }
}

/// BYOL's momentum schedule: `m_k = 1 − (1 − m_0)(cos(πk/K) + 1)/2`, from `m_0` at the start
/// to 1 at the end of training; `progress` is `k/K` in `[0, 1]`.
pub fn cosine_momentum(base: f64, progress: f64) -> f64 {
    1.0 - (1.0 - base) * ((std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos() + 1.0) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn update_matches_the_formula() -> Result<()> {
        let online = Var::new(&[1.0f64, 2.0], &Device::Cpu)?;
        let target = Var::new(&[0.0f64, 0.0], &Device::Cpu)?;
        let named_online = vec![("w".to_string(), online.clone())];
        let all = vec![("w".to_string(), online.clone()), ("target.w".to_string(), target.clone())];
        let ema = EmaPairs::new(&named_online, &all, "target.")?;
        assert_eq!(target.as_tensor().to_vec1::<f64>()?, vec![1.0, 2.0], "target starts as a copy");
        online.set(&Tensor::new(&[3.0f64, -2.0], &Device::Cpu)?)?;
        ema.update(0.9)?;
        // 0.9·1 + 0.1·3 = 1.2; 0.9·2 + 0.1·(−2) = 1.6
        let t = target.as_tensor().to_vec1::<f64>()?;
        assert!((t[0] - 1.2).abs() < 1e-12 && (t[1] - 1.6).abs() < 1e-12, "{t:?}");
        Ok(())
    }

    #[test]
    fn cosine_momentum_goes_from_base_to_one() {
        assert!((cosine_momentum(0.99, 0.0) - 0.99).abs() < 1e-12);
        assert!((cosine_momentum(0.99, 0.5) - 0.995).abs() < 1e-12);
        assert!((cosine_momentum(0.99, 1.0) - 1.0).abs() < 1e-12);
    }
}
