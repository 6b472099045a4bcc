"""Loading a checkpoint directory into a Transformer, and saving one back.

Loading never holds two copies of the model: the Transformer is built on the meta device (shapes,
no memory), every tensor's name and shape is checked against it before any data is read, and then
tensors are read one at a time, each straight into its final dtype and device.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

import weights
from weights import CheckpointError

from .config import ConfigError, ModelConfig
from .model import Transformer
from .tokenizer import TokenizerFormatError, TokenizerNotFoundError, eos_ids_from_configs, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def config_from_checkpoint(ckpt) -> ModelConfig:
    """The ModelConfig of an opened checkpoint, with errors naming its config file."""
    try:
        if ckpt.format == "meta":
            vocab = ckpt.shapes().get("tok_embeddings.weight", (None,))[0]
            return ModelConfig.from_meta(ckpt.config, vocab_size=vocab)
        return ModelConfig.from_hf(ckpt.config)
    except ConfigError as e:
        file = "params.json" if ckpt.format == "meta" else "config.json"
        raise ConfigError(f"{ckpt.path / file}: {str(e).removeprefix(file + ': ')}") from None


def meta_model(config: ModelConfig) -> Transformer:
    """The model with shapes but no memory (the meta device): a template to fill."""
    with torch.device("meta"):
        return Transformer(config)


def check_tensors(ckpt, model: Transformer) -> list[str]:
    """Names to load, after strict checks of names and shapes against the model."""
    config = model.config
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied weights appear once
    found = ckpt.shapes()
    if config.tie_word_embeddings and "output.weight" in found and "output.weight" not in expected:
        # Some tied checkpoints also store the output matrix; like transformers, use the embedding.
        found.pop("output.weight")
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    where = ckpt.path
    if missing:
        raise CheckpointError(f"{where}: missing tensors: {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensors: {', '.join(unexpected[:6])}" + (" ..." if len(unexpected) > 6 else "")
        )
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise CheckpointError(
                f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(found[name])}, "
                f"but the config expects {list(shape)}"
            )
        if ckpt.dtype(name) not in DTYPES.values():
            raise CheckpointError(f"{ckpt.file_of(name)}: unsupported weight dtype {ckpt.dtype(name)}; "
                                  f"expected one of {', '.join(DTYPES)}")
    return list(expected)


def load(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    swap: Callable[[Transformer, torch.dtype], Iterable[str]] | None = None,
) -> Transformer:
    """Load a Meta or Hugging Face checkpoint directory; returns the model in eval mode.

    dtype: float32, bfloat16 or float16 (default: the dtype the weights are stored in).
    progress: show a progress bar (default: for checkpoints over 1 GB when stderr is a terminal).
    swap: called with the model on the meta device and the dtype before any tensor is read; it may
        replace modules and returns the names of those that take their weight through
        `module.load_weight(tensor)` as it is read, instead of as a parameter (llama/quantization
        quantizes that way, so the float model never exists in memory as a whole). A tied output
        among them gets the embedding's table.
    """
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    ckpt = weights.open_checkpoint(path)
    try:
        config = config_from_checkpoint(ckpt)
        model = meta_model(config)
        names = check_tensors(ckpt, model)
        dtype = dtype or ckpt.dtype("tok_embeddings.weight")
        swapped = set(swap(model, dtype)) if swap is not None else set()
        # A swapped tied output is filled from the embedding's table: read once, kept in float for
        # the embedding, and handed to the output module as well.
        copy_output = config.tie_word_embeddings and "output" in swapped
        shapes = ckpt.shapes()
        total = sum(torch.Size(shapes[n]).numel() * dtype.itemsize for n in names)
        if progress is None:
            progress = total > 2**30 and sys.stderr.isatty()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {Path(path).name}", file=sys.stderr)

        state = {}

        def fill_swapped(module: str, tensor: torch.Tensor) -> None:
            layer = model.get_submodule(module)
            layer.load_weight(tensor.to(device))
            state.update({f"{module}.{n}": b for n, b in layer.named_buffers()})

        for name in names:
            tensor = ckpt.read(name, dtype)
            if bar is not None:
                bar.update(tensor.nbytes)
            if copy_output and name == "tok_embeddings.weight":
                fill_swapped("output", tensor)
            module = name.removesuffix(".weight")
            if module in swapped:
                fill_swapped(module, tensor)
                del tensor
                release_freed_memory()
                continue
            state[name] = tensor.to(device) if device.type != "cpu" else tensor
        if bar is not None:
            bar.close()
    finally:
        ckpt.close()

    # A swapped output (or a swapped embedding, which brings its own tied output) is filled already.
    assign_weights(model, state, config.tie_word_embeddings and not swapped & {"output", "tok_embeddings"}, device)
    model.stop_tokens = checkpoint_stop_tokens(path)
    return model.eval()


def assign_weights(model: Transformer, state: dict[str, torch.Tensor], tied: bool, device: torch.device) -> None:
    """Put `state` into a model built on the meta device (assign: the tensors themselves, no copy). tied:
    the output shares the embedding, whose tensor `state` holds once; it becomes one Parameter again, as
    in Transformer.__init__."""
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    model.rope_freqs = model.rope_freqs.to(device)


def release_freed_memory() -> None:
    """Hand memory freed by the C allocator back to the OS (glibc's malloc_trim; elsewhere nothing).

    Quantizing while loading frees each float weight right after quantizing it, but glibc keeps
    freed blocks of a few MB in its heap for reuse, and the mix of sizes (float weights, int8/int4
    results, temporaries) fragments it: without this, loading the 1B model as int8 peaked at 3.2 GB
    resident for 1.8 GB of weights; with it, at about 1.2x the quantized size.
    """
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 (raises AttributeError if absent)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def checkpoint_stop_tokens(path: str | os.PathLike) -> frozenset[int]:
    """The ids that end generation for this checkpoint: its tokenizer's stop tokens (Llama 3: end of
    text, end of message, end of turn), plus the eos ids of its config files."""
    try:
        return load_tokenizer(path).stop_tokens
    except (TokenizerNotFoundError, TokenizerFormatError):
        return frozenset(eos_ids_from_configs(Path(path)))


# What a checkpoint directory holds besides the weights and their config: the tokenizer, the
# generation defaults (eos ids) and the chat template. save(tokenizer_from=...) and convert() copy them.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")  # fmt: skip


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Copy the TOKENIZER_FILES that `src` has into `dst` (mode 0644); returns the files written."""
    import shutil

    written = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            (Path(dst) / name).chmod(0o644)
            written.append(Path(dst) / name)
    return written


def save(model: Transformer, path: str | os.PathLike, *, format: str = "hf", n_shards: int = 1,
         max_shard_bytes: int | None = None, tokenizer_from: str | os.PathLike | None = None) -> list[Path]:
    """Write a model as a Meta (params.json + consolidated.NN.pth) or HF (config.json + safetensors)
    checkpoint directory, with the tokenizer, generation config and chat template files of the
    checkpoint directory `tokenizer_from` (e.g. the one the model was loaded from), so that the
    result runs as it is. Returns the files written. Refuses (ValueError) a quantized model: these
    formats hold float weights."""
    quantization = getattr(model, "quantization", None)
    if quantization is not None:
        raise ValueError(f"the model is quantized ({quantization.get('mode')}): save writes float checkpoints; use "
                         "llama.quantization.save_quantized, or convert the source checkpoint (scripts/convert.py)")
    state = {n: t.detach().cpu() for n, t in model.state_dict().items()}
    written = save_state_dict(model.config, state, path, format=format, n_shards=n_shards, max_shard_bytes=max_shard_bytes)
    if tokenizer_from is not None:
        written += copy_tokenizer_files(tokenizer_from, path)
    return written


def save_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], path, *, format: str = "hf",
                    n_shards: int = 1, max_shard_bytes: int | None = None) -> list[Path]:
    if format == "meta":
        state = dict(state)
        if config.tie_word_embeddings:
            # Meta's format has no tying: it stores the output matrix even when it is the embedding.
            state["output.weight"] = state["tok_embeddings.weight"].clone()
        return weights.save_meta(path, config.to_meta(), state, n_shards=n_shards)
    if format == "hf":
        if n_shards != 1:
            raise ValueError("HF checkpoints are sharded by size: use max_shard_bytes, not n_shards")
        state = {n: t for n, t in state.items() if not (config.tie_word_embeddings and n == "output.weight")}
        dtypes = {t.dtype for t in state.values()}
        dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
        return weights.save_hf(path, config.to_hf(dtype), state, max_shard_bytes=max_shard_bytes)
    raise ValueError(f"unknown checkpoint format {format!r}; expected 'hf' or 'meta'")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, format: str, n_shards: int = 1,
            max_shard_bytes: int | None = None, dtype: str | torch.dtype | None = None,
            progress: bool | None = None) -> list[Path]:
    """Convert a checkpoint directory to `format` ("hf" or "meta"), losslessly unless `dtype` is given,
    with the source's tokenizer, generation config and chat template files (TOKENIZER_FILES).

    The source is checked completely (config, every tensor name and shape) before anything is
    written, and the output is written to a temporary directory that is renamed into place only
    when complete, so a failure leaves no partial checkpoint behind. `dst` must not exist yet.
    progress: a progress bar while reading (default: for checkpoints over 1 GB when stderr is a terminal).
    Files are written 0644 and the directory 0755.
    """
    import shutil
    import tempfile

    if format not in ("hf", "meta"):
        raise ValueError(f"unknown checkpoint format {format!r}; expected 'hf' or 'meta'")
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists; choose a new output directory")
    dtype = parse_dtype(dtype)
    ckpt = weights.open_checkpoint(src)
    try:
        config = config_from_checkpoint(ckpt)
        names = check_tensors(ckpt, meta_model(config))
        shapes = ckpt.shapes()
        total = sum(torch.Size(shapes[n]).numel() * (dtype or ckpt.dtype(n)).itemsize for n in names)
        if progress is None:
            progress = total > 2**30 and sys.stderr.isatty()
        from tqdm import tqdm

        state = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"reading {Path(src).name}", file=sys.stderr,
                  disable=not progress) as bar:  # fmt: skip
            for name in names:
                state[name] = ckpt.read(name, dtype)
                bar.update(state[name].nbytes)
    finally:
        ckpt.close()
    if format == "hf" and not config.tie_word_embeddings and torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
        # Meta's files store the tied output matrix of Llama 3.2 1B/3B as a copy; HF ties it.
        config = config.replace(tie_word_embeddings=True)
        del state["output.weight"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        written = save_state_dict(config, state, tmp, format=format, n_shards=n_shards, max_shard_bytes=max_shard_bytes)
        written += copy_tokenizer_files(src, tmp)
        tmp.chmod(0o755)  # mkdtemp made it 0700, for this process only
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [dst / f.name for f in written]
