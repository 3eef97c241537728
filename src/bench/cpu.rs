//! What the machine running a benchmark can do: its CPU model, cores and vector width, and its
//! fp32 peak measured in the same run, so a benchmark can say what fraction of it a step reaches.
//!
//! The peak is measured, not computed from a nominal clock: every thread runs a loop of fused
//! multiply-adds on [`ACCUMULATORS`] independent vector registers (enough to cover the FMA
//! latency on both FMA ports of current x86 cores) at the widest vector width the CPU has, all
//! threads at once, for a fixed time. What that loop reaches is the ceiling any kernel on this
//! machine can approach, at the clock the machine actually runs now.

use std::time::{Duration, Instant};

/// Independent FMA chains per thread: latency 4 × 2 ports, plus margin.
pub const ACCUMULATORS: usize = 12;

/// The machine as a benchmark reports it.
#[derive(Debug, Clone)]
pub struct CpuInfo {
    /// `model name` from /proc/cpuinfo.
    pub model: String,
    /// Threads the benchmark runs (rayon's pool).
    pub threads: usize,
    /// CPUs the operating system offers.
    pub logical_cpus: usize,
    /// f32 lanes of the widest vector unit used: 16 (AVX-512), 8 (AVX2 + FMA) or 1.
    pub f32_lanes: usize,
    pub vector_unit: &'static str,
}

impl CpuInfo {
    pub fn detect() -> Self {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':'])))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let (f32_lanes, vector_unit) = vector_unit();
        Self {
            model,
            threads: rayon::current_num_threads(),
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            f32_lanes,
            vector_unit,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn vector_unit() -> (usize, &'static str) {
    if is_x86_feature_detected!("avx512f") {
        (16, "AVX-512")
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        (8, "AVX2 + FMA")
    } else {
        (1, "scalar")
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn vector_unit() -> (usize, &'static str) {
    (1, "scalar")
}

/// fp32 GFLOP/s of the FMA loop on `threads` threads at once, over `duration`.
pub fn measure_fp32_peak(threads: usize, duration: Duration) -> f64 {
    let flops: f64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1)).map(|_| scope.spawn(|| fma_loop(duration))).collect();
        workers.into_iter().map(|w| w.join().expect("the FMA loop does not panic")).sum()
    });
    flops / duration.as_secs_f64() / 1e9
}

/// Floating-point operations done in about `duration` by one thread.
fn fma_loop(duration: Duration) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { fma_loop_avx512(duration) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { fma_loop_avx2(duration) };
        }
    }
    fma_loop_scalar(duration)
}

/// FMAs per timed batch: long enough that reading the clock costs nothing.
const ROUNDS: usize = 1 << 16;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(duration: Duration) -> f64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); ACCUMULATORS];
    let started = Instant::now();
    let mut batches = 0usize;
    while started.elapsed() < duration {
        for _ in 0..ROUNDS {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        batches += 1;
    }
    let mut sum = [0f32; 16];
    let total = acc.iter().fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
    _mm512_storeu_ps(sum.as_mut_ptr(), total);
    std::hint::black_box(sum);
    (batches * ROUNDS * ACCUMULATORS * 16 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(duration: Duration) -> f64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); ACCUMULATORS];
    let started = Instant::now();
    let mut batches = 0usize;
    while started.elapsed() < duration {
        for _ in 0..ROUNDS {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        batches += 1;
    }
    let mut sum = [0f32; 8];
    let total = acc.iter().fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v));
    _mm256_storeu_ps(sum.as_mut_ptr(), total);
    std::hint::black_box(sum);
    (batches * ROUNDS * ACCUMULATORS * 8 * 2) as f64
}

fn fma_loop_scalar(duration: Duration) -> f64 {
    let mut acc = [1f32; ACCUMULATORS];
    let started = Instant::now();
    let mut batches = 0usize;
    while started.elapsed() < duration {
        for _ in 0..ROUNDS {
            for v in acc.iter_mut() {
                *v = v.mul_add(0.999_999, 1e-7);
            }
        }
        batches += 1;
    }
    std::hint::black_box(acc);
    (batches * ROUNDS * ACCUMULATORS * 2) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_cpu_and_measures_a_positive_peak() {
        let cpu = CpuInfo::detect();
        assert!(cpu.threads >= 1 && cpu.logical_cpus >= 1);
        assert!([1, 8, 16].contains(&cpu.f32_lanes));
        // One FMA per cycle on one lane at 100 MHz is far below any real CPU.
        assert!(measure_fp32_peak(1, Duration::from_millis(20)) > 0.2);
    }
}
