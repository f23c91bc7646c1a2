"""The docs gate bites: `make docs` runs mkdocs with flags that fail on a broken docstring.

The command comes from the Makefile's `docs` target, so a flag that silences warnings there (``--quiet``
drops them before ``--strict`` counts them) fails this test. A one-page copy of the site's configuration
renders a small package: with a docstring that names a parameter the function does not have, the build
must fail; with that line fixed, it must pass. The real site must build cleanly too. `make test`
installs the docs tools, so none of this skips there.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import yaml

from tests.docs.snippets import ROOT


def gate_arguments() -> list[str]:
    """The arguments after ``mkdocs`` in the Makefile's `docs` recipe, e.g. ``["build", "--strict"]``."""
    recipe = re.search(r"^docs:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "the Makefile has no `docs` target"
    words = shlex.split(recipe.group(1))
    assert any(w.endswith("mkdocs") for w in words), recipe.group(1)
    return words[next(i for i, w in enumerate(words) if w.endswith("mkdocs")) + 1 :]


def run_gate(config, site) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    command = [sys.executable, "-m", "mkdocs", *gate_arguments(), "-f", str(config), "-d", str(site)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


GOOD = '''
def scale(x: float, factor: float = 2.0) -> float:
    """Multiply.

    Args:
        x: the value.
        factor: the multiplier.
    """
    return x * factor
'''
BROKEN = GOOD.replace("        factor: the multiplier.", "        x, factor: the value and the multiplier.")


def one_page_site(tmp_path, source: str):
    """The site's own mkdocs.yml (theme, extensions, mkdocstrings options, strict validation) on one API page."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (tmp_path / "src" / "tinypkg").mkdir(parents=True)
    (tmp_path / "src" / "tinypkg" / "__init__.py").write_text(source)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Tiny\n\n::: tinypkg.scale\n")
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(tmp_path / "src")]
    config.update(docs_dir=str(tmp_path / "docs"), nav=[{"Home": "index.md"}])
    config.pop("hooks", None)
    config.pop("exclude_docs", None)
    path = tmp_path / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_gate_passes_the_one_page_site(tmp_path):
    done = run_gate(one_page_site(tmp_path, GOOD), tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_gate_fails_on_a_broken_docstring(tmp_path):
    done = run_gate(one_page_site(tmp_path, BROKEN), tmp_path / "site")
    assert done.returncode != 0, "a docstring naming a missing parameter passed the docs gate"
    assert "does not appear in the function signature" in done.stderr


def test_the_site_builds_cleanly(tmp_path):
    done = run_gate(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
