"""The model, loading and generation on a CUDA device agree with the CPU. Skipped without CUDA."""

import pytest
import torch

import llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _model(seed=0):
    config = llama.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_dim=160,
                               rope_scaling=llama.RopeScaling("llama3", 8.0, 1.0, 4.0, 16), max_seq_len=128)
    torch.manual_seed(seed)
    model = llama.Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would round inputs to 10 mantissa bits
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_logits_match_cpu(tmp_path):
    cpu = _model()
    llama.save(cpu, tmp_path)
    gpu = llama.load(tmp_path, device="cuda")
    assert gpu.output.weight.device.type == "cuda" and gpu.rope_freqs.device.type == "cuda"
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = cpu(tokens)
        out = gpu(tokens.cuda()).cpu()
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


def test_cached_decode_matches_full_forward_on_cuda():
    model = _model().cuda()
    tokens = torch.randint(0, 256, (2, 30), device="cuda")
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 64)
        steps = [model(tokens[:, :7], 0)] + [model(tokens[:, i : i + 1], i) for i in range(7, 30)]
        model.clear_cache()
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max() / full.abs().max() < 1e-5


def test_greedy_generation_matches_cpu():
    cpu = _model()
    gpu = _model().cuda()
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7] * 11]
    want = llama.generate(cpu, prompts, 16, temperature=0, stop_tokens=[])
    got = llama.generate(gpu, prompts, 16, temperature=0, stop_tokens=[])
    assert got == want


def test_seeded_sampling_reproducible_on_cuda():
    gpu = _model().cuda()
    a = llama.generate(gpu, [[1, 2, 3]], 12, temperature=1.0, seed=5, stop_tokens=[])
    b = llama.generate(gpu, [[1, 2, 3]], 12, temperature=1.0, seed=5, stop_tokens=[])
    assert a == b and len(a[0]) == 12


def test_bf16_load_on_cuda_is_close(tmp_path):
    cpu = _model()
    llama.save(cpu, tmp_path)
    gpu = llama.load(tmp_path, device="cuda", dtype="bfloat16")
    assert gpu.output.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        ref = cpu(tokens)
        out = gpu(tokens.cuda()).cpu()
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() / ref.abs().max() < 5e-2
