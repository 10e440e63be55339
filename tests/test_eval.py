"""`unmask eval` end to end on a tiny untrained model, and the statistics it reports."""

from __future__ import annotations

import json
import math

from unmask.cli import main
from unmask.eval import pass_at_k, wilson_interval


def test_pass_at_k_matches_enumeration():
    from itertools import combinations

    n, c = 6, 2
    for k in (1, 2, 3, 5):
        draws = list(combinations(range(n), k))
        exact = sum(any(i < c for i in d) for d in draws) / len(draws)
        assert math.isclose(pass_at_k(n, c, k), exact)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0


def test_wilson_interval_contains_estimate():
    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high and low > 0.2 and high < 0.41
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(0, 50)[1] > 0


def test_eval_cli_writes_generations_and_summary(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--model",
            "nano-block",
            "task=sudoku",
            "limit=6",
            "num_generations=2",
            "batch_size=8",
            f"output_dir={out}",
            "sampler.gen_length=16",
            "sampler.temperature=1.0",
        ]
    )
    assert rc == 0
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 12
    record = json.loads(lines[0])
    assert {"prompt", "completion", "completion_ids", "steps", "rewards", "correct"} <= set(record)
    assert len(record["steps"]) == len(record["completion_ids"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_prompts"] == 6 and summary["num_samples"] == 12
    assert 0.0 <= summary["accuracy"] <= 1.0 and "pass@2" in summary
    assert summary["mean_nfe"] > 0 and "reward/sudoku_cells/mean" in summary
    again = tmp_path / "again"
    main(
        [
            "eval",
            "--model",
            "nano-block",
            "task=sudoku",
            "limit=6",
            "num_generations=2",
            "batch_size=8",
            f"output_dir={again}",
            "sampler.gen_length=16",
            "sampler.temperature=1.0",
        ]
    )
    assert (again / "generations.jsonl").read_text() == "\n".join(lines) + "\n"  # seeded


def test_eval_bad_config_is_a_clear_error(capsys):
    assert main(["eval", "--model", "nano-block", "task=chess"]) == 2
    assert "unknown task 'chess'" in capsys.readouterr().err
    assert main(["eval", "--model", "nano-block", "num_generations=0"]) == 2
