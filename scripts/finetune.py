"""Fine-tune a checkpoint on instruction, chat or text data: LoRA (default), QLoRA or every weight.

    python scripts/finetune.py --checkpoint path/to/Llama-3.2-1B --data train.jsonl --out runs/ft
    python scripts/finetune.py --checkpoint DIR --data train.jsonl --out runs/q --method qlora --quantize int4 \\
        --gradient-checkpointing --merge
    python scripts/finetune.py --checkpoint DIR --data notes.jsonl --out runs/full --method full --lr 2e-5
    python scripts/finetune.py ... --resume             # continue the run saved in --out

Data (JSON list or JSONL): Alpaca records {"instruction", "input", "output"}, chat records
{"messages": [{"role", "content"}, ...]} in the checkpoint's chat format, or {"text"}; the loss is
taken on the answers only. A malformed record stops the run before training: error: FILE:LINE: ...

--out receives, for lora and qlora, adapter_config.json + adapter_model.safetensors (peft's layout:
peft and transformers load them; so do llama.load(base, adapter=OUT) and generate.py --adapter),
and with --merge a full checkpoint in OUT/merged; for full, the checkpoint itself. Always:
train_summary.json, loss.png (with matplotlib) and train_state.pt (what --resume needs).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

if __package__:  # installed as the package llama_cli
    from .loop_flags import add_loop_arguments
else:  # python scripts/finetune.py: scripts/ is sys.path[0]
    from loop_flags import add_loop_arguments

# torch and the project are imported in main(), after the arguments are parsed: importing torch takes
# seconds, and --help or a usage error should not wait for it. The choices below are the library's,
# spelled out for that reason (tests/test_finetune_script.py checks they agree).
METHODS = ("lora", "qlora", "full")  # llama.training.finetune.METHODS
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # lora.DEFAULT_TARGETS
SETTABLE_FIELDS = ("rope_theta", "rope_scaling", "max_seq_len")  # llama.loading.SETTABLE_FIELDS
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--checkpoint", required=True, help="the checkpoint to fine-tune (Meta or HF layout, with its tokenizer)")
    g.add_argument("--data", required=True, help="training records: a .json list or .jsonl file")
    g.add_argument("--valid", help="validation records, same formats (default: --valid-fraction of --data, or none)")
    g.add_argument("--valid-fraction", type=float, default=0.0, help="share of --data held out for validation when --valid is not given (default 0: none)")
    g.add_argument("--context", type=int, help="most tokens per row; longer examples are cut (default: the model's max_seq_len, at most 512)")
    g.add_argument("--packing", action="store_true", help="concatenate examples into full rows instead of padding each to its batch's longest")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype of the base weights; auto: bfloat16 for lora/qlora where the CPU/GPU runs it natively, "
                        "float32 for full (default auto)")
    g.add_argument("--rope-scaling", metavar="SPEC",
                   help="fine-tune to a longer context: the RoPE scaling KIND:FACTOR (linear:4, yarn:4, dynamic:2, "
                        "llama3:8) and the context it gives, applied to the checkpoint's weights (default: none)")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"change a ModelConfig field of the checkpoint that no weight depends on: {', '.join(SETTABLE_FIELDS)} "
                        "(e.g. --set max_seq_len=1024 --set 'rope_scaling={\"kind\": \"linear\", \"factor\": 2}'); repeatable")

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="lora", help="lora: adapters on a frozen base; qlora: the same with the base "
                   "quantized; full: every weight (or --layers) trains (default lora)")
    g.add_argument("--lora-rank", type=int, default=8, help="adapter rank r (default 8)")
    g.add_argument("--lora-alpha", type=float, help="scaling numerator: the update is alpha / r * B A (default 2 * rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                   help="comma-separated projections, HF names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head) "
                        "or Meta's (wq wk wv wo w1 w3 w2 output) (default: the seven of every block)")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r) instead of alpha / r")
    g.add_argument("--quantize", choices=["int8", "int4"], help="qlora: how the frozen base is held (default int4)")
    g.add_argument("--group-size", type=int, default=64, help="int4 group size 32/64/128/256; layers whose input width it does not "
                   "divide stay in float (default 64)")
    g.add_argument("--float-embedding", action="store_true", help="qlora: keep the embedding and the output projection in "
                   "float (default: quantized like the blocks, the tied output sharing the embedding's table)")
    g.add_argument("--malloc-mmap-threshold", type=int, default=4 << 20, metavar="BYTES",
                   help="glibc: blocks of at least BYTES get their own mapping, handed back to the OS when freed, "
                        "instead of staying in the heap (default 4194304: 0.2 to 0.4 GB less peak memory on a 1B "
                        "model, for up to twice the CPU time per step; 0: glibc's own threshold)")
    g.add_argument("--layers", type=int_list, help="comma-separated block indices: only these train (full) or get adapters (lora)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward pass instead of "
                   "keeping its activations: less memory, about a third more time")

    add_loop_arguments(p, lr=None, batch_size=4, max_steps=1000, weight_decay=0.0, loss_chunk=64,
                       lr_help="peak learning rate (default 2e-4 for lora and qlora, 2e-5 for full)")
    g = p.add_argument_group("output")
    g.add_argument("--merge", action="store_true", help="lora/qlora: also write OUT/merged, the float base with the adapter merged in")
    g.add_argument("--to", choices=["hf", "meta"], default="hf", help="layout of the checkpoints written (merged or full) (default hf)")
    g.add_argument("--save-dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                   help="dtype of the checkpoints written (merged or full) (default bfloat16); adapters keep their float32")
    return p


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 speaks: the progress, the errors
        sys.stdout = sys.stderr = open(os.devnull, "w")
    args = build_parser().parse_args(argv)
    out = Path(args.out)

    import torch

    import llama
    from llama.core.device import DeviceError, pick_device, set_threads
    from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError
    from llama.training import lora
    from llama.training.cli import check_out_dir, finish, interrupted, summary, train_config
    from llama.training.data import InstructionBatches, encode_records, read_records, split_examples
    from llama.training.finetune import (FinetuneSpec, load_for_finetuning, parameter_counts, save_checkpoint, save_merged,
                                         set_mmap_threshold)  # fmt: skip
    from llama.training.loop import autocast_dtype, train

    try:
        if args.lr is None:
            args.lr = DEFAULT_LR[args.method]
        spec = FinetuneSpec(
            method=args.method, lora_rank=args.lora_rank,
            lora_alpha=2.0 * args.lora_rank if args.lora_alpha is None else args.lora_alpha,
            lora_dropout=args.lora_dropout, lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
            rslora=args.rslora, quantize=(args.quantize or "int4") if args.method == "qlora" else args.quantize,
            group_size=args.group_size, layers=args.layers, gradient_checkpointing=args.gradient_checkpointing,
            quantize_embedding=not args.float_embedding,
        )  # fmt: skip
        set_threads(args.threads)
        set_mmap_threshold(args.malloc_mmap_threshold)
        parallel = None
        if llama.distributed.launched() and int(os.environ["WORLD_SIZE"]) > 1:  # torchrun: data-parallel, FSDP2
            llama.distributed.start(None)
            parallel = llama.distributed.DataParallel()
        device = llama.distributed.device() if parallel else pick_device(args.device)
        check_out_dir(out, args.resume)
        tokenizer = llama.load_tokenizer(args.checkpoint)

        # The data first: a malformed record stops the run before the model is loaded.
        t0 = time.perf_counter()
        train_examples = encode_records(read_records(args.data), tokenizer, args.data)
        if args.valid:
            valid_examples = encode_records(read_records(args.valid), tokenizer, args.valid)
        elif args.valid_fraction > 0:
            train_examples, valid_examples = split_examples(train_examples, args.valid_fraction, args.seed)
        else:
            valid_examples = None

        dtype = args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if args.method != "full" and autocast_dtype("auto", device) else "float32"
        model = load_for_finetuning(args.checkpoint, spec, dtype=dtype, device=device, set_fields=args.set,
                                    seed=args.seed, rope_scaling=args.rope_scaling)  # fmt: skip
        if args.context is None:
            args.context = min(model.config.max_seq_len, 512)
        config = train_config(args)
        data = InstructionBatches(train_examples, valid_examples, config, packing=args.packing,
                                  pad_id=max(tokenizer.pad_id, 0))  # fmt: skip
        stats = data.stats
        print(f"data: {stats.examples:,} training examples ({stats.tokens:,} tokens, {stats.trained:,} of them answers), "
              f"{len(valid_examples) if valid_examples else 0:,} validation examples; {stats.truncated} cut to the context "
              f"of {config.context}, {stats.dropped} dropped (no answer left); read in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)  # fmt: skip
        trainable, total = parameter_counts(model)
        if parallel is not None:
            parallel.shard(model)  # every rank loaded the same weights and seeded the same adapters
            print(f"fsdp: {parallel.world} processes, {config.batch_size // parallel.world} of the {config.batch_size} "
                  "rows of each micro-batch per process", file=sys.stderr)  # fmt: skip
        precision = "bf16" if autocast_dtype(args.precision, device) else "float32"
        quantized = f", base in {spec.quantize}" if spec.method == "qlora" else ""
        print(f"model: {args.checkpoint}, {total / 1e6:.1f}M parameters ({dtype}{quantized}); {spec.method}: "
              f"{trainable:,} trainable ({100 * trainable / total:.3f}%); {device.type}, {precision} autocast, "
              f"{torch.get_num_threads()} threads", file=sys.stderr)  # fmt: skip
        run = {"checkpoint": str(args.checkpoint), "set": args.set, "dtype": dtype, "packing": args.packing, **spec.describe()}
        result = train(model, data, config, out_dir=out, resume=args.resume, stop_at=args.stop_at,
                       time_limit=args.time_limit, progress=not args.no_progress, run=run,
                       parallel=parallel)  # fmt: skip
        if parallel is not None:
            # The trained weights gathered whole on rank 0, put into an unsharded copy of the model that
            # the single-process writers below take; the other ranks are done.
            state = parallel.full_weights(model)
            if state is None:
                return 0
            model = load_for_finetuning(args.checkpoint, spec, dtype=dtype, device="cpu", set_fields=args.set,
                                        seed=args.seed, rope_scaling=args.rope_scaling)  # fmt: skip
            trained = [name for name, p in model.named_parameters() if p.requires_grad]
            model.load_state_dict({name: state[name] for name in trained}, strict=False)
            del state

        if spec.method == "full":
            written = save_checkpoint(model, out, format=args.to, dtype=args.save_dtype, tokenizer_from=args.checkpoint)
            wrote = f"{out} (checkpoint, {args.to} layout)"
        else:
            written = lora.save_adapter(model, out, base_model=str(args.checkpoint), base_settings=args.set)
            wrote = f"{out / 'adapter_model.safetensors'} ({written[-1].stat().st_size / 1e6:.2f} MB, peft layout)"
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        if args.merge and spec.method != "full" and result.completed:
            del model
            gc.collect()
            save_merged(args.checkpoint, out, out / "merged", format=args.to, dtype=args.save_dtype)
            wrote += f", {out / 'merged'} (merged checkpoint, {args.to} layout)"
    except KeyboardInterrupt:
        return interrupted(out, args.save_every)
    except (llama.CheckpointError, llama.ConfigError, TokenizerNotFoundError, TokenizerFormatError, DeviceError, OSError,
            ValueError) as e:  # fmt: skip
        print(f"error: {e}", file=sys.stderr)
        return 2

    info = summary(
        result, config, device,
        method=spec.describe(), checkpoint=str(args.checkpoint), set=args.set, dtype=dtype,
        trainable_parameters=trainable, parameters=total, peak_rss_gb=round(peak_gb, 3),
        data={"train": args.data, "valid": args.valid, "valid_fraction": args.valid_fraction, "packing": args.packing,
              "examples": stats.examples, "truncated": stats.truncated, "dropped": stats.dropped,
              "tokens": stats.tokens, "answer_tokens": stats.trained,
              "valid_examples": len(valid_examples) if valid_examples else 0},
        files=[str(f) for f in written],
    )  # fmt: skip
    finish(out, result, config, info, title=f"{spec.method}: {trainable / 1e6:.2f}M trainable parameters", wrote=wrote)
    return 0


if __name__ == "__main__":
    status = main()
    if "llama.distributed" in sys.modules:  # under torchrun: end without torch's C++ teardown (see there)
        sys.modules["llama.distributed"].exit(status)
    sys.exit(status)
