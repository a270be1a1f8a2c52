//! The one score scale users see: a similarity in [0, 1], higher is better.
//! Each branch's raw score is mapped onto it here, and nowhere else.
//!
//! - **lexical** (BM25, as SQLite FTS5 computes it, negated so that higher is
//!   better; never below 0): `b / (b + K)` with [`BM25_K`] = 5. A passage whose
//!   BM25 is 5 scores 0.5, 15 scores 0.75, 45 scores 0.9. The mapping is
//!   monotonic, so it never changes the order BM25 gives; K only sets where
//!   the middle of the scale is. BM25 is unbounded and depends on the corpus
//!   (document frequencies, lengths), so a lexical score compares passages of
//!   one index well and thresholds (`min_score`) only roughly.
//! - **dense** (cosine similarity of L2-normalised vectors, in [-1, 1]): the
//!   cosine clamped to [0, 1] (a negative cosine means unrelated, 0).
//! - **hybrid** (reciprocal rank fusion, [`RRF_K`] = 60): a passage's fused
//!   value is `Σ weight_b / (60 + rank_b)` over the branches it was found in;
//!   the score divides it by the best possible value, rank 1 in every branch
//!   with a weight (`Σ weight_b / 61`). Rank 1 in both branches scores 1.0;
//!   rank 1 in one branch only (equal weights) 0.5; rank 10 in both 0.87.
//!   Hybrid scores say how well both branches agree on a passage, not how
//!   relevant it is on an absolute scale.
//!
//! The raw branch values (BM25, cosine) stay available in
//! [`super::Branches`] for debugging (`promptgate search --explain`).

/// The BM25 value that maps to 0.5 on the lexical scale.
pub const BM25_K: f32 = 5.0;

/// The reciprocal rank fusion constant (the rank offset of each branch).
pub const RRF_K: f32 = 60.0;

/// A lexical passage's score from its BM25 value (higher = better).
pub fn lexical(bm25: f32) -> f32 {
    if bm25.is_nan() || bm25 <= 0.0 {
        return 0.0;
    }
    if bm25.is_infinite() {
        return 1.0;
    }
    (bm25 / (bm25 + BM25_K)).clamp(0.0, 1.0)
}

/// A dense passage's score from its cosine similarity.
pub fn dense(cosine: f32) -> f32 {
    if cosine.is_nan() {
        return 0.0;
    }
    cosine.clamp(0.0, 1.0)
}

/// One branch's contribution to a fused value: `weight / (60 + rank)`, rank
/// 1-based.
pub fn rrf_term(weight: f64, rank: u32) -> f64 {
    weight / (f64::from(RRF_K) + f64::from(rank.max(1)))
}

/// The best fused value possible with these branch weights: rank 1 in every
/// branch.
pub fn rrf_best(weights: &[f64]) -> f64 {
    weights.iter().map(|w| rrf_term(*w, 1)).sum()
}

/// A hybrid passage's score: its fused value over the best possible one.
pub fn hybrid(fused: f64, best: f64) -> f32 {
    if best.is_nan() || best <= 0.0 || fused.is_nan() {
        return 0.0;
    }
    (fused / best).clamp(0.0, 1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_on_scale(s: f32) {
        assert!((0.0..=1.0).contains(&s), "{s} is off the scale");
    }

    #[test]
    fn lexical_is_monotonic_and_on_the_scale() {
        let mut last = -1.0;
        for i in 0..2000 {
            let b = i as f32 * 0.05;
            let s = lexical(b);
            assert_on_scale(s);
            assert!(
                s > last || (s == last && s == 1.0),
                "{b} → {s} after {last}"
            );
            last = s;
        }
        assert_eq!(lexical(0.0), 0.0);
        assert_eq!(lexical(-3.0), 0.0);
        assert_eq!(lexical(f32::NAN), 0.0);
        assert_eq!(lexical(f32::INFINITY), 1.0);
        assert!((lexical(BM25_K) - 0.5).abs() < 1e-6);
        assert!((lexical(15.0) - 0.75).abs() < 1e-6);
    }

    #[test]
    fn dense_clamps_cosine() {
        assert_eq!(dense(-0.4), 0.0);
        assert_eq!(dense(0.25), 0.25);
        assert_eq!(dense(1.0000001), 1.0);
        assert_eq!(dense(f32::NAN), 0.0);
        let mut last = -1.0;
        for i in 0..=100 {
            let s = dense(i as f32 / 100.0);
            assert!(s > last);
            last = s;
        }
    }

    #[test]
    fn hybrid_is_relative_to_rank_one_everywhere() {
        let w = [1.0, 1.0];
        let best = rrf_best(&w);
        assert!((best - 2.0 / 61.0).abs() < 1e-12);
        let both_first = rrf_term(1.0, 1) + rrf_term(1.0, 1);
        assert_eq!(hybrid(both_first, best), 1.0);
        let one_first = rrf_term(1.0, 1);
        assert!((hybrid(one_first, best) - 0.5).abs() < 1e-6);
        let both_tenth = rrf_term(1.0, 10) * 2.0;
        assert!((hybrid(both_tenth, best) - 61.0 / 70.0).abs() < 1e-6);
        // Worse ranks never score higher.
        let mut last = 2.0;
        for r in 1..500 {
            let s = hybrid(rrf_term(1.0, r) + rrf_term(1.0, r), best);
            assert_on_scale(s);
            assert!(s < last);
            last = s;
        }
        assert_eq!(hybrid(0.1, 0.0), 0.0);
        assert_eq!(hybrid(f64::NAN, best), 0.0);
    }

    #[test]
    fn weights_scale_the_terms() {
        assert!((rrf_term(2.0, 1) - 2.0 / 61.0).abs() < 1e-12);
        assert!((rrf_term(0.5, 5) - 0.5 / 65.0).abs() < 1e-12);
        // Rank 0 is read as rank 1 (ranks are 1-based).
        assert_eq!(rrf_term(1.0, 0), rrf_term(1.0, 1));
        assert!((rrf_best(&[2.0, 1.0]) - 3.0 / 61.0).abs() < 1e-12);
    }
}
