"""Both readers of the streaming fold give the fp64 closed form, for every rule.

Regression: with equal weights the fold keeps the first input's block while reading the second;
the `pread` reader used to read both into one buffer, so SMA returned the second input twice.
"""

import pytest
import torch

from pmakit.averaging import merge_weights
from pmakit.merging import merge
from tests.helpers.folders import read_folder, reference, save_models


@pytest.mark.parametrize("reader", ["mmap", "pread"])
@pytest.mark.parametrize("algo", ["sma", "wma"])
def test_readers_agree_with_the_closed_form(tmp_path, reader, algo):
    inputs = save_models(tmp_path, 3)
    merge(inputs, tmp_path / "out", algo=algo, reader=reader, block_elements=100)
    expected = reference(inputs, merge_weights(3, algo))
    for name, value in read_folder(tmp_path / "out").items():
        assert torch.allclose(value.double(), expected[name], rtol=1e-6, atol=1e-7), name
