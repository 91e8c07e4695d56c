"""mypy has no blanket escapes (issue 15, point 1): the configuration turns no check off for a
module, no file opts out, and each line-level `# type: ignore` names its error code and says
why (a comment after it, or on the line above)."""

from __future__ import annotations

import io
import re
import tokenize
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<code>\[[a-z0-9-, ]+\])?(?P<rest>.*)")
BLANKET_OPTIONS = ("ignore_errors", "disable_error_code")


def mypy_files(root: Path) -> list[Path]:
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mypy"]
    return sorted(p for d in config["files"] for p in (root / d).rglob("*.py"))


def blanket_options(pyproject: str) -> list[str]:
    """Options of [tool.mypy] (and its overrides) that switch checks off wholesale."""
    config = tomllib.loads(pyproject)["tool"]["mypy"]
    sections = [config, *config.get("overrides", [])]
    return sorted(k for s in sections for k in s if k in BLANKET_OPTIONS)


def bare_ignores(path: Path, text: str | None = None) -> list[str]:
    """`# type: ignore` comments without an error code or a reason, and file-wide opt-outs."""
    text = path.read_text() if text is None else text
    lines = text.splitlines()
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row = tok.start[0]
        where = f"{path.name}:{row}"
        if re.match(r"#\s*mypy:", tok.string):
            found.append(f"{where} per-file mypy options")
            continue
        m = IGNORE.match(tok.string)
        if m is None:
            continue
        if tok.line.strip() == tok.string.strip():
            found.append(f"{where} a whole-file or own-line ignore")
        elif not m["code"]:
            found.append(f"{where} no error code")
        elif not m["rest"].strip().lstrip("#").strip():
            above = lines[row - 2].strip() if row > 1 else ""
            if not above.startswith("#"):
                found.append(f"{where} no reason")
    return found


def test_no_blanket_ignores_in_the_tree():
    assert blanket_options((ROOT / "pyproject.toml").read_text()) == []
    files = mypy_files(ROOT)
    assert len(files) > 200  # the tree, not an empty glob
    assert [b for p in files for b in bare_ignores(p)] == []


def test_control_the_check_catches_each_kind_of_blanket_ignore():
    """Positive control: every way of switching mypy off is reported; reasoned ignores pass."""
    code = (
        "# mypy: ignore-errors\n"
        "x: int = 'a'  # type: ignore\n"
        "y: int = 'a'  # type: ignore[assignment]\n"
        "# type: ignore\n"
        "z: int = 'a'  # type: ignore[assignment]  # a reason\n"
        "# a reason, on the line above\n"
        "w: int = 'a'  # type: ignore[assignment]\n"
        "s = '# type: ignore'  # in a string: not a comment\n"
    )
    assert bare_ignores(Path("m.py"), code) == [
        "m.py:1 per-file mypy options",
        "m.py:2 no error code",
        "m.py:3 no reason",
        "m.py:4 a whole-file or own-line ignore",
    ]
    config = (
        "[tool.mypy]\nfiles = ['a']\nignore_errors = true\n"
        "[[tool.mypy.overrides]]\nmodule = ['b']\ndisable_error_code = ['attr-defined']\n"
    )
    assert blanket_options(config) == ["disable_error_code", "ignore_errors"]
