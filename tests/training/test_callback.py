"""`PmaCallback` on other Trainers: plain `Trainer`, PEFT LoRA models, TRL's `SFTTrainer`."""

import pytest
import torch
from transformers import Trainer

from pmakit import PmaCallback, PmaConfig
from tests.helpers.models import VOCAB, TokenDataset, tiny_llama
from tests.helpers.training import SnapshotCallback, load_folder, plain_args, weighted


def test_callback_on_plain_trainer(tmp_path):
    snap = SnapshotCallback()
    trainer = Trainer(
        model=tiny_llama(),
        args=plain_args(tmp_path),
        train_dataset=TokenDataset(),
        callbacks=[snap, PmaCallback(PmaConfig(interleave_step=2, fused_num=3, fused_algo="wma"))],
    )
    trainer.train()
    saved = load_folder(tmp_path / "pma-6")
    for name, ref in weighted(snap.snapshots, [2, 4, 6], [1 / 6, 2 / 6, 3 / 6]).items():
        torch.testing.assert_close(saved[name].double(), ref, rtol=2e-6, atol=2e-6)
    assert (tmp_path / "pma" / "model.safetensors").is_file()


def test_callback_keyword_settings_and_eval_needs_trainer(tmp_path):
    callback = PmaCallback(interleave_step=2, fused_num=3, eval=True)
    assert callback.config == PmaConfig(interleave_step=2, fused_num=3, eval=True)
    trainer = Trainer(
        model=tiny_llama(), args=plain_args(tmp_path), train_dataset=TokenDataset(), callbacks=[callback]
    )
    with pytest.raises(ValueError, match="needs the trainer"):
        trainer.train()
    with pytest.raises(ValueError, match="either a `PmaConfig` or keyword settings"):
        PmaCallback(PmaConfig(), fused_num=3)


def test_callback_eval_with_trainer(tmp_path):
    trainer = Trainer(
        model=tiny_llama(),
        args=plain_args(tmp_path, eval_strategy="steps", eval_steps=3),
        train_dataset=TokenDataset(),
        eval_dataset={"a": TokenDataset(8, seed=5), "b": TokenDataset(8, seed=6)},
    )
    trainer.add_callback(PmaCallback(PmaConfig(interleave_step=2, fused_num=3, eval=True), trainer=trainer))
    trainer.train()
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"eval_a_loss", "eval_b_loss", "eval_pma_a_loss", "eval_pma_b_loss"} <= logged


def test_peft_lora_averages_adapter_only(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    snap, pma = SnapshotCallback(), PmaCallback(PmaConfig(interleave_step=2, fused_num=3))
    trainer = Trainer(model=model, args=plain_args(tmp_path), train_dataset=TokenDataset(), callbacks=[snap, pma])
    trainer.train()
    engine = pma.engine
    assert len(engine.averages()) == sum(1 for p in model.parameters() if p.requires_grad)
    folder = tmp_path / "pma-6"
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    assert not (folder / "model.safetensors").exists()
    assert "library_name: peft" in (folder / "README.md").read_text()
    saved = load_folder(folder)
    expected = weighted(snap.snapshots, [2, 4, 6], [1 / 3] * 3)
    assert len(saved) == len(expected)
    for name, ref in expected.items():
        key = name.replace(".default", "")
        torch.testing.assert_close(saved[key].double(), ref, rtol=2e-6, atol=2e-6)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), folder)
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p.detach().double(), expected[name], rtol=2e-6, atol=2e-6)
        else:
            plain = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, frozen[plain])


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def test_trl_sft_trainer_through_callback(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    generator = torch.Generator().manual_seed(3)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (12,), generator=generator)) for _ in range(48)]
    tokenizer = _tiny_tokenizer()
    config = trl.SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4, learning_rate=1e-2,
        max_steps=6, save_strategy="no", logging_steps=1000, disable_tqdm=True, max_length=16, seed=0,
    )  # fmt: skip
    snap = SnapshotCallback()
    trainer = trl.SFTTrainer(
        model=tiny_llama(),
        args=config,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        callbacks=[snap, PmaCallback(PmaConfig(interleave_step=2, fused_num=3))],
    )
    trainer.train()
    saved = load_folder(tmp_path / "pma-6")
    for name, ref in weighted(snap.snapshots, [2, 4, 6], [1 / 3] * 3).items():
        torch.testing.assert_close(saved[name].double(), ref, rtol=2e-6, atol=2e-6)
    assert (tmp_path / "pma-6" / "tokenizer.json").is_file()
