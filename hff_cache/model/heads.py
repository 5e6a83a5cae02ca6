"""Task heads on top of the fused (B, T, d) representation: CTC for ASR/phones, pooling + linear for
classification. Pure PyTorch; independent of the rest of hff_cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hff_cache.runtime.tensors import length_mask

__all__ = ["CTCHead", "ClassifierHead", "ctc_greedy_decode", "masked_mean"]




def ctc_greedy_decode(
    log_probs: torch.Tensor, lengths: torch.Tensor | None = None, blank: int = 0
) -> list[list[int]]:
    """Best path: argmax per frame over valid frames, collapse repeats, then drop blanks."""
    best = log_probs.argmax(-1).cpu()
    b, t = best.shape
    lens = [t] * b if lengths is None else [min(int(n), t) for n in lengths.cpu().tolist()]
    out: list[list[int]] = []
    for i in range(b):
        path = best[i, : lens[i]]
        if path.numel() == 0:
            out.append([])
            continue
        # keep a frame when it differs from its predecessor (collapse), then drop blanks
        keep = torch.ones_like(path, dtype=torch.bool)
        keep[1:] = path[1:] != path[:-1]
        path = path[keep]
        out.append(path[path != blank].tolist())
    return out


class CTCHead(nn.Module):
    """Linear -> log-softmax over ``vocab_size`` symbols; id 0 is the CTC blank."""

    blank = 0

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError("CTC needs a blank plus at least one symbol")
        self.vocab_size = vocab_size
        self.proj = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # log-softmax in float32: CTC is numerically touchy under half precision
        return self.proj(x).float().log_softmax(-1)

    def loss(
        self,
        log_probs: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """CTC loss, per-utterance normalised by target length, mean over the batch.

        ``targets`` is either padded (B, S) or concatenated 1-D; ``zero_infinity`` zeroes impossible
        alignments (target longer than input) instead of poisoning the batch with inf.
        """
        return F.ctc_loss(
            log_probs.float().transpose(0, 1),  # (T, B, V)
            targets.long(),
            lengths.long(),
            target_lengths.long(),
            blank=self.blank,
            reduction="mean",
            zero_infinity=True,
        )

    def greedy_decode(self, log_probs: torch.Tensor, lengths: torch.Tensor | None = None) -> list[list[int]]:
        return ctc_greedy_decode(log_probs, lengths, self.blank)


def masked_mean(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid frames: (B, T, d) -> (B, d). Padded frames contribute nothing, whatever they hold."""
    mask = length_mask(lengths, x.shape[1], x.shape[0], x.device)[..., None]
    total = x.masked_fill(~mask, 0.0).sum(1)
    return total / mask.sum(1).clamp(min=1).to(x.dtype)


class ClassifierHead(nn.Module):
    """Utterance classifier: masked pooling over valid frames -> Linear.

    ``pooling="mean"`` (default) or ``"attention"``: a learned query scores each frame, padded frames
    get -inf before the softmax.
    """

    def __init__(self, width: int, num_classes: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {pooling!r}")
        self.pooling = pooling
        self.num_classes = num_classes
        self.query = nn.Parameter(torch.randn(width) / math.sqrt(width)) if pooling == "attention" else None
        self.proj = nn.Linear(width, num_classes)

    def pool(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if self.query is None:
            return masked_mean(x, lengths)
        mask = length_mask(lengths, x.shape[1], x.shape[0], x.device)
        x = x.masked_fill(~mask[..., None], 0.0)  # so NaN/inf padding cannot reach the sum
        scores = (x @ self.query) / math.sqrt(x.shape[-1])
        attn = scores.masked_fill(~mask, float("-inf")).softmax(1)
        attn = torch.nan_to_num(attn)  # an empty utterance yields zeros, not NaN
        return torch.einsum("bt,btd->bd", attn, x)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) -> logits (B, num_classes)."""
        return self.proj(self.pool(x, lengths))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels.long())

    @staticmethod
    def predict(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)
