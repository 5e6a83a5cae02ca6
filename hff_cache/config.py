"""Typed configuration: the one source of defaults for the library, the CLI and recipes.

Every run directory and cache stores the resolved config (`to_dict`) next to the versions
that made it (`environment`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hff_cache.model.fusion import FusionConfig


@dataclass
class ExtractConfig:
    """`hff-cache extract`: run a frozen encoder once and write the feature cache."""

    model: str  # faster-whisper:base, a CTranslate2 folder, a transformers folder/hub id, tiny-random:<family>
    data: str  # manifest (.jsonl/.csv/.tsv), LibriSpeech folder, audio folder or saved HF dataset
    out: str  # cache path or fsspec URL (s3://bucket/prefix)
    layers: list[int] | None = None  # hidden-state indices to store; None = all (embedding + every layer)
    codec: str = "fp16"  # fp16 | int8 | int4 | int4b | nf4b
    batch_seconds: float = 60.0  # padded audio seconds per encoder batch
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    on_error: str = "raise"  # raise | skip (record the item in the cache's report and go on)
    max_seconds: float = 600.0  # longer audio is an error (segment it first)
    part_frames: int = 30_000  # frames buffered per committed part
    num_shards: int = 1  # split the work into shards balanced by duration (SLURM arrays, torchrun)
    shard_index: int = 0
    loader_threads: int = 2  # audio decoding/resampling threads ahead of the encoder
    whisper_window: str = "real"  # real (the real length) | 30s (Whisper's padded window, trimmed to real frames)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for remote caches
    progress: bool = True

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {self.on_error!r}")
        if self.whisper_window not in ("real", "30s"):
            raise ValueError(f"whisper_window must be 'real' or '30s', not {self.whisper_window!r}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} outside 0..{self.num_shards - 1}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)




def parse_layers(spec: str | None) -> list[int] | None:
    """'all' / None -> None; '0,3,6' or '0-4' or '0-4,8' -> sorted unique indices."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    for piece in spec.split(","):
        piece = piece.strip()
        if "-" in piece[1:]:
            lo, hi = piece.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(piece))
    return sorted(out)


def _fusion_default() -> FusionConfig:
    from hff_cache.model.fusion import FusionConfig  # lazy: keeps `import hff_cache.config` free of torch

    return FusionConfig()


@dataclass
class TrainConfig:
    """`hff-cache train`: fusion + head on cached features (the online mode reuses the same loop).

    Fields fall in three kinds: what defines the model and data (compared on --resume), the optimisation
    recipe, and run control (device, workers, resume/force), which may change between invocations.
    """

    cache: str = ""  # training feature cache (path or URL)
    valid_cache: str | None = None  # validation cache; None = no validation (best = last)
    out: str = "runs/train"  # run directory
    task: str = "asr"  # asr | phones | classify:FIELD
    labels: str | None = None  # JSONL {"id": ..., <field>: ...}; covers train and valid ids
    layers: list[int] | None = None  # stored hidden states the model reads; None = all stored
    fusion: FusionConfig = field(default_factory=_fusion_default)
    pooling: str = "mean"  # classifier pooling: mean | attention
    normalize: str = "none"  # none (fusion LayerNorm; measured better) | stats (cache mean/std per layer)
    # optimisation
    epochs: int = 20
    lr: float = 2e-3  # AdamW, every parameter except the layer-weight logits (2e-3 > 1e-3 measured)
    fusion_lr: float = 1e-1  # layer-weight logits (softmax over layers): few parameters that must move far
    weight_decay: float = 0.01  # matrices only; biases, norms and layer logits are not decayed
    lr_schedule: str = "cosine"  # cosine (to min_lr_ratio * lr over `epochs`) | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0  # max global grad norm; 0 disables
    batch_frames: int = 10_000  # padded frames per batch (max length x utterances); ~17 utts of 12 s
    max_batch_utts: int = 64
    spec_time_masks: int = 2  # time masks per utterance (shared across layers)
    spec_time_width: int = 20  # max frames per time mask (0.4 s at 50 Hz)
    spec_feat_masks: int = 0
    spec_feat_width: int = 0
    seed: int = 0
    # data and run control
    in_memory: bool | str = "auto"  # True | False | "auto" (load once as float16 when it fits in RAM)
    shuffle_frames: int = 100_000  # frames pooled (then length-sorted) per shuffle window
    num_workers: int = 2  # decode threads when streaming from the cache
    prefetch: int = 4  # batches decoded ahead (bounded queue)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (one per core)
    eval_every: int = 1  # validate every N epochs (and after the last)
    resume: bool = False
    force: bool = False  # start over in a run directory that holds another run
    # online mode (hff_cache.online): the encoder runs in the loop on audio instead of a cache
    online: bool = False
    model: str = ""  # encoder name, as for `extract --model`
    data: str = ""  # training audio: manifest, LibriSpeech folder, audio folder or saved dataset
    valid_data: str | None = None
    method: str = "hff-adapters"  # hff-adapters | adapters | bitfit | full | hff-frozen (see adapters.py)
    bottleneck: int = 64  # adapter bottleneck width
    encoder_lr: float | None = None  # LR of the encoder's own weights (full, bitfit); None = method default
    grad_checkpointing: bool = False  # recompute encoder layers in backward (saves memory for full)
    batch_seconds: float = 60.0  # padded audio seconds per online batch (plays batch_frames' role)
    max_train_utts: int | None = None  # evenly spaced subset (in id order) of the training data
    max_valid_utts: int | None = None
    # fsspec options for s3://... caches (endpoint, credentials); run control, secrets redacted in config.json
    storage_options: dict[str, Any] = field(default_factory=dict)

    # Fields that may differ between the run on disk and a --resume of it.
    RUNTIME_FIELDS = ("out", "epochs", "in_memory", "num_workers", "prefetch", "device", "threads",
                      "eval_every", "resume", "force", "cache", "valid_cache", "grad_checkpointing",
                      "storage_options")

    def __post_init__(self) -> None:
        if isinstance(self.fusion, dict):
            from hff_cache.model.fusion import FusionConfig

            self.fusion = FusionConfig(**self.fusion)
        if isinstance(self.in_memory, str):
            low = self.in_memory.strip().lower()
            mapping = {"auto": "auto", "true": True, "yes": True, "1": True, "false": False, "no": False,
                       "0": False}
            if low not in mapping:
                raise ValueError(f"in_memory must be true, false or auto, not {self.in_memory!r}")
            self.in_memory = mapping[low]
        task = self.task.strip()
        if not (task in ("asr", "phones") or (task.startswith("classify:") and len(task) > 9)):
            raise ValueError(f"task must be asr, phones or classify:FIELD, not {self.task!r}")
        if self.normalize not in ("none", "stats"):
            raise ValueError(f"normalize must be 'none' or 'stats', not {self.normalize!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', not {self.lr_schedule!r}")
        methods = ("hff-adapters", "adapters", "bitfit", "full", "hff-frozen")  # = adapters.METHODS
        if self.method not in methods:
            raise ValueError(f"method must be one of {', '.join(methods)}, not {self.method!r}")
        if self.bottleneck < 1 or self.batch_seconds <= 0:
            raise ValueError("bottleneck and batch_seconds must be positive")
        if self.epochs < 1 or self.batch_frames < 1 or self.max_batch_utts < 1:
            raise ValueError("epochs, batch_frames and max_batch_utts must be >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys (from a newer version) are ignored."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
