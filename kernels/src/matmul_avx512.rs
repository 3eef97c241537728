//! f32 matrix product `C (+)= A·B` with AVX-512 FMA, for the convolutions' per-image products.
//!
//! The `gemm` crate only has AVX2 kernels on stable Rust; on CPUs with AVX-512 this simple
//! kernel runs the convolution's products (a few hundred rows and columns, in cache) faster.
//! Each 12x32 tile of `C` is held in 24 zmm registers while the whole reduction runs: per step,
//! two vector loads of a row of `B` and twelve broadcasts of a column of `A`.
//!
//! Both operands are given by rows: row `r` of a [`Rows`] operand starts at `data[offsets[r]]`
//! and steps by `step`. Rows of a strided matrix are evenly spaced; rows of a convolution's
//! implicit column matrix are the input image shifted by each kernel offset, so the convolution
//! runs without copying its patches out. `B`'s rows must be contiguous; the last columns are
//! handled with masked loads and stores.

use std::sync::OnceLock;

/// Whether this CPU runs the AVX-512 kernel (checked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// A strided `rows × cols` view: element `(i, j)` is `data[i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// A matrix given by its rows: element `(i, j)` is `data[offsets[i] + j·step]`.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub offsets: &'a [usize],
    pub step: usize,
}

impl Rows<'_> {
    /// Whether every element of `cols` columns of every row lies inside `data`.
    fn covers(&self, cols: usize) -> bool {
        cols == 0 || self.offsets.iter().all(|&o| o + (cols - 1) * self.step < self.data.len())
    }
}

/// `c[m × n] (row stride ldc) = [c +] a[m × k] · b[k × n]`, where `b` has unit column stride.
/// Returns `false` (and does nothing) when the CPU lacks AVX-512 or `b` is not row-contiguous.
///
/// # Panics
/// If an operand's slice is too short for the sizes and strides.
pub fn matmul_f32(
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> bool {
    if !available() || b.col_stride != 1 {
        return false;
    }
    let a_offsets: Vec<usize> = (0..m).map(|i| i * a.row_stride).collect();
    let b_offsets: Vec<usize> = (0..k).map(|p| p * b.row_stride).collect();
    let a = Rows { data: a.data, offsets: &a_offsets, step: a.col_stride };
    let b = Rows { data: b.data, offsets: &b_offsets, step: 1 };
    matmul_rows_f32(n, a, b, c, ldc, accumulate)
}

/// `c[m × n] (row stride ldc) = [c +] a · b` for `a` of `m = a.offsets.len()` rows and `k =
/// b.offsets.len()` columns, and `b` of `k` rows of `n` contiguous columns (`b.step` must be
/// 1). Returns `false` (and does nothing) when the CPU lacks AVX-512 or `b` has another step.
///
/// # Panics
/// If a row of an operand, or the destination, runs past the end of its slice.
pub fn matmul_rows_f32(n: usize, a: Rows, b: Rows, c: &mut [f32], ldc: usize, accumulate: bool) -> bool {
    if !available() || b.step != 1 {
        return false;
    }
    let (m, k) = (a.offsets.len(), b.offsets.len());
    if m == 0 || n == 0 {
        return true;
    }
    assert!(a.covers(k), "matmul_rows_f32: a row of the lhs runs past its slice");
    assert!(k == 0 || b.covers(n), "matmul_rows_f32: a row of the rhs runs past its slice");
    assert!((m - 1) * ldc + n <= c.len(), "matmul_rows_f32: destination too short");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (checked above) and every address the kernel touches lies
    // inside the slices (checked above; masked lanes are not accessed).
    unsafe {
        kernel::matmul(n, k, a, b.data.as_ptr(), b.offsets, c.as_mut_ptr(), ldc, accumulate);
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::Rows;

    /// Columns per tile: two zmm registers of 16 f32.
    const TILE_COLS: usize = 32;
    /// Rows per tile: 24 accumulators, leaving registers for `B` and the broadcast.
    const TILE_ROWS: usize = 12;

    /// One `R × 32` tile over the whole reduction; `mask_lo`/`mask_hi` select its valid columns.
    /// `a_rows[r]` points at element `(r, 0)` of the tile's rows of `A`; `b_rows[p] + j` is
    /// element `(p, j)` of `B`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize>(
        k: usize,
        a_rows: &[*const f32],
        a_step: usize,
        b: *const f32,
        b_rows: &[usize],
        c: *mut f32,
        ldc: usize,
        (mask_lo, mask_hi): (__mmask16, __mmask16),
        accumulate: bool,
    ) {
        let a_rows: [*const f32; R] = std::array::from_fn(|r| a_rows[r]);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (p, &b_offset) in b_rows.iter().enumerate().take(k) {
            let b_row = b.add(b_offset);
            let b_lo = _mm512_maskz_loadu_ps(mask_lo, b_row);
            let b_hi = _mm512_maskz_loadu_ps(mask_hi, b_row.add(16));
            let a_at = p * a_step;
            for (acc, a_row) in acc.iter_mut().zip(&a_rows) {
                let a_value = _mm512_set1_ps(*a_row.add(a_at));
                acc[0] = _mm512_fmadd_ps(a_value, b_lo, acc[0]);
                acc[1] = _mm512_fmadd_ps(a_value, b_hi, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let c_row = c.add(r * ldc);
            let (mut lo, mut hi) = (acc[0], acc[1]);
            if accumulate {
                lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(mask_lo, c_row));
                hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(mask_hi, c_row.add(16)));
            }
            _mm512_mask_storeu_ps(c_row, mask_lo, lo);
            _mm512_mask_storeu_ps(c_row.add(16), mask_hi, hi);
        }
    }

    /// # Safety
    /// AVX-512F must be available and the operands must cover the addressed elements.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        n: usize,
        k: usize,
        a: Rows,
        b: *const f32,
        b_rows: &[usize],
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mask = |cols: usize| -> __mmask16 {
            if cols >= 16 {
                0xffff
            } else {
                ((1u32 << cols) - 1) as __mmask16
            }
        };
        let m = a.offsets.len();
        let a_rows: Vec<*const f32> = a.offsets.iter().map(|&o| a.data.as_ptr().add(o)).collect();
        let s = a.step;
        for j in (0..n).step_by(TILE_COLS) {
            let cols = (n - j).min(TILE_COLS);
            let masks = (mask(cols), mask(cols.saturating_sub(16)));
            let b = b.add(j);
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(TILE_ROWS);
                let (a, c) = (&a_rows[i..i + rows], c.add(i * ldc + j));
                match rows {
                    12 => tile::<12>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    11 => tile::<11>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    10 => tile::<10>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    9 => tile::<9>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    8 => tile::<8>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    7 => tile::<7>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    6 => tile::<6>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    5 => tile::<5>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    4 => tile::<4>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    3 => tile::<3>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    2 => tile::<2>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                    _ => tile::<1>(k, a, s, b, b_rows, c, ldc, masks, accumulate),
                }
                i += rows;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook triple loop in f64.
    fn naive(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| a.data[i * a.row_stride + p * a.col_stride] as f64 * b.data[p * b.row_stride + j] as f64)
                    .sum();
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matches_triple_loop_on_odd_sizes_and_strides() {
        if !available() {
            eprintln!("no AVX-512 on this CPU: kernel not tested");
            return;
        }
        for (m, n, k) in [(1, 1, 1), (13, 33, 7), (12, 32, 5), (25, 17, 40), (3, 49, 100), (30, 64, 2), (7, 100, 0)] {
            // Small integers keep every product and sum exact in f32.
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) - 5.0).collect();
            let b = Strided { data: &b, row_stride: n, col_stride: 1 };
            for (row_stride, col_stride) in [(k, 1), (1, m)] {
                let a = Strided { data: &a, row_stride, col_stride };
                let expected = naive(m, n, k, a, b);
                let mut c = vec![0f32; m * n];
                assert!(matmul_f32((m, n, k), a, b, &mut c, n, false));
                assert_eq!(c, expected, "{m}x{n}x{k} strides ({row_stride}, {col_stride})");
                // Accumulating adds the product again.
                assert!(matmul_f32((m, n, k), a, b, &mut c, n, true));
                let doubled: Vec<f32> = expected.iter().map(|v| 2.0 * v).collect();
                assert_eq!(c, doubled, "{m}x{n}x{k} accumulated");
            }
        }
    }

    #[test]
    fn writes_only_inside_the_destination_rows() {
        if !available() {
            return;
        }
        // A 3x5 product into a destination with row stride 8: the padding columns stay put.
        let a = vec![1f32; 3 * 4];
        let b = vec![1f32; 4 * 5];
        let mut c = [-1f32; 3 * 8];
        let a = Strided { data: &a, row_stride: 4, col_stride: 1 };
        let b = Strided { data: &b, row_stride: 5, col_stride: 1 };
        assert!(matmul_f32((3, 5, 4), a, b, &mut c[..2 * 8 + 5], 8, false));
        for (i, row) in c.chunks(8).enumerate() {
            assert_eq!(&row[..5], &[4.0; 5], "row {i}");
            assert_eq!(&row[5..], &[-1.0; 3], "row {i}");
        }
    }

    #[test]
    fn declines_non_contiguous_rhs() {
        let data = vec![0f32; 16];
        let view = Strided { data: &data, row_stride: 1, col_stride: 4 };
        assert!(!matmul_f32((4, 4, 4), view, view, &mut [0f32; 16], 4, false));
    }
}
