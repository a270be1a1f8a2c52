//! Hybrid search: reciprocal rank fusion of the lexical and dense lists.
//! A chunk's fused value is `Σ weight_b / (60 + rank_b)` over the branches
//! that found it; its score is that value over the best possible one
//! ([`score::hybrid`]). Ties go to the better lexical rank, then the better
//! dense rank, then the older chunk, so the order is deterministic.

use std::collections::HashMap;

use crate::config::Weights;
use crate::retrieval::{score, BranchHit, Branches};

/// A chunk in a final ranking, with its score on the one scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// `chunks.id`.
    pub row: i64,
    pub score: f32,
    pub branches: Branches,
}

/// Fuses two ranked lists (best first; `(chunks.id, raw score)`) into one,
/// best first.
pub fn rrf(lexical: &[(i64, f32)], dense: &[(i64, f32)], weights: Weights) -> Vec<Ranked> {
    let (wl, wd) = if weights.lexical <= 0.0 && weights.dense <= 0.0 {
        // Nothing would count: weigh both alike rather than rank by nothing.
        (1.0, 1.0)
    } else {
        (weights.lexical.max(0.0), weights.dense.max(0.0))
    };
    let best = score::rrf_best(&[wl, wd]);
    let mut by_row: HashMap<i64, (f64, Branches)> =
        HashMap::with_capacity(lexical.len() + dense.len());
    for (i, (row, raw)) in lexical.iter().enumerate() {
        let rank = rank_of(i);
        let e = by_row.entry(*row).or_default();
        e.0 += score::rrf_term(wl, rank);
        e.1.lexical = Some(BranchHit { rank, raw: *raw });
    }
    for (i, (row, raw)) in dense.iter().enumerate() {
        let rank = rank_of(i);
        let e = by_row.entry(*row).or_default();
        e.0 += score::rrf_term(wd, rank);
        e.1.dense = Some(BranchHit { rank, raw: *raw });
    }
    let mut fused: Vec<(f64, Ranked)> = by_row
        .into_iter()
        .map(|(row, (value, branches))| {
            (
                value,
                Ranked {
                    row,
                    score: score::hybrid(value, best),
                    branches,
                },
            )
        })
        .collect();
    let rank = |h: Option<BranchHit>| h.map_or(u32::MAX, |h| h.rank);
    fused.sort_by(|(va, a), (vb, b)| {
        vb.total_cmp(va)
            .then(rank(a.branches.lexical).cmp(&rank(b.branches.lexical)))
            .then(rank(a.branches.dense).cmp(&rank(b.branches.dense)))
            .then(a.row.cmp(&b.row))
    });
    fused.into_iter().map(|(_, r)| r).collect()
}

/// The 1-based rank of the `i`th item of a list.
pub fn rank_of(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVEN: Weights = Weights {
        lexical: 1.0,
        dense: 1.0,
    };

    #[test]
    fn fusion_arithmetic() {
        // lexical: 10, 20, 30; dense: 20, 40, 10.
        let lex = [(10, 9.0), (20, 7.0), (30, 5.0)];
        let den = [(20, 0.9), (40, 0.8), (10, 0.7)];
        let out = rrf(&lex, &den, EVEN);
        let rows: Vec<i64> = out.iter().map(|r| r.row).collect();
        // 20: 1/62 + 1/61; 10: 1/61 + 1/63; 40: 1/62; 30: 1/63.
        assert_eq!(rows, vec![20, 10, 40, 30]);
        let best = 2.0 / 61.0;
        let expect = |v: f64| (v / best) as f32;
        assert!((out[0].score - expect(1.0 / 62.0 + 1.0 / 61.0)).abs() < 1e-6);
        assert!((out[1].score - expect(1.0 / 61.0 + 1.0 / 63.0)).abs() < 1e-6);
        assert!((out[2].score - expect(1.0 / 62.0)).abs() < 1e-6);
        assert!((out[3].score - expect(1.0 / 63.0)).abs() < 1e-6);
        // Per-branch ranks and raw scores are kept.
        assert_eq!(
            out[0].branches,
            Branches {
                lexical: Some(BranchHit { rank: 2, raw: 7.0 }),
                dense: Some(BranchHit { rank: 1, raw: 0.9 }),
            }
        );
        assert_eq!(out[2].branches.lexical, None);
        assert_eq!(out[2].branches.dense, Some(BranchHit { rank: 2, raw: 0.8 }));
        // Ordered, on the scale.
        for w in out.windows(2) {
            assert!(w[0].score >= w[1].score);
        }
        assert!(out.iter().all(|r| (0.0..=1.0).contains(&r.score)));
    }

    #[test]
    fn first_in_both_scores_one() {
        let out = rrf(&[(1, 3.0), (2, 2.0)], &[(1, 0.9), (2, 0.1)], EVEN);
        assert_eq!(out[0].row, 1);
        assert_eq!(out[0].score, 1.0);
    }

    #[test]
    fn weights_decide_between_the_branches() {
        // Each branch puts a different chunk first.
        let lex = [(1, 9.0), (2, 1.0)];
        let den = [(2, 0.9), (1, 0.1)];
        let lexical_heavy = Weights {
            lexical: 2.0,
            dense: 1.0,
        };
        let dense_heavy = Weights {
            lexical: 1.0,
            dense: 3.0,
        };
        assert_eq!(rrf(&lex, &den, lexical_heavy)[0].row, 1);
        assert_eq!(rrf(&lex, &den, dense_heavy)[0].row, 2);
        // 2/61 + 1/62 over 3/61.
        let top = &rrf(&lex, &den, lexical_heavy)[0];
        let expect = (2.0 / 61.0 + 1.0 / 62.0) / (3.0 / 61.0);
        assert!((f64::from(top.score) - expect).abs() < 1e-6);
        // A zero weight removes the branch from the order (but not its ranks).
        let lexical_only = Weights {
            lexical: 1.0,
            dense: 0.0,
        };
        let out = rrf(&lex, &den, lexical_only);
        assert_eq!(out.iter().map(|r| r.row).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(out[0].score, 1.0);
        assert!(out[1].branches.dense.is_some());
        // Equal values: the better lexical rank wins, deterministically.
        let out = rrf(&[(5, 1.0), (6, 1.0)], &[(6, 0.5), (5, 0.4)], EVEN);
        assert_eq!(out[0].row, 5);
        assert_eq!(out[0].score, out[1].score);
    }
}
