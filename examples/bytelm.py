"""Shared pieces of the examples: a real text corpus, byte-level tokens, a tiny Llama, a paired validation loss.

The corpora come with Python itself, so the examples run on any machine with nothing downloaded:

* ``topics``: the language reference text that CPython ships for ``help()`` (``pydoc_data.topics``),
  about 0.5 MB of English prose with code snippets.
* ``docstrings``: the docstrings of the standard library's own modules, read with ``ast`` (no import,
  no side effects): the library's documentation rather than the language's. The examples use it as a
  different data mix for continued training.
* ``stdlib``: the standard library itself, source and docs: every ``*.py``, ``*.txt`` and ``*.rst`` file under
  it read as raw bytes in sorted path order (the same parts left out as for ``docstrings``), each followed by a
  blank line. About 11 MB with CPython 3.11 or 3.12; the largest corpus that every Python has offline, for
  the paper-scale run (`paper_scale.py`).
* a path: a UTF-8 text file, or a folder whose ``*.txt``/``*.md`` files are read in sorted order.

Text is tokenised byte by byte with ByT5's layout (id = byte + 3; 0 pad, 1 eos, 2 unk): a vocabulary of
256 bytes plus 3 specials, saved with every model folder as a real `ByT5Tokenizer`.
"""

from __future__ import annotations

import ast
import math
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from examples import models
from pmakit.tools.sweep import causal_lm_nats


__all__ = [
    "BYTE_OFFSET",
    "VOCAB_SIZE",
    "ByteBlocks",
    "byte_tokenizer",
    "encode",
    "llama_config",
    "load_corpus",
    "split_corpus",
    "validation_loss",
]

BYTE_OFFSET = 3  # ByT5: 0 <pad>, 1 </s>, 2 <unk>, then the 256 byte values
VOCAB_SIZE = 256 + BYTE_OFFSET
PAD_ID, EOS_ID = 0, 1

# Parts of the standard library left out of the docstring corpus: tests, GUI toolkits, bundled third-party code.
_SKIPPED = (
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
)


def _topics_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions split it into a separate package
        raise RuntimeError(
            "The corpus 'topics' needs `pydoc_data`, which this Python lacks (on Debian/Ubuntu it is part of "
            "libpython3.X-stdlib). Use --corpus docstrings, or a path to a text file or folder."
        ) from err
    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def _docstrings_text(max_bytes: int | None) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIPPED or part.startswith("test_") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:  # one-liners are mostly boilerplate ("Return self.")
                    parts.append(doc)
                    size += len(doc.encode("utf-8")) + 2
        if max_bytes is not None and size >= max_bytes:
            break
    if not parts:
        raise RuntimeError(f"No docstrings found under the standard library at {root}.")
    return "\n\n".join(parts) + "\n"


def _stdlib_files(root: Path) -> list[Path]:
    """The standard library's source and doc files, sorted by path, without the parts in `_SKIPPED`."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED and not d.startswith("test_")]  # never walk into them
        rel = Path(folder).relative_to(root)
        found += [rel / f for f in files if f.endswith((".py", ".txt", ".rst")) and not f.startswith("test_")]
    return [root / rel for rel in sorted(found, key=lambda r: r.as_posix())]


def _stdlib_bytes(max_bytes: int | None) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    size = 0
    for path in _stdlib_files(root):
        parts.append(path.read_bytes() + b"\n\n")
        size += len(parts[-1])
        if max_bytes is not None and size >= max_bytes:
            break
    if not parts:
        raise RuntimeError(f"No source files found under the standard library at {root}.")
    return b"".join(parts)


def _path_text(source: str) -> str:
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise ValueError(f"--corpus {source}: the folder holds no .txt or .md files.")
        return "\n\n".join(p.read_text(encoding="utf-8") for p in files)
    raise ValueError(
        f"--corpus {source!r}: expected 'topics', 'docstrings', 'stdlib', or a path to a text file or folder."
    )


def load_corpus(source: str = "topics", max_bytes: int | None = None) -> bytes:
    """The bytes of a corpus (see the module docstring), at most ``max_bytes`` of them."""
    if source == "topics":
        data = _topics_text().encode("utf-8")
    elif source == "docstrings":
        data = _docstrings_text(max_bytes).encode("utf-8")
    elif source == "stdlib":
        data = _stdlib_bytes(max_bytes)
    else:
        data = _path_text(source).encode("utf-8")
    if max_bytes is not None:
        data = data[:max_bytes]
    if not data:
        raise ValueError(f"--corpus {source!r} is empty.")
    return data


def encode(data: bytes) -> torch.Tensor:
    """Token ids of raw bytes, as `ByT5Tokenizer` gives them (without the end-of-text id)."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET)


def byte_tokenizer():
    """A `ByT5Tokenizer` with no sentinel ids: 259 ids, the same as `encode`. Built locally, nothing downloaded."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def split_corpus(data: bytes, val_fraction: float = 0.1, segment_bytes: int = 4096) -> tuple[bytes, bytes]:
    """Deterministic train/validation split: every k-th segment of ``segment_bytes`` goes to validation.

    Interleaving the held-out segments spreads them over the whole corpus (every topic is seen in
    both parts) while no validation byte is ever trained on.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must lie in (0, 1); got {val_fraction!r}.")
    every = max(2, round(1.0 / val_fraction))
    # Small corpora get smaller segments, so that validation still gets its share (at least 4 segments).
    segment_bytes = max(1, min(segment_bytes, len(data) // (4 * every)))
    train, val = bytearray(), bytearray()
    for i, start in enumerate(range(0, len(data), segment_bytes)):
        (val if i % every == every - 1 else train).extend(data[start : start + segment_bytes])
    if not val or not train:
        raise ValueError(f"The corpus ({len(data)} bytes) is too small for a validation split of {val_fraction:g}.")
    return bytes(train), bytes(val)


class ByteBlocks(torch.utils.data.Dataset):
    """Fixed-length windows over a byte corpus, ``stride`` bytes apart; labels are the inputs (the model shifts)."""

    def __init__(self, data: bytes, block_size: int = 128, stride: int | None = None) -> None:
        self.ids = encode(data)
        self.block_size = block_size
        self.stride = stride or block_size
        if len(self.ids) < block_size:
            raise ValueError(f"The text ({len(self.ids)} bytes) is shorter than one block of {block_size}.")
        self.count = (len(self.ids) - block_size) // self.stride + 1

    def truncate(self, multiple: int) -> ByteBlocks:
        """Drop trailing blocks so that the count is a multiple of ``multiple`` (when there are that many)."""
        if self.count >= multiple:
            self.count -= self.count % multiple
        return self

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.count:
            raise IndexError(i)
        block = self.ids[i * self.stride : i * self.stride + self.block_size]
        return {"input_ids": block, "labels": block}


def llama_config(
    hidden_size: int = 192,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    block_size: int = 128,
):
    """A small Llama (RoPE, RMSNorm, SwiGLU, tied embeddings) over the byte vocabulary."""
    return models.llama_config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=block_size,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=EOS_ID,
    )


@torch.no_grad()
def validation_loss(model, dataset: ByteBlocks, batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy (nats/byte) over every block of ``dataset``, accumulated in fp64.

    Every model of an experiment is scored on exactly the same blocks, so differences are paired.
    """
    was_training = model.training
    model.eval()
    blocks = [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]
    total, count = causal_lm_nats(model, blocks, batch_size)  # the sweep's scorer: the same sum, in fp64
    model.train(was_training)
    if not math.isfinite(total):
        raise FloatingPointError("The validation loss is not finite.")
    return total / count
