"""`mixup`: MixGen image–text mixup, audio waveform mixup and geodesic embedding mixup."""

from mmtools.steps.mixup.step import Mixup, MixupConfig

__all__ = ["Mixup", "MixupConfig"]
