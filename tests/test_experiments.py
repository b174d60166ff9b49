"""Sweeps and caches: every experiment config composes and runs one point; a sweep resumes
without redoing or duplicating runs; constraints share the Fisher information through the cache,
which is keyed on everything that changes it; a family of constraints comes from one pass."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED
from hydra import compose, initialize_config_dir
from test_run import FAST, run

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def sweep_params(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    return cfg, {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_its_first_point_runs(name, tiny_checkpoints, tmp_path,
                                                            monkeypatch):
    cfg, params = sweep_params(name)
    assert cfg.sweep_name == name
    for group in ("model", "task", "stages", "+variant"):
        for option in params.get(group, []):
            folder = group.lstrip("+")
            assert (ROOT / "conf" / folder / f"{option}.yaml").exists(), f"{group}={option}"
    first = [f"{k}={v[0]}" for k, v in params.items()]
    assert "task=sst2" in first or "task" not in params  # the first point is a GLUE run
    kind = next((p.split("=")[1] for p in first if p.startswith("constraint_kind=")),
                cfg.constraint_kind)
    if kind == "latency":
        # a tiny model's measured latency is mostly fixed overhead (most budgets out of reach)
        # and noisy on a loaded machine: its lookup table comes from a steady timer instead, so
        # that the sweep's own first budget binds (the models themselves are timed for real)
        from test_latency import steady_timer

        from prune import get_adapter, load_pruned

        adapter = get_adapter(load_pruned(tiny_checkpoints["cls2"]))
        monkeypatch.setattr("prune.latency.measure_latency", steady_timer(adapter))
    given = next((p.split("=")[1] for p in first if p.startswith("constraint=")), None)
    budgets = [float(given)] if given else list(cfg.constraint) if not isinstance(
        cfg.constraint, float) else [cfg.constraint]
    out = run([f"experiment={name}", *first, f"model.path={tiny_checkpoints['cls2']}",
               *FAST], tmp_path)
    records = out if isinstance(out, list) else [out]
    assert [r["constraint"] for r in records] == budgets
    for record, budget in zip(records, budgets, strict=True):
        assert record["constraint_kind"] == kind
        if kind == "latency":
            assert budget < 1.0
            assert record["latency"]["predicted_ratio"] <= budget + 1e-6
        else:
            assert record["flops"]["ratio"] <= budget + 1e-9
        masks = record["masks"]
        assert masks["heads_kept"] + masks["neurons_kept"] < \
            masks["heads_total"] + masks["neurons_total"], "the budget must remove some units"


def multirun(out: Path, ckpt: Path):
    args = [sys.executable, str(ROOT / "run.py"), "-m", "experiment=main_cpu", "task=sst2",
            "seed=0", f"model.path={ckpt}", f"paths.output_dir={out}",
            f"paths.cache_dir={out}/cache", "save_model=false", *FAST]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.mark.slow
def test_sweep_reuses_fisher_and_resumes_without_redoing_runs(tiny_checkpoints, tmp_path):
    multirun(tmp_path, tiny_checkpoints["cls2"])
    results = sorted((tmp_path / "sweeps" / "main_cpu").glob("*/results.json"))
    names = [p.parent.name for p in results]
    assert [n.split(",")[0] for n in names] == [f"constraint={c}" for c in (0.4, 0.5, 0.6)]
    records = [json.loads(p.read_text()) for p in results]
    assert sorted(r["fisher_cache"]["hit"] for r in records) == [False, True, True]
    assert len({r["fisher_cache"]["key"] for r in records}) == 1
    stamps = [p.stat().st_mtime_ns for p in results]
    # an interrupted sweep: one run's result is lost, the others must be kept, not redone
    results[1].unlink()
    log = multirun(tmp_path, tiny_checkpoints["cls2"])
    assert log.count("skipping") == 2
    again = sorted((tmp_path / "sweeps" / "main_cpu").glob("*/results.json"))
    assert len(again) == 3
    assert again[0].stat().st_mtime_ns == stamps[0] and again[2].stat().st_mtime_ns == stamps[2]
    assert json.loads(again[1].read_text())["fisher_cache"]["hit"] is True


def test_records_name_the_real_fisher_cache_entry(tiny_checkpoints, tmp_path):
    """Each record's Fisher key is the hash of the cache entry it used (not the metric's
    name): runs of one model, task and sample set share it; the entry exists on disk."""
    base = [f"model.path={tiny_checkpoints['cls2']}", "save_model=false",
            f"paths.cache_dir={tmp_path}/cache", *FAST]
    a = run([*base, "constraint=0.4"], tmp_path / "a")
    b = run([*base, "constraint=0.6"], tmp_path / "b")
    key = a["fisher_cache"]["key"]
    assert key == b["fisher_cache"]["key"] and key != a["metric"]
    assert len(key) == 16 and int(key, 16) >= 0
    assert (tmp_path / "cache" / "fisher" / f"{key}.pt").exists()
    assert (a["fisher_cache"]["hit"], b["fisher_cache"]["hit"]) == (False, True)


def copy_sst2(where: Path, flip_row: int | None = None) -> Path:
    where.mkdir(parents=True)
    train = (SHARED / "glue" / "SST-2" / "dev.tsv").read_text().split("\n")
    if flip_row is not None:  # one corrected label: other content, same size
        text, label = train[flip_row].rsplit("\t", 1)
        train[flip_row] = f"{text}\t{1 - int(label)}"
    (where / "train.tsv").write_text("\n".join(train))
    shutil.copy(SHARED / "glue" / "SST-2" / "dev.tsv", where / "dev.tsv")
    return where


def test_fisher_cache_is_keyed_on_everything_that_changes_it(tiny_checkpoints, tmp_path,
                                                              monkeypatch):
    data = copy_sst2(tmp_path / "data")
    base = [f"model.path={tiny_checkpoints['cls2']}", "save_model=false",
            f"task.local_dir={data}", f"paths.cache_dir={tmp_path}/cache", *FAST]
    n = iter(range(100))

    def hit(*extra):
        return run([*base, *extra], tmp_path / f"r{next(n)}")["fisher_cache"]["hit"]

    assert hit() is False
    assert hit("constraint=0.4") is True  # another constraint: the same Fisher
    assert hit("seed=1") is False
    assert hit("prune.num_samples=48") is False
    assert hit("prune.sampling=official") is False
    assert hit("prune.batch_size=8") is False
    assert hit("task.max_seq_length=32") is False
    assert hit("prune.importance=fisher_unlabeled") is False
    # the same data at another place: a hit; corrected data at the same place: a miss
    moved = copy_sst2(tmp_path / "moved")
    assert hit(f"task.local_dir={moved}") is True
    copy_sst2(tmp_path / "fixed", flip_row=5)
    assert hit(f"task.local_dir={tmp_path / 'fixed'}") is False
    # another label mapping of the same file
    assert hit("task.label_values=[1,0]") is False
    # the device and the dtype the gradients are taken in
    monkeypatch.setattr("experiments.runner.autocast_dtype", lambda d, a: torch.bfloat16)
    assert hit() is False
    monkeypatch.undo()
    monkeypatch.setattr("experiments.runner.device_name", on_another_device)
    assert hit() is False
    monkeypatch.undo()
    # other code of the Fisher stage (its source digest)
    monkeypatch.setattr("experiments.runner.code_digest", lambda files: "0ther")
    assert hit() is False


def on_another_device(device: str) -> str:
    """The device's name as it would be on a GPU (the run itself stays on the CPU)."""
    return "NVIDIA GPU X"


def source_copy(root, patterns=None):
    """The project's source (what the code digest covers, or ``patterns``) copied under
    ``root``."""
    import shutil

    from experiments.identity import CODE_FILES, ROOT, source_files

    for path in source_files(patterns or CODE_FILES):
        target = root / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return root


def test_a_changed_line_of_the_library_reruns_the_sweep(tiny_checkpoints, tmp_path,
                                                        monkeypatch):
    """The record names the digest of the source that made it: changing one line of
    ``prune/tune.py`` makes the next run redo the work instead of skipping it (the old record
    kept beside), while the Fisher cache, which does not depend on tuning, still hits."""
    from experiments.identity import code_digest

    source = source_copy(tmp_path / "src")
    monkeypatch.setattr("experiments.identity.ROOT", source)
    data = copy_sst2(tmp_path / "data")
    out = tmp_path / "run"
    base = [f"model.path={tiny_checkpoints['cls2']}", "save_model=false",
            f"task.local_dir={data}", f"paths.cache_dir={tmp_path}/cache", *FAST]
    first = run(base, out)
    assert first["identity"]["code"]["digest"] == code_digest(root=source)
    assert run(base, out)["timings"] == first["timings"]  # the same code: skipped
    tune = source / "prune" / "tune.py"
    text = tune.read_text()
    assert "max_scale: float = 10.0" in text
    tune.write_text(text.replace("max_scale: float = 10.0", "max_scale: float = 10.5", 1))
    again = run(base, out)
    assert again["identity"]["code"]["digest"] != first["identity"]["code"]["digest"]
    assert again["timings"] != first["timings"]  # redone
    assert len(list(out.glob("results.stale-*.json"))) == 1
    assert again["fisher_cache"]["hit"] is True


def test_finished_runs_are_rerun_when_an_input_changes(tiny_checkpoints, tmp_path, monkeypatch):
    """A finished run directory is skipped only for the same settings, data, checkpoint,
    device and code; anything else re-runs it, keeping the old record beside it."""
    data = copy_sst2(tmp_path / "data")
    out = tmp_path / "run"
    base = [f"model.path={tiny_checkpoints['cls2']}", "save_model=false",
            f"task.local_dir={data}", *FAST]
    first = run(base, out)
    assert run([*base, "progress=true"], out) == first  # reporting only: skipped
    copy_sst2(tmp_path / "fixed", flip_row=5)
    again = run([*base, f"task.local_dir={tmp_path / 'fixed'}"], out)
    assert again["identity"]["data"] != first["identity"]["data"]
    assert len(list(out.glob("results.stale-*.json"))) == 1
    base = [*base, f"task.local_dir={tmp_path / 'fixed'}"]
    monkeypatch.setattr("experiments.identity.code_digest", lambda *a, **k: "0ther")
    assert run(base, out)["identity"]["code"]["digest"] == "0ther"
    monkeypatch.setattr("experiments.runner.device_name", on_another_device)
    assert run(base, out)["identity"]["device"] == "NVIDIA GPU X"
    assert len(list(out.glob("results.stale-*.json"))) == 3


def test_latency_table_options_do_not_rerun_a_flops_run(tiny_checkpoints, tmp_path):
    """The lookup table's options change only latency-constrained results: a FLOPs run is
    skipped after they change, also when its record still names them (older records)."""
    from experiments.config import used_settings

    base = [f"model.path={tiny_checkpoints['cls2']}", "save_model=false", *FAST]
    first = run(base, tmp_path)
    assert "table_min_run_time" not in first["identity"]["settings"]["latency"]
    older = json.loads((tmp_path / "results.json").read_text())
    older["identity"]["settings"]["latency"].update(table_points=8, table_min_run_time=0.5)
    (tmp_path / "results.json").write_text(json.dumps(older))
    assert run([*base, "latency.table_min_run_time=2"], tmp_path) == older  # skipped
    assert not list(tmp_path.glob("results.stale-*.json"))
    settings = {"constraint_kind": "latency", "latency": {"table_points": 8, "seq_len": 128}}
    assert used_settings(settings) == settings  # a latency run depends on its table
    assert used_settings({**settings, "constraint_kind": "flops"})["latency"] == {"seq_len": 128}


def test_fine_tune_option_added_later_does_not_split_or_rerun_at_its_default(tiny_checkpoints,
                                                                             tmp_path):
    """``group_by_length`` was added to the fine-tune settings after records existed: at its
    default (false) a record that names it and one that does not are the same setting, so the
    run is skipped and the tables do not split; set to true it is a different setting."""
    from experiments.config import used_identity, used_settings

    base = [f"model.path={tiny_checkpoints['cls2']}", "save_model=false", *FAST]
    first = run(base, tmp_path)
    assert "group_by_length" not in first["identity"]["settings"]["model"]["finetune"]
    named = json.loads((tmp_path / "results.json").read_text())
    named["identity"]["settings"]["model"]["finetune"]["group_by_length"] = False
    (tmp_path / "results.json").write_text(json.dumps(named))
    assert run(base, tmp_path) == named  # skipped
    assert used_identity(named["identity"]) == used_identity(first["identity"])
    model = {"finetune": {"epochs": 1, "group_by_length": False},
             "finetune_tasks": {"rte": {"epochs": 3, "group_by_length": False}}}
    assert used_settings({"model": model, "task": {"name": "rte"}})["model"] == {
        "finetune": {"epochs": 3}}
    assert used_settings({"model": model, "task": {"name": "sst2"}})["model"] == {
        "finetune": {"epochs": 1}}
    model["finetune_tasks"]["rte"]["group_by_length"] = True
    assert used_settings({"model": model, "task": {"name": "rte"}})["model"]["finetune"][
        "group_by_length"]


def test_identity_holds_only_the_fine_tune_of_its_own_task():
    """A run depends on the fine-tune of its task, not on the other tasks' settings: moving an
    option from the per-task entries to the shared block (same effective settings) keeps the
    identity, changing what another task's fine-tune uses does not touch it, and changing
    its own task's does."""
    from experiments.config import used_settings

    def model(shared, **tasks):
        return {"model": {"name": "m", "finetune": {"epochs": 1, "lr": 1e-4, **shared},
                          "finetune_tasks": tasks}, "task": {"name": "rte"}, "seed": 0}

    before = used_settings(model({}, rte={"epochs": 3, "group_by_length": True},
                                 stsb={"epochs": 3, "group_by_length": True}))
    moved = used_settings(model({"group_by_length": True}, rte={"epochs": 3},
                                stsb={"epochs": 3}))
    assert before == moved
    assert before["model"]["finetune"] == {"epochs": 3, "lr": 1e-4, "group_by_length": True}
    assert used_settings(before) == before  # a stored identity compares as it was written
    other = used_settings(model({"group_by_length": True}, rte={"epochs": 3},
                                stsb={"epochs": 5}))
    assert other == before
    own = used_settings(model({"group_by_length": True}, rte={"epochs": 2}, stsb={"epochs": 3}))
    assert own != before


def test_existing_result_of_another_configuration_is_rerun_and_kept(tiny_checkpoints, tmp_path):
    base = [f"model.path={tiny_checkpoints['cls2']}", "save_model=false", *FAST]
    first = run(base, tmp_path)
    again = run([*base, "prune.tune_damp=0.05"], tmp_path)
    assert again["config"]["prune"]["tune_damp"] == 0.05
    stale = list(tmp_path.glob("results.stale-*.json"))
    assert len(stale) == 1 and json.loads(stale[0].read_text()) == first


@pytest.mark.parametrize("stage", ["prune.tune=mask", "prune.tune=bias", "prune.tune=weights",
                                   "prune.tune_teacher=ta", "prune.steps=2",
                                   "prune.tune=weights prune.tune_inputs=true"])
def test_a_family_of_constraints_matches_single_runs_with_the_same_fisher(stage,
                                                                          tiny_checkpoints,
                                                                          tmp_path):
    """Every tuning mode (and the teacher-assistant target, iterative pruning, whose first
    step shares the family's Fisher, and the input-side maps) gives a family's constraint
    what a single run at that constraint gives: the same masks, tuned weights, tuning fits
    and results."""
    base = [f"model.path={tiny_checkpoints['cls2']}", f"paths.cache_dir={tmp_path}/cache",
            *stage.split(), *FAST]
    family = run([*base, "constraint=[0.4,0.6]"], tmp_path / "family")
    assert [r["constraint"] for r in family] == [0.4, 0.6]
    assert (tmp_path / "family" / "family.png").exists()
    summary = json.loads((tmp_path / "family" / "family.json").read_text())
    assert [r["constraint"] for r in summary["runs"]] == [0.4, 0.6]
    for record in family:
        path = tmp_path / "family" / f"c{record['constraint']:g}"
        assert json.loads((path / "results.json").read_text())["pruned"] == record["pruned"]
        assert (path / "pruned_model" / "config.json").exists()
        single = run([*base, f"constraint={record['constraint']}"], tmp_path /
                     f"single{record['constraint']}")
        assert single["fisher_cache"]["hit"] is True  # the family's Fisher
        assert single["masks"] == record["masks"] and single["pruned"] == record["pruned"]
        assert single["tune"] == record["tune"] and single["flops"] == record["flops"]
        assert single["config"]["prune"] == record["config"]["prune"]
        a = torch.load(path / "masks.pt")
        b = torch.load(tmp_path / f"single{record['constraint']}" / "masks.pt")
        for which in ("final", "searched"):
            assert torch.equal(a[which]["head"], b[which]["head"]), which
            assert torch.equal(a[which]["neuron"], b[which]["neuron"]), which
        for kind in ("weight", "bias", "inputs"):
            assert a["weights"][kind].keys() == b["weights"][kind].keys(), kind
            for key, tensor in a["weights"][kind].items():
                assert torch.equal(tensor, b["weights"][kind][key]), (kind, key)
        if "prune.tune=bias" in stage or "prune.tune=weights" in stage:
            assert a["weights"]["bias"], f"{stage} must tune some projection's bias"
            check = record["tune"]["output"]  # the output check on held-out samples
            assert check["before"] > 0 and check["chosen"] in check, check
        if "prune.tune=weights" in stage:
            assert a["weights"]["weight"], f"{stage} must rewrite some projection"
        assert bool(a["weights"]["inputs"]) == ("tune_inputs" in stage), stage
    # re-running the family skips both finished constraints
    assert run([*base, "constraint=[0.4,0.6]"], tmp_path / "family") == family


def test_demo_fine_tune_cache_is_keyed_on_weights_and_data(tmp_path):
    from experiments.data import TaskSpec
    from experiments.finetune import FinetuneConfig, finetune_key

    data = copy_sst2(tmp_path / "data")
    spec = TaskSpec(name="sst2", kind="classification", num_labels=2, metric="accuracy",
                    text_columns=("sentence",), label_column="label", local_dir=str(data))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"weights-1")
    key = finetune_key(str(base), spec, FinetuneConfig())
    (base / "model.safetensors").write_bytes(b"weights-2")
    assert finetune_key(str(base), spec, FinetuneConfig()) != key
    (base / "model.safetensors").write_bytes(b"weights-1")
    assert finetune_key(str(base), spec, FinetuneConfig()) == key
    copy_sst2(tmp_path / "fixed", flip_row=3)
    fixed = TaskSpec(**{**spec.__dict__, "local_dir": str(tmp_path / "fixed")})
    assert finetune_key(str(base), fixed, FinetuneConfig()) != key
    assert finetune_key(str(base), spec, FinetuneConfig(epochs=2)) != key
    # the length-grouping option is part of the key when on, and absent when off, so models
    # cached before it existed keep their key
    assert "group_by_length" not in key["config"]
    assert finetune_key(str(base), spec, FinetuneConfig(group_by_length=True)) != key


def test_fine_tune_cache_is_keyed_on_the_training_code(tmp_path, monkeypatch):
    """No version to bump by hand: one changed line of the training loop changes the key
    (the cached model is trained again); a change to the pruning library does not."""
    from experiments.data import TaskSpec
    from experiments.finetune import FinetuneConfig, finetune_key
    from experiments.identity import CODE_FILES, FINETUNE_FILES

    source = source_copy(tmp_path / "src", CODE_FILES + FINETUNE_FILES)
    monkeypatch.setattr("experiments.identity.ROOT", source)
    data = copy_sst2(tmp_path / "data")
    spec = TaskSpec(name="sst2", kind="classification", num_labels=2, metric="accuracy",
                    text_columns=("sentence",), label_column="label", local_dir=str(data))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    key = finetune_key(str(base), spec, FinetuneConfig())
    tune = source / "prune" / "tune.py"
    tune.write_text(tune.read_text() + "\n# a comment\n")
    assert finetune_key(str(base), spec, FinetuneConfig()) == key
    loop = source / "experiments" / "finetune.py"
    text = loop.read_text()
    assert "WINDOW = " in text
    loop.write_text(text.replace("WINDOW = ", "WINDOW = 1 + ", 1))
    assert finetune_key(str(base), spec, FinetuneConfig()) != key


def test_length_grouped_batches_are_a_seeded_permutation_with_less_padding():
    import numpy as np

    from experiments.finetune import FinetuneConfig, length_grouped

    lengths = np.random.default_rng(1).integers(5, 128, size=1000)
    chosen = np.arange(3, 1000, 2)  # a subset: only these indices may appear, each once
    order = length_grouped(lengths, chosen, 32, np.random.default_rng(0), window=4)
    assert sorted(order.tolist()) == chosen.tolist()
    again = length_grouped(lengths, chosen, 32, np.random.default_rng(0), window=4)
    assert np.array_equal(order, again)
    assert not np.array_equal(order, length_grouped(lengths, chosen, 32,
                                                    np.random.default_rng(1), window=4))

    def padded(o):
        return sum(lengths[o[i:i + 32]].max() * len(o[i:i + 32]) for i in range(0, len(o), 32))

    shuffled = np.random.default_rng(0).permutation(chosen)
    assert padded(order) < 0.8 * padded(shuffled)
    # only the last batch may be short (batches are cut from the order in runs of 32)
    assert len(chosen) % 32 != 0 and all(
        len(order[i:i + 32]) == 32 for i in range(0, len(order) - len(order) % 32, 32))
    with pytest.raises(TypeError, match="group_by_length"):
        FinetuneConfig(group_by_length="yes")


def test_masks_and_cost_length_do_not_depend_on_the_evaluation_subset(tiny_checkpoints,
                                                                       tmp_path):
    """The cost model's length is measured once on the whole dev set: evaluating on a subset
    (or another seed's subset) changes neither it nor the masks; both lengths are recorded."""
    base = [f"model.path={tiny_checkpoints['cls2']}", "save_model=false",
            f"paths.cache_dir={tmp_path}/cache", *FAST]
    a = run([*base, "eval.max_samples=32"], tmp_path / "a")
    b = run([*base, "eval.max_samples=200"], tmp_path / "b")
    assert a["num_eval"] == 32 and b["num_eval"] == 200
    assert a["seq_len"] == b["seq_len"] == a["seq_len_measured"]
    assert a["seq_len_official"] == 25.16
    assert a["masks"] == b["masks"] and a["flops"] == b["flops"]
    official = run([*base, "prune.seq_len=official"], tmp_path / "c")
    assert official["seq_len"] == 25.16 and official["seq_len_measured"] == a["seq_len"]


def test_unlabeled_text_file_is_a_sample_set(tiny_checkpoints, tmp_path):
    """Label-free pruning from a plain text file (one example per line): the Fisher under the
    model's own predictions, one row per sample; the data's labels are not needed."""
    lines = [line.split("\t")[0] for line in
             (SHARED / "glue" / "SST-2" / "dev.tsv").read_text().split("\n")[1:200] if line]
    text = tmp_path / "unlabeled.txt"
    text.write_text("\n".join(lines) + "\n")
    record = run([f"model.path={tiny_checkpoints['cls2']}", "prune.importance=fisher_unlabeled",
                  f"prune.sample_file={text}", "save_model=false", *FAST], tmp_path / "run")
    assert record["fisher_cache"]["rows"] == "sample" and record["num_samples"] == 64
    assert record["identity"]["data"]["sample_file"]  # the file's content is in the identity
    assert record["flops"]["ratio"] <= 0.6 + 1e-9
