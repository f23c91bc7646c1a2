"""Background exports (`pma_export="async"`) and streamed folders on one process, with a real Trainer."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, TrainerCallback

import pmakit.training.streaming as streaming
from pmakit import PmaConfig, PmaTrainer
from pmakit.io.folders import DiskFullError
from pmakit.io.safetensors import ShardWriter
from pmakit.training.background import BackgroundExportError, BackgroundWriter
from pmakit.training.export import save_averaged_model
from tests.distributed.launch import ROOT
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import pma_args


def _assert_same(left, right):
    """Byte-identical folders: same files, same safetensors headers (order, metadata), shards, index and JSON."""
    names = sorted(p.name for p in left.iterdir())
    assert names == sorted(p.name for p in right.iterdir())
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names), names
    for name in names:
        assert (left / name).read_bytes() == (right / name).read_bytes(), name


def _train(tmp_path, name, export, callbacks=(), **overrides):
    trainer = PmaTrainer(
        model=tiny_llama(),
        args=pma_args(tmp_path / name, pma_export=export, **overrides),
        train_dataset=TokenDataset(96),
        callbacks=list(callbacks),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_folder_equals_save_pretrained(tmp_path, tie, dtype):
    model = tiny_llama(tie=tie, dtype=dtype)
    averages = {p: torch.randn(p.shape, dtype=torch.float64).float() for p in model.parameters()}
    plain = tiny_llama(tie=tie, dtype=dtype)  # the same weights, saved by the model itself
    with torch.no_grad():
        for param, average in zip(plain.parameters(), averages.values(), strict=True):
            param.copy_(average)
    for size in ("50GB", 20_000):  # one file, and several shards with an index
        sync = save_averaged_model(model, averages, tmp_path / f"sync-{size}", stream=False, max_shard_size=size)
        streamed = save_averaged_model(model, averages, tmp_path / f"stream-{size}", stream=True, max_shard_size=size)
        plain.save_pretrained(tmp_path / f"plain-{size}", max_shard_size=size)
        _assert_same(streamed, sync)
        _assert_same(streamed, tmp_path / f"plain-{size}")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream-20000", dtype=dtype)
    for param, average in zip(model.parameters(), averages.values(), strict=True):
        name = next(n for n, p in model.named_parameters() if p is param)
        assert torch.equal(loaded.get_parameter(name), average.to(dtype)), name


def test_async_folders_equal_sync_folders(tmp_path):
    _train(tmp_path, "sync", "sync")
    trainer = _train(tmp_path, "async", "async")
    for name in ("pma-6", "pma-12", "pma"):
        _assert_same(tmp_path / "async" / name, tmp_path / "sync" / name)
    assert not trainer.pma_callback.exporter.background.busy
    assert not [p for p in (tmp_path / "async").iterdir() if p.name.startswith("_")]


class _SlowWrites:
    """Slows every tensor write of the background exporter, so its join points are visible."""

    def __init__(self, monkeypatch, delay=0.02):
        original = streaming._as_bytes

        def slow(tensor):
            time.sleep(delay)
            return original(tensor)

        monkeypatch.setattr(streaming, "_as_bytes", slow)


class _JoinProbe(TrainerCallback):
    """Records, at each checkpoint save and step, whether the previous cycle's folder was complete."""

    def __init__(self, output_dir):
        self.output_dir = output_dir
        self.seen = {}

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 6:  # the checkpoint of the step whose cycle is being written
            self.seen["save-6"] = (self.output_dir / "pma-6" / "config.json").is_file()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 8:  # the fold of step 8 rewrites the average the step-6 export reads
            self.seen["step-8"] = (self.output_dir / "pma-6" / "config.json").is_file()


@pytest.mark.parametrize("save", [True, False])
def test_async_export_joins_before_checkpoint_save_and_next_fold(tmp_path, monkeypatch, save):
    _SlowWrites(monkeypatch)
    probe = _JoinProbe(tmp_path / "run")
    saving = {"save_strategy": "steps", "save_steps": 6} if save else {}
    _train(tmp_path, "run", "async", callbacks=[probe], max_steps=8, **saving)
    assert probe.seen == ({"save-6": True, "step-8": True} if save else {"step-8": True})


def test_async_export_failure_surfaces_at_the_next_join(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr("pmakit.training.export.write_side_files", broken)
    with pytest.raises(BackgroundExportError, match="pma-6 failed: disk on fire"):
        _train(tmp_path, "run", "async")
    assert not (tmp_path / "run" / "pma-6").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith("_")], "the temporary folder is removed"


def test_background_writer_runs_one_export_at_a_time():
    writer, order = BackgroundWriter(), []
    writer.start("first", lambda: (time.sleep(0.05), order.append("first")))
    writer.start("second", lambda: order.append("second"))  # waits for the first
    writer.join()
    assert order == ["first", "second"] and not writer.busy
    writer.start("bad", lambda: 1 / 0)
    with pytest.raises(BackgroundExportError, match="bad failed") as info:
        writer.join()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    writer.join()  # the failure is reported once


_CRASH = """
import os, sys
import pmakit.training.streaming as streaming
from pmakit import PmaTrainer
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import pma_args

written = []
original = streaming._as_bytes

def crash_midway(tensor):
    written.append(1)
    if len(written) == 5:
        os._exit(17)  # the process dies in the middle of the background write
    return original(tensor)

streaming._as_bytes = crash_midway
args = pma_args(sys.argv[1], pma_export="async", max_steps=8)
PmaTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(96)).train()
"""


def test_crash_during_background_write_leaves_no_loadable_folder(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(_CRASH))
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, str(script), str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert not (out / "pma-6").exists() and not (out / "pma").exists()
    leftovers = [p for p in out.iterdir() if p.name.startswith("_pma-6")]
    assert leftovers, "the half-written folder is the hidden temporary one"
    for folder in leftovers:
        assert not (folder / "config.json").exists()
        with pytest.raises((OSError, ValueError)):  # no config.json: not a model folder
            AutoModelForCausalLM.from_pretrained(folder)


def test_async_setting_is_validated():
    with pytest.raises(ValueError, match="`export` must be one of sync, async"):
        PmaConfig(export="later")
    with pytest.raises(ValueError, match="`pma_export` must be one of"):
        pma_args("unused", pma_export="background")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_async_export_on_cuda_equals_sync(tmp_path, offload):
    """A CUDA average is snapshotted into pinned memory; an offloaded (pinned CPU) one is used as is."""
    for export in ("sync", "async"):
        trainer = PmaTrainer(
            model=tiny_llama(),
            args=pma_args(tmp_path / export, pma_export=export, pma_offload=offload, use_cpu=False),
            train_dataset=TokenDataset(96),
        )
        trainer.train()
    for name in ("pma-6", "pma-12", "pma"):
        _assert_same(tmp_path / "async" / name, tmp_path / "sync" / name)


def test_async_falls_back_to_sync_for_peft_adapters(tmp_path):
    """An adapter folder is written by `save_pretrained` (PEFT's layout), so the export stays synchronous."""
    peft = pytest.importorskip("peft")
    from transformers import Trainer

    from pmakit import PmaCallback
    from tests.helpers.training import plain_args

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    callback = PmaCallback(PmaConfig(interleave_step=2, fused_num=3, export="async"))
    trainer = Trainer(model=model, args=plain_args(tmp_path), train_dataset=TokenDataset(), callbacks=[callback])
    with pytest.warns(UserWarning, match="falls back to synchronous exports: .*PEFT adapter"):
        trainer.train()
    folder = tmp_path / "pma-6"
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    assert not callback.exporter.background.busy


# ---------------------------------------------------------------- a full disk: one line naming the folder
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fill_safetensors_writer(monkeypatch):
    """What safetensors' (Rust) writer raises on a full disk, where `save_pretrained` writes a shard."""

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)


def _fill_shard_reservation(monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", _no_space)  # the streamed writer claims each shard's space first


def _fill_shard_write(monkeypatch):
    monkeypatch.setattr(ShardWriter, "write", _no_space)  # a disk that fills up after the space was claimed


def _fill_latest_copy(monkeypatch):
    """`pma-N` is written, then copying it to `pma/` fills the disk at the weights (copytree's error list)."""
    real = shutil.copyfile

    def copyfile(src, dst, *args, **kwargs):
        if os.fspath(src).endswith(".safetensors"):
            _no_space()
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copyfile)


@pytest.mark.parametrize(
    "export, fill, folder",
    [
        ("sync", _fill_safetensors_writer, "pma-6"),
        ("async", _fill_shard_reservation, "pma-6"),
        ("async", _fill_shard_write, "pma-6"),
        ("sync", _fill_latest_copy, "pma"),
        ("async", _fill_latest_copy, "pma"),
    ],
    ids=["save_pretrained", "reserve", "write", "copy-sync", "copy-async"],
)
def test_full_disk_during_export_is_one_line_naming_the_folder(tmp_path, monkeypatch, export, fill, folder):
    fill(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises((OSError, BackgroundExportError)) as info:  # async: at the next join
        _train(tmp_path, "run", export, max_steps=6)
    err = info.value.__cause__ if isinstance(info.value, BackgroundExportError) else info.value
    assert isinstance(err, DiskFullError) and err.errno == errno.ENOSPC, repr(info.value)
    message = str(info.value)
    assert "\n" not in message and f"to write {run / folder};" in message, message
    assert not (run / folder).exists(), "nothing partial in place"
    assert not [p.name for p in run.iterdir() if p.name.startswith("_")], "the temporary folder is removed"
    if folder == "pma":  # the cycle's own folder was complete before the copy failed
        assert (run / "pma-6" / "config.json").is_file()


def test_full_disk_keeps_the_folder_it_would_replace(tmp_path, monkeypatch):
    model = tiny_llama()
    first = {p: torch.zeros_like(p) for p in model.parameters()}
    folder = save_averaged_model(model, first, tmp_path / "pma", stream=True)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _fill_shard_write(monkeypatch)
    with pytest.raises(DiskFullError, match=r"^\[Errno 28\] No space left on device to write .*pma; it was left"):
        save_averaged_model(model, {p: torch.ones_like(p) for p in model.parameters()}, folder, stream=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["pma"]
