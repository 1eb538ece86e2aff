"""Tolerances come from tests/tolerances.py: no test file writes a non-zero tolerance as a
number literal (atol=, rtol=, rel=, abs=, rel_tol=, abs_tol=). Zero (an exact bound) is allowed."""
from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).parent
LITERAL = re.compile(r"\b(atol|rtol|rel|abs|rel_tol|abs_tol)\s*=\s*(?!0\b)(?!0\.0\b)\d[\d.]*(e-?\d+)?")


def literals(root: Path) -> list[str]:
    found = []
    for path in sorted(p for p in root.glob("test_*.py") if p.name != Path(__file__).name):  # not its own probe
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if not code.lstrip().startswith(('"', "'")):  # not docstring prose
                found += [f"{path.name}:{n}: {m.group(0)}" for m in LITERAL.finditer(code)]
    return found


def test_no_test_file_writes_its_own_tolerance():
    assert literals(TESTS) == []


def test_the_check_catches_a_literal(tmp_path):
    (tmp_path / "test_probe.py").write_text("torch.testing.assert_close(a, b, rtol=1e-5, atol=0)\n"
                                            "assert x == pytest.approx(y, rel=2e-3)\n")
    assert literals(tmp_path) == ["test_probe.py:1: rtol=1e-5", "test_probe.py:2: rel=2e-3"]
