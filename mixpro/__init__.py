"""MixPro: MaskMix + Progressive Attention Labeling (ICLR 2023) and TransMix on stock timm models."""
import os

from . import models  # registers pvt_* and ca_swin_* with timm and the probe
from . import augment  # noqa: F401  timm's RandAugment posterize(bits=0) raises on Pillow 13: patched
from .masks import token_membership
from .mixer import METHODS, Mixer, MixStep
from .probe import AttentionProbe, AttentionSource, find_attention_source, register_attention_source
from .targets import attention_lambda, mix_target, pal_lambda, smoothed_one_hot, transmix_lambda
from .logger import setup_logging

setup_logging(int(os.environ.get('RANK', '0')))   # notes print once per run, from torchrun's rank 0

__all__ = [
    'METHODS', 'Mixer', 'MixStep', 'AttentionProbe', 'AttentionSource', 'find_attention_source',
    'register_attention_source', 'attention_lambda', 'mix_target', 'pal_lambda', 'smoothed_one_hot',
    'transmix_lambda', 'token_membership',
]
