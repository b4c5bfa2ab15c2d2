#!/usr/bin/env python3
"""GPU time per kernel of one char-LM training step, from the CSV of
`ncu --metrics gpu__time_duration.sum --csv train_char_lm train ... --max-steps 2` (EXPERIMENTS.md,
"Step 4"). The second step is taken (from the kernel after the first step's AdamW launches to the
end of the second's) and split into forward (up to the cross-entropy and the loss mean), backward
and optimizer (from the first sum-of-squares kernel, `sumsq_partial`); kernels are summed by name per phase.
Usage: scripts/ncu-step.py NCU.csv"""
import collections
import csv
import sys

rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10 and r[0] != "ID"]
head = next(r for r in csv.reader(open(sys.argv[1])) if r and r[0] == "ID")
name_col, value_col = head.index("Kernel Name"), head.index("Metric Value")
kernels = [(r[name_col], float(r[value_col].replace(",", "")) / 1e3) for r in rows]  # µs
adam = [i for i, (n, _) in enumerate(kernels) if n.startswith("adamw")]
ends = [i for i in adam if i + 1 not in adam]
if len(ends) < 2:
    sys.exit("ncu-step: need two training steps (two groups of AdamW launches)")
step = kernels[ends[0] + 1 : ends[1] + 1]
loss = next(i for i, (n, _) in enumerate(step) if n.startswith("xent")) + 3
opt = next(i for i, (n, _) in enumerate(step) if n.startswith("sumsq"))
for label, part in [("forward", step[:loss]), ("backward", step[loss:opt]), ("optimizer", step[opt:])]:
    sums = collections.defaultdict(lambda: [0, 0.0])
    for n, us in part:
        sums[n[:70]][0] += 1
        sums[n[:70]][1] += us
    print(f"== {label}: {len(part)} kernels, {sum(us for _, us in part) / 1e3:.2f} ms")
    for n, (count, us) in sorted(sums.items(), key=lambda kv: -kv[1][1]):
        print(f"  {n:70s} x{count:4d} {us / 1e3:8.3f} ms")
