"""The README's script runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_script_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    traj = scope["traj"]
    assert float(traj.loss[-1]) <= 0.05 * (1 + 1e-6) and traj.stats["stopped_by_event"]
    assert (tmp_path / "natural.npz").exists()
