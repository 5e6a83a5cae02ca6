"""Multi-process work under torchrun: who am I, which device, which share of the data, and lock-step steps.

torchrun (``python -m torch.distributed.run``) sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE;
extraction only reads them to pick its shard, training joins a process group (gloo on CPU, nccl on CUDA)
and wraps the model in DistributedDataParallel (``train.fit``).

How training splits the data (docs/scale.md): every rank owns a fixed, duration-balanced share of the
utterances (``balanced_assignment``), plans its own length-bucketed batches over that share each epoch
and reads only those (a rank never decodes another rank's chunks; ``--in-memory`` holds only its share).
So every utterance is seen exactly once per epoch -- no DistributedSampler padding, no duplicates. Shares
rarely cut into the same number of batches, so the ranks step in lock-step (``lockstep``): a rank that
has run out repeats its last batch with weight zero until every rank is done, and each step's loss is
weighted by the rank's share of the utterances in the global batch, so the averaged DDP gradient is
exactly the gradient of the mean loss over the global batch, as one process would compute it.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

__all__ = ["Dist", "balanced_assignment", "current", "init", "lockstep", "resolve_device", "shutdown"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"  # where collectives run: cpu (gloo) or cuda:N (nccl)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a single process) --

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX,
                                "min": tdist.ReduceOp.MIN}[op])
        return t.cpu().tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (pickled; for small things)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def current() -> Dist:
    """The job as torchrun's environment describes it (no process group needed)."""
    world = _env_int("WORLD_SIZE", 1)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return Dist(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), local_world)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when present, else CPU. Under torchrun every rank of a node would otherwise pile onto
    cuda:0, so ``auto`` and a bare ``cuda`` mean one GPU per local rank."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was asked for but no CUDA device is visible (use --device cpu)")
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", _env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
    return torch.device(device)


_INITIALISED_HERE = False


def init(device: torch.device) -> Dist:
    """Join torchrun's process group (once per process) and describe it; a plain ``Dist()`` otherwise."""
    global _INITIALISED_HERE
    d = current()
    if not d.enabled:
        return d
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend=backend)
        _INITIALISED_HERE = True
        atexit.register(shutdown)  # one group per process: several runs (probe) share it
    if tdist.get_world_size() != d.world_size or tdist.get_rank() != d.rank:
        raise RuntimeError(f"process group (rank {tdist.get_rank()} of {tdist.get_world_size()}) disagrees "
                           f"with the environment (RANK {d.rank}, WORLD_SIZE {d.world_size})")
    return Dist(d.rank, d.world_size, d.local_rank, d.local_world_size,
                device=str(device) if tdist.get_backend() == "nccl" else "cpu")


def shutdown() -> None:
    """Leave the process group if ``init`` created it (a library caller's own group is left alone)."""
    global _INITIALISED_HERE
    if _INITIALISED_HERE and tdist.is_initialized():
        tdist.destroy_process_group()
    _INITIALISED_HERE = False


def balanced_assignment(weights: Sequence[float], parts: int, keys: Sequence[Any] | None = None) -> list[int]:
    """The part (0..parts-1) of each item: heaviest first, each to the lightest part so far (ties by
    ``keys``, else position), so the parts' total weights differ by at most one item. Deterministic."""
    keys = list(keys) if keys is not None else list(range(len(weights)))
    loads = [0.0] * parts
    out = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-float(weights[i]), keys[i])):
        p = min(range(parts), key=lambda k: (loads[k], k))
        loads[p] += max(float(weights[i]), 1e-9)
        out[i] = p
    return out


def lockstep(batches: Iterable[Any], d: Dist) -> Iterator[tuple[Any, float]]:
    """(batch, weight) per global step until every rank has run out of batches.

    ``weight`` is this rank's share of the global batch's utterances times the world size: DDP averages
    gradients over ranks, so ``loss * weight`` makes the average the gradient of the global mean loss.
    A rank that has run out repeats its last batch with weight 0 (its backward still joins the
    all-reduce). In one process: every batch, weight 1.
    """
    it = iter(batches)
    last = None
    while True:
        batch = next(it, None)
        n = len(batch) if batch is not None else 0
        total, active = d.all_reduce([n, int(batch is not None)])
        if active == 0:
            return
        if batch is None:
            if last is None:
                raise RuntimeError(f"rank {d.rank} has no training batch at all: fewer utterances than "
                                   "ranks? (use fewer processes)")
            yield last, 0.0
            continue
        last = batch
        yield batch, n / total * d.world_size
