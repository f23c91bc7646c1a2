"""Runs `examples/accelerate_loop.py` in this process (under `accelerate launch` or alone), logging which
process builds model folders (``writes_rank<r>.txt`` in the first argument's folder)."""

import os
import sys
from pathlib import Path

import pmakit.io.folders
import pmakit.training.export
from examples import accelerate_loop


def log_writes(out: Path, rank: int) -> None:
    original = pmakit.io.folders.atomic_directory

    def logged(path, *args, **kwargs):
        with open(out / f"writes_rank{rank}.txt", "a") as fh:
            fh.write(f"{Path(path).name}\n")
        return original(path, *args, **kwargs)

    pmakit.training.export.atomic_directory = logged  # pma-<step> folders
    pmakit.io.folders.atomic_directory = logged  # the copy into `pma`


def main() -> None:
    log_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_writes(log_dir, int(os.environ.get("RANK", "0")))
    accelerate_loop.main(argv)


if __name__ == "__main__":
    main()
