"""Evaluate a checkpoint with EleutherAI's lm-evaluation-harness, in-process (no server).

    pip install -e ".[eval]"
    python scripts/evaluate.py --tasks kjv                                # the shipped tasks, the bundled model
    python scripts/evaluate.py --checkpoint path/to/Llama-3.2-1B --tasks hellaswag,arc_easy --limit 100
    python scripts/evaluate.py --checkpoint DIR --tasks my_task --include-path my_tasks/ --output results.json

Any lm-eval task runs: its built-in ones (which download their data sets), the tasks shipped with
this project (llama/training/tasks: the `kjv` group, offline), and YAMLs under --include-path.
lm-eval's table goes to stdout; --output writes lm-eval's results JSON (its "results" mapping, per
task and metric, and the configuration) to a file. The model is adapted to lm-eval by
llama/training/harness.py; --no-bos evaluates as lm-eval's API models do (without BOS).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

if __package__:  # installed as the package llama_cli
    from .arg_types import positive_int
else:  # python scripts/NAME.py: scripts/ is sys.path[0]
    from arg_types import positive_int


def _limit(value: str) -> int | float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number if number < 1 else int(number)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory (Meta or HF layout) with its tokenizer; "
                                        "default: the model bundled with the project (weights/kjv)")  # fmt: skip
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names (e.g. kjv, or hellaswag,arc_easy)")
    p.add_argument("--include-path", action="append", default=[], help="a folder of extra lm-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=_limit, help="evaluate only the first N items of each task (a number below 1: that fraction)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per item (default: each task's own)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--no-bos", action="store_true", help="do not put BOS in front of encoded text (as lm-eval's API models, e.g. "
                                                         "local-completions over scripts/serve.py; default: BOS, as its hf backend)")  # fmt: skip
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weight dtype (default float32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu (default auto)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none", help="weight-only quantization while loading (default none)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 or 256 (default 128)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (peft layout, e.g. from scripts/finetune.py) applied to the "
                                                   "checkpoint")  # fmt: skip
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: one per core, less the cores other "
                                                     "processes kept busy over the last minute, at least 1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's random seeds (few-shot draws, sampling; default 1234)")
    p.add_argument("--output", help="write lm-eval's results JSON to this file")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's log messages")
    args = p.parse_args(argv)
    # imported after the arguments are parsed: --help answers without waiting for torch
    import llama
    import weights
    from llama.core.device import DeviceError, idle_threads, pick_device, set_threads
    from llama.core.tokenizer import TokenizerFormatError, TokenizerMismatchError, TokenizerNotFoundError

    try:
        from llama.training import harness  # needs lm-eval: the [eval] extra
    except ImportError as e:
        print(f"error: lm-eval is not installed ({e}); pip install -e \".[eval]\"", file=sys.stderr)
        return 2
    if not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if not tasks:
            raise ValueError("--tasks names no task")
        for folder in args.include_path:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"--include-path {folder}: no such directory")
        device = pick_device(args.device)
        if device.type == "cpu":
            set_threads(args.threads or idle_threads())
        checkpoint = args.checkpoint or weights.BUNDLED_MODEL
        started = time.perf_counter()
        lm = harness.LlamaLM.load(checkpoint, batch_size=args.batch_size, add_bos_token=not args.no_bos,
                                  dtype=args.dtype, device=str(device),
                                  quantize=None if args.quantize == "none" else args.quantize, group_size=args.group_size,
                                  adapter=args.adapter)  # fmt: skip
        results = harness.evaluate(lm, tasks, include_path=args.include_path, limit=args.limit,
                                   num_fewshot=args.num_fewshot, seed=args.seed)  # fmt: skip
    except (llama.CheckpointError, llama.ConfigError, TokenizerNotFoundError, TokenizerFormatError, TokenizerMismatchError,
            DeviceError, harness.HarnessError, OSError, ValueError, KeyError) as e:  # fmt: skip
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(harness.table(results))
    print(f"{checkpoint} ({args.dtype} on {device.type}, BOS {'off' if args.no_bos else 'on'}): "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)  # fmt: skip
    if args.output:
        saved = {key: results[key] for key in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                                               "higher_is_better", "n-samples", "config") if key in results}  # fmt: skip
        Path(args.output).write_text(json.dumps(saved, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"results written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
