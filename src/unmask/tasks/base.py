"""The Task: a dataset (generated, local file or hub), a prompt template and weighted rewards.

Every task yields rows with a ``prompt`` (the template applied), a ``target`` (a reference
completion for SFT) and the raw columns its reward functions read. Reward functions have TRL's
signature ``f(prompts, completions, **columns) -> list[float | None]`` so they plug into TRL or
our own trainer unchanged; a value may also be a per-token vector (a process reward,
:mod:`unmask.rewards.process`). :meth:`Task.score` runs them so that a failing one costs a
batch of ``None``, never the training run.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import datasets

from unmask.rewards.process import is_vector

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., list[float | None]]
TEMPLATES = ("plain", "chat")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
GENERATED = "generated"
_INTEGER = re.compile(r"[+-]?[0-9]+")


def reward_total(value: Any) -> float | None:
    """One number for a reward value: a per-token vector counts as the sum of its entries
    (see :mod:`unmask.rewards.process`)."""
    if value is None:
        return None
    return float(sum(float(v) for v in value)) if is_vector(value) else float(value)


def answer_block(answer: str, reasoning: str | None = None) -> str:
    """The d1 response format: optional ``<reasoning>`` block, then ``<answer>``."""
    head = "" if reasoning is None else f"<reasoning>\n{reasoning}\n</reasoning>\n"
    return f"{head}<answer>\n{answer}\n</answer>"


def require(row: Mapping[str, Any], name: str, where: str) -> Any:
    """``row[name]``, or a ValueError naming the place and the field if it is missing."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        fields = ", ".join(sorted(str(k) for k in row))
        raise ValueError(f"{where}: missing field {name!r} (fields: {fields})")
    return value


def to_int(value: Any, name: str, where: str) -> int:
    """An integer from an int, an integral float or a decimal string; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    raise ValueError(f"{where}: field {name!r} is not an integer: {value!r}")


def rename(row: Mapping[str, Any], field_map: Mapping[str, str]) -> dict[str, Any]:
    """Rename dataset columns to the task's names (``field_map``: dataset name -> task name)."""
    out = {k: v for k, v in row.items() if k not in field_map}
    out.update({field_map[k]: v for k, v in row.items() if k in field_map})
    return out


def is_local(source: str) -> bool:
    """A data file (by suffix, or an existing file); anything else goes to ``load_dataset``."""
    return Path(source).suffix.lower() in LOCAL_SUFFIXES or Path(source).is_file()


def read_rows(
    source: str, split: str, hub_config: str | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, row)`` from a local file (by suffix) or a hub dataset; ``where`` names
    the file and 0-based row index for error messages. ``split`` is the hub split expression
    (ignored for files)."""
    if not is_local(source):
        try:
            data = datasets.load_dataset(source, hub_config, split=split)
        except Exception as exc:  # re-raised with the names the user gave
            raise ValueError(
                f"could not load dataset {source!r} (config {hub_config!r}, split {split!r}): {exc}"
            ) from exc
        for i, row in enumerate(data):
            yield f"{source} row {i}", dict(row)
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM
            for i, row in enumerate(csv.DictReader(f)):
                yield f"{path} row {i}", dict(row)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
    elif suffix in (".jsonl", ".json"):
        yield from _read_json(path)
    else:
        raise ValueError(f"{path}: unsupported file type (use one of {', '.join(LOCAL_SUFFIXES)})")


def _read_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """JSON lines, or (``.json``) one array of objects."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    else:
        records = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} row {i}: not valid JSON ({exc.msg})") from exc
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path} row {i}: expected a JSON object, got {type(record).__name__}")
        yield f"{path} row {i}", record


def reward_name(func: RewardFunc) -> str:
    """A reward's name in metrics: its ``__name__``, the wrapped function's for a
    ``functools.partial``, ``reward`` for a lambda or a callable object without one."""
    while isinstance(func, functools.partial):
        func = func.func
    name = getattr(func, "__name__", None)
    return name if isinstance(name, str) and name.isidentifier() else "reward"


def reward_names(funcs: Sequence[RewardFunc]) -> list[str]:
    """Distinct names for ``funcs``: a name used again gets ``_2``, ``_3``, ... (two lambdas,
    or two functions with one name, would otherwise overwrite each other's scores)."""
    names: list[str] = []
    for func in funcs:
        base = name = reward_name(func)
        count = 1
        while name in names:
            count += 1
            name = f"{base}_{count}"
        names.append(name)
    return names


@dataclass(kw_only=True)
class Task:
    """A task: data, prompt template and rewards. Subclasses fill in the hooks below.

    ``source`` is ``"generated"`` (tasks with a generator), a local ``.jsonl/.json/.csv/
    .parquet`` file or a hub dataset name, or a mapping ``{split: source}``. ``field_map``
    renames dataset columns to the task's names (merged over the task's own defaults);
    ``hub_splits`` maps a split to the hub's split expression (``{"test": "train[-500:]"}``).
    ``num_train`` / ``num_validation`` / ``num_test`` cap (files, hub) or set (generated) the
    size of a split.
    """

    name: ClassVar[str]
    accuracy_reward: ClassVar[str]
    default_field_map: ClassVar[Mapping[str, str]] = {}
    default_sizes: ClassVar[Mapping[str, int]] = {}  # generated splits and their sizes

    template: str = "plain"
    tokenizer: Any = None
    source: str | Mapping[str, str] = GENERATED
    field_map: Mapping[str, str] | None = None
    hub_config: str | None = None
    hub_splits: Mapping[str, str] | None = None
    num_train: int | None = None
    num_validation: int | None = None
    num_test: int | None = None
    reward_funcs: list[RewardFunc] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; known: {', '.join(TEMPLATES)}")
        has_chat_template = getattr(self.tokenizer, "chat_template", None) is not None
        if self.template == "chat" and self.tokenizer is not None and not has_chat_template:
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        for option in ("num_train", "num_validation", "num_test"):
            value = getattr(self, option)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{option} must be a positive integer or None, got {value!r}")
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"{len(self.reward_funcs)} reward functions but "
                f"{len(self.reward_weights)} reward weights"
            )
        if self.accuracy_reward not in self.reward_names:
            raise ValueError(f"accuracy reward {self.accuracy_reward!r} is not among the rewards")

    @property
    def reward_names(self) -> list[str]:
        """One distinct name per reward function, in order (see :func:`reward_names`)."""
        return reward_names(self.reward_funcs)

    # Hooks for subclasses.

    def convert(self, row: dict[str, Any], where: str) -> dict[str, Any] | None:
        """A raw (renamed) row to the task's columns; None skips it; ValueError if malformed."""
        raise NotImplementedError

    def generate(self, split: str, count: int) -> list[dict[str, Any]]:
        """``count`` rows of a generated split (tasks with ``default_sizes`` override this)."""
        raise NotImplementedError

    def plain_prompt(self, row: Mapping[str, Any]) -> str:
        """The prompt of the ``plain`` template (tiny models: no chat markup)."""
        raise NotImplementedError

    def plain_target(self, row: Mapping[str, Any]) -> str:
        """The reference completion under the ``plain`` template (SFT's target)."""
        raise NotImplementedError

    def instruction(self, row: Mapping[str, Any]) -> str:
        """The user message of the chat template (d1-style format instruction included)."""
        raise NotImplementedError

    def chat_target(self, row: Mapping[str, Any]) -> str:
        """The reference completion under the ``chat`` template, in the format asked for."""
        raise NotImplementedError

    # Data.

    def source_for(self, split: str) -> str:
        """Where ``split`` comes from: ``generated``, a file or a hub dataset name."""
        if isinstance(self.source, str):
            return self.source
        if split not in self.source:
            raise ValueError(f"no source for split {split!r}; sources given: {sorted(self.source)}")
        return self.source[split]

    def size(self, split: str) -> int | None:
        """The row cap (files, hub) or count (generated) of ``split``; None: all / default."""
        sizes = {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}
        return sizes.get(split)

    def rows(self, split: str) -> list[dict[str, Any]]:
        """The task columns of ``split`` (no prompt or target yet)."""
        source, limit = self.source_for(split), self.size(split)
        if source == GENERATED:
            if split not in self.default_sizes:
                known = ", ".join(self.default_sizes) or "none (set source to a file or hub name)"
                raise ValueError(
                    f"task {self.name!r} cannot generate split {split!r}; generated splits: {known}"
                )
            return self.generate(split, limit or self.default_sizes[split])
        field_map = {**self.default_field_map, **(self.field_map or {})}
        hub_split = (self.hub_splits or {}).get(split, split)
        rows: list[dict[str, Any]] = []
        for where, raw in read_rows(source, hub_split, self.hub_config):
            if limit is not None and len(rows) >= limit:
                break
            row = self.convert(rename(raw, field_map), where)
            if row is not None:
                rows.append(row)
        if not rows:
            raise ValueError(f"{source}: no usable rows for split {split!r}")
        return rows

    def dataset(self, split: str) -> datasets.Dataset:
        """Rows with ``prompt``, ``target`` and the task's columns, as a ``datasets.Dataset``."""
        rows = self.rows(split)
        return datasets.Dataset.from_list(
            [{**r, "prompt": self.format_prompt(r), "target": self.format_target(r)} for r in rows]
        )

    def format_prompt(self, row: Mapping[str, Any]) -> str:
        """The prompt text of ``row`` under this task's template."""
        if self.template == "plain":
            return self.plain_prompt(row)
        text = self.instruction(row)
        if self.tokenizer is None:
            return text
        messages = [{"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def format_target(self, row: Mapping[str, Any]) -> str:
        """The reference completion of ``row`` in the format the prompt asks for."""
        return self.plain_target(row) if self.template == "plain" else self.chat_target(row)

    # Rewards.

    def score(
        self, prompts: Sequence[str], completions: Sequence[Any], columns: Mapping[str, list[Any]]
    ) -> dict[str, list[float | None]]:
        """Every reward function's values by name; one that raises or returns the wrong number
        of values is logged and gives ``None`` for the batch."""
        scores: dict[str, list[float | None]] = {}
        for name, func in zip(self.reward_names, self.reward_funcs, strict=True):
            try:
                values = list(func(list(prompts), list(completions), **columns))
                if len(values) != len(completions):
                    raise ValueError(f"{len(values)} values for {len(completions)} completions")
            except Exception:  # reward code never kills training
                logger.warning("reward %s failed; its values are None", name, exc_info=True)
                values = [None] * len(completions)
            scores[name] = values
        return scores

    def weighted_sum(self, scores: Mapping[str, list[float | None]]) -> list[float | None]:
        """Per completion, the weighted sum of the rewards that are not None (TRL's nansum);
        None where every reward is None. A per-token reward counts as its sum."""
        totals: list[float | None] = []
        columns = [scores[name] for name in self.reward_names]
        for values in zip(*columns, strict=True):
            present = [
                w * reward_total(v)  # type: ignore[operator]
                for w, v in zip(self.reward_weights, values, strict=True)
                if v is not None
            ]
            totals.append(sum(present) if present else None)
        return totals


@dataclass(kw_only=True)
class WorkedSolutionTask(Task):
    """Shared templates of tasks whose rows hold a question, a worked ``solution`` and a final
    ``answer`` (GSM8K, MATH): the targets end in ``\\boxed{answer}``."""

    question_field: ClassVar[str]

    def plain_prompt(self, row: Mapping[str, Any]) -> str:
        return f"{row[self.question_field]}\n"

    def plain_target(self, row: Mapping[str, Any]) -> str:
        solution = row["solution"]
        if "\\boxed{" in solution:
            return solution
        final = f"The answer is \\boxed{{{row['answer']}}}"
        return f"{solution}\n{final}" if solution else final

    def instruction(self, row: Mapping[str, Any]) -> str:
        return (
            f"{row[self.question_field]}\n\nThink step by step inside <reasoning> </reasoning>. "
            "Then give the final answer as \\boxed{} inside <answer> </answer>."
        )

    def chat_target(self, row: Mapping[str, Any]) -> str:
        return answer_block(f"\\boxed{{{row['answer']}}}", reasoning=row["solution"] or None)
