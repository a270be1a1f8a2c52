"""The Python bm25s baseline over a BEIR folder, scored by metrics.py.

Tokenisation: Chinese runs are cut with jieba's search mode (jieba.lcut_for_search, the
same mode the local retriever indexes with), everything is lowercased, tokens without a
letter or digit are dropped, and bm25s' built-in English stop-word list is removed.
English is NOT stemmed: bm25s' own stemming needs the PyStemmer package, which the
benchmark does not install (the local retriever does stem English, with FTS5's porter).
BM25 variant: bm25s' default (Lucene, k1 = 1.5, b = 0.75).

Prints one JSON object: the metrics, index seconds, query latency p50/p99 in ms (one
query at a time, tokenisation included, over --rounds passes), and writes the run to
--run-out when given.
"""

import argparse
import json
import logging
import os
import re
import sys
import time

import bm25s
import jieba
from bm25s.stopwords import STOPWORDS_EN

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metrics  # noqa: E402

jieba.setLogLevel(logging.WARNING)
WORD = re.compile(r"\w", re.UNICODE)
STOP = set(STOPWORDS_EN)


def tokenize(text):
    out = []
    for tok in jieba.lcut_for_search(text.lower()):
        tok = tok.strip()
        if tok and WORD.search(tok) and tok not in STOP:
            out.append(tok)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("beir_dir")
    ap.add_argument("--split", default="test")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--run-out")
    args = ap.parse_args()

    corpus, queries, qrels = metrics.load_beir(args.beir_dir, args.split)
    ids = [d["_id"] for d in corpus]
    jieba.initialize()  # the dictionary load is not index time
    t0 = time.perf_counter()
    tokens = [tokenize((d.get("title") or "") + "\n" + d["text"]) for d in corpus]
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    index_s = time.perf_counter() - t0
    text_bytes = sum(len(d["text"].encode("utf-8")) + len((d.get("title") or "").encode("utf-8")) for d in corpus)

    k = min(10, len(ids))
    run, lat = {}, []
    for rnd in range(args.rounds):
        for q in queries:
            t = time.perf_counter()
            qt = tokenize(q["text"])
            if qt:
                docs, scores = retriever.retrieve([qt], k=k, show_progress=False, n_threads=0)
                ranked = [ids[int(i)] for i, s in zip(docs[0], scores[0]) if s > 0]
            else:
                ranked = []
            lat.append((time.perf_counter() - t) * 1000.0)
            if rnd == 0:
                run[q["_id"]] = ranked
    out = {
        "side": "bm25s",
        "mode": "lexical",
        "passages": len(corpus),
        "queries": len(queries),
        "index_seconds": index_s,
        "index_mb_s": text_bytes / 1e6 / index_s if index_s > 0 else None,
        "p50_ms": metrics.percentile(lat, 50),
        "p99_ms": metrics.percentile(lat, 99),
    }
    out.update({k2: v for k2, v in metrics.evaluate(run, qrels).items() if k2 != "queries"})
    if args.run_out:
        with open(args.run_out, "w", encoding="utf-8") as f:
            json.dump(run, f, ensure_ascii=False)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
