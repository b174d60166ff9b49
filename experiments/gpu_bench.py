"""`python -m experiments.gpu_bench`: the library on the machine users deploy on (issue 22).

One command, sized to finish in under 8 minutes on one GPU (``cuda`` when there is one, else
``cpu``; ``--quick`` runs tiny shapes, a smoke test of a minute at most on a CPU):

(a) pruning time, BERT-base shape (``BertConfig()`` defaults, random weights: timing does not
    depend on them), 2,048 random samples of 128 tokens: the floor (one forward + backward pass
    over the samples with frozen weights, what the Fisher pass cannot avoid), then Fisher,
    search, rearrangement, tuning (``mask``, the paper, and ``weights``) and physical pruning,
    their total and total / floor;
(b) latency of the pruned BERT-base at FLOPs 0.4 / 0.5 / 0.6, in every dtype of
    ``prune.latency.DTYPES`` at batch 32 and 256 x 128 tokens, with FFN widths aligned
    (granularity 8, the default) and not (granularity 1), as speedups over the unpruned model
    in the same dtype;
(c) the latency lookup table and latency-constrained search in bfloat16 at batch 256: asked
    0.4 / 0.5 / 0.6 / 0.7 of the unpruned model's latency, predicted and measured ratio;
(d) with ``--checkpoint DIR`` (a fine-tuned SST-2 classifier, e.g. the demo MiniLM or MPNet)
    and the local SST-2 ``--dev`` file (samples from ``train.tsv`` beside it): pruning time and
    dev accuracy at FLOPs 0.5.

It imports only the library, torch, transformers, numpy and the standard library (the GPU
machine has no Hydra, W&B, datasets or pandas). Stage times synchronise CUDA; latencies use
``torch.utils.benchmark`` through ``prune.latency.measure_latency``. Everything goes to
``<out>/gpu-bench.json`` (``gpu-bench-quick.json`` with ``--quick``), rewritten after each
part, and a markdown table to ``.md`` beside it and to stdout.

    python -m experiments.gpu_bench [--quick] [--out DIR] [--checkpoint DIR [--dev FILE]]
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import transformers

from prune import PruneOptions, TuneOptions, flops_cost, get_adapter, prune_masks, prune_model
from prune.errors import PruneError
from prune.fisher import compute_fisher
from prune.latency import (
    DTYPES,
    build_latency_table,
    cast_model,
    compare_latency,
    latency_cost,
    measure_latency,
)
from prune.runtime import device_name, eval_mode, to_device, without_labels

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEV = ROOT.parent / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"


@dataclass(frozen=True)
class Settings:
    """The sizes of one bench run; ``QUICK`` shrinks every one of them."""

    samples: int = 2048
    seq_len: int = 128
    sample_batch: int = 32
    batch_sizes: tuple[int, ...] = (32, 256)
    constraints: tuple[float, ...] = (0.4, 0.5, 0.6)
    granularities: tuple[int, ...] = (8, 1)
    min_run_time: float = 0.5  # seconds per latency measurement
    table_dtype: str = "bfloat16"
    table_batch: int = 256
    table_points: int = 8
    table_min_run_time: float = 0.3
    latency_budgets: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)
    dev_rows: int | None = None  # (d): every dev sentence
    config: dict = field(default_factory=dict)  # BertConfig overrides (none: BERT-base)


QUICK = Settings(samples=64, seq_len=32, batch_sizes=(2, 8), min_run_time=0.02,
                 table_batch=8, table_points=3, table_min_run_time=0.01, dev_rows=64,
                 config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=256, vocab_size=1200,
                             max_position_embeddings=64))


class Clock:
    """Progress lines with the time since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stage(timings: dict, key: str, device: torch.device) -> Iterator[None]:
    """Wall time of the block into ``timings[key]``, CUDA synchronised at both ends."""
    sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def machine(device: torch.device) -> dict:
    name = device_name(device)
    return {"device": device.type, "name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def bert_model(s: Settings, device: torch.device):
    torch.manual_seed(0)
    config = transformers.BertConfig(num_labels=2, **s.config)
    return transformers.BertForSequenceClassification(config).eval().to(device)


def random_batches(vocab: int, s: Settings, seed: int = 0) -> list[dict]:
    """``s.samples`` random sequences of ``s.seq_len`` tokens with labels, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, s.samples, s.sample_batch):
        n = min(s.sample_batch, s.samples - start)
        out.append({"input_ids": torch.randint(min(1000, vocab - 1), vocab, (n, s.seq_len),
                                               generator=g),
                    "attention_mask": torch.ones(n, s.seq_len, dtype=torch.long),
                    "labels": torch.randint(0, 2, (n,), generator=g)})
    return out


def floor_pass(model, batches: list[dict], device: torch.device) -> None:
    """Forward + backward over the batches, weights frozen, gradient w.r.t. the embeddings."""
    handle = model.base_model.embeddings.register_forward_hook(
        lambda module, args, out: out.requires_grad_(True))
    try:
        with eval_mode(model, freeze=True):
            for b in batches:
                model(**to_device(b, device)).loss.backward()
    finally:
        handle.remove()


def pruning_section(model, adapter, batches, s: Settings, device, clock: Clock) -> tuple:
    """(a): the floor and every stage's time at FLOPs 0.5 for tuning ``mask`` and ``weights``;
    returns the section and the Fisher information, for the later parts."""
    floor_pass(model, batches[:1], device)  # warm-up: CUDA context, kernels, allocator
    t: dict[str, float] = {}
    with stage(t, "floor", device):
        floor_pass(model, batches, device)
    clock.say(f"floor {t['floor']:.2f} s")
    with stage(t, "fisher", device):
        fisher = compute_fisher(model, adapter, batches, progress=False)
    clock.say(f"Fisher {t['fisher']:.2f} s")
    cost = flops_cost(adapter, s.seq_len)
    modes = {}
    for mode in ("mask", "weights"):
        wall: dict[str, float] = {}
        with stage(wall, "prune_masks", device):
            opts = PruneOptions(tune=TuneOptions(mode=mode))
            result = prune_masks(model, adapter, batches, cost, 0.5, opts, fisher=fisher,
                                 progress=False)
        timings = {k: v for k, v in result.timings.items() if k != "fisher"}
        timings["fisher"] = t["fisher"]
        small = copy.deepcopy(model)
        with stage(timings, "physical", device):
            prune_model(small, result.masks, adapter, result.weights)
        del small
        timings["total"] = sum(timings.get(k, 0.0) for k in
                               ("fisher", "search", "rearrange", "tune", "physical"))
        modes[mode] = {"timings": timings, "prune_masks_wall": wall["prune_masks"],
                       "total_over_floor": timings["total"] / t["floor"],
                       "flops_ratio": cost.ratio(result.masks.heads_per_layer(),
                                                 result.masks.neurons_per_layer())}
        clock.say(f"tune={mode}: total {timings['total']:.2f} s, "
                  f"{modes[mode]['total_over_floor']:.2f}x the floor")
    return {"samples": s.samples, "seq_len": s.seq_len, "floor": t["floor"],
            "fisher": t["fisher"], "modes": modes}, fisher


def pruned_models(model, adapter, batches, fisher, s: Settings, clock: Clock) -> dict:
    """(granularity, constraint) -> (the pruned model, its FLOPs ratio, its FFN widths)."""
    cost = flops_cost(adapter, s.seq_len)
    out = {}
    for g in s.granularities:
        for c in s.constraints:
            result = prune_masks(model, adapter, batches, cost, c, PruneOptions(granularity=g),
                                 fisher=fisher, progress=False)
            small = prune_model(copy.deepcopy(model), result.masks, adapter, result.weights)
            heads, neurons = adapter.heads_per_layer(small), adapter.neurons_per_layer(small)
            out[(g, c)] = (small, cost.ratio(heads, neurons), neurons)
    clock.say(f"{len(out)} pruned models (granularity {s.granularities}, FLOPs {s.constraints})")
    return out


def latency_section(model, pruned: dict, s: Settings, clock: Clock) -> list[dict]:
    """(b): one row per dtype, batch size, granularity and constraint: the speedup over the
    unpruned model timed in the same dtype, just before."""
    rows = []
    for dtype in DTYPES:
        base = cast_model(model, dtype)  # cast once, not at every measurement
        smalls = {k: cast_model(m, dtype) for k, (m, _, _) in pruned.items()}
        for batch in s.batch_sizes:
            ref = measure_latency(base, batch, s.seq_len, s.min_run_time, dtype)
            for (g, c), small in smalls.items():
                lat = measure_latency(small, batch, s.seq_len, s.min_run_time, dtype)
                cmp = compare_latency(ref, lat)
                flops, neurons = pruned[(g, c)][1], pruned[(g, c)][2]
                rows.append({"dtype": dtype, "batch_size": batch, "granularity": g,
                             "constraint": c, "flops_ratio": flops,
                             "aligned": all(n % 8 == 0 for n in neurons),
                             "baseline_ms": 1e3 * ref.median, "pruned_ms": 1e3 * lat.median,
                             "speedup": cmp["speedup"], "spread": cmp["spread"],
                             "noisy": cmp["noisy"]})
            best = max(r["speedup"] for r in rows[-len(smalls):])
            clock.say(f"latency {dtype} batch {batch}: unpruned {1e3 * ref.median:.1f} ms, "
                      f"best speedup {best:.2f}x")
        del base, smalls
        empty_cache()
    return rows


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def latency_search_section(model, adapter, batches, fisher, s: Settings,
                           clock: Clock) -> dict:
    """(c): the lookup table in ``s.table_dtype`` at batch ``s.table_batch``, then the latency
    search at each budget: predicted and measured latency ratio."""
    dtype, batch = s.table_dtype, s.table_batch
    t: dict[str, float] = {}
    device = next(model.parameters()).device
    with stage(t, "table", device):
        table = build_latency_table(model, adapter, batch, s.seq_len, s.table_points,
                                    s.table_min_run_time, dtype)
    clock.say(f"latency table ({dtype}, batch {batch}) in {t['table']:.1f} s, "
              f"noise: {table.noise_reason()}")
    cost, flops = latency_cost(table), flops_cost(adapter, s.seq_len)
    ref = measure_latency(model, batch, s.seq_len, s.min_run_time, dtype)
    runs = []
    for asked in s.latency_budgets:
        try:
            result = prune_masks(model, adapter, batches, cost, asked, PruneOptions(),
                                 fisher=fisher, progress=False)
            small = prune_model(copy.deepcopy(model), result.masks, adapter, result.weights)
        except PruneError as err:  # a budget the table cannot meet: said, not fatal
            runs.append({"asked": asked, "error": str(err)})
            clock.say(f"latency search {asked}: {err}")
            continue
        heads, neurons = adapter.heads_per_layer(small), adapter.neurons_per_layer(small)
        cmp = compare_latency(ref, measure_latency(small, batch, s.seq_len, s.min_run_time,
                                                   dtype))
        runs.append({"asked": asked, "predicted": cost.ratio(heads, neurons),
                     "measured": cmp["ratio"], "speedup": cmp["speedup"],
                     "flops_ratio": flops.ratio(heads, neurons), "noisy": cmp["noisy"]})
        del small
        clock.say(f"latency search {asked}: predicted {runs[-1]['predicted']:.3f}, "
                  f"measured {cmp['ratio']:.3f}")
    return {"dtype": dtype, "batch_size": batch, "seq_len": s.seq_len,
            "table_seconds": t["table"], "noise_reason": table.noise_reason(),
            "table": table.to_dict(), "runs": runs}


def read_sst2(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) rows of a GLUE SST-2 TSV (header ``sentence<TAB>label``)."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    col = {name: i for i, name in enumerate(rows[0])}
    if "sentence" not in col or "label" not in col:
        sys.exit(f"{path}: expected the SST-2 columns sentence and label, found {rows[0]}")
    return [(r[col["sentence"]], int(r[col["label"]])) for r in rows[1:] if r]


def encode(tokenizer, rows, batch: int, max_length: int) -> list[dict]:
    out = []
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        enc = tokenizer([t for t, _ in part], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        out.append({**enc, "labels": torch.tensor([y for _, y in part])})
    return out


def accuracy(model, batches: list[dict], device: torch.device) -> float:
    right = total = 0
    with torch.inference_mode(), eval_mode(model):
        for b in batches:
            logits = model(**without_labels(to_device(b, device))).logits
            right += int((logits.argmax(-1).cpu() == b["labels"]).sum())
            total += len(b["labels"])
    return right / total


def checkpoint_section(path: Path, dev: Path, train: Path, s: Settings, device: torch.device,
                       clock: Clock) -> dict:
    """(d): prune a fine-tuned SST-2 classifier to FLOPs 0.5 on ``s.samples`` sentences drawn
    (seeded, without replacement) from ``train``; dev accuracy before and after."""
    for p in (path, dev, train):
        if not Path(p).exists():
            sys.exit(f"--checkpoint part: {p} does not exist (pass --checkpoint DIR and --dev "
                     f"FILE, with train.tsv beside it)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32)  # a checkpoint saved in half precision too
    model = model.eval().to(device)
    adapter = get_adapter(model)
    rows = read_sst2(train)
    pick = np.random.default_rng(0).choice(len(rows), min(s.samples, len(rows)), replace=False)
    samples = encode(tokenizer, [rows[i] for i in pick], s.sample_batch, 128)
    dev_batches = encode(tokenizer, read_sst2(dev)[: s.dev_rows], 64, 128)
    mean_len = float(np.mean([int(n) for b in dev_batches
                              for n in b["attention_mask"].sum(1)]))
    cost = flops_cost(adapter, mean_len)
    before = accuracy(model, dev_batches, device)
    wall: dict[str, float] = {}
    with stage(wall, "prune_masks", device):
        result = prune_masks(model, adapter, samples, cost, 0.5, PruneOptions(), progress=False)
    timings = dict(result.timings)
    with stage(timings, "physical", device):
        prune_model(model, result.masks, adapter, result.weights)
    timings["total"] = sum(timings.get(k, 0.0) for k in
                           ("fisher", "search", "rearrange", "tune", "physical"))
    after = accuracy(model, dev_batches, device)
    clock.say(f"checkpoint {model.config.model_type}: accuracy {before:.4f} -> {after:.4f} at "
              f"FLOPs 0.5, pruned in {timings['total']:.2f} s")
    return {"checkpoint": str(path), "model_type": model.config.model_type, "dev": str(dev),
            "dev_sentences": sum(len(b["labels"]) for b in dev_batches),
            "samples": len(pick), "seq_len": mean_len, "constraint": 0.5,
            "flops_ratio": cost.ratio(adapter.heads_per_layer(model),
                                      adapter.neurons_per_layer(model)),
            "accuracy": {"unpruned": before, "pruned": after}, "timings": timings,
            "prune_masks_wall": wall["prune_masks"]}


def markdown(result: dict) -> str:
    """The results as markdown tables, one per part that has run."""
    m = result["machine"]
    lines = [f"GPU bench on {m['name']} ({m['device']}), torch {m['torch']}, transformers "
             f"{m['transformers']}{', quick' if result['quick'] else ''}", ""]
    if "pruning" in result:
        p = result["pruning"]
        lines += [f"(a) pruning time, {p['samples']} samples x {p['seq_len']} tokens, FLOPs 0.5",
                  "", "| tuning | floor s | Fisher s | search s | rearrange s | tune s | "
                  "physical s | total s | total/floor |", "|" + "---|" * 9]
        for mode, r in p["modes"].items():
            t = r["timings"]
            lines.append(f"| {mode} | {p['floor']:.2f} | {t['fisher']:.2f} | "
                         f"{t.get('search', 0):.3f} | {t.get('rearrange', 0):.3f} | "
                         f"{t.get('tune', 0):.2f} | {t['physical']:.3f} | {t['total']:.2f} | "
                         f"{r['total_over_floor']:.2f} |")
    if "latency" in result:
        lines += ["", "(b) speedup over the unpruned model in the same dtype (granularity 8: "
                  "aligned FFN widths; 1: any width)", "",
                  "| dtype | batch | FLOPs asked | unpruned ms | g8 ms | g8 speedup | "
                  "g1 speedup | g8 / g1 time |", "|" + "---|" * 8]
        by = {(r["dtype"], r["batch_size"], r["constraint"], r["granularity"]): r
              for r in result["latency"]}
        for (dtype, batch, c, g), r in by.items():
            other = by.get((dtype, batch, c, 1))
            if g != 8 or other is None:
                continue
            noisy = " (noisy)" if r["noisy"] or other["noisy"] else ""
            lines.append(f"| {dtype} | {batch} | {c} | {r['baseline_ms']:.2f} | "
                         f"{r['pruned_ms']:.2f} | {r['speedup']:.2f}x | {other['speedup']:.2f}x"
                         f" | {r['pruned_ms'] / other['pruned_ms']:.3f}{noisy} |")
    if "latency_search" in result:
        ls = result["latency_search"]
        lines += ["", f"(c) latency search, {ls['dtype']}, batch {ls['batch_size']} (table "
                  f"{ls['table_seconds']:.1f} s; noise: {ls['noise_reason']})", "",
                  "| asked | predicted | measured | FLOPs kept | speedup |", "|" + "---|" * 5]
        for r in ls["runs"]:
            lines.append(f"| {r['asked']} | " + (
                f"{r['predicted']:.3f} | {r['measured']:.3f} | {r['flops_ratio']:.3f} | "
                f"{r['speedup']:.2f}x |" if "error" not in r else f"{r['error']} | | | |"))
    if result.get("checkpoint"):
        c = result["checkpoint"]
        lines += ["", f"(d) {c['model_type']} checkpoint at FLOPs 0.5, {c['samples']} samples",
                  "", "| accuracy unpruned | accuracy pruned | Fisher s | tune s | total s |",
                  "|---|---|---|---|---|",
                  f"| {c['accuracy']['unpruned']:.4f} | {c['accuracy']['pruned']:.4f} | "
                  f"{c['timings']['fisher']:.2f} | {c['timings'].get('tune', 0):.2f} | "
                  f"{c['timings']['total']:.2f} |"]
    lines += ["", f"elapsed {result.get('elapsed', 0):.0f} s"]
    return "\n".join(lines) + "\n"


def write(out: Path, stem: str, result: dict) -> None:
    """The JSON and the markdown, each replaced atomically (a later failure keeps what has
    finished)."""
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        path = out / f"{stem}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="the library's pruning time and the pruned "
                                     "models' speed on a GPU, in every dtype")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu-bench"))
    parser.add_argument("--checkpoint", help="a fine-tuned SST-2 classifier directory: (d)")
    parser.add_argument("--dev", default=str(DEFAULT_DEV), help="the SST-2 dev.tsv")
    parser.add_argument("--train", help="the SST-2 train.tsv (default: beside --dev)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    s = QUICK if args.quick else Settings()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-bench" + ("-quick" if args.quick else "")
    clock = Clock()
    result: dict = {"machine": machine(device), "quick": args.quick, "settings": asdict(s)}
    clock.say(f"{result['machine']['name']} ({device.type}), torch {torch.__version__}")
    model = bert_model(s, device)
    adapter = get_adapter(model)
    batches = random_batches(model.config.vocab_size, s)
    result["pruning"], fisher = pruning_section(model, adapter, batches, s, device, clock)
    write(out, stem, {**result, "elapsed": clock.elapsed()})
    pruned = pruned_models(model, adapter, batches, fisher, s, clock)
    result["latency"] = latency_section(model, pruned, s, clock)
    del pruned
    empty_cache()
    write(out, stem, {**result, "elapsed": clock.elapsed()})
    result["latency_search"] = latency_search_section(model, adapter, batches, fisher, s, clock)
    del model
    empty_cache()
    result["checkpoint"] = None
    if args.checkpoint:
        dev = Path(args.dev)
        train = Path(args.train) if args.train else dev.with_name("train.tsv")
        result["checkpoint"] = checkpoint_section(Path(args.checkpoint), dev, train, s, device,
                                                  clock)
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["elapsed"] = clock.elapsed()
    write(out, stem, result)
    print(markdown(result), flush=True)
    clock.say(f"wrote {out / stem}.json")
    return result


if __name__ == "__main__":
    main()
