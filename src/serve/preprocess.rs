//! The inputs of an embedding request as one model tensor, each prepared as the model's manifest
//! says ([`crate::registry::input`]), within a decoding budget per image and per request. Image
//! decoding is CPU work: callers run it on the blocking pool, and may abandon it.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::proto::v1::{input, Input};
use crate::registry::input::{check_tensor, decode_to_tensor, image_dimensions, DEFAULT_MAX_IMAGE_PIXELS};
use crate::registry::manifest::InputSpec;

/// How many pixels a request may make the server decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeBudget {
    pub max_image_pixels: u64,
    pub max_request_pixels: u64,
}

impl Default for DecodeBudget {
    fn default() -> Self {
        Self { max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS, max_request_pixels: 4 * DEFAULT_MAX_IMAGE_PIXELS }
    }
}

/// Why a request's inputs cannot be embedded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PreprocessError {
    /// One input is unusable; becomes INVALID_ARGUMENT naming it.
    #[error("input {index}: {reason}")]
    Input { index: usize, reason: String },
    /// The images' headers add up to more than the request budget; INVALID_ARGUMENT.
    #[error("the request's images have {total} pixels in all; at most {max} are decoded per request")]
    TooManyPixels { total: u64, max: u64 },
    /// The caller gave up (the client cancelled, or its deadline passed): no answer is wanted.
    #[error("the request was abandoned")]
    Abandoned,
}

/// Appends the model tensor of every input to one buffer, `inputs.len() × C×H×W` values. Image
/// headers are checked against `budget` before any image is decoded; `abandoned` is read before
/// each input, so a request nobody waits for stops costing CPU.
pub fn preprocess_all(
    inputs: &[Input],
    spec: &InputSpec,
    budget: DecodeBudget,
    abandoned: &AtomicBool,
) -> Result<Vec<f32>, PreprocessError> {
    let mut total = 0u64;
    for (index, input) in inputs.iter().enumerate() {
        if let Some(input::Data::Image(bytes)) = &input.data {
            let (w, h) = image_dimensions(bytes).map_err(|reason| PreprocessError::Input { index, reason })?;
            let pixels = w as u64 * h as u64;
            if pixels > budget.max_image_pixels {
                let max = budget.max_image_pixels;
                let reason = format!("the image is {w}×{h} = {pixels} pixels; at most {max} are decoded per image");
                return Err(PreprocessError::Input { index, reason });
            }
            total += pixels;
        }
    }
    if total > budget.max_request_pixels {
        return Err(PreprocessError::TooManyPixels { total, max: budget.max_request_pixels });
    }
    let mut out = Vec::with_capacity(inputs.len() * spec.channels * spec.height * spec.width);
    for (index, input) in inputs.iter().enumerate() {
        if abandoned.load(Ordering::Relaxed) {
            return Err(PreprocessError::Abandoned);
        }
        preprocess(input, spec, budget.max_image_pixels, &mut out)
            .map_err(|reason| PreprocessError::Input { index, reason })?;
    }
    Ok(out)
}

fn preprocess(input: &Input, spec: &InputSpec, max_image_pixels: u64, out: &mut Vec<f32>) -> Result<(), String> {
    match &input.data {
        Some(input::Data::Image(bytes)) => decode_to_tensor(bytes, spec, max_image_pixels, out),
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
            (tensor(vec![2, 2], vec![0.0, 0.0, 0.0, 3.4e38]), "the model takes values in [0, 1]"),
            (tensor(vec![2, 2], vec![-0.5, 0.0, 0.0, 0.0]), "value 0 is -0.5"),
            (tensor(vec![2, 2], vec![0.0, 1.0001, 0.0, 0.0]), "value 1 is 1.0001"),
        ];
        for (input, expected) in cases {
            let good = tensor(vec![1, 2, 2], vec![0.5; 4]);
            let err = preprocess_all(&[good, input], &s, DecodeBudget::default(), &AtomicBool::new(false)).unwrap_err();
            assert!(matches!(err, PreprocessError::Input { index: 1, .. }), "{err:?}");
            assert!(err.to_string().contains(expected), "{err} lacks {expected:?}");
        }
        let ok =
            preprocess_all(&[tensor(vec![2, 2], vec![0.25; 4])], &s, DecodeBudget::default(), &AtomicBool::new(false));
        assert_eq!(ok.unwrap(), vec![0.25; 4]);
    }

    #[test]
    fn request_budget_and_abandonment() {
        let s = spec(1, 2);
        let png = |side: u32| {
            let mut bytes = Vec::new();
            image::DynamicImage::ImageLuma8(image::GrayImage::new(side, side))
                .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
                .unwrap();
            Input { data: Some(input::Data::Image(bytes)) }
        };
        let budget = DecodeBudget { max_image_pixels: 10_000, max_request_pixels: 15_000 };
        let inputs = [png(100), png(100)];
        let err = preprocess_all(&inputs, &s, budget, &AtomicBool::new(false)).unwrap_err();
        assert_eq!(err, PreprocessError::TooManyPixels { total: 20_000, max: 15_000 });
        assert!(preprocess_all(&inputs[..1], &s, budget, &AtomicBool::new(false)).is_ok());
        let err = preprocess_all(&[png(101)], &s, budget, &AtomicBool::new(false)).unwrap_err();
        assert!(err.to_string().contains("input 0: the image is 101×101 = 10201 pixels"), "{err}");
        assert_eq!(preprocess_all(&inputs[..1], &s, budget, &AtomicBool::new(true)), Err(PreprocessError::Abandoned));
    }
}
