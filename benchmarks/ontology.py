"""Ψ (Eq. 1) and the semantic ontology (§III) at ImageNet scale, checked against NLTK.

For the three WNID lists in ``<shared>/data/imagenet-wnids/`` (ImageNet-1K: 1,000 classes; the
MIIL ImageNet-21K-P "winter 21" list: 10,450; full ImageNet-21K: 21,841) it measures

* Ψ alone (``dmde.hierarchy.semantic.semantic_relationship``) and the whole build (Ψ + non-atomic check +
  spectral clustering + order + names: ``dmde.hierarchy.ontology.build_semantic_ontology``): wall time and
  peak resident memory, each in a fresh subprocess so peaks never mix (``ru_maxrss``);
* agreement of ψ with NLTK's ``lch_similarity`` on ``--pairs`` random pairs per list (must be
  exact to 1e-6, after the clamp at 0 that Eq. 1 adds);
* NLTK's pairwise route timed on those same pairs in the same run (synsets fetched beforehand, so
  only ``lch_similarity`` is timed), extrapolated to all N(N−1)/2 pairs, and the ratio to Ψ.

Times are medians over ``--trials`` runs. Prints a markdown table.

    python benchmarks/ontology.py                          # ../shared beside the repository
    python benchmarks/ontology.py --shared DIR --trials 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One place for every setting (units in the names).
LISTS = [
    ("ImageNet-1K", "imagenet_synsets.txt"),
    ("ImageNet-21K-P (MIIL)", "imagenet21k_miil_w21_synsets.txt"),
    ("ImageNet-21K", "imagenet22k_synsets.txt"),
]
TRIALS = 3
PAIRS_PER_LIST = 1000
SEED = 0
ATOL = 1e-6
TARGETS = {  # list file → (whole-build seconds, peak GB), from the project's issue
    "imagenet21k_miil_w21_synsets.txt": (30.0, None),
    "imagenet22k_synsets.txt": (120.0, 8.0),
}
MIN_SPEEDUP = 200.0

REPO = Path(__file__).resolve().parents[1]


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(mode: str, wnid_file: str, wordnet: str | None, pairs: int) -> dict:
    """One measurement in this (fresh) process: ``psi`` or ``build``."""
    import numpy as np

    from dmde.hierarchy.semantic import read_wnid_list, semantic_relationship
    from dmde.hierarchy.wordnet import WordNet

    t0 = time.perf_counter()
    wn = WordNet.load(wordnet)
    wnids = read_wnid_list(wnid_file, wn)
    out: dict = {"n": len(wnids), "load_s": time.perf_counter() - t0}
    if mode == "psi":
        t0 = time.perf_counter()
        psi = semantic_relationship(wn, wnids)  # (N, N) float32
        out["seconds"] = time.perf_counter() - t0
        out["peak_gb"] = _peak_gb()
        rng = np.random.default_rng(SEED)
        a = rng.integers(0, len(wnids), size=pairs)
        b = (a + rng.integers(1, len(wnids), size=pairs)) % len(wnids)  # b ≠ a
        out["pairs"] = [[wnids[i], wnids[j], float(psi[i, j])] for i, j in zip(a, b)]
    else:
        from dmde.hierarchy.ontology import build_semantic_ontology

        t0 = time.perf_counter()
        onto = build_semantic_ontology(wn, wnids, random_state=0)
        out["seconds"] = time.perf_counter() - t0
        out["peak_gb"] = _peak_gb()
        out["categories"] = len(getattr(onto, "categories", []) or [])
    return out


def run_child(mode: str, wnid_file: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(wnid_file), "--pairs", str(args.pairs)]
    if args.wordnet:
        cmd += ["--wordnet", args.wordnet]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{mode} on {wnid_file.name} failed:\n{res.stderr.strip()}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def nltk_check(wn_root: Path, pairs: list[list], workdir: str, reader_box: dict) -> dict:
    """ψ against NLTK's lch_similarity on the given pairs; NLTK's time per pair."""
    from dmde.hierarchy.wordnet import nltk_reader

    if "r" not in reader_box:
        t0 = time.perf_counter()
        reader_box["r"] = nltk_reader(wn_root, workdir)
        reader_box["load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        reader_box["H"] = reader_box["r"]._compute_max_depth("n", False)  # NLTK's own H, once
        reader_box["H_s"] = time.perf_counter() - t0
    r = reader_box["r"]
    syn = {w: r.synset_from_pos_and_offset("n", int(w[1:])) for p in pairs for w in p[:2]}
    sims = []
    t0 = time.perf_counter()
    for a, b, _ in pairs:
        sims.append(syn[a].lch_similarity(syn[b]))
    per_pair = (time.perf_counter() - t0) / len(pairs)
    diffs = [abs(max(0.0, s) - p[2]) for s, p in zip(sims, pairs)]
    return {
        "per_pair_s": per_pair,
        "mismatches": sum(d > ATOL for d in diffs),
        "max_diff": max(diffs),
        "pairs": len(pairs),
    }


def _fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("DMDE_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--trials", type=int, default=TRIALS)
    ap.add_argument("--pairs", type=int, default=PAIRS_PER_LIST)
    ap.add_argument("--wordnet", default=None, help="WordNet dict dir (default: dmde's search)")
    ap.add_argument("--lists", nargs="*", default=None, help="list files to run (default: all)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.wordnet, args.pairs)))
        return 0

    from dmde.hierarchy.wordnet import find_wordnet

    wn_root = find_wordnet(args.wordnet)
    load = os.getloadavg()
    list_dir = Path(args.shared) / "data" / "imagenet-wnids"
    todo = [(lbl, f) for lbl, f in LISTS if args.lists is None or f in args.lists]
    rows, failures = [], []
    reader_box: dict = {}
    with tempfile.TemporaryDirectory() as nltk_dir:
        for label, fname in todo:
            path = list_dir / fname
            psi_runs = [run_child("psi", path, args) for _ in range(args.trials)]
            build_runs = [run_child("build", path, args) for _ in range(args.trials)]
            n = psi_runs[0]["n"]
            chk = nltk_check(wn_root, psi_runs[0]["pairs"], nltk_dir, reader_box)
            psi_s = statistics.median(r["seconds"] for r in psi_runs)
            build_s = statistics.median(r["seconds"] for r in build_runs)
            psi_gb = max(r["peak_gb"] for r in psi_runs)
            build_gb = max(r["peak_gb"] for r in build_runs)
            nltk_all = chk["per_pair_s"] * n * (n - 1) / 2
            speedup = nltk_all / psi_s
            rows.append((label, n, psi_s, psi_gb, build_s, build_gb, chk, nltk_all, speedup,
                         build_runs[0].get("categories")))
            t_s, t_gb = TARGETS.get(fname, (None, None))
            if t_s is not None and build_s > t_s:
                failures.append(f"{label}: whole build {build_s:.1f} s > {t_s:.0f} s")
            if t_gb is not None and build_gb > t_gb:
                failures.append(f"{label}: peak {build_gb:.2f} GB > {t_gb:.0f} GB")
            if speedup < MIN_SPEEDUP:
                failures.append(f"{label}: Ψ only {speedup:.0f}× faster than pairwise NLTK")
            if chk["mismatches"]:
                failures.append(f"{label}: {chk['mismatches']} ψ values differ from NLTK")
            print(f"done {label}", file=sys.stderr, flush=True)

    cpu = platform.processor() or platform.machine()
    print(f"## Ψ (Eq. 1) and semantic ontology — {datetime.date.today().isoformat()}\n")
    cmd = f"python benchmarks/ontology.py --trials {args.trials} --pairs {args.pairs}"
    if args.lists:
        cmd += " --lists " + " ".join(args.lists)
    print(f"Machine: {platform.system()} {cpu}, {os.cpu_count()} logical CPUs, Python "
          f"{platform.python_version()}; load average {load[0]:.1f} at the start (a shared "
          f"machine inflates times). Command: `{cmd}`. Times: median of {args.trials}; peak = "
          "max resident set size of the measuring subprocess (includes the interpreter, numpy "
          "and the parsed WordNet).\n")
    print("| list | N | Ψ time | Ψ peak | build time | build peak | K | ψ = NLTK (pairs, max abs diff) "
          "| NLTK per pair | NLTK all pairs (extrap.) | Ψ speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for label, n, psi_s, psi_gb, build_s, build_gb, chk, nltk_all, speedup, k in rows:
        agree = f"{chk['pairs'] - chk['mismatches']}/{chk['pairs']}, {chk['max_diff']:.1e}"
        print(f"| {label} | {n:,} | {psi_s:.2f} s | {psi_gb:.2f} GB | {build_s:.2f} s | "
              f"{build_gb:.2f} GB | {k} | {agree} | {chk['per_pair_s'] * 1e6:.0f} µs | "
              f"{_fmt_time(nltk_all)} | {speedup:,.0f}× |")
    if "H" in reader_box:
        print(f"\nNLTK one-off costs, not in the per-pair time: reader {reader_box['load_s']:.1f} s; "
              f"its H (`_compute_max_depth`) = {reader_box['H']} in {reader_box['H_s']:.1f} s.")
    print("\nTargets: whole build ≤ 30 s at N = 10,450, ≤ 120 s and ≤ 8 GB at N = 21,841; "
          f"Ψ ≥ {MIN_SPEEDUP:.0f}× faster than pairwise NLTK; ψ exactly NLTK's. "
          + ("All met." if not failures else "Missed: " + "; ".join(failures) + "."))
    return 1 if any("differ" in f for f in failures) else 0


if __name__ == "__main__":
    sys.exit(main())
