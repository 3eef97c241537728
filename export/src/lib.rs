//! ONNX export (see the export issue).
