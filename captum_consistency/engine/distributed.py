"""torchrun helpers: process group from the environment, ranks, seeding and RNG states.

``torchrun --nproc_per_node G recipes/train.py ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them. Run
with plain ``python`` the same code is a single process with ``world_size == 1``.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

# The public names are listed once, in captum_consistency.engine's __all__.


@dataclass
class DistributedInfo:
    """Where this process runs.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this node; the CUDA device index.
        device: the device this process computes on.
        distributed: True when a process group was initialised.

    Examples::

        >>> info = init_distributed("cpu")
        >>> info.rank, info.world_size, info.distributed, info.is_main
        (0, 1, False, True)
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs and writes checkpoints."""
        return self.rank == 0


def init_distributed(device: str = "cuda", backend: Optional[str] = None) -> DistributedInfo:
    """Initialises the default process group when launched by ``torchrun``.

    With ``WORLD_SIZE > 1`` in the environment, calls ``init_process_group`` (NCCL on CUDA,
    gloo on CPU, ``init_method="env://"``) and, on CUDA, selects the GPU ``LOCAL_RANK``.
    Otherwise nothing is initialised and a single-process description is returned.

    Args:
        device (str): ``"cuda"`` or ``"cpu"``.
        backend (str, optional): overrides the process-group backend.

    Returns:
        DistributedInfo

    Raises:
        ValueError: unknown ``device``.
        RuntimeError: ``device="cuda"`` without a visible GPU.

    Examples::

        >>> info = init_distributed("cpu")
        >>> info.world_size
        1
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but no CUDA device is available; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world_size > 1
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if distributed and not dist.is_initialized():
        backend = backend or ("nccl" if device == "cuda" else "gloo")
        kwargs = {"device_id": dev} if device == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return DistributedInfo(rank, world_size, local_rank, dev, distributed)


def cleanup_distributed() -> None:
    """Destroys the default process group if one exists.

    Returns:
        None

    Examples::

        >>> info = init_distributed("cuda")
        >>> try:
        ...     train(info)
        ... finally:
        ...     cleanup_distributed()
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # every group, the CPU group of all_ranks_true included
    _cpu_group_of.update(world=None, group=None)


@contextlib.contextmanager
def distributed_session(
    device: str = "cuda", backend: Optional[str] = None
) -> Iterator[DistributedInfo]:
    """:func:`init_distributed` for the block, then :func:`cleanup_distributed`, however it ends.

    The frame of every recipe's ``main``: under ``torchrun`` the process group exists for the
    block and is destroyed after it (also when the block raises), so that a failing rank does
    not leave a group behind.

    Args:
        device (str): ``"cuda"`` or ``"cpu"``.
        backend (str, optional): overrides the process-group backend.

    Yields:
        DistributedInfo: where this process runs.

    Examples::

        >>> with distributed_session("cpu") as info:
        ...     info.world_size
        1
    """
    info = init_distributed(device, backend)
    try:
        yield info
    finally:
        cleanup_distributed()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 outside a process group.

    Returns:
        int: ``torch.distributed.get_rank()`` when a process group is initialised, else 0.

    Examples::

        >>> get_rank()  # plain `python`, no process group
        0
    """
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 outside a process group.

    Returns:
        int: ``torch.distributed.get_world_size()`` in a process group, else 1.

    Examples::

        >>> get_world_size()  # plain `python`, no process group
        1
    """
    return dist.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and outside a process group).

    Returns:
        bool: whether this process logs and writes files.

    Examples::

        >>> if is_main_process():
        ...     save_checkpoint(state, "runs/x/checkpoint.pth")
    """
    return get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` inside a process group, a no-op outside.

    Returns:
        None

    Examples::

        >>> if is_main_process():
        ...     prepare_cache()
        >>> barrier()  # the other ranks wait for rank 0
    """
    if _initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over all ranks, in place, and returns it (identity outside a group).

    Args:
        tensor (Tensor): the local values, on the backend's device (CUDA under NCCL).

    Returns:
        Tensor: ``tensor`` itself, now holding the sum over all ranks.

    Examples::

        >>> counts = torch.tensor([correct, total], dtype=torch.float64)
        >>> all_reduce_sum(counts)  # dataset-wide under torchrun
    """
    if _initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# A CPU (gloo) group beside an NCCL default group, for the small host-side agreements of
# :func:`all_ranks_true`: an all-reduce on the NCCL group would make the host wait for the GPU.
_cpu_group_of: Dict[str, Any] = {"world": None, "group": None}


def _cpu_group() -> Optional[Any]:
    """The group for host-side collectives: the default one when it handles CPU tensors."""
    world = dist.group.WORLD
    if "gloo" in str(dist.get_backend()):
        return None
    if _cpu_group_of["world"] is not world:  # first call, or a new default group since
        # new_group is collective; every rank reaches the first all_ranks_true together.
        _cpu_group_of["group"] = dist.new_group(backend="gloo")
        _cpu_group_of["world"] = world
    return _cpu_group_of["group"]


def all_ranks_true(flag: bool) -> bool:
    """True when ``flag`` is True on every rank (collective under torchrun).

    For decisions that every rank must take together, such as skipping a training step that
    some rank cannot take: under ``DistributedDataParallel`` a rank that skipped a backward
    pass alone would leave the others waiting for its gradients forever. The vote is an
    all-reduce of one integer on the CPU (through a gloo group when the default group is
    NCCL), so it never waits for an accelerator. Outside a process group it returns ``flag``.

    Args:
        flag (bool): this rank's vote.

    Returns:
        bool: the logical AND of every rank's ``flag``.

    Examples::

        >>> usable = images.shape[0] >= min_batch_size
        >>> if not all_ranks_true(usable):  # every rank skips this step, or none does
        ...     continue
    """
    if not _initialized():
        return bool(flag)
    vote = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=_cpu_group())
    return bool(vote.item())


def rank_seed(seed: int, rank: int = 0, *salt: int) -> int:
    """A 63-bit seed derived from ``(seed, rank, *salt)``; distinct ranks get distinct seeds.

    Args:
        seed (int): the run's seed.
        rank (int): the process rank.
        *salt (int): further integers that select independent streams (e.g. an epoch).

    Returns:
        int: a seed in ``[0, 2**63)`` (:class:`numpy.random.SeedSequence` of the inputs).

    Examples::

        >>> rank_seed(0, 0) != rank_seed(0, 1)
        True
    """
    s = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), *[int(x) for x in salt]])
    hi, lo = (int(x) for x in s.generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) >> 1


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seeds Python, NumPy and torch (all devices) with a per-rank seed.

    Each rank draws different augmentations, cells and distractors: a shared seed would
    repeat the same random choices on every GPU.

    Args:
        seed (int): the run's seed (``--seed``).
        rank (int): this process's rank.

    Returns:
        int: the seed actually used on this rank.

    Examples::

        >>> seed_everything(0, rank=get_rank()) == rank_seed(0, get_rank())
        True
    """
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    torch.manual_seed(s)
    return s


def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in a ``weights_only``-loadable form.

    Returns:
        dict: with the keys ``"python"``, ``"numpy"``, ``"torch"`` and, when CUDA is
        initialised, ``"cuda"``; tensors and plain Python values only, so that
        ``torch.load(..., weights_only=True)`` reads it back.

    Examples::

        >>> state = get_rng_state()
        >>> a = torch.rand(1)
        >>> set_rng_state(state)
        >>> bool(torch.rand(1) == a)
        True
    """
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores states saved by :func:`get_rng_state`.

    CUDA states are restored only when the number of visible GPUs matches.

    Args:
        state (dict): as returned by :func:`get_rng_state` (possibly after a round trip
            through :func:`torch.save` / :func:`torch.load`).

    Returns:
        None

    Examples::

        >>> set_rng_state(load_checkpoint(path)["rng"][get_rank()])
    """
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def _to_tuple(obj):
    # random.setstate needs nested tuples; some serialisers turn them into lists.
    if isinstance(obj, (list, tuple)):
        return tuple(_to_tuple(x) for x in obj)
    return obj


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every rank's :func:`get_rng_state`, indexed by rank (collective under torchrun).

    All ranks must call it (``all_gather_object``); outside a process group it returns a
    one-element list.

    Returns:
        list of dict: ``states[r]`` is rank ``r``'s :func:`get_rng_state`.

    Examples::

        >>> states = gather_rng_states()  # every rank calls it
        >>> if is_main_process():
        ...     save_checkpoint({**state, "rng": states}, path)
    """

    state = get_rng_state()
    if not _initialized():
        return [state]
    states: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states
