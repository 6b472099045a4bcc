"""Speculative decoding (llama/core/speculative.py) against plain decoding with the target alone.

- Greedy: with hypothesis, the output equals llama.generate(target, ..., temperature=0) token for
  token (stop tokens, max_new_tokens, draft_tokens 1..6) for three drafts: an unrelated random model
  (acceptance near 0), a slightly perturbed copy of the target (acceptance about 0.65) and an exact
  copy (acceptance 1). The target's weights are normal(0, 0.3), which makes its logits peaked, so no
  argmax is close enough to a tie for float32 rounding (chunked vs one-token forwards) to flip it.
- Sampling: the empirical distribution of the first two tokens over many seeds against the target's
  exact distribution (chi-square), with and without sampling filters; determinism for a seed.
- Statistics, log-probabilities, cache clean-up and request checks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama import GenerationError, ModelConfig, Transformer, generate
from llama.core.generation import SamplingParams, filter_logits
from llama.core.speculative import SpeculativeStats, speculative_generate, speculative_stream

from random_models import random_model

HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TARGET = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=17, ffn_dim=64, max_seq_len=64)
DRAFT = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=17, ffn_dim=32, max_seq_len=64)


def perturbed(model: Transformer, seed: int, std: float) -> Transformer:
    """A copy of `model` with normal(0, std) noise added to every matrix."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machines running the tests are shared, and these models are tiny: one thread is several
    times faster than two fighting over a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return random_model(TARGET, seed=0)


@pytest.fixture(scope="module")
def drafts(target):
    return {
        "random": random_model(DRAFT, seed=1),
        "perturbed": perturbed(target, seed=2, std=0.01),
        "copy": copy.deepcopy(target),
    }


# ---- greedy: exactly the target's greedy output ---------------------------------------------------


@HYPOTHESIS
@given(
    kind=st.sampled_from(["random", "perturbed", "copy"]),
    prompt=st.lists(st.integers(0, TARGET.vocab_size - 1), min_size=1, max_size=10),
    max_new_tokens=st.integers(0, 30),
    draft_tokens=st.integers(1, 6),
    stop_tokens=st.lists(st.integers(0, TARGET.vocab_size - 1), max_size=2),
)
def test_greedy_equals_plain_greedy(target, drafts, kind, prompt, max_new_tokens, draft_tokens, stop_tokens):
    expected, expected_logprobs = generate(target, [prompt], max_new_tokens, temperature=0, stop_tokens=stop_tokens,
                                           logprobs=True)  # fmt: skip
    stats = SpeculativeStats()
    steps = list(speculative_stream(target, drafts[kind], prompt, max_new_tokens, draft_tokens=draft_tokens,
                                    temperature=0, stop_tokens=stop_tokens, stats=stats))  # fmt: skip
    tokens = [t for step in steps for t in step]
    assert [t.id for t in tokens] == expected[0]
    torch.testing.assert_close(torch.tensor([t.logprob for t in tokens]), torch.tensor(expected_logprobs[0]),
                               rtol=0, atol=1e-4)  # fmt: skip
    assert all(t.row == 0 for t in tokens)
    assert all(1 <= len(step) <= draft_tokens + 1 for step in steps)
    assert len(steps) <= stats.target_forwards, "at most one yield per target forward"
    assert stats.new_tokens == len(tokens)
    assert 0 <= stats.accepted <= stats.proposed <= draft_tokens * stats.target_forwards
    assert stats.draft_forwards == stats.proposed
    if kind == "copy" and stats.proposed:
        assert stats.acceptance_rate == 1.0
    assert target.cache_size is None and drafts[kind].cache_size is None


@pytest.mark.parametrize("draft_tokens", [1, 2, 3, 4, 5, 6])
def test_a_perfect_draft_needs_one_target_forward_per_k_plus_one_tokens(target, drafts, draft_tokens):
    stats = SpeculativeStats()
    out = speculative_generate(target, drafts["copy"], [3, 1, 4], 30, draft_tokens=draft_tokens, temperature=0,
                               stop_tokens=[], stats=stats)  # fmt: skip
    assert out == generate(target, [[3, 1, 4]], 30, temperature=0, stop_tokens=[])[0]
    # Every round settles draft_tokens + 1 tokens, except the last, which is cut to what is left.
    assert stats.target_forwards == math.ceil(30 / (draft_tokens + 1))
    assert stats.acceptance_rate == 1.0
    assert stats.tokens_per_target_forward == 30 / stats.target_forwards


def test_an_unrelated_draft_still_gives_the_target_output(target, drafts):
    stats = SpeculativeStats()
    out = speculative_generate(target, drafts["random"], [5, 9], 30, draft_tokens=4, temperature=0, stop_tokens=[],
                               stats=stats)  # fmt: skip
    assert out == generate(target, [[5, 9]], 30, temperature=0, stop_tokens=[])[0]
    assert stats.acceptance_rate < 0.2 and stats.target_forwards >= 24  # almost one forward per token


def test_stats_accumulate_and_start_empty():
    stats = SpeculativeStats()
    assert math.isnan(stats.acceptance_rate) and math.isnan(stats.tokens_per_target_forward)
    stats.proposed, stats.accepted, stats.new_tokens, stats.target_forwards = 8, 6, 9, 3
    assert stats.acceptance_rate == 0.75 and stats.tokens_per_target_forward == 3.0


def test_stop_tokens_none_means_the_targets_own(target, drafts):
    full = generate(target, [[2, 7]], 20, temperature=0, stop_tokens=[])[0]
    target.stop_tokens = (full[5],)
    try:
        out = speculative_generate(target, drafts["perturbed"], [2, 7], 20, temperature=0)
    finally:
        del target.stop_tokens
    assert out == full[: full.index(full[5])]


def test_cache_is_removed_when_the_stream_is_closed_early(target, drafts):
    it = speculative_stream(target, drafts["random"], [1, 2], 20, temperature=0, stop_tokens=[])
    next(it)
    assert target.cache_size is not None and drafts["random"].cache_size is not None
    it.close()
    assert target.cache_size is None and drafts["random"].cache_size is None


# ---- sampling: the target's distribution ------------------------------------------------------------
#
# A vocabulary of 4 gives 16 outcomes for the first two tokens. The draft is an unrelated random model,
# so it proposes from a distribution far from the target's and the rejection step does real work.
# Pearson's chi-square against the exact distribution: outcomes expected fewer than 5 times are pooled
# into one bin (the usual rule for the chi-square approximation), df = bins - 1, and the test fails
# above the 0.999 quantile (Wilson-Hilferty approximation; the seeds are fixed, so the outcome is
# too). Power: drafts accepted blindly would give the draft's distribution, whose expected statistic
# N * sum (q - p)^2 / p over the same bins is checked to be many times the threshold. (Three broken
# variants were tried by hand and all fail here: accepting every draft token, resampling from p instead
# of max(0, p - q) after a rejection, and accepting with min(1, q/p).)

TINY_TARGET = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=4, ffn_dim=32, max_seq_len=16)
TINY_DRAFT = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=4, ffn_dim=16, max_seq_len=16)
PROMPT = [1, 2]
N_SAMPLES = 1000


def exact_two_token_distribution(model: Transformer, sampling: dict) -> torch.Tensor:
    """P(x1, x2 | PROMPT): (V, V) float64, from full forwards with the same filters as sampling."""
    params = SamplingParams(**sampling)
    V = model.config.vocab_size

    def next_dist(ids):
        with torch.inference_mode():
            logits = model(torch.tensor([ids]))[:, -1]  # (1, V)
        return filter_logits(logits, params).softmax(-1)[0].double()  # (V,)

    first = next_dist(PROMPT)
    return torch.stack([first[x] * next_dist(PROMPT + [x]) for x in range(V)])  # (V, V)


def chi_square_limit(df: int, z: float = 3.0902) -> float:
    """The upper 0.999 quantile of chi-square(df) by Wilson and Hilferty's cube-root approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "sampling", [dict(temperature=1.0, top_p=1.0), dict(temperature=0.7, top_p=0.9, top_k=3)], ids=["plain", "filtered"]
)
def test_sampled_tokens_follow_the_targets_distribution(sampling):
    target = random_model(TINY_TARGET, seed=10, std=0.5)
    draft = random_model(TINY_DRAFT, seed=11, std=0.5)
    V = TINY_TARGET.vocab_size
    p = exact_two_token_distribution(target, sampling).flatten()  # (V*V,)
    q = exact_two_token_distribution(draft, sampling).flatten()
    counts = Counter()
    for seed in range(N_SAMPLES):
        # draft_tokens=2 with 3 new tokens: both of the first two tokens can come from draft proposals.
        out = speculative_generate(target, draft, PROMPT, 3, draft_tokens=2, seed=seed, stop_tokens=[], **sampling)
        counts[out[0] * V + out[1]] += 1
    observed = torch.tensor([counts[i] for i in range(V * V)], dtype=torch.float64)
    assert observed[p == 0].sum() == 0, "a token the filters exclude was emitted"
    big = N_SAMPLES * p >= 5
    pooled = p[~big].sum() > 0  # no bin for outcomes that cannot happen at all (checked just above)

    def bins(dist):  # the outcomes expected at least 5 times, then all the others pooled
        return torch.cat([dist[big], dist[~big].sum()[None]]) if pooled else dist[big]

    expected = N_SAMPLES * bins(p)
    chi2 = float(((bins(observed) - expected) ** 2 / expected).sum())
    limit = chi_square_limit(len(expected) - 1)
    assert chi2 < limit, f"chi-square {chi2:.1f} >= {limit:.1f}: observed {observed.tolist()}, p {p.tolist()}"
    blind = float(((N_SAMPLES * bins(q) - expected) ** 2 / expected).sum())
    assert blind > 10 * limit


def test_a_seed_makes_sampling_deterministic(target, drafts):
    kwargs = dict(temperature=1.0, top_p=0.95, stop_tokens=[], draft_tokens=3)
    a = speculative_generate(target, drafts["perturbed"], [4, 4, 8], 25, seed=123, **kwargs)
    b = speculative_generate(target, drafts["perturbed"], [4, 4, 8], 25, seed=123, **kwargs)
    c = speculative_generate(target, drafts["perturbed"], [4, 4, 8], 25, seed=124, **kwargs)
    assert a == b and len(a) == 25
    assert a != c
    assert a != speculative_generate(target, drafts["perturbed"], [4, 4, 8], 25, temperature=0, stop_tokens=[])


def test_sampled_logprobs_are_the_targets_log_softmax(target, drafts):
    prompt = [6, 0, 13]
    steps = speculative_stream(target, drafts["perturbed"], prompt, 20, temperature=0.8, top_k=8, seed=7, stop_tokens=[])
    out = [t for step in steps for t in step]
    with torch.inference_mode():
        full = torch.log_softmax(target(torch.tensor([prompt + [t.id for t in out]])), dim=-1)[0]  # (T, V)
    ref = full[torch.arange(len(prompt) - 1, len(prompt) - 1 + len(out)), torch.tensor([t.id for t in out])]
    torch.testing.assert_close(torch.tensor([t.logprob for t in out]), ref, rtol=0, atol=1e-4)


# ---- request checks ------------------------------------------------------------------------------------


def test_vocabularies_must_agree(target):
    other = random_model(ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=19, ffn_dim=32), seed=0)
    with pytest.raises(GenerationError, match=r"draft's vocabulary \(19 tokens\) differs from the target's \(17\)"):
        speculative_stream(target, other, [1, 2], 5)


def test_the_draft_must_be_another_object(target):
    with pytest.raises(GenerationError, match="separate model object"):
        speculative_stream(target, target, [1, 2], 5)


def test_models_must_share_a_device(target):
    with torch.device("meta"):
        elsewhere = Transformer(DRAFT)
    with pytest.raises(GenerationError, match="target is on cpu and the draft on meta"):
        speculative_stream(target, elsewhere, [1, 2], 5)


@pytest.mark.parametrize("draft_tokens", [0, -1, 1.5, True, None])
def test_invalid_draft_tokens(target, drafts, draft_tokens):
    with pytest.raises(GenerationError, match=f"draft_tokens must be a positive integer, got {draft_tokens}"):
        speculative_stream(target, drafts["random"], [1, 2], 5, draft_tokens=draft_tokens)


@pytest.mark.parametrize("max_new_tokens", [-1, 1.5, True])
def test_invalid_max_new_tokens(target, drafts, max_new_tokens):
    with pytest.raises(GenerationError, match="max_new_tokens"):
        speculative_stream(target, drafts["random"], [1, 2], max_new_tokens)


def test_prompts_and_sampling_values_are_checked_like_stream(target, drafts):
    draft = drafts["random"]
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        speculative_stream(target, draft, [], 5)
    with pytest.raises(GenerationError, match=r"outside the vocabulary \[0, 17\): \[17\]"):
        speculative_stream(target, draft, [1, 17], 5)
    with pytest.raises(GenerationError, match="temperature must be >= 0, got -1"):
        speculative_stream(target, draft, [1, 2], 5, temperature=-1.0)
    with pytest.raises(GenerationError, match="top_k must be a positive integer"):
        speculative_stream(target, draft, [1, 2], 5, top_k=0)


def test_request_beyond_either_context_names_the_model(target, drafts):
    with pytest.raises(GenerationError, match=r"10 tokens \+ 55 new tokens exceeds the target model's context of 64"):
        speculative_stream(target, drafts["random"], [1] * 10, 55)
    short = random_model(dataclasses.replace(DRAFT, max_seq_len=32), seed=3)
    with pytest.raises(GenerationError, match=r"10 tokens \+ 30 new tokens exceeds the draft model's context of 32"):
        speculative_stream(target, short, [1] * 10, 30)
    # exactly the context is fine
    assert len(speculative_generate(target, drafts["random"], [1] * 10, 54, temperature=0, stop_tokens=[])) == 54


def test_zero_new_tokens(target, drafts):
    stats = SpeculativeStats()
    assert speculative_generate(target, drafts["random"], [1, 2], 0, stats=stats) == []
    assert stats.target_forwards == 0
