"""scripts/convert.py: Meta <-> HF conversion is lossless, its HF output loads in transformers, and bad
requests fail without leaving anything behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama
from llama.core.checkpoint import convert

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert.py"


def random_model(vocab=300, tied=False, seed=0) -> llama.Transformer:
    config = llama.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_dim=160,
                               rope_theta=500000.0, rope_scaling=llama.RopeScaling("llama3", 8.0),
                               tie_word_embeddings=tied, max_seq_len=512)
    torch.manual_seed(seed)
    model = llama.Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(torch.bfloat16)


def shard_tensors(directory: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(f, weights_only=True) for f in sorted(directory.glob("consolidated.*.pth"))]


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_to_hf_to_meta_is_bit_identical(tmp_path, n_shards):
    src = tmp_path / "meta"
    llama.save(random_model(), src, format="meta", n_shards=n_shards)
    result = run(src, tmp_path / "hf", "--to", "hf", "--max-shard-size", "60KB")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1  # really sharded, with an index
    result = run(tmp_path / "hf", tmp_path / "back", "--to", "meta", "--shards", n_shards)
    assert result.returncode == 0, result.stderr

    before, after = shard_tensors(src), shard_tensors(tmp_path / "back")
    assert len(before) == len(after) == n_shards
    for a, b in zip(before, after):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype == torch.bfloat16
            assert torch.equal(a[name], b[name]), name
    assert json.loads((src / "params.json").read_text()) == json.loads((tmp_path / "back" / "params.json").read_text())


def test_hf_output_loads_in_transformers_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_model()
    llama.save(model, tmp_path / "meta", format="meta", n_shards=2)
    convert(tmp_path / "meta", tmp_path / "hf", format="hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    ours = llama.load(tmp_path / "meta", dtype="float32")
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = ours(tokens)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


def test_tied_output_is_tied_in_hf_and_stored_again_in_meta(tmp_path):
    model = random_model(tied=True)
    llama.save(model, tmp_path / "meta", format="meta")  # Meta's format stores the copy
    convert(tmp_path / "meta", tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    convert(tmp_path / "hf", tmp_path / "back", format="meta")
    a, b = shard_tensors(tmp_path / "meta")[0], shard_tensors(tmp_path / "back")[0]
    assert all(torch.equal(a[n], b[n]) for n in a) and a.keys() == b.keys()


def test_dtype_cast(tmp_path):
    llama.save(random_model(), tmp_path / "meta", format="meta")
    convert(tmp_path / "meta", tmp_path / "hf", format="hf", dtype="float32")
    model = llama.load(tmp_path / "hf")
    assert model.output.weight.dtype == torch.float32
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float32"


def test_existing_output_is_refused_and_left_alone(tmp_path):
    llama.save(random_model(), tmp_path / "meta", format="meta")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run(tmp_path / "meta", tmp_path / "out", "--to", "hf")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "already exists" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_bad_source_fails_without_output(tmp_path):
    result = run(tmp_path / "missing", tmp_path / "out", "--to", "hf")
    assert result.returncode == 2 and "error: " in result.stderr and "no such file or directory" in result.stderr
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_nothing(tmp_path):
    llama.save(random_model(), tmp_path / "meta", format="meta")
    with pytest.raises(llama.CheckpointError, match="cannot split 2 n_kv_heads across 4 shards"):
        convert(tmp_path / "meta", tmp_path / "out", format="meta", n_shards=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta"]  # no output, no temporary directory


@pytest.mark.parametrize(
    "args, message",
    [
        (["--to", "hf", "--shards", "2"], "--shards applies to --to meta"),
        (["--to", "meta", "--max-shard-size", "1GB"], "--max-shard-size applies to --to hf"),
        (["--to", "hf", "--max-shard-size", "lots"], "invalid size"),
        (["--to", "meta", "--shards", "0"], "positive integer"),
        (["--to", "xml"], "invalid choice"),
    ],
)
def test_bad_flags(tmp_path, args, message):
    result = run(tmp_path / "a", tmp_path / "b", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
