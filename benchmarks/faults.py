"""Fault injection on real speech: kill extraction (and training) at random moments, resume, compare.

Scenarios (all on the same utterances, each compared with one uninterrupted extraction):
- kill:   `hff-cache extract` killed with SIGKILL at random moments, --kills times; every killed run is
          followed by a resume (the next launch of the same command). After every kill `verify` must pass;
          when a cache completes a new round starts on a fresh cache until the kills are spent.
- race:   the same command started twice at once on one cache: one is refused by the worker lock (or both
          finish); then a rerun completes it.
- shards: three shard workers (--num-shards 3) writing one cache concurrently.
- disk:   a tmpfs smaller than the cache (root only): a clear error, committed parts intact, resume after
          the tmpfs is enlarged completes the cache.
- train:  `hff-cache train` killed after a random checkpoint and resumed with --resume, compared with an
          uninterrupted run: same step count, same weights and AdamW moments.

    python benchmarks/faults.py --kills 20        # LibriSpeech subset, faster-whisper:tiny.en, 40 utterances

Prints the counts (runs killed, resumes, utterances lost, duplicated) and writes docs/results/faults.md.
Exit status 1 if any utterance was lost or duplicated or any check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hff_cache.cache import CacheReader
from hff_cache.cache.verify import verify_cache
from hff_cache.intake.manifests import load_intake
from hff_cache.runtime.threads import LoadWatch, usable_cpus, warn_if_loaded
from hff_cache.testing import parts_on_disk

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "hff_cache"]


# --- harness ----------------------------------------------------------------------------------------------


def kill_at_random(cmd: list[str], out: Path, rng: random.Random, timeout: float = 600.0) -> dict[str, Any]:
    """Run `cmd` and SIGKILL it at a random moment of its extraction.

    Moments: "new-part", the instant a new part directory appears (its arrays are being written), or
    "after-commit", a random delay (0-1.5 s) after the next commit (encoding, buffering or writing).
    Returns {"outcome": killed | finished, "mode", "seconds"}.
    """
    before, committed_before = parts_on_disk(out)
    mode = rng.choice(["new-part", "after-commit"])
    delay = rng.uniform(0.0, 1.5)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"no progress within {timeout} s: {' '.join(cmd)}")
            names, committed = parts_on_disk(out)
            if mode == "new-part" and names - before:
                break
            if mode == "after-commit" and committed > committed_before:
                time.sleep(delay)
                break
            time.sleep(0.005)
        if proc.poll() is not None:
            return {"outcome": "finished", "mode": mode, "seconds": time.monotonic() - t0, "rc": proc.returncode}
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        return {"outcome": "killed", "mode": mode, "seconds": time.monotonic() - t0}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)


def compare(out: Path, ref: CacheReader) -> dict[str, Any]:
    """Lost, duplicated and extra utterances of `out` against the reference, feature drift, verify."""
    rep = verify_cache(str(out))
    r = CacheReader(str(out))
    got, want = set(r.ids), set(ref.ids)
    drift = 0.0
    for uid in sorted(got & want):
        drift = max(drift, float(np.abs(r.read(uid) - ref.read(uid)).max()))
    # The reader indexes the first copy of an id and lists every further copy (in any part) as a duplicate.
    return {"lost": len(want - got), "duplicated": len(r.duplicates), "extra": len(got - want),
            "verify_ok": rep.ok, "problems": [str(p) for p in rep.problems],
            "uncommitted_left": len(rep.uncommitted_parts), "max_abs_diff": drift}


# --- scenarios -------------------------------------------------------------------------------------------


def make_manifest(data: str, n: int, path: Path) -> Path:
    utts = sorted(load_intake(data), key=lambda u: u.id)[:n]
    with path.open("w", encoding="utf-8") as f:
        for u in utts:
            f.write(json.dumps({"id": u.id, "audio": u.audio, "text": u.text, "duration": u.duration, **u.meta})
                    + "\n")
    return path


def scenario_kill(args: argparse.Namespace, extract_cmd: Any, ref: CacheReader, work: Path,
                  rng: random.Random) -> dict[str, Any]:
    kills = resumes = rounds = verify_failures = interrupted_parts = 0
    lost = duplicated = extra = 0
    drift = 0.0
    modes: dict[str, int] = {}
    progress_regressions = 0
    while kills < args.kills:
        rounds += 1
        out = work / f"kill-{rounds}.zarr"
        seen = 0
        launches = 0
        while True:
            res = kill_at_random(extract_cmd(out), out, rng)
            launches += 1
            if res["outcome"] == "finished":
                if res.get("rc") != 0:
                    raise RuntimeError(f"extract failed (exit {res.get('rc')}) on {out}")
                break
            kills += 1
            modes[res["mode"]] = modes.get(res["mode"], 0) + 1
            rep = verify_cache(str(out), scan_values=False) if out.exists() else None
            if rep is not None:
                verify_failures += not rep.ok
                interrupted_parts += len(rep.uncommitted_parts)
                progress_regressions += rep.utterances < seen
                seen = rep.utterances
            print(f"  kill {kills:>3} ({res['mode']:<12} after {res['seconds']:5.1f} s): {seen} utterances "
                  f"committed, {len(rep.uncommitted_parts) if rep else 0} interrupted part(s), verify "
                  f"{'ok' if rep is None or rep.ok else 'FAILED'}", flush=True)
            if kills >= args.kills:
                # Finish this round uninterrupted so it can be compared.
                done = subprocess.run(extract_cmd(out), capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr)
                launches += 1
                break
        resumes += launches - 1
        c = compare(out, ref)
        lost += c["lost"]
        duplicated += c["duplicated"]
        extra += c["extra"]
        verify_failures += not c["verify_ok"] or c["uncommitted_left"] > 0
        drift = max(drift, c["max_abs_diff"])
        print(f"  round {rounds}: {launches} launches, lost {c['lost']}, duplicated {c['duplicated']}, "
              f"verify {'ok' if c['verify_ok'] else c['problems']}, max |diff| {c['max_abs_diff']:.2e}", flush=True)
    return {"runs_killed": kills, "resumes": resumes, "rounds": rounds, "utterances_lost": lost,
            "utterances_duplicated": duplicated, "extra": extra, "verify_failures": verify_failures,
            "interrupted_parts_seen": interrupted_parts, "progress_regressions": progress_regressions,
            "kill_moments": modes, "max_abs_diff": drift}


def scenario_race(args: argparse.Namespace, extract_cmd: Any, ref: CacheReader, work: Path) -> dict[str, Any]:
    outcomes: list[list[int]] = []
    lost = duplicated = failures = 0
    refused_ok = True
    for i in range(args.races):
        out = work / f"race-{i}.zarr"
        procs = [subprocess.Popen(extract_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        errs = [p.communicate()[1] for p in procs]
        res = [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]
        outcomes.append(sorted(rc for rc, _ in res))
        refused_ok &= all(rc == 0 or (rc == 2 and "being written by another process" in err) for rc, err in res)
        failures += not verify_cache(str(out)).ok
        subprocess.run(extract_cmd(out), capture_output=True, check=True)
        c = compare(out, ref)
        lost, duplicated = lost + c["lost"], duplicated + c["duplicated"]
        failures += not c["verify_ok"]
        print(f"  race {i}: exit codes {outcomes[-1]}, then lost {c['lost']}, duplicated {c['duplicated']}",
              flush=True)
    return {"races": args.races, "exit_codes": outcomes, "refusals_clear": refused_ok,
            "utterances_lost": lost, "utterances_duplicated": duplicated, "verify_failures": failures}


def scenario_shards(extract_cmd: Any, ref: CacheReader, work: Path, n: int = 3) -> dict[str, Any]:
    out = work / "shards.zarr"
    t0 = time.perf_counter()
    procs = [subprocess.Popen(extract_cmd(out, "--num-shards", str(n), "--shard-index", str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    for p in procs:
        p.communicate()
    codes = [p.returncode for p in procs]
    c = compare(out, ref)
    workers = sorted({p.worker for p in CacheReader(str(out)).parts()})
    print(f"  {n} shard workers at once: exit codes {codes}, workers {workers}, lost {c['lost']}, "
          f"duplicated {c['duplicated']}, verify {'ok' if c['verify_ok'] else c['problems']}", flush=True)
    return {"workers": n, "exit_codes": codes, "utterances_lost": c["lost"], "utterances_duplicated":
            c["duplicated"], "verify_ok": c["verify_ok"], "seconds": time.perf_counter() - t0}


def scenario_disk(extract_cmd: Any, ref: CacheReader, ref_path: Path, work: Path) -> dict[str, Any]:
    mnt = work / "tmpfs"
    mnt.mkdir()
    # tmpfs rounds every file up to a 4 KiB page: size the mount from the reference's page usage.
    pages = sum(-(-f.stat().st_size // 4096) for f in ref_path.rglob("*") if f.is_file()) * 4096
    size = max(256 * 1024, int(pages * 0.4))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True,
                       capture_output=True, text=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"  disk: skipped, cannot mount a tmpfs ({getattr(e, 'stderr', '') or e})")
        return {"skipped": True}
    try:
        out = mnt / "c.zarr"
        run = subprocess.run(extract_cmd(out), capture_output=True, text=True)
        message = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""
        clear = run.returncode == 2 and "disk is full" in run.stderr and "rerun the same command" in run.stderr
        rep = verify_cache(str(out))
        partial = rep.utterances
        subprocess.run(["mount", "-o", f"remount,size={pages * 2}", str(mnt)], check=True)
        subprocess.run(extract_cmd(out), capture_output=True, check=True)
        c = compare(out, ref)
        print(f"  full disk ({size // 1024} KiB): exit {run.returncode}, clear message {clear}, committed parts "
              f"{'intact' if rep.ok else 'DAMAGED'} ({partial} utterances); after freeing space: lost "
              f"{c['lost']}, duplicated {c['duplicated']}", flush=True)
        print(f"    {message}")
        return {"tmpfs_bytes": size, "exit_code": run.returncode, "clear_message": clear, "message": message,
                "intact_after_error": rep.ok, "utterances_before_full": partial, "utterances_lost": c["lost"],
                "utterances_duplicated": c["duplicated"], "verify_ok": c["verify_ok"]}
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def scenario_train(args: argparse.Namespace, ref_path: Path, work: Path, rng: random.Random) -> dict[str, Any]:
    """Kill training after a random completed epoch (plus a random delay), resume, compare with an
    uninterrupted run: the same steps, weights and optimiser state."""
    import torch
    from safetensors.torch import load_file

    def cmd(out: Path, *extra: str) -> list[str]:
        return [*CLI, "train", "--cache", str(ref_path), "--out", str(out), "--fusion", "weighted", "--width", "64",
                "--blocks", "1", "--epochs", str(args.train_epochs), "--batch-frames", "4000", "--device", "cpu",
                "--threads", "1", "--seed", "0", *extra]

    t0 = time.perf_counter()
    full = work / "train-full"
    subprocess.run(cmd(full), capture_output=True, check=True)
    kills = resumes = 0
    out = work / "train-killed"
    state_file = out / "checkpoints" / "last.state.pt"
    while True:
        extra = ["--resume"] if out.exists() else []
        before = state_file.stat().st_mtime_ns if state_file.exists() else 0
        proc = subprocess.Popen(cmd(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            if state_file.exists() and state_file.stat().st_mtime_ns != before:
                time.sleep(rng.uniform(0.0, 2.0))
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            if proc.returncode != 0:
                raise RuntimeError(f"train exited {proc.returncode}")
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        resumes += 1
    a, b = load_file(str(full / "checkpoints" / "last.safetensors")), load_file(str(state_file.with_name(
        "last.safetensors")))
    sa = torch.load(full / "checkpoints" / "last.state.pt", weights_only=True)
    sb = torch.load(state_file, weights_only=True)
    weight_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moments = [float((x - y).abs().max()) for i in sa["optimizer"]["state"]
               for x, y in ((sa["optimizer"]["state"][i]["exp_avg"], sb["optimizer"]["state"][i]["exp_avg"]),
                            (sa["optimizer"]["state"][i]["exp_avg_sq"], sb["optimizer"]["state"][i]["exp_avg_sq"]))]
    epochs = [r["epoch"] for r in sb["history"]]
    res = {"runs_killed": kills, "resumes": resumes, "steps_uninterrupted": sa["step"], "steps_resumed": sb["step"],
           "epochs_logged": epochs, "max_weight_diff": weight_diff, "max_adam_moment_diff": max(moments),
           "seconds": time.perf_counter() - t0}
    print(f"  training: {kills} kills, {resumes} resumes; steps {sb['step']} vs {sa['step']} uninterrupted; "
          f"epochs logged {epochs}; max |weight diff| {weight_diff:.2e}, max |Adam moment diff| {max(moments):.2e}",
          flush=True)
    return res


# --- main -------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/shared/data/librispeech-subset")
    ap.add_argument("--model", default="faster-whisper:tiny.en")
    ap.add_argument("--utterances", type=int, default=40, help="First N utterances (sorted by id)")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--races", type=int, default=2)
    ap.add_argument("--train-epochs", type=int, default=6)
    ap.add_argument("--part-frames", type=int, default=1000, help="Small parts: many commits to kill between")
    ap.add_argument("--batch-seconds", type=float, default=30.0)
    ap.add_argument("--scenarios", default="kill,race,shards,disk,train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="Keep the caches here (default: a temporary folder)")
    ap.add_argument("--report", default=str(ROOT / "docs" / "results" / "faults.md"))
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    warn_if_loaded()

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hff-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    manifest = make_manifest(args.data, args.utterances, work / "manifest.jsonl")

    def extract_cmd(out: Path, *extra: str) -> list[str]:
        return [*CLI, "extract", "--model", args.model, "--data", str(manifest), "--out", str(out), "--no-progress",
                "--part-frames", str(args.part_frames), "--batch-seconds", str(args.batch_seconds),
                "--device", "cpu", *extra]

    # the uninterrupted reference run and every scenario; up to 3 extractions run at once (shards)
    with LoadWatch(own=3 * usable_cpus()) as watch:
        t0 = time.perf_counter()
        ref_path = work / "reference.zarr"
        reused = ref_path.exists()
        if not reused:
            subprocess.run(extract_cmd(ref_path), check=True, capture_output=True)
        ref = CacheReader(str(ref_path))
        ref_note = "reused" if reused else f"{time.perf_counter() - t0:.0f} s"
        print(f"{args.model} on {len(ref)} utterances ({ref.num_samples.sum() / 16000 / 60:.1f} min) from {args.data}; "
              f"{len(ref.parts())} parts of <= {args.part_frames} frames; uninterrupted run {ref_note}", flush=True)

        results: dict[str, Any] = {"model": args.model, "utterances": len(ref), "parts": len(ref.parts()),
                                   "part_frames": args.part_frames, "seed": args.seed}
        try:
            if "kill" in scenarios:
                print(f"kill: SIGKILL x{args.kills}, each followed by a resume", flush=True)
                results["kill"] = scenario_kill(args, extract_cmd, ref, work, rng)
            if "race" in scenarios:
                print("race: the same extraction twice at once", flush=True)
                results["race"] = scenario_race(args, extract_cmd, ref, work)
            if "shards" in scenarios:
                print("shards: three workers at once", flush=True)
                results["shards"] = scenario_shards(extract_cmd, ref, work)
            if "disk" in scenarios:
                print("disk: a tmpfs smaller than the cache", flush=True)
                results["disk"] = scenario_disk(extract_cmd, ref, ref_path, work)
            if "train" in scenarios:
                print("train: SIGKILL after random checkpoints, --resume", flush=True)
                results["train"] = scenario_train(args, ref_path, work, rng)
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    results["machine"], results["machine_line"] = watch.summary(), watch.line()

    bad = _summary(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    if args.report:
        _write_report(Path(args.report), results, " ".join(sys.argv))
    return 1 if bad else 0


def _summary(r: dict[str, Any]) -> bool:
    lines, bad = [], False
    if "kill" in r:
        k = r["kill"]
        lines.append(f"runs killed {k['runs_killed']}, resumes {k['resumes']}, utterances lost "
                     f"{k['utterances_lost']}, duplicated {k['utterances_duplicated']} "
                     f"({k['rounds']} round(s); verify failures {k['verify_failures']}; interrupted parts "
                     f"discarded {k['interrupted_parts_seen']}; max |feature diff| {k['max_abs_diff']:.2e})")
        bad |= bool(k["utterances_lost"] or k["utterances_duplicated"] or k["extra"] or k["verify_failures"]
                    or k["progress_regressions"])
    for name in ("race", "shards", "disk"):
        if name in r and not r[name].get("skipped"):
            x = r[name]
            lines.append(f"{name}: utterances lost {x['utterances_lost']}, duplicated {x['utterances_duplicated']}")
            bad |= bool(x["utterances_lost"] or x["utterances_duplicated"])
            bad |= bool(x.get("verify_failures") or x.get("verify_ok") is False or x.get("clear_message") is False
                        or x.get("refusals_clear") is False)
    if "train" in r:
        t = r["train"]
        lines.append(f"train: runs killed {t['runs_killed']}, resumes {t['resumes']}, steps {t['steps_resumed']} "
                     f"(uninterrupted {t['steps_uninterrupted']}), max |weight diff| {t['max_weight_diff']:.2e}")
        bad |= t["steps_resumed"] != t["steps_uninterrupted"] or t["max_weight_diff"] > 1e-5
    print("\n== summary ==\n" + "\n".join(lines) + f"\n{'FAILED' if bad else 'PASSED'} in {r['seconds']:.0f} s")
    print(r["machine_line"])
    return bad


def _write_report(path: Path, r: dict[str, Any], command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = ["# Fault injection", "", f"`{command}`", "",
           f"{r['model']}, {r['utterances']} LibriSpeech utterances, {r['parts']} parts of <= {r['part_frames']} "
           f"frames, seed {r['seed']}; {r['seconds']:.0f} s in all.", "", "| scenario | result |", "|---|---|"]
    if "kill" in r:
        k = r["kill"]
        out.append(f"| SIGKILL + resume | {k['runs_killed']} runs killed ({k['kill_moments']}), {k['resumes']} "
                   f"resumes over {k['rounds']} round(s): **{k['utterances_lost']} lost, "
                   f"{k['utterances_duplicated']} duplicated**; verify failed {k['verify_failures']} times; "
                   f"{k['interrupted_parts_seen']} interrupted parts discarded on resume; max feature diff to the "
                   f"uninterrupted run {k['max_abs_diff']:.1e} (fp16, other batch composition) |")
    if "race" in r:
        x = r["race"]
        out.append(f"| same extraction twice at once | exit codes {x['exit_codes']} (2 = refused by the worker "
                   f"lock); after a rerun {x['utterances_lost']} lost, {x['utterances_duplicated']} duplicated |")
    if "shards" in r:
        x = r["shards"]
        out.append(f"| {x['workers']} shard workers at once | exit codes {x['exit_codes']}; "
                   f"{x['utterances_lost']} lost, {x['utterances_duplicated']} duplicated, verify "
                   f"{'ok' if x['verify_ok'] else 'FAILED'} |")
    if "disk" in r and not r["disk"].get("skipped"):
        x = r["disk"]
        out.append(f"| tmpfs of {x['tmpfs_bytes'] // 1024} KiB | exit {x['exit_code']}: \"{x['message']}\"; "
                   f"{x['utterances_before_full']} utterances committed and intact; after enlarging it, "
                   f"{x['utterances_lost']} lost, {x['utterances_duplicated']} duplicated |")
    if "train" in r:
        t = r["train"]
        out.append(f"| training SIGKILL + --resume | {t['runs_killed']} kills; {t['steps_resumed']} steps "
                   f"(uninterrupted {t['steps_uninterrupted']}); epochs logged {t['epochs_logged']}; max weight "
                   f"diff {t['max_weight_diff']:.1e}, max Adam moment diff {t['max_adam_moment_diff']:.1e} |")
    out += ["", r["machine_line"]]
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
