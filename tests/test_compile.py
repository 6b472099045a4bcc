"""The compiled decode step (llama.core.generation.compiled_decode_step): one graph, no graph breaks, no
recompilation between calls, and the same tokens as eager decoding.

Most cases compile with backend="aot_eager" (dynamo's capture and AOT autograd's functionalisation,
then the same aten ops eagerly: seconds, and bitwise the same arithmetic as eager). One case runs the
default inductor backend end to end, which generates and compiles C++ (slow; marked).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import kernels
from llama import ModelConfig, RopeScaling, Transformer
from llama.core.generation import CACHE_BUCKET, GenerationError, compiled_decode_step, generate, static_cache, warm_up
from llama.quantization import quantize_model

torch.set_num_threads(1)

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=128, max_seq_len=600)
PROMPTS = [[1, 5, 9, 2, 33, 4], [7, 8]]


def random_model(seed: int = 0, dtype=torch.float32, config: ModelConfig = CONFIG) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)  # peaked logits: greedy choices are not near-ties
    return model.to(dtype).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compile_stats() -> tuple[int, int]:
    """(graphs compiled, graph breaks) since the last reset."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def variants():
    yield "plain", random_model()
    yield "kernels.optimize", kernels.optimize(random_model())
    yield "int8", quantize_model(random_model(), "int8")
    yield "int4 bf16", quantize_model(random_model(dtype=torch.bfloat16), "int4", group_size=32)


@pytest.mark.parametrize("name", ["plain", "kernels.optimize", "int8", "int4 bf16"])
def test_compiled_greedy_equals_eager(name):
    model = dict(variants())[name]
    expected = generate(model, PROMPTS, 12, temperature=0, stop_tokens=[])
    compiled_decode_step(model, backend="aot_eager")
    got = generate(model, PROMPTS, 12, temperature=0, stop_tokens=[], compile=True)
    assert got == expected
    assert compile_stats() == (1, 0)
    # Another request of the same batch size reuses the graph and the cache.
    other = [[3, 3, 3], [90, 1, 2, 3, 4, 5, 6, 7]]
    assert generate(model, other, 20, temperature=0, stop_tokens=[], compile=True) == \
        generate(model, other, 20, temperature=0, stop_tokens=[])  # fmt: skip
    assert compile_stats()[0] == 1  # the eager call in between dropped the cache: at most a re-setup, not a new graph


def test_compiled_logits_equal_eager_logits_and_the_cache_is_kept():
    model = random_model()
    compiled_decode_step(model, backend="aot_eager")
    generate(model, PROMPTS, 4, temperature=0, compile=True)
    assert model.cache_size == (2, CACHE_BUCKET)  # kept for the next call
    cache_k = model.cache.layers[0].k
    warm_up(model, 2, 40)
    assert model.cache.layers[0].k is cache_k and compile_stats() == (1, 0)
    # Logits, not just argmaxes: the step attends to kv_len masked positions, eager to max(position)+1.
    tokens = torch.tensor([[4, 5, 6, 7, 8], [9, 10, 11, 12, 13]])
    with torch.inference_mode():
        model.clear_cache()
        full = model(tokens)[:, -1]  # (B, V) the plain forward
        kv_len = static_cache(model, 2, 5)
        model(tokens[:, :4], 0)
        step = compiled_decode_step(model)(model, tokens[:, 4], torch.tensor([4, 4]), kv_len)
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_sampling_with_a_seed_is_the_same_compiled():
    model = random_model(3)
    compiled_decode_step(model, backend="aot_eager")
    kwargs = dict(temperature=0.9, top_p=0.95, seed=11, stop_tokens=[])
    assert generate(model, PROMPTS, 15, compile=True, **kwargs) == generate(model, PROMPTS, 15, **kwargs)


def test_dynamic_ntk_is_refused():
    config = ModelConfig(**{**CONFIG.__dict__, "rope_scaling": RopeScaling("dynamic", 2.0, original_max_seq_len=64)})
    with pytest.raises(GenerationError, match="dynamic NTK"):
        generate(random_model(config=config), PROMPTS, 4, compile=True)


def test_cache_bucket_is_capped_by_the_context():
    model = random_model()
    assert static_cache(model, 1, 10) == CACHE_BUCKET
    assert static_cache(model, 1, CACHE_BUCKET + 1) == min(2 * CACHE_BUCKET, CONFIG.max_seq_len)
    assert static_cache(model, 1, 599) == CONFIG.max_seq_len


@pytest.mark.slow
def test_inductor_compiled_greedy_equals_eager():
    """The real thing: inductor generates C++ for the fused elementwise work (norms, RoPE, SwiGLU)."""
    model = kernels.optimize(random_model(1))
    expected = generate(model, PROMPTS, 10, temperature=0, stop_tokens=[])
    got = generate(model, PROMPTS, 10, temperature=0, stop_tokens=[], compile=True)
    assert got == expected
    assert compile_stats() == (1, 0)
