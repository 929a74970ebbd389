"""The kill soak at a small count (`python -m tools.kill_soak`; its 20-kill figures are in docs/benchmarks.md): a
build and a student run SIGKILLed at random moments and rerun until done end equal to uninterrupted runs."""

from __future__ import annotations

import json

import pytest

from tools.kill_soak import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("store", ["local", "s3"])
def test_kill_soak_ends_equal_to_uninterrupted_runs(store, tmp_path, capsys):
    if store == "s3":
        pytest.importorskip("s3fs", reason="the s3 extra (pip install 'kt[s3]') is not installed")
        pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")
    assert main(["--kills", "2", "--store", store, "--seed", "1", "--out", str(tmp_path / "soak")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for kind in ("build", "train"):
        assert summary[kind]["kills"] == 2 and summary[kind]["rounds_differing"] == []
    assert summary["ok"]
