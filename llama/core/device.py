"""Where to run: the device and CPU threads that the scripts' --device and --threads ask for."""

from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class DeviceError(ValueError):
    """A requested device is not available, or a thread count is not positive."""


def pick_device(name: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; a named device must be available."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if name not in available:
        raise DeviceError(f"unknown device {name!r}; expected auto, {', '.join(available)}")
    if not available[name]:
        raise DeviceError(f"--device {name} requested, but no {name} device is available")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """Set torch's CPU threads (None: leave torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise DeviceError(f"--threads must be positive, got {threads}")
    torch.set_num_threads(threads)


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn() run on a new thread that ends when fn returns; fn's result, or its exception raised here.

    For a program whose torch work runs on one long-lived thread (a server's engine) to do its setup
    -- loading, quantizing, compiling -- without leaving a second set of CPU worker threads behind.
    With OpenMP (torch's CPU threads on Linux), every thread that has run parallel torch work keeps
    its own team of worker threads until it ends. GNU OpenMP, counting more threads than cores, then
    stops letting idle workers wait on the CPU for the next parallel region: they sleep, and each of
    the hundreds of regions in a decoding step has to wake them. On this project's 2-core machine a
    server's engine thread decoded 9-14% slower than the same steps on the main thread for that
    reason, and as fast once the setup ran through here (scripts/serve.py; the main thread then
    keeps to one torch thread, torch.set_num_threads(1), which starts no team).
    """
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 -- handed to the caller as it is
            box["error"] = e

    thread = threading.Thread(target=run, name="setup", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box.pop("error")
    return box["result"]


def idle_threads(cores: int | None = None, load: float | None = None) -> int:
    """A thread count for decoding on a CPU: torch's default (one per physical core) less the cores
    that other processes kept busy over the last minute (the whole part of the 1-minute load
    average), at least 1.

    Decoding one token is a chain of small matrix-vector products, each split across the threads
    and joined at a barrier: a thread that has to wait for a busy core stalls all the others at
    every barrier. On this project's busy 2-core machine, one thread decoded about 10x faster than
    two. `cores` and `load` default to this machine's (for the tests).
    """
    cores = torch.get_num_threads() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform (Windows)
            load = 0.0
    return max(1, min(cores, cores - int(load)))  # int: a core busy for less than the whole minute counts as free


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix multiplies run natively: CUDA GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """A --dtype flag: "auto" is bfloat16 where the hardware runs it natively (CUDA from Ampere on;
    CPUs with AVX-512 BF16 or AMX, where it also halves the memory traffic), float16 on other GPUs,
    else float32; any other name is that torch dtype."""
    if name != "auto":
        return getattr(torch, name)
    if bf16_supported(device):
        return torch.bfloat16
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model runs on: its embedding's (a float table's, or a QuantizedEmbedding's)."""
    embedding = model.tok_embeddings
    return embedding.weight.device if isinstance(embedding, torch.nn.Embedding) else embedding.device


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's activations (its residual stream): the embedding's output dtype."""
    embedding = model.tok_embeddings
    return embedding.weight.dtype if isinstance(embedding, torch.nn.Embedding) else embedding.dtype


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights read to decode one token: every tensor the modules hold (quantized ones as
    they are stored, scales and kernel packings included; a tensor shared by two modules once), less
    the embedding's, of which one row per token is read, unless the output projection is that same
    table. Decoding speed x this = achieved memory bandwidth. Reads the tensors the modules hold, not
    a state dict: a module that keeps its weights in its own packing (kernels/native.py's
    NativeInt4Linear) would make its state dict's tensors anew."""

    def tensors(module: torch.nn.Module) -> dict[int, torch.Tensor]:
        found = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        return {t.data_ptr(): t for name, t in found.items() if name != "rope_freqs" and t.numel()}

    held = tensors(model)
    output = set(tensors(model.output))
    for ptr in tensors(model.tok_embeddings):
        if ptr not in output:
            held.pop(ptr, None)
    return sum(t.numel() * t.element_size() for t in held.values())
