"""Test-wide JAX settings: strict rank promotion, several CPU devices, unoptimised XLA:CPU code,
deterministic keys."""

import importlib.util
import os

# Several CPU devices so sharding code paths run on a laptop and in CI (must precede backend init).
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# Unoptimised XLA:CPU code (LLVM at -O0): the suite checks correctness on small inputs, where
# compiling dominates; measured 1.4-2x faster per test file on a 2-core CPU. Inherited by
# the subprocesses tests start (CLI runs, notebooks). A flag already set is left alone.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
    """`torch`-marked tests skip when torch or timm is missing, except under `make test-torch`
    (``JAXBLOCKS_REQUIRE_TORCH=1``), where a missing package is an error, not a skip."""
    missing = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    if os.environ.get("JAXBLOCKS_REQUIRE_TORCH") == "1":
        raise pytest.UsageError(f"JAXBLOCKS_REQUIRE_TORCH=1 but {missing} not installed")
    skip = pytest.mark.skip(
        reason=f"{' and '.join(missing)} not installed: `make test-torch` installs the torch "
        "extra and runs these"
    )
    for item in items:
        if item.get_closest_marker("torch") is not None:
            item.add_marker(skip)
