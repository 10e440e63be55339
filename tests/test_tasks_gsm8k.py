"""GSM8K: the real files, gold extraction, targets, chat prompts."""

import json
from pathlib import Path

import pytest

from unmask.tasks import GSM8KTask, get_task

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
ROW = {
    "question": "Tom has 3 apples and buys 1,200 more. How many now?",
    "answer": "He has 3 + 1200 = <<3+1200=1203>>1203 apples.\n#### 1,203",
}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gold_solution_and_targets(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "g.jsonl", [ROW])
    row = GSM8KTask(source=source).dataset("test")[0]
    assert row["answer"] == "1203"
    assert row["solution"] == "He has 3 + 1200 = 1203 apples."
    assert row["prompt"] == ROW["question"] + "\n"
    assert row["target"] == "He has 3 + 1200 = 1203 apples.\nThe answer is \\boxed{1203}"
    chat = GSM8KTask(source=source, template="chat").dataset("test")[0]
    assert "<answer>" in chat["prompt"] and "\\boxed{}" in chat["prompt"]
    reasoning = "<reasoning>\nHe has 3 + 1200 = 1203 apples.\n</reasoning>\n"
    assert chat["target"] == reasoning + "<answer>\n\\boxed{1203}\n</answer>"


def test_bare_answers_and_bad_rows(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "2"}])
    row = GSM8KTask(source=source).dataset("test")[0]
    assert (row["answer"], row["solution"], row["target"]) == ("2", "", "The answer is \\boxed{2}")
    source = write_jsonl(tmp_path / "bad.jsonl", [ROW, {"question": "q", "answer": "work ####  "}])
    with pytest.raises(ValueError, match=r"bad\.jsonl row 1: field 'answer' has no final answer"):
        GSM8KTask(source=source).rows("test")


def test_field_map_renames_columns(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "g.jsonl", [{"q": ROW["question"], "a": ROW["answer"]}])
    task = GSM8KTask(source=source, field_map={"q": "question", "a": "answer"})
    assert task.rows("test")[0]["answer"] == "1203"
    with pytest.raises(ValueError, match=r"row 0: missing field 'question' \(fields: a, q\)"):
        GSM8KTask(source=source).rows("test")


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K data not present")
def test_reads_the_real_files() -> None:
    task = get_task(
        "gsm8k", source={"train": str(GSM8K / "train.jsonl"), "test": str(GSM8K / "test.jsonl")}
    )
    test = task.dataset("test")
    assert len(test) == 1319 and test[0]["answer"] == "18"
    assert len(task.rows("train")) == 7473
    assert all(a.lstrip("-").isdigit() for a in test["answer"])
    assert all(
        t.endswith(f"\\boxed{{{a}}}") for t, a in zip(test["target"], test["answer"], strict=True)
    )
    assert all("<<" not in t for t in test["target"])
    head = test.select(range(16))
    scores = task.score(head["prompt"], head["target"], {"answer": head["answer"]})
    assert scores == {"gsm8k_correct": [1.0] * 16, "boxed_format": [1.0] * 16}
