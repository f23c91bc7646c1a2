"""Dtype names and sizes of the safetensors format, without numpy.

What the command line and the merge options check (``--out-dtype``, ``--max-shard-size``) lives here,
so that building the parser imports no numpy; ``pmakit.io.safetensors`` maps the names to numpy dtypes.
"""

from __future__ import annotations

from ..errors import InputError, brief


__all__ = [
    "CONFIG_DTYPE_NAMES",
    "DTYPE_ALIASES",
    "FLOAT_DTYPES",
    "ITEMSIZES",
    "canonical_dtype",
    "format_size",
    "parse_size",
]

# safetensors dtype name -> bytes per element
ITEMSIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# names users write (torch style) -> safetensors names
DTYPE_ALIASES = {
    "float64": "F64",
    "float32": "F32",
    "float": "F32",
    "float16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "fp16": "F16",
    "fp32": "F32",
    "fp64": "F64",
}
# safetensors name -> name in config.json
CONFIG_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def canonical_dtype(name: str, field: str = "out_dtype") -> str:
    """``"bfloat16"`` / ``"BF16"`` / ``"torch.bfloat16"`` -> ``"BF16"``; a floating dtype only."""
    key = str(name).removeprefix("torch.")
    code = DTYPE_ALIASES.get(key.lower(), key.upper())
    if code not in FLOAT_DTYPES:
        valid = ", ".join(sorted(k for k in DTYPE_ALIASES if DTYPE_ALIASES[k] in CONFIG_DTYPE_NAMES))
        raise InputError(f"`{field}` must be a floating dtype ({valid}), got {brief(name)}.")
    return code


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """HF size notation in bytes: ``"5GB"`` = 5e9, ``"500MiB"`` = 500 * 2**20, or an int."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number) :]
        if unit not in _SIZE_UNITS or not number:
            raise InputError(f"`max_shard_size` must be bytes or a size such as '5GB' or '500MiB', got {brief(size)}.")
        try:
            value = int(float(number) * _SIZE_UNITS[unit])
        except ValueError as e:
            raise InputError(f"`max_shard_size` must be bytes or a size such as '5GB', got {brief(size)}.") from e
    if value <= 0:
        raise InputError(f"`max_shard_size` must be positive, got {brief(size)}.")
    return value


def format_size(n: float) -> str:
    """Bytes for people, in powers of 1000 (``"1.5 GB"``), as plans and ``pmakit inspect`` print them."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
