import numpy as np
import pytest
from conftest import SHARED

from experiments.data import (
    TaskSpec,
    check_data,
    load_examples,
    make_batches,
    sample_indices,
    tokenize,
)
from experiments.errors import RunError
from experiments.metrics import compute_metrics

SST2 = TaskSpec(name="sst2", kind="classification", num_labels=2, metric="accuracy",
                text_columns=("sentence",), label_column="label",
                local_dir=str(SHARED / "glue" / "SST-2"), hub_path="nyu-mll/glue", hub_name="sst2")
STSB = TaskSpec(name="stsb", kind="regression", num_labels=1, metric="pearson_spearman",
                text_columns=("sentence1", "sentence2"), label_column="score",
                local_dir=str(SHARED / "glue" / "STS-B"),
                train_files=("train.tsv", "train-subset.tsv"))


def test_real_sst2_files_load_completely():
    train, dev = load_examples(SST2, "train"), load_examples(SST2, "eval")
    assert len(train.texts) == 67349 and len(dev.texts) == 872  # the published split sizes
    assert int((train.labels == 1).sum()) == 37569 and int((train.labels == 0).sum()) == 29780
    assert not any("\r" in t[0] for t in train.texts)
    assert dev.texts[0] == ("one long string of cliches .",)


def test_real_stsb_files_load_with_the_subset_fallback():
    train, dev = load_examples(STSB, "train"), load_examples(STSB, "eval")
    assert train.source.endswith("train-subset.tsv") and len(train.texts) == 4249
    assert len(dev.texts) == 1500 and dev.labels.dtype == np.float32
    assert dev.labels.min() >= 0 and dev.labels.max() <= 5
    assert dev.texts[0] == ("A man is playing the cello.", "A man seated is playing the cello.")


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
