"""Where the average's tensors live, and the CUDA offload that keeps the fold off the training stream.

Placement. The average (and a rule's anchors) is fp32, on the parameter's device, shaped and, for a
DTensor, sharded like the parameter. With ``offload="cpu"`` it lives in pinned CPU memory instead,
which pays only for CUDA parameters: one fp32 copy of the model leaves the GPU.

Offload. A sample of CUDA parameters into a pinned-CPU average is copied on a side stream into
pinned staging buffers, then folded on a CPU thread. The training stream goes on at once; only the
next optimizer update waits, on the GPU, for the copy to finish (it must not overwrite the
parameters being copied), and anything that reads the average joins the thread first.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..errors import InputError, TrainingError
from .distributed import is_dtensor, like_dtensor, local_shard
from .slots import SlotGroup


__all__ = ["Offload", "check_offload", "moved_average", "new_average", "placement", "staging_for"]


def placement(p: torch.Tensor, offload: bool) -> tuple[torch.device, bool]:
    """(device, pinned) of ``p``'s average: its own device, or CPU memory under ``offload`` (pinned for CUDA)."""
    pinned = offload and local_shard(p).device.type == "cuda"
    return (torch.device("cpu") if offload else local_shard(p).device), pinned


def check_offload(p: torch.Tensor, offload: bool) -> None:
    """Refuse to offload an FSDP2 shard on GPU: it is sharded already, and FSDP2 offloads it better."""
    if offload and is_dtensor(p) and local_shard(p).device.type == "cuda":
        raise InputError(
            "PMA `offload='cpu'` is not supported for FSDP2 (DTensor) parameters on GPU: the average is already "
            "sharded (1/world per rank). To keep it in CPU memory, offload the shards with FSDP2 itself "
            "(`fully_shard(..., offload_policy=CPUOffloadPolicy())`, Accelerate `fsdp_offload_params: true`): "
            "the average then follows the parameters to the CPU."
        )


def new_average(p: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
    """A zero fp32 average shaped (and, for a DTensor, sharded) like ``p``."""
    if not is_dtensor(p):
        if pinned:
            return torch.zeros(p.shape, dtype=torch.float32, pin_memory=True)
        return torch.zeros_like(p, dtype=torch.float32, device=device)
    return torch.zeros_like(p, dtype=torch.float32)  # same mesh and placements, local shard only


def moved_average(
    avg: torch.Tensor, p: torch.Tensor, device: torch.device, pinned: bool, copy: bool = False
) -> torch.Tensor:
    """``avg`` as fp32 on ``device`` (pinned when asked), keeping a DTensor's sharding."""
    local = local_shard(avg).to(device=device, dtype=torch.float32, copy=copy)
    if pinned and not local.is_pinned():
        local = local.pin_memory()
    if is_dtensor(p):
        if is_dtensor(avg) and not pinned and local.device == local_shard(p).device:
            return like_dtensor(avg, local)
        return like_dtensor(p, local)
    return local


def staging_for(lparams: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pinned CPU buffers the side stream copies CUDA parameters into (pinned: the copy is asynchronous)."""
    return [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in lparams]


class Offload:
    """The side stream, the copy event and the fold threads of one engine (see the module docstring)."""

    def __init__(self) -> None:
        self._stream = None
        self._copied = None  # CUDA event: the copy of the parameters into the staging buffers has finished
        self._copied_device = None
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None

    def wait_for_copy(self) -> None:
        """Before an optimizer update: make the device wait for a pending copy of the parameters.

        A device-side wait, so the host never blocks here.
        """
        if self._copied is not None:
            torch.cuda.current_stream(self._copied_device).wait_event(self._copied)
            self._copied = None

    def fold(self, group: SlotGroup, c: float, start: bool, finish: Sequence[float] | None) -> None:
        """Copy ``group``'s CUDA parameters on the side stream, then fold them in on a CPU thread."""
        device = group.lparams[0].device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            torch._foreach_copy_(group.staging, group.lparams, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._copied, self._copied_device = event, device

        def work() -> None:
            try:
                event.synchronize()
                group.fold(group.staging, c, start, finish)
            except BaseException as err:  # surfaced by join()
                self._error = err

        thread = threading.Thread(target=work, name="pma-fold", daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        """Wait for the fold threads; re-raise a failure of one of them."""
        while self._threads:
            self._threads.pop().join()
        if self._error is not None:
            err, self._error = self._error, None
            raise TrainingError("PMA: the asynchronous update of the average failed.") from err
