"""Task predictor (TP): route a whole input to the expert of its predicted task.

Features: the base model's last hidden states mean-pooled over non-padding tokens,
``f = Σ_t m_t h_t / Σ_t m_t`` (batch × hidden). A multinomial logistic regression on standardised features,
``p(e | x) = softmax_e(((f − μ) / σ) · c_e + b_e)``, is trained with scikit-learn on the library's training inputs
(one class per expert). Only the arrays ``μ, σ`` (hidden,), ``c`` (E × hidden), ``b`` (E,) are kept, so predictions
are computed in torch (float64) identically before and after :meth:`TaskPredictor.save` / :meth:`TaskPredictor.load`
(safetensors + JSON, no pickle).

Plugging into a routed model: ``predict_weights`` gives per-example routing weights (batch × E) in the order of
``expert_names`` — top-1 one-hot, or top-k probabilities renormalised to sum to 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from modlora.errors import DataError, RoutingError
from modlora.io import atomic_directory, atomic_write_bytes, parse_json, read_regular_file

TP_WEIGHTS = "task_predictor.safetensors"
TP_CONFIG = "task_predictor.json"
TP_FORMAT = "modlora-task-predictor-v1"


@torch.no_grad()
def mean_pooled_features(model: torch.nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the last hidden states over tokens with ``attention_mask = 1``: (batch, n) → (batch, hidden) float64."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
        raise DataError(f"input_ids must be an integer tensor of shape (batch, n), got {getattr(input_ids, 'shape', input_ids)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise DataError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    vocab = model.get_input_embeddings().num_embeddings
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise DataError(f"input_ids contain token ids outside [0, {vocab})")
    lengths = attention_mask.sum(dim=1)
    if (lengths == 0).any():
        raise DataError(f"example(s) {torch.nonzero(lengths == 0).flatten().tolist()[:5]} have no non-padding tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True)
    finally:
        model.train(was_training)
    hidden = out.hidden_states[-1].double().cpu()
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


def _topk_weights(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """(batch, E) probabilities → top-1 one-hot (``top_k=1``) or top-k probabilities renormalised to sum 1."""
    n_experts = probs.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise RoutingError(f"top_k must be an integer in [1, {n_experts}] (number of experts), got {top_k!r}")
    values, idx = torch.topk(probs, top_k, dim=-1)
    if top_k == 1:
        values = torch.ones_like(values)
    else:
        values = values / values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, values)


class TaskPredictor:
    """Linear softmax classifier over standardised mean-pooled hidden states; one class per expert."""

    def __init__(self, expert_names: Sequence[str], mean: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor,
                 intercept: torch.Tensor) -> None:
        names = list(expert_names)
        if not names or len(set(names)) != len(names):
            raise RoutingError(f"task predictor needs distinct expert names, got {names[:10]}")
        d = mean.shape[-1] if mean.ndim == 1 else -1
        if (mean.ndim != 1 or scale.shape != mean.shape or coef.shape != (len(names), d)
                or intercept.shape != (len(names),)):
            raise RoutingError(f"task predictor arrays disagree: mean {tuple(mean.shape)}, scale {tuple(scale.shape)}, "
                               f"coef {tuple(coef.shape)}, intercept {tuple(intercept.shape)} for {len(names)} experts")
        if not all(torch.isfinite(t).all() for t in (mean, scale, coef, intercept)) or (scale <= 0).any():
            raise RoutingError("task predictor arrays contain NaN/Inf or non-positive scales")
        self.expert_names = names
        self.mean, self.scale = mean.double(), scale.double()
        self.coef, self.intercept = coef.double(), intercept.double()

    @property
    def hidden_size(self) -> int:
        return self.mean.shape[0]

    @classmethod
    def fit_features(cls, features_by_expert: Mapping[str, torch.Tensor], *, c: float = 1.0, max_iter: int = 2000,
                     seed: int = 0) -> TaskPredictor:
        """Fit on precomputed features ``{expert: (n_e, hidden)}`` (standardise, then logistic regression)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        if not features_by_expert:
            raise DataError("task predictor: no experts given")
        names = list(features_by_expert)
        xs, ys = [], []
        for i, n in enumerate(names):
            f = features_by_expert[n]
            if f.ndim != 2 or f.shape[0] == 0:
                raise DataError(f"task predictor: expert {n!r} has no training inputs (features shape {tuple(f.shape)})")
            xs.append(f.double().numpy())
            ys.append(np.full(f.shape[0], i))
        dims = {x.shape[1] for x in xs}
        if len(dims) != 1:
            raise DataError(f"task predictor: feature sizes differ across experts: {sorted(dims)}")
        x, y = np.concatenate(xs), np.concatenate(ys)
        scaler = StandardScaler().fit(x)
        d = x.shape[1]
        mean, scale = torch.from_numpy(scaler.mean_.copy()), torch.from_numpy(scaler.scale_.copy())
        if len(names) == 1:
            return cls(names, mean, scale, torch.zeros(1, d, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(scaler.transform(x), y)
        coef, intercept = torch.from_numpy(clf.coef_.copy()), torch.from_numpy(clf.intercept_.copy())
        if len(names) == 2:  # sklearn's binary model: p(class 1) = σ(z) = softmax([0, z])[1]
            coef = torch.cat([torch.zeros_like(coef), coef])
            intercept = torch.cat([torch.zeros_like(intercept), intercept])
        return cls(names, mean, scale, coef, intercept)

    @classmethod
    def fit(cls, model: torch.nn.Module,
            batches_by_expert: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor | None]]], *,
            c: float = 1.0, max_iter: int = 2000, seed: int = 0) -> TaskPredictor:
        """Fit on ``{expert: [(input_ids (b, n), attention_mask (b, n)), …]}``: every example is labelled by its expert."""
        feats: dict[str, torch.Tensor] = {}
        for name, batches in batches_by_expert.items():
            if not batches:
                raise DataError(f"task predictor: expert {name!r} has no training batches")
            try:
                feats[name] = torch.cat([mean_pooled_features(model, ids, mask) for ids, mask in batches])
            except DataError as exc:
                raise DataError(f"task predictor: expert {name!r}: {exc}") from None
        return cls.fit_features(feats, c=c, max_iter=max_iter, seed=seed)

    def predict_proba_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, hidden) → (batch, E) class probabilities."""
        if features.ndim != 2 or features.shape[1] != self.hidden_size:
            raise RoutingError(f"task predictor expects features of size {self.hidden_size}, got {tuple(features.shape)}")
        z = ((features.double() - self.mean) / self.scale) @ self.coef.T + self.intercept
        return torch.softmax(z, dim=-1)

    def predict_proba(self, model: torch.nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, n) inputs → (batch, E) class probabilities."""
        return self.predict_proba_from_features(mean_pooled_features(model, input_ids, attention_mask))

    def predict_weights(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        top_k: int = 1) -> torch.Tensor:
        """Per-example routing weights (batch, E), float32: top-1 one-hot or renormalised top-k probabilities."""
        return _topk_weights(self.predict_proba(model, input_ids, attention_mask), top_k).float()

    def predict(self, model: torch.nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> list[str]:
        """Predicted expert name per example."""
        idx = self.predict_proba(model, input_ids, attention_mask).argmax(dim=-1)
        return [self.expert_names[i] for i in idx.tolist()]

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write directory ``path`` with ``task_predictor.safetensors`` (arrays) and ``task_predictor.json`` (names)."""
        path = Path(path)
        tensors = {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept}
        config = {"format": TP_FORMAT, "expert_names": self.expert_names, "hidden_size": self.hidden_size,
                  "features": "mean-pooled last hidden state over attention_mask", "standardised": True}
        with atomic_directory(path, overwrite=overwrite) as tmp:
            atomic_write_bytes(tmp / TP_WEIGHTS, save({k: v.contiguous() for k, v in tensors.items()},
                                                      metadata={"format": "pt"}))
            (tmp / TP_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TaskPredictor:
        """Read a directory written by :meth:`save`; every problem raises :class:`RoutingError` naming the file (a
        FIFO, device or directory in a file's place is refused at once, never waited on; links are followed)."""
        path = Path(path)
        cfg_path, w_path = path / TP_CONFIG, path / TP_WEIGHTS
        try:
            config = parse_json(read_regular_file(cfg_path, follow_symlinks=True))
        except FileNotFoundError:
            raise RoutingError(f"task predictor: missing {cfg_path}") from None
        except OSError as exc:
            raise RoutingError(f"task predictor: cannot read {cfg_path} ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise RoutingError(f"task predictor: {cfg_path} is not valid JSON ({exc})") from None
        if not isinstance(config, dict) or config.get("format") != TP_FORMAT:
            raise RoutingError(f"task predictor: {cfg_path}: field 'format' must be {TP_FORMAT!r}")
        names = config.get("expert_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RoutingError(f"task predictor: {cfg_path}: field 'expert_names' must be a list of strings")
        try:
            t = load(read_regular_file(w_path, follow_symlinks=True))
        except FileNotFoundError:
            raise RoutingError(f"task predictor: missing {w_path}") from None
        except OSError as exc:
            raise RoutingError(f"task predictor: cannot read {w_path} ({exc.strerror or exc})") from None
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise RoutingError(f"task predictor: cannot read {w_path}: {exc}") from None
        missing = sorted({"mean", "scale", "coef", "intercept"} - set(t))
        if missing:
            raise RoutingError(f"task predictor: {w_path} lacks tensor(s) {missing}")
        try:
            return cls(names, t["mean"], t["scale"], t["coef"], t["intercept"])
        except RoutingError as exc:
            raise RoutingError(f"task predictor: {w_path}: {exc}") from None
