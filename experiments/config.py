"""The run's configuration schema (a Hydra structured config) and its validation at the door.

The ``prune`` node is built from the library's ``PruneOptions`` and its ``TuneOptions`` (flat
``prune.tune_*`` keys): the same types and defaults (the one source of defaults), plus the
harness's own sampling and caching options. A
typo or a wrong type in any schema'd node fails when Hydra composes the config, with Hydra's
message. ``validate`` then checks values (ranges, choices, combinations) before any data or
weights are loaded, each failure one line that names the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from experiments.data import SAMPLING, TaskSpec
from experiments.errors import RunError
from experiments.identity import (  # noqa: F401 - what a result depends on lives there
    LATENCY_TABLE_KEYS,
    task_finetune,
    used_identity,
    used_settings,
)
from prune import PruneError, PruneOptions, TuneOptions
from prune.latency import DTYPES
from prune.tune import TUNE_MODES


def _fields(source: type, drop: tuple[str, ...] = (), rename: dict[str, str] | None = None,
            expand: dict[str, list[tuple]] | None = None) -> list[tuple]:
    """``source``'s fields (resolved types, same defaults) for ``make_dataclass``, named by
    ``rename``; a field in ``expand`` is replaced, in place, by the fields given for it."""
    hints = typing.get_type_hints(source)
    rename, expand = rename or {}, expand or {}
    own = []
    for f in dataclasses.fields(source):
        if f.name in expand:
            own.extend(expand[f.name])
            continue
        if f.name in drop:
            continue
        name = rename.get(f.name, f.name)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default
        if f.default_factory is not dataclasses.MISSING:  # dicts: the yaml gives them
            own.append((name, Any, field(default=None)))
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is tuple or kind is dict:
            kind = Any
        elif required:
            kind = typing.Optional[kind]
        own.append((name, kind, field(default=default)))
    return own


def _schema(name: str, source: type, extra: list[tuple], drop: tuple[str, ...] = ()) -> type:
    """A dataclass with ``source``'s fields (resolved types, same defaults) and ``extra``."""
    return dataclasses.make_dataclass(name, _fields(source, drop) + extra)


# The tuning solve's options (``PruneOptions.tune``, a ``TuneOptions``) as flat ``prune.*`` keys,
# the names records have always carried: ``tune`` is the mode (``off``: no tuning),
# ``cls_only_last`` keeps its name, any other option ``x`` is ``tune_x``.
TUNE_KEYS = {("tune" if f.name == "mode" else f.name if f.name == "cls_only_last"
              else f"tune_{f.name}"): f.name
             for f in dataclasses.fields(TuneOptions) if f.name != "activation_cache_bytes"}

PruneConf = dataclasses.make_dataclass("PruneConf", _fields(PruneOptions, expand={
    "tune": _fields(TuneOptions, drop=("activation_cache_bytes",),
                    rename={v: k for k, v in TUNE_KEYS.items()})}) + [
    # the harness: which samples, how many, in what batches, the cost model's length, caches
    ("num_samples", Any, field(default=2048)),  # an int, or "auto" (stop once masks settle)
    ("sampling", str, field(default="without")),  # without | with | official
    ("batch_size", typing.Optional[int], field(default=None)),  # null: the task's (32; QA 12)
    ("seq_len", Any, field(default=None)),  # null: dev-set mean; "official": task constant
    ("sample_file", typing.Optional[str], field(default=None)),  # unlabeled text, one per line
    ("adaptive_chunk", int, field(default=256)),  # num_samples=auto: samples per check
    ("adaptive_tolerance", float, field(default=0.01)),  # ... stop when masks change less
    ("fisher_cache_dir", typing.Optional[str], field(default=None)),
])

TaskConf = _schema("TaskConf", TaskSpec, [])


@dataclass
class LatencyConf:
    enabled: bool = True
    batch_size: int = 32
    seq_len: int = 128
    min_run_time: float = 5.0  # seconds of timed forward passes per measurement
    table_points: int = 8  # grid points per curve of the latency lookup table
    table_min_run_time: float = 1.0  # seconds of timed whole-model passes per grid point
    dtype: str = "float32"  # the deployment precision timed: float32 | tf32 | float16 | bfloat16


@dataclass
class EvalConf:
    batch_size: int = 128
    max_samples: typing.Optional[int] = None  # a seeded subset (null: the whole dev set)


@dataclass
class RunConf:
    constraint: Any = 0.6  # a fraction in (0, 1], or a list of them (one Fisher pass for all)
    constraint_kind: str = "flops"  # flops | latency
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    save_model: bool = True
    save_dtype: typing.Optional[str] = None  # the pruned model's dtype on disk (null: the model's)
    force: bool = False
    sweep_name: str = "adhoc"
    prune: PruneConf = field(default_factory=PruneConf)
    task: TaskConf = field(default_factory=TaskConf)
    latency: LatencyConf = field(default_factory=LatencyConf)
    eval: EvalConf = field(default_factory=EvalConf)
    model: Any = None
    paths: Any = None
    logger: Any = None
    preset: str = "none"  # set by the preset group: none | official


def register() -> None:
    """Make the schema known to Hydra as ``base_config`` (``conf/config.yaml`` extends it)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConf)


def constraints_of(value) -> list[float]:
    """The constraint(s) of a run: one number or a list, each in (0, 1]."""
    values = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and \
        not isinstance(value, str) else [value]
    if not values:
        raise RunError("constraint=[]: give at least one fraction in (0, 1]")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RunError(f"constraint={v!r}: use a number in (0, 1] (the fraction of the "
                           f"cost kept), or a list such as constraint=[0.4,0.5,0.6]")
        if not 0 < float(v) <= 1:
            raise RunError(f"constraint={v} is outside (0, 1]: it is the fraction of the cost "
                           f"kept, e.g. constraint=0.6 keeps 60%")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise RunError(f"constraint={out}: a constraint is listed twice")
    return out


def prune_options(prune_cfg) -> PruneOptions:
    """The library options of a run (the flat ``prune.tune*`` keys become its ``TuneOptions``);
    bad values stop here with one line that names the config key."""
    mode = prune_cfg["tune"]
    if mode != "off" and mode not in TUNE_MODES:
        raise RunError(f"prune.tune={mode!r}: use one of off, {', '.join(TUNE_MODES)}")
    try:
        tune = TuneOptions(**{name: prune_cfg[key] for key, name in TUNE_KEYS.items()
                              if name != "mode"}, mode="mask" if mode == "off" else mode)
        values = {k: prune_cfg[k] for k in PruneOptions.defaults() if k != "tune"}
        return PruneOptions(tune=None if mode == "off" else tune, **values)
    except PruneError as err:
        message = str(err)
        if message.startswith("tune "):  # a TuneOptions field: say its config key
            name = message[len("tune "):].split("=", 1)[0]
            key = {v: k for k, v in TUNE_KEYS.items()}.get(name, name)
            message = key + message[len("tune ") + len(name):]
        raise RunError(f"prune.{message}") from None


def _closest(name: str, options: list[str]) -> str:
    """`` (did you mean X?)`` for the option whose last part shares the longest beginning
    with ``name`` (then the most similar), or ``""`` when none is close."""
    def score(option: str) -> tuple:
        leaf = option.rsplit(".", 1)[-1]
        shared = len(os.path.commonprefix([leaf, name]))
        return shared, difflib.SequenceMatcher(None, leaf, name).ratio()

    best = max(options, key=score, default=None)
    if best is None or score(best)[1] < 0.6:
        return ""
    return f" (did you mean {best}?)"


def check_known_keys(cfg) -> None:
    """Keys the schema does not know (Hydra's ``+key=value`` appends them; Hydra itself
    suggests ``+`` for a mistyped key) stop here instead of being silently ignored."""
    nodes = {"": RunConf, "prune.": PruneConf, "latency.": LatencyConf, "eval.": EvalConf,
             "task.": TaskConf}
    for prefix, schema in nodes.items():
        node = OmegaConf.select(cfg, prefix[:-1]) if prefix else cfg
        if node is None or not hasattr(node, "keys"):
            continue
        known = {f.name for f in dataclasses.fields(schema)}
        unknown = sorted(set(node.keys()) - known - ({"variant", "stages"} if not prefix
                                                     else set()))
        if unknown:
            hint = _closest(unknown[0], [f"{p}{f.name}" for p, sch in nodes.items()
                                         for f in dataclasses.fields(sch)])
            raise RunError(f"unknown option {prefix}{unknown[0]}{hint}: remove it; "
                           f"`python run.py --cfg job` lists every option")


# the schema's nodes by their dotted prefix, for the command line's typed values
_NODES = {"": RunConf, "prune": PruneConf, "task": TaskConf, "latency": LatencyConf,
          "eval": EvalConf}
_SPELLED = {bool: "true or false", int: "a whole number", float: "a number"}


def _typed_leaf(key: str) -> tuple[type, bool] | None:
    """The schema's type of option ``key`` (``prune.obs``) and whether it takes null, for a
    bool, int or float option; ``None`` for any other key (a group, a path, a free value)."""
    prefix, _, name = key.rpartition(".")
    schema = _NODES.get(prefix)
    if schema is None:
        return None
    kind = typing.get_type_hints(schema).get(name)
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and \
        type(None) in typing.get_args(kind)
    if optional:
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = rest[0] if len(rest) == 1 else None
    return (kind, optional) if kind in _SPELLED else None


def _reads_as(kind: type, text: str) -> bool:
    """Whether ``text`` is a value of ``kind`` as Hydra's grammar writes one."""
    if kind is bool:
        return text.lower() in ("true", "false")
    if kind is int:
        return re.fullmatch(r"[+-]?\d+(_\d+)*", text) is not None
    try:
        float(text.replace("_", ""))
    except ValueError:
        return False
    return True


def check_override_values(overrides: list[str]) -> None:
    """Each bool, int or float option on the command line (each value of a sweep's list) is
    written as its type, checked before Hydra composes the config: Hydra reads any whole
    number as a boolean (``prune.obs=3`` would run as true) and stops on ``prune.obs=maybe``
    with a message of several lines; here either is one line naming the fix. Values Hydra
    computes (``range(3)``, interpolations, quoted text) are left to Hydra."""
    for arg in overrides:
        if arg.startswith(("-", "~")) or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+").partition("=")
        leaf = _typed_leaf(key)
        if leaf is None or any(c in value for c in "()[]{}$'\""):
            continue
        kind, optional = leaf
        for item in value.split(","):
            item = item.strip()
            if not (_reads_as(kind, item) or (optional and item.lower() == "null")):
                spelled = _SPELLED[kind] + (" or null" if optional else "")
                raise RunError(f"{key}={item}: use {spelled}")


def _positive(name: str, value, zero: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    low_ok = value >= 0 if zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low_ok:
        what = "a number >= 0" if zero else "a positive number"
        raise RunError(f"{name}={value!r}: use {what}" + (" or null" if allow_none else ""))


def validate(cfg) -> list[float]:
    """Check every option that needs no data or weights; return the constraints."""
    check_known_keys(cfg)
    constraints = constraints_of(cfg.constraint)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not \
            0 <= cfg.seed < 2 ** 32:
        raise RunError(f"seed={cfg.seed!r}: use a whole number from 0 to 2**32 - 1")
    if cfg.constraint_kind not in ("flops", "latency"):
        raise RunError(f"constraint_kind={cfg.constraint_kind!r}: use flops or latency")
    prune_options(cfg.prune)
    p = cfg.prune
    n = p.num_samples
    if isinstance(n, float) and n.is_integer() and n >= 1:
        raise RunError(f"prune.num_samples={n!r}: write it as a whole number "
                       f"(prune.num_samples={int(n)}), or auto")
    if not (n == "auto" or (isinstance(n, int) and not isinstance(n, bool) and n >= 1)):
        raise RunError(f"prune.num_samples={n!r}: use a positive number of samples, or auto")
    if p.sampling not in SAMPLING:
        raise RunError(f"prune.sampling={p.sampling!r}: use one of {', '.join(SAMPLING)}")
    _positive("prune.batch_size", p.batch_size, allow_none=True)
    _positive("prune.adaptive_chunk", p.adaptive_chunk)
    _positive("prune.adaptive_tolerance", p.adaptive_tolerance)
    if p.seq_len is not None and p.seq_len != "official":
        if isinstance(p.seq_len, bool) or not isinstance(p.seq_len, (int, float)) or \
                p.seq_len <= 0:
            raise RunError(f"prune.seq_len={p.seq_len!r}: use a positive length, official (the "
                           f"task's constant) or null (the dev set's mean)")
    if p.seq_len == "official" and cfg.task.official_seq_len is None:
        raise RunError(f"prune.seq_len=official: task {cfg.task.name} has no official length; "
                       f"set task.official_seq_len or use null")
    if p.sample_file and p.importance != "fisher_unlabeled":
        raise RunError("prune.sample_file is unlabeled text: use it with "
                       "prune.importance=fisher_unlabeled")
    _positive("eval.batch_size", cfg.eval.batch_size)
    _positive("eval.max_samples", cfg.eval.max_samples, allow_none=True)
    lat = cfg.latency
    for name in ("batch_size", "seq_len", "min_run_time", "table_min_run_time"):
        _positive(f"latency.{name}", lat[name])
    for name, value in (("latency.dtype", lat.dtype), ("save_dtype", cfg.save_dtype)):
        if value is not None and value not in DTYPES:
            raise RunError(f"{name}={value!r}: use one of {', '.join(DTYPES)}")
    if lat.table_points < 2:
        raise RunError(f"latency.table_points={lat.table_points}: use at least 2")
    if cfg.logger.kind not in ("none", "wandb"):
        raise RunError(f"logger.kind={cfg.logger.kind!r}: use logger=none or logger=wandb")
    return constraints



class WritableOutput(Callback):
    """Stop with one line, before Hydra creates its run (or sweep) directory, when that
    directory cannot be written (instead of Hydra's traceback). Remembers the directories it
    creates, so that a run that fails before writing anything leaves none behind
    (``discard_unused_run_dir``)."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(directory) -> None:
        import logging
        import sys

        from experiments.records import check_writable

        new = _first_missing(Path(directory))
        try:
            check_writable(directory)
        except RunError as err:
            logging.getLogger("fastprune").error("error: %s", err)
            sys.exit(2)
        if new is not None:
            _CREATED.append(new.resolve())


# directories the run (or sweep) start created, topmost first
_CREATED: list[Path] = []
HYDRA_FILES = (".hydra",)  # plus the job's log file, ``<job name>.log``


def _first_missing(directory: Path) -> Path | None:
    """The topmost ancestor of ``directory`` (itself included) that does not exist yet."""
    missing = None
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing = path
    return missing


def discard_unused_run_dir(output_dir: str | Path, job_name: str, sweep_job: bool) -> None:
    """Remove a job's directory that holds nothing but Hydra's own files (``.hydra/`` and the
    job log), after a run that stopped before writing anything: a failed validation must not
    leave folders such as ``c[0.4, 'abc']/<time>/`` behind. A single run's directory goes only
    if this process created it (``WritableOutput``), with the parents it created; a sweep's
    job directory (``sweep_job``) whenever it holds only Hydra's files of this job. A directory
    holding anything else is left alone."""
    import shutil

    output_dir = Path(output_dir).resolve()
    ours = [d for d in _CREATED if d == output_dir or d in output_dir.parents]
    if not (sweep_job or ours) or not output_dir.is_dir():
        return
    hydra_files = {*HYDRA_FILES, f"{job_name}.log"}
    if any(p.name not in hydra_files for p in output_dir.iterdir()):
        return
    for name in hydra_files:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    top = ours[0] if ours else output_dir
    for path in (output_dir, *output_dir.parents):
        try:
            path.rmdir()  # only when empty
        except OSError:
            return
        if path == top:
            return

register()
