"""Sizes as users write them (HF notation) and as pmakit prints them."""

from __future__ import annotations

import pytest

from pmakit.errors import InputError
from pmakit.io.dtype_names import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [(123, 123), ("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1.5 kb", 1500), ("2TiB", 2 * 2**40)],
)
def test_parse_size_reads_hf_notation(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1", 0, True])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(InputError, match="`max_shard_size`"):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (1500, "1.5 KB"),
        (2.5e6, "2.5 MB"),
        (3e9, "3.0 GB"),
        (4e12, "4.0 TB"),
        (5e15, "5000.0 TB"),
    ],
)
def test_format_size_prints_powers_of_1000(n, shown):
    assert format_size(n) == shown
