"""Plain torch models, defined outside bitfold, for the bring-your-own-model tests.

(Loaded by path as ``tests/user_models.py:factory``, the way users pass their own files.)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):  # torchvision-style: one shared self.relu, in-place add, downsample branch
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, in_ch=1, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DWSeparable(nn.Module):  # MobileNet-style: depthwise 3x3 + pointwise 1x1, ReLU6, functional calls
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu6(self.bn1(self.dw(x)))
        return F.relu6(self.bn2(self.pw(x)))


class TinyMobileNet(nn.Module):
    def __init__(self, in_ch=1, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(DWSeparable(16, 32, 1), DWSeparable(32, 64, 2), DWSeparable(64, 64, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.classifier(x.mean((2, 3)))


class WithLSTM(nn.Module):
    def __init__(self, **_):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(4 * 36, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.sigmoid(self.gelu(self.conv(x))), 1))


def resnet(input_shape=(1, 8, 8), num_classes=10):
    return TinyResNet(input_shape[0], num_classes)


def mobilenet(input_shape=(1, 8, 8), num_classes=10):
    return TinyMobileNet(input_shape[0], num_classes)


def unsupported():
    return WithLSTM()


def two_layer(input_shape=(1, 8, 8), num_classes=10):
    """Two linear layers of the same size (64 -> 64 -> 10 is not: 64 x 32 and 32 x 10 MACs differ,
    so the toy price is per layer, not per MAC)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
