"""Two `jax.distributed` processes on localhost (gloo): 3 sharded steps and a checkpoint round
trip; both ranks agree with each other and with a single-process run."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from tests.train.helpers import run_steps, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), initialization_timeout=60)
import numpy as np
from jax.experimental import multihost_utils
from jaxblocks.train import loop
from jaxblocks.train import state as state_lib
from jaxblocks.train.checkpoint import Checkpointer
from tests.train.helpers import tiny_config
assert jax.device_count() == 4 and jax.local_device_count() == 2
cfg = tiny_config("mlp_tiny", train_steps=3, mesh={"data": 2, "fsdp": 2}, log_every=1)
res = loop.train(cfg, sys.argv[3])
# Round trip: restore the final checkpoint into a fresh abstract sharded state.
tr = loop.build(cfg)
with tr.mesh_context():
    _, sh, abstract = tr.create_state()
    ck = Checkpointer(sys.argv[3] + "/checkpoints", 1, 2)
    restored, pos = ck.restore(state_lib.abstract_with_shardings(abstract, sh))
    ck.close()
same = all(
    bool(np.array_equal(multihost_utils.process_allgather(a, tiled=True),
                        multihost_utils.process_allgather(b, tiled=True)))
    for a, b in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(restored.params))
)
losses = [res.train_losses[s] for s in sorted(res.train_losses)]
print("RESULT " + json.dumps({"rank": jax.process_index(), "losses": losses,
      "restored_equal": same, "pos": pos, "step": int(restored.step)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_and_checkpoint_round_trip(tmp_path):
    addr = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, addr, str(i), str(tmp_path)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out[-4000:]
        outs.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    assert sorted(o["rank"] for o in outs) == [0, 1]
    assert outs[0]["losses"] == outs[1]["losses"]
    assert all(o["restored_equal"] and o["step"] == 3 and o["pos"]["step"] == 3 for o in outs)
    # Same numbers as one process on the same (4-device) mesh shape.
    ref, _ = run_steps(tiny_config("mlp_tiny", mesh={"data": 2, "fsdp": 2}), 3, jax.devices()[:4])
    np.testing.assert_allclose(outs[0]["losses"], ref, rtol=1e-5)
