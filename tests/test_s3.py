"""Shards and caches on s3://, against a real S3-protocol server on 127.0.0.1 (moto's server, `tools.s3_server`),
reached through s3fs with the standard AWS variables, as a user's cluster reaches S3.

Equivalence: a cache built from s3:// shards into an s3:// store equals the local build array for array; a student
trained from them (DataLoader workers > 0) equals the one trained from the local copies; a build killed mid-shard
and rerun equals the uninterrupted local build. Refusals: a second build into the store, a missing bucket, denied
credentials, a missing protocol package: one line, exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs", reason="the s3 extra (pip install 'kt[s3]') is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")

from kt.checkpoints import load_checkpoint  # noqa: E402
from kt.teacher_cache.cli import main  # noqa: E402
from kt.teacher_cache.lock import StoreLock  # noqa: E402
from kt.teacher_cache.store import CacheStore  # noqa: E402
from tests.test_cache_cli import RESUME_BUILD as BUILD, assert_same_store, single_thread_build  # noqa: E402
from tests.test_cache_cli import one_process_build, small_shards  # noqa: E402,F401
from tests.test_reader import build_args, tiny_teacher  # noqa: E402,F401
from tools.kill_soak import wait_for  # noqa: E402
from tools.s3_server import S3Server, forget_s3_filesystems  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["train", "--model", "test_vit", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
         "--objective", "task", "--workers", "2"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    with S3Server(log=tmp_path_factory.mktemp("s3server") / "server.log") as server:
        yield server


def _bucket(server, monkeypatch) -> SimpleNamespace:
    for key, value in server.env().items():  # in-process CLI calls read them as any boto client does
        monkeypatch.setenv(key, value)
    forget_s3_filesystems()  # none made for another server (the kill soak's) answers for this one
    name = f"kt-{uuid.uuid4().hex[:12]}"
    server.make_bucket(name)
    env = {**os.environ, **server.env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return SimpleNamespace(server=server, url=f"s3://{name}", name=name, env=env)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the session's server, its variables set in this process; `env` for subprocesses."""
    return _bucket(s3_server, monkeypatch)


def upload(s3, paths, prefix: str = "shards") -> str:
    """Copy local shards (and the classes.json beside them) to the bucket; the brace spec of the copies."""
    import fsspec

    fs = fsspec.filesystem("s3")
    paths = [str(p) for p in paths]
    extra = [str(Path(paths[0]).parent / "classes.json")] if (Path(paths[0]).parent / "classes.json").exists() else []
    fs.put(paths + extra, f"{s3.name}/{prefix}/")
    names = ",".join(Path(p).name for p in paths)
    return f"{s3.url}/{prefix}/{{{names}}}"


def one_line(capsys, rc: int, prog: str = "kt-cache") -> str:
    assert rc == 2
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "\r" not in line and line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


def checkpoint_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint").state_dict()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------- end to end
def test_s3_build_info_verify_train_equal_local(s3, tiny_teacher, small_shards, one_process_build,  # noqa: F811
                                                tmp_path, capsys):
    """Shards on s3://, the cache built into s3://, info and verify on it, then a student trained from both with
    two DataLoader workers (a reader opened before the fork serves the workers: each opens its own filesystem)
    equals the student trained from the local cache and shards, tensor for tensor."""
    data = upload(s3, small_shards)
    store = f"{s3.url}/cache.zarr"
    single_thread_build(build_args(tiny_teacher, data, store, *BUILD))
    assert_same_store(one_process_build, store)
    capsys.readouterr()
    assert main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shards"]["complete"] == 4 and info["samples"] == 48
    assert main(["verify", store, "--samples", "8"]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")

    from kt.student.cli import main as student

    assert student([*TRAIN, "--cache", store, "--data", data, "--out", str(tmp_path / "s3")]) == 0
    assert student([*TRAIN, "--cache", str(one_process_build), "--data", "::".join(small_shards),
                    "--out", str(tmp_path / "local")]) == 0
    assert_same_tensors(checkpoint_tensors(tmp_path / "s3"), checkpoint_tensors(tmp_path / "local"))


def test_zarr_sees_no_foreign_objects_in_a_cache(one_process_build):
    """Completion markers are Zarr nodes: zarr's own walk of the hierarchy finds nothing it does not recognise
    (format 2 kept them as plain objects: "Object at complete is not recognized as a component ...")."""
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = dict(zarr.open_group(str(one_process_build), mode="r").members(max_depth=None))
    assert "complete/small-000000" in members and "shards/small-000000/keys" in members


def test_format_2_cache_reads_and_resumes_as_format_3(tiny_teacher, small_shards, one_process_build,  # noqa: F811
                                                      tmp_path, capsys):
    """A cache written with format 2's markers (plain complete/<id>.json objects) still reads; a build resumed on
    it moves the markers to their nodes, raises the format, and redoes nothing."""
    import shutil

    import zarr

    old = tmp_path / "old.zarr"
    shutil.copytree(one_process_build, old)
    for node in sorted((old / "complete").iterdir()):  # back to format 2's layout
        if node.is_dir():
            marker = json.loads((node / "zarr.json").read_text())["attributes"]
            (old / "complete" / f"{node.name}.json").write_text(json.dumps(marker))
            shutil.rmtree(node)
    (old / "complete" / "zarr.json").unlink()
    zarr.open_group(str(old), mode="r+").attrs["kt_cache_format"] = 2
    assert CacheStore.open(str(old)).attrs["kt_cache_format"] == 2
    assert_same_store(one_process_build, old)
    capsys.readouterr()
    assert main(build_args(tiny_teacher, small_shards, old, *BUILD)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards_skipped"] == 4 and summary["shards_written"] == 0
    assert CacheStore.open(str(old)).attrs["kt_cache_format"] == 3
    assert [p.name for p in (old / "complete").glob("*.json")] == ["zarr.json"]  # the group's own, no old marker
    assert_same_store(one_process_build, old)


def test_retrieve_embeds_s3_shards_as_local_ones(s3, tmp_path):
    from kt.retrieval.cli import main as retrieve
    from kt.retrieval.embeddings import load_embeddings
    from tests.test_retrieval_cli import EMBED, make_shards

    make_shards(tmp_path, "gal", 10, per_shard=5)
    local = sorted(str(p) for p in (tmp_path / "gal").glob("*.tar"))
    data = upload(s3, local, "gal")
    assert retrieve(["embed", *EMBED, "--data", data, "--out", str(tmp_path / "s3.emb")]) == 0
    assert retrieve(["embed", *EMBED, "--data", "::".join(local), "--out", str(tmp_path / "local.emb")]) == 0
    a, b = load_embeddings(tmp_path / "s3.emb"), load_embeddings(tmp_path / "local.emb")
    assert list(a.keys) == list(b.keys) and np.array_equal(a.read(0, len(a)), b.read(0, len(b)))


def test_a_glob_of_s3_shards_lists_the_bucket_as_a_local_glob_lists_a_folder(s3, tmp_path):
    """`s3://bucket/prefix/train-*.tar` is listed by s3fs and sorted, as `train-*.tar` is globbed locally;
    nothing matching is one line naming the pattern."""
    from kt.errors import UserError
    from kt.shards import expand_shards
    from tests.test_retrieval_cli import make_shards

    make_shards(tmp_path, "gal", 12, per_shard=4)
    local = sorted(str(p) for p in (tmp_path / "gal").glob("*.tar"))
    upload(s3, local, "gal")
    found = expand_shards(f"{s3.url}/gal/*.tar")
    assert [u.rsplit("/", 1)[1] for u in found] == [Path(p).name for p in expand_shards(str(tmp_path / "gal" / "*.tar"))]
    assert all(u.startswith(f"{s3.url}/gal/") for u in found) and len(found) == len(local) > 1
    with pytest.raises(UserError, match="no shards match"):
        expand_shards(f"{s3.url}/gal/nothing-*.tar")


# ----------------------------------------------------------------------------------------- one writer
def test_second_build_into_an_s3_store_is_refused(s3, tiny_teacher, small_shards, capsys):  # noqa: F811
    """A lock object held by a build on another host: one line naming the object to remove, exit 2; nothing of
    the store is written."""
    store = f"{s3.url}/cache.zarr"
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{s3.name}/cache.zarr.lock", json.dumps({"host": "node-7", "pid": 4242, "created": "then"}).encode())
    line = one_line(capsys, main(build_args(tiny_teacher, small_shards[:1], store, *BUILD)))
    assert "pid 4242 on node-7" in line and f"remove {store}.lock once that build is known to be dead" in line
    assert not fs.exists(f"{s3.name}/cache.zarr")


def test_lock_is_a_conditional_create(s3, monkeypatch):
    """Two builds that both find no lock (a race: each looked before the other created it) are still one writer:
    the create is PutObject If-None-Match: *, which the server refuses for the second."""
    first, second = StoreLock(f"{s3.url}/c.zarr"), StoreLock(f"{s3.url}/c.zarr")
    first.acquire()
    monkeypatch.setattr(second.fs, "exists", lambda path: False)  # it looked too early to see the first
    monkeypatch.setattr("kt.teacher_cache.lock.platform.node", lambda: "another-host")  # not stale from here
    second.owner["host"] = "another-host"
    from kt.errors import UserError

    with pytest.raises(UserError, match="being written by another build"):
        second.acquire()
    first.release()
    second.acquire()  # gone: taken
    second.release()


# ----------------------------------------------------------------------------------------- bad input
def test_missing_bucket_is_one_line(s3, tiny_teacher, small_shards, tmp_path, capsys):  # noqa: F811
    nobucket = "s3://kt-no-such-bucket"
    line = one_line(capsys, main(build_args(tiny_teacher, small_shards[:1], f"{nobucket}/c.zarr", *BUILD)))
    assert "bucket 'kt-no-such-bucket' does not exist" in line
    assert "bucket 'kt-no-such-bucket' does not exist" in one_line(capsys, main(["info", f"{nobucket}/c.zarr"]))
    line = one_line(capsys, main(build_args(tiny_teacher, f"{nobucket}/shards/a.tar", tmp_path / "c.zarr", *BUILD)))
    assert "bucket 'kt-no-such-bucket' does not exist" in line
    from kt.student.cli import main as student

    line = one_line(capsys, student([*TRAIN, "--cache", f"{nobucket}/c.zarr", "--data", small_shards[0],
                                     "--out", str(tmp_path / "run")]), "kt-student")
    assert "bucket 'kt-no-such-bucket' does not exist" in line


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, small_shards):  # noqa: F811
    """A server that checks credentials (moto's IAM enforcement): a bucket with shards, a user allowed to use it
    and one with no policy at all."""
    with S3Server(log=tmp_path_factory.mktemp("guarded") / "server.log") as server:
        s3 = server.client()
        s3.create_bucket(Bucket="guarded")
        for path in small_shards[:1]:
            s3.upload_file(path, "guarded", f"shards/{Path(path).name}")
        iam, keys = server.iam(), {}
        for user, allowed in (("reader", True), ("stranger", False)):
            iam.create_user(UserName=user)
            if allowed:
                policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                                   "Resource": "*"}]}
                iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        server.enforce_auth()
        yield SimpleNamespace(server=server, keys=keys, shard=f"s3://guarded/shards/{Path(small_shards[0]).name}")


@pytest.mark.parametrize("who", ["unknown", "wrong-secret", "stranger"])
def test_denied_credentials_are_one_line(guarded, who, tiny_teacher, tmp_path, capsys, monkeypatch):  # noqa: F811
    """An unknown key, a wrong secret, a user without a policy: one line saying access was denied and what to check
    (the server's reason where its answer has one; a refused HEAD has none)."""
    expect = "access denied"
    key, secret = {"unknown": ("AKIAUNKNOWN000000000", "x"), "wrong-secret": (guarded.keys["reader"][0], "wrong"),
                   "stranger": guarded.keys["stranger"]}[who]
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()  # credentials are part of a filesystem's identity
    for name, value in guarded.server.env(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret).items():
        monkeypatch.setenv(name, value)
    line = one_line(capsys, main(build_args(tiny_teacher, guarded.shard, "s3://guarded/c.zarr", *BUILD)))
    assert expect in line and "s3://guarded/c.zarr" in line
    assert expect in one_line(capsys, main(["info", "s3://guarded/c.zarr"]))
    line = one_line(capsys, main(build_args(tiny_teacher, guarded.shard, tmp_path / "c.zarr", *BUILD)))
    assert expect in line and "s3://guarded/shards/" in line  # the first object the build reads there
    fsspec.filesystem("s3").clear_instance_cache()


def test_allowed_user_builds_on_the_guarded_server(guarded, tiny_teacher, monkeypatch, capsys):  # noqa: F811
    """The same server and bucket with the allowed user's key: the refusals above are the credentials', not the
    server's."""
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    key, secret = guarded.keys["reader"]
    for name, value in guarded.server.env(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret).items():
        monkeypatch.setenv(name, value)
    assert main(build_args(tiny_teacher, guarded.shard, "s3://guarded/ok.zarr", "--codec", "patches=fp16",
                           views=1)) == 0
    fsspec.filesystem("s3").clear_instance_cache()


def test_missing_protocol_package_names_the_extra(tmp_path):
    """s3fs not installed: one line naming `pip install 'kt[s3]'` (fsspec's ImportError otherwise)."""
    code = ("import sys; sys.modules['s3fs'] = None\n"  # as if the package were not installed
            "from kt.teacher_cache.cli import main\n"
            f"sys.exit(main(['info', 's3://bucket/cache.zarr']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == ("kt-cache: error: cannot open s3://bucket/cache.zarr: s3:// needs a package that "
                                   "is not installed (pip install 'kt[s3]')")


# ----------------------------------------------------------------------------------------- killed builds
@pytest.mark.slow
def test_build_killed_mid_shard_on_s3_reruns_to_the_local_build(s3, tiny_teacher, small_shards,  # noqa: F811
                                                                 one_process_build):
    """SIGKILL once the first shard is complete (so inside a later one), rerun: the s3:// store equals the
    uninterrupted local build array for array; the rerun found the killed build's lock stale and took it."""
    data = upload(s3, small_shards)
    store = f"{s3.url}/cache.zarr"
    cmd = [sys.executable, "-m", "kt.teacher_cache.cli", *build_args(tiny_teacher, data, store, *BUILD)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=s3.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    import fsspec

    fs = fsspec.filesystem("s3")

    def one_complete() -> bool:
        assert proc.poll() is None, "the build ended before it could be killed"
        fs.invalidate_cache()
        return bool(fs.exists(f"{s3.name}/cache.zarr/complete/small-000000/zarr.json")
                    or fs.exists(f"{s3.name}/cache.zarr/complete/small-000001/zarr.json"))

    wait_for(one_complete, 300, "a complete shard")
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = CacheStore.open(store).completed()
    assert 1 <= len(done) < 4 and fs.exists(f"{s3.name}/cache.zarr.lock")
    result = subprocess.run(cmd, cwd=ROOT, env=s3.env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] == len(done) and summary["shards_written"] == 4 - len(done)
    assert_same_store(one_process_build, store)
    assert not fs.exists(f"{s3.name}/cache.zarr.lock")
