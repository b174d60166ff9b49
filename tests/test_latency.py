"""Latency: measurement, the lookup table and its cache key, the latency cost model, a
latency-constrained run, and offline W&B logging."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_run import FAST, run

import prune.latency
from experiments.caches import cached_latency_table, latency_table_key
from experiments.errors import RunError
from prune import PruneError, get_adapter
from prune.latency import (
    DTYPES,
    Latency,
    LatencyTable,
    build_latency_table,
    compare_latency,
    fit_piecewise,
    latency_cost,
    measure_latency,
    precision,
)


def test_piecewise_fit_recovers_flat_then_linear():
    x = np.arange(1, 13, dtype=float)
    y = np.maximum(5.0, 1.0 * x + 1.0)  # flat 5 up to x = 4, then slope 1
    curve = fit_piecewise(x, y)
    assert curve.slope == pytest.approx(1.0) and curve.threshold == 4
    assert curve.flat == pytest.approx(5.0)
    assert np.allclose(curve(x), y)
    assert curve(0) == 0.0  # no unit, no cost


def fake_table(full: float = 26.5) -> LatencyTable:
    return LatencyTable(heads=[1, 2, 3, 4], attn=[2.0, 2.0, 3.0, 4.0], neurons=[4, 8, 12, 16],
                        ffn=[1.0, 2.0, 3.0, 4.0], empty=2.5, full=full,
                        num_layers=3, num_heads=4, num_neurons=16)


def test_latency_cost_predicts_from_the_table():
    cost = latency_cost(fake_table())
    # the emptied model + 3 x (attention with 4 heads + FFN with 16 neurons)
    assert cost.full == pytest.approx(1.0 + 3 * 0.5 + 3 * (4.0 + 4.0))
    assert cost.total([0, 0, 0], [0, 0, 0]) == pytest.approx(2.5)
    assert cost.total([1, 0, 0], [0, 0, 0]) == pytest.approx(2.5 + 2.0)  # the flat part
    assert LatencyTable.from_dict(json.loads(json.dumps(fake_table().to_dict()))) == \
        fake_table()


def test_latency_cost_spreads_the_measured_remainder_over_the_curves():
    # the unpruned model measures 10% more than the emptied model plus its parts
    cost = latency_cost(fake_table(full=2.5 + 1.1 * 24.0))
    assert cost.full == pytest.approx(2.5 + 1.1 * 24.0)  # exact at the measured full model
    assert cost.total([0, 0, 0], [0, 0, 0]) == pytest.approx(2.5)  # and at the emptied one
    assert cost.total([1, 0, 0], [0, 0, 0]) == pytest.approx(2.5 + 1.1 * 2.0)


def steady_timer(adapter):
    """A ``measure_latency`` stand-in that costs each head and neuron a fixed time: a steady
    machine, for tests about what is done with a table rather than about timing itself (real
    timings of a tiny model under load came out with empty/full of 0.40, 36.1 and 0.31)."""
    def units_latency(m, batch_size, seq_len, min_run_time, dtype="float32"):
        return Latency(1.0 + sum(adapter.heads_per_layer(m)) +
                       0.01 * sum(adapter.neurons_per_layer(m)), 0.0, 1, dtype)
    return units_latency


def test_table_round_trips_from_cache_and_every_setting_is_in_its_key(tmp_path, monkeypatch):
    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    monkeypatch.setattr("prune.latency.measure_latency", steady_timer(adapter))
    settings = dict(batch_size=2, seq_len=8, points=3, min_run_time=0.01)
    first = cached_latency_table(model, adapter, tmp_path, **settings)
    files = list(tmp_path.glob("latency-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["batch_size"] == 2

    def no_rebuild(*a, **k):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr("experiments.caches.build_latency_table", no_rebuild)
    assert cached_latency_table(model, adapter, tmp_path, **settings) == first
    base = latency_table_key(model, adapter, **settings)
    changed = {
        "batch_size": latency_table_key(model, adapter, **{**settings, "batch_size": 3}),
        "points": latency_table_key(model, adapter, **{**settings, "points": 4}),
        "min_run_time": latency_table_key(model, adapter, **{**settings, "min_run_time": 1}),
    }
    monkeypatch.setattr("prune.runtime.cpu_name", lambda: "Another CPU @ 1.0GHz")
    changed["cpu"] = latency_table_key(model, adapter, **settings)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    changed["threads"] = latency_table_key(model, adapter, **settings)
    monkeypatch.undo()
    eager = tiny_model("bert", layers=2, attn="eager")
    changed["attention"] = latency_table_key(eager, get_adapter(eager), **settings)
    for dtype in DTYPES[1:]:
        changed[dtype] = latency_table_key(model, adapter, **settings, dtype=dtype)
    for what, key in changed.items():
        assert key != base, what
    assert base["device"].startswith("cpu:") and base["device"] != "cpu:"
    # a different setting is a different table, measured anew
    monkeypatch.setattr("experiments.caches.build_latency_table", no_rebuild)
    with pytest.raises(AssertionError, match="cached table"):
        cached_latency_table(model, adapter, tmp_path, **{**settings, "min_run_time": 0.02})


def test_measured_table_is_monotone_and_latency_is_positive():
    model = tiny_model("distilbert", layers=2, hidden=64, ffn=256)
    adapter = get_adapter(model)
    table = build_latency_table(model, adapter, batch_size=4, seq_len=32, points=4,
                                min_run_time=0.02)
    cost = latency_cost(table)
    assert np.all(np.diff(cost.attn(np.arange(5))) >= 0)
    assert np.all(np.diff(cost.ffn(np.arange(257))) >= 0)
    lat = measure_latency(model, batch_size=4, seq_len=32, min_run_time=0.05)
    assert 0 < lat.median and lat.iqr >= 0 and lat.measurements >= 1


def test_bfloat16_table_and_measurement_time_a_cast_copy_and_leave_the_model_float32(
        monkeypatch):
    """Item 3 of issue 22: latency in the deployment dtype. The timed models are bfloat16 (on
    CPU too), the measurement and the table say so, and the caller's model keeps its float32
    weights, unchanged."""
    model = tiny_model("bert", layers=2, heads=4, hidden=32, ffn=64)
    adapter = get_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timed_dtypes = []
    real_inputs = prune.latency.dummy_inputs

    def spy(m, *args):
        timed_dtypes.append(next(m.parameters()).dtype)
        return real_inputs(m, *args)

    monkeypatch.setattr("prune.latency.dummy_inputs", spy)
    lat = measure_latency(model, batch_size=2, seq_len=8, min_run_time=0.01, dtype="bfloat16")
    assert lat.dtype == "bfloat16" and lat.median > 0
    table = build_latency_table(model, adapter, batch_size=2, seq_len=8, points=2,
                                min_run_time=0.01, dtype="bfloat16")
    assert table.dtype == "bfloat16" and table.full > 0
    assert LatencyTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    assert timed_dtypes and set(timed_dtypes) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert adapter.heads_per_layer(model) == [4, 4]
    # float32 and tf32 time the model itself (no copy); on CPU tf32 is float32
    timed_dtypes.clear()
    for dtype in ("float32", "tf32"):
        assert measure_latency(model, 2, 8, 0.01, dtype).dtype == dtype
    assert timed_dtypes == [torch.float32] * 2


def test_a_comparison_says_its_dtype_and_refuses_two():
    base, pruned = Latency(0.5, 0.01, 20, "bfloat16"), Latency(0.25, 0.01, 20, "bfloat16")
    result = compare_latency(base, pruned)
    assert result["dtype"] == "bfloat16" and result["speedup"] == pytest.approx(2.0)
    assert result["pruned"]["dtype"] == "bfloat16"
    assert compare_latency(Latency(0.5, 0.0, 3), Latency(0.4, 0.0, 3))["dtype"] == "float32"
    with pytest.raises(PruneError, match="timed in float32 and the pruned model in bfloat16"):
        compare_latency(Latency(0.5, 0.0, 3), pruned)


def test_dtype_is_part_of_the_table_cache_key(tmp_path, monkeypatch):
    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    monkeypatch.setattr("prune.latency.measure_latency", steady_timer(adapter))
    settings = dict(batch_size=2, seq_len=8, points=3, min_run_time=0.01)
    keys = {d: latency_table_key(model, adapter, **settings, dtype=d) for d in DTYPES}
    assert len({json.dumps(k, sort_keys=True) for k in keys.values()}) == len(DTYPES)
    assert keys["bfloat16"]["dtype"] == "bfloat16"
    assert latency_table_key(model, adapter, **settings) == keys["float32"]  # the default
    # the model's own weights' dtype does not matter: it is timed as a cast copy
    assert latency_table_key(tiny_model("bert", layers=2).double(), adapter, **settings) == \
        keys["float32"]
    bf16 = cached_latency_table(model, adapter, tmp_path, **settings, dtype="bfloat16")
    assert bf16.dtype == "bfloat16"
    saved = [json.loads(f.read_text()) for f in tmp_path.glob("latency-*.json")]
    assert [(s["key"]["dtype"], s["table"]["dtype"]) for s in saved] == [("bfloat16",) * 2]
    assert cached_latency_table(model, adapter, tmp_path, **settings).dtype == "float32"
    assert len(list(tmp_path.glob("latency-*.json"))) == 2  # a miss, measured and stored apart


@pytest.mark.parametrize("dtype", ["fp16", "float64", "half", None])
def test_a_bad_dtype_is_one_line_naming_the_choices(dtype):
    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    calls = [lambda: measure_latency(model, 2, 8, 0.01, dtype),
             lambda: build_latency_table(model, adapter, 2, 8, 2, 0.01, dtype),
             lambda: latency_table_key(model, adapter, 2, 8, 2, 0.01, dtype)]
    for call in calls:
        with pytest.raises(PruneError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and repr(dtype) in message
        assert "float32, tf32, float16, bfloat16" in message


def test_tf32_is_allowed_only_inside_the_block_on_cuda():
    """The CUDA flags are plain switches, so this runs without a GPU: ``tf32`` allows TF32
    matmuls and cuDNN ops, ``float32`` forbids them, both restore the caller's setting; on CPU
    nothing is touched."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [f.allow_tf32 for f in flags]
    try:
        for start in (False, True):
            for f in flags:
                f.allow_tf32 = start
            for dtype, inside in (("tf32", True), ("float32", False), ("bfloat16", start)):
                with precision(dtype, torch.device("cuda")):
                    assert [f.allow_tf32 for f in flags] == [inside] * 2, dtype
                assert [f.allow_tf32 for f in flags] == [start] * 2, dtype
            with precision("tf32", torch.device("cpu")):
                assert [f.allow_tf32 for f in flags] == [start] * 2
    finally:
        for f, value in zip(flags, saved, strict=True):
            f.allow_tf32 = value


def test_a_noise_dominated_table_is_not_cached_and_says_why(tmp_path, monkeypatch, caplog):
    """Timings swamped by another job (the emptied model as slow as the whole one) must not
    become a cached table that makes every later budget look infeasible on this machine."""
    model = tiny_model("bert", layers=2, heads=4, hidden=32, ffn=64)
    adapter = get_adapter(model)
    monkeypatch.setattr("prune.latency.measure_latency",
                        lambda m, b, s, t, d: Latency(0.5, 0.0, 1))  # every model alike
    table = cached_latency_table(model, adapter, tmp_path, batch_size=2, seq_len=8, points=2)
    assert table.is_noise() and table.empty_share() == 1.0
    assert not list(tmp_path.glob("latency-*.json"))
    assert "looks like noise" in caplog.text and "100%" in caplog.text
    assert "not cached" in caplog.text


def test_table_times_whole_models_and_recovers_a_known_latency(monkeypatch):
    """The table times whole physically pruned models (every layer alike); with a timer whose
    answer is a known function of the units kept it recovers that function."""
    model = tiny_model("bert", layers=3, heads=4, hidden=32, ffn=64)
    adapter = get_adapter(model)
    timed = []

    def fake_latency(m, batch_size, seq_len, min_run_time, dtype):
        heads, neurons = adapter.heads_per_layer(m), adapter.neurons_per_layer(m)
        timed.append((heads, neurons))
        both = sum(1 for h, n in zip(heads, neurons, strict=True) if h and n)
        seconds = 1.0 + 0.5 * sum(heads) + 0.01 * sum(neurons) + 0.2 * both
        return Latency(seconds, 0.0, 1)

    monkeypatch.setattr("prune.latency.measure_latency", fake_latency)
    table = build_latency_table(model, adapter, batch_size=2, seq_len=8, points=4)
    assert all(len(set(h)) == 1 and len(set(n)) == 1 for h, n in timed)  # uniform models
    assert ([0] * 3, [0] * 3) in timed and ([4] * 3, [64] * 3) in timed  # emptied and full
    assert adapter.heads_per_layer(model) == [4] * 3  # the model itself is left whole
    cost = latency_cost(table)
    assert table.empty == pytest.approx(1.0)
    assert cost.full == pytest.approx(1.0 + 3 * (2.0 + 0.64 + 0.2))
    scale = (3 * 2.84) / (3 * 2.64)  # the attention-with-FFN remainder, spread in proportion
    assert cost.attn.slope == pytest.approx(0.5 * scale)
    assert cost.ffn.slope == pytest.approx(0.01 * scale)
    assert cost.total([2, 0, 4], [0, 0, 0]) == pytest.approx(1.0 + 3.0 * scale)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "xlm-roberta", "electra",
                                    "mpnet"])
def test_table_is_measured_on_every_family(family):
    """Every architecture's uniformly pruned copies run (MPNet's position bias follows its
    heads), and the original model is left whole."""
    model = tiny_model(family, layers=2, heads=4, hidden=32, ffn=64)
    adapter = get_adapter(model)
    table = build_latency_table(model, adapter, batch_size=2, seq_len=8, points=2,
                                min_run_time=0.01)
    assert table.heads == [1, 4] and table.neurons == [32, 64]
    assert table.empty > 0 and table.full > 0 and min(table.attn + table.ffn) >= 0
    assert adapter.heads_per_layer(model) == [4, 4]
    assert adapter.neurons_per_layer(model) == [64, 64]


def test_latency_constrained_run_end_to_end(tmp_path, monkeypatch):
    from conftest import write_tokenizer

    # wide enough that compute, not per-call overhead, dominates its latency
    model = tiny_model("bert", layers=2, heads=4, hidden=128, ffn=1024)
    model.save_pretrained(tmp_path / "ckpt")
    write_tokenizer(tmp_path / "ckpt")
    # the lookup table from a steady timer (on a loaded machine a real one can come out as
    # noise, and then no budget below 1.0 is reachable); the models' latencies are timed for real
    monkeypatch.setattr("prune.latency.measure_latency", steady_timer(get_adapter(model)))
    record = run([f"model.path={tmp_path / 'ckpt'}", "constraint_kind=latency",
                  "constraint=0.8", "latency.table_points=4", *FAST, "latency.batch_size=16",
                  "latency.seq_len=64"], tmp_path)
    assert record["constraint_kind"] == "latency"
    predicted = record["latency"]["predicted_ratio"]
    assert 0.5 < predicted <= 0.8 + 1e-9  # the budget is used, and not exceeded
    assert record["latency"]["batch_size"] == 16
    assert record["latency"]["pruned"]["median"] > 0 and "iqr" in record["latency"]["pruned"]
    assert "latency_table" in record["timings"]


def test_bad_constraint_kind_stops_early(tiny_checkpoints, tmp_path):
    with pytest.raises(RunError, match="use flops or latency"):
        run([f"model.path={tiny_checkpoints['cls2']}", "constraint_kind=energy", *FAST], tmp_path)


def test_wandb_logs_offline_and_writes_its_files(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    record = run([f"model.path={tiny_checkpoints['cls2']}", "logger=wandb",
                  f"logger.dir={tmp_path}/wb", *FAST], tmp_path)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    assert data, "the offline run file is missing"
    # the logged keys are in the run file (config, metrics, timings, per-layer counts)
    for key in (b"flops/ratio", b"eval/pruned/accuracy", b"time/fisher", b"latency/ratio",
                b"masks/heads_per_layer/0", b"constraint"):
        assert key in data, key
    assert record["flops"]["ratio"] <= 0.6 + 1e-9
