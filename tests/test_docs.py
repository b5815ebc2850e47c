"""The documentation stays true to the code: the generated hyperparameter table, every field of
the registry's defaults documented, relative links that resolve, and a short README.

Cheap: imports ``clseg_jax.strategies`` (no compilation) and reads Markdown files.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

from clseg_jax import strategies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")
README_MAX_LINES = 250
FIX = "run `python docs/strategy_table.py --write`"


def _load_strategy_table():
    path = os.path.join(DOCS, "strategy_table.py")
    spec = importlib.util.spec_from_file_location("docs_strategy_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table_module():
    return _load_strategy_table()


def _markdown_files() -> list[str]:
    return [README, *sorted(glob.glob(os.path.join(DOCS, "*.md")))]


def test_hparams_block_matches_generated_table(table_module):
    block = table_module.current_block(os.path.join(DOCS, "strategies.md"))
    assert block.strip() == table_module.table().strip(), (
        f"docs/strategies.md's hyperparameter table is out of date: {FIX}"
    )


def test_every_default_hparam_has_a_row(table_module):
    fields = strategies.default_hparams()
    for module in strategies.MODULES:
        defaults, meanings = getattr(module, "DEFAULTS", {}), getattr(module, "HELP", {})
        assert set(meanings) == set(defaults), (
            f"{module.__name__}: HELP must say what each DEFAULTS field sets "
            f"(missing {sorted(set(defaults) - set(meanings))}, "
            f"stale {sorted(set(meanings) - set(defaults))})"
        )
        assert all(isinstance(m, str) and m for m in meanings.values())
    block = table_module.current_block(os.path.join(DOCS, "strategies.md"))
    rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", block, flags=re.MULTILINE))
    missing_row = sorted(set(fields) - rows)
    assert not missing_row, f"docs/strategies.md has no row for {missing_row}: {FIX}"


# [text](target) not preceded by "!" is a link, with "!" an image; both must resolve.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)


def _relative_links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = _FENCE.sub("", f.read())  # commands in code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor inline code
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, mailto:, ... and same-page anchors
        out.append(target.split("#", 1)[0])
    return out


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_point_to_existing_files(path):
    base = os.path.dirname(path)
    broken = [t for t in _relative_links(path) if not os.path.exists(os.path.join(base, t))]
    assert not broken, f"{os.path.relpath(path, ROOT)} links to missing files: {broken}"


def test_links_are_found():
    # The link check above is only as good as its parser: the README links to every docs page.
    targets = set(_relative_links(README))
    pages = {f"docs/{os.path.basename(p)}" for p in glob.glob(os.path.join(DOCS, "*.md"))}
    assert pages <= targets, f"README.md does not link to {sorted(pages - targets)}"


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/"
    )
