"""The value model: trace steps of real views, values read where the policy reads logits,
save/load, and a value loss that goes down on a fixed batch (block and full layouts)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from tiny_rl import assert_same_weights
from unmask.models import from_preset
from unmask.objectives import get_objective
from unmask.objectives.value import ValueConfig, ValueModel, step_ranks, token_reward_vectors
from unmask.sampling import Sampler, SamplerConfig
from unmask.train.distributed import Parallel
from unmask.train.sharding import FSDPConfig
from unmask.train.update import UpdateGuard, Updater
from unmask.train.value_learner import ValueLearner, scored_values

PROMPTS = ["12", "hello there", "7", "abcd"]


def _rollout(model, **kw):
    config = {"gen_length": 8, "temperature": 1.0, "stop_at_eos": False, **kw}
    return Sampler(SamplerConfig(**config)).generate(model, PROMPTS, seed=0)


def _dense_ranks(rollout):
    out = torch.full_like(rollout.steps, -1)
    for b in range(rollout.batch_size):
        mask = rollout.completion_mask[b].bool()
        ids = torch.unique(rollout.steps[b][mask])
        out[b][mask] = torch.searchsorted(ids, rollout.steps[b][mask])
    return out


@pytest.mark.parametrize(
    ("model_name", "kw", "two_stream"),
    [
        ("block_model", {"steps_per_block": 2}, True),
        ("block_model", {"steps_per_block": 2}, False),
        ("full_model", {"block_length": 4, "steps_per_block": 3}, False),
    ],
)
def test_step_ranks_follow_the_trace(model_name, kw, two_stream, request):
    rollout = _rollout(request.getfixturevalue(model_name), **kw)
    views = get_objective("tracerl", two_stream=two_stream).views(rollout)
    ranks = step_ranks(views, rollout.steps)
    assert torch.equal(ranks, _dense_ranks(rollout))
    merged = step_ranks(get_objective("tracerl", shrink=2).views(rollout), rollout.steps)
    for b in range(rollout.batch_size):  # fewer steps, same order
        keep = ranks[b] >= 0
        assert merged[b].max() < ranks[b].max()
        order = torch.argsort(rollout.steps[b][keep])
        assert (merged[b][keep][order].diff() >= 0).all()


@pytest.fixture(scope="module")
def shifted_block_model():
    return from_preset("nano-block", seed=4, shift_logits=True).eval()


@pytest.mark.parametrize("model_name", ["block_model", "shifted_block_model"])
def test_values_do_not_depend_on_packing(model_name, request):
    """A token's value in a packed [clean | noisy] row equals its value in its own step's view."""
    policy = request.getfixturevalue(model_name)
    value = ValueModel.from_policy(policy).eval()
    rollout = _rollout(policy, steps_per_block=2)
    packed = get_objective("tracerl", two_stream=True).views(rollout)
    single = get_objective("tracerl", two_stream=False).views(rollout)
    with torch.no_grad():
        assert (scored_values(value, value, packed) == 0).all()  # zero-initialised head
        value.value_head.weight.normal_(0, 1.0)
        a = packed.per_token(torch.zeros(rollout.completion_ids.shape))
        got = {}
        for views in (packed, single):
            v = scored_values(value, value, views)
            rows = views.rollout_index[:, None].expand_as(views.scored)[views.scored]
            got[views.two_stream] = a.new_zeros(rollout.completion_ids.shape).index_put(
                (rows, views.completion_index[views.scored]), v[views.scored]
            )
    assert got[True].abs().sum() > 0
    torch.testing.assert_close(got[True], got[False], atol=1e-4, rtol=0)


def test_save_and_load(tmp_path, block_model):
    value = ValueModel.from_policy(block_model)
    with torch.no_grad():
        value.value_head.weight.normal_()
    value.save_pretrained(tmp_path / "value")
    loaded = ValueModel.from_pretrained(tmp_path / "value", dtype="float32", device="cpu")
    assert_same_weights(value, loaded)
    assert loaded.layout == "block" and loaded.mask_token_id == block_model.mask_token_id

    block_model.save_pretrained(tmp_path / "policy")  # a policy folder: new zero head
    fresh = ValueModel.from_pretrained(tmp_path / "policy", dtype="float32", device="cpu")
    assert (fresh.value_head.weight == 0).all()
    policy_state = block_model.model.base_model.state_dict()
    for name, tensor in fresh.model.state_dict().items():
        assert torch.equal(tensor, policy_state[name]), name


def _learner(policy, **kw):
    config = ValueConfig(enabled=True, lr=3e-3, **kw)
    core = ValueModel.from_policy(policy)
    optimizer = torch.optim.AdamW(core.parameters(), lr=config.lr)
    acc = Accelerator(cpu=True)
    updater = Updater(acc, Parallel(acc, FSDPConfig()), core, optimizer, UpdateGuard(acc, 3), 1.0)
    return ValueLearner(config, core, updater, 1, 16)


@pytest.mark.parametrize(
    ("model_name", "kw"),
    [("block_model", {"steps_per_block": 2}), ("full_model", {"block_length": 4})],
)
def test_value_loss_decreases_on_a_fixed_batch(model_name, kw, request):
    torch.manual_seed(0)
    policy = request.getfixturevalue(model_name)
    rollout = _rollout(policy, **kw)
    learner = _learner(policy, epsilon=None)
    views = learner.views(rollout)
    outcome = torch.tensor([1.0, -1.0, 0.5, 2.0])
    kept = torch.ones(4, dtype=torch.bool)
    first, _ = learner.step(views, rollout, outcome, None, kept, train=False)
    trained = rollout.completion_mask.bool()
    assert torch.equal(first[trained], outcome[:, None].expand_as(first)[trained])  # V = 0
    losses = [learner.step(views, rollout, outcome, None, kept, train=True)[1]["value_loss"]
              for _ in range(12)]  # fmt: skip
    assert losses[-1] < 0.35 * losses[0], losses
    _, metrics = learner.step(views, rollout, outcome, None, kept, train=False)
    assert metrics["value_explained_var"] > 0.5, metrics


def test_advantages_come_from_the_values_before_the_update(block_model):
    rollout = _rollout(block_model, steps_per_block=2)
    outcome, kept = torch.tensor([1.0, -1.0, 0.5, 2.0]), torch.ones(4, dtype=torch.bool)
    got = {}
    for train in (False, True):
        torch.manual_seed(0)
        learner = _learner(block_model, gamma=0.9, lam=0.8)
        with torch.no_grad():
            learner.core.value_head.weight.normal_()
        views = learner.views(rollout)
        before = learner.values(views)
        got[train], metrics = learner.step(views, rollout, outcome, None, kept, train=train)
        updated = not torch.equal(learner.values(views), before)
        assert updated == train == ("value_loss" in metrics)
    torch.testing.assert_close(got[True], got[False], atol=1e-5, rtol=0)


def test_value_clipping_engages_from_the_second_iteration(block_model):
    rollout = _rollout(block_model, steps_per_block=2)
    kept = torch.ones(4, dtype=torch.bool)
    ratios = {}
    for epsilon in (0.05, None):
        learner = _learner(block_model, epsilon=epsilon, iterations=3)
        views = learner.views(rollout)
        _, metrics = learner.step(views, rollout, torch.full((4,), 5.0), None, kept, train=True)
        ratios[epsilon] = metrics["value_clip_ratio"]
    assert 0 < ratios[0.05] < 1 and ratios[None] == 0


def good(prompts, completions, completion_ids, **_):
    return [[0.1] * len(ids) for ids in completion_ids]


def partly(prompts, completions, completion_ids, **_):
    return [None, [1.0], [float("nan")] * len(completion_ids[2]), [0.0] * len(completion_ids[3])]


def broken(prompts, completions, completion_ids, **_):
    raise RuntimeError("judge down")


def test_token_reward_vectors(block_model, caplog):
    rollout = _rollout(block_model)
    texts = rollout.completion_texts(block_model.tokenizer)
    mask = rollout.completion_mask.bool()
    values, ok = token_reward_vectors(good, PROMPTS, texts, rollout, {})
    assert ok.all() and torch.equal(values, torch.where(mask, 0.1, 0.0))
    _, ok = token_reward_vectors(partly, PROMPTS, texts, rollout, {})
    assert ok.tolist() == [False, False, False, True]
    _, ok = token_reward_vectors(broken, PROMPTS, texts, rollout, {})
    assert not ok.any() and "judge down" in caplog.text


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"gamma": 1.5}, "gamma"),
        ({"lam": -0.1}, "lam"),
        ({"train_every": 0}, "train_every"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"token_reward": "no_colon"}, "token_reward"),
        ({"reward": "sum"}, "reward"),
    ],
)
def test_bad_value_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"value_model.{field}"):
        ValueConfig(enabled=True, **kw)
