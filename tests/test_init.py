"""The public API: every exported name resolves, and the merge path stays free of torch."""

import subprocess
import sys

import pmakit


def test_every_exported_name_resolves():
    for name in pmakit.__all__:
        assert getattr(pmakit, name) is not None, name
    assert sorted(dir(pmakit)) == sorted(pmakit.__all__)


def test_merge_and_cli_import_without_torch():
    code = "import sys, pmakit; pmakit.merge; pmakit.AveragingRule; import pmakit.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
