"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), applied from outside the model.

    apply_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16)   # or Meta's names: ["wq", "wv"]
    ... train: only the adapters require gradients ...
    save_adapter(model, "out")                                  # peft's files: peft and transformers read them
    load_adapter(model, "other", name="b"); set_adapter(model, "b")   # several adapters, one active
    merge_lora(model)                                           # fold the active adapter into the weights

Shape glossary: N out_features, K in_features, r the adapter's rank, B batch, T tokens.

A frozen projection W (N, K) gets a trainable low-rank update: y = W x + s * B (A x), with A (r, K)
and B (N, r), r much smaller than N and K, and s = alpha / r (rsLoRA, Kalajdzievski 2023:
alpha / sqrt(r), which keeps the update's scale steady as r grows). A starts random and B at zero,
so the adapted model starts as the base model exactly and training moves it away from there. The
adapter holds r (N + K) numbers instead of N K: for Llama 3.2 1B at r = 8 on all seven projections
of every block, 5.6 M instead of 1.24 B.

The model file does not change: apply_lora swaps each chosen projection for a LoRALinear that holds
the original module as `base` (an nn.Linear, or for QLoRA an Int8Linear / Int4Linear, whose
gradients flow to the input: see llama/quantization/linear.py) plus the adapters. Projections are
named the Hugging Face way or Meta's way (TARGETS); inside the model they keep Meta's names.

Several adapters can sit on one model; `set_adapter` picks the one that computes, and
`per_row_adapters` lets each row of a batch use its own (the base matmul runs once for all rows; each
row adds its adapter's low-rank product). Merging adds s * B @ A into the float base weight
(inference then costs nothing extra); unmerging subtracts it again (exact up to rounding).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import weights.peft as peft_format
from weights import CheckpointError

from ..core.model import Transformer
from ..quantization.linear import Int4Linear, Int8Linear
from .qlora import RowwiseInt4Linear

# Every projection LoRA can adapt, in the names a user may give: Hugging Face's (peft's
# target_modules) and Meta's (this model's attribute names). Values: the module path inside a block
# (or the model, for the output projection).
TARGETS = {
    "q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
    "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2", "lm_head": "output",
    "wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
    "w1": "feed_forward.w1", "w3": "feed_forward.w3", "w2": "feed_forward.w2", "output": "output",
}  # fmt: skip
# Beside peft's two files: ModelConfig settings the base was fine-tuned with (finetune.py's --set),
# which peft's config has no place for.
BASE_SETTINGS = "llama_base_settings.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # all but lm_head
BASE_TYPES = (nn.Linear, Int8Linear, Int4Linear, RowwiseInt4Linear)


class LoRALinear(nn.Module):
    """A projection plus low-rank adapters: y = base(x) + s_a * B_a (A_a dropout(x)) for the active adapter a.

    base: the frozen module (nn.Linear, Int8Linear or Int4Linear), kept as a submodule, so its
        tensors are named `<projection>.base.weight` while wrapped.
    lora_A[a]: (r, K) and lora_B[a]: (N, r), parameters in the adapter's dtype (float32 by default,
        whatever the base's dtype: the products are cast back to the base output's dtype).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        if type(base) not in BASE_TYPES:
            raise TypeError(f"LoRA wraps nn.Linear, Int8Linear or Int4Linear modules, got {type(base).__name__}")
        if getattr(base, "bias", None) is not None:
            raise ValueError("LoRA here wraps bias-free projections (Llama has no biases)")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.dropout: dict[str, float] = {}  # on the adapter's input, while training
        self.alpha: dict[str, float] = {}
        self.rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}  # alpha / r, or alpha / sqrt(r) with rsLoRA
        self.active: str | None = None  # the adapter forward() adds (None: the base alone)
        self.merged: str | None = None  # the adapter folded into base.weight, if any
        self.rows: dict[str, torch.Tensor] | None = None  # per-row adapters (see per_row_adapters)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False, *,
                    dtype=torch.float32, generator: torch.Generator | None = None,
                    A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> None:
        """A new adapter: given A (r, K) and B (N, r), or A uniform in +-1/sqrt(K) (nn.Linear's and
        peft's default) and B zero."""
        device = self.base.weight.device
        if A is None:
            bound = 1 / math.sqrt(self.in_features)
            A = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound  # drawn on the CPU: same anywhere
        if B is None:
            B = torch.zeros(self.out_features, rank)
        assert A.shape == (rank, self.in_features) and B.shape == (self.out_features, rank), (A.shape, B.shape)
        self.lora_A[name] = nn.Parameter(A.to(device, dtype))
        self.lora_B[name] = nn.Parameter(B.to(device, dtype))
        self.dropout[name] = dropout
        self.alpha[name], self.rslora[name] = alpha, rslora
        self.scaling[name] = alpha / (math.sqrt(rank) if rslora else rank)

    def lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s * B (A dropout(x)): (..., K) -> (..., N), in x's dtype."""
        A, B = self.lora_A[name], self.lora_B[name]
        x = F.dropout(x, self.dropout[name], self.training) if self.dropout[name] > 0 else x
        # Under autocast F.linear computes in autocast's dtype whatever its inputs' dtypes: a cast to
        # A's float32 would only add two copies of x (the second kept for the backward pass), the
        # same values either way.
        h = F.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(A.dtype), A)  # (..., r)
        return (F.linear(h, B) * self.scaling[name]).to(x.dtype)  # (..., N)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B @ A: (N, K) float32, what merging adds to the base weight."""
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, N): one matmul with the base for every row
        if self.rows is not None:
            # Each adapter adds its product to its own rows only (batch dim 0).
            for name, rows in self.rows.items():
                y = y.index_add(0, rows, self.lora(name, x.index_select(0, rows)).to(y.dtype))
            return y
        if self.active is None or self.active == self.merged:
            return y
        return y + self.lora(self.active, x).to(y.dtype)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={a.shape[0]}, scaling={self.scaling[n]:g}" for n, a in self.lora_A.items())
        return f"adapters {{{ranks}}}, active={self.active!r}, merged={self.merged!r}"


# ---- finding and wrapping projections ------------------------------------------------------------


def resolve_targets(targets: Sequence[str] | str | None) -> list[str]:
    """Module paths (in a block, or "output") for target names in either naming; refuses unknown ones.
    "all-linear" (peft's word) is the seven block projections."""
    if targets is None or targets == "all-linear" or list(targets) == ["all-linear"]:
        targets = DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    unknown = [t for t in targets if t.strip() not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target {', '.join(map(repr, unknown))}; expected names among "
                         f"{', '.join(TARGETS)} (or all-linear)")  # fmt: skip
    if not targets:
        raise ValueError("no LoRA targets given")
    paths = []
    for t in targets:
        if TARGETS[t.strip()] not in paths:
            paths.append(TARGETS[t.strip()])
    return paths


def module_names(model: Transformer, targets: Sequence[str] | str | None = None, layers: Sequence[int] | None = None) -> list[str]:
    """Full module names of the chosen projections, e.g. ["layers.0.attention.wq", ..., "output"]."""
    paths = resolve_targets(targets)
    n_layers = len(model.layers)
    layers = range(n_layers) if layers is None else layers
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist; the model has layers 0..{n_layers - 1}")
    names = [f"layers.{i}.{p}" for i in layers for p in paths if p != "output"]
    return names + (["output"] if "output" in paths else [])


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _wrap(model: nn.Module, name: str) -> LoRALinear:
    """The LoRALinear at module `name`, wrapping the projection there first if it is not one yet."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, child)
    if isinstance(module, LoRALinear):
        return module
    wrapped = LoRALinear(module)
    setattr(parent, child, wrapped)
    return wrapped


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, module in lora_modules(model):
        names += [n for n in module.lora_A if n not in names]
    return names


def apply_lora(model: Transformer, targets: Sequence[str] | str | None = None, *, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, rslora: bool = False, layers: Sequence[int] | None = None, name: str = "default",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> list[str]:
    """Add a new adapter `name` to the chosen projections, make it the active one and the only thing
    that trains (every other parameter gets requires_grad=False). Returns the module names adapted.

    targets: projection names, HF (q_proj ... down_proj, lm_head) or Meta (wq ... w3, output);
        default: the seven projections of every block (not the output).
    layers: block indices to adapt (default all). alpha: the scaling numerator (s = alpha / rank, or
    alpha / sqrt(rank) with rslora). dtype: of A and B. seed: A's initialisation.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    if any(m.merged is not None for _, m in lora_modules(model)):
        raise ValueError("an adapter is merged into the weights: unmerge_lora(model) before adding another")
    names = module_names(model, targets, layers)
    generator = torch.Generator().manual_seed(seed)
    for module_name in names:
        _wrap(model, module_name).add_adapter(name, rank, alpha, dropout, rslora, dtype=dtype, generator=generator)
    set_adapter(model, name)
    mark_trainable(model, name)
    return names


def mark_trainable(model: nn.Module, name: str) -> None:
    """requires_grad on adapter `name`'s A and B only."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in lora_modules(model):
        if name in module.lora_A:
            module.lora_A[name].requires_grad_(True)
            module.lora_B[name].requires_grad_(True)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one that computes (None: the base model alone)."""
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    for _, module in lora_modules(model):
        if module.merged is not None and module.merged != name:
            raise ValueError(f"adapter {module.merged!r} is merged into the weights: unmerge_lora(model) before switching")
        module.active = name if name in module.lora_A else None


@contextlib.contextmanager
def per_row_adapters(model: nn.Module, names: Sequence[str | None]):
    """Inside the block, row b of every batch uses adapter names[b] (None: the base alone).

    The base projections run once over all rows; each adapter adds its low-rank product to its
    rows only. For serving several adapters in one batch. Needs every adapter unmerged.
    """
    known = adapter_names(model)
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; the model has {known}")
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged is not None for m in modules):
        raise ValueError("per-row adapters need unmerged adapters: unmerge_lora(model) first")
    device = next(model.parameters()).device
    for module in modules:
        groups = {}
        for name in dict.fromkeys(n for n in names if n is not None and n in module.lora_A):
            groups[name] = torch.tensor([b for b, n in enumerate(names) if n == name], device=device)
        module.rows = groups
    try:
        yield
    finally:
        for module in modules:
            module.rows = None


# ---- merging -------------------------------------------------------------------------------------


@torch.no_grad()
def merge_lora(model: Transformer) -> None:
    """Add the active adapter's s * B @ A into each float base weight (forward then costs no more
    than the base model's). A tied output projection is untied first (it gets its own copy of the
    embedding matrix), since merging into it would change the embedding too."""
    modules = [(n, m) for n, m in lora_modules(model) if m.active is not None and m.merged is None]
    quantized = [n for n, m in modules if not isinstance(m.base, nn.Linear)]
    if quantized:
        raise ValueError(f"cannot merge into quantized weights ({quantized[0]} ...): load the float checkpoint, "
                         "apply the adapter to it, then merge")  # fmt: skip
    for name, module in modules:
        # (a QuantizedEmbedding has no float .weight: then the output is not the embedding)
        if name == "output" and module.base.weight is getattr(model.tok_embeddings, "weight", None):
            module.base.weight = nn.Parameter(module.base.weight.detach().clone(), requires_grad=False)
            model.config = model.config.replace(tie_word_embeddings=False)
        w = module.base.weight
        w.copy_((w.float() + module.delta_weight(module.active)).to(w.dtype))
        module.merged = module.active


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Subtract what merge_lora added (exact up to the rounding of the weights' dtype)."""
    for _, module in lora_modules(model):
        if module.merged is not None:
            w = module.base.weight
            w.copy_((w.float() - module.delta_weight(module.merged)).to(w.dtype))
            module.merged = None


def unload_lora(model: nn.Module) -> None:
    """Put the base projections back in place of the LoRALinear wrappers (dropping the adapters);
    after merge_lora this leaves a plain model with the adapter in its weights, which llama.save writes."""
    for name, module in list(lora_modules(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)


# ---- peft's files --------------------------------------------------------------------------------


def save_adapter(model: Transformer, directory: str | os.PathLike, name: str | None = None, *,
                 base_model: str | None = None, dtype: torch.dtype | None = None,
                 base_settings: Sequence[str] = ()) -> list[Path]:
    """Write adapter `name` (default: the active one) as peft's adapter_config.json +
    adapter_model.safetensors, in Hugging Face's names and row order. dtype: of the saved A and B
    (default: as trained). base_settings: the `field=value` settings the base was trained with
    (finetune's --set), written to BASE_SETTINGS for llama.load(..., adapter=) to apply again.
    Returns the files written."""
    name = name or next((m.active for _, m in lora_modules(model) if m.active is not None), None)
    if name is None or name not in adapter_names(model):
        raise ValueError(f"no adapter {name!r} to save; the model has {adapter_names(model)}")
    wrapped = {n: m for n, m in lora_modules(model) if name in m.lora_A}
    modules = {}
    for module_name, module in wrapped.items():
        A, B = module.lora_A[name].detach().cpu(), module.lora_B[name].detach().cpu()
        modules[module_name] = peft_format.LoraTensors(A.to(dtype or A.dtype), B.to(dtype or B.dtype), module.alpha[name])
    rslora = {m.rslora[name] for m in wrapped.values()}
    dropout = {m.dropout[name] for m in wrapped.values()}
    if len(rslora) > 1 or len(dropout) > 1:
        raise ValueError(f"adapter {name!r} mixes rsLoRA settings or dropout rates, which peft's config cannot express")
    # The most common rank and alpha go into r and lora_alpha; the others into peft's patterns.
    ranks = {m: lora.rank for m, lora in modules.items()}
    alphas = {m: lora.alpha for m, lora in modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    hf = {m: peft_format.hf_module_name(m) for m in modules}
    config = peft_format.adapter_config(
        r=r, lora_alpha=_number(alpha), lora_dropout=dropout.pop(), use_rslora=rslora.pop(),
        target_modules=_target_modules(list(modules), len(model.layers)),
        rank_pattern={_exact(hf[m]): v for m, v in ranks.items() if v != r},
        alpha_pattern={_exact(hf[m]): _number(v) for m, v in alphas.items() if v != alpha},
        base_model_name_or_path=base_model,
    )  # fmt: skip
    written = peft_format.save_adapter(directory, config, modules, model.config.n_heads, model.config.n_kv_heads)
    settings = Path(directory) / BASE_SETTINGS
    if base_settings:
        settings.write_text(json.dumps({"set": list(base_settings)}, indent=2) + "\n", encoding="utf-8")
        written.insert(0, settings)
    elif settings.exists():
        settings.unlink()
    return written


def read_base_settings(directory: str | os.PathLike) -> list[str]:
    """The `field=value` settings save_adapter recorded for the base (none: [])."""
    path = Path(directory) / BASE_SETTINGS
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("set"), list) or not all(isinstance(x, str) for x in data["set"]):
        raise CheckpointError(f"{path}: expected {{\"set\": [\"field=value\", ...]}}")
    return data["set"]


def _exact(hf_module: str) -> str:
    """A rank_pattern / alpha_pattern key matching exactly this module (keys are regexes)."""
    return hf_module.replace(".", r"\.")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _target_modules(names: list[str], n_layers: int) -> list[str] | str:
    """peft's target_modules: the HF short names when every block has the same projections adapted,
    else a regular expression matching exactly the adapted modules."""
    hf = [peft_format.hf_module_name(n) for n in names]
    short = sorted({h.rsplit(".", 1)[-1] for h in hf})
    covered = {f"{peft_format.hf_module_name(f'layers.{i}.{TARGETS[s]}')}" for i in range(n_layers)
               for s in short if s != "lm_head"} | ({"lm_head"} if "lm_head" in short else set())  # fmt: skip
    if covered == set(hf):
        return short
    return "|".join(h.replace(".", r"\.") for h in hf)


def load_adapter(model: Transformer, directory: str | os.PathLike, name: str = "default", *,
                 dtype: torch.dtype | None = None, trainable: bool = False) -> str:
    """Load a peft LoRA adapter (made here or by peft) onto `model` as adapter `name` and make it the
    active one. Projections not wrapped yet are wrapped. trainable: continue training it (only its A
    and B require gradients); otherwise nothing about requires_grad changes. Returns `name`."""
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    config, modules, base = peft_format.read_adapter(directory, model.config.n_heads, model.config.n_kv_heads)
    for base_name, tensor in base.items():
        _check_base_copy(model, base_name, tensor, directory)
    for module_name, lora in modules.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise CheckpointError(f"{directory}: adapts {module_name}, which this model does not have") from None
        if not isinstance(module, (LoRALinear, *BASE_TYPES)):
            raise CheckpointError(f"{directory}: adapts {module_name}, a {type(module).__name__}: LoRA here adapts "
                                  "the projections (q/k/v/o, gate/up/down, lm_head)")  # fmt: skip
        N, K = module.out_features, module.in_features
        if lora.A.shape[1] != K or lora.B.shape[0] != N:
            raise CheckpointError(f"{directory}: {module_name}: lora_A {list(lora.A.shape)} and lora_B {list(lora.B.shape)} "
                                  f"do not fit a projection of {K} -> {N}")  # fmt: skip
    use_rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout") or 0.0)
    for module_name, lora in modules.items():
        _wrap(model, module_name).add_adapter(name, lora.rank, lora.alpha, dropout, use_rslora,
                                              dtype=dtype or lora.A.dtype, A=lora.A, B=lora.B)  # fmt: skip
    set_adapter(model, name)
    if trainable:
        mark_trainable(model, name)
    else:
        for _, module in lora_modules(model):
            if name in module.lora_A:
                module.lora_A[name].requires_grad_(False)
                module.lora_B[name].requires_grad_(False)
    return name


def _check_base_copy(model: nn.Module, name: str, tensor: torch.Tensor, directory) -> None:
    """peft stores the base weight of an adapted lm_head (or embedding) with the adapter; it must be
    this model's own (a float base: equal after rounding to its dtype; a quantized one: same shape)."""
    module = model.get_submodule(name.removesuffix(".weight"))
    module = module.base if isinstance(module, LoRALinear) else module
    ours = module.weight
    shape = tuple(ours.shape) if ours.is_floating_point() else (module.out_features, module.in_features)
    same = shape == tuple(tensor.shape)
    if same and ours.is_floating_point():
        same = torch.equal(ours.detach().cpu(), tensor.to(ours.dtype))
    if not same:
        raise CheckpointError(f"{directory}: the adapter carries its own {name} (peft's copy of the base layer), which "
                              "differs from this model's: adapters trained with a resized or retrained vocabulary are not supported")  # fmt: skip
