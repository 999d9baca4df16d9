"""Meta-training on several processes (mmtl_lib.distributed), on the CPU with gloo: the meta-gradient
of two processes is one process's for every learner kind that splits, and the others are refused
by name; torchrun's two-process run ends where one process does; a worker killed with SIGKILL is
restarted by torchrun from the last checkpoint to the uninterrupted result, bit for bit; a rank
that raises stops the job with its error, and ``--resume`` continues it; bad launch settings are
refused before any data is read.

Run as a script (``torchrun ... tests/test_distributed.py train ...``) this file is the command
line with a fault injected where ``MMTL_TEST_FAULT = "kill|raise:RANK:ITERATION"`` says, on the
first attempt only (``TORCHELASTIC_RESTART_COUNT = 0``).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TIMING, assert_identical

import mmtl_lib as ml
from mmtl_lib.__main__ import main
from mmtl_lib.distributed import World

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--monitor-interval", "0.1"]
# The sinusoid preset made small: 20 iterations of 4 tasks, checkpoints every 5.
SMALL = ["--preset", "sinusoid", "--device", "cpu", "--quiet", "--iterations", "20", "--set", "meta_batch_size=4",
         "--set", "val_every=10", "--set", "val_tasks=5", "--set", "test_tasks=5", "--set", "checkpoint_every=5"]
TIMEOUT = 120  # seconds for one torchrun job; each takes ~6 on a busy 2-core machine


def torchrun(*argv, fault=None, restarts=0) -> subprocess.CompletedProcess:
    """Run a two-process torchrun job to its end; ``fault`` runs this file as the program, with
    that fault injected. A job still running after ``TIMEOUT`` fails the test; it is stopped
    with SIGTERM, on which torchrun stops its workers (each in a session of its own), then
    SIGKILL, so that no worker outlives the test."""
    program = [__file__, "train"] if fault else ["-m", "mmtl_lib", "train"]
    env = {**os.environ, "MMTL_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MMTL_TEST_FAULT", None)
    if fault:
        env["MMTL_TEST_FAULT"] = fault
    command = [*TORCHRUN, "--max-restarts", str(restarts), *program, *argv]
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        job.terminate()
        try:
            stdout, stderr = job.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            stdout, stderr = job.communicate()
        pytest.fail(f"the job hung: still running after {TIMEOUT} s\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


# --- the meta-gradient: every learner kind, in-process ranks ---------------------------------------------------

class ImageTasks:
    """Random ``n_way``-way ``k_shot``-shot episodes of 14-pixel images: a small :class:`mmtl_lib.Sampler`."""

    def __init__(self, n_way=3, k_shot=2, n_query=2):
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query

    def sample(self, meta_batch_size, *, generator=None):
        def episode(k):
            x = torch.rand(meta_batch_size, self.n_way * k, 1, 14, 14, generator=generator)
            return x, torch.arange(self.n_way).repeat_interleave(k).expand(meta_batch_size, -1).clone()

        return ml.TaskBatch(episode(self.k_shot), episode(self.n_query))


def conv4(**kw):
    return ml.Conv4(3, filters=4, image_size=14, **kw)


def learner_kinds():
    """Name -> (learner, sampler, trainer settings), each built from seed 0, for the gradient test."""
    torch.manual_seed(0)
    images, sines = ImageTasks(), ml.Sinusoid(5, 5)
    film = ml.FiLMMLP(1, (8, 8), 1)
    return {
        # second order, through transductive BatchNorm, clipped after the all-reduce
        "maml": (ml.MAML(conv4(), F.cross_entropy, inner_lr=0.05, inner_steps=1, backend="vmap"), images,
                 dict(outer_grad_clip=0.05)),
        "metasgd-loop": (ml.meta_sgd(conv4(), F.cross_entropy, inner_lr=0.05, inner_steps=2, backend="loop"), images,
                         {}),
        # LSLR, the annealed multi-step loss and order (its counter), per-step BatchNorm
        "maml++": (ml.MAML(conv4(bn_steps=2), F.cross_entropy, inner_lr=0.05, inner_steps=2, learn_step_lrs=True,
                           msl_iterations=3, first_order_iterations=1), images, {}),
        "protomaml": (ml.MAML(conv4(), F.cross_entropy, inner_lr=0.05, inner_steps=1, proto_head=True), images, {}),
        "anil": (ml.anil(conv4(), F.cross_entropy, inner_lr=0.05, inner_steps=1), images, {}),
        # mini-batches from the learner's own generator, which each rank draws past the others' tasks
        "reptile": (ml.Reptile(ml.MLP(1, (16,), 1), F.mse_loss, inner_lr=0.01, inner_steps=3,
                               inner_optimizer=ml.adam(betas=(0.0, 0.999)), inner_batch_size=4,
                               generator=ml.generator(0)), ml.Sinusoid(10, 5), dict(outer_lr=0.5)),
        "protonet": (ml.ProtoNet(ml.conv4_embedding(filters=4, image_size=14)), images, {}),
        "joint-training": (ml.JointTraining(ml.MLP(1, (16,), 1), F.mse_loss, inner_lr=0.01, test_inner_steps=1),
                           sines, {}),
        "mmaml": (ml.MMAML(film, ml.SetEncoder(1, 1, film.modulation_shapes(), hidden=8), F.mse_loss,
                           inner_lr=0.01, inner_steps=2, inner_grad_clip=5.0), ml.MultimodalFunctions(5, 5), {}),
    }


def train_kinds(world, steps=2):
    """Each learner kind trained ``steps`` meta-iterations of 4 tasks in ``world`` with SGD: its
    first meta-gradient and its state. (SGD: Adam would turn the rounding noise of the meta-gradient
    of a conv bias in front of BatchNorm, zero but for rounding, into steps of ``outer_lr``.)"""
    out = {}
    for name, (learner, sampler, settings) in learner_kinds().items():
        trainer = ml.Trainer(learner, sampler, **{"meta_batch_size": 4, "outer_lr": 0.1, "optimizer": "sgd", "seed": 3,
                                                  "metric": ml.accuracy if sampler.__class__ is ImageTasks else None,
                                                  "world": world, **settings})
        records = [trainer.step()]
        gradient = [None if p.grad is None else p.grad.clone() for p in learner.meta_parameters()]
        records += [trainer.step() for _ in range(steps - 1)]
        out[name] = {"records": records, "learner": learner.state_dict(), "generator": trainer.generator.get_state(),
                     "parameters": [p.detach().clone() for p in learner.meta_parameters()], "gradient": gradient}
    return out


def _rank(rank, path):
    world = World(rank=rank, world_size=2)
    torch.set_num_threads(1)
    with world.running(torch.device("cpu")):
        states = train_kinds(world)
    torch.save(states, f"{path}.{rank}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_every_splittable_learner_to_the_single_process_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path / "states"),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"states.{r}", weights_only=False) for r in (0, 1)]
    single, start = train_kinds(World()), learner_kinds()
    for name, want in single.items():
        assert_identical(ranks[0][name], ranks[1][name], name)  # the ranks hold one state
        got = ranks[0][name]
        # the meta-gradient (clipped, for maml, after the all-reduce), and the parameters it leads to
        scale = max(g.abs().max() for g in want["gradient"] if g is not None)
        for g, h in zip(got["gradient"], want["gradient"]):
            assert (g is None) == (h is None), name  # Proto-MAML's head: replaced by the prototypes
            if h is not None:
                torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6 * scale, msg=name)
        for p, q in zip(got["parameters"], want["parameters"]):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
        assert not all(torch.equal(p, q) for p, q in zip(got["parameters"], start[name][0].meta_parameters()))
        for r, s in zip(got["records"], want["records"]):  # every task's loss and metric, logged on every rank
            assert r.keys() == s.keys() and r["iteration"] == s["iteration"]
            assert r == pytest.approx(s, rel=1e-5), name
        assert torch.equal(got["generator"], want["generator"])
        # the counters of MAML++'s annealing and Reptile's mini-batch generator advance as in one process
        assert got["learner"].get("meta_iteration") == want["learner"].get("meta_iteration")
        if "generator" in want["learner"]:
            assert torch.equal(got["learner"]["generator"], want["learner"]["generator"]), name
    assert single["maml++"]["learner"]["meta_iteration"] == 2


def test_learners_whose_meta_gradient_does_not_split_are_refused_by_name():
    world, sines = World(rank=0, world_size=2), ml.Sinusoid(5, 5)
    tr_maml = ml.TRMAML(ml.MLP(1, (8,), 1), F.mse_loss, n_tasks=4, p_lr=0.01, inner_lr=0.01, inner_steps=1)
    running = ml.ProtoNet(ml.conv4_embedding(filters=4, image_size=14, batch_norm="running"))
    pretrain = ml.PretrainClassifier(conv4(), 10, inner_lr=0.1, test_inner_steps=1)
    for learner, match in ((tr_maml, r"learner 'tr-maml' is not allowed with 2 processes: its task weights p"),
                           (running, r"learner 'protonet' is not allowed with 2 processes: its model keeps BatchNorm "
                                     "running statistics"),
                           (pretrain, r"learner 'pretrain' is not allowed with 2 processes: it trains on the pooled "
                                      "images of the meta-batch through BatchNorm")):
        with pytest.raises(ml.ConfigError, match=match):
            ml.Trainer(learner, sines, meta_batch_size=4, outer_lr=0.1, world=world)
    maml = ml.MAML(ml.MLP(1, (8,), 1), F.mse_loss, inner_lr=0.01, inner_steps=1)
    with pytest.raises(ml.ConfigError, match=r"meta_batch_size = 5 is not allowed with 2 processes \(WORLD_SIZE = 2\): "
                                             r"it must be a multiple of the number of processes, e.g. 4 or 6"):
        ml.Trainer(maml, sines, meta_batch_size=5, outer_lr=0.1, world=world)
    with pytest.raises(ml.ConfigError, match=r"world_size = 2 needs this process in a process group"):
        ml.Trainer(maml, sines, meta_batch_size=4, outer_lr=0.1, world=world)
    # one process trains them all, as before
    ml.Trainer(tr_maml, ml.SinusoidTaskSet(torch.tensor([[1.0, 2.0]] * 4), 5, 5), meta_batch_size=4,
               outer_lr=0.1).step()


# --- torchrun: a run, a killed worker, a raising rank ---------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A two-process run of the small sinusoid preset and its output (read them, do not change them)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = torchrun(*SMALL, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in one process (``python -m mmtl_lib``, here in-process): its folder."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    return out


def assert_close_runs(two: Path, one: Path):
    """The runs in ``two`` and ``one`` reached the same parameters, task generator and history, up
    to rounding, and report the same test score."""
    a, b = (ml.load_checkpoint(o / "checkpoint.pt") for o in (two, one))
    assert a["iteration"] == b["iteration"] == 20
    for name, p in a["learner"]["model"].items():
        torch.testing.assert_close(p, b["learner"]["model"][name], rtol=1e-4, atol=1e-6)
    assert torch.equal(a["generator"], b["generator"])
    assert len(a["history"]) == len(b["history"])
    for x, y in zip(a["history"], b["history"]):
        assert x.keys() == y.keys()
        assert {k: v for k, v in x.items() if k not in TIMING} == pytest.approx(
            {k: v for k, v in y.items() if k not in TIMING}, rel=1e-4)
    results = [json.loads((o / "result.json").read_text()) for o in (two, one)]
    assert results[0]["mse"] == pytest.approx(results[1]["mse"], rel=1e-3)


def test_two_processes_end_where_one_process_does(uninterrupted, one_process):
    out, done = uninterrupted
    result = json.loads(done.stdout)  # rank 0 alone reports
    assert result["world_size"] == 2 and result["iterations"] == 20
    assert json.loads((out / "result.json").read_text()) == result
    assert json.loads((one_process / "result.json").read_text())["world_size"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["torchrun_run_id"]
    assert {k: v for k, v in config.items() if k not in ("world_size", "torchrun_run_id")} == \
        ml.preset("sinusoid", iterations=20, meta_batch_size=4, val_every=10, val_tasks=5, test_tasks=5,
                  checkpoint_every=5).to_dict()
    assert_close_runs(out, one_process)


def test_a_killed_worker_is_restarted_from_the_last_checkpoint_to_the_uninterrupted_result(uninterrupted, tmp_path):
    straight, _ = uninterrupted
    out = tmp_path / "run"
    # rank 1 SIGKILLs itself before iteration 13 (the last checkpoint: 10); torchrun restarts both
    done = torchrun(*SMALL, "--out", str(out), fault="kill:1:12", restarts=1)
    assert done.returncode == 0, done.stderr
    assert "failed (exitcode: -9) local_rank: 1" in done.stderr, done.stderr  # and then torchrun restarted both
    assert_identical(*(ml.load_checkpoint(o / "checkpoint.pt") for o in (out, straight)))
    assert_identical(*(json.loads((o / "history.json").read_text()) for o in (out, straight)))
    assert_identical(*({**json.loads((o / "result.json").read_text()), "checkpoint": None} for o in (out, straight)))


def test_a_rank_that_raises_stops_the_job_with_its_error_and_resume_continues_it(one_process, tmp_path, capsys):
    out = tmp_path / "run"
    done = torchrun(*SMALL, "--out", str(out), fault="raise:1:7")  # within TIMEOUT: no rank hangs
    assert done.returncode != 0
    assert "RuntimeError: injected fault on rank 1 at iteration 7" in done.stderr
    assert ml.load_checkpoint(out / "checkpoint.pt")["iteration"] == 5 and not (out / "result.json").exists()
    # --resume, here in one process, continues from the checkpoint rank 0 wrote
    assert main(["train", *SMALL, "--out", str(out), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["world_size"] == 1
    assert_close_runs(out, one_process)


def test_a_restarted_job_continues_its_own_run_only(uninterrupted, tmp_path, monkeypatch, capsys):
    # torchrun's restart of a job (here of one process) continues the checkpoint that its first
    # attempt wrote, known by the run id in config.json; another job's run is still refused
    straight, _ = uninterrupted
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "config.json"):
        (out / name).write_bytes((straight / name).read_bytes())
    started = []
    fit = ml.Trainer.fit

    def spy(self, *args, **kwargs):
        started.append(self.iteration)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(ml.Trainer, "fit", spy)
    run_id = json.loads((straight / "config.json").read_text())["torchrun_run_id"]
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "TORCHELASTIC_RESTART_COUNT": "1",
                       "TORCHELASTIC_RUN_ID": "another job"}.items():
        monkeypatch.setenv(key, value)
    assert main(["train", *SMALL, "--out", str(out)]) == 2
    assert f"--out {str(out)!r} already holds a run" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    assert started == [20] and json.loads(capsys.readouterr().out)["iterations"] == 20


# --- bad launch settings ---------------------------------------------------------------------------------------

LAUNCH = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize("env, extra, message", [
    ({}, ["--set", "meta_batch_size=5"], "meta_batch_size = 5 is not allowed with 2 processes (WORLD_SIZE = 2): it "
                                         "must be a multiple of the number of processes, e.g. 4 or 6"),
    ({"WORLD_SIZE": "3"}, [], "meta_batch_size = 8 is not allowed with 3 processes (WORLD_SIZE = 3): it must be a "
                              "multiple of the number of processes, e.g. 6 or 9"),
    ({}, ["--set", "algorithm=pretrain"],
     "algorithm = 'pretrain' is not allowed with 2 processes on task = 'omniglot'"),
    ({}, ["--device", "mps"], "--device 'mps' is not allowed with 2 processes: they train on CUDA (NCCL) or the CPU"),
    ({"WORLD_SIZE": "two"}, [], "WORLD_SIZE = 'two' is not allowed: it must be an integer >= 1 (torchrun sets it)"),
    ({"RANK": "2"}, [], "RANK = '2' is not allowed: it must be an integer from 0 to 1 (torchrun sets it)"),
    ({"MASTER_ADDR": ""}, [], "WORLD_SIZE = 2 but MASTER_ADDR not set: launch the processes with torchrun"),
])
def test_bad_launch_settings_exit_2_naming_them_before_data_is_read(env, extra, message, no_data, tmp_path,
                                                                     monkeypatch, capsys):
    for key, value in {**LAUNCH, **env}.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--preset", "cpu", "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_evaluate_under_torchrun_is_refused(monkeypatch, capsys):
    for key, value in LAUNCH.items():
        monkeypatch.setenv(key, value)
    assert main(["evaluate", "missing.pt"]) == 2
    assert "evaluate runs in one process, not 2: launch it with python -m mmtl_lib" in capsys.readouterr().err


# --- run as a script: the command line with a fault injected ---------------------------------------------------

def _inject_fault(spec: str) -> None:
    kind, rank, iteration = spec.split(":")
    if os.environ.get("RANK") != rank or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    step = ml.Trainer.step

    def faulty(self):
        if self.iteration == int(iteration):
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault on rank {rank} at iteration {iteration}")
        return step(self)

    ml.Trainer.step = faulty


if __name__ == "__main__":
    if os.environ.get("MMTL_TEST_FAULT"):
        _inject_fault(os.environ["MMTL_TEST_FAULT"])
    sys.exit(main())
