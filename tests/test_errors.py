"""Every bad checkpoint fails with a specific exception and a one-line message naming the problem and
the file, key or tensor at fault, and loading it writes or changes nothing.

Each case builds a tiny valid checkpoint with llama.save (or weights.save_meta), breaks one thing, and
calls llama.load through `fails`, which also hashes every file under the test's directory before and
after the load.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama
import weights
from llama import CheckpointError, ConfigError, ModelConfig, Transformer

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=64)
INDEX = "model.safetensors.index.json"


# ---- building checkpoints ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """Valid checkpoints of CONFIG in every layout, built once; tests break copies of them."""
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    root = tmp_path_factory.mktemp("pristine")
    llama.save(model, root / "hf", format="hf")
    llama.save(model, root / "hf-sharded", format="hf", max_shard_bytes=20_000)
    llama.save(model, root / "meta", format="meta")
    llama.save(model, root / "meta-2", format="meta", n_shards=2)
    for layout in ("hf", "hf-sharded", "meta", "meta-2"):
        llama.load(root / layout)  # each loads as built
    assert len(list((root / "hf-sharded").glob("*.safetensors"))) > 2
    return {layout: root / layout for layout in ("hf", "hf-sharded", "meta", "meta-2")}


@pytest.fixture
def ckpt(pristine, tmp_path):
    """ckpt(layout) -> a fresh copy of a valid checkpoint inside this test's tmp_path."""

    def copy(layout: str) -> Path:
        dst = tmp_path / layout
        shutil.copytree(pristine[layout], dst)
        return dst

    return copy


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: t.detach().clone() for name, t in Transformer(CONFIG).state_dict().items()}


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_safetensors(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def safetensors_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def rewrite_safetensors_header(path: Path, header) -> None:
    """Replace the JSON header in place, padded with spaces to its old length (data offsets stay valid)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n :])


def edit_shard(path: Path, edit) -> None:
    shard = torch.load(path, weights_only=True)
    edit(shard)
    torch.save(shard, path)


# ---- the check every case goes through ----------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path (directories listed too, as "dir")."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fails(path: Path, error: type[Exception], *fragments: str, names: Path | None = None) -> str:
    """llama.load(path) raises exactly `error` (not a subclass, not a generic ValueError) with a
    one-line message containing every fragment and naming `names` (default: path); every file
    under path's parent is unchanged and nothing new appears there. Returns the message."""
    watched = path.parent
    before = snapshot(watched)
    pattern = "".join(f"(?=.*{re.escape(f)})" for f in fragments)
    with pytest.raises(error, match=pattern) as info:
        llama.load(path)
    assert type(info.value) is error, f"expected {error.__name__}, got {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    assert str(names or path) in message, f"message does not name {names or path}: {message}"
    assert snapshot(watched) == before, "a failed load changed files"
    return message


def test_error_types_are_value_errors():
    assert issubclass(CheckpointError, ValueError) and issubclass(ConfigError, ValueError)
    assert llama.CheckpointError is weights.CheckpointError


# ---- not a checkpoint ---------------------------------------------------------------------------------

EXPECTED_FILES = ("params.json", "consolidated.", ".pth", "config.json", "model.safetensors")


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    fails(missing, CheckpointError, "no such file or directory")
    assert not missing.exists()


def test_empty_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, CheckpointError, "not a checkpoint", *EXPECTED_FILES)


def test_a_file_instead_of_a_directory(ckpt):
    file = ckpt("hf") / "config.json"
    fails(file, CheckpointError, "not a directory", *EXPECTED_FILES)


def test_directory_of_unrelated_files(tmp_path):
    d = tmp_path / "other"
    d.mkdir()
    (d / "model.bin").write_bytes(b"\0" * 16)
    (d / "README.md").write_text("hello")
    fails(d, CheckpointError, "not a checkpoint", *EXPECTED_FILES)


def test_meta_directory_without_weights(ckpt):
    d = ckpt("meta")
    (d / "consolidated.00.pth").unlink()
    fails(d, CheckpointError, "no consolidated.*.pth files beside params.json")


def test_hf_directory_without_weights(ckpt):
    d = ckpt("hf")
    (d / "model.safetensors").unlink()
    fails(d, CheckpointError, f"no model.safetensors or {INDEX} beside config.json")


def test_meta_shards_numbered_with_a_gap(ckpt):
    d = ckpt("meta-2")
    (d / "consolidated.01.pth").rename(d / "consolidated.02.pth")
    fails(d, CheckpointError, "['consolidated.00.pth', 'consolidated.02.pth'] are not numbered")


# ---- malformed JSON -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"dim": 32,', "{dim: 32}", "", "\xff"])
def test_malformed_params_json(ckpt, text):
    d = ckpt("meta")
    (d / "params.json").write_bytes(text.encode("latin-1"))
    reason = "cannot read" if text == "\xff" else "malformed JSON"
    fails(d, CheckpointError, f"{d / 'params.json'}: {reason}")


@pytest.mark.parametrize("text", ['{"hidden_size": 32', "[1, 2", "nan nan"])
def test_malformed_config_json(ckpt, text):
    d = ckpt("hf")
    (d / "config.json").write_text(text)
    fails(d, CheckpointError, f"{d / 'config.json'}: malformed JSON")


@pytest.mark.parametrize("layout, file", [("meta", "params.json"), ("hf", "config.json")])
def test_config_that_is_not_an_object(ckpt, layout, file):
    d = ckpt(layout)
    (d / file).write_text("[1, 2, 3]")
    fails(d, CheckpointError, f"{d / file}: expected a JSON object, got list")


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"weight_map": {', "malformed JSON: Expecting"),
        ('{"metadata": {}}', "malformed index: 'weight_map' is not an object"),
        ('{"weight_map": [1, 2]}', "malformed index: 'weight_map' is not an object"),
        ('{"weight_map": {"model.norm.weight": 3}}', "malformed index: 'weight_map' is not an object"),
        ("[1]", "expected a JSON object, got list"),
    ],
)
def test_malformed_index(ckpt, text, reason):
    d = ckpt("hf-sharded")
    (d / INDEX).write_text(text)
    fails(d, CheckpointError, f"{d / INDEX}: {reason}")


# ---- missing or invalid config keys ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["n_layers", "n_heads"])
def test_params_json_missing_key(ckpt, key):
    d = ckpt("meta")
    edit_json(d / "params.json", lambda p: p.pop(key))
    fails(d, ConfigError, f"{d / 'params.json'}: missing key {key!r}")


def test_params_json_missing_dim(ckpt):
    # The format layer needs dim to tell how shards were split, so it reports the key itself.
    d = ckpt("meta")
    edit_json(d / "params.json", lambda p: p.pop("dim"))
    fails(d, CheckpointError, f"{d / 'params.json'}: missing or non-integer key 'dim'")


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"])
def test_config_json_missing_key(ckpt, key):
    d = ckpt("hf")
    edit_json(d / "config.json", lambda c: c.pop(key))
    fails(d, ConfigError, f"{d / 'config.json'}: missing key {key!r}")


def test_config_json_missing_heads(ckpt):
    # The head counts drive the q/k permutation in the format layer, which reports them itself.
    d = ckpt("hf")
    edit_json(d / "config.json", lambda c: c.pop("num_attention_heads"))
    fails(d, CheckpointError, f"{d / 'config.json'}: missing or invalid 'num_attention_heads': None")


@pytest.mark.parametrize(
    "layout, file, key, value, message",
    [
        ("hf", "config.json", "hidden_size", "32", "'hidden_size' must be an integer, got '32'"),
        ("hf", "config.json", "num_key_value_heads", 3, "n_heads 4 is not a multiple of n_kv_heads 3"),
        ("hf", "config.json", "hidden_act", "gelu", "hidden_act 'gelu'; Llama uses silu"),
        ("hf", "config.json", "rope_scaling", {"rope_type": "longrope", "factor": 4.0}, "unsupported RoPE scaling type 'longrope'"),
        ("meta", "params.json", "n_kv_heads", 3, "n_heads 4 is not a multiple of n_kv_heads 3"),
        ("meta", "params.json", "use_scaled_rope", "yes", "'use_scaled_rope' must be true or false, got 'yes'"),
        ("hf", "config.json", "rope_scaling", 4.0, "'rope_scaling' must be an object or null, got 4.0"),
        ("hf", "config.json", "rope_scaling", "llama3", "'rope_scaling' must be an object or null, got 'llama3'"),
        ("hf", "config.json", "rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": [8192]},
         "'original_max_position_embeddings' must be an integer, got [8192]"),
        ("hf", "config.json", "rope_scaling", {"rope_type": "linear", "factor": "4"}, "'factor' must be a number, got '4'"),
        # Close cousins and unknown keys: refused by name, never loaded as a Llama.
        ("hf", "config.json", "model_type", "qwen2", "unsupported model_type 'qwen2'"),
        ("hf", "config.json", "parallel_residual", True, "unknown keys ['parallel_residual']"),
        ("hf", "config.json", "quantization_config", {"quant_method": "gptq"}, "has a quantization_config"),
        ("meta", "params.json", "vision_chunk_size", 448, "unknown keys ['vision_chunk_size']"),
        # Values that raised ZeroDivisionError / ValueError / TypeError or never returned.
        ("meta", "params.json", "multiple_of", 0, "multiple_of 0 and ffn_dim_multiplier 0.752941 must be positive"),
        ("meta", "params.json", "ffn_dim_multiplier", float("nan"), "'ffn_dim_multiplier' must be a finite number, got nan"),
        ("meta", "params.json", "dim", 2**64, f"dim {2**64} must be a positive integer of at most"),
        ("meta", "params.json", "vocab_size", 2**64, f"vocab_size {2**64} is beyond any model"),
        ("meta", "params.json", "n_layers", 2**64, f"n_layers {2**64} is beyond any model"),
        ("hf", "config.json", "num_hidden_layers", 2**64, f"n_layers {2**64} is beyond any model"),
    ],
)
def test_invalid_config_value(ckpt, layout, file, key, value, message):
    d = ckpt(layout)
    edit_json(d / file, lambda c: c.__setitem__(key, value))
    fails(d, ConfigError, f"{d / file}: ", message)


# ---- truncated and corrupt safetensors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, cut, reason",
    [
        ("prefix", lambda n, size: 0, "no header"),
        ("prefix", lambda n, size: 5, "no header"),
        ("header", lambda n, size: 8, f"header says"),
        ("header", lambda n, size: 8 + n // 2, "header says"),
        ("header", lambda n, size: 8 + n - 1, "header says"),
        ("data", lambda n, size: 8 + n, "truncated file: tensor"),
        ("data", lambda n, size: 8 + n + (size - 8 - n) // 2, "truncated file: tensor"),
        ("data", lambda n, size: size - 1, "truncated file: tensor 'model.norm.weight'"),
    ],
)
def test_truncated_safetensors(ckpt, where, cut, reason):
    d = ckpt("hf")
    file = d / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    file.write_bytes(raw[: cut(n, len(raw))])
    fails(d, CheckpointError, f"{file}: ", "truncated", reason, names=file)


def test_truncated_shard_of_a_sharded_hf_checkpoint(ckpt):
    d = ckpt("hf-sharded")
    file = d / "model-00002-of-00006.safetensors"
    file.write_bytes(file.read_bytes()[:-4])
    fails(d, CheckpointError, f"{file}: truncated file: tensor", names=file)


def test_garbage_safetensors_header(ckpt):
    d = ckpt("hf")
    file = d / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    file.write_bytes(raw[:8] + b"\x00garbage{" * (n // 9) + b"x" * (n % 9) + raw[8 + n :])
    fails(d, CheckpointError, f"{file}: corrupt safetensors header", names=file)


def test_safetensors_header_length_absurd(ckpt):
    d = ckpt("hf")
    file = d / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes((2**63).to_bytes(8, "little") + raw[8:])
    fails(d, CheckpointError, f"{file}: corrupt or truncated safetensors file (header says {2**63} bytes", names=file)


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda h: [1, 2], "corrupt safetensors header: not a JSON object"),
        (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "dtype": "F7"}}, "corrupt header entry for tensor 'model.norm.weight'"),
        (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "shape": [16]}}, "corrupt header entry for tensor 'model.norm.weight': 128 bytes for shape [16]"),
        (lambda h: {**h, "model.norm.weight": 3}, "corrupt header entry for tensor 'model.norm.weight'"),
        (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "data_offsets": [90000, 90128]}}, "truncated file: tensor 'model.norm.weight'"),
    ],
)  # fmt: skip
def test_corrupt_safetensors_header_entries(ckpt, edit, reason):
    d = ckpt("hf")
    file = d / "model.safetensors"
    rewrite_safetensors_header(file, edit(safetensors_header(file)[1]))
    fails(d, CheckpointError, f"{file}: {reason}", names=file)


# ---- truncated and corrupt .pth ------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.25, 0.5, 0.9, 0.999])
def test_truncated_pth(ckpt, fraction):
    d = ckpt("meta")
    file = d / "consolidated.00.pth"
    raw = file.read_bytes()
    file.write_bytes(raw[: int(len(raw) * fraction)])
    fails(d, CheckpointError, f"{file}: corrupt or truncated PyTorch checkpoint", names=file)


def test_truncated_second_meta_shard(ckpt):
    d = ckpt("meta-2")
    file = d / "consolidated.01.pth"
    file.write_bytes(file.read_bytes()[:-100])
    fails(d, CheckpointError, f"{file}: corrupt or truncated PyTorch checkpoint", names=file)


@pytest.mark.parametrize("garbage", [b"\x00" * 4096, os.urandom(4096), b"PK\x03\x04" + os.urandom(4096)])
def test_garbage_pth(ckpt, garbage):
    d = ckpt("meta")
    file = d / "consolidated.00.pth"
    file.write_bytes(garbage)
    fails(d, CheckpointError, f"{file}: corrupt or truncated PyTorch checkpoint", names=file)


class CreatesFile:
    """Unpickling this object opens (creates) a file: stands in for any code a pickle can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("where", ["beside the tensors", "the whole file"])
def test_pth_with_code_is_refused_and_never_run(ckpt, tmp_path, where):
    d = ckpt("meta")
    file = d / "consolidated.00.pth"
    marker = tmp_path / "pwned"
    if where == "the whole file":
        torch.save(CreatesFile(marker), file)
    else:
        edit_shard(file, lambda s: s.__setitem__("payload", CreatesFile(marker)))

    # The payload is live: a plain unpickle runs it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(CreatesFile(probe))).close()
    assert probe.exists(), "the test payload does not run when unpickled"

    fails(d, CheckpointError, f"{file}: refused to load: it holds objects other than tensors", "io.open", names=file)
    assert not marker.exists(), "loading ran code from the checkpoint"


@pytest.mark.parametrize("content", [[torch.zeros(2)], {"x": 3}, {"x": "text"}, torch.zeros(3)])
def test_pth_that_is_not_a_dict_of_tensors(ckpt, content):
    d = ckpt("meta")
    file = d / "consolidated.00.pth"
    torch.save(content, file)
    fails(d, CheckpointError, f"{file}: expected a dict of tensors", names=file)


# ---- tensors that disagree with the config ---------------------------------------------------------------


def test_meta_tensor_with_wrong_shape(tmp_path):
    d = tmp_path / "meta"
    state = state_dict()
    state["layers.1.attention.wk.weight"] = torch.zeros(4, 32)
    weights.save_meta(d, CONFIG.to_meta(), state)
    fails(d, CheckpointError, "tensor 'layers.1.attention.wk.weight' has shape [4, 32], but the config expects [16, 32]",
          names=d / "consolidated.00.pth")  # fmt: skip


def test_hf_tensor_with_wrong_shape(ckpt):
    d = ckpt("hf")
    edit_safetensors(d / "model.safetensors", lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(63, 32)))
    message = fails(d, CheckpointError, "has shape [63, 32], but the config expects [64, 32]", names=d / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight" in message  # the name in the file
    assert "layers.0.feed_forward.w3.weight" in message  # the name in the model


def test_embedding_disagreeing_with_vocab_size(ckpt):
    d = ckpt("hf")

    def edit(config):
        config["vocab_size"] = config["llama_from_scratch"]["vocab_size"] = 51

    edit_json(d / "config.json", edit)
    fails(d, CheckpointError, "'tok_embeddings.weight' has shape [50, 32], but the config expects [51, 32]")


def test_quantization_entry_over_ordinary_tensors(ckpt):
    """A 'quantization' block in the config.json of an ordinary checkpoint: an error naming it, not
    a KeyError from deep inside the loader."""
    d = ckpt("hf")
    edit_json(d / "config.json", lambda c: c.__setitem__("quantization", {"mode": "int8", "group_size": 128}))
    fails(d, CheckpointError, "config.json has a 'quantization' entry, but this is not a quantized checkpoint")
    edit_json(d / "config.json", lambda c: c.__setitem__("quantization", {"mode": "int8", "bits": 3}))
    fails(d, CheckpointError, "malformed 'quantization' entry")


def test_config_json_edited_against_its_full_config(ckpt):
    """config.json's HF fields and the full ModelConfig beside them must agree: an edit to one alone
    is named, not silently overridden by the other."""
    d = ckpt("hf")
    edit_json(d / "config.json", lambda c: c.__setitem__("num_hidden_layers", 3))
    fails(d, ConfigError, "'num_hidden_layers' is 3 but its llama_from_scratch entry says 2")


def test_meta_missing_tensor(tmp_path):
    d = tmp_path / "meta"
    state = state_dict()
    del state["layers.0.feed_forward.w3.weight"]
    weights.save_meta(d, CONFIG.to_meta(), state)
    fails(d, CheckpointError, f"{d}: missing tensors: layers.0.feed_forward.w3.weight")


def test_meta_many_missing_tensors_are_listed(tmp_path):
    d = tmp_path / "meta"
    state = {n: t for n, t in state_dict().items() if not n.startswith("layers.1.")}
    weights.save_meta(d, CONFIG.to_meta(), state)
    fails(d, CheckpointError, f"{d}: missing tensors: layers.1.attention_norm.weight, layers.1.attention.wq.weight", " ...")


def test_meta_unexpected_tensor(tmp_path):
    d = tmp_path / "meta"
    state = state_dict()
    state["layers.2.attention.wq.weight"] = torch.zeros(32, 32)
    weights.save_meta(d, CONFIG.to_meta(), state)
    fails(d, CheckpointError, f"{d}: unexpected tensors: layers.2.attention.wq.weight")


def test_meta_rope_freqs_is_ignored(tmp_path):
    """Llama 1/2 files hold a rope.freqs table; it is derived, not unexpected."""
    d = tmp_path / "meta"
    state = state_dict()
    state["rope.freqs"] = torch.zeros(4)
    weights.save_meta(d, CONFIG.to_meta(), state)
    llama.load(d)


def test_hf_missing_tensor(ckpt):
    d = ckpt("hf")
    edit_safetensors(d / "model.safetensors", lambda t: t.pop("model.norm.weight"))
    fails(d, CheckpointError, f"{d}: missing tensors: norm.weight")


def test_hf_unknown_tensor(ckpt):
    d = ckpt("hf")
    edit_safetensors(d / "model.safetensors", lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.ones(8)))
    fails(d, CheckpointError, f"{d}: unexpected tensors", "'model.layers.0.self_attn.q_proj.bias' (in model.safetensors)")


def test_variant_tensors_in_a_plain_llama_file(ckpt):
    """Qwen3's per-head norms in a file whose config says llama: the config does not describe the
    weights, so the load stops instead of dropping them."""
    d = ckpt("hf")
    edit_safetensors(d / "model.safetensors", lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(8)))
    fails(d, CheckpointError, f"{d}: unexpected tensors: layers.0.attention.q_norm.weight")


def test_hf_tensor_of_a_layer_too_many(ckpt):
    d = ckpt("hf")
    edit_safetensors(d / "model.safetensors", lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight", torch.ones(64, 32)))
    fails(d, CheckpointError, f"{d}: unexpected tensors: layers.2.feed_forward.w3.weight")


def test_hf_rotary_inv_freq_is_ignored(ckpt):
    d = ckpt("hf")
    edit_safetensors(d / "model.safetensors", lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4)))
    llama.load(d)


def test_unsupported_weight_dtype(ckpt):
    d = ckpt("hf")
    edit_safetensors(d / "model.safetensors", lambda t: t.update({k: v.double() for k, v in t.items()}))
    fails(d, CheckpointError, "(model.embed_tokens.weight): unsupported weight dtype torch.float64", names=d / "model.safetensors")


def test_integer_weights_are_refused(ckpt):
    d = ckpt("hf")
    edit_safetensors(d / "model.safetensors", lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    fails(d, CheckpointError, "(model.norm.weight): unsupported weight dtype torch.int32", names=d / "model.safetensors")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/elsewhere.safetensors", "sub/dir.safetensors"])
def test_index_naming_a_path_outside_the_checkpoint(ckpt, shard):
    d = ckpt("hf-sharded")
    edit_json(d / "model.safetensors.index.json", lambda index: index["weight_map"].update({"model.norm.weight": shard}))
    fails(d, CheckpointError, f"shard {shard!r} is not a file name", names=d / "model.safetensors.index.json")


# ---- Meta shards that disagree --------------------------------------------------------------------------


def test_shards_with_different_tensor_sets(ckpt):
    d = ckpt("meta-2")
    edit_shard(d / "consolidated.01.pth", lambda s: s.pop("layers.0.attention.wq.weight"))
    fails(d, CheckpointError, f"{d}: shards disagree: consolidated.01.pth lacks ['layers.0.attention.wq.weight']")


def test_shard_with_an_extra_tensor(ckpt):
    d = ckpt("meta-2")
    edit_shard(d / "consolidated.01.pth", lambda s: s.__setitem__("bogus", torch.zeros(1)))
    fails(d, CheckpointError, f"{d}: shards disagree: consolidated.01.pth", "has extra ['bogus']")


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("layers.0.attention.wq.weight", (16, 31), "tensor 'layers.0.attention.wq.weight': shapes [(16, 32), (16, 31)] cannot be joined along dim 0"),
        ("layers.0.attention.wo.weight", (31, 16), "tensor 'layers.0.attention.wo.weight': shapes [(32, 16), (31, 16)] cannot be joined along dim 1"),
        ("layers.0.attention.wq.weight", (16, 32, 1), "tensor 'layers.0.attention.wq.weight': shapes [(16, 32), (16, 32, 1)]"),
        ("norm.weight", (31,), "replicated tensor 'norm.weight': shapes [(32,), (31,)]"),
    ],
)  # fmt: skip
def test_shards_with_incompatible_shapes(ckpt, name, shape, message):
    d = ckpt("meta-2")
    edit_shard(d / "consolidated.01.pth", lambda s: s.__setitem__(name, torch.zeros(shape)))
    fails(d, CheckpointError, f"{d}: shards disagree on ", message)


def test_shards_that_join_to_the_wrong_shape(ckpt):
    d = ckpt("meta-2")
    edit_shard(d / "consolidated.01.pth", lambda s: s.__setitem__("layers.0.attention.wq.weight", torch.zeros(8, 32)))
    fails(d, CheckpointError, "tensor 'layers.0.attention.wq.weight' has shape [24, 32], but the config expects [32, 32]")


# ---- HF index and shards --------------------------------------------------------------------------------


def test_index_pointing_at_a_missing_shard(ckpt):
    d = ckpt("hf-sharded")
    (d / "model-00003-of-00006.safetensors").unlink()
    fails(d, CheckpointError, f"{d / INDEX}: lists shard 'model-00003-of-00006.safetensors', which does not exist")


def test_index_naming_the_wrong_shard(ckpt):
    d = ckpt("hf-sharded")
    edit_json(d / INDEX, lambda i: i["weight_map"].__setitem__("model.norm.weight", "model-00001-of-00006.safetensors"))
    fails(d, CheckpointError, f"{d / INDEX}: says 'model.norm.weight' is in model-00001-of-00006.safetensors, but that file has no such tensor")


def test_shard_tensor_missing_from_index(ckpt):
    d = ckpt("hf-sharded")
    index = json.loads((d / INDEX).read_text())
    file = index["weight_map"].pop("model.norm.weight")
    (d / INDEX).write_text(json.dumps(index))
    fails(d, CheckpointError, f"{d / file}: tensor 'model.norm.weight' is missing from {INDEX}", names=d / file)


# ---- a load that fails leaves a usable directory ---------------------------------------------------------


def test_fixing_the_file_makes_it_load(ckpt):
    """The failure is the file's, not a state left behind: repair it and the same path loads."""
    d = ckpt("hf")
    good = (d / "config.json").read_text()
    (d / "config.json").write_text("{")
    fails(d, CheckpointError, "malformed JSON")
    (d / "config.json").write_text(good)
    assert isinstance(llama.load(d), Transformer)
