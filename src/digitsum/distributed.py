"""Several processes training one model (torchrun): who we are, the process group, small collectives.

`torchrun --nproc-per-node N -m digitsum train ...` starts N copies of the CLI with WORLD_SIZE,
RANK and LOCAL_RANK in their environment. `world_from_env()` reads them; without them (or with
WORLD_SIZE=1) it returns None and training never touches torch.distributed, so a single-process
run is exactly what it was before.

Every helper here takes the `World` it works in; none of them is called in a single-process run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from digitsum.errors import DigitsumError

# How long a rank waits for the others (process-group set-up and every collective, including the
# barrier while rank 0 writes the run folder and runs the final evaluation) before it gives up
# with an error instead of hanging. Override with $DIGITSUM_DIST_TIMEOUT (seconds).
DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class World:
    """This process's place among the training processes torchrun started."""

    rank: int  # 0..size-1 over all machines
    local_rank: int  # 0.. on this machine (picks the GPU)
    size: int

    @property
    def main(self) -> bool:
        """Rank 0 writes the run folder and logs; the others only train."""
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """This rank's seed for its own random streams (augmentation, dropout), from the run's seed."""
        return (seed * 1000 + self.rank) % 2**64


def world_from_env(environ=None) -> World | None:
    """The World torchrun describes in the environment, or None for a single process.

    Raises DigitsumError (one line) on malformed values, before anything is set up.
    """
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = environ.get(name, "")
        try:
            values[name] = int(text)
        except ValueError:
            raise DigitsumError(
                f"${name} must be an integer when $WORLD_SIZE is set (torchrun sets both), got {text!r}"
            ) from None
    size, rank, local_rank = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise DigitsumError(f"inconsistent torchrun environment: WORLD_SIZE={size} RANK={rank} LOCAL_RANK={local_rank}")
    if size == 1:
        return None  # one process: the plain path, bit for bit
    return World(rank=rank, local_rank=local_rank, size=size)


def timeout() -> timedelta:
    """The collective timeout ($DIGITSUM_DIST_TIMEOUT seconds, default DEFAULT_TIMEOUT_S)."""
    text = os.environ.get("DIGITSUM_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise DigitsumError(f"$DIGITSUM_DIST_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return timedelta(seconds=seconds)


def rank_device(world: World, device: torch.device) -> torch.device:
    """The device this rank trains on: cuda:LOCAL_RANK when the run is on CUDA, else `device`."""
    if device.type != "cuda":
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise DigitsumError(
            f"LOCAL_RANK {world.local_rank} has no GPU: this machine has "
            f"{torch.cuda.device_count()} (start fewer processes per node)"
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def init(world: World, device: torch.device) -> None:
    """Join the process group: nccl on CUDA, gloo otherwise (rendezvous from torchrun's env://)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    try:
        dist.init_process_group(backend, timeout=timeout(), rank=world.rank, world_size=world.size, **kwargs)
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise DigitsumError(f"cannot join the {backend} process group as rank {world.rank}/{world.size} ({first})") from None


def close() -> None:
    """Leave the process group (no-op when none is set up)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_error(message: str) -> str:
    """Every rank's validation result in, the first error (or "") out on every rank.

    So that a refusal on any rank is the same one-line error on all of them, and no rank goes on
    to write while another is still checking (this is also the barrier before any side effect).
    """
    import torch.distributed as dist

    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m), "")


def broadcast_object(value, src: int = 0):
    """Rank `src`'s `value` on every rank (e.g. the default run folder name, which has a timestamp)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_state(*modules: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's `modules`, in place.

    DDP keeps parameters equal, but each rank's BatchNorm running statistics (and a weight
    average over them) see that rank's last batches; after this every rank holds what rank 0 saves.
    """
    import torch.distributed as dist

    for module in modules:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def barrier() -> None:
    """Wait for every rank (up to the process group's timeout)."""
    import torch.distributed as dist

    dist.barrier()


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state_dict (names, dtypes, shapes, bytes): equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
