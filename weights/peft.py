"""PEFT's LoRA adapter format: a directory with adapter_config.json and adapter_model.safetensors.

    config, modules = read_adapter("adapter-dir", n_heads=32, n_kv_heads=8)
    modules["layers.0.attention.wq"]      # LoraTensors(A (r, in), B (out, r), alpha), Meta names and rows
    save_adapter("out", adapter_config(r=8, lora_alpha=16, ...), modules, n_heads=32, n_kv_heads=8)

The files hold, for each adapted projection of a transformers LlamaForCausalLM,
`base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), with <module> an HF
module name (model.layers.N.self_attn.q_proj, model.layers.N.mlp.down_proj, lm_head); the update
of the module's weight is scaling * B @ A, scaling = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)).

Row order. HF's q_proj and k_proj rows are Meta's permuted inside each head (see hf.py). Since
the update B @ A is added to the weight, its rows follow the same permutation: P (B @ A) = (P B) A.
So lora_B of q and k is permuted like the weights (with the key/value head count for k), and
lora_A, whose rows are the rank dimension, is not.

Only plain LoRA is read. Features that change what an adapter computes and that this project does
not implement (DoRA, biases, modules_to_save, fan_in_fan_out, LoRA on the embedding, ...) are refused
by name, as are tensors of unknown names. Keys of adapter_config.json that only describe how an
adapter was initialised or trained are ignored; unknown keys are accepted only while they are off
(null, false, empty), since peft adds a switch for every new feature.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .hf import hf_to_meta_name, meta_to_hf_name, permute_to_hf, permute_to_meta
from .jsonio import read_json_object
from .safetensors_io import SafetensorsFile, save_safetensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"  # older peft; read with weights_only=True
PREFIX = "base_model.model."

# Keys of adapter_config.json that do not change what a loaded adapter computes.
_DESCRIPTIVE = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "auto_mapping", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "init_lora_weights",
    "loftq_config", "eva_config", "corda_config", "megatron_config", "megatron_core", "qalora_group_size",
    "ensure_weight_tying",
}  # fmt: skip
# Keys that must hold these values (a different value is a feature not implemented here).
_REQUIRED = {"bias": "none", "use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False}


@dataclass
class LoraTensors:
    """One adapted projection: delta W = scaling * B @ A, in Meta's row order."""

    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def scaling(self, use_rslora: bool) -> float:
        return self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank)


def pattern_key(patterns, module: str) -> str | None:
    """The key of peft's rank_pattern / alpha_pattern that applies to an HF module name: a key
    matches when it is a regular expression matching the end of the name after a dot (peft's
    get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def check_config(config: dict, where: str | Path) -> None:
    """CheckpointError naming the first key of adapter_config.json this project cannot honour."""
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r}; only LoRA adapters (\"LORA\") are supported")
    for key, value in _REQUIRED.items():
        if key in config and config[key] != value:
            raise CheckpointError(f"{where}: {key} = {config[key]!r} is not supported (only {value!r})")
    for key, value in config.items():
        if key not in _DESCRIPTIVE and key not in _REQUIRED and value not in (None, False, {}, [], ""):
            raise CheckpointError(f"{where}: {key} = {value!r} is not supported by this project's LoRA")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise CheckpointError(f"{where}: {key} must be an object, got {config[key]!r}")


def read_adapter(directory: str | os.PathLike, n_heads: int, n_kv_heads: int) -> tuple[dict, dict[str, LoraTensors], dict[str, torch.Tensor]]:
    """(adapter_config.json, {Meta module name: LoraTensors}, base tensors) of an adapter directory.

    Base tensors: peft saves the base weight of an adapted lm_head or embedding beside the adapter
    (`lm_head.base_layer.weight`); they are returned in Meta's names for the caller to compare with
    its own, since an adapter trained with a resized vocabulary needs those weights.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such adapter directory")
    config = read_json_object(directory / CONFIG)
    check_config(config, directory / CONFIG)
    tensors = _read_tensors(directory)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    parts: dict[str, dict[str, torch.Tensor]] = {}
    base: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        match = re.fullmatch(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight", name)
        if match:
            parts.setdefault(match["module"], {})[match["which"]] = tensor
            continue
        meta = hf_to_meta_name(name.replace(".base_layer.", "."))
        if key.startswith(PREFIX) and meta is not None:
            base[meta] = tensor
            continue
        what = {"lora_magnitude_vector": "DoRA", "lora_embedding_": "LoRA on the embedding", "lora_bias": "LoRA biases"}
        feature = next((v for k, v in what.items() if k in name), None)
        raise CheckpointError(f"{directory}: tensor {key!r}" + (f" ({feature}) is not supported" if feature else " is not a LoRA weight of a Llama model"))

    modules: dict[str, LoraTensors] = {}
    for hf_module, ab in parts.items():
        meta = hf_to_meta_name(hf_module + ".weight")
        if meta is None:
            raise CheckpointError(f"{directory}: {hf_module!r} is not a projection of a Llama model")
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{directory}: {hf_module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"{directory}: {hf_module!r}: lora_A {list(A.shape)} and lora_B {list(B.shape)} "
                                  "are not (r, in) and (out, r)")  # fmt: skip
        key = pattern_key(rank_pattern, hf_module)
        rank = rank_pattern[key] if key is not None else config["r"]
        if A.shape[0] != rank:
            raise CheckpointError(f"{directory}: {hf_module!r} has rank {A.shape[0]}, but the config says {rank}")
        meta = meta.removesuffix(".weight")
        if meta.endswith("attention.wq"):
            B = permute_to_meta(B, n_heads)
        elif meta.endswith("attention.wk"):
            B = permute_to_meta(B, n_kv_heads)
        key = pattern_key(alpha_pattern, hf_module)
        modules[meta] = LoraTensors(A, B, float(alpha_pattern[key] if key is not None else config["lora_alpha"]))
    if not modules:
        raise CheckpointError(f"{directory}: the adapter holds no lora_A / lora_B tensors")
    return config, modules, base


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS).is_file():
        file = SafetensorsFile(directory / WEIGHTS)
        return {name: file.read(name) for name in file.names()}
    if (directory / PICKLED_WEIGHTS).is_file():
        try:
            state = torch.load(directory / PICKLED_WEIGHTS, map_location="cpu", weights_only=True)
        except Exception as e:  # any unpickling failure of an untrusted file
            raise CheckpointError(f"{directory / PICKLED_WEIGHTS}: cannot read: {e}") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise CheckpointError(f"{directory / PICKLED_WEIGHTS}: not a dict of tensors")
        return state
    raise CheckpointError(f"{directory}: no {WEIGHTS} (or {PICKLED_WEIGHTS}) beside {CONFIG}")


def adapter_config(*, r: int, lora_alpha: float, lora_dropout: float, target_modules: list[str], use_rslora: bool,
                   rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                   base_model_name_or_path: str | None = None) -> dict:
    """An adapter_config.json dict that peft's LoraConfig reads (target_modules: HF module names)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "use_rslora": use_rslora,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def hf_module_name(meta_module: str) -> str:
    """layers.0.attention.wq -> model.layers.0.self_attn.q_proj; output -> lm_head."""
    return meta_to_hf_name(meta_module + ".weight").removesuffix(".weight")


def save_adapter(directory: str | os.PathLike, config: dict, modules: dict[str, LoraTensors], n_heads: int,
                 n_kv_heads: int) -> list[Path]:
    """Write adapter_config.json and adapter_model.safetensors from Meta-named LoRA tensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for meta, lora in modules.items():
        B = lora.B
        if meta.endswith("attention.wq"):
            B = permute_to_hf(B, n_heads)
        elif meta.endswith("attention.wk"):
            B = permute_to_hf(B, n_kv_heads)
        hf = PREFIX + hf_module_name(meta)
        tensors[f"{hf}.lora_A.weight"] = lora.A.contiguous()
        tensors[f"{hf}.lora_B.weight"] = B.contiguous()
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_safetensors(directory / WEIGHTS, tensors, metadata={"format": "pt"})
    return [directory / CONFIG, directory / WEIGHTS]
