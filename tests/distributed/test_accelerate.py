"""`examples/accelerate_loop.py` under `accelerate launch` (2 CPU processes, gloo): PmaAdamW in a custom loop.

Checks that ``save_state``/``load_state`` resume lands on the same bits, that only the main process
builds model folders, and that the merged model equals a single-process run over the same global
batches (the tolerance of the DDP Trainer test).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.launch import HERE, ROOT
from tests.helpers.training import load_folder


# One cycle ends at step 8 (samples after steps 2, 4, 6, 8); the state is saved at step 4, mid-cycle.
COMMON = [
    "--max_train_steps", "8", "--checkpointing_steps", "4", "--pma_interleave_step", "2", "--pma_fused_num", "4",
    "--pma_fused_algo", "wma", "--max_corpus_bytes", "30000", "--num_warmup_steps", "2", "--block_size", "32",
]  # fmt: skip
FSDP2 = [
    "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
]  # fmt: skip


def _run(log_dir, argv, *, launch: list[str] | None, timeout=400):
    env = dict(os.environ)
    fsdp = launch is not None and "--use_fsdp" in launch
    if not fsdp:
        # `--cpu` alone starts one process; several CPU processes take the multi-GPU launcher with use_cpu.
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")]),
    )
    worker = [str(HERE / "accelerate_worker.py"), str(log_dir), *argv]
    if launch is None:
        command = [sys.executable, *worker]
    else:
        device = [] if fsdp else ["--multi_gpu"]
        command = [sys.executable, "-m", "accelerate.commands.launch", *device, "--num_processes", "2"]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *launch, *worker]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


def _assert_equal_folders(left, right):
    a, b = load_folder(left), load_folder(right)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


# Accelerate (1.15) turns FSDP on only for multi-accelerator runs: on CPU processes it stays MULTI_CPU (DDP), so its
# FSDP2 route needs two GPUs. The FSDP2 engine itself is tested on CPU under torchrun (test_fsdp2.py).
NEEDS_TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="Accelerate's FSDP2 needs 2 GPUs")


@pytest.mark.parametrize("backend", ["ddp", pytest.param("fsdp2", marks=[pytest.mark.cuda, NEEDS_TWO_GPUS])])
def test_accelerate_loop_resumes_bitwise_writes_on_main_and_matches_one_process(tmp_path, backend):
    launch = FSDP2 if backend == "fsdp2" else []
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    batch4 = ["--per_device_train_batch_size", "4", *COMMON]
    _run(tmp_path / "logs_full", ["--output_dir", str(full), *batch4], launch=launch)
    resume = ["--resume_from_checkpoint", str(full / "step_4")]
    argv = ["--output_dir", str(resumed), *batch4, *resume]
    _run(tmp_path / "logs_resumed", argv, launch=launch)

    for run in (full, resumed):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["num_processes"] == 2 and summary["steps"] == 8, summary
    assert sorted(p.name for p in full.glob("pma*")) == ["pma", "pma-8"]
    _assert_equal_folders(resumed / "pma-8", full / "pma-8")
    for log in ("logs_full", "logs_resumed"):
        assert not (tmp_path / log / "writes_rank1.txt").exists(), "only the main process builds folders"
        assert "pma-8" in (tmp_path / log / "writes_rank0.txt").read_text().split()
    assert (full / "pma" / "tokenizer_config.json").is_file() and (full / "pma" / "config.json").is_file()

    # One process over the same global batches (2 x 4 = 8 blocks per step).
    single = tmp_path / "single"
    _run(
        tmp_path / "logs_single",
        ["--output_dir", str(single), "--per_device_train_batch_size", "8", *COMMON],
        launch=None,
    )
    reference, saved = load_folder(single / "pma-8"), load_folder(full / "pma-8")
    assert reference.keys() == saved.keys()
    worst = max((saved[n] - reference[n]).abs().max().item() for n in reference)
    print(f"{backend} under accelerate launch vs one process: max |difference| of pma-8 = {worst:.3g}")
    for name, ref in reference.items():
        torch.testing.assert_close(saved[name], ref, rtol=1e-4, atol=2e-5, msg=name)
