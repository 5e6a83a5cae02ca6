"""The feature cache: the one place that knows the on-disk format (see docs/cache_format.md).

numpy + zarr only; nothing here imports torch or training code.
"""

from .codecs import CODECS, Codec, FP16Codec, Int4Codec, Int8Codec, get_codec, register_codec
from .format import (
    FORMAT_VERSION,
    CacheFormatError,
    CacheLockedError,
    CacheMeta,
    CacheMismatchError,
    CacheWriteError,
    CodecSpec,
    EncoderInfo,
    cache_id,
    check_compatible,
)
from .reader import CacheReader, PartInfo
from .transcode import transcode_cache
from .verify import Problem, VerifyReport, verify_cache
from .writer import CacheWriter, clear_shard_record, record_shard_complete

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "CacheFormatError",
    "CacheLockedError",
    "CacheMeta",
    "CacheMismatchError",
    "CacheReader",
    "CacheWriteError",
    "CacheWriter",
    "Codec",
    "CodecSpec",
    "EncoderInfo",
    "FP16Codec",
    "Int4Codec",
    "Int8Codec",
    "PartInfo",
    "Problem",
    "VerifyReport",
    "cache_id",
    "check_compatible",
    "clear_shard_record",
    "get_codec",
    "record_shard_complete",
    "register_codec",
    "transcode_cache",
    "verify_cache",
]
