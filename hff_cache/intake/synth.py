"""Offline synthetic speech corpus: seeded sentences spoken by espeak-ng / flite -> 16 kHz WAVs + JSONL."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

_FORMAT_VERSION = 1  # bump when sentence grammar / rendering changes so cached corpora are rebuilt
NO_ENGINE_MSG = ("no speech synthesizer found: install one with `apt-get install -y espeak-ng` "
                 "(optionally also `flite`), or `pip install espeakng-loader`")

ESPEAK_BASES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan",
                "en-gb-x-gbcwmd", "en-us-nyc")
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4",
                   "klatt", "klatt2", "klatt3", "klatt4")
FLITE_VOICES = ("slt", "rms", "awb", "kal16")  # kal16 preferred over kal (same speaker, 8 kHz)

_W = str.split
NUMBERS = _W("two three four five six seven eight nine ten eleven twelve fifteen twenty thirty forty fifty "
             "sixty")
COLOURS = _W("red blue green yellow black white brown pink orange purple grey gold silver")
ADJECTIVES = _W("big small old new tall short happy quiet loud warm cold bright dark soft heavy light "
                "clean dirty young fast slow")
NOUNS = _W("cat dog bird fish horse cow pig duck box cup ball book chair table car boat train bus hat shoe "
           "key lamp door window tree flower apple egg bottle bag coat pen map clock phone glass plate "
           "spoon bed desk shirt rock kite drum bell toy cake")
INTRANSITIVE = _W("sat stood ran walked jumped slept waited played stayed rested danced fell")
TRANSITIVE = _W("saw found bought took left painted moved carried sold kept washed dropped lost "
                "wanted needed opened")
PREPOSITIONS = ["near", "in", "under", "behind", "beside", "next to", "in front of", "on top of", "by"]
PLACES = _W("river kitchen park bridge house garden school station market shop road hill lake beach "
            "office forest farm street church library window door wall gate field")
PEOPLE = ["my brother", "my sister", "the teacher", "our neighbour", "a farmer", "the doctor", "my friend",
          "the children", "his mother", "her father", "the old man", "a little girl", "the driver", "we",
          "they", "i", "you", "she", "he"]
TIMES = ["today", "yesterday", "this morning", "last night", "on monday", "on friday", "at noon",
         "every day", "in the evening", "after lunch", "before dinner", "last week"]


@dataclass
class SynthConfig:
    out_dir: Path | str
    num_train: int = 400
    num_valid: int = 80
    seed: int = 0
    sample_rate: int = 16000
    engines: tuple[str, ...] | None = None  # None = every available engine
    num_valid_espeak_voices: int = 16  # voice+variant combos held out of training for validation
    flite_fraction: float = 0.3  # share of utterances rendered by flite when it is available
    workers: int | None = None  # not part of the corpus identity


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(r: random.Random) -> str:
    c, n, adj = r.choice, r.choice(NOUNS), r.choice(ADJECTIVES + COLOURS)
    where = f"{c(PREPOSITIONS)} the {c(PLACES)}"
    templates = [
        lambda: f"the {adj} {n} {c(INTRANSITIVE)} {where}",
        lambda: f"{c(PEOPLE)} {c(TRANSITIVE)} {c(NUMBERS)} {c(COLOURS)} {_plural(n)}",
        lambda: f"{c(PEOPLE)} {c(TRANSITIVE)} the {adj} {n} {c(TIMES)}",
        lambda: f"there are {c(NUMBERS)} {_plural(n)} {where}",
        lambda: f"please put {_a(adj)} {n} {where}",
        lambda: f"{c(NUMBERS)} {adj} {_plural(n)} {c(INTRANSITIVE)} {where} {c(TIMES)}",
        lambda: f"{c(TIMES)} {c(PEOPLE)} {c(TRANSITIVE)} {_a(adj)} {n}",
        lambda: f"where is the {adj} {n}",
        lambda: f"the {n} is {c(COLOURS)} and {c(ADJECTIVES)}",
    ]
    return c(templates)()


def generate_sentences(n: int, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """`n` distinct lowercase sentences of 3-10 words, deterministic in `seed`, none of them in `exclude`."""
    r, seen, out = random.Random(seed), set(exclude), []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        s = _sentence(r)
        if 3 <= len(s.split()) <= 10 and s not in seen:
            seen.add(s)
            out.append(s)
    return out


class _EspeakLib:
    """espeak-ng via the shared library in the `espeakng-loader` wheel (used when no binary is on PATH)."""

    def __init__(self) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        # 2 = AUDIO_OUTPUT_SYNCHRONOUS: samples arrive through the callback before espeak_Synth returns
        self.rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.rate})")
        self._chunks: list[np.ndarray] = []
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._cb = proto(self._collect)  # keep a reference: ctypes does not
        lib.espeak_SetSynthCallback(self._cb)
        self.lib, self.lock = lib, threading.Lock()  # the library has global state: one utterance at a time

    def _collect(self, wav, n: int, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synth(self, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
        with self.lock:
            self._chunks = []
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise RuntimeError(f"espeak-ng voice not found: {voice}")
            self.lib.espeak_SetParameter(1, speed, 0)  # espeakRATE
            self.lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH
            data = text.encode()
            self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, UTF8
            self.lib.espeak_Synchronize()
            return np.concatenate(self._chunks or [np.zeros(0, np.int16)]) / 32768.0, self.rate


@functools.cache
def _espeak_lib() -> _EspeakLib | None:
    try:
        return _EspeakLib()
    except (ImportError, OSError, RuntimeError):
        return None


def _flite_voices() -> list[str]:
    if not shutil.which("flite"):
        return []
    listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split(":")[-1].split()
    return [v for v in FLITE_VOICES if v in listed] or [v for v in ("kal",) if v in listed]


def available_engines() -> list[str]:
    engines = ["espeak-ng"] if shutil.which("espeak-ng") or _espeak_lib() is not None else []
    return engines + (["flite"] if _flite_voices() else [])


def _render(engine: str, voice: str, text: str, rate: float, pitch: int) -> tuple[np.ndarray, int]:
    if engine == "espeak-ng" and not shutil.which("espeak-ng"):
        lib = _espeak_lib()
        assert lib is not None
        return lib.synth(text, voice, int(rate), pitch)
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "u.wav")
        if engine == "espeak-ng":
            cmd = ["espeak-ng", "-v", voice, "-s", str(int(rate)), "-p", str(pitch), "-w", wav, text]
        else:
            cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={rate:.3f}", "-t", text, "-o", wav]
        subprocess.run(cmd, check=True, capture_output=True)
        audio, sr = sf.read(wav, dtype="float64", always_2d=True)
    return audio.mean(axis=1), sr


def _voice_split(cfg: SynthConfig, engines: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Deterministic disjoint (engine, voice) pools for train and valid."""
    r = random.Random(cfg.seed + 7919)
    train: list[tuple[str, str]] = []
    valid: list[tuple[str, str]] = []
    if "espeak-ng" in engines:
        combos = [("espeak-ng", b + (f"+{v}" if v else "")) for b in ESPEAK_BASES for v in ESPEAK_VARIANTS]
        r.shuffle(combos)
        k = min(cfg.num_valid_espeak_voices, len(combos) // 2)
        valid, train = combos[:k], combos[k:]
    if "flite" in engines:
        fl = [("flite", v) for v in _flite_voices()]
        r.shuffle(fl)
        if len(fl) > 1:  # hold one flite voice out so valid hears an unseen flite speaker too
            valid, fl = valid + fl[:1], fl[1:]
        train += fl
    if not train or not valid:
        raise RuntimeError(f"not enough voices to split train/valid with engines {engines}")
    return {"train": train, "valid": valid}


def _plan(cfg: SynthConfig, engines: list[str]) -> list[dict]:
    pools = _voice_split(cfg, engines)
    train_txt = generate_sentences(cfg.num_train, cfg.seed)
    texts = {"train": train_txt, "valid": generate_sentences(cfg.num_valid, cfg.seed + 1, exclude=train_txt)}
    r, jobs = random.Random(cfg.seed + 104729), []
    for split in ("train", "valid"):
        for i, text in enumerate(texts[split]):
            fl = [v for v in pools[split] if v[0] == "flite"]
            es = [v for v in pools[split] if v[0] != "flite"]
            engine, voice = r.choice(fl if fl and (not es or r.random() < cfg.flite_fraction) else es)
            rate = r.randint(130, 190) if engine == "espeak-ng" else r.uniform(0.85, 1.2)
            jobs.append(dict(split=split, id=f"{split}_{i:05d}", text=text, engine=engine, voice=voice,
                             rate=rate, pitch=r.randint(30, 70), gain=r.uniform(0.4, 0.95)))
    return jobs


def synthesize_corpus(cfg: SynthConfig, progress: Callable[[int, int], None] | None = None
                      ) -> tuple[Path, Path]:
    """Render the corpus (or reuse an identical one) and return (train_manifest, valid_manifest)."""
    out = Path(cfg.out_dir)
    engines = [e for e in available_engines() if cfg.engines is None or e in cfg.engines]
    if not engines:
        raise RuntimeError(NO_ENGINE_MSG)
    ident = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "workers")}
    ident.update(engines=engines, format=_FORMAT_VERSION)
    ident = json.loads(json.dumps(ident))  # tuples -> lists, so it compares equal to the stored json
    manifests = out / "train_manifest.jsonl", out / "valid_manifest.jsonl"
    cfg_path = out / "synth_config.json"
    if cfg_path.exists() and all(m.exists() for m in manifests) and json.loads(cfg_path.read_text()) == ident:
        return manifests
    cfg_path.unlink(missing_ok=True)  # invalidate first so an interrupted run is never mistaken as complete
    shutil.rmtree(out / "wavs", ignore_errors=True)  # drop orphans from an earlier, larger config
    (out / "wavs").mkdir(parents=True)
    jobs, done, lock = _plan(cfg, engines), 0, threading.Lock()

    def work(job: dict) -> dict:
        nonlocal done
        audio, sr = _render(job["engine"], job["voice"], job["text"], job["rate"], job["pitch"])
        if sr != cfg.sample_rate:
            audio = soxr.resample(audio, sr, cfg.sample_rate)
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        if not np.isfinite(peak) or peak < 1e-4:
            raise RuntimeError(f"{job['engine']} {job['voice']} produced silence for {job['text']!r}")
        rel = f"wavs/{job['id']}.wav"
        sf.write(out / rel, (audio * (job["gain"] / peak)).astype(np.float32), cfg.sample_rate, "PCM_16")
        with lock:
            done += 1
            if progress is not None:
                progress(done, len(jobs))
        return {"id": job["id"], "audio": rel, "text": job["text"].upper(), "speaker": f"{job['engine']}:"
                f"{job['voice']}", "duration": round(len(audio) / cfg.sample_rate, 3)}

    with ThreadPoolExecutor(cfg.workers or os.cpu_count() or 1) as pool:
        rows = list(pool.map(work, jobs))
    for split, path in zip(("train", "valid"), manifests, strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"].startswith(split)))
    cfg_path.write_text(json.dumps(ident, indent=1))
    return manifests
