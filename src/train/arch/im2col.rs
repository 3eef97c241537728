//! 2-D convolution on the CPU as im2col + gemm, with a backward pass that also stays in gemm.
//!
//! candle's CPU `conv2d` backward goes through a naive `conv_transpose2d` and dominates a ResNet
//! training step. Here the convolution of one image is the matrix product
//!
//! ```text
//! Y[c_out, P] = W[c_out, K] · col[K, P],   K = c_in·k·k,  P = h_out·w_out,
//! col[(ci, kh, kw), (oh, ow)] = x[ci, oh·s + kh − p, ow·s + kw − p]   (0 outside the image)
//! ```
//!
//! and its gradients are two more products per image:
//!
//! ```text
//! dcol[K, P]   = Wᵀ · dY      then dx = col2im(dcol)   (scatter-add, the adjoint of im2col)
//! dW[c_out, K] = Σₙ dYₙ · colₙᵀ
//! ```
//!
//! Transposes are expressed as gemm strides (never copied), im2col/col2im move whole contiguous
//! row segments (padding is handled by ranges, not per-element branches), images run in parallel
//! with rayon (one single-threaded gemm per image), and the backward recomputes `col` instead of
//! storing it. Supports f32 and f64 contiguous tensors on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

/// The sizes of one convolution: input `[batch, in_channels, in_height, in_width]`, square
/// kernel `[out_channels, in_channels, kernel, kernel]`, no dilation, no groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub in_height: usize,
    pub in_width: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl ConvGeometry {
    /// Checks that the input and kernel shapes fit together and computes the output size.
    pub fn new(input_dims: &[usize], weight_dims: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let (&[batch, in_channels, in_height, in_width], &[out_channels, weight_in, kernel, kernel_w]) =
            (input_dims, weight_dims)
        else {
            bail!("im2col conv2d expects a 4-d input and kernel, got {input_dims:?} and {weight_dims:?}")
        };
        if weight_in != in_channels {
            bail!("im2col conv2d: input has {in_channels} channels but the kernel expects {weight_in} ({input_dims:?} vs {weight_dims:?})")
        }
        if kernel != kernel_w {
            bail!("im2col conv2d supports square kernels only, got {kernel}x{kernel_w}")
        }
        if stride == 0 {
            bail!("im2col conv2d: stride must be at least 1")
        }
        if in_height + 2 * padding < kernel || in_width + 2 * padding < kernel {
            bail!("im2col conv2d: kernel {kernel} is larger than the padded input {in_height}x{in_width} (padding {padding})")
        }
        Ok(Self {
            batch,
            in_channels,
            in_height,
            in_width,
            out_channels,
            kernel,
            stride,
            padding,
            out_height: (in_height + 2 * padding - kernel) / stride + 1,
            out_width: (in_width + 2 * padding - kernel) / stride + 1,
        })
    }

    /// `K`: rows of the column matrix (one per input channel and kernel offset).
    pub fn col_rows(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }

    /// `P`: columns of the column matrix (one per output pixel).
    pub fn col_cols(&self) -> usize {
        self.out_height * self.out_width
    }

    fn input_image_len(&self) -> usize {
        self.in_channels * self.in_height * self.in_width
    }

    fn output_image_len(&self) -> usize {
        self.out_channels * self.col_cols()
    }

    pub fn output_shape(&self) -> Shape {
        Shape::from((self.batch, self.out_channels, self.out_height, self.out_width))
    }

    pub fn input_shape(&self) -> Shape {
        Shape::from((self.batch, self.in_channels, self.in_height, self.in_width))
    }

    /// A 1x1, stride-1, unpadded convolution's column matrix is the image itself.
    fn col_is_image(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// Output indices `o` in `0..out_len` whose input index `o·stride + offset − padding` lies
    /// in `0..in_len`, as a half-open range (empty ranges come back as `(hi, hi)`).
    fn valid_outputs(&self, offset: usize, in_len: usize, out_len: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let lo = if offset >= p { 0 } else { (p - offset).div_ceil(s) };
        let hi = if in_len + p > offset { ((in_len + p - offset - 1) / s + 1).min(out_len) } else { 0 };
        (lo.min(hi), hi)
    }
}

/// Fills `col` (`K × P`, row-major) with the patches of one image (`c_in × h × w`).
fn im2col<T: WithDType>(g: &ConvGeometry, image: &[T], col: &mut [T]) {
    let (k, s, p) = (g.kernel, g.stride, g.padding);
    let (w_in, w_out, p_len) = (g.in_width, g.out_width, g.col_cols());
    let zero = T::from_f64(0.0);
    for ci in 0..g.in_channels {
        let channel = &image[ci * g.in_height * w_in..][..g.in_height * w_in];
        for kh in 0..k {
            let (oh_lo, oh_hi) = g.valid_outputs(kh, g.in_height, g.out_height);
            for kw in 0..k {
                let row = &mut col[((ci * k + kh) * k + kw) * p_len..][..p_len];
                let (ow_lo, ow_hi) = g.valid_outputs(kw, w_in, w_out);
                row[..oh_lo * w_out].fill(zero);
                row[oh_hi * w_out..].fill(zero);
                for oh in oh_lo..oh_hi {
                    let segment = &mut row[oh * w_out..][..w_out];
                    segment[..ow_lo].fill(zero);
                    segment[ow_hi..].fill(zero);
                    if ow_lo == ow_hi {
                        continue;
                    }
                    let source = &channel[(oh * s + kh - p) * w_in..][..w_in];
                    let first = ow_lo * s + kw - p;
                    let inside = &mut segment[ow_lo..ow_hi];
                    if s == 1 {
                        inside.copy_from_slice(&source[first..first + inside.len()]);
                    } else {
                        for (dst, src) in inside.iter_mut().zip(source[first..].iter().step_by(s)) {
                            *dst = *src;
                        }
                    }
                }
            }
        }
    }
}

/// Adds the columns of `col` (`K × P`) back onto one image's gradient (`c_in × h × w`): the
/// adjoint of [`im2col`].
fn col2im_add<T: WithDType>(g: &ConvGeometry, col: &[T], image: &mut [T]) {
    let (k, s, p) = (g.kernel, g.stride, g.padding);
    let (w_in, w_out, p_len) = (g.in_width, g.out_width, g.col_cols());
    for ci in 0..g.in_channels {
        let channel = &mut image[ci * g.in_height * w_in..][..g.in_height * w_in];
        for kh in 0..k {
            let (oh_lo, oh_hi) = g.valid_outputs(kh, g.in_height, g.out_height);
            for kw in 0..k {
                let row = &col[((ci * k + kh) * k + kw) * p_len..][..p_len];
                let (ow_lo, ow_hi) = g.valid_outputs(kw, w_in, w_out);
                if ow_lo == ow_hi {
                    continue;
                }
                let first = ow_lo * s + kw - p;
                for oh in oh_lo..oh_hi {
                    let inside = &row[oh * w_out + ow_lo..oh * w_out + ow_hi];
                    let target = &mut channel[(oh * s + kh - p) * w_in..][..w_in];
                    if s == 1 {
                        for (dst, src) in target[first..first + inside.len()].iter_mut().zip(inside) {
                            *dst += *src;
                        }
                    } else {
                        for (dst, src) in target[first..].iter_mut().step_by(s).zip(inside) {
                            *dst += *src;
                        }
                    }
                }
            }
        }
    }
}

/// A row-major-or-strided matrix operand for [`matmul`]: pointer, row stride, column stride.
#[derive(Clone, Copy)]
struct Operand<T> {
    ptr: *const T,
    row_stride: usize,
    col_stride: usize,
}

impl<T> Operand<T> {
    /// A row-major `rows × cols` matrix.
    fn rows(data: &[T], cols: usize) -> Self {
        Self { ptr: data.as_ptr(), row_stride: cols, col_stride: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns (read by strides, not copied).
    fn transposed(data: &[T], cols: usize) -> Self {
        Self { ptr: data.as_ptr(), row_stride: 1, col_stride: cols }
    }
}

/// `dst[m × n] (row-major) = [dst +] lhs[m × k] · rhs[k × n]`, through the `gemm` crate.
///
/// # Safety
/// `dst` must hold `m·n` elements and the operands must address `m × k` and `k × n` matrices
/// inside live slices.
unsafe fn matmul<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    lhs: Operand<T>,
    rhs: Operand<T>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    let one = T::from_f64(1.0);
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        n as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.ptr,
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        one,
        one,
        false,
        false,
        false,
        parallelism,
    )
}

/// `y = conv(x, w)` for contiguous `x` (`N × c_in × h × w`) and `w` (`c_out × K`).
fn conv_forward<T: WithDType>(g: &ConvGeometry, x: &[T], w: &[T]) -> Vec<T> {
    let (k_len, p_len) = (g.col_rows(), g.col_cols());
    let mut y = vec![T::from_f64(0.0); g.batch * g.output_image_len()];
    let col_len = if g.col_is_image() { 0 } else { k_len * p_len };
    y.par_chunks_mut(g.output_image_len().max(1))
        .zip(x.par_chunks(g.input_image_len().max(1)))
        .for_each_init(
            || vec![T::from_f64(0.0); col_len],
            |col, (y_image, x_image)| {
                let col: &[T] = if g.col_is_image() {
                    x_image
                } else {
                    im2col(g, x_image, col);
                    col
                };
                // SAFETY: sizes follow from the geometry: W is c_out × K, col is K × P.
                unsafe {
                    matmul(
                        (g.out_channels, p_len, k_len),
                        y_image,
                        Operand::rows(w, k_len),
                        Operand::rows(col, p_len),
                        false,
                        Parallelism::None,
                    )
                }
            },
        );
    y
}

/// `dx` for contiguous `dy` (`N × c_out × P`) and `w` (`c_out × K`).
fn conv_grad_input<T: WithDType>(g: &ConvGeometry, dy: &[T], w: &[T]) -> Vec<T> {
    let (k_len, p_len) = (g.col_rows(), g.col_cols());
    let mut dx = vec![T::from_f64(0.0); g.batch * g.input_image_len()];
    let col_len = if g.col_is_image() { 0 } else { k_len * p_len };
    dx.par_chunks_mut(g.input_image_len().max(1))
        .zip(dy.par_chunks(g.output_image_len().max(1)))
        .for_each_init(
            || vec![T::from_f64(0.0); col_len],
            |dcol, (dx_image, dy_image)| {
                let product = (k_len, p_len, g.out_channels);
                let (lhs, rhs) = (Operand::transposed(w, k_len), Operand::rows(dy_image, p_len));
                // SAFETY: Wᵀ is K × c_out, dY is c_out × P, dcol (or dx) is K × P.
                unsafe {
                    if g.col_is_image() {
                        matmul(product, dx_image, lhs, rhs, false, Parallelism::None);
                    } else {
                        matmul(product, dcol, lhs, rhs, false, Parallelism::None);
                        col2im_add(g, dcol, dx_image);
                    }
                }
            },
        );
    dx
}

/// `dw` (`c_out × K`) for contiguous `x` and `dy`, summed over the batch.
fn conv_grad_weight<T: WithDType>(g: &ConvGeometry, x: &[T], dy: &[T]) -> Vec<T> {
    let (k_len, p_len) = (g.col_rows(), g.col_cols());
    let zero = T::from_f64(0.0);
    let dw_len = g.out_channels * k_len;
    let col_len = if g.col_is_image() { 0 } else { k_len * p_len };
    let (in_len, out_len) = (g.input_image_len(), g.output_image_len());
    (0..g.batch)
        .into_par_iter()
        .fold(
            || (vec![zero; dw_len], vec![zero; col_len]),
            |(mut dw, mut col), n| {
                let x_image = &x[n * in_len..][..in_len];
                if !g.col_is_image() {
                    im2col(g, x_image, &mut col);
                }
                let patches: &[T] = if g.col_is_image() { x_image } else { &col };
                // SAFETY: dY is c_out × P, colᵀ is P × K, dw is c_out × K.
                unsafe {
                    matmul(
                        (g.out_channels, k_len, p_len),
                        &mut dw,
                        Operand::rows(&dy[n * out_len..][..out_len], p_len),
                        Operand::transposed(patches, p_len),
                        true,
                        Parallelism::None,
                    )
                }
                (dw, col)
            },
        )
        .map(|(dw, _)| dw)
        .reduce(
            || vec![zero; dw_len],
            |mut total, part| {
                total.iter_mut().zip(&part).for_each(|(t, p)| *t += *p);
                total
            },
        )
}

/// The data of a contiguous tensor, or an error naming the op.
fn contiguous_slice<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("im2col conv2d: {what} must be contiguous (call .contiguous() first)"),
    }
}

/// Runs `f` on two CPU storages of the same float dtype (f32 or f64).
fn dispatch_float(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32_fn: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64_fn: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => Ok(CpuStorage::F32(f32_fn(
            contiguous_slice(s1, l1, "first operand")?,
            contiguous_slice(s2, l2, "second operand")?,
        ))),
        (CpuStorage::F64(_), CpuStorage::F64(_)) => Ok(CpuStorage::F64(f64_fn(
            contiguous_slice(s1, l1, "first operand")?,
            contiguous_slice(s2, l2, "second operand")?,
        ))),
        _ => bail!("{op} supports f32 or f64 operands of one dtype, got {:?} and {:?}", s1.dtype(), s2.dtype()),
    }
}

/// The forward op on `(x, w)`; its backward runs [`Im2colConvGradInput`] and [`Im2colConvGradWeight`].
struct Im2colConv2d {
    stride: usize,
    padding: usize,
}

impl CustomOp2 for Im2colConv2d {
    fn name(&self) -> &'static str {
        "im2col-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeometry::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let y = dispatch_float(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, w| conv_forward(&g, x, w),
            |x, w| conv_forward(&g, x, w),
        )?;
        Ok((y, g.output_shape()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let geometry = ConvGeometry::new(x.dims(), w.dims(), self.stride, self.padding)?;
        let dy = dy.contiguous()?;
        // The stem's input is data: skip its gradient.
        let dx = match x.track_op() {
            true => Some(dy.apply_op2_no_bwd(w, &Im2colConvGradInput { geometry })?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(x.apply_op2_no_bwd(&dy, &Im2colConvGradWeight { geometry })?),
            false => None,
        };
        Ok((dx, dw))
    }
}

/// `dx` from `(dy, w)`.
struct Im2colConvGradInput {
    geometry: ConvGeometry,
}

impl CustomOp2 for Im2colConvGradInput {
    fn name(&self) -> &'static str {
        "im2col-conv2d-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.geometry;
        if l1.shape() != &g.output_shape() {
            bail!("{}: gradient has shape {:?}, expected {:?}", self.name(), l1.shape(), g.output_shape())
        }
        let dx = dispatch_float(
            self.name(),
            (s1, l1),
            (s2, l2),
            |dy, w| conv_grad_input(g, dy, w),
            |dy, w| conv_grad_input(g, dy, w),
        )?;
        Ok((dx, g.input_shape()))
    }
}

/// `dw` from `(x, dy)`.
struct Im2colConvGradWeight {
    geometry: ConvGeometry,
}

impl CustomOp2 for Im2colConvGradWeight {
    fn name(&self) -> &'static str {
        "im2col-conv2d-grad-weight"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.geometry;
        if l2.shape() != &g.output_shape() {
            bail!("{}: gradient has shape {:?}, expected {:?}", self.name(), l2.shape(), g.output_shape())
        }
        let dw = dispatch_float(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, dy| conv_grad_weight(g, x, dy),
            |x, dy| conv_grad_weight(g, x, dy),
        )?;
        Ok((dw, Shape::from((g.out_channels, g.in_channels, g.kernel, g.kernel))))
    }
}

/// Convolution of `x` (`N × c_in × h × w`) with `w` (`c_out × c_in × k × k`), no bias, no
/// dilation, as im2col + gemm on the CPU, with gradients for both operands. f32 or f64.
pub fn conv2d_im2col(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || !w.device().is_cpu() {
        bail!("im2col conv2d runs on the CPU only, got {:?} and {:?}", x.device(), w.device())
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Im2colConv2d { stride, padding })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Largest |a − b| relative to the largest |b|.
    fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap();
        diff.to_scalar::<f64>().unwrap() / scale.to_scalar::<f64>().unwrap().max(1e-30)
    }

    /// Values and gradients (of `Σ y·r` for random `r`) of both implementations.
    fn compare_with_candle(dims: (usize, usize, usize, usize), out_channels: usize, kernel: usize, stride: usize, padding: usize, dtype: DType, tolerance: f64) {
        let device = Device::Cpu;
        let (n, c, h, w) = dims;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (n, c, h, w), &device).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let weight = Var::from_tensor(&Tensor::randn(0f64, 1.0, (out_channels, c, kernel, kernel), &device).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let expected = x.conv2d(&weight, padding, stride, 1, 1).unwrap();
        let actual = conv2d_im2col(&x, &weight, stride, padding).unwrap();
        let case = format!("{dims:?} -> {out_channels}, k{kernel} s{stride} p{padding} {dtype:?}");
        assert_eq!(actual.dims(), expected.dims(), "{case}");
        let value_error = relative_error(&actual, &expected);
        assert!(value_error < tolerance, "{case}: value error {value_error}");

        let probe = Tensor::randn(0f64, 1.0, expected.shape(), &device).unwrap().to_dtype(dtype).unwrap();
        let expected_grads = (&expected * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let actual_grads = (&actual * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("input", &x), ("weight", &weight)] {
            let error = relative_error(actual_grads.get(var).unwrap(), expected_grads.get(var).unwrap());
            assert!(error < tolerance, "{case}: {name} gradient error {error}");
        }
    }

    /// Shapes where candle's own conv2d backward is right: it sizes the input gradient from the
    /// height alone, so with stride 2 the height and width must give the same output padding.
    const CASES: [((usize, usize, usize, usize), usize, usize, usize, usize); 12] = [
        ((1, 1, 5, 5), 2, 3, 1, 1),
        ((3, 2, 7, 6), 3, 3, 1, 1),
        ((3, 2, 7, 9), 3, 3, 2, 1),
        ((3, 3, 9, 7), 4, 3, 2, 0),
        ((1, 3, 8, 8), 5, 3, 1, 0),
        ((3, 4, 7, 7), 2, 1, 1, 0),
        ((3, 4, 7, 9), 3, 1, 2, 0),
        ((1, 2, 6, 8), 3, 1, 2, 1),
        ((3, 1, 5, 5), 4, 1, 1, 1),
        ((1, 2, 4, 4), 2, 3, 2, 1),
        ((3, 5, 11, 9), 6, 3, 2, 1),
        ((1, 2, 3, 3), 2, 3, 1, 0),
    ];

    #[test]
    fn matches_candle_conv2d_in_f64() {
        for (dims, out, kernel, stride, padding) in CASES {
            compare_with_candle(dims, out, kernel, stride, padding, DType::F64, 1e-10);
        }
    }

    #[test]
    fn matches_candle_conv2d_in_f32() {
        for (dims, out, kernel, stride, padding) in CASES {
            compare_with_candle(dims, out, kernel, stride, padding, DType::F32, 1e-4);
        }
    }

    /// Central differences of `L = Σ conv(x, w)·r` for every input and kernel entry (f64), on a
    /// shape whose height and width round differently under stride 2 (candle fails there).
    #[test]
    fn gradients_match_finite_differences_on_uneven_shape() {
        let device = Device::Cpu;
        let x = Var::randn(0f64, 1.0, (2, 2, 6, 5), &device).unwrap();
        let w = Var::randn(0f64, 1.0, (3, 2, 3, 3), &device).unwrap();
        let (stride, padding) = (2, 1);
        let probe = Tensor::randn(0f64, 1.0, (2, 3, 3, 3), &device).unwrap();
        let loss = |x: &Tensor, w: &Tensor| {
            (conv2d_im2col(x, w, stride, padding).unwrap() * &probe).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let grads = (conv2d_im2col(&x, &w, stride, padding).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let h = 1e-4;
        for (var, is_input) in [(&x, true), (&w, false)] {
            let analytic = grads.get(var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let values = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in 0..values.len() {
                let shifted = |delta: f64| {
                    let mut v = values.clone();
                    v[i] += delta;
                    let t = Tensor::from_vec(v, var.shape(), &device).unwrap();
                    if is_input { loss(&t, &w) } else { loss(&x, &t) }
                };
                let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
                assert!((numeric - analytic[i]).abs() < 1e-7, "entry {i} (input: {is_input}): {numeric} vs {}", analytic[i]);
            }
        }
    }

    #[test]
    fn hand_computed_3x3_sum_kernel() {
        // An all-ones 3x3 kernel with padding 1 sums each pixel's neighbourhood.
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let w = Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let y = conv2d_im2col(&x, &w, 1, 1).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![10., 10., 10., 10.]);
        let y = conv2d_im2col(&x, &w, 2, 1).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![10.]);
    }

    #[test]
    fn reads_non_contiguous_input() {
        let x = Tensor::randn(0f32, 1.0, (4, 2, 6, 6), &Device::Cpu).unwrap().transpose(0, 1).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 4, 3, 3), &Device::Cpu).unwrap();
        let expected = x.contiguous().unwrap().conv2d(&w, 1, 1, 1, 1).unwrap();
        let actual = conv2d_im2col(&x, &w, 1, 1).unwrap();
        assert!(relative_error(&actual, &expected) < 1e-5);
    }

    #[test]
    fn rejects_mismatched_channels_and_integer_dtypes() {
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((1, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let message = conv2d_im2col(&x, &w, 1, 1).unwrap_err().to_string();
        assert!(message.contains("2 channels"), "{message}");
        let x = Tensor::zeros((1, 2, 4, 4), DType::U32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((1, 2, 3, 3), DType::U32, &Device::Cpu).unwrap();
        let message = conv2d_im2col(&x, &w, 1, 1).unwrap_err().to_string();
        assert!(message.contains("f32 or f64"), "{message}");
    }
}
