"""Phone labels from a corpus's own phone transcriptions (speechocean762's ``phones.jsonl`` and the like).

MFA TextGrids are read by ``task.phone_labels``; both strip ARPAbet stress digits by default, so that
corpora annotated differently (MFA marks stress unlike speechocean762) share one 39-phone set.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hff_cache.tasks.task import SILENCES, LabelError

__all__ = ["phones_from_jsonl"]

_STRESS = re.compile(r"(?<=[A-Za-z])\d+$")


def phones_from_jsonl(path: str | Path, field: str = "phones", strip_stress: bool = True) -> list[dict[str, str]]:
    """``{"id", "phones"}`` rows from a JSONL of ``{"id", <field>: "W IY0 K AO0 L"}``, silences dropped."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                uid, phones = str(row["id"]), str(row[field])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LabelError(f"{path}:{lineno}: expected a JSON object with 'id' and '{field}' ({exc})") from None
            kept = [p for p in phones.split() if p.lower() not in SILENCES]
            rows.append({"id": uid, "phones": " ".join(_STRESS.sub("", p) if strip_stress else p for p in kept)})
    if not rows:
        raise LabelError(f"{path}: no phone transcriptions")
    return rows
