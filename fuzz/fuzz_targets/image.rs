//! Image bytes as an embedding request or a fine-tune dataset carries them, prepared for the
//! shipped grayscale model and for an RGB one: either a tensor of the input's size with values in
//! the input's range, or an error, within the server's default pixel budget.
#![no_main]

use contrastive::registry::input::{decode_to_tensor, DEFAULT_MAX_IMAGE_PIXELS};
use contrastive::registry::manifest::InputSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    for (channels, side) in [(1, 28), (3, 32)] {
        let spec = InputSpec::image(channels, side, side).expect("a valid input");
        let mut out = Vec::new();
        match decode_to_tensor(bytes, &spec, DEFAULT_MAX_IMAGE_PIXELS, &mut out) {
            Ok(()) => {
                assert_eq!(out.len(), channels * side * side);
                let (low, high) = spec.value_range();
                assert!(out.iter().all(|v| (low..=high).contains(v)), "a value outside [{low}, {high}]");
            }
            Err(reason) => assert!(!reason.is_empty()),
        }
    }
});
