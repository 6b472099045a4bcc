"""Looking inside the plain model: each layer's attention probabilities and hidden states.

    rec = Recorder()
    logits = model(tokens, record=rec)
    rec.attention(2)     # (B, H, T, S) float: layer 2's softmax(q k^T / sqrt(hd) + mask), row i = query i
    rec.hidden(0)        # (B, T, D): what block 0 reads (the embeddings); hidden(n_layers) is what the
                         # final norm reads

Transformer.forward puts the recorder on the Context it hands every layer; Attention.attend gives it
the probabilities it has just computed (the same tensor it multiplies the values with), and the
forward gives it the residual stream between blocks. Nothing is recomputed, nothing is global:
a forward without `record` does exactly what it did before.

With a KV cache the probabilities of one call cover the cache positions 0..S-1 its queries attend
to (stale slots beyond a row's position get probability 0, as the mask gives them). Calls add up:
after a prefill and decode steps, attention(l) joins them along the query axis (the key axis padded
with zeros to the longest S), which is the matrix one full forward over the same tokens gives.

Only the plain Attention computes probabilities. A fast path that never forms them (kernels'
SDPA attention) refuses a forward that asks for them, rather than leaving a layer out.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

KINDS = ("attention", "hidden")


class Recorder:
    """Collects tensors from forward calls made with `record=recorder` (see the module docstring).

    layers: record only these layer indices (default: all); attention, hidden: which kinds to keep.
    Tensors are kept as computed (detached, in the model's dtype and device): a long prompt on a large
    model gives B * H * T * S probabilities per layer, so narrow `layers` there.
    """

    def __init__(self, layers: Iterable[int] | None = None, *, attention: bool = True, hidden: bool = True):
        self.layers = None if layers is None else frozenset(layers)
        self.kinds = {kind for kind, keep in (("attention", attention), ("hidden", hidden)) if keep}
        self.calls: dict[tuple[str, int], list[torch.Tensor]] = {}

    def wants(self, kind: str, layer: int) -> bool:
        return kind in self.kinds and (self.layers is None or layer in self.layers)

    def add(self, kind: str, layer: int, x: torch.Tensor) -> None:
        """Called by the model: x is attention probabilities (B, H, T, S) or a hidden state (B, T, D)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        if self.wants(kind, layer):
            self.calls.setdefault((kind, layer), []).append(x.detach())

    def attention(self, layer: int) -> torch.Tensor:
        """(B, H, T, S): the attention probabilities of layer `layer`, every call joined along T."""
        parts = self._parts("attention", layer)
        S = max(p.shape[-1] for p in parts)
        return torch.cat([F.pad(p, (0, S - p.shape[-1])) for p in parts], dim=2)

    def hidden(self, layer: int) -> torch.Tensor:
        """(B, T, D): the residual stream entering block `layer` (layer n_layers: leaving the last block)."""
        return torch.cat(self._parts("hidden", layer), dim=1)

    def clear(self) -> None:
        self.calls.clear()

    def _parts(self, kind: str, layer: int) -> list[torch.Tensor]:
        if (kind, layer) not in self.calls:
            recorded = sorted(i for k, i in self.calls if k == kind)
            raise KeyError(f"no {kind} recorded for layer {layer}; recorded layers: {recorded or 'none'}")
        return self.calls[(kind, layer)]


def plot_attention(probs: torch.Tensor, labels: list[str], path, title: str = "") -> None:
    """Draw attention probabilities as heat maps into a PNG: probs (n, T, S) for n heads side by side,
    query tokens down, key tokens across (labels: the S key tokens; the queries are the last T).
    Needs matplotlib (the project's [plot] extra); ImportError otherwise."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend

    n, T, S = probs.shape
    cols = min(n, 4)
    rows = -(-n // cols)
    side = 2.0 + 0.28 * S
    fig = Figure(figsize=(cols * side, rows * side), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        image = ax.imshow(probs[i].float().cpu().numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(S), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels[S - T :], fontsize=7)
        ax.set_title(f"head {i}" if n > 1 else title, fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="probability")
    if n > 1 and title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
