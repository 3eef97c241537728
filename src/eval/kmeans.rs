//! k-means (Lloyd 1982) with k-means++ seeding (Arthur & Vassilvitskii 2007), the clustering
//! that the evaluation's clustering figures and the clustering methods (DeepCluster, PCL, HCSC)
//! build on.
//!
//! ```text
//! seeding:    c₁ ~ uniform(X);  cⱼ ~ P(x) ∝ min_{i<j} ‖x − cᵢ‖²          (k-means++)
//! assignment: a(x) = argmin_j ‖x − cⱼ‖² = argmin_j (‖cⱼ‖² − 2 x·cⱼ)
//! update:     cⱼ = mean of {x : a(x) = j}; an empty cluster takes the point farthest
//!             from its centroid (so k clusters always come back)
//! inertia:    Σₓ ‖x − c_{a(x)}‖²
//! ```
//!
//! Lloyd's iterations stop when no assignment changes or after `max_iterations`; of `restarts`
//! runs from different seedings the one with the lowest inertia is kept. Everything is drawn
//! from `seed`, so the result is deterministic.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KMeansConfig {
    pub clusters: usize,
    /// Independent seedings; the run with the lowest inertia wins.
    pub restarts: usize,
    pub max_iterations: usize,
    pub seed: u64,
}

impl KMeansConfig {
    /// `clusters` clusters, 3 restarts of at most 100 iterations.
    pub fn new(clusters: usize, seed: u64) -> Self {
        Self { clusters, restarts: 3, max_iterations: 100, seed }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// `clusters × D`, row-major.
    pub centroids: Vec<f32>,
    /// The cluster of each point.
    pub assignments: Vec<u32>,
    /// Sum of squared distances of the points to their centroids.
    pub inertia: f64,
    /// Lloyd iterations of the kept run.
    pub iterations: usize,
}

/// k-means of the rows of `points` (`[N, D]`, any float type and device).
pub fn kmeans(points: &Tensor, config: &KMeansConfig) -> Result<KMeans> {
    ensure!(points.rank() == 2, "k-means needs a [N, D] matrix, got shape {:?}", points.shape());
    let (n, dim) = points.dims2()?;
    ensure!(config.clusters >= 1, "k-means needs at least one cluster");
    ensure!(n >= config.clusters, "k-means of {n} points into {} clusters", config.clusters);
    ensure!(config.restarts >= 1 && config.max_iterations >= 1, "k-means needs a restart and an iteration");
    let points = points.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?;
    let data = points.flatten_all()?.to_vec1::<f32>()?;
    ensure!(data.iter().all(|v| v.is_finite()), "k-means of non-finite values");
    let squared_norms: Vec<f32> = data.chunks_exact(dim).map(|x| x.iter().map(|v| v * v).sum()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut best: Option<KMeans> = None;
    for _ in 0..config.restarts {
        let run = lloyd(&points, &data, &squared_norms, dim, config, &mut rng)?;
        if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
            best = Some(run);
        }
    }
    Ok(best.expect("at least one restart"))
}

fn lloyd(
    points: &Tensor,
    data: &[f32],
    squared_norms: &[f32],
    dim: usize,
    config: &KMeansConfig,
    rng: &mut impl Rng,
) -> Result<KMeans> {
    let k = config.clusters;
    let mut centroids = seed_plus_plus(data, dim, k, rng);
    let mut assignments = vec![u32::MAX; squared_norms.len()];
    let mut iterations = 0;
    loop {
        let distances = squared_distances(points, squared_norms, &centroids, dim)?;
        let mut changed = false;
        for (i, row) in distances.chunks_exact(k).enumerate() {
            let nearest = argmin(row) as u32;
            changed |= assignments[i] != nearest;
            assignments[i] = nearest;
        }
        iterations += 1;
        if !changed || iterations == config.max_iterations {
            let inertia = distances.chunks_exact(k).zip(&assignments).map(|(row, &a)| row[a as usize] as f64).sum();
            return Ok(KMeans { centroids, assignments, inertia, iterations });
        }
        centroids = update(data, dim, k, &assignments, &distances);
    }
}

/// k-means++: each next centroid is a point drawn with probability proportional to its squared
/// distance to the nearest centroid so far.
fn seed_plus_plus(data: &[f32], dim: usize, k: usize, rng: &mut impl Rng) -> Vec<f32> {
    let n = data.len() / dim;
    let mut centroids = Vec::with_capacity(k * dim);
    let first = rng.random_range(0..n);
    centroids.extend_from_slice(&data[first * dim..(first + 1) * dim]);
    let mut nearest: Vec<f64> = data.chunks_exact(dim).map(|x| squared_distance(x, &centroids[..dim])).collect();
    for _ in 1..k {
        let total: f64 = nearest.iter().sum();
        let chosen = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            nearest
                .iter()
                .position(|&d| {
                    target -= d;
                    target < 0.0
                })
                .unwrap_or(n - 1)
        } else {
            rng.random_range(0..n) // every point sits on a centroid already
        };
        let centroid = &data[chosen * dim..(chosen + 1) * dim];
        for (x, d) in data.chunks_exact(dim).zip(nearest.iter_mut()) {
            *d = d.min(squared_distance(x, centroid));
        }
        centroids.extend_from_slice(centroid);
    }
    centroids
}

/// `[N, k]` squared distances, row-major: `‖x‖² − 2 x·c + ‖c‖²` with the product as one matmul.
fn squared_distances(points: &Tensor, squared_norms: &[f32], centroids: &[f32], dim: usize) -> Result<Vec<f32>> {
    let k = centroids.len() / dim;
    let c = Tensor::from_slice(centroids, (k, dim), &Device::Cpu)?;
    let products = points.matmul(&c.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let centroid_norms: Vec<f32> = centroids.chunks_exact(dim).map(|c| c.iter().map(|v| v * v).sum()).collect();
    Ok(products
        .chunks_exact(k)
        .zip(squared_norms)
        .flat_map(|(row, &x)| row.iter().zip(&centroid_norms).map(move |(&p, &c)| (x - 2.0 * p + c).max(0.0)))
        .collect())
}

/// New centroids: the mean of each cluster's points; an empty cluster takes the point that is
/// farthest from its own centroid, which leaves the cluster it was in.
fn update(data: &[f32], dim: usize, k: usize, assignments: &[u32], distances: &[f32]) -> Vec<f32> {
    let mut sums = vec![0f64; k * dim];
    let mut counts = vec![0usize; k];
    for (x, &a) in data.chunks_exact(dim).zip(assignments) {
        counts[a as usize] += 1;
        for (s, &v) in sums[a as usize * dim..][..dim].iter_mut().zip(x) {
            *s += v as f64;
        }
    }
    let mut taken = Vec::new();
    let empty: Vec<usize> = (0..k).filter(|&j| counts[j] == 0).collect();
    for j in empty {
        let farthest = (0..assignments.len())
            .filter(|i| !taken.contains(i) && counts[assignments[*i] as usize] > 1)
            .max_by(|&a, &b| {
                let d = |i: usize| distances[i * k + assignments[i] as usize];
                d(a).total_cmp(&d(b)).then(b.cmp(&a))
            });
        if let Some(i) = farthest {
            let (from, x) = (assignments[i] as usize, &data[i * dim..(i + 1) * dim]);
            taken.push(i);
            counts[from] -= 1;
            counts[j] = 1;
            for (d, &v) in x.iter().enumerate() {
                sums[from * dim + d] -= v as f64;
                sums[j * dim + d] = v as f64;
            }
        }
    }
    sums.chunks_exact(dim)
        .zip(&counts)
        .flat_map(|(s, &count)| s.iter().map(move |&v| (v / count.max(1) as f64) as f32))
        .collect()
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
}

fn argmin(row: &[f32]) -> usize {
    row.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(&b.0))).map(|(i, _)| i).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(rows: &[[f32; 2]]) -> Tensor {
        Tensor::from_vec(rows.iter().flatten().copied().collect::<Vec<_>>(), (rows.len(), 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn finds_separated_clusters_with_their_means_and_inertia() {
        // Three pairs of points; each pair's mean is its centroid, and each point lies 1 away
        // from it: inertia 6 × 1² = 6.
        let points = tensor(&[[0., 0.], [0., 2.], [10., 0.], [10., 2.], [0., 20.], [2., 20.]]);
        let result = kmeans(&points, &KMeansConfig::new(3, 0)).unwrap();
        let a = &result.assignments;
        assert!(a[0] == a[1] && a[2] == a[3] && a[4] == a[5], "{a:?}");
        assert!(a[0] != a[2] && a[2] != a[4] && a[0] != a[4], "{a:?}");
        assert!((result.inertia - 6.0).abs() < 1e-4, "{}", result.inertia);
        let centroid = |i: usize| &result.centroids[a[i] as usize * 2..][..2];
        assert_eq!(centroid(0), [0.0, 1.0]);
        assert_eq!(centroid(2), [10.0, 1.0]);
        assert_eq!(centroid(4), [1.0, 20.0]);
    }

    #[test]
    fn one_cluster_is_the_mean_and_the_result_is_deterministic() {
        let points = Tensor::randn(0f32, 1f32, (200, 5), &Device::Cpu).unwrap();
        let one = kmeans(&points, &KMeansConfig::new(1, 3)).unwrap();
        let mean = points.mean(0).unwrap().to_vec1::<f32>().unwrap();
        for (c, m) in one.centroids.iter().zip(&mean) {
            assert!((c - m).abs() < 1e-5);
        }
        let total: f64 = points.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
            - 200.0 * mean.iter().map(|m| (m * m) as f64).sum::<f64>();
        assert!((one.inertia - total).abs() < 1e-2 * total, "inertia {} against {total}", one.inertia);
        let config = KMeansConfig::new(4, 9);
        assert_eq!(kmeans(&points, &config).unwrap(), kmeans(&points, &config).unwrap());
    }

    #[test]
    fn an_empty_cluster_takes_the_point_farthest_from_its_centroid() {
        // 1-D points 0, 1, 4 and 10 in clusters [0, 0, 0, 1] with centroids 5/3 and 10; cluster 2
        // is empty. The point farthest from its centroid is 4 (distance² 49/9): it becomes
        // cluster 2's centroid, and cluster 0 the mean of 0 and 1.
        let data = [0.0, 1.0, 4.0, 10.0];
        let assignments = [0u32, 0, 0, 1];
        let c0 = 5.0f32 / 3.0;
        // Only each point's distance to its own centroid is read.
        let mut distances = vec![0.0f32; 4 * 3];
        for (i, x) in data[..3].iter().enumerate() {
            distances[i * 3] = (x - c0).powi(2);
        }
        let centroids = update(&data, 1, 3, &assignments, &distances);
        assert_eq!(centroids, [0.5, 10.0, 4.0]);
    }

    #[test]
    fn duplicate_points_end_with_zero_inertia() {
        // Four distinct values, eight clusters asked: centroids land on duplicates.
        let points = tensor(&[[0., 0.], [0., 0.], [1., 0.], [1., 0.], [0., 1.], [0., 1.], [5., 5.], [5., 5.]]);
        let result = kmeans(&points, &KMeansConfig::new(8, 1)).unwrap();
        assert!(result.inertia.abs() < 1e-6);
        let a = &result.assignments;
        assert!(a[0] == a[1] && a[2] == a[3] && a[4] == a[5] && a[6] == a[7], "{a:?}");
    }

    #[test]
    fn bad_inputs_are_refused() {
        let points = tensor(&[[0., 0.], [1., 1.]]);
        assert!(kmeans(&points, &KMeansConfig::new(3, 0)).unwrap_err().to_string().contains("2 points into 3"));
        let nan = tensor(&[[0., f32::NAN], [1., 1.]]);
        assert!(kmeans(&nan, &KMeansConfig::new(1, 0)).unwrap_err().to_string().contains("non-finite"));
    }
}
