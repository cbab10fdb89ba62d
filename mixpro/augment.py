"""A posterize for timm's RandAugment that works with every Pillow release.

Pillow 13 made ``ImageOps.posterize(img, bits)`` raise ``ValueError`` for ``bits`` outside 1..8;
Pillow <= 12 accepted ``bits=0`` and returned an all-black image (every channel masked with ~255).
timm 1.0.31's RandAugment ``rand-m9-mstd0.5-inc1`` (every ImageNet recipe here) draws
``PosterizeIncreasing`` with ``bits = 4 - int(level / 10 * 4)``, which is 0 whenever the sampled
magnitude reaches 10: about one image in 2000, enough to kill a DataLoader worker in epoch 0.
``patch_posterize()`` (run when ``mixpro`` is imported) points timm's posterize ops at
``safe_posterize``, which gives the Pillow <= 12 black image for ``bits <= 0`` and is timm's own
posterize otherwise, so augmentation is the same whichever Pillow pip installs.
"""
from timm.data import auto_augment

POSTERIZE_OPS = ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal')
_timm_posterize = auto_augment.posterize


def safe_posterize(img, bits_to_keep, **kwargs):
    """timm's ``posterize``, except that ``bits_to_keep <= 0`` gives what Pillow <= 12 gave: the
    image through an all-zero lookup table (black, same mode and size) instead of Pillow 13's error."""
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return _timm_posterize(img, bits_to_keep, **kwargs)


def patch_posterize() -> None:
    """Make timm's posterize ops use ``safe_posterize``; calling it again changes nothing. Ops built
    before the patch keep the function they looked up (``AugmentOp`` reads the table when built)."""
    for name in POSTERIZE_OPS:
        if auto_augment.NAME_TO_OP.get(name) is _timm_posterize:
            auto_augment.NAME_TO_OP[name] = safe_posterize


patch_posterize()
