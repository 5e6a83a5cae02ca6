"""tpcape: tpcae (entropy-coded) of what the decoded hidden state below does not predict (docs/cache_format.md)."""

from __future__ import annotations

from .tpcae import TPCAECodec
from .tpcap import LinearPrediction


class TPCAPECodec(LinearPrediction, TPCAECodec):
    """tpcap's closed-loop prediction from the decoded state below, with the residual coded by ``tpcae``
    (one uniform step, entropy-coded levels) instead of tpca's fixed-width codes: at 0.25 B/value the error
    of tpcap at about 2.5 bits (docs/results.md)."""

    name = "tpcape"  # fit_suffixes: tpcae's, and the prediction's (LinearPrediction.__init__)
    # The int8 prediction (tpcap's default; since 2026-12-08 tpcape's): with the exact residual decoder it has a
    # torch twin, so --in-memory holds the levels bit-packed (4.9x float16's hours per GiB) for +1.7% LN error
    # against the float32 prediction on Whisper tiny.en (docs/results.md). Caches of 2026-12-07 record float32.
    legacy_params = {**LinearPrediction.legacy_params, **TPCAECodec.legacy_params}

    @property
    def torch_decodable(self) -> bool:  # type: ignore[override]
        return self.pred == "int8" and self.exact  # both products exact in float32: torch equals numpy
