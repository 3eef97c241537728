//! Retrieval, the use the served embeddings are for: each query (a test image) ranks the database
//! (the training images) by cosine similarity of their features, and a database image is relevant
//! when it has the query's class.
//!
//! ```text
//! precision@1 = mean over queries of rel(1)
//! recall@k    = mean over queries of [any of the top k is relevant]
//! AP@k        = (1 / min(k, R)) Σ_{i ≤ k} precision@i · rel(i)      (R: relevant images in the database)
//! mAP@k       = mean over queries of AP@k
//! mAP@R       = mean over queries of AP@R, each query ranked to its own R (Musgrave et al. 2020)
//! ```
//!
//! precision@1 is also recall@1 (whether the top image is relevant). mAP@R rewards ranking the
//! whole class first, not just a few neighbours.
//!
//! Ties in similarity rank the lower database index first, so the figures are deterministic.

use anyhow::{ensure, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{check_labels, l2_normalize_rows};

/// Queries whose similarities are computed at once.
const QUERY_CHUNK: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalReport {
    pub queries: usize,
    pub precision_at_1: f64,
    pub recall_at_5: f64,
    pub recall_at_10: f64,
    pub map_at_100: f64,
    /// Absent from manifests written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_at_r: Option<f64>,
}

/// Retrieval of `queries` (`[M, D]`, labels `query_labels`) against `database` (`[N, D]`).
pub fn retrieval(
    database: &Tensor,
    database_labels: &[u32],
    queries: &Tensor,
    query_labels: &[u32],
    num_classes: usize,
) -> Result<RetrievalReport> {
    check_labels("database", database, database_labels, num_classes)?;
    check_labels("query", queries, query_labels, num_classes)?;
    ensure!(
        database_labels.len() >= 100,
        "retrieval needs at least 100 database images, got {}",
        database_labels.len()
    );
    ensure!(!query_labels.is_empty(), "retrieval needs at least one query");
    let mut relevant_in_database = vec![0usize; num_classes];
    for &label in database_labels {
        relevant_in_database[label as usize] += 1;
    }
    let database_t = l2_normalize_rows(database)?.t()?.contiguous()?;
    let queries = l2_normalize_rows(queries)?;
    let (mut precision_at_1, mut recall_at_5, mut recall_at_10, mut map_at_100, mut map_at_r) =
        (0.0, 0.0, 0.0, 0.0, 0.0);
    for start in (0..query_labels.len()).step_by(QUERY_CHUNK) {
        let len = QUERY_CHUNK.min(query_labels.len() - start);
        let similarities = queries.narrow(0, start, len)?.matmul(&database_t)?.to_vec2::<f32>()?;
        for (row, &label) in similarities.iter().zip(&query_labels[start..start + len]) {
            let r = relevant_in_database[label as usize];
            let relevant: Vec<bool> = top_k(row, r.max(100)).iter().map(|&i| database_labels[i] == label).collect();
            precision_at_1 += relevant[0] as u8 as f64;
            recall_at_5 += relevant[..5].iter().any(|&r| r) as u8 as f64;
            recall_at_10 += relevant[..10].iter().any(|&r| r) as u8 as f64;
            map_at_100 += average_precision(&relevant[..100], r);
            map_at_r += average_precision(&relevant[..r], r);
        }
    }
    let m = query_labels.len() as f64;
    Ok(RetrievalReport {
        queries: query_labels.len(),
        precision_at_1: precision_at_1 / m,
        recall_at_5: recall_at_5 / m,
        recall_at_10: recall_at_10 / m,
        map_at_100: map_at_100 / m,
        map_at_r: Some(map_at_r / m),
    })
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut indices: Vec<usize> = (0..values.len()).collect();
    let k = k.min(values.len());
    if k < indices.len() {
        indices.select_nth_unstable_by(k - 1, order);
        indices.truncate(k);
    }
    indices.sort_unstable_by(order);
    indices
}

/// AP over the ranked list `relevant`, normalised by `min(len, relevant_total)`.
fn average_precision(relevant: &[bool], relevant_total: usize) -> f64 {
    let (mut hits, mut sum) = (0usize, 0.0);
    for (i, &r) in relevant.iter().enumerate() {
        if r {
            hits += 1;
            sum += hits as f64 / (i + 1) as f64;
        }
    }
    let normaliser = relevant.len().min(relevant_total);
    if normaliser == 0 {
        0.0
    } else {
        sum / normaliser as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn average_precision_by_hand() {
        // Relevant at ranks 1, 3 and 4 of 5, with 3 relevant in the database:
        // (1/1 + 2/3 + 3/4) / 3.
        let ap = average_precision(&[true, false, true, true, false], 3);
        assert!((ap - (1.0 + 2.0 / 3.0 + 0.75) / 3.0).abs() < 1e-12);
        // More relevant images than ranks: normalised by the list length.
        assert!((average_precision(&[true, true], 10) - 1.0).abs() < 1e-12);
        assert_eq!(average_precision(&[false, false], 4), 0.0);
    }

    #[test]
    fn top_k_orders_by_value_then_index() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9, -1.0], 3), vec![1, 3, 2]);
        assert_eq!(top_k(&[0.3, 0.2], 5), vec![0, 1]);
    }

    #[test]
    fn retrieval_of_two_clusters() {
        // 120 database points: class 0 along +x, class 1 along +y (with a small tilt each);
        // queries near +x (class 0) and near +y but labelled 0 (so nothing relevant is near).
        let mut database = Vec::new();
        let mut labels = Vec::new();
        for i in 0..120 {
            let t = i as f32 * 1e-3;
            let (point, label) = if i % 2 == 0 { ([1.0, t], 0) } else { ([t, 1.0], 1) };
            database.extend_from_slice(&point);
            labels.push(label);
        }
        let database = Tensor::from_vec(database, (120, 2), &Device::Cpu).unwrap();
        let queries = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], (2, 2), &Device::Cpu).unwrap();
        let report = retrieval(&database, &labels, &queries, &[0, 0], 2).unwrap();
        assert_eq!(report.queries, 2);
        // Query 1 finds 60 relevant first (AP over 100 ranks, 60 relevant: 60/60 hits at ranks
        // 1..60, normalised by min(100, 60) = 60 → 1). Query 2 ranks all 60 class-1 points
        // first, then the 40 nearest class-0 points at ranks 61..100.
        assert_eq!(report.precision_at_1, 0.5);
        assert_eq!(report.recall_at_10, 0.5);
        let second: f64 = (1..=40).map(|h| h as f64 / (60 + h) as f64).sum::<f64>() / 60.0;
        assert!((report.map_at_100 - (1.0 + second) / 2.0).abs() < 1e-9, "{report:?}");
        // Each query's R is its class's 60 images: query 1 ranks them first (AP@R 1), query 2
        // ranks the 60 class-1 images first (AP@R 0).
        assert_eq!(report.map_at_r, Some(0.5));
    }
}
