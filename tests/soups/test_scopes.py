"""Weight scopes: measurement (module, state dict, folder, chunked), fusion and comparison vs fp64 direct sums."""

from __future__ import annotations

import math

import pytest
import torch

from pmakit.errors import InputError
from pmakit.merging import scopes as merging_scopes
from pmakit.soups.scopes import (
    Scope,
    compare_scopes,
    compute_scopes,
    format_scope_report,
    fuse_scopes,
    warn_on_scope_differences,
)
from tests.helpers.models import tiny_llama


def _direct(t: torch.Tensor) -> tuple[float, float]:
    x = t.detach().to(torch.float64).reshape(-1)
    return float(x.mean()), float(x.std(unbiased=False))


def test_module_scopes_match_direct_fp64():
    model = tiny_llama(seed=3, tie=False)
    scopes = compute_scopes(model)
    expected = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    assert set(scopes) == set(expected) and "lm_head.weight" in scopes
    for name, p in expected.items():
        mean, std = _direct(p)
        assert scopes[name].numel == p.numel()
        assert scopes[name].mean == pytest.approx(mean, rel=1e-12, abs=1e-15)
        assert scopes[name].std == pytest.approx(std, rel=1e-12)
    only_q = compute_scopes(model, pattern=r"q_proj")
    assert sorted(only_q) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    norms = compute_scopes(model, min_ndim=1, pattern="norm")
    assert norms and all(s.std == 0.0 and s.mean == 1.0 for s in norms.values())


def test_folder_scopes_stream_in_chunks_and_match(tmp_path, monkeypatch):
    model = tiny_llama(seed=4).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    monkeypatch.setattr(merging_scopes, "CHUNK_ELEMENTS", 100)  # many chunks per tensor, exact Chan merges
    scopes = compute_scopes(tmp_path / "m")
    live = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    assert set(scopes) == set(live)
    for name, p in live.items():
        mean, std = _direct(p)
        assert scopes[name].mean == pytest.approx(mean, rel=1e-10, abs=1e-14)
        assert scopes[name].std == pytest.approx(std, rel=1e-10)
    with pytest.raises(FileNotFoundError, match="no_such"):
        compute_scopes(tmp_path / "no_such")


def test_fuse_equal_weights_is_pooled_moments():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(50, 8, generator=g, dtype=torch.float64) * 0.02 + 0.01}
    b = {"w": torch.randn(50, 8, generator=g, dtype=torch.float64) * 0.05 - 0.003}
    c = {"w": torch.randn(50, 8, generator=g, dtype=torch.float64) * 0.01}
    fused = fuse_scopes([compute_scopes(a), compute_scopes(b), compute_scopes(c)])
    pooled = torch.cat([a["w"].reshape(-1), b["w"].reshape(-1), c["w"].reshape(-1)])
    assert fused["w"].mean == pytest.approx(float(pooled.mean()), rel=1e-12)
    assert fused["w"].std == pytest.approx(float(pooled.std(unbiased=False)), rel=1e-12)


def test_fuse_weighted_is_weighted_pooled_moments():
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(30, 4, generator=g, dtype=torch.float64) * s + m for s, m in ((0.1, 0.0), (0.3, 0.2))]
    weights = [3.0, 1.0]
    fused = fuse_scopes([compute_scopes({"w": t}) for t in tensors], weights)
    # direct: every element of model k carries probability w_k / (sum w * n_k)
    x = torch.cat([t.reshape(-1) for t in tensors])
    p = torch.cat(
        [
            torch.full((t.numel(),), w / sum(weights) / t.numel(), dtype=torch.float64)
            for w, t in zip(weights, tensors, strict=True)
        ]
    )
    mean = float((p * x).sum())
    std = math.sqrt(float((p * (x - mean) ** 2).sum()))
    assert fused["w"].mean == pytest.approx(mean, rel=1e-12)
    assert fused["w"].std == pytest.approx(std, rel=1e-12)
    with pytest.raises(ValueError, match="weights"):
        fuse_scopes([compute_scopes({"w": t}) for t in tensors], [1.0, -1.0])
    with pytest.raises(ValueError, match="same layers"):
        fuse_scopes([{"w": Scope(0, 1, 4)}, {"v": Scope(0, 1, 4)}])


def test_compare_flags_exactly_the_rescaled_layer(tmp_path):
    base = tiny_llama(seed=5)
    other = tiny_llama(seed=5)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    s0, s1 = compute_scopes(base), compute_scopes(other)
    flagged = compare_scopes([s0, s1], threshold=0.1)
    assert [d.name for d in flagged] == ["model.layers.1.mlp.up_proj.weight"]
    assert flagged[0].std_ratio == pytest.approx(1.5, rel=1e-9)
    assert compare_scopes([s0, s0], threshold=0.0) == []
    report = format_scope_report([s0, s1], ["base", "other"], threshold=0.1)
    flagged_rows = [line for line in report.splitlines() if line.startswith("!")]
    assert len(flagged_rows) == 1 and "up_proj" in flagged_rows[0] and "1.500" in flagged_rows[0]
    base.save_pretrained(tmp_path / "a")
    other.save_pretrained(tmp_path / "b")
    for inputs in ([tmp_path / "a", tmp_path / "b"], [base, other], [s0, other.state_dict()], [tmp_path / "a", s1]):
        with pytest.warns(UserWarning, match="up_proj") as seen:
            assert [d.name for d in warn_on_scope_differences(inputs, 0.1)] == ["model.layers.1.mlp.up_proj.weight"]
        assert seen[0].filename == __file__  # the line that called it


def test_the_torch_free_core_compares_folders_and_scope_maps_and_refuses_modules(tmp_path):
    base, other = tiny_llama(seed=5), tiny_llama(seed=5)
    with torch.no_grad():
        other.model.layers[0].mlp.gate_proj.weight.mul_(0.5)
    base.save_pretrained(tmp_path / "a")
    with pytest.warns(UserWarning, match="gate_proj"):
        flagged = merging_scopes.warn_on_scope_differences([tmp_path / "a", compute_scopes(other)], 0.1, stacklevel=1)
    assert [d.name for d in flagged] == ["model.layers.0.mlp.gate_proj.weight"]
    assert flagged[0].std_ratio == pytest.approx(2.0, rel=1e-9)
    with pytest.raises(InputError, match="pmakit.soups.scopes"):
        merging_scopes.warn_on_scope_differences([base, other])
    assert merging_scopes.fuse_scopes is fuse_scopes  # one implementation, re-exported by the front-end


def test_cli_inspect_scopes_and_merge_warning(tmp_path, capsys):
    from pmakit.cli import main

    base, other = tiny_llama(seed=6), tiny_llama(seed=6)
    with torch.no_grad():
        other.model.layers[0].self_attn.v_proj.weight.mul_(1.3)
    base.save_pretrained(tmp_path / "a")
    other.save_pretrained(tmp_path / "b")
    assert main(["inspect", str(tmp_path / "a"), str(tmp_path / "b"), "--scopes", "--scope-threshold", "0.2"]) == 0
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if line.startswith("!")]
    assert len(flagged) == 1 and "layers.0.self_attn.v_proj.weight" in flagged[0] and "1.300" in flagged[0]
    assert "1 of 15 shared layer(s) differ beyond the threshold" in out
    argv = ["average", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "m"), "--no-progress"]
    assert main(argv + ["--check-scopes"]) == 0
    err = capsys.readouterr().err
    assert "weight scopes of the 2 inputs differ beyond 0.1 in 1 layer(s)" in err and "v_proj" in err
    assert main(argv + ["--check-scopes", "--scope-threshold", "0.5", "--overwrite"]) == 0
    assert "weight scopes" not in capsys.readouterr().err


def test_python_merge_warns_before_merging_inputs_whose_scopes_differ(tmp_path):
    import warnings

    import pmakit

    base, other = tiny_llama(seed=7), tiny_llama(seed=7)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.4)
    base.save_pretrained(tmp_path / "a")
    other.save_pretrained(tmp_path / "b")
    inputs = [tmp_path / "a", tmp_path / "b"]
    with pytest.warns(UserWarning, match="layers.1.mlp.down_proj.weight"):
        pmakit.merge(inputs, tmp_path / "m", check_scopes=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pmakit.merge(inputs, tmp_path / "m2", check_scopes=True, scope_threshold=0.5)
        pmakit.merge(inputs, tmp_path / "m3")  # off by default: no extra pass over the weights
