"""The video backbones (docs/video.md): TSM's temporal shift moves exactly the right channels, sits in the residual
branch, and leaves every operator's view of the ResNet unchanged; R3D-18 and TSM take clips and fit task=video only;
an image backbone under task=video is TSN's frame average."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dynconv.backbones import BACKBONES
from dynconv.backbones.temporal_shift import TemporalShift, segments_of, temporal_shift
from dynconv.backbones.timm_any import BY_MODEL_NAME
from dynconv.backbones.video import VIDEO_BACKBONES
from dynconv.build import build_backbone
from dynconv.functional import selector
from dynconv.ops import OPERATORS
from dynconv.tasks.video.task import video_model
from op_checks import load_op_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

NONE = {"name": "none"}


def _build(name: str, op: str = "static", *, meta: bool = False, image_size: int = 32, **knobs):
    torch.manual_seed(0)
    op_cfg = {**load_op_config(op), **knobs}
    if meta:
        with torch.device("meta"):
            return build_backbone({"name": name}, op_cfg, NONE, num_classes=10, image_size=image_size)
    return build_backbone({"name": name}, op_cfg, NONE, num_classes=10, image_size=image_size)


def _clips(batch: int = 2, frames: int = 3, side: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, frames, side, side, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- the shift itself
def test_the_shift_moves_one_eighth_back_one_eighth_forward_and_pads_with_zeros():
    """Two clips of T = 3 frames, C = 16 channels (shift_div 8: channels 0-1 back, 2-3 forward, 4-15 stay), each
    value naming its clip, frame and channel: 100 clip + 10 frame + channel / 100."""
    clips, frames, channels = 2, 3, 16
    value = torch.zeros(clips, frames, channels)
    for n in range(clips):
        for t in range(frames):
            value[n, t] = 100 * (n + 1) + 10 * (t + 1) + torch.arange(channels) / 100
    x = value[..., None, None].expand(clips, frames, channels, 2, 2).reshape(clips * frames, channels, 2, 2)
    out = temporal_shift(x, frames, 8).view(clips, frames, channels, 2, 2)[..., 0, 0]
    for n in range(clips):
        for t in range(frames):
            for c in range(channels):
                if c < 2:  # back in time: frame t shows frame t + 1; the last frame gets zeros
                    expected = value[n, t + 1, c] if t + 1 < frames else 0.0
                elif c < 4:  # forward in time: frame t shows frame t - 1; the first frame gets zeros
                    expected = value[n, t - 1, c] if t > 0 else 0.0
                else:
                    expected = value[n, t, c]
                assert out[n, t, c].item() == pytest.approx(float(expected)), (n, t, c)
    # Nothing crosses from one clip to the other: clip 1's frames only hold clip 1's values (or zeros).
    assert ((out[1] == 0) | (out[1] >= 200)).all()


def test_the_shift_needs_the_clip_length():
    shift = TemporalShift(8)
    with pytest.raises(RuntimeError, match="clip length"):
        shift(torch.zeros(4, 16, 2, 2))
    with segments_of(nn.Sequential(shift), 2):
        assert shift(torch.zeros(4, 16, 2, 2)).shape == (4, 16, 2, 2)
    assert shift.segments is None
    with pytest.raises(ValueError, match="whole clips"):
        temporal_shift(torch.zeros(5, 16, 2, 2), 2, 8)


def test_the_shift_sits_in_the_residual_branch_before_conv1():
    """TSM's residual shift: layer1.0's conv1 sees the shifted block input, the shortcut (added after conv2/bn2)
    the unshifted one, even after an operator replaced conv1. (bn2 not zero-initialised: the branch counts.)"""
    torch.manual_seed(0)
    model = build_backbone({"name": "tsm_resnet18", "zero_init_last": False},
                           {**load_op_config("condconv"), "experts": 2}, NONE, num_classes=10, image_size=32)
    model = model.backbone.eval()
    block = model.net.layer1[0]
    seen = {}

    def keep(name):  # a hook that stores a copy and returns None (a returned value would replace the tensor)
        return lambda tensor: seen.__setitem__(name, tensor.clone())

    block.register_forward_pre_hook(lambda module, args: keep("block")(args[0]))
    # A forward hook sees the input the convolution ran on, after every pre-hook (the shift is one).
    block.conv1.register_forward_hook(lambda module, args, out: keep("conv1")(args[0]))
    block.bn2.register_forward_hook(lambda module, args, out: keep("branch")(out))
    block.register_forward_hook(lambda module, args, out: keep("out")(out))
    with torch.no_grad(), selector.policy("model"):
        model(_clips(frames=4))
    torch.testing.assert_close(seen["conv1"], temporal_shift(seen["block"], 4, 8))
    torch.testing.assert_close(seen["out"], torch.relu(seen["branch"] + seen["block"]))  # shortcut: unshifted
    assert not torch.equal(seen["conv1"], seen["block"]) and seen["branch"].abs().max() > 0.1


def test_without_a_shift_tsm_is_timm_resnet_per_frame_averaged():
    """shift_div larger than any channel count moves nothing: the TSM backbone then computes exactly timm's
    resnet18 on every frame with the logits averaged, from the same weights (the mixin runs timm's forward)."""
    tsm = BACKBONES.get("tsm_resnet18")(num_classes=10, image_size=32, shift_div=10_000).eval()
    plain = _build("resnet18").backbone.eval()
    plain.load_state_dict(tsm.state_dict())
    clips = _clips(frames=3)
    with torch.no_grad():
        frames = clips.transpose(1, 2).reshape(6, 3, 32, 32)
        expected = plain(frames).view(2, 3, 10).mean(dim=1)
        torch.testing.assert_close(tsm(clips), expected)
        torch.testing.assert_close(video_model(plain)(clips), expected)  # TSN's wrapper: the same folding


def test_tsm_sees_frame_order_and_tsn_does_not():
    """(Residual branches not zero-initialised: with timm's zero_init_last every branch, the shift's input
    included, starts at 0 and TSM begins as TSN.)"""
    tsm = BACKBONES.get("tsm_resnet18")(num_classes=10, image_size=32, zero_init_last=False).eval()
    tsn = video_model(_build("resnet18").backbone.eval())
    clips = _clips(frames=4)
    reversed_clips = clips.flip(2)
    with torch.no_grad():
        assert not torch.allclose(tsm(clips), tsm(reversed_clips), atol=1e-4)
        torch.testing.assert_close(tsn(clips), tsn(reversed_clips))


# ----------------------------------------------------------------------------- every operator on TSM's ResNet
@pytest.mark.parametrize("op", sorted(OPERATORS.names()))
def test_every_operator_converts_tsm_resnet50_exactly_as_resnet50(op):
    """Same layers, same decisions and reasons, same state-dict keys and shapes (KernelWarehouse's warehouses and
    layouts included): the shift hides nothing from the placement rules. Meta device: no memory, no init."""
    tsm = _build("tsm_resnet50", op, meta=True, image_size=224)
    plain = _build("resnet50", op, meta=True, image_size=224)
    assert [(d.layer.name, d.layer.role, d.converted, d.reason) for d in tsm.decisions] == \
        [(d.layer.name, d.layer.role, d.converted, d.reason) for d in plain.decisions]
    assert {k: v.shape for k, v in tsm.backbone.state_dict().items()} == \
        {k: v.shape for k, v in plain.backbone.state_dict().items()}
    assert op == "static" or any(d.converted for d in tsm.decisions)


@pytest.mark.parametrize("op", ["condconv", "kw", "odconv", "lwe"])
def test_tsm_resnet18_trains_a_step_with_dynamic_operators(op):
    """Forward and backward on a clip batch: every converted layer's parameters get a gradient."""
    small = {"condconv": {"experts": 2}, "odconv": {"kernels": 2}, "kw": {"tau": 0.5}}.get(op, {})
    built = _build("tsm_resnet18", op, **small)
    model = built.backbone.train()
    with selector.policy("model"):
        logits = model(_clips(batch=2, frames=2))
        assert logits.shape == (2, 10)
        nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    for decision in built.decisions:
        if decision.converted:
            for name, param in model.net.get_submodule(decision.layer.name).named_parameters():
                assert param.grad is not None, f"{decision.layer.name}.{name}"


# ------------------------------------------------------------------------------------ clips in, task=video only
def test_the_video_backbones_say_they_take_clips():
    """VIDEO_BACKBONES (what the image test matrices leave out) is exactly the registered backbones that take clips."""
    with torch.device("meta"):
        clip_takers = {name for name in BACKBONES.names() if name not in BY_MODEL_NAME  # backbone=timm: images
                       and BACKBONES.get(name)(num_classes=10, image_size=32).takes_clips}
    assert clip_takers == set(VIDEO_BACKBONES)


@pytest.mark.parametrize("name", VIDEO_BACKBONES)
def test_video_backbones_refuse_images_and_feature_maps(name):
    model = _build(name, meta=True).backbone
    assert model.example_input(2, 32).shape == (2, 3, model.clip_length, 32, 32)
    with pytest.raises(ValueError, match="video classifier"):
        model.forward_features(torch.zeros(1, 3, 32, 32, device="meta"))
    if name.startswith("tsm"):
        with pytest.raises(ValueError, match="takes video clips"):
            model(torch.zeros(1, 3, 32, 32, device="meta"))


@pytest.mark.parametrize("task", ["classification", "retinanet"])
def test_a_video_backbone_under_an_image_task_is_refused_naming_it(compose_cfg, task):
    from dynconv.config import ConfigError, validate_model_config

    with pytest.raises(ConfigError, match=r"backbone=r3d_18 takes video clips .* fits task=video only"):
        validate_model_config(compose_cfg(["backbone=r3d_18", f"task={task}"]))


def test_shift_div_is_a_backbone_knob(compose_cfg):
    """backbone.shift_div reaches the builder (a quarter of the channels each way at 4), and a bad value is refused
    naming the key before anything is built."""
    from dynconv.config import ConfigError, validate_model_config

    cfg = compose_cfg(["task=video", "backbone=tsm_resnet18", "backbone.shift_div=4", "op=static"])
    with torch.device("meta"):
        built = build_backbone(cfg.backbone, load_op_config("static"), NONE, num_classes=10, image_size=32)
    assert {module.shift_div for module in built.backbone.modules() if isinstance(module, TemporalShift)} == {4}
    with pytest.raises(ConfigError, match=r"backbone.shift_div=1 is invalid; allowed values: integers >= 2"):
        validate_model_config(compose_cfg(["task=video", "backbone=tsm_resnet18", "backbone.shift_div=1"]))
