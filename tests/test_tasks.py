"""Every task of the paper: loaders on official-format fixtures, QA post-processing, metrics,
and one end-to-end prune per task with a tiny model."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES, write_tokenizer
from test_run import FAST, config, run

from experiments import squad
from experiments.data import TaskSpec, load_examples

GLUE_ROWS = {"cola": 6, "mrpc": 4, "qqp": 4, "mnli": 4, "qnli": 4, "rte": 4}


def spec_of(task: str) -> TaskSpec:
    from experiments.runner import task_spec

    return task_spec(config([f"task={task}", f"paths.data_dir={FIXTURES}"]).task)


@pytest.mark.parametrize("task", sorted(GLUE_ROWS))
def test_glue_loaders_read_the_official_formats(task):
    spec = spec_of(task)
    train, dev = load_examples(spec, "train"), load_examples(spec, "eval")
    assert len(train.texts) == GLUE_ROWS[task] == len(dev.texts)
    assert all(len(t) == len(spec.text_columns) and all(t) for t in train.texts)
    assert train.labels.dtype == np.int64 and set(train.labels) <= set(range(spec.num_labels))


def test_label_strings_map_to_the_hub_ids():
    mnli = load_examples(spec_of("mnli"), "train")
    assert mnli.labels.tolist() == [1, 0, 0, 2]  # neutral, entailment, entailment, contradiction
    assert load_examples(spec_of("mnli"), "eval:mismatched").labels.tolist() == [2, 0, 0, 1]
    assert load_examples(spec_of("qnli"), "train").labels.tolist() == [1, 1, 0, 0]
    cola = load_examples(spec_of("cola"), "train")
    assert cola.labels.tolist() == [1, 0, 1, 0, 1, 0]
    assert cola.texts[1] == ("They drank the pub.",)


@pytest.mark.parametrize("model", ["minilm", "mpnet"])
@pytest.mark.parametrize("task", ["stsb", "rte", "mrpc", "cola"])
def test_small_tasks_fine_tune_on_all_their_data_at_their_length(model, task):
    """``model.finetune_tasks``: the small tasks train on all their data for 3 epochs, at the
    task's official length (pairs 128, CoLA 64); MPNet's batches stay length-grouped."""
    cfg = config([f"model={model}", f"task={task}"])
    own = cfg.model.finetune_tasks[task]
    assert set(own) <= set(cfg.model.finetune)  # only known fine-tune options
    assert own.train_samples is None and own.epochs == 3
    assert own.max_seq_length == cfg.task.max_seq_length == (64 if task == "cola" else 128)
    assert cfg.model.finetune.group_by_length == (model == "mpnet")


def test_squad_json_reader_keeps_unanswerable_questions():
    v2 = squad.read_squad_json(FIXTURES / "squad" / "dev-v2.0.json")
    assert len(v2) == 7 and sum(not e.answers for e in v2) == 2
    q = next(e for e in v2 if e.id == "q2")
    assert q.answers == ["Levi's Stadium", "Santa Clara, California"]
    assert q.context[q.answer_starts[0]:].startswith("Levi's Stadium")


def test_sliding_window_features_locate_the_answer(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    examples = squad.read_squad_json(FIXTURES / "squad" / "train-v2.0.json")
    feats = squad.make_features(examples, tok, max_length=48, stride=16)
    assert len(feats) > len(examples)  # long contexts are split into several windows
    found = 0
    for f in range(len(feats)):
        ex = examples[feats.example_index[f]]
        s, e = feats.targets["start_positions"][f], feats.targets["end_positions"][f]
        if s == 0:
            continue
        span = ex.context[feats.offsets[f][s][0]:feats.offsets[f][e][1]]
        assert span == ex.answers[0]
        found += 1
    assert found >= 5
    unanswerable = [f for f in range(len(feats)) if not examples[feats.example_index[f]].answers]
    assert all(feats.targets["start_positions"][f] == 0 for f in unanswerable)


def known_logits(feats, f, start, end, null=-5.0):
    n = len(feats.input_ids[f])
    s, t = np.full(n, -10.0), np.full(n, -10.0)
    s[0] = t[0] = null / 2
    if start is not None:
        s[start], t[end] = 5.0, 5.0
    return s, t


def test_postprocessing_turns_known_logits_into_the_known_span(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    examples = squad.read_squad_json(FIXTURES / "squad" / "dev-v2.0.json")
    feats = squad.make_features(examples, tok, max_length=384, stride=128)
    assert len(feats) == len(examples)
    starts, ends = [], []
    for f in range(len(feats)):
        ex = examples[feats.example_index[f]]
        if ex.answers:
            s, t = known_logits(feats, f, feats.targets["start_positions"][f],
                                feats.targets["end_positions"][f])
        else:  # a strong null score
            s, t = known_logits(feats, f, None, None, null=20.0)
        starts.append(s)
        ends.append(t)
    preds = squad.postprocess(examples, feats, starts, ends, version=2)
    assert preds["q1"] == "Denver Broncos" and preds["q5"] == "Rollo"
    assert preds["u1"] == "" and preds["u2"] == ""
    metrics = squad.squad_metrics(examples, preds, version=2)
    assert metrics["exact"] == 1.0 and metrics["f1"] == 1.0
    assert metrics["HasAns_total"] == 5 and metrics["NoAns_total"] == 2
    # v1.1 never predicts the empty answer; an answer too long for max_answer_length is skipped
    v1 = squad.postprocess(examples, feats, starts, ends, version=1, max_answer_length=1)
    assert v1["q5"] == "Rollo" and v1["q1"] != "Denver Broncos"


def test_squad_normalisation_and_scores_match_hand_computed_values():
    assert squad.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert squad.normalize_answer("an apple, a pear") == "apple pear"
    assert squad.normalize_answer("Theater") == "theater"  # only whole-word articles go
    assert squad.exact_match("the Broncos.", "Broncos") == 1.0
    # pred {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert squad.f1("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)
    assert squad.f1("", "") == 1.0 and squad.f1("x", "") == 0.0
    examples = [squad.QAExample("a", "q", "c", ["Denver Broncos", "Broncos"], [0, 7]),
                squad.QAExample("b", "q", "c", [], [])]
    v2 = squad.squad_metrics(examples, {"a": "Broncos team", "b": ""}, version=2)
    # a: EM 0, F1 max(2*(1/2*1/2)/(1), 2*(1/2*1)/(1.5)) = max(0.5, 0.667); b: EM 1, F1 1
    assert v2["exact"] == pytest.approx(0.5)
    assert v2["f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert v2["HasAns_f1"] == pytest.approx(2 / 3) and v2["NoAns_exact"] == 1.0


GLUE_E2E = [("cola", "cls2"), ("mrpc", "cls2"), ("qqp", "cls2"), ("mnli", "cls3"),
            ("qnli", "cls2"), ("rte", "cls2")]
QA_OVERRIDES = ["task.max_seq_length=64", "task.doc_stride=24"]


@pytest.mark.parametrize("task,ckpt", GLUE_E2E + [("squad", "qa"), ("squad_v2", "distil_qa")])
def test_every_task_prunes_end_to_end(tiny_checkpoints, tmp_path, task, ckpt):
    extra = QA_OVERRIDES if task.startswith("squad") else []
    record = run([f"task={task}", f"model.path={tiny_checkpoints[ckpt]}", "constraint=0.5",
                  f"paths.data_dir={FIXTURES}", *extra, *FAST], tmp_path)
    assert record["flops"]["ratio"] <= 0.5 + 1e-9
    key = record["metric"]
    assert 0.0 <= record["pruned"][key] <= 1.0 or key == "mcc"
    if task == "mnli":
        assert "mismatched/accuracy" in record["pruned"]
    if task == "squad_v2":
        assert {"HasAns_f1", "NoAns_exact"} <= set(record["pruned"])
    from prune import load_pruned

    model = load_pruned(tmp_path / "pruned_model")
    assert type(model).__name__.endswith("ForQuestionAnswering") == task.startswith("squad")
    assert torch.is_tensor(next(model.parameters()))


def test_qa_task_refuses_a_classification_checkpoint(tiny_checkpoints, tmp_path):
    from experiments.errors import RunError

    with pytest.raises(RunError, match="ForQuestionAnswering checkpoint"):
        run(["task=squad", f"model.path={tiny_checkpoints['cls2']}", f"paths.data_dir={FIXTURES}",
             *FAST], tmp_path)
