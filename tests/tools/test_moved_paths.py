"""The old `pmakit.tools.*` paths of the moved modules still import: the new module itself, with a FutureWarning;
and the sweep, now a package, still offers every name it had as a module, without loading torch."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

import pmakit
from pmakit.tools import MOVED


# What each old module listed in `__all__` before the move: every name must still be there.
OLD_NAMES = {
    "pmakit.tools.buffers": ["FLOAT_BUFFER_POLICIES", "average_models", "merge_buffers", "update_bn"],
    "pmakit.tools.greedy_soup": ["GreedySoupResult", "SoupStep", "greedy_soup"],
    "pmakit.tools.learned_soup": ["LearnedSoup", "fit_learned_soup", "soup_loss"],
    "pmakit.tools.lora": ["LORA_METHODS", "LoraAdapter", "average_lora_adapters", "load_lora_adapter", "lora_deltas"],
    "pmakit.tools.scope": [
        *("Scope", "ScopeDifference", "compare_scopes", "compute_scopes", "tensor_scope"),
        *("format_scope_report", "fuse_scopes", "warn_if_scopes_differ", "warn_on_scope_differences"),
    ],
    "pmakit.tools.weighted_sum": ["ACCUMULATE_DTYPES", "weighted_sum"],
    "pmakit.tools.spike": ["SpikeConfig", "SpikeRecoveryCallback", "SpikeRecoveryError"],
    "pmakit.tools.wsa": ["WSA_TARGETS", "WsaCallback", "WsaConfig", "WsaRegularizer", "add_wsa", "wsa_target_scopes"],
    "pmakit.tools.lm_eval_scorer": ["LmEvalScorer", "lm_eval_scorer", "pma_lm_eval_metrics", "require_lm_eval"],
}

# A fresh interpreter, so that every old path is imported for the first time there (and warns).
PROBE = """
import importlib, json, sys, warnings
out = {}
for old, new in json.loads(sys.argv[1]).items():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exec(f"import {old}")  # a plain import statement, as a user writes it
    module = sys.modules[old]
    names = json.loads(sys.argv[2])[old]
    out[old] = {
        "same": module is importlib.import_module(new) and module.__name__ == new,
        "warnings": [(w.category.__name__, str(w.message), w.filename) for w in seen],
        "missing": [n for n in names if not hasattr(module, n)],
    }
from pmakit.tools import greedy_soup  # the `from package import module` form
out["from-form"] = greedy_soup is sys.modules["pmakit.soups.greedy"]
print(json.dumps(out))
"""


def test_every_moved_module_has_old_names():
    assert set(OLD_NAMES) == set(MOVED)


def test_old_paths_import_the_new_modules_with_a_future_warning():
    args = [json.dumps(MOVED), json.dumps(OLD_NAMES)]
    run = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    out = json.loads(run.stdout)
    assert out.pop("from-form") is True
    for old, result in out.items():
        assert result["same"], old
        assert not result["missing"], (old, result["missing"])
        assert [w[0] for w in result["warnings"]] == ["FutureWarning"], (old, result["warnings"])
        category, message, filename = result["warnings"][0]
        assert MOVED[old] in message and old in message
        assert filename == "<string>", "the warning points at the line that imports the old path"


def test_deprecated_scope_warning_name_warns_and_still_works():
    from pmakit.soups.scopes import Scope, warn_on_scope_differences

    a = {"w": Scope(0.0, 1.0, 4)}
    b = {"w": Scope(0.0, 2.0, 4)}
    with pytest.warns(FutureWarning, match="warn_on_scope_differences"), pytest.warns(UserWarning, match="w \\(std"):
        flagged = pmakit.warn_if_scopes_differ([a, b], 0.1, labels=["a", "b"])
    assert [d.name for d in flagged] == ["w"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert warn_on_scope_differences([a, b], 0.1) == flagged
    assert [w.category for w in seen] == [UserWarning] and seen[0].filename == __file__


# What `pmakit.tools.sweep` offered when it was one module: its `__all__` and the helpers others import.
SWEEP_NAMES = [
    *("Candidate", "SweepResult", "SweepRow", "TextLossScorer", "parse_rule", "sweep", "sweep_inputs"),
    *("text_loss_scorer", "trainer_scorer", "Scorer", "causal_lm_nats", "load_weights_into", "write_plot"),
]
SWEEP_PROBE = """
import json, sys
import pmakit.tools.sweep as package
from pmakit import SweepResult, lm_eval_scorer, sweep, text_loss_scorer, trainer_scorer
light = sorted(m for m in ("torch", "transformers", "matplotlib", "lm_eval") if m in sys.modules)
print(json.dumps({"light": light, "missing": [n for n in json.loads(sys.argv[1]) if not hasattr(package, n)],
                  "same": sweep is package.sweep and text_loss_scorer is package.scorers.text_loss_scorer}))
"""


def test_the_sweep_package_keeps_the_module_names_and_stays_light():
    run = subprocess.run(
        [sys.executable, "-c", SWEEP_PROBE, json.dumps(SWEEP_NAMES)], capture_output=True, text=True, check=True
    )
    out = json.loads(run.stdout)
    assert out == {"light": [], "missing": [], "same": True}
