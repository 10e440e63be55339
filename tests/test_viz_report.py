"""``eval`` with ``report: true`` and ``unmask trace`` write the page and the table PNG."""

from __future__ import annotations

import json
import re

import pytest
from matplotlib.image import imread

from unmask.cli import main
from unmask.eval.evaluate import EvalConfig, run_eval
from unmask.sampling import SamplerConfig
from unmask.viz.eval_report import summary_row


def _page_data(path):
    page = path.read_text()
    found = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)
    assert found, "no data block in the page"
    return json.loads(found.group(1))


@pytest.mark.parametrize(("num_generations", "shown"), [(3, 3), (1, 5)])
def test_eval_report_writes_trace_and_summary(tmp_path, num_generations, shown):
    sampler = SamplerConfig(gen_length=8, temperature=1.0)
    config = EvalConfig(
        model="nano-block",
        limit=5,
        num_generations=num_generations,
        batch_size=15,
        output_dir=str(tmp_path),
        report=True,
        sampler=sampler,
    )
    summary = run_eval(config, progress=False)
    data = _page_data(tmp_path / "trace.html")
    rows = data["rows"]
    assert len(rows) == shown
    records = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    for row, record in zip(rows, records, strict=False):
        assert row["prompt"] == record["prompt"]
        assert row["reward"] == record["reward"]
        assert row["rewards"] == record["rewards"]
        assert [t["s"] for t in row["tokens"] if t["k"] == "c"] == record["steps"]
        assert all(0 < t["c"] <= 1 for t in row["tokens"] if t["k"] == "c")
    if num_generations > 1:
        assert len({r["prompt"] for r in rows}) == 1  # one group: one prompt's samples
    pixels = imread(tmp_path / "summary.png")
    assert pixels.shape[1] > 300 and pixels.std() > 0.01
    row = summary_row(summary, "nano")
    assert row["model"] == "nano" and row["95% CI"] == summary["accuracy_ci95"]
    assert ("pass@3" in row) == (num_generations == 3)


def test_report_needs_an_output_dir():
    with pytest.raises(ValueError, match="output_dir"):
        EvalConfig(report=True)


def test_cli_trace_of_a_task_row(tmp_path, capsys):
    out = tmp_path / "page.html"
    args = ["--model", "nano-block", "task=sudoku", "index=2", "num_generations=2",
            "sampler.gen_length=8", "sampler.temperature=1.0", "--output", str(out)]  # fmt: skip
    code = main(["trace", *args])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    data = _page_data(out)
    assert [r["label"] for r in data["rows"]] == ["sample 0", "sample 1"]
    assert set(data["rows"][0]["rewards"]) == {"sudoku_cells", "sudoku_solved"}
    assert "reward" in data["rows"][0]


def test_cli_trace_bad_input_is_one_line(tmp_path, capsys):
    assert main(["trace", "--model", "nano-block"]) == 2
    assert "give a prompt" in capsys.readouterr().err
    assert main(["trace", "--model", "nano-block", "task=sudoku", "index=100000",
                 "sampler.gen_length=8"]) == 2  # fmt: skip
    assert "index: 100000" in capsys.readouterr().err
