"""Site probes: a logistic head a site fits on its own stored series embeddings and labels
(`ainode probe fit`), run by the `embedding-probe` pipeline (`pipelines.embedding`), whose
findings go into the SR like a classifier's.

The probe file (JSON) holds the head, the classes with their codes, the embedding model it
was fitted on and its leave-one-out metrics. No torch here: `ainode status` reads probes.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ValidationError

from pipelines import codes
from pipelines.result import Finding
from pipelines.settings import CodeSettings

KNOWN_LABELS = {
    "covid": codes.COVID_19,
    "covid-19": codes.COVID_19,
    "cap": codes.COMMUNITY_ACQUIRED_PNEUMONIA,
    "pneumonia": codes.COMMUNITY_ACQUIRED_PNEUMONIA,
    "normal": codes.NORMAL,
}
"""Labels with a standard code; any other label gets a private one of its own name."""


class ProbeClass(BaseModel):
    label: str
    code: CodeSettings
    negative: bool = False
    """The class that means nothing was found (never makes a study positive)."""


class ProbeMetrics(BaseModel):
    """Leave-one-out: each series predicted by a head fitted without it."""

    series: int
    correct: int
    accuracy: float
    per_class: dict[str, dict[str, int]]
    """label -> {series, correct}."""


class Probe(BaseModel):
    name: str
    embedding_pipeline: str
    model_version: str
    """The version of the embedding model the head was fitted on."""
    classes: list[ProbeClass]
    weights: list[list[float]]
    """classes x features; the probabilities are the softmax of weights @ x + bias."""
    bias: list[float]
    metrics: ProbeMetrics
    series: list[str]
    fitted_at: datetime

    def probabilities(self, embedding: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.weights) @ np.asarray(embedding, dtype=np.float64)
        logits += np.asarray(self.bias)
        exp = np.exp(logits - logits.max())
        return np.asarray(exp / exp.sum())

    def findings(self, embedding: np.ndarray) -> list[Finding]:
        """Each class with its probability; the most probable is present."""
        probabilities = self.probabilities(embedding)
        best = int(np.argmax(probabilities))
        return [
            Finding(c.code.code(), round(float(p), 4), index == best, c.negative)
            for index, (c, p) in enumerate(zip(self.classes, probabilities, strict=True))
        ]


def probe_class(label: str, negative: str | None) -> ProbeClass:
    concept = KNOWN_LABELS.get(label.lower()) or codes.private(label.upper()[:16], label[:64])
    code = CodeSettings(value=concept.value, scheme=concept.scheme, meaning=concept.meaning)
    return ProbeClass(label=label, code=code, negative=label == negative)


def fit_probe(
    name: str,
    embedding_pipeline: str,
    model_version: str,
    embeddings: dict[str, np.ndarray],
    labels: dict[str, str],
    negative: str | None = None,
    fitted_at: datetime | None = None,
) -> Probe:
    """A multinomial logistic head on the embeddings of the labelled series (series UID ->
    label); raises ValueError when fewer than two classes or three series have both."""
    from sklearn.linear_model import LogisticRegression  # here: workers need not load it

    uids = [uid for uid in labels if uid in embeddings]
    names = sorted({labels[uid] for uid in uids})
    if len(names) < 2 or len(uids) < 3:
        raise ValueError(
            f"{len(uids)} labelled series with an embedding in {len(names)} classes: "
            "a probe needs at least three series in two classes"
        )
    data = np.stack([embeddings[uid] for uid in uids]).astype(np.float64)
    target = np.array([names.index(labels[uid]) for uid in uids])

    def head(rows: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=1.0, max_iter=2000).fit(data[rows], target[rows])

    predicted = []
    for index in range(len(uids)):
        rest = np.delete(np.arange(len(uids)), index)
        predicted.append(int(head(rest).predict(data[index : index + 1])[0]))
    fitted = head(np.arange(len(uids)))
    weights, bias = _per_class(fitted, len(names))
    per_class = {
        label: {
            "series": int(np.sum(target == k)),
            "correct": int(np.sum((target == k) & (np.array(predicted) == k))),
        }
        for k, label in enumerate(names)
    }
    correct = int(np.sum(np.array(predicted) == target))
    return Probe(
        name=name,
        embedding_pipeline=embedding_pipeline,
        model_version=model_version,
        classes=[probe_class(label, negative) for label in names],
        weights=weights.tolist(),
        bias=bias.tolist(),
        metrics=ProbeMetrics(
            series=len(uids),
            correct=correct,
            accuracy=round(correct / len(uids), 4),
            per_class=per_class,
        ),
        series=uids,
        fitted_at=fitted_at or datetime.now().astimezone(),
    )


def _per_class(fitted: object, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax weights for every class (a binary head has one row: split it in two)."""
    weights = np.asarray(fitted.coef_, dtype=np.float64)  # type: ignore[attr-defined]
    bias = np.asarray(fitted.intercept_, dtype=np.float64)  # type: ignore[attr-defined]
    if classes == 2:
        return np.stack([-weights[0] / 2, weights[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    return weights, bias


def save_probe(probe: Probe, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(probe.model_dump_json(indent=1), encoding="utf-8")
    temporary.replace(path)


class ProbeError(ValueError):
    """The probe file cannot be read or is not a probe."""


def load_probe(path: Path) -> Probe:
    return read_probe(path)[0]


def read_probe(path: Path) -> tuple[Probe, str]:
    """The probe in `path` and the first 8 hex digits of the file's SHA-256 (which the
    pipeline's version names)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProbeError(f"cannot read the probe {path}: {exc.strerror}") from exc
    try:
        probe = Probe.model_validate_json(data)
    except (ValidationError, json.JSONDecodeError) as exc:
        raise ProbeError(f"{path} is not a probe file: {exc}") from exc
    return probe, hashlib.sha256(data).hexdigest()[:8]
