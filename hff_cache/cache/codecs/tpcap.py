"""tpcap: tpca of what the decoded hidden state below does not predict, and the prediction any residual codec can
mix in (docs/cache_format.md, "Codecs")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .base import MAIN
from .tpca import TPCACodec

_RIDGE = 1e-6  # of the mean diagonal of the normal equations: keeps a never-varying dimension solvable


class LinearPrediction:
    """A residual codec's layers coded after a linear prediction from the decoded stored layer below (mixed in
    before the residual codec: ``class C(LinearPrediction, ResidualCodec)``; the residual codec's ``fit``,
    ``encode_part`` and ``decode`` code what the prediction misses).

    A transformer's hidden states are a residual stream: on Whisper tiny.en a least-squares map of one state
    predicts 71-77% of the next one's variance (docs/results.md). The prediction reads the state below *as
    decoded* (closed loop: the encoder predicts from what a decoder will have), so quantisation errors do not
    build up along the layers; decoding a state therefore decodes every stored state below it first
    (``chained``: the reader does so). The first stored state has no prediction. Fitted per layer, besides the
    residual codec's statistics: ``ppred``, the prediction (D + 1, D) float32 (bias in the last row); (0, D)
    for the first state.
    """

    chained = True

    # -- fit --

    def fit(self, x: np.ndarray, starts: np.ndarray | None = None,
            below: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The residual codec's fit of the residual of ``x`` after the least-squares prediction from ``below``
        (the decoded state below, the same frames; None for the first stored state)."""
        x = np.asarray(x, dtype=np.float32)
        weights = self._least_squares(below, x)
        return {**super().fit(x - predict(below, weights), starts), "ppred": weights}

    def _least_squares(self, below: np.ndarray | None, x: np.ndarray) -> np.ndarray:
        dim = x.shape[1]
        if below is None:
            return np.zeros((0, dim), np.float32)
        a = np.concatenate([np.asarray(below, np.float64), np.ones((len(below), 1))], axis=1)
        gram = a.T @ a
        gram[np.diag_indices_from(gram)] += _RIDGE * max(float(np.trace(gram)) / len(gram), 1e-30)
        return np.linalg.solve(gram, a.T @ x.astype(np.float64)).astype(np.float32)

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
        return super().encode_part(x - predict(below, fit["ppred"]), starts, fit)

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

    def decode(self, stored: dict[str, Any], rows: slice, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``rows``: the residual as the residual codec decodes it, plus the prediction from
        ``stored["below"]``, the same rows of the state below decoded (float32; None for the first stored state)."""
        out = super().decode(stored, rows, np.float32)
        weights = np.asarray(stored["ppred"])
        if len(weights):
            below = stored.get("below")
            if below is None:
                raise ValueError(f"{self.name}: this hidden state decodes from the decoded state below it "
                                 "(decode the stored layers in order)")
            out += predict(below, weights)
        return out.astype(dtype, copy=False)


class TPCAPCodec(LinearPrediction, TPCACodec):
    """tpca of each stored hidden state's residual after a linear prediction from the decoded state below it:
    at tpca's bytes, half its error after LayerNorm on Whisper tiny.en (docs/results.md)."""

    name = "tpcap"
    fit_suffixes = (*TPCACodec.fit_suffixes, "ppred")


def predict(below: np.ndarray | None, weights: np.ndarray) -> np.ndarray | float:
    """The linear prediction of a state from the decoded ``below`` (float32); 0 without one."""
    if below is None or not len(weights):
        return 0.0
    below = np.asarray(below, np.float32)
    return below @ weights[:-1] + weights[-1]
