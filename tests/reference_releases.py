"""The reference releases' models, re-implemented here from reading their code, for the import tests: their
state dicts (every key, in their naming and shapes, random values or shapes only) and their forward passes.

Written independently of `dynconv/pretrained/` (which maps these layouts): if both read the release the same way,
a state dict made here, imported there, computes here what it computes in dynconv.

Read at OSVAI/KernelWarehouse a4ac17d (2024-06-13): modules/kernel_warehouse.py, models/kw_resnet.py,
models/kw_mobilenetv2.py, models/kw1d2x_mobilenetv2.py, models/kw_convnext.py, configs/*/kw*.json; and
OSVAI/ODConv 0901cc1 (2023-09-06): modules/odconv.py, models/od_resnet.py, models/od_mobilenetv2.py.

Facts used (each from the file named):
- kw_resnet.py: a block's conv1 reserves stage s-1's warehouse in the first block of stage s ("handover", clamped at
  0 for BasicBlock; Bottleneck's conv1 of stage 0 is a plain conv), conv2/conv3 stage s; the downsample conv of
  stage s reserves stage s-1 and is a plain conv when its stride is 1. Modules register conv1, bn1, conv2, bn2,
  (conv3, bn3), downsample.
- kernel_warehouse.py `store`: per warehouse c_out = max(int(gcd(out) * out_ratio), 1), c_in likewise (in per
  group), mixtures of a layer = (out // c_out * in // c_in) * kh * kw, n = max(int(total * cell_num_ratio), 1).
  `allocate` walks `network.modules()`; `init_temperature`: b >= 1: mixture i -> cell start + i b; b < 1: mixture i
  takes the next cell when i % k == (i // k) % k (k = 1/b), else the zero cell (index n of its n + 1).
- `Attention`: hidden = max(int(in * reduction), 16); fc1 (bias only without BatchNorm1d), norm1, ReLU; fc2 to
  (n + 1) m (bias); with nonlocal_basis_ratio < 1: local = int(cell_num_ratio * m), basis =
  max(int((n - local) * ratio), 16), fc2 (local + basis + 1) m without bias, fc3 basis -> n - local, and
  basis_bias (m (n + 1)) added after putting the non-local logits around the local ones at start_cell_idx.
  Normalised per mixture by (sum |z| + 1e-3), mixed (1 - tau) z + tau temp_bias, the zero cell dropped.
- `KWconvNd.forward`: alpha (B m, n) @ cells -> (B, S, G_out, G_in, c_out, c_in, kh', kw') -> permute
  (0, 2, 4, 3, 5, 1, 6, 7) -> (B O, C / g, kh, kw), one convolution with groups g B; bias added after.
- kw_mobilenetv2.py / kw1d2x_mobilenetv2.py: stem 'stage0_conv0'; blocks 'stage{s}_layer{l}_{pwconv0 | dwconv0 |
  pwconv1}' with kw_stage_setting (1, 2, 3, 4, 5, 6, 6) and handover of a group's first block; the last 1x1
  'stage6_..._pwconv1'; 1x shares 'pwconv' (sharing_range ["layer", "pwconv"]); 1/2x: per-warehouse ratios
  (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5) (cells), in (..., 0.5, 1, 0.5, 0.025), out (..., 0.5, 1, 0.5, 1), reduction
  1/32, point-wise layers of the first five KW stages plain convs, the classifier a KWLinear (Dropout, KWLinear).
- kw_convnext.py: stem (KW 4x4 s4 + LayerNorm), downsample_layers 1-3 (LayerNorm + KW 2x2 s2), blocks (dwconv KW 7x7,
  norm, pwconv1 / pwconv2 KW 1x1 convolutions, gamma (1, C, 1, 1)), norm, head; every KW layer with a bias
  (`reserve`'s default); LayerNorm in the attention (fc1 with bias); kw1x config: reduction 1/16, ratios 1.
- odconv.py: Attention fc (1x1 conv, no bias) -> bn -> ReLU -> channel_fc, filter_fc (not depth-wise),
  spatial_fc (not 1x1), kernel_fc (not n = 1), each / T; sigmoid, sigmoid, sigmoid, softmax; x * channel, kernel
  = sum_i spatial * kernel_i * W_i, output * filter. od_resnet.py / od_mobilenetv2.py: stem and downsample plain;
  every other convolution (features.18 included) ODConv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

RESNET_DEPTHS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
MOBILENETV2_TABLE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                     (6, 320, 1, 1))
KW_STAGES = (1, 2, 3, 4, 5, 6, 6)


@dataclass
class Conv:
    """One convolution (or Linear: kernel ()) of a reference network, in module registration order."""

    name: str
    cin: int
    cout: int
    kernel: tuple[int, ...]
    stride: int = 1
    padding: int = 0
    groups: int = 1
    dynamic: bool = False
    warehouse: str | None = None
    bias: bool = False


@dataclass
class Network:
    convs: list[Conv]
    norms: list[tuple[str, int, str]]  # (name, channels, "bn" | "ln")
    extra: dict[str, tuple[int, ...]] = field(default_factory=dict)  # other parameters (gamma, classifier)


def make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


# ------------------------------------------------------------------------------------------- networks

def resnet(depth: int, dynamic: str, num_classes: int) -> Network:
    """kw_resnet.py (dynamic="kw") / od_resnet.py (dynamic="od") in registration order."""
    kind, blocks = RESNET_DEPTHS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    convs = [Conv("conv1", 3, 64, (7, 7), 2, 3)]
    norms = [("bn1", 64, "bn")]
    inplanes = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
        stride = 1 if stage == 0 else 2
        for block in range(count):
            prefix = f"layer{stage + 1}.{block}"
            s = stride if block == 0 else 1
            handover = block == 0
            if kind == "basic":
                c1_stage = max(stage - 1, 0) if handover else stage
                specs = [("conv1", inplanes, planes, 3, s, c1_stage), ("conv2", planes, planes, 3, 1, stage)]
            else:
                c1_stage = stage - 1 if handover else stage
                specs = [("conv1", inplanes, planes, 1, 1, c1_stage), ("conv2", planes, planes, 3, s, stage),
                         ("conv3", planes, planes * 4, 1, 1, stage)]
            for index, (name, cin, cout, k, st, wh) in enumerate(specs, 1):
                dyn = dynamic == "od" or (dynamic == "kw" and wh >= 0)
                convs.append(Conv(f"{prefix}.{name}", cin, cout, (k, k), st, k // 2, dynamic=dyn,
                                  warehouse=f"stage{wh}" if dynamic == "kw" else None))
                norms.append((f"{prefix}.bn{index}", cout, "bn"))
            if block == 0 and (s != 1 or inplanes != planes * expansion):
                dyn = dynamic == "kw" and s != 1
                convs.append(Conv(f"{prefix}.downsample.0", inplanes, planes * expansion, (1, 1), s, 0, dynamic=dyn,
                                  warehouse=f"stage{stage - 1}" if dyn else None))
                norms.append((f"{prefix}.downsample.1", planes * expansion, "bn"))
            inplanes = planes * expansion
    return Network(convs, norms, {"fc.weight": (num_classes, 512 * expansion), "fc.bias": (num_classes,)})


def mobilenetv2(width: float, dynamic: str, num_classes: int, budget: str = "1") -> Network:
    """kw_mobilenetv2.py / kw1d2x_mobilenetv2.py (dynamic="kw", budget "1/2" for the latter) / od_mobilenetv2.py."""
    half = budget == "1/2"
    stem = make_divisible(32 * width)
    last = make_divisible(1280 * max(1.0, width))
    convs = [Conv("features.0.0", 3, stem, (3, 3), 2, 1, dynamic=dynamic == "kw", warehouse="stage0_conv0")]
    norms = [("features.0.1", stem, "bn")]
    cin, index, layer_index = stem, 1, 0
    for group, (t, c, n, s) in enumerate(MOBILENETV2_TABLE):
        cout = make_divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            handover = i == 0 and group > 0 and KW_STAGES[group] != KW_STAGES[group - 1]
            stage = KW_STAGES[group] - 1 if handover else KW_STAGES[group]
            pw_dynamic = dynamic == "od" or (dynamic == "kw" and (not half or stage - 1 >= 5))
            hidden = int(round(cin * t))
            base = f"features.{index}.conv"

            def wh(kind):
                if dynamic != "kw":
                    return None
                return f"stage{stage}_{'pwconv' if kind.startswith('pw') and budget == '1' else kind}"

            if t != 1:
                convs.append(Conv(f"{base}.0.0", cin, hidden, (1, 1), dynamic=pw_dynamic, warehouse=wh("pwconv0")))
                norms.append((f"{base}.0.1", hidden, "bn"))
                dw, pwl, bn = f"{base}.1", f"{base}.2", f"{base}.3"
            else:
                dw, pwl, bn = f"{base}.0", f"{base}.1", f"{base}.2"
            convs.append(Conv(f"{dw}.0", hidden, hidden, (3, 3), stride, 1, hidden, dynamic=dynamic != "none",
                              warehouse=wh("dwconv0")))
            norms.append((f"{dw}.1", hidden, "bn"))
            convs.append(Conv(pwl, hidden, cout, (1, 1), dynamic=pw_dynamic, warehouse=wh("pwconv1")))
            norms.append((bn, cout, "bn"))
            cin, index = cout, index + 1
            layer_index = 0 if handover else layer_index + 1
    convs.append(Conv(f"features.{index}.0", cin, last, (1, 1), dynamic=dynamic != "none",
                      warehouse=f"stage6_{'pwconv' if budget == '1' else 'pwconv1'}"))
    norms.append((f"features.{index}.1", last, "bn"))
    extra = {}
    if dynamic == "kw" and half:
        convs.append(Conv("classifier.1", last, num_classes, (), dynamic=True, warehouse="classifier", bias=True))
    elif dynamic == "kw":
        extra = {"classifier.weight": (num_classes, last), "classifier.bias": (num_classes,)}
    else:
        extra = {"classifier.1.weight": (num_classes, last), "classifier.1.bias": (num_classes,)}
    return Network(convs, norms, extra)


def kw_convnext_tiny(num_classes: int) -> Network:
    """kw_convnext.py's convnext_tiny: downsample_layers registered before stages."""
    dims, depths = (96, 192, 384, 768), (3, 3, 9, 3)
    convs = [Conv("downsample_layers.0.0", 3, 96, (4, 4), 4, dynamic=True, warehouse="stem", bias=True)]
    norms = [("downsample_layers.0.1", 96, "ln")]
    for i in range(3):
        norms.append((f"downsample_layers.{i + 1}.0", dims[i], "ln"))
        convs.append(Conv(f"downsample_layers.{i + 1}.1", dims[i], dims[i + 1], (2, 2), 2, dynamic=True,
                          warehouse=f"ds{i}", bias=True))
    extra = {}
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        for j in range(depth):
            prefix = f"stages.{i}.{j}"
            convs.append(Conv(f"{prefix}.dwconv", dim, dim, (7, 7), 1, 3, dim, True, f"stage{i}_dw", True))
            norms.append((f"{prefix}.norm", dim, "ln"))
            convs.append(Conv(f"{prefix}.pwconv1", dim, 4 * dim, (1, 1), dynamic=True, warehouse=f"stage{i}_pw",
                              bias=True))
            convs.append(Conv(f"{prefix}.pwconv2", 4 * dim, dim, (1, 1), dynamic=True, warehouse=f"stage{i}_pw",
                              bias=True))
            extra[f"{prefix}.gamma"] = (1, dim, 1, 1)
    norms.append(("norm", 768, "ln"))
    extra.update({"head.weight": (num_classes, 768), "head.bias": (num_classes,)})
    return Network(convs, norms, extra)


# --------------------------------------------------------------------------- KernelWarehouse's plan

@dataclass
class KWLayer:
    conv: Conv
    warehouse: int
    cell: tuple[int, ...]  # (c_out, c_in, *cell kernel)
    mixtures: int
    start: int
    beta: torch.Tensor  # temp_bias, (m (n + 1),)
    local: int  # Attention.num_local_cell
    cells: int  # n of its warehouse
    spatial: int
    out_groups: int
    in_groups: int


def kw_plan(network: Network, cells_ratio, in_ratio, out_ratio) -> tuple[list[str], list[tuple], dict[str, KWLayer]]:
    """(warehouse names in reserve order, warehouse cell shapes (n, c_out, c_in, *k), layer plans)."""
    dynamic = [conv for conv in network.convs if conv.dynamic]
    names = list(dict.fromkeys(conv.warehouse for conv in dynamic))
    per = lambda value, w: value[names.index(w)] if isinstance(value, tuple) else value  # noqa: E731
    shapes, cell_of, n_of = [], {}, {}
    for w in names:
        members = [conv for conv in dynamic if conv.warehouse == w]
        out_gcd = math.gcd(*[conv.cout for conv in members])
        in_gcd = math.gcd(*[conv.cin // conv.groups for conv in members])
        c_in = max(int(in_gcd * per(in_ratio, w)), 1)
        c_out = max(int(out_gcd * per(out_ratio, w)), 1)
        dims = max(len(conv.kernel) for conv in members) or 1
        total = 0
        for conv in members:
            kernel = conv.kernel or (1,)
            total += int(conv.cout // c_out * (conv.cin // conv.groups) // c_in) * math.prod(kernel)
        n = max(int(total * per(cells_ratio, w)), 1)
        cell_of[w], n_of[w] = (c_out, c_in, *([1] * dims)), n
        shapes.append((n, c_out, c_in, *([1] * dims)))
    plans, ends = {}, dict.fromkeys(names, 0)
    for conv in dynamic:  # registration order
        w = conv.warehouse
        ratio = per(cells_ratio, w)
        c_out, c_in = cell_of[w][:2]
        kernel = conv.kernel or (1,)
        go, gi, spatial = conv.cout // c_out, conv.cin // c_in // conv.groups, math.prod(kernel)
        m = go * gi * spatial
        n = n_of[w]
        beta = torch.zeros(m * (n + 1))
        start = ends[w]
        if ratio >= 1:
            for i in range(m):
                beta[i * (n + 1) + ends[w]] = 1
                ends[w] += int(ratio)
        else:
            k = int(1.0 / ratio)
            for i in range(m):
                if i % k == (i // k) % k:
                    beta[i * (n + 1) + ends[w]] = 1
                    ends[w] += 1
                else:
                    beta[i * (n + 1) + n] = 1
        plans[conv.name] = KWLayer(conv, names.index(w), cell_of[w], m, start, beta, int(ratio * m), n, spatial, go,
                                   gi)
    return names, shapes, plans


# ---------------------------------------------------------------------------------------- state dicts

class Filler:
    """Random values of the right scale (float64 forward tests), or shape-only meta tensors."""

    def __init__(self, seed: int = 0, meta: bool = False):
        self.meta = meta
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, shape, std=1.0, mean=0.0):
        if self.meta:
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=self.generator) * std + mean

    def positive(self, shape):
        if self.meta:
            return torch.empty(shape, device="meta")
        return 0.5 + torch.rand(shape, generator=self.generator)

    def count(self):
        return torch.empty((), dtype=torch.long, device="meta") if self.meta else torch.tensor(7)


def _norm_state(state, name, channels, kind, fill: Filler):
    state[f"{name}.weight"] = fill.normal((channels,), 0.1, 1.0)
    state[f"{name}.bias"] = fill.normal((channels,), 0.1)
    if kind == "bn":
        state[f"{name}.running_mean"] = fill.normal((channels,), 0.1)
        state[f"{name}.running_var"] = fill.positive((channels,))
        state[f"{name}.num_batches_tracked"] = fill.count()


def kw_state(network: Network, cells_ratio, in_ratio, out_ratio, reduction=0.0625, basis_ratio=1.0,
             norm="bn", fill: Filler | None = None) -> dict[str, torch.Tensor]:
    """A KernelWarehouse release's state dict of `network` (keys and shapes as the release's modules give them)."""
    fill = fill or Filler()
    names, shapes, plans = kw_plan(network, cells_ratio, in_ratio, out_ratio)
    state = {f"warehouse_manager.weights.{i}": fill.normal(shape, 0.2) for i, shape in enumerate(shapes)}
    for conv in network.convs:
        if not conv.dynamic:
            state[f"{conv.name}.weight"] = fill.normal((conv.cout, conv.cin // conv.groups, *conv.kernel),
                                                       math.sqrt(2.0 / (conv.cin // conv.groups
                                                                        * math.prod(conv.kernel))))
            continue
        plan = plans[conv.name]
        prefix = f"{conv.name}.conv" if not conv.kernel else conv.name  # KWLinear wraps a KWConv1d
        hidden = max(int(conv.cin * reduction), 16)
        att = f"{prefix}.attention"
        if basis_ratio < 1.0:
            nonlocal_ = plan.cells - plan.local
            basis = max(int(nonlocal_ * basis_ratio), 16)
            state[f"{att}.basis_bias"] = fill.normal((plan.mixtures * (plan.cells + 1),), 0.1)
        state[f"{att}.fc1.weight"] = fill.normal((hidden, conv.cin), 1.0 / math.sqrt(conv.cin))
        if norm != "bn":
            state[f"{att}.fc1.bias"] = fill.normal((hidden,), 0.1)
        _norm_state(state, f"{att}.norm1", hidden, norm, fill)
        if basis_ratio < 1.0:
            state[f"{att}.fc2.weight"] = fill.normal((plan.mixtures * (plan.local + basis + 1), hidden), 0.3)
            state[f"{att}.fc3.weight"] = fill.normal((nonlocal_, basis), 0.3)
        else:
            state[f"{att}.fc2.weight"] = fill.normal((plan.mixtures * (plan.cells + 1), hidden), 0.3)
            state[f"{att}.fc2.bias"] = fill.normal((plan.mixtures * (plan.cells + 1),), 0.1)
        if conv.bias:
            state[f"{prefix}.bias"] = fill.normal((conv.cout,), 0.1)
    for name, channels, kind in network.norms:
        _norm_state(state, name, channels, kind, fill)
    for name, shape in network.extra.items():
        state[name] = fill.normal(shape, 0.1)
    return state


def od_state(network: Network, kernels: int, reduction=0.0625, fill: Filler | None = None) -> dict[str, torch.Tensor]:
    """An ODConv release's state dict of `network`."""
    fill = fill or Filler()
    state = {}
    for conv in network.convs:
        shape = (conv.cout, conv.cin // conv.groups, *conv.kernel)
        std = math.sqrt(2.0 / (conv.cin // conv.groups * math.prod(conv.kernel)))
        if not conv.dynamic:
            state[f"{conv.name}.weight"] = fill.normal(shape, std)
            continue
        hidden = max(int(conv.cin * reduction), 16)
        att = f"{conv.name}.attention"
        state[f"{att}.fc.weight"] = fill.normal((hidden, conv.cin, 1, 1), 1.0 / math.sqrt(conv.cin))
        _norm_state(state, f"{att}.bn", hidden, "bn", fill)
        heads = {"channel_fc": conv.cin}
        if not (conv.cin == conv.groups == conv.cout):
            heads["filter_fc"] = conv.cout
        if conv.kernel[0] != 1:
            heads["spatial_fc"] = math.prod(conv.kernel)
        if kernels > 1:
            heads["kernel_fc"] = kernels
        for head, size in heads.items():
            state[f"{att}.{head}.weight"] = fill.normal((size, hidden, 1, 1), 0.5)
            state[f"{att}.{head}.bias"] = fill.normal((size,), 0.1)
        state[f"{conv.name}.weight"] = fill.normal((kernels, *shape), std)
    for name, channels, kind in network.norms:
        _norm_state(state, name, channels, kind, fill)
    for name, shape in network.extra.items():
        state[name] = fill.normal(shape, 0.1)
    return state


# ------------------------------------------------------------------------------------- forward passes

def _bn(x, state, name):
    return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                        state[f"{name}.bias"], False, 0.0, 1e-5)


def kw_conv(x, conv: Conv, plan: KWLayer, state, tau: float, basis_ratio: float):
    """kernel_warehouse.py's KWconvNd.forward (Attention.forward included), for a 2-D convolution or a Linear."""
    linear = not conv.kernel
    if linear:
        x = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)  # KWLinear: (B, C) -> (B, C, 1)
    prefix = f"{conv.name}.conv" if linear else conv.name
    att = f"{prefix}.attention"
    batch = x.shape[0]
    n, m = plan.cells, plan.mixtures
    z = x.reshape(batch, x.shape[1], -1).mean(-1)
    z = F.linear(z, state[f"{att}.fc1.weight"], state.get(f"{att}.fc1.bias"))
    z = torch.relu(F.batch_norm(z, state[f"{att}.norm1.running_mean"], state[f"{att}.norm1.running_var"],
                                state[f"{att}.norm1.weight"], state[f"{att}.norm1.bias"], False, 0.0, 1e-5))
    z = F.linear(z, state[f"{att}.fc2.weight"], state.get(f"{att}.fc2.bias"))
    if basis_ratio < 1.0:
        basis = max(int((n - plan.local) * basis_ratio), 16)
        z = z.reshape(-1, plan.local + basis + 1)
        local, nonlocal_, zero = z[:, :plan.local], z[:, plan.local:-1], z[:, -1:]
        nonlocal_ = F.linear(nonlocal_, state[f"{att}.fc3.weight"])
        z = torch.cat([nonlocal_[:, :plan.start], local, nonlocal_[:, plan.start:], zero], dim=1)
        z = z.reshape(-1, m * (n + 1)) + state[f"{att}.basis_bias"].reshape(1, -1)
    z = z.reshape(-1, n + 1)
    z = z / (z.abs().sum(dim=1, keepdim=True) + 1e-3)
    alpha = ((1.0 - tau) * z.reshape(-1, m * (n + 1)) + tau * plan.beta.to(z).view(1, -1)).reshape(-1, n + 1)[:, :-1]
    cells = state[f"warehouse_manager.weights.{plan.warehouse}"]
    kernel = (alpha @ cells.reshape(n, -1))
    kernel_size = conv.kernel or (1,)
    ck = plan.cell[2:]
    kernel = kernel.reshape(batch, plan.spatial, plan.out_groups, plan.in_groups, plan.cell[0], plan.cell[1], *ck)
    order = (0, 2, 4, 3, 5, 1, 6) if linear else (0, 2, 4, 3, 5, 1, 6, 7)
    kernel = kernel.permute(*order).reshape(-1, conv.cin // conv.groups, *kernel_size)
    flat = x.reshape(1, -1, *x.shape[2:])
    if linear:
        out = F.conv1d(flat, kernel, groups=conv.groups * batch)
    else:
        out = F.conv2d(flat, kernel, stride=conv.stride, padding=conv.padding, groups=conv.groups * batch)
    out = out.view(batch, conv.cout, *out.shape[2:])
    if conv.bias:
        out = out + state[f"{prefix}.bias"].reshape(1, -1, *([1] * (out.dim() - 2)))
    return out.transpose(1, 2).reshape(batch, -1) if linear else out


def od_conv(x, conv: Conv, state, temperature: float):
    """odconv.py's ODConv2d.forward (Attention.forward included)."""
    att = f"{conv.name}.attention"
    weight = state[f"{conv.name}.weight"]
    batch = x.shape[0]
    h = F.conv2d(x.mean(dim=(2, 3), keepdim=True), state[f"{att}.fc.weight"])
    h = torch.relu(_bn(h, state, f"{att}.bn"))

    def head(name):
        return F.conv2d(h, state[f"{att}.{name}.weight"], state[f"{att}.{name}.bias"]).view(batch, -1) / temperature

    channel = torch.sigmoid(head("channel_fc")).view(batch, -1, 1, 1)
    filt = torch.sigmoid(head("filter_fc")).view(batch, -1, 1, 1) if f"{att}.filter_fc.weight" in state else 1.0
    k = conv.kernel[0]
    spatial = torch.sigmoid(head("spatial_fc")).view(batch, 1, 1, 1, k, k) if k > 1 else 1.0
    kernel = torch.softmax(head("kernel_fc"), dim=1).view(batch, -1, 1, 1, 1, 1) \
        if f"{att}.kernel_fc.weight" in state else 1.0
    x = x * channel
    if k == 1 and weight.shape[0] == 1:
        out = F.conv2d(x, weight.squeeze(0), None, conv.stride, conv.padding, 1, conv.groups)
        return out * filt
    aggregate = (spatial * kernel * weight.unsqueeze(0)).sum(dim=1).view(-1, conv.cin // conv.groups, k, k)
    out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), aggregate, None, conv.stride, conv.padding, 1,
                   conv.groups * batch)
    return out.view(batch, conv.cout, *out.shape[2:]) * filt


class ReferenceModel:
    """The release's network as a function of its state dict (eval mode, float64 as the state is)."""

    def __init__(self, network: Network, state, *, kw_ratios=None, basis_ratio=1.0, tau=0.0, temperature=1.0):
        self.network, self.state = network, state
        self.convs = {conv.name: conv for conv in network.convs}
        self.plans = kw_plan(network, *kw_ratios)[2] if kw_ratios else {}
        self.basis_ratio, self.tau, self.temperature = basis_ratio, tau, temperature

    def conv(self, name, x):
        conv = self.convs[name]
        if name in self.plans:
            return kw_conv(x, conv, self.plans[name], self.state, self.tau, self.basis_ratio)
        if conv.dynamic:
            return od_conv(x, conv, self.state, self.temperature)
        return F.conv2d(x, self.state[f"{name}.weight"], None, conv.stride, conv.padding, 1, conv.groups)

    def resnet(self, x):
        s = self.state
        x = F.max_pool2d(torch.relu(_bn(self.conv("conv1", x), s, "bn1")), 3, 2, 1)
        blocks = sorted({conv.name.rsplit(".", 1)[0] for conv in self.network.convs if conv.name.startswith("layer")
                         and "downsample" not in conv.name}, key=lambda b: (int(b[5]), int(b.split(".")[1])))
        for block in blocks:
            identity = x
            convs = [f"{block}.conv{i}" for i in (1, 2, 3) if f"{block}.conv{i}" in self.convs]
            for i, name in enumerate(convs, 1):
                x = _bn(self.conv(name, x), s, f"{block}.bn{i}")
                if i < len(convs):
                    x = torch.relu(x)
            if f"{block}.downsample.0" in self.convs:
                identity = _bn(self.conv(f"{block}.downsample.0", identity), s, f"{block}.downsample.1")
            x = torch.relu(x + identity)
        return F.linear(x.mean(dim=(2, 3)), s["fc.weight"], s["fc.bias"])

    def mobilenetv2(self, x):
        s = self.state
        relu6 = lambda t: t.clamp(0, 6)  # noqa: E731
        x = relu6(_bn(self.conv("features.0.0", x), s, "features.0.1"))
        index = 1
        while f"features.{index}.conv.0.0" in self.convs:
            base = f"features.{index}.conv"
            expanding = f"{base}.3.weight" in s
            inp = x
            if expanding:
                x = relu6(_bn(self.conv(f"{base}.0.0", x), s, f"{base}.0.1"))
                x = relu6(_bn(self.conv(f"{base}.1.0", x), s, f"{base}.1.1"))
                x = _bn(self.conv(f"{base}.2", x), s, f"{base}.3")
            else:
                x = relu6(_bn(self.conv(f"{base}.0.0", x), s, f"{base}.0.1"))
                x = _bn(self.conv(f"{base}.1", x), s, f"{base}.2")
            depthwise = self.convs[f"{base}.1.0" if expanding else f"{base}.0.0"]
            if depthwise.stride == 1 and inp.shape[1] == x.shape[1]:  # use_res_connect
                x = x + inp
            index += 1
        x = relu6(_bn(self.conv(f"features.{index}.0", x), s, f"features.{index}.1")).mean(dim=(2, 3))
        if "classifier.1" in self.convs:
            return self.conv("classifier.1", x)
        weight = s.get("classifier.weight", s.get("classifier.1.weight"))
        bias = s.get("classifier.bias", s.get("classifier.1.bias"))
        return F.linear(x, weight, bias)
