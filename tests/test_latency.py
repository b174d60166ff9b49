"""Latency: measurement, the lookup table and its cache, the latency-constrained search, and
offline W&B logging."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_run import FAST, run

from prune import PruneError, get_adapter
from prune.latency import (
    LatencyTable,
    build_latency_table,
    cached_latency_table,
    fit_piecewise,
    measure_latency,
)
from prune.search import search_masks


def fake_table(L=3, H=4, N=16) -> LatencyTable:
    """Attention flat up to 2 heads then linear; FFN linear; in milliseconds-ish units."""
    heads = list(range(1, H + 1))
    neurons = [4, 8, 12, 16]
    return LatencyTable(heads, [2.0, 2.0, 3.0, 4.0], neurons, [1.0, 2.0, 3.0, 4.0],
                        layer_base=0.5, fixed=1.0, full=0.0, key={"fake": True})


def test_piecewise_fit_recovers_flat_then_linear():
    x = np.arange(1, 13, dtype=float)
    y = np.maximum(5.0, 1.0 * x + 1.0)  # flat 5 up to x = 4, then slope 1
    t, slope, intercept = fit_piecewise(x, y)
    assert slope == pytest.approx(1.0) and intercept == pytest.approx(1.0)
    assert np.allclose(np.maximum(slope * t + intercept, slope * x + intercept), y)


@pytest.mark.parametrize("constraint", [0.4, 0.5, 0.6, 0.8, 1.0])
def test_latency_search_respects_the_budget_the_table_predicts(constraint):
    table = fake_table()
    g = torch.Generator().manual_seed(0)
    masks = search_masks(torch.rand(3, 4, generator=g), torch.rand(3, 16, generator=g), table,
                         constraint)
    full = table.predict([4] * 3, [16] * 3)
    got = table.predict(masks.heads_per_layer(), masks.neurons_per_layer())
    assert got <= constraint * full * (1 + 1e-9)
    assert got >= constraint * full - 4.0  # close to the budget: little is left unused
    if constraint == 1.0:
        assert masks.head.all() and masks.neuron.all()


def test_latency_search_rejects_an_impossible_budget():
    with pytest.raises(PruneError, match="raise the constraint"):
        search_masks(torch.rand(3, 4), torch.rand(3, 16), fake_table(), 0.05)


def test_table_round_trips_from_cache(tmp_path, monkeypatch):
    model = tiny_model("bert", layers=2)
    adapter = get_adapter(model)
    first = cached_latency_table(model, adapter, tmp_path, batch_size=2, seq_len=8, points=3,
                                 warmup=1, repeats=2)
    files = list(tmp_path.glob("latency-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["batch_size"] == 2

    def no_rebuild(*a, **k):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr("prune.latency.build_latency_table", no_rebuild)
    again = cached_latency_table(model, adapter, tmp_path, batch_size=2, seq_len=8)
    assert again == first
    assert again.predict([4, 4], [48, 48]) == pytest.approx(first.predict([4, 4], [48, 48]))
    monkeypatch.undo()
    other = cached_latency_table(model, adapter, tmp_path, batch_size=3, seq_len=8, points=3,
                                 warmup=1, repeats=2)  # another batch size: another table
    assert other.key != first.key and len(list(tmp_path.glob("latency-*.json"))) == 2


def test_measured_table_is_monotone_and_latency_is_positive():
    model = tiny_model("distilbert", layers=2, hidden=64, ffn=256)
    adapter = get_adapter(model)
    table = build_latency_table(model, adapter, batch_size=4, seq_len=32, points=4, warmup=1,
                                repeats=3)
    assert np.all(np.diff(table.attn_time(np.arange(5))) >= 0)
    assert np.all(np.diff(table.ffn_time(np.arange(257))) >= 0)
    lat = measure_latency(model, batch_size=4, seq_len=32, warmup=1, repeats=3)
    assert 0 < lat.p10 <= lat.median <= lat.p90


def test_latency_constrained_run_end_to_end(tmp_path):
    from conftest import write_tokenizer

    # wide enough that compute, not per-call overhead, dominates its latency
    model = tiny_model("bert", layers=2, heads=4, hidden=128, ffn=1024)
    model.save_pretrained(tmp_path / "ckpt")
    write_tokenizer(tmp_path / "ckpt")
    record = run([f"model.path={tmp_path / 'ckpt'}", "constraint_kind=latency",
                  "constraint=0.8", "latency.table_points=4", *FAST, "latency.batch_size=16",
                  "latency.seq_len=64", "latency.repeats=3"], tmp_path)
    assert record["constraint_kind"] == "latency"
    assert record["latency"]["predicted_ratio"] <= 0.8 + 1e-9
    assert record["latency"]["ratio"] > 0 and record["latency"]["batch_size"] == 16
    assert "latency_table" in record["timings"]


def test_bad_constraint_kind_stops_early(tiny_checkpoints, tmp_path):
    with pytest.raises(PruneError, match="use flops or latency"):
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
