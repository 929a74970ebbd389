"""Kill soak: a cache build and a student run killed with SIGKILL at random moments and rerun until done; every
final store and checkpoint must equal an uninterrupted run's, array for array and tensor for tensor.

    python -m tools.kill_soak --kills 20 --out runs/soak                 # local store, 20 kills of each
    python -m tools.kill_soak --kills 20 --store s3 --out runs/soak-s3   # store and shards on a local S3 server

What it does: makes a tiny transfer set (seeded random images) and a random test_vit teacher, runs the build and
the student once uninterrupted (the references, timed), then for each of the two commands repeats rounds: start
it, SIGKILL its whole process group (DataLoader workers included) after a random time drawn uniformly from
(0, the reference's duration), rerun, and so on until a run ends by itself; the round's result is then compared
with the reference and the next round starts afresh, until `--kills` kills have been made. A kill lands anywhere:
in start-up, in the PCA fit, between a shard's arrays and its marker, in a state save. Runs are single-threaded
(OMP_NUM_THREADS=1) so that "equal" means bit-identical. Prints one JSON summary; exit 1 if any round differs.

Also here, for the tests that lose a node: `torchrun_nodes` starts one torchrun launcher per "node" on this host
with a c10d rendezvous on 127.0.0.1 (as `srun torchrun ...` starts one per node), and `store_arrays` /
`checkpoint_tensors` are what "equal" compares.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# -------------------------------------------------------------------------------------------- comparing
def store_arrays(url) -> dict[str, np.ndarray]:
    """Every array of every complete shard, their checksums, and the codec states: what "the same store" is."""
    from kt.teacher_cache.store import CacheStore

    store = CacheStore.open(str(url))
    out = {}
    for sid, marker in store.completed().items():
        for path in marker["checksums"]:
            out[f"{sid}/{path}"] = store.group[f"shards/{sid}/{path}"][...]
        out[f"{sid}/checksums"] = np.array(sorted(marker["checksums"].items()))
    for target in store.attrs["targets"]:
        state = store.read_codec_state(target)
        for name, value in (state[1] if state else {}).items():
            out[f"codecs/{target}/{name}"] = value
    return out


def store_differences(a, b) -> list[str]:
    """Paths where two caches differ ([] when they hold the same arrays)."""
    x, y = store_arrays(a), store_arrays(b)
    diff = sorted(set(x) ^ set(y))
    diff += [p for p in sorted(set(x) & set(y)) if x[p].dtype != y[p].dtype or not np.array_equal(x[p], y[p])]
    return diff


def checkpoint_tensors(run) -> dict:
    """The student's tensors and the objective's (projections, temperature) of a finished run folder."""
    from safetensors.torch import load_file

    run = Path(run)
    out = {f"model/{k}": v for k, v in load_file(str(run / "checkpoint" / "model.safetensors")).items()}
    if (run / "objective.safetensors").exists():
        out.update({f"objective/{k}": v for k, v in load_file(str(run / "objective.safetensors")).items()})
    return out


def checkpoint_differences(a, b) -> list[str]:
    import torch

    x, y = checkpoint_tensors(a), checkpoint_tensors(b)
    return sorted(set(x) ^ set(y)) + [k for k in sorted(set(x) & set(y)) if not torch.equal(x[k], y[k])]


# -------------------------------------------------------------------------------------------- processes
def env(**extra: str) -> dict[str, str]:
    """The environment of a kt subprocess: single-threaded (bit-identical results), kt from this checkout."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(args: list[str], nodes: int = 2, environ: dict | None = None, log: Path | None = None,
                   run_id: str = "kt") -> list[subprocess.Popen]:
    """One `torchrun --nnodes N --nproc-per-node 1` launcher (`python -m torch.distributed.run`) per node, joined by a
    c10d rendezvous on 127.0.0.1: the first launcher hosts the rendezvous store, as the first node of a SLURM job
    would. Each launcher leads a process group of its own; `kill_group` on it is losing the node."""
    port = free_port()
    procs = []
    for node in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
               "--rdzv-conf", f"is_host={int(node == 0)}", "--max-restarts", "0", *args]
        out = open(f"{log}.node{node}", "ab") if log else subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=environ or env(), stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill a process and everything it started, as losing its node would: its process group and every descendant
    (torchrun starts each rank in a session of its own, so the group alone would leave the ranks running)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)  # before the kill: orphans lose their parent
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for child in family:
        try:
            child.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll `predicate()` until true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# ------------------------------------------------------------------------------------------------ the soak
def make_inputs(out: Path, shards: int = 6, per_shard: int = 8) -> tuple[str, list[str]]:
    """A random test_vit teacher (10 classes, 32 px) and `shards` shards of seeded random images."""
    import torch

    from kt.checkpoints import save_checkpoint
    from kt.models import create_model
    from kt.shards import write_shards
    from PIL import Image

    rng = np.random.default_rng(0)
    images = ((f"k{i:04d}", Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)), i % 10)
              for i in range(shards * per_shard))
    urls = write_shards(images, out / "shards", prefix="soak", maxcount=per_shard)
    torch.manual_seed(0)
    teacher = save_checkpoint(create_model("test_vit", num_classes=10, image_size=32), out / "teacher",
                              classes=[f"c{i}" for i in range(10)])
    return str(teacher), urls


def build_argv(teacher: str, data: str, store: str) -> list[str]:
    return ["-m", "kt.teacher_cache.cli", "build", "--teacher", teacher, "--data", data, "--out", store,
            "--views", "2", "--targets", "logits,embedding,patches", "--codec", "patches=pca:d=16,int8",
            "--batch-size", "4", "--workers", "0", "--fit-views", "64"]


def train_argv(cache: str, data: str, out: str, workers: int = 0) -> list[str]:
    return ["-m", "kt.student.cli", "train", "--model", "test_vit", "--cache", cache, "--data", data,
            "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--workers", str(workers),
            "--objective", "task", "--save-every", "1", "--out", out]


def run(argv: list[str], environ: dict, log: Path, timeout: float = 900) -> float:
    """Run to the end; its duration in seconds (a failure raises, with the log's tail)."""
    start = time.monotonic()
    with open(log, "ab") as f:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=environ, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({done.returncode}): {log.read_text()[-2000:]}")
    return time.monotonic() - start


def soak(argv_for, differences, kills: int, duration: float, rng: random.Random, environ: dict, log: Path) -> dict:
    """Rounds of kill-and-rerun (see the module docstring); `argv_for(round)` is the command of a round (a new output
    each), `differences(round)` compares its result with the reference."""
    made, rounds, reruns, differing = 0, 0, 0, []
    while made < kills:
        argv = argv_for(rounds)
        while True:
            delay = rng.uniform(0, duration) if made < kills else None
            with open(log, "ab") as f:
                proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=environ, stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    proc.wait(timeout=delay if delay is not None else 900)
                except subprocess.TimeoutExpired:
                    if delay is None:
                        raise
                    kill_group(proc)
                    made += 1
                    reruns += 1
                    print(f"kill {made} of {kills} after {delay:.1f} s (round {rounds})", file=sys.stderr, flush=True)
                    continue
            if proc.returncode != 0:
                raise RuntimeError(f"a rerun failed ({proc.returncode}): {log.read_text()[-2000:]}")
            break
        diff = differences(rounds)
        if diff:
            differing.append({"round": rounds, "differences": diff[:10]})
        print(f"round {rounds} ended after {made} kills in all: {'DIFFERS' if diff else 'equal'} to the reference",
              file=sys.stderr, flush=True)
        rounds += 1
    return {"kills": made, "rounds": rounds, "reruns": reruns, "rounds_differing": differing}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.kill_soak", description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of each command")
    parser.add_argument("--store", choices=("local", "s3"), default="local",
                        help="where shards and cache live: a local folder, or a local S3 server (tools.s3_server)")
    parser.add_argument("--what", default="build,train", help="build, train or both")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--out", default="runs/kill-soak", help="work folder (replaced)")
    parser.add_argument("--json", action="store_true", help="(the summary is always one JSON line)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out / "soak.log"
    teacher, urls = make_inputs(out)
    server, here = None, contextlib.nullcontext()
    environ = env()
    if args.store == "s3":
        import fsspec

        from tools.s3_server import S3Server

        server = S3Server(log=out / "s3server.log").start()
        environ = env(**server.env())
        here = server.environ()  # this process compares the stores there
        here.__enter__()
        server.make_bucket("soak")
        fsspec.filesystem("s3").put(urls, "soak/shards/")
        names = ",".join(Path(u).name for u in urls)
        data, where = f"s3://soak/shards/{{{names}}}", "s3://soak"
    else:
        data, where = "::".join(urls), str(out)
    rng = random.Random(args.seed)
    summary: dict = {"store": args.store, "seed": args.seed}
    try:
        ref_store = f"{where}/ref.zarr"
        build_s = run(build_argv(teacher, data, ref_store), environ, log)
        summary["reference_build_s"] = round(build_s, 1)
        if "build" in args.what:
            summary["build"] = soak(lambda r: build_argv(teacher, data, f"{where}/round{r}.zarr"),
                                    lambda r: store_differences(ref_store, f"{where}/round{r}.zarr"),
                                    args.kills, build_s, rng, environ, log)
        if "train" in args.what:
            ref_run = out / "ref-run"
            train_s = run(train_argv(ref_store, data, str(ref_run)), environ, log)
            summary["reference_train_s"] = round(train_s, 1)
            summary["train"] = soak(lambda r: train_argv(ref_store, data, str(out / f"run{r}")),
                                    lambda r: checkpoint_differences(ref_run, out / f"run{r}"),
                                    args.kills, train_s, rng, environ, log)
    finally:
        if server is not None:
            here.__exit__(None, None, None)
            server.stop()
    ok = all(not summary[k]["rounds_differing"] for k in ("build", "train") if k in summary)
    summary["ok"] = ok
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
