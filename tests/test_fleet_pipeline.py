"""A base that fits no single host fine-tuned through a 2-stage pipeline on the test fleet (docs/pipeline.md).

h1 and h2 are capped (cgroup memory limit, tools/fleet.py limit) at CAP, and the cluster file says so
(as `configure` records a limited host). The base, a 12-layer llama made offline (570 MB of fp32
weights), cannot load on one of them: a bare `mlx_lm` load is killed by the OOM killer, and a
one-device run is refused before launch. `--pipeline-stages auto` on the two picks 2 stages; each
rank reads only its 6 layers' weights, stays under the cap, and the LoRA fine-tune's losses are a
one-process run's (given the memory, on this machine) within 1e-5 relative; its adapters load in
`mlx_lm` with the base and are the one-process run's.
"""
from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

import fleet as fleet_tools  # tools/fleet.py (conftest.py puts it on the path)
import fleet_limits
from helpers import MLX_TRAIN, assert_ranks_gone, cli, events, fleet_env, metrics, rank_pids, unavailable
from tiny_llama import make_chat_data, make_model_dir

pytestmark = pytest.mark.fleet

M = 1 << 20
# A rank holds ~170 MB besides MLX's own arrays (interpreter, MLX, mlx-lm, the tokenizer): measured
# VmHWM 431-444 MB for stages of 5 such layers. A stage here holds 6 (285 MB): ~470 MB, under CAP by
# ~110 MB; a bare load of the whole base (~80 MB interpreter + 570 MB) is ~60 MB over it. The
# planner's budget, 0.9 of CAP (528 MB), is under the whole model's step (~610 MB) and over a stage's.
CAP = 560 * M
BASE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=8,
            num_key_value_heads=4)
STEPS = 2
FT = ["--fine-tune", "lora", "--lora-layers", "-1", "--lora-rank", "4", "--seq-len", "32", "--batch-size", "1",
      "--accumulation", "2", "--lr", "2e-3", "--warmup", "1", "--no-live", "--mask-prompt", "--eval-every", "1000",
      "--steps", str(STEPS), "--log-every", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The base and its chat data, under /tmp (every fleet host sees it: nothing to ship)."""
    d = tmp_path_factory.mktemp("pipeline-base")
    return make_model_dir(d / "llama12", **BASE), make_chat_data(d / "chat")


@pytest.fixture(scope="module")
def capped(fleet, cluster, tmp_path_factory):
    """h1 and h2 at CAP, and a cluster file that records it; the limits lifted after the module."""
    data = yaml.safe_load(Path(cluster).read_text())
    for h in data["hosts"]:
        if h["name"] in ("h1", "h2"):
            h["memory"] = CAP
    path = tmp_path_factory.mktemp("capped") / "cluster.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        for h in ("h1", "h2"):
            fleet_tools.limit(h, None, CAP)
    except fleet_limits.LimitsUnavailable as e:
        unavailable(str(e))
    try:
        yield path
    finally:
        for h in ("h1", "h2"):
            fleet_tools.limit(h)


def _hwm(pids, seen: dict) -> None:
    """Each live pid's peak resident set (VmHWM), kB; the fleet shares this machine's pid namespace."""
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    seen[pid] = max(seen.get(pid, 0), int(line.split()[1]))
        except OSError:
            pass


def test_a_base_that_fits_no_host_trains_through_two_stages(fleet, capped, base, tmp_path):
    model, data = base
    whole = (model / "model.safetensors").stat().st_size

    # One host cannot even load it: the OOM killer ends a bare mlx_lm load inside h1's group.
    load = (f"from pathlib import Path; import mlx.core as mx; from mlx_lm.utils import load_model; "
            f"m, _ = load_model(Path({str(model)!r})); mx.eval(m.parameters())")
    python = next(h["python"] for h in yaml.safe_load(capped.read_text())["hosts"] if h["name"] == "h1")
    res = fleet.ssh("h1", f"{python} -c {shlex.quote(load)}; echo rc=$?", timeout=120)
    assert res.stdout.split()[-1] == "rc=137", res.stdout[-500:] + res.stderr[-500:]
    # ... and a one-device run is refused before launch, in one line.
    one = tmp_path / "one"
    res = subprocess.run([MLX_TRAIN, "train", "--cluster", str(capped), "--model", str(model), "--data", str(data),
                          *FT, "--devices", "1", "--run-dir", str(one)],
                         env=fleet_env(fleet), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stdout[-2000:] + res.stderr
    assert not one.exists()

    run = tmp_path / "pipelined"
    proc = subprocess.Popen([MLX_TRAIN, "train", "--cluster", str(capped), "--model", str(model), "--data", str(data),
                             *FT, "--devices", "2", "--pipeline-stages", "auto", "--run-dir", str(run)],
                            env=fleet_env(fleet), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    hwm: dict = {}
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline:
        _hwm(rank_pids(run) if (run / "events.jsonl").exists() else [], hwm)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "--pipeline-stages auto: 2 stages (stage 0: layers 0-5" in out, out[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["dist"]["pipeline_stages"] == 2
    assert [r["host"] for r in events(run, "launch")[0]["ranks"]] == ["h1", "h2"]
    assert not events(run, "oom") and events(run)[-1]["event"] == "finish", events(run)[-3:]

    # The one-process run, given the memory (this machine, no cap): the same losses.
    ref = tmp_path / "one-process"
    cli("train", "--model", str(model), "--data", str(data), *FT, "--devices", "1", "--run-dir", str(ref),
        check=True, timeout=400)
    ours, theirs = metrics(run), metrics(ref)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == list(range(1, STEPS + 1))
    for a, b in zip(ours, theirs):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a["loss"], b["loss"])

    # Each stage held about half the base: MLX's peak per rank, and each rank's resident peak under CAP.
    stage_peaks = [max(m["peak_memory"][r] for m in ours) for r in range(2)]
    one_peak = max(m["peak_memory"][0] for m in theirs)
    rss = sorted(kb * 1024 for kb in hwm.values())
    print(f"base {whole / 1e6:.0f} MB, cap {CAP / 1e6:.0f} MB; MLX peak per stage "
          f"{[round(p / 1e6) for p in stage_peaks]} MB against one process's {one_peak / 1e6:.0f} MB; "
          f"ranks' peak RSS {[round(r / 1e6) for r in rss]} MB")
    assert len(rss) == 2 and max(rss) < CAP, rss
    assert max(stage_peaks) < 0.6 * one_peak, (stage_peaks, one_peak)

    # The adapters are one set in mlx-lm's layout: they load with the base, and are the one process's.
    from mlx_lm import load as mlx_lm_load

    mlx_lm_load(str(model), adapter_path=str(run / "adapters"))
    a = mx.load(str(run / "adapters" / "adapters.safetensors"))
    b = mx.load(str(ref / "adapters" / "adapters.safetensors"))
    assert sorted(a) == sorted(b) and len(a) == 12 * 7 * 2, sorted(a)[:4]
    for k in b:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    assert_ranks_gone(rank_pids(run))
