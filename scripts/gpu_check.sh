#!/usr/bin/env bash
# The GPU part of the speed-and-memory checks as one short script (docs/benchmarks.md): a few minutes on one GPU.
#   bash scripts/gpu_check.sh [out_dir]       # from the repository root, with the project installed
# The steps run in the order of what the GPU targets need most, so that a run cut short by a time limit
# still leaves the first ones' tables (each written as soon as its step ends):
# 1. the CUDA tests (skipped on a machine without a GPU);
# 2. timm's anchor for CondConv (suite timm_condconv): timm's own efficientnet_cc_b0_4e and dynconv's CondConv(4x) on
#    EfficientNet-B0, both against efficientnet_b0 in one run; in float32 and in fp16 autocast (bench.amp=fp16: timm's
#    published benchmark files, the 0.65x of the issue, are AMP runs);
# 3. KernelWarehouse Table 12 (FPS at batch 100) and Table 16 (memory) on the GPU, ResNet50 rows;
# 4. ResNet18 at batch 64: every operator against static, training and inference (the suite, on the GPU);
# 4b. the Triton mixture kernel: forced (conv_algorithm=triton) against the measured choice of step 4;
# 4c. kernel_memory: auto (recompute on the GPU) against keep, ResNet18 batch 64, time and memory;
# 4d. ResNet18 at batch 64 in fp16 autocast.
# Each step writes its Markdown + JSON under out_dir (default benchmarks/gpu); a failed step does not stop the others,
# and the script's exit status is the number of failed steps.
set -u
out="${1:-benchmarks/gpu}"
mkdir -p "$out"
failed=0
step() { echo "== $*" >&2; "$@" || failed=$((failed + 1)); }
step python -m pytest -q -n 0 -m cuda
step python scripts/bench.py bench.suite=timm_condconv bench.device=cuda bench.batch=64 bench.warmup=3 bench.out="$out/timm_condconv"
step python scripts/bench.py bench.suite=timm_condconv bench.device=cuda bench.batch=64 bench.warmup=3 bench.amp=fp16 bench.out="$out/timm_condconv_fp16"
step python scripts/bench.py bench.suite=kw_t12 bench.device=cuda bench.rows='[r50_*]' bench.warmup=3 bench.out="$out/kw_t12"
step python scripts/bench.py bench.suite=kw_t16 bench.device=cuda bench.rows='[r50_*]' bench.out="$out/kw_t16"
step python scripts/bench.py bench.suite=resnet18 bench.device=cuda bench.batch=64 bench.warmup=3 bench.out="$out/resnet18_b64"
# The Triton mixture kernel forced wherever it applies (every mixture layer; the rest as the cost model), against
# the measured choice of the suite run above (which times it as one candidate).
step python scripts/bench.py bench.suite=resnet18 bench.device=cuda bench.batch=64 bench.warmup=3 conv_algorithm=triton bench.out="$out/resnet18_b64_triton"
# kernel_memory on the GPU: the default (auto = recompute there) against keep, time and memory, ResNet18 batch 64.
step python scripts/bench.py bench.suite=resnet18 bench.device=cuda bench.batch=64 bench.warmup=3 kernel_memory=keep bench.out="$out/resnet18_b64_keep"
step python scripts/bench.py bench.suite=resnet18 bench.device=cuda bench.batch=64 bench.mode=memory bench.out="$out/resnet18_b64_memory"
step python scripts/bench.py bench.suite=resnet18 bench.device=cuda bench.batch=64 bench.mode=memory kernel_memory=keep bench.out="$out/resnet18_b64_memory_keep"
step python scripts/bench.py bench.suite=resnet18 bench.device=cuda bench.batch=64 bench.warmup=3 bench.amp=fp16 bench.out="$out/resnet18_b64_fp16"
exit "$failed"
