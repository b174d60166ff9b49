"""`make bench`: pruning time against its floor, peak memory, and the pruned models' speed.

For each model (the demo MiniLM, BERT-base and DistilBERT built from their configs with random
weights: timing does not depend on the weights) and a sample set of fixed-length sequences:

- wall time of every stage (Fisher, search, rearrangement, tuning, physical pruning, evaluation)
  and the peak resident memory of the process (each model runs in its own process);
- the floor: one forward + backward pass over the sample set with frozen weights (what the
  Fisher pass cannot avoid), and the ratio total pruning time / floor;
- latency and throughput of the pruned model against the baseline at several FLOPs constraints;
- how pruning time grows with the number of samples and with model size.

Mask tuning uses the first 512 samples (the library default, ``--tune-samples``); Fisher and
the floor use them all. DistilBERT and BERT-base run 512 samples by default (``--full``: 2,048),
and the table adds the ratio projected to 2,048 samples from the measured parts (Fisher and the
floor are linear in the sample count, tuning is capped).

Ratios are measured in one run on one machine. Results: outputs/bench/bench.json and bench.md.

    python -m experiments.bench [--quick] [--full] [--models minilm ...] [--tune-samples 512|all]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    # name: (config builder kwargs or checkpoint, samples, note)
    "minilm": {"samples": 2048},
    "distilbert": {"samples": 512, "note": "512 samples (--full: 2,048); see the projected ratio"},
    "bert-base": {"samples": 512, "note": "512 samples (--full: 2,048); see the projected ratio"},
}


def build_model(name: str):
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    torch.manual_seed(0)
    if name == "minilm":
        demo = ROOT / ".cache" / "models" / "minilm-sst2"
        if demo.exists():
            return BertForSequenceClassification.from_pretrained(demo).eval(), "fine-tuned demo"
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, num_labels=2)
        return BertForSequenceClassification(config).eval(), "MiniLM shape, random weights"
    if name == "bert-base":
        return BertForSequenceClassification(BertConfig(num_labels=2)).eval(), "random weights"
    config = DistilBertConfig(num_labels=2)
    return DistilBertForSequenceClassification(config).eval(), "random weights"


def sample_batches(vocab: int, samples: int, seq_len: int, batch: int = 32, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        out.append({"input_ids": torch.randint(1000, vocab, (n, seq_len), generator=g),
                    "attention_mask": torch.ones(n, seq_len, dtype=torch.long),
                    "labels": torch.randint(0, 2, (n,), generator=g)})
    return out


def floor_time(model, batches) -> float:
    """Forward + backward over the batches, weights frozen, gradient w.r.t. the embeddings."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.base_model.embeddings

    def needs_grad(module, args, out):
        return out.requires_grad_(True)

    handle = emb.register_forward_hook(needs_grad)
    start = time.perf_counter()
    try:
        for b in batches:
            model(**b).loss.backward()
    finally:
        handle.remove()
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    return time.perf_counter() - start


def bench_model(name: str, samples: int, seq_len: int, constraints: list[float],
                sample_counts: list[int], tune_samples: int | None = 512) -> dict:
    """Stage times at constraint 0.5 (the whole pipeline); latency of the pruned models at every
    constraint (tuning only rescales kept units, so the other constraints skip it)."""
    import torch

    from experiments.evaluation import predict
    from prune import flops_cost, get_adapter, prune_model
    from prune.fisher import compute_fisher
    from prune.latency import compare_latency, measure_latency
    from prune.pipeline import PruneOptions, prune_masks, timed

    model, origin = build_model(name)
    adapter = get_adapter(model)
    batches = sample_batches(model.config.vocab_size, samples, seq_len)
    out = {"model": name, "origin": origin, "samples": samples, "seq_len": seq_len,
           "tune_samples": tune_samples, "threads": torch.get_num_threads(), "device": "cpu"}
    out["floor"] = floor_time(model, batches)
    cost = flops_cost(adapter, seq_len)
    t: dict[str, float] = {}
    with timed(t, "fisher"):
        fisher = compute_fisher(model, adapter, batches, progress=False)
    runs = {}
    for c in constraints:
        opts = PruneOptions(constraint=c, tune=c == 0.5, tune_samples=tune_samples)
        result = prune_masks(model, adapter, batches, cost, opts, fisher=fisher, progress=False)
        timings = {**result.timings, "fisher": t["fisher"]}
        small = copy.deepcopy(model)
        with timed(timings, "physical"):
            prune_model(small, result.masks, adapter)
        eval_batches = batches[:4]
        with timed(timings, "eval"):
            predict(small, eval_batches)
        timings["total"] = sum(timings.get(k, 0.0) for k in
                               ("fisher", "search", "rearrange", "tune", "physical"))
        base = measure_latency(model, 32, 128, warmup=2, repeats=10)
        pruned = measure_latency(small, 32, 128, warmup=2, repeats=10)
        lat = compare_latency(base, pruned)
        runs[str(c)] = {"timings": timings, "ratio_to_floor": timings["total"] / out["floor"],
                        "latency": lat, "throughput": {"baseline": 32 / base.median,
                                                       "pruned": 32 / pruned.median},
                        "flops_ratio": cost.macs(result.masks.heads_per_layer(),
                                                 result.masks.neurons_per_layer())
                        / cost.full_macs}
        del small
    out["constraints"] = runs
    main = runs["0.5"]["timings"]
    # Fisher and the floor are linear in the sample count, tuning uses at most tune_samples:
    # the ratio at 2,048 samples follows from the measured parts (reported as a projection).
    k = 2048 / samples
    rest = main["total"] - main["fisher"]
    if tune_samples is None:
        rest *= k
    elif samples < tune_samples:
        rest *= min(k, tune_samples / samples)
    out["ratio_2048"] = (main["fisher"] * k + rest) / (out["floor"] * k) if k != 1 else None
    scaling = {}
    for n in sample_counts:
        sub = batches[: max(1, n // 32)]
        tt: dict[str, float] = {}
        with timed(tt, "fisher"):
            f = compute_fisher(model, adapter, sub, progress=False)
        r = prune_masks(model, adapter, sub, cost,
                        PruneOptions(constraint=0.5, tune_samples=tune_samples), fisher=f,
                        progress=False)
        scaling[str(n)] = {"fisher": tt["fisher"], "tune": r.timings.get("tune", 0.0),
                           "total": tt["fisher"] + sum(r.timings.values())}
    scaling[str(samples)] = {"fisher": main["fisher"], "tune": main["tune"],
                             "total": main["total"]}
    out["scaling"] = scaling
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def table(results: list[dict]) -> str:
    lines = ["| model | samples | tune samples | floor s | fisher s | search s | rearrange s | "
             "tune s | physical s | eval s | total s | total/floor | at 2,048 (projected) | "
             "peak RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["constraints"]["0.5"]["timings"]
        proj = f"{r['ratio_2048']:.2f}" if r.get("ratio_2048") else "(measured)"
        tune_n = min(r["samples"], r["tune_samples"] or r["samples"])
        lines.append(
            f"| {r['model']} | {r['samples']} | {tune_n} | {r['floor']:.1f} | {t['fisher']:.1f} | "
            f"{t['search']:.3f} | {t['rearrange']:.2f} | {t['tune']:.1f} | {t['physical']:.2f} "
            f"| {t['eval']:.2f} | {t['total']:.1f} | "
            f"{r['constraints']['0.5']['ratio_to_floor']:.2f} | {proj} | {r['peak_rss_gb']:.2f} |")
    lines += ["", "| model | constraint | FLOPs kept | latency base ms | latency pruned ms | "
              "speedup | throughput base/s | throughput pruned/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for c, run in r["constraints"].items():
            lat = run["latency"]
            lines.append(
                f"| {r['model']} | {c} | {run['flops_ratio']:.3f} | "
                f"{1e3 * lat['baseline']['median']:.0f} | {1e3 * lat['pruned']['median']:.0f} | "
                f"{lat['speedup']:.2f}x | {run['throughput']['baseline']:.1f} | "
                f"{run['throughput']['pruned']:.1f} |")
    lines += ["", "| model | samples | fisher s | tune s | total s | total per sample ms |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for n, s in sorted(r["scaling"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {r['model']} | {n} | {s['fisher']:.1f} | {s['tune']:.1f} | "
                         f"{s['total']:.1f} | {1e3 * s['total'] / int(n):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="pruning-time and speed benchmark")
    parser.add_argument("--quick", action="store_true", help="small sample sets (a smoke run)")
    parser.add_argument("--full", action="store_true",
                        help="every model with 2,048 samples (BERT-base: about an hour here)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tune-samples", default="512",
                        help="samples for mask tuning ('all': the whole sample set)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print JSON
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench"))
    args = parser.parse_args()
    scale = 8 if args.quick else 1
    tune_samples = None if args.tune_samples == "all" else int(args.tune_samples)
    if args.one:
        samples = 2048 if args.full else MODELS[args.one]["samples"]
        samples = max(32, samples // scale)
        counts = [n // scale for n in (512, 1024)] if args.one == "minilm" else []
        print("BENCH-JSON " + json.dumps(bench_model(
            args.one, samples, 128, [0.4, 0.5, 0.6], [c for c in counts if c >= 32],
            tune_samples=tune_samples if tune_samples is None else max(1, tune_samples // scale))))
        return
    results = []
    for name in args.models:  # one process per model: peak memory is per model
        cmd = [sys.executable, "-m", "experiments.bench", "--one", name, "--tune-samples",
               args.tune_samples]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--full"] if args.full else []
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, cwd=ROOT)
        line = [l for l in res.stdout.splitlines() if l.startswith("BENCH-JSON ")]
        if res.returncode != 0 or not line:
            sys.exit(f"bench of {name} failed:\n{res.stderr[-3000:]}")
        note = "" if args.full else MODELS[name].get("note", "")
        results.append({**json.loads(line[0][len("BENCH-JSON "):]), "note": note})
        print(f"{name}: done", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench" + ("-full" if args.full else "") + ("-quick" if args.quick else "")
    if sorted(args.models) != sorted(MODELS):  # a subset does not overwrite the whole-bench file
        stem += "-" + "-".join(args.models)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}.md").write_text(table(results))
    print(table(results))
    for r in results:
        if r.get("note"):
            print(f"note: {r['model']}: {r['note']}")


if __name__ == "__main__":
    main()
