"""The OpenBLAS preload and thread split: each rank re-executes itself with Debian's OpenBLAS and
cores // ranks threads, and says so in its log (read from the library, not from our variable);
the same re-exec gives it glibc allocator settings that keep freed memory for the next step."""

import os
import re

import pytest

from helpers import TINY, cli, unavailable
from mlx_train.rank import blas


def _need_openblas():
    if blas.find_openblas() is None:
        unavailable("libopenblas0-pthread is not installed (apt-get install libopenblas0-pthread)")


def test_rank_env_splits_the_cores_among_the_ranks(monkeypatch):
    _need_openblas()
    monkeypatch.delenv("MLX_TRAIN_NO_OPENBLAS", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = blas.rank_env(ranks_on_host=3, cores=8)
    assert env["OPENBLAS_NUM_THREADS"] == "2" and env["LD_PRELOAD"] == blas.find_openblas()
    assert blas.rank_env(ranks_on_host=4, cores=2)["OPENBLAS_NUM_THREADS"] == "1"  # never 0
    assert all(env[k] == v for k, v in blas.ALLOCATOR.items())
    monkeypatch.setenv("MLX_TRAIN_NO_OPENBLAS", "1")  # no preload, no thread split: the allocator's settings only
    assert blas.rank_env(ranks_on_host=1) == {**blas.ALLOCATOR, "MLX_TRAIN_BLAS_SET": "1"}


def test_needs_reexec_once(monkeypatch):
    monkeypatch.delenv("MLX_TRAIN_NO_OPENBLAS", raising=False)
    monkeypatch.delenv("MLX_TRAIN_BLAS_SET", raising=False)
    assert blas.needs_reexec()
    monkeypatch.setenv("MLX_TRAIN_BLAS_SET", "1")  # what rank_env puts in the re-executed rank
    assert not blas.needs_reexec()


@pytest.mark.multiproc
def test_two_local_ranks_run_openblas_with_half_the_cores_each(tmp_path):
    _need_openblas()
    run = tmp_path / "blas"
    cli("train", *TINY, "--devices", "2", "--steps", "2", "--run-dir", str(run), check=True)
    cores = max(1, (os.cpu_count() or 1) // 2)
    lanes = min(cores, 4, 8)  # --cpu-threads 0: a lane per core, at most the batch's 4 rows (rank/lanes.py)
    for rank in (0, 1):
        log = (run / "logs" / f"rank-{rank}.log").read_text()
        found = re.findall(r"BLAS: (.*?); allocator: (.*?); (\d+) threads? per micro-batch", log)
        # With lanes, each lane's matmuls get its share of the rank's cores (read back from OpenBLAS).
        assert found == [(f"OpenBLAS ({cores // lanes} threads)", "glibc, freed memory kept", str(lanes))], log
