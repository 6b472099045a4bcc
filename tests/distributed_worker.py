"""Run by tests/test_distributed.py under torchrun (gloo, CPU): each case prints one JSON line per
rank with what it measured; the test compares those with a single process's results.

    torchrun --nproc-per-node 2 tests/distributed_worker.py CASE ARGS_JSON OUT_DIR

Each rank writes OUT_DIR/rank_N.json (printing would interleave the ranks' long lines).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import llama
from llama import ModelConfig, Transformer
from llama.core.generation import generate

torch.set_num_threads(1)


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
            else:
                p.uniform_(0.5, 1.5)
    return model.eval()


def tokens(config: ModelConfig, T: int = 12) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


def shard_logits(args: dict) -> dict:
    """Logits of a full forward and of cached decoding, and greedy tokens, of the sharded model."""
    config = ModelConfig.from_dict(args["config"])
    model = llama.distributed.shard(random_model(config))
    if args.get("kernels"):
        import kernels

        kernels.optimize(model)
    t = tokens(config)
    with torch.no_grad():
        full = model(t)
        model.setup_cache(2, 16)
        decoded = torch.cat([model(t[:, :4], 0)] + [model(t[:, i : i + 1], i) for i in range(4, t.shape[1])], dim=1)
        model.clear_cache()
    greedy = generate(model, [[1, 2, 3], [4, 5]], 8, temperature=0, stop_tokens=[])
    heads = [(layer.attention.n_heads, layer.attention.n_kv_heads) for layer in model.layers]
    return {"full": full.tolist(), "decoded": decoded.tolist(), "greedy": greedy, "heads": heads}


def load_logits(args: dict) -> dict:
    model = llama.distributed.load(args["path"], dtype="float32")
    config = model.config
    with torch.no_grad():
        full = model(tokens(config))
    return {"full": full.tolist(), "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def main() -> None:
    case, args, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    llama.distributed.init()
    try:
        result = globals()[case](args)
    except Exception as e:  # reported, so the test can check refusals on every rank
        result = {"error": type(e).__name__, "message": str(e)}
    (out / f"rank_{dist.get_rank()}.json").write_text(json.dumps({"rank": dist.get_rank(), **result}))
    dist.barrier()  # both ranks done before either tears gloo down (a rank leaving early aborted the other, rarely)
    llama.distributed.exit(0)  # leaves the group and skips torch's C++ teardown, which sometimes aborted



def run_requests(engine, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
    """Submit greedy requests together and wait for them: the tokens of each."""
    import threading

    from llama.serving.engine import Request

    tokens = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def sink(i, delta):
        tokens[i] += delta.tokens
        if delta.finish_reason is not None:
            done.release()

    engine.submit([Request(p, max_tokens, stop_tokens=()) for p in prompts], sink)
    for _ in prompts:
        assert done.acquire(timeout=120)
    return tokens


def engine_outputs(args: dict) -> dict:
    """Rank 0 serves requests through the continuous-batching engine over a Leader; the others follow."""
    import weights
    from llama.distributed import Leader, follow
    from llama.serving.engine import Engine

    config = ModelConfig.from_dict(args["config"])
    model = llama.distributed.shard(random_model(config))
    if dist.get_rank() != 0:
        return {"followed": follow(model)}
    leader = Leader(model)
    engine = Engine(leader, llama.load_tokenizer(weights.BUNDLED_MODEL), max_batch_size=4, max_seq_len=32)
    engine.start()
    try:
        outputs = run_requests(engine, args["prompts"])
    finally:
        engine.stop()
        leader.stop()
    return {"outputs": outputs}


def one_rank_fails(args: dict) -> dict:
    """Rank 1 raises inside together(), rank 0 does not."""
    with llama.distributed.together():
        if dist.get_rank() == 1:
            raise llama.CheckpointError("no checkpoint on this machine")
    return {"error": None}



# ---- data-parallel training (FSDP2) -------------------------------------------------------------------------


def training_setup(args: dict):
    """The model, data and TrainConfig of the training cases (the same in the test's one process)."""
    import numpy as np

    from llama.training.loop import TrainConfig
    from llama.training.pretrain import TokenWindows

    config = ModelConfig.from_dict(args["config"])
    model = random_model(config).train()
    for p in model.parameters():
        p.data.mul_(0.3)  # a trainable scale: the loss falls over the steps
    tokens = (np.arange(5000) * 7 % 61).astype(np.int64)  # a cycle: learnable in a few steps
    train_config = TrainConfig(max_steps=5, batch_size=4, grad_accum=2, context=16, lr=1e-2, min_lr=1e-3, warmup_steps=1,
                               eval_every=100, save_every=100, precision="float32", seed=3)  # fmt: skip
    return model, TokenWindows(tokens[:4000], tokens[4000:], train_config), train_config


def fsdp_train(args: dict) -> dict:
    """Train (or resume) under FSDP2 over every rank; losses and, from rank 0, the whole final weights."""
    from llama.training import loop

    model, data, config = training_setup(args)
    parallel = llama.distributed.DataParallel()
    parallel.shard(model)
    result = loop.train(model, data, config, out_dir=args["out"], resume=args.get("resume", False),
                        stop_at=args.get("stop_at"), progress=False, parallel=parallel)  # fmt: skip
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    weights = {name: t.tolist() for name, t in state.items()} if dist.get_rank() == 0 else None
    return {"losses": result.train_losses, "weights": weights}


if __name__ == "__main__":
    main()
