//! Reproducible weight initialisation. candle's CPU device cannot be seeded, so variables are
//! drawn here from a generator seeded by the run's seed and the variable's name: the same seed
//! gives the same network whatever the order in which layers are built.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};

/// A [`VarMap`] backend that creates missing variables from `(seed, name)`.
struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// A builder whose new variables go into `varmap`, initialised from `seed` and their names.
pub fn seeded_var_builder<'a>(varmap: &VarMap, seed: u64, device: &Device) -> VarBuilder<'a> {
    VarBuilder::from_backend(Box::new(SeededVarMap { varmap: varmap.clone(), seed }), DType::F32, device.clone())
}

/// FNV-1a of the name, mixed with the seed.
fn name_seed(seed: u64, name: &str) -> u64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    hash ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn sample(init: Init, shape: &Shape, rng: &mut StdRng) -> Result<Vec<f32>> {
    let n = shape.elem_count();
    let uniform = |lo: f64, up: f64, rng: &mut StdRng| -> Result<Vec<f32>> {
        let dist = Uniform::new(lo, up).map_err(candle_core::Error::wrap)?;
        Ok((0..n).map(|_| dist.sample(rng) as f32).collect())
    };
    let normal = |mean: f64, stdev: f64, rng: &mut StdRng| -> Result<Vec<f32>> {
        let dist = Normal::new(mean, stdev).map_err(candle_core::Error::wrap)?;
        Ok((0..n).map(|_| dist.sample(rng) as f32).collect())
    };
    match init {
        Init::Const(value) => Ok(vec![value as f32; n]),
        Init::Uniform { lo, up } => uniform(lo, up, rng),
        Init::Randn { mean, stdev } => normal(mean, stdev, rng),
        Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => uniform(-(3f64.sqrt()) * std, 3f64.sqrt() * std, rng),
                NormalOrUniform::Normal => normal(0.0, std, rng),
            }
        }
    }
}

/// A standard-normal `[rows, cols]` tensor drawn from `(seed, name)`, for buffers that are not
/// variables (MoCo's initial queue).
pub fn seeded_randn(rows: usize, cols: usize, seed: u64, name: &str, device: &Device) -> Result<Tensor> {
    let shape = Shape::from((rows, cols));
    let values =
        sample(Init::Randn { mean: 0.0, stdev: 1.0 }, &shape, &mut StdRng::seed_from_u64(name_seed(seed, name)))?;
    Tensor::from_vec(values, shape, device)
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut vars = self.varmap.data().lock().expect("varmap lock");
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("variable {name} exists with shape {:?}, asked for {shape:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let values = sample(init, &shape, &mut StdRng::seed_from_u64(name_seed(self.seed, name)))?;
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)?;
        vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> Result<Tensor> {
        candle_core::bail!("variable {name} must be created with a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("varmap lock").contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() -> Result<()> {
        let draw = |seed: u64| -> Result<Vec<f32>> {
            let varmap = VarMap::new();
            let vb = seeded_var_builder(&varmap, seed, &Device::Cpu);
            vb.get_with_hints((4, 8), "layer.weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?.flatten_all()?.to_vec1()
        };
        assert_eq!(draw(1)?, draw(1)?);
        assert_ne!(draw(1)?, draw(2)?);
        Ok(())
    }

    #[test]
    fn kaiming_uniform_respects_its_bound_and_constants_are_exact() -> Result<()> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 0, &Device::Cpu);
        // fan-in 50, ReLU gain √2: bound = √3 · √2 / √50 = √(6/50).
        let w = vb
            .get_with_hints((20, 50), "w", candle_nn::init::DEFAULT_KAIMING_UNIFORM)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bound = (6.0f32 / 50.0).sqrt();
        assert!(w.iter().all(|x| x.abs() <= bound) && w.iter().any(|x| x.abs() > 0.8 * bound));
        let c = vb.get_with_hints(3, "c", Init::Const(1.5))?.to_vec1::<f32>()?;
        assert_eq!(c, vec![1.5; 3]);
        assert_eq!(varmap.all_vars().len(), 2, "variables land in the VarMap");
        Ok(())
    }
}
