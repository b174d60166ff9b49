"""Bad input, round two: the model and latency rows (issue 24).

A checkpoint without its tokenizer, a half-precision checkpoint, the tool's own pruned checkpoint
given back to it, a config whose head count does not divide its hidden size, a latency table
that is noise, and two jobs computing the same Fisher information. Each either stops with one
line naming the fix or gives a correct result.
"""

import copy
import json
import threading

import pytest
import torch
from conftest import inputs_of, outputs, tiny_batches, tiny_model, write_tokenizer
from test_bad_input import LEAN, Env, no_weights  # noqa: F401 - a fixture
from test_physical import tuned_looking_masks
from test_run import run
from transformers import AutoModel, AutoModelForSequenceClassification

import experiments.caches
from experiments.caches import cached_fisher, cached_latency_table
from experiments.checkpoints import load_model
from experiments.errors import RunError
from prune import (
    Fisher,
    Masks,
    PruneError,
    PruneOptions,
    TuneOptions,
    flops_cost,
    get_adapter,
    load_pruned,
    prune_masks,
    prune_model,
    save_pruned,
    search_masks,
)
from prune.latency import Latency, LatencyTable, compare_latency, is_noisy, latency_cost
from prune.physical import expand_pruned

TOKENIZER_FIX = r"save the tokenizer beside the model: tokenizer.save_pretrained\(dir\)"


# --- 1. a checkpoint saved without its tokenizer ---------------------------------------------


def test_checkpoint_without_tokenizer_stops_before_weights_load(tiny_checkpoints, tmp_path,
                                                               no_weights):  # noqa: F811
    path = tmp_path / "no-tokenizer"
    tiny_model().save_pretrained(path)  # model.save_pretrained alone
    with pytest.raises(RunError, match=f"has no tokenizer files .*; {TOKENIZER_FIX}") as err:
        run([f"model.path={path}", *LEAN], tmp_path / "run")
    assert "\n" not in str(err.value)


def test_tiny_tokenizer_is_refused(tmp_path):
    """Tokenizer files that know only the special tokens: every word would be [UNK]."""
    path = tmp_path / "tiny-tokenizer"
    tiny_model().save_pretrained(path)
    (path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(RunError, match=f"knows only 5 tokens but the model has a vocabulary "
                                       f"of 120.*; {TOKENIZER_FIX}"):
        load_model(str(path))


# --- 2. a float16 / bfloat16 checkpoint --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_prunes_and_keeps_its_dtype(tmp_path, dtype):
    path = tmp_path / "half"
    tiny_model().to(dtype).save_pretrained(path)
    write_tokenizer(path)
    model, tokenizer = load_model(str(path))
    assert next(model.parameters()).dtype == torch.float32  # pruned in float32
    assert model.config.dtype == dtype  # and saved in the checkpoint's dtype
    adapter = get_adapter(model)
    batches = tiny_batches(2)
    result = prune_masks(model, adapter, batches, flops_cost(adapter, 10.0), 0.6,
                         PruneOptions(tune=TuneOptions(mode="weights")), progress=False)
    pruned = prune_model(copy.deepcopy(model), result.masks, adapter, result.weights)
    save_pruned(pruned, tmp_path / "pruned", tokenizer)
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["dtype"] == \
        str(dtype).removeprefix("torch.")
    assert next(pruned.parameters()).dtype == torch.float32  # the model itself is left as is
    reloaded = load_pruned(tmp_path / "pruned")
    assert next(reloaded.parameters()).dtype == dtype
    batch = batches[0]
    expected = outputs(pruned, batch)
    tolerance = 0.05 * expected.abs().max().item() + 1e-2
    assert torch.allclose(outputs(reloaded.float(), batch), expected, atol=tolerance)


# --- 3. the tool's own pruned checkpoint -------------------------------------------------------


def pruned_checkpoint(family: str, path, seed: int = 0):
    """(in-memory pruned model, masks): a tiny model pruned by tuned-looking masks, saved."""
    model = tiny_model(family, layers=3)
    masks = tuned_looking_masks(get_adapter(model), seed=seed)
    pruned = prune_model(model, masks)
    save_pruned(pruned, path)
    return pruned, masks


def test_pruned_checkpoint_loads_with_automodel_and_prunes_again(family, tmp_path):
    pruned, masks = pruned_checkpoint(family, tmp_path / "once")
    batch = tiny_batches(1)[0]
    expected = outputs(pruned, batch)
    task = AutoModelForSequenceClassification.from_pretrained(tmp_path / "once",
                                                              trust_remote_code=True).eval()
    assert torch.allclose(outputs(task, batch), expected, atol=1e-5)
    encoder = AutoModel.from_pretrained(tmp_path / "once", trust_remote_code=True).eval()
    assert type(encoder).__name__.startswith("FastPrune")
    with torch.no_grad():
        hidden = encoder(**inputs_of(batch)).last_hidden_state
        want = pruned.base_model(**inputs_of(batch)).last_hidden_state
    assert torch.allclose(hidden, want, atol=1e-5)
    for loaded in (task, encoder):
        assert get_adapter(loaded).heads_per_layer(loaded) == masks.heads_per_layer()
        assert get_adapter(loaded).neurons_per_layer(loaded) == masks.neurons_per_layer()

    # prune it again: back in full shape (removed units as zeros), same function
    full = expand_pruned(load_pruned(tmp_path / "once"))
    adapter = get_adapter(full)
    assert adapter.heads_per_layer(full) == [4, 4, 4]
    assert torch.allclose(outputs(full, batch), expected, atol=1e-5)
    again = Masks(masks.kept().head.clone(), masks.kept().neuron.clone())
    again.head[2, again.head[2].nonzero()[0]] = 0.0  # one more head goes
    again.neuron[0, again.neuron[0].nonzero()[:3]] = 0.0  # and three neurons
    with apply_masks_of(full, again):
        expected_twice = outputs(full, batch)
    twice = prune_model(full, again)
    assert torch.allclose(outputs(twice, batch), expected_twice, atol=1e-5)
    save_pruned(twice, tmp_path / "twice")
    reloaded = load_pruned(tmp_path / "twice")
    assert torch.allclose(outputs(reloaded, batch), expected_twice, atol=1e-5)
    assert get_adapter(reloaded).heads_per_layer(reloaded) == again.heads_per_layer()
    assert reloaded.config.fastprune_head_index[1] == [1, 3]  # the original head ids


def apply_masks_of(model, masks):
    from prune import apply_masks

    return apply_masks(model, get_adapter(model), masks)


def test_pruned_checkpoint_is_a_model_path_again(tmp_path):
    """Given back as ``model.path``, a pruned checkpoint (with its tokenizer) is pruned again."""
    model = tiny_model("bert", layers=2)
    pruned = prune_model(model, tuned_looking_masks(get_adapter(model)))
    pruned.config.vocab_size = 120
    save_pruned(pruned, tmp_path / "once")
    write_tokenizer(tmp_path / "once")
    loaded, _ = load_model(str(tmp_path / "once"))
    batch = tiny_batches(1)[0]
    assert torch.allclose(outputs(loaded, batch), outputs(pruned, batch), atol=1e-5)
    record = run([f"model.path={tmp_path / 'once'}", *LEAN, "constraint=0.3"], tmp_path / "run")
    assert record["flops"]["ratio"] <= 0.3 + 1e-9
    assert sum(record["masks"]["heads_per_layer"]) <= sum(get_adapter(pruned)
                                                          .heads_per_layer(pruned))


# --- 4. a config whose head count does not divide the hidden size -----------------------------


def test_heads_not_dividing_hidden_size_stops_in_one_line(tiny_checkpoints, tmp_path,
                                                         no_weights):  # noqa: F811
    env = Env(tiny_checkpoints, tmp_path)
    config = json.loads((tiny_checkpoints["cls2"] / "config.json").read_text())
    config["num_attention_heads"] = 5
    with pytest.raises(RunError, match=r"num_attention_heads=5 does not divide hidden_size=32; "
                                       r"fix config.json") as err:
        run([env.checkpoint(config_json=json.dumps(config)), *LEAN], env.out)
    assert "\n" not in str(err.value)


# --- 5. a latency table that is noise ---------------------------------------------------------


def flat_table() -> LatencyTable:
    """The reported table: the emptied model at 58% of the whole, curves that do not rise."""
    return LatencyTable(heads=[1, 2, 4, 8], attn=[0.0105] * 4, neurons=[32, 128, 256],
                        ffn=[0.0105] * 3, empty=0.058, full=0.1, num_layers=2, num_heads=8,
                        num_neurons=256)


def test_flat_latency_table_is_noise_and_never_gives_an_empty_model(monkeypatch, tmp_path,
                                                                     caplog):
    table = flat_table()
    assert table.is_noise() and "flat" in table.noise_reason()
    model = tiny_model("bert", layers=2, heads=8, hidden=32, ffn=256)
    adapter = get_adapter(model)
    monkeypatch.setattr("experiments.caches.build_latency_table", lambda *a: table)
    assert cached_latency_table(model, adapter, tmp_path, 2, 8, 4, 0.01) == table
    assert not list(tmp_path.glob("latency-*.json"))  # not cached
    warning = [r.getMessage() for r in caplog.records if "looks like noise" in r.getMessage()]
    assert len(warning) == 1 and "\n" not in warning[0] and "not cached" in warning[0]
    # at 0.6 nothing fits beside the emptied model's 58%: refused, never an empty model
    masks = search_masks(torch.rand(2, 8), torch.rand(2, 256), latency_cost(table), 0.6)
    with pytest.raises(PruneError, match="keep no head and no neuron.*raise the constraint"):
        prune_model(model, masks)
    assert get_adapter(model).heads_per_layer(model) == [8, 8]  # left whole


def test_cached_table_that_is_noise_is_measured_again(monkeypatch, tmp_path):
    model = tiny_model("bert", layers=2, heads=8, hidden=32, ffn=256)
    adapter = get_adapter(model)
    key = experiments.caches.latency_table_key(model, adapter, 2, 8, 4, 0.01)
    path = tmp_path / f"latency-{experiments.caches.key_hash(key)}.json"
    path.write_text(json.dumps({"key": json.loads(experiments.caches.canonical(key)),
                                "table": flat_table().to_dict()}))
    calls = []
    monkeypatch.setattr("experiments.caches.build_latency_table",
                        lambda *a: calls.append(1) or flat_table())
    cached_latency_table(model, adapter, tmp_path, 2, 8, 4, 0.01)
    assert calls == [1]


def test_table_with_a_large_spread_is_noise():
    table = LatencyTable(heads=[1, 4], attn=[1.0, 4.0], neurons=[8, 16], ffn=[1.0, 2.0],
                         empty=1.0, full=13.0, num_layers=2, num_heads=4, num_neurons=16,
                         spread=1.7)
    assert table.is_noise() and "spread" in table.noise_reason()
    assert not LatencyTable(**{**table.to_dict(), "spread": 0.05}).is_noise()


def test_speedup_whose_spread_exceeds_its_median_is_flagged_noisy():
    base, pruned = Latency(0.5256, 0.01, 20), Latency(0.060, 0.102, 20)  # 8.76x, IQR 102 ms
    assert is_noisy(pruned) and not is_noisy(base)
    assert is_noisy({"median": 0.060, "iqr": 0.102, "measurements": 20})
    result = compare_latency(base, pruned)
    assert result["noisy"] is True and result["spread"] == pytest.approx(1.7)
    assert result["speedup"] == pytest.approx(8.76)
    assert compare_latency(base, base)["noisy"] is False


# --- 6. parallel jobs computing the same Fisher information -----------------------------------


def small_fisher() -> Fisher:
    return Fisher(torch.rand(2, 2, 4), torch.rand(2, 2, 48), 8)


def test_parallel_jobs_compute_the_same_fisher_once(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments.caches, "LOCK_POLL_SECONDS", 0.05)
    calls, started = [], threading.Event()

    def compute() -> Fisher:
        calls.append(1)
        started.set()
        threading.Event().wait(0.5)  # the other job arrives while this one computes
        return small_fisher()

    results = {}

    def job(name):
        results[name] = cached_fisher(tmp_path, {"k": 1}, compute)

    first = threading.Thread(target=job, args=("first",))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=job, args=("second",))
    second.start()
    first.join(30)
    second.join(30)
    assert calls == [1]
    assert results["first"][1] is False and results["second"][1] is True
    assert torch.equal(results["first"][0].head_importance, results["second"][0].head_importance)
    assert not list(tmp_path.glob("*.lock"))


def test_stale_fisher_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    key = {"k": 2}
    lock = tmp_path / f"{experiments.caches.key_hash(key)}.pt.lock"
    lock.write_text(f"{socket.gethostname()}:{dead}")
    fisher, hit = cached_fisher(tmp_path, key, small_fisher)
    assert not hit and not lock.exists()
    assert "stale Fisher cache lock" in caplog.text
    assert cached_fisher(tmp_path, key, lambda: pytest.fail("recomputed"))[1] is True


def test_fisher_lock_is_removed_when_the_computation_fails(tmp_path):
    def fails() -> Fisher:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        cached_fisher(tmp_path, {"k": 3}, fails)
    assert not list(tmp_path.glob("*.lock"))

