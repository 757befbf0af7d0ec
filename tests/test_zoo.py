"""prepare() on torchvision's model zoo: classification, segmentation and detection.

Per model, oracles: the unprepared model (bit-identical at "fp32", eval mode); the FP32 output
within a relative L2 error of 1% at 16 bits (measured: at most 1e-3); the number of
convolutions and matrix products the original runs in training mode (ATen-level count) equal to
the quantised calls at 8 bits; finite gradients on every parameter the original gives one to.
"""
import pytest
import torch
import torchvision.models as tvm
import torchvision.models.detection as det
import torchvision.models.segmentation as seg

from .helpers import check_zoo_model


def _img(n, size):
    return lambda: (torch.randn(n, 3, size, size),)


def _det_inputs():
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 20.0, 40.0, 90.0]]), "labels": torch.tensor([2])}]
    return images, targets


ZOO = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), _img(2, 32)),
    "resnext50_32x4d": (lambda: tvm.resnext50_32x4d(num_classes=10), _img(2, 32)),
    "googlenet_aux": (lambda: tvm.googlenet(num_classes=10, aux_logits=True, init_weights=False), _img(2, 64)),
    "inception_v3": (lambda: tvm.inception_v3(num_classes=10, aux_logits=True, init_weights=False), _img(2, 299)),
    "alexnet": (lambda: tvm.alexnet(num_classes=10), _img(2, 64)),
    "vgg11_bn": (lambda: tvm.vgg11_bn(num_classes=10), _img(2, 32)),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=10), _img(2, 32)),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=10), _img(2, 32)),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=10), _img(2, 32)),
    "densenet121": (lambda: tvm.densenet121(num_classes=10), _img(2, 32)),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(num_classes=10), _img(2, 32)),
    "squeezenet1_1": (lambda: tvm.squeezenet1_1(num_classes=10), _img(2, 64)),
    "regnet_y_400mf": (lambda: tvm.regnet_y_400mf(num_classes=10), _img(2, 32)),
    "regnet_x_400mf": (lambda: tvm.regnet_x_400mf(num_classes=10), _img(2, 32)),
    "convnext_tiny": (lambda: tvm.convnext_tiny(num_classes=10), _img(2, 32)),
    "mnasnet0_5": (lambda: tvm.mnasnet0_5(num_classes=10), _img(2, 32)),
    "vit_b_16": (lambda: tvm.vit_b_16(num_classes=10, image_size=32), _img(2, 32)),
    "swin_t": (lambda: tvm.swin_t(num_classes=10), _img(2, 64)),
    "maxvit_t": (lambda: tvm.maxvit_t(num_classes=10), _img(1, 224)),
    "efficientnet_v2_s": (lambda: tvm.efficientnet_v2_s(num_classes=10), _img(2, 32)),
    "lraspp_mobilenet_v3": (lambda: seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                  num_classes=4), _img(2, 64)),
    "fasterrcnn_mobilenet_v3": (lambda: det.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128), _det_inputs),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name):
    make, inputs = ZOO[name]
    check_zoo_model(make, inputs, detection=name.startswith("fasterrcnn"))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "convnext_tiny", "vit_b_16"])
def test_zoo_compiles_once(name):
    """``torch.compile`` of the prepared model captures one graph, with no graph break, from its
    first call on, and keeps it over training steps (forward and backward)."""
    import muppet_fx
    from torch._dynamo.utils import counters

    make, inputs = ZOO[name]
    torch.manual_seed(0)
    graphs = []
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(muppet_fx.prepare(make(), ladder=(8, "fp32")),
                             backend=lambda gm, _: graphs.append(gm) or gm.forward)
    for _ in range(3):
        compiled(*inputs()).sum().backward()
    assert len(graphs) == 1 and not counters["graph_break"], (len(graphs), dict(counters["graph_break"]))
