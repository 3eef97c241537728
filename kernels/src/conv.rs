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
//! `Wᵀ` is read through strides (never copied); the weight gradient is accumulated as
//! `dWᵀ = Σₙ colₙ · dYₙᵀ` with the small `dYₙ` transposed into a scratch buffer. im2col/col2im
//! move whole contiguous rows: with stride 1 and "same" width a row of the column matrix is
//! the input channel shifted by a constant, one copy plus a few zeroed border columns; other
//! shapes copy one output row at a time, padding handled by ranges, not per-element branches.
//! Images run in parallel with rayon (one single-threaded product per image, through the
//! AVX-512 kernel of [`crate::matmul_avx512`] for f32 where the CPU has it, else the `gemm`
//! crate), and the backward recomputes `col` instead of storing it. Supports f32 and f64.
//!
//! Stride-1 convolutions in f32 on AVX-512 skip im2col and col2im altogether ([`Implicit`]):
//! the product reads the patches in place from a padded copy of the image, and the input
//! gradient is a convolution of its own. Measured on the canonical encoder's layers (one
//! thread, A/B in one process): forward 20–25 % and backward 7–14 % faster per layer.

use std::any::TypeId;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::matmul_avx512::{self, matmul_f32, matmul_rows_f32, Rows, Strided};

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

/// Row `(ci, kh, kw)` of the column matrix in a stride-1 convolution whose output is as wide as
/// its input ("same" width) is the input channel shifted by one constant offset `d`: one
/// contiguous copy per row, then the columns that wrapped around the image edge are zeroed.
/// Returns the shift `d` and the range of `q` (index into the row) whose source `q + d` lies
/// in the channel.
fn same_width_shift(g: &ConvGeometry, kh: usize, kw: usize, (oh_lo, oh_hi): (usize, usize)) -> (isize, usize, usize) {
    let w = g.in_width as isize;
    let d = (kh as isize - g.padding as isize) * w + (kw as isize - g.padding as isize);
    let channel_len = (g.in_height * g.in_width) as isize;
    let lo = ((oh_lo * g.out_width) as isize).max(-d);
    let hi = ((oh_hi * g.out_width) as isize).min(channel_len - d);
    (d, lo.max(0) as usize, (hi.max(lo)).max(0) as usize)
}

impl ConvGeometry {
    /// Stride 1 and equal input and output widths (e.g. 3x3 with padding 1).
    fn is_same_width(&self) -> bool {
        self.stride == 1 && self.out_width == self.in_width
    }
}

/// Zeroes columns `..ow_lo` and `ow_hi..` of the output rows `oh_lo..oh_hi` of one column row.
/// Column by column: these runs are a single element or two, and a per-row `fill` would cost
/// a `memset` call each.
fn zero_outside_columns<T: WithDType>(
    row: &mut [T],
    w_out: usize,
    (oh_lo, oh_hi): (usize, usize),
    (ow_lo, ow_hi): (usize, usize),
) {
    let zero = T::from_f64(0.0);
    let rows = &mut row[oh_lo * w_out..oh_hi * w_out];
    for column in (0..ow_lo).chain(ow_hi..w_out) {
        for value in rows.iter_mut().skip(column).step_by(w_out) {
            *value = zero;
        }
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
            let rows = g.valid_outputs(kh, g.in_height, g.out_height);
            for kw in 0..k {
                let row = &mut col[((ci * k + kh) * k + kw) * p_len..][..p_len];
                let cols = g.valid_outputs(kw, w_in, w_out);
                row[..rows.0 * w_out].fill(zero);
                row[rows.1 * w_out..].fill(zero);
                if g.is_same_width() {
                    let (d, lo, hi) = same_width_shift(g, kh, kw, rows);
                    let source = &channel[(lo as isize + d) as usize..(hi as isize + d) as usize];
                    row[lo..hi].copy_from_slice(source);
                    row[rows.0 * w_out..lo].fill(zero);
                    row[hi..rows.1 * w_out].fill(zero);
                    zero_outside_columns(row, w_out, rows, cols);
                    continue;
                }
                zero_outside_columns(row, w_out, rows, cols);
                let (ow_lo, ow_hi) = cols;
                if ow_lo == ow_hi {
                    continue;
                }
                let len = ow_hi - ow_lo;
                let first = ow_lo * s + kw - p;
                for oh in rows.0..rows.1 {
                    let source = &channel[(oh * s + kh - p) * w_in..][..w_in];
                    let inside = &mut row[oh * w_out + ow_lo..][..len];
                    // Bounded slice and index loop: lets the compiler vectorise the strided gather.
                    let source = &source[first..first + (len - 1) * s + 1];
                    for (i, dst) in inside.iter_mut().enumerate() {
                        *dst = source[i * s];
                    }
                }
            }
        }
    }
}

/// Adds the columns of `col` (`K × P`) back onto one image's gradient (`c_in × h × w`): the
/// adjoint of [`im2col`]. Entries of `col` that fall on the padding are zeroed on the way.
fn col2im_add<T: WithDType>(g: &ConvGeometry, col: &mut [T], image: &mut [T]) {
    let (k, s, p) = (g.kernel, g.stride, g.padding);
    let (w_in, w_out, p_len) = (g.in_width, g.out_width, g.col_cols());
    for ci in 0..g.in_channels {
        let channel = &mut image[ci * g.in_height * w_in..][..g.in_height * w_in];
        for kh in 0..k {
            let rows = g.valid_outputs(kh, g.in_height, g.out_height);
            for kw in 0..k {
                let row = &mut col[((ci * k + kh) * k + kw) * p_len..][..p_len];
                let cols = g.valid_outputs(kw, w_in, w_out);
                if g.is_same_width() {
                    // Padding columns would wrap onto the neighbouring image row: drop them first.
                    zero_outside_columns(row, w_out, rows, cols);
                    let (d, lo, hi) = same_width_shift(g, kh, kw, rows);
                    let target = &mut channel[(lo as isize + d) as usize..(hi as isize + d) as usize];
                    target.iter_mut().zip(&row[lo..hi]).for_each(|(dst, src)| *dst += *src);
                    continue;
                }
                let (ow_lo, ow_hi) = cols;
                if ow_lo == ow_hi {
                    continue;
                }
                let len = ow_hi - ow_lo;
                let first = ow_lo * s + kw - p;
                for oh in rows.0..rows.1 {
                    let inside = &row[oh * w_out + ow_lo..][..len];
                    let target = &mut channel[(oh * s + kh - p) * w_in..][..w_in];
                    let target = &mut target[first..first + (len - 1) * s + 1];
                    for (i, src) in inside.iter().enumerate() {
                        target[i * s] += *src;
                    }
                }
            }
        }
    }
}

/// `dst[j·rows + i] = src[i·cols + j]`: the transpose of a row-major `rows × cols` matrix, in
/// cache-sized blocks.
fn transpose_into<T: Copy>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    const BLOCK: usize = 16;
    for i0 in (0..rows).step_by(BLOCK) {
        for j0 in (0..cols).step_by(BLOCK) {
            for i in i0..(i0 + BLOCK).min(rows) {
                for j in j0..(j0 + BLOCK).min(cols) {
                    dst[j * rows + i] = src[i * cols + j];
                }
            }
        }
    }
}

/// A strided matrix operand for [`matmul`]: element `(i, j)` is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
struct Operand<'a, T> {
    data: &'a [T],
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> Operand<'a, T> {
    /// A row-major `rows × cols` matrix.
    fn rows(data: &'a [T], cols: usize) -> Self {
        Self { data, row_stride: cols, col_stride: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns (read by strides, not copied).
    fn transposed(data: &'a [T], cols: usize) -> Self {
        Self { data, row_stride: 1, col_stride: cols }
    }
    /// The last element a `rows × cols` view addresses, plus one.
    fn extent(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * self.row_stride + (cols - 1) * self.col_stride + 1
        }
    }
}

/// Reinterprets `&[T]` as `&[f32]` when `T` is `f32`.
fn as_f32<T: 'static>(data: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 (same type id), so the slice's layout is identical.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), data.len()) })
}

fn as_f32_mut<T: 'static>(data: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: as in `as_f32`.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast(), data.len()) })
}

/// `dst[m × n] (row-major) = [dst +] lhs[m × k] · rhs[k × n]`, single-threaded (callers run
/// one product per image in parallel): the AVX-512 kernel for f32 where the CPU has it, else
/// the `gemm` crate.
fn matmul<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    lhs: Operand<T>,
    rhs: Operand<T>,
    accumulate: bool,
) {
    assert!(
        dst.len() >= m * n && lhs.data.len() >= lhs.extent(m, k) && rhs.data.len() >= rhs.extent(k, n),
        "matmul operands too short for {m}x{n}x{k}"
    );
    if let (Some(a), Some(b), true) = (as_f32(lhs.data), as_f32(rhs.data), rhs.col_stride == 1) {
        let a = Strided { data: a, row_stride: lhs.row_stride, col_stride: lhs.col_stride };
        let b = Strided { data: b, row_stride: rhs.row_stride, col_stride: 1 };
        if matmul_f32((m, n, k), a, b, as_f32_mut(dst).expect("dst has lhs's type"), n, accumulate) {
            return;
        }
    }
    let one = T::from_f64(1.0);
    // SAFETY: the assertion above keeps every addressed element inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            one,
            one,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// `y = conv(x, w)` for contiguous `x` (`N × c_in × h × w`) and `w` (`c_out × K`).
fn conv_forward<T: WithDType>(g: &ConvGeometry, x: &[T], w: &[T]) -> Vec<T> {
    if let (Some(implicit), Some(x32), Some(w32)) = (Implicit::of(g), as_f32(x), as_f32(w)) {
        return from_f32(implicit_forward(g, &implicit, x32, w32));
    }
    let (k_len, p_len) = (g.col_rows(), g.col_cols());
    let mut y = vec![T::from_f64(0.0); g.batch * g.output_image_len()];
    let col_len = if g.col_is_image() { 0 } else { k_len * p_len };
    y.par_chunks_mut(g.output_image_len().max(1)).zip(x.par_chunks(g.input_image_len().max(1))).for_each_init(
        || vec![T::from_f64(0.0); col_len],
        |col, (y_image, x_image)| {
            let col: &[T] = if g.col_is_image() {
                x_image
            } else {
                im2col(g, x_image, col);
                col
            };
            // W is c_out × K, col is K × P.
            matmul((g.out_channels, p_len, k_len), y_image, Operand::rows(w, k_len), Operand::rows(col, p_len), false);
        },
    );
    y
}

/// `dx` for contiguous `dy` (`N × c_out × P`) and `w` (`c_out × K`).
fn conv_grad_input<T: WithDType>(g: &ConvGeometry, dy: &[T], w: &[T]) -> Vec<T> {
    if let (Some(_), Some(dy32), Some(w32)) = (Implicit::of(g), as_f32(dy), as_f32(w)) {
        return from_f32(implicit_grad_input(g, dy32, w32));
    }
    let (k_len, p_len) = (g.col_rows(), g.col_cols());
    let mut dx = vec![T::from_f64(0.0); g.batch * g.input_image_len()];
    let col_len = if g.col_is_image() { 0 } else { k_len * p_len };
    dx.par_chunks_mut(g.input_image_len().max(1)).zip(dy.par_chunks(g.output_image_len().max(1))).for_each_init(
        || vec![T::from_f64(0.0); col_len],
        |dcol, (dx_image, dy_image)| {
            // Wᵀ is K × c_out, dY is c_out × P, dcol (or dx) is K × P.
            let product = (k_len, p_len, g.out_channels);
            let (lhs, rhs) = (Operand::transposed(w, k_len), Operand::rows(dy_image, p_len));
            if g.col_is_image() {
                matmul(product, dx_image, lhs, rhs, false);
            } else {
                matmul(product, dcol, lhs, rhs, false);
                col2im_add(g, dcol, dx_image);
            }
        },
    );
    dx
}

/// Images per partial sum of the weight gradient.
const GRAD_WEIGHT_CHUNK: usize = 32;

/// `dw` (`c_out × K`) for contiguous `x` and `dy`, summed over the batch.
///
/// Computed as `dwᵀ[K × c_out] = Σₙ colₙ · dYₙᵀ` so that the product's right operand (the small
/// `dYₙᵀ`, transposed into a scratch buffer) has contiguous rows.
fn conv_grad_weight<T: WithDType>(g: &ConvGeometry, x: &[T], dy: &[T]) -> Vec<T> {
    if let (Some(implicit), Some(x32), Some(dy32)) = (Implicit::of(g), as_f32(x), as_f32(dy)) {
        return from_f32(implicit_grad_weight(g, &implicit, x32, dy32));
    }
    let (k_len, p_len, c_out) = (g.col_rows(), g.col_cols(), g.out_channels);
    let zero = T::from_f64(0.0);
    let col_len = if g.col_is_image() { 0 } else { k_len * p_len };
    let (in_len, out_len) = (g.input_image_len(), g.output_image_len());
    // Fixed chunks of images, each summed in order, then the chunks summed in order: the result
    // does not depend on how rayon schedules the work, so training runs repeat exactly.
    let partials: Vec<Vec<T>> = (0..g.batch)
        .collect::<Vec<_>>()
        .par_chunks(GRAD_WEIGHT_CHUNK)
        .map(|images| {
            let (mut dwt, mut col, mut dyt) = (vec![zero; k_len * c_out], vec![zero; col_len], vec![zero; out_len]);
            for &n in images {
                let x_image = &x[n * in_len..][..in_len];
                if !g.col_is_image() {
                    im2col(g, x_image, &mut col);
                }
                let patches: &[T] = if g.col_is_image() { x_image } else { &col };
                transpose_into(&dy[n * out_len..][..out_len], c_out, p_len, &mut dyt);
                // col is K × P, dYᵀ is P × c_out.
                matmul(
                    (k_len, c_out, p_len),
                    &mut dwt,
                    Operand::rows(patches, p_len),
                    Operand::rows(&dyt, c_out),
                    true,
                );
            }
            dwt
        })
        .collect();
    let mut dw_transposed = vec![zero; k_len * c_out];
    for part in &partials {
        dw_transposed.iter_mut().zip(part).for_each(|(t, p)| *t += *p);
    }
    let mut dw = vec![zero; c_out * k_len];
    transpose_into(&dw_transposed, k_len, c_out, &mut dw);
    dw
}

/// A stride-1 convolution without im2col ("implicit GEMM"). Each image is copied once into a
/// zero-padded buffer (`c_in × hp × wp`, `hp = h + 2p`, `wp = w + 2p`); row `(ci, kh, kw)` of
/// the column matrix is then that buffer read from offset `ci·hp·wp + kh·wp + kw`, so the
/// product reads the patches in place. It computes the output on a grid `wp` wide (its last
/// `k − 1` columns of each row are discarded), and the buffer ends with `k − 1` zeros that the
/// last rows read past the image. The input gradient of a stride-1 convolution is itself one
/// (with the kernel rotated by 180° and its channel axes swapped, padding `k − 1 − p`), so
/// col2im is gone too. f32 on CPUs with AVX-512; other cases take the im2col path.
struct Implicit {
    /// Padded height and width.
    hp: usize,
    wp: usize,
    /// Values of the padded buffer, guard included.
    buffer_len: usize,
    /// Output positions on the grid: `h_out · wp`.
    grid: usize,
    /// The start of each column-matrix row `(ci, kh, kw)` in the padded buffer.
    row_offsets: Vec<usize>,
}

impl Implicit {
    /// The layout for `g`, when the implicit path runs it.
    fn of(g: &ConvGeometry) -> Option<Self> {
        // A stem's few input channels make rows too short to pay for the padded copy.
        let worth_it = g.stride == 1 && !g.col_is_image() && g.in_channels >= 4;
        (worth_it && g.padding < g.kernel && matmul_avx512::available()).then(|| Self::layout(g))
    }

    /// The padded layout of any stride-1 geometry with `padding < kernel`.
    fn layout(g: &ConvGeometry) -> Self {
        let (hp, wp, k) = (g.in_height + 2 * g.padding, g.in_width + 2 * g.padding, g.kernel);
        let plane = hp * wp;
        let mut row_offsets = Vec::with_capacity(g.col_rows());
        for ci in 0..g.in_channels {
            for kh in 0..k {
                for kw in 0..k {
                    row_offsets.push(ci * plane + kh * wp + kw);
                }
            }
        }
        Self { hp, wp, buffer_len: g.in_channels * plane + k - 1, grid: g.out_height * wp, row_offsets }
    }

    /// Copies one image into the interior of `padded`; the border and the guard stay zero.
    fn pad(&self, g: &ConvGeometry, image: &[f32], padded: &mut [f32]) {
        let (p, w) = (g.padding, g.in_width);
        for ci in 0..g.in_channels {
            for ih in 0..g.in_height {
                let source = &image[(ci * g.in_height + ih) * w..][..w];
                padded[(ci * self.hp + ih + p) * self.wp + p..][..w].copy_from_slice(source);
            }
        }
    }
}

/// Reinterprets a `Vec<f32>` as `Vec<T>` when `T` is `f32` (the only type the implicit path
/// produces).
fn from_f32<T: WithDType>(values: Vec<f32>) -> Vec<T> {
    assert_eq!(TypeId::of::<T>(), TypeId::of::<f32>(), "the implicit convolution is f32 only");
    let mut values = std::mem::ManuallyDrop::new(values);
    // SAFETY: T is f32, so pointer, length and capacity describe a valid Vec<T>.
    unsafe { Vec::from_raw_parts(values.as_mut_ptr().cast(), values.len(), values.capacity()) }
}

fn implicit_forward(g: &ConvGeometry, implicit: &Implicit, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (k_len, c_out, w_out) = (g.col_rows(), g.out_channels, g.out_width);
    let weight_rows: Vec<usize> = (0..c_out).map(|co| co * k_len).collect();
    let mut y = vec![0f32; g.batch * g.output_image_len()];
    y.par_chunks_mut(g.output_image_len().max(1)).zip(x.par_chunks(g.input_image_len().max(1))).for_each_init(
        || (vec![0f32; implicit.buffer_len], vec![0f32; c_out * implicit.grid]),
        |(padded, grid), (y_image, x_image)| {
            implicit.pad(g, x_image, padded);
            let weights = Rows { data: w, offsets: &weight_rows, step: 1 };
            let patches = Rows { data: padded, offsets: &implicit.row_offsets, step: 1 };
            assert!(matmul_rows_f32(implicit.grid, weights, patches, grid, implicit.grid, false));
            for (co, channel) in y_image.chunks_mut(g.col_cols()).enumerate() {
                for (oh, row) in channel.chunks_mut(w_out).enumerate() {
                    row.copy_from_slice(&grid[co * implicit.grid + oh * implicit.wp..][..w_out]);
                }
            }
        },
    );
    y
}

/// `dx` of a stride-1 convolution: the convolution of `dy` with the kernel rotated by 180° and
/// its channel axes swapped, `w'[ci, co, kh, kw] = w[co, ci, k−1−kh, k−1−kw]`, padding `k−1−p`.
fn implicit_grad_input(g: &ConvGeometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let k = g.kernel;
    let mut rotated = vec![0f32; w.len()];
    for co in 0..g.out_channels {
        for ci in 0..g.in_channels {
            for kh in 0..k {
                for kw in 0..k {
                    rotated[((ci * g.out_channels + co) * k + kh) * k + kw] =
                        w[((co * g.in_channels + ci) * k + (k - 1 - kh)) * k + (k - 1 - kw)];
                }
            }
        }
    }
    let transposed = ConvGeometry::new(
        &[g.batch, g.out_channels, g.out_height, g.out_width],
        &[g.in_channels, g.out_channels, k, k],
        1,
        k - 1 - g.padding,
    )
    .expect("the transposed geometry of a valid stride-1 convolution is valid");
    implicit_forward(&transposed, &Implicit::layout(&transposed), dy, &rotated)
}

/// `dw` of a stride-1 convolution, summed over the batch in fixed chunks (as
/// [`conv_grad_weight`]): `dwᵀ[K × c_out] = Σₙ patchesₙ · dYₙᵀ`, with the patches read in place
/// from the padded image and `dYₙᵀ` laid out on the output grid (its discarded columns zero).
fn implicit_grad_weight(g: &ConvGeometry, implicit: &Implicit, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k_len, c_out, h_out, w_out) = (g.col_rows(), g.out_channels, g.out_height, g.out_width);
    let (in_len, out_len) = (g.input_image_len(), g.output_image_len());
    let grid_rows: Vec<usize> = (0..implicit.grid).map(|q| q * c_out).collect();
    let partials: Vec<Vec<f32>> = (0..g.batch)
        .collect::<Vec<_>>()
        .par_chunks(GRAD_WEIGHT_CHUNK)
        .map(|images| {
            let mut dwt = vec![0f32; k_len * c_out];
            let mut padded = vec![0f32; implicit.buffer_len];
            let mut dy_grid = vec![0f32; implicit.grid * c_out];
            for &n in images {
                implicit.pad(g, &x[n * in_len..][..in_len], &mut padded);
                let dy_image = &dy[n * out_len..][..out_len];
                for co in 0..c_out {
                    for oh in 0..h_out {
                        let row = &dy_image[(co * h_out + oh) * w_out..][..w_out];
                        for (ow, &value) in row.iter().enumerate() {
                            dy_grid[(oh * implicit.wp + ow) * c_out + co] = value;
                        }
                    }
                }
                let patches = Rows { data: &padded, offsets: &implicit.row_offsets, step: 1 };
                let gradients = Rows { data: &dy_grid, offsets: &grid_rows, step: 1 };
                assert!(matmul_rows_f32(c_out, patches, gradients, &mut dwt, c_out, true));
            }
            dwt
        })
        .collect();
    let mut dw_transposed = vec![0f32; k_len * c_out];
    for part in &partials {
        dw_transposed.iter_mut().zip(part).for_each(|(t, p)| *t += *p);
    }
    let mut dw = vec![0f32; c_out * k_len];
    transpose_into(&dw_transposed, k_len, c_out, &mut dw);
    dw
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
        Ok((conv_forward_storage(&g, (s1, l1), (s2, l2))?, g.output_shape()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        conv_backward(x, w, dy, ConvGeometry::new(x.dims(), w.dims(), self.stride, self.padding)?)
    }
}

/// The convolution of contiguous CPU storages `x` and `w` (f32 or f64).
pub(crate) fn conv_forward_storage(
    g: &ConvGeometry,
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    dispatch_float("im2col-conv2d", x, w, |x, w| conv_forward(g, x, w), |x, w| conv_forward(g, x, w))
}

/// A storage a kernel produced (f32 or f64), as a CPU tensor of `shape` (no copy): how the fused
/// ops keep the intermediate outputs their backward needs.
pub(crate) fn storage_into_tensor(storage: CpuStorage, shape: Shape) -> Result<Tensor> {
    match storage {
        CpuStorage::F32(values) => Tensor::from_vec(values, shape, &candle_core::Device::Cpu),
        CpuStorage::F64(values) => Tensor::from_vec(values, shape, &candle_core::Device::Cpu),
        other => bail!("a kernel returned {:?}, neither f32 nor f64", other.dtype()),
    }
}

/// `(dx, dw)` from the output gradient `dy`, each only where its operand tracks gradients
/// (the stem's input is data).
pub(crate) fn conv_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    geometry: ConvGeometry,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    conv_backward_where(x, w, dy, geometry, (x.track_op(), w.track_op()))
}

/// `(dx, dw)` from the output gradient `dy`, each where its flag asks for it (inside a fused
/// op, where an intermediate tensor needs its gradient but tracks none).
pub(crate) fn conv_backward_where(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    geometry: ConvGeometry,
    (want_dx, want_dw): (bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dy = dy.contiguous()?;
    let dx = match want_dx {
        true => Some(dy.apply_op2_no_bwd(w, &Im2colConvGradInput { geometry })?),
        false => None,
    };
    let dw = match want_dw {
        true => Some(x.apply_op2_no_bwd(&dy, &Im2colConvGradWeight { geometry })?),
        false => None,
    };
    Ok((dx, dw))
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
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
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
    fn compare_with_candle(
        dims: (usize, usize, usize, usize),
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        dtype: DType,
        tolerance: f64,
    ) {
        let device = Device::Cpu;
        let (n, c, h, w) = dims;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (n, c, h, w), &device).unwrap().to_dtype(dtype).unwrap())
            .unwrap();
        let weight = Var::from_tensor(
            &Tensor::randn(0f64, 1.0, (out_channels, c, kernel, kernel), &device).unwrap().to_dtype(dtype).unwrap(),
        )
        .unwrap();
        let expected = x.conv2d(&weight, padding, stride, 1, 1).unwrap();
        let actual = conv2d(&x, &weight, stride, padding).unwrap();
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

    /// Input dims, output channels, kernel, stride, padding.
    type Case = ((usize, usize, usize, usize), usize, usize, usize, usize);

    /// Shapes where candle's own conv2d backward is right: it sizes the input gradient from the
    /// height alone, so with stride 2 the height and width must give the same output padding.
    const CASES: [Case; 14] = [
        ((2, 3, 6, 7), 4, 5, 1, 2),
        ((2, 2, 5, 5), 3, 5, 1, 1),
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

    /// Stride-1 shapes with enough input channels for the implicit-GEMM path (f32 on AVX-512):
    /// padding 0 to k − 1, square and odd sizes, a batch that does not divide into the chunks.
    #[test]
    fn implicit_path_matches_candle_conv2d() {
        const IMPLICIT: [Case; 6] = [
            ((2, 5, 7, 6), 4, 3, 1, 1),
            ((3, 8, 5, 9), 3, 3, 1, 0),
            ((1, 6, 6, 6), 5, 5, 1, 2),
            ((2, 4, 9, 8), 13, 3, 1, 2),
            ((33, 4, 5, 5), 2, 3, 1, 1),
            ((2, 16, 7, 7), 33, 3, 1, 1),
        ];
        for (dims, out, kernel, stride, padding) in IMPLICIT {
            let geometry =
                ConvGeometry::new(&[dims.0, dims.1, dims.2, dims.3], &[out, dims.1, kernel, kernel], 1, padding)
                    .unwrap();
            assert_eq!(
                Implicit::of(&geometry).is_some(),
                matmul_avx512::available(),
                "{dims:?} takes the implicit path"
            );
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
            (conv2d(x, w, stride, padding).unwrap() * &probe).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let grads = (conv2d(&x, &w, stride, padding).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let h = 1e-4;
        for (var, is_input) in [(&x, true), (&w, false)] {
            let analytic = grads.get(var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let values = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in 0..values.len() {
                let shifted = |delta: f64| {
                    let mut v = values.clone();
                    v[i] += delta;
                    let t = Tensor::from_vec(v, var.shape(), &device).unwrap();
                    if is_input {
                        loss(&t, &w)
                    } else {
                        loss(&x, &t)
                    }
                };
                let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
                assert!(
                    (numeric - analytic[i]).abs() < 1e-7,
                    "entry {i} (input: {is_input}): {numeric} vs {}",
                    analytic[i]
                );
            }
        }
    }

    #[test]
    fn hand_computed_3x3_sum_kernel() {
        // An all-ones 3x3 kernel with padding 1 sums each pixel's neighbourhood.
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let w = Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let y = conv2d(&x, &w, 1, 1).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![10., 10., 10., 10.]);
        let y = conv2d(&x, &w, 2, 1).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![10.]);
    }

    #[test]
    fn reads_non_contiguous_input() {
        let x = Tensor::randn(0f32, 1.0, (4, 2, 6, 6), &Device::Cpu).unwrap().transpose(0, 1).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 4, 3, 3), &Device::Cpu).unwrap();
        let expected = x.contiguous().unwrap().conv2d(&w, 1, 1, 1, 1).unwrap();
        let actual = conv2d(&x, &w, 1, 1).unwrap();
        assert!(relative_error(&actual, &expected) < 1e-5);
    }

    #[test]
    fn rejects_mismatched_channels_and_integer_dtypes() {
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((1, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let message = conv2d(&x, &w, 1, 1).unwrap_err().to_string();
        assert!(message.contains("2 channels"), "{message}");
        let x = Tensor::zeros((1, 2, 4, 4), DType::U32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((1, 2, 3, 3), DType::U32, &Device::Cpu).unwrap();
        let message = conv2d(&x, &w, 1, 1).unwrap_err().to_string();
        assert!(message.contains("f32 or f64"), "{message}");
    }
}
