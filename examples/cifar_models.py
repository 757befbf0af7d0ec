"""CIFAR-10 networks: ResNet-20 and ResNet-18 (CIFAR stems, He et al. 2016), the CIFAR AlexNet
and GoogLeNet of the MuPPET paper's experiments, and any torchvision classifier by name."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

__all__ = ["build_model", "MODELS"]


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3 stages of ``n`` basic blocks (16, 32, 64 channels); n=3 is
    ResNet-20."""

    def __init__(self, n: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18_cifar(num_classes=10):
    m = tvm.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


class CifarAlexNet(nn.Module):
    """AlexNet scaled to 32x32 inputs (five convolutions, three fully connected layers)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 2 * 2, 4096), nn.ReLU(inplace=True),
                                        nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
                                        nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def googlenet_cifar(num_classes=10):
    """torchvision's GoogLeNet without auxiliary heads, its stem adapted to 32x32 inputs."""
    m = tvm.googlenet(num_classes=num_classes, aux_logits=False, init_weights=True)
    m.conv1.conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool1, m.maxpool2 = nn.Identity(), nn.Identity()
    return m


MODELS = {"resnet20": lambda: CifarResNet(3), "resnet18": resnet18_cifar, "alexnet": CifarAlexNet,
          "googlenet": googlenet_cifar}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """One of ``MODELS``, any torchvision classification model name, or ``timm:<name>`` for a
    model of the timm library (random init in every case)."""
    if name in MODELS:
        return MODELS[name]() if num_classes == 10 else MODELS[name](num_classes)
    if name.startswith("timm:"):
        return _timm_model(name[5:], num_classes)
    if name in tvm.list_models(module=tvm):
        return tvm.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}, a torchvision "
                     "classifier (torchvision.models.list_models()) or timm:<name> (timm.list_models())")


def _timm_model(name: str, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ValueError(f"model timm:{name} needs the timm package (pip install timm)") from err
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; timm.list_models() lists the names")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)
