"""Streaming an averaged model into an HF folder, one full tensor at a time.

A sharded export (FSDP2 DTensors, DeepSpeed ZeRO) must not collect the whole model on the main
process. The output layout follows from the state dict's shapes alone, exactly as
``save_pretrained`` would choose it (its shard size default, `huggingface_hub`'s shard split, tied
weights once under the name it keeps), so every shard's header is written first
(`pmakit.io.safetensors.ShardWriter`, in safetensors' own order: the files are byte-identical to
``save_pretrained``'s) and each tensor goes to its final offset as soon as it is gathered. The main
process holds one full tensor at a time.

The weights are written first and ``config.json`` last: a folder left behind by a crash has no
config, so ``from_pretrained`` refuses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, brief
from ..io.safetensors import OutputTensor, ShardWriter
from ..online.gather import ExportEntry


__all__ = ["DEFAULT_MAX_SHARD_SIZE", "StreamLayout", "plan_layout", "streamable", "write_side_files", "write_streamed"]

DEFAULT_MAX_SHARD_SIZE = "50GB"  # save_pretrained's default
WEIGHTS_PATTERN = "model{suffix}.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class StreamLayout:
    """Where each entry goes: the written name per entry (None: not written), the planned tensors and shard files."""

    written: list[str | None]
    tensors: dict[str, OutputTensor]
    files: list[str]
    index: dict | None


def _kept_name(model, entry: ExportEntry, ignored: set[str], tied_targets: set[str]) -> str | None:
    """The one name save_pretrained writes for ``entry``: tied aliases (the model's tied targets) are dropped."""
    names = [n for n in entry.names if n not in ignored]
    if len(names) <= 1:
        return names[0] if names else None
    kept = [n for n in names if n not in tied_targets]
    return kept[0] if kept else sorted(names)[-1]


def _tied_targets(model) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, dict) else set(tied)


def plan_layout(model, entries: list[ExportEntry], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> StreamLayout:
    """The folder's layout from shapes only: save_pretrained's names, shard split and index."""
    from huggingface_hub import split_torch_state_dict_into_shards

    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    targets = _tied_targets(model)
    written = [_kept_name(model, e, ignored, targets) for e in entries]
    meta = {
        name: torch.empty(e.shape, dtype=e.dtype, device="meta")
        for name, e in zip(written, entries, strict=True)
        if name is not None
    }
    for name, tensor in meta.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise InputError(f"Tensor {brief(name)} has dtype {tensor.dtype}, which a safetensors export cannot hold.")
    split = split_torch_state_dict_into_shards(meta, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    files = list(split.filename_to_tensors)
    tensors: dict[str, OutputTensor] = {}
    for shard, file in enumerate(files):
        for name in split.filename_to_tensors[file]:
            t = meta[name]
            tensors[name] = OutputTensor(name, _SAFETENSORS_DTYPES[t.dtype], tuple(t.shape), shard=shard)
    index = None
    if split.is_sharded:
        total_parameters = sum(e.shape.numel() for e in entries if e.param is not None)
        index = {
            "metadata": {"total_parameters": total_parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
    return StreamLayout(written, tensors, files, index)


def write_streamed(
    folder: Path | None,
    layout: StreamLayout,
    entries: list[ExportEntry],
    fetch: Callable[[ExportEntry], torch.Tensor | None],
) -> None:
    """Fetch every entry in order (collectives: every process calls this) and write them on the main process.

    ``folder`` is None on the other processes. ``fetch`` returns the full tensor on the main
    process. Only one fetched tensor is alive at a time; nothing is buffered per shard.
    """
    writer = None
    if folder is not None:
        ordered = [layout.tensors[n] for n in layout.tensors]
        writer = ShardWriter(folder, ordered, layout.files)
    try:
        for name, entry in zip(layout.written, entries, strict=True):
            full = fetch(entry)
            if writer is None or name is None:
                continue
            writer.write(layout.tensors[name], 0, _as_bytes(full))
            del full
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
        if layout.index is not None:
            text = json.dumps(layout.index, indent=2, sort_keys=True) + "\n"
            (folder / INDEX_NAME).write_text(text, encoding="utf-8")


def _as_bytes(tensor: torch.Tensor):
    """A tensor's raw bytes as a numpy uint8 array (no copy for a contiguous CPU tensor)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def write_side_files(model, folder: Path, processing_class=None, model_card: str | None = None) -> None:
    """Config, generation config, tokenizer and card, as ``save_pretrained`` writes them (config last)."""
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(folder)
    if model_card is not None:
        (folder / "README.md").write_text(model_card, encoding="utf-8")
    if getattr(model, "can_generate", lambda: False)() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    config = model.config
    config.dtype = str(model.dtype).removeprefix("torch.")  # what save_pretrained records
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.save_pretrained(folder)


def streamable(model, entries: list[ExportEntry]) -> bool:
    """Whether the streamed folder equals what ``save_pretrained`` writes for this model.

    Not for PEFT models (adapter-only folders) or models whose save reverts a load-time weight
    conversion (renamed or fused tensors): those take ``save_pretrained``'s own path.
    """
    if hasattr(model, "peft_config") or not hasattr(model, "config"):
        return False
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers without load-time conversions
        return True
    meta = {n: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in entries for n in e.names}
    try:
        return list(revert_weight_conversion(model, dict(meta))) == list(meta)
    except Exception:  # a conversion that cannot run on shapes alone
        return False
