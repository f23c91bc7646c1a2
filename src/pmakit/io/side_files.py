"""The files a model folder carries beside its weights, copied from one donor into merged outputs.

Config and generation config always travel; tokenizer and processor files on request; and the
Python files of ``trust_remote_code`` models (named in the config's ``auto_map``), without which
the merged folder would not load.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from ..errors import InputError


__all__ = ["CONFIG_FILES", "TOKENIZER_FILES", "copy_side_files", "remote_code_files"]

CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
CHAT_TEMPLATES_DIR = "additional_chat_templates"


def _auto_map_modules(config: Mapping) -> set[str]:
    """Module names that ``auto_map`` entries point to (``"modeling_x.MyModel"`` -> ``modeling_x``)."""
    modules = set()
    for value in (config.get("auto_map") or {}).values():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, str) and "--" not in ref:  # "repo--module.Class" lives in another repo
                modules.add(ref.rsplit(".", 1)[0])
    return modules


def remote_code_files(folder: str | Path) -> list[Path]:
    """The ``*.py`` files of a ``trust_remote_code`` model folder (every module its ``auto_map`` names)."""
    folder = Path(folder)
    configs = [folder / name for name in ("config.json", "tokenizer_config.json") if (folder / name).is_file()]
    modules: set[str] = set()
    for config in configs:
        try:
            modules |= _auto_map_modules(json.loads(config.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise InputError(f"{config} is not valid JSON: {e}.") from e
    if not modules:
        return []
    return sorted(p for p in folder.glob("*.py") if p.is_file())


def copy_side_files(
    donor: str | Path,
    folder: str | Path,
    *,
    tokenizer: bool = True,
    config_updates: Mapping[str, object] | None = None,
) -> list[str]:
    """Copy the side files of ``donor`` into ``folder``; return the names copied.

    ``config_updates`` are written into ``config.json`` on the way (e.g. the output ``dtype``).
    """
    donor, folder = Path(donor), Path(folder)
    names = [*CONFIG_FILES, *(TOKENIZER_FILES if tokenizer else ())]
    copied = []
    for name in names:
        src = donor / name
        if not src.is_file():
            continue
        if name == "config.json" and config_updates:
            config = json.loads(src.read_text(encoding="utf-8"))
            config.update(config_updates)
            (folder / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            shutil.copy2(src, folder / name)
        copied.append(name)
    for src in remote_code_files(donor):
        shutil.copy2(src, folder / src.name)
        copied.append(src.name)
    if tokenizer and (donor / CHAT_TEMPLATES_DIR).is_dir():
        shutil.copytree(donor / CHAT_TEMPLATES_DIR, folder / CHAT_TEMPLATES_DIR, dirs_exist_ok=True)
        copied.append(CHAT_TEMPLATES_DIR)
    return copied
