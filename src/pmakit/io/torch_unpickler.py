"""Unpickling what ``torch.save`` pickles, without torch: the allow-list and its harmless stand-ins.

A checkpoint's pickle (``data.pkl`` of a :mod:`pmakit.io.torch_pickle` archive, DCP's ``.metadata``)
is read by :class:`AllowListUnpickler`, once :func:`~pmakit.io.archive.scan_pickle` has passed it:
``find_class`` resolves only the names a state dict, a ``torch.distributed.checkpoint`` metadata file
or a DeepSpeed checkpoint needs, each to a harmless stand-in defined here (nothing is imported, no
user code runs); any other class or function is refused with :class:`~pmakit.errors.InputError`
naming it. Tensors come back as :class:`TensorRef`, a strided view of a :class:`StorageRef`: no
data is read.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, brief
from .archive import as_count, as_counts, as_text, scan_pickle


__all__ = ["AllowListUnpickler", "MetadataIndex", "Record", "StorageRef", "TensorRef", "TorchDtype", "read_pickle"]

# torch storage classes and dtypes (as pickled) -> safetensors dtype codes
_STORAGE_DTYPES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
_TORCH_DTYPES = {
    "float64": "F64",
    "double": "F64",
    "float32": "F32",
    "float": "F32",
    "float16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "long": "I64",
    "int32": "I32",
    "int": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


@dataclass(frozen=True)
class StorageRef:
    """A storage of the archive: ``data/<key>``, ``numel`` elements of ``dtype``."""

    key: str
    dtype: str
    numel: int

    def __setstate__(self, state: Any) -> None:
        raise _InPickle("a BUILD opcode rewrites the fields of a storage; torch never pickles that.")


@dataclass(frozen=True)
class TensorRef:
    """A tensor as pickled: a strided view (in elements) of a storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def __setstate__(self, state: Any) -> None:
        raise _InPickle("a BUILD opcode rewrites the fields of a rebuilt tensor; torch never pickles that.")

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_contiguous(self) -> bool:
        """Row-major contiguous (dimensions of size 1 may have any stride, as in torch)."""
        expected = 1
        for size, step in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and step != expected:
                return False
            expected *= size
        return True


class TorchDtype(str):
    """A pickled ``torch.<dtype>``: the safetensors code (``"BF16"``), or the torch name if unusual."""


class _Sealed(type):
    """The stand-in classes are shared by every load: a BUILD on the class itself (setting its
    attributes) would change how later, unrelated files are read, so it is refused."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise _InPickle(f"a BUILD opcode sets attribute {brief(name)} of the class {cls.__name__}.")


class Record(metaclass=_Sealed):
    """A stand-in for an allow-listed metadata class: keeps its constructor arguments and pickled state."""

    qualname = "Record"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<{type(self).qualname}>"


class _HashableRecord(Record):
    """Records that pickles use as dict keys (DCP's ``MetadataIndex``): equal and hashed by their fields."""

    def _key(self) -> tuple:
        """(fqn, offsets) when both are well-formed, else the object itself: a malformed key (or one
        shaped to make hashing slow) matches nothing, and the reader reports the entry missing."""
        fqn, offset = self.__dict__.get("fqn"), self.__dict__.get("offset")
        if isinstance(fqn, str) and isinstance(offset, (tuple, list)) and all(type(o) is int for o in offset):
            return (fqn, tuple(offset))
        return (id(self),)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HashableRecord) and self._key() == other._key()


def _record_type(qualname: str, hashable: bool = False) -> type[Record]:
    return type(qualname.rsplit(".", 1)[-1], (_HashableRecord if hashable else Record,), {"qualname": qualname})


class _InPickle(InputError):
    """A malformed field met while unpickling, before the file is known: `read_pickle` names the file."""


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2``: every field checked (a storage, non-negative ints, equal ranks)."""
    if not isinstance(storage, StorageRef):
        raise _InPickle("a pickled tensor does not refer to a storage of its archive.")
    try:
        offset = as_count(storage_offset, "a pickled tensor's `storage_offset`")
        shape = as_counts(size, "a pickled tensor's `size`")
        steps = as_counts(stride, "a pickled tensor's `stride`")
    except InputError as e:
        raise _InPickle(str(e)) from None
    if len(shape) != len(steps):
        raise _InPickle(
            f"a pickled tensor has `size` {brief(list(shape))} but `stride` {brief(list(steps))} (another rank)."
        )
    return TensorRef(storage, offset, shape, steps)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _rebuild_from_type(func, new_type, args, state=None):
    """``torch._tensor._rebuild_from_type_v2``: a tensor (subclass) rebuilt by ``func`` (itself allow-listed)."""
    return func(*args)


class _TensorType(metaclass=_Sealed):
    """``torch.Tensor`` / ``torch.nn.Parameter`` as the target type of a rebuilt tensor: a name, never called."""


def _identity(value: Any) -> Any:
    return value


def _path_text(*parts: str) -> str:
    """A pickled ``pathlib`` path (DCP records its ``checkpoint_id``): kept as text, nothing touched."""
    return os.path.join(*map(str, parts)) if parts else ""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``: how protocol-2 pickles (``torch.save``'s) store ``bytes`` (latin-1 only)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _InPickle(f"a pickled bytes object uses the encoding {brief(encoding)}; only latin-1 text is read.")
    try:
        return text.encode("latin1")
    except UnicodeEncodeError:
        raise _InPickle("a pickled bytes object holds text that is not latin-1.") from None


_DCP = "torch.distributed.checkpoint"
_DS = "deepspeed"
MetadataIndex = _record_type(f"{_DCP}.metadata.MetadataIndex", hashable=True)  # DCP's key of a stored chunk
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _latin1_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    ("torch", "Size"): tuple,
    ("pathlib", "PosixPath"): _path_text,
    ("pathlib", "PurePosixPath"): _path_text,
    ("pathlib", "WindowsPath"): _path_text,
    ("pathlib", "PureWindowsPath"): _path_text,
    ("torch", "device"): str,
    ("torch.serialization", "_get_layout"): str,
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"): _identity,
    (f"{_DCP}.metadata", "MetadataIndex"): MetadataIndex,
    (f"{_DS}.runtime.zero.config", "ZeroStageEnum"): _identity,
    (f"{_DS}.runtime.fp16.loss_scaler", "LossScaler"): _record_type(f"{_DS}.runtime.fp16.loss_scaler.LossScaler"),
    (f"{_DS}.runtime.fp16.loss_scaler", "DynamicLossScaler"): _record_type(
        f"{_DS}.runtime.fp16.loss_scaler.DynamicLossScaler"
    ),
    (f"{_DS}.utils.tensor_fragment", "fragment_address"): _record_type(
        f"{_DS}.utils.tensor_fragment.fragment_address"
    ),
}
for _name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata"):
    _ALLOWED[(f"{_DCP}.metadata", _name)] = _record_type(f"{_DCP}.metadata.{_name}")
for _name in ("TensorProperties", "StorageMeta"):
    _ALLOWED[(f"{_DCP}.metadata", _name)] = _record_type(f"{_DCP}.metadata.{_name}")
_ALLOWED[(f"{_DCP}.filesystem", "_StorageInfo")] = _record_type(f"{_DCP}.filesystem._StorageInfo")


class AllowListUnpickler(pickle.Unpickler):
    """Unpickles state dicts and checkpoint metadata; refuses every class not on the allow-list.

    Tensors come back as :class:`TensorRef` (no data is read), storages as :class:`StorageRef`,
    torch dtypes as :class:`TorchDtype`, DCP/DeepSpeed metadata classes as :class:`Record`.
    """

    def __init__(self, file, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _storage_type(_STORAGE_DTYPES[name])
        if module == "torch" and name in ("strided", "contiguous_format", "preserve_format", "channels_last"):
            return name
        if module == "torch" and name in _TORCH_DTYPES:
            return TorchDtype(_TORCH_DTYPES[name])
        raise InputError(
            f"{self.source} pickles {module}.{name}, which is not allowed in a checkpoint: only tensors, "
            "state dicts and checkpoint metadata are read (nothing else is built or run)."
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise InputError(f"{self.source} refers to an unknown persistent object {brief(pid)}.")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise InputError(f"{self.source} has a storage of unsupported type {brief(storage_type)}.")
        key = as_text(key, f"{self.source}: a storage's key")
        return StorageRef(
            key, storage_type.dtype, as_count(numel, f"{self.source}: the `numel` of storage {brief(key)}")
        )


class _StorageType:
    """A pickled ``torch.<X>Storage`` class: its dtype code, fixed (a BUILD cannot change it)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        raise _InPickle("a BUILD opcode rewrites a storage type; torch never pickles that.")

    def __repr__(self) -> str:
        return f"storage<{self.dtype}>"


def _storage_type(dtype: str) -> _StorageType:
    return _StorageType(dtype)


def read_pickle(data: bytes, source: str) -> Any:
    """Unpickle ``data`` (from ``source``, named in errors) with the allow-list, once it passes
    :func:`~pmakit.io.archive.scan_pickle`."""
    scan_pickle(data, source)
    try:
        return AllowListUnpickler(io.BytesIO(data), source).load()
    except _InPickle as e:
        raise InputError(f"{source}: {e}") from None
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt pickle fails in many ways
        raise InputError(f"{source} is not a readable checkpoint pickle: {brief(e)}.") from None
