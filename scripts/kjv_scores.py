"""Score a checkpoint on the shipped evaluation set (the `kjv` tasks) every way lm-eval can run it,
compare the ways item by item, and optionally write the table into the README.

    python scripts/kjv_scores.py                      # the bundled model; prints the table
    python scripts/kjv_scores.py --readme README.md   # and rewrites the README's block of scores

The ways (each a row):
- in-process, as scripts/evaluate.py runs it (llama/training/harness.py), with BOS and without;
- lm-eval's own `hf` backend (transformers) on the same checkpoint and tokenizer;
- over the server: scripts/serve.py started on a free port, lm-eval's local-completions with its
  remote tokenizer (/tokenize; no BOS), and with a Hugging Face tokenizer that adds BOS.
Below the table: how far each way's per-item results are from its in-process counterpart (the
largest log-likelihood difference; answers that differ). A measurement script: it uses
transformers (for the hf rows), which the package itself never imports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__:  # installed as the package llama_cli
    from .arg_types import positive_int
else:  # python scripts/NAME.py: scripts/ is sys.path[0]
    from arg_types import positive_int

SERVE = Path(__file__).with_name("serve.py")  # scripts/serve.py, or llama_cli/serve.py when installed
TASK = "kjv"
COLUMNS = [  # (task, metric key, heading)
    ("kjv_cloze", "acc,none", "cloze acc"), ("kjv_cloze", "acc_norm,none", "cloze acc_norm"),
    ("kjv_lastword", "acc,none", "last word acc"), ("kjv_lastword", "perplexity,none", "last word ppl"),
    ("kjv_lastword_gen", "exact_match,first_word", "last word generated"),
    ("kjv_perplexity", "word_perplexity,none", "verse word ppl"), ("kjv_perplexity", "bits_per_byte,none", "bits/byte"),
]  # fmt: skip
BEGIN, END = "<!-- kjv-scores:begin (scripts/kjv_scores.py writes this block) -->", "<!-- kjv-scores:end -->"
TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "add_bos_token": True, "add_eos_token": False, "legacy": True}  # fmt: skip


def hf_view(checkpoint: Path, folder: Path, tokenizer) -> Path:
    """The checkpoint as transformers wants it: its weights, its config.json with the tokenizer's BOS
    and EOS ids (without eos_token_id, transformers' generate would not stop at EOS as this project
    does), and the sentencepiece tokenizer.model with a tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for weights_file in checkpoint.glob("*.safetensors*"):
        (folder / weights_file.name).symlink_to(weights_file.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(checkpoint / "tokenizer.model", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return folder


def _context(checkpoint: Path) -> int:
    """The model's context, from its config (what the server serves)."""
    config = json.loads((checkpoint / "config.json").read_text())
    return int(config.get("max_position_embeddings", 2048))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """scripts/serve.py in a subprocess, started when the `with` begins (it loads while the in-process
    runs compute) and stopped when it ends (SIGTERM: a graceful shutdown); ready() waits for it."""

    def __init__(self, checkpoint: Path, threads: int, batch: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.command = [sys.executable, str(SERVE), "--checkpoint", str(checkpoint), "--port",
                        str(self.port), "--dtype", "float32", "--threads", str(threads), "--max-batch-size", str(batch),
                        "--served-model-name", "kjv", "--log-level", "warning"]  # fmt: skip

    def __enter__(self) -> "ServeProcess":
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=log)
        return self

    def ready(self, timeout: float = 1200) -> None:
        """Waits until /health answers (a busy machine can take minutes to import and load)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"scripts/serve.py exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"scripts/serve.py did not start within {timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def compare(a: dict, b: dict) -> str:
    """Item by item: the largest log-likelihood difference, the answers that differ, and the range of
    the rolling (whole-verse) log-likelihood differences a - b."""
    worst, differ, items, rolling = 0.0, 0, 0, []
    for task in a["samples"]:
        left = sorted(a["samples"][task], key=lambda s: s["doc_id"])
        right = sorted(b["samples"][task], key=lambda s: s["doc_id"])
        for x, y in zip(left, right, strict=True):
            items += 1
            for p, q in zip(x["resps"], y["resps"]):
                p, q = p[0], q[0]
                if isinstance(p, str):
                    differ += p.strip() != q.strip()
                elif isinstance(p, (list, tuple)):
                    worst, differ = max(worst, abs(p[0] - q[0])), differ + (p[1] != q[1])
                else:
                    rolling.append(p - q)
            differ += x["filtered_resps"] != y["filtered_resps"] and isinstance(x["filtered_resps"][0], str)
    text = f"{items} items: max |Δ log-likelihood| {worst:.1e} nats, {differ} answers differ"
    if rolling:
        low, high = min(rolling), max(rolling)
        text += (f"; whole verses: Δ log-likelihood within {max(abs(low), abs(high)):.1e} nats" if high - low < 1e-3 and abs(low) < 1e-3
                 else f"; whole verses: Δ log-likelihood from {low:.4f} to {high:.4f} nats")  # fmt: skip
    return text


def table(rows: dict[str, dict]) -> str:
    lines = ["| run | " + " | ".join(h for _, _, h in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, results in rows.items():
        cells = []
        for task, key, _ in COLUMNS:
            value = results["results"].get(task, {}).get(key)
            cells.append("" if value is None else f"{value:.4f}" if value < 10 else f"{value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"the README has no block {BEGIN} ... {END} to replace")
    return pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory with a sentencepiece tokenizer.model (default: the bundled model)")
    p.add_argument("--limit", type=positive_int, help="only the first N items of each task (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass, and the server's slots (default 16)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch, here and in the server (default 1)")
    p.add_argument("--no-server", action="store_true", help="skip the rows over scripts/serve.py")
    p.add_argument("--no-hf", action="store_true", help="skip lm-eval's hf backend (needs transformers)")
    p.add_argument("--readme", help="rewrite the block of scores in this README")
    p.add_argument("--output", help="write every run's lm-eval results JSON (without samples) to this file")
    args = p.parse_args(argv)
    # imported after the arguments are parsed: --help answers without waiting for torch
    import torch

    import llama
    import weights

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        from llama.training import harness
        from lm_eval.models.openai_completions import LocalCompletionsAPI
    except ImportError as e:
        print(f"error: {e}; pip install -e \".[eval]\"", file=sys.stderr)
        return 2
    if not args.no_hf:
        try:
            import transformers  # noqa: F401  (lm-eval's hf backend, and the server row's tokenizer)
        except ImportError as e:
            print(f"error: {e}; pip install -e \".[test]\", or pass --no-hf", file=sys.stderr)
            return 2
    checkpoint = Path(args.checkpoint or weights.BUNDLED_MODEL)
    if not (checkpoint / "tokenizer.model").is_file():
        print(f"error: {checkpoint}/tokenizer.model not found", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    tokenizer = llama.load_tokenizer(checkpoint)
    bos = tokenizer.bos_id
    context = _context(checkpoint)
    run = lambda lm: harness.evaluate(lm, [TASK], limit=args.limit, log_samples=True)  # noqa: E731
    rows, notes, times = {}, [], {}

    def timed(name: str, lm) -> dict:
        started = time.perf_counter()
        rows[name] = run(lm)
        times[name] = time.perf_counter() - started
        print(f"{name}: {times[name]:.0f} s", file=sys.stderr)
        return rows[name]

    with tempfile.TemporaryDirectory(prefix="kjv-scores-") as tmp, contextlib.ExitStack() as stack:
        if not args.no_server:
            server = stack.enter_context(ServeProcess(checkpoint, args.threads, args.batch_size, Path(tmp) / "serve.log"))
        with_bos = timed("in-process, BOS", harness.LlamaLM.load(checkpoint, batch_size=args.batch_size, dtype="float32"))
        double_bos = (" (on whole verses lm-eval's tokenizers put BOS in front of the verse and condition on BOS"
                      " as well: the verse is scored after two BOS, the second one included; lm-eval issue #3333)")
        if not args.no_hf:
            from lm_eval.models.huggingface import HFLM

            tokenizer_dir = hf_view(checkpoint, Path(tmp) / "hf", tokenizer)
            hf = timed("lm-eval hf backend, BOS", HFLM(pretrained=str(tokenizer_dir), batch_size=args.batch_size,
                                                       dtype="float32", device="cpu"))  # fmt: skip
            notes.append(f"lm-eval hf vs in-process (BOS): {compare(hf, with_bos)}{double_bos}")
        no_bos = timed("in-process, no BOS", harness.LlamaLM.load(checkpoint, batch_size=args.batch_size,
                                                                  add_bos_token=False, dtype="float32"))  # fmt: skip
        if not args.no_server:
            server.ready()
            url = f"{server.url}/v1/completions"
            remote = timed("server, lm-eval remote tokenizer (no BOS)", LocalCompletionsAPI(
                base_url=url, model="kjv", tokenizer_backend="remote", custom_prefix_token_id=bos,
                batch_size=args.batch_size, max_length=context))  # fmt: skip
            notes.append(f"server (remote tokenizer) vs in-process (no BOS): {compare(remote, no_bos)}")
            if not args.no_hf:
                over_bos = timed("server, HF tokenizer with BOS", LocalCompletionsAPI(
                    base_url=url, model="kjv", tokenizer_backend="huggingface", tokenizer=str(tokenizer_dir),
                    add_bos_token=True, batch_size=args.batch_size, max_length=context))  # fmt: skip
                notes.append(f"server (HF tokenizer, BOS) vs in-process (BOS): {compare(over_bos, with_bos)}{double_bos}")

    summary = checkpoint / "train_summary.json"
    valid = ""
    if summary.is_file():
        loss = json.loads(summary.read_text()).get("final_valid_loss")
        if loss is not None:
            valid = (f"Validation loss of the training run {loss:.3f} (perplexity {math.exp(loss):.2f}, "
                     f"weights/kjv/train_summary.json). ")  # fmt: skip
    items = {t: len(r) for t, r in with_bos["samples"].items()}
    block = "\n".join([
        table(rows), "",
        f"{valid}Items: " + ", ".join(f"{t} {n}" for t, n in items.items()) + "; float32, "
        f"batch {args.batch_size}, {args.threads} thread(s); times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ".",
        "", *[f"- {n}" for n in notes],
    ])  # fmt: skip
    print(block)
    if args.output:
        Path(args.output).write_text(json.dumps({k: {"results": v["results"]} for k, v in rows.items()}, indent=2) + "\n")
    if args.readme:
        path = Path(args.readme)
        path.write_text(replace_block(path.read_text(encoding="utf-8"), block), encoding="utf-8")
        print(f"wrote the scores into {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
