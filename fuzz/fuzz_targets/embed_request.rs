//! A whole `Embed` request off the wire: protobuf decoding, then every input (images and raw
//! tensors) prepared as the server does, under a decode budget.
#![no_main]

use std::sync::atomic::AtomicBool;

use contrastive::proto::v1::EmbedRequest;
use contrastive::registry::manifest::InputSpec;
use contrastive::serve::preprocess::{preprocess_all, DecodeBudget};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|bytes: &[u8]| {
    let Ok(request) = EmbedRequest::decode(bytes) else { return };
    let spec = InputSpec::image(1, 28, 28).expect("a valid input");
    let budget = DecodeBudget { max_image_pixels: 1 << 20, max_request_pixels: 1 << 22 };
    if let Ok(values) = preprocess_all(&request.inputs, &spec, budget, &AtomicBool::new(false)) {
        assert_eq!(values.len(), request.inputs.len() * 28 * 28);
        let (low, high) = spec.value_range();
        assert!(values.iter().all(|v| (low..=high).contains(v)), "a value outside [{low}, {high}]");
    }
});
