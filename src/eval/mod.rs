//! 5. Application layer: how good an encoder is, measured on frozen features.
