"""The stages of one pruning run, called in order by ``run.py``.

``prepare`` checks everything that needs no weights (options, data, device, checkpoint,
writable run directory), decides which constraints still need work, and claims the run
directory; ``load`` builds the model and the task data; ``measure_baseline`` evaluates the
unpruned model; ``importance`` computes (or loads) the Fisher information once; ``prune_one``
then searches, rearranges, tunes and physically prunes a copy of the model for each
constraint, evaluates it and writes its record before any optional extra.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import prune
from experiments.caches import (
    cached_fisher,
    cached_latency_table,
    data_fingerprint,
    file_digest,
    weights_fingerprint,
)
from experiments.checkpoints import (
    check_head,
    check_weights,
    load_config,
    load_model,
    pick_device,
    resolve_path,
)
from experiments.config import constraints_of as validate_constraints
from experiments.config import prune_options, validate
from experiments.data import TaskSpec, check_data, read_text_samples
from experiments.errors import RunError
from experiments.finetune import FinetuneConfig, cached_finetune
from experiments.identity import (
    FISHER_FILES,
    RECORD_SCHEMA,
    code_digest,
    code_of,
    config_changes,
    key_hash,
    run_identity,
    same_identity,
    task_finetune,
)
from experiments.metrics import main_metric
from experiments.records import (
    PRUNING_STAGES,
    WRITE_ERRORS,
    Record,
    atomic_dir,
    check_writable,
    git_commit,
    versions,
    write_atomic,
    write_failure,
    write_json_atomic,
)
from experiments.tasks import TaskData, build_task_data, evaluate_task
from experiments.tracking import log_record
from prune import Fisher, PruneOptions, flops_cost, get_adapter, prune_masks, prune_model
from prune.fisher import autocast_dtype, compute_fisher
from prune.latency import compare_latency, latency_cost, measure_latency
from prune.pipeline import adaptive_fisher, pruning_state, timed

log = logging.getLogger("fastprune")

def task_spec(task_cfg) -> TaskSpec:
    fields = OmegaConf.to_container(task_cfg, resolve=True)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()
              if v is not None or k in ("label_values", "label_range", "column_names",
                                        "hub_path", "hub_name", "hub_text_columns",
                                        "official_seq_len", "local_dir")}
    return TaskSpec(**fields)


@dataclass
class Plan:
    """What a run will do, decided before any weights are loaded."""

    cfg: DictConfig
    spec: TaskSpec
    device: str
    checkpoint: str
    out_dir: Path
    identity: dict  # everything the results depend on, except the constraint
    todo: dict[float, Path]  # constraint -> its run directory, for the ones still to run
    done: dict[float, Record] = field(default_factory=dict)  # constraint -> its record
    constraints: list[float] = field(default_factory=list)

    @property
    def family(self) -> bool:
        return len(self.constraints) > 1


def run_dir(out_dir: Path, constraint: float, family: bool) -> Path:
    return out_dir / f"c{constraint:g}" if family else out_dir


def resolve_checkpoint(cfg: DictConfig, spec: TaskSpec, device: str) -> str:
    """The fine-tuned checkpoint to prune: ``model.path``, a per-task hub id, or the cached
    fine-tuning of ``model.pretrained`` (done now if missing)."""
    m = cfg.model
    if m.path:
        return resolve_path(str(m.path))
    if m.get("checkpoints") and spec.name in m.checkpoints:
        return resolve_path(str(m.checkpoints[spec.name]))
    if not (m.get("pretrained") and m.get("finetune")):
        raise RunError(f"model {m.name} has no checkpoint for task {spec.name}; "
                       f"pass model.path=/path/to/finetuned/checkpoint")
    per_task = m.get("finetune_tasks")
    settings = task_finetune(OmegaConf.to_container(m.finetune, resolve=True),
                             OmegaConf.to_container(per_task, resolve=True) if per_task else None,
                             spec.name)
    try:
        ft = FinetuneConfig(**settings)
    except TypeError as err:
        raise RunError(f"model.finetune: {err}") from None
    if m.get("fetch") and not Path(str(m.pretrained)).exists():
        raise RunError(f"the pretrained weights of model {m.name} are not in {m.pretrained}; "
                       f"run `{m.fetch}` once")
    base = resolve_path(str(m.pretrained))
    out = Path(cfg.paths.cache_dir) / "models" / f"{m.name}-{spec.name}"
    return str(cached_finetune(base, spec, out, ft, device=device, progress=cfg.progress))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def identity_of_run(cfg: DictConfig, spec: TaskSpec, checkpoint: str, device: str) -> dict:
    """This run's identity (``experiments.identity.run_identity``): settings, the digests of
    its data files and checkpoint, the device, the code."""
    data = {split: data_fingerprint(spec, split) for split in ("train", *spec.eval_splits())}
    if cfg.prune.sample_file:
        data["sample_file"] = file_digest(cfg.prune.sample_file)
    adaptive = validate_constraints(cfg.constraint) if cfg.prune.num_samples == "auto" else None
    return run_identity(OmegaConf.to_container(cfg, resolve=True), data,
                        weights_fingerprint(checkpoint), device_name(device), adaptive)


def _finished(path: Path, identity: dict, force: bool) -> Record | None:
    """The record in ``path`` if it was made with ``identity`` (code digest included); an
    older record of other settings, inputs or code is kept beside it as
    ``results.stale-<time>.json`` and the run is redone."""
    record_file = path / "results.json"
    if not record_file.exists():
        return None
    try:
        previous = json.loads(record_file.read_text())
    except (OSError, ValueError):
        previous = {}
    stored = previous.get("identity") or {}
    same = same_identity(stored, identity)
    if same and not force and previous.get("complete", True):
        try:
            record = Record.from_dict(previous)
        except (KeyError, TypeError, ValueError):
            record = None
        if record is not None:
            log.info("skipping: %s exists with the same settings (force=true re-runs)",
                     record_file)
            return record
    if not same:
        stamp, n = record_file.stat().st_mtime_ns, 0
        kept = record_file.with_name(f"results.stale-{stamp}.json")
        while kept.exists():  # never overwrite an older stale record
            n += 1
            kept = record_file.with_name(f"results.stale-{stamp}-{n}.json")
        os.replace(record_file, kept)
        changed = config_changes(stored, identity)
        if code_of(stored) != code_of(identity):
            changed = ["code"] + [c for c in changed if not c.startswith("code.")]
        log.warning("re-running: %s was made with other settings, inputs or code (%s); kept as "
                    "%s", record_file, ", ".join(changed[:8]) or "unknown", kept.name)
    return None


def prepare(cfg: DictConfig, out_dir: Path) -> Plan:
    """Validate everything that needs no weights, and decide what is left to do."""
    constraints = validate(cfg)
    spec = task_spec(cfg.task)
    check_data(spec)
    if cfg.prune.sample_file:
        read_text_samples(cfg.prune.sample_file, spec)
    device = pick_device(cfg.device)
    autocast_dtype(device, cfg.prune.amp)
    check_writable(out_dir)
    checkpoint = resolve_checkpoint(cfg, spec, device)
    check_head(load_config(checkpoint), spec, checkpoint)
    check_weights(checkpoint)
    identity = identity_of_run(cfg, spec, checkpoint, device)
    plan = Plan(cfg, spec, device, checkpoint, out_dir, identity, {}, {}, constraints)
    for c in constraints:
        path = run_dir(out_dir, c, plan.family)
        previous = _finished(path, {**identity, "constraint": c}, cfg.force)
        if previous is not None:
            plan.done[c] = previous
        else:
            plan.todo[c] = path
    return plan


def claim(out_dir: Path) -> Path | None:
    """Claim ``out_dir`` for this process (a lock file holding its host and pid); ``None`` if
    another live process holds it. A lock left by a dead process of this host is taken over;
    one of another host (a shared file system) is respected."""
    lock = out_dir / ".lock"
    me = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _holder_alive(lock):
                return None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(me)
        return lock
    return None


def _holder_alive(lock: Path) -> bool:
    try:
        host, _, pid = lock.read_text().strip().rpartition(":")
        if host and host != socket.gethostname():
            return True  # cannot see another host's processes
        os.kill(int(pid), 0)
    except PermissionError:
        return True  # alive, another user's
    except (ValueError, OSError):
        return False
    return True


def recheck(plan: Plan) -> None:
    """Move to ``plan.done`` what another process finished between ``prepare`` and ``claim``."""
    for c, path in list(plan.todo.items()):
        previous = _finished(path, {**plan.identity, "constraint": c}, plan.cfg.force)
        if previous is not None:
            plan.done[c] = previous
            del plan.todo[c]


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    adapter: prune.Adapter
    data: TaskData
    seq_len: float
    flops: prune.FlopsCost
    cost: prune.CostModel
    timings: dict[str, float] = field(default_factory=dict)


def load(plan: Plan) -> Loaded:
    cfg, spec = plan.cfg, plan.spec
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(plan.checkpoint, kind=spec.kind, device=plan.device)
    try:
        adapter = get_adapter(model)
    except prune.PruneError as err:
        raise RunError(str(err)) from None
    n = cfg.prune.num_samples
    data = build_task_data(
        spec, tokenizer, 2048 if n == "auto" else n, cfg.seed, cfg.prune.sampling,
        cfg.prune.batch_size or spec.fisher_batch_size, cfg.eval.batch_size,
        cfg.eval.max_samples,
        max_length=min(spec.max_seq_length, model.config.max_position_embeddings),
        sample_file=cfg.prune.sample_file)
    seq_len = {None: data.dev_mean_length, "official": spec.official_seq_len}.get(
        cfg.prune.seq_len, cfg.prune.seq_len)
    flops = flops_cost(adapter, float(seq_len))
    loaded = Loaded(model, tokenizer, adapter, data, float(seq_len), flops, flops)
    if cfg.constraint_kind == "latency":
        lat = cfg.latency
        with timed(loaded.timings, "latency_table"):
            table = cached_latency_table(model, adapter, Path(cfg.paths.cache_dir) / "latency",
                                         lat.batch_size, lat.seq_len, lat.table_points,
                                         lat.table_min_run_time, dtype=lat.dtype)
        loaded.cost = latency_cost(table)
    return loaded


def measure_baseline(plan: Plan, loaded: Loaded) -> dict:
    lat = plan.cfg.latency
    with timed(loaded.timings, "eval_baseline"):
        metrics = evaluate_task(loaded.model, loaded.data, plan.spec, plan.cfg.progress)
    latency = measure_latency(loaded.model, lat.batch_size, lat.seq_len, lat.min_run_time,
                              dtype=lat.dtype) if lat.enabled else None
    return {"metrics": metrics, "latency": latency,
            "params": sum(p.numel() for p in loaded.model.parameters())}


def fisher_key(plan: Plan, loaded: Loaded) -> dict:
    """Everything the Fisher information depends on."""
    cfg, spec = plan.cfg, plan.spec
    task = {k: v for k, v in dataclasses.asdict(spec).items()
            if k not in ("local_dir", "n_best", "max_answer_length", "null_threshold",
                         "official_seq_len", "metric", "eval_files", "extra_eval_files",
                         "hub_eval_split", "hub_extra_eval_splits")}
    key = {"checkpoint": plan.identity["checkpoint"], "task": task, "seed": cfg.seed,
           "data": plan.identity["data"].get("sample_file") or plan.identity["data"]["train"],
           "num_samples": cfg.prune.num_samples, "sampling": cfg.prune.sampling,
           "batch_size": cfg.prune.batch_size or spec.fisher_batch_size,
           "max_length": loaded.data.max_length, "importance": cfg.prune.importance,
           "device": plan.identity["device"],
           "dtype": str(autocast_dtype(plan.device, cfg.prune.amp) or
                        next(loaded.model.parameters()).dtype),
           "code": code_digest(FISHER_FILES), "transformers": versions()["transformers"]}
    if cfg.prune.num_samples == "auto":
        key["adaptive"] = {"chunk": cfg.prune.adaptive_chunk,
                           "tolerance": cfg.prune.adaptive_tolerance,
                           "constraints": plan.constraints, "kind": cfg.constraint_kind,
                           "seq_len": loaded.seq_len,
                           "rearrange": cfg.prune.rearrange,
                           "sweeps": cfg.prune.rearrange_sweeps}
    return key


def importance(plan: Plan, loaded: Loaded) -> tuple[Fisher, dict]:
    """The Fisher information (from the cache when it holds this key), and how it was got."""
    cfg = plan.cfg
    key = fisher_key(plan, loaded)
    opts = prune_options(cfg.prune)
    batches = loaded.data.sample_batches
    adaptive: dict = {}

    def compute() -> Fisher:
        if cfg.prune.num_samples != "auto":
            return compute_fisher(loaded.model, loaded.adapter, batches, cfg.progress, opts.amp,
                                  opts.importance, cfg.seed)
        fisher, info = adaptive_fisher(
            loaded.model, loaded.adapter, batches, loaded.cost, plan.constraints, opts,
            chunk=cfg.prune.adaptive_chunk, tolerance=cfg.prune.adaptive_tolerance,
            progress=cfg.progress, seed=cfg.seed)
        adaptive.update(dataclasses.asdict(info))
        return fisher

    start = {}
    with timed(start, "fisher"):
        fisher, hit = cached_fisher(cfg.prune.fisher_cache_dir, key, compute)
    fisher.check_finite()
    info = {"key": key_hash(key), "hit": hit, "seconds": start["fisher"],
            "samples": fisher.num_samples, "rows": fisher.rows}
    if cfg.prune.num_samples == "auto":
        info["adaptive"] = adaptive or {"samples": fisher.num_samples, "reason": "cached"}
    return fisher, info


def model_label(cfg: DictConfig) -> str:
    """The model as the records and tables name it: the config's name, or the checkpoint the
    user gave (``model.path``) when it overrides the config's."""
    path = cfg.model.get("path")
    if not path:
        return str(cfg.model.name)
    name = Path(str(path).rstrip("/")).name or str(path)
    return name if name != cfg.model.name else str(cfg.model.name)


def prune_one(plan: Plan, loaded: Loaded, constraint: float, fisher: Fisher,
              fisher_info: dict, baseline: dict, path: Path) -> Record:
    """Prune a copy of the model at one constraint, evaluate it, and write its record, masks
    and model (the record first; an optional extra that fails only warns)."""
    cfg, spec = plan.cfg, plan.spec
    opts: PruneOptions = prune_options(cfg.prune)
    result = prune_masks(loaded.model, loaded.adapter, loaded.data.sample_batches, loaded.cost,
                         constraint, opts, fisher=fisher, progress=cfg.progress, seed=cfg.seed)
    # the shared first Fisher pass (cached or not) plus those of later steps (prune.steps > 1)
    timings = {**loaded.timings, **result.timings,
               "fisher": fisher_info["seconds"] + result.timings.get("fisher", 0.0)}
    model = copy.deepcopy(loaded.model)
    with timed(timings, "physical"):
        prune_model(model, result.masks, loaded.adapter, result.weights)
    with timed(timings, "eval_pruned"):
        pruned = evaluate_task(model, loaded.data, spec, cfg.progress)
    heads, neurons = loaded.adapter.heads_per_layer(model), loaded.adapter.neurons_per_layer(model)
    latency = None
    lat = cfg.latency
    if lat.enabled:
        after = measure_latency(model, lat.batch_size, lat.seq_len, lat.min_run_time,
                                dtype=lat.dtype)
        latency = {**compare_latency(baseline["latency"], after), "batch_size": lat.batch_size,
                   "seq_len": lat.seq_len, "device": plan.device}
        if cfg.constraint_kind == "latency":
            latency["predicted_ratio"] = loaded.cost.ratio(heads, neurons)
    timings["pruning_total"] = sum(timings.get(k, 0.0) for k in PRUNING_STAGES)
    flops = loaded.flops
    record = Record(
        model=model_label(cfg), task=spec.name, checkpoint=plan.checkpoint,
        constraint=constraint, constraint_kind=cfg.constraint_kind, seed=cfg.seed,
        device=plan.device, num_samples=fisher.num_samples,
        num_eval=loaded.data.eval_sets["eval"].size, seq_len=loaded.seq_len,
        seq_len_measured=loaded.data.dev_mean_length, seq_len_official=spec.official_seq_len,
        metric=main_metric(spec.metric), baseline=baseline["metrics"], pruned=pruned,
        flops={"baseline": 2 * flops.full, "pruned": flops.flops(heads, neurons),
               "ratio": flops.ratio(heads, neurons)},
        latency=latency,
        params={"baseline": baseline["params"],
                "pruned": sum(p.numel() for p in model.parameters())},
        fisher_cache=fisher_info, timings=timings, masks=result.masks.summary(),
        align={"granularity": opts.granularity,
               "aligned": all(n % opts.granularity == 0 or n == loaded.adapter.intermediate_size
                              for n in neurons)},
        tune=result.tune_stats.as_dict() if result.tune_stats else None,
        config=OmegaConf.to_container(cfg, resolve=True),
        identity={**plan.identity, "constraint": constraint},
        git_commit=git_commit(os.environ.get("FASTPRUNE_ROOT", ".")), versions=versions(),
        complete=False, schema=RECORD_SCHEMA)
    write_record(record, path / "results.json")
    _save_outputs(plan, path, model, loaded.tokenizer, result, record)
    log_record(cfg.logger, record.to_dict(), record.config)
    return record


def write_record(record: Record, path: Path) -> None:
    """The record, written atomically; on a failed write (a full disk) one line that says
    why, with the run's main numbers, so that they are not lost."""
    try:
        record.write(path)
    except WRITE_ERRORS as err:
        key = record.metric
        raise RunError(
            f"could not write {path} ({write_failure(err)}); {record.model}/{record.task} at "
            f"{record.constraint:g}: {key} {100 * record.baseline[key]:.2f} -> "
            f"{100 * record.pruned[key]:.2f}, FLOPs {record.flops['ratio']:.3f}; "
            f"{write_fix(err, path.parent)} and re-run") from None


def write_fix(err: Exception, directory: Path) -> str:
    """What to do about a failed write: make the directory writable again, or free space."""
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent  # the one that refused to hold a new sub-directory
        return f"make {directory} writable again"
    return "free space"


def _save_outputs(plan: Plan, path: Path, model, tokenizer, result, record: Record) -> None:
    """Masks (with the tuned weights: everything that rebuilds the evaluated model from the
    checkpoint, ``prune.pipeline.rebuild``) and the pruned model, after the record, which is
    marked complete only then. A model that cannot be saved leaves the record incomplete (a
    re-run redoes it) and stops the run with one line."""
    state = pruning_state(result)
    try:
        write_atomic(path / "masks.pt", lambda tmp: torch.save(state, tmp))
        if plan.cfg.save_model:
            with atomic_dir(path / "pruned_model") as tmp:
                prune.save_pruned(model, tmp, tokenizer, dtype=plan.cfg.save_dtype)
        record.complete = True
        record.write(path / "results.json")
    except WRITE_ERRORS as err:
        record.complete = False
        record.save_error = str(err)
        try:  # the record on disk already says incomplete; this adds why
            record.write(path / "results.json")
        except WRITE_ERRORS:
            pass
        raise RunError(f"could not save the pruned model in {path} ({write_failure(err)}); "
                       f"the results are in results.json; {write_fix(err, path)} and "
                       f"re-run") from None


def family_summary(plan: Plan, records: list[Record]) -> None:
    """One table and one plot of a family's records (accuracy and latency against FLOPs)."""
    from experiments.plots import family_plot

    rows = sorted(records, key=lambda r: r.constraint)
    write_json_atomic(plan.out_dir / "family.json", {"runs": [
        {"constraint": r.constraint, "flops_ratio": r.flops["ratio"],
         "pruned": r.pruned[r.metric], "baseline": r.baseline[r.metric],
         "latency_ratio": (r.latency or {}).get("ratio"),
         "dir": str(run_dir(plan.out_dir, r.constraint, True))} for r in rows]})
    try:
        family_plot(rows, plan.out_dir / "family.png")
    except Exception as err:  # a figure is an extra
        log.warning("could not draw the family plot (%s)", err)
