"""How much `mmtl_lib.keep_freed_memory` speeds up CPU meta-training, in one process.

The workload is the `cpu` preset's meta-iteration on real Omniglot tasks (or any preset with
``--preset``). Rounds of ``--iters`` meta-iterations are timed first with glibc's default
allocator settings (the baseline), then again after ``keep_freed_memory()``; the same learner
keeps training throughout, so both phases run the same code on the same kind of batches. The
baseline must come first because the setting cannot be undone in a running process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/allocator.py            # about 1.5 minutes
"""

from __future__ import annotations

import statistics
import time

import common
import torch

import mmtl_lib as ml
from mmtl_lib.config import PRESETS


def rounds(trainer, iters: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` rounds of ``iters`` meta-iterations."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            trainer.step()
        out.append(time.perf_counter() - start)
    return out


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="the workload (default: cpu)")
    p.add_argument("--iters", type=int, default=50, help="meta-iterations per timed round (default: 50)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per phase; the median counts (default: 3)")
    p.add_argument("--warmup", type=int, default=10, help="untimed meta-iterations before each phase (default: 10)")
    args = p.parse_args(argv)
    common.check_arguments(p, args, positive=("iters", "repeats", "warmup"))
    ml.set_threads()
    config = ml.preset(args.preset)
    device = torch.device("cpu")
    samplers = ml.samplers(config, device)
    learner = ml.build_learner(config, device, n_classes=getattr(samplers["train"], "n_classes", None))
    trainer = ml.build_trainer(config, learner, samplers, validate=False)
    print(ml.machine())
    print(f"preset {args.preset}: {config.describe()}, meta-batch {config.meta_batch_size}")

    phases = {}
    for phase in ("glibc defaults", "keep_freed_memory"):
        if phase == "keep_freed_memory" and not ml.keep_freed_memory():
            print("keep_freed_memory() does not apply here (needs Linux with glibc): nothing to compare")
            return {}
        rounds(trainer, args.warmup, 1)
        seconds = statistics.median(rounds(trainer, args.iters, args.repeats))
        phases[phase] = args.iters * config.meta_batch_size / seconds
        print(f"{phase:>18}: {phases[phase]:6.1f} tasks/s (median of {args.repeats} rounds of {args.iters})")
    ratio = phases["keep_freed_memory"] / phases["glibc defaults"]
    print(f"ratio: {ratio:.2f}x")
    return {"tasks_per_s": phases, "ratio": ratio}


if __name__ == "__main__":
    main()
