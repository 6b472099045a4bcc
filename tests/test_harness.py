"""lm-evaluation-harness on this project's models (llama/training/harness.py) and the shipped tasks.

- the adapter's loglikelihoods against a direct computation from the model's logits (shared
  contexts, multi-token continuations, batches split mid-question, contexts cut to the window),
  loglikelihood_rolling against a direct sum, greedy generate_until against llama.generate;
- lm-eval's own `--model hf` backend on the same random checkpoint, written by transformers and
  loaded both ways: the same answers and accuracies, log-likelihoods within float tolerance;
- lm-eval's local-completions against scripts/serve.py's app: identical results to in-process on
  the shipped tasks, with lm-eval's remote tokenizer (no BOS) and with a Hugging Face tokenizer
  that adds BOS;
- scripts/evaluate.py end to end, and its errors.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import llama  # noqa: E402
import weights  # noqa: E402
from llama import ModelConfig  # noqa: E402
from llama.serving.app import create_app  # noqa: E402
from llama.serving.engine import Engine  # noqa: E402
from llama.training import harness  # noqa: E402
from llama.training.harness import HarnessError, LlamaLM  # noqa: E402
from random_models import random_model  # noqa: E402
from test_serve import Server  # noqa: E402

ROOT = Path(__file__).parents[1]
KJV = weights.BUNDLED_MODEL
TASKS = ["kjv_cloze", "kjv_lastword", "kjv_lastword_gen", "kjv_perplexity"]
logging.getLogger("lm_eval").setLevel(logging.ERROR)


def instance(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def tokenizer():
    return llama.load_tokenizer(KJV)


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, ffn_dim=96, max_seq_len=64)
    return random_model(config, std=0.2, random_norms=True)


def direct_logprob(model, ids: list[int], start: int) -> tuple[float, bool]:
    """log P(ids[start:] | ids[:start]) and whether each is the argmax, from one plain forward."""
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)  # (T-1, V)
    target = torch.tensor(ids[start:])
    steps = logprobs[start - 1 :]
    return float(steps.gather(-1, target[:, None]).sum()), bool((steps.argmax(-1) == target).all())


# ---- the adapter against the model ---------------------------------------------------------------------


def test_loglikelihoods_equal_a_direct_computation(model, tokenizer):
    lm = LlamaLM(model, tokenizer, batch_size=3)  # 3 rows: questions of 4 choices are split across batches
    long_context = "And the LORD spake unto Moses, saying, " * 12  # longer than the 64-token window
    requests = [("And God said", choice) for choice in (" Let there be light", " unto", " and it was so.", " Amen")]
    requests += [("In the beginning", " God"), ("In the beginning", " God created the heaven"), (long_context, " Speak unto")]
    requests += [("Blessed are", " the"), ("Blessed are ", "the meek")]  # a trailing space moves to the continuation
    got = lm.loglikelihood([instance("loglikelihood", r) for r in requests])
    for (context, continuation), (logprob, greedy) in zip(requests, got):
        # lm-eval's tokenization of a pair: the whole text, then the context; cut from the left to the window
        if context.endswith(" "):
            context, continuation = context.rstrip(), " " + continuation
        whole = tokenizer.encode(context + continuation, bos=True, eos=False)
        start = len(tokenizer.encode(context, bos=True, eos=False))
        keep = model.config.max_seq_len + 1
        cut = max(0, len(whole) - keep)
        expected = direct_logprob(model, whole[cut:], start - cut)
        assert logprob == pytest.approx(expected[0], abs=1e-4), (context[:30], continuation)
        assert greedy == expected[1]


def test_without_bos_the_text_is_scored_as_given(model, tokenizer):
    lm = LlamaLM(model, tokenizer, add_bos_token=False)
    (logprob, _), = lm.loglikelihood([instance("loglikelihood", ("And God said", " unto"))])
    whole = tokenizer.encode("And God said unto", bos=False, eos=False)
    start = len(tokenizer.encode("And God said", bos=False, eos=False))
    assert logprob == pytest.approx(direct_logprob(model, whole, start)[0], abs=1e-4)


def test_rolling_loglikelihood_is_every_token_predicted_once(model, tokenizer):
    lm = LlamaLM(model, tokenizer, batch_size=2)
    text = "In the beginning God created the heaven and the earth. " * 16  # several 64-token windows
    total, = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    ids = tokenizer.encode(text, bos=False, eos=False)  # the text's tokens; the first window is conditioned on BOS
    expected = 0.0
    for context, prediction in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
            ids, prefix_token=tokenizer.bos_id, max_seq_len=model.config.max_seq_len, context_len=1)):  # lm-eval's windows
        expected += direct_logprob(model, context + prediction, len(context))[0]
    assert len(ids) > 2 * model.config.max_seq_len
    assert total == pytest.approx(expected, abs=1e-3)
    no_bos, = LlamaLM(model, tokenizer, add_bos_token=False).loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    assert no_bos == pytest.approx(total, abs=1e-3)  # BOS is the condition, never a scored token of the text


def test_a_task_without_max_gen_toks_leaves_room_for_its_prompt(model, tokenizer):
    lm = LlamaLM(model, tokenizer)  # max_gen_toks 256 by default; the model's context is 64
    text, = lm.generate_until([instance("generate_until", ("And God said", {"until": ["\n"]}))])
    ids = llama.generate(model, [tokenizer.encode("And God said", bos=True, eos=False)], 32, temperature=0)[0]
    assert text == tokenizer.decode(ids).split("\n")[0]


def test_greedy_generate_until_equals_llama_generate(model, tokenizer):
    lm = LlamaLM(model, tokenizer, batch_size=2)
    contexts = ["And God said", "In the beginning", "Blessed are the"]
    until = ["\n", " the"]
    got = lm.generate_until([instance("generate_until", (c, {"until": until, "max_gen_toks": 12, "do_sample": False}))
                             for c in contexts])  # fmt: skip
    for context, text in zip(contexts, got):
        ids = llama.generate(model, [tokenizer.encode(context, bos=True, eos=False)], 12, temperature=0)[0]
        expected = tokenizer.decode(ids)
        for stop in until:
            expected = expected.split(stop)[0]
        assert text == expected


def test_generation_keywords_it_does_not_implement_are_refused(model, tokenizer):
    lm = LlamaLM(model, tokenizer)
    with pytest.raises(HarnessError, match="num_beams"):
        lm.generate_until([instance("generate_until", ("And", {"until": ["\n"], "num_beams": 4}))])
    with pytest.raises(HarnessError, match="max_gen_toks"):
        lm.generate_until([instance("generate_until", ("And", {"max_gen_toks": 64}))])  # no room for a prompt


def test_unknown_tasks_are_named(model, tokenizer):
    with pytest.raises(HarnessError, match="no_such_task"):
        harness.task_manager(["kjv_cloze", "no_such_task"], include_defaults=False)


# ---- against lm-eval's own hf backend ------------------------------------------------------------------


TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "add_bos_token": True, "add_eos_token": False, "legacy": True}  # fmt: skip


def hf_tokenizer_dir(path: Path) -> Path:
    """The bundled sentencepiece model with the tokenizer_config.json transformers needs."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(KJV / "tokenizer.model", path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return path


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                                      attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return hf_tokenizer_dir(path)


def samples_by_doc(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def assert_same_responses(a: dict, b: dict, tasks: list[str], tolerance: float, leading_space: bool = True) -> None:
    """Item by item: the same generations, is_greedy flags and log-likelihoods within `tolerance` (nats).
    leading_space False: a generation may differ in its leading whitespace (the server's text keeps
    the space sentencepiece writes before a continuation's first word; decoding the continuation
    alone, as lm-eval's hf backend and the adapter do, drops it)."""
    for task in tasks:
        for x, y in zip(samples_by_doc(a, task), samples_by_doc(b, task), strict=True):
            assert x["doc_id"] == y["doc_id"]
            for p, q in zip(x["resps"], y["resps"], strict=True):
                p, q = p[0], q[0]
                if isinstance(p, str):  # a generation
                    assert (p if leading_space else p.lstrip()) == (q if leading_space else q.lstrip()), task
                elif isinstance(p, (tuple, list)):  # (loglikelihood, is_greedy)
                    assert p[0] == pytest.approx(q[0], abs=tolerance) and p[1] == q[1], task
                else:  # a rolling loglikelihood
                    assert p == pytest.approx(q, abs=10 * tolerance), task


def assert_same_metrics(a: dict, b: dict, tasks: list[str], exact: bool = True) -> None:
    """Accuracies and exact matches equal; perplexities within float tolerance."""
    for task in tasks:
        for metric, value in a["results"][task].items():
            if "stderr" in metric or not isinstance(value, float):
                continue
            if metric.startswith(("acc", "exact_match")) and exact:
                assert value == b["results"][task][metric], (task, metric)
            else:
                assert value == pytest.approx(b["results"][task][metric], rel=1e-4), (task, metric)


@pytest.mark.slow
def test_results_equal_lm_evals_hf_backend(hf_checkpoint):
    from lm_eval.models.huggingface import HFLM

    ours = harness.evaluate(LlamaLM.load(hf_checkpoint, batch_size=8, dtype="float32"), TASKS, limit=12, log_samples=True)
    theirs = harness.evaluate(HFLM(pretrained=str(hf_checkpoint), batch_size=8, dtype="float32", device="cpu"), TASKS,
                              limit=12, log_samples=True)  # fmt: skip
    scored = [t for t in TASKS if t != "kjv_perplexity"]
    assert_same_responses(ours, theirs, scored, tolerance=2e-4)
    assert_same_metrics(ours, theirs, scored)
    # loglikelihood_rolling: the hf backend encodes the text with BOS and conditions on BOS, so it scores
    # the text after two BOS, the second one included (lm-eval issue #3333); the adapter scores the
    # text's own tokens after one BOS. Both against a direct computation.
    model = llama.load(hf_checkpoint, dtype="float32")
    tokenizer = llama.load_tokenizer(hf_checkpoint)
    for x, y in zip(samples_by_doc(ours, "kjv_perplexity"), samples_by_doc(theirs, "kjv_perplexity"), strict=True):
        ids = tokenizer.encode(x["doc"]["text"], bos=False, eos=False)
        bos = tokenizer.bos_id
        assert x["resps"][0][0] == pytest.approx(direct_logprob(model, [bos, *ids], 1)[0], abs=2e-3)
        assert y["resps"][0][0] == pytest.approx(direct_logprob(model, [bos, bos, *ids], 1)[0], abs=2e-3)


# ---- over the server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kjv_server():
    engine = Engine(llama.load(KJV, dtype="float32"), llama.load_tokenizer(KJV), max_batch_size=8, max_queue=64)
    with Server(create_app(engine, model_name="kjv")) as server:
        yield server


@pytest.mark.slow
def test_lm_eval_over_the_server_equals_in_process(kjv_server, tmp_path):
    """lm-eval's local-completions with its remote tokenizer (/tokenize without BOS; echo and
    logprobs for the scores) against the adapter without BOS; and with a Hugging Face tokenizer
    that adds BOS against the adapter's default."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    url = f"{kjv_server.url}/v1/completions"
    remote = LocalCompletionsAPI(base_url=url, model="kjv", tokenizer_backend="remote", custom_prefix_token_id=1,
                                 batch_size=8, max_length=256)  # fmt: skip
    over_server = harness.evaluate(remote, TASKS, limit=10, log_samples=True)
    in_process = harness.evaluate(LlamaLM.load(KJV, add_bos_token=False, dtype="float32"), TASKS, limit=10, log_samples=True)
    assert_same_responses(over_server, in_process, TASKS, tolerance=1e-4, leading_space=False)
    assert_same_metrics(over_server, in_process, TASKS)

    pytest.importorskip("transformers")
    with_bos = LocalCompletionsAPI(base_url=url, model="kjv", tokenizer_backend="huggingface",
                                   tokenizer=str(hf_tokenizer_dir(tmp_path / "tok")), add_bos_token=True, batch_size=8,
                                   max_length=256)  # fmt: skip
    scored = ["kjv_cloze", "kjv_lastword"]
    over_server = harness.evaluate(with_bos, scored, limit=10, log_samples=True)
    in_process = harness.evaluate(LlamaLM.load(KJV, dtype="float32"), scored, limit=10, log_samples=True)
    assert_same_responses(over_server, in_process, scored, tolerance=1e-4)
    assert_same_metrics(over_server, in_process, scored)


# ---- the shipped tasks and the script -------------------------------------------------------------------


def test_the_shipped_tasks_are_package_data_and_load_offline():
    folder = harness.SHIPPED_TASKS / "kjv"
    for task in TASKS:
        assert (folder / f"{task}.yaml").is_file() and (folder / f"{task}.jsonl").is_file()
        lines = (folder / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) >= 100 and all(json.loads(line) for line in lines)
    cloze = [json.loads(line) for line in (folder / "kjv_cloze.jsonl").read_text().splitlines()]
    assert all(len(item["choices"]) == 4 and 0 <= item["label"] < 4 for item in cloze)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"llama.training" = ["tasks/*/*"]' in pyproject


@pytest.mark.slow
def test_evaluate_script_writes_lm_evals_results(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--tasks", "kjv_cloze,kjv_lastword_gen",
                           "--limit", "4", "--threads", "1", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kjv_cloze" in done.stdout and "acc_norm" in done.stdout and "exact_match" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"kjv_cloze", "kjv_lastword_gen"}
    assert 0 <= results["kjv_cloze"]["acc,none"] <= 1 and 0 <= results["kjv_lastword_gen"]["exact_match,first_word"] <= 1


def test_evaluate_script_errors(tmp_path):
    for args, message in ((["--tasks", "kjv", "--include-path", str(tmp_path / "none")], "no such directory"),
                          (["--tasks", "kjv", "--checkpoint", str(tmp_path)], "error:"),
                          (["--tasks", " , "], "names no task"),
                          (["--tasks", "kjv", "--adapter", str(tmp_path / "no-adapter")], "adapter")):  # fmt: skip
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-1000:]


def test_an_adapter_is_evaluated_with_its_adapter(tokenizer):
    """LlamaLM.load(adapter=DIR) (evaluate.py --adapter) scores the adapted model: its log-likelihood
    equals a direct forward of llama.load(adapter=) with the shipped LoRA adapter, and differs from the base's."""
    adapter = ROOT / "weights" / "kjv-lora"
    lm = LlamaLM.load(KJV, dtype="float32", adapter=adapter)
    request = ("And God said, Let there be light: and there was", " light")
    (logprob, _), = lm.loglikelihood([instance("loglikelihood", request)])
    whole = tokenizer.encode(request[0] + request[1], bos=True, eos=False)
    start = len(tokenizer.encode(request[0], bos=True, eos=False))
    adapted = llama.load(KJV, dtype="float32", adapter=adapter)
    base = llama.load(KJV, dtype="float32")
    assert logprob == pytest.approx(direct_logprob(adapted, whole, start)[0], abs=1e-4)
    assert abs(logprob - direct_logprob(base, whole, start)[0]) > 1e-3
