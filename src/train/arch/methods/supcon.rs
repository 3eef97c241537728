//! Supervised contrastive learning (Khosla et al. 2020): synchronous symmetric, like SimCLR, but
//! every view of every sample with the same label is a positive (positive expansion by labels).
//! The loss is SupCon's L_out, on the projection head's output or, for fine-tunes, on the
//! encoder's output itself (`on_embedding`). Fine-tuning jobs use this method.

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::ResNet;
use crate::train::loss;

pub struct SupCon {
    config: MethodConfig,
    temperature: f64,
    on_embedding: bool,
    branch: Branch,
}

impl SupCon {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Supcon { temperature, on_embedding } = config else {
            candle_core::bail!("not a SupCon config")
        };
        let branch = parts.branch(&parts.projector_config())?;
        Ok(Self { config, temperature, on_embedding, branch })
    }
}

impl Method for SupCon {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], labels: &Tensor, _step: usize) -> Result<Tensor> {
        let z = if self.on_embedding {
            self.branch.encoder.forward_t(&Tensor::cat(views, 0)?, true)?
        } else {
            Tensor::cat(&self.branch.project_views(views, true)?, 0)?
        };
        // Views are stacked view-major, so the labels repeat once per view.
        let labels = Tensor::cat(&vec![labels.clone(); views.len()], 0)?;
        loss::supcon(&z, &labels, self.temperature)
    }

    fn encoder(&self) -> &ResNet {
        &self.branch.encoder
    }

    fn encoder_mut(&mut self) -> &mut ResNet {
        &mut self.branch.encoder
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::data::ImageShape;
    use crate::train::arch::MethodConfig;
    use crate::train::config::TrainConfig;
    use crate::train::Model;

    /// Whether the loss's gradient reaches (the encoder, the projection head).
    fn gradient_reaches(on_embedding: bool) -> (bool, bool) {
        let method = MethodConfig::Supcon { temperature: 0.1, on_embedding };
        let mut model = Model::new(&TrainConfig::for_method(method, ImageShape::new(1, 28, 28)), &Device::Cpu).unwrap();
        let views: Vec<Tensor> =
            (0..2).map(|_| Tensor::rand(0f32, 1f32, (4, 1, 28, 28), &Device::Cpu).unwrap()).collect();
        let labels = Tensor::new(&[0u32, 0, 1, 1], &Device::Cpu).unwrap();
        let grads = model.method.loss(&views, &labels, 0).unwrap().backward().unwrap();
        let vars = model.varmap.data().lock().unwrap();
        let reached = |prefix: &str| {
            vars.iter().filter(|(name, _)| name.starts_with(prefix)).any(|(_, var)| {
                grads.get(var.as_tensor()).is_some_and(|g| {
                    g.abs().unwrap().sum_all().unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap() > 0.0
                })
            })
        };
        (reached("encoder."), reached("projector."))
    }

    #[test]
    fn on_embedding_trains_the_encoder_without_the_head() {
        assert_eq!(gradient_reaches(false), (true, true), "Khosla et al.: through the head");
        assert_eq!(gradient_reaches(true), (true, false), "on the embedding: the head gets no gradient");
    }
}
