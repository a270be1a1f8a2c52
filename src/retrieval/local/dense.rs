//! The dense branch: vectors as stored (little-endian f32, L2-normalised at
//! ingest) and the [`VectorIndex`] searched by cosine. [`ExactIndex`] compares
//! the query with every row (brute force: exact, and fast enough to about
//! 10⁵ chunks); an approximate index (HNSW, IVF…) would be another
//! implementation of the same trait, built where [`ExactIndex::new`] is.

/// Searches vectors by cosine similarity. Rows are numbered from 0 in the
/// order they were added; the caller maps rows back to chunks.
pub trait VectorIndex: Send + Sync {
    /// Dimensions of every vector.
    fn dim(&self) -> usize;
    /// How many vectors it holds.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `n` rows most similar to `query` (L2-normalised, `dim` long)
    /// among those `keep` accepts, best first, with their cosine.
    fn search(&self, query: &[f32], n: usize, keep: &dyn Fn(usize) -> bool) -> Vec<(usize, f32)>;
}

/// Exact cosine search over a row-major matrix of normalised vectors.
pub struct ExactIndex {
    dim: usize,
    matrix: Vec<f32>,
}

impl ExactIndex {
    /// `matrix` holds `matrix.len() / dim` normalised rows.
    pub fn new(dim: usize, matrix: Vec<f32>) -> ExactIndex {
        debug_assert!(dim > 0 && matrix.len() % dim == 0);
        ExactIndex { dim, matrix }
    }
}

impl VectorIndex for ExactIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.matrix.len().checked_div(self.dim).unwrap_or(0)
    }

    fn search(&self, query: &[f32], n: usize, keep: &dyn Fn(usize) -> bool) -> Vec<(usize, f32)> {
        if n == 0 || query.len() != self.dim || self.dim == 0 {
            return Vec::new();
        }
        let mut scored: Vec<(usize, f32)> = self
            .matrix
            .chunks_exact(self.dim)
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(i, row)| (i, dot(row, query)))
            .collect();
        let better = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if scored.len() > n {
            scored.select_nth_unstable_by(n - 1, better);
            scored.truncate(n);
        }
        scored.sort_unstable_by(better);
        scored
    }
}

/// The dot product, in eight independent lanes so the compiler vectorises it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// Scales `v` to unit length in place; a zero (or non-finite) vector stays
/// as it is. Returns false when `v` holds a NaN or an infinity.
pub fn normalise(v: &mut [f32]) -> bool {
    if v.iter().any(|x| !x.is_finite()) {
        return false;
    }
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in v.iter_mut() {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
    true
}

/// A vector as stored: little-endian f32s.
pub fn to_blob(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Appends a stored vector to `out`; false when the blob is not `dim` f32s.
pub fn extend_from_blob(blob: &[u8], dim: usize, out: &mut Vec<f32>) -> bool {
    if blob.len() != dim.saturating_mul(4) {
        return false;
    }
    out.extend(
        blob.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let mut v = v.to_vec();
        assert!(normalise(&mut v));
        v
    }

    #[test]
    fn exact_search_ranks_by_cosine_and_honours_keep() {
        let rows = [
            unit(&[1.0, 0.0, 0.0]),
            unit(&[0.7, 0.7, 0.0]),
            unit(&[0.0, 1.0, 0.0]),
            unit(&[-1.0, 0.0, 0.0]),
        ];
        let index = ExactIndex::new(3, rows.concat());
        assert_eq!(index.len(), 4);
        let q = unit(&[1.0, 0.1, 0.0]);
        let all = index.search(&q, 10, &|_| true);
        let order: Vec<usize> = all.iter().map(|h| h.0).collect();
        assert_eq!(order, vec![0, 1, 2, 3]);
        assert!((all[3].1 + 0.995).abs() < 0.01);
        let top2 = index.search(&q, 2, &|_| true);
        assert_eq!(top2.iter().map(|h| h.0).collect::<Vec<_>>(), vec![0, 1]);
        let kept = index.search(&q, 2, &|r| r != 0);
        assert_eq!(kept.iter().map(|h| h.0).collect::<Vec<_>>(), vec![1, 2]);
        // A query of the wrong size finds nothing rather than misreading rows.
        assert!(index.search(&[1.0, 0.0], 2, &|_| true).is_empty());
    }

    #[test]
    fn dot_matches_the_naive_sum() {
        let a: Vec<f32> = (0..389).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..389).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }

    #[test]
    fn blobs_round_trip_and_sizes_are_checked() {
        let v = unit(&[3.0, 4.0]);
        assert_eq!(v, vec![0.6, 0.8]);
        let blob = to_blob(&v);
        let mut out = Vec::new();
        assert!(extend_from_blob(&blob, 2, &mut out));
        assert_eq!(out, v);
        assert!(!extend_from_blob(&blob, 3, &mut out));
        let mut bad = vec![1.0, f32::NAN];
        assert!(!normalise(&mut bad));
        let mut zero = vec![0.0, 0.0];
        assert!(normalise(&mut zero));
        assert_eq!(zero, vec![0.0, 0.0]);
    }
}
