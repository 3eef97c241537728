//! Vision Transformer for small images (Dosovitskiy et al. 2021, "An Image is Worth 16x16
//! Words"): non-overlapping patches embedded linearly, a class token, learned position
//! embeddings, pre-norm blocks (LayerNorm → multi-head self-attention, LayerNorm → GELU MLP,
//! each with a residual), a final LayerNorm; the class token's output is the embedding.
//!
//! Built from candle primitives only: the fused `LayerNorm` and `softmax_last_dim` of candle
//! 0.11 have no backward. Images of another size than the trained one (multi-crop's local
//! crops) get their position embeddings bilinearly interpolated (as DINO does), through a fixed
//! matrix, so the gradient still reaches the learned grid.

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use candle_nn::{Init, Linear, Module, VarBuilder};
use contrastive_export::{Attr, GraphBuilder, Result as ExportResult};
use serde::{Deserialize, Serialize};

/// Initialisation of every weight matrix and token: N(0, 0.02²), as the ViT and DeiT code.
const WEIGHT_INIT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };
/// LayerNorm's ε (PyTorch's ViTs use 1e-6).
const NORM_EPS: f64 = 1e-6;

/// Sizes of a ViT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub in_channels: usize,
    /// Side of the square patches, in pixels.
    pub patch: usize,
    /// Patch rows and columns of the image size the position embeddings are learned for.
    pub position_grid: [usize; 2],
    /// Width of every token (the embedding size).
    pub dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    pub heads: usize,
    /// Hidden width of each block's MLP, as a multiple of `dim`.
    pub mlp_ratio: usize,
}

impl VitConfig {
    /// The project's small ViT: 4×4 patches (a 7×7 grid on 28×28), width 128, 4 blocks of 4
    /// heads, MLP ratio 4; about 0.8 M parameters, close to the canonical ResNet's compute.
    pub fn tiny(in_channels: usize, height: usize, width: usize) -> Self {
        let patch = 4;
        Self {
            in_channels,
            patch,
            position_grid: [height / patch, width / patch],
            dim: 128,
            depth: 4,
            heads: 4,
            mlp_ratio: 4,
        }
    }

    pub fn feature_dim(&self) -> usize {
        self.dim
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.in_channels > 0, "a ViT needs at least one input channel");
        anyhow::ensure!(self.patch > 0, "the ViT's patch size must be positive");
        anyhow::ensure!(
            self.position_grid.iter().all(|&g| g > 0),
            "the ViT's position grid must have at least one patch per side, got {:?}",
            self.position_grid
        );
        anyhow::ensure!(self.depth > 0, "a ViT needs at least one block");
        anyhow::ensure!(self.mlp_ratio > 0, "the ViT's MLP ratio must be positive");
        anyhow::ensure!(
            self.heads > 0 && self.dim.is_multiple_of(self.heads),
            "the ViT's width {} must split evenly into its {} heads",
            self.dim,
            self.heads
        );
        Ok(())
    }
}

/// LayerNorm over the last axis from primitives: `(x − μ) / √(σ² + ε) · γ + β`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred.broadcast_div(&(variance + NORM_EPS)?.sqrt()?)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }

    /// ONNX `LayerNormalization` (opset 17) over the last axis.
    pub fn to_onnx(&self, g: &mut GraphBuilder, input: &str, name: &str) -> ExportResult<String> {
        let weight = g.tensor(&format!("{name}.weight"), &self.weight)?;
        let bias = g.tensor(&format!("{name}.bias"), &self.bias)?;
        let attributes = [("axis", Attr::Int(-1)), ("epsilon", Attr::Float(NORM_EPS as f32))];
        g.node("LayerNormalization", &[input, &weight, &bias], name, &attributes)
    }
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", WEIGHT_INIT)?;
    let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(weight, Some(bias)))
}

/// `x Wᵀ + b` as ONNX `MatMul` and `Add` on the last axis of any rank.
fn linear_to_onnx(g: &mut GraphBuilder, layer: &Linear, input: &str, name: &str) -> ExportResult<String> {
    let weight = g.tensor(&format!("{name}.weight_t"), &layer.weight().t()?.contiguous()?)?;
    let product = g.node("MatMul", &[input, &weight], &format!("{name}.matmul"), &[])?;
    let bias = layer.bias().expect("the ViT's linear layers have biases");
    let bias = g.tensor(&format!("{name}.bias"), bias)?;
    g.node("Add", &[&product, &bias], name, &[])
}

/// Multi-head self-attention: `softmax(Q Kᵀ / √d_h) V` per head, heads concatenated and
/// projected.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        Ok(Self { qkv: linear(vb.pp("qkv"), dim, 3 * dim)?, proj: linear(vb.pp("proj"), dim, dim)?, heads })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, tokens, dim) = x.dims3()?;
        let head_dim = dim / self.heads;
        // [N, T, 3D] → [3, N, H, T, d_h]
        let qkv = self.qkv.forward(x)?.reshape((n, tokens, 3, self.heads, head_dim))?.permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.i(0)?.contiguous()?, qkv.i(1)?.contiguous()?, qkv.i(2)?.contiguous()?);
        let scores = (q.matmul(&k.t()?)? * (head_dim as f64).powf(-0.5))?;
        // `softmax`, not the fused `softmax_last_dim`, which has no backward.
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let mixed = weights.matmul(&v)?.transpose(1, 2)?.reshape((n, tokens, dim))?;
        self.proj.forward(&mixed)
    }

    fn to_onnx(&self, g: &mut GraphBuilder, input: &str, name: &str) -> ExportResult<String> {
        let dim = self.proj.weight().dim(0)?;
        let head_dim = dim / self.heads;
        let qkv = linear_to_onnx(g, &self.qkv, input, &format!("{name}.qkv"))?;
        // Reshape's 0 copies the input's axis (batch, tokens).
        let split_shape =
            g.initializer_i64(&format!("{name}.split_shape"), &[5], &[0, 0, 3, self.heads as i64, head_dim as i64])?;
        let split = g.node("Reshape", &[&qkv, &split_shape], &format!("{name}.qkv_split"), &[])?;
        let heads_first =
            g.node("Transpose", &[&split], &format!("{name}.qkv_heads"), &[("perm", Attr::Ints(vec![2, 0, 3, 1, 4]))])?;
        let mut qkv_parts = Vec::new();
        for (index, part) in ["q", "k", "v"].iter().enumerate() {
            let at = g.initializer_i64(&format!("{name}.{part}_index"), &[], &[index as i64])?;
            let axis = [("axis", Attr::Int(0))];
            qkv_parts.push(g.node("Gather", &[&heads_first, &at], &format!("{name}.{part}"), &axis)?);
        }
        let k_t =
            g.node("Transpose", &[&qkv_parts[1]], &format!("{name}.k_t"), &[("perm", Attr::Ints(vec![0, 1, 3, 2]))])?;
        let scores = g.node("MatMul", &[&qkv_parts[0], &k_t], &format!("{name}.scores"), &[])?;
        let scale = g.initializer(&format!("{name}.scale"), &[], &[(head_dim as f32).powf(-0.5)])?;
        let scaled = g.node("Mul", &[&scores, &scale], &format!("{name}.scaled"), &[])?;
        let weights = g.node("Softmax", &[&scaled], &format!("{name}.weights"), &[("axis", Attr::Int(-1))])?;
        let mixed = g.node("MatMul", &[&weights, &qkv_parts[2]], &format!("{name}.mixed"), &[])?;
        let tokens_first =
            g.node("Transpose", &[&mixed], &format!("{name}.mixed_t"), &[("perm", Attr::Ints(vec![0, 2, 1, 3]))])?;
        let merge_shape = g.initializer_i64(&format!("{name}.merge_shape"), &[3], &[0, 0, dim as i64])?;
        let merged = g.node("Reshape", &[&tokens_first, &merge_shape], &format!("{name}.merged"), &[])?;
        linear_to_onnx(g, &self.proj, &merged, &format!("{name}.proj"))
    }
}

/// `x + Attention(LN(x))`, then `x + MLP(LN(x))` with a GELU (erf form) MLP.
#[derive(Debug, Clone)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Block {
    fn new(vb: VarBuilder, config: &VitConfig) -> Result<Self> {
        let hidden = config.dim * config.mlp_ratio;
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), config.dim)?,
            attn: Attention::new(vb.pp("attn"), config.dim, config.heads)?,
            norm2: LayerNorm::new(vb.pp("norm2"), config.dim)?,
            fc1: linear(vb.pp("mlp.fc1"), config.dim, hidden)?,
            fc2: linear(vb.pp("mlp.fc2"), hidden, config.dim)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let hidden = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        x + self.fc2.forward(&hidden)?
    }

    fn to_onnx(&self, g: &mut GraphBuilder, input: &str, name: &str) -> ExportResult<String> {
        let normed = self.norm1.to_onnx(g, input, &format!("{name}.norm1"))?;
        let attended = self.attn.to_onnx(g, &normed, &format!("{name}.attn"))?;
        let x = g.node("Add", &[input, &attended], &format!("{name}.add1"), &[])?;
        let normed = self.norm2.to_onnx(g, &x, &format!("{name}.norm2"))?;
        let hidden = linear_to_onnx(g, &self.fc1, &normed, &format!("{name}.mlp.fc1"))?;
        let hidden = gelu_to_onnx(g, &hidden, &format!("{name}.mlp.gelu"))?;
        let out = linear_to_onnx(g, &self.fc2, &hidden, &format!("{name}.mlp.fc2"))?;
        g.node("Add", &[&x, &out], &format!("{name}.add2"), &[])
    }
}

/// GELU in its exact form, `x/2 · (1 + erf(x/√2))` (opset 17 has no `Gelu`).
fn gelu_to_onnx(g: &mut GraphBuilder, input: &str, name: &str) -> ExportResult<String> {
    let inv_sqrt2 = g.initializer(&format!("{name}.inv_sqrt2"), &[], &[std::f32::consts::FRAC_1_SQRT_2])?;
    let scaled = g.node("Mul", &[input, &inv_sqrt2], &format!("{name}.scaled"), &[])?;
    let erf = g.node("Erf", &[&scaled], &format!("{name}.erf"), &[])?;
    let one = g.initializer(&format!("{name}.one"), &[], &[1.0])?;
    let shifted = g.node("Add", &[&erf, &one], &format!("{name}.shifted"), &[])?;
    let half = g.initializer(&format!("{name}.half"), &[], &[0.5])?;
    let half_x = g.node("Mul", &[input, &half], &format!("{name}.half_x"), &[])?;
    g.node("Mul", &[&half_x, &shifted], name, &[])
}

/// The ViT encoder: `[N, C, H, W]` images to `[N, dim]` class-token features.
#[derive(Debug, Clone)]
pub struct Vit {
    pub config: VitConfig,
    /// The patch embedding as a linear map of each flattened `C × p × p` patch.
    pub patch_embed: Linear,
    pub cls_token: Tensor,
    /// `[1 + rows·columns, dim]`: the class token's, then the grid's in row-major order.
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    /// In training, the embeddings and this many blocks are frozen (see [`Vit::freeze_blocks`]).
    frozen_blocks: Option<usize>,
    /// The patch projection passes no gradient (see [`Vit::freeze_patch_embedding`]).
    frozen_patch_embedding: bool,
}

impl Vit {
    pub fn new(vb: VarBuilder, config: &VitConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::wrap)?;
        let [rows, columns] = config.position_grid;
        let patch_pixels = config.in_channels * config.patch * config.patch;
        Ok(Self {
            config: config.clone(),
            patch_embed: linear(vb.pp("patch_embed"), patch_pixels, config.dim)?,
            cls_token: vb.get_with_hints(config.dim, "cls_token", WEIGHT_INIT)?,
            pos_embed: vb.get_with_hints((1 + rows * columns, config.dim), "pos_embed", WEIGHT_INIT)?,
            blocks: (0..config.depth)
                .map(|i| Block::new(vb.pp(format!("blocks.{i}")), config))
                .collect::<Result<_>>()?,
            norm: LayerNorm::new(vb.pp("norm"), config.dim)?,
            frozen_blocks: None,
            frozen_patch_embedding: false,
        })
    }

    pub fn feature_dim(&self) -> usize {
        self.config.dim
    }

    /// Freezes the embeddings and the first `blocks` blocks for training (`None`: nothing).
    pub fn freeze_blocks(&mut self, blocks: Option<usize>) {
        self.frozen_blocks = blocks;
    }

    /// Keeps the patch projection at its random start: MoCo v3's remedy for the training
    /// instability that starts in the first layer (Chen, Xie & He 2021, §4.2). The optimiser
    /// skips a parameter without gradient, weight decay included.
    pub fn freeze_patch_embedding(&mut self) {
        self.frozen_patch_embedding = true;
    }

    /// The class token's output after the final norm, `[N, dim]`. A ViT has neither dropout
    /// nor batch statistics here, so `train` only decides whether frozen layers pass gradients.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let frozen = if train { self.frozen_blocks } else { None };
        let mut h = self.tokens(x)?;
        for (i, block) in self.blocks.iter().enumerate() {
            if frozen == Some(i) {
                h = h.detach();
            }
            h = block.forward(&h)?;
        }
        if frozen.is_some_and(|f| f >= self.blocks.len()) {
            h = h.detach();
        }
        self.norm.forward(&h.i((.., 0))?)
    }

    /// The class token and the patch tokens with their positions, `[N, 1 + rows·columns, dim]`.
    /// Pixels past the last whole patch are dropped (as a strided convolution does).
    fn tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (n, channels, height, width) = x.dims4()?;
        let p = self.config.patch;
        let (rows, columns) = (height / p, width / p);
        if rows == 0 || columns == 0 {
            candle_core::bail!("a {height}×{width} image is smaller than the ViT's {p}-pixel patches")
        }
        let patches = x
            .narrow(2, 0, rows * p)?
            .narrow(3, 0, columns * p)?
            .reshape(vec![n, channels, rows, p, columns, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((n, rows * columns, channels * p * p))?;
        let patch_tokens = if self.frozen_patch_embedding {
            let weight = self.patch_embed.weight().detach();
            let bias = self.patch_embed.bias().map(Tensor::detach);
            Linear::new(weight, bias).forward(&patches)?
        } else {
            self.patch_embed.forward(&patches)?
        };
        let cls = self.cls_token.reshape((1, 1, self.config.dim))?.broadcast_as((n, 1, self.config.dim))?;
        let tokens = Tensor::cat(&[&cls, &patch_tokens], 1)?;
        tokens.broadcast_add(&self.positions(rows, columns)?.unsqueeze(0)?)
    }

    /// Position embeddings for a `rows × columns` grid: the learned ones, or their bilinear
    /// interpolation when the grid differs from the one they were learned for.
    fn positions(&self, rows: usize, columns: usize) -> Result<Tensor> {
        let [grid_rows, grid_columns] = self.config.position_grid;
        if (rows, columns) == (grid_rows, grid_columns) {
            return Ok(self.pos_embed.clone());
        }
        let cls = self.pos_embed.narrow(0, 0, 1)?;
        let grid = self.pos_embed.narrow(0, 1, grid_rows * grid_columns)?;
        let weights = bilinear_weights([grid_rows, grid_columns], [rows, columns], grid.device())?;
        Tensor::cat(&[&cls, &weights.matmul(&grid)?], 0)
    }

    /// The encoder in evaluation mode as ONNX nodes reading `input` (`[N, C, H, W]` of `height`
    /// × `width`); returns the `[N, dim]` feature value, named `features`.
    pub fn to_onnx(&self, g: &mut GraphBuilder, input: &str, height: usize, width: usize) -> ExportResult<String> {
        let (p, dim, channels) = (self.config.patch, self.config.dim, self.config.in_channels);
        let (rows, columns) = (height / p, width / p);
        // The patch embedding as a convolution with kernel = stride = p; its weight is the linear
        // map's, whose input order (C, p, p) is the convolution kernel's.
        let kernel = self.patch_embed.weight().reshape((dim, channels, p, p))?;
        let kernel = g.tensor("patch_embed.kernel", &kernel)?;
        let bias = g.tensor("patch_embed.bias", self.patch_embed.bias().expect("the patch embedding has a bias"))?;
        let attributes = [("kernel_shape", Attr::Ints(vec![p as i64; 2])), ("strides", Attr::Ints(vec![p as i64; 2]))];
        let maps = g.node("Conv", &[input, &kernel, &bias], "patch_embed", &attributes)?;
        let flat_shape = g.initializer_i64("patch_embed.flat_shape", &[3], &[0, dim as i64, -1])?;
        let flat = g.node("Reshape", &[&maps, &flat_shape], "patch_embed.flat", &[])?;
        let patch_tokens = g.node("Transpose", &[&flat], "patch_tokens", &[("perm", Attr::Ints(vec![0, 2, 1]))])?;
        // The class token repeated over the batch: Expand to [N, 1, dim], N read from the input.
        let input_shape = g.node("Shape", &[input], "input_shape", &[])?;
        let batch_index = g.initializer_i64("batch_index", &[1], &[0])?;
        let batch = g.node("Gather", &[&input_shape, &batch_index], "batch", &[("axis", Attr::Int(0))])?;
        let token_shape = g.initializer_i64("cls_token.tail_shape", &[2], &[1, dim as i64])?;
        let cls_shape = g.node("Concat", &[&batch, &token_shape], "cls_token.shape", &[("axis", Attr::Int(0))])?;
        let cls = g.tensor("cls_token", &self.cls_token.reshape((1, 1, dim))?)?;
        let cls = g.node("Expand", &[&cls, &cls_shape], "cls_tokens", &[])?;
        let tokens = g.node("Concat", &[&cls, &patch_tokens], "tokens", &[("axis", Attr::Int(1))])?;
        let positions = g.tensor("pos_embed", &self.positions(rows, columns)?.unsqueeze(0)?)?;
        let mut h = g.node("Add", &[&tokens, &positions], "tokens.positioned", &[])?;
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.to_onnx(g, &h, &format!("blocks.{i}"))?;
        }
        let cls_index = g.initializer_i64("cls_index", &[], &[0])?;
        let cls_out = g.node("Gather", &[&h, &cls_index], "cls_out", &[("axis", Attr::Int(1))])?;
        self.norm.to_onnx(g, &cls_out, "features")
    }
}

/// The `[to_rows·to_columns, from_rows·from_columns]` matrix of bilinear interpolation between
/// row-major grids, with half-pixel centres and edge clamping (PyTorch's `interpolate(mode=
/// "bilinear", align_corners=False)`).
pub fn bilinear_weights(from: [usize; 2], to: [usize; 2], device: &Device) -> Result<Tensor> {
    let rows = axis_weights(from[0], to[0]);
    let columns = axis_weights(from[1], to[1]);
    let (from_size, to_size) = (from[0] * from[1], to[0] * to[1]);
    let mut weights = vec![0f32; to_size * from_size];
    for (r, row) in rows.iter().enumerate() {
        for (c, column) in columns.iter().enumerate() {
            let out = r * to[1] + c;
            for &(source_row, wr) in row {
                for &(source_column, wc) in column {
                    weights[out * from_size + source_row * from[1] + source_column] += wr * wc;
                }
            }
        }
    }
    Tensor::from_vec(weights, (to_size, from_size), device)?.to_dtype(DType::F32)
}

/// For each of `to` output positions, the two source positions and their weights.
fn axis_weights(from: usize, to: usize) -> Vec<[(usize, f32); 2]> {
    let scale = from as f64 / to as f64;
    (0..to)
        .map(|i| {
            let source = ((i as f64 + 0.5) * scale - 0.5).clamp(0.0, (from - 1) as f64);
            let low = source.floor() as usize;
            let high = (low + 1).min(from - 1);
            let frac = (source - low as f64) as f32;
            [(low, 1.0 - frac), (high, frac)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn small() -> VitConfig {
        VitConfig { in_channels: 1, patch: 4, position_grid: [2, 2], dim: 8, depth: 2, heads: 2, mlp_ratio: 2 }
    }

    fn build(config: &VitConfig, dtype: DType) -> Result<(VarMap, Vit)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let vit = Vit::new(vb, config)?;
        Ok((varmap, vit))
    }

    #[test]
    fn tiny_vit_has_the_counted_parameters() -> anyhow::Result<()> {
        let (varmap, _) = build(&VitConfig::tiny(1, 28, 28), DType::F32)?;
        let count: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        // Counted by hand: patch embedding 16·128 + 128; class token 128; positions 50·128;
        // per block: two norms 4·128, qkv 128·384 + 384, proj 128·128 + 128,
        // MLP 128·512 + 512 + 512·128 + 128 = 198,272; final norm 256.
        let expected = 2_176 + 128 + 6_400 + 4 * 198_272 + 256;
        assert_eq!(count, expected);
        assert_eq!(count, 802_048);
        Ok(())
    }

    /// The primitive layer norm against the formula on a hand-checked row: [1, 2, 3, 6] has
    /// mean 3 and variance 3.5.
    #[test]
    fn layer_norm_matches_the_formula() -> anyhow::Result<()> {
        let norm = LayerNorm {
            weight: Tensor::new(&[1f32, 2., 1., 1.], &Device::Cpu)?,
            bias: Tensor::new(&[0f32, 0., 1., 0.], &Device::Cpu)?,
        };
        let out = norm.forward(&Tensor::new(&[[1f32, 2., 3., 6.]], &Device::Cpu)?)?.to_vec2::<f32>()?;
        let s = (3.5f32 + 1e-6).sqrt();
        let expected = [-2.0 / s, -2.0 / s, 1.0, 3.0 / s];
        for (a, b) in out[0].iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{:?} vs {expected:?}", out[0]);
        }
        Ok(())
    }

    /// Attention against a plain-loop implementation of softmax(QKᵀ/√d)V per head.
    #[test]
    fn attention_matches_a_loop_reference() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let attn = Attention::new(vb, 4, 2)?;
        // Non-zero biases so that their placement is checked too.
        for var in varmap.all_vars() {
            var.set(&Tensor::randn(0f64, 0.5, var.shape(), &Device::Cpu)?)?;
        }
        let x = Tensor::randn(0f64, 1.0, (2, 3, 4), &Device::Cpu)?;
        let got = attn.forward(&x)?.to_vec3::<f64>()?;

        let matrix = |t: &Tensor| t.to_vec2::<f64>();
        let (w_qkv, b_qkv) = (matrix(attn.qkv.weight())?, attn.qkv.bias().unwrap().to_vec1::<f64>()?);
        let (w_proj, b_proj) = (matrix(attn.proj.weight())?, attn.proj.bias().unwrap().to_vec1::<f64>()?);
        let apply = |w: &[Vec<f64>], b: &[f64], v: &[f64]| -> Vec<f64> {
            w.iter().zip(b).map(|(row, bias)| row.iter().zip(v).map(|(a, b)| a * b).sum::<f64>() + bias).collect()
        };
        for (n, sample) in x.to_vec3::<f64>()?.iter().enumerate() {
            let qkv: Vec<Vec<f64>> = sample.iter().map(|t| apply(&w_qkv, &b_qkv, t)).collect();
            let mut mixed = vec![vec![0.0; 4]; 3];
            for head in 0..2 {
                let part = |t: usize, which: usize| &qkv[t][which * 4 + head * 2..which * 4 + head * 2 + 2];
                for (i, mixed_row) in mixed.iter_mut().enumerate() {
                    let scores: Vec<f64> = (0..3)
                        .map(|j| part(i, 0).iter().zip(part(j, 1)).map(|(a, b)| a * b).sum::<f64>() / 2f64.sqrt())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = exp.iter().sum();
                    for (j, weight) in exp.iter().enumerate() {
                        for d in 0..2 {
                            mixed_row[head * 2 + d] += weight / total * part(j, 2)[d];
                        }
                    }
                }
            }
            for (i, mixed_row) in mixed.iter().enumerate() {
                let expected = apply(&w_proj, &b_proj, mixed_row);
                for (a, b) in got[n][i].iter().zip(&expected) {
                    assert!((a - b).abs() < 1e-10, "sample {n} token {i}: {:?} vs {expected:?}", got[n][i]);
                }
            }
        }
        Ok(())
    }

    /// Gradients of every parameter (and so of the primitive norm, softmax and GELU) against
    /// central finite differences, in f64.
    #[test]
    fn gradients_match_finite_differences() -> anyhow::Result<()> {
        let (varmap, vit) = build(&small(), DType::F64)?;
        let x = Tensor::randn(0f64, 1.0, (2, 1, 8, 8), &Device::Cpu)?;
        let target = Tensor::randn(0f64, 1.0, (2, 8), &Device::Cpu)?;
        let loss_of = |vit: &Vit| -> Result<Tensor> { (vit.forward_t(&x, true)? - &target)?.sqr()?.sum_all() };
        let grads = loss_of(&vit)?.backward()?;
        let eps = 1e-5;
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            let grad = grad.flatten_all()?.to_vec1::<f64>()?;
            let values = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            // A few coordinates of each parameter.
            for index in [0, values.len() / 2, values.len() - 1] {
                let shifted = |delta: f64| -> Result<f64> {
                    let mut v = values.clone();
                    v[index] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
                    loss_of(&vit)?.to_scalar::<f64>()
                };
                let numeric = (shifted(eps)? - shifted(-eps)?) / (2.0 * eps);
                var.set(&Tensor::from_vec(values.clone(), var.shape(), &Device::Cpu)?)?;
                let tolerance = 1e-6 + 1e-4 * numeric.abs();
                assert!(
                    (grad[index] - numeric).abs() < tolerance,
                    "{name}[{index}]: backward {} vs finite difference {numeric}",
                    grad[index]
                );
            }
        }
        Ok(())
    }

    /// Bilinear interpolation against PyTorch's `interpolate(align_corners=False)` worked by
    /// hand: 2 → 4 positions sample at −0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
    #[test]
    fn bilinear_weights_follow_half_pixel_centres() -> anyhow::Result<()> {
        let same = bilinear_weights([3, 2], [3, 2], &Device::Cpu)?;
        assert_eq!(same.to_vec2::<f32>()?, Tensor::eye(6, DType::F32, &Device::Cpu)?.to_vec2::<f32>()?);
        let up = bilinear_weights([1, 2], [1, 4], &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(up, vec![vec![1.0, 0.0], vec![0.75, 0.25], vec![0.25, 0.75], vec![0.0, 1.0]]);
        let values = Tensor::new(&[[1f32], [2.], [3.], [4.]], &Device::Cpu)?; // a 2×2 grid
        let down = bilinear_weights([2, 2], [1, 1], &Device::Cpu)?.matmul(&values)?;
        assert_eq!(down.to_vec2::<f32>()?, vec![vec![2.5]]);
        Ok(())
    }

    #[test]
    fn other_image_sizes_use_interpolated_positions() -> anyhow::Result<()> {
        let (_, vit) = build(&small(), DType::F32)?;
        // 8×8 is the learned 2×2 grid; 12×12 a 3×3 grid; 13×13 drops its last pixel row and column.
        for side in [8, 12, 13] {
            let x = Tensor::rand(0f32, 1f32, (3, 1, side, side), &Device::Cpu)?;
            assert_eq!(vit.forward_t(&x, true)?.dims(), &[3, 8]);
        }
        let cropped = Tensor::rand(0f32, 1f32, (1, 1, 13, 13), &Device::Cpu)?;
        let diff = (vit.forward_t(&cropped, false)?
            - vit.forward_t(&cropped.narrow(2, 0, 12)?.narrow(3, 0, 12)?, false)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let err = vit.forward_t(&Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu)?, false).unwrap_err();
        assert!(err.to_string().contains("smaller than the ViT's 4-pixel patches"), "{err}");
        Ok(())
    }

    #[test]
    fn frozen_blocks_get_no_gradient() -> anyhow::Result<()> {
        let (varmap, mut vit) = build(&small(), DType::F32)?;
        vit.freeze_blocks(Some(1));
        let x = Tensor::rand(0f32, 1f32, (2, 1, 8, 8), &Device::Cpu)?;
        let grads = vit.forward_t(&x, true)?.sqr()?.sum_all()?.backward()?;
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let trained = name.starts_with("blocks.1.") || name.starts_with("norm.");
            assert_eq!(grads.get(var.as_tensor()).is_some(), trained, "gradient of {name}");
        }
        Ok(())
    }

    #[test]
    fn widths_that_do_not_split_into_heads_are_refused() {
        let config = VitConfig { heads: 3, ..small() };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("must split evenly into its 3 heads"), "{err}");
    }
}
