"""The optimizer train.py builds (dynconv/engine/training_run.py): the recipes' SGD is torch's fused SGD, whose
update is the plain SGD's formula (momentum, Nesterov, weight decay), one pass per parameter."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from dynconv.engine.training_run import FUSED_SGD, build_optimizer_and_scheduler


@pytest.mark.parametrize("opt", FUSED_SGD)
def test_sgd_recipes_build_fused_sgd_with_the_plain_update(opt, compose_cfg):
    cfg = compose_cfg([f"recipe.opt={opt}", "recipe.weight_decay=1e-4", "recipe.momentum=0.9"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    plain_model = copy.deepcopy(model)
    optimizer, _ = build_optimizer_and_scheduler(model, cfg.recipe, 10)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["fused"] is True
    assert optimizer.defaults["nesterov"] is (opt == "sgd")  # timm: "sgd" is Nesterov, "momentum" classical
    # The same parameter groups (timm leaves biases without weight decay), plain SGD.
    twin = dict(zip(map(id, model.parameters()), plain_model.parameters()))
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 1e-4}
    plain = torch.optim.SGD([{"params": [twin[id(p)] for p in group["params"]], "weight_decay": group["weight_decay"]}
                             for group in optimizer.param_groups], lr=optimizer.param_groups[0]["lr"], momentum=0.9,
                            nesterov=opt == "sgd")
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        for net, opt_ in ((model, optimizer), (plain_model, plain)):
            opt_.zero_grad()
            net(x).square().mean().backward()
            opt_.step()
    for fused_param, plain_param in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(fused_param, plain_param, rtol=1e-6, atol=1e-8)


def test_other_optimizers_are_built_as_timm_builds_them(compose_cfg):
    cfg = compose_cfg(["recipe.opt=adamw"])
    optimizer, _ = build_optimizer_and_scheduler(nn.Linear(2, 2), cfg.recipe, 10)
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults.get("fused")
