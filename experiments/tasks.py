"""A task's data ready for pruning: the sample set, the evaluation sets, and how to score them.

``build_task_data`` hides the difference between GLUE (one example, one sequence) and SQuAD (one
question, several sliding-window features whose logits are post-processed into answer text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from experiments import squad
from experiments.data import (
    TaskSpec,
    find_local_file,
    load_examples,
    local_fix,
    make_batches,
    read_text_samples,
    require_hub,
    sample_indices,
    tokenize,
)
from experiments.evaluation import evaluate, predict_qa
from experiments.hub import hub_dataset


@dataclass
class EvalSet:
    batches: list[dict]
    size: int  # examples scored
    examples: list | None = None  # QA: the questions
    features: object | None = None  # QA: features in batch order
    order: np.ndarray | None = None  # QA: feature indices in batch order


@dataclass
class TaskData:
    sample_batches: list[dict]
    num_samples: int
    max_length: int
    dev_mean_length: float  # mean tokens per sequence (per feature for QA) over the whole dev set
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)  # "eval", "eval:mismatched"
    labelled: bool = True  # False for a text sample file (unlabeled importance only)


def load_qa_examples(spec: TaskSpec, split: str) -> list[squad.QAExample]:
    path = find_local_file(spec, split)
    if path is not None:
        return squad.read_squad_json(Path(path))
    require_hub(spec, split)
    return squad.from_hub_rows(hub_dataset(spec.hub_path, spec.hub_name, spec.hub_split(split),
                                           local_fix(spec, split)))


def _seeded_subset(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    return np.sort(sample_indices(n, max_samples, seed)) if max_samples else np.arange(n)


def build_task_data(spec: TaskSpec, tokenizer, num_samples: int, seed: int,
                    sampling: str = "without", batch_size: int = 32,
                    eval_batch_size: int = 128, eval_max_samples: int | None = None,
                    max_length: int | None = None,
                    sample_file: str | None = None) -> TaskData:
    """Tokenise the training split (or the text ``sample_file``), draw the seeded sample set,
    and prepare every eval set. ``dev_mean_length`` is measured on the whole dev set, so that
    the cost model does not depend on ``eval_max_samples`` or the seed."""
    max_length = max_length or spec.max_seq_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if sample_file:
        train = tokenize(read_text_samples(sample_file, spec), tokenizer, max_length)
    elif spec.kind == "qa":
        train = squad.make_features(load_qa_examples(spec, "train"), tokenizer, max_length,
                                    spec.doc_stride)
    else:
        train = tokenize(load_examples(spec, "train"), tokenizer, max_length)
    samples = sample_indices(len(train), num_samples, seed, sampling)
    data = TaskData(make_batches(train, samples, batch_size, pad), len(samples), max_length,
                    0.0, labelled=not sample_file)
    for split in spec.eval_splits():
        if spec.kind == "qa":
            examples = load_qa_examples(spec, split)
            all_feats = squad.make_features(examples, tokenizer, max_length, spec.doc_stride)
            if split == "eval":
                data.dev_mean_length = float(all_feats.lengths().mean())
            examples = [examples[i] for i in _seeded_subset(len(examples), eval_max_samples,
                                                            seed)]
            feats = squad.make_features(examples, tokenizer, max_length, spec.doc_stride) \
                if eval_max_samples else all_feats
            order = np.argsort(feats.lengths(), kind="stable")
            data.eval_sets[split] = EvalSet(
                make_batches(feats, order, eval_batch_size, pad, with_labels=False),
                len(examples), examples, feats, order)
        else:
            feats = tokenize(load_examples(spec, split), tokenizer, max_length)
            if split == "eval":
                data.dev_mean_length = float(feats.lengths().mean())
            idx = _seeded_subset(len(feats), eval_max_samples, seed)
            idx = idx[np.argsort(feats.lengths()[idx], kind="stable")]
            data.eval_sets[split] = EvalSet(make_batches(feats, idx, eval_batch_size, pad),
                                            len(idx))
    return data


def evaluate_set(model: nn.Module, eval_set: EvalSet, spec: TaskSpec,
                 progress: bool = False) -> dict[str, float]:
    if spec.kind != "qa":
        return evaluate(model, eval_set.batches, spec, progress)
    starts, ends = predict_qa(model, eval_set.batches, progress)
    start_by_feature = [None] * len(eval_set.order)
    end_by_feature = [None] * len(eval_set.order)
    for pos, f in enumerate(eval_set.order):
        start_by_feature[f], end_by_feature[f] = starts[pos], ends[pos]
    preds = squad.postprocess(eval_set.examples, eval_set.features, start_by_feature,
                              end_by_feature, spec.squad_version, spec.n_best,
                              spec.max_answer_length, spec.null_threshold)
    return squad.squad_metrics(eval_set.examples, preds, spec.squad_version)


def evaluate_task(model: nn.Module, data: TaskData, spec: TaskSpec,
                  progress: bool = False) -> dict[str, float]:
    """Metrics of the main eval set; extra sets (MNLI mismatched) as ``<name>/<metric>``."""
    out: dict[str, float] = {}
    for split, eval_set in data.eval_sets.items():
        metrics = evaluate_set(model, eval_set, spec, progress)
        prefix = "" if split == "eval" else split.split(":", 1)[1] + "/"
        out.update({prefix + k: v for k, v in metrics.items()})
    return out
