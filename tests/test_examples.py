"""Every example runs as a script in quick mode and writes its figure."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_in_quick_mode(script, tmp_path, monkeypatch):
    out = tmp_path / f"{script.stem}.png"
    monkeypatch.setattr(sys, "argv", [str(script), "--quick", "--out", str(out)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(script), run_name="__main__")
    assert info.value.code == 0
    assert out.stat().st_size > 10_000  # a rendered PNG, not an empty file
