"""SQuAD v1.1 / v2.0: reading, sliding-window features, answer post-processing, official metrics.

Features follow the standard recipe (question first, context truncated with a sliding window of
``max_length`` 384 and stride 128). For the Fisher sample set each feature (window) is a sample,
labelled with the start/end token of the answer, or the [CLS] position when the window does not
contain it (or the question has no answer). Post-processing keeps the ``n_best`` start and end
logits per window, valid spans up to ``max_answer_length`` tokens, and for v2.0 predicts the empty
answer when the null score beats the best span by more than ``null_threshold``. The metrics are
those of the official evaluation scripts (v1.1 and v2.0), as fractions instead of percentages.
"""

from __future__ import annotations

import collections
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.errors import RunError


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]  # empty for an unanswerable (v2.0) question
    answer_starts: list[int]


def read_squad_json(path: str | Path) -> list[QAExample]:
    """Examples of an official SQuAD file (``train-v1.1.json``, ``dev-v2.0.json``, ...)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    except (KeyError, TypeError, ValueError) as err:  # JSON and UTF-8 decoding errors too
        raise RunError(f"{path} is not a SQuAD JSON file ({err}); use the official file") \
            from None
    out = []
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [] if qa.get("is_impossible") else qa["answers"]
                out.append(QAExample(qa["id"], qa["question"], para["context"],
                                     [a["text"] for a in answers],
                                     [int(a["answer_start"]) for a in answers]))
    if not out:
        raise RunError(f"{path} holds no questions; use the official SQuAD file")
    return out


def from_hub_rows(rows) -> list[QAExample]:
    return [QAExample(r["id"], r["question"], r["context"], list(r["answers"]["text"]),
                      [int(s) for s in r["answers"]["answer_start"]]) for r in rows]


@dataclass
class QAFeatures:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    targets: dict[str, np.ndarray]  # start_positions / end_positions (training features)
    example_index: np.ndarray  # feature -> example
    offsets: list[list[tuple[int, int] | None]]  # None outside the context

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.asarray([len(x) for x in self.input_ids])


def make_features(examples: list[QAExample], tokenizer, max_length: int = 384,
                  stride: int = 128) -> QAFeatures:
    """Sliding-window features with answer positions and context offsets."""
    if not examples:
        raise RunError("no SQuAD examples to tokenise")
    enc = tokenizer([e.question.lstrip() for e in examples], [e.context for e in examples],
                    truncation="only_second", max_length=max_length, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    starts, ends, offsets = [], [], []
    for i, mapping in enumerate(enc["offset_mapping"]):
        seq_ids = enc.sequence_ids(i)
        ex = examples[enc["overflow_to_sample_mapping"][i]]
        offsets.append([o if seq_ids[k] == 1 else None for k, o in enumerate(mapping)])
        start = end = 0  # the [CLS] position: no answer in this window
        if ex.answers:
            first = seq_ids.index(1)
            last = len(seq_ids) - 1 - seq_ids[::-1].index(1)
            a_start = ex.answer_starts[0]
            a_end = a_start + len(ex.answers[0])
            if mapping[first][0] <= a_start and mapping[last][1] >= a_end:
                start = first
                while start <= last and mapping[start][0] <= a_start:
                    start += 1
                start -= 1
                end = last
                while end >= first and mapping[end][1] >= a_end:
                    end -= 1
                end += 1
        starts.append(start)
        ends.append(end)
    return QAFeatures(enc["input_ids"], enc.get("token_type_ids"),
                      {"start_positions": np.asarray(starts), "end_positions": np.asarray(ends)},
                      np.asarray(enc["overflow_to_sample_mapping"]), offsets)


def postprocess(examples: list[QAExample], features: QAFeatures, start_logits: list[np.ndarray],
                end_logits: list[np.ndarray], version: int = 1, n_best: int = 20,
                max_answer_length: int = 30, null_threshold: float = 0.0) -> dict[str, str]:
    """Answer text per example id from per-feature start/end logits (unpadded, one per feature)."""
    by_example = collections.defaultdict(list)
    for f, e in enumerate(features.example_index):
        by_example[int(e)].append(f)
    predictions = {}
    for e, ex in enumerate(examples):
        best_score, best_text, min_null = -np.inf, "", np.inf
        for f in by_example.get(e, []):
            s, t, offs = start_logits[f], end_logits[f], features.offsets[f]
            min_null = min(min_null, float(s[0] + t[0]))
            for i in np.argsort(s)[::-1][:n_best]:
                for j in np.argsort(t)[::-1][:n_best]:
                    if (offs[i] is None or offs[j] is None or j < i
                            or j - i + 1 > max_answer_length):
                        continue
                    score = float(s[i] + t[j])
                    if score > best_score:
                        best_score, best_text = score, ex.context[offs[i][0]:offs[j][1]]
        if version == 2 and min_null - best_score > null_threshold:
            best_text = ""
        predictions[ex.id] = best_text
    return predictions


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, the articles a/an/the, and extra whitespace (official)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.UNICODE)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, version: int = 2) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version == 2 and (not pred or not ref):  # v2.0 only: both empty is a match
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(examples: list[QAExample], predictions: dict[str, str],
                  version: int = 1) -> dict[str, float]:
    """Official EM / F1 (max over gold answers); v2.0 adds the HasAns / NoAns breakdown."""
    scores = {"exact": [], "f1": [], "has_answer": []}
    for ex in examples:
        golds = ex.answers if version == 1 else [a for a in ex.answers if normalize_answer(a)]
        golds = golds or [""]
        pred = predictions.get(ex.id, "")
        scores["exact"].append(max(exact_match(pred, g) for g in golds))
        scores["f1"].append(max(f1(pred, g, version) for g in golds))
        scores["has_answer"].append(bool(ex.answers))
    exact, f1s = np.asarray(scores["exact"]), np.asarray(scores["f1"])
    out = {"exact": float(exact.mean()), "f1": float(f1s.mean()), "total": len(examples)}
    if version == 2:
        has = np.asarray(scores["has_answer"])
        for name, sel in (("HasAns", has), ("NoAns", ~has)):
            out[f"{name}_total"] = int(sel.sum())
            if sel.any():
                out[f"{name}_exact"] = float(exact[sel].mean())
                out[f"{name}_f1"] = float(f1s[sel].mean())
    return out
