//! `manifest.json` of a model version: what parses must be servable without surprises (an input
//! the server can allocate, a finite value range, file names inside the version's folder), and
//! must survive being written back.
#![no_main]

use contrastive::registry::manifest::{Manifest, MAX_INPUT_SIDE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let Ok(manifest) = Manifest::from_json(text) else { return };
    let input_len: usize = manifest.image_dims().iter().product();
    assert!(input_len <= 3 * MAX_INPUT_SIDE * MAX_INPUT_SIDE);
    let (low, high) = manifest.input.value_range();
    assert!(low < high && high.is_finite(), "value range [{low}, {high}]");
    for name in manifest.files.keys() {
        assert!(!name.contains('/') && !name.contains('\\') && name != "..", "file name {name:?}");
    }
    let written = serde_json::to_string(&manifest).expect("a manifest serialises");
    Manifest::from_json(&written).expect("a written manifest reads back");
});
