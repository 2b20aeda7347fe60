"""PyTorch twins of CRD's 32 px CIFAR models, written from the architecture of RepDistiller's
models/resnet.py, wrn.py and vgg.py with their module names (so their state dicts have its
keys), and a randomised twin's export as a jaxkd teacher."""

import jax
import torch
import torch.nn.functional as F
from torch import nn

from jaxkd import checkpoint
from jaxkd.convert import timm_to_flax

from timm_parity import randomise_parameters_and_statistics

NUM_CLASSES = 100



def _conv3x3(cin, cout, stride=1, bias=False):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)


class TorchResBlock(nn.Module):
    """Post-activation BasicBlock; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchCifarResNet(nn.Module):
    """3x3 stem + BN + ReLU, three stages of (depth - 2) / 6 blocks at strides 1, 2, 2."""

    def __init__(self, depth, widths, num_classes=NUM_CLASSES):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = _conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0])
        for s in range(3):
            setattr(self, f"layer{s + 1}", nn.Sequential(*[
                TorchResBlock(widths[s + 1] if i else widths[s], widths[s + 1],
                              2 if s and not i else 1) for i in range(n)]))
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        """RepDistiller's `is_feat=True` output: ([stem, stage 1-3, pooled], logits)."""
        feats = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3):
            feats.append(layer(feats[-1]))
        feats.append(F.avg_pool2d(feats[-1], 8).flatten(1))
        return feats, self.fc(feats[-1])


class TorchWideBlock(nn.Module):
    """Pre-activation block; the 1x1 shortcut conv (where widths differ) sees the BN-ReLU'd
    input, the identity shortcut the raw one."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.same_width = cin == cout
        if not self.same_width:
            self.convShortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return y + (x if self.same_width else self.convShortcut(activated))


class TorchWideGroup(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layer = nn.Sequential(*blocks)

    def forward(self, x):
        return self.layer(x)


class TorchWideResNet(nn.Module):
    """WRN-depth-k: 16-channel stem conv, three groups at strides 1, 2, 2, final BN + ReLU."""

    def __init__(self, depth, k, num_classes=NUM_CLASSES):
        super().__init__()
        n, widths = (depth - 4) // 6, (16, 16 * k, 32 * k, 64 * k)
        self.conv1 = _conv3x3(3, 16)
        for g in range(3):
            setattr(self, f"block{g + 1}", TorchWideGroup([
                TorchWideBlock(widths[g + 1] if i else widths[g], widths[g + 1],
                               2 if g and not i else 1) for i in range(n)]))
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        feats = [self.conv1(x)]
        for group in (self.block1, self.block2, self.block3):
            feats.append(group(feats[-1]))
        feats.append(F.avg_pool2d(F.relu(self.bn1(feats[-1])), 8).flatten(1))
        return feats, self.fc(feats[-1])


def _torch_vgg_block(cin, widths):
    layers = []
    for width in widths:
        layers += [_conv3x3(cin, width, bias=True), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers[:-1])  # the last ReLU is applied outside the block


class TorchVGG(nn.Module):
    """Five conv blocks, 2x2 max-pools between them (before the last one only at 64 px)."""

    def __init__(self, blocks, num_classes=NUM_CLASSES):
        super().__init__()
        cin = 3
        for b, widths in enumerate(blocks):
            setattr(self, f"block{b}", _torch_vgg_block(cin, widths))
            cin = widths[-1]
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        height = x.shape[2]
        feats = [F.relu(self.block0(x))]
        for b in range(1, 5):
            y = F.max_pool2d(feats[-1], 2) if b < 4 or height == 64 else feats[-1]
            feats.append(F.relu(getattr(self, f"block{b}")(y)))
        feats.append(F.adaptive_avg_pool2d(feats[-1], 1).flatten(1))
        return feats, self.classifier(feats[-1])


THIN, WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
VGG8 = ((64,), (128,), (256,), (512,), (512,))
VGG13 = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))

# name -> builder(num_classes, **the jaxkd model's overrides) of its twin.
TWINS = {
    "resnet20": lambda n, depth=20: TorchCifarResNet(depth, THIN, n),
    "resnet56": lambda n, depth=56: TorchCifarResNet(depth, THIN, n),
    "resnet110": lambda n, depth=110: TorchCifarResNet(depth, THIN, n),
    "resnet8x4": lambda n, depth=8: TorchCifarResNet(depth, WIDE, n),
    "resnet32x4": lambda n, depth=32: TorchCifarResNet(depth, WIDE, n),
    "wrn_40_2": lambda n, depth=40, widen_factor=2: TorchWideResNet(depth, widen_factor, n),
    "wrn_16_2": lambda n, depth=16, widen_factor=2: TorchWideResNet(depth, widen_factor, n),
    "vgg8": lambda n: TorchVGG(VGG8, n),
    "vgg13": lambda n: TorchVGG(VGG13, n),
}


def randomised_twin(name, *, num_classes=NUM_CLASSES, size=32, seed=0, **overrides):
    """The twin with every parameter and BN statistic random (BN measured at `size` px)."""
    torch.manual_seed(seed)
    return randomise_parameters_and_statistics(TWINS[name](num_classes, **overrides), size)


def random_images(size, batch=2, seed=1):
    """The same random batch as NCHW torch and NHWC jax arrays."""
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images, jax.numpy.asarray(images.permute(0, 2, 3, 1).numpy())


def export_twin_as_teacher(out_dir, name, num_classes, **overrides):
    """A randomised twin's weights converted and written as a jaxkd model export, as
    scripts/convert_timm.py makes a teacher from a RepDistiller checkpoint."""
    twin = randomised_twin(name, num_classes=num_classes, **overrides)
    variables = timm_to_flax(name, twin.state_dict(), **overrides)
    return checkpoint.save_model(out_dir, variables, model_name=name, num_classes=num_classes,
                                 overrides=overrides)
