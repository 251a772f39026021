"""--report-to (TensorBoard, W&B offline) and the embedded GPT's evaluation sample, on real runs.

The trackers are read back with their own readers (TensorBoard's EventAccumulator; W&B's record
protos) and must hold exactly what metrics.jsonl holds. W&B runs offline here: no account, no network.
"""

import importlib.util
import os
import signal
import struct
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

from helpers import TINY, cli, events, metrics, popen, unavailable, wait_for

COMMON = [*TINY, "--devices", "2", "--steps", "30", "--log-every", "5", "--checkpoint-every", "30", "--no-live"]


@pytest.fixture(scope="module")
def trackers():
    """The tracking packages (the test extra installs them); under CI their absence is an error."""
    for package in ("tensorboardX", "wandb", "tensorboard"):
        if importlib.util.find_spec(package) is None:
            unavailable(f"{package} is not installed: pip install -e '.[test]'")


def tensorboard_scalars(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_history(run: Path) -> list:
    """The history rows of the run's W&B offline files, in order: each a dict with its _step."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        for data in _leveldb_records(path.read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def _leveldb_records(blob: bytes) -> list:
    """Records of W&B's transaction log: a 7-byte ':W&B' header, then LevelDB's log format (32 KiB
    blocks; each fragment: crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4, data)."""
    assert blob[:4] == b":W&B", blob[:8]
    out, pos, part = [], 7, b""
    while pos + 7 <= len(blob):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", blob[pos:pos + 7])
        data = blob[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):
            out.append(part)
    return out


@pytest.fixture(scope="module", autouse=True)
def no_wandb_account(tmp_path_factory):
    """As on a machine with no W&B account: no key, no mode, no ~/.netrc. W&B must then go offline."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR"):
            mp.delenv(var, raising=False)
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, no_wandb_account, trackers):
    run = tmp_path_factory.mktemp("report") / "tracked"
    cli("train", *COMMON, "--eval-every", "10", "--report-to", "tensorboard,wandb", "--run-dir", str(run), check=True)
    return run


@pytest.mark.multiproc
def test_tensorboard_holds_the_logged_losses(tracked_run):
    ms = metrics(tracked_run)
    scalars = tensorboard_scalars(tracked_run)
    assert [s for s, _ in scalars["train/loss"]] == [m["step"] for m in ms] == [5, 10, 15, 20, 25, 30]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([m["loss"] for m in ms], rel=1e-6)
    evals = [m for m in ms if "val_loss" in m]
    assert [s for s, _ in scalars["eval/val_loss"]] == [m["step"] for m in evals] == [10, 20, 30]
    assert [v for _, v in scalars["eval/val_loss"]] == pytest.approx([m["val_loss"] for m in evals], rel=1e-6)
    assert {"train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/peak_memory_max"} <= set(scalars)


@pytest.mark.multiproc
def test_wandb_offline_run_holds_the_history(tracked_run):
    ms = metrics(tracked_run)
    rows = wandb_history(tracked_run)
    assert [r["_step"] for r in rows] == [m["step"] for m in ms]
    assert [r["train/loss"] for r in rows] == [m["loss"] for m in ms]  # JSON floats: exactly
    assert [r.get("eval/val_loss") for r in rows] == [m.get("val_loss") for m in ms]
    assert not events(tracked_run, "report_failed")


@pytest.mark.multiproc
def test_monitor_shows_the_latest_evaluation_sample(tracked_run):
    samples = [(m["step"], m["sample"]) for m in metrics(tracked_run) if "sample" in m]
    assert [s for s, _ in samples] == [10, 20, 30]  # one per evaluation, from rank 0 only
    assert all(len(text) > 24 for _, text in samples)  # the prompt and what followed it
    # The same prompt at every evaluation (the data's first line), so only what was learnt differs.
    assert len({text[:10] for _, text in samples}) == 1
    out = cli("monitor", str(tracked_run), "--once", env={"COLUMNS": "400"}, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("sample"))
    assert line.split(None, 1)[1].startswith("step 30: ") and line.isprintable()
    follow = cli("monitor", str(tracked_run), check=True).stdout  # not a terminal: one line per step
    assert follow.count("  sample: ") == 3


@pytest.mark.multiproc
def test_evaluating_and_sampling_leave_training_bit_exact(tracked_run, tmp_path):
    quiet = tmp_path / "quiet"  # evaluates (and samples) only at its last step
    cli("train", *COMMON, "--eval-every", "1000", "--run-dir", str(quiet), check=True)
    a, b = (mx.load(str(r / "checkpoints" / "step-000030" / "model.safetensors")) for r in (tracked_run, quiet))
    assert sorted(a) == sorted(b)
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k


@pytest.mark.multiproc
def test_a_tracker_that_dies_mid_run_does_not_stop_training(tmp_path, trackers):
    """SIGKILL W&B's service process under the controller: W&B raises from then on; the run goes on,
    says so once, and TensorBoard keeps every step."""
    run = tmp_path / "dies"
    proc = popen("train", *[a if a != "30" else "120" for a in COMMON], "--eval-every", "1000",
                 "--report-to", "wandb,tensorboard", "--run-dir", str(run))
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and metrics(run)[-1]["step"] >= 10, 120, "step 10")
        kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        core = [int(p) for p in kids if b"wandb-core" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert core, "no wandb-core process under the controller"
        os.kill(core[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    failed = events(run, "report_failed")
    assert [e["backend"] for e in failed] == ["wandb"], failed
    assert events(run)[-1]["event"] == "finish"
    steps = [m["step"] for m in metrics(run)]
    assert steps[-1] == 120 and failed[0]["time"] < metrics(run)[-1]["time"]
    assert [s for s, _ in tensorboard_scalars(run)["train/loss"]] == steps
    assert out.count("stopped reporting") == 1


@pytest.mark.parametrize("backend, package", [("tensorboard", "tensorboardX"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_before_anything_is_written(tmp_path, backend, package):
    # A sitecustomize that makes the package unimportable, as on a machine without it.
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "sitecustomize.py").write_text(f"import sys\nsys.modules[{package!r}] = None\n")
    run = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(stub), os.environ.get("PYTHONPATH", "")])}
    res = cli("train", *TINY, "--steps", "2", "--report-to", backend, "--run-dir", str(run), env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and f"--report-to {backend} needs {package}" in res.stderr
    assert "pip install 'mlx-train[tracking]'" in res.stderr
    assert not run.exists()


def test_an_unknown_tracker_is_one_line(tmp_path):
    res = cli("train", *TINY, "--steps", "2", "--report-to", "tensorboard,mlflow", "--run-dir", str(tmp_path / "r"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "'mlflow' is not one of" in res.stderr, res.stderr
    assert not (tmp_path / "r").exists()


def _metric(step, loss, **kw):
    return {"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 1000.0, "comm_time_s": 0.01, "devices": 2,
            "global_batch": 8, "peak_memory": [5, 7], "param_checksum": [1, 1], "time": float(step), **kw}


def test_steps_a_restarted_attempt_logs_again_reach_the_trackers_once(tmp_path, trackers):
    """After a restart the ranks log again the steps since the checkpoint; trackers want steps that only
    go up, so the repeats (bit-exact) are not sent twice, also across a controller restart (--resume)."""
    from mlx_train.config import TrainConfig
    from mlx_train.controller.reporting import Reporters
    from mlx_train.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.prepare(TrainConfig(steps=30), resume=False)
    first = Reporters(run, ["tensorboard"], TrainConfig(steps=30))
    for step, loss in ((5, 3.0), (10, 2.5), (5, 3.0), (10, 2.5), (15, 2.0)):
        run.append(run.metrics_path, _metric(step, loss))
        first.log(step, _metric(step, loss))
    first.close()
    second = Reporters(run, ["tensorboard"], TrainConfig(steps=30))  # a resumed controller
    for step, loss in ((15, 2.0), (20, 1.5)):
        second.log(step, _metric(step, loss, sample="def f():"))
    second.close()
    assert [s for s, _ in tensorboard_scalars(run.path)["train/loss"]] == [5, 10, 15, 20]
    assert tensorboard_scalars(run.path)["perf/peak_memory_max"][0] == (5, 7.0)
    assert not events(run.path, "report_failed")


def test_monitor_snapshot_keeps_the_latest_sample(tmp_path):
    from rich.console import Console

    from mlx_train.config import TrainConfig
    from mlx_train.controller.monitor import render, take_snapshot
    from mlx_train.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.prepare(TrainConfig(steps=30), resume=False)
    for m in (_metric(10, 3.0, sample="old\ttext"), _metric(20, 2.0, sample="new\nline\x07!"), _metric(25, 1.9),
              _metric(26, 1.8, sample=17)):  # a hand-edited record's non-text sample is ignored
        run.append(run.metrics_path, m)
    snap = take_snapshot(run)
    assert snap.sample == (20, "new\nline\x07!")
    console = Console(width=200, record=True)
    console.print(render(snap))
    assert "sample    step 20: new⏎line·!" in console.export_text()


def test_the_sample_decodes_as_the_model_computes_and_draws_nothing_from_the_training_stream():
    import numpy as np

    from mlx_train.config import ModelConfig
    from mlx_train.rank import sample
    from mlx_train.rank.model import GPT

    mx.random.seed(3)
    model = GPT(ModelConfig(n_layers=2, d_model=64, n_heads=2, seq_len=64))
    x = mx.array(np.random.default_rng(0).integers(0, 256, (1, 50)), dtype=mx.int32)
    cache = [None] * len(model.blocks)
    steps = [sample.forward(model, x[:, :20], 0, cache)] + [sample.forward(model, x[:, i:i + 1], i, cache)
                                                            for i in range(20, 50)]
    assert mx.allclose(mx.concatenate(steps, axis=1), model(x), atol=1e-5).item()  # the keys and values kept
    before = np.array(mx.random.state[0])
    prompt = sample.prompt_from(np.frombuffer(b"# header\nimport os\nprint(os.sep)\n" * 4, dtype=np.uint8), 64)
    assert bytes(prompt.astype(np.uint8)) == b"import os\nprint(os.sep)\n"
    text = sample.generate(model, prompt, 64, seed=0)
    assert text.startswith("import os\n") and text == sample.generate(model, prompt, 64, seed=0)
    assert len(text.encode()) >= 64  # prompt and sample fill the model's 64 positions (a bad byte decodes to 3)
    assert (np.array(mx.random.state[0]) == before).all(), "sampling moved the global random state"
