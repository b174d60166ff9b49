"""Tuning: layer-wise least squares that make the pruned layers reconstruct the unpruned ones
(paper Sec. 4.3, and beyond it).

Layer by layer, the kept heads' output projection and then the kept neurons' down projection
are fitted so that the pruned layer's pre-LayerNorm sum (sublayer output + residual)
reconstructs the teacher's. The teacher is the unpruned model by default (``teacher=None``);
the official code's "teacher-assistant" masks can be passed instead. The student's inputs come
from the already-tuned pruned layers below, so later layers correct earlier errors.

Modes (``TuneOptions.mode``), each a superset of the previous:

- ``mask`` (the paper): one real scale per kept head and neuron;
- ``bias``: the scales and the projection's bias jointly, which also puts the removed units' mean
  contribution back into the bias;
- ``weights``: the projection's kept columns and its bias, ridge-regressed towards the ``bias``
  solution (ridge ``weight_damp * mean(diag)`` of the input Gram), with a per-layer fallback to
  the ``bias`` solution when the solve fails or does not lower the error on held-out samples.

Input side (``TuneOptions.inputs``, beyond the paper, issue 25): before each sublayer's output
projection is fitted, the query, key and value projections (and before the FFN's, its input
projection) are refitted so that, fed the student's hidden states ``h``, they reproduce what the
teacher's produce from its own ``h_t``. Since those projections are linear, the least-squares
fit of every output row is the same map of the input: ``W' = W A``, ``b' = b + W c`` with
``A h + c ~ h_t``, ridge-pulled towards ``A = I`` (``input_damp * mean(diag S)``); one ``D x D``
solve per sublayer from the Gram of ``[h, 1]`` and its cross moments with ``h_t`` (real tokens;
the last layer's FFN on the tokens it is fitted on). With held-out samples the map is kept only
where it lowers their error. Layer 0's attention is left alone (its inputs are the teacher's).

The saved model stays an ordinary smaller checkpoint: new weights replace the old ones.

How: every layer's inputs are cached once (teacher and student) and each layer is computed alone
from them. Per layer and projection the fitted tokens' moments are accumulated (float64): the
Gram ``S`` of the kept units' inputs ``x`` (head contexts, or neuron activations), ``C = x^T r``
against what the kept units must produce ``r = target - bias - residual``, the sums of ``x`` and
``r``, and ``||r||^2`` (``Moments``); every mode's normal equations, and the error of any
solution, follow from them in closed form (for masks ``G_kj = <W_k^T W_j, S_kj>``). Held-out
samples get moments of their own, so checking a solution on them costs no extra pass.

Solvers. ``cholesky`` (default): ``(G + damp * mean(diag G) I) delta = c - G m`` for the change
of the mask values, a relative ridge pulling towards the current values; a solve that fails or
gives a scale outside ``[-max_scale, max_scale]`` keeps that layer's values with a warning, and
tuning goes on with the next layer (``on_failure="layer"``). ``lsmr``: the official code's
solver, scipy's LSMR on the normal equations for ``delta = m - 1`` with ``damp=1`` (an absolute
damping, negligible at these scales), ``atol = btol = 1e-6``, ``conlim = 1e8``, ``maxiter`` five
times the unknowns, success when ``istop < 3``.

Choices that follow the official code only when asked (its preset sets them): ``bias_column``
(fit one scalar bias column beside the head scales, then drop it), ``first_attention=False``
(leave layer 0's attention untuned), ``ffn_target="unmasked"`` (the teacher's FFN output taken
before its own neuron mask), ``on_failure="stop"`` (abandon every later layer at the first failed
solve or out-of-range scale). For sequence classification the last layer's FFN is fitted on the
[CLS] token only (``cls_only_last``, decided from the model unless set), as in the official
code; for QA on every token.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import nn
from transformers.utils.logging import tqdm

from prune.arch import Adapter
from prune.errors import PruneError
from prune.hf_remote.modeling_fastprune import get_module
from prune.masks import Masks, apply_masks
from prune.runtime import eval_mode, to_device, without_labels

log = logging.getLogger(__name__)

TUNE_MODES = ("mask", "bias", "weights")
SOLVERS = ("cholesky", "lsmr")


@dataclass(frozen=True)
class TuneOptions:
    mode: str = "mask"  # mask | bias | weights
    damp: float = 1e-2  # ridge of the mask solve, relative to mean(diag G)
    weight_damp: float = 1e-1  # ridge of the weight solve, relative to mean(diag S)
    max_scale: float = 10.0  # a tuned scale outside [-max_scale, max_scale] is a failure
    cls_only_last: bool | None = None  # last layer's FFN on the first token only (None: unless QA)
    solver: str = "cholesky"  # cholesky | lsmr (the official code's)
    bias_column: bool = False  # official: a scalar bias column in the head solve, dropped
    first_attention: bool = True  # official: False, layer 0's attention is not tuned
    ffn_target: str = "masked"  # masked | unmasked (official: before the teacher's neuron mask)
    on_failure: str = "layer"  # layer: keep that layer's values | stop: untune later layers
    inputs: bool = False  # also refit query/key/value and the FFN input projection
    input_damp: float = 1e-2  # ridge of the input-side map towards identity, relative
    activation_cache_bytes: int = 1 << 30

    def __post_init__(self):
        checks = (("mode", TUNE_MODES), ("solver", SOLVERS), ("ffn_target", ("masked",
                  "unmasked")), ("on_failure", ("layer", "stop")))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise PruneError(f"tune {name}={getattr(self, name)!r}: use one of "
                                 f"{', '.join(allowed)}")
        for name in ("damp", "weight_damp", "input_damp"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise PruneError(f"tune {name}={value!r}: use a damping >= 0")
        if not isinstance(self.max_scale, (int, float)) or not self.max_scale > 0:
            raise PruneError(f"tune max_scale={self.max_scale!r}: use a positive bound")
        for name in ("bias_column", "first_attention", "inputs"):
            if not isinstance(getattr(self, name), bool):
                raise PruneError(f"tune {name}={getattr(self, name)!r}: use true or false")
        if self.cls_only_last is not None and not isinstance(self.cls_only_last, bool):
            raise PruneError(f"tune cls_only_last={self.cls_only_last!r}: use true, false or "
                             f"null (the first token for classification, every token for QA)")

    def for_model(self, model: nn.Module) -> "TuneOptions":
        """These options with ``cls_only_last`` decided for ``model`` when it is ``None``:
        the first token for sequence classification, every token for question answering."""
        if self.cls_only_last is not None:
            return self
        return replace(self, cls_only_last=not is_question_answering(model))


def is_question_answering(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForQuestionAnswering")


@dataclass
class TunedWeights:
    """New projection parameters, by ``(layer, "attn" | "ffn")``: ``weight`` holds the kept
    input columns ``[D, kept]`` with their mask values folded in (those units' masks are then
    1), ``bias`` the whole bias ``[D]``; ``inputs`` the input-side map ``[A | c]`` ``[D, D + 1]``
    of a sublayer's input projections (``"attn"``: query, key and value; ``"ffn"``: the FFN's
    input), folded in as ``W A`` and ``b + W c`` (``TuneOptions.inputs``)."""

    weight: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    bias: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    inputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.weight or self.bias or self.inputs)

    def to(self, device) -> "TunedWeights":
        return TunedWeights(*({k: v.to(device) for k, v in table.items()}
                              for table in (self.weight, self.bias, self.inputs)))

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Plain keys (``"3.attn"``) for ``torch.save``; ``from_state_dict`` reverses it."""
        return {kind: {f"{l}.{part}": t.detach().cpu() for (l, part), t in table.items()}
                for kind, table in (("weight", self.weight), ("bias", self.bias),
                                    ("inputs", self.inputs))}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TunedWeights":
        def keyed(table: dict) -> dict:
            return {(int(k.split(".")[0]), k.split(".")[1]): v for k, v in table.items()}

        return cls(keyed(state.get("weight") or {}), keyed(state.get("bias") or {}),
                   keyed(state.get("inputs") or {}))


@dataclass
class LayerFit:
    """One solve: relative reconstruction error ``||Y - r||^2 / ||r||^2`` before and after (on
    the fitted tokens and, when there are held-out samples, on them), and why it fell back."""

    layer: int
    part: str  # attn | ffn (output projections) | attn_in | ffn_in (the input-side maps)
    before: float
    after: float
    holdout_before: float | None = None
    holdout_after: float | None = None
    fallback: str | None = None
    tokens: int = 0  # tokens fitted
    chosen: str = "scales"  # scales | bias | weights: the solution kept
    holdout_candidates: dict[str, float] = field(default_factory=dict)  # held-out error each


@dataclass
class TuneStats:
    fits: list[LayerFit] = field(default_factory=list)
    output: dict = field(default_factory=dict)  # the pipeline's output check (prune.guard)

    @property
    def fallbacks(self) -> list[str]:
        return [f"layer {f.layer} {f.part}: {f.fallback}" for f in self.fits if f.fallback]

    def errors(self, part: str, when: str = "after") -> list[float]:
        return [getattr(f, when) for f in self.fits if f.part == part]

    attn_before = property(lambda self: self.errors("attn", "before"))
    attn_after = property(lambda self: self.errors("attn", "after"))
    ffn_before = property(lambda self: self.errors("ffn", "before"))
    ffn_after = property(lambda self: self.errors("ffn", "after"))

    def as_dict(self) -> dict:
        out = {"fits": [f.__dict__ for f in self.fits], "fallbacks": self.fallbacks}
        return {**out, "output": self.output} if self.output else out


@dataclass
class TuneResult:
    masks: Masks
    weights: TunedWeights
    stats: TuneStats


@dataclass
class LayerInput:
    """What one batch brings to an encoder layer: hidden states and the layer's other args."""

    hidden: torch.Tensor  # (B, T, D)
    args: tuple
    kwargs: dict


@dataclass
class Stream:
    """A set of batches on its way through the layers (the fit set, or the held-out one)."""

    student: list[LayerInput]
    teacher: list[LayerInput]
    tokens: list[torch.Tensor]  # (B, T) bool: the real tokens
    first: list[torch.Tensor]  # (B, T) bool: the first token only

    def fitted(self, cls_only: bool) -> list[torch.Tensor]:
        return self.first if cls_only else self.tokens


@dataclass
class Moments:
    """Float64 sums over fitted tokens: ``S = x^T x``, ``C = x^T r``, ``sx = sum x``,
    ``sr = sum r``, ``rr = ||r||^2`` and the token count ``n``."""

    S: torch.Tensor
    C: torch.Tensor
    sx: torch.Tensor
    sr: torch.Tensor
    rr: float = 0.0
    n: int = 0

    @classmethod
    def zeros(cls, dx: int, d: int) -> "Moments":
        f = torch.float64
        return cls(torch.zeros(dx, dx, dtype=f), torch.zeros(dx, d, dtype=f),
                   torch.zeros(dx, dtype=f), torch.zeros(d, dtype=f))

    def add(self, x: torch.Tensor, r: torch.Tensor) -> None:
        """``x`` [T, dx] the kept units' inputs, ``r`` [T, D] their target."""
        self.S += (x.t() @ x).double().cpu()
        self.C += (x.t() @ r).double().cpu()
        self.sx += x.double().sum(0).cpu()
        self.sr += r.double().sum(0).cpu()
        self.rr += float(r.double().pow(2).sum())
        self.n += int(x.shape[0])

    def error(self, weight: torch.Tensor, beta: torch.Tensor) -> float:
        """Relative squared error of ``x -> weight x + beta`` (``weight`` [D, dx], float64)."""
        if self.rr <= 0:
            return 0.0
        quad = float((weight @ self.S * weight).sum()) + 2 * float(beta @ (weight @ self.sx))
        quad += self.n * float(beta @ beta)
        lin = float((weight * self.C.t()).sum()) + float(beta @ self.sr)
        return max(quad - 2 * lin + self.rr, 0.0) / self.rr


@dataclass
class Projection:
    """The student's current map of one part of one layer: ``out = weight x + bias`` on the
    kept units' raw inputs ``x``, with ``units`` kept units of ``size`` features each."""

    weight: torch.Tensor  # [D, units * size], mask values folded in
    bias: torch.Tensor  # [D]
    base: torch.Tensor  # [D, units * size]: the original columns (mask value 1)
    scales: torch.Tensor  # [units]: the current mask values
    size: int

    @property
    def units(self) -> int:
        return self.scales.numel()

    def with_scales(self, scales: torch.Tensor) -> "Projection":
        weight = self.base * scales.repeat_interleave(self.size)[None, :]
        return Projection(weight, self.bias, self.base, scales, self.size)


@dataclass
class Solution:
    """A candidate fit of one projection (float64), and what it changes."""

    weight: torch.Tensor  # [D, dx]
    beta: torch.Tensor  # [D]: added to the bias
    scales: torch.Tensor | None = None  # mask values, when the solve was on masks
    free: bool = False  # weights were solved for: masks become 1, weights are new


# ---------------------------------------------------------------------------------------------
# The layer loop


@torch.no_grad()
def tune_masks(
    model: nn.Module,
    adapter: Adapter,
    masks: Masks,
    batches: list[dict],
    teacher: Masks | None = None,
    options: TuneOptions | None = None,
    holdout: list[dict] | None = None,
    progress: bool = True,
) -> TuneResult:
    """Tune the kept units of ``masks`` layer by layer on ``batches`` (model inputs; labels are
    ignored), against the unpruned model or the ``teacher`` masks. ``holdout`` batches are
    never fitted; ``mode="weights"`` checks each solution on them."""
    options = (options or TuneOptions()).for_model(model)
    with eval_mode(model) as device:
        masks = masks.clone().to(device)
        teacher = teacher.to(device) if teacher is not None else None
        streams = {"fit": _stream(model, adapter, batches, device)}
        if holdout:
            streams["holdout"] = _stream(model, adapter, holdout, device)
        state = _Tuner(model, adapter, masks, teacher, options, streams)
        for layer in tqdm(range(adapter.num_layers), desc="tune", disable=not progress,
                          leave=False):
            if not state.tune_layer(layer):
                break
    return TuneResult(state.masks.to("cpu"), state.weights.to("cpu"), state.stats)


def _stream(model: nn.Module, adapter: Adapter, batches: list[dict],
            device: torch.device) -> Stream:
    batches = [to_device(b, device) for b in repack_by_length(batches)]
    inputs = layer_inputs(model, adapter, batches)
    tokens = [b["attention_mask"].bool() for b in batches]
    first = []
    for t in tokens:
        f = torch.zeros_like(t)
        f[:, 0] = True
        first.append(f)
    return Stream(inputs, list(inputs), tokens, first)


class _Capture(nn.Module):
    """Stands in for an encoder's layers: records what the first layer would receive and
    passes the hidden states on, in the output format of the real layer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.calls: list[LayerInput] = []
        self.tuple_output: bool | None = None

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        self.calls.append(LayerInput(hidden, args, kwargs))
        if self.tuple_output is None:  # learn the layer's output format from one call
            self.tuple_output = isinstance(self.layer(hidden, *args, **kwargs), tuple)
        return (hidden,) if self.tuple_output else hidden


@contextmanager
def _only_capture(model: nn.Module, adapter: Adapter) -> Iterator[_Capture]:
    path = adapter.layout["layers"]
    layers = adapter.layers(model)
    capture = _Capture(layers[0])
    parent, _, name = path.rpartition(".")
    owner = model.base_model.get_submodule(parent) if parent else model.base_model
    setattr(owner, name, nn.ModuleList([capture]))
    try:
        yield capture
    finally:
        setattr(owner, name, layers)


def layer_inputs(model: nn.Module, adapter: Adapter, batches: list[dict]) -> list[LayerInput]:
    """What the first encoder layer receives for each batch; the layers are not run."""
    with _only_capture(model, adapter) as capture:
        for batch in batches:
            model(**without_labels(batch))
    return capture.calls


def repack_by_length(batches: list[dict], batch_size: int | None = None) -> list[dict]:
    """The same samples regrouped by length, so that batches carry almost no padding.

    Least squares sums over tokens, so the grouping does not change the solution; it only
    removes the padded positions every layer would otherwise compute. Labels are dropped.
    """
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batches[0]]
    batch_size = batch_size or max(int(b["input_ids"].shape[0]) for b in batches)
    rows = [(int(b["attention_mask"][i].sum()), {k: b[k][i] for k in keys})
            for b in batches for i in range(b["input_ids"].shape[0])]
    rows.sort(key=lambda r: r[0])
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(n for n, _ in chunk)
        out.append({k: torch.stack([_fit_width(row[k], width) for _, row in chunk])
                    for k in keys})
    return out


def _fit_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Cut or zero-pad a 1-d row to ``width`` (positions past the length are padding)."""
    return x[:width] if x.numel() >= width else torch.nn.functional.pad(x, (0, width - x.numel()))


def _run_layer(layer: nn.Module, inp: LayerInput) -> torch.Tensor:
    out = layer(inp.hidden, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def _recording(store: dict, module: nn.Module, key: str, prepend: bool = False,
               with_kwargs: bool = False) -> Iterator[None]:
    """Record ``module``'s input (``store[key]``; with its other args and kwargs if asked)."""
    if with_kwargs:
        def hook(m, args, kwargs):
            store[key] = (args, kwargs)
    else:
        def hook(m, args):
            store[key] = args[0]
    handle = module.register_forward_pre_hook(hook, prepend=prepend, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class _Targets:
    """The teacher's pre-LN sums of one layer for each batch of a stream (fitted tokens only),
    and the attention module's extra arguments (the same for student and teacher)."""

    attn: list[torch.Tensor]
    ffn: list[torch.Tensor]
    attn_call: list[tuple]
    ffn_input: list[torch.Tensor] = field(default_factory=list)  # (B, T, D), with inputs only


class _Tuner:
    """The state carried from layer to layer: masks, new weights, statistics, streams."""

    def __init__(self, model, adapter, masks, teacher, options, streams):
        self.model, self.adapter, self.masks = model, adapter, masks
        self.teacher, self.options, self.streams = teacher, options, streams
        self.weights, self.stats = TunedWeights(), TuneStats()
        self.maps: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (A^T, c)

    def tune_layer(self, l: int) -> bool:
        """Tune layer ``l``; False when tuning must stop (``on_failure="stop"``)."""
        a, opts = self.adapter, self.options
        last = l == a.num_layers - 1
        cls_only = opts.cls_only_last and last
        # the teacher's layer inputs, kept past its pass only for the input-side maps
        teacher_in = {k: [inp.hidden for inp in s.teacher] if opts.inputs else []
                      for k, s in self.streams.items()}
        targets = {k: self._teacher_pass(l, s, cls_only) for k, s in self.streams.items()}
        attn = self._projection(l, "attn")
        if opts.inputs and attn.units > 0 and l > 0:
            self._fit_inputs(l, "attn", {
                k: [(inp.hidden[t], h[t]) for inp, h, t in zip(s.student, teacher_in[k],
                                                               s.tokens, strict=True)]
                for k, s in self.streams.items()})
        del teacher_in
        contexts = {k: self._contexts(l, s, targets[k]) for k, s in self.streams.items()}
        moments = {k: self._moments(l, attn, s, contexts[k], targets[k].attn, "attn")
                   for k, s in self.streams.items()}
        tune_attn = attn.units > 0 and (l > 0 or opts.first_attention)
        if tune_attn:
            attn, ok = self._solve(l, "attn", attn, moments)
            if not ok and opts.on_failure == "stop":
                return False
        ffn = self._projection(l, "ffn")
        ffn_inputs, moments, acts = {}, {}, {}
        for k, s in self.streams.items():
            ffn_inputs[k] = [self._attn_block(l, attn, inp, u)
                             for inp, u in zip(s.student, contexts[k], strict=True)]
        if opts.inputs and ffn.units > 0:
            self._fit_inputs(l, "ffn", {
                k: [(y[t], yt[t]) for y, yt, t in zip(ffn_inputs[k], targets[k].ffn_input,
                                                      s.fitted(cls_only), strict=True)]
                for k, s in self.streams.items()})
        for k, s in self.streams.items():
            moments[k], acts[k] = self._ffn_moments(l, ffn, s, ffn_inputs[k], targets[k].ffn,
                                                    cls_only, keep=not last)
        del contexts, targets
        if ffn.units > 0:
            ffn, ok = self._solve(l, "ffn", ffn, moments)
            if not ok and opts.on_failure == "stop":
                return False
        if not last:
            for k, s in self.streams.items():
                s.student = [LayerInput(self._ffn_block(l, ffn, y, acts[k][i]), inp.args,
                                        inp.kwargs)
                             for i, (y, inp) in enumerate(zip(ffn_inputs[k], s.student,
                                                              strict=True))]
        return True

    # --- the teacher --------------------------------------------------------------------------

    def _teacher_pass(self, l: int, stream: Stream, cls_only: bool) -> _Targets:
        """Run the teacher's layer ``l``; keep its pre-LN sums and advance its inputs."""
        a, model = self.adapter, self.model
        layer = a.layers(model)[l]
        out = _Targets([], [], [])
        store: dict = {}
        ffn_tokens = stream.fitted(cls_only)
        unmasked = self.options.ffn_target == "unmasked" and self.teacher is not None
        with apply_masks(model, a, self.teacher, layers=[l]), \
                _recording(store, a.module(model, l, "ffn_in"), "y"), \
                _recording(store, a.module(model, l, "attn_norm"), "z_attn"), \
                _recording(store, a.module(model, l, "ffn_norm"), "z_ffn"), \
                _recording(store, a.module(model, l, "ffn_out"), "act", prepend=True), \
                _recording(store, _attention_call(model, a, l), "call", with_kwargs=True):
            for b, inp in enumerate(stream.teacher):
                hidden = _run_layer(layer, inp)
                z_ffn = store["z_ffn"]
                if unmasked:  # the official target: the FFN output before the teacher's mask
                    dropped = store["act"] * (1 - self.teacher.neuron[l])
                    z_ffn = z_ffn + dropped @ a.module(model, l, "ffn_out").weight.t()
                out.attn.append(store["z_attn"][stream.tokens[b]])
                out.ffn.append(z_ffn[ffn_tokens[b]])
                if self.options.inputs:
                    out.ffn_input.append(store["y"])
                args, kwargs = store["call"]
                out.attn_call.append((args[1:], kwargs))
                stream.teacher[b] = LayerInput(hidden, inp.args, inp.kwargs)
        return out

    # --- the student --------------------------------------------------------------------------

    def _projection(self, l: int, part: str) -> Projection:
        a = self.adapter
        name, mask, size = (("attn_out", self.masks.head, a.head_size) if part == "attn"
                            else ("ffn_out", self.masks.neuron, 1))
        linear = a.module(self.model, l, name)
        kept = mask[l].nonzero().flatten()
        base = linear.weight[:, _columns(kept, size)]
        bias = linear.bias if linear.bias is not None else torch.zeros_like(linear.weight[:, 0])
        return Projection(base, bias, base, torch.ones_like(mask[l, kept]), size).with_scales(
            mask[l, kept])

    def _contexts(self, l: int, stream: Stream, targets: _Targets) -> list[torch.Tensor]:
        """The kept heads' raw attention contexts (B, T, K dh) of each batch."""
        a = self.adapter
        kept = _columns(self.masks.head[l].nonzero().flatten(), a.head_size)
        attention = _attention_call(self.model, a, l)
        store: dict = {}
        out = []
        with _recording(store, a.module(self.model, l, "attn_out"), "u", prepend=True):
            for inp, (args, kwargs) in zip(stream.student, targets.attn_call, strict=True):
                attention(self._mapped(l, "attn", inp.hidden), *args, **kwargs)
                out.append(store.pop("u")[..., kept])
        return out

    def _moments(self, l, proj: Projection, stream: Stream, inputs: list[torch.Tensor],
                 targets: list[torch.Tensor], part: str) -> Moments:
        m = Moments.zeros(proj.weight.shape[1], proj.weight.shape[0])
        for inp, x, t, sel in zip(stream.student, inputs, targets, stream.tokens, strict=True):
            m.add(x[sel], t - proj.bias - inp.hidden[sel])
        return m

    def _attn_block(self, l: int, proj: Projection, inp: LayerInput,
                    u: torch.Tensor) -> torch.Tensor:
        """The FFN's input: ``attn_norm(hidden + attention output)``."""
        out = nn.functional.linear(u, proj.weight, proj.bias)
        return self.adapter.module(self.model, l, "attn_norm")(inp.hidden + out)

    def _ffn_moments(self, l, proj: Projection, stream: Stream, ys: list[torch.Tensor],
                     targets: list[torch.Tensor], cls_only: bool, keep: bool):
        """Moments of the kept neurons; also their activations at every position when they
        fit in memory and the layer's output is needed (``keep``), else ``None`` each."""
        kept = self.masks.neuron[l].nonzero().flatten()
        positions = sum(int(t.numel()) for t in stream.tokens)
        keep = keep and positions * kept.numel() * 4 <= self.options.activation_cache_bytes
        m = Moments.zeros(kept.numel(), proj.weight.shape[0])
        acts = []
        for y, t, sel in zip(ys, targets, stream.fitted(cls_only), strict=True):
            if keep:
                a_all = self._activations(l, y, kept)
                acts.append(a_all)
                a = a_all[sel]
            else:
                acts.append(None)
                a = self._activations(l, y[sel], kept)
            if kept.numel():
                m.add(a, t - proj.bias - y[sel])
        return m, acts

    def _activations(self, l: int, y: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """``ffn_act(ffn_in(y))`` for the kept neurons only (``y`` through the layer's
        input-side map first, when it has one)."""
        up = self.adapter.module(self.model, l, "ffn_in")
        b = up.bias[kept] if up.bias is not None else None
        act = self.adapter.module(self.model, l, "ffn_act")
        return act(nn.functional.linear(self._mapped(l, "ffn", y), up.weight[kept], b))

    # --- the input side ---------------------------------------------------------------------

    def _mapped(self, l: int, part: str, h: torch.Tensor) -> torch.Tensor:
        """``A h + c``: what the sublayer's input projections see once the map is folded in."""
        if (l, part) not in self.maps:
            return h
        At, c = self.maps[(l, part)]
        return torch.addmm(c, h.reshape(-1, h.shape[-1]), At).view_as(h)

    def _fit_inputs(self, l: int, part: str,
                    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Fit ``A h + c ~ h_t`` (student, teacher hidden states [T, D] per batch) for the
        sublayer's input projections; keep it unless held-out samples say otherwise."""
        D = self.adapter.hidden_size
        moments = {}
        for k, batch_pairs in pairs.items():
            m = Moments.zeros(D, D)
            for h, ht in batch_pairs:
                m.add(h, ht)
            moments[k] = m
        fit, held = moments["fit"], moments.get("holdout")
        identity = Solution(torch.eye(D, dtype=torch.float64),
                            torch.zeros(D, dtype=torch.float64))
        sol = solve_weights(fit, identity, self.options.input_damp) if fit.n else None
        reason = None if sol is not None else "solver failed"
        if sol is not None and held is not None and \
                held.error(sol.weight, sol.beta) >= held.error(identity.weight, identity.beta):
            reason = "no better on held-out samples"
        chosen = identity if reason else sol
        self.stats.fits.append(LayerFit(
            l, f"{part}_in", fit.error(identity.weight, identity.beta),
            fit.error(chosen.weight, chosen.beta),
            held.error(identity.weight, identity.beta) if held else None,
            held.error(chosen.weight, chosen.beta) if held else None,
            reason, fit.n, "identity" if reason else "map"))
        if reason:
            log.info("layer %d %s inputs: %s; left as they are", l, part, reason)
            return
        device = self.masks.head.device
        dtype = self.adapter.module(self.model, l, "ffn_in").weight.dtype
        self.maps[(l, part)] = (sol.weight.t().contiguous().to(device, dtype),
                                sol.beta.to(device, dtype))
        self.weights.inputs[(l, part)] = torch.cat([sol.weight, sol.beta[:, None]], 1).float()

    def _ffn_block(self, l: int, proj: Projection, y: torch.Tensor,
                   acts: torch.Tensor | None) -> torch.Tensor:
        """The student layer's output from its FFN input ``y``."""
        if acts is None:
            acts = self._activations(l, y, self.masks.neuron[l].nonzero().flatten())
        out = nn.functional.linear(acts, proj.weight, proj.bias)
        return self.adapter.module(self.model, l, "ffn_norm")(y + out)

    # --- solving ----------------------------------------------------------------------------

    def _solve(self, l: int, part: str, proj: Projection,
               moments: dict[str, Moments]) -> tuple[Projection, bool]:
        """Fit one projection; record it; return the new projection and whether it worked."""
        fit, held = moments["fit"], moments.get("holdout")
        current = Solution(proj.weight.double().cpu(), torch.zeros_like(fit.sr),
                           proj.scales.double().cpu())
        candidates, reason = self._candidates(part, proj, current, fit)
        if reason is not None:
            rest = [k for k in candidates if k != "scales"]
            log.warning("tuning layer %d %s: %s; %s", l, part, reason,
                        f"trying {', '.join(rest)}" if rest else "keeping its previous values")
        name = self._choose(l, part, candidates, held)
        chosen = candidates[name]
        self.stats.fits.append(LayerFit(
            l, part, fit.error(current.weight, current.beta),
            fit.error(chosen.weight, chosen.beta),
            held.error(current.weight, current.beta) if held else None,
            held.error(chosen.weight, chosen.beta) if held else None,
            reason if chosen is current else None, fit.n, name,
            {k: held.error(c.weight, c.beta) for k, c in candidates.items()} if held else {}))
        return self._apply(l, part, proj, chosen), chosen is not current

    def _candidates(self, part: str, proj: Projection, current: Solution,
                    fit: Moments) -> tuple[dict[str, Solution], str | None]:
        """The mode's solutions, simplest first (scales, scales and bias, then weights anchored
        at the best of those), and why the scale solve failed if it did. A failed scale solve
        leaves the current values in its place; the other modes are still tried."""
        opts = self.options
        bias_column = opts.bias_column and part == "attn" and opts.mode == "mask"
        scales = solve_masks(fit, proj, opts, with_bias=False, bias_column=bias_column)
        reason = scales if isinstance(scales, str) else None
        out = {"scales": current if reason else scales}
        if opts.mode in ("bias", "weights"):
            with_bias = solve_masks(fit, proj, opts, with_bias=True)
            if not isinstance(with_bias, str):
                out["bias"] = with_bias
        if opts.mode == "weights":
            free = solve_weights(fit, out.get("bias", out["scales"]), opts.weight_damp)
            if free is not None:
                out["weights"] = free
        return out, reason

    def _choose(self, l: int, part: str, candidates: dict[str, Solution],
                held: Moments | None) -> str:
        """The most elaborate candidate; with held-out samples, the one with the lowest error on
        them, the simpler on ties (the per-layer fallback)."""
        names = list(candidates)
        if held is None or len(names) == 1:
            return names[-1]
        errors = {k: held.error(c.weight, c.beta) for k, c in candidates.items()}
        best = min(names, key=lambda k: (errors[k], names.index(k)))
        if best != names[-1]:
            log.info("layer %d %s: %s does no better on held-out samples than %s; keeping it",
                     l, part, names[-1], best)
        return best

    def _apply(self, l: int, part: str, proj: Projection, sol: Solution) -> Projection:
        mask = self.masks.head if part == "attn" else self.masks.neuron
        kept = mask[l].nonzero().flatten()
        device, dtype = proj.weight.device, proj.weight.dtype
        bias = proj.bias + sol.beta.to(device, dtype)
        if sol.beta.numel() and bool(sol.beta.abs().max() > 0):
            self.weights.bias[(l, part)] = bias.detach().clone()
        if sol.free:
            mask[l, kept] = 1.0
            weight = sol.weight.to(device, dtype)
            self.weights.weight[(l, part)] = weight.detach().clone()
            return Projection(weight, bias, proj.base, torch.ones_like(proj.scales), proj.size)
        mask[l, kept] = sol.scales.to(device, mask.dtype)
        return Projection(proj.base, bias, proj.base, proj.scales, proj.size).with_scales(
            mask[l, kept])


def _columns(kept: torch.Tensor, size: int) -> torch.Tensor:
    """Feature indices of the kept units when each unit spans ``size`` features."""
    return (kept[:, None] * size + torch.arange(size, device=kept.device)).flatten()


def _attention_call(model: nn.Module, adapter: Adapter, l: int) -> nn.Module:
    """The module a layer calls for its attention: the first step of the attention output
    projection's path (``attention`` in every supported family); its output projection's input
    is the per-head context."""
    return get_module(adapter.layers(model)[l], adapter.layout["attn_out"].split(".")[0])


# ---------------------------------------------------------------------------------------------
# Closed-form solves from moments (all float64 on the CPU)


def mask_system(m: Moments, proj: Projection) -> tuple[torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """``G`` [K, K], ``c`` [K] of the mask values (``||sum_k m_k Y_k - r||^2``) and ``Ybar``
    [D, K], each unit's mean output at mask value 1."""
    K, size = proj.units, proj.size
    W = proj.base.double().cpu()  # [D, K size]
    G = ((W.t() @ W) * m.S).view(K, size, K, size).sum(dim=(1, 3))
    c = (m.C * W.t()).sum(dim=1).view(K, size).sum(dim=1)
    ybar = (W * (m.sx / max(m.n, 1))[None, :]).view(W.shape[0], K, size).sum(dim=2)
    return G, c, ybar


def solve_masks(m: Moments, proj: Projection, opts: TuneOptions, with_bias: bool,
                bias_column: bool = False) -> Solution | str:
    """The mask values (and, ``with_bias``, the bias change) minimising the error; a string
    says why there is none."""
    G, c, ybar = mask_system(m, proj)
    old = proj.scales.double().cpu()
    beta = torch.zeros(ybar.shape[0], dtype=torch.float64)
    if with_bias:  # eliminate the bias: centre the system on the mean output
        G = G - m.n * (ybar.t() @ ybar)
        c = c - ybar.t() @ m.sr
    if opts.solver == "lsmr":
        new, reason = _official_lsmr(G, c, m, ybar, bias_column)
    else:
        delta = ridge_solve(G, c - G @ old, opts.damp)
        new, reason = (None, "solver failed") if delta is None else (old + delta, None)
    if new is None:
        return reason
    if new.abs().max() > opts.max_scale:
        return f"scale {float(new.abs().max()):.3g} outside [-{opts.max_scale:g}, " \
               f"{opts.max_scale:g}]"
    if with_bias:
        beta = (m.sr - ybar @ new * m.n) / max(m.n, 1)
    weight = proj.base.double().cpu() * new.repeat_interleave(proj.size)[None, :]
    return Solution(weight, beta, new)


def ridge_solve(G: torch.Tensor, rhs: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Solve ``(G + damp * mean(diag G) I) x = rhs`` (rhs [n] or [n, k]) by Cholesky, or least
    squares when that fails; ``None`` if the result is not finite."""
    n = G.shape[0]
    lam = damp * float(G.diagonal().mean().clamp_min(1e-12)) if n else 0.0
    A = G + lam * torch.eye(n, dtype=G.dtype)
    b = rhs[:, None] if rhs.dim() == 1 else rhs
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        x = torch.cholesky_solve(b, chol)
    else:
        x = torch.linalg.lstsq(A, b).solution
    x = x[:, 0] if rhs.dim() == 1 else x
    return x if torch.isfinite(x).all() else None


def _official_lsmr(G, c, m: Moments, ybar, bias_column: bool):
    """The official solve: LSMR (damp=1) on the normal equations for ``x - 1``, optionally with
    a scalar bias column that is then dropped; success when ``istop < 3``."""
    if bias_column:  # one bias added to every element of every token: its column is all ones
        s = m.n * ybar.sum(dim=0)  # [K]: sum over tokens and features of each head's output
        G = torch.cat([torch.cat([G, s[:, None]], 1),
                       torch.cat([s, torch.tensor([float(m.n * ybar.shape[0])])])[None]], 0)
        c = torch.cat([c, m.sr.sum()[None]])
    n = G.shape[0]
    rhs = c - G.sum(dim=1)
    if n == 1:  # the official code divides here (and then fails on a missing solver status)
        x, ok = rhs / G[0, 0], True
    else:
        try:
            from scipy.sparse.linalg import lsmr
        except ImportError:
            raise PruneError("the official tuning solver needs scipy: pip install scipy") \
                from None
        result = lsmr(G.numpy(), rhs.numpy(), damp=1.0, atol=1e-6, btol=1e-6,
                      conlim=1e8, maxiter=5 * n)
        x, ok = torch.as_tensor(result[0], dtype=torch.float64), int(result[1]) < 3
    x = x + 1.0
    if not ok or not torch.isfinite(x).all():
        return None, "LSMR did not converge"
    return (x[:-1] if bias_column else x), None


def solve_weights(m: Moments, anchor: Solution, damp: float) -> Solution | None:
    """The projection's kept columns and bias change minimising the error plus
    ``damp * mean(diag S) * ||weight - anchor||^2``; ``None`` if the solve fails."""
    dx = m.S.shape[0]
    S = torch.zeros(dx + 1, dx + 1, dtype=torch.float64)
    S[:dx, :dx], S[:dx, dx], S[dx, :dx], S[dx, dx] = m.S, m.sx, m.sx, m.n
    C = torch.cat([m.C, m.sr[None]], 0)  # [dx + 1, D]
    theta0 = torch.cat([anchor.weight.t(), anchor.beta[None]], 0)  # [dx + 1, D]
    lam = damp * float(m.S.diagonal().mean().clamp_min(1e-12)) if dx else 0.0
    ridge = torch.full((dx + 1,), lam, dtype=torch.float64)
    ridge[dx] = 0.0  # the bias is not pulled towards the anchor
    A = S + torch.diag(ridge)
    rhs = C + ridge[:, None] * theta0
    chol, info = torch.linalg.cholesky_ex(A)
    theta = torch.cholesky_solve(rhs, chol) if int(info) == 0 else \
        torch.linalg.lstsq(A, rhs).solution
    if not torch.isfinite(theta).all():
        return None
    return Solution(theta[:dx].t().contiguous(), theta[dx], None, free=True)


# ---------------------------------------------------------------------------------------------
# Applying new weights


def set_weights(model: nn.Module, adapter: Adapter, masks: Masks,
                weights: TunedWeights | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Write tuned projection weights into ``model``; returns (parameter, old value) pairs."""
    saved = []
    if not weights:
        return saved
    with torch.no_grad():
        for (l, part), Ac in weights.inputs.items():  # W A and b + W c
            names = ("query", "key", "value") if part == "attn" else ("ffn_in",)
            for name in names:
                linear = adapter.module(model, l, name)
                if linear.bias is None:
                    raise PruneError(f"layer {l} {name} has no bias: the input-side map "
                                     f"(prune.tune_inputs) needs one; tune without it")
                A = Ac[:, :-1].to(linear.weight)
                c = Ac[:, -1].to(linear.weight)
                saved.append((linear.weight, linear.weight.detach().clone()))
                saved.append((linear.bias, linear.bias.detach().clone()))
                linear.bias.add_(linear.weight @ c)
                linear.weight.copy_(linear.weight @ A)
        for (l, part), bias in weights.bias.items():
            linear = adapter.module(model, l, "attn_out" if part == "attn" else "ffn_out")
            saved.append((linear.bias, linear.bias.detach().clone()))
            linear.bias.copy_(bias.to(linear.bias))
        for (l, part), weight in weights.weight.items():
            name, mask, size = (("attn_out", masks.head, adapter.head_size) if part == "attn"
                                else ("ffn_out", masks.neuron, 1))
            linear = adapter.module(model, l, name)
            cols = _columns(mask[l].nonzero().flatten(), size).to(linear.weight.device)
            saved.append((linear.weight, linear.weight.detach().clone()))
            linear.weight[:, cols] = weight.to(linear.weight)
    return saved


@contextmanager
def applied_weights(model: nn.Module, adapter: Adapter, masks: Masks,
                    weights: TunedWeights | None) -> Iterator[None]:
    """``model`` with the tuned projection weights in place inside the block (used with
    ``apply_masks`` to evaluate a tuned model before it is pruned physically)."""
    saved = set_weights(model, adapter, masks, weights)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, data in reversed(saved):
                param.copy_(data)
