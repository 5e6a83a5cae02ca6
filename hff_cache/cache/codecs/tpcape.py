"""tpcape: tpcae (entropy-coded) of what the decoded hidden state below does not predict (docs/cache_format.md)."""

from __future__ import annotations

from .tpcae import TPCAECodec
from .tpcap import LinearPrediction


class TPCAPECodec(LinearPrediction, TPCAECodec):
    """tpcap's closed-loop prediction from the decoded state below, with the residual coded by ``tpcae``
    (one uniform step, entropy-coded levels) instead of tpca's fixed-width codes: at 0.25 B/value the error
    of tpcap at about 2.5 bits (docs/results.md)."""

    name = "tpcape"  # fit_suffixes: tpcae's, and the prediction's (LinearPrediction.__init__)
    # The entropy-coded levels decode on the CPU (ANS) whatever the prediction, so there is no torch decoder
    # for int8 to make exact: tpcape keeps the float32 prediction its measured rows used (docs/results.md).
    default_pred = "float32"
    legacy_params = {**LinearPrediction.legacy_params, **TPCAECodec.legacy_params}

    @property
    def torch_decodable(self) -> bool:  # type: ignore[override]
        return self.pred == "int8" and self.exact  # both products exact in float32: torch equals numpy
