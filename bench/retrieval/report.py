"""Prints run.sh's comparison table (markdown) from the JSON files in its output folder.

The Rust runner's rankings are scored again here with metrics.py, the same code that
scores bm25s; the script fails if any figure differs from the one the runner reported.
"""

import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metrics  # noqa: E402


def load(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def f3(v):
    return "–" if v is None else f"{v:.3f}"


def ms(v):
    return "–" if v is None else f"{v:.2f}"


def rate(v):
    return "–" if v is None else f"{v:.1f}"


def main():
    out, data = sys.argv[1], sys.argv[2]
    _, _, qrels = metrics.load_beir(data)
    bm = load(os.path.join(out, "bm25s.json"))
    pg = load(os.path.join(out, "promptgate.json"))["results"]
    runs = load(os.path.join(out, "promptgate-run.json"))
    for r in pg:
        again = metrics.evaluate(runs[r["mode"]], qrels)
        for k in ("ndcg@10", "recall@5", "mrr@10"):
            if abs(again[k] - r[k]) > 1e-9:
                sys.exit(f"report.py: {r['mode']} {k}: the runner says {r[k]}, metrics.py {again[k]}")
    by = {r["mode"]: r for r in pg}
    name = os.path.basename(os.path.normpath(data))
    lines = [
        f"Retrieval on `{name}` ({bm['passages']} passages, {len(qrels)} judged queries); "
        f"one query at a time, {platform.machine()}, {os.cpu_count()} CPUs, idle: "
        f"{open(os.path.join(out, 'idle.txt')).read().strip() if os.path.exists(os.path.join(out, 'idle.txt')) else '?'}.",
        "",
        "| system | nDCG@10 | recall@5 | MRR@10 | index s | query p50 ms | query p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| bm25s 0.3.16 + jieba (Python) | {f3(bm['ndcg@10'])} | {f3(bm['recall@5'])} | {f3(bm['mrr@10'])} "
        f"| {bm['index_seconds']:.2f} | {ms(bm['p50_ms'])} | {ms(bm['p99_ms'])} |",
    ]
    for mode in ("lexical", "dense", "hybrid"):
        r = by.get(mode)
        if r:
            idx = f"{r['index_seconds']:.2f}"
            if mode != "lexical":
                idx += f" ({r['embed_seconds']:.1f} s of it embedding)" if r.get("embed_seconds") else " (vectors cached)"
            lines.append(
                f"| promptgate local, {mode} | {f3(r.get('ndcg@10'))} | {f3(r.get('recall@5'))} | {f3(r.get('mrr@10'))} "
                f"| {idx} | {ms(r['p50_ms'])} | {ms(r['p99_ms'])} |"
            )
    scale_pg = load(os.path.join(out, "promptgate-scale.json"))
    scale_bm = load(os.path.join(out, "bm25s-scale.json"))
    if scale_pg:
        sby = {r["mode"]: r for r in scale_pg["results"]}
        n = scale_pg["results"][0]["passages"]
        lines += [
            "",
            f"Scale: synthetic {n}-passage zh/en corpus (`retrieval_eval gen-scale`), {scale_pg['results'][0]['queries']} queries; "
            "query vectors precomputed through the route (latency excludes the embedding call)"
            + ("; document vectors synthetic (see run.sh)." if any(r.get("synthetic_doc_vectors") for r in scale_pg["results"]) else "."),
            "",
            "| system | ingest MB/s (text) | ingest MB/s (files, driver) | query p50 ms | query p99 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        if scale_bm:
            lines.append(f"| bm25s + jieba (index incl. tokenising) | {rate(scale_bm.get('index_mb_s'))} | – | {ms(scale_bm['p50_ms'])} | {ms(scale_bm['p99_ms'])} |")
        for mode in ("lexical", "hybrid"):
            r = sby.get(mode)
            if r:
                lines.append(f"| promptgate local, {mode} | {rate(r['ingest_mb_s'])} | {rate(r.get('driver_mb_s'))} | {ms(r['p50_ms'])} | {ms(r['p99_ms'])} |")
    # Targets.
    lex, hyb = by.get("lexical"), by.get("hybrid")
    checks = []
    if lex:
        checks.append(("lexical nDCG@10 ≥ bm25s", f"{lex['ndcg@10']:.3f} vs {bm['ndcg@10']:.3f}", lex["ndcg@10"] >= bm["ndcg@10"]))
    if lex and hyb:
        checks.append(("hybrid ≥ lexical + 0.03", f"{hyb['ndcg@10']:.3f} vs {lex['ndcg@10'] + 0.03:.3f}", hyb["ndcg@10"] >= lex["ndcg@10"] + 0.03))
    if scale_pg:
        if sby.get("lexical"):
            s = sby["lexical"]
            checks.append(("lexical p50 ≤ 1 ms at scale", f"{s['p50_ms']:.2f} ms", s["p50_ms"] <= 1.0))
            checks.append(("ingest ≥ 5 MB/s (lexical)", f"{s['ingest_mb_s']:.1f} MB/s", s["ingest_mb_s"] >= 5.0))
        if sby.get("hybrid"):
            s = sby["hybrid"]
            checks.append(("hybrid p50 ≤ 5 ms at scale", f"{s['p50_ms']:.2f} ms", s["p50_ms"] <= 5.0))
    if checks:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in checks]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
