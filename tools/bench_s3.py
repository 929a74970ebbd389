"""Remote reads priced: requests and bytes a student step costs when the cache and the shards are on s3://.

    python -m tools.bench s3 --json                  # 8 shards of 64 images, batch 32, 2 DataLoader workers

A local S3 server (`tools.s3_server`: moto's, counting every request and response byte it serves, whichever
process or DataLoader worker sent it) holds a transfer set and a cache built from it (logits top-k and int8
patches of a random test_vit teacher). `kt-student train` runs as a user runs it, once for one epoch and once
for two: the difference is one epoch of streaming, divided by its steps to give requests and bytes per step; what
the first run spends besides is the start-up (the cache's attributes and markers, and the pass that checks the
data against the cache before training). Also reported: requests per shard read in an epoch, bytes read over
the bytes stored (1.0: each object read once an epoch), and requests per shard a build writes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.bench s3", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=8, help="input shards")
    parser.add_argument("--per-shard", type=int, default=64, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=32, help="student batch size")
    parser.add_argument("--workers", type=int, default=2, help="student DataLoader workers")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _train(data: str, cache: str, out: Path, epochs: int, args, env: dict) -> dict:
    cmd = [sys.executable, "-m", "kt.student.cli", "train", "--model", "test_vit", "--cache", cache, "--data", data,
           "--image-size", "32", "--batch-size", str(args.batch_size), "--epochs", str(epochs),
           "--workers", str(args.workers), "--objective", "task", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"kt-student train failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    import fsspec

    from tools.kill_soak import env as kt_env
    from tools.kill_soak import make_inputs
    from tools.s3_server import S3Server

    work = Path(tempfile.mkdtemp(prefix="kt-bench-s3-"))
    try:
        teacher, urls = make_inputs(work, shards=args.shards, per_shard=args.per_shard)
        with S3Server() as server, server.environ():
            env = kt_env(**server.env())
            server.make_bucket("bench")
            fs = fsspec.filesystem("s3")
            fs.put(urls, "bench/shards/")
            data = "s3://bench/shards/{" + ",".join(Path(u).name for u in urls) + "}"
            cache = "s3://bench/cache.zarr"
            server.counts(reset=True)
            build = subprocess.run([sys.executable, "-m", "kt.teacher_cache.cli", "build", "--teacher", teacher,
                                    "--data", data, "--out", cache, "--views", "2", "--targets", "logits,patches",
                                    "--codec", "patches=int8", "--workers", "0"], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=1800, check=False)
            if build.returncode != 0:
                raise RuntimeError(f"kt-cache build failed: {build.stderr[-2000:]}")
            built = server.counts(reset=True)
            shard_bytes = sum(fs.size(f"bench/shards/{Path(u).name}") for u in urls)
            cache_bytes = int(fs.du("bench/cache.zarr", total=True))
            one = _train(data, cache, work / "one", 1, args, env)
            first = server.counts(reset=True)
            _train(data, cache, work / "two", 2, args, env)
            second = server.counts(reset=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps = one["steps"]
    epoch_requests = second["requests"] - first["requests"]
    epoch_bytes = second["bytes_out"] - first["bytes_out"]
    return {
        "shards": args.shards, "samples": args.shards * args.per_shard, "batch_size": args.batch_size,
        "workers": args.workers, "steps_per_epoch": steps,
        "stored_bytes": {"shards": shard_bytes, "cache": cache_bytes},
        "build": {"requests": built["requests"], "requests_per_shard": round(built["requests"] / args.shards, 1),
                  "by_method": built["by_method"]},
        "epoch": {"requests": epoch_requests, "bytes": epoch_bytes,
                  "requests_per_step": round(epoch_requests / steps, 2),
                  "bytes_per_step": round(epoch_bytes / steps),
                  "requests_per_shard": round(epoch_requests / args.shards, 1),
                  "bytes_over_stored": round(epoch_bytes / (shard_bytes + cache_bytes), 3)},
        "startup": {"requests": first["requests"] - epoch_requests, "bytes": first["bytes_out"] - epoch_bytes},
        "one_epoch_run": first, "two_epoch_run": second,
    }
