"""`make bench`: pruning time against its floor, peak memory, the pruned models' speed, and the
cost of a family of constraints against single runs. Ratios are measured in one run on one
machine; results go to outputs/bench/ (``bench[-full].{json,md}``).

Part 1, per model (each in its own process, so that peak memory is per model): the demo
MiniLM, MPNet-base (real weights when ``make mpnet-weights`` has run, fine-tuned if cached),
DistilBERT and BERT-base (random weights: timing does not depend on them), on a sample set of
fixed-length sequences (128 tokens):

- the floor: one forward + backward pass over the sample set with frozen weights, what the
  Fisher pass cannot avoid; the wall time of every stage, and total / floor for each tuning
  mode (``mask``, the paper, and ``weights``, the reconstruction) at constraint 0.5;
- latency and throughput of the pruned models at 0.4 / 0.5 / 0.6 against the baseline;
- (MiniLM) how pruning time grows with the number of samples.

Mask tuning uses the first 512 samples (the library default); Fisher and the floor use all of
them. The base-size models run 512 samples by default (``--full``: 2,048) and the table adds the
ratio projected to 2,048 samples (Fisher and the floor are linear in the samples, tuning capped).

Part 2 (part of the default run; ``--family-only`` runs it alone): the real command line on
the demo task, timed end to end: one single run, four single runs (constraints 0.4 / 0.5 /
0.6 / 0.7, each with its own Fisher pass), and one family run of the same four constraints (one
Fisher pass, one baseline evaluation).

    python -m experiments.bench [--quick] [--full] [--models minilm ...]
                                [--no-family | --family-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"

MODELS = {
    "minilm": {"samples": 2048},
    "mpnet": {"samples": 512, "note": "512 samples (--full: 2,048); see the projected ratio"},
    "distilbert": {"samples": 512, "note": "512 samples (--full: 2,048); see the projected ratio"},
    "bert-base": {"samples": 512, "note": "512 samples (--full: 2,048); see the projected ratio"},
}
MODES = ("mask", "weights")


def build_model(name: str):
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    torch.manual_seed(0)
    if name in ("minilm", "mpnet"):
        tuned = CACHE / "models" / f"{name}-sst2"
        pretrained = CACHE / "pretrained" / "all-mpnet-base-v2"
        if tuned.exists():
            return AutoModelForSequenceClassification.from_pretrained(tuned).eval(), \
                "fine-tuned on SST-2"
        if name == "mpnet" and pretrained.exists():
            return AutoModelForSequenceClassification.from_pretrained(
                pretrained, num_labels=2).eval(), "pretrained, random head"
        if name == "mpnet":
            from transformers import MPNetConfig, MPNetForSequenceClassification

            return MPNetForSequenceClassification(MPNetConfig(num_labels=2)).eval(), \
                "random weights"
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
    from prune.runtime import eval_mode

    emb = model.base_model.embeddings

    def needs_grad(module, args, out):
        return out.requires_grad_(True)

    handle = emb.register_forward_hook(needs_grad)
    start = time.perf_counter()
    try:
        with eval_mode(model, freeze=True):
            for b in batches:
                model(**b).loss.backward()
    finally:
        handle.remove()
    return time.perf_counter() - start


def bench_model(name: str, samples: int, seq_len: int, constraints: list[float],
                sample_counts: list[int], min_run_time: float) -> dict:
    """Stage times at constraint 0.5 for each tuning mode; latency of the pruned models at
    every constraint (tuned with the default mode)."""
    import torch

    from experiments.evaluation import predict
    from prune import PruneOptions, TuneOptions, flops_cost, get_adapter, prune_masks, prune_model
    from prune.fisher import compute_fisher
    from prune.latency import compare_latency, measure_latency
    from prune.pipeline import timed

    model, origin = build_model(name)
    adapter = get_adapter(model)
    batches = sample_batches(model.config.vocab_size, samples, seq_len)
    out = {"model": name, "origin": origin, "samples": samples, "seq_len": seq_len,
           "tune_samples": PruneOptions.defaults()["tune_samples"],
           "threads": torch.get_num_threads(), "device": "cpu"}
    out["floor"] = floor_time(model, batches)
    cost = flops_cost(adapter, seq_len)
    t: dict[str, float] = {}
    with timed(t, "fisher"):
        fisher = compute_fisher(model, adapter, batches, progress=False)
    modes = {}
    for mode in MODES:
        opts = PruneOptions(tune=TuneOptions(mode=mode))
        result = prune_masks(model, adapter, batches, cost, 0.5, opts, fisher=fisher,
                             progress=False)
        timings = {**result.timings, "fisher": t["fisher"]}
        small = copy.deepcopy(model)
        with timed(timings, "physical"):
            prune_model(small, result.masks, adapter, result.weights)
        with timed(timings, "eval"):
            predict(small, batches[:4])
        timings["total"] = sum(timings.get(k, 0.0) for k in
                               ("fisher", "search", "rearrange", "tune", "physical"))
        modes[mode] = {"timings": timings, "ratio_to_floor": timings["total"] / out["floor"],
                       "ratio_2048": projected(timings, out["floor"], samples)}
    out["modes"] = modes
    base = measure_latency(model, 32, 128, min_run_time)
    runs = {}
    for c in constraints:
        result = prune_masks(model, adapter, batches, cost, c, PruneOptions(),
                             fisher=fisher, progress=False)
        small = prune_model(copy.deepcopy(model), result.masks, adapter, result.weights)
        pruned = measure_latency(small, 32, 128, min_run_time)
        runs[str(c)] = {"latency": compare_latency(base, pruned),
                        "throughput": {"baseline": 32 / base.median,
                                       "pruned": 32 / pruned.median},
                        "flops_ratio": cost.ratio(result.masks.heads_per_layer(),
                                                  result.masks.neurons_per_layer())}
        del small
    out["constraints"] = runs
    out["scaling"] = scaling(model, adapter, batches, cost, sample_counts, modes["mask"], samples)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def projected(timings: dict, floor: float, samples: int) -> float | None:
    """total / floor at 2,048 samples from the measured parts: the Fisher pass and the floor
    grow with the samples, tuning uses at most its first 512."""
    if samples == 2048:
        return None
    k = 2048 / samples
    rest = timings["total"] - timings["fisher"]
    if samples < 512:
        rest *= min(k, 512 / samples)
    return (timings["fisher"] * k + rest) / (floor * k)


def scaling(model, adapter, batches, cost, counts, main, samples) -> dict:
    from prune import PruneOptions, prune_masks
    from prune.fisher import compute_fisher
    from prune.pipeline import timed

    out = {}
    for n in counts:
        sub = batches[: max(1, n // 32)]
        tt: dict[str, float] = {}
        with timed(tt, "fisher"):
            f = compute_fisher(model, adapter, sub, progress=False)
        r = prune_masks(model, adapter, sub, cost, 0.5, PruneOptions(), fisher=f,
                        progress=False)
        out[str(n)] = {"fisher": tt["fisher"], "tune": r.timings.get("tune", 0.0),
                       "total": tt["fisher"] + sum(r.timings.values())}
    t = main["timings"]
    out[str(samples)] = {"fisher": t["fisher"], "tune": t["tune"], "total": t["total"]}
    return out


def family_bench(quick: bool) -> dict:
    """The command line on the demo task, timed end to end: 1 single run, 4 single runs and
    one family run of the same 4 constraints (every Fisher pass computed, none cached); once
    as run by default (timing the latency of every model, 5 s each) and once without
    (``latency.enabled=false``), which leaves the cost of pruning alone."""
    constraints = [0.4, 0.5, 0.6, 0.7]
    extra = ["prune.fisher_cache_dir=null", "progress=false", "save_model=true"]
    if quick:
        extra += ["prune.num_samples=256", "eval.max_samples=256", "latency.min_run_time=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}

    def timed_run(constraint: str, options: list[str]) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            res = subprocess.run([sys.executable, "run.py", "model=minilm", "task=sst2",
                                  f"constraint={constraint}", f"hydra.run.dir={tmp}", *extra,
                                  *options], cwd=ROOT, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"bench run failed:\n{res.stderr[-3000:]}")
            return time.perf_counter() - start

    out = {"constraints": constraints, "variants": {}}
    for name, options in (("latency timed", []), ("latency off", ["latency.enabled=false"])):
        singles = [timed_run(str(c), options) for c in constraints]
        family = timed_run("[" + ",".join(str(c) for c in constraints) + "]", options)
        out["variants"][name] = {
            "single_runs": singles, "one_run": singles[0], "four_runs": sum(singles),
            "family": family, "family_over_one_run": family / singles[0],
            "family_over_four_runs": family / sum(singles)}
    return out


def table(results: list[dict], family: dict | None) -> str:
    lines = [] if not results else model_tables(results)
    if family:
        lines += ["", "| demo (MiniLM, SST-2), whole command | latency | seconds | "
                  "ratio to one run |", "|---|---|---|---|"]
        for name, f in family["variants"].items():
            lines += [f"| one single run (constraint 0.4) | {name} | {f['one_run']:.1f} | 1.00 |",
                      f"| four single runs (0.4/0.5/0.6/0.7) | {name} | {f['four_runs']:.1f} | "
                      f"{f['four_runs'] / f['one_run']:.2f} |",
                      f"| one family run of the same four | {name} | {f['family']:.1f} | "
                      f"{f['family_over_one_run']:.2f} |"]
    return "\n".join(lines).strip() + "\n"


def model_tables(results: list[dict]) -> list[str]:
    lines = ["| model | weights | samples | tuning | floor s | Fisher s | search s | "
             "rearrange s | tune s | physical s | total s | total/floor | at 2,048 "
             "(projected) | peak RSS GB |", "|" + "---|" * 14]
    for r in results:
        for mode, m in r["modes"].items():
            t = m["timings"]
            proj = f"{m['ratio_2048']:.2f}" if m.get("ratio_2048") else "(measured)"
            lines.append(
                f"| {r['model']} | {r['origin']} | {r['samples']} | {mode} | {r['floor']:.1f} "
                f"| {t['fisher']:.1f} | {t['search']:.3f} | {t['rearrange']:.2f} | "
                f"{t['tune']:.1f} | {t['physical']:.2f} | {t['total']:.1f} | "
                f"{m['ratio_to_floor']:.2f} | {proj} | {r['peak_rss_gb']:.2f} |")
    lines += ["", "| model | constraint | FLOPs kept | latency base ms | latency pruned ms | "
              "speedup | throughput base/s | throughput pruned/s |", "|" + "---|" * 8]
    for r in results:
        for c, run in r["constraints"].items():
            lat = run["latency"]
            lines.append(
                f"| {r['model']} | {c} | {run['flops_ratio']:.3f} | "
                f"{1e3 * lat['baseline']['median']:.0f} | {1e3 * lat['pruned']['median']:.0f} | "
                f"{lat['speedup']:.2f}x | {run['throughput']['baseline']:.1f} | "
                f"{run['throughput']['pruned']:.1f} |")
    lines += ["", "| model | samples | Fisher s | tune s | total s | total per sample ms |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for n, s in sorted(r["scaling"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {r['model']} | {n} | {s['fisher']:.1f} | {s['tune']:.1f} | "
                         f"{s['total']:.1f} | {1e3 * s['total'] / int(n):.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="pruning-time and speed benchmark")
    parser.add_argument("--quick", action="store_true", help="small sample sets (a smoke run)")
    parser.add_argument("--full", action="store_true",
                        help="every model with 2,048 samples (BERT-base: about an hour here)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-family", action="store_true", help="skip the family timing")
    parser.add_argument("--family-only", action="store_true",
                        help="only the family timing (no per-model part)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print JSON
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench"))
    args = parser.parse_args()
    if args.family_only and args.no_family:
        sys.exit("--family-only and --no-family leave nothing to run; drop one")
    scale = 8 if args.quick else 1
    min_run_time = 0.5 if args.quick else 5.0
    if args.one:
        samples = 2048 if args.full else MODELS[args.one]["samples"]
        samples = max(32, samples // scale)
        counts = [n // scale for n in (512, 1024)] if args.one == "minilm" else []
        print("BENCH-JSON " + json.dumps(bench_model(
            args.one, samples, 128, [0.4, 0.5, 0.6], [c for c in counts if c >= 32],
            min_run_time)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench" + ("-full" if args.full else "") + ("-quick" if args.quick else "")
    models = [] if args.family_only else args.models
    if args.family_only:
        stem += "-family"
    elif sorted(models) != sorted(MODELS):  # a subset does not overwrite the whole-bench file
        stem += "-" + "-".join(models)

    def write(results: list[dict], family: dict | None) -> None:
        """Written (atomically) after every part, so that a later failure keeps what has
        finished."""
        from experiments.records import write_atomic, write_json_atomic

        write_json_atomic(out / f"{stem}.json", {"models": results, "family": family})
        text = table(results, family)
        write_atomic(out / f"{stem}.md", lambda tmp: tmp.write_text(text))

    results = []
    for name in models:  # one process per model: peak memory is per model
        cmd = [sys.executable, "-m", "experiments.bench", "--one", name]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--full"] if args.full else []
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, cwd=ROOT)
        line = [l for l in res.stdout.splitlines() if l.startswith("BENCH-JSON ")]
        if res.returncode != 0 or not line:
            sys.exit(f"bench of {name} failed (finished parts are in {out / stem}.md):\n"
                     f"{res.stderr[-3000:]}")
        note = "" if args.full else MODELS[name].get("note", "")
        results.append({**json.loads(line[0][len("BENCH-JSON "):]), "note": note})
        write(results, None)
        print(f"{name}: done", flush=True)
    family = None if args.no_family else family_bench(args.quick)
    write(results, family)
    print(table(results, family))
    for r in results:
        if r.get("note"):
            print(f"note: {r['model']}: {r['note']}")


if __name__ == "__main__":
    main()
