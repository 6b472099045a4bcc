"""Pretrain a Llama from scratch on a text file or a folder of *.txt files.

    python scripts/train.py --data data/kjv/train.txt --valid data/kjv/valid.txt \\
        --tokenizer data/kjv/tokenizer.model --out runs/kjv \\
        --dim 256 --n-layers 6 --n-heads 8 --n-kv-heads 4 --context 256 --max-steps 2000
    python scripts/train.py ... --resume               # continue the run saved in --out
    python scripts/train.py --data data/kjv/train.txt --valid data/kjv/valid.txt --init-from weights/kjv \
        --rope-scaling linear:4 --out runs/kjv-1024 --max-steps 200 --lr 1e-4   # fine-tune to a 4x longer context
    torchrun --nproc-per-node 2 scripts/train.py ...   # data-parallel over 2 processes with FSDP2 (--fsdp)

Data: each line of the text is a document, tokenized as BOS + line + EOS, and all documents are
packed into one token stream (--documents paragraph|file for other cuttings); a training example
is a random window of --context + 1 tokens of it. Validation: --valid, or the last --valid-fraction
of the stream.

--out receives: config.json + model.safetensors + tokenizer.model (an ordinary HF-layout checkpoint
that llama.load and scripts/generate.py read), train_summary.json, loss.png (with matplotlib), and
train_state.pt (weights, optimiser, step: what --resume needs; not part of the checkpoint).

--init-from starts from a checkpoint instead of random weights (full fine-tuning, its shape and
tokenizer); with --rope-scaling it is context extension: the weights run with that scaling at
factor x their trained context, train on windows that long, and the checkpoint keeps the scaling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import llama
from llama.core.checkpoint import save_state_dict
from llama.core.device import pick_device, set_threads
from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError
from llama.training.cli import check_out_dir, finish, interrupted, summary, train_config
from llama.training.pretrain import (DOCUMENT_SPLITS, autocast_dtype, default_ffn_dim, encode_documents, init_weights, text_files,
                                     train)  # fmt: skip

if __package__:  # installed as the package llama_cli
    from .loop_flags import add_loop_arguments
else:  # python scripts/train.py: scripts/ is sys.path[0]
    from loop_flags import add_loop_arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training text: a file, or a directory whose *.txt files are all read")
    g.add_argument("--valid", help="validation text file (default: the last --valid-fraction of the data)")
    g.add_argument("--valid-fraction", type=float, default=0.05, help="share of the token stream held out when --valid is not given; 0: no validation (default 0.05)")
    g.add_argument("--documents", choices=DOCUMENT_SPLITS, default="line",
                   help="what one BOS ... EOS document is: a line, a blank-line-separated paragraph, or a whole file (default line)")
    g.add_argument("--tokenizer",
                   help="tokenizer file (sentencepiece .model, e.g. from scripts/train_tokenizer.py); required unless "
                        "--init-from gives a checkpoint with its tokenizer")

    g = p.add_argument_group("model shape (a registry name, or the flags; flags override a registry shape)")
    g.add_argument("--model", help=f"registry shape, with the tokenizer's vocabulary: {', '.join(llama.REGISTRY)}")
    g.add_argument("--dim", type=int, help="model width")
    g.add_argument("--n-layers", type=int, help="transformer blocks")
    g.add_argument("--n-heads", type=int, help="query heads")
    g.add_argument("--n-kv-heads", type=int, help="key/value heads (default: --n-heads)")
    g.add_argument("--ffn-dim", type=int, help="SwiGLU hidden width (default: 8/3 * dim rounded up to a multiple of 16)")
    g.add_argument("--rope-theta", type=float, help="RoPE base (default 10000, or the registry's)")
    g.add_argument("--tie-embeddings", action="store_true", help="share the output matrix with the embedding")
    g.add_argument("--model-config", metavar="FILE.json",
                   help="every ModelConfig field from a JSON object (as in a checkpoint's config.json under "
                        "'llama_from_scratch', or train_summary.json's 'model'); the shape flags and --set override it")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any ModelConfig field, e.g. --set qk_norm=true --set nope_layers=3,7 --set sliding_window=64 "
                        "(repeatable; applied last). Fields: " + ", ".join(f.name for f in dataclasses.fields(llama.ModelConfig)))
    g.add_argument("--context", type=int,
                   help="tokens per training window; also the model's max_seq_len (default 256; with --init-from or "
                        "--rope-scaling: the model's context)")

    g = p.add_argument_group("fine-tuning (start from a checkpoint instead of random weights)")
    g.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights and shape (the shape flags are then refused); its "
                        "tokenizer unless --tokenizer is given. Full fine-tuning: every weight trains")
    g.add_argument("--rope-scaling", metavar="SPEC",
                   help="train with this RoPE scaling: KIND:FACTOR (linear:4 = position interpolation to 4x the "
                        "trained context, yarn:4), a JSON object of RopeScaling fields, or none; the context becomes "
                        "factor x the trained context and is saved in the checkpoint's config (context extension)")

    add_loop_arguments(p, lr=6e-4, batch_size=16, max_steps=1000, weight_decay=0.1)
    p.add_argument("--save-dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16", help="dtype of the exported checkpoint (default bfloat16)")
    p.add_argument("--compile", action="store_true", help="run the forward pass through torch.compile")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="data-parallel training over the processes torchrun started, with FSDP2: parameters, "
                        "gradients and AdamW's moments sharded, each rank training on B / N rows of every "
                        "micro-batch (the same global batch as one process); the state and checkpoint saved whole "
                        "by rank 0 (default: on when torchrun started several processes)")
    return p


def model_config(args, vocab_size: int) -> llama.ModelConfig:
    """The model's config: a registry shape, a --model-config file or the shape flags, then --set."""
    shape = {k: v for k, v in dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                                    ffn_dim=args.ffn_dim, rope_theta=args.rope_theta).items() if v is not None}  # fmt: skip
    if args.tie_embeddings:
        shape["tie_word_embeddings"] = True
    if args.model and args.model_config:
        raise llama.ConfigError("give --model or --model-config, not both")
    if args.model or args.model_config:
        if "dim" in shape or "n_heads" in shape:
            shape["head_dim"] = -1  # derive it again from the new dim / n_heads
        if args.model:
            base = llama.ModelConfig.from_name(args.model)
        else:
            base = llama.ModelConfig.from_dict(read_json(args.model_config), args.model_config)
        config = base.replace(vocab_size=vocab_size, max_seq_len=args.context, **shape)
    else:
        missing = [f"--{k.replace('_', '-')}" for k in ("dim", "n_layers", "n_heads") if k not in shape]
        if missing:
            raise llama.ConfigError(f"give --model NAME, --model-config FILE or the shape flags; missing {', '.join(missing)}")
        shape.setdefault("n_kv_heads", shape["n_heads"])
        shape.setdefault("ffn_dim", default_ffn_dim(shape["dim"]))
        config = llama.ModelConfig(vocab_size=vocab_size, max_seq_len=args.context, **shape)
    return config.override(args.set) if args.set else config


def initial_model(args, vocab_size: int) -> llama.Transformer:
    """The model training starts from: --init-from's weights (float32, with --rope-scaling applied),
    or random weights of the config the flags describe. Sets args.context when it was not given."""
    if args.init_from is None:
        if args.rope_scaling is not None:
            raise llama.ConfigError("--rope-scaling extends the context of a trained model: give it --init-from")
        args.context = args.context or 256
        return init_weights(llama.Transformer(model_config(args, vocab_size)), seed=args.seed)
    shape = [flag for flag, value in (("--model", args.model), ("--model-config", args.model_config), ("--dim", args.dim),
             ("--n-layers", args.n_layers), ("--n-heads", args.n_heads), ("--n-kv-heads", args.n_kv_heads),
             ("--ffn-dim", args.ffn_dim), ("--rope-theta", args.rope_theta), ("--tie-embeddings", args.tie_embeddings),
             ("--set", args.set)) if value]  # fmt: skip
    if shape:
        raise llama.ConfigError(f"--init-from gives the model's shape; drop {', '.join(shape)}")
    model = llama.load(args.init_from, dtype=torch.float32, rope_scaling=args.rope_scaling)
    if model.config.vocab_size != vocab_size:
        raise llama.ConfigError(f"--init-from {args.init_from} has a vocabulary of {model.config.vocab_size} tokens, "
                                f"the tokenizer {vocab_size}")  # fmt: skip
    args.context = args.context or model.config.max_seq_len
    if args.context > model.config.max_seq_len:
        raise llama.ConfigError(f"--context {args.context} is beyond the model's context of {model.config.max_seq_len} "
                                "(extend it with --rope-scaling)")  # fmt: skip
    return model.train()


def read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise llama.ConfigError(f"{path}: malformed JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise llama.ConfigError(f"{path}: not UTF-8 text: {e}") from None


def load_data(args, tokenizer) -> tuple[np.ndarray, np.ndarray | None, list[Path]]:
    files = text_files(args.data, exclude=[args.valid] if args.valid else [])
    data = encode_documents(tokenizer, (f.read_text(encoding="utf-8") for f in files), args.documents)
    if args.valid:
        valid = encode_documents(tokenizer, [Path(args.valid).read_text(encoding="utf-8")], args.documents)
    elif args.valid_fraction > 0:
        n_valid = int(len(data) * args.valid_fraction)
        data, valid = data[: len(data) - n_valid], data[len(data) - n_valid :]
    else:
        valid = None
    return data, valid, files


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 speaks: the progress, the errors
        sys.stdout = sys.stderr = open(os.devnull, "w")
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    parallel = None
    try:
        if not 0 <= args.valid_fraction < 1:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
        set_threads(args.threads)
        several = llama.distributed.launched() and int(os.environ["WORLD_SIZE"]) > 1
        if args.fsdp and not several:
            raise ValueError("--fsdp trains over several processes: start with torchrun --nproc-per-node N")
        if several and args.fsdp is not False:
            llama.distributed.start(None)
            parallel = llama.distributed.DataParallel()
            if args.compile:
                raise ValueError("--compile is not supported with --fsdp")
        elif several:
            raise ValueError("torchrun started several processes but --no-fsdp asks for one: drop --no-fsdp")
        device = llama.distributed.device() if parallel else pick_device(args.device)
        if args.tokenizer is None:
            if args.init_from is None:
                raise ValueError("--tokenizer is required (unless --init-from gives a checkpoint with its tokenizer)")
            args.tokenizer = str(next((Path(args.init_from) / name for name in ("tokenizer.model", "tokenizer.json")
                                       if (Path(args.init_from) / name).is_file()), Path(args.init_from) / "tokenizer.model"))  # fmt: skip
        if not Path(args.tokenizer).is_file():
            raise FileNotFoundError(f"{args.tokenizer}: no such tokenizer file")
        tokenizer = llama.load_tokenizer(args.tokenizer)
        torch.manual_seed(args.seed)
        model = initial_model(args, tokenizer.vocab_size).to(device)  # sets args.context when it was not given
        model_cfg = model.config
        config = train_config(args)
        check_out_dir(out, args.resume)
        t0 = time.perf_counter()
        data, valid, files = load_data(args, tokenizer)
        valid_text = f"{len(valid):,} validation tokens" if valid is not None else "no validation"
        print(f"data: {len(data):,} training tokens from {len(files)} file(s), {valid_text} (each {args.documents} "
              f"a BOS ... EOS document; tokenized in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)  # fmt: skip

        precision = "bf16" if autocast_dtype(args.precision, device) else "float32"
        print(f"model: {model_cfg.n_params / 1e6:.2f}M parameters (dim {model_cfg.dim}, {model_cfg.n_layers} layers, "
              f"{model_cfg.n_heads} heads, {model_cfg.n_kv_heads} kv heads, ffn {model_cfg.ffn_dim}, vocab {model_cfg.vocab_size}); "
              f"{device.type}, {precision}, {torch.get_num_threads()} threads", file=sys.stderr)  # fmt: skip
        if parallel is not None:
            parallel.shard(model)  # every rank initialised the same weights from --seed: each keeps its shard
            print(f"fsdp: {parallel.world} processes, {config.batch_size // parallel.world} of the {config.batch_size} "
                  "rows of each micro-batch per process", file=sys.stderr)  # fmt: skip
        forward = torch.compile(model) if args.compile else model
        result = train(model, data, valid, config, out_dir=out, resume=args.resume, stop_at=args.stop_at,
                       time_limit=args.time_limit, progress=not args.no_progress, forward=forward,
                       parallel=parallel)  # fmt: skip
    except KeyboardInterrupt:
        return interrupted(out, args.save_every)
    except (llama.ConfigError, llama.CheckpointError, TokenizerNotFoundError, TokenizerFormatError, OSError, ValueError,
            KeyError) as e:  # fmt: skip
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2

    # The checkpoint: HF layout in --save-dtype, with the tokenizer beside it (under FSDP: gathered
    # whole and written by rank 0 alone).
    save_dtype = getattr(torch, args.save_dtype)
    state = parallel.full_weights(model) if parallel is not None else model.state_dict()
    if state is None:
        return 0
    state = {name: t.detach().to("cpu", save_dtype) for name, t in state.items()}
    save_state_dict(model_cfg, state, out, format="hf")
    shutil.copyfile(args.tokenizer, out / ("tokenizer.json" if args.tokenizer.endswith(".json") else "tokenizer.model"))

    info = summary(
        result, config, device,
        parameters=model_cfg.n_params,
        init_from=args.init_from,
        rope_scaling=args.rope_scaling,
        model=model_cfg.to_dict(),  # every field: --model-config reads it back
        data={"files": [str(f) for f in files], "valid": args.valid, "documents": args.documents,
              "train_tokens": len(data), "valid_tokens": None if valid is None else len(valid)},
        save_dtype=args.save_dtype,
    )  # fmt: skip
    finish(out, result, config, info, title=f"{model_cfg.n_params / 1e6:.1f}M parameters, {result.tokens_seen:,} tokens",
           wrote=f"{out} (checkpoint)")  # fmt: skip
    return 0


if __name__ == "__main__":
    status = main()
    if "llama.distributed" in sys.modules:  # under torchrun: end without torch's C++ teardown (see there)
        sys.modules["llama.distributed"].exit(status)
    sys.exit(status)
