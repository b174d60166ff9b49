"""The GPU bench (issue 22, item 4): its quick run on the CPU writes every part with finite
numbers and needs none of the harness's extra packages; on a machine with a GPU, the pipeline
and the quick bench run on ``cuda``."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED, tiny_batches, tiny_model, write_tokenizer

from prune import PruneOptions, TuneOptions, flops_cost, get_adapter, prune_masks, prune_model
from prune.latency import DTYPES, measure_latency

# what the GPU machine lacks: the bench must run with every one of them unimportable
BLOCKED = ("hydra", "omegaconf", "pandas", "datasets", "wandb")


def python_without_extras(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter in which importing any of ``BLOCKED`` fails."""
    prelude = f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_imports_only_the_library_torch_and_transformers():
    res = python_without_extras(
        "import experiments.gpu_bench\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('experiments', 'hydra', "
        "'omegaconf', 'pandas', 'datasets', 'wandb') and sys.modules[m] is not None))")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[-2] == "['experiments', 'experiments.gpu_bench']"


def sst2_files(tmp_path):
    """A tiny fine-tuned-looking checkpoint (random weights, real tokenizer files) and SST-2
    dev / train files of a few dozen sentences from the real dev set."""
    ckpt = tmp_path / "ckpt"
    model = tiny_model("bert", layers=2, heads=4, hidden=32, ffn=64)
    model.save_pretrained(ckpt)
    write_tokenizer(ckpt)
    lines = (SHARED / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").split("\n")
    data = tmp_path / "SST-2"
    data.mkdir()
    (data / "dev.tsv").write_text("\n".join(lines[:25]) + "\n", encoding="utf-8")
    (data / "train.tsv").write_text("\n".join(lines[:1] + lines[25:105]) + "\n",
                                    encoding="utf-8")
    return ckpt, data / "dev.tsv"


def numbers(value, path="") -> list[tuple[str, float]]:
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in numbers(v, f"{path}[{i}]")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(path, float(value))]
    return []


def test_quick_bench_on_cpu_writes_every_part_with_finite_numbers(tmp_path):
    ckpt, dev = sst2_files(tmp_path)
    out = tmp_path / "out"
    res = python_without_extras(
        "from experiments.gpu_bench import main\n"
        f"main(['--quick', '--device', 'cpu', '--out', {str(out)!r}, '--checkpoint', "
        f"{str(ckpt)!r}, '--dev', {str(dev)!r}])")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| dtype | batch |" in res.stdout and "s] latency bfloat16 batch" in res.stdout
    result = json.loads((out / "gpu-bench-quick.json").read_text())
    assert (out / "gpu-bench-quick.md").read_text().startswith("GPU bench on ")
    assert result["machine"]["device"] == "cpu" and result["machine"]["torch"]
    assert result["machine"]["transformers"] and result["quick"] is True
    # (a) the floor and every stage, for both tuning modes
    pruning = result["pruning"]
    assert pruning["floor"] > 0 and set(pruning["modes"]) == {"mask", "weights"}
    for mode in pruning["modes"].values():
        assert {"fisher", "search", "rearrange", "tune", "physical", "total"} <= \
            set(mode["timings"])
        assert mode["total_over_floor"] > 0 and mode["flops_ratio"] <= 0.5 + 1e-9
    # (b) every dtype x batch size x granularity x constraint, aligned rows aligned
    rows = result["latency"]
    assert len(rows) == len(DTYPES) * 2 * 2 * 3
    assert {r["dtype"] for r in rows} == set(DTYPES)
    assert {(r["granularity"], r["constraint"]) for r in rows} == \
        {(g, c) for g in (8, 1) for c in (0.4, 0.5, 0.6)}
    assert all(r["aligned"] for r in rows if r["granularity"] == 8)
    assert all(r["speedup"] > 0 and r["flops_ratio"] <= r["constraint"] + 1e-9 for r in rows)
    # (c) the bfloat16 table and every budget: measured, or refused in one line (a tiny
    # model's table on a loaded CPU can be noise that no budget fits)
    search = result["latency_search"]
    assert search["dtype"] == search["table"]["dtype"] == "bfloat16"
    assert search["table"]["full"] > 0 and search["table_seconds"] > 0
    assert [r["asked"] for r in search["runs"]] == [0.4, 0.5, 0.6, 0.7]
    for run in search["runs"]:
        assert run["measured"] > 0 if "error" not in run else "\n" not in run["error"]
    # (d) the checkpoint at FLOPs 0.5
    check = result["checkpoint"]
    assert 0 <= check["accuracy"]["pruned"] <= 1 and check["dev_sentences"] == 24
    assert check["timings"]["total"] > 0 and check["flops_ratio"] <= 0.5 + 1e-9
    found = numbers(result)
    assert len(found) > 300
    assert [(p, v) for p, v in found if not math.isfinite(v)] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pipeline_and_quick_bench_run_on_cuda(tmp_path):
    """The whole pipeline on ``cuda``: masks, tuning of weights, physical pruning, the pruned
    model's outputs on the GPU, latency in bfloat16 that leaves the model float32, and the
    quick bench."""
    model = tiny_model("bert", layers=2, heads=4, hidden=64, ffn=128).cuda()
    adapter = get_adapter(model)
    batches = tiny_batches(n_batches=4, batch=8, length=16)
    result = prune_masks(model, adapter, batches, flops_cost(adapter, 16), 0.5,
                         PruneOptions(tune=TuneOptions(mode="weights")), progress=False)
    assert result.masks.head.device.type == "cpu"
    prune_model(model, result.masks, adapter, result.weights)
    assert next(model.parameters()).device.type == "cuda"
    assert all(n % 8 == 0 for n in adapter.neurons_per_layer(model))
    with torch.inference_mode():
        logits = model(**{k: v.cuda() for k, v in batches[0].items() if k != "labels"}).logits
    assert logits.is_cuda and torch.isfinite(logits).all()
    flags = torch.backends.cuda.matmul.allow_tf32
    for dtype in DTYPES:
        assert measure_latency(model, 4, 16, 0.05, dtype).median > 0
    assert torch.backends.cuda.matmul.allow_tf32 == flags
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    from experiments.gpu_bench import main

    bench = main(["--quick", "--device", "cuda", "--out", str(tmp_path)])
    assert bench["machine"]["device"] == "cuda" and bench["peak_gpu_memory_gb"] > 0
