//! Image bytes as an embedding request or a fine-tune dataset carries them, prepared for the
//! shipped grayscale model and for an RGB one: either a tensor of the input's size with values in
//! the input's range, or an error. The pixel budget is 1 Mpixel, not the server's default 16.7:
//! the same checks and decoders run, and a header that claims a large image costs a 16× smaller
//! buffer per execution under ASan (the faults tests cover the default budget).
#![no_main]

use contrastive::registry::input::decode_to_tensor;
use contrastive::registry::manifest::InputSpec;
use libfuzzer_sys::fuzz_target;

const MAX_PIXELS: u64 = 1 << 20;

fuzz_target!(|bytes: &[u8]| {
    for (channels, side) in [(1, 28), (3, 32)] {
        let spec = InputSpec::image(channels, side, side).expect("a valid input");
        let mut out = Vec::new();
        match decode_to_tensor(bytes, &spec, MAX_PIXELS, &mut out) {
            Ok(()) => {
                assert_eq!(out.len(), channels * side * side);
                let (low, high) = spec.value_range();
                assert!(out.iter().all(|v| (low..=high).contains(v)), "a value outside [{low}, {high}]");
            }
            Err(reason) => assert!(!reason.is_empty()),
        }
    }
});
