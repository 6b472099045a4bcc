"""Training from scratch: the tokenizer trainer, data, schedule, the loop, resuming, perplexity, and the
scripts (train_tokenizer, train, perplexity, prepare_kjv), on a tokenizer and corpus made here.

Scripts are not a package; their main(argv) is called in-process after loading the file by path,
and one end-to-end run goes through a real subprocess.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llama
from llama import ModelConfig, Transformer
from llama.training.evaluate import perplexity
from llama.core.tokenizer import SentencePieceTokenizer
from llama.training.pretrain import (TrainConfig, encode_documents, eval_batches, get_batch, init_weights, lr_at,
                            make_optimizer, split_documents, train)  # fmt: skip

SCRIPTS = Path(__file__).parents[1] / "scripts"
VOCAB = 400


def load_script(name: str):
    """scripts/NAME.py imported as the installed package llama_cli imports it (train.py and finetune.py
    import their sibling loop_flags.py relatively), from this checkout's scripts/ whatever is installed."""
    if getattr(sys.modules.get("llama_cli"), "__path__", None) != [str(SCRIPTS)]:
        spec = importlib.util.spec_from_file_location("llama_cli", SCRIPTS / "__init__.py",
                                                      submodule_search_locations=[str(SCRIPTS)])  # fmt: skip
        package = importlib.util.module_from_spec(spec)
        sys.modules["llama_cli"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"llama_cli.{name}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machines running the tests are shared: one thread is fastest, and the determinism tests
    compare runs made with the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NOUNS = "king queen land water light city house child people prophet servant shepherd river mountain garden".split()
VERBS = "saw took gave made found called blessed followed built crossed remembered".split()
ADJS = "great little old holy dark green golden wise".split()
PLACES = "in the land of|by the river of|upon the mountain of|unto the city of".split("|")
NAMES = "Israel Egypt Judah Moab Zion Babylon".split()


def english_like(n_lines: int, seed: int) -> str:
    """Sentences from a tiny grammar: learnable structure over a vocabulary of ~60 words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        subject = f"the {rng.choice(ADJS)} {rng.choice(NOUNS)}" if rng.random() < 0.5 else f"the {rng.choice(NOUNS)}"
        sentence = f"{subject} {rng.choice(VERBS)} the {rng.choice(NOUNS)}"
        if rng.random() < 0.6:
            sentence += f" {rng.choice(PLACES)} {rng.choice(NAMES)}"
        if rng.random() < 0.1:
            sentence += f" in the year {rng.randint(1, 2000)}"
        lines.append(("And " if rng.random() < 0.3 else "") + sentence[0].upper() + sentence[1:] + rng.choice(".;:."))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.txt").write_text(english_like(400, seed=0))
    (root / "valid.txt").write_text(english_like(40, seed=1))
    return root


@pytest.fixture(scope="module")
def tokenizer_path(corpus) -> Path:
    out = corpus / "tok" / "tokenizer.model"
    assert load_script("train_tokenizer").main([str(corpus / "train.txt"), "--vocab-size", str(VOCAB), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return llama.load_tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def data(tokenizer, corpus) -> np.ndarray:
    return encode_documents(tokenizer, [(corpus / "train.txt").read_text()])


def tiny_config(vocab_size: int = VOCAB, context: int = 32) -> ModelConfig:
    return ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, ffn_dim=128, max_seq_len=context)


# ---- the tokenizer ---------------------------------------------------------------------------------


def test_trained_tokenizer_is_llama2_like(tokenizer, tokenizer_path, corpus, tmp_path):
    assert isinstance(tokenizer, SentencePieceTokenizer)  # detected by content
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer._model.unk_id()) == (1, 2, -1, 0)
    pieces = [tokenizer._model.id_to_piece(i) for i in range(3, 259)]
    assert pieces == [f"<0x{b:02X}>" for b in range(256)]  # byte fallback pieces at 3..258, as in Llama 2
    # Characters never seen in training are spelled in bytes and come back intact.
    text = "The king saw 🙂 naïve ∑ 日本 — 2024!"
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert tokenizer._model.unk_id() not in ids
    assert tokenizer.decode(ids) == text
    digits = [tokenizer._model.id_to_piece(i) for i in tokenizer.encode("1611", bos=False, eos=False)]
    assert [p.strip("▁") for p in digits if p.strip("▁")] == ["1", "6", "1", "1"]  # split_digits
    # Deterministic: the same input gives the same pieces.
    again = tmp_path / "again.model"
    assert load_script("train_tokenizer").main([str(corpus / "train.txt"), "--vocab-size", str(VOCAB), "--output", str(again)]) == 0
    other = llama.load_tokenizer(again)
    assert [other._model.id_to_piece(i) for i in range(VOCAB)] == [tokenizer._model.id_to_piece(i) for i in range(VOCAB)]


# ---- data, schedule, initialisation ----------------------------------------------------------------


def test_documents_and_batches(tokenizer, data):
    assert split_documents("a b\n\n c\nd\n", "line") == ["a b", " c", "d"]
    assert split_documents("a b\nc\n \nd\n", "paragraph") == ["a b\nc", "d"]
    ids = encode_documents(tokenizer, ["The king saw.\nThe queen saw.\n"])
    first = tokenizer.encode("The king saw.", bos=True, eos=True)
    assert ids.tolist() == first + tokenizer.encode("The queen saw.", bos=True, eos=True)
    assert ids.dtype == np.int32

    x, y = get_batch(data, 4, 16, seed=3, step=7)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    x2, _ = get_batch(data, 4, 16, seed=3, step=7)
    x3, _ = get_batch(data, 4, 16, seed=3, step=8)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    assert [torch.equal(a, b) for (a, _), (b, _) in zip(eval_batches(data, 4, 16, 2), eval_batches(data, 4, 16, 2))] == [True, True]


def test_lr_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, **kw) for s in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up, peak at step 9
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine: the mean of lr and min_lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)


def test_init_weights_and_optimizer_groups():
    config = ModelConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=512)
    model = init_weights(Transformer(config), seed=0)
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.02)
    for w in (model.layers[3].attention.wo.weight, model.layers[3].feed_forward.w2.weight):
        assert w.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert torch.equal(model.norm.weight, torch.ones(256)) and torch.equal(model.layers[1].ffn_norm.weight, torch.ones(256))
    again = init_weights(Transformer(config), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))

    decay, no_decay = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---- the loop --------------------------------------------------------------------------------------


def test_loss_falls(data, tokenizer, corpus):
    valid = encode_documents(tokenizer, [(corpus / "valid.txt").read_text()])
    model = init_weights(Transformer(tiny_config()), seed=0)
    config = TrainConfig(max_steps=40, batch_size=8, context=32, lr=1e-2, min_lr=1e-3, warmup_steps=5,
                         eval_every=20, eval_batches=2, precision="auto")  # fmt: skip
    result = train(model, data, valid, config, progress=False)
    first = result.train_losses[0][1]
    assert first == pytest.approx(math.log(VOCAB), rel=0.05)  # small init: near-uniform predictions
    assert result.final_train_loss < 0.6 * first
    assert [s for s, _ in result.valid_losses] == [20, 40]
    assert result.final_valid_loss < 0.6 * first
    assert result.completed and result.step == 40 and result.tokens_seen == 40 * 8 * 32


def test_resumed_run_equals_uninterrupted_run(data, tmp_path):
    config = TrainConfig(max_steps=9, batch_size=4, grad_accum=2, context=32, lr=5e-3, min_lr=5e-4, warmup_steps=3,
                         eval_every=4, eval_batches=1, save_every=100, precision="float32")  # fmt: skip
    valid = data[-500:]

    straight = init_weights(Transformer(tiny_config()), seed=1)
    full = train(straight, data, valid, config, out_dir=tmp_path / "straight", progress=False)

    paused = init_weights(Transformer(tiny_config()), seed=1)
    first = train(paused, data, valid, config, out_dir=tmp_path / "paused", stop_at=5, progress=False)
    assert first.step == 5 and not first.completed
    resumed = Transformer(tiny_config())  # fresh weights: everything comes from the saved state
    second = train(resumed, data, valid, dataclasses.replace(config, eval_every=3), out_dir=tmp_path / "paused",
                   resume=True, progress=False)  # bookkeeping settings may change
    assert second.completed and second.step == 9
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert second.train_losses == full.train_losses  # bit for bit, losses of the first session included

    with pytest.raises(ValueError, match=r"lr: saved 0.005, now 0.001"):
        train(Transformer(tiny_config()), data, valid, dataclasses.replace(config, lr=1e-3),
              out_dir=tmp_path / "paused", resume=True, progress=False)  # fmt: skip
    with pytest.raises(FileExistsError, match="train_state.pt exists"):
        train(Transformer(tiny_config()), data, valid, config, out_dir=tmp_path / "paused", progress=False)
    with pytest.raises(ValueError, match=r"train data: saved fingerprint"):
        train(Transformer(tiny_config()), data[:-1], valid, config, out_dir=tmp_path / "paused", resume=True, progress=False)


def test_train_config_errors(data):
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        TrainConfig(max_steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match="min_lr 0.1 and lr 0.01"):
        TrainConfig(lr=0.01, min_lr=0.1)
    with pytest.raises(ValueError, match="context 64 exceeds the model's max_seq_len 32"):
        train(Transformer(tiny_config()), data, None, TrainConfig(context=64, warmup_steps=0), progress=False)
    with pytest.raises(ValueError, match="token ids >= the model's vocab_size 100"):
        train(Transformer(tiny_config(vocab_size=100)), data, None, TrainConfig(context=32, warmup_steps=0), progress=False)


# ---- perplexity ------------------------------------------------------------------------------------


def reference_nll(model, tokens: list[int], context_len: int, stride: int, bos_id: int | None) -> tuple[float, int]:
    """Token by token, from the definition: window k covers text tokens [k*stride, k*stride + span); token t is
    scored by the first window that covers it and has something before it (BOS, or an earlier token), given
    that window's tokens before t. Nothing here shares code with llama.training.evaluate."""
    span = context_len - (bos_id is not None)
    n_windows = 1 + max(0, math.ceil((len(tokens) - span) / stride))
    total, count = 0.0, 0
    for t in range(len(tokens)):
        for k in range(n_windows):
            begin = k * stride
            if begin <= t < begin + span and (bos_id is not None or begin < t):
                context = ([bos_id] if bos_id is not None else []) + tokens[begin:t]
                logits = model(torch.tensor([context]))[0, -1]
                total -= torch.log_softmax(logits.double(), -1)[tokens[t]].item()
                count += 1
                break
            if begin <= t < begin + span:  # covered, but first in its window without BOS: unscored there
                break
    return total, count


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=64, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)  # large weights: confident, position-dependent predictions
    return model.eval()


@pytest.mark.parametrize("context_len, stride, bos", [(8, 8, False), (8, 3, False), (8, 7, True), (8, 1, True), (64, 32, False)])
@torch.no_grad()
def test_perplexity_matches_the_definition(random_model, context_len, stride, bos):
    tokens = torch.randint(3, 50, (29,), generator=torch.Generator().manual_seed(stride)).tolist()
    bos_id = 1 if bos else None
    result = perplexity(random_model, tokens, context_len, stride, bos_id=bos_id)
    nll, count = reference_nll(random_model, tokens, context_len, stride, bos_id)
    assert result.n_tokens == count
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert (result.context_len, result.stride, result.bos) == (context_len, stride, bos)
    if stride < context_len - bos:
        assert count == len(tokens) - (not bos)  # every token scored once, but the first without BOS


@torch.no_grad()
def test_perplexity_of_one_window_is_the_full_forward_loss(random_model):
    tokens = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(0))
    logits = random_model(tokens)
    expected = F.cross_entropy(logits[0, :-1], tokens[0, 1:]).item()
    result = perplexity(random_model, tokens[0], context_len=64, stride=64)
    assert result.n_tokens == 39 and result.n_windows == 1
    assert math.log(result.ppl) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"stride must be in \[1, 7\] for context_len 8 with BOS, got 8"):
        perplexity(random_model, tokens[0], 8, 8, bos_id=1)
    with pytest.raises(ValueError, match="need at least 2 tokens"):
        perplexity(random_model, tokens[0, :1], 8, 4)


# ---- the scripts -----------------------------------------------------------------------------------


def shape_flags(context: int = 32) -> list[str]:
    return ["--dim", "48", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--context", str(context),
            "--batch-size", "8", "--eval-every", "10", "--eval-batches", "2", "--warmup-steps", "3", "--no-progress"]  # fmt: skip


def test_train_script_writes_a_checkpoint_that_loads_and_generates(corpus, tokenizer_path, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"), "--tokenizer", str(tokenizer_path),
            "--out", str(out), "--max-steps", "30", "--lr", "1e-2", *shape_flags()]  # fmt: skip
    assert load_script("train").main(argv) == 0
    assert "done: train loss" in capsys.readouterr().err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 30 and summary["tokens_seen"] == 30 * 8 * 32
    assert summary["final_valid_loss"] < 0.7 * math.log(VOCAB)
    assert summary["model"]["dim"] == 48 and summary["model"]["vocab_size"] == VOCAB and summary["parameters"] > 0
    try:
        import matplotlib  # noqa: F401

        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert not (out / "loss.png").exists()

    model = llama.load(out)  # an ordinary HF-layout checkpoint, saved in bfloat16
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and model.config.max_seq_len == 32
    tokenizer = llama.load_tokenizer(out)
    assert tokenizer.vocab_size == VOCAB
    text = llama.Llama(model, tokenizer).generate("The king", max_new_tokens=10, temperature=0.8, seed=0, stop_tokens=[])
    assert text.strip()

    # Perplexity of the validation text, as the script reports it and as the library computes it.
    ppl_argv = ["--checkpoint", str(out), "--text-file", str(corpus / "valid.txt"), "--context-len", "32", "--stride", "16", "--no-progress"]
    assert load_script("perplexity").main(ppl_argv) == 0
    printed = capsys.readouterr().out
    tokens = encode_documents(tokenizer, [(corpus / "valid.txt").read_text()])
    expected = perplexity(llama.load(out, dtype="float32"), tokens, 32, 16)
    assert f"perplexity {expected.ppl:.4f}" in printed
    assert "context 32 tokens per window, stride 16" in printed and "no BOS added to windows" in printed
    assert expected.ppl < VOCAB * 0.2


def test_train_script_pause_and_resume(corpus, tokenizer_path, tmp_path, capsys):
    base = ["--data", str(corpus), "--valid", str(corpus / "valid.txt"), "--tokenizer", str(tokenizer_path),
            "--max-steps", "6", "--precision", "float32", *shape_flags()]  # fmt: skip
    train_script = load_script("train")
    assert train_script.main([*base, "--out", str(tmp_path / "a")]) == 0
    assert train_script.main([*base, "--out", str(tmp_path / "b"), "--stop-at", "2"]) == 0
    assert "paused at step 2 of 6" in capsys.readouterr().err
    assert not json.loads((tmp_path / "b" / "train_summary.json").read_text())["completed"]
    assert train_script.main([*base, "--out", str(tmp_path / "b")]) == 2  # the state is there: --resume or a new --out
    assert "pass --resume" in capsys.readouterr().err
    assert train_script.main([*base, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = llama.load(tmp_path / "a"), llama.load(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # --data is the corpus directory: its valid.txt, given as --valid, is not trained on.
    summary = json.loads((tmp_path / "b" / "train_summary.json").read_text())
    assert summary["data"]["files"] == [str(corpus / "train.txt")]


def test_train_script_model_shapes():
    script = load_script("train")
    base = ["--data", "d", "--tokenizer", "t", "--out", "o", "--context", "128"]
    config = script.model_config(script.build_parser().parse_args([*base, "--model", "llama-3.2-1b"]), 500)
    assert config == llama.ModelConfig.from_name("llama-3.2-1b").replace(vocab_size=500, max_seq_len=128)
    flags = ["--model", "llama-3.2-1b", "--dim", "64", "--n-heads", "4", "--n-kv-heads", "2"]
    small = script.model_config(script.build_parser().parse_args([*base, *flags]), 500)
    assert (small.dim, small.n_heads, small.head_dim, small.n_layers) == (64, 4, 16, 16)  # head_dim follows dim / n_heads
    custom = script.model_config(script.build_parser().parse_args([*base, "--dim", "256", "--n-layers", "6", "--n-heads", "8"]), 500)
    assert (custom.n_kv_heads, custom.ffn_dim, custom.rope_theta, custom.tie_word_embeddings) == (8, 688, 10000.0, False)



def test_train_script_set_and_model_config(tmp_path):
    """--set reaches every ModelConfig field without a flag of its own; --model-config reads the
    'model' object train_summary.json writes; both refuse unknown fields by name."""
    script = load_script("train")
    base = ["--data", "d", "--tokenizer", "t", "--out", "o", "--context", "128", "--dim", "64", "--n-layers", "4",
            "--n-heads", "4"]  # fmt: skip
    args = script.build_parser().parse_args([*base, "--set", "n_kv_heads=2", "--set", "norm_eps=1e-6",
                                             "--set", "tie_word_embeddings=true"])  # fmt: skip
    config = script.model_config(args, 500)
    assert (config.n_kv_heads, config.norm_eps, config.tie_word_embeddings) == (2, 1e-6, True)
    scaled = script.model_config(script.build_parser().parse_args(
        [*base, "--set", 'rope_scaling={"kind": "linear", "factor": 4.0}']), 500)  # fmt: skip
    assert scaled.rope_scaling == llama.RopeScaling("linear", 4.0)
    file = tmp_path / "model.json"
    file.write_text(json.dumps(config.to_dict()))
    again = script.model_config(script.build_parser().parse_args(["--data", "d", "--tokenizer", "t", "--out", "o",
                                                                  "--context", "128", "--model-config", str(file)]), 500)  # fmt: skip
    assert again == config
    with pytest.raises(llama.ConfigError, match="unknown ModelConfig field 'n_experts'"):
        script.model_config(script.build_parser().parse_args([*base, "--set", "n_experts=8"]), 500)
    with pytest.raises(llama.ConfigError, match="expected an integer"):
        script.model_config(script.build_parser().parse_args([*base, "--set", "n_kv_heads=two"]), 500)
    file.write_text(json.dumps({**config.to_dict(), "n_experts": 8}))
    with pytest.raises(llama.ConfigError, match=r"unknown ModelConfig fields \['n_experts'\]"):
        script.model_config(script.build_parser().parse_args(["--data", "d", "--tokenizer", "t", "--out", "o",
                                                              "--model-config", str(file)]), 500)  # fmt: skip

def test_scripts_report_user_errors(corpus, tokenizer_path, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    cases = [
        ("train", ["--data", missing, "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "o"), *shape_flags()], missing),
        ("train", ["--data", str(corpus), "--tokenizer", missing, "--out", str(tmp_path / "o"), *shape_flags()], missing),
        ("train", ["--data", str(corpus), "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "o")], "missing --dim, --n-layers, --n-heads"),
        ("train", ["--data", str(corpus), "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "o"), "--model", "llama-9"], "unknown model 'llama-9'"),
        ("train", ["--data", str(corpus), "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "o"), "--resume", *shape_flags()], "nothing to resume"),
        ("train_tokenizer", [missing, "--output", str(tmp_path / "t.model")], missing),
        ("train_tokenizer", [str(corpus / "train.txt"), "--output", str(tmp_path / "t.model"), "--vocab-size", "100"], "at least 260"),
        ("perplexity", ["--checkpoint", missing, "--text-file", str(corpus / "valid.txt")], missing),
        ("prepare_kjv", ["--out", str(tmp_path / "kjv"), "--extracted", missing], missing),
    ]  # fmt: skip
    for script, argv, message in cases:
        assert load_script(script).main(argv) == 2, (script, argv)
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("error: ") and message in err, (script, err)


def test_train_script_end_to_end_subprocess(corpus, tokenizer_path, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, str(SCRIPTS / "train.py"), "--data", str(corpus / "train.txt"), "--tokenizer", str(tokenizer_path),
            "--out", str(out), "--max-steps", "4", "--valid-fraction", "0.1", "--threads", "1", *shape_flags()[:-1]]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "done: train loss" in done.stderr and "validation tokens" in done.stderr
    assert llama.load(out).config.n_layers == 2
    bad = subprocess.run(argv[:2] + ["--data", str(tmp_path / "nope")] + argv[4:], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


# ---- the KJV preparation ---------------------------------------------------------------------------

BIBLE_OUTPUT = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep. And the Spirit of God moved upon the face of the waters.

Genesis 2

  1 Thus the heavens and the earth were finished, and all the host of them.

1 Samuel 1

  1 Now there was a certain man of Ramathaimzophim, of mount Ephraim, and his
name was Elkanah, the son of Jeroham, the son of Elihu, the son of Tohu, the
son of Zuph, an Ephrathite:

Song of Solomon 1

  1 The song of songs, which is Solomon's.
"""


def test_prepare_kjv_parses_and_splits():
    kjv = load_script("prepare_kjv")
    chapters = kjv.parse_bible_output(BIBLE_OUTPUT)
    assert [c.heading for c in chapters] == ["Genesis 1", "Genesis 2", "1 Samuel 1", "Song of Solomon 1"]
    assert chapters[0].verses[1] == ("And the earth was without form, and void; and darkness was upon the face of "
                                     "the deep. And the Spirit of God moved upon the face of the waters.")  # fmt: skip
    assert chapters[2].verses[0].endswith("the son of Tohu, the son of Zuph, an Ephrathite:")
    train_text, valid_text = kjv.split_chapters(chapters, valid_every=2)
    assert train_text.splitlines() == ["Genesis 1", chapters[0].verses[0], chapters[0].verses[1], "1 Samuel 1", chapters[2].verses[0]]
    assert valid_text.splitlines() == ["Genesis 2", chapters[1].verses[0], "Song of Solomon 1", chapters[3].verses[0]]
    assert "Genesis" not in kjv.split_chapters(chapters, 2, headings=False)[0]
    with pytest.raises(ValueError, match="verse 3 follows verse 1"):
        kjv.parse_bible_output("\nGenesis 1\n\n  1 In the beginning.\n  3 Skipped one.\n")
