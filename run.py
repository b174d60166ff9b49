"""Hydra entry point: prune a fine-tuned model on a task under a FLOPs constraint.

    python run.py model=minilm task=sst2 constraint=0.6

Writes ``results.json`` (and the pruned model) into the run directory and prints a summary.
All the work is done by the ``prune`` library; this file only wires the config to it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("FASTPRUNE_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from tracking import tracker  # noqa: E402

log = logging.getLogger("fastprune")


def task_spec(task_cfg: DictConfig):
    from prune.data import TaskSpec

    fields = OmegaConf.to_container(task_cfg, resolve=True)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return TaskSpec(**fields)


def resolve_checkpoint(cfg: DictConfig, spec, device: str) -> str:
    """The fine-tuned checkpoint to prune: model.path, a per-task hub id, or the cached
    fine-tuning of ``model.pretrained`` (done now if missing)."""
    from prune.errors import PruneError
    from prune.finetune import FinetuneConfig, finetune
    from prune.models import resolve_path

    m = cfg.model
    if m.path:
        return str(m.path)
    if m.checkpoints and spec.name in m.checkpoints:
        return str(m.checkpoints[spec.name])
    if not (m.pretrained and m.finetune):
        raise PruneError(f"model {m.name} has no checkpoint for task {spec.name}; "
                         f"pass model.path=/path/to/finetuned/checkpoint")
    ft = FinetuneConfig(**OmegaConf.to_container(m.finetune, resolve=True))
    out = Path(cfg.paths.cache_dir) / "models" / f"{m.name}-{spec.name}"
    info = out / "finetune.json"
    if info.exists() and json.loads(info.read_text()).get("config") == ft.__dict__:
        log.info("using cached fine-tuned %s (%s)", out, json.loads(info.read_text())["dev"])
        return str(out)
    base = resolve_path(m.pretrained)
    log.info("fine-tuning %s on %s once (cached in %s)", m.pretrained, spec.name, out)
    return str(finetune(base, spec, out, ft, device=device, progress=cfg.progress))


def run(cfg: DictConfig, out_dir: str | Path | None = None) -> dict:
    """One pruning run; returns the record also written to ``out_dir/results.json``
    (default: the Hydra run directory)."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    from prune import PruneOptions, flops_cost, get_adapter, prune_masks, prune_model, save_pruned
    from prune.cache import cached_fisher, checkpoint_fingerprint, fisher_key
    from prune.data import check_data
    from prune.errors import PruneError
    from prune.fisher import autocast_dtype, compute_fisher
    from prune.latency import cached_latency_table, compare_latency, measure_latency
    from prune.metrics import main_metric
    from prune.models import check_labels, load_config, load_model, pick_device
    from prune.pipeline import timed
    from prune.results import git_commit, versions, write_json_atomic
    from prune.tasks import build_task_data, evaluate_task

    if out_dir is None:
        out_dir = HydraConfig.get().runtime.output_dir
    out_dir = Path(out_dir)
    done = out_dir / "results.json"
    if done.exists() and not cfg.force:
        previous = json.loads(done.read_text())
        changed = config_changes(previous.get("config", {}),
                                 OmegaConf.to_container(cfg, resolve=True))
        if not changed:
            log.info("skipping: %s exists (force=true re-runs)", done)
            return previous
        kept = done.with_name(f"results.stale-{int(done.stat().st_mtime)}.json")
        os.replace(done, kept)
        log.warning("re-running: %s was made with another configuration (%s); kept as %s",
                    done, ", ".join(changed[:8]), kept.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    # cheap checks first: nothing heavy runs before the input is known to be usable
    opts = PruneOptions(
        constraint=cfg.constraint, rearrange=cfg.prune.rearrange,
        rearrange_sweeps=cfg.prune.rearrange_sweeps, tune=cfg.prune.tune,
        tune_teacher=cfg.prune.tune_teacher, tune_damp=cfg.prune.tune_damp,
        tune_max_scale=cfg.prune.tune_max_scale, tune_samples=cfg.prune.tune_samples,
        cls_only_last=cfg.task.kind != "qa",
    )
    if cfg.constraint_kind not in ("flops", "latency"):
        raise PruneError(f"constraint_kind={cfg.constraint_kind!r}: use flops or latency")
    spec = task_spec(cfg.task)
    check_data(spec)
    device = pick_device(cfg.device)
    amp = autocast_dtype(device, cfg.prune.amp)  # None (float32) unless CUDA with bfloat16
    checkpoint = resolve_checkpoint(cfg, spec, device)
    check_labels(load_config(checkpoint), spec, checkpoint)

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(checkpoint, kind=spec.kind, device=device)
    adapter = get_adapter(model)
    data = build_task_data(
        spec, tokenizer, cfg.prune.num_samples, cfg.seed, cfg.prune.sample_with_replacement,
        cfg.prune.batch_size, cfg.eval.batch_size, cfg.eval.max_samples,
        max_length=min(spec.max_seq_length, model.config.max_position_embeddings))
    main_eval = data.eval_sets["eval"]
    seq_len = float(cfg.prune.seq_len or main_eval.mean_length)
    flops = flops_cost(adapter, seq_len)
    sample_batches = data.sample_batches

    timings: dict[str, float] = {}
    with timed(timings, "eval_baseline"):
        baseline = evaluate_task(model, data, spec, cfg.progress)
    params_before = sum(p.numel() for p in model.parameters())
    lat = cfg.latency
    cost = flops
    if cfg.constraint_kind == "latency":
        with timed(timings, "latency_table"):
            cost = cached_latency_table(model, adapter, Path(cfg.paths.cache_dir) / "latency",
                                        lat.batch_size, lat.seq_len, points=lat.table_points,
                                        warmup=lat.warmup, repeats=lat.repeats)
    latency_before = measure_latency(model, lat.batch_size, lat.seq_len, lat.warmup,
                                     lat.repeats) if lat.enabled else None
    key = fisher_key(model=checkpoint_fingerprint(checkpoint), task=spec.name, seed=cfg.seed,
                     num_samples=cfg.prune.num_samples, batch_size=cfg.prune.batch_size,
                     replace=cfg.prune.sample_with_replacement, max_length=data.max_length,
                     **({"amp": str(amp)} if amp is not None else {}))
    fisher_timing: dict[str, float] = {}
    with timed(fisher_timing, "fisher"):
        fisher, hit = cached_fisher(cfg.prune.fisher_cache_dir, key, lambda: compute_fisher(
            model, adapter, sample_batches, cfg.progress, amp=cfg.prune.amp))
    result = prune_masks(model, adapter, sample_batches, cost, opts, fisher=fisher,
                         progress=cfg.progress)
    timings.update(result.timings)
    timings["fisher"] = fisher_timing["fisher"]
    with timed(timings, "physical"):
        prune_model(model, result.masks, adapter)
    with timed(timings, "eval_pruned"):
        pruned = evaluate_task(model, data, spec, cfg.progress)
    latency = None
    if lat.enabled:
        after = measure_latency(model, lat.batch_size, lat.seq_len, lat.warmup, lat.repeats)
        latency = {**compare_latency(latency_before, after), "batch_size": lat.batch_size,
                   "seq_len": lat.seq_len, "device": device}
        if cfg.constraint_kind == "latency":
            latency["predicted_ratio"] = cost.predict(
                adapter.heads_per_layer(model), adapter.neurons_per_layer(model)) / cost.predict(
                [adapter.num_heads] * adapter.num_layers,
                [adapter.intermediate_size] * adapter.num_layers)
    timings["pruning_total"] = sum(timings.get(k, 0.0) for k in
                                   ("fisher", "search", "rearrange", "tune", "physical"))
    flops_before = 2 * flops.full_macs
    flops_after = flops.flops(adapter.heads_per_layer(model), adapter.neurons_per_layer(model))
    key = main_metric(spec.metric)
    record = {
        "model": cfg.model.name, "task": spec.name, "checkpoint": checkpoint,
        "constraint": opts.constraint, "constraint_kind": cfg.constraint_kind,
        "seed": cfg.seed, "device": device,
        "num_samples": data.num_samples, "num_eval": main_eval.size, "seq_len": seq_len,
        "metric": key, "baseline": baseline, "pruned": pruned,
        "drop": 100.0 * (baseline[key] - pruned[key]),
        "flops": {"baseline": flops_before, "pruned": flops_after,
                  "ratio": flops_after / flops_before},
        "latency": latency,
        "params": {"baseline": params_before,
                   "pruned": sum(p.numel() for p in model.parameters())},
        "fisher_cache": {"key": key, "hit": hit},
        "timings": timings, "masks": result.masks.summary(),
        "tune": result.tune_stats.as_dict() if result.tune_stats else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git_commit(os.environ["FASTPRUNE_ROOT"]), "versions": versions(),
    }
    torch.save({"final": result.masks.state_dict(), "searched": result.searched.state_dict()},
               out_dir / "masks.pt")
    if cfg.save_model:
        save_pruned(model, out_dir / "pruned_model", tokenizer)
    with tracker(cfg, out_dir) as logger:
        logger.log(record)
    write_json_atomic(out_dir / "results.json", record)
    log.info("\n%s", summary_table(record))
    log.info("results: %s", out_dir / "results.json")
    return record


# Settings that do not change a run's result: where files live, how it reports, re-run flags.
NEUTRAL_KEYS = ("paths", "force", "progress", "save_model", "sweep_name", "device", "logger",
                "prune.fisher_cache_dir", "task.local_dir")


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs, ignoring ``NEUTRAL_KEYS``."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in NEUTRAL_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def summary_table(r: dict) -> str:
    key, t = r["metric"], r["timings"]
    rows = [
        ("model / task", f"{r['model']} / {r['task']}  (constraint {r['constraint']})"),
        (f"{key} baseline", f"{100 * r['baseline'][key]:.2f}"),
        (f"{key} pruned", f"{100 * r['pruned'][key]:.2f}  (drop {r['drop']:+.2f} points)"),
        *((f"{k} base/pruned", f"{100 * r['baseline'][k]:.2f} / {100 * r['pruned'][k]:.2f}")
          for k in r["baseline"] if "/" in k and k.endswith("/" + key)),
        ("FLOPs kept", f"{r['flops']['ratio']:.3f}  ({r['flops']['pruned'] / 1e9:.3f} / "
                       f"{r['flops']['baseline'] / 1e9:.3f} GFLOPs at seq {r['seq_len']:.1f})"),
        *((("latency (ms)", f"{1e3 * r['latency']['baseline']['median']:.1f} -> "
                              f"{1e3 * r['latency']['pruned']['median']:.1f}  (ratio "
                              f"{r['latency']['ratio']:.3f}, batch {r['latency']['batch_size']} "
                              f"x seq {r['latency']['seq_len']})"),) if r.get("latency") else ()),
        ("heads / neurons kept", f"{r['masks']['heads_kept']}/{r['masks']['heads_total']}, "
                                 f"{r['masks']['neurons_kept']}/{r['masks']['neurons_total']}"),
        ("time (s)", "  ".join(f"{k} {t[k]:.1f}" for k in
                               ("fisher", "search", "rearrange", "tune", "physical",
                                "pruning_total", "eval_baseline", "eval_pruned") if k in t)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from prune.errors import PruneError

    try:
        run(cfg)
    except PruneError as err:
        log.error("error: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
