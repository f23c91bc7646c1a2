"""WSA: the loss against a direct fp64 per-layer computation, its gradient, targets, and Trainer integration."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

from pmakit.soups.scopes import Scope, compute_scopes, fuse_scopes, tensor_scope
from pmakit.training import wsa as wsa_mod
from pmakit.training.arguments import PmaArguments
from pmakit.training.wsa import WsaConfig, WsaRegularizer, add_wsa, wsa_target_scopes
from tests.helpers.models import TokenDataset, tiny_llama


def _direct_loss(model, target, weight, names=None) -> torch.Tensor:
    """weight * mean_l KL(N(mu_l, s_l^2) || N(mu*_l, s*_l^2)), one layer at a time in fp64."""
    terms = []
    for name, p in model.named_parameters():
        if p.dim() < 2 or (names is not None and name not in names):
            continue
        x = p.to(torch.float64).reshape(-1)
        mu, var = x.mean(), x.var(unbiased=False)
        t_mu, t_sd = target[name].mean, target[name].std
        terms.append(math.log(t_sd) - 0.5 * var.log() + (var + (mu - t_mu) ** 2) / (2 * t_sd**2) - 0.5)
    return weight * torch.stack(terms).mean()


def test_loss_and_gradient_match_direct_fp64(monkeypatch):
    model = tiny_llama(seed=0, tie=False).double()
    target = compute_scopes(tiny_llama(seed=1, tie=False).double())
    target = {n: Scope(s.mean + 1e-3, s.std * 1.3, s.numel) for n, s in target.items()}
    monkeypatch.setattr(wsa_mod, "_STACK_ELEMENTS", 3000)  # several stacks per shape, one layer alone for big ones
    reg = WsaRegularizer(model, target, weight=0.7)
    assert len(reg.names) == 2 * 7 + 2 and len(reg._plan) > 4
    loss = reg()
    (grads,) = [torch.autograd.grad(loss, reg.params)]
    ref = _direct_loss(model, target, 0.7)
    ref_grads = torch.autograd.grad(ref, reg.params)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-15)
    assert reg.moments()[1].dtype == torch.float64


def test_gradcheck_layer_moments():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5, 2), (3, 4), (2, 2, 3)]
    params = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    plan = wsa_mod._plan(params)
    assert [i for idx in plan for i in idx] != list(range(4))  # results must be put back in order
    numel = torch.tensor([p.numel() for p in params], dtype=torch.float64)

    def f(*ps):
        return wsa_mod._LayerMoments.apply(plan, torch.device("cpu"), numel, *ps)

    assert torch.autograd.gradcheck(f, params)


def test_fp32_and_bf16_close_to_fp64_reference():
    target = {n: Scope(s.mean, s.std * 0.8, s.numel) for n, s in compute_scopes(tiny_llama(seed=3)).items()}
    ref_model = tiny_llama(seed=2).double()
    ref = _direct_loss(ref_model, target, 1.0)
    matrices = [(n, p) for n, p in ref_model.named_parameters() if p.dim() >= 2]
    ref_grads = dict(zip([n for n, _ in matrices], torch.autograd.grad(ref, [p for _, p in matrices]), strict=True))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        model = tiny_llama(seed=2).to(dtype)
        reg = WsaRegularizer(model, target, weight=1.0)
        loss = reg()
        assert loss.dtype == torch.float32
        grads = torch.autograd.grad(loss, reg.params)
        # the reference sees the bf16-rounded weights only through its own fp64 copy, so compare loosely
        assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=tol * 10, abs=tol)
        for name, grad in zip(reg.names, grads, strict=True):
            assert grad.dtype == dtype
            scale = float(ref_grads[name].abs().max())
            torch.testing.assert_close(grad.double(), ref_grads[name], rtol=tol * 5, atol=tol * scale)


def test_init_target_is_zero_loss_and_zero_gradient():
    model = tiny_llama(seed=0)
    reg = WsaRegularizer(model, weight=1.0)
    loss = reg()
    assert abs(float(loss.detach())) < 1e-6
    grads = torch.autograd.grad(loss, reg.params)
    assert max(float(g.abs().max()) for g in grads) < 1e-5


def test_targets_from_folders(tmp_path):
    a, b = tiny_llama(seed=1), tiny_llama(seed=2)
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    model = tiny_llama(seed=0)
    ref = wsa_target_scopes(WsaConfig(target="reference", reference=[str(tmp_path / "a")]), model)
    assert ref == compute_scopes(tmp_path / "a")
    fused = wsa_target_scopes(
        WsaConfig(target="fused", reference=[str(tmp_path / "a"), str(tmp_path / "b")], reference_weights=[1, 3]),
        model,
    )
    assert fused == fuse_scopes([compute_scopes(tmp_path / "a"), compute_scopes(tmp_path / "b")], [1, 3])
    reg = WsaRegularizer(model, fused, weight=0.5)
    assert float(reg().detach()) == pytest.approx(float(_direct_loss(model.double(), fused, 0.5).detach()), rel=1e-5)
    with pytest.raises(ValueError, match="no scope for"):
        WsaRegularizer(tiny_llama(seed=0, tie=False), ref)  # untied lm_head is not in the tied reference


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(pma_wsa_weight=-1.0), "pma_wsa_weight"),
        (dict(pma_wsa_target="best"), "pma_wsa_target"),
        (dict(pma_wsa_target="reference"), "exactly one"),
        (
            dict(pma_wsa_target="fused", pma_wsa_reference=["a", "b"], pma_wsa_reference_weights=[1.0]),
            "2 `pma_wsa_reference`",
        ),
        (dict(pma_wsa_reference=["a"]), "only used with"),
        (dict(pma_wsa_layers="("), "regular expression"),
    ],
)
def test_arguments_validated_at_construction(tmp_path, settings, match):
    with pytest.raises(ValueError, match=match):
        PmaArguments(output_dir=str(tmp_path), use_cpu=True, **settings)


def _args(cls, out, **kw):
    settings = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=1,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    settings.update(kw)
    return cls(**settings)


def _ce_grads(model, batch):
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ga", [1, 2])
def test_trainer_step_adds_exactly_the_wsa_gradient(tmp_path, ga):
    """One SGD step through a real Trainer equals w - lr (grad CE + grad WSA), also with gradient accumulation."""
    data = TokenDataset(n=4, seed=7)
    target = {n: Scope(s.mean, s.std * 1.5, s.numel) for n, s in compute_scopes(tiny_llama(seed=9)).items()}
    model = tiny_llama(seed=0)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(TrainingArguments, tmp_path, per_device_train_batch_size=4 // ga, gradient_accumulation_steps=ga)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    callback = add_wsa(trainer, WsaConfig(weight=0.8))
    callback_target = target
    # swap the 'init' target for a reference one before training starts, to get a non-zero gradient
    orig = callback.on_train_begin

    def begin(*a, **k):
        orig(*a, **k)
        callback.regularizer = WsaRegularizer(trainer.model, callback_target, weight=0.8)

    callback.on_train_begin = begin
    trainer.train()
    # reference: the CE gradient of the whole batch (the sampler's order does not matter for a mean over it)
    ref_model = tiny_llama(seed=0)
    ce = _ce_grads(ref_model, data.ids)
    reg = WsaRegularizer(ref_model, target, weight=0.8)
    wsa_value = reg()
    wsa_grads = dict(zip(reg.names, torch.autograd.grad(wsa_value, reg.params), strict=True))
    for name, p in model.named_parameters():
        expected = w0[name] - 0.5 * (ce[name] + wsa_grads.get(name, 0.0))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    logged = [h for h in trainer.state.log_history if "wsa_loss" in h]
    assert len(logged) == 1 and logged[0]["wsa_loss"] == pytest.approx(float(wsa_value.detach()), rel=1e-5)
    eval_loss = trainer.evaluate(eval_dataset=data)["eval_loss"]
    with torch.no_grad():
        assert eval_loss == pytest.approx(float(model(input_ids=data.ids, labels=data.ids).loss), rel=1e-5)


def test_pma_trainer_wsa_logged_and_target_survives_resume(tmp_path):
    from pmakit.training.trainer import PmaTrainer

    data = TokenDataset(n=16, seed=3)
    kw = dict(
        optim="adamw_torch",
        learning_rate=3e-2,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        pma_wsa_weight=2.0,
        pma_interleave_step=2,
        pma_fused_num=2,
        pma_save=False,
    )
    model = tiny_llama(seed=0)
    init = {n: tensor_scope(p) for n, p in model.named_parameters() if p.dim() >= 2}
    trainer = PmaTrainer(model=model, args=_args(PmaArguments, tmp_path, **kw), train_dataset=data)
    trainer.train()
    losses = [h["wsa_loss"] for h in trainer.state.log_history if "wsa_loss" in h]
    assert len(losses) == 4 and losses[0] == pytest.approx(0.0, abs=1e-6) and losses[-1] > 0
    first = trainer.wsa_callback.regularizer.target
    assert all(first[n].std == pytest.approx(init[n].std, rel=1e-6) for n in init)
    resumed = PmaTrainer(model=tiny_llama(seed=5), args=_args(PmaArguments, tmp_path, **kw), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    target = resumed.wsa_callback.regularizer.target
    assert set(target) == set(init)
    for name in init:  # the original run's initial scopes, not the checkpoint's or the new model's
        assert target[name].mean == pytest.approx(init[name].mean, rel=1e-6, abs=1e-9)
        assert target[name].std == pytest.approx(init[name].std, rel=1e-6)
    off = _args(PmaArguments, tmp_path / "off", **{**kw, "pma_wsa_weight": 0.0})
    assert PmaTrainer(model=tiny_llama(), args=off).wsa_callback is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    target = {n: Scope(s.mean, s.std * 1.2, s.numel) for n, s in compute_scopes(tiny_llama(seed=1)).items()}
    cpu = tiny_llama(seed=0).to(dtype)
    gpu = tiny_llama(seed=0).to(dtype).cuda()
    reg_cpu, reg_gpu = WsaRegularizer(cpu, target), WsaRegularizer(gpu, target)
    loss_cpu, loss_gpu = reg_cpu(), reg_gpu()
    assert loss_gpu.device.type == "cuda"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert float(loss_gpu.detach()) == pytest.approx(float(loss_cpu.detach()), rel=tol)
    grads_cpu = torch.autograd.grad(loss_cpu, reg_cpu.params)
    for g_cpu, g_gpu in zip(grads_cpu, torch.autograd.grad(loss_gpu, reg_gpu.params), strict=True):
        assert g_gpu.dtype == dtype and g_gpu.is_cuda
        torch.testing.assert_close(g_gpu.cpu().float(), g_cpu.float(), rtol=tol, atol=tol * float(g_cpu.abs().max()))


def test_command_line_parsing(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(PmaArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "--pma_wsa_weight",
            "0.25",
            "--pma_wsa_target",
            "fused",
            "--pma_wsa_reference",
            "stage1/a",
            "stage1/b",
            "--pma_wsa_reference_weights",
            "1",
            "3",
        ]
    )
    assert args.pma_wsa_config == WsaConfig(0.25, "fused", ["stage1/a", "stage1/b"], [1.0, 3.0], None)


def test_lora_adapters_align_only_their_gaussian_factors(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = _args(TrainingArguments, tmp_path, optim="adamw_torch", learning_rate=1e-2, max_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=12, seed=2))
    callback = add_wsa(trainer, WsaConfig(weight=1.0))
    trainer.train()
    names = callback.regularizer.names
    assert len(names) == 4 and all("lora_A" in n for n in names)  # lora_B starts at zero: no scope to keep
    assert len([h for h in trainer.state.log_history if "wsa_loss" in h]) == 3
