"""The merge recipe records every parameter the rule reads (from the registry), so it re-runs exactly."""

from __future__ import annotations

import yaml

from pmakit.cli import main
from pmakit.merging import merge
from tests.helpers.folders import save_models


def test_corrected_ema_recipe_records_alpha_and_reruns_bitwise(tmp_path):
    folders = save_models(tmp_path, 3)
    first = tmp_path / "first"
    merge(folders, first, algo="ema_corrected", alpha=0.3, threads=1, progress=False)
    recipe = yaml.safe_load((first / "pmakit_recipe.yaml").read_text())
    assert (recipe["algo"], recipe["alpha"]) == ("ema_corrected", 0.3)  # before the registry: alpha left out
    again = tmp_path / "again"
    assert main(["merge", str(first / "pmakit_recipe.yaml"), "-o", str(again), "--no-progress"]) == 0
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
