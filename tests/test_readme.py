"""The README is a landing page: small, with the two commands, and every link it has leads somewhere."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_a_landing_page_of_at_most_12_kb():
    size = len(README.encode())
    assert size <= 12 * 1024, f"README.md is {size} bytes; move details to a docs page"


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README


def test_every_relative_link_of_the_readme_exists():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to no docs page"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
