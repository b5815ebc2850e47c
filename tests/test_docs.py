"""The documentation stays true to the code: the generated hyperparameter table, every field of
the registry's defaults documented, relative links that resolve, a short README, and every
``--config.<field>=<value>`` the docs and config files show resolving on its config.

Cheap: imports the package and the config files (no compilation) and reads Markdown files.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

from clseg_jax import main, strategies

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


# A command's config and the overrides that follow it; an override shown on its own.
_WITH_CONFIG = re.compile(
    r"--config=(configs/[\w.]+(?::[^\s`'\"|]*)?)"
    r"((?:\s+--config\.[\w.]+=(?:'[^']*'|\"[^\"]*\"|[^\s`|]+))*)"
)
_OVERRIDE = re.compile(r"--config\.([\w.]+)=('[^']*'|\"[^\"]*\"|[^\s`|)]+)")
_PLACEHOLDER = re.compile(r"^(<.*>|\.\.\.|[A-Z]|\$\w+)$")  # <dir>, ..., K, $VOC


def _documented_text() -> list[tuple[str, str]]:
    configs = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
    out = []
    for path in [*_markdown_files(), *configs]:
        with open(path) as f:
            out.append((os.path.relpath(path, ROOT), f.read().replace("\\\n", " ")))
    return out


def _config_files() -> dict[tuple[str, str | None], object]:
    """Every config file's config, for its default and each of its ``EXAMPLE_ARGS``."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "[!_]*.py"))):
        name = os.path.basename(path)[:-3]
        module = importlib.import_module(f"configs.{name}")
        for arg in getattr(module, "EXAMPLE_ARGS", (None,)):
            out[(name, arg)] = module.get_config(arg)
    return out


def _has(config, path: str) -> bool:
    node = config
    for part in path.split("."):
        if not (hasattr(node, "keys") and part in node.keys()):
            return False
        node = node[part]
    return True


def test_every_documented_override_resolves_on_its_config(monkeypatch):
    """What the command line checks before a run (``main.check_args``: the config file, its
    argument, each override's field and type), for every ``--config=`` with the overrides shown
    after it; an override shown alone must exist, with a value of its type, in some config."""
    monkeypatch.chdir(ROOT)
    texts, alone = _documented_text(), set()
    commands = 0
    for where, text in texts:
        for m in _WITH_CONFIG.finditer(text):
            spec = re.sub(r"<[^>]*>", "0", m.group(1))  # seed=<s>
            overrides = [
                o.replace("'", "")
                for o in m.group(2).split()
                if not _PLACEHOLDER.match(o.partition("=")[2].strip("'\""))
            ]
            try:
                main.check_args(["main", f"--config={spec}", *overrides])
            except ValueError as e:
                pytest.fail(f"{where}: --config={m.group(1)} {' '.join(overrides)}: {e}")
            commands += 1
        alone |= {(f, v.strip("'\"")) for f, v in _OVERRIDE.findall(text)}
    assert commands >= 40 and len(alone) >= 20, (commands, len(alone))
    configs = _config_files()
    for field, value in sorted(alone):
        having = [key for key, config in configs.items() if _has(config, field)]
        assert having, f"--config.{field} is documented but no config file has that field"
        if not _PLACEHOLDER.match(value):
            for key in having:
                main._check_override(configs[key], field, value)
