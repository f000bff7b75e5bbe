"""A minimal `torchvision.models.vgg16` for the `lpips` package in tests.

PyPI's torchvision wheels are CUDA builds that fail to import beside the CPU torch 2.13.0 wheel, and lpips
only uses `torchvision.models.vgg16(...).features`. This rebuilds exactly torchvision's VGG16 `features`
Sequential (configuration "D": 3x3 convs with padding 1, in-place ReLU, 2x2 max-pool) with randomly initialised
weights, so everything LPIPS does on top of it (slices, scaling layer, normalisation, lin heads) is the real
`lpips` code. Call `install()` before importing lpips.
"""

import sys
import types

import torch.nn as nn

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class _VGG16(nn.Module):
    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)


def vgg16(pretrained: bool = False, weights=None, **kwargs) -> _VGG16:
    if pretrained or weights is not None:
        raise RuntimeError("the test shim has no pretrained weights (tests never download)")
    return _VGG16()


def install() -> None:
    if "torchvision" in sys.modules:
        return
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.vgg16 = vgg16
    models.VGG16_Weights = types.SimpleNamespace(IMAGENET1K_V1="IMAGENET1K_V1")
    tv.models = models
    tv.__version__ = "0.0-shim"
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.models"] = models
