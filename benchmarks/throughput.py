"""Throughput of second-order MAML: mmtl_lib's three backends against a hand-written torch.func loop,
learn2learn and higher, in one process, on the same data and the same initial weights.

The workload is the MAML paper's Omniglot setting with random pixels: 5-way 1-shot episodes of
28x28 one-channel images (5 support and 5 x 15 = 75 query images per task), the paper's Conv4
(BatchNorm on batch statistics): :class:`mmtl_lib.Conv4` for the library, the same layers from
``torch.nn`` with the same weights for the others (``--peer-model``), inner learning rate 0.4 and
one inner step. A meta-iteration is the whole training step: the support forward pass, the inner gradient
with a graph for second derivatives, the query loss, the backward pass to the initial weights and
an Adam step.

Before timing, every method's meta-gradient on one batch is compared with the plain torch.func
loop's; then each method runs ``--warmup`` iterations, and ``--repeats`` rounds of ``--iters``
timed iterations follow, the methods taking turns within each round so that a slow spell of a
shared machine hits them all alike. The median round is reported. The first meta-iteration of
each method is timed on its own: for the compile backend it holds the tracing and compilation
(in a fresh Inductor cache unless ``--warm-compile-cache``), and the script prints after how many
meta-iterations that pays for itself against the loop backend.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/throughput.py     # CPU: ~1.5 min of CPU time
    .venv/bin/python benchmarks/throughput.py --device cuda --json results/throughput-cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import common
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import mmtl_lib as ml
from mmtl_lib import TaskBatch

N_WAY, K_SHOT, IMAGE_SIZE = 5, 1, 28
REFERENCE = "torch.func loop"


def omniglot_shaped_batch(meta_batch_size: int, n_query: int, generator, device) -> TaskBatch:
    """Random 5-way 1-shot episodes: support ``[B, 5, 1, 28, 28]``, query ``[B, 5 n_query, ...]``."""

    def images(n: int) -> Tensor:
        return torch.rand(meta_batch_size, n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device)

    def labels(per_class: int) -> Tensor:
        return torch.arange(N_WAY).repeat_interleave(per_class).repeat(meta_batch_size, 1).to(device)

    return TaskBatch((images(N_WAY * K_SHOT), labels(K_SHOT)), (images(N_WAY * n_query), labels(n_query)))


# Every method is built from its own copy of one initial network and returns
# (meta-parameters, meta_backward), where meta_backward(tasks) accumulates the gradient of the
# mean query loss over the meta-batch into the meta-parameters' .grad.
Builder = Callable[[nn.Module, argparse.Namespace], tuple[list[Tensor], Callable[[TaskBatch], None]]]


def build_library(backend: str) -> Builder:
    def build(model, args):
        learner = ml.MAML(model, F.cross_entropy, inner_lr=args.inner_lr, inner_steps=args.inner_steps, backend=backend)
        return learner.meta_parameters(), learner.meta_backward

    return build


def torch_conv4(model: ml.Conv4) -> nn.Module:
    """The paper's Conv4 as one writes it with ``torch.nn`` (conv, ``BatchNorm2d`` on batch
    statistics, ReLU, max-pool; NCHW), with ``model``'s parameters under the same names: what the
    peers run. :class:`mmtl_lib.Conv4` computes the same function (``tests/test_tasks_models.py``)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            blocks = []
            for block in list(model.body)[:4]:
                conv = block[0]
                blocks.append(nn.Sequential(
                    nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1),
                    nn.BatchNorm2d(conv.out_channels, track_running_stats=False), nn.ReLU(),
                    nn.MaxPool2d(2) if any(isinstance(m, nn.MaxPool2d) for m in block) else nn.Identity()))
            self.body = nn.Sequential(*blocks, nn.Flatten())
            self.head = nn.Linear(model.head.in_features, model.head.out_features)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.body(x))

    net = Net().to(next(model.parameters()).device)
    net.load_state_dict(model.state_dict())
    return net


def build_torch_func(model, args):
    """The baseline, as one would write it by hand: functional_call + autograd.grad(create_graph)."""
    params = dict(model.named_parameters())

    def meta_backward(tasks: TaskBatch) -> None:
        (sx, sy), (qx, qy) = tasks.support, tasks.query
        for i in range(tasks.n_tasks):
            fast = params
            for _ in range(args.inner_steps):
                loss = F.cross_entropy(functional_call(model, fast, (sx[i],)), sy[i])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {n: p - args.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
            query_loss = F.cross_entropy(functional_call(model, fast, (qx[i],)), qy[i])
            (query_loss / tasks.n_tasks).backward()

    return list(params.values()), meta_backward


def build_learn2learn(model, args):
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=args.inner_lr, first_order=False)

    def meta_backward(tasks: TaskBatch) -> None:
        (sx, sy), (qx, qy) = tasks.support, tasks.query
        for i in range(tasks.n_tasks):
            learner = maml.clone()
            for _ in range(args.inner_steps):
                learner.adapt(F.cross_entropy(learner(sx[i]), sy[i]))
            (F.cross_entropy(learner(qx[i]), qy[i]) / tasks.n_tasks).backward()

    return list(maml.parameters()), meta_backward


def build_higher(model, args):
    import higher

    inner_optimizer = torch.optim.SGD(model.parameters(), lr=args.inner_lr)

    def meta_backward(tasks: TaskBatch) -> None:
        (sx, sy), (qx, qy) = tasks.support, tasks.query
        for i in range(tasks.n_tasks):
            with higher.innerloop_ctx(
                model, inner_optimizer, copy_initial_weights=False, track_higher_grads=True
            ) as (fmodel, diffopt):
                for _ in range(args.inner_steps):
                    diffopt.step(F.cross_entropy(fmodel(sx[i]), sy[i]))
                (F.cross_entropy(fmodel(qx[i]), qy[i]) / tasks.n_tasks).backward()

    return list(model.parameters()), meta_backward


def build_first_order(model, args):
    """First-order MAML through the library: the gradient check must be able to tell it apart."""
    learner = ml.MAML(model, F.cross_entropy, inner_lr=args.inner_lr, inner_steps=args.inner_steps, first_order=True)
    return learner.meta_parameters(), learner.meta_backward


def _version(module: str) -> str:
    try:
        return version(module)
    except PackageNotFoundError:
        return "unknown"


def import_peer(module: str) -> str | None:
    """Import an optional peer library; return why it is unavailable, or None if it imports."""
    try:
        # learn2learn imports gym, which prints a deprecation notice on stderr at import time.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            __import__(module)
    except Exception as error:  # an old peer can fail with anything, not only ImportError
        return first_line(error)
    return None


METHODS: dict[str, tuple[str | None, Builder]] = {
    # name -> (optional module it needs, builder)
    "mmtl_lib loop": (None, build_library("loop")),
    "mmtl_lib vmap": (None, build_library("vmap")),
    "mmtl_lib compile": (None, build_library("compile")),
    REFERENCE: (None, build_torch_func),
    "learn2learn": ("learn2learn", build_learn2learn),
    "higher": ("higher", build_higher),
}
SHORT_NAMES = {"loop": "mmtl_lib loop", "vmap": "mmtl_lib vmap", "compile": "mmtl_lib compile", "func": REFERENCE,
               "learn2learn": "learn2learn", "l2l": "learn2learn", "higher": "higher"}


class Runner:
    """One method with its own copy of the network and its own Adam optimizer."""

    def __init__(self, name: str, builder: Builder, initial: nn.Module, args):
        self.name = name
        library = name.startswith("mmtl_lib") or name == "first order"
        self.model = copy.deepcopy(initial) if library or args.peer_model == "mmtl" else torch_conv4(initial)
        self.meta_parameters, self.meta_backward = builder(self.model, args)
        self.optimizer = torch.optim.Adam(self.meta_parameters, lr=args.outer_lr)

    def meta_gradient(self, tasks: TaskBatch) -> dict[str, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_backward(tasks)
        return {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}

    def step(self, tasks: TaskBatch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_backward(tasks)
        self.optimizer.step()


def compare(grads: dict[str, Tensor], reference: dict[str, Tensor], rtol: float) -> dict:
    """Largest entrywise difference, relative norm of the difference, and the verdict
    ``||g - ref|| <= rtol ||ref||``.

    In norm, not entry by entry: in float32, kernels that sum in other orders (channels-last
    against NCHW, cuDNN's algorithms, the conv biases' meta-gradients, which BatchNorm makes zero up
    to rounding) differ by ~1e-5 of the norm but by more on the smallest entries.
    """
    diff = torch.cat([(grads[n] - r).flatten() for n, r in reference.items()])
    norm = torch.cat([r.flatten() for r in reference.values()]).norm().item()
    rel = diff.norm().item() / norm
    return {"max_abs_diff": diff.abs().max().item(), "rel_norm_diff": rel, "allclose": rel <= rtol}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(runner: Runner, tasks: TaskBatch, iters: int, device: torch.device):
    """Wall-clock and process CPU seconds of ``iters`` meta-iterations."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        runner.step(tasks)
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def parse_args(argv=None) -> argparse.Namespace:
    p = common.parser(__doc__)
    add = p.add_argument
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present, else CPU")
    add("--meta-batch-size", type=int, help="tasks per meta-iteration (default: 8 on CPU, 32 on CUDA)")
    add("--iters", type=int, help="timed meta-iterations per round (default: 3 on CPU, 20 on CUDA)")
    add("--repeats", type=int, default=3, help="timed rounds; the median round is reported (default: 3)")
    add("--warmup", type=int, help="untimed meta-iterations per method first (default: 1 on CPU, 3 on CUDA)")
    add("--inner-steps", type=int, default=1, help="inner gradient steps (default: 1)")
    add("--filters", type=int, default=64, help="Conv4 channels per layer (default: 64)")
    add("--n-query", type=int, default=15, help="query images per class (default: 15)")
    add("--inner-lr", type=float, default=0.4, help="inner SGD step size (default: 0.4)")
    add("--outer-lr", type=float, default=1e-3, help="Adam's learning rate (default: 1e-3)")
    add("--methods", default="loop,vmap,compile,func,learn2learn,higher",
        help="comma-separated subset of loop, vmap, compile, func, learn2learn, higher (default: all)")
    add("--peer-model", default="torch", choices=("torch", "mmtl"),
        help="the network of func, learn2learn and higher: torch: the paper's Conv4 from torch.nn layers "
             "(default); mmtl: mmtl_lib.Conv4, the library's layers")
    add("--warm-compile-cache", action="store_true",
        help="let the compile backend use Inductor's cache on disk (default: a fresh, empty one, so that the "
             "compile time printed is what a first run costs)")
    add("--tf32", action="store_true", help="allow TF32 matmuls and convolutions on CUDA (default: off)")
    add("--rtol", type=float, default=1e-3,
        help="gradient check: largest allowed ||g - ref|| / ||ref|| (default: 1e-3; float32 cuDNN kernels on an "
             "H200 differed by 2e-4, while the float64 check on CUDA agreed to 2e-15)")
    add("--seed", type=int, default=0)
    add("--glibc-defaults", action="store_true",
        help="leave glibc's allocator settings alone (default: mmtl_lib.keep_freed_memory() for every method)")
    common.add_output_options(p)
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    cuda = args.device == "cuda"
    args.meta_batch_size = args.meta_batch_size or (32 if cuda else 8)
    args.iters = args.iters or (20 if cuda else 3)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    common.check_arguments(p, args, ("meta_batch_size", "iters", "repeats", "inner_steps", "filters", "n_query"),
                           methods=list(SHORT_NAMES))
    if args.warmup < 0:
        p.error(f"--warmup = {args.warmup} is not allowed: it must be >= 0")
    args.methods = [n for n in METHODS if n in {SHORT_NAMES[m] for m in args.methods}]
    return args


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if "mmtl_lib compile" in args.methods and not args.warm_compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmtl-inductor-")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    threads = ml.set_threads(args.threads)
    freed = False if args.glibc_defaults else ml.keep_freed_memory()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32

    torch.manual_seed(args.seed)
    initial = ml.Conv4(N_WAY, filters=args.filters).to(device)
    tasks = omniglot_shaped_batch(args.meta_batch_size, args.n_query, ml.generator(args.seed), device)

    print(f"device   {device.type}: {ml.processor(device)}")
    print(f"torch    {torch.__version__}, {threads} thread(s), keep_freed_memory {'on' if freed else 'off'}"
          + (f", CUDA {torch.version.cuda}, TF32 {'on' if args.tf32 else 'off'}" if cuda else ""))
    print(f"workload {N_WAY}-way {K_SHOT}-shot, {N_WAY * args.n_query} query images per task, Conv4 with "
          f"{args.filters} filters, meta-batch {args.meta_batch_size}, {args.inner_steps} inner step(s) at lr "
          f"{args.inner_lr}, second order, Adam")

    runners: dict[str, Runner] = {}
    skipped: dict[str, str] = {}
    for name in args.methods:
        module, builder = METHODS[name]
        why = import_peer(module) if module else None
        if why is None:
            try:
                runners[name] = Runner(name, builder, initial, args)
            except Exception as error:
                why = first_line(error)
        if why is not None:
            skipped[name] = why
            print(f"skipped  {name}: {why}")

    # 1. The methods agree: same weights, same batch, same meta-gradient.
    grads, first_s = {}, {}
    for name, runner in runners.items():
        try:
            sync(device)
            start = time.perf_counter()
            grads[name] = runner.meta_gradient(tasks)
            sync(device)
            first_s[name] = time.perf_counter() - start
        except Exception as error:
            skipped[name] = f"failed on the first batch: {first_line(error)}"
            print(f"skipped  {name}: {skipped[name]}")
    runners = {n: r for n, r in runners.items() if n in grads}
    if not grads:
        raise SystemExit("no method could run")
    reference_name = REFERENCE if REFERENCE in grads else next(iter(grads))
    reference = grads[reference_name]
    check = {n: compare(g, reference, args.rtol) for n, g in grads.items() if n != reference_name}
    first_order = Runner("first order", build_first_order, initial, args).meta_gradient(tasks)
    contrast = compare(first_order, reference, args.rtol)
    print(f"\nmeta-gradient check against the {reference_name} "
          f"(||diff|| <= {args.rtol} ||ref||):")
    for name, c in [*check.items(), ("(first order)", contrast)]:
        verdict = "OK" if c["allclose"] else "MISMATCH"
        if name == "(first order)":
            verdict = "differs, as it should" if not c["allclose"] else "CANNOT TELL FIRST ORDER APART"
        print(f"  {name:<16} max |diff| {c['max_abs_diff']:.2e}   ||diff||/||ref|| {c['rel_norm_diff']:.2e}"
              f"   {verdict}")
    if not all(c["allclose"] for c in check.values()):
        print("WARNING: the methods disagree on the meta-gradient, so the timings compare different work")

    # 2. Timing: warm-up, then rounds in which the methods take turns.
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step(tasks)
    wall: dict[str, list[float]] = {n: [] for n in runners}
    cpu: dict[str, list[float]] = {n: [] for n in runners}
    peak_mib: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            w, c = time_iterations(runner, tasks, args.iters, device)
            wall[name].append(w)
            cpu[name].append(c)
            if cuda:
                peak_mib[name] = max(peak_mib.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)

    baseline = "learn2learn" if "learn2learn" in runners else reference_name
    rates = {n: args.iters / statistics.median(s) for n, s in wall.items()}
    extra = f"{'peak MiB':>9}" if cuda else f"{'tasks/CPU-s':>12} {'CPU/wall':>9}"
    print(f"\n{args.repeats} rounds of {args.iters} meta-iterations per method after {args.warmup} warm-up; "
          "median round")
    print(f"{'method':<16} {'meta-it/s':>10} {'tasks/s':>9} {'vs ' + baseline:>20} {'spread':>7} {extra}")
    results = {}
    for name, rate in rates.items():
        median = statistics.median(wall[name])
        spread = (max(wall[name]) - min(wall[name])) / median
        busy = sum(cpu[name]) / sum(wall[name])
        tasks_per_cpu_s = args.iters * args.meta_batch_size / statistics.median(cpu[name])
        results[name] = {
            "meta_iterations_per_s": rate,
            "tasks_per_s": rate * args.meta_batch_size,
            "tasks_per_cpu_s": tasks_per_cpu_s,
            "ratio_to_baseline": rate / rates[baseline],
            "round_seconds": wall[name],
            "round_cpu_seconds": cpu[name],
            **({"peak_memory_mib": peak_mib[name]} if cuda else {}),
        }
        ratio = rate / rates[baseline]
        print(f"{name:<16} {rate:>10.3f} {rate * args.meta_batch_size:>9.2f} {ratio:>19.2f}x {spread:>7.0%} "
              + (f"{peak_mib[name]:>9.0f}" if cuda else f"{tasks_per_cpu_s:>12.2f} {busy:>9.0%}"))
    print("spread: (slowest - fastest round) / median round")
    if not cuda:
        print("tasks/CPU-s: tasks per second of this process's CPU time (median round), steadier than\n"
              "tasks/s on a shared machine; CPU/wall below 100% x threads: the process waited for a core")
    library = {n: r for n, r in rates.items() if n.startswith("mmtl_lib")}
    if library:
        best = max(library, key=library.get)
        print(f"best library backend: {best}, {library[best] / rates[baseline]:.2f}x {baseline}'s tasks/s")
    compile_report = None
    if "mmtl_lib compile" in rates:
        step_s = 1 / rates["mmtl_lib compile"]
        overhead = first_s["mmtl_lib compile"] - step_s
        saving = 1 / rates["mmtl_lib loop"] - step_s if "mmtl_lib loop" in rates else None
        pays = None if saving is None or saving <= 0 else max(1, math.ceil(overhead / saving))
        compile_report = {"first_iteration_s": first_s["mmtl_lib compile"], "compile_s": overhead,
                          "break_even_iterations": pays,
                          "inductor_cache": "warm" if args.warm_compile_cache else "fresh"}
        print(f"compile: first meta-iteration {first_s['mmtl_lib compile']:.1f} s, of which ~{overhead:.1f} s tracing "
              f"and compiling ({compile_report['inductor_cache']} Inductor cache); "
              + ("it does not pay for itself: not faster than the loop backend" if pays is None else
                 f"it pays for itself after {pays} meta-iterations against the loop backend"))

    report = {
        "device": device.type, "device_name": ml.processor(device), "torch": torch.__version__,
        "python": sys.version.split()[0], "threads": threads, "keep_freed_memory": freed,
        "tf32": args.tf32 if cuda else None,
        "meta_batch_size": args.meta_batch_size, "inner_steps": args.inner_steps, "filters": args.filters,
        "n_way": N_WAY, "k_shot": K_SHOT, "n_query_per_class": args.n_query, "inner_lr": args.inner_lr,
        "outer_lr": args.outer_lr, "iters": args.iters, "repeats": args.repeats, "warmup": args.warmup,
        "baseline": baseline, "peers": {m: _version(m) for m in ("learn2learn", "higher") if m in runners},
        "gradient_check": {"reference": reference_name, "rtol": args.rtol, **check,
                           "first_order_contrast": contrast},
        "skipped": skipped, "results": results, "first_iteration_s": first_s, "compile": compile_report,
        "peer_model": args.peer_model,
    }
    common.save_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
