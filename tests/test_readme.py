"""The README's Python example runs as written and prints what it claims."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_generates_with_fastv():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    first_line = out.getvalue().splitlines()[0]
    assert first_line == "[64, 64, 32, 32]"


def test_readme_main_job_runs_as_written_and_prints_the_readme_table(tmp_path, monkeypatch):
    """The first set-up command's `vtcbench run ...` (the offline default) runs and gives the numbers
    the README shows under it."""
    from typer.testing import CliRunner

    from vtcbench.cli import app

    text = README.read_text()
    command = re.search(r"\n    pip install torch==2\.13\.0 && .*? && (vtcbench run[^\n]*)\n", text).group(1)
    assert command == "vtcbench run --method fastv"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VTCBENCH_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, command.split()[1:])
    assert result.exit_code == 0, result.output
    shown = re.search(r"\$ vtcbench run --method fastv\n(.*?)\n\n", text, re.S).group(1)
    metric = r"\b(overall|color|presence|count|text)=([0-9.]+)"  # compared pairwise: the table may wrap anywhere
    assert set(re.findall(metric, shown)) == set(re.findall(metric, result.output)) != set()
    row = r"│ vtcshapes\s*│\s*(\d+)\s*│[^│]*│\s*([0-9.]+)\s*│"  # samples, visual tokens (mean over layers)
    samples, visual_tokens = re.search(row, result.output).groups()
    assert (samples, visual_tokens) == re.search(row, shown).groups()
    assert float(visual_tokens) > 0  # counted, not zeros
