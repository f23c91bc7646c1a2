"""Tensors of a training checkpoint folder, whatever wrote it, as byte ranges the fold reads in place.

A ``checkpoint-N`` folder holds its weights as one of:

- safetensors (``model.safetensors`` or shards with an index): read as they are;
- a ``torch.distributed.checkpoint`` folder (FSDP ``SHARDED_STATE_DICT``; Accelerate writes
  ``pytorch_model_fsdp_0/`` with the state dict under the key ``model``);
- a DeepSpeed ZeRO folder (``global_stepN/``): the fp32 master partitions of every rank;
- pickled ``pytorch_model*.bin`` files.

They are tried in that order, so a ZeRO-1/2 Trainer checkpoint, which also holds
``model.safetensors`` (the 16-bit weights), is read from its safetensors without any pickle.

With ``state="pma"`` the PMA average kept in the optimizer state (``pma_avg``) is read instead of
the weights: from Accelerate's ``optimizer_0/`` DCP folder, or from the ZeRO optimizer states.
Pickles are read by the allow-list unpickler of :mod:`pmakit.io.torch_unpickler`: no torch, no
process group, no model, no copy.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MergeError, brief
from ..io.dcp import DcpCheckpoint, is_dcp_folder
from ..io.deepspeed_zero import ZeroCheckpoint, find_zero_folder
from ..io.safetensors import SafetensorsFile, TensorInfo
from ..io.torch_pickle import read_state_dict
from ..io.weight_files import find_pickle_files, find_weight_files


__all__ = ["AVG_KEY", "STATES", "read_checkpoint_tensors"]

AVG_KEY = "pma_avg"  # the optimizer-state key of the online average (pmakit.online.engine.AVG_KEY)
STATES = ("weights", "pma")
_FSDP_MODEL_DIRS = ("pytorch_model_fsdp_0", "pytorch_model_fsdp")
_FSDP_OPTIMIZER_DIRS = ("optimizer_0", "optimizer")


def read_checkpoint_tensors(
    folder: Path, *, state: str = "weights", allow_pickle: bool = False
) -> tuple[list[Path], dict[str, TensorInfo]]:
    """The weight files of ``folder`` and its tensors by name (``state="pma"``: the stored PMA average).

    Raises:
        MergeError: nothing readable, a refused pickle, or pickles without ``allow_pickle``.
    """
    if state not in STATES:
        raise MergeError(f"`state` must be one of {', '.join(STATES)}, got {brief(state)}.")
    if not folder.is_dir():
        raise MergeError(f"Input {folder} does not exist." if not folder.exists() else f"{folder} is not a folder.")
    if state == "pma":
        return _pma_state(folder, allow_pickle)
    if any(folder.glob("*.safetensors")):
        return _safetensors(find_weight_files(folder))
    dcp = _dcp_folder(folder, _FSDP_MODEL_DIRS)
    if dcp is not None:
        _require_pickle(folder, allow_pickle, f"a torch.distributed.checkpoint folder ({dcp.name})")
        return _dcp_tensors(dcp, root="model")
    zero = find_zero_folder(folder)
    if zero is not None:
        _require_pickle(folder, allow_pickle, f"a DeepSpeed ZeRO checkpoint ({zero.name})")
        tensors = ZeroCheckpoint(zero).tensors()
        return _files_of(tensors), tensors
    pickles = find_pickle_files(folder)
    if pickles:
        _require_pickle(folder, allow_pickle, f"pickled checkpoints ({', '.join(p.name for p in pickles)})")
        return pickles, _pickled(pickles)
    return _safetensors(find_weight_files(folder))  # raises the IO layer's "no weights" error


def _require_pickle(folder: Path, allow_pickle: bool, what: str) -> None:
    if not allow_pickle:
        raise MergeError(
            f"{folder} holds only {what}; these are pickles, so they are read only when asked: pass "
            "allow_pickle=True. pmakit reads them with an allow-list unpickler that "
            "builds tensors and checkpoint metadata only and runs no code."
        )


def _safetensors(files: list[Path]) -> tuple[list[Path], dict[str, TensorInfo]]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        _add(tensors, SafetensorsFile(file).tensors, file)
    return files, tensors


def _pickled(files: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        _add(tensors, read_state_dict(file), file)
    return tensors


def _add(tensors: dict[str, TensorInfo], new: dict[str, TensorInfo], file: Path) -> None:
    for name, info in new.items():
        if name in tensors:
            raise MergeError(
                f"Tensor {brief(name)} appears in two files of {file.parent}: {tensors[name].file.name} "
                f"and {file.name}."
            )
        tensors[name] = info


def _dcp_folder(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The DCP folder of a checkpoint: one of ``names`` inside it, or the folder itself."""
    for name in names:
        if is_dcp_folder(folder / name):
            return folder / name
    return folder if is_dcp_folder(folder) else None


def _dcp_tensors(folder: Path, root: str) -> tuple[list[Path], dict[str, TensorInfo]]:
    """Model tensors of a DCP folder: the keys under ``root`` when there are any (Accelerate's
    ``{"model": ...}``, torchtitan's ``model`` beside ``optimizer``), else every tensor."""
    checkpoint = DcpCheckpoint(folder)
    entries = list(checkpoint.tensors.values())
    under_root = [t for t in entries if len(t.path) >= 2 and t.path[0] == root]
    chosen = under_root or entries
    tensors = {}
    for t in chosen:
        name = ".".join(t.path[1:] if under_root else t.path)
        tensors[name] = checkpoint.tensor_info(t.fqn, name)
    if not tensors:
        raise MergeError(f"The torch.distributed.checkpoint folder {folder} holds no tensors.")
    return _files_of(tensors), tensors


def _pma_state(folder: Path, allow_pickle: bool) -> tuple[list[Path], dict[str, TensorInfo]]:
    dcp = _dcp_folder(folder, _FSDP_OPTIMIZER_DIRS)
    zero = find_zero_folder(folder) if dcp is None else None
    if zero is not None:
        _require_pickle(folder, allow_pickle, f"a DeepSpeed ZeRO checkpoint ({zero.name})")
        tensors = ZeroCheckpoint(zero).tensors(AVG_KEY)
        return _files_of(tensors), tensors
    if dcp is None:
        raise MergeError(
            f"{folder} holds no sharded optimizer state to read the PMA average from: expected a "
            "torch.distributed.checkpoint folder (optimizer_0/, FSDP SHARDED_STATE_DICT) or a DeepSpeed "
            "ZeRO checkpoint (global_stepN/)."
        )
    _require_pickle(folder, allow_pickle, f"a torch.distributed.checkpoint folder ({dcp.name})")
    checkpoint = DcpCheckpoint(dcp)
    tensors = {}
    for t in checkpoint.tensors.values():
        # get_optimizer_state_dict's layout: ("optimizer", "state", <parameter name>, "pma_avg")
        if len(t.path) >= 3 and t.path[-1] == AVG_KEY and t.path[-3] == "state":
            tensors[t.path[-2]] = checkpoint.tensor_info(t.fqn, t.path[-2])
    if not tensors:
        raise MergeError(
            f"The optimizer state in {dcp} holds no PMA average (`{AVG_KEY}`): was the run trained with PMA, "
            "and saved after its first sample?"
        )
    return _files_of(tensors), tensors


def _files_of(tensors: dict[str, TensorInfo]) -> list[Path]:
    return list(dict.fromkeys(f for info in tensors.values() for f in info.files))
