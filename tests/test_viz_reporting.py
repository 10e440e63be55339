"""``report_to: [wandb]``: optional, lazily imported, one W&B run per run folder across resumes."""

from __future__ import annotations

import sys
import types

from unmask.metrics import WANDB_ID_FILE, MetricsWriter, read_metrics


class FakeRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def define_metric(self, name, **kw):
        self.calls.append(("define_metric", name, kw))

    def log(self, data):
        self.calls.append(("log", data))

    def finish(self):
        self.calls.append(("finish",))


def _fake_wandb(monkeypatch, calls):
    module = types.ModuleType("wandb")

    def init(**kw):
        calls.append(("init", kw))
        return FakeRun(calls)

    module.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)


def test_wandb_logs_alongside_jsonl_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "sudoku")
    (tmp_path / "config.yaml").write_text("lr: 0.001\nobjective: tracerl\n")
    calls: list = []
    _fake_wandb(monkeypatch, calls)
    writer = MetricsWriter(tmp_path, report_to=["wandb"])
    writer.log(1, {"reward": 0.5, "kl": float("nan")})
    writer.close()
    init = calls[0][1]
    assert init["project"] == "sudoku"
    assert init["config"] == {"lr": 0.001, "objective": "tracerl"}
    assert init["resume"] is None and init["dir"] == str(tmp_path)
    assert ("define_metric", "*", {"step_metric": "step"}) in calls
    assert ("log", {"step": 1, "reward": 0.5}) in calls  # the NaN is left out, as in JSONL
    assert calls[-1] == ("finish",)
    assert read_metrics(tmp_path) == [{"step": 1, "reward": 0.5, "kl": None}]

    calls.clear()
    MetricsWriter(tmp_path, report_to=["wandb"], resume_step=1).close()
    again = calls[0][1]
    assert again["id"] == init["id"] == (tmp_path / WANDB_ID_FILE).read_text().strip()
    assert again["resume"] == "allow"


def test_missing_wandb_is_a_warning_not_an_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    writer = MetricsWriter(tmp_path, report_to=["wandb"])
    writer.log(1, {"reward": 1.0})
    writer.close()
    assert "wandb is not installed" in caplog.text
    assert read_metrics(tmp_path) == [{"step": 1, "reward": 1.0}]
    assert not (tmp_path / WANDB_ID_FILE).exists()
