"""The trace page: its data matches the rollout, and it replays in headless Chromium."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch

from unmask.sampling import Sampler, SamplerConfig
from unmask.viz.trace_html import (
    LOGPROB_NOTE,
    NO_CONFIDENCE_NOTE,
    REPLAY_NOTE,
    replay_confidences,
    trace_data,
    write_trace_html,
)

PROMPTS = ["12 34\n", "12 34\n", "9", "</script><b>x</b>"]


@pytest.fixture(scope="module")
def sampled(block_model):
    config = SamplerConfig(gen_length=12, temperature=1.0, return_logprobs=True)
    return Sampler(config).generate(block_model, PROMPTS, seed=5)


@pytest.mark.parametrize("cache", ["kv", "none"])
def test_replayed_confidence_is_the_samplers_probability(block_model, cache):
    config = SamplerConfig(gen_length=12, temperature=1.0, return_logprobs=True, cache=cache)
    rollout = Sampler(config).generate(block_model, PROMPTS, seed=2)
    conf = replay_confidences(block_model, rollout, micro_batch_size=5)
    scored = rollout.completion_mask
    torch.testing.assert_close(conf[scored], rollout.logprobs.exp()[scored], atol=1e-5, rtol=1e-4)
    assert conf[~scored].isnan().all()
    some = replay_confidences(block_model, rollout, rows=[3, 1])  # only the rows shown
    torch.testing.assert_close(some[[1, 3]], conf[[1, 3]])
    assert some[[0, 2]].isnan().all()


def test_greedy_rollouts_get_confidence_only_by_replay(full_model):
    config = SamplerConfig(gen_length=8, block_length=4, return_logprobs=True)  # greedy: all 0
    rollout = Sampler(config).generate(full_model, ["ab", "c"])
    data = trace_data(rollout, full_model.tokenizer)
    assert data["confidence_note"] == NO_CONFIDENCE_NOTE
    assert all(t["c"] is None for row in data["rows"] for t in row["tokens"])
    conf = replay_confidences(full_model, rollout)
    data = trace_data(rollout, full_model.tokenizer, confidences=conf)
    assert data["confidence_note"] == REPLAY_NOTE
    for row in data["rows"]:
        assert all(0 < t["c"] <= 1 for t in row["tokens"] if t["k"] == "c")


def test_page_data_follows_the_rollout(sampled, block_model):
    tok = block_model.tokenizer
    parts = {"correct": [1.0, 0.0, None, 0.5], "format": [0.1, 0.2, 0.3, float("nan")]}
    data = trace_data(sampled, tok, reward_parts=parts, rows=[1, 3], labels=["a", "b"])
    assert data["confidence_note"] == LOGPROB_NOTE
    assert data["block_length"] == block_model.block_size
    assert [r["label"] for r in data["rows"]] == ["a", "b"]
    assert data["rows"][1]["rewards"] == {"correct": 0.5, "format": None}
    assert data["max_steps"] == int(sampled.num_steps[[1, 3]].max())
    row = data["rows"][0]
    assert [t["s"] for t in row["tokens"]] == sampled.steps[1].tolist()
    kept = [t["t"] for t in row["tokens"] if t["k"] == "c"]
    assert "".join(kept) == sampled.completion_texts(tok, skip_special_tokens=False)[1]
    # Block ids count from the first block holding completion tokens, one per block_length.
    origin = int(sampled.block_origins()[1])
    plen = int(sampled.prompt_lengths[1])
    b = block_model.block_size
    assert [t["b"] for t in row["tokens"]] == [(plen + j - origin) // b for j in range(12)]
    conf = [t["c"] for t in row["tokens"] if t["k"] == "c"]
    assert conf == pytest.approx(sampled.logprobs[1].exp()[: len(conf)].tolist(), abs=1e-4)


def test_bad_arguments_name_the_field(sampled, block_model):
    tok = block_model.tokenizer
    with pytest.raises(ValueError, match="rows"):
        trace_data(sampled, tok, rows=[4])
    with pytest.raises(ValueError, match="rewards: 1 values for 4"):
        trace_data(sampled, tok, rewards=[1.0])
    with pytest.raises(ValueError, match=r"reward_parts\['ok'\]"):
        trace_data(sampled, tok, reward_parts={"ok": [1.0] * 3})
    with pytest.raises(ValueError, match="confidences"):
        trace_data(sampled, tok, confidences=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="labels"):
        trace_data(sampled, tok, rows=[0], labels=["a", "b"])


def test_page_is_self_contained_and_escapes_text(sampled, block_model, tmp_path):
    path = write_trace_html(sampled, block_model.tokenizer, tmp_path / "t.html", title="<T>")
    page = path.read_text()
    assert not re.search(r"(src|href)\s*=|https?://|@import|<link", page)
    assert page.count("</script>") == 2  # the prompt's "</script>" cannot end the data block
    assert "<title>&lt;T&gt;</title>" in page


def _browser():
    """Headless Chromium driven by Debian's chromium-driver, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "headless browser test needs Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; scripts/setup.sh does it as root)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=driver_path)
    return webdriver.Chrome(options=options, service=service)


def test_page_replays_in_headless_chromium(sampled, block_model, tmp_path):
    from selenium.webdriver.common.by import By

    tok = block_model.tokenizer
    rewards = [0.25, 1.0, None, 0.0]
    path = write_trace_html(sampled, tok, tmp_path / "trace.html", rewards=rewards)
    browser = _browser()
    try:
        browser.get(path.resolve().as_uri())
        label = browser.find_element(By.ID, "step-label")
        cards = browser.find_elements(By.CSS_SELECTOR, "section.row")
        assert len(cards) == len(PROMPTS)  # the rows side by side
        total = int(sampled.num_steps.max())
        assert label.text == f"step 0 / {total}"
        assert browser.find_elements(By.CSS_SELECTOR, "#rows .tok.masked")
        assert not browser.find_elements(By.CSS_SELECTOR, "#rows .tok.new")
        assert "reward 0.250" in cards[0].text and "reward unscored" in cards[2].text
        before = cards[0].screenshot_as_png

        browser.find_element(By.ID, "next").click()
        assert label.text == f"step 1 / {total}"
        new = browser.find_elements(By.CSS_SELECTOR, "#rows .tok.new")
        assert len(new) == int((sampled.steps == 0).sum())  # what step 0 unmasked, every row
        assert browser.find_elements(By.CSS_SELECTOR, ".block.current")
        for step in range(2, total + 1):
            browser.find_element(By.ID, "next").click()
            assert label.text.startswith(f"step {step} / {total}")
        assert label.text.endswith("(final)")
        browser.find_element(By.ID, "next").click()  # past the end: stays on the last step
        assert label.text == f"step {total} / {total} (final)"
        assert not browser.find_elements(By.CSS_SELECTOR, "#rows .tok.masked")

        completions = sampled.completion_texts(tok, skip_special_tokens=False)
        for card, text in zip(cards, completions, strict=True):
            spans = card.find_elements(By.CSS_SELECTOR, ".tok:not(.posteos)")
            shown = "".join(s.get_attribute("textContent") for s in spans)
            assert shown == text.replace("\n", "\u21b5")
        conf = sampled.logprobs[0, 0].exp().item()
        title = cards[0].find_element(By.CSS_SELECTOR, ".tok").get_attribute("title")
        assert f"confidence {conf:.3f}" in title

        after = cards[0].screenshot_as_png
        shot = tmp_path / "final.png"
        assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] > 500 and pixels.std() > 0.05
    assert after != before  # the card now shows the decoded tokens, not masks
    assert not math.isnan(conf)
