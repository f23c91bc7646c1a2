"""Runs `examples/accelerate_loop.py` in this process (under `accelerate launch` or alone), logging which
process builds model folders (``writes_rank<r>.txt`` in the first argument's folder)."""

import os
import sys
from pathlib import Path

from examples import accelerate_loop
from tests.distributed.ddp_worker import log_writes


def main() -> None:
    log_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_writes(log_dir, int(os.environ.get("RANK", "0")))
    accelerate_loop.main(argv)


if __name__ == "__main__":
    main()
