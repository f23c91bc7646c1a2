"""Reading what ``torch.save`` writes, without torch: tensors become byte ranges of the file.

``torch.save`` writes a zip archive: ``<archive>/data.pkl`` (a pickle of the object, whose tensors
refer to storages by key), ``<archive>/data/<key>`` (each storage's raw bytes, little-endian) and a
few small records (``byteorder``, ``version``). The members are stored uncompressed, so every
storage is a plain byte range of the file, and a contiguous tensor is a byte range inside it: the
same :class:`~pmakit.io.safetensors.TensorInfo` the safetensors reader gives, read zero-copy by the
merger's streaming fold. Nothing is converted or copied.

The pickle is read by :class:`AllowListUnpickler`: ``find_class`` resolves only the names a state
dict, a ``torch.distributed.checkpoint`` metadata file or a DeepSpeed checkpoint needs, each to a
harmless stand-in defined here (nothing is imported, no user code runs); any other class or
function is refused with :class:`~pmakit.errors.InputError` naming it.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .safetensors import DTYPES, ITEMSIZES, TensorInfo


__all__ = [
    "AllowListUnpickler",
    "MetadataIndex",
    "Record",
    "StorageRef",
    "TensorRef",
    "TorchArchive",
    "read_pickle",
    "read_state_dict",
]

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


@dataclass(frozen=True)
class TensorRef:
    """A tensor as pickled: a strided view (in elements) of a storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

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


class Record:
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
        return f"<{self.qualname}>"


class _HashableRecord(Record):
    """Records that pickles use as dict keys (DCP's ``MetadataIndex``): equal and hashed by their fields."""

    def _key(self) -> tuple:
        return (getattr(self, "fqn", None), tuple(getattr(self, "offset", None) or ()))

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HashableRecord) and self._key() == other._key()


def _record_type(qualname: str, hashable: bool = False) -> type[Record]:
    return type(qualname.rsplit(".", 1)[-1], (_HashableRecord if hashable else Record,), {"qualname": qualname})


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, StorageRef):
        raise InputError("A pickled tensor does not refer to a storage of its archive.")
    return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _rebuild_from_type(func, new_type, args, state=None):
    """``torch._tensor._rebuild_from_type_v2``: a tensor (subclass) rebuilt by ``func`` (itself allow-listed)."""
    return func(*args)


class _TensorType:
    """``torch.Tensor`` / ``torch.nn.Parameter`` as the target type of a rebuilt tensor: a name, never called."""


def _identity(value: Any) -> Any:
    return value


def _path_text(*parts: str) -> str:
    """A pickled ``pathlib`` path (DCP records its ``checkpoint_id``): kept as text, nothing touched."""
    return os.path.join(*map(str, parts)) if parts else ""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``: how protocol-2 pickles (``torch.save``'s) store ``bytes`` (latin-1 only)."""
    if encoding not in ("latin1", "latin-1"):
        raise InputError(f"A pickled bytes object uses the encoding {encoding!r}; only latin-1 is read.")
    return text.encode("latin1")


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
            raise InputError(f"{self.source} refers to an unknown persistent object {str(pid)[:80]!r}.")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise InputError(f"{self.source} has a storage of unsupported type {storage_type!r}.")
        return StorageRef(str(key), storage_type.dtype, int(numel))


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"storage<{self.dtype}>"


def _storage_type(dtype: str) -> _StorageType:
    return _StorageType(dtype)


def read_pickle(data: bytes, source: str) -> Any:
    """Unpickle ``data`` (from ``source``, named in errors) with the allow-list."""
    try:
        return AllowListUnpickler(io.BytesIO(data), source).load()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt pickle fails in many ways
        raise InputError(f"{source} is not a readable checkpoint pickle: {e}.") from e


class _FileSlice(io.RawIOBase):
    """A read-only window ``[start, start + length)`` of a file, so an embedded zip reads as a file."""

    def __init__(self, f, start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), max(0, self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:want])
        self._pos += got
        return got


class TorchArchive:
    """One ``torch.save`` archive (a whole file, or a byte range of one as in DCP's ``.distcp`` files).

    Args:
        path: the file.
        start: where the archive begins in the file (bytes).
        length: its length (default: to the end of the file).

    Raises:
        InputError: not a torch zip archive, a compressed or big-endian one, or a refused pickle.
    """

    def __init__(self, path: str | os.PathLike, start: int = 0, length: int | None = None) -> None:
        self.path = Path(path)
        self.start = start
        self.label = str(self.path) if not start and length is None else f"{self.path} (bytes {start}+{length})"
        self.records: dict[str, tuple[int, int]] = {}  # storage key -> (absolute start, nbytes)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size if length is None else length
                self.obj = self._read(f, size)
        except OSError as e:
            raise InputError(f"Cannot read {self.label}: {e.strerror or e}.") from e

    def _read(self, f, size: int) -> Any:
        window = _FileSlice(f, self.start, size)
        try:
            archive = zipfile.ZipFile(io.BufferedReader(window))
        except zipfile.BadZipFile as e:
            raise InputError(
                f"{self.label} is not a torch zip archive ({e}); legacy (pre-1.6) torch.save files are not read."
            ) from e
        with archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise InputError(f"{self.label} is not a torch.save archive: no single `<archive>/data.pkl`.")
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
                raise InputError(f"{self.label} was written on a big-endian machine; it is not read.")
            for info in archive.infolist():
                if info.filename.startswith(f"{prefix}data/"):
                    self.records[info.filename[len(f"{prefix}data/") :]] = (self._data_start(f, info), info.file_size)
            return read_pickle(archive.read(pickles[0]), self.label)

    def _data_start(self, f, info: zipfile.ZipInfo) -> int:
        if info.compress_type != zipfile.ZIP_STORED:
            raise InputError(f"{self.label}: member {info.filename} is compressed; torch never writes that.")
        f.seek(self.start + info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise InputError(f"{self.label}: member {info.filename} has a corrupt local header.")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return self.start + info.header_offset + 30 + name_len + extra_len

    def tensor_info(self, name: str, ref: TensorRef) -> TensorInfo:
        """``ref`` as a byte range of the file, checked against its storage.

        Raises:
            InputError: the tensor is a non-contiguous view, or lies outside its storage.
        """
        if ref.dtype not in DTYPES:
            raise InputError(f"Tensor {name!r} in {self.label} has an unsupported dtype {ref.dtype}.")
        if not ref.is_contiguous:
            raise InputError(
                f"Tensor {name!r} in {self.label} is a non-contiguous view (shape {list(ref.shape)}, stride "
                f"{list(ref.stride)}); save it with .contiguous() or as safetensors."
            )
        if ref.storage.key not in self.records:
            raise InputError(f"Tensor {name!r} in {self.label} refers to a missing storage {ref.storage.key!r}.")
        begin, length = self.records[ref.storage.key]
        itemsize = ITEMSIZES[ref.dtype]
        nbytes = ref.numel * itemsize
        if ref.offset < 0 or any(d < 0 for d in ref.shape) or (ref.offset * itemsize + nbytes > length):
            raise InputError(
                f"Tensor {name!r} in {self.label} ({ref.dtype}{list(ref.shape)} at element {ref.offset}) "
                f"does not fit in its storage of {length} bytes."
            )
        return TensorInfo(name, ref.dtype, ref.shape, self.path, begin + ref.offset * itemsize, nbytes)


def read_state_dict(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of a ``torch.save``-d flat state dict (``pytorch_model.bin``), as byte ranges.

    Tied weights (several names, one storage) all point at the same bytes.

    Raises:
        InputError: not a flat ``{name: tensor}`` mapping, or a tensor that cannot be read in place.
    """
    archive = TorchArchive(path)
    state = archive.obj
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise InputError(f"{path} does not hold a state dict (a mapping of tensor names to tensors).")
    out = {}
    for name, ref in state.items():
        if not isinstance(ref, TensorRef):
            raise InputError(f"Entry {name!r} of {path} is a {type(ref).__name__}, not a tensor.")
        out[name] = archive.tensor_info(name, ref)
    return out
