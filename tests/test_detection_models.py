"""RetinaNet and Mask R-CNN on dynconv backbones: build, a train step with every operator, eval outputs,
freezing, the stripped classifier, knob errors, and the task seam (prepare_batch, forward_loss, evaluate).

Everything runs at ~64 px with a 32-channel FPN and tiny heads (a synthetic batch of two images; the COCO
loaders are not needed).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from op_checks import OP_CONFIG_DIR, load_op_config
from pycocotools.coco import COCO
from torchvision.ops import FrozenBatchNorm2d

from dynconv.build import build_backbone
from dynconv.tasks.detection.freeze import FrozenBatchNorm1d, module_stages
from dynconv.tasks.detection.models import build_maskrcnn, build_retinanet
from dynconv.tasks.detection.model_transform import DetectionTransform
from dynconv.functional import selector
from dynconv.tasks.detection import MaskRCNNTask, RetinaNetTask

TASK_DIR = Path(__file__).resolve().parents[1] / "configs" / "task"
K = 3  # categories
# The configs' own values, shrunk: 32-channel FPN, small heads, few proposals and RoIs.
SMALL = {
    "retinanet": {"fpn_channels": 32, "topk_candidates": 100},
    "maskrcnn": {"fpn_channels": 32, "representation_size": 64, "mask_head_channels": 16, "mask_head_layers": 2,
                 "rpn_pre_nms_top_n_train": 200, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_train": 100,
                 "rpn_post_nms_top_n_test": 50, "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32},
}
BUILDERS = {"retinanet": build_retinanet, "maskrcnn": build_maskrcnn}
# Cheaper settings of the heavier operators (their other knobs: the YAML's).
OP_SHRINK = {"condconv": {"experts": 2}, "dyconv": {"kernels": 2}, "dynet": {"g": 2}}
OP_NAMES = sorted(path.stem for path in OP_CONFIG_DIR.glob("*.yaml"))
DATA = SimpleNamespace(train_sizes=[64], test_size=64, max_size=96, mean=[0.485, 0.456, 0.406],
                       std=[0.229, 0.224, 0.225])


@pytest.fixture(autouse=True)
def small_and_quick(one_thread):
    """One thread (these convolutions are tiny: with a second thread on a shared 2-core machine the threads
    mostly wait for each other, ten times slower) and the per-sample convolutions' cost model instead of timing
    every new layer shape (detection feeds many shapes once each)."""
    with selector.policy("model"):
        yield


def task_cfg(detector: str, **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(TASK_DIR / f"{detector}.yaml"))
    return {**cfg, **SMALL[detector], **overrides}


def backbone(name: str = "resnet18", op: str = "static"):
    torch.manual_seed(0)
    op_cfg = {**load_op_config(op), **OP_SHRINK.get(op, {})}
    return build_backbone({"name": name}, op_cfg, {"name": "none"}, num_classes=10, image_size=64).backbone


def detector(name: str, op: str = "static", backbone_name: str = "resnet18", data=DATA, **overrides):
    return BUILDERS[name](backbone(backbone_name, op), task_cfg(name, **overrides), K, data)


def batch(with_masks: bool = True):
    """Two images of different sizes (64x80, 72x64) with two objects each, boxes matching the masks."""
    images, targets = [], []
    for (h, w), boxes in (((64, 80), [[8, 6, 40, 30], [30, 20, 70, 60]]),
                          ((72, 64), [[4, 10, 30, 50], [20, 30, 60, 70]])):
        generator = torch.Generator().manual_seed(h)
        images.append(torch.rand(3, h, w, generator=generator))
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([1, K]), "image_id": h}
        if with_masks:
            masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
            for mask, (x1, y1, x2, y2) in zip(masks, boxes):
                mask[y1:y2, x1:x2] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


def train_step(model):
    """One SGD step; returns (losses, names of the parameters it changed)."""
    model.train()
    images, targets = batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss), losses
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            # DDP runs without find_unused_parameters: every trainable parameter must be in the graph.
            assert param.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(param.grad).all(), name
    optimizer.step()
    return losses, [n for n, p in model.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_train_step_every_operator(name, op):
    """Build + one train step on ResNet18 with every operator: finite loss, every trainable parameter in the
    graph, and the step moves backbone weights. RetinaNet runs with nothing frozen (BatchNorm in train mode,
    attention BN1d included), Mask R-CNN with the defaults (frozen BN, frozen stem + stage 1)."""
    overrides = {"frozen_bn": False, "frozen_stages": -1} if name == "retinanet" else {}
    model = detector(name, op, **overrides)
    losses, changed = train_step(model)
    expected = {"retinanet": {"classification", "bbox_regression"},
                "maskrcnn": {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}}
    assert set(losses) == expected[name]
    # Beyond the frozen stem: a stage's layers or the modules they share (KW warehouses, block routing).
    assert any(n.startswith(("backbone.body.net.layer", "backbone.body.warehouses.", "backbone.body.shared_inputs."))
               for n in changed), "no backbone weight changed"


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_eval_outputs_in_original_coordinates(name):
    """At eval the transform resizes to test_size (not the last train size) and the detections come back in
    each image's own pixel frame: boxes inside it, masks of its size."""
    data = SimpleNamespace(**{**vars(DATA), "train_sizes": [48, 64], "test_size": 96, "max_size": 160})
    model = detector(name, data=data, score_thresh=0.0).eval()
    images, _ = batch()
    with torch.no_grad():
        resized, _ = model.transform(images)
        outputs = model(images)
    assert resized.image_sizes == [(96, 120), (108, 96)]  # short side 96 at eval
    assert all(len(o["boxes"]) > 0 for o in outputs)
    for image, output in zip(images, outputs):
        h, w = image.shape[-2:]
        boxes = output["boxes"]
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()
        assert set(output["labels"].tolist()) <= set(range(K + 1))
        if name == "maskrcnn":
            assert output["masks"].shape[1:] == (1, h, w)


def test_transform_picks_train_sizes_in_training():
    transform = DetectionTransform([48, 64], 96, 160, DATA.mean, DATA.std).train()
    images, targets = batch()
    seen = set()
    for _ in range(12):
        resized, resized_targets = transform([images[0]], copy.deepcopy(targets[:1]))
        seen.add(min(resized.image_sizes[0]))
    assert seen == {48, 64}
    transform.train_sizes = (32,)  # 64x80 -> 32x40: boxes halve
    _, resized_targets = transform([images[0]], copy.deepcopy(targets[:1]))
    assert torch.allclose(resized_targets[0]["boxes"], targets[0]["boxes"] / 2)
    transform.eval()
    assert transform.min_size == (96,)


def test_frozen_bn_and_stages():
    """frozen_bn: every BatchNorm of the backbone (attention BN1d included) becomes frozen with the same
    statistics; frozen_stages=1: stem + layer1 (converted layers and their block routing included) get no
    gradient and do not move; layer2.. train."""
    source = backbone("resnet18", "odconv")
    stats = source.net.layer3[0].bn1.running_var.clone()
    model = BUILDERS["maskrcnn"](source, task_cfg("maskrcnn", frozen_bn=True, frozen_stages=1), K, DATA)
    body = model.backbone.body
    assert not [n for n, m in body.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert isinstance(body.net.layer3[0].bn1, FrozenBatchNorm2d)
    assert torch.equal(body.net.layer3[0].bn1.running_var, stats)
    assert any(isinstance(m, FrozenBatchNorm1d) for m in body.modules())  # ODConv's attention BN
    trainable = {n for n, p in body.named_parameters() if p.requires_grad}
    assert not [n for n in trainable if n.startswith(("net.conv1.", "net.layer1."))]
    assert [n for n in trainable if n.startswith("net.layer2.")]
    frozen_before = {n: p.detach().clone() for n, p in body.named_parameters() if not p.requires_grad}
    buffers_before = {n: b.clone() for n, b in body.named_buffers()}
    train_step(model)
    assert all(torch.equal(p, frozen_before[n]) for n, p in body.named_parameters() if n in frozen_before)
    assert all(torch.equal(b, buffers_before[n]) for n, b in body.named_buffers())


def test_nothing_frozen():
    model = detector("retinanet", frozen_bn=False, frozen_stages=-1)
    body = model.backbone.body
    assert all(p.requires_grad for p in body.parameters())
    assert isinstance(body.net.bn1, nn.BatchNorm2d)


def test_frozen_stages_shared_modules():
    """Modules outside `net` freeze with the layers that read them: WeightNet's block-wise GAP with its block;
    a KernelWarehouse warehouse only when every reader is frozen (KW's ResNet layout also feeds the next
    stage's first conv and shortcut from the "stage1" warehouse: it trains while stage 2 does)."""
    shared = detector("retinanet", "weightnet", frozen_stages=1).backbone.body.shared_inputs
    assert not any(p.requires_grad for p in shared["layer1__0"].parameters())
    assert all(p.requires_grad for p in shared["layer2__0"].parameters())
    warehouses = detector("retinanet", "kw", frozen_stages=1).backbone.body.warehouses
    assert warehouses["stage1"].cells.requires_grad
    warehouses = detector("retinanet", "kw", frozen_stages=2).backbone.body.warehouses
    assert not warehouses["stage1"].cells.requires_grad and warehouses["stage2"].cells.requires_grad


def test_module_stages():
    """Unplaced modules join the placed modules around them, else the preceding one."""
    stages = module_stages(backbone("resnet18"))
    assert (stages["bn1"], stages["layer2.0.bn1"], stages["layer2.0.downsample.1"]) == (0, 2, 2)
    stages = module_stages(backbone("convnext_tiny"))
    assert (stages["stem.1"], stages["stages.1.downsample.0"], stages["stages.1.blocks.0.norm"]) == (0, 2, 2)


def test_classifier_and_unused_modules_removed():
    """The classifier (and, for MobileNetV2, the 1x1 head conv that forward_features never runs) is gone:
    neither trained nor counted."""
    model = detector("retinanet", backbone_name="mobilenetv2_050")
    net = model.backbone.body.net
    assert isinstance(net.classifier, nn.Identity) and isinstance(net.conv_head, nn.Identity)
    assert not [n for n, _ in model.named_parameters() if ".classifier." in n or "conv_head" in n]
    resnet = detector("retinanet")
    assert isinstance(resnet.backbone.body.net.fc, nn.Identity)


def test_backbone_without_levels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"deit_tiny.*\['C4'\]"):
        detector("retinanet", backbone_name="deit_tiny")


@pytest.mark.parametrize("name,key,value,allowed", [
    ("retinanet", "fpn_channels", 0, "integers >= 1"),
    ("retinanet", "aspect_ratios", [], "a non-empty list of positive numbers"),
    ("retinanet", "anchor_sizes", [32, 64], "a list of 5 positive numbers"),
    ("retinanet", "bg_iou_thresh", 0.6, "task.fg_iou_thresh"),
    ("retinanet", "frozen_bn", "yes", "true, false"),
    ("retinanet", "head_norm", "batch", "none, group"),
    ("retinanet", "frozen_stages", 5, "-1 (nothing), 0 (stem) .. 4"),
    ("maskrcnn", "mask_head_layers", 0, "integers >= 1"),
    ("maskrcnn", "nms_thresh", 0.0, "a number in (0.0, 1.0]"),
])
def test_wrong_knob_names_key_and_allowed_values(name, key, value, allowed):
    with pytest.raises(ValueError) as info:
        detector(name, **{key: value})
    assert f"task.{key}=" in str(info.value) and allowed in str(info.value)


def test_task_configs_document_every_key():
    for path in TASK_DIR.glob("*.yaml"):
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert " # " in line, f"{path.name}: {line!r} has no trailing comment"


def _toy_gt(images, targets) -> COCO:
    """Ground truth of the synthetic batch, category ids 2, 5, 9 for labels 1..3."""
    category_ids = [2, 5, 9]
    dataset = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c)} for c in category_ids]}
    for image, target in zip(images, targets):
        h, w = image.shape[-2:]
        dataset["images"].append({"id": target["image_id"], "width": w, "height": h})
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": target["image_id"],
                "category_id": category_ids[label - 1], "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def test_task_seam_train_and_evaluate():
    """prepare_batch / forward_loss / evaluate of MaskRCNNTask; evaluate skips an all-unreadable batch and
    returns box and mask AP keys (result_keys) plus the image count."""
    images, targets = batch()
    data = SimpleNamespace(**vars(DATA), val_coco=_toy_gt(images, targets), category_ids=[2, 5, 9])
    task = MaskRCNNTask(task_cfg("maskrcnn", score_thresh=0.0), {}, K, data)
    assert task.primary_metric == "bbox_AP" and RetinaNetTask.with_masks() is False and task.with_masks()
    model = task.build_model(backbone())
    inputs, prepared = task.prepare_batch((images, targets, []), torch.device("cpu"), training=True)
    loss, size, extras = task.forward_loss(model.train(), inputs, prepared)
    assert size == 2 and torch.isfinite(loss) and loss.requires_grad
    assert set(extras) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert torch.allclose(loss.detach(), sum(extras.values()))
    loader = [(None, None, ["broken.jpg"]), (images[:1], targets[:1], []), (images[1:], targets[1:], [])]
    metrics = task.evaluate(model, loader, torch.device("cpu"), contextlib.nullcontext)
    assert set(task.result_keys()) <= set(metrics) and metrics["samples"] == 2
    assert all(0.0 <= metrics[k] <= 100.0 for k in task.result_keys() if not k.endswith("APl"))
    assert metrics["bbox_APl"] == metrics["segm_APl"] == -1.0  # no large object: pycocotools' "undefined"
    assert not model.training


@pytest.mark.parametrize("op", ["static", "lwe"])
def test_copy_and_state_dict_round_trip(op):
    """EMA deep-copies the model and checkpoints reload its state_dict into a fresh build: both give the same
    detections (the frozen BN buffers, the transform's sizes and the weight-excitation parametrisations come
    along)."""
    model = detector("maskrcnn", op, score_thresh=0.0).eval()
    copied = copy.deepcopy(model).eval()
    rebuilt = detector("maskrcnn", op, score_thresh=0.0).eval()
    torch.manual_seed(1)
    for param in model.parameters():
        param.data.add_(0.01 * torch.randn_like(param))
    copied.load_state_dict(model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    images, _ = batch()
    with torch.no_grad():
        expected = model(images)
        for other in (copied, rebuilt):
            for a, b in zip(expected, other(images)):
                torch.testing.assert_close(a["boxes"], b["boxes"])
                torch.testing.assert_close(a["masks"], b["masks"])


@pytest.mark.parametrize("op", ["condconv", "kw"])
def test_init_from_a_classification_checkpoint(op):
    """`init_from` (training.py: load_backbone_weights, then the detector is built): the backbone's and the
    operator's parameters (CondConv experts and routing; KW warehouses and attentions, with op.tau=0 and
    op.init=none as Appendix A.1.2 fine-tunes) come from the classification checkpoint, its classifier is skipped,
    and the detector then trains."""
    from dynconv.build import load_backbone_weights

    overrides = {"tau": 0, "init": "none"} if op == "kw" else {}
    op_cfg = {**load_op_config(op), **OP_SHRINK.get(op, {}), **overrides}
    torch.manual_seed(1)
    classifier_net = build_backbone({"name": "resnet18"}, op_cfg, {"name": "none"}, num_classes=1000,
                                    image_size=64).backbone
    payload = {"model": classifier_net.state_dict()}
    torch.manual_seed(2)
    fresh = build_backbone({"name": "resnet18"}, op_cfg, {"name": "none"}, num_classes=10, image_size=64).backbone
    skipped = load_backbone_weights(fresh, payload, "imagenet.pt")
    assert skipped and all(key.startswith("net.fc.") for key in skipped)
    model = build_maskrcnn(fresh, task_cfg("maskrcnn", frozen_bn=False, frozen_stages=-1), K, DATA)
    loaded = model.backbone.body.state_dict()
    expected = classifier_net.state_dict()
    static_keys = set(build_backbone({"name": "resnet18"}, {"name": "static"}, {"name": "none"}, num_classes=1000,
                                     image_size=64).backbone.state_dict())
    assert [key for key in loaded if key not in static_keys], "no operator parameter in the detector's backbone"
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key
    losses, changed = train_step(model)
    assert all(torch.isfinite(v) for v in losses.values()) and changed
