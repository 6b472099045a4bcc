"""Parity with Meta's own reference model: `llama_models.llama3.model.Transformer`.

Every case writes a tiny random checkpoint in Meta's format, runs it through Meta's reference code and
through `llama.load`, and compares float32 logits, for a full forward and for cached decoding (a prefill,
then one token at a time with `start_pos`, each side using its own KV cache).

Independence from the code under test:
  - checkpoint files are written here with `torch.save` and `json`, not with weights/meta.py;
  - model-parallel shards are cut by fairscale's own layers (`fairscale_shards`): each parallel layer
    Meta's model is built from is constructed as rank r of N would construct it, with an init hook that
    hands it the full matrix, and keeps the slice fairscale's `_initialize_affine_weight` gives it;
  - which layer type each tensor belongs to is read off Meta's reference model itself.

Meta's model is built from fairscale's model-parallel layers, so it needs a process group even on one
CPU: the module fixture starts a one-process gloo group and a model-parallel group of size 1.

Run with `-s` to see the measured errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import llama
from llama import RopeScaling

fairscale_mp = pytest.importorskip("fairscale.nn.model_parallel")
pytest.importorskip("llama_models.llama3.model")

import fairscale.nn.model_parallel.initialize as fs_init  # noqa: E402
import fairscale.nn.model_parallel.layers as fs_layers  # noqa: E402
from fairscale.nn.model_parallel.layers import (  # noqa: E402
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from llama_models.llama3.args import ModelArgs  # noqa: E402
from llama_models.llama3.model import Transformer as MetaTransformer  # noqa: E402

# max |ours - ref| / max |ref| over all logits. Both sides do the same float32 math in a different
# order (complex multiply vs. explicit rotation, additive vs. boolean mask, expand vs.
# repeat_interleave), which costs a few ulps (~1e-7); a real bug (a wrong position, frequency, head
# grouping or shard order) moves logits by 1e-3 or far more.
TOL = 1e-5

BATCH = 2
MAX_SEQ_LEN = 64

# Tiny Llama-3-like shapes: head_dim 16, FFN int(1.3 * int(2 * 4 * 64 / 3)) = 221 -> 224 (multiple of 32).
BASE_PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 256,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": False,
}

MEASURED: dict[str, float] = {}


# ---- Meta's reference, with fairscale's model parallelism on one process ---------------------------


@pytest.fixture(scope="module", autouse=True)
def model_parallel(tmp_path_factory):
    started_group = not torch.distributed.is_initialized()
    if started_group:
        init_file = tmp_path_factory.mktemp("dist") / "init"
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=0, world_size=1
        )
    started_mp = not fs_init.model_parallel_is_initialized()
    if started_mp:
        fs_init.initialize_model_parallel(1)
    yield
    if started_mp:
        fs_init.destroy_model_parallel()
    if started_group:
        torch.distributed.destroy_process_group()
    if MEASURED:
        width = max(len(k) for k in MEASURED)
        print(f"\n{'variant':<{width}}  worst relative logit error")
        for variant, err in MEASURED.items():
            print(f"{variant:<{width}}  {err:.2e}")


def reference(params: dict, **overrides) -> MetaTransformer:
    """Meta's model, built as Llama.build does: ModelArgs(max_seq_len=, max_batch_size=, **params)."""
    params = {**params, **overrides}
    return MetaTransformer(ModelArgs(max_seq_len=MAX_SEQ_LEN, max_batch_size=BATCH, **params)).eval()


def random_weights(params: dict, seed: int, **overrides) -> dict[str, torch.Tensor]:
    """Random float32 weights under the names and shapes of Meta's model for these params."""
    shapes = {n: t.shape for n, t in reference(params, **overrides).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norm weights: near one, but not all ones, so a swapped norm shows
            state[name] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name == "tok_embeddings.weight":
            state[name] = torch.randn(shape, generator=g)
        else:  # 1/sqrt(fan_in) keeps activations O(1) through the layers
            state[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
    return state


def write_checkpoint(directory: Path, params: dict, shards: list[dict[str, torch.Tensor]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    return directory


# ---- model-parallel shards, cut by fairscale's layers ---------------------------------------------

PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, ParallelEmbedding)


def parallel_layer_types(ref: MetaTransformer) -> dict[str, type]:
    """{tensor name: fairscale layer class} for every model-parallel weight of Meta's model."""
    return {f"{n}.weight": type(m) for n, m in ref.named_modules() if isinstance(m, PARALLEL_LAYERS)}


def fairscale_shards(full: dict[str, torch.Tensor], layer_types: dict[str, type], world_size: int,
                     monkeypatch) -> list[dict[str, torch.Tensor]]:
    """What rank r of `world_size` holds of each tensor, as fairscale's own layers slice it.

    Each layer is constructed as rank r would construct it (fairscale's layers ask
    get_model_parallel_rank / _world_size, which are faked here) with an init_method that fills the
    "master weight" with the full tensor; fairscale then keeps rank r's slice. Tensors of no parallel
    layer (norms, rope.freqs) are replicated, as every rank holds its own copy.
    """
    shards = []
    for rank in range(world_size):
        shard = {}
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(fs_layers, "get_model_parallel_rank", lambda: rank)
            m.setattr(fs_layers, "get_model_parallel_world_size", lambda: world_size)
            for name, tensor in full.items():
                layer_type = layer_types.get(name)
                if layer_type is None:
                    shard[name] = tensor.clone()
                    continue
                rows, cols = tensor.shape

                def fill(weight, tensor=tensor):
                    return weight.copy_(tensor)

                if layer_type in (ColumnParallelLinear, RowParallelLinear):
                    layer = layer_type(cols, rows, bias=False, init_method=fill)  # (in, out) for (out, in)
                else:
                    layer = layer_type(rows, cols, init_method=fill)  # (num_embeddings, embedding_dim)
                shard[name] = layer.weight.detach().clone()
        shards.append(shard)
    # Guard against the fake rank not taking effect: then every "shard" would be the full tensor.
    for name in layer_types:
        assert shards[0][name].numel() * world_size == full[name].numel(), name
        assert not torch.equal(shards[0][name], shards[-1][name]), name
    return shards


def rope_freqs_table(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The `rope.freqs` buffer Llama 1/2 checkpoints carry (and our loader must ignore)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)


# ---- running and comparing -------------------------------------------------------------------------


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def decode(forward, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits (B, T, V) from a prefill of `prefill` tokens at start_pos 0, then one token at a time."""
    steps = [forward(tokens[:, :prefill], 0)]
    for pos in range(prefill, tokens.shape[1]):
        steps.append(forward(tokens[:, pos : pos + 1], pos))
    return torch.cat(steps, dim=1)


@torch.inference_mode()
def check_parity(ours: llama.Transformer, ref: MetaTransformer, variant: str, seq_len: int = 12,
                 prefill: int = 5, seed: int = 0) -> float:
    """Compare full-forward and cached-decode logits; record and assert the worst relative error."""
    vocab = ours.config.vocab_size
    tokens = torch.randint(0, vocab, (BATCH, seq_len), generator=torch.Generator().manual_seed(seed))

    ref_full = ref(tokens, 0)
    ours_full = ours(tokens)
    assert ours_full.dtype == torch.float32 and ours_full.shape == ref_full.shape == (BATCH, seq_len, vocab)

    ref_decode = decode(ref, tokens, prefill)
    ours.setup_cache(BATCH, seq_len)
    try:
        ours_decode = decode(ours, tokens, prefill)
    finally:
        ours.clear_cache()

    full_err = relative_error(ours_full, ref_full)
    decode_err = relative_error(ours_decode, ref_decode)
    MEASURED[f"{variant} (forward)"] = full_err
    MEASURED[f"{variant} (cached decode)"] = decode_err
    print(f"{variant}: forward {full_err:.2e}, cached decode {decode_err:.2e}")
    assert full_err <= TOL, f"{variant}: forward logits differ from Meta's by {full_err:.2e} (relative)"
    assert decode_err <= TOL, f"{variant}: cached-decode logits differ from Meta's by {decode_err:.2e} (relative)"
    return max(full_err, decode_err)


# ---- single-file checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads, kind", [(2, "GQA"), (4, "MHA"), (1, "MQA")])
def test_single_file_matches_meta(tmp_path, n_kv_heads, kind):
    params = {**BASE_PARAMS, "n_kv_heads": n_kv_heads}
    state = random_weights(params, seed=n_kv_heads)
    path = write_checkpoint(tmp_path / "ckpt", params, [state])

    ref = reference(params)
    ref.load_state_dict(state, strict=True)
    ours = llama.load(path, dtype=torch.float32)
    assert ours.config.n_kv_heads == n_kv_heads and ours.config.ffn_dim == 224
    assert ours.config.rope_theta == 500000.0 and ours.config.rope_scaling is None

    check_parity(ours, ref, f"single file, {kind} (kv heads {n_kv_heads})")


def test_scaled_rope_matches_meta(tmp_path):
    """use_scaled_rope: Meta hard-codes the llama3 scaling with factor 8.

    With head_dim 16 and theta 500000 the four slowest of the eight frequencies have wavelengths
    above 2048 (the start of the scaled band), so the scaling changes the logits; the test first
    checks that it does, by more than 100x the tolerance, so that ignoring it would fail.
    """
    params = {**BASE_PARAMS, "use_scaled_rope": True}
    state = random_weights(params, seed=7)
    path = write_checkpoint(tmp_path / "ckpt", params, [state])

    ref = reference(params)
    ref.load_state_dict(state, strict=True)
    unscaled = reference(params, use_scaled_rope=False)
    unscaled.load_state_dict(state, strict=True)
    tokens = torch.randint(0, params["vocab_size"], (BATCH, MAX_SEQ_LEN), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        gap = relative_error(unscaled(tokens, 0), ref(tokens, 0))
    print(f"scaled vs unscaled RoPE (Meta's reference, {MAX_SEQ_LEN} tokens): {gap:.2e}")
    assert gap > 100 * TOL, f"scaling changes the logits by only {gap:.2e}: the test could not tell"

    ours = llama.load(path, dtype=torch.float32)
    assert ours.config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    check_parity(ours, ref, "use_scaled_rope (factor 8)", seq_len=MAX_SEQ_LEN, prefill=40)


# ---- model-parallel shards -------------------------------------------------------------------------

# Llama 1/2: vocab_size -1 (taken from the embedding), no rope_theta key (10000), the embedding split on
# its width (Llama 2's model.py builds it as fairscale's ParallelEmbedding), rope.freqs in every shard.
# The MHA variant also omits n_kv_heads and ffn_dim_multiplier, like Llama 2 7B's params.json.
# Llama 3: vocab split on dim 0 (VocabParallelEmbedding), rope_theta 500000.
MP_CASES = [
    ("llama2", 2, 2),
    ("llama2", 4, 4),
    ("llama3", 2, 2),
    ("llama3", 4, 4),
]


def mp_params(layout: str, n_kv_heads: int) -> dict:
    params = {**BASE_PARAMS, "n_kv_heads": n_kv_heads}
    if layout == "llama2":
        params["vocab_size"] = -1
        del params["rope_theta"], params["use_scaled_rope"]
        if n_kv_heads == params["n_heads"]:
            del params["n_kv_heads"]
            params["ffn_dim_multiplier"] = None  # FFN int(2 * 4 * 64 / 3) = 170 -> 192
    return params


@pytest.mark.parametrize("layout, world_size, n_kv_heads", MP_CASES)
def test_model_parallel_shards_match_meta(tmp_path, monkeypatch, layout, world_size, n_kv_heads):
    params = mp_params(layout, n_kv_heads)
    vocab = BASE_PARAMS["vocab_size"]
    head_dim = params["dim"] // params["n_heads"]
    # Meta's Llama 2 code hard-codes theta 10000 and takes the vocabulary from the tokenizer;
    # the llama3 ModelArgs would otherwise default to 500000 and -1.
    ref_overrides = {"vocab_size": vocab, "rope_theta": 10000.0} if layout == "llama2" else {}
    full = random_weights(params, seed=10 * world_size + n_kv_heads, **ref_overrides)

    ref = reference(params, **ref_overrides)
    ref.load_state_dict(full, strict=True)
    layer_types = parallel_layer_types(ref)
    assert layer_types["tok_embeddings.weight"] is VocabParallelEmbedding
    if layout == "llama2":
        layer_types["tok_embeddings.weight"] = ParallelEmbedding
    shards = fairscale_shards(full, layer_types, world_size, monkeypatch)
    emb_shape = tuple(shards[0]["tok_embeddings.weight"].shape)
    assert emb_shape == ((vocab, 64 // world_size) if layout == "llama2" else (vocab // world_size, 64))
    if layout == "llama2":
        for shard in shards:
            shard["rope.freqs"] = rope_freqs_table(head_dim)
    path = write_checkpoint(tmp_path / "ckpt", params, shards)

    ours = llama.load(path, dtype=torch.float32)
    expected_theta = 10000.0 if layout == "llama2" else 500000.0
    assert ours.config.rope_theta == expected_theta and ours.config.vocab_size == vocab
    merged = ours.state_dict()
    for name, tensor in full.items():
        assert torch.equal(merged[name], tensor), f"{name} merged wrongly from {world_size} shards"

    check_parity(ours, ref, f"{layout} layout, {world_size} shards (kv heads {n_kv_heads})")


# ---- our writer ------------------------------------------------------------------------------------

# Our writer picks the embedding split by vocabulary size (dim 1 below 128000 entries, as Llama 1/2;
# dim 0 from 128000, as Llama 3), so both layouts are checked: the tiny vocab, and a Llama-3-sized one
# on a narrow model (dim 32) to keep the files small. The Llama-3-sized one also carries scaled RoPE.
WRITER_CASES = [
    ("small vocab", {**BASE_PARAMS}, ParallelEmbedding),
    ("llama3 vocab", {**BASE_PARAMS, "dim": 32, "n_layers": 1, "vocab_size": 128256, "ffn_dim_multiplier": None,
                      "use_scaled_rope": True}, VocabParallelEmbedding),
]


@pytest.mark.parametrize("variant, params, embedding", WRITER_CASES, ids=[c[0] for c in WRITER_CASES])
def test_writer_shards_like_fairscale(tmp_path, monkeypatch, variant, params, embedding):
    full = random_weights(params, seed=5)
    ours = llama.load(write_checkpoint(tmp_path / "src", params, [full]), dtype=torch.float32)

    out = tmp_path / "out"
    llama.save(ours, out, format="meta", n_shards=2)

    # Re-read by our loader: the same config and bit-identical tensors.
    again = llama.load(out, dtype=torch.float32)
    assert again.config == ours.config
    reloaded = again.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded[name], tensor), f"{name} changed in a save/load round trip"

    # The shard files hold exactly what fairscale's layers give each rank.
    ref = reference(params)
    layer_types = parallel_layer_types(ref)
    layer_types["tok_embeddings.weight"] = embedding
    expected = fairscale_shards(full, layer_types, 2, monkeypatch)
    for rank in range(2):
        written = torch.load(out / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert sorted(written) == sorted(expected[rank]), f"shard {rank} holds other tensors"
        for name, tensor in expected[rank].items():
            assert written[name].shape == tensor.shape, f"shard {rank}: {name} {written[name].shape} vs {tensor.shape}"
            assert torch.equal(written[name], tensor), f"shard {rank}: {name} differs from fairscale's slice"

    # Meta's own loader builds ModelArgs(max_seq_len=..., max_batch_size=..., **params) from the written
    # params.json; that must work, describe the same shapes (FFN via multiple_of / multiplier) and
    # give the same logits on the merged weights.
    written_params = json.loads((out / "params.json").read_text())
    meta_again = MetaTransformer(ModelArgs(max_seq_len=MAX_SEQ_LEN, max_batch_size=BATCH, **written_params)).eval()
    meta_again.load_state_dict(full, strict=True)
    check_parity(again, meta_again, f"writer round trip, {variant}", seq_len=8, prefill=3)
