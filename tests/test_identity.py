"""What a result depends on (experiments/identity.py), the record's schema, and the presets."""

from __future__ import annotations

import shutil

import pytest
from conftest import ROOT
from test_run import config

from experiments.identity import (
    CODE_FILES,
    FISHER_FILES,
    code_digest,
    same_identity,
    source_files,
)
from experiments.records import Record


def copy_sources(root):
    for path in source_files(CODE_FILES + ("experiments/*.py",)):
        target = root / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return root


def test_a_record_names_the_code_its_process_loaded_not_an_edit_made_since(tmp_path,
                                                                          monkeypatch, caplog):
    """A file edited while a sweep runs: the running process still runs the code it imported,
    so its records (and its Fisher cache key) keep that code's digest, with one warning; a new
    process (here: the module's import-time snapshot taken again) names the edit."""
    import experiments.identity as identity

    src = copy_sources(tmp_path / "src")
    monkeypatch.setattr(identity, "ROOT", src)
    monkeypatch.setattr(identity, "_AT_IMPORT", {})
    monkeypatch.setattr(identity, "_WARNED", set())
    for patterns in (CODE_FILES, FISHER_FILES):
        identity._snapshot(patterns)
    loaded, fisher = identity.code_digest(), identity.code_digest(FISHER_FILES)
    assert loaded == code_digest(root=src) and fisher == code_digest(FISHER_FILES, root=src)
    fisher_py = src / "prune" / "fisher.py"
    fisher_py.write_text(fisher_py.read_text() + "\n# edited while running\n")
    with caplog.at_level("WARNING", logger="experiments.identity"):
        assert identity.code_digest() == loaded
        assert identity.code_digest() == loaded
        assert identity.code_digest(FISHER_FILES) == fisher
    assert sum("changed on disk" in r.message for r in caplog.records) == 2  # once per digest
    assert code_digest(root=src) != loaded  # the files themselves say otherwise
    identity._snapshot(CODE_FILES)  # a new process
    assert identity.code_digest() == code_digest(root=src) != loaded


def test_code_digest_follows_the_source_of_the_modules_that_compute_numbers(tmp_path):
    src = copy_sources(tmp_path / "src")
    assert code_digest(root=src) == code_digest()  # the content, not the place
    before, fisher = code_digest(root=src), code_digest(FISHER_FILES, root=src)
    tune = src / "prune" / "tune.py"
    tune.write_text(tune.read_text().replace("max_scale: float = 10.0", "max_scale: float = 9.0"))
    assert code_digest(root=src) != before  # one line of the library: another digest
    assert code_digest(FISHER_FILES, root=src) == fisher  # the Fisher does not tune
    tracking = src / "experiments" / "tracking.py"  # reporting only: not covered
    after = code_digest(root=src)
    tracking.write_text(tracking.read_text() + "\n# a comment\n")
    assert code_digest(root=src) == after
    data = src / "experiments" / "data.py"  # reading the data is
    data.write_text(data.read_text() + "\n# a comment\n")
    assert code_digest(root=src) != after
    assert code_digest(FISHER_FILES, root=src) != fisher


def test_identities_of_other_code_differ():
    a = {"settings": {"seed": 0}, "code": {"digest": "a", "schema": 3}}
    assert same_identity(a, {**a})
    assert not same_identity(a, {**a, "code": {"digest": "b", "schema": 3}})
    assert not same_identity(a, {**a, "code": {"prune": "0.2.0", "results": 2}})  # older form


def test_record_reads_every_schema_and_names_its_code():
    old = {"model": "minilm", "task": "sst2", "constraint": 0.6, "metric": "accuracy",
           "baseline": {"accuracy": 0.9}, "pruned": {"accuracy": 0.85}, "flops": {"ratio": 0.6},
           "something_removed_since": 1}
    r = Record.from_dict(old)
    assert r.complete and r.code is None and r.drop == pytest.approx(5.0)
    r.identity = {"code": {"digest": "abc", "schema": 3}}
    assert Record.from_dict(r.to_dict()) == r and r.code == "abc"
    with pytest.raises(KeyError):
        Record.from_dict({k: v for k, v in old.items() if k != "pruned"})


@pytest.mark.parametrize("stages,tune,rearrange", [("search", "off", False),
                                                   ("weights", "weights", True),
                                                   ("default", "mask", True)])
def test_preset_comes_before_the_stages(stages, tune, rearrange):
    """``preset=official`` sets every official choice; the stages then say how far the
    pipeline goes (before, the preset silently overrode ``stages=search``/``weights``)."""
    cfg = config([f"stages={stages}", "preset=official"])
    assert (cfg.prune.tune, cfg.prune.rearrange) == (tune, rearrange)
    assert cfg.prune.sampling == "official" and cfg.prune.tune_solver == "lsmr"
    assert cfg.prune.amp == "off"  # the official Fisher pass is float32


def test_fisher_precision_auto_is_float32_everywhere():
    from prune.fisher import autocast_dtype

    assert autocast_dtype("cpu", "auto") is None
    assert autocast_dtype("cuda", "auto") is None  # bf16 was 12-17x slower on real batches
    assert autocast_dtype("cpu", "bf16") is not None


def test_latency_in_the_deployment_dtype_and_the_model_saved_in_it(tiny_checkpoints, tmp_path):
    """``latency.dtype`` times the models in that precision and the record says so;
    ``save_dtype`` saves the pruned model in it, and it reloads in it."""
    import torch
    from test_run import FAST, run

    from prune import load_pruned

    record = run([f"model.path={tiny_checkpoints['cls2']}", "constraint=0.5",
                  "latency.dtype=bfloat16", "save_dtype=bfloat16", *FAST], tmp_path)
    assert record["latency"]["dtype"] == "bfloat16"
    assert record["latency"]["baseline"]["dtype"] == "bfloat16"
    assert record["identity"]["settings"]["latency"]["dtype"] == "bfloat16"
    model = load_pruned(tmp_path / "pruned_model")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.fastprune_heads == record["masks"]["heads_per_layer"]


@pytest.mark.parametrize("option", ["latency.dtype=fp16", "save_dtype=half"])
def test_a_bad_dtype_stops_with_one_line(tiny_checkpoints, tmp_path, option):
    from test_run import FAST, run

    from experiments.errors import RunError

    with pytest.raises(RunError, match="use one of float32, tf32, float16, bfloat16") as err:
        run([f"model.path={tiny_checkpoints['cls2']}", option, *FAST], tmp_path)
    assert "\n" not in str(err.value)


def test_the_record_names_the_checkpoint_the_user_gave(tiny_checkpoints, tmp_path):
    """``model.path`` overrides the model config's weights, so the record (and the tables) name
    that checkpoint, not the config's model (before: every user checkpoint read "minilm")."""
    from test_run import FAST, run

    record = run([f"model.path={tiny_checkpoints['cls2']}", "constraint=0.5", *FAST], tmp_path)
    assert record["model"] == "cls2"
    assert record["checkpoint"].endswith("cls2")
