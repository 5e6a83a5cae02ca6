"""tpcap: tpca of what the decoded hidden state below does not predict, and the prediction any residual codec can
mix in (docs/cache_format.md, "Codecs")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from .base import MAIN
from .tpca import TPCACodec

_RIDGE = 1e-6  # of the mean diagonal of the normal equations: keeps a never-varying dimension solvable


PREDICTIONS = ("int8", "float32")
_INT8 = 127
# Input dimensions per product block: |sum| <= 127 * 127 * 1024 < 2^24, so each block's sum of integers is
# exact in float32 whatever order BLAS, cuBLAS or TF32 add it in; the blocks are added in a fixed order.
EXACT_BLOCK = 1024
Matrix = TypeVar("Matrix")  # a numpy array or a torch tensor (the codecs never import torch)


class LinearPrediction:
    """A residual codec's layers coded after a linear prediction from the decoded stored layer below (mixed in
    before the residual codec: ``class C(LinearPrediction, ResidualCodec)``; the residual codec's ``fit``,
    ``encode_part`` and ``decode`` code what the prediction misses).

    A transformer's hidden states are a residual stream: on Whisper tiny.en a least-squares map of one state
    predicts 71-77% of the next one's variance (docs/results.md). The prediction reads the state below *as
    decoded* (closed loop: the encoder predicts from what a decoder will have), so quantisation errors do not
    build up along the layers; decoding a state therefore decodes every stored state below it first
    (``chained``: the reader does so). The first stored state has no prediction.

    ``pred`` says how the prediction is computed (default: the codec's ``default_pred``). ``int8``: the state
    below is rounded to int8 per dimension (``pqin``, the fit's multiplier per input dimension) and multiplied
    by int8 weights (``pqw``, (D, D)), then scaled per output column and offset (``pqcol``: gain and bias
    rows). The product of integers is exact in float32, so a torch decoder on any device gives the numpy
    decoder's numbers bit for bit, which compressed residency needs. ``float32``: a float32 (D + 1, D) map
    (``ppred``, bias in the last row), what caches written before 2026-12-07 hold (``legacy_params``); it has
    no torch decoder.
    """

    default_pred = "int8"

    chained = True
    legacy_params = {"pred": "float32"}  # a cache whose params predate ``pred`` predicts in float32

    def __init__(self, *args: Any, pred: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        pred = pred or self.default_pred
        if pred not in PREDICTIONS:
            raise ValueError(f"{self.name} pred must be one of {', '.join(PREDICTIONS)}, got {pred!r}")  # type: ignore[attr-defined]
        self.pred = pred
        ours = ("pqw", "pqcol", "pqin") if pred == "int8" else ("ppred",)
        self.fit_suffixes = (*self.fit_suffixes, *ours)  # the residual codec's, then the prediction's

    @property
    def params(self) -> dict[str, Any]:
        return {**super().params, "pred": self.pred}  # type: ignore[misc]

    @property
    def torch_decodable(self) -> bool:
        return self.pred == "int8"

    # -- fit --

    def fit(self, x: np.ndarray, starts: np.ndarray | None = None,
            below: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The residual codec's fit of the residual of ``x`` after the least-squares prediction from ``below``
        (the decoded state below, the same frames; None for the first stored state)."""
        x = np.asarray(x, dtype=np.float32)
        pfit = self._prediction_fit(below, x)
        return {**super().fit(x - self.predict(below, pfit), starts), **pfit}  # type: ignore[misc]

    def _prediction_fit(self, below: np.ndarray | None, x: np.ndarray) -> dict[str, np.ndarray]:
        dim = x.shape[1]
        if self.pred == "float32":
            return {"ppred": _least_squares(below, x)}
        if below is None:
            return {"pqw": np.zeros((0, dim), np.int8), "pqcol": np.zeros((0, dim), np.float32),
                    "pqin": np.zeros(0, np.float32)}
        below = np.asarray(below, np.float32)
        peak = np.abs(below).max(axis=0)
        pqin = np.where(peak > 0, _INT8 / np.where(peak > 0, peak, 1), 1).astype(np.float32)
        q = _quantise_input(below, pqin)
        w = _least_squares(q, x)  # the map from the integers the decoder will have
        gain = np.abs(w[:-1]).max(axis=0) / _INT8
        gain = np.where(gain > 0, gain, 1).astype(np.float32)
        pqw = np.rint(w[:-1] / gain).astype(np.int8)
        product = exact_product(q, pqw.astype(np.float32))
        product *= gain
        bias = (x - product).mean(axis=0, dtype=np.float64).astype(np.float32)  # what rounding w moved
        return {"pqw": pqw, "pqcol": np.stack([gain, bias]), "pqin": pqin}

    def fit_layers(self, layer: Callable[[int], np.ndarray], n: int,
                   starts: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        """Fit the stored states in order, each on the residual after predicting from the state below as the
        fit itself decodes it (what the encoder will predict from)."""
        return [fit for fit, _ in self._chain(layer, n, starts, None)]

    # -- encode --

    def encode_part(self, x: np.ndarray, starts: np.ndarray | None = None,
                    fit: dict[str, np.ndarray] | None = None,
                    below: np.ndarray | None = None) -> dict[str, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        fit = fit if fit is not None else self.fit(x, starts, below)
        return super().encode_part(x - self.predict(below, fit), starts, fit)  # type: ignore[misc]

    def encode_layers(self, layer: Callable[[int], np.ndarray], n: int, starts: np.ndarray | None,
                      fits: list[dict[str, np.ndarray]] | None) -> Iterator[dict[str, np.ndarray]]:
        return (encoded for _, encoded in self._chain(layer, n, starts, fits))

    def _chain(self, layer: Callable[[int], np.ndarray], n: int, starts: np.ndarray | None,
               fits: list[dict[str, np.ndarray]] | None) -> Iterator[tuple[dict[str, np.ndarray],
                                                                         dict[str, np.ndarray]]]:
        """(fit, codes) of each stored state in order, each predicted from the decoded state below it. Without
        ``fits`` (a fit, or a part of no frames written before any) every state is fitted on the way."""
        below = None
        for j in range(n):
            x = np.asarray(layer(j), dtype=np.float32)
            fit = fits[j] if fits is not None else self.fit(x, starts, below)
            encoded = self.encode_part(x, starts, fit, below)
            yield fit, encoded
            if j + 1 < n:  # the top state's decode would predict nothing
                below = self.reconstruct(encoded, starts, fit, below)

    def reconstruct(self, encoded: dict[str, np.ndarray], starts: np.ndarray | None, fit: dict[str, np.ndarray],
                    below: np.ndarray | None) -> np.ndarray:
        """What a reader decodes from ``encoded``: float32 (N, D)."""
        rows = len(encoded[MAIN])
        starts = np.zeros(1, np.int64) if starts is None else starts
        return self.decode({**encoded, **fit, "starts": starts, "below": below}, slice(0, rows))

    # -- decode --

    def predict(self, below: np.ndarray | None, fit: dict[str, Any]) -> np.ndarray | float:
        """The prediction of a state from the decoded ``below`` (float32) with a layer's fit; 0 for the first
        stored state. The torch decoder (hff_cache/batches/device_decode.py) repeats these operations."""
        if not len(fit["ppred" if self.pred == "float32" else "pqw"]):
            return 0.0  # the first stored state
        if below is None:
            raise ValueError(f"{self.name}: this hidden state decodes from the decoded state below it "  # type: ignore[attr-defined]
                             "(decode the stored layers in order)")
        if self.pred == "float32":
            weights = np.asarray(fit["ppred"])
            return np.asarray(below, np.float32) @ weights[:-1] + weights[-1]
        pqw, pqcol = np.asarray(fit["pqw"]), np.asarray(fit["pqcol"])
        out = exact_product(_quantise_input(np.asarray(below, np.float32), np.asarray(fit["pqin"])),
                            pqw.astype(np.float32))
        out *= pqcol[0]
        out += pqcol[1]
        return out

    def decode(self, stored: dict[str, Any], rows: slice, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``rows``: the residual as the residual codec decodes it, plus the prediction from
        ``stored["below"]``, the same rows of the state below decoded (float32; None for the first stored state)."""
        out = super().decode(stored, rows, np.float32)  # type: ignore[misc]
        out += self.predict(stored.get("below"), stored)
        return out.astype(dtype, copy=False)


def _least_squares(below: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """(D + 1, D) float32 ridge least-squares map (bias in the last row) from ``below`` to ``x``; (0, D) without
    a state below."""
    dim = x.shape[1]
    if below is None:
        return np.zeros((0, dim), np.float32)
    a = np.concatenate([np.asarray(below, np.float64), np.ones((len(below), 1))], axis=1)
    gram = a.T @ a
    gram[np.diag_indices_from(gram)] += _RIDGE * max(float(np.trace(gram)) / len(gram), 1e-30)
    return np.linalg.solve(gram, a.T @ x.astype(np.float64)).astype(np.float32)


def _quantise_input(below: np.ndarray, pqin: np.ndarray) -> np.ndarray:
    """The decoded state below as int8 values per dimension (float32 holding integers in -127..127)."""
    q = below * pqin  # a multiplication, not a division: rounded alike on every device
    np.rint(q, out=q)
    return np.clip(q, -_INT8, _INT8, out=q)


def exact_product(q: Matrix, w: Matrix, block: int = EXACT_BLOCK) -> Matrix:
    """``q @ w`` of float32 integers (|q|, |w| <= 127; larger |q| with a smaller ``block``) in blocks of
    ``block`` input dimensions, each block exact, added in block order. numpy arrays or torch tensors alike
    (the torch decoders call it too)."""
    out = q[:, :block] @ w[:block]
    for lo in range(block, q.shape[1], block):
        out += q[:, lo:lo + block] @ w[lo:lo + block]
    return out


class TPCAPCodec(LinearPrediction, TPCACodec):
    """tpca of each stored hidden state's residual after a linear prediction from the decoded state below it:
    at tpca's bytes, half its error after LayerNorm on Whisper tiny.en (docs/results.md)."""

    name = "tpcap"  # fit_suffixes: tpca's, and the prediction's (LinearPrediction.__init__)

