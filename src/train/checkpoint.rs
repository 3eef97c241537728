//! Checkpoints in a run folder: `config.json`, `weights.safetensors` (every parameter, running
//! statistic, momentum target and buffer), `optimizer.safetensors` and `state.json`. Every file
//! is written durably ([`crate::files`]), so an interrupted save leaves the previous checkpoint
//! intact.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::progress::Progress;
use crate::eval::EvalReport;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CURVES_FILE: &str = "curves.png";
const BUFFER_PREFIX: &str = "buffer.";

/// Where training stands, saved with every checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    /// Epochs, batches and steps done, and the training time so far.
    #[serde(flatten)]
    pub progress: Progress,
    pub finished: bool,
    /// `(epoch, k-NN accuracy)` after each evaluated epoch.
    pub knn_history: Vec<(usize, f64)>,
    /// `(epoch as a fraction, loss)` at each logged step.
    pub loss_history: Vec<(f64, f64)>,
    /// The evaluation at the end of training.
    pub final_eval: Option<EvalReport>,
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    crate::files::replace_durably(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// Every variable of `varmap` plus the method's buffers (prefixed `buffer.`): the content of a
/// weights file, which [`load_weights`] reads back.
pub fn weight_tensors(varmap: &VarMap, buffers: &[(String, Tensor)]) -> HashMap<String, Tensor> {
    let mut weights: HashMap<String, Tensor> =
        varmap.data().lock().expect("varmap lock").iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    for (name, t) in buffers {
        weights.insert(format!("{BUFFER_PREFIX}{name}"), t.clone());
    }
    weights
}

/// Saves the weights (with `buffers`), the optimiser state and the run state into `dir`.
pub fn save(
    dir: &Path,
    varmap: &VarMap,
    buffers: &[(String, Tensor)],
    optimizer: &HashMap<String, Tensor>,
    state: &RunState,
) -> Result<()> {
    save_tensors(&dir.join(WEIGHTS_FILE), &weight_tensors(varmap, buffers))?;
    save_tensors(&dir.join(OPTIMIZER_FILE), optimizer)?;
    // The state goes last: it names what the files above hold.
    crate::files::write_durably(&dir.join(STATE_FILE), serde_json::to_string_pretty(state)?.as_bytes())
}

/// Loads the weights into `varmap` (every variable must be in the file) and returns the buffers.
pub fn load_weights(dir: &Path, varmap: &VarMap, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_weights_file(&dir.join(WEIGHTS_FILE), varmap, device)
}

/// [`load_weights`] from a weights file anywhere (a model version's, for instance).
pub fn load_weights_file(path: &Path, varmap: &VarMap, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint weights {}", path.display()))?;
    load_weights_bytes(&bytes, varmap, device).with_context(|| format!("in {}", path.display()))
}

/// [`load_weights`] from the bytes of a safetensors file: every variable must be there with its
/// shape. Returns the buffers.
pub fn load_weights_bytes(bytes: &[u8], varmap: &VarMap, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_matching(bytes, varmap, device, |_| true)
}

/// Loads only the `encoder.*` variables of a weights file into `varmap`: a fine-tune reads a
/// base model of any method, whose heads (MoCo's projector without batch norm, CPC's context
/// network, none for DirectCLR) are not the fine-tune's.
pub fn load_encoder_weights_file(path: &Path, varmap: &VarMap, device: &Device) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read weights {}", path.display()))?;
    load_matching(&bytes, varmap, device, |name| name.starts_with("encoder."))
        .with_context(|| format!("in {}", path.display()))?;
    Ok(())
}

fn load_matching(
    bytes: &[u8],
    varmap: &VarMap,
    device: &Device,
    wanted: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load_buffer(bytes, device).context("not a safetensors file")?;
    for (name, var) in varmap.data().lock().expect("varmap lock").iter().filter(|(name, _)| wanted(name)) {
        let t = tensors.get(name).with_context(|| format!("no tensor '{name}': it does not match the run config"))?;
        anyhow::ensure!(
            t.dims() == var.dims(),
            "'{name}' has shape {:?}, the model expects {:?}",
            t.dims(),
            var.dims()
        );
        anyhow::ensure!(t.dtype().is_float(), "'{name}' holds {:?}, not floating-point values", t.dtype());
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(tensors.into_iter().filter_map(|(n, t)| n.strip_prefix(BUFFER_PREFIX).map(|b| (b.to_string(), t))).collect())
}

pub fn load_optimizer(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(OPTIMIZER_FILE);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("cannot read optimiser state {}", path.display()))
}

pub fn load_state(dir: &Path) -> Result<RunState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}: is this a run folder?", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid run state", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageShape;
    use crate::train::arch::methods::named_vars;
    use crate::train::arch::MethodConfig;
    use crate::train::arch::ResNetConfig;
    use crate::train::config::TrainConfig;
    use crate::train::Model;

    fn small(method: &str, seed: u64) -> Result<Model> {
        let mut config = TrainConfig::for_method(MethodConfig::default_for(method)?, ImageShape::new(1, 12, 12));
        config.encoder = ResNetConfig { widths: vec![4, 8, 8], ..ResNetConfig::canonical(1) }.into();
        config.projector_dims = vec![8, 4];
        config.seed = seed;
        Model::new(&config, &Device::Cpu)
    }

    /// A MoCo v2 base, whose projector has no batch norm, gives its encoder to a SupCon model (a
    /// fine-tune's); loading the whole file is refused, naming a tensor the base lacks.
    #[test]
    fn an_encoder_loads_into_a_model_of_another_method() -> Result<()> {
        let base = small("moco-v2", 1)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("weights.safetensors");
        candle_core::safetensors::save(&weight_tensors(&base.varmap, &[]), &path)?;
        let tuned = small("supcon", 2)?;
        let err = format!("{:#}", load_weights_file(&path, &tuned.varmap, &Device::Cpu).unwrap_err());
        assert!(err.contains("no tensor 'projector."), "{err}");
        load_encoder_weights_file(&path, &tuned.varmap, &Device::Cpu)?;
        let encoder = |model: &Model| -> Result<Vec<Vec<f32>>> {
            named_vars(&model.varmap)
                .into_iter()
                .filter(|(name, _)| name.starts_with("encoder."))
                .map(|(_, var)| Ok(var.as_tensor().flatten_all()?.to_vec1::<f32>()?))
                .collect()
        };
        assert_eq!(encoder(&tuned)?, encoder(&base)?);
        Ok(())
    }
}
