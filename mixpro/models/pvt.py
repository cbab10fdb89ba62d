"""PVT v1: Pyramid Vision Transformer (Wang et al., ICCV 2021), Tiny / Small / Medium / Large.

Not in timm (timm has PVT v2 only), so it is built here from timm layers and registered with
``register_model``: ``timm.create_model('pvt_tiny')`` etc. work like any timm model, and nothing downloads.

Architecture (PVT paper, Sec. 3 and Table 1):

* 4 stages; each starts with a patch embedding (conv, kernel = stride = 4 in stage 1 and 2 in stages
  2-4, then LayerNorm) and a learned position embedding of its own, then a stack of pre-norm
  transformer blocks. Widths [64, 128, 320, 512], heads [1, 2, 5, 8], MLP ratios [8, 8, 4, 4],
  spatial-reduction ratios [8, 4, 2, 1], qkv bias on.
* spatial-reduction attention (SRA): keys and values come from the feature map reduced by a
  ``sr x sr`` conv (kernel = stride = sr) and a LayerNorm; queries keep every token.
* a class token is prepended in stage 4 (whose position embedding has one extra slot); the final
  LayerNorm is applied to all stage-4 tokens and the classifier reads the class token.
* stochastic depth rising linearly from 0 to ``drop_path_rate`` over all blocks.
* as in the official code (whai362/PVT ``classification/pvt.py``): the blocks' and the final LayerNorm
  have eps 1e-6 (``norm_layer``), the patch embeddings' and the reduction's torch's default 1e-5; weight
  decay spares the class token only (and, as timm's optimizer factory does, 1-D parameters), not the
  position embeddings.

In stage 4 the sr ratio is 1, so its attention is plain multi-head self-attention: those blocks use
timm's own ``timm.layers.Attention`` (one fused qkv projection; the same parameter count as PVT's
separate q and kv projections), so ``mixpro.AttentionProbe`` reads the last stage-4 block's class-token
attention with no code of its own. The probe source is registered at the bottom of this module:
that block's ``attn``, one prefix token (the class token), 32 px per token (a 7x7 grid at 224 px).

Dropout follows timm's convention: ``drop_rate`` is the classifier dropout, ``proj_drop_rate`` the
MLP / projection dropout, ``pos_drop_rate`` the dropout after adding position embeddings (the
original code uses one ``drop_rate`` for all three; PVT is trained with 0 for all of them).

Parameter counts at num_classes=1000, 224 px (tests/test_models.py checks them within 1 %), vs. PVT
Table 1 = MixPro Table 1: Tiny 13,229,288 (13.2M), Small 24,485,864 (24.5M), Medium 44,208,104 (44.2M),
Large 61,369,320 (61.4M).
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.layers import Attention, DropPath, Mlp, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..probe import AttentionSource, register_attention_source
from ._cfg import from_scratch_cfg

__all__ = ['PyramidVisionTransformer', 'SpatialReductionAttention']


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: conv (kernel = stride = patch) and LayerNorm, NCHW in, NHWC out."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.patch_size = to_2tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, **dd)
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SpatialReductionAttention(nn.Module):
    """PVT's spatial-reduction attention: keys / values from an ``sr x sr``-reduced, normalised map."""
    fused_attn: torch.jit.Final[bool]

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., norm_layer: Type[nn.Module] = nn.LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert dim % num_heads == 0, 'dim should be divisible by num_heads'
        assert sr_ratio > 1, 'sr_ratio 1 is plain self-attention: use timm.layers.Attention'
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.fused_attn = use_fused_attn()

        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
        self.norm = norm_layer(dim, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = feat_size
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)      # [B, h, N, d]

        reduced = self.sr(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
        reduced = self.norm(reduced)                                                     # [B, M, C]
        kv = self.kv(reduced).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)                                                              # [B, h, M, d]

        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class PvtBlock(nn.Module):
    """Pre-norm transformer block; SRA when ``sr_ratio > 1``, timm ``Attention`` when it is 1."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True,
                 proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.sr_ratio = sr_ratio
        self.norm1 = norm_layer(dim, **dd)
        if sr_ratio > 1:
            self.attn = SpatialReductionAttention(
                dim, num_heads, sr_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        else:
            self.attn = Attention(
                dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                       drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        y = self.norm1(x)
        y = self.attn(y, feat_size) if self.sr_ratio > 1 else self.attn(y)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PvtStage(nn.Module):
    """Patch embedding, position embedding (plus ``num_prefix_tokens`` slots) and blocks of one stage."""

    def __init__(self, grid_size: Tuple[int, int], patch_size: int, in_chans: int, dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, sr_ratio: int, num_prefix_tokens: int = 0,
                 qkv_bias: bool = True, pos_drop: float = 0., proj_drop: float = 0., attn_drop: float = 0.,
                 drop_path: Sequence[float] = (), norm_layer: Type[nn.Module] = nn.LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grid_size = tuple(grid_size)               # token grid this stage's pos_embed is sized for
        self.num_prefix_tokens = num_prefix_tokens
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix_tokens + grid_size[0] * grid_size[1], dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop)
        self.blocks = nn.ModuleList([
            PvtBlock(dim, num_heads, mlp_ratio, sr_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                     attn_drop=attn_drop, drop_path=drop_path[i], norm_layer=norm_layer, **dd)
            for i in range(depth)])

    def _pos_embed(self, feat_size: Tuple[int, int]) -> torch.Tensor:
        if tuple(feat_size) == self.grid_size:
            return self.pos_embed
        # another input size: resize the patch part bilinearly (as the original PVT code does)
        prefix, grid = self.pos_embed[:, :self.num_prefix_tokens], self.pos_embed[:, self.num_prefix_tokens:]
        grid = grid.reshape(1, self.grid_size[0], self.grid_size[1], -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=tuple(feat_size), mode='bilinear', align_corners=False)
        return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None):
        """``x`` NCHW, ``prefix`` [B, P, C] tokens to prepend; returns tokens [B, P + H*W, C] and (H, W)."""
        x = self.patch_embed(x)                       # [B, H, W, C]
        feat_size = (x.shape[1], x.shape[2])
        x = x.flatten(1, 2)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        x = self.pos_drop(x + self._pos_embed(feat_size))
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, feat_size, use_reentrant=False)
            else:
                x = block(x, feat_size)
        return x, feat_size


class PyramidVisionTransformer(nn.Module):
    """PVT v1 classifier with a class token in the last stage."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            depths: Sequence[int] = (2, 2, 2, 2),
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert global_pool in ('token', ''), 'PVT classifies from its class token'
        num_stages = len(depths)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dims[-1]
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        img_size = to_2tuple(img_size)
        total = sum(depths)
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0. for i in range(total)]   # linear, 0 -> rate
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        stride = patch_size
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            if i > 0:
                grid, stride = (grid[0] // 2, grid[1] // 2), stride * 2
            self.stages.append(PvtStage(
                grid, patch_size if i == 0 else 2, in_chans if i == 0 else embed_dims[i - 1], embed_dims[i],
                depths[i], num_heads[i], mlp_ratios[i], sr_ratios[i],
                num_prefix_tokens=1 if i == num_stages - 1 else 0, qkv_bias=qkv_bias, pos_drop=pos_drop_rate,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                norm_layer=norm_layer, **dd))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f'stages.{i}'))
        self.feat_stride = stride                     # pixels per stage-4 token side (32 for patch 4)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1], **dd))
        self.norm = norm_layer(embed_dims[-1], **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Truncated-normal (std .02) position embeddings, class token and linear weights, as PVT does."""
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # the class token only: PVT's code decays the position embeddings (its comment wonders whether
        # exempting them would be better, but it does not)
        return {'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stages\.0\.(?:patch_embed|pos_embed)',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(?:patch_embed|pos_embed)', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^cls_token', (3, 0)),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable   # the stages act on it; kept here as timm models keep it
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ('token', ''), 'PVT classifies from its class token'
            self.global_pool = global_pool
        device, dtype = self.cls_token.device, self.cls_token.dtype
        self.head = nn.Linear(self.num_features, num_classes, device=device, dtype=dtype) \
            if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised stage-4 tokens, class token first: ``[B, 1 + H*W, C]``."""
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            prefix = self.cls_token.expand(x.shape[0], -1, -1) if i == last else None
            x, (H, W) = stage(x, prefix)
            if i != last:
                x = x.reshape(x.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous()
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _pvt_attention_source(model: PyramidVisionTransformer) -> Optional[AttentionSource]:
    layer = model.stages[-1].blocks[-1].attn
    if type(layer) is not Attention:
        return None     # a last stage with spatial reduction has no full class-token attention row
    return AttentionSource(layer, model.num_prefix_tokens, model.feat_stride)


register_attention_source(PyramidVisionTransformer, _pvt_attention_source)


def _create_pvt(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return build_model_with_cfg(PyramidVisionTransformer, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    name: from_scratch_cfg(first_conv='stages.0.patch_embed.proj', classifier='head')
    for name in ('pvt_tiny', 'pvt_small', 'pvt_medium', 'pvt_large')
})


@register_model
def pvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Tiny, 13.2M parameters (PVT Table 1)."""
    return _create_pvt('pvt_tiny', pretrained, **dict(dict(depths=(2, 2, 2, 2)), **kwargs))


@register_model
def pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Small, 24.5M parameters."""
    return _create_pvt('pvt_small', pretrained, **dict(dict(depths=(3, 4, 6, 3)), **kwargs))


@register_model
def pvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Medium, 44.2M parameters."""
    return _create_pvt('pvt_medium', pretrained, **dict(dict(depths=(3, 4, 18, 3)), **kwargs))


@register_model
def pvt_large(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Large, 61.4M parameters."""
    return _create_pvt('pvt_large', pretrained, **dict(dict(depths=(3, 8, 27, 3)), **kwargs))
