"""docs/sft-pitfalls.md stays true: every test it names exists, every entry names a test, and every pitfall a
comment in pipeline/ refers to is an entry."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "sft-pitfalls.md").read_text(encoding="utf-8")


def test_every_named_test_exists_and_every_entry_names_one():
    entries = re.split(r"^## ", DOC, flags=re.M)[1:]
    assert len(entries) >= 11
    for entry in entries:
        tests = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", entry)
        assert tests, entry.splitlines()[0]
        for path, name in tests:
            tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
            assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, (path, name)


def test_pitfall_names_in_code_are_entries():
    names = set(re.findall(r"^## ([a-z-]+)$", DOC, flags=re.M))
    cited = set()
    for f in (ROOT / "pipeline").rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        cited |= set(re.findall(r"\*([a-z]+(?:-[a-z]+)+)\*", text))
        cited |= set(re.findall(r"sft-pitfalls\.md: ([a-z]+(?:-[a-z]+)+)", text))
        assert not re.search(r"\(B\d+[,)]", text), f  # the old undefined codes
    assert cited and cited <= names, cited - names
