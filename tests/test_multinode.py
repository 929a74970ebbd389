"""Jobs that lose a node: `torchrun --nnodes 2 --nproc-per-node 1` launchers on this host, joined by a c10d
rendezvous on 127.0.0.1 as two nodes of a cluster join (`tools.kill_soak.torchrun_nodes`; CPU ranks join with gloo).

A node is lost by SIGKILL of its launcher's process group (launcher and rank). The rank on the surviving node
then waits at its next collective; a scheduler ends such a job step (SLURM does when a node fails), and so does
the test, before rerunning both launchers: the build must end equal to an uninterrupted one-process build, the
student run must resume and end as the uninterrupted two-node run ended, tensor for tensor.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.test_cache_cli import RESUME_BUILD, assert_same_store, one_process_build, small_shards  # noqa: F401
from tests.test_reader import build_args, tiny_teacher  # noqa: F401
from tools.kill_soak import checkpoint_differences, kill_group, torchrun_nodes, wait_for

pytestmark = pytest.mark.slow
TIMEOUT = 900  # seconds for a two-node job on a loaded 2-core box


def finish(nodes, what: str, log: Path) -> None:
    """Wait for every launcher; each must exit 0."""
    for i, node in enumerate(nodes):
        rc = node.wait(TIMEOUT)
        tail = Path(f"{log}.node{i}").read_text()[-3000:] if Path(f"{log}.node{i}").exists() else ""
        assert rc == 0, f"{what}: node {i} exited {rc}\n{tail}"


def lose_a_node(nodes) -> None:
    """Node 1 dies (SIGKILL of everything on it); the survivor's step is ended as a scheduler ends it."""
    kill_group(nodes[1])
    kill_group(nodes[0], signal.SIGKILL)


def test_build_that_loses_a_node_reruns_to_the_one_process_build(tiny_teacher, small_shards,  # noqa: F811
                                                                 one_process_build, tmp_path):
    out = tmp_path / "two-nodes.zarr"
    args = ["-m", "kt.teacher_cache.cli", *build_args(tiny_teacher, small_shards, out, *RESUME_BUILD)]
    nodes = torchrun_nodes(args, log=tmp_path / "killed", run_id="build-1")

    def some_complete() -> bool:
        assert all(n.poll() is None for n in nodes), "a node ended before the kill"
        return bool(list((out / "complete").glob("*/zarr.json")))

    wait_for(some_complete, TIMEOUT, "a complete shard")
    lose_a_node(nodes)
    done = len(list((out / "complete").glob("*/zarr.json")))
    assert 1 <= done <= 4
    rerun = torchrun_nodes(args, log=tmp_path / "rerun", run_id="build-2")
    finish(rerun, "rerun", tmp_path / "rerun")
    summaries = [json.loads(line) for i in range(2) for line in Path(f"{tmp_path / 'rerun'}.node{i}").read_text()
                 .splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert sum(s["shards_skipped"] for s in summaries) == done
    assert_same_store(one_process_build, out)


def test_student_run_that_loses_a_node_resumes_to_the_uninterrupted_run(one_process_build, small_shards,  # noqa: F811
                                                                        tmp_path):
    def train(out: Path) -> list[str]:
        return ["-m", "kt.student.cli", "train", "--model", "test_vit", "--cache", str(one_process_build),
                "--data", "::".join(small_shards), "--image-size", "32", "--batch-size", "4", "--epochs", "2",
                "--workers", "0", "--objective", "task", "--save-every", "1", "--out", str(out)]

    reference = torchrun_nodes(train(tmp_path / "whole"), log=tmp_path / "whole", run_id="train-1")
    finish(reference, "uninterrupted", tmp_path / "whole")
    out = tmp_path / "killed"
    nodes = torchrun_nodes(train(out), log=tmp_path / "killed", run_id="train-2")

    def saved_twice() -> bool:
        assert all(n.poll() is None for n in nodes), "a node ended before the kill"
        progress = out / "state" / "progress.json"
        return progress.exists() and json.loads(progress.read_text())["global_step"] >= 2

    wait_for(saved_twice, TIMEOUT, "the run's second save")
    lose_a_node(nodes)
    assert not (out / "checkpoint").exists()
    rerun = torchrun_nodes(train(out), log=tmp_path / "rerun", run_id="train-3")
    finish(rerun, "rerun", tmp_path / "rerun")
    assert "resuming at epoch" in Path(f"{tmp_path / 'rerun'}.node0").read_text() + \
        Path(f"{tmp_path / 'rerun'}.node1").read_text()
    assert checkpoint_differences(tmp_path / "whole", out) == []
