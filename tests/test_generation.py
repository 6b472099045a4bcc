"""Generation: decoding against transformers, sampling against independent formulas, request checks.

Tiers:
- Greedy decoding (single prompts, ragged batches, stop tokens, repetition penalty) against
  transformers' `generate` on a tiny random checkpoint written by `llama.save`. The weights are
  normal(0, 0.3), which makes the logits peaked (std ~2.4 over 97 tokens), so an argmax tie that float32
  rounding could break differently on the two sides does not happen at these fixed seeds.
- Sampling filters (top-k, top-p, min-p, temperature, repetition penalty) with hypothesis on random
  logits, each against a float64 computation written here, and the whole chain against transformers'
  logits warpers.
- Log-probabilities, stop strings, streaming and the `Llama` class on a model with the real Llama 3
  tokenizer (vocabulary 128256, tiny widths).
"""

from __future__ import annotations

import copy
import importlib.resources
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import llama
from llama import GenerationError, Llama, ModelConfig, generate, stream
from llama.core.generation import SamplingParams, apply_repetition_penalty, filter_logits, sample

from random_models import random_model

LLAMA3_TOKENIZER = Path(str(importlib.resources.files("llama_models.llama3") / "tokenizer.model"))

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- a tiny model and its transformers twin -------------------------------------------------------

SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=128, max_seq_len=128)


@pytest.fixture(scope="module")
def small():
    return random_model(SMALL, seed=0)


@pytest.fixture(scope="module")
def hf_small(small, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = tmp_path_factory.mktemp("small")
    llama.save(small, path)
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, eos: int | None = None, **kwargs) -> list[int]:
    """transformers' greedy continuation of one prompt (no padding), eos included if reached."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=0, **kwargs)  # fmt: skip
    return out[0, len(prompt) :].tolist()


PROMPTS = [[7], [5, 17, 33, 2, 9, 41, 66], [88, 3, 3, 3, 12, 60, 1, 95, 44, 20, 71, 8], [31, 4, 50]]


# ---- greedy decoding against transformers ---------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS[:3], ids=lambda p: f"{len(p)}-tokens")
def test_greedy_matches_transformers(small, hf_small, prompt):
    ours = generate(small, [prompt], 40, temperature=0, stop_tokens=[])
    ref = hf_greedy(hf_small, prompt, 40)
    assert len(ref) == 40, "transformers stopped early: it should have no eos token here"
    assert ours == [ref]


def test_batched_ragged_prompts_match_each_alone_and_transformers(small, hf_small):
    batched = generate(small, PROMPTS, 30, temperature=0, stop_tokens=[])
    alone = [generate(small, [p], 30, temperature=0, stop_tokens=[])[0] for p in PROMPTS]
    assert batched == alone
    assert batched == [hf_greedy(hf_small, p, 30) for p in PROMPTS]


def test_stop_token_stops_where_transformers_stops(small, hf_small):
    full = generate(small, PROMPTS, 30, temperature=0, stop_tokens=[])
    stop = full[1][6]  # row 1 reaches it at step 6 or earlier; other rows may or may not
    ours = generate(small, PROMPTS, 30, temperature=0, stop_tokens=[stop])
    for prompt, row, got in zip(PROMPTS, full, ours):
        expected = row[: row.index(stop)] if stop in row else row
        assert got == expected  # stops at the first stop token, which is not returned
        assert stop not in got
        ref = hf_greedy(hf_small, prompt, 30, eos=stop)
        assert ref == (expected + [stop] if stop in row else expected)  # transformers keeps the eos
    assert len(ours[1]) <= 6


def test_stop_tokens_none_means_the_models_own(small):
    full = generate(small, [PROMPTS[1]], 20, temperature=0, stop_tokens=[])[0]
    stop = full[5]
    cut = full[: full.index(stop)]
    model = copy.deepcopy(small)
    assert not hasattr(model, "stop_tokens")
    assert generate(model, [PROMPTS[1]], 20, temperature=0, stop_tokens=None)[0] == full  # no attribute: no stops
    model.stop_tokens = frozenset({stop})
    assert generate(model, [PROMPTS[1]], 20, temperature=0)[0] == cut  # None is the default
    assert generate(model, [PROMPTS[1]], 20, temperature=0, stop_tokens=[])[0] == full  # [] disables stopping
    assert generate(model, [PROMPTS[1]], 20, temperature=0, stop_tokens=[full[0]])[0] == []  # explicit wins


def test_greedy_repetition_penalty_matches_transformers(small, hf_small):
    plain = generate(small, PROMPTS, 30, temperature=0, stop_tokens=[])
    ours = generate(small, PROMPTS, 30, temperature=0, stop_tokens=[], repetition_penalty=1.5)
    assert ours != plain, "the penalty should change these outputs, or this test proves nothing"
    # transformers penalises every token of the prompt and of the output so far, as we must; its
    # padding-free single-prompt runs also show our padded batch does not penalise the pad id.
    assert ours == [hf_greedy(hf_small, p, 30, repetition_penalty=1.5) for p in PROMPTS]


def test_max_new_tokens_zero_and_no_prompts(small):
    assert generate(small, PROMPTS[:2], 0, temperature=0) == [[], []]
    assert generate(small, [], 5, temperature=0) == []


# ---- seeds, temperature, streaming -----------------------------------------------------------------


def test_seed_reproduces_samples(small):
    kwargs = dict(temperature=1.0, top_p=0.95, stop_tokens=[])
    a = generate(small, PROMPTS, 25, seed=123, **kwargs)
    b = generate(small, PROMPTS, 25, seed=123, **kwargs)
    c = generate(small, PROMPTS, 25, seed=124, **kwargs)
    assert a == b
    assert a != c
    assert a != generate(small, PROMPTS, 25, temperature=0, stop_tokens=[])  # it really sampled


def test_temperature_near_zero_is_greedy(small):
    greedy = generate(small, PROMPTS, 25, temperature=0, stop_tokens=[])
    assert generate(small, PROMPTS, 25, temperature=1e-6, top_p=1.0, seed=0, stop_tokens=[]) == greedy
    assert generate(small, PROMPTS, 25, temperature=1e-6, seed=1, stop_tokens=[]) == greedy


def test_stream_yields_what_generate_returns(small):
    kwargs = dict(temperature=0.9, top_k=20, seed=5)
    full = generate(small, PROMPTS, 20, stop_tokens=[], **kwargs)
    stop = full[2][4]
    expected = generate(small, PROMPTS, 20, stop_tokens=[stop], **kwargs)
    rows: list[list[int]] = [[] for _ in PROMPTS]
    for step in stream(small, PROMPTS, 20, stop_tokens=[stop], **kwargs):
        assert [t.row for t in step] == sorted({t.row for t in step}), "one token per running row, in row order"
        assert all(math.isfinite(t.logprob) and t.logprob <= 0 for t in step)
        for t in step:
            rows[t.row].append(t.id)
    assert rows == expected
    assert small.cache_size is None, "the KV cache is removed at the end"


def test_stream_closed_early_removes_the_cache(small):
    it = stream(small, PROMPTS, 20, temperature=0, stop_tokens=[])
    next(it)
    assert small.cache_size is not None
    it.close()
    assert small.cache_size is None


# ---- log-probabilities -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling",
    [
        dict(temperature=0),
        dict(temperature=0.8, top_k=10, top_p=0.8, seed=3),
        dict(temperature=0, repetition_penalty=1.3),
    ],
    ids=["greedy", "sampled", "repetition-penalty"],
)
def test_logprobs_are_the_models_log_softmax(small, sampling):
    """Each token's log-probability under the model itself (before any sampling knob), which a
    full forward over prompt + output gives at the position before the token."""
    tokens, logprobs = generate(small, PROMPTS, 15, stop_tokens=[], logprobs=True, **sampling)
    for prompt, out, lp in zip(PROMPTS, tokens, logprobs):
        assert len(lp) == len(out) == 15
        assert all(math.isfinite(x) for x in lp)
        with torch.inference_mode():
            full = torch.log_softmax(small(torch.tensor([prompt + out])), dim=-1)[0]  # (T, V)
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(out))
        ref = full[positions, torch.tensor(out)]
        torch.testing.assert_close(torch.tensor(lp), ref, rtol=0, atol=1e-4)


# ---- request checks --------------------------------------------------------------------------------


def test_request_beyond_context_names_the_numbers(small):
    with pytest.raises(GenerationError, match=r"100 tokens.*29 new tokens.*context of 128"):
        generate(small, [[1] * 100, [2] * 5], 29, temperature=0)
    # exactly the context is fine
    assert len(generate(small, [[1] * 100], 28, temperature=0, stop_tokens=[])[0]) == 28


def test_empty_prompt_and_out_of_vocabulary_ids(small):
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(small, [[1, 2], []], 4)
    with pytest.raises(GenerationError, match=r"outside the vocabulary \[0, 97\): \[97\]"):
        generate(small, [[1, 97]], 4)
    with pytest.raises(GenerationError, match=r"\[-1\]"):
        generate(small, [[-1, 5]], 4)
    with pytest.raises(GenerationError, match="integer token ids"):
        generate(small, [[1.0, 5]], 4)
    with pytest.raises(GenerationError, match="booleans"):
        generate(small, [[True, 5]], 4)
    with pytest.raises(GenerationError, match="empty strings|non-empty"):
        generate(small, [[1, 5]], 4, stop_strings=[""], tokenizer=object())


def test_tensor_prompts_are_token_ids(small):
    rows = torch.tensor([[3, 4, 5], [6, 7, 8]])
    assert generate(small, rows, 5, temperature=0, stop_tokens=[]) == generate(
        small, rows.tolist(), 5, temperature=0, stop_tokens=[]
    )


def test_stream_checks_the_request_when_called(small):
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        stream(small, [[1] * 100], 1000)  # no next() needed


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
        dict(top_k=0), dict(top_k=2.5), dict(top_k=True), dict(min_p=-0.1), dict(min_p=1.5),
        dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
    ],
    ids=lambda k: "-".join(f"{n}={v}" for n, v in k.items()),
)  # fmt: skip
def test_invalid_sampling_values(small, kwargs):
    name, value = next(iter(kwargs.items()))
    with pytest.raises(GenerationError, match=f"{name} must .*{value}"):
        generate(small, [[1, 2]], 4, **kwargs)
    with pytest.raises(GenerationError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("max_new_tokens", [-1, 1.5, True])
def test_invalid_max_new_tokens(small, max_new_tokens):
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(small, [[1, 2]], max_new_tokens)


def test_stop_strings_need_a_tokenizer(small):
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(small, [[1, 2]], 4, stop_strings=["x"])


def test_generation_error_is_a_value_error():
    assert issubclass(GenerationError, ValueError)


# ---- sampling filters on random logits -------------------------------------------------------------


@st.composite
def random_logits(draw, max_vocab=200):
    """(B, V) float32 logits: normal noise of a drawn scale, from a drawn seed."""
    seed = draw(st.integers(0, 2**32 - 1))
    vocab = draw(st.integers(2, max_vocab))
    rows = draw(st.integers(1, 3))
    scale = draw(st.floats(0.1, 10.0))
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 64, seed: int = 0) -> torch.Tensor:
    """n samples of each row: (n, B)."""
    B, V = logits.shape
    tokens = sample(logits.repeat(n, 1), params, torch.Generator().manual_seed(seed))  # (n * B,)
    return tokens.view(n, B)


def in_set(samples: torch.Tensor, allowed: torch.Tensor) -> bool:
    """samples: (n, B) ids; allowed: (B, V) bool."""
    return bool(allowed.gather(1, samples.T).all())


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of each row of float64 probabilities: the most likely tokens whose probability
    mass before them (in descending order) is below top_p. Also returns that mass, to spot ties with
    top_p that float32 rounding could decide either way."""
    order = probs.argsort(dim=-1, descending=True)
    sorted_probs = probs.gather(-1, order)
    before_sorted = sorted_probs.cumsum(-1) - sorted_probs
    before = torch.empty_like(before_sorted).scatter(-1, order, before_sorted)
    return before < top_p, before


@HYPOTHESIS
@given(logits=random_logits(), k=st.integers(1, 250), temperature=st.floats(0.05, 5.0))
def test_top_k_keeps_exactly_the_k_largest(logits, k, temperature):
    params = SamplingParams(temperature=temperature, top_p=1.0, top_k=k)
    V = logits.shape[-1]
    # Rank of each token: how many are strictly larger. (Random normals have no ties.)
    rank = (logits[:, None, :] > logits[:, :, None]).sum(-1)  # (B, V)
    allowed = rank < k
    assert torch.equal(kept(filter_logits(logits, params)), allowed)
    assert int(allowed.sum(-1).min()) == min(k, V)
    assert in_set(draws(logits, params), allowed)


@HYPOTHESIS
@given(logits=random_logits(), top_p=st.floats(0.01, 1.0), temperature=st.floats(0.05, 5.0))
def test_top_p_keeps_exactly_the_nucleus(logits, top_p, temperature):
    params = SamplingParams(temperature=temperature, top_p=top_p)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    allowed, before = nucleus(probs, top_p)
    assume(bool(((before - top_p).abs() > 1e-5).all()))  # no token on the edge
    assert torch.equal(kept(filter_logits(logits, params)), allowed)
    assert in_set(draws(logits, params), allowed)


@HYPOTHESIS
@given(logits=random_logits(), min_p=st.floats(0.0, 1.0), temperature=st.floats(0.05, 5.0))
def test_min_p_drops_tokens_below_min_p_times_the_top(logits, min_p, temperature):
    params = SamplingParams(temperature=temperature, top_p=1.0, min_p=min_p)
    logits64 = logits.double() / temperature
    ratio = torch.exp(logits64 - logits64.max(-1, keepdim=True).values)  # p / p_max
    assume(bool(((ratio - min_p).abs() > 1e-5).all()))
    allowed = ratio >= min_p
    assert torch.equal(kept(filter_logits(logits, params)), allowed)
    assert in_set(draws(logits, params), allowed)


@HYPOTHESIS
@given(
    logits=random_logits(),
    temperature=st.floats(0.05, 5.0),
    top_k=st.none() | st.integers(1, 250),
    top_p=st.floats(0.01, 1.0),
    min_p=st.none() | st.floats(0.0, 1.0),
)
def test_filter_chain_matches_formula_and_transformers(logits, temperature, top_k, top_p, min_p):
    """Temperature, top-k, top-p, min-p in that order (transformers' order): each later filter sees
    the distribution the earlier ones left, renormalised."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    x = logits.double() / temperature
    if top_k is not None:
        rank = (x[:, None, :] > x[:, :, None]).sum(-1)
        x = x.masked_fill(rank >= top_k, float("-inf"))
    allowed, before = nucleus(torch.softmax(x, dim=-1), top_p)
    finite = torch.isfinite(x)
    assume(bool(((before - top_p).abs() > 1e-5)[finite].all()))
    x = x.masked_fill(~allowed, float("-inf"))
    if min_p is not None:
        ratio = torch.exp(x - x.max(-1, keepdim=True).values)
        assume(bool(((ratio - min_p).abs() > 1e-5)[torch.isfinite(x)].all()))
        x = x.masked_fill(ratio < min_p, float("-inf"))
    expected = torch.isfinite(x)
    ours = filter_logits(logits, params)
    assert torch.equal(kept(ours), expected)
    assert in_set(draws(logits, params), expected)

    lp = pytest.importorskip("transformers.generation.logits_process")
    warpers = [lp.TemperatureLogitsWarper(temperature)]
    if top_k is not None:
        warpers.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p))
    if min_p is not None:
        warpers.append(lp.MinPLogitsWarper(min_p))
    ref = logits.clone()
    for warper in warpers:
        ref = warper(None, ref)
    assert torch.equal(kept(ref), expected)
    # The same distribution: filter_logits subtracts each row's maximum before the temperature (a
    # tiny temperature then gives -inf, not inf and NaN), so compare log-probabilities.
    torch.testing.assert_close(ours.log_softmax(-1)[expected], ref.log_softmax(-1)[expected], rtol=1e-5, atol=1e-5)


@HYPOTHESIS
@given(logits=random_logits(), top_p=st.floats(0.01, 1.0))
def test_near_zero_temperature_is_greedy(logits, top_p):
    top2 = logits.topk(2, dim=-1).values
    assume(bool((top2[:, 0] - top2[:, 1] > 1e-3).all()))  # a gap that 1e-6 turns into certainty
    params = SamplingParams(temperature=1e-6, top_p=top_p)
    assert (draws(logits, params, n=16) == logits.argmax(-1)).all()
    assert torch.equal(sample(logits, SamplingParams(temperature=0), None), logits.argmax(-1))


@HYPOTHESIS
@given(logits=random_logits(), seed=st.integers(0, 2**63 - 1))
def test_same_seed_same_samples(logits, seed):
    params = SamplingParams(temperature=1.0, top_p=1.0)
    assert torch.equal(draws(logits, params, seed=seed), draws(logits, params, seed=seed))


@HYPOTHESIS
@given(logits=random_logits(), penalty=st.floats(0.1, 5.0), data=st.data())
def test_repetition_penalty_formula(logits, penalty, data):
    B, V = logits.shape
    seen = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=V, max_size=V), min_size=B, max_size=B)))
    logits[0, 0] = 0.0  # zero stays zero either way
    ours = apply_repetition_penalty(logits, seen, penalty)
    # Keskar et al. (CTRL): divide positive logits of seen tokens by the penalty, multiply negative ones.
    expected = [
        [(x / penalty if x > 0 else x * penalty) if s else x for x, s in zip(row, seen_row)]
        for row, seen_row in zip(logits.double().tolist(), seen.tolist())
    ]
    torch.testing.assert_close(ours.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.equal(ours[~seen], logits[~seen])

    lp = pytest.importorskip("transformers.generation.logits_process")
    for b in range(B):
        ids = seen[b].nonzero().flatten()
        if len(ids):
            ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids[None], logits[b : b + 1].clone())
            torch.testing.assert_close(ours[b : b + 1], ref, rtol=1e-6, atol=0)


# ---- with the real Llama 3 tokenizer ----------------------------------------------------------------

BIG_VOCAB = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=128256, ffn_dim=64, max_seq_len=256)


@pytest.fixture(scope="module")
def tokenizer():
    return llama.load_tokenizer(LLAMA3_TOKENIZER)


@pytest.fixture(scope="module")
def llm(tokenizer):
    return Llama(random_model(BIG_VOCAB, seed=1, std=0.5), tokenizer)


PROMPT = "The capital of France is"


def clean(text: str) -> bool:
    return len(text) >= 2 and "\ufffd" not in text and text.strip() == text


def test_stop_strings_stop_at_the_completing_token(llm, tokenizer):
    prompt = tokenizer.encode(PROMPT, bos=True, eos=False)
    full = generate(llm.model, [prompt], 40, temperature=0, stop_tokens=[])[0]
    pieces = [tokenizer.decode([t]) for t in full]
    k = next(i for i in range(5, len(full)) if clean(pieces[i]))
    j = next(i for i in range(2, k) if clean(pieces[i]) and pieces[i] not in pieces[k])  # an earlier one
    for stops, first in (([pieces[k]], k), ([pieces[k], pieces[j]], j)):
        # The first token after which the text holds a stop string ends the output, and is kept.
        n = next(n for n in range(1, len(full) + 1) if any(s in tokenizer.decode(full[:n]) for s in stops))
        assert n <= first + 1
        got = generate(llm.model, [prompt], 40, temperature=0, stop_tokens=[], stop_strings=stops, tokenizer=tokenizer)
        assert got == [full[:n]]


def test_llama_generate_and_stream_match_token_generation(llm, tokenizer):
    ids = generate(llm.model, [tokenizer.encode(PROMPT, bos=True, eos=False)], 30, temperature=0,
                   stop_tokens=tokenizer.stop_tokens)[0]  # fmt: skip
    text = llm.generate(PROMPT, 30, temperature=0)
    assert text == tokenizer.decode(ids)
    pieces = list(llm.stream(PROMPT, 30, temperature=0))
    assert "".join(pieces) == text
    assert len(pieces) > 1, "streamed in pieces"


def test_llama_chat_uses_the_chat_format(llm, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    prompt = tokenizer.encode_dialog(messages)
    ids = generate(llm.model, [prompt], 30, temperature=0, stop_tokens=tokenizer.stop_tokens)[0]
    reply = llm.chat(messages, 30, temperature=0)
    assert reply == tokenizer.decode(ids)
    assert "".join(llm.chat_stream(messages, 30, temperature=0)) == reply
    assert reply != llm.generate("Hello!", 30, temperature=0)


def test_llama_stops_on_the_tokenizers_stop_tokens(llm, tokenizer):
    """A model made to emit <|eot_id|> partway: Llama stops there by default, stop_tokens=[] runs on."""
    eot = tokenizer.special_tokens["<|eot_id|>"]
    prompt = tokenizer.encode(PROMPT, bos=True, eos=False)
    model = copy.deepcopy(llm.model)
    full = generate(model, [prompt], 30, temperature=0, stop_tokens=[])[0]
    with torch.no_grad():
        model.output.weight[eot] = model.output.weight[full[8]] * 1.5  # outscores full[8] where it is positive
    forced = generate(model, [prompt], 30, temperature=0, stop_tokens=[])[0]
    assert eot in forced
    forced_llm = Llama(model, tokenizer)
    assert forced_llm.generate(PROMPT, 30, temperature=0) == tokenizer.decode(forced[: forced.index(eot)])
    assert forced_llm.generate(PROMPT, 30, temperature=0, stop_tokens=[]) == tokenizer.decode(forced)


def test_llama_stop_strings_truncate_before_the_stop(llm):
    full = llm.generate(PROMPT, 40, temperature=0)
    k = next(i for i in range(len(full) // 2, len(full) - 3) if clean(full[i : i + 3]))
    stop = full[k : k + 3]
    expected = full[: full.index(stop)]
    assert llm.generate(PROMPT, 40, temperature=0, stop=[stop]) == expected
    assert llm.generate(PROMPT, 40, temperature=0, stop=stop) == expected  # one string
    pieces = list(llm.stream(PROMPT, 40, temperature=0, stop=[stop, "never appears \x00"]))
    assert "".join(pieces) == expected
    assert not any(stop in p for p in pieces)


def test_llama_rejects_a_tokenizer_larger_than_the_model(small, tokenizer):
    with pytest.raises(ValueError, match="128256"):
        Llama(small, tokenizer)
