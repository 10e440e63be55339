"""Data loading: local file formats, clear errors, and the hub path (no network)."""

import json
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import unmask.tasks.base as base
from unmask.tasks import get_task
from unmask.tasks.base import read_rows


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Serve hub names from local jsonl files through the real ``json`` builder, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    files: dict[tuple[str, str | None, str], Path] = {}
    calls: list[tuple] = []
    real_load = datasets.load_dataset

    def load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        key = (name, config, split)
        if key not in files:
            raise ValueError(f"no such split {split!r}")
        return real_load("json", data_files=str(files[key]), split="train", cache_dir=str(tmp_path))

    def publish(name: str, config: str | None, split: str, rows: list[dict]) -> None:
        path = tmp_path / f"{len(files)}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[(name, config, split)] = path

    monkeypatch.setattr(base.datasets, "load_dataset", load_dataset)
    return publish, calls


def test_gsm8k_from_the_hub(fake_hub) -> None:
    publish, calls = fake_hub
    publish("openai/gsm8k", "main", "test", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    data = get_task("gsm8k").dataset("test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert data[0]["answer"] == "2" and data[0]["target"] == "1+1=2\nThe answer is \\boxed{2}"


def test_countdown_from_the_hub_keeps_three_numbers(fake_hub) -> None:
    publish, calls = fake_hub
    rows = [
        {"target": 24, "nums": [2, 3, 4]},
        {"target": 10, "nums": [1, 2, 3, 4]},
        {"target": 7, "nums": [1, 2, 4]},
    ]
    publish("Jiayi-Pan/Countdown-Tasks-3to4", None, "train[:-500]", rows)
    task = get_task(
        "countdown",
        source="Jiayi-Pan/Countdown-Tasks-3to4",
        hub_splits={"train": "train[:-500]"},
    )
    data = task.dataset("train")
    assert calls == [("Jiayi-Pan/Countdown-Tasks-3to4", None, "train[:-500]")]
    assert data["numbers"] == [[2, 3, 4], [1, 2, 4]]
    assert data["target_number"] == [24, 7]
    assert data["target"] == ["2*3*4", "1+2+4"]
    capped = get_task("countdown", source="Jiayi-Pan/Countdown-Tasks-3to4", num_test=1)
    publish("Jiayi-Pan/Countdown-Tasks-3to4", None, "test", rows)
    assert len(capped.dataset("test")) == 1


def test_math500_from_the_hub(fake_hub) -> None:
    publish, _ = fake_hub
    publish("HuggingFaceH4/MATH-500", None, "test", [{"problem": "p", "answer": "3", "level": 2}])
    data = get_task("math500").dataset("test")
    assert data[0]["answer"] == "3" and data[0]["level"] == 2


def test_hub_errors_name_the_dataset(fake_hub) -> None:
    with pytest.raises(
        ValueError, match=r"could not load dataset 'HuggingFaceH4/MATH-500'.*'train'"
    ):
        get_task("math500").dataset("train")


def test_local_formats_read_alike(tmp_path: Path) -> None:
    rows = [{"Puzzle": "0102200002100320", "Solution": "3142243142131324"}]
    (tmp_path / "s.jsonl").write_text(json.dumps(rows[0]) + "\n\n")
    (tmp_path / "s.json").write_text(json.dumps(rows))
    (tmp_path / "s.csv").write_text("Puzzle,Solution\n0102200002100320,3142243142131324\n")
    # A numeric column loses the leading zero; the loader restores it.
    table = pa.table({"Puzzle": [102200002100320], "Solution": ["3142243142131324"]})
    pq.write_table(table, tmp_path / "s.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        task = get_task("sudoku", source=str(tmp_path / f"s.{suffix}"))
        assert task.rows("test") == [{"puzzle": rows[0]["Puzzle"], "solution": rows[0]["Solution"]}]


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        list(read_rows(str(tmp_path / "missing.jsonl"), "test"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl row 1: not valid JSON"):
        list(read_rows(str(bad), "test"))
    bad.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl row 1: expected a JSON object"):
        list(read_rows(str(bad), "test"))
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(read_rows(str(other), "test"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable rows"):
        get_task("gsm8k", source=str(empty)).rows("test")
