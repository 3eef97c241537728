//! Builds and writes ONNX models.
//!
//! candle has no ONNX exporter, so each exportable module of the trainer emits its own nodes and
//! initialisers through a [`GraphBuilder`] next to its `forward`; this crate holds the schema
//! (compiled from `proto/onnx/onnx.proto` with protox) and the builder those modules share.

use std::collections::HashSet;

use candle_core::{DType, Tensor};
use prost::Message;

/// The ONNX messages, generated from `proto/onnx/onnx.proto`.
#[allow(clippy::all)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use onnx::attribute_proto::AttributeType;
use onnx::tensor_proto::DataType;
use onnx::tensor_shape_proto::{dimension, Dimension};
use onnx::type_proto::{self, Tensor as TensorType};

/// The default-domain operator set the exported graphs use.
pub const OPSET_VERSION: i64 = 17;
/// The IR version that goes with opset 17 (ONNX 1.12).
pub const IR_VERSION: i64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot export {module}: {reason}")]
    Unsupported { module: String, reason: String },
    #[error("the ONNX graph already has a value named {0:?}")]
    DuplicateName(String),
    #[error("node {node:?} reads {value:?}, which no input, initialiser or earlier node produces")]
    UnknownValue { node: String, value: String },
    #[error("graph output {0:?} is not produced by any node")]
    UnknownOutput(String),
    #[error("initialiser {name:?}: {count} values do not fill the shape {dims:?}")]
    ShapeMismatch { name: String, dims: Vec<usize>, count: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ExportError>;

/// One axis of a graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    Fixed(usize),
    /// A symbolic axis whose size is chosen at run time, such as `"batch"`.
    Named(String),
}

impl Dim {
    pub fn batch() -> Self {
        Dim::Named("batch".into())
    }
}

/// A node attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    String(String),
}

/// An ONNX graph under construction: every value has a unique name, and a node may only read values
/// that exist already, so the node list is topologically ordered by construction.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    name: String,
    nodes: Vec<onnx::NodeProto>,
    initializers: Vec<onnx::TensorProto>,
    inputs: Vec<onnx::ValueInfoProto>,
    outputs: Vec<onnx::ValueInfoProto>,
    values: HashSet<String>,
}

impl GraphBuilder {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), ..Self::default() }
    }

    fn claim(&mut self, name: &str) -> Result<String> {
        if !self.values.insert(name.to_string()) {
            return Err(ExportError::DuplicateName(name.to_string()));
        }
        Ok(name.to_string())
    }

    /// Declares a float graph input.
    pub fn input(&mut self, name: &str, dims: &[Dim]) -> Result<String> {
        let name = self.claim(name)?;
        self.inputs.push(value_info(&name, dims));
        Ok(name)
    }

    /// Declares an existing value as a float graph output.
    pub fn output(&mut self, value: &str, dims: &[Dim]) -> Result<()> {
        if !self.values.contains(value) {
            return Err(ExportError::UnknownOutput(value.to_string()));
        }
        self.outputs.push(value_info(value, dims));
        Ok(())
    }

    /// A constant float tensor stored in the model (little-endian `raw_data`).
    pub fn initializer(&mut self, name: &str, dims: &[usize], values: &[f32]) -> Result<String> {
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, values.len(), DataType::Float, raw_data)
    }

    /// A constant int64 tensor (shapes, axes).
    pub fn initializer_i64(&mut self, name: &str, dims: &[usize], values: &[i64]) -> Result<String> {
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, values.len(), DataType::Int64, raw_data)
    }

    fn push_initializer(
        &mut self,
        name: &str,
        dims: &[usize],
        count: usize,
        data_type: DataType,
        raw_data: Vec<u8>,
    ) -> Result<String> {
        check_count(name, dims, count)?;
        let name = self.claim(name)?;
        self.initializers.push(onnx::TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type as i32,
            name: name.clone(),
            raw_data,
            ..Default::default()
        });
        Ok(name)
    }

    /// A candle tensor as a float initialiser, whatever its dtype or device.
    pub fn tensor(&mut self, name: &str, tensor: &Tensor) -> Result<String> {
        let values = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.initializer(name, tensor.dims(), &values)
    }

    /// Appends a single-output node named after its output value; returns that name.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        output: &str,
        attributes: &[(&str, Attr)],
    ) -> Result<String> {
        for &input in inputs {
            // ONNX marks an omitted optional input with the empty name.
            if !input.is_empty() && !self.values.contains(input) {
                return Err(ExportError::UnknownValue { node: output.to_string(), value: input.to_string() });
            }
        }
        let output = self.claim(output)?;
        self.nodes.push(onnx::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name: output.clone(),
            op_type: op_type.to_string(),
            attribute: attributes.iter().map(|(name, value)| attribute(name, value)).collect(),
            ..Default::default()
        });
        Ok(output)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The finished model: opset 17, the given metadata properties and description.
    pub fn finish(self, producer_version: &str, doc_string: &str, metadata: &[(String, String)]) -> onnx::ModelProto {
        onnx::ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![onnx::OperatorSetIdProto { domain: String::new(), version: OPSET_VERSION }],
            producer_name: "contrastive".into(),
            producer_version: producer_version.into(),
            doc_string: doc_string.into(),
            graph: Some(onnx::GraphProto {
                node: self.nodes,
                name: self.name,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            metadata_props: metadata
                .iter()
                .map(|(key, value)| onnx::StringStringEntryProto { key: key.clone(), value: value.clone() })
                .collect(),
            ..Default::default()
        }
    }
}

/// The model in the ONNX file format.
pub fn to_bytes(model: &onnx::ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Reads a model back (for inspection and tests).
pub fn from_bytes(bytes: &[u8]) -> std::result::Result<onnx::ModelProto, prost::DecodeError> {
    onnx::ModelProto::decode(bytes)
}

fn check_count(name: &str, dims: &[usize], count: usize) -> Result<()> {
    if dims.iter().product::<usize>() != count {
        return Err(ExportError::ShapeMismatch { name: name.to_string(), dims: dims.to_vec(), count });
    }
    Ok(())
}

fn value_info(name: &str, dims: &[Dim]) -> onnx::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Named(s) => dimension::Value::DimParam(s.clone()),
            }),
            denotation: String::new(),
        })
        .collect();
    onnx::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(onnx::TypeProto {
            value: Some(type_proto::Value::TensorType(TensorType {
                elem_type: DataType::Float as i32,
                shape: Some(onnx::TensorShapeProto { dim }),
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

fn attribute(name: &str, value: &Attr) -> onnx::AttributeProto {
    let mut proto = onnx::AttributeProto { name: name.to_string(), ..Default::default() };
    match value {
        Attr::Int(i) => {
            proto.r#type = AttributeType::Int as i32;
            proto.i = *i;
        }
        Attr::Ints(ints) => {
            proto.r#type = AttributeType::Ints as i32;
            proto.ints = ints.clone();
        }
        Attr::Float(f) => {
            proto.r#type = AttributeType::Float as i32;
            proto.f = *f;
        }
        Attr::String(s) => {
            proto.r#type = AttributeType::String as i32;
            proto.s = s.clone().into_bytes();
        }
    }
    proto
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relu_graph() -> Result<onnx::ModelProto> {
        let mut g = GraphBuilder::new("g");
        let x = g.input("x", &[Dim::batch(), Dim::Fixed(3)])?;
        let y = g.node("Relu", &[&x], "y", &[])?;
        g.output(&y, &[Dim::batch(), Dim::Fixed(3)])?;
        Ok(g.finish("0.1.0", "", &[("k".into(), "v".into())]))
    }

    #[test]
    fn wire_format_uses_the_spec_field_numbers() -> Result<()> {
        let bytes = to_bytes(&relu_graph()?);
        // ModelProto.ir_version is field 1 (varint): tag 0x08, value 8.
        assert_eq!(&bytes[..2], &[0x08, 0x08]);
        // graph is field 7 and opset_import field 8, both length-delimited: tags 0x3a and 0x42.
        assert!(bytes.contains(&0x3a) && bytes.contains(&0x42));
        // metadata_props is field 14: tag (14 << 3) | 2 = 0x72, then the entry "k" = "v".
        let entry = [0x72, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v'];
        assert!(bytes.windows(entry.len()).any(|w| w == entry));
        Ok(())
    }

    #[test]
    fn round_trips_through_the_decoder() -> Result<()> {
        let model = relu_graph()?;
        let back = from_bytes(&to_bytes(&model)).unwrap();
        assert_eq!(back, model);
        let graph = back.graph.unwrap();
        assert_eq!(graph.node[0].op_type, "Relu");
        assert_eq!(back.opset_import[0].version, 17);
        Ok(())
    }

    #[test]
    fn initialisers_are_little_endian_raw_data() -> Result<()> {
        let mut g = GraphBuilder::new("g");
        g.initializer("w", &[2], &[1.0, -2.0])?;
        let model = g.finish("", "", &[]);
        let tensor = &model.graph.unwrap().initializer[0];
        assert_eq!(tensor.dims, vec![2]);
        assert_eq!(tensor.raw_data, [1.0f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat());
        Ok(())
    }

    #[test]
    fn rejects_unknown_inputs_duplicates_and_bad_shapes() {
        let mut g = GraphBuilder::new("g");
        assert!(matches!(g.node("Relu", &["nothing"], "y", &[]), Err(ExportError::UnknownValue { .. })));
        g.input("x", &[Dim::Fixed(1)]).unwrap();
        assert!(matches!(g.input("x", &[Dim::Fixed(1)]), Err(ExportError::DuplicateName(_))));
        assert!(matches!(g.initializer("w", &[2, 2], &[1.0]), Err(ExportError::ShapeMismatch { .. })));
        assert!(matches!(g.output("z", &[]), Err(ExportError::UnknownOutput(_))));
    }
}
