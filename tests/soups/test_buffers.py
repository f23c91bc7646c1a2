"""Buffer policy and BatchNorm refresh on a small CNN in plain torch, against direct fp64 computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pmakit.soups.buffers import average_models, merge_buffers, update_bn


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def _trained(seed: int, steps: int) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=g) * (1 + seed)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_integer_buffers_copied_float_buffers_by_policy():
    models = [_trained(0, 3), _trained(1, 5), _trained(2, 9)]
    weights = [1.0, 2.0, 5.0]
    merged = merge_buffers(models, weights)
    kinds = ("running_mean", "running_var", "num_batches_tracked")
    assert set(merged) == {f"bn{i}.{b}" for i in (1, 2) for b in kinds}
    for i in (1, 2):
        nbt = merged[f"bn{i}.num_batches_tracked"]
        assert nbt.dtype == torch.int64 and int(nbt) == 9  # the newest count, not 17/8 averaged
        for b in ("running_mean", "running_var"):
            direct = sum(
                w / 8.0 * getattr(getattr(m, f"bn{i}"), b).double() for w, m in zip(weights, models, strict=True)
            )
            torch.testing.assert_close(merged[f"bn{i}.{b}"], direct.float(), rtol=1e-6, atol=1e-7)
    newest = merge_buffers(models, weights, float_buffers="newest")
    for name, value in newest.items():
        assert torch.equal(value, models[-1].state_dict()[name])
    full = average_models(models, weights)
    assert list(full) == list(models[-1].state_dict())
    direct = sum(w / 8.0 * m.conv2.weight.double() for w, m in zip(weights, models, strict=True))
    torch.testing.assert_close(full["conv2.weight"], direct.float(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="float_buffers"):
        merge_buffers(models, float_buffers="mean")


def test_update_bn_equals_direct_batch_statistics():
    model = SmallCNN()
    model.load_state_dict(average_models([_trained(0, 3), _trained(1, 5)]))
    model.eval()
    g = torch.Generator().manual_seed(11)
    batches = [(torch.randn(10, 3, 6, 6, generator=g), torch.zeros(10)) for _ in range(4)]
    assert update_bn(batches, model) == 4
    assert not model.training and model.bn1.momentum == 0.1
    # direct fp64: each BN sees its input normalised with the batch's own (biased) statistics in train mode,
    # and stores the mean over batches of the batch mean and the unbiased batch variance
    d = {k: v.double() for k, v in model.state_dict().items()}
    means = {1: [], 2: []}
    variances = {1: [], 2: []}
    for x, _ in batches:
        h = torch.nn.functional.conv2d(x.double(), d["conv1.weight"], d["conv1.bias"], padding=1)
        for i, conv in ((1, None), (2, "conv2")):
            if conv:
                h = torch.nn.functional.conv2d(h, d[f"{conv}.weight"], d[f"{conv}.bias"], padding=1)
            m, v = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=True)
            means[i].append(m)
            variances[i].append(v)
            vb = h.var(dim=(0, 2, 3), unbiased=False)
            h = (h - m[None, :, None, None]) / torch.sqrt(vb[None, :, None, None] + 1e-5)
            h = torch.relu(h * d[f"bn{i}.weight"][None, :, None, None] + d[f"bn{i}.bias"][None, :, None, None])
    for i in (1, 2):
        bn = getattr(model, f"bn{i}")
        torch.testing.assert_close(bn.running_mean.double(), torch.stack(means[i]).mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), torch.stack(variances[i]).mean(0), rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 4
    assert update_bn(batches, model, num_batches=2) == 2
    with pytest.raises(ValueError, match="no batch"):
        update_bn([], model)


def test_mismatched_shapes_are_refused_naming_the_tensor_and_model():
    small, large = nn.BatchNorm1d(4), nn.BatchNorm1d(8)
    with pytest.raises(ValueError, match=r"'running_mean' has shape \(8,\) in model 1 but \(4,\) in model 0"):
        merge_buffers([small, large])
    with pytest.raises(ValueError, match=r"'weight' has shape \(8,\) in model 1 but \(4,\) in model 0"):
        average_models([small, large], float_buffers="newest")
