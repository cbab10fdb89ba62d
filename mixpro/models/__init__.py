"""Model families timm lacks, registered with ``timm.models.register_model`` on import.

``import mixpro.models`` makes ``timm.create_model`` build ``pvt_tiny`` / ``pvt_small`` / ``pvt_medium`` /
``pvt_large`` (PVT v1, class token in stage 4) and ``ca_swin_tiny`` / ``ca_swin_small`` (Swin with a
CaiT class-attention block), and teaches ``mixpro.AttentionProbe`` where their class-token attention is.
"""
from .ca_swin import CaSwinTransformer
from .pvt import PyramidVisionTransformer

__all__ = ['CaSwinTransformer', 'PyramidVisionTransformer']
