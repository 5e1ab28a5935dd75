"""Operator speed: a dynamic operator against the same backbone with op=static, measured in one run.

    python scripts/bench.py backbone=resnet18 op=condconv op.experts=8 bench.batch=16 bench.resolution=224
    python scripts/bench.py ... bench.device=cuda        # on a GPU
    python scripts/bench.py ... bench.layers=true        # also every converted layer alone
    python scripts/bench.py backbone=dynet_mobile op=dynet bench.mode=latency bench.baseline=mobilenetv2_100
    python scripts/bench.py backbone=resnet18 op=kw op.b=1 op.tau=0 bench.mode=memory   # peak memory
    python scripts/bench.py bench.suite=resnet18                  # a whole table (configs/bench_suites/)

Both models are built once (same backbone unless `bench.baseline` names another, same attn), fed the same input tensor,
and timed interleaved (dynamic, static, dynamic, static, ...) after a warmup; every reported time is the
median over `bench.repeats` repeats of the mean over `bench.steps` iterations. Measured:

- train step: forward + cross-entropy + backward + fused SGD(momentum 0.9) step, train mode, batch `bench.batch`;
- inference: eval mode, no_grad, batch `bench.inference_batch` (null: `bench.batch`) and batch 1 (the issue's
  target: batch-1 <= 1.2x).
  An operator whose work is training-only (Weight Excitation's weight parametrizations) is timed folded, as
  `dynconv.profiling.fold_for_inference` returns it; the JSON's `inference_folded` says so.

`bench.mode=latency` times batch-1 eval inference only (the `batch1_*` keys; the others are null),
`bench.mode=inference` eval inference at `bench.inference_batch` only (throughput: KernelWarehouse's Table 12 FPS
at batch 100), and `bench.baseline=<backbone>` compares against that backbone with op=static instead of the
model's own backbone: DyNet's Table 2 times Dy-mobile against MobileNetV2(1.0), Dy-ResNet18/50 against ResNet18/50.
Every time also comes as throughput, images per second at the batch it was taken at (`*_fps`).

`bench.mode=memory` times nothing: it measures the peak memory of a training step (at `bench.batch`) and of
inference (at `bench.inference_batch`), of the model and of the static model, each in a fresh child process
(dynconv/peak_memory.py says why and what exactly: RSS growth on the CPU, max_memory_allocated on CUDA).

`bench.suite=<name>` runs a whole table instead of one model: every row of configs/bench_suites/<name>.yaml
against its static model (dynconv/bench_suites.py), prints a Markdown table and writes it with a JSON beside it
(`bench.out`, default benchmarks/<name>); `bench.rows=[...]` runs some rows only. Settings given on the command
line (`bench.batch=2 bench.resolution=32`) apply to every row; model overrides are refused (the suite names them).

Dynamic layers pick their per-sample convolution algorithm per layer shape (`dynconv.functional.selector`):
by default the first call of each shape times the candidates, which the warmup absorbs (with bench.warmup=0
the first repeat pays it). DYNCONV_CONV_ALGORITHM=model (the fixed cost model) or an algorithm name forces a
choice instead, e.g. to time one algorithm against another.

Prints a table, then, as the last stdout line, one JSON object: `train_step_ratio`, `inference_ratio`,
`batch1_inference_ratio` (dynamic ms / static ms of the medians), the milliseconds behind them, peak memory,
the settings, and `conv_algorithm_policy` / `conv_algorithms` (per layer shape: the algorithm chosen and each
candidate's measured ms). `peak_memory_mb` is CUDA-only (`max_memory_allocated` around the timed runs, the other
model's resident tensors subtracted); on CPU it is null: process RSS mixes both models, the allocator's caches
and everything imported, so it would not say what the operator costs. `bench.mode=memory` measures it properly
(`train_peak_mb`, `inference_peak_mb`). A suite's last line is one JSON object too, a row per suite row with the
same keys (docs/benchmarks.md lists them).
"""

from __future__ import annotations

import fnmatch
import gc
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

TRAIN_STEP = "forward + cross-entropy + backward + fused SGD(momentum=0.9) step"
# Every timing and memory key of a result (the pair's JSON and each suite row): null where the mode skips it.
TIMING_KEYS = ("train_step_ratio", "inference_ratio", "batch1_inference_ratio", "train_step_ms",
               "static_train_step_ms", "inference_ms", "static_inference_ms", "batch1_inference_ms",
               "static_batch1_inference_ms", "peak_memory_mb", "static_peak_memory_mb")
FPS_KEYS = ("train_fps", "static_train_fps", "inference_fps", "static_inference_fps", "batch1_fps", "static_batch1_fps")
MEMORY_KEYS = ("train_peak_mb", "static_train_peak_mb", "train_peak_ratio", "inference_peak_mb",
               "static_inference_peak_mb", "inference_peak_ratio", "model_mb", "static_model_mb", "memory_measure",
               "memory_peak_reset")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _compose(argv: list[str]):
    return compose_or_exit("bench", argv, validate="model")


# Settings of how every row runs, not of a model: a suite takes them from the command line.
RUN_POLICIES = ("conv_algorithm", "kernel_memory")


def _plan(cfg, argv: list[str]):
    """A suite's plan (every row composed, settings merged); exit 2 on a bad suite, row, setting or override."""
    from dynconv.bench_suites import cli_setting_keys, load_suite, plan_suite
    from dynconv.config import ConfigError
    from dynconv.reproduction.tables import override_key

    suite = cfg.bench.suite
    models = [arg for arg in argv if "=" in arg and not override_key(arg).startswith("bench.")
              and override_key(arg) not in RUN_POLICIES]
    if models:
        _fail(f"bench.suite={suite!r} takes every model from configs/bench_suites/{suite}.yaml: remove "
              f"{' '.join(models)}; allowed values with a suite: bench.* overrides (batch, resolution, rows, ...) and "
              f"{', '.join(RUN_POLICIES)}")
    rows = cfg.bench.get("rows")
    try:
        return plan_suite(load_suite(suite), cfg.bench, cli_setting_keys(argv),
                          None if rows is None else list(rows))
    except ConfigError as error:
        _fail(str(error))


def config(argv: list[str]):
    """The composed, validated config of these command-line arguments (exit 2 on a bad one); nothing runs.
    tests/test_docs_commands.py composes every documented command of this script through it: a suite's rows are
    composed too, and the bench keys checked (all but whether a CUDA device is there)."""
    from dynconv import benchmark as bm
    from dynconv.config import ConfigError

    cfg = _compose(argv)
    try:
        bm.validate_bench_config(cfg.bench, check_device=False)
    except ConfigError as error:
        _fail(str(error))
    if cfg.bench.get("suite") is not None:
        _plan(cfg, argv)
    return cfg


def main(argv: list[str]) -> int:
    cfg = _compose(argv)
    bench = cfg.bench
    from dynconv import benchmark as bm
    from dynconv.config import ConfigError

    try:
        bm.validate_bench_config(bench)
        bm.validate_policies(cfg)
    except ConfigError as error:
        _fail(str(error))
    from dynconv.functional import recompute, selector

    from dynconv.engine.training_run import conv_algorithm_policy, kernel_memory_policy

    # The training config's policies, as train.py applies them (by default their environment variables), restored
    # when the benchmark ends.
    with selector.policy(conv_algorithm_policy(cfg)), recompute.kernel_memory(kernel_memory_policy(cfg)):
        return _run(cfg, argv)


def _run(cfg, argv: list[str]) -> int:
    from dynconv.functional import selector

    bench = cfg.bench
    # A benchmark times every model with its best algorithms: no measuring budget. A training run's cap holds per
    # process, and a suite builds several models in one: its later rows were left on the cost model.
    selector.MEASURE_BUDGET_S = float("inf")
    from dynconv import allocator

    allocator.apply()  # the same allocator settings as train.py (DYNCONV_MALLOC)
    use_cuda = bench.device == "cuda" or (bench.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    where = torch.cuda.get_device_name(device) if use_cuda else f"cpu, {torch.get_num_threads()} threads"
    if bench.get("suite") is not None:
        return run_suite(cfg, _plan(cfg, argv), argv, device, where)
    return run_pair(cfg, device, where)


# ----------------------------------------------------------------------------------------------- measuring


def build(parts, device, num_classes: int, resolution: int):
    """One model of a comparison, built from its (backbone, op, attn) sections, on `device`."""
    from dynconv.build import build_backbone

    backbone, op, attn = parts
    torch.manual_seed(0)
    built = build_backbone(backbone, op, attn, num_classes=num_classes, image_size=resolution)
    built.backbone.to(device)
    return built


def time_models(dynamic, static, optimizers, settings, device, num_classes: int, on_repeat=None, amp=None):
    """Time `dynamic` against `static` (built models) interleaved, as settings.mode asks, both in autocast under
    `amp` (bench.amp).

    Returns (results: candidate -> measurement -> Timed, inference_folded, CUDA peak MB per candidate or None).
    `optimizers` holds each candidate's SGD (a suite's static model keeps its own across rows)."""
    from dynconv import benchmark as bm

    side = settings.resolution
    torch.manual_seed(0)
    inputs = torch.randn(settings.batch, 3, side, side, device=device)
    targets = torch.randint(0, num_classes, (settings.batch,), device=device)
    single = inputs[:1].clone()
    batch_inputs = inputs if settings.inference_batch == settings.batch else \
        torch.randn(settings.inference_batch, 3, side, side, device=device)

    models = {"dynamic": dynamic.backbone, "static": static.backbone}
    # Inference is timed on what deployment runs: training-only reparameterisations (op=lwe/mwe/we) folded.
    folded, inference_folded = bm.inference_model(dynamic.backbone)
    inference_models = {"dynamic": folded, "static": static.backbone}
    wanted = bm.BENCH_MODES[settings.mode]
    candidates = {}
    for name, model in models.items():
        steps = {"train": lambda m=model, n=name: bm.training_step(m, inputs, targets, optimizers[n], amp),
                 "inference": lambda n=name: bm.inference_step(inference_models[n], batch_inputs, amp),
                 "batch1": lambda n=name: bm.inference_step(inference_models[n], single, amp)}
        candidates[name] = {m: make() for m, make in steps.items() if m in wanted}
    memory = None
    if device.type == "cuda":
        memory = bm.CudaPeakMemory(device, {name: (lambda n=name: bm.resident_bytes(models[n], optimizers[n]))
                                            for name in models})
    results = bm.interleaved(candidates, device=device, repeats=settings.repeats, warmup=settings.warmup,
                             steps=settings.steps, on_repeat=on_repeat, around=memory)
    peak = None
    if memory is not None:
        peak = {name: round(value / 2**20, 1) for name, value in memory.peak_bytes.items()}
    return results, inference_folded, peak


def timing_keys(results, settings, peak) -> dict:
    """The timing keys of a result (TIMING_KEYS, FPS_KEYS, per_repeat_ratios) from `time_models`' output."""
    from dynconv import benchmark as bm

    ms = {name: {m: round(t.ms, 3) for m, t in timed.items()} for name, timed in results.items()}
    for timed in ms.values():  # measurements the mode skips are reported as null
        timed.update({m: None for m in bm.BENCH_MODES["full"] if m not in timed})

    def ratio(measurement: str) -> float | None:
        if ms["dynamic"][measurement] is None:
            return None
        return round(ms["dynamic"][measurement] / ms["static"][measurement], 4)

    batches = {"train": settings.batch, "inference": settings.inference_batch, "batch1": 1}
    fps = {}
    for key, measurement in (("train_fps", "train"), ("inference_fps", "inference"), ("batch1_fps", "batch1")):
        fps[key] = bm.images_per_second(batches[measurement], ms["dynamic"][measurement])
        fps[f"static_{key}"] = bm.images_per_second(batches[measurement], ms["static"][measurement])
    peak = peak or {"dynamic": None, "static": None}
    return {
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
        **fps,
        # Noise indicator: the ratio within each repeat (the two runs seconds apart). A wide spread means
        # the machine was busy; the medians above are then less trustworthy than they look.
        "per_repeat_ratios": {
            key: [round(d / s, 4) for d, s in zip(results["dynamic"][m].samples, results["static"][m].samples)]
            for key, m in (("train_step", "train"), ("inference", "inference"), ("batch1_inference", "batch1"))
            if m in bm.BENCH_MODES[settings.mode]
        },
    }


def memory_spec(parts, kind: str, settings, device, num_classes: int, amp=None) -> dict:
    """What a peak-memory child process measures (dynconv/peak_memory.py); `amp`: bench.amp."""
    from dynconv.functional import recompute, selector

    backbone, op, attn = parts
    return {"backbone": backbone, "op": op, "attn": attn, "kind": kind, "num_classes": num_classes,
            "batch": settings.batch if kind == "train" else settings.inference_batch,
            "resolution": settings.resolution, "device": device.type, "warmup": settings.warmup,
            "steps": settings.steps, "policy": selector.get_policy(),
            "kernel_memory": recompute.get_kernel_memory(), "amp": amp}


def measure_memory(spec: dict, label: str) -> dict:
    from dynconv.peak_memory import measure

    print(f"  peak memory: {label}, {spec['kind']} at batch {spec['batch']} (fresh process) ...", end=" ", flush=True)
    result = measure(spec)
    if "error" in result:
        print(f"failed: {result['error']}", flush=True)
    else:
        print(f"{result['peak_bytes'] / 2**20:.1f} MB ({result['seconds']} s)", flush=True)
    return result


def memory_keys(peaks: dict) -> tuple[dict, list[str]]:
    """MEMORY_KEYS from the child results {"dynamic"|"static": {"train"|"inference": result}}; and the errors."""
    errors = [f"{who} {kind}: {r['error']}" for who, kinds in peaks.items() for kind, r in kinds.items() if "error" in r]

    def mb(who: str, kind: str, key: str = "peak_bytes") -> float | None:
        result = peaks[who][kind]
        return None if "error" in result else round(result[key] / 2**20, 1)

    def ratio(kind: str) -> float | None:
        dynamic, static = mb("dynamic", kind), mb("static", kind)
        return None if dynamic is None or not static else round(dynamic / static, 4)

    def model_mb(who: str) -> float | None:  # the trained model's parameters and buffers (inference: folded)
        return next((mb(who, kind, "model_bytes") for kind in ("train", "inference") if "error" not in peaks[who][kind]),
                    None)

    some = next((r for kinds in peaks.values() for r in kinds.values() if "error" not in r), {})
    return {
        "train_peak_mb": mb("dynamic", "train"),
        "static_train_peak_mb": mb("static", "train"),
        "train_peak_ratio": ratio("train"),
        "inference_peak_mb": mb("dynamic", "inference"),
        "static_inference_peak_mb": mb("static", "inference"),
        "inference_peak_ratio": ratio("inference"),
        "model_mb": model_mb("dynamic"),
        "static_model_mb": model_mb("static"),
        "memory_measure": some.get("measure"),
        "memory_peak_reset": some.get("peak_reset"),
    }, errors


MEMORY_NOTES = {
    "cpu_peak_rss_growth": "memory: peak RSS growth (VmHWM - VmRSS) over the warm and measured steps, in a fresh "
                           "process per model and measurement, above the built model and its input",
    "cuda_max_allocated": "memory: torch.cuda.max_memory_allocated over the warm and measured steps, in a fresh "
                          "process per model and measurement (the model's parameters included)",
}


# ----------------------------------------------------------------------------------------------- one model


def run_pair(cfg, device, where) -> int:
    """One model against op=static (the script's behaviour without bench.suite)."""
    from dynconv import benchmark as bm
    from dynconv.bench_suites import Settings

    bench = cfg.bench
    settings = Settings.of(bench)
    mode = settings.mode
    parts = tuple(OmegaConf.to_container(cfg[s], resolve=True) for s in ("backbone", "op", "attn"))
    baseline = bench.get("baseline") or cfg.backbone.name
    static_parts = ({**parts[0], "name": baseline}, {"name": "static"}, parts[2])
    if mode == "memory":
        return run_pair_memory(cfg, parts, static_parts, settings, device, where, baseline)

    dynamic = build(parts, device, bench.num_classes, bench.resolution)
    static = build(static_parts, device, bench.num_classes, bench.resolution)
    layer_decisions = select_layers(dynamic, bench) if bench.layers or bench.layer is not None else None
    optimizers = {"dynamic": bm.make_optimizer(dynamic.backbone), "static": bm.make_optimizer(static.backbone)}

    print(dynamic.summary())
    against = "" if baseline == cfg.backbone.name else f" (static: {baseline})"
    inference_batch = "" if settings.inference_batch == settings.batch else f" (inference {settings.inference_batch})"
    print(f"{cfg.backbone.name}{against} at {bench.resolution}px, batch {bench.batch}{inference_batch}, {where}"
          f"{_amp_text(bench)}{'' if mode == 'full' else f', mode {mode}'}: "
          f"{bench.warmup} warmup + {bench.repeats} repeats x {bench.steps} steps, interleaved", flush=True)

    def progress(repeat, results):
        parts = [f"{m} {results['dynamic'][m].samples[-1]:.1f}/{results['static'][m].samples[-1]:.1f} ms"
                 for m in results["dynamic"]]
        print(f"repeat {repeat + 1}/{bench.repeats} (dynamic/static): " + ", ".join(parts), flush=True)

    results, inference_folded, peak = time_models(dynamic, static, optimizers, settings, device, bench.num_classes,
                                                  on_repeat=progress, amp=bench.amp)
    timing = timing_keys(results, settings, peak)
    labels = {"train": ("train step", "train_step", settings.batch),
              "inference": ("inference", "inference", settings.inference_batch),
              "batch1": ("inference", "batch1_inference", 1)}
    print(f"\n{'':24s} {'static ms':>12s} {'dynamic ms':>12s} {'ratio':>8s}")
    for measurement in bm.BENCH_MODES[mode]:
        label, key, batch = labels[measurement]
        print(f"{label + f' (batch {batch})':24s} {timing['static_' + key + '_ms']:12.2f} "
              f"{timing[key + '_ms']:12.2f} {timing[key + '_ratio']:7.3f}x")
    if peak is not None:
        print(f"peak memory: static {peak['static']} MB, dynamic {peak['dynamic']} MB")

    layer_rows = None
    if layer_decisions is not None:
        layer_rows = bench_layers(dynamic, static, layer_decisions, bench, device)

    per_repeat = timing.pop("per_repeat_ratios")
    fps = {key: timing.pop(key) for key in FPS_KEYS}
    result = {
        **timing,
        "batch": bench.batch,
        "inference_batch": settings.inference_batch,
        "resolution": bench.resolution,
        "device": device.type,
        "device_name": where,
        "amp": bench.amp,
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
        "per_repeat_ratios": per_repeat,
        "train_step": TRAIN_STEP,
        "notes": None if device.type == "cuda" else "peak memory is measured on CUDA only (null on CPU)",
        **fps,
        **{key: None for key in MEMORY_KEYS},
    }
    if layer_rows is not None:
        result["layers"] = layer_rows
    print(json.dumps(_with_algorithms(result)))
    return 0


def run_pair_memory(cfg, parts, static_parts, settings, device, where, baseline) -> int:
    """bench.mode=memory for one model: training and inference peaks of the model and of the static model."""
    bench = cfg.bench
    print(f"{cfg.backbone.name}{'' if baseline == cfg.backbone.name else f' (static: {baseline})'} at "
          f"{settings.resolution}px, train batch {settings.batch}, inference batch {settings.inference_batch}, "
          f"{where}{_amp_text(bench)}, mode memory: {settings.warmup} warmup + {settings.steps} steps per measurement",
          flush=True)
    peaks = {who: {kind: measure_memory(memory_spec(p, kind, settings, device, bench.num_classes, bench.amp), who)
                   for kind in ("train", "inference")}
             for who, p in (("dynamic", parts), ("static", static_parts))}
    memory, errors = memory_keys(peaks)
    print(f"\n{'':28s} {'static MB':>12s} {'dynamic MB':>12s} {'ratio':>8s}")
    for label, key, batch in (("train step", "train", settings.batch),
                              ("inference", "inference", settings.inference_batch)):
        static, dynamic, ratio = (memory[f"static_{key}_peak_mb"], memory[f"{key}_peak_mb"],
                                  memory[f"{key}_peak_ratio"])
        print(f"{label + f' peak (batch {batch})':28s} {_cell(static, 12, 1)} {_cell(dynamic, 12, 1)} "
              f"{_cell(ratio, 7, 3)}x")
    dynamic_result = next((r for r in peaks["dynamic"].values() if "error" not in r), {})
    from dynconv.build import make_operator

    result = {
        **{key: None for key in TIMING_KEYS},
        "batch": settings.batch,
        "inference_batch": settings.inference_batch,
        "resolution": settings.resolution,
        "device": device.type,
        "device_name": where,
        "amp": bench.amp,
        "backbone": cfg.backbone.name,
        "op": make_operator(parts[1]).describe(),
        "attn": cfg.attn.name,
        "converted_layers": dynamic_result.get("converted_layers"),
        "inference_folded": peaks["dynamic"]["inference"].get("inference_folded"),
        "mode": "memory",
        "baseline": baseline,
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "steps": settings.steps,
        "per_repeat_ratios": {},
        "train_step": TRAIN_STEP,
        "notes": "; ".join([MEMORY_NOTES.get(memory["memory_measure"], "memory: no measurement succeeded"), *errors]),
        **{key: None for key in FPS_KEYS},
        **memory,
    }
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(json.dumps(_with_algorithms(result)))
    return 1 if errors else 0


def _amp_text(bench) -> str:
    return "" if bench.amp == "none" else f", autocast {bench.amp}"


def _cell(value, width: int, decimals: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.{decimals}f}"


def _with_algorithms(result: dict) -> dict:
    # What the per-sample convolution cache picked for each layer shape (and each candidate's measured ms):
    # explains a ratio, and shows whether a forced DYNCONV_CONV_ALGORITHM was in effect.
    from dynconv.functional import selector

    from dynconv.functional import recompute

    result["conv_algorithm_policy"] = selector.get_policy()
    result["kernel_memory"] = recompute.get_kernel_memory()
    result["conv_algorithms"] = selector.choices()
    return result


# ----------------------------------------------------------------------------------------------- a suite


def run_suite(cfg, plan, argv, device, where) -> int:
    """Every planned row against its static model; the Markdown table printed and written with the JSON."""
    from dynconv import bench_report
    from dynconv.bench_suites import cli_setting_keys

    bench = cfg.bench
    suite = plan.suite
    started = time.perf_counter()
    prefix = Path(bench.get("out") or f"benchmarks/{suite.name}")
    statics: dict[tuple, dict] = {}  # (baseline key, resolution) -> its built model and optimizer (timing modes)
    memory_cache: dict[tuple, dict] = {}  # (baseline key, kind, batch, resolution, steps) -> its child's result
    rows = []
    print(f"bench.suite={suite.name}: {suite.title}; {len(plan.rows)} rows, {where}{_amp_text(bench)}", flush=True)
    for index, row in enumerate(plan.rows):
        s = row.settings
        print(f"\n[{index + 1}/{len(plan.rows)}] {row.label} ({row.id}) against {row.baseline.label}: mode {s.mode}, "
              f"batch {s.batch}" + ("" if s.inference_batch == s.batch else f" (inference {s.inference_batch})")
              + f", {s.resolution}px", flush=True)
        row_started = time.perf_counter()
        out: dict = {}
        try:
            if s.mode == "memory":
                out = suite_row_memory(row, device, bench.num_classes, memory_cache, bench.amp)
            else:
                out = suite_row_timing(row, statics, device, bench.num_classes, bench.amp)
        except Exception as error:  # one row failing (out of memory, say) must not lose the others' results
            traceback.print_exc()
            out = {"error": f"{type(error).__name__}: {error}"}
        rows.append(suite_row_result(row, out, round(time.perf_counter() - row_started, 1)))
        later = {(r.baseline.key, r.settings.resolution) for r in plan.rows[index + 1:]}
        for key in [k for k in statics if k not in later]:  # a static model no later row needs is freed
            del statics[key]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what a row that ran out of memory left cached goes back for the next

    measures = {r["memory_measure"] for r in rows if r["memory_measure"]}
    result = {
        "suite": suite.name,
        "title": suite.title,
        "source": suite.source,
        "table": suite.table,
        "device": device.type,
        "device_name": where,
        "amp": bench.amp,
        "threads": torch.get_num_threads(),
        "memory_measure": measures.pop() if len(measures) == 1 else None,
        "command_line": {key: bench.get(key) for key in sorted(cli_setting_keys(argv))},
        "rows": rows,
        "errors": sum(1 for r in rows if r["error"]),
        "seconds": round(time.perf_counter() - started, 1),
        "train_step": TRAIN_STEP,
        "markdown": None,
        "json": None,
    }
    result["markdown"], result["json"] = (str(prefix.with_name(prefix.name + ext)) for ext in (".md", ".json"))
    _with_algorithms(result)
    md_path, json_path = bench_report.write(result, prefix)
    print("\n" + bench_report.markdown(result))
    print(f"wrote {md_path} and {json_path}")
    print(json.dumps(result))
    return 1 if result["errors"] else 0


def suite_row_timing(row, statics: dict, device, num_classes: int, amp=None) -> dict:
    """A timing-mode row: its model built now, the static model of its baseline built once and kept; both in
    autocast under `amp`."""
    from dynconv import benchmark as bm

    s = row.settings
    key = (row.baseline.key, s.resolution)  # a backbone built for another input size may differ (position embeddings)
    if key not in statics:
        static = build(row.baseline.parts(), device, num_classes, s.resolution)
        statics[key] = {"built": static, "optimizer": bm.make_optimizer(static.backbone)}
    static = statics[key]
    dynamic = build(row.model.parts(), device, num_classes, s.resolution)
    optimizers = {"dynamic": bm.make_optimizer(dynamic.backbone), "static": static["optimizer"]}

    def progress(repeat, results):
        parts = [f"{m} {results['dynamic'][m].samples[-1]:.1f}/{results['static'][m].samples[-1]:.1f} ms"
                 for m in results["dynamic"]]
        print(f"  repeat {repeat + 1}/{s.repeats} (model/static): " + ", ".join(parts), flush=True)

    results, folded, peak = time_models(dynamic, static["built"], optimizers, s, device, num_classes, progress, amp)
    return {**timing_keys(results, s, peak), "op": dynamic.operator.describe(), "inference_folded": folded,
            "converted_layers": sum(d.converted for d in dynamic.decisions)}


def suite_row_memory(row, device, num_classes: int, cache: dict, amp=None) -> dict:
    """A memory-mode row: four child processes, the static model's two measured once per batch and resolution."""
    from dynconv.build import make_operator

    s = row.settings
    peaks = {"dynamic": {}, "static": {}}
    for kind in ("train", "inference"):
        peaks["dynamic"][kind] = measure_memory(memory_spec(row.model.parts(), kind, s, device, num_classes, amp),
                                                row.id)
        spec = memory_spec(row.baseline.parts(), kind, s, device, num_classes, amp)
        key = (row.baseline.key, kind, spec["batch"], spec["resolution"], spec["warmup"], spec["steps"])
        if key not in cache:
            cache[key] = measure_memory(spec, row.baseline.id)
        peaks["static"][kind] = cache[key]
    memory, errors = memory_keys(peaks)
    dynamic = next((r for r in peaks["dynamic"].values() if "error" not in r), {})
    return {**memory, "op": make_operator(row.model.parts()[1]).describe(),
            "inference_folded": peaks["dynamic"]["inference"].get("inference_folded"),
            "converted_layers": dynamic.get("converted_layers"), "error": "; ".join(errors) or None}


def suite_row_result(row, out: dict, seconds: float) -> dict:
    """One row of the suite's JSON: always the same keys, null where the row's mode measured nothing."""
    s = row.settings
    cfg = row.model.cfg
    return {
        "id": row.id,
        "label": row.label,
        "overrides": row.model.overrides,
        "baseline": row.baseline.id,
        "baseline_label": row.baseline.label,
        "baseline_overrides": row.baseline.overrides,
        "backbone": cfg.backbone.name,
        "op": out.get("op", cfg.op.name),
        "attn": cfg.attn.name,
        "converted_layers": out.get("converted_layers"),
        "inference_folded": out.get("inference_folded"),
        "mode": s.mode,
        "batch": s.batch,
        "inference_batch": s.inference_batch,
        "resolution": s.resolution,
        "repeats": s.repeats,
        "warmup": s.warmup,
        "steps": s.steps,
        **{key: out.get(key) for key in (*TIMING_KEYS, *FPS_KEYS, *MEMORY_KEYS)},
        "per_repeat_ratios": out.get("per_repeat_ratios", {}),
        "paper": row.paper,
        "paper_static": row.paper_static,
        "paper_ratio": row.paper_ratio(),
        "paper_units": row.paper_units,
        "error": out.get("error"),
        "seconds": seconds,
    }


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
                {"dynamic": bm.layer_steps(layer_dynamic, shapes[name], device, bench.amp),
                 "static": bm.layer_steps(layer_static, shapes[name], device, bench.amp)},
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
