#!/usr/bin/env bash
# NEVER RUN YET (prepared on a CPU-only session, 2026-12-05): the timed figures of issue 26,
# item 3, on one accelerator. Each row of scripts/bench.py times the compiled MAML
# meta-step and prints GB/step, F/B and the bounding roof beside steps/s, so the rows say
# whether fewer bytes per step (docs/performance.md, "Fewer bytes per meta-step") buy
# speed there. Rows are appended to $OUT/bench_accelerator.jsonl (or
# outputs/bench/bench_accelerator.jsonl without $OUT); the log goes beside them.
#
#   bash scripts/accelerator_figures.sh          # about 5-8 minutes on one H100/H200 (estimate)
#
# Before: the defaults (im2col, reduce-window pool, float32). After: lax.conv, the reshape
# pool, bfloat16, and the combinations that separate their effects.
set -euo pipefail
out_dir="${OUT:-outputs/bench}"
mkdir -p "$out_dir"
out="$out_dir/bench_accelerator.jsonl"
log="$out_dir/bench_accelerator.log"
bench=(python scripts/bench.py --algos maml --min-steps 20 --min-seconds 3 --out "$out")
{
  nvidia-smi --query-gpu=name,memory.total --format=csv || true
  # Omniglot 5w1s (stride-2 Conv4, no max-pool): the conv and the dtype.
  "${bench[@]}" --workloads omniglot_5w1s --inner-steps 1,5 --conv-impl im2col,xla --dtype float32,bfloat16
  # mini-ImageNet 5w1s, 5 inner steps: conv x pool x dtype.
  "${bench[@]}" --workloads miniimagenet_5w1s --inner-steps 5 --conv-impl im2col,xla \
    --pool-impl reduce_window,reshape --dtype float32,bfloat16
} 2>&1 | tee "$log"
