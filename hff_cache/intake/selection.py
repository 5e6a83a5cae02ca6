"""Selections of an intake: some speakers, a per-speaker utterance split, a balanced set of held-out speakers.

``hff-cache manifest`` writes what these return as a JSONL manifest (absolute audio paths, every extra label
column kept), so a recipe can cut its splits with the CLI alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hff_cache.intake.manifests import IntakeError, Utterance, load_intake

__all__ = ["TAKES", "held_out_speakers", "select_utterances", "spread_subset"]

TAKES = ("all", "holdout", "rest")


def held_out_speakers(utts: Sequence[Utterance], n: int, balance: Sequence[str] = (), seed: int = 0) -> list[str]:
    """``n`` speakers chosen round-robin over the strata of ``balance`` (e.g. gender, age_group), seeded.

    Each stratum's speakers are shuffled with ``seed``; strata take turns in sorted order, so 15 speakers over
    four gender x age strata come out 4, 4, 4, 3."""
    strata: dict[tuple[str, ...], set[str]] = {}
    for u in utts:
        spk = str(u.meta.get("speaker", ""))
        if not spk:
            raise IntakeError(f"{u.id}: no 'speaker' field; a speaker hold-out needs one per utterance")
        strata.setdefault(tuple(str(u.meta.get(f, "")) for f in balance), set()).add(spk)
    if n > sum(len(s) for s in strata.values()):
        raise IntakeError(f"cannot hold out {n} speakers: the data has {sum(len(s) for s in strata.values())}")
    rng = random.Random(seed)
    queues = {key: rng.sample(sorted(spks), len(spks)) for key, spks in sorted(strata.items())}
    chosen: list[str] = []
    while len(chosen) < n:
        for key in sorted(queues):
            if queues[key] and len(chosen) < n:
                chosen.append(queues[key].pop())
    return sorted(chosen)


def spread_subset(utts: Sequence[Utterance], n: int | None) -> list[Utterance]:
    """``n`` utterances evenly spaced in id order (every speaker and chapter keeps its share); all if None."""
    ordered = sorted(utts, key=lambda u: u.id)
    if n is None or n >= len(ordered):
        return ordered
    if n < 1:
        raise ValueError(f"need at least one utterance, got {n}")
    return [ordered[(i * len(ordered)) // n] for i in range(n)]


def select_utterances(data: str | Path | Sequence[str | Path], speakers: Sequence[str] | None = None,
                      holdout: int = 0, take: str = "all", holdout_speakers: int = 0,
                      balance: Sequence[str] = (), seed: int = 0, max_utts: int | None = None
                      ) -> list[dict[str, Any]]:
    """Manifest rows (id, audio, text, duration, metas) from one or more intake sources, filtered.

    ``speakers`` keeps those speakers. ``holdout=N`` marks every N-th utterance of each speaker (in id order)
    as held out: a split by utterance with every speaker on both sides (speaker identification).
    ``holdout_speakers=K`` holds out K whole speakers, balanced over ``balance``: a speaker-disjoint split
    (unseen-speaker validation). ``take`` picks ``all``, ``holdout`` or ``rest``. ``max_utts`` then keeps that
    many, evenly spaced in id order (every speaker and corpus keeps its share).
    """
    if take not in TAKES:
        raise ValueError(f"take must be one of {', '.join(TAKES)}, not {take!r}")
    if holdout and holdout_speakers:
        raise ValueError("give --holdout (utterances per speaker) or --holdout-speakers, not both")
    if take != "all" and holdout < 2 and holdout_speakers < 1:
        raise ValueError("take=holdout/rest needs --holdout N (N >= 2) or --holdout-speakers K")
    sources = [data] if isinstance(data, (str, Path)) else list(data)
    utts = sorted((u for src in sources for u in load_intake(src)), key=lambda u: u.id)
    _check_unique_ids(utts, sources)
    if speakers:
        wanted = {str(s) for s in speakers}
        utts = [u for u in utts if str(u.meta.get("speaker", "")) in wanted]
        missing = wanted - {str(u.meta.get("speaker", "")) for u in utts}
        if missing:
            raise IntakeError(f"{', '.join(map(str, sources))}: no utterances of speaker(s) {sorted(missing)}")
    held_spk = set(held_out_speakers(utts, holdout_speakers, balance, seed)) if holdout_speakers else set()
    seen: dict[str, int] = {}
    rows: list[Utterance] = []
    for u in utts:
        spk = str(u.meta.get("speaker", ""))
        k = seen.get(spk, 0)
        seen[spk] = k + 1
        held = spk in held_spk if holdout_speakers else (holdout >= 2 and k % holdout == holdout - 1)
        if take == "all" or (take == "holdout") == held:
            rows.append(u)
    return [{"id": u.id, "audio": str(Path(u.audio).resolve()), "text": u.text, "duration": round(u.duration, 4),
             **u.meta} for u in spread_subset(rows, max_utts)]


def _check_unique_ids(utts: Sequence[Utterance], sources: Sequence[str | Path]) -> None:
    ids = [u.id for u in utts]
    dup = sorted({i for i, j in zip(ids, ids[1:], strict=False) if i == j})
    if dup:
        raise IntakeError(f"ids {dup[:5]} occur in more than one of {', '.join(map(str, sources))}; "
                          "ids must be unique across the sources of one manifest")
