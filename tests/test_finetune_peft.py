"""LoRA adapters in peft's layout, both ways, against peft itself on transformers' LlamaForCausalLM.

Each case writes a tiny random base checkpoint in HF layout (llama.save), then:
- ours -> peft: adapters made here (random B, so they change the output) are saved with
  lora.save_adapter and loaded by peft onto transformers' model of the same base;
- peft -> ours: adapters made by peft (get_peft_model, random B) are saved with save_pretrained and
  loaded here with lora.load_adapter;
and the logits are compared. GQA makes the q and k permutations differ (n_heads vs n_kv_heads).
Tolerance: float32 on both sides, the same as the whole-model parity tests.
"""

from __future__ import annotations

import json

import pytest
import torch
from random_models import random_model

import llama
from llama import ModelConfig
from llama.training import lora
from weights import CheckpointError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),  # the tied lm_head case
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
]

FP32_TOL = 1e-5  # max |ours - peft| / max |peft|, as in test_parity_hf.py
CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=96, max_seq_len=64)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def base_checkpoint(tmp_path, tied: bool):
    model = random_model(CONFIG.replace(tie_word_embeddings=tied), std=0.1, random_norms=True)
    llama.save(model, tmp_path / "base", format="hf")
    return model, tmp_path / "base"


def tokens():
    return torch.randint(0, CONFIG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7))


def hf_model(path):
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora.lora_modules(model):
            for B in module.lora_B.values():
                B.copy_(torch.randn(B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("targets,rslora,layers", [(ALL, False, None), (["q_proj", "k_proj", "lm_head"], True, None),
                                                   (["wq", "w2"], False, [1])])  # fmt: skip
def test_adapter_made_here_loads_in_peft_with_the_same_logits(tmp_path, tied, targets, rslora, layers):
    model, base = base_checkpoint(tmp_path, tied)
    lora.apply_lora(model, targets, rank=4, alpha=12, rslora=rslora, layers=layers)
    random_b(model)
    lora.save_adapter(model, tmp_path / "adapter", base_model=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12 and config["use_rslora"] == rslora

    x = tokens()
    with torch.no_grad():
        ours = model(x)
        ref = PeftModel.from_pretrained(hf_model(base), tmp_path / "adapter").eval()(x).logits
        plain = hf_model(base)(x).logits
    assert rel_err(ours, ref) < FP32_TOL
    assert rel_err(plain, ref) > 1e-3  # the adapter matters


@pytest.mark.parametrize("tied", [False, True])
def test_adapter_made_by_peft_loads_here_with_the_same_logits(tmp_path, tied):
    _, base = base_checkpoint(tmp_path, tied)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, rank_pattern={"k_proj": 2},
                        alpha_pattern={r"model\.layers\.1\.mlp\.down_proj": 5}, task_type="CAUSAL_LM")  # fmt: skip
    theirs = get_peft_model(hf_model(base), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    x = tokens()
    with torch.no_grad():
        ref = theirs.eval()(x).logits

    ours = llama.load(base, dtype="float32")
    lora.load_adapter(ours, tmp_path / "peft")
    assert ours.layers[0].attention.wk.lora_A["default"].shape == (2, 64)  # rank_pattern
    assert ours.layers[1].feed_forward.w2.scaling["default"] == 5 / 4 and ours.layers[0].feed_forward.w2.scaling["default"] == 2
    with torch.no_grad():
        assert rel_err(ours(x), ref) < FP32_TOL
    # llama.load(adapter=) merges it into the weights: the same logits from a plain model
    merged = llama.load(base, dtype="float32", adapter=tmp_path / "peft")
    assert not list(lora.lora_modules(merged))
    with torch.no_grad():
        assert rel_err(merged(x), ref) < FP32_TOL
    # ... and saving it again here gives peft the same adapter back (patterns included)
    lora.save_adapter(ours, tmp_path / "again")
    with torch.no_grad():
        again = PeftModel.from_pretrained(hf_model(base), tmp_path / "again").eval()(x).logits
    assert rel_err(again, ref) < FP32_TOL


def test_peft_adapter_on_lm_head_with_its_base_copy(tmp_path):
    """peft saves lm_head's base weight with an adapter that targets it; it must be this base's."""
    _, base = base_checkpoint(tmp_path, tied=False)
    theirs = get_peft_model(hf_model(base), LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head", "v_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    ours = llama.load(base, dtype="float32")
    lora.load_adapter(ours, tmp_path / "peft")  # the copy matches: loads
    other = random_model(CONFIG, seed=9, std=0.1)
    with pytest.raises(CheckpointError, match=r"carries its own output.weight .* differs from this model's"):
        lora.load_adapter(other, tmp_path / "peft")


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "use_dora = True is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'; only LoRA adapters"),
    ({"bias": "all"}, "bias = 'all' is not supported"),
    ({"modules_to_save": ["embed_tokens"]}, "modules_to_save = ['embed_tokens'] is not supported"),
    ({"some_new_feature": {"on": True}}, "some_new_feature = {'on': True} is not supported"),
    ({"r": 0}, "r must be a positive number, got 0"),
    ({"r": 8}, "has rank 4, but the config says 8"),
])  # fmt: skip
def test_adapter_features_not_implemented_are_refused(tmp_path, change, message):
    model, base = base_checkpoint(tmp_path, tied=False)
    lora.apply_lora(model, ["q_proj"], rank=4)
    lora.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "some_new_feature": None, **change}))  # off: accepted
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("(", r"\(")):
        lora.load_adapter(llama.load(base, dtype="float32"), tmp_path / "a")


def test_adapter_tensors_checked_against_the_model(tmp_path):
    from weights.safetensors_io import save_safetensors

    model, base = base_checkpoint(tmp_path, tied=False)
    lora.apply_lora(model, ["q_proj"], rank=4)
    lora.save_adapter(model, tmp_path / "a")
    target = llama.load(base, dtype="float32")
    prefix = "base_model.model.model.layers.0."
    cases = {
        f"{prefix}self_attn.q_proj.lora_magnitude_vector": ((64,), "(DoRA) is not supported"),
        f"{prefix}input_layernorm.lora_A.weight": ((4, 64), "layers.0.attention_norm, a RMSNorm: LoRA here adapts the projections"),
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": ((4, 64), "has lora_A but not both"),
    }  # fmt: skip
    for extra, (shape, message) in cases.items():
        directory = tmp_path / f"bad{len(extra)}"
        directory.mkdir()
        (directory / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
        tensors = {extra: torch.zeros(shape), **({extra.replace("lora_A", "lora_B"): torch.zeros(64, 4)} if "norm" in extra else {})}
        save_safetensors(directory / "adapter_model.safetensors", tensors)
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            lora.load_adapter(target, directory)
    other = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=96)
    with pytest.raises(CheckpointError, match=r"layers.0.attention.wq: lora_A \[4, 64\] and lora_B \[64, 4\] do not fit a projection of 32 -> 32"):
        lora.load_adapter(random_model(other), tmp_path / "a")
    with pytest.raises(CheckpointError, match="no such adapter directory"):
        lora.load_adapter(target, tmp_path / "missing")
