"""How meta-training scales with processes: tasks/s of the `cpu` preset with 1 and 2 processes.

Each run is the command line itself, ``python -m mmtl_lib train`` for one process and
``torchrun --standalone --nproc-per-node N -m mmtl_lib train`` for N, one thread per process
(``MMTL_THREADS=1``, ``OMP_NUM_THREADS=1``), for a fixed number of meta-iterations of the same
seed, so that every run computes the same meta-batches (a meta-batch of 8 tasks is 4 per
process with 2). The rate is tasks per second of training (the checkpoint's ``elapsed``, which
leaves out start-up, validation and the final test), taken after the first logged window (50
iterations) so that one-time warm-up does not count. With ``--repeats`` the process counts take
turns and the median rate counts, so that a slow spell of a shared machine falls on all alike.
Printed: tasks/s per process count, the ratio to one process, and the parallel efficiency
(ratio / processes).

The runs compute the same meta-gradients up to rounding (``tests/test_distributed.py``), but the
`cpu` preset's training amplifies rounding: after 60 iterations, one process started from weights
perturbed by 1e-7 (relative) differs from the unperturbed run by up to ~0.08 in a weight, as much
as two processes differ from one (Adam's normalised steps move even parameters whose
meta-gradient is zero but for rounding, such as the conv biases ahead of BatchNorm). So no
parameters are compared here.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaling.py --repeats 3 --json results/scaling.json  # ~5 min
    .venv/bin/python benchmarks/scaling.py --iterations 60 --set filters=8   # a quick check
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

import mmtl_lib as ml
from mmtl_lib.config import PRESETS

REPO = Path(__file__).resolve().parents[1]


def run(processes: int, args, out: Path) -> dict:
    """One training run of ``processes`` processes into ``out``: its rates and times."""
    train = ["train", "--preset", args.preset, "--iterations", str(args.iterations), "--device", "cpu",
             "--out", str(out), "--overwrite", "--quiet", "--set", f"val_every={args.iterations + 1}",
             "--set", "val_tasks=1", "--set", "test_tasks=1", *(x for pair in args.set for x in ("--set", pair))]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    env = {**os.environ, "MMTL_THREADS": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "mmtl_lib", *train], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{processes} process(es) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    state = ml.load_checkpoint(out / "checkpoint.pt")
    batch = state["config"]["meta_batch_size"]
    first, last = state["history"][0], state["history"][-1]
    steady = (last["iteration"] - first["iteration"]) * batch / max(last["seconds"] - first["seconds"], 1e-9) \
        if last["iteration"] > first["iteration"] else float("nan")
    return {"tasks_per_s": steady, "tasks_per_s_all": state["iteration"] * batch / state["elapsed"],
            "train_seconds": state["elapsed"], "wall_seconds": wall}


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="the workload (default: cpu)")
    p.add_argument("--iterations", type=int, default=1000, help="meta-iterations per run (default: 1000)")
    p.add_argument("--processes", default="1,2", help="comma-separated process counts (default: 1,2; 1 is the "
                                                      "baseline and always runs)")
    p.add_argument("--repeats", type=int, default=1, help="runs per process count; the median rate counts")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key of the preset, as the command line does")
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    common.check_arguments(p, args, positive=("iterations", "repeats"))
    try:
        counts = sorted({1, *(int(c) for c in args.processes.split(",") if c.strip())})
    except ValueError:
        p.error(f"--processes = {args.processes!r} is not allowed: give comma-separated integers >= 1, e.g. 1,2")
    if counts[0] < 1:
        p.error(f"--processes = {args.processes!r} is not allowed: every count must be >= 1")
    config = ml.preset(args.preset)
    print(f"preset {args.preset} ({config.describe()}, meta-batch {config.meta_batch_size}), {args.iterations} "
          f"iterations, --set {' '.join(args.set) or '-'}; processes {counts}, 1 thread each; {ml.machine()}")

    rates: dict[int, list[float]] = {n: [] for n in counts}
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    folder = Path(tempfile.mkdtemp(prefix="mmtl-scaling-"))
    try:
        for repeat in range(args.repeats):
            for n in counts:
                result = run(n, args, folder / f"p{n}")
                rates[n].append(result["tasks_per_s"])
                runs[n].append(result)
                print(f"repeat {repeat + 1}: {n} process(es): {result['tasks_per_s']:7.1f} tasks/s "
                      f"({result['train_seconds']:.1f} s of training, {result['wall_seconds']:.1f} s in all)",
                      flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    base = statistics.median(rates[1])
    summary = {}
    print()
    common.print_header(f"{'processes':>9}  {'tasks/s':>8}  {'ratio':>6}  {'efficiency':>10}")
    for n in counts:
        rate = statistics.median(rates[n])
        summary[n] = {"tasks_per_s": rate, "ratio": rate / base, "efficiency": rate / base / n}
        print(f"{n:>9}  {rate:8.1f}  {rate / base:5.2f}x  {rate / base / n:10.2f}")
    report = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "torch": torch.__version__,
              "python": sys.version.split()[0], "threads_per_process": 1, "summary": summary, "runs": runs}
    common.save_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
