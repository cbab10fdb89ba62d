"""The timm pretrained-config entry shared by the models built here."""
from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def from_scratch_cfg(**kwargs) -> Dict[str, Any]:
    """ImageNet-1k at 224 px, bicubic, crop 0.9, and no weights: these models are trained from scratch,
    nothing is ever downloaded. ``kwargs`` set the model's own fields (first_conv, classifier, ...)."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, **kwargs,
    }
