"""Signals from a local answer's token events, and a calibrated P(correct) from them.

Signals (all computed from `Answer`, i.e. from the engine's `Event`s):

| signal          | what                                                              |
|-----------------|-------------------------------------------------------------------|
| mean_logprob    | mean log-probability of the answer tokens                         |
| min_logprob     | the least likely token                                            |
| p10_logprob     | 10th percentile of token log-probabilities                        |
| mean_entropy    | mean next-token entropy (nats)                                    |
| first_logprob   | log-probability of the first answer token                         |
| first_margin    | top-1 minus top-2 log-probability at the first answer token       |
|                 | (needs `GenerationOptions.top_logprobs >= 2`; 0 when unavailable) |
| log_len         | log(1 + number of answer tokens)                                  |
| truncated       | 1 when generation stopped at max tokens (hard flag)               |
| repetition      | 1 when the answer ends in a repetition loop (hard flag)           |
| refusal         | 1 when the answer refuses ("I can't help with that …")            |
| idk             | 1 when the answer abstains ("I don't know", "it is unknown" …)    |

A `Scorer` turns the signals into P(correct): standardize → logistic regression →
isotonic (or Platt) calibration. A scorer may also read a *probe*: a linear map of the
model's hidden states at the prompt's end and the answer's end (edgeai.engine.hidden; no
extra forward pass), whose logit joins the signals as `probe`. An answer without hidden
states (a model run without the tap) is scored by the entry's `fallback`, fitted on the
token signals alone. Coefficients per model ship in
`edgeai/routing/data/confidence.json`; `edgeai eval --calibrate` writes the user's own to
`<config dir>/confidence.json` (same format), which take precedence. Only numpy is needed at
run time; fitting lives in `edgeai.routing.evaluate` (scikit-learn).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgeai.config import config_dir
from edgeai.errors import InvalidInput
from edgeai.store import calibration_name
from edgeai.types import Answer

FEATURES = (
    "mean_logprob",
    "min_logprob",
    "p10_logprob",
    "mean_entropy",
    "first_logprob",
    "first_margin",
    "log_len",
    "truncated",
    "repetition",
    "refusal",
    "idk",
)
# Flags that alone make a local answer untrustworthy, whatever the score says.
HARD_FLAGS = ("truncated", "repetition")

_REFUSAL = re.compile(
    r"\b(i can(?:no|')t (?:help|assist|provide|answer)|i(?: am|'m) (?:not able|unable) to|"
    r"as an ai\b|i won't|i will not|sorry, but i)",
    re.I,
)
_IDK = re.compile(
    r"\b(i (?:do not|don't) know|i'?m not sure|i am not sure|not sure|no one knows|nobody knows|"
    r"(?:is|are|remains?) unknown|cannot be (?:determined|known|answered)|"
    r"can't be (?:determined|known)|"
    r"there is no (?:definitive|known|clear|single) answer|no definitive answer|"
    r"impossible to (?:know|say|predict)|"
    r"i (?:do not|don't) have (?:enough )?(?:information|access)|unanswerable|it depends)",
    re.I,
)


# -- signals ------------------------------------------------------------------------------


def signals(answer: Answer) -> dict[str, float]:
    """The confidence signals of one local answer (see the module docstring)."""
    lps = np.asarray(answer.logprobs, dtype=np.float64)
    ents = np.asarray(answer.entropies, dtype=np.float64)
    n = len(lps)
    first = _first_answer_index(answer)
    sig = {
        "mean_logprob": float(lps.mean()) if n else 0.0,
        "min_logprob": float(lps.min()) if n else 0.0,
        "p10_logprob": float(np.percentile(lps, 10)) if n else 0.0,
        "mean_entropy": float(ents.mean()) if len(ents) else 0.0,
        "first_logprob": float(lps[first]) if n else 0.0,
        "first_margin": _margin(answer.top_logprobs[first])
        if first < len(answer.top_logprobs)
        else 0.0,
        "log_len": math.log1p(n),
        "truncated": float(answer.finish_reason == "length"),
        "repetition": float(is_repetitive(answer.tokens or answer.text.split())),
        "refusal": float(bool(_REFUSAL.search(answer.text))),
        "idk": float(bool(_IDK.search(answer.text))),
    }
    return sig


def _first_answer_index(answer: Answer) -> int:
    """Index of the first token that carries visible text (skips leading whitespace)."""
    # Per-token text is not kept in Answer; leading tokens with near-certain probability
    # (whitespace, "The") carry no signal, so take the first token below -0.05 nats if any
    # of the first three is, else the first.
    for i, lp in enumerate(answer.logprobs[:3]):
        if lp < -0.05:
            return i
    return 0


def _margin(top: Iterable[tuple[int, float]]) -> float:
    vals = sorted((v for _, v in top), reverse=True)
    return float(vals[0] - vals[1]) if len(vals) >= 2 else 0.0


def is_repetitive(seq: list, max_period: int = 12, min_repeats: int = 3) -> bool:
    """True when `seq` ends in a block of 1..max_period items repeated min_repeats+ times,
    or when long output has few distinct 4-grams (a loop with small variations)."""
    n = len(seq)
    for k in range(1, max_period + 1):
        if n < k * min_repeats:
            break
        block = seq[n - k :]
        if all(seq[n - (r + 1) * k : n - r * k] == block for r in range(1, min_repeats)):
            # A single repeated token (e.g. "\n\n\n") counts only if long.
            if k > 1 or n >= 8:
                return True
    if n >= 32:
        grams = [tuple(seq[i : i + 4]) for i in range(n - 3)]
        if len(set(grams)) / len(grams) < 0.5:
            return True
    return False


def hard_flags(sig: dict[str, float]) -> list[str]:
    """The hard flags raised in `sig`, by name."""
    return [f for f in HARD_FLAGS if sig.get(f, 0.0) >= 0.5]


# -- scoring ------------------------------------------------------------------------------


@dataclass
class Scorer:
    """Standardize → logistic regression → calibration map; P(correct) in [0, 1].

    Attributes:
        features: the signal names, in coefficient order.
        mean, scale: standardization of each feature.
        coef, intercept: logistic regression on the standardized features.
        calibration: {"method": "isotonic", "x": [...], "y": [...]} (x are raw logistic
            outputs, y calibrated probabilities), {"method": "platt", "a": .., "b": ..}
            (p = sigmoid(a·logit + b)) or {"method": "none"}.
        threshold: escalate below this P(correct).
        meta: where it came from (model, data, metrics).
    """

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    calibration: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    threshold: float = 0.5
    meta: dict[str, Any] = field(default_factory=dict)
    probe: Probe | None = None
    fallback: Scorer | None = None

    def for_answer(self, answer: Answer) -> Scorer:
        """The scorer that can score `answer`: this one, or its fallback when the answer
        carries no hidden states for the probe."""
        if self.probe is None or _has_states(answer, self.probe) or self.fallback is None:
            return self
        return self.fallback

    def inputs(self, answer: Answer) -> dict[str, float]:
        """The answer's signals, with the probe's logit when this scorer reads one."""
        sig = signals(answer)
        if self.probe is not None and _has_states(answer, self.probe):
            sig["probe"] = self.probe.logit(answer.hidden)
        return sig

    def logit(self, sig: dict[str, float]) -> float:
        x = np.array([sig.get(f, 0.0) for f in self.features], dtype=np.float64)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return float(z @ np.asarray(self.coef) + self.intercept)

    def score(self, sig: dict[str, float]) -> float:
        """Calibrated P(correct) for one answer's signals."""
        return float(self.calibrate(np.array([self.logit(sig)]))[0])

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        cal = self.calibration
        method = cal.get("method", "none")
        if method == "isotonic":
            raw = 1.0 / (1.0 + np.exp(-logits))
            return np.interp(raw, cal["x"], cal["y"])
        if method == "platt":
            return 1.0 / (1.0 + np.exp(-(cal["a"] * logits + cal["b"])))
        return 1.0 / (1.0 + np.exp(-logits))

    def to_dict(self) -> dict[str, Any]:
        d = {
            k: getattr(self, k)
            for k in (
                "features",
                "mean",
                "scale",
                "coef",
                "intercept",
                "calibration",
                "threshold",
                "meta",
            )
        }
        if self.probe is not None:
            d["probe"] = self.probe.to_dict()
        if self.fallback is not None:
            d["fallback"] = self.fallback.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scorer:
        return cls(
            **{k: d[k] for k in ("features", "mean", "scale", "coef", "intercept")},
            calibration=d.get("calibration", {"method": "none"}),
            threshold=float(d.get("threshold", 0.5)),
            meta=d.get("meta", {}),
            probe=Probe.from_dict(d["probe"]) if d.get("probe") else None,
            fallback=Scorer.from_dict(d["fallback"]) if d.get("fallback") else None,
        )


@dataclass
class Probe:
    """A linear probe on hidden states: logit = weights · states + bias.

    `weights` covers `States.select(layers)` (prompt end, then answer end, each layer's
    whole hidden vector); the standardization and any projection of the fit are folded in.
    """

    layers: list[int]
    weights: np.ndarray
    bias: float
    n_layers: int = 0  # the model's decoder layers when fitted (0: unknown)

    def fits(self, n_layers: int) -> bool:
        """Whether the probe was fitted on a model with this many decoder layers."""
        return self.n_layers in (0, n_layers) and all(i < n_layers for i in self.layers)

    def logit(self, states: Any) -> float:
        x = states.select(self.layers)
        if x.shape != self.weights.shape:
            raise ValueError(f"hidden states of size {x.size}; the probe reads {self.weights.size}")
        return float(x @ self.weights + self.bias)

    def to_dict(self) -> dict[str, Any]:
        # float32 precision is all a logit needs; 7 significant digits keep the file small.
        return {
            "n_layers": self.n_layers,
            "layers": list(self.layers),
            "weights": [float(f"{w:.7g}") for w in np.asarray(self.weights, dtype=np.float64)],
            "bias": float(self.bias),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Probe:
        return cls(
            list(d["layers"]),
            np.asarray(d["weights"], dtype=np.float32),
            float(d["bias"]),
            int(d.get("n_layers", 0)),
        )


def _has_states(answer: Answer, probe: Probe) -> bool:
    h = answer.hidden
    return (
        h is not None
        and all(i in h.layers for i in probe.layers)
        and h.values.shape[-1] * len(probe.layers) * 2 == probe.weights.size
    )


def user_calibration_path() -> Path:
    return config_dir() / "confidence.json"


def _shipped() -> dict[str, Any]:
    return json.loads(
        resources.files("edgeai.routing").joinpath("data/confidence.json").read_text()
    )


def _user_calibrations() -> dict[str, Any]:
    """The user's calibration file ({} when there is none)."""
    path = user_calibration_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(
            f"{path} is not valid JSON ({e})",
            "fix it, or delete it to use the shipped calibrations",
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise InvalidInput(
            f"{path} is not a calibration file (no 'models' table)",
            "delete it; `edgeai eval --calibrate` writes a new one",
        )
    return data


def load_scorer(model: str) -> Scorer:
    """The scorer for `model`: the user's calibration if any, else the shipped one, else the
    shipped "default" entry. An alias, or the same weights installed under another name,
    gets the calibration of the catalog model it is (`store.calibration_name`)."""
    names = list(dict.fromkeys([model, calibration_name(model)]))
    mine = _user_calibrations().get("models", {})
    name = next((n for n in names if mine.get(n)), None)
    if name is not None:
        try:
            return Scorer.from_dict(mine[name])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidInput(
                f"{user_calibration_path()}: the entry for {name!r} is not a calibration ({e})",
                "delete that entry, or run `edgeai eval --calibrate` again",
            ) from None
    models = _shipped()["models"]
    return Scorer.from_dict(next((models[n] for n in names if n in models), models["default"]))


def tap_for_gate(engine: Any) -> Scorer:
    """The scorer of `engine`'s model; when its probe reads hidden states, the engine's decode
    loop is tapped for them (`Engine.tap_hidden`), so every answer carries them."""
    scorer = load_scorer(engine.name)
    probe = scorer.probe
    if probe is not None and probe.fits(engine.layer_count):
        engine.tap_hidden(probe.layers)
    return scorer


def save_user_scorer(model: str, scorer: Scorer) -> Path:
    """Store `scorer` as the user's calibration for `model`; returns the file written."""
    path = user_calibration_path()
    data = _user_calibrations() or {"version": 1, "models": {}}
    data.setdefault("models", {})[model] = scorer.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a write cut short must not cost the old file
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def score_answer(
    ans: Answer, scorer: Scorer, threshold: float | None = None, adapter: str | None = None
) -> list[str]:
    """Fill a local answer's `confidence`, `signals` and `threshold`; returns the reasons.

    Args:
        ans: an `Answer` of the local model.
        scorer: that model's scorer (`load_scorer`); its fallback scores an answer that
            carries no hidden states for its probe.
        threshold: the threshold in force (default: the calibrated one of the scorer used).
        adapter: the LoRA adapter the answer was made with: the scorer was calibrated on
            the base model, so the probe (whose hidden states the adapter moves) is left
            out and the reasons say the calibration may not hold.
    """
    caveat = []
    if adapter:
        ans.hidden = None
        caveat = [
            f"adapter {adapter} is on: the confidence was calibrated on the base model "
            "and may not hold for it"
        ]
    used = scorer.for_answer(ans)
    p, sig, why = assess(ans, used)
    why = caveat + why
    note = gate_note(scorer)
    ans.explanation = ([note] if note else []) + explain(sig, used)
    ans.confidence, ans.signals = round(p, 4), {k: round(v, 4) for k, v in sig.items()}
    ans.threshold = float(threshold if threshold is not None else used.threshold)
    return why


_WORDS = {
    "mean_logprob": lambda v: f"average token probability {math.exp(v):.0%}",
    "min_logprob": lambda v: f"least likely token {math.exp(v):.0%}",
    "p10_logprob": lambda v: f"its weakest tenth of tokens about {math.exp(v):.0%} likely",
    "mean_entropy": lambda v: f"average uncertainty over the next token {v:.2f} nats",
    "first_logprob": lambda v: f"first answer token {math.exp(v):.0%} likely",
    "first_margin": lambda v: f"first answer token ahead of the runner-up by {v:.1f} nats",
    "log_len": lambda v: f"answer length {round(math.expm1(v))} tokens",
    "truncated": lambda v: "stopped at max tokens" if v else "finished on its own",
    "repetition": lambda v: "repeats itself" if v else "no repetition loop",
    "refusal": lambda v: "refused" if v else "did not refuse",
    "idk": lambda v: "said it does not know" if v else "gave an answer",
    # The probe's logit is relative to the calibration data's average; the raised/lowered
    # prefix says which way it pointed, so the words must not claim a direction of their own.
    "probe": lambda v: f"the model's hidden state at the question and its answer (probe {v:+.2f})",
}


def gate_note(scorer: Scorer) -> str | None:
    """A plain warning when the gate cannot do its job: no calibration for this model, or
    one under which it keeps nothing local at its accuracy target."""
    meta = scorer.meta
    if "held_out" not in meta:
        return (
            "this model's confidence is not calibrated (a hand-set prior): "
            "run `edgeai eval --calibrate`"
        )
    op = meta["held_out"].get("operating_point") or {}
    if not op.get("kept_local"):
        return meta.get("verdict") or (
            "this model keeps 0% local at its accuracy target: "
            "use a bigger model or lower the target"
        )
    return None


def gate_summary(model: str) -> dict[str, Any]:
    """What `edgeai show` says of a model's confidence gate (JSON-ready)."""
    scorer = load_scorer(model)
    meta = scorer.meta
    held = meta.get("held_out") or {}
    op = held.get("operating_point") or {}
    return {
        "calibrated_for": meta.get("model"),
        "estimator": meta.get("estimator", "token signals"),
        "auroc": held.get("auroc"),
        "threshold": scorer.threshold,
        "target": (meta.get("target") or {}).get("accuracy"),
        "kept_local": op.get("kept_local"),
        "kept_accuracy": op.get("kept_accuracy"),
        "recall": op.get("recall"),
        "verdict": meta.get("verdict") or gate_note(scorer),
        "source": meta.get("source", "user calibration" if meta.get("items") else None),
    }


def explain(sig: dict[str, float], scorer: Scorer, top: int = 3) -> list[str]:
    """The signals that moved P(correct) most for this answer, in words, with the direction
    ("raised" or "lowered" compared with an average answer of the calibration data)."""
    z = [
        (f, c * (sig.get(f, 0.0) - m) / s)
        for f, m, s, c in zip(scorer.features, scorer.mean, scorer.scale, scorer.coef)
    ]
    z.sort(key=lambda p: -abs(p[1]))
    return [
        f"{'raised' if c > 0 else 'lowered'} confidence: {_WORDS[f](sig.get(f, 0.0))}"
        for f, c in z[:top]
        if f in _WORDS and abs(c) > 0.05
    ]


def assess(answer: Answer, scorer: Scorer) -> tuple[float, dict[str, float], list[str]]:
    """Score a local answer with `scorer` as given (`score_answer` picks it with
    `Scorer.for_answer`): (P(correct), signals, reasons that lower trust)."""
    sig = scorer.inputs(answer)
    p = scorer.score(sig)
    reasons = []
    for f in FEATURES[7:]:
        if sig[f] >= 0.5:
            reasons.append(
                {
                    "truncated": "stopped at max tokens",
                    "repetition": "repetition loop",
                    "refusal": "the model refused",
                    "idk": "the model said it does not know",
                }[f]
            )
    return p, sig, reasons
