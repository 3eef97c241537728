//! The inputs of an embedding request as one model tensor, each prepared as the model's manifest
//! says ([`crate::registry::input`]). Image decoding is CPU work: callers run it on the blocking
//! pool.

use crate::proto::v1::{input, Input};
use crate::registry::input::{check_tensor, image_to_tensor};
use crate::registry::manifest::InputSpec;

/// Why an input cannot be embedded; becomes INVALID_ARGUMENT naming the input.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("input {index}: {reason}")]
pub struct InputError {
    pub index: usize,
    pub reason: String,
}

/// Appends the model tensor of every input to one buffer, `inputs.len() × C×H×W` values.
pub fn preprocess_all(inputs: &[Input], spec: &InputSpec) -> Result<Vec<f32>, InputError> {
    let mut out = Vec::with_capacity(inputs.len() * spec.channels * spec.height * spec.width);
    for (index, input) in inputs.iter().enumerate() {
        preprocess(input, spec, &mut out).map_err(|reason| InputError { index, reason })?;
    }
    Ok(out)
}

fn preprocess(input: &Input, spec: &InputSpec, out: &mut Vec<f32>) -> Result<(), String> {
    match &input.data {
        Some(input::Data::Image(bytes)) => image_to_tensor(bytes, spec, out),
        Some(input::Data::Tensor(tensor)) => check_tensor(&tensor.shape, &tensor.values, spec, out),
        None => Err("empty input: set `image` (encoded bytes) or `tensor`".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::Tensor;

    fn spec(channels: usize, side: usize) -> InputSpec {
        InputSpec::image(channels, side, side).unwrap()
    }

    #[test]
    fn bad_inputs_are_named() {
        let s = spec(1, 2);
        let tensor =
            |shape: Vec<u32>, values: Vec<f32>| Input { data: Some(input::Data::Tensor(Tensor { shape, values })) };
        let cases = [
            (Input { data: Some(input::Data::Image(b"not an image".to_vec())) }, "cannot decode"),
            (Input { data: Some(input::Data::Image(Vec::new())) }, "empty"),
            (Input { data: None }, "empty input"),
            (tensor(vec![1, 3, 2], vec![0.0; 6]), "does not match"),
            (tensor(vec![1, 2, 2], vec![0.0; 3]), "needs 4 values"),
            (tensor(vec![2, 2], vec![0.0, f32::NAN, 0.0, 0.0]), "value 1 is NaN"),
            (tensor(vec![2, 2], vec![0.0, 0.0, f32::INFINITY, 0.0]), "value 2 is inf"),
        ];
        for (input, expected) in cases {
            let good = tensor(vec![1, 2, 2], vec![0.5; 4]);
            let err = preprocess_all(&[good, input], &s).unwrap_err();
            assert_eq!(err.index, 1);
            assert!(err.to_string().contains(expected), "{err} lacks {expected:?}");
        }
        assert_eq!(preprocess_all(&[tensor(vec![2, 2], vec![0.25; 4])], &s).unwrap(), vec![0.25; 4]);
    }
}
