"""``hff-cache tune-decoder``: the LM weight and word score that decode a validation cache best.

The model runs once over the cache; its log-probs are kept and every grid point only re-runs the beam search
(the LM and lexicon are loaded once: ``CTCDecoder.with_weights``). The best settings go into the run
(``decoder.json``), and later ``evaluate`` / ``transcribe`` calls start from them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hff_cache.evaluation.decoding import CTCDecoder, DecoderConfig
from hff_cache.evaluation.evaluate import cache_source, evaluation_labels, model_outputs
from hff_cache.evaluation.metrics import task_metrics
from hff_cache.runs.document import RunError
from hff_cache.runs.loading import load_run

__all__ = ["tune_decoder"]


def _outputs(loaded: Any, cache: str, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                                     list[str], list[str]]:
    """The log-probs of every labelled utterance of ``cache`` (on the CPU), their lengths, ids and references."""
    _, source, data = cache_source(loaded, cache, evaluation_labels(loaded), None, None)
    refs = dict(zip(data.ids, data.refs, strict=True))
    outs, lens, ids = [], [], []
    loaded.model.to(device)
    for batch, out in model_outputs(loaded.model, source, device):
        outs.append(out.cpu())
        lens.append(batch.lengths.cpu())
        ids += batch.ids
    return outs, lens, ids, [refs[i] for i in ids]


def tune_decoder(run: str | Path, cache: str, lm: str, lm_weights: Sequence[float], word_scores: Sequence[float],
                 beam_size: int = 50, checkpoint: str = "best", device: str = "auto",
                 log: Callable[[str], None] = print, beam_size_token: int | None = None) -> dict[str, Any]:
    """Grid-search ``lm_weights`` x ``word_scores`` for beam search with ``lm`` on ``cache``; store the best."""
    from hff_cache.runtime.distributed import resolve_device

    loaded = load_run(run, checkpoint)
    if loaded.task.name != "asr":
        raise RunError(f"tune-decoder tunes a word LM for ASR runs; {run} is a {loaded.task.name} run")
    outs, lens, ids, refs = _outputs(loaded, cache, resolve_device(device))
    base = CTCDecoder(DecoderConfig(kind="beam", beam_size=beam_size, beam_size_token=beam_size_token, lm=lm),
                      loaded.task.tokenizer)
    greedy = CTCDecoder(DecoderConfig(), loaded.task.tokenizer)
    grid = [{"decoder": "greedy", **_score(greedy, outs, lens, refs)}]
    for weight, score in itertools.product(lm_weights, word_scores):
        row = {"lm_weight": weight, "word_score": score, **_score(base.with_weights(weight, score), outs, lens, refs)}
        log(f"lm_weight {weight:g} word_score {score:g}: wer {row['wer']:.2f} cer {row['cer']:.2f}")
        grid.append(row)
    best = min(grid[1:], key=lambda r: (r["wer"], r["cer"]))
    chosen = DecoderConfig(kind="beam", beam_size=beam_size, beam_size_token=beam_size_token,
                           lm=str(Path(lm).resolve()), lm_weight=best["lm_weight"], word_score=best["word_score"])
    loaded.run.write_decoder(chosen.to_dict(), grid)
    return {"run": str(run), "cache": str(cache), "utterances": len(ids), "best": best, "greedy": grid[0],
            "decoder": chosen.to_dict(), "grid": grid}


def _score(decoder: CTCDecoder, outs: list[torch.Tensor], lens: list[torch.Tensor], refs: list[str]
           ) -> dict[str, float]:
    hyps = [h for out, n in zip(outs, lens, strict=True) for h in decoder.decode(out, n)]
    return task_metrics("asr", refs, hyps)
