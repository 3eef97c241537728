//! A fine-tune job's hyper-parameters as the training code sees them. Requests carry the
//! `HyperParameters` message, where 0 means "the default"; the service converts it here, with the
//! defaults filled in and every range checked, before a job exists.

use anyhow::{ensure, Result};

use crate::proto::v1::HyperParameters;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobParameters {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// SupCon's softmax temperature.
    pub temperature: f64,
    /// Fraction of each class held out for the before/after evaluation.
    pub holdout_fraction: f64,
    /// Backbone stages that train, counted from the top (at least 1: the loss reads the served
    /// embedding, which the projection head does not change); `None` trains the whole
    /// backbone, stem included.
    pub trainable_stages: Option<usize>,
    pub seed: u64,
}

impl Default for JobParameters {
    /// Chosen with `contrastive bench finetune` (300 images of three confusable classes, k-NN
    /// of never-uploaded images; the README has the table): with the lower stages frozen as
    /// served, 90 epochs at learning rate 0.1 of the top stage gain the most of the settings
    /// tried and gained at least 5 points in every draw; training the top two stages gains
    /// less and varies more. About a minute on two cores.
    fn default() -> Self {
        Self {
            epochs: 90,
            batch_size: 64,
            learning_rate: 0.1,
            temperature: 0.1,
            holdout_fraction: 0.2,
            trainable_stages: Some(1),
            seed: 0,
        }
    }
}

impl JobParameters {
    /// The request's values, defaults where it leaves 0 (or the message out); the error names
    /// the field that is out of range.
    pub fn from_proto(h: Option<&HyperParameters>) -> Result<Self> {
        let defaults = Self::default();
        let Some(h) = h else { return Ok(defaults) };
        let pick = |value: f64, default: f64| if value == 0.0 { default } else { value };
        let parameters = Self {
            epochs: if h.epochs == 0 { defaults.epochs } else { h.epochs as usize },
            batch_size: if h.batch_size == 0 { defaults.batch_size } else { h.batch_size as usize },
            learning_rate: pick(h.learning_rate, defaults.learning_rate),
            temperature: pick(h.temperature, defaults.temperature),
            holdout_fraction: pick(h.holdout_fraction, defaults.holdout_fraction),
            trainable_stages: match h.trainable_stages {
                None => defaults.trainable_stages,
                Some(stages) => Some(stages as usize),
            },
            seed: h.seed,
        };
        parameters.validate()?;
        Ok(parameters)
    }

    /// The message stored with the job: every field explicit.
    pub fn to_proto(&self) -> HyperParameters {
        HyperParameters {
            epochs: self.epochs as u32,
            batch_size: self.batch_size as u32,
            learning_rate: self.learning_rate,
            temperature: self.temperature,
            trainable_stages: self.trainable_stages.map(|s| s as u32),
            seed: self.seed,
            holdout_fraction: self.holdout_fraction,
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!((1..=1000).contains(&self.epochs), "epochs must be 1–1000, got {}", self.epochs);
        ensure!((2..=1024).contains(&self.batch_size), "batch_size must be 2–1024, got {}", self.batch_size);
        ensure!(
            self.learning_rate > 0.0 && self.learning_rate <= 10.0,
            "learning_rate must be in (0, 10], got {}",
            self.learning_rate
        );
        ensure!(
            self.temperature > 0.0 && self.temperature <= 10.0,
            "temperature must be in (0, 10], got {}",
            self.temperature
        );
        ensure!(
            self.holdout_fraction > 0.0 && self.holdout_fraction < 0.9,
            "holdout_fraction must be in (0, 0.9), got {}",
            self.holdout_fraction
        );
        ensure!(
            self.trainable_stages != Some(0),
            "trainable_stages must be at least 1, got 0: the job trains the served embedding, the encoder's output, which the projection head does not change"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_mean_defaults_and_ranges_are_checked() {
        assert_eq!(JobParameters::from_proto(None).unwrap(), JobParameters::default());
        let request = HyperParameters { epochs: 3, trainable_stages: Some(2), seed: 7, ..Default::default() };
        let parameters = JobParameters::from_proto(Some(&request)).unwrap();
        assert_eq!(parameters.epochs, 3);
        assert_eq!(parameters.trainable_stages, Some(2));
        assert_eq!(parameters.batch_size, 64);
        assert_eq!(JobParameters::from_proto(Some(&parameters.to_proto())).unwrap(), parameters, "round trip");
        for (bad, field) in [
            (HyperParameters { epochs: 1001, ..Default::default() }, "epochs"),
            (HyperParameters { batch_size: 1, ..Default::default() }, "batch_size"),
            (HyperParameters { learning_rate: -1.0, ..Default::default() }, "learning_rate"),
            (HyperParameters { temperature: 11.0, ..Default::default() }, "temperature"),
            (HyperParameters { holdout_fraction: 0.95, ..Default::default() }, "holdout_fraction"),
            (HyperParameters { trainable_stages: Some(0), ..Default::default() }, "trainable_stages"),
        ] {
            let err = JobParameters::from_proto(Some(&bad)).unwrap_err().to_string();
            assert!(err.starts_with(field), "{err}");
        }
    }
}
