"""Operator speed: a dynamic operator against the same backbone with op=static, measured in one run.

    python scripts/bench.py backbone=resnet18 op=condconv op.experts=8 bench.batch=16 bench.resolution=224
    python scripts/bench.py ... bench.device=cuda        # on a GPU
    python scripts/bench.py ... bench.layers=true        # also every converted layer alone
    python scripts/bench.py backbone=dynet_mobile op=dynet bench.mode=latency bench.baseline=mobilenetv2_100

Both models are built once (same backbone unless `bench.baseline` names another, same attn), fed the same input tensor,
and timed interleaved (dynamic, static, dynamic, static, ...) after a warmup; every reported time is the
median over `bench.repeats` repeats of the mean over `bench.steps` iterations. Measured:

- train step: forward + cross-entropy + backward + SGD(momentum 0.9) step, train mode, batch `bench.batch`;
- inference: eval mode, no_grad, batch `bench.batch` and batch 1 (the issue's target: batch-1 <= 1.2x).
  An operator whose work is training-only (Weight Excitation's weight parametrizations) is timed folded, as
  `dynconv.profiling.fold_for_inference` returns it; the JSON's `inference_folded` says so.

`bench.mode=latency` times batch-1 eval inference only (the `batch1_*` keys; the others are null), and
`bench.baseline=<backbone>` compares against that backbone with op=static instead of the model's own backbone:
DyNet's Table 2 times Dy-mobile against MobileNetV2(1.0), Dy-ResNet18/50 against ResNet18/50.

Dynamic layers pick their per-sample convolution algorithm per layer shape (`dynconv.functional.selector`):
by default the first call of each shape times the candidates, which the warmup absorbs (with bench.warmup=0
the first repeat pays it). DYNCONV_CONV_ALGORITHM=model (the fixed cost model) or an algorithm name forces a
choice instead, e.g. to time one algorithm against another.

Prints a table, then, as the last stdout line, one JSON object: `train_step_ratio`, `inference_ratio`,
`batch1_inference_ratio` (dynamic ms / static ms of the medians), the milliseconds behind them, peak memory,
the settings, and `conv_algorithm_policy` / `conv_algorithms` (per layer shape: the algorithm chosen and each
candidate's measured ms). Peak memory is CUDA-only (`max_memory_allocated`, the other model's resident tensors
subtracted); on CPU it is null: process RSS mixes both models, the allocator's caches and everything
imported, so it would not say what the operator costs.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

TRAIN_STEP = "forward + cross-entropy + backward + SGD(momentum=0.9) step"


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def config(argv: list[str]):
    """The composed, validated config of these command-line arguments (exit 2 on a bad one); nothing runs.
    tests/test_docs_commands.py composes every documented command of this script through it."""
    return compose_or_exit("bench", argv, validate="model")


def main(argv: list[str]) -> int:
    cfg = config(argv)
    bench = cfg.bench
    from dynconv import benchmark as bm
    from dynconv.config import ConfigError

    try:
        bm.validate_bench_config(bench)
    except ConfigError as error:
        _fail(str(error))
    from dynconv.build import build_backbone

    use_cuda = bench.device == "cuda" or (bench.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    op_cfg = OmegaConf.to_container(cfg.op, resolve=True)

    def build(op, backbone_cfg=cfg.backbone):
        torch.manual_seed(0)
        built = build_backbone(backbone_cfg, op, cfg.attn, num_classes=bench.num_classes,
                               image_size=bench.resolution)
        built.backbone.to(device)
        return built

    mode = bench.get("mode", "full")
    baseline = bench.get("baseline") or cfg.backbone.name
    baseline_cfg = {**OmegaConf.to_container(cfg.backbone, resolve=True), "name": baseline}
    dynamic, static = build(op_cfg), build({"name": "static"}, baseline_cfg)
    layer_decisions = select_layers(dynamic, bench) if bench.layers or bench.layer is not None else None
    torch.manual_seed(0)
    inputs = torch.randn(bench.batch, 3, bench.resolution, bench.resolution, device=device)
    targets = torch.randint(0, bench.num_classes, (bench.batch,), device=device)
    single = inputs[:1].clone()

    optimizers = {"dynamic": bm.make_optimizer(dynamic.backbone), "static": bm.make_optimizer(static.backbone)}
    models = {"dynamic": dynamic.backbone, "static": static.backbone}
    # Inference is timed on what deployment runs: training-only reparameterisations (op=lwe/mwe/we) folded.
    folded, inference_folded = bm.inference_model(dynamic.backbone)
    inference_models = {"dynamic": folded, "static": static.backbone}
    candidates = {
        name: {
            "train": bm.training_step(model, inputs, targets, optimizers[name]),
            "inference": bm.inference_step(inference_models[name], inputs),
            "batch1": bm.inference_step(inference_models[name], single),
        }
        for name, model in models.items()
    }
    candidates = {name: {m: step for m, step in steps.items() if m in bm.BENCH_MODES[mode]}
                  for name, steps in candidates.items()}
    memory = None
    if use_cuda:
        memory = bm.CudaPeakMemory(device, {name: (lambda n=name: bm.resident_bytes(models[n], optimizers[n]))
                                            for name in models})

    where = torch.cuda.get_device_name(device) if use_cuda else f"cpu, {torch.get_num_threads()} threads"
    print(dynamic.summary())
    against = "" if baseline == cfg.backbone.name else f" (static: {baseline})"
    print(f"{cfg.backbone.name}{against} at {bench.resolution}px, batch {bench.batch}, {where}"
          f"{'' if mode == 'full' else f', mode {mode}'}: "
          f"{bench.warmup} warmup + {bench.repeats} repeats x {bench.steps} steps, interleaved", flush=True)

    def progress(repeat, results):
        parts = [f"{m} {results['dynamic'][m].samples[-1]:.1f}/{results['static'][m].samples[-1]:.1f} ms"
                 for m in results["dynamic"]]
        print(f"repeat {repeat + 1}/{bench.repeats} (dynamic/static): " + ", ".join(parts), flush=True)

    results = bm.interleaved(candidates, device=device, repeats=bench.repeats, warmup=bench.warmup,
                             steps=bench.steps, on_repeat=progress, around=memory)
    ms = {name: {m: round(t.ms, 3) for m, t in timed.items()} for name, timed in results.items()}
    for timed in ms.values():  # measurements the mode skips are reported as null
        timed.update({m: None for m in bm.BENCH_MODES["full"] if m not in timed})

    def ratio(measurement: str) -> float | None:
        if ms["dynamic"][measurement] is None:
            return None
        return round(ms["dynamic"][measurement] / ms["static"][measurement], 4)

    rows = [("train step", "train", bench.batch), ("inference", "inference", bench.batch),
            ("inference", "batch1", 1)]
    print(f"\n{'':24s} {'static ms':>12s} {'dynamic ms':>12s} {'ratio':>8s}")
    for label, key, batch in [row for row in rows if row[1] in bm.BENCH_MODES[mode]]:
        print(f"{label + f' (batch {batch})':24s} {ms['static'][key]:12.2f} {ms['dynamic'][key]:12.2f} "
              f"{ratio(key):7.3f}x")

    peak = {name: None for name in models}
    if memory is not None:
        peak = {name: round(value / 2**20, 1) for name, value in memory.peak_bytes.items()}
        print(f"peak memory: static {peak['static']} MB, dynamic {peak['dynamic']} MB")

    layer_rows = None
    if layer_decisions is not None:
        layer_rows = bench_layers(dynamic, static, layer_decisions, bench, device)

    result = {
        "train_step_ratio": ratio("train"),
        "inference_ratio": ratio("inference"),
        "batch1_inference_ratio": ratio("batch1"),
        "train_step_ms": ms["dynamic"]["train"],
        "static_train_step_ms": ms["static"]["train"],
        "inference_ms": ms["dynamic"]["inference"],
        "static_inference_ms": ms["static"]["inference"],
        "batch1_inference_ms": ms["dynamic"]["batch1"],
        "static_batch1_inference_ms": ms["static"]["batch1"],
        "peak_memory_mb": peak["dynamic"],
        "static_peak_memory_mb": peak["static"],
        "batch": bench.batch,
        "inference_batch": bench.batch,
        "resolution": bench.resolution,
        "device": device.type,
        "device_name": where,
        "backbone": cfg.backbone.name,
        "op": dynamic.operator.describe(),
        "attn": cfg.attn.name,
        "converted_layers": sum(d.converted for d in dynamic.decisions),
        "inference_folded": inference_folded,
        "mode": mode,
        "baseline": baseline,
        "repeats": bench.repeats,
        "warmup": bench.warmup,
        "steps": bench.steps,
        # Noise indicator: the ratio within each repeat (the two runs seconds apart). A wide spread means
        # the machine was busy; the medians above are then less trustworthy than they look.
        "per_repeat_ratios": {
            key: [round(d / s, 4) for d, s in zip(results["dynamic"][m].samples, results["static"][m].samples)]
            for key, m in (("train_step", "train"), ("inference", "inference"), ("batch1_inference", "batch1"))
            if m in bm.BENCH_MODES[mode]
        },
        "train_step": TRAIN_STEP,
        "notes": None if use_cuda else "peak memory is measured on CUDA only (null on CPU)",
    }
    if layer_rows is not None:
        result["layers"] = layer_rows
    # What the per-sample convolution cache picked for each layer shape (and each candidate's measured ms):
    # explains a ratio, and shows whether a forced DYNCONV_CONV_ALGORITHM was in effect.
    from dynconv.functional import selector

    result["conv_algorithm_policy"] = selector.get_policy()
    result["conv_algorithms"] = selector.choices()
    print(json.dumps(result))
    return 0


def select_layers(dynamic, bench) -> list:
    """The converted layers per-layer mode times (all, or those matching bench.layer); exit 2 on no match,
    before minutes of whole-model timing are spent."""
    decisions = [d for d in dynamic.decisions if d.converted]
    if bench.layer is not None:
        decisions = [d for d in decisions if fnmatch.fnmatchcase(d.layer.name, bench.layer)]
        if not decisions:
            names = ", ".join(d.layer.name for d in dynamic.decisions if d.converted)
            _fail(f"bench.layer={bench.layer!r} matches no converted layer; allowed values: patterns over {names}")
    return decisions


def bench_layers(dynamic, static, decisions, bench, device) -> list[dict]:
    """Every converted layer alone (forward+backward and inference) against the static layer at that place.

    Input shapes come from forward hooks during one forward pass of the dynamic model at the bench batch and
    resolution. Layers with the same static shape, input shape and dynamic configuration share one timing.
    """
    from dynconv import benchmark as bm

    net_dynamic, net_static = dynamic.backbone.net, static.backbone.net
    torch.manual_seed(0)
    probe = torch.randn(bench.batch, 3, bench.resolution, bench.resolution, device=device)
    shapes = bm.capture_input_shapes(net_dynamic, [d.layer.name for d in decisions], probe)

    cache: dict[tuple, dict] = {}
    rows = []
    print(f"\n{'layer':28s} {'shape':38s} {'input':20s} {'train':>8s} {'infer':>8s}")
    for decision in decisions:
        name = decision.layer.name
        layer_dynamic, layer_static = net_dynamic.get_submodule(name), net_static.get_submodule(name)
        key = (decision.layer.shape_str(), shapes[name], type(layer_dynamic).__name__, layer_dynamic.extra_repr())
        if key not in cache:
            results = bm.interleaved(
                {"dynamic": bm.layer_steps(layer_dynamic, shapes[name], device),
                 "static": bm.layer_steps(layer_static, shapes[name], device)},
                device=device, repeats=bench.repeats, warmup=bench.warmup, steps=bench.steps)
            cache[key] = {f"{who}_{m}_ms": round(t.ms, 4) for who, timed in results.items() for m, t in timed.items()}
        timing = cache[key]
        row = {
            "name": name,
            "shape": decision.layer.shape_str(),
            "input": list(shapes[name]),
            "ratio_train": round(timing["dynamic_train_ms"] / timing["static_train_ms"], 4),
            "ratio_inference": round(timing["dynamic_inference_ms"] / timing["static_inference_ms"], 4),
            **timing,
        }
        rows.append(row)
        print(f"{name:28s} {row['shape']:38s} {'x'.join(map(str, row['input'])):20s} "
              f"{row['ratio_train']:7.3f}x {row['ratio_inference']:7.3f}x", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
