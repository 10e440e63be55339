"""A self-contained HTML page that replays rollouts step by step.

The page shows several rollouts (typically one GRPO group) side by side and one step slider:
at step ``s`` every token unmasked in the row's first ``s`` denoising steps is shown, the ones
of step ``s`` highlighted, with its confidence as colour, the block boundaries as boxes, and
each row's reward. Everything (data, style, script) is inline: the file opens offline and can
be mailed or attached to a report.

Confidence is, by preference, :func:`replay_confidences`: the probability the model gave the
chosen token in the state it was unmasked from, recomputed by replaying the trace (the
``low_confidence`` remasking score; works for greedy rollouts too). Without a model, a rollout
sampled with ``return_logprobs`` and temperature > 0 gives ``exp(logprob)`` of the token under
the sampling distribution (temperature, top-k/top-p applied). The page says which it shows.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from unmask.models.attention import block_index
from unmask.models.diffusion_lm import DiffusionLM
from unmask.sampling.rollout import Rollout

REPLAY_NOTE = (
    "confidence: probability the model gave the chosen token in the state it was unmasked "
    "from (untempered; recomputed by replaying the trace)"
)
LOGPROB_NOTE = (
    "confidence: exp(log-prob) of the sampled token under the sampling distribution "
    "(temperature, top-k/top-p applied), as recorded by the sampler"
)
NO_CONFIDENCE_NOTE = (
    "no confidence recorded (greedy rollout without a model to replay it: pass confidences="
    "replay_confidences(model, rollout))"
)

Values = Sequence[float | None]


@torch.no_grad()
def replay_confidences(
    model: DiffusionLM,
    rollout: Rollout,
    rows: Sequence[int] | None = None,
    micro_batch_size: int = 64,
) -> torch.Tensor:
    """``[B, G]``: the model's probability of each completion token at the step it was unmasked.

    One TraceRL view per denoising step rebuilds the exact state the sampler saw, so for the
    exact caches (``kv``, ``none``) this equals the sampler's untempered probability (the
    ``low_confidence`` score). Costs one forward per step and row, so only ``rows`` (default:
    all) are replayed. NaN where nothing is scored: never decoded, after the EOS, other rows.
    """
    from unmask.objectives.base import token_logprobs
    from unmask.objectives.tracerl import TraceRL

    picked = torch.arange(rollout.batch_size) if rows is None else torch.tensor(list(rows))
    views = TraceRL(selection="ignore").views(_select(rollout, picked).to(model.device))
    logp = token_logprobs(model, views, micro_batch_size, temperature=1.0)
    assert isinstance(logp, torch.Tensor)
    out = torch.full(rollout.completion_ids.shape, math.nan)
    r, c = views.scored.nonzero(as_tuple=True)
    source = picked[views.rollout_index[r].cpu()]
    out[source, views.completion_index[r, c].cpu()] = logp[r, c].float().exp().cpu()
    return out


def trace_data(
    rollout: Rollout,
    tokenizer: PreTrainedTokenizerBase,
    rewards: Values | None = None,
    reward_parts: Mapping[str, Values] | None = None,
    rows: Sequence[int] | None = None,
    confidences: torch.Tensor | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The JSON the page renders (see :func:`write_trace_html` for the arguments)."""
    batch = rollout.batch_size
    rows = list(range(batch)) if rows is None else [int(r) for r in rows]
    if not rows:
        raise ValueError("rows: give at least one rollout row to show")
    bad = [r for r in rows if not 0 <= r < batch]
    if bad:
        raise ValueError(f"rows: {bad} out of range for a rollout of {batch} rows")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"labels: {len(labels)} labels for {len(rows)} rows")
    named = {"rewards": rewards} if rewards is not None else {}
    named.update({f"reward_parts[{k!r}]": v for k, v in (reward_parts or {}).items()})
    for name, values in named.items():
        if len(values) != batch:
            raise ValueError(f"{name}: {len(values)} values for {batch} rollout rows")
    totals = None if rewards is None else [_number(v) for v in rewards]
    parts = {k: [_number(v) for v in values] for k, values in (reward_parts or {}).items()}
    conf, note = _confidences(rollout, confidences)
    gen = rollout.completion_ids.shape[1]
    positions = rollout.prompt_lengths.cpu()[:, None] + torch.arange(gen)[None, :]
    blocks = block_index(positions.cpu(), rollout.block_origins().cpu(), rollout.block_length)
    prompts = rollout.prompt_texts(tokenizer)
    out_rows = []
    for i, r in enumerate(rows):
        ids = rollout.completion_ids[r].tolist()
        steps = rollout.steps[r].tolist()
        keep = rollout.completion_mask[r].tolist()
        tokens = []
        for j, (tok, step) in enumerate(zip(ids, steps, strict=True)):
            kind = "c" if keep[j] else ("e" if step >= 0 else "n")
            c = None if conf is None else float(conf[r, j])
            tokens.append(
                {
                    "t": tokenizer.decode([tok], skip_special_tokens=False) if step >= 0 else "",
                    "s": step,
                    "b": int(blocks[r, j]),
                    "c": None if c is None or math.isnan(c) else round(c, 4),
                    "k": kind,
                }
            )
        out_row = {
            "label": labels[i] if labels is not None else f"rollout {r}",
            "prompt": prompts[r],
            "rewards": {name: values[r] for name, values in parts.items()},
            "num_steps": int(rollout.num_steps[r]),
            "tokens": tokens,
        }
        if totals is not None:
            out_row["reward"] = totals[r]  # None: the reward could not score this completion
        out_rows.append(out_row)
    return {
        "block_length": rollout.block_length,
        "max_steps": max(row["num_steps"] for row in out_rows),
        "confidence_note": note,
        "rows": out_rows,
    }


def write_trace_html(
    rollout: Rollout,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    rewards: Values | None = None,
    reward_parts: Mapping[str, Values] | None = None,
    rows: Sequence[int] | None = None,
    confidences: torch.Tensor | None = None,
    labels: Sequence[str] | None = None,
    title: str = "unmask trace",
) -> Path:
    """Write the trace page of ``rollout`` rows ``rows`` (default: all) to ``path``.

    ``rewards``: the total reward of each rollout row (None: unscored); ``reward_parts``: named
    per-function values (``{"correct": [...], "format": [...]}``). ``confidences`` ``[B, G]``
    (NaN = none), e.g. from :func:`replay_confidences`; otherwise the sampler's log-probs are
    used when it recorded them. ``labels`` names the shown rows.
    """
    data = trace_data(rollout, tokenizer, rewards, reward_parts, rows, confidences, labels)
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    page = (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__STYLE__", _STYLE)
        .replace("__SCRIPT__", _SCRIPT)
        .replace("__DATA__", payload)
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _select(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout's rows ``rows`` (every per-row tensor indexed; nfe is the batch's)."""
    picked = {
        f.name: getattr(rollout, f.name)[rows.to(rollout.completion_ids.device)]
        for f in fields(rollout)
        if isinstance(getattr(rollout, f.name), torch.Tensor)
    }
    return replace(rollout, **picked)


def _confidences(
    rollout: Rollout, confidences: torch.Tensor | None
) -> tuple[torch.Tensor | None, str]:
    if confidences is not None:
        if tuple(confidences.shape) != tuple(rollout.completion_ids.shape):
            raise ValueError(
                f"confidences: shape {tuple(confidences.shape)}, expected "
                f"{tuple(rollout.completion_ids.shape)} (one per completion token)"
            )
        return confidences.detach().float().cpu(), REPLAY_NOTE
    decoded = rollout.steps >= 0
    if rollout.logprobs is not None and bool((rollout.logprobs[decoded] != 0).any()):
        # A greedy sampler records log-prob 0 everywhere: that is no confidence at all.
        conf = rollout.logprobs.detach().float().exp().cpu()
        return conf.masked_fill(~decoded.cpu(), math.nan), LOGPROB_NOTE
    return None, NO_CONFIDENCE_NOTE


def _number(value: float | None) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__STYLE__</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <div class="controls">
    <button id="first" title="first step (Home)">|&#x25C0;</button>
    <button id="prev" title="previous step (Left)">&#x25C0;</button>
    <button id="play" title="play / pause (Space)">play</button>
    <button id="next" title="next step (Right)">&#x25B6;</button>
    <button id="last" title="last step (End)">&#x25B6;|</button>
    <input id="slider" type="range" min="0" value="0" aria-label="step">
    <span id="step-label"></span>
  </div>
  <p class="legend">
    <span class="tok masked">&#x2588;</span> still masked
    <span class="tok new">a</span> unmasked at this step
    <span class="tok posteos">a</span> decoded after the EOS (not in the completion)
    &nbsp;|&nbsp; colour: confidence from <span class="swatch low"></span> low to
    <span class="swatch high"></span> high &nbsp;|&nbsp; boxes: blocks
    <br><span id="confidence-note"></span>
  </p>
</header>
<main id="rows"></main>
<script type="application/json" id="trace-data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; background: #fafafa; color: #222; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd;
         padding: 8px 16px; z-index: 1; }
h1 { font-size: 18px; margin: 4px 0; }
.controls { display: flex; align-items: center; gap: 6px; }
.controls button { min-width: 36px; height: 28px; }
#slider { flex: 1; max-width: 480px; }
#step-label { font-variant-numeric: tabular-nums; min-width: 12em; }
.legend { font-size: 12px; color: #555; margin: 6px 0 0; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; }
.swatch.low { background: hsl(0, 75%, 80%); } .swatch.high { background: hsl(120, 60%, 75%); }
#rows { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr));
        gap: 12px; padding: 12px 16px; }
.row { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; }
.row h2 { font-size: 14px; margin: 0 0 4px; display: flex; justify-content: space-between; }
.reward { font-weight: normal; font-variant-numeric: tabular-nums; }
.meta { font-size: 12px; color: #666; margin-bottom: 6px; }
details { font-size: 12px; margin-bottom: 6px; }
details pre { white-space: pre-wrap; background: #f3f3f3; padding: 4px; margin: 4px 0; }
.tokens { font-family: ui-monospace, monospace; font-size: 14px; line-height: 1.9; }
.block { border: 1px dashed #aaa; border-radius: 3px; padding: 1px 2px; margin: 0 2px 0 0; }
.block.current { border: 1px solid #3367d6; background: #eef3fd; }
.tok { white-space: pre; border-radius: 2px; padding: 0 1px; }
.tok.masked { color: #bbb; }
.tok.new { outline: 2px solid #3367d6; font-weight: bold; }
.tok.posteos { color: #999; text-decoration: line-through; }
"""

_SCRIPT = """
"use strict";
const data = JSON.parse(document.getElementById("trace-data").textContent);
const slider = document.getElementById("slider");
const label = document.getElementById("step-label");
document.getElementById("confidence-note").textContent = data.confidence_note;
slider.max = data.max_steps;
const views = [];
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v) { return v === null ? "unscored" : Number(v).toFixed(3); }
for (const row of data.rows) {
  const card = el("section", "row");
  const head = el("h2", null, row.label);
  if ("reward" in row) head.appendChild(el("span", "reward", "reward " + fmt(row.reward)));
  card.appendChild(head);
  const parts = Object.entries(row.rewards).map(([k, v]) => k + " " + fmt(v)).join(", ");
  card.appendChild(el("div", "meta", row.num_steps + " steps, " +
    row.tokens.filter(t => t.k === "c").length + " tokens" + (parts ? " | " + parts : "")));
  const details = el("details");
  details.appendChild(el("summary", null, "prompt"));
  details.appendChild(el("pre", null, row.prompt));
  card.appendChild(details);
  const box = el("div", "tokens");
  const blocks = new Map();
  const cells = [];
  for (const tok of row.tokens) {
    if (tok.k === "n") continue;  // never decoded: generation stopped at an EOS before it
    if (!blocks.has(tok.b)) {
      const b = el("span", "block");
      b.dataset.block = tok.b;
      blocks.set(tok.b, b);
      box.appendChild(b);
    }
    const span = el("span", "tok");
    const shown = tok.t.replace(/\\n/g, "\\u21B5");
    span.title = JSON.stringify(tok.t) + "  step " + tok.s + "  block " + tok.b +
      (tok.c === null ? "" : "  confidence " + tok.c.toFixed(3));
    blocks.get(tok.b).appendChild(span);
    cells.push({tok, span, shown});
    if (tok.t.includes("\\n")) blocks.get(tok.b).appendChild(el("br"));
  }
  card.appendChild(box);
  document.getElementById("rows").appendChild(card);
  views.push({row, cells, blocks});
}
function render(step) {
  step = Math.max(0, Math.min(data.max_steps, step));
  slider.value = step;
  label.textContent = "step " + step + " / " + data.max_steps +
    (step === data.max_steps ? " (final)" : "");
  for (const view of views) {
    let current = null;
    for (const {tok, span, shown} of view.cells) {
      const done = tok.s < step;
      span.textContent = done ? shown : "\\u2588";
      span.className = "tok" + (done ? (tok.k === "e" ? " posteos" : "") : " masked") +
        (tok.s === step - 1 ? " new" : "");
      span.style.background = done && tok.c !== null
        ? "hsl(" + Math.round(120 * tok.c) + ", 65%, " + (80 - 5 * tok.c) + "%)" : "";
      if (tok.s === step - 1) current = tok.b;
    }
    for (const [b, node] of view.blocks) node.classList.toggle("current", b === current);
  }
  document.body.dataset.step = step;
}
let timer = null;
function stop() { clearInterval(timer); timer = null;
                  document.getElementById("play").textContent = "play"; }
function play() {
  if (timer !== null) { stop(); return; }
  if (Number(slider.value) >= data.max_steps) render(0);
  document.getElementById("play").textContent = "pause";
  timer = setInterval(() => {
    const s = Number(slider.value) + 1;
    render(s);
    if (s >= data.max_steps) stop();
  }, 400);
}
const go = (d) => () => { stop(); render(Number(slider.value) + d); };
document.getElementById("first").onclick = () => { stop(); render(0); };
document.getElementById("prev").onclick = go(-1);
document.getElementById("next").onclick = go(1);
document.getElementById("last").onclick = () => { stop(); render(data.max_steps); };
document.getElementById("play").onclick = play;
slider.oninput = () => { stop(); render(Number(slider.value)); };
document.addEventListener("keydown", (e) => {
  const keys = {ArrowRight: "next", ArrowLeft: "prev", Home: "first", End: "last"};
  if (keys[e.key]) { document.getElementById(keys[e.key]).click(); e.preventDefault(); }
  else if (e.key === " ") { play(); e.preventDefault(); }
});
render(0);
"""
