//! `weights.safetensors` of a model version, loaded into a model's variables as a fine-tune job
//! does: either every variable gets a tensor of its shape, or an error.
#![no_main]

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use contrastive::train::checkpoint::load_weights_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let weight = vb.get((4, 3), "layer.weight").expect("a variable");
    let bias = vb.get(3, "layer.bias").expect("a variable");
    if load_weights_bytes(bytes, &varmap, &Device::Cpu).is_ok() {
        assert_eq!(weight.dims(), [4, 3]);
        assert_eq!(bias.dims(), [3]);
        assert_eq!(weight.dtype(), DType::F32);
    }
});
