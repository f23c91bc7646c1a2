"""Malformed safetensors headers and shard indexes are refused with a named cause, never read past.

Each case is a file a user could really meet (a truncated download, a hand-edited index, a
malicious repo); the merger must stop before reading a byte of weights, exit 2 from the CLI, and
never touch a file outside the input folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pmakit.cli import main
from pmakit.errors import InputError
from pmakit.io.safetensors import SafetensorsFile
from pmakit.io.weight_files import find_weight_files
from tests.helpers.folders import read_folder, save_models, write_raw_safetensors


def _header(**entry) -> dict:
    good = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    return {"w": {**good, **entry}}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"__metadata__": ["not", "an", "object"], **_header()}, "`__metadata__` is list"),
        ({"__metadata__": {"format": 3}, **_header()}, "values must all be strings"),
        (_header(data_offsets=["0", "8"]), "data_offsets"),
        (_header(data_offsets=[0]), "data_offsets"),
        (_header(shape=[-2, -1]), "dimensions must be non-negative"),
        (_header(shape=["2"]), "dimensions must be non-negative"),
        (_header(shape=[2.0]), "dimensions must be non-negative"),
        ({"w": "not an entry"}, "malformed entry"),
    ],
)
def test_malformed_headers_name_the_cause(tmp_path, header, message):
    path = tmp_path / "model.safetensors"
    write_raw_safetensors(path, header, np.arange(2, dtype=np.float32).tobytes())
    with pytest.raises(InputError, match=message) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def _index(folder: Path, weight_map: object) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    "shard",
    ["../elsewhere.safetensors", "/etc/passwd", "sub/../../x.safetensors", "..", "C:\\x.safetensors", "a\\b.st"],
)
def test_index_entries_outside_the_folder_are_refused(tmp_path, shard):
    folder = tmp_path / "m"
    folder.mkdir()
    _index(folder, {"w": shard})
    with pytest.raises(InputError, match="plain file names"):
        find_weight_files(folder)


def test_weight_map_must_be_an_object(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    _index(folder, [["w", "model.safetensors"]])
    with pytest.raises(InputError, match="`weight_map` must be an object"):
        find_weight_files(folder)


def test_path_traversal_through_the_cli_reads_nothing_outside(tmp_path, capsys):
    """The security case: an index pointing at a sibling folder's file; exit 2, no output folder."""
    a, b = save_models(tmp_path, 2)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(b / "model.safetensors", outside)
    names = list(read_folder(a))
    _index(b, {name: "../elsewhere.safetensors" for name in names})
    code = main(["average", str(a), str(b), "-o", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "plain file names" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_symlinked_shards_as_in_the_hub_cache_still_merge(tmp_path):
    """`snapshots/<rev>/` holds symlinks into `blobs/`: they live outside the folder and are fine."""
    a, b = save_models(tmp_path, 2, max_shard_size="20KB")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    for file in b.iterdir():
        target = blobs / f"blob-{file.name}"
        os.replace(file, target)
        (snapshot / file.name).symlink_to(target)
    assert len(find_weight_files(snapshot)) > 1
    code = main(["average", str(a), str(snapshot), "-o", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    merged = read_folder(tmp_path / "out")
    first, second = read_folder(a), read_folder(snapshot)
    for name, value in merged.items():
        expected = (first[name].double() + second[name].double()) / 2
        assert (value.double() - expected).abs().max() <= 2e-7 * max(1.0, expected.abs().max().item())
