"""The Python API (dynconv/api.py, docs/api.md): models as the configs build them, the same validation, the
papers' counts, checkpoints loaded for inference without a dataset; the docs' example runs."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import dynconv
from conftest import REPO
from figure_checkpoints import DIGIT_CLASSES, make_checkpoint

from dynconv.config import ConfigError


def test_create_model_is_the_model_the_configs_build():
    from omegaconf import OmegaConf

    from dynconv.build import build_backbone

    torch.manual_seed(0)
    model = dynconv.create_model("resnet18", op="condconv", experts=2, num_classes=10, image_size=32)
    cfg = dynconv.model_config("resnet18", "condconv", experts=2)
    assert cfg.op.experts == 2 and cfg.op.routing == "layer"  # the other knobs: the YAML's defaults
    torch.manual_seed(0)
    reference = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn,
                               num_classes=10, image_size=32).backbone
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert model.dynconv_config["op"]["experts"] == 2
    assert isinstance(model, nn.Module) and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bad_names_and_knobs_name_the_key_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"op='condcon' is not known; allowed values: .*condconv"):
        dynconv.create_model("resnet18", op="condcon")
    with pytest.raises(ConfigError, match=r"expert=8 is not a knob of op=condconv \(experts, routing"):
        dynconv.create_model("resnet18", op="condconv", expert=8)
    with pytest.raises(ConfigError, match="op.experts"):
        dynconv.create_model("resnet18", op="condconv", experts=0)
    assert "kw" in dynconv.options("op") and "resnet18" in dynconv.options("backbone")


def test_counts_are_the_papers_and_include_the_dynamic_branches():
    from dynconv.profiling import count_macs

    with torch.device("meta"):
        static = dynconv.create_model("resnet18")
        odconv = dynconv.create_model("resnet18", op="odconv", kernels=4)
        lwe = dynconv.create_model("resnet18", op="lwe")
    assert dynconv.count_macs(static, (3, 224, 224)) == 1_814_073_344  # DyNet Table 1: 1730 x 2^20
    assert dynconv.count_macs(odconv) == count_macs(odconv, (3, 224, 224)).total > 1_814_073_344
    record = dynconv.profile(lwe)
    assert record["params"] > record["params_inference"] == 11_689_512  # LWE folds back into ResNet18
    assert record["macs_inference"] == 1_814_073_344 and record["input_size"] == [3, 224, 224]


def test_load_rebuilds_a_checkpoint_for_inference_with_its_class_names(tmp_path, data_dir):
    saved = {}

    def remember(model):
        saved["model"] = model

    path = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", data_dir, ["op=condconv"],
                           model_edit=remember)
    for source in (path, tmp_path / "run"):
        model = dynconv.load(source)
        assert model.class_names == DIGIT_CLASSES and not model.training
        images = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(images), saved["model"].eval()(images))
    with pytest.raises(FileNotFoundError, match="checkpoints/best.pt"):
        dynconv.load(tmp_path)
    with pytest.raises(ConfigError, match="no EMA weights"):
        dynconv.load(path, weights="ema")


def test_kernel_bank_layers_take_nn_conv2d_arguments():
    from dynconv.ops.condconv import CondConv2d
    from dynconv.ops.dyconv import DyConv2d

    x = torch.randn(2, 16, 8, 8)
    reference = nn.Conv2d(16, 32, 3, padding=1)(x)
    for layer in (CondConv2d(16, 32, 3, padding=1), DyConv2d(16, 32, 3, padding=1)):
        assert layer(x).shape == reference.shape
    assert CondConv2d(16, 32, 3).experts == dynconv.model_config("resnet18", "condconv").op.experts


def test_the_docs_example_runs():
    text = (REPO / "docs" / "api.md").read_text()
    first = re.findall(r"```python\n(.*?)```", text, re.DOTALL)[0]
    exec(compile(first, "docs/api.md", "exec"), {})


def test_the_docs_notebook_walk_through_runs(tmp_path, monkeypatch):
    """docs/api.md's walk-through as written: create, convert a timm EfficientNet, count MACs, init from static,
    export to ONNX, run it in onnxruntime at another batch size."""
    text = (REPO / "docs" / "api.md").read_text()
    walk_through = next(block for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL)
                        if "onnxruntime.InferenceSession" in block)
    monkeypatch.chdir(tmp_path)  # the example writes its .onnx file into the working folder
    torch.manual_seed(0)
    exec(compile(walk_through, "docs/api.md", "exec"), {})
    assert (tmp_path / "efficientnet_b0_dyconv.onnx").is_file()
