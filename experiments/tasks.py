"""A task's data ready for pruning: the sample set, the evaluation sets, and how to score them.

``build_task_data`` hides the difference between GLUE (one example, one sequence) and SQuAD (one
question, several sliding-window features whose logits are post-processed into answer text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from prune import squad
from prune.data import (
    TaskSpec,
    find_local_file,
    load_examples,
    make_batches,
    require_hub,
    sample_indices,
    tokenize,
)
from prune.evaluation import evaluate, predict_qa


@dataclass
class EvalSet:
    batches: list[dict]
    size: int  # examples scored
    mean_length: float  # mean tokens per sequence (feature, for QA)
    examples: list | None = None  # QA: the questions
    features: object | None = None  # QA: features in batch order
    order: np.ndarray | None = None  # QA: feature indices in batch order


@dataclass
class TaskData:
    sample_batches: list[dict]
    num_samples: int
    max_length: int
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)  # "eval", "eval:mismatched"


def load_qa_examples(spec: TaskSpec, split: str) -> list[squad.QAExample]:
    path = find_local_file(spec, split)
    if path is not None:
        return squad.read_squad_json(Path(path))
    require_hub(spec, split)
    import datasets

    return squad.from_hub_rows(datasets.load_dataset(spec.hub_path, spec.hub_name,
                                                     split=spec.hub_split(split)))


def _seeded_subset(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    return sample_indices(n, max_samples, seed) if max_samples else np.arange(n)


def build_task_data(spec: TaskSpec, tokenizer, num_samples: int, seed: int,
                    with_replacement: bool = False, batch_size: int = 32,
                    eval_batch_size: int = 128, eval_max_samples: int | None = None,
                    max_length: int | None = None) -> TaskData:
    """Tokenise the training split, draw the seeded sample set, and prepare every eval set."""
    max_length = max_length or spec.max_seq_length
    pad = tokenizer.pad_token_id or 0
    if spec.kind == "qa":
        train = squad.make_features(load_qa_examples(spec, "train"), tokenizer, max_length,
                                    spec.doc_stride)
    else:
        train = tokenize(load_examples(spec, "train"), tokenizer, max_length)
    samples = sample_indices(len(train), num_samples, seed, with_replacement)
    data = TaskData(make_batches(train, samples, batch_size, pad), len(samples), max_length)
    for split in spec.eval_splits():
        if spec.kind == "qa":
            examples = load_qa_examples(spec, split)
            examples = [examples[i] for i in sorted(_seeded_subset(len(examples),
                                                                   eval_max_samples, seed))]
            feats = squad.make_features(examples, tokenizer, max_length, spec.doc_stride)
            order = np.argsort(feats.lengths(), kind="stable")
            data.eval_sets[split] = EvalSet(
                make_batches(feats, order, eval_batch_size, pad, with_labels=False),
                len(examples), float(feats.lengths().mean()), examples, feats, order)
        else:
            feats = tokenize(load_examples(spec, split), tokenizer, max_length)
            idx = _seeded_subset(len(feats), eval_max_samples, seed)
            idx = idx[np.argsort(feats.lengths()[idx], kind="stable")]
            data.eval_sets[split] = EvalSet(make_batches(feats, idx, eval_batch_size, pad),
                                            len(idx), float(feats.lengths()[idx].mean()))
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
