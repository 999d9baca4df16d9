"""Peak memory of second-order MAML against the number of inner steps: the graph stored, first
order for contrast, and the inner steps recomputed (``MAML(..., recompute_inner=True)``).

The workload is the MAML paper's Omniglot setting with random pixels, as in ``throughput.py``:
5-way 1-shot episodes of 28x28 one-channel images (5 support and 5 x 15 query images per task),
the paper's Conv4 (64 filters), inner learning rate 0.4, a meta-batch of 4 tasks. For each number
of inner steps (1 to 10) and each mode, one meta-iteration (``learner.meta_backward(tasks)``) is
measured three ways:

* **peak live tensor bytes**: the most bytes that tensors created during the meta-iteration held at
  any one time. On a CPU a ``TorchDispatchMode`` sees every operator's outputs, counts each new
  storage once (an output that the operator's schema says aliases an input is not new) and
  subtracts it when it is freed; kernels' private workspaces are not tensors and are not counted.
  It depends on the operators run, not on the machine or on other processes. On CUDA:
  ``torch.cuda.max_memory_allocated()`` less what was allocated before.
* **saved for backward**: the bytes of the distinct storages that the autograd graph holds when
  ``.backward()`` is called (the nodes' saved tensors, found by walking the graph from the loss),
  the largest over the backward calls of the meta-iteration (the loop backend calls it per task).
  This is what a longer inner loop costs; it is exact and the same on every machine.
* **peak RSS increase**: in a fresh process per setting, after one untimed first-order
  meta-iteration (which pays the one-time costs: kernel pages first touched, thread pools), the
  peak resident set size of the measured meta-iteration (``VmHWM``, reset before it) less the
  resident size just before it, with glibc told to map and unmap every block over 128 KiB
  (``GLIBC_TUNABLES``; by default it adapts that threshold, and the RSS then depends on what
  earlier frees left in its heap). A cross-check only. Linux only; off on CUDA.

Each mode starts from the same initial weights and tasks; the recomputed meta-gradient is compared
with the stored one (largest entrywise difference over the largest entry).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py --json results/memory.json   # ~5 min
    .venv/bin/python benchmarks/memory.py --device cuda --meta-batch-size 32 --backend vmap
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
import weakref
from unittest import mock

import common
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mmtl_lib as ml
from mmtl_lib import TaskBatch

N_WAY, K_SHOT, IMAGE_SIZE = 5, 1, 28
MODES = ("second", "first", "recompute")
LABELS = {"second": "2nd order", "first": "1st order", "recompute": "recomputed"}
MB = 1e6
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"


# --- the three measures -------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages that operators create while it is active: ``now`` (still
    alive) and ``peak`` (the most at any one time). A storage is counted once, however many
    tensors view it, and uncounted when it is freed."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._sizes: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for ret, value in zip(returns, outputs):
            if ret.alias_info is not None:  # a view of an input, or an in-place result
                continue
            for t in tree_leaves(value):
                if isinstance(t, Tensor):
                    self._add(t.untyped_storage())
        return out

    def _add(self, storage) -> None:
        key = (storage.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        self.now -= self._sizes.pop(key)


def saved_bytes(root: Tensor) -> int:
    """Bytes of the distinct storages saved for backward by the graph that ends in ``root``."""
    sizes, seen, stack = {}, set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                tensors += [value] if isinstance(value, Tensor) else \
                    [v for v in value if isinstance(v, Tensor)] if isinstance(value, (tuple, list)) else []
        if hasattr(node, "saved_tensors"):  # a custom autograd.Function's node (recomputed steps)
            tensors += [t for t in node.saved_tensors if t is not None]
        for t in tensors:
            storage = t.untyped_storage()
            sizes[(storage.device, storage.data_ptr())] = storage.nbytes()
        stack += [f for f, _ in node.next_functions]
    return sum(sizes.values())


@contextlib.contextmanager
def saved_at_backward():
    """A list that receives :func:`saved_bytes` of the graph at every ``Tensor.backward`` call."""
    sizes, backward = [], torch.Tensor.backward

    def measured(self, *args, **kwargs):
        sizes.append(saved_bytes(self))
        return backward(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "backward", measured):
        yield sizes


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set size now (``VmRSS``) or at its peak (``VmHWM``), Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- the workload -------------------------------------------------------------------------------


def omniglot_shaped_batch(meta_batch_size: int, n_query: int, seed: int, device) -> TaskBatch:
    """Random 5-way 1-shot episodes: support ``[B, 5, 1, 28, 28]``, query ``[B, 5 n_query, ...]``."""
    g = torch.Generator().manual_seed(seed)

    def images(n: int) -> Tensor:
        return torch.rand(meta_batch_size, n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device)

    def labels(per_class: int) -> Tensor:
        return torch.arange(N_WAY).repeat_interleave(per_class).repeat(meta_batch_size, 1).to(device)

    return TaskBatch((images(N_WAY * K_SHOT), labels(K_SHOT)), (images(N_WAY * n_query), labels(n_query)))


def build(mode: str, inner_steps: int, args, device) -> ml.MAML:
    torch.manual_seed(args.seed)
    model = ml.Conv4(N_WAY, filters=args.filters, image_size=IMAGE_SIZE).to(device)
    return ml.MAML(model, F.cross_entropy, inner_lr=args.inner_lr, inner_steps=inner_steps, backend=args.backend,
                   first_order=mode == "first", recompute_inner=mode == "recompute")


def measure(mode: str, inner_steps: int, args, device, tasks: TaskBatch) -> tuple[dict, list[Tensor]]:
    """Peak live bytes and saved-for-backward bytes of one meta-iteration; and its meta-gradient."""
    learner = build(mode, inner_steps, args, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        learner.meta_backward(tasks)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with LiveTensorBytes() as live:
            learner.meta_backward(tasks)
        peak = live.peak
    grads = [p.grad.detach().clone() for p in learner.meta_parameters()]
    learner.model.zero_grad(set_to_none=True)
    with saved_at_backward() as sizes:
        learner.meta_backward(tasks)
    return {"peak_bytes": peak, "saved_bytes": max(sizes)}, grads


def child(args) -> None:
    """One meta-iteration in this fresh process: print the RSS before it and the peak after.

    A first-order one-step meta-iteration runs first, so that the one-time costs (the pages of
    torch's kernels that are first touched, thread pools) fall before the measurement; the peak
    is then reset, where Linux allows it, else the process's peak so far is the floor."""
    device = torch.device(args.device)
    tasks = omniglot_shaped_batch(args.meta_batch_size, args.n_query, args.seed, device)
    build("first", 1, args, device).meta_backward(tasks)
    learner = build(args.child_mode, args.child_steps, args, device)
    gc.collect()
    reset = reset_peak_rss()
    before = rss_bytes()
    learner.meta_backward(tasks)
    peak = rss_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss_before": before, "rss_peak": peak, "peak_reset": reset}))


def rss_increase(mode: str, inner_steps: int, args) -> int:
    """:func:`child` in a fresh interpreter: the peak RSS increase of one meta-iteration, in bytes."""
    command = [sys.executable, os.path.abspath(__file__), "--child-mode", mode, "--child-steps", str(inner_steps),
               "--device", args.device, "--meta-batch-size", str(args.meta_batch_size), "--filters",
               str(args.filters), "--n-query", str(args.n_query), "--inner-lr", str(args.inner_lr), "--backend",
               args.backend, "--seed", str(args.seed), "--threads", str(args.threads)]
    # A fixed mmap threshold turns off glibc's adjustment of it, so that every block over 128 KiB
    # is mapped when allocated and unmapped when freed: the RSS then follows the live tensors,
    # instead of what earlier frees happened to leave in the heap.
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), GLIBC_TUNABLES]))
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "GLIBC_TUNABLES": tunables})
    if done.returncode != 0:
        raise RuntimeError(f"the RSS child failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    values = json.loads(done.stdout.strip().splitlines()[-1])
    return values["rss_peak"] - values["rss_before"]


# --- the run ------------------------------------------------------------------------------------


def slope(xs: list[int], ys: list[float]) -> float:
    """The least-squares slope of ``ys`` against ``xs`` (bytes per inner step)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def print_table(rows: list[dict], modes: list[str], rss: bool) -> None:
    measures = [("peak_bytes", "peak live tensors, MB"), ("saved_bytes", "saved for backward, MB")]
    if rss:
        measures.append(("rss_bytes", "peak RSS increase, MB"))
    width = 11 * len(modes)
    print("       " + " | ".join(f"{title:^{width}}" for _, title in measures))
    header = "steps  " + " | ".join("".join(f"{LABELS[m]:>11}" for m in modes) for _ in measures)
    print(header)
    print("-" * len(header))
    for k in sorted({r["inner_steps"] for r in rows}):
        by_mode = {r["mode"]: r for r in rows if r["inner_steps"] == k}
        cells = [
            "".join(f"{by_mode[m][key] / MB:11.1f}" if by_mode[m].get(key) is not None else f"{'-':>11}"
                    for m in modes)
            for key, _ in measures
        ]
        print(f"{k:5d}  " + " | ".join(cells))


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto (CUDA when present); default cpu")
    p.add_argument("--inner-steps", default="1-10", help="inner step counts: a range 'a-b' or a list 'a,b,c' "
                                                         "(default: 1-10)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--meta-batch-size", type=int, default=4, help="tasks per meta-iteration (default: 4)")
    p.add_argument("--backend", default="loop", choices=("loop", "vmap"),
                   help="MAML's backend (default: loop, a backward pass per task)")
    p.add_argument("--filters", type=int, default=64, help="Conv4 channels per layer (default: 64)")
    p.add_argument("--n-query", type=int, default=15, help="query images per class (default: 15)")
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0, help="initial weights and data (default: 0)")
    p.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS cross-check")
    p.add_argument("--child-mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    common.add_output_options(p)
    args = p.parse_args(argv)
    args.threads = ml.set_threads(args.threads)
    if args.device == "auto":
        args.device = ml.default_device().type
    if args.child_mode is not None:
        child(args)
        return {}
    common.check_arguments(p, args, positive=("meta_batch_size", "filters", "n_query"), methods=MODES,
                           option="modes")
    steps = parse_steps(p, args.inner_steps)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    rss = not args.no_rss and device.type == "cpu" and sys.platform.startswith("linux")
    print(ml.machine())
    print(f"Conv4({N_WAY}, filters={args.filters}) on {IMAGE_SIZE}x{IMAGE_SIZE}, {N_WAY}-way {K_SHOT}-shot, "
          f"{args.n_query} query per class, meta-batch {args.meta_batch_size}, backend {args.backend!r}, "
          f"inner lr {args.inner_lr}")
    tasks = omniglot_shaped_batch(args.meta_batch_size, args.n_query, args.seed, device)
    start, rows = time.perf_counter(), []
    for k in steps:
        grads = {}
        for mode in args.modes:
            row, grads[mode] = measure(mode, k, args, device, tasks)
            row = {"inner_steps": k, "mode": mode, **row, "rss_bytes": rss_increase(mode, k, args) if rss else None}
            if mode == "recompute" and "second" in grads:
                scale = max(g.abs().max().item() for g in grads["second"])
                row["grad_difference"] = max((a - b).abs().max().item()
                                             for a, b in zip(grads["recompute"], grads["second"])) / scale
            rows.append(row)
        print(f"inner_steps {k} done, {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print_table(rows, args.modes, rss)
    slopes = {m: {key: slope([r["inner_steps"] for r in rows if r["mode"] == m],
                             [r[key] for r in rows if r["mode"] == m])
                  for key in ("peak_bytes", "saved_bytes", "rss_bytes") if key != "rss_bytes" or rss}
              for m in args.modes}
    print("\nper inner step (least-squares slope), MB: " + "; ".join(
        f"{LABELS[m]}: peak {s['peak_bytes'] / MB:.2f}, saved {s['saved_bytes'] / MB:.2f}"
        + (f", RSS {s['rss_bytes'] / MB:.2f}" if rss else "") for m, s in slopes.items()))
    differences = [r["grad_difference"] for r in rows if "grad_difference" in r]
    if differences:
        print(f"recomputed vs stored meta-gradient: largest difference {max(differences):.1e} of the largest entry")
    report = {"args": {k: v for k, v in vars(args).items() if k not in ("json", "child_mode", "child_steps")},
              "torch": torch.__version__, "python": sys.version.split()[0], "threads": args.threads,
              "device": str(device), "total_seconds": time.perf_counter() - start, "rows": rows,
              "bytes_per_inner_step": slopes}
    common.save_report(args.json, report)
    return report


def parse_steps(parser, text: str) -> list[int]:
    """``'1-10'`` -> ``[1, ..., 10]``; ``'1,3,5'`` -> ``[1, 3, 5]``; anything else, a parser error."""
    try:
        if "-" in text:
            low, high = (int(v) for v in text.split("-"))
            steps = list(range(low, high + 1))
        else:
            steps = [int(v) for v in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        parser.error(f"--inner-steps = {text!r} is not allowed: give a range such as 1-10 or a list such as 1,3,5 "
                     "of counts >= 1")
    return steps


if __name__ == "__main__":
    main()
