"""Splicing into the model: the clean pass that captures what the other passes need, the passes that replace
one hooked activation and run only from its block to the logits, and the SAE's reconstruction.

transformer-lens 4.3's `TransformerBridge.forward(resid, start_at_layer=L)` feeds `resid` to the Hugging Face
model as inputs_embeds and swaps it in as block L's input, but blocks 0..L-1 still execute on it and their
output is discarded (its docstring and `_setup_start_at_layer` say so). `skip_blocks_below` turns those blocks
into pass-throughs for the duration of a pass, so a spliced pass runs blocks L..end and the unembedding only.
tests/test_evaluate.py checks that a pass that puts the clean activation back gives the clean logits exactly.

Shapes: B contexts, T positions, D d_in, F latents, V vocabulary, N selected tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from torch import Tensor

from sae_cache.sae_common.model import hook_layer
from sae_cache.sae_common.sae import SAE


def resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@dataclass
class CleanPass:
    logits_BTV: Tensor
    acts: dict[str, Tensor]  # hook -> [B, T, D]: the activation each SAE reads and replaces
    resid: dict[int, Tensor]  # layer -> [B, T, D]: the residual entering that block, where spliced passes start


def clean_pass(bridge: Any, tokens_BT: Tensor, hooks: list[str]) -> CleanPass:
    """One full forward: the logits, every hook's activation, and the residual entering each hook's block."""
    layers = sorted({hook_layer(h) for h in hooks})
    names = list(dict.fromkeys([*hooks, *(resid_pre(layer) for layer in layers)]))
    logits_BTV, cache = bridge.run_with_cache(tokens_BT, names_filter=names, return_cache_object=False)
    return CleanPass(logits_BTV, {h: cache[h] for h in hooks}, {layer: cache[resid_pre(layer)] for layer in layers})


def _pass_through(*args: Any, **kwargs: Any) -> Tensor:
    # transformers 5 decoder layers take the hidden states first and return them as a bare tensor
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def skip_blocks_below(bridge: Any, layer: int) -> Iterator[None]:
    """Blocks 0..layer-1 return their input untouched (their hooks do not fire) until the block exits."""
    skipped = list(bridge.blocks)[:layer]
    for block in skipped:
        # An instance attribute, which nn.Module.__call__ finds before the class's forward. object.__setattr__,
        # because the bridge's components forward attribute writes to the wrapped Hugging Face module.
        object.__setattr__(block, "forward", _pass_through)
    try:
        yield
    finally:
        for block in skipped:
            del block.forward


def spliced_logits(bridge: Any, resid_BTD: Tensor, hook: str, replacement_BTD: Tensor) -> Tensor:
    """Logits of the model resumed at the hook's block from `resid_BTD` (the clean residual entering it),
    with the activation at `hook` replaced by `replacement_BTD`."""
    layer = hook_layer(hook)

    def replace(act_BTD: Tensor, hook: Any) -> Tensor:
        return replacement_BTD.to(act_BTD.dtype)

    with skip_blocks_below(bridge, layer):
        return bridge.run_with_hooks(resid_BTD, start_at_layer=layer, fwd_hooks=[(hook, replace)])


def reconstruct(sae: SAE, x_ND: Tensor, batch_mode: bool) -> tuple[Tensor, Tensor]:
    """(x̂ [N, D] in the model's space, latents [N, F]). Batch-level architectures use their inference
    threshold unless `batch_mode`, where the N tokens are the batch their training selection sees."""
    xn_ND, denorm = sae.normalize(x_ND.float())
    acts_NF = sae.activate(sae.pre_activations(xn_ND), batch_mode)
    return sae.decode(acts_NF, denorm), acts_NF


def with_replaced(x_BTD: Tensor, keep_BT: Tensor, new_ND: Tensor) -> Tensor:
    """x with its kept positions (in row-major order) set to `new_ND`, or to one vector broadcast to all of
    them; the other positions (BOS) keep their activation."""
    out_BTD = x_BTD.clone()
    out_BTD[keep_BT] = new_ND.to(x_BTD.dtype)
    return out_BTD

