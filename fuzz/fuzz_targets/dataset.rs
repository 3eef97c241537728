//! A stored fine-tune dataset file, and an `UploadDatasetChunk` off the wire. A file that parses
//! must be exactly the encoding of what it parsed to (no byte ignored, none invented).
#![no_main]

use contrastive::finetune::datasets::parse;
use contrastive::proto::v1::UploadDatasetChunk;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(images) = parse(bytes) {
        let mut encoded = b"CTRDSET\0".to_vec();
        encoded.extend_from_slice(&1u32.to_le_bytes());
        for image in &images {
            encoded.extend_from_slice(&(image.label.len() as u32).to_le_bytes());
            encoded.extend_from_slice(image.label.as_bytes());
            encoded.extend_from_slice(&(image.bytes.len() as u32).to_le_bytes());
            encoded.extend_from_slice(&image.bytes);
        }
        assert_eq!(encoded, bytes);
    }
    if let Ok(chunk) = UploadDatasetChunk::decode(bytes) {
        assert!(chunk.encoded_len() <= bytes.len(), "re-encoding grew the chunk");
    }
});
