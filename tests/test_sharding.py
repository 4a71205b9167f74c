"""Batch-sharded jit over 8 simulated CPU devices: every path computes each shard locally
(no all-gather / all-to-all of the features) and equals the unsharded result."""

import json
import os
import subprocess
import sys

import pytest
from conftest import IMPLEMENTATIONS

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_batch_sharded_jit_is_local(implementation):
    # Simulated CPU devices, on a GPU machine too (JAX_PLATFORMS=cpu).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_check.py"), implementation],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8, proc.stdout
    for row in rows:
        assert all(v == 0 for v in row["collectives"].values()), row
        assert row["max_abs_diff"] < 1e-4, row


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sharded_head_example(implementation):
    """examples/sharded_head.py on 4 simulated devices: no all-gather, and it learns."""
    script = (
        "import json, sys; sys.path.insert(0, 'examples'); import sharded_head; "
        f"r = sharded_head.main(['--steps', '40', '--implementation', '{implementation}']); "
        "print(json.dumps(dict(d=r['devices'], g=r['all_gathers'], first=sum(r['losses'][:5]) / 5, "
        "last=sum(r['losses'][-5:]) / 5, acc=sum(r['accuracies'][-5:]) / 5)))")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                          cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["d"] == 4 and res["g"] == 0
    assert res["last"] < 0.5 * res["first"] and res["acc"] > 0.8, res
