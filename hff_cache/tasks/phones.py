"""Phone labels: from Montreal Forced Aligner TextGrids, or from a corpus's own phone transcriptions
(speechocean762's ``phones.jsonl`` and the like).

Both strip ARPAbet stress digits by default, so that
corpora annotated differently (MFA marks stress unlike speechocean762) share one 39-phone set.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from hff_cache.tasks.task import LabelError, load_labels

__all__ = ["SILENCES", "parse_textgrid", "phone_labels", "phones_from_jsonl"]

SILENCES = ("", "sil", "sp", "spn")  # MFA's silence / spoken-noise labels; not phones to recognise
_STRESS = re.compile(r"(?<=[A-Za-z])\d+$")


def parse_textgrid(path: str | Path) -> dict[str, list[tuple[float, float, str]]]:
    """Interval tiers of a Praat TextGrid (long text format, as MFA writes): {tier: [(xmin, xmax, text)]}."""
    tiers: dict[str, list[tuple[float, float, str]]] = {}
    current: list[tuple[float, float, str]] | None = None
    xmin = xmax = None
    in_interval = False
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key == "name" and value.startswith('"'):
            current = tiers.setdefault(value.strip('"'), [])
            in_interval = False
        elif line.startswith("intervals ["):
            in_interval, xmin, xmax = True, None, None
        elif in_interval and key == "xmin":
            xmin = float(value)
        elif in_interval and key == "xmax":
            xmax = float(value)
        elif in_interval and key == "text" and current is not None:
            # Praat escapes a quote inside text by doubling it
            current.append((float(xmin or 0.0), float(xmax or 0.0), value[1:-1].replace('""', '"')))
            in_interval = False
    return tiers


def phone_labels(alignments: str | Path, tier: str = "phones", strip_stress: bool = True,
                 drop: Sequence[str] = SILENCES) -> list[dict[str, str]]:
    """One ``{"id", "phones"}`` row per TextGrid under ``alignments`` (id = file stem), sorted by id.

    Silence and spoken-noise intervals (``drop``, compared case-insensitively) are removed; stress digits
    (AH0 -> AH) are stripped by default, which is the usual 39-phone-ish ARPAbet set.
    """
    files = sorted(Path(alignments).rglob("*.TextGrid"))
    if not files:
        raise LabelError(f"{alignments}: no .TextGrid files found")
    dropped = {d.lower() for d in drop}
    rows = []
    for f in files:
        tiers = parse_textgrid(f)
        if tier not in tiers:
            raise LabelError(f"{f}: no tier named {tier!r} (tiers: {sorted(tiers)})")
        phones = [t for _, _, t in tiers[tier] if t.strip().lower() not in dropped]
        if strip_stress:
            phones = [_STRESS.sub("", p) for p in phones]
        rows.append({"id": f.stem, "phones": " ".join(phones)})
    return rows


def phones_from_jsonl(path: str | Path, field: str = "phones", strip_stress: bool = True) -> list[dict[str, str]]:
    """``{"id", "phones"}`` rows from a JSONL of ``{"id", <field>: "W IY0 K AO0 L"}``, silences dropped."""
    rows = []
    for uid, row in load_labels(path).items():
        if not isinstance(row.get(field), str):
            raise LabelError(f"{path}: utterance {uid!r} has no '{field}' string")
        kept = [p for p in row[field].split() if p.lower() not in SILENCES]
        rows.append({"id": uid, "phones": " ".join(_STRESS.sub("", p) if strip_stress else p for p in kept)})
    if not rows:
        raise LabelError(f"{path}: no phone transcriptions")
    return rows
