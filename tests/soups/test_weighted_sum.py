"""The tools' one weighted sum against fp64 closed forms, and its input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmakit.soups.weighted_sum import weighted_sum


U32 = 2.0**-24  # unit roundoff of fp32


def _inputs(count=4, shape=(7, 5), dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).mul(3).to(dtype) for _ in range(count)]


def _fp64_closed_form(tensors, weights):
    """sum_i w_i x_i in numpy fp64 (an independent reference: no torch arithmetic)."""
    return sum(w * t.double().numpy() for w, t in zip(weights, tensors, strict=True))


def test_fp64_accumulation_is_the_closed_form_rounded_once():
    tensors, weights = _inputs(), [0.1, 0.2, 0.3, 0.4]
    got = weighted_sum(tensors, weights, name="w")
    expected = _fp64_closed_form(tensors, weights)
    assert got.dtype == torch.float32 and got.shape == (7, 5)
    # fp64 error (~1e-16 relative to the terms) is far below one fp32 rounding of the result
    assert np.all(np.abs(got.double().numpy() - expected) <= U32 * np.abs(expected) + 1e-12)


def test_fp32_accumulation_stays_within_its_rounding_bound():
    tensors, weights = _inputs(count=5), [0.5, -0.25, 1.0, 0.125, 0.7]
    got = weighted_sum(tensors, weights, name="w", accumulate_dtype=torch.float32)
    expected = _fp64_closed_form(tensors, weights)
    # n products and n additions, each rounded once in fp32: (2n + 1) u sum |w_i x_i| (+1 for the weight itself)
    bound = (
        (2 * len(tensors) + 2)
        * U32
        * sum(abs(w) * t.double().abs().numpy() for w, t in zip(weights, tensors, strict=True))
    )
    assert np.all(np.abs(got.double().numpy() - expected) <= bound)


def test_exact_when_every_term_is_exact():
    tensors = [torch.tensor([1.0, -2.0, 4.0]), torch.tensor([3.0, 6.0, -8.0])]
    got = weighted_sum(tensors, [0.25, 0.75], name="w", accumulate_dtype=torch.float32)
    assert torch.equal(got, torch.tensor([2.5, 4.0, -5.0]))


def test_bf16_inputs_give_the_closed_form_rounded_to_bf16():
    tensors, weights = _inputs(dtype=torch.bfloat16), [0.4, 0.3, 0.2, 0.1]
    got = weighted_sum(tensors, weights, name="w")
    assert got.dtype == torch.bfloat16  # the newest input's dtype unless told otherwise
    expected = torch.from_numpy(_fp64_closed_form(tensors, weights))
    # one rounding of the fp64 sum to bf16 (the same cast as the reference)
    assert torch.equal(got, expected.to(torch.bfloat16))


def test_out_dtype_device_and_fresh_memory():
    tensors = _inputs(count=1, dtype=torch.bfloat16)
    got = weighted_sum(tensors, [1.0], name="w", out_dtype=torch.float32, device="cpu")
    assert got.dtype == torch.float32 and got.device.type == "cpu" and torch.equal(got, tensors[0].float())
    same = weighted_sum(tensors, [1.0], name="w")
    assert torch.equal(same, tensors[0]) and same.data_ptr() != tensors[0].data_ptr()


def test_gradients_are_not_tracked():
    x = torch.ones(3, requires_grad=True)
    assert not weighted_sum([x, x], [0.5, 0.5], name="w").requires_grad


@pytest.mark.parametrize(
    ("tensors", "weights", "kwargs", "message"),
    [
        ([], [], {}, "'layer.weight': nothing to sum"),
        ([torch.ones(2), torch.ones(2)], [1.0], {}, "'layer.weight': got 1 weights for 2 inputs"),
        ([torch.ones(2), torch.ones(3)], [0.5, 0.5], {"sources": ["a", "b"]}, r"'layer.weight' has shape \(3,\) in b"),
        (
            [torch.ones(2), torch.ones(2, dtype=torch.int64)],
            [0.5, 0.5],
            {},
            "'layer.weight' is torch.int64 in input 1",
        ),
        ([torch.ones(2)], [1.0], {"accumulate_dtype": torch.float16}, "'layer.weight': accumulate in float32"),
        ([torch.ones(2)], [1.0], {"sources": ["a", "b"]}, "'layer.weight': got 2 input names for 1 inputs"),
    ],
    ids=["empty", "count", "shape", "integer", "accumulator", "sources"],
)
def test_bad_input_is_refused_naming_the_tensor(tensors, weights, kwargs, message):
    with pytest.raises(ValueError, match=message):
        weighted_sum(tensors, weights, name="layer.weight", **kwargs)
