"""Typed configuration: the one source of defaults, checks and help for the library, the CLI and recipes.

Each field carries its default and its help (``metadata["help"]``); the CLI's options are derived from the
fields (``hff_cache.cli``), so a default is written once, here. Names that come from a registry (codecs,
fusion kinds, methods, tasks) are checked against it when a config is made, before any model loads, and an
error lists the registry's names.

Every run directory and cache stores the resolved config (`to_dict`) next to the versions that made it.
`train_config` reads one back -- a JSON or YAML file, or a run's ``config.json`` to replay the run -- under
the flags of a command line and ``--set key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hff_cache.cache.codecs import CODECS
from hff_cache.cache.format import SHARD_FRAMES
from hff_cache.encoders.whisper import WINDOWS as WHISPER_WINDOWS
from hff_cache.model.adapters import METHODS
from hff_cache.model.downstream import DOWNSTREAMS
from hff_cache.model.fusion import FusionConfig, parse_kind
from hff_cache.tasks.task import check_task_name, task_choices
from hff_cache.tasks.tokenizers import parse_units

__all__ = ["PRECISIONS", "REDACTED", "TRANSCRIBE_BATCH_SECONDS", "ConfigError", "ExtractConfig", "TrainConfig",
           "parse_layers", "parse_option_value", "parse_sets", "read_config_file", "setting", "to_dict",
           "train_config"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 autocast on CUDA, fp32 on CPU
REDACTED = "<redacted>"  # what a run's config.json holds in place of a storage credential
TRANSCRIBE_BATCH_SECONDS = 120.0  # padded audio per transcription batch (no gradients: twice a training batch)
_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# Run control of one invocation: a config file (a replayed run's config.json) never turns these on.
ONE_INVOCATION = ("resume", "force")


class ConfigError(ValueError):
    """A config file or override that does not fit the config: unknown key, wrong type, redacted secret."""


def setting(default: Any = dataclasses.MISSING, help: str = "", *,
            factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its help text (no default: a required field)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _auto_or_bool(what: str, value: bool | str) -> bool | str:
    if not isinstance(value, str):
        return bool(value)
    low = value.strip().lower()
    if low != "auto" and low not in _BOOL_WORDS:
        raise ValueError(f"{what} must be true, false or auto, not {value!r}")
    return _BOOL_WORDS.get(low, "auto")


def _one_of(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, not {value!r}")


@dataclass
class ExtractConfig:
    """`hff-cache extract`: run a frozen encoder once and write the feature cache."""

    model: str = setting(help="faster-whisper:base | faster-whisper:tiny.en | a CTranslate2 or transformers "
                              "model folder | hub id in the local HF cache | tiny-random:<family>")
    data: str = setting(help="Manifest (.jsonl/.csv/.tsv), LibriSpeech folder, audio folder, or a datasets "
                             "folder saved with save_to_disk")
    out: str = setting(help="Cache path or fsspec URL (s3://bucket/prefix)")
    layers: list[int] | None = setting(None, "Hidden states to store: 'all' (default), '0,3,6', '0-4'")
    codec: str = setting("fp16", f"{' | '.join(CODECS)} (docs/cache_format.md)")
    batch_seconds: float = setting(60.0, "Padded audio seconds per batch")
    device: str = setting("auto", "auto | cpu | cuda")
    precision: str = setting("auto", " | ".join(PRECISIONS) + " (auto: bf16 on CUDA, fp32 on CPU)")
    on_error: str = setting("raise", "raise | skip (record bad items and go on)")
    max_seconds: float = setting(600.0, "Longest utterance accepted (segment longer audio first)")
    part_frames: int = setting(30_000, "Frames per committed part")
    shard_frames: int = setting(SHARD_FRAMES, "Frames per stored object of a layer (zarr sharding, fewer and "
                                              "larger reads from object stores); 0: one object per chunk")
    num_shards: int = setting(1, "Split the work into N duration-balanced shards (SLURM arrays, torchrun)")
    shard_index: int = setting(0, "This worker's shard")
    loader_threads: int = setting(2, "Audio decoding/resampling threads ahead of the encoder")
    threads: int = setting(0, "torch intra-op threads (0: the CPUs this process may use: affinity and cgroup "
                              "quota)")
    whisper_window: str = setting("real", " | ".join(WHISPER_WINDOWS) + ": Whisper at the real length, or on its "
                                  "padded 30 s window with the output trimmed to the real frames")
    storage_options: dict[str, Any] = setting(help="fsspec option key=value (repeatable), e.g. "
                                                   "endpoint_url=http://127.0.0.1:9000", factory=dict)
    progress: bool = setting(True, "Show a progress bar")

    def __post_init__(self) -> None:
        if self.codec not in CODECS:  # before the encoder loads (minutes for a large model)
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("on_error", self.on_error, ("raise", "skip"))
        _one_of("whisper_window", self.whisper_window, WHISPER_WINDOWS)
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


@dataclass
class TrainConfig:
    """`hff-cache train`: fusion + head on cached features (the online mode reuses the same loop).

    Fields fall in three kinds: what defines the model and data (compared on --resume), the optimisation
    recipe, and run control (device, workers, resume/force), which may change between invocations.
    """

    cache: str = setting("", "Training feature cache (not with --online)")
    valid_cache: str | None = setting(None, "Validation cache (same encoder, layers, codec); none: no "
                                            "validation, best = last")
    out: str = setting("runs/train", "Run directory")
    task: str = setting("asr", f"{task_choices()} (e.g. classify:speaker)")
    labels: str | None = setting(None, "JSONL labels {id, text|phones|FIELD|label}; override or add to the "
                                       "cache's texts/metas")
    valid_labels: str | None = setting(None, "JSONL labels for the validation cache (default: --labels), for a "
                                             "train/valid split that lives in label files over one cache")
    units: str = setting("char", "ASR output units: char | bpe:N (a sentencepiece model of N pieces trained on the "
                                 "training transcripts, stored in the run; needs the decode extra)")
    layers: list[int] | None = setting(None, "Stored hidden states to use: 'all' (default), '0,3,6', '0-4,8'")
    fusion: FusionConfig = setting(help="Fusion and downstream body", factory=FusionConfig)
    pooling: str = setting("mean", "Classifier pooling: mean | attention")
    normalize: str = setting("none", "none (the fusion's LayerNorm; measured better) | stats (standardise "
                                     "layers by cache mean/std)")
    # optimisation
    epochs: int = setting(20, "Training epochs")
    lr: float = setting(2e-3, "AdamW learning rate (every parameter but the layer-weight logits)")
    fusion_lr: float = setting(1e-1, "Learning rate of the layer-weight logits (few, must move far)")
    weight_decay: float = setting(0.01, "AdamW weight decay (matrices only)")
    lr_schedule: str = setting("cosine", "cosine (to --min-lr-ratio x lr over the epochs) | constant")
    warmup_steps: int = setting(20, "Linear warm-up steps")
    min_lr_ratio: float = setting(0.05, "Where the cosine schedule ends, as a fraction of the learning rate")
    grad_clip: float = setting(5.0, "Max gradient norm (0: off)")
    batch_frames: int = setting(10_000, "Padded frames per batch (max length x utterances)")
    max_batch_utts: int = setting(64, "Most utterances per batch")
    spec_time_masks: int = setting(2, "SpecAugment time masks per utterance (shared across layers)")
    spec_time_width: int = setting(20, "Max frames per time mask")
    spec_feat_masks: int = setting(0, "SpecAugment feature masks per utterance")
    spec_feat_width: int = setting(0, "Max channels per feature mask")
    seed: int = setting(0, "Random seed (initial weights, batch order, augmentation)")
    # data and run control
    in_memory: bool | str = setting("auto", "auto | true | false: load the cache into RAM (auto: as float16 "
                                            "when it fits)")
    shuffle_frames: int = setting(100_000, "Frames pooled (then length-sorted) per shuffle window")
    num_workers: int = setting(2, "Decode threads (processes for tpcae/tpcape) when loading or streaming")
    prefetch: int = setting(4, "Batches decoded ahead")
    loader_thread: bool | str = setting("auto", "auto | true | false: decode batches in a thread beside the "
                                                "training step (auto: where the step leaves a core free: on a "
                                                "GPU, or --threads below the usable CPUs; or the cache is a URL)")
    device: str = setting("auto", "auto | cpu | cuda")
    threads: int = setting(0, "torch intra-op threads (0: the CPUs this process may use: affinity and cgroup "
                              "quota); 1 can be far faster on a CPU other jobs share (docs/cli.md)")
    eval_every: int = setting(1, "Validate every N epochs (and after the last)")
    resume: bool = setting(False, "Continue the run in OUT from its last checkpoint")
    force: bool = setting(False, "Start over in OUT even if it holds another run")
    # online mode (hff_cache.training.online): the encoder runs in the loop on audio instead of a cache
    online: bool = setting(False, "Run the encoder in the loop on audio instead of a cache (adapters, BitFit, "
                                  "full fine-tuning, frozen HFF); see docs/cli.md")
    model: str = setting("", "Online: encoder, as for extract --model")
    data: str = setting("", "Online: training audio (manifest, LibriSpeech folder, audio folder, saved dataset)")
    valid_data: str | None = setting(None, "Online: validation audio")
    method: str = setting("hff-adapters", f"Online: {' | '.join(METHODS)} (docs/cli.md)")
    bottleneck: int = setting(64, "Online: adapter bottleneck width")
    encoder_lr: float | None = setting(None, "Online: LR of the encoder weights full/bitfit train (none: the "
                                             "method's default)")
    grad_checkpointing: bool = setting(False, "Online: recompute encoder layers in the backward pass (less "
                                              "memory, ~1 more forward; for full)")
    from_layer: int | None = setting(None, "Online, partial caching: hidden states 0..K come from --cache (the "
                                           "same encoder's), only layers K+1..L run, with adapters (docs/cli.md)")
    batch_seconds: float = setting(60.0, "Online: padded audio seconds per batch")
    max_train_utts: int | None = setting(None, "Online: train on N evenly spaced utterances")
    max_valid_utts: int | None = setting(None, "Online: validate on N evenly spaced utterances")
    # fsspec options for s3://... caches (endpoint, credentials); run control, secrets redacted in config.json
    storage_options: dict[str, Any] = setting(help="fsspec option key=value for s3://... caches (repeatable), "
                                                   "e.g. endpoint_url=http://...", factory=dict)
    tensorboard: bool = setting(False, "Also write log.csv's scalars to TensorBoard event files in "
                                       "RUN/tensorboard/ (needs the tensorboard extra)")

    # Fields that may differ between the run on disk and a --resume of it.
    RUNTIME_FIELDS = ("out", "epochs", "in_memory", "num_workers", "prefetch", "loader_thread", "device", "threads",
                      "eval_every", "resume", "force", "cache", "valid_cache", "grad_checkpointing",
                      "storage_options", "tensorboard")

    def __post_init__(self) -> None:
        if isinstance(self.fusion, Mapping):
            self.fusion = FusionConfig(**_checked(self.fusion, FusionConfig, "the fusion config"))
        self.in_memory = _auto_or_bool("in_memory", self.in_memory)
        self.loader_thread = _auto_or_bool("loader_thread", self.loader_thread)
        check_task_name(self.task)
        parse_units(self.units)
        if self.units != "char" and self.task != "asr":
            raise ValueError(f"--units {self.units} is for --task asr (a {self.task} task has its own symbols)")
        parse_kind(self.fusion.kind)
        _one_of("downstream", self.fusion.downstream, tuple(DOWNSTREAMS))
        _one_of("method", self.method, METHODS)
        _one_of("normalize", self.normalize, ("none", "stats"))
        _one_of("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        if self.bottleneck < 1 or self.batch_seconds <= 0:
            raise ValueError("bottleneck and batch_seconds must be positive")
        if self.epochs < 1 or self.batch_frames < 1 or self.max_batch_utts < 1:
            raise ValueError("epochs, batch_frames and max_batch_utts must be >= 1")
        self._check_mode()

    def _check_mode(self) -> None:
        if self.from_layer is not None:
            self._check_partial()
        elif self.online and (self.cache or self.valid_cache):
            raise ValueError("--online trains from audio (--data/--valid-data); --cache/--valid-cache are for "
                             "cached mode, or for --online --from-layer K (partial caching)")
        if not self.online and (self.model or self.data or self.valid_data):
            raise ValueError("--model/--data/--valid-data need --online (cached mode reads --cache)")
        if self.valid_labels and not self.valid_cache:
            raise ValueError("--valid-labels labels the validation cache: it needs --valid-cache")

    def _check_partial(self) -> None:
        if not (self.online and self.model and self.cache):
            raise ValueError("--from-layer K is partial caching: it needs --online, --model and --cache (that "
                             "encoder's hidden states 0..K)")
        if self.data or self.valid_data:
            raise ValueError("--from-layer reads its utterances from --cache/--valid-cache, not --data/--valid-data")
        if self.from_layer < 0:
            raise ValueError(f"--from-layer must be >= 0, not {self.from_layer}")
        if not METHODS[self.method].partial:
            partial = ", ".join(m for m, spec in METHODS.items() if spec.partial)
            raise ValueError(f"--from-layer works with --method {partial}, not {self.method}: it would train "
                             "weights of the layers the cache stands in for")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys (from a newer version) are ignored."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# --- config files and overrides ------------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a JSON or YAML (.yaml/.yml) file; a run's ``config.json`` (a run document, whose
    ``"config"`` holds the TrainConfig) gives that config."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # lazy: only YAML configs need PyYAML
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a .json config") \
                from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, not {type(doc).__name__}")
    # "config" is no TrainConfig field, so a mapping under it can only be a run document's recipe
    return dict(doc["config"]) if isinstance(doc.get("config"), dict) else doc


def parse_option_value(text: str) -> Any:
    """A storage option's value: JSON (numbers, true/false/null, objects, lists), anything else a string."""
    try:
        return json.loads(text) if text[:1] in '{["-0123456789tfn' else text
    except ValueError:
        return text


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """``["fusion.width=512", "epochs=3"]`` -> ``{"fusion": {"width": "512"}, "epochs": "3"}`` (values stay text:
    `train_config` converts them by the field's type)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE (nested: fusion.width=512), not {pair!r}")
        head, dot, rest = key.strip().partition(".")
        if dot:
            nested = out.setdefault(head, {})
            if not isinstance(nested, dict):
                raise ConfigError(f"--set {pair!r}: {head} is set as a whole and by key")
            nested[rest] = value
        else:
            out[head] = value
    return out


def train_config(path: str | Path | None = None, flags: Mapping[str, Any] | None = None,
                 sets: Sequence[str] = ()) -> TrainConfig:
    """The TrainConfig of, in rising precedence: the dataclass defaults, a config file (JSON/YAML, or a run's
    ``config.json`` to replay that run), ``flags`` (the options given on the command line), ``--set``
    overrides. Unknown keys are refused with the valid ones listed."""
    sources = []
    if path is not None:
        settings = {k: v for k, v in read_config_file(path).items() if k not in ONE_INVOCATION}
        sources.append(_checked(settings, TrainConfig, str(path)))
    sources.append(_checked(dict(flags or {}), TrainConfig, "the command line"))
    sources.append(_checked(parse_sets(sets), TrainConfig, "--set", from_text=True))
    merged = functools.reduce(_merged, sources, {})
    hidden = _redacted_keys(merged.get("storage_options") or {})
    if hidden:  # a replayed run's config.json never holds credentials
        raise ConfigError(f"storage option(s) {', '.join(hidden)} are redacted in {path or 'the settings'}: pass "
                          "the real value with --storage-option KEY=VALUE")
    return TrainConfig(**merged)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    # nested mappings (fusion, storage_options) merge key by key: --width keeps the file's fusion kind
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _redacted_keys(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            found += _redacted_keys(value, f"{prefix}{key}.")
        elif value == REDACTED:
            found.append(prefix + str(key))
    return found


def _checked(settings: Mapping[str, Any], cls: type, source: str, *, from_text: bool = False,
             prefix: str = "") -> dict[str, Any]:
    """``settings`` with every key a field of ``cls`` and every value of its field's type (text converted
    where ``from_text`` or where the field takes no text); a nested config becomes a checked dict."""
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in names:
            what = f"{prefix.rstrip('.')} settings" if prefix else "settings"
            raise ConfigError(f"unknown setting {prefix + str(key)!r} in {source}; valid {what}: {', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = to_dict(value)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix + key} in {source} takes keys ({key}.NAME=VALUE), not {value!r}")
            out[key] = _checked(value, hint, source, from_text=from_text, prefix=f"{prefix}{key}.")
        else:
            out[key] = _typed(prefix + key, value, hint, source, from_text)
    return out


_type_hints = functools.cache(typing.get_type_hints)


def _typed(name: str, value: Any, hint: Any, source: str, from_text: bool) -> Any:
    if isinstance(value, str) and (from_text or not _matches(value, hint)):
        value = _from_text(name, value, hint, source)
    elif from_text and isinstance(value, Mapping) and typing.get_origin(hint) is dict:
        value = {k: parse_option_value(v) if isinstance(v, str) else v for k, v in value.items()}
    if not _matches(value, hint):
        raise ConfigError(f"{name} in {source} must be {_type_name(hint)}, not {value!r}")
    return value


def _options(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a union type (``int | None`` -> int, NoneType); a plain type alone."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _from_text(name: str, text: str, hint: Any, source: str) -> Any:
    """Text typed in --set (or a YAML string) as the field's type: 'none' for an optional field, true/false,
    numbers, layer lists ('0-4,8'), JSON objects."""
    alternatives = _options(hint)
    word = text.strip().lower()
    if type(None) in alternatives and word in ("none", "null"):
        return None
    if str in alternatives:
        return text
    try:
        if bool in alternatives:
            return _BOOL_WORDS[word]
        if int in alternatives:
            return int(text)
        if float in alternatives:
            return float(text)
        if any(typing.get_origin(a) is list for a in alternatives):
            return parse_layers(text)
        if any(typing.get_origin(a) is dict for a in alternatives):
            return json.loads(text)
    except (KeyError, ValueError):
        pass
    raise ConfigError(f"{name} in {source} must be {_type_name(hint)}, not {text!r}")


def _matches(value: Any, hint: Any) -> bool:
    for alt in _options(hint):
        origin = typing.get_origin(alt)
        if alt is Any or (alt is type(None) and value is None):
            return True
        if alt in (int, float) and isinstance(value, bool):
            continue  # True is an int to Python, not to a config
        if alt is float and isinstance(value, int | float):
            return True
        if origin is list and isinstance(value, list | tuple):
            (item,) = typing.get_args(alt)
            if all(_matches(v, item) for v in value):
                return True
        elif origin is dict and isinstance(value, Mapping):
            return True
        elif origin is None and isinstance(alt, type) and isinstance(value, alt):
            return True
    return False


def _type_name(hint: Any) -> str:
    return " or ".join("none" if a is type(None) else getattr(a, "__name__", str(a)) for a in _options(hint))
