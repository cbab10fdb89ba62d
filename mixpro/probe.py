"""Class-token attention of an unmodified timm model, for attention labels.

The probe hangs a forward hook on the key projection of the LAST attention layer that has a class
token and, only when switched on, reads that layer's keys from the projection's output, recomputes
the class token's query row in fp32 and returns ``softmax(q_cls · kᵀ · scale)`` in fp32, mean over
heads, patch-token columns only, detached. Under half-precision autocast on CUDA the scaled query is
rounded to the keys' dtype and the products are accumulated and returned in fp32, as the model's own
fused attention forms them; elsewhere the keys are converted to fp32. Every layer keeps timm's fused
attention, and nothing is forked; the extra work is one query row and one attention row, O(N·C) per
sample.

    probe = AttentionProbe(model)      # attach once, before torch.compile / DDP / EMA copies
    probe.enabled = True               # per step: only where a label needs it
    logits = model(x)
    attention = probe.attention        # [B, N_patches] fp32, no grad

Families are found by model class; ``register_attention_source`` adds new ones.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.cait import Cait, ClassAttn
from timm.models.vision_transformer import VisionTransformer
from timm.models.xcit import Xcit


@dataclass
class AttentionSource:
    """Where a model's label attention comes from."""
    layer: nn.Module          # a timm ``Attention`` (CLS is token 0 of a self-attention) or ``ClassAttn``
    num_prefix_tokens: int    # leading non-patch tokens in the layer's keys (CLS, distillation, registers)
    token_size: int           # pixels per token side of the attention grid


def patch_size(model) -> Optional[int]:
    """The pixel size of a model's top-level patch embedding (ViT-like models), None where there is none."""
    size = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return size if isinstance(size, int) else None


def _vit_source(model: VisionTransformer) -> Optional[AttentionSource]:
    if getattr(model, 'cls_token', None) is None:
        return None
    layer = model.blocks[-1].attn
    if type(layer) is not Attention:
        return None   # rope / diff attention variants compute q·k differently
    return AttentionSource(layer, model.num_prefix_tokens, patch_size(model))


def _cait_source(model: Cait) -> AttentionSource:
    return AttentionSource(model.blocks_token_only[-1].attn, 1, patch_size(model))


def _xcit_source(model: Xcit) -> AttentionSource:
    return AttentionSource(model.cls_attn_blocks[-1].attn, 1, patch_size(model))


_SOURCES: Dict[type, Callable[[nn.Module], Optional[AttentionSource]]] = {
    VisionTransformer: _vit_source,   # also DeiT distilled (a subclass) and register-token ViTs
    Cait: _cait_source,
    Xcit: _xcit_source,
}


def register_attention_source(model_class: type, finder: Callable[[nn.Module], Optional[AttentionSource]]):
    """Teach the probe a new model family: ``finder(model)`` returns its ``AttentionSource``."""
    _SOURCES[model_class] = finder


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def find_attention_source(model: nn.Module) -> AttentionSource:
    """The label attention layer of ``model``; a clear error for models without a class token."""
    model = getattr(model, 'module', model)   # DDP / compiled wrappers
    model = getattr(model, '_orig_mod', model)
    for cls in type(model).__mro__:
        if cls in _SOURCES:
            source = _SOURCES[cls](model)
            if source is not None:
                return source
            break
    raise ValueError(
        f'model {model_name(model)!r} has no class-token attention layer the probe can read '
        f'(supported: {", ".join(c.__name__ for c in _SOURCES)} with a class token); attention labels '
        f'(TransMix, MixPro) need a class token, use method mixup_cutmix or maskmix for this model')


def key_projection(layer: nn.Module) -> nn.Linear:
    """The linear layer whose output holds the keys: ``k`` of ``ClassAttn``, ``qkv`` of ``Attention``."""
    return layer.k if isinstance(layer, ClassAttn) else layer.qkv


def _float(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


_HEAD_BLOCKS: Dict[tuple, torch.Tensor] = {}


def _head_blocks(heads: int, head_dim: int, scale: float, device) -> torch.Tensor:
    """``[H, H*D]`` fp32, ``scale`` where column c belongs to head h (``c // D == h``), else 0; built once."""
    key = (heads, head_dim, float(scale), torch.device(device))
    if key not in _HEAD_BLOCKS:
        columns = torch.arange(heads * head_dim, device=device) // head_dim
        blocks = (columns == torch.arange(heads, device=device).view(-1, 1)).float() * scale
        _HEAD_BLOCKS[key] = blocks
    return _HEAD_BLOCKS[key]


def _head_logits(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``queries [B, H, C] · keysᵀ`` in fp32, ``[B, H, N]``; the keys are read in place, never copied on CUDA.

    Half-precision keys on CUDA go straight into cuBLAS with the query rounded to their dtype; it
    accumulates in fp32 and writes fp32 (``out_dtype``): the products the model's own fused attention
    forms. (Against fp32 keys, single tokens' weights can move by a few % where logits are large; the
    label weights, sums over many tokens, by about 1e-3.)
    Converting the keys to fp32 first would cost a write and a read of ``[B, N, C]`` per step, more
    than the rest of the probe. Elsewhere (CPU autocast) the keys are converted.
    """
    if keys.is_cuda and keys.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(queries.to(keys.dtype), keys.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(queries, keys.float().transpose(1, 2))                  # no copy when already fp32


def cls_attention(layer: nn.Module, x: torch.Tensor, projected: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Class-token attention over patch tokens, ``[B, N_patches]`` fp32.

    ``x`` is the layer's input ``[B, N, C]`` and ``projected`` the output of its key projection: the keys
    are read from there, and so is the class token's query when that projection ran in fp32; under
    autocast the query row is computed again in fp32. Every head's scaled query sits on its own columns
    of a block-diagonal ``[B, H, C]`` matrix, so ONE batched matmul against the keys (read in place, no
    per-head copy) gives all heads' logits: matmul, softmax in fp32, mean over heads.
    """
    batch, tokens, _ = x.shape
    heads = layer.num_heads
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        if isinstance(layer, ClassAttn):
            q = F.linear(x[:, 0].float(), layer.q.weight.float(), _float(layer.q.bias))
            k = projected
        else:   # timm Attention: q, k, v stacked in one qkv projection
            dim = layer.attn_dim
            k = projected[..., dim:2 * dim]
            if projected.dtype == torch.float32:
                q = projected[:, 0, :dim]
            else:
                bias = _float(layer.qkv.bias)
                q = F.linear(x[:, 0].float(), layer.qkv.weight[:dim].float(), None if bias is None else bias[:dim])
        dim = k.shape[-1]
        head_dim = dim // heads
        if isinstance(layer, Attention) and not (isinstance(layer.q_norm, nn.Identity)
                                                 and isinstance(layer.k_norm, nn.Identity)):
            k = k.float()
            q = layer.q_norm(q.reshape(batch, heads, head_dim)).reshape(batch, dim)
            k = layer.k_norm(k.reshape(batch, tokens, heads, head_dim)).reshape(batch, tokens, dim)
        queries = q.unsqueeze(1) * _head_blocks(heads, head_dim, layer.scale, q.device)    # [B, H, C]
        logits = _head_logits(queries, k)                                                  # [B, H, N]
        return logits.softmax(dim=-1).mean(dim=1)[:, num_prefix_tokens:]


class AttentionProbe:
    """Captures the class attention of ``model``'s label layer on the forward passes it is enabled for.

    Attach before ``torch.compile``, DDP and EMA copies; switch with ``enabled`` (the hook stays
    in place, so a compiled graph is reused). While disabled the hook returns at once.
    """

    def __init__(self, model: nn.Module):
        source = find_attention_source(model)
        self.model_name = model_name(getattr(model, 'module', model))
        self.layer = source.layer
        self.num_prefix_tokens = source.num_prefix_tokens
        self.token_size = source.token_size
        self.enabled = False
        self.attention: Optional[torch.Tensor] = None
        self._handle = key_projection(self.layer).register_forward_hook(self._capture)

    def _capture(self, projection, args, output):
        if self.enabled:
            self.attention = cls_attention(self.layer, args[0], output, self.num_prefix_tokens)

    def remove(self) -> None:
        """Detach the hook for good (the model is then exactly as it was)."""
        self._handle.remove()
        self.enabled = False
        self.attention = None

    def __deepcopy__(self, memo):
        # A model deep-copied with the probe attached (timm ModelEmaV3 does this) gets an inert
        # hook: EMA and evaluation copies must never pay for attention they do not use.
        return _InertProbe()


class _InertProbe:
    """Stands in for the probe inside a deep copy of the model: the copied hook sees it disabled."""
    enabled = False
