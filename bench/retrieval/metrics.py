"""The one definition of the retrieval metrics, shared by both sides of the benchmark.

bm25s_baseline.py scores its own run with it, and report.py scores the Rust runner's run
with it too and checks the figures the runner computed itself against these.

Definitions (the usual BEIR / trec_eval ones):
- nDCG@10: DCG = sum over ranks i = 1..10 of rel_i / log2(i + 1) (linear gain: the qrels
  score), divided by the DCG of the ideal ordering of the query's judged passages.
- recall@5: relevant passages (score > 0) in the top 5, divided by all relevant passages.
- MRR@10: 1 / rank of the first relevant passage in the top 10, 0 if there is none.
Each is averaged over every query that has a judgement (a query with no results counts 0).
A run lists each query's passage ids best first, without duplicates.
"""

import csv
import json
import math
import os
import sys


def load_qrels(path):
    """query id -> {corpus id: score} from a BEIR qrels .tsv (with a header line)."""
    qrels = {}
    with open(path, encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header is None:
            return qrels
        for row in rows:
            if len(row) < 3 or not row[0]:
                continue
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels


def load_beir(beir_dir, split="test"):
    """(corpus list of dicts, queries list of dicts, qrels) from a BEIR folder."""
    with open(os.path.join(beir_dir, "corpus.jsonl"), encoding="utf-8") as f:
        corpus = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(beir_dir, "queries.jsonl"), encoding="utf-8") as f:
        queries = [json.loads(line) for line in f if line.strip()]
    qpath = os.path.join(beir_dir, "qrels", split + ".tsv")
    qrels = load_qrels(qpath) if os.path.exists(qpath) else {}
    return corpus, queries, qrels


def ndcg_at(ranked, rels, k=10):
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((s for s in rels.values() if s > 0), reverse=True)[:k]
    idcg = sum(s / math.log2(i + 2) for i, s in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked, rels, k=5):
    relevant = {d for d, s in rels.items() if s > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at(ranked, rels, k=10):
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate(run, qrels):
    """run: query id -> [corpus ids, best first]. Averages over the judged queries."""
    judged = [q for q, r in qrels.items() if any(s > 0 for s in r.values())]
    if not judged:
        return {"queries": 0, "ndcg@10": None, "recall@5": None, "mrr@10": None}
    n = len(judged)
    return {
        "queries": n,
        "ndcg@10": sum(ndcg_at(run.get(q, []), qrels[q]) for q in judged) / n,
        "recall@5": sum(recall_at(run.get(q, []), qrels[q]) for q in judged) / n,
        "mrr@10": sum(mrr_at(run.get(q, []), qrels[q]) for q in judged) / n,
    }


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(s)))
    return s[rank - 1]


if __name__ == "__main__":
    # metrics.py QRELS.tsv RUN.json: scores a run file ({query id: [corpus ids]}).
    if len(sys.argv) != 3:
        sys.exit("usage: metrics.py QRELS.tsv RUN.json")
    with open(sys.argv[2], encoding="utf-8") as f:
        print(json.dumps(evaluate(json.load(f), load_qrels(sys.argv[1])), indent=2))
