"""Bad input, as a new user gives it (the catalogue of the bad-input audit).

Each case either stops early with one line naming the fix (before any weights are loaded, where
the input allows it: ``RunError``/``PruneError``, exit code 2 from the CLI; a wrong type or an
unknown group option fails at composition with Hydra's message, exit code 1), or warns in one
line and goes on; nothing a run finished is lost.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED, write_tokenizer
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from test_run import cli, config, run

import experiments.checkpoints
import experiments.runner
from experiments.errors import RunError
from prune import Fisher, PruneError

# a run that finishes quickly: 32 samples, a small data copy, no tuning, no latency, no saved
# model
LEAN = ["prune.num_samples=32", "prune.batch_size=16", "eval.max_samples=16", "progress=false",
        "prune.tune=off", "latency.enabled=false", "save_model=false"]


class Env:
    """Bad files and checkpoints for one case, under ``tmp``; ``out`` is the run directory."""

    def __init__(self, ckpt: dict[str, Path], tmp: Path):
        self.ckpt, self.tmp, self.out = ckpt, tmp, tmp / "run"

    def model(self, name: str = "cls2") -> str:
        return f"model.path={self.ckpt[name]}"

    def data(self, task: str = "SST-2", train: str | bytes | None = None) -> str:
        """``task.local_dir`` of a copy of the task's dev file as train and dev; ``train``
        replaces the train file."""
        where = self.tmp / "data"
        where.mkdir(parents=True, exist_ok=True)
        dev = SHARED / "glue" / task / "dev.tsv"
        shutil.copy(dev, where / "dev.tsv")
        content = dev.read_bytes() if train is None else train
        (where / "train.tsv").write_bytes(content.encode() if isinstance(content, str)
                                          else content)
        return f"task.local_dir={where}"

    def checkpoint(self, drop: str | None = None, truncate: str | None = None,
                   config_json: str | None = None) -> str:
        """``model.path`` of a copy of the 2-label checkpoint, damaged as asked."""
        path = self.tmp / "ckpt"
        shutil.copytree(self.ckpt["cls2"], path)
        if drop:
            (path / drop).unlink()
        if truncate:
            data = (path / truncate).read_bytes()
            (path / truncate).write_bytes(data[: len(data) // 2])
        if config_json is not None:
            (path / "config.json").write_text(config_json)
        return f"model.path={path}"

    def encoder(self, cls_name: str) -> str:
        """``model.path`` of a tiny saved ``transformers.<cls_name>`` (no classification head)."""
        import transformers

        config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=48)
        path = self.tmp / cls_name
        getattr(transformers, cls_name)(config).save_pretrained(path)
        write_tokenizer(path)
        return f"model.path={path}"

    def sample_file(self, text: str) -> str:
        path = self.tmp / "samples.txt"
        path.write_text(text)
        return f"prune.sample_file={path}"

    def file(self) -> Path:
        """A regular file: a directory under it can never be created, even by root."""
        path = self.tmp / "a-file"
        path.write_text("not a directory\n")
        return path

    def unwritable_out(self) -> list[str]:
        self.out = self.file() / "run"
        return []


def stsb_with_score(score: str) -> str:
    lines = (SHARED / "glue" / "STS-B" / "dev.tsv").read_text().split("\n")
    fields = lines[2].split("\t")
    lines[2] = "\t".join([*fields[:-1], score])
    return "\n".join(lines)


SST2_DEV = (SHARED / "glue" / "SST-2" / "dev.tsv").read_text().split("\n")

# id, overrides (beyond the 2-label checkpoint), the one line (a regex). All stop before any
# weights are loaded.
EARLY = [
    # silent wrong results
    ("qa-checkpoint-for-classification", lambda e: [e.model("qa")],
     r"is a BertForQuestionAnswering, but task sst2 needs a fine-tuned "
     r"…ForSequenceClassification checkpoint; pass one with model.path="),
    ("bare-encoder", lambda e: [e.encoder("BertModel")],
     r"is a BertModel, but task sst2 needs a fine-tuned …ForSequenceClassification"),
    ("masked-lm-checkpoint", lambda e: [e.encoder("BertForMaskedLM")],
     r"is a BertForMaskedLM, but task sst2 needs"),
    ("label-count-mismatch", lambda e: ["task=stsb"],
     r"has 2 label\(s\) but task stsb needs 1; pass a checkpoint fine-tuned on stsb"),
    ("stsb-nan-score",
     lambda e: ["task=stsb", e.model("reg1"), e.data("STS-B", stsb_with_score("nan"))],
     r"train.tsv, line 3: score 'nan' is not a number in 0..5 \(task stsb\); fix or remove"),
    ("stsb-score-out-of-range",
     lambda e: ["task=stsb", e.model("reg1"), e.data("STS-B", stsb_with_score("7.5"))],
     r"train.tsv, line 3: score '7.5' is not a number in 0..5"),
    ("seq-len-negative", lambda e: ["prune.seq_len=-5"],
     r"prune.seq_len=-5: use a positive length, official .* or null"),
    # tracebacks
    ("constraint-text", lambda e: ["constraint=abc"],
     r"constraint='abc': use a number in \(0, 1\] .*, or a list such as constraint=\[0.4"),
    ("constraint-empty", lambda e: ["constraint="], r"constraint='': use a number in \(0, 1\]"),
    ("constraint-null", lambda e: ["constraint=null"], r"constraint=None: use a number in"),
    ("constraint-zero", lambda e: ["constraint=0"], r"constraint=0 is outside \(0, 1\]"),
    ("constraint-above-one", lambda e: ["constraint=1.5"], r"constraint=1.5 is outside \(0, 1\]"),
    ("constraint-negative", lambda e: ["constraint=-0.2"], r"constraint=-0.2 is outside"),
    ("num-samples-zero", lambda e: ["prune.num_samples=0"],
     r"prune.num_samples=0: use a positive number of samples, or auto"),
    ("num-samples-negative", lambda e: ["prune.num_samples=-8"], r"prune.num_samples=-8: use a"),
    ("num-samples-text", lambda e: ["prune.num_samples=many"],
     r"prune.num_samples='many': use a positive number of samples, or auto"),
    ("batch-size-zero", lambda e: ["prune.batch_size=0"],
     r"prune.batch_size=0: use a positive number or null"),
    ("batch-size-negative", lambda e: ["prune.batch_size=-4"], r"prune.batch_size=-4: use a"),
    ("eval-batch-size-zero", lambda e: ["eval.batch_size=0"],
     r"eval.batch_size=0: use a positive number"),
    ("eval-max-samples-negative", lambda e: ["eval.max_samples=-3"],
     r"eval.max_samples=-3: use a positive number or null"),
    ("latency-min-run-time-zero", lambda e: ["latency.min_run_time=0"],
     r"latency.min_run_time=0.0: use a positive number"),
    ("device-cuda-without-cuda", lambda e: ["device=cuda"],
     r"device=cuda but CUDA is not available here; use device=auto or device=cpu"),
    ("device-unknown", lambda e: ["device=foo"], r"device='foo': use auto, cpu, cuda or cuda:"),
    ("checkpoint-without-weights", lambda e: [e.checkpoint(drop="model.safetensors")],
     r"has a config but no weights \(model.safetensors or pytorch_model.bin\); copy the whole"),
    ("checkpoint-truncated-weights", lambda e: [e.checkpoint(truncate="model.safetensors")],
     r"model.safetensors is damaged or truncated \(.*\); copy it again"),
    ("missing-model-path", lambda e: [f"model.path={e.tmp}/no/such/dir"],
     r"model path .*/no/such/dir does not exist; pass a directory with config.json"),
    ("tsv-header-only", lambda e: [e.data(train=SST2_DEV[0] + "\n")],
     r"train.tsv has a header but no data rows; use the official file"),
    ("tsv-no-valid-row", lambda e: [e.data(train=f"{SST2_DEV[0]}\nonly one field\na\tb\tc\n")],
     r"train.tsv: no row has the 2 tab-separated fields of its header \(first bad row: line 2"),
    ("tsv-not-utf8", lambda e: [e.data(train=f"{SST2_DEV[0]}\n{SST2_DEV[1]}\n".encode()
                                      + b"caf\xe9 au lait\t1\n")],
     r"train.tsv, line 3: not UTF-8 text \(.*\); re-save the file as UTF-8"),
    ("tsv-missing-columns", lambda e: [e.data(train="text\tlabel\nfine film\t1\n")],
     r"train.tsv lacks column\(s\) \['sentence'\] needed by task sst2"),
    # lost work
    ("logger-unknown", lambda e: ["logger.kind=foo"],
     r"logger.kind='foo': use logger=none or logger=wandb"),
    ("output-dir-unwritable", lambda e: e.unwritable_out(),
     r"cannot write to the run directory .*/a-file/run \(Not a directory\); choose another"),
    # smaller
    ("config-json-corrupt", lambda e: [e.checkpoint(config_json="{not json")],
     r"^(?!.*offline).*/ckpt/config.json is not valid JSON \(.*\); fix or re-save"),
    # also
    ("tune-old-boolean", lambda e: ["prune.tune=false"],
     r"prune.tune='False': use one of off, mask, bias, weights"),
    ("tune-samples-zero", lambda e: ["prune.tune_samples=0"],
     r"prune.tune_samples=0: use a positive number"),
    ("tune-samples-negative", lambda e: ["prune.tune_samples=-5"],
     r"prune.tune_samples=-5: use a positive number"),
    ("amp-unknown", lambda e: ["prune.amp=fp8"], r"prune.amp='fp8': use one of auto, bf16, off"),
    ("importance-unknown", lambda e: ["prune.importance=foo"],
     r"prune.importance='foo': use one of fisher, fisher_unlabeled"),
    ("sampling-unknown", lambda e: ["prune.sampling=foo"],
     r"prune.sampling='foo': use one of without, with, official"),
    ("seq-len-official-without-constant",
     lambda e: ["prune.seq_len=official", "task.official_seq_len=null"],
     r"prune.seq_len=official: task sst2 has no official length; set task.official_seq_len"),
    ("sample-file-empty", lambda e: ["prune.importance=fisher_unlabeled", e.sample_file("\n")],
     r"sample file .*samples.txt has no examples \(one per line\)"),
    ("sample-file-wrong-fields",
     lambda e: ["task=stsb", e.model("reg1"), "prune.importance=fisher_unlabeled",
                e.sample_file("A man is playing the cello.\n")],
     r"samples.txt, line 1: task stsb needs 2 texts separated by a tab per line, found 1"),
    ("sample-file-without-unlabeled-importance", lambda e: [e.sample_file("a fine film\n")],
     r"prune.sample_file is unlabeled text: use it with prune.importance=fisher_unlabeled"),
    ("constraint-duplicate", lambda e: ["constraint=[0.4,0.4]"],
     r"constraint=\[0.4, 0.4\]: a constraint is listed twice"),
    ("constraint-empty-list", lambda e: ["constraint=[]"],
     r"constraint=\[\]: give at least one fraction in \(0, 1\]"),
]


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights fails the test: the input must be refused before."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(experiments.runner, "load_model", refuse)
    monkeypatch.setattr(experiments.checkpoints, "load_model", refuse)


@pytest.mark.parametrize("case,make,message", EARLY, ids=[c[0] for c in EARLY])
def test_bad_input_stops_before_weights_load(tiny_checkpoints, tmp_path, no_weights, case, make,
                                             message):
    env = Env(tiny_checkpoints, tmp_path)
    stops_with_one_line(env, [env.model(), *LEAN, *make(env)], message)


def stops_with_one_line(env: Env, overrides: list[str], message: str) -> None:
    """The run stops with one line matching ``message`` and writes no record."""
    with pytest.raises((RunError, PruneError)) as err:
        run(overrides, env.out)
    text = str(err.value)
    assert "\n" not in text and text == text.strip()
    assert re.search(message, text), text
    assert not (env.out / "results.json").exists()


# unknown group options and wrong types fail when the config is composed (Hydra's message)
COMPOSE = [
    ("unknown-model", "model=gpt9", r"Could not find 'model/gpt9'"),
    ("unknown-task", "task=nosuchtask", r"Could not find 'task/nosuchtask'"),
    ("unknown-stage", "stages=fastest", r"Could not find 'stages/fastest'"),
    ("unknown-preset", "preset=paper", r"Could not find 'preset/paper'"),
    ("batch-size-text", "prune.batch_size=abc", r"Error merging override prune.batch_size=abc"),
    ("old-latency-repeats", "latency.repeats=0", r"Could not override 'latency.repeats'"),
]


@pytest.mark.parametrize("case,override,message", COMPOSE, ids=[c[0] for c in COMPOSE])
def test_unknown_option_or_wrong_type_fails_at_composition(case, override, message):
    with pytest.raises(ConfigCompositionException, match=message) as err:
        config([override])
    if case.startswith("unknown"):  # the available options are listed
        assert "Available options" in str(err.value)


def test_local_dir_does_not_name_sweep_folders():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task.local_dir=/data/glue/SST-2", "constraint=0.5",
                                           "prune.sample_file=/data/s.txt"],
                      return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == "constraint=0.5"


# --- cases that load weights: warnings, and nothing finished is lost -----------------------


def lean_run(env: Env, *extra, out: Path | None = None):
    return run([env.model(), env.data(), f"paths.cache_dir={env.tmp}/cache", *LEAN, *extra],
               out or env.out)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def nan_fisher(*args) -> Fisher:
    return Fisher(torch.full((2, 2, 4), float("nan")), torch.zeros(2, 2, 48), 32)


@pytest.mark.parametrize("source", ["computed", "cached"])
def test_nan_fisher_is_never_searched_or_cached(tiny_checkpoints, tmp_path, monkeypatch, source):
    env = Env(tiny_checkpoints, tmp_path)

    def search(*args, **kwargs):
        raise AssertionError("a NaN Fisher was searched")

    if source == "computed":
        monkeypatch.setattr("experiments.runner.compute_fisher", nan_fisher)
    else:  # an entry written by an older version
        monkeypatch.setattr("experiments.runner.cached_fisher", lambda *a: (nan_fisher(), True))
    monkeypatch.setattr("experiments.runner.prune_masks", search)
    with pytest.raises(PruneError, match="the Fisher information has NaN or infinite") as err:
        lean_run(env)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.pt"))
    assert not (env.out / "results.json").exists()


def test_finished_run_is_redone_with_other_data(tiny_checkpoints, tmp_path):
    env = Env(tiny_checkpoints, tmp_path)
    first = lean_run(env)
    other = Env(tiny_checkpoints, tmp_path / "other")
    lines = SST2_DEV[:200]
    again = run([env.model(), other.data(train="\n".join(lines)),
                 f"paths.cache_dir={tmp_path}/cache", *LEAN], env.out)
    assert again["identity"]["data"]["train"] != first["identity"]["data"]["train"]
    assert len(list(env.out.glob("results.stale-*.json"))) == 1


def test_failing_logger_only_warns_after_the_record_is_written(tiny_checkpoints, tmp_path,
                                                               monkeypatch, caplog):
    import wandb

    env = Env(tiny_checkpoints, tmp_path)
    seen = []

    def init(*args, **kwargs):  # W&B online without an API key
        seen.append((env.out / "results.json").exists())
        raise wandb.errors.UsageError("api_key not configured (no-tty). call "
                                      "wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", init)
    record = lean_run(env, "logger=wandb", "logger.mode=online", f"logger.dir={tmp_path}")
    assert seen == [True]
    assert json.loads((env.out / "results.json").read_text())["pruned"] == record["pruned"]
    (line,) = [w for w in warnings_of(caplog) if "logging to wandb failed" in w]
    assert "\n" not in line and "results.json" in line


def full_disk(real_save, under: str):
    """``torch.save`` as on a full disk (a RuntimeError, not an OSError) for paths containing
    ``under``."""
    def save(obj, path, *args, **kwargs):
        if under in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 "
                               "vs 598")
        return real_save(obj, path, *args, **kwargs)

    return save


@pytest.mark.parametrize("failure", ["unwritable-dir", "disk-full"])
def test_failed_cache_write_only_warns(tiny_checkpoints, tmp_path, monkeypatch, caplog, failure):
    env = Env(tiny_checkpoints, tmp_path)
    cache = f"{env.file()}/fisher" if failure == "unwritable-dir" else f"{tmp_path}/fisher"
    if failure == "disk-full":
        monkeypatch.setattr(torch, "save", full_disk(torch.save, "fisher"))
    record = lean_run(env, f"prune.fisher_cache_dir={cache}")
    assert record["fisher_cache"]["hit"] is False and (env.out / "results.json").exists()
    (line,) = [w for w in warnings_of(caplog) if "Fisher cache" in w]
    assert "\n" not in line and "going on without it" in line
    assert not list(tmp_path.rglob("*.tmp"))


def save_fails_half_way(model, path, tokenizer=None, **kwargs):  # the disk fills up half-way
    (Path(path) / "config.json").write_text("{}")
    raise OSError(28, "No space left on device")


def safetensors_fails(model, path, tokenizer=None, **kwargs):
    from safetensors import SafetensorError

    (Path(path) / "config.json").write_text("{}")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os "
                          "error 28)")


@pytest.mark.parametrize("failure", ["model-oserror", "model-safetensors", "masks-disk-full"])
def test_failed_save_leaves_no_partial_output_and_keeps_the_record(tiny_checkpoints, tmp_path,
                                                                    monkeypatch, failure):
    env = Env(tiny_checkpoints, tmp_path)
    seen = []

    def check_record_first(save):
        def wrapped(*args, **kwargs):  # the record is on disk, marked incomplete, before
            seen.append(json.loads((env.out / "results.json").read_text())["complete"])
            return save(*args, **kwargs)
        return wrapped

    if failure == "masks-disk-full":
        monkeypatch.setattr(torch, "save", check_record_first(full_disk(torch.save, "masks")))
        kept = ["results.json"]
    else:
        save = save_fails_half_way if failure == "model-oserror" else safetensors_fails
        monkeypatch.setattr("prune.save_pruned", check_record_first(save))
        kept = ["masks.pt", "results.json"]
    with pytest.raises(RunError, match=r"could not save the pruned model in .* \(.*\); the "
                                       r"results are in results.json; free space") as err:
        lean_run(env, "save_model=true")
    assert "\n" not in str(err.value) and seen == [False]
    assert sorted(p.name for p in env.out.iterdir()) == kept  # no partial or temporary files
    record = json.loads((env.out / "results.json").read_text())
    assert record["complete"] is False and record["save_error"]


def test_live_lock_skips_the_run(tiny_checkpoints, tmp_path, no_weights, caplog):
    env = Env(tiny_checkpoints, tmp_path)
    env.out.mkdir()
    (env.out / ".lock").write_text(str(os.getpid()))  # a live process holds the directory
    assert lean_run(env) is None
    (line,) = [w for w in warnings_of(caplog) if "another process is running" in w]
    assert "\n" not in line
    assert (env.out / ".lock").read_text() == str(os.getpid())


def test_lock_of_another_host_is_respected(tiny_checkpoints, tmp_path, no_weights):
    """On a shared file system a pid of another host cannot be checked: the lock stands."""
    env = Env(tiny_checkpoints, tmp_path)
    env.out.mkdir()
    (env.out / ".lock").write_text("some-other-node:999999")
    assert lean_run(env) is None
    assert (env.out / ".lock").read_text() == "some-other-node:999999"


def test_run_finished_by_another_process_while_waiting_for_the_lock_is_not_redone(
        tiny_checkpoints, tmp_path, no_weights, monkeypatch):
    env = Env(tiny_checkpoints, tmp_path)
    plans = []
    prepare, claim = experiments.runner.prepare, experiments.runner.claim

    def prepared(cfg, out_dir):
        plans.append(prepare(cfg, out_dir))
        return plans[-1]

    def claimed(out_dir):  # the other process finished this run between prepare and claim
        record = {"model": "minilm", "task": "sst2", "constraint": 0.6, "metric": "accuracy",
                  "baseline": {"accuracy": 0.9}, "pruned": {"accuracy": 0.8},
                  "flops": {"ratio": 0.6}, "identity": {**plans[-1].identity,
                                                        "constraint": 0.6}, "complete": True}
        (out_dir / "results.json").write_text(json.dumps(record))
        return claim(out_dir)

    monkeypatch.setattr(experiments.runner, "prepare", prepared)
    monkeypatch.setattr(experiments.runner, "claim", claimed)
    assert lean_run(env)["complete"] is True
    assert not (env.out / ".lock").exists()


def test_stale_lock_is_taken_over_and_files_are_readable_by_others(tiny_checkpoints, tmp_path):
    env = Env(tiny_checkpoints, tmp_path)
    env.out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (env.out / ".lock").write_text(str(dead.pid))
    old = os.umask(0o022)
    try:
        record = lean_run(env)
    finally:
        os.umask(old)
    assert record["complete"] is True and not (env.out / ".lock").exists()
    assert json.loads((env.out / "results.json").read_text())["complete"] is True
    (cache,) = (tmp_path / "cache" / "fisher").glob("*.pt")
    for path in (env.out / "results.json", env.out / "masks.pt", cache):
        assert path.stat().st_mode & 0o777 == 0o644, path


# --- the real CLI: exit codes, one line, no traceback --------------------------------------

CLI = [
    ("constraint-text", ["constraint=abc"], 2, "error: constraint='abc': use a number in (0, 1]"),
    ("device-cuda-without-cuda", ["device=cuda"], 2, "error: device=cuda but CUDA is not"),
    # a typed option's value is checked before Hydra reads the command line (run.py's
    # check_command_line): one line of ours, not Hydra's "could not be converted to Integer"
    ("batch-size-text", ["prune.batch_size=abc"], 2,
     "error: prune.batch_size=abc: use a whole number or null"),
]


@pytest.mark.parametrize("case,args,code,message", CLI, ids=[c[0] for c in CLI])
def test_cli_exit_code_and_one_line(tmp_path, case, args, code, message):
    res, _ = cli(*args, f"hydra.run.dir={tmp_path}/run")
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    assert "Traceback" not in out and message in out
    if code == 2:  # ours: exactly one line, Hydra's log line or the pre-Hydra check's
        (line,) = out.strip().splitlines()
        assert ("[ERROR]" in line and message in line) or line == message


def test_cli_unwritable_run_directory_stops_before_hydra_creates_it(tmp_path):
    """Hydra creates the run directory itself: a callback checks it first (one line, exit 2)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    res, _ = cli(f"hydra.run.dir={blocker}/run")
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in out
    (line,) = out.strip().splitlines()
    assert "cannot write to the run directory" in line and "hydra.run.dir" in line
