"""CA-Swin: Swin Transformer with a CaiT class-attention block (TransMix, Chen et al., CVPR 2022, Sec. 4.5).

TransMix needs a class token's attention, which Swin does not have; its Sec. 4.5 builds "CA-Swin" by
giving Swin a class-attention layer (CaiT, Touvron et al., ICCV 2021) whose class token feeds the
classifier. MixPro (ICLR 2023) Table 1 lists CA-Swin-T / CA-Swin-S at 28.3M / 49.6M parameters.

Construction (this module; nothing of timm's Swin is forked, ``CaSwinTransformer`` subclasses it):

* timm's ``SwinTransformer`` with the ``swin_tiny_patch4_window7_224`` / ``swin_small_patch4_window7_224``
  configuration (patch 4, window 7, width 96, depths (2, 2, 6, 2) / (2, 2, 18, 2), heads (3, 6, 12, 24));
* the LAST Swin block of stage 4 is removed and REPLACED by one CaiT class-attention block,
  ``timm.models.cait.LayerScaleBlockClassAttn`` (dim 768, 24 heads, MLP ratio 4, qkv bias, LayerScale),
  with a learned class token (trunc-normal, std .02); it takes the block's drop-path rate;
* the class-attention block reads the stage-4 tokens (timm's Swin is channels-last NHWC; the 7x7 map
  at 224 px is flattened to ``[B, 49, 768]``) together with the class token and updates only the
  class token; then, as in CaiT, the final norm is applied to ``[class token, patch tokens]`` and the
  classifier reads the class token (no average pooling).

Why "replace the last block" and not "append a block": the parameter count. Measured on timm 1.0.31
at num_classes=1000 (tests/test_models.py checks the "replace" column against Table 1 within 1 %):

    =====================  ====================  ====================  ====================  =======
    Swin base              replace last block    append 1 CA block     append 2 CA blocks    Table 1
    =====================  ====================  ====================  ====================  =======
    Swin-T 28,288,354      28,286,602 (28.29M)   35,378,530 (35.4M)    42,467,938 (42.5M)    28.3M
    Swin-S 49,606,258      49,604,506 (49.60M)   56,696,434 (56.7M)    63,785,842 (63.8M)    49.6M
    =====================  ====================  ====================  ====================  =======

Only "replace" matches Table 1 for both sizes: a stage-4 Swin block (7,091,928 parameters, with its
relative-position table) and a class-attention block (7,089,408, with qkv bias and the two LayerScale
vectors) are nearly the same size, so the swap plus the 768-d class token stays within 2k of Swin.
(Without qkv bias in the class-attention block it is 28,284,298 / 49,602,202, also 28.3M / 49.6M;
CaiT's own models use qkv bias, and so does this module.) The LayerScale init is timm's
``LayerScaleBlockClassAttn`` default, 1e-4 (``cls_attn_init_values``), not checked against TransMix's code.

The probe source (registered at the bottom) is that block's ``attn``, a timm ``ClassAttn``: one prefix
token (the class token), 32 px per token (a 7x7 grid at 224 px), read by ``mixpro.AttentionProbe`` with
no code of its own. ``forward_intermediates`` (inherited) returns Swin's stage maps, without the
class-attention block.
"""
from typing import Any, Dict, Optional, Set

import torch
import torch.nn as nn

from timm.layers import ClassifierHead, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.cait import LayerScaleBlockClassAttn
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from ..probe import AttentionSource, register_attention_source
from ._cfg import from_scratch_cfg

__all__ = ['CaSwinTransformer']


class CaSwinTransformer(SwinTransformer):
    """timm Swin whose last stage-4 block is replaced by a CaiT class-attention block and a class token."""

    def __init__(
            self,
            *args,
            cls_attn_heads: Optional[int] = None,
            cls_attn_mlp_ratio: float = 4.,
            cls_attn_init_values: float = 1e-4,
            global_pool: str = 'token',
            device=None,
            dtype=None,
            **kwargs,
    ):
        assert global_pool in ('token', ''), 'CA-Swin classifies from its class token'
        depths = kwargs.get('depths', (2, 2, 6, 2))
        assert depths[-1] >= 1, 'the last stage needs a block for the class-attention block to replace'
        drop_rate = kwargs.get('drop_rate', 0.)
        drop_path_rate = kwargs.get('drop_path_rate', 0.1)    # SwinTransformer's default
        num_classes = kwargs.get('num_classes', 1000)
        norm_layer = kwargs.get('norm_layer', nn.LayerNorm)
        super().__init__(*args, global_pool='avg', device=device, dtype=dtype, **kwargs)
        dd = {'device': device, 'dtype': dtype}

        last = self.layers[-1]
        removed = last.blocks[-1]
        last.blocks = last.blocks[:-1]    # nn.Sequential slice: the stage keeps its other blocks
        last.depth -= 1
        dim = self.num_features
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.cls_attn_block = LayerScaleBlockClassAttn(
            dim,
            num_heads=cls_attn_heads or removed.attn.num_heads,
            mlp_ratio=cls_attn_mlp_ratio,
            qkv_bias=True,
            proj_drop=kwargs.get('proj_drop_rate', 0.),
            attn_drop=kwargs.get('attn_drop_rate', 0.),
            drop_path=drop_path_rate,     # the rate of the block it replaces (the last one)
            norm_layer=norm_layer,
            init_values=cls_attn_init_values,
            **dd,
        )
        del removed
        self.global_pool = global_pool
        self.head = ClassifierHead(dim, num_classes, pool_type='', drop_rate=drop_rate, **dd)
        self.head_hidden_size = dim
        if kwargs.get('weight_init', '') != 'skip':
            self._init_cls_attn()

    @torch.jit.ignore
    def _init_cls_attn(self) -> None:
        trunc_normal_(self.cls_token, std=.02)
        for m in [self.cls_attn_block, self.head]:
            for module in m.modules():
                if isinstance(module, nn.Linear):
                    trunc_normal_(module.weight, std=.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return super().no_weight_decay() | {'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        matcher = super().group_matcher(coarse)
        if coarse:
            matcher['blocks'] = [(r'^layers\.(\d+)', None), (r'^cls_token|^cls_attn_block', (99998,))]
        else:
            matcher['blocks'] = list(matcher['blocks'][:-1]) + [
                (r'^cls_token|^cls_attn_block', (99998,)), matcher['blocks'][-1]]
        return matcher

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            assert global_pool in ('token', ''), 'CA-Swin classifies from its class token'
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head.reset(num_classes, in_features=self.num_features,
                        device=self.cls_token.device, dtype=self.cls_token.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[class token, stage-4 tokens]``: ``[B, 1 + H*W, C]``."""
        x = self.patch_embed(x)
        x = self.layers(x)                            # [B, H, W, C], channels last
        x = x.flatten(1, 2)                           # [B, H*W, C]
        cls = self.cls_attn_block(x, self.cls_token.expand(x.shape[0], -1, -1))
        return self.norm(torch.cat([cls, x], dim=1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)


def _ca_swin_attention_source(model: CaSwinTransformer) -> AttentionSource:
    stride = max(model.feature_info[-1]['reduction'], 1)
    return AttentionSource(model.cls_attn_block.attn, 1, stride)


register_attention_source(CaSwinTransformer, _ca_swin_attention_source)


def _create_ca_swin(variant: str, pretrained: bool = False, **kwargs) -> CaSwinTransformer:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (1, 1, 3, 1))))))
    return build_model_with_cfg(
        CaSwinTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


default_cfgs = generate_default_cfgs({
    name: from_scratch_cfg(first_conv='patch_embed.proj', classifier='head.fc', fixed_input_size=True)
    for name in ('ca_swin_tiny', 'ca_swin_small')
})


@register_model
def ca_swin_tiny(pretrained: bool = False, **kwargs) -> CaSwinTransformer:
    """CA-Swin-T: Swin-T with its last block replaced by class attention, 28.3M parameters."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_ca_swin('ca_swin_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def ca_swin_small(pretrained: bool = False, **kwargs) -> CaSwinTransformer:
    """CA-Swin-S: Swin-S with its last block replaced by class attention, 49.6M parameters."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_ca_swin('ca_swin_small', pretrained, **dict(model_args, **kwargs))
