"""Which devices a job can use. DGL's build, not torch's, decides whether graphs can live on CUDA.

PyPI's DGL wheels are CPU-only builds (their ``libdgl`` registers no CUDA device), while PyPI's
torch sees any GPU; so "CUDA is visible" says nothing about whether a graph can be aggregated
there. The default backend is NCCL only when DGL itself can run on CUDA; tensors DGL cannot run
on are refused where the user first hands them to gnnscale (``wrap`` and the wrapped model's
forward), and gnnscale's own collectives keep their tensors on the backend's device.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import UsageError

__all__ = ["dgl_cuda_available", "default_backend", "comm_device", "group_device",
           "check_dgl_device", "check_model_device", "check_inputs_device"]

_GPU_HELP = ("PyPI's DGL wheels are CPU-only builds; install a CUDA build of DGL from DGL's "
             "own index with a matching torch (README: GPUs), or keep the model and features "
             "on the CPU")


@functools.lru_cache(maxsize=1)
def dgl_cuda_available() -> bool:
    """Whether the installed DGL can run on CUDA device 0 here.

    DGL answers a device's ``exist`` query with 0 when its build registered no device API for
    that kind (a CPU-only build), else by asking the CUDA runtime; nothing is allocated. Only
    asked when torch sees a GPU, so a CPU machine never initialises CUDA.
    """
    if not torch.cuda.is_available():
        return False
    try:
        import dgl.ndarray

        return bool(dgl.ndarray.gpu(0).exist)
    except Exception:  # any failure of the probe means DGL cannot be trusted with CUDA
        return False


def default_backend() -> str:
    """``"nccl"`` when DGL can run on CUDA here, else ``"gloo"``."""
    return "nccl" if dgl_cuda_available() else "gloo"


def comm_device(backend: str | None) -> torch.device:
    """The device of a collective's tensors on ``backend``: NCCL moves only CUDA tensors (the
    current device, set by ``init`` from ``LOCAL_RANK``), gloo's send/recv only CPU ones."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_device(group: Any = None) -> torch.device:
    """:func:`comm_device` of a process group's backend (None: the default group)."""
    import torch.distributed as dist

    return comm_device(str(dist.get_backend(group)))


def check_dgl_device(device: torch.device, what: str) -> None:
    """Raise a :class:`UsageError` when DGL cannot aggregate tensors on ``device``.

    Args:
        device: where the tensors live.
        what: what they are, for the message (e.g. ``"the model's parameters"``).
    """
    if device.type == "cpu" or (device.type == "cuda" and dgl_cuda_available()):
        return
    if device.type == "cuda":
        import dgl

        raise UsageError(f"{what} are on {device}, but the installed DGL {dgl.__version__} "
                         f"cannot run on CUDA here: {_GPU_HELP}")
    raise UsageError(f"{what} are on {device}; DGL runs on the CPU or on CUDA only")


def check_model_device(model: torch.nn.Module, backend: str | None) -> None:
    """Every parameter and buffer on a device DGL can use, and on CUDA when the job uses NCCL
    (NCCL cannot move CPU tensors: the halo exchange would fail deep inside torch)."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    for d in sorted(devices, key=str):
        check_dgl_device(d, f"{type(model).__name__}'s parameters")
        if backend == "nccl" and d.type != "cuda":
            raise UsageError(f"the job runs on NCCL but {type(model).__name__}'s parameters are "
                             f"on {d}; move the model and features to CUDA "
                             "(model.to(f'cuda:{LOCAL_RANK}')) before gnnscale.wrap, or "
                             "gnnscale.init(backend='gloo') to train on the CPU")


def check_inputs_device(args: Iterable[Any]) -> None:
    """:func:`check_dgl_device` for every tensor among ``args`` (a forward call's arguments)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            check_dgl_device(a.device, "the tensors passed to the wrapped model")
