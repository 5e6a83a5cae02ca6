"""Cache format version 1: metadata dataclasses, constants, errors and the compatibility check.

Everything that names a key in the store lives here or in ``codecs/``, so the writer and the reader
cannot drift apart. See docs/cache_format.md for the specification.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

# zarr warns that numcodecs codecs (our byte-shuffle + zstd pipeline) are "not in the Zarr version 3
# specification" every time an array of a cache is opened. The project chose them on purpose and reads them
# itself, so that one message is silenced for good, by one filter set here at import (a per-call
# catch_warnings is not thread-safe: the loader's threads let it through). Every other warning stays.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

FORMAT_VERSION = 1
ROOT_KEY = "hff_cache"  # the single root attribute that holds CacheMeta
PARTS = "parts"
SHARDS = "shards"  # shards/<worker>.json: completion records of extraction shards (plain JSON, not Zarr)
LOCKS = ".locks"  # .locks/<worker>.lock: writers' flock files; not a Zarr node, readers never look at it
INDEX_ARRAYS = ("ids", "offsets", "lengths", "num_samples", "text", "meta")
STATS_ARRAYS = ("stats_sum", "stats_sumsq")
CHECKSUM_ALGORITHM = "crc32"
CHUNK_FRAMES = 2048  # frames per chunk of a features array: ~2 MB of fp16 at D=512, 41 s at 50 Hz
SHARD_FRAMES = 0  # default frames per shard object of a features array (0: unsharded, one object per chunk)
ZSTD_LEVEL = 3
_PART_RE = re.compile(r"^(?P<worker>[^/]+)-(?P<seq>\d{6,})$")


class CacheFormatError(Exception):
    """The store is not an hff-cache, is damaged, or was written by a newer format."""


class CacheMismatchError(ValueError):
    """An existing cache was written with settings other than the ones requested."""


class CacheWriteError(OSError):
    """Writing a part failed (e.g. disk full); committed parts are intact."""


class CacheLockedError(CacheWriteError):
    """Another live process is writing with the same worker label (see ``CacheWriter``'s lock)."""


def is_url(path: object) -> bool:
    """Is this cache location a URL (``s3://bucket/prefix``, read through fsspec) rather than a local path?"""
    return "://" in str(path)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def shard_rows(shard_frames: int, chunk_frames: int) -> int:
    """Frames per shard of a features array: ``shard_frames`` rounded up to whole chunks (0: unsharded)."""
    if shard_frames < 0:
        raise ValueError(f"shard_frames must be >= 0 (0: unsharded), got {shard_frames}")
    return -(-int(shard_frames) // chunk_frames) * chunk_frames if shard_frames else 0


def layer_name(k: int) -> str:
    return f"layer_{k:02d}"


def side_name(suffix: str, k: int) -> str:
    return f"{suffix}_{k:02d}"


def part_id(worker: str, seq: int) -> str:
    return f"{worker}-{seq:06d}"


def shard_record_key(worker: str) -> str:
    return f"{SHARDS}/{worker}.json"


def parse_part_id(pid: str) -> tuple[str, int] | None:
    """(worker, sequence) of a part id, or None for names that are not parts."""
    m = _PART_RE.match(pid)
    return (m["worker"], int(m["seq"])) if m else None


@dataclass
class EncoderInfo:
    """Identity and shape of the frozen encoder whose hidden states the cache holds."""

    name: str
    model_class: str = ""
    revision: str | None = None
    file_hash: str | None = None
    sample_rate: int = 16_000
    frame_rate: float = 50.0
    hidden_size: int = 0
    num_hidden_states: int = 0
    # How the encoder saw its input when that is not the model's plain real-length input: "30s" for Whisper
    # padded to its 30-second window and trimmed to the real frames. "" (real length) is left out of the
    # JSON and of the cache id, so caches written before the field existed keep their ids.
    input_window: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["input_window"]:
            del d["input_window"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderInfo:
        # Unknown keys (from a later minor revision of format 1) are ignored, not fatal.
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class CodecSpec:
    name: str = "fp16"
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecSpec:
        return cls(name=d["name"], params=dict(d.get("params") or {}))


@dataclass
class CacheMeta:
    """The root attribute ``hff_cache`` of a cache."""

    encoder: EncoderInfo
    layers: list[int]
    codec: CodecSpec = field(default_factory=CodecSpec)
    batching: dict[str, Any] = field(default_factory=dict)
    intake_fingerprints: list[str] = field(default_factory=list)
    tool_version: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION
    # How features arrays are stored, e.g. {"chunk_frames": 2048, "shard_frames": 32768}: provenance, not
    # identity (the values are the same). Empty in caches written before it existed (unsharded).
    layout: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "encoder": self.encoder.to_dict(),
            "layers": [int(k) for k in self.layers],
            "codec": self.codec.to_dict(),
            "tool_version": self.tool_version,
            "batching": dict(self.batching),
            "intake_fingerprints": list(self.intake_fingerprints),
            "created": self.created,
            **({"layout": dict(self.layout)} if self.layout else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheMeta:
        try:
            return cls(
                format_version=int(d["format_version"]),
                encoder=EncoderInfo.from_dict(d["encoder"]),
                layers=[int(k) for k in d["layers"]],
                codec=CodecSpec.from_dict(d["codec"]),
                tool_version=str(d.get("tool_version", "")),
                batching=dict(d.get("batching") or {}),
                intake_fingerprints=list(d.get("intake_fingerprints") or []),
                created=str(d.get("created", "")),
                layout=dict(d.get("layout") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CacheFormatError(f"malformed '{ROOT_KEY}' attributes: {e!r}") from e


# Fields that must agree for features to be interchangeable. Batching, tool version and intake
# fingerprints are provenance, not identity: they may differ between extract runs into one cache.
_IDENTITY_FIELDS = (
    "format_version",
    "encoder.name",
    "encoder.model_class",
    "encoder.revision",
    "encoder.file_hash",
    "encoder.sample_rate",
    "encoder.frame_rate",
    "encoder.hidden_size",
    "encoder.num_hidden_states",
    "encoder.input_window",
    "layers",
    "codec.name",
    "codec.params",
)


def _get(meta: CacheMeta, dotted: str) -> Any:
    obj: Any = meta
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_compatible(existing: CacheMeta, requested: CacheMeta) -> list[str]:
    """One line per differing identity field: ``field: cache has X, requested Y``. Empty when compatible."""
    diffs = []
    for name in _IDENTITY_FIELDS:
        a, b = _get(existing, name), _get(requested, name)
        if name == "encoder.frame_rate":
            same = float(a) == float(b)
        else:
            same = json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        if not same:
            diffs.append(f"{name}: cache has {a!r}, requested {b!r}")
    return diffs


def cache_id(meta: CacheMeta) -> str:
    """Short stable hash of encoder identity + layers + codec; training runs record it to refuse a cache
    from another encoder. Provenance fields (batching, fingerprints, dates) do not enter it."""
    e = meta.encoder
    ident = {
        "encoder": [e.name, e.model_class, e.revision, e.file_hash, e.sample_rate, float(e.frame_rate),
                    e.hidden_size, e.num_hidden_states] + ([e.input_window] if e.input_window else []),
        "layers": [int(k) for k in meta.layers],
        "codec": meta.codec.to_dict(),
        "format_version": meta.format_version,
    }
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def array_checksum(values: np.ndarray) -> str:
    """crc32 (8 hex digits) of an array's stored values. Numbers hash as little-endian C-order bytes;
    strings hash as the UTF-8 of their JSON list, so the checksum does not depend on numpy's string dtype."""
    if values.dtype.kind in "OUT":
        data = json.dumps([str(v) for v in values.tolist()], ensure_ascii=False).encode()
        return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    return f"{crc32_update(0, values):08x}"


def chunk_checksums(values: np.ndarray, rows: int) -> tuple[str, list[str]]:
    """(``array_checksum`` of the whole, crc32 of each block of ``rows`` rows) of a chunked numeric array, in
    one pass. The per-chunk ones are recorded at commit next to the whole-array checksum so ``verify`` can say
    which chunk (and so which utterances) changed, not only that the array did: a whole shard's worth of rows
    is too coarse to blame."""
    whole, per_chunk = 0, []
    for lo in range(0, values.shape[0], max(1, rows)):
        block = values[lo:lo + rows]
        whole = crc32_update(whole, block)
        per_chunk.append(f"{crc32_update(0, block):08x}")
    return f"{whole:08x}", per_chunk


def crc32_update(crc: int, values: np.ndarray) -> int:
    """Continue a numeric array's crc32 with ``values`` (the next rows, in order): feeding an array in row
    blocks gives ``array_checksum`` of the whole, so ``verify`` never holds a whole layer in memory."""
    arr = np.ascontiguousarray(values)
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    return zlib.crc32(arr.reshape(-1).view(np.uint8), crc) & 0xFFFFFFFF  # the buffer itself, not a bytes copy
