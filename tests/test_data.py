import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED

from experiments.data import (
    TaskSpec,
    check_data,
    load_examples,
    make_batches,
    read_tsv,
    sample_indices,
    tokenize,
)
from experiments.errors import RunError
from experiments.metrics import METRICS, compute_metrics

SST2 = TaskSpec(name="sst2", kind="classification", num_labels=2, metric="accuracy",
                text_columns=("sentence",), label_column="label",
                local_dir=str(SHARED / "glue" / "SST-2"), hub_path="nyu-mll/glue", hub_name="sst2")
def real_spec(task: str) -> TaskSpec:
    """The task as ``conf/task/<task>.yaml`` defines it, on ../shared/data."""
    from test_run import config

    from experiments.runner import task_spec

    return task_spec(config([f"task={task}", f"paths.data_dir={SHARED}"]).task)


# ../shared/data/README.md (version 2): rows and label counts in label-id order (SST-2, MRPC,
# CoLA: 0, 1; RTE: entailment, not_entailment). MRPC and CoLA train label counts, not in the
# README, are GLUE's published ones (MRPC 67.4% paraphrases, CoLA 70.4% acceptable).
REAL = {
    "sst2": {"train": (67349, [29780, 37569]), "eval": (872, [428, 444])},
    "stsb": {"train": (5749, None), "eval": (1500, None)},
    "rte": {"train": (2490, [1249, 1241]), "eval": (277, [146, 131])},
    "mrpc": {"train": (3668, [1194, 2474]), "eval": (408, [129, 279])},
    "cola": {"train": (8551, [2528, 6023]), "eval": (1043, [322, 721])},
}
# one row of each dev file, as GLUE distributes it (its position in the file)
DEV_ROWS = {
    "sst2": (0, ("it 's a charming and often affecting journey .",), 1),
    "stsb": (0, ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing."),
             5.0),
    "rte": (0, ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer "
                "at age 44, according to the Christopher Reeve Foundation.",
                "Christopher Reeve had an accident."), 1),
    "mrpc": (0, ("He said the foodservice pie business doesn 't fit the company 's long-term "
                 "growth strategy .", '" The foodservice pie business does not fit our '
                 'long-term growth strategy .'), 1),
    "cola": (-1, ("John talked to Bill about himself.",), 1),  # the last line has no newline
}


@pytest.mark.parametrize("task", sorted(REAL))
def test_real_glue_files_load_completely(task, caplog):
    """Every v2 file of ../shared/data read as GLUE distributes it, through the task's config:
    the published row and label counts, no row skipped or warned about."""
    spec = real_spec(task)
    for split, (rows, counts) in REAL[task].items():
        examples = load_examples(spec, split)
        assert Path(examples.source).parent == SHARED / "glue" / Path(spec.local_dir).name
        assert Path(examples.source).name == {"train": "train.tsv", "eval": "dev.tsv"}[split]
        assert len(examples.texts) == len(examples.labels) == rows
        assert all(len(t) == len(spec.text_columns) and all(t) for t in examples.texts)
        assert not any(f != f.strip() for t in examples.texts for f in t)
        if counts is None:  # STS-B: scores in 0..5
            assert examples.labels.dtype == np.float32
            assert examples.labels.min() >= 0 and examples.labels.max() <= 5
        else:
            assert np.bincount(examples.labels, minlength=2).tolist() == counts
    index, texts, label = DEV_ROWS[task]
    dev = load_examples(spec, "eval")
    assert dev.texts[index] == texts and dev.labels[index] == label
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_mrpc_byte_order_mark_is_not_part_of_the_first_column():
    path = SHARED / "glue" / "MRPC" / "dev.tsv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    columns, rows = read_tsv(path)
    assert columns == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    assert len(rows) == 408 and rows[0][0] == 2


def test_cola_has_no_header_and_keeps_its_last_unterminated_line():
    path = SHARED / "glue" / "CoLA" / "dev.tsv"
    assert not path.read_bytes().endswith(b"\n")
    spec = real_spec("cola")
    assert not spec.header and spec.metric == "mcc" and spec.max_seq_length == 64
    columns, rows = read_tsv(path, spec.header, spec.column_names)
    assert rows[0][0] == 1 and rows[-1][0] == 1043 and rows[0][1][0] == "gj04"


def test_task_configs_use_the_glue_metrics_and_files():
    assert real_spec("mrpc").metric == "accuracy_f1"
    assert METRICS["accuracy_f1"] == ("accuracy", "f1")
    assert METRICS[real_spec("cola").metric] == ("mcc",)
    assert real_spec("stsb").train_files == ("train.tsv",)  # v2 ships the complete train split
    assert real_spec("sst2").max_seq_length == 64 and real_spec("mrpc").max_seq_length == 128


def test_missing_columns_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\nfine film\t1\n")
    (tmp_path / "dev.tsv").write_text("text\tlabel\nbad film\t0\n")
    spec = TaskSpec(**{**SST2.__dict__, "local_dir": str(tmp_path)})
    with pytest.raises(RunError, match=r"train.tsv lacks column\(s\) \['sentence'\]"):
        check_data(spec)


def test_missing_files_offline_fail_fast_with_both_fixes(tmp_path):
    spec = TaskSpec(**{**SST2.__dict__, "local_dir": str(tmp_path / "nowhere")})
    with pytest.raises(RunError, match="offline"):
        check_data(spec)


def test_sampling_is_seeded_and_without_replacement_by_default():
    a, b = sample_indices(100, 40, seed=3), sample_indices(100, 40, seed=3)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 40
    assert not np.array_equal(a, sample_indices(100, 40, seed=4))
    assert len(sample_indices(10, 50, seed=0)) == 10
    assert len(sample_indices(10, 50, seed=0, sampling="with")) == 50


def test_batches_pad_dynamically(tmp_path):
    from conftest import write_tokenizer
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    feats = tokenize(load_examples(SST2, "eval"), tok, 128)
    batches = make_batches(feats, [0, 1, 2], batch_size=2)
    assert batches[0]["input_ids"].shape[1] == max(len(feats.input_ids[i]) for i in (0, 1))
    assert batches[0]["attention_mask"].sum() == len(feats.input_ids[0]) + len(feats.input_ids[1])
    assert batches[1]["labels"].tolist() == [int(feats.labels[2])]


def test_metrics_match_hand_computed_values():
    preds, labels = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    assert compute_metrics("accuracy", preds, labels) == {"accuracy": 0.75}
    f1 = compute_metrics("accuracy_f1", preds, labels)["f1"]
    assert f1 == pytest.approx(0.8)  # P = 2/3, R = 1
    mcc = compute_metrics("mcc", preds, labels)["mcc"]
    assert mcc == pytest.approx(2 / np.sqrt(12))  # (TP*TN - FP*FN) / sqrt(3*2*1*2)
    r = compute_metrics("pearson_spearman", np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]))
    assert r["pearson"] == pytest.approx(0.5) and r["spearmanr"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        compute_metrics("bleu", preds, labels)
