"""Test-wide JAX settings: strict rank promotion, several CPU devices, unoptimised XLA:CPU code,
a compilation cache shared by the run's processes, deterministic keys."""

import importlib.util
import os
import shutil
import tempfile

# Several CPU devices so sharding code paths run on a laptop and in CI (must precede backend init).
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# Unoptimised XLA:CPU code (LLVM at -O0): the suite checks correctness on small inputs, where
# compiling dominates; measured 1.4-2x faster per test file on a 2-core CPU. Inherited by
# the subprocesses tests start (CLI runs, notebooks). A flag already set is left alone.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

# One persistent XLA compilation cache per test run, in a fresh temporary folder: the xdist
# workers and the subprocesses tests start (CLI runs, notebooks) inherit it, so a program that
# several processes compile (a jitted slice, an optimizer update, the same tiny model's step) is
# compiled once. Measured on tests/train/ with -n 2 on the 2-core machine: 337 s without, 305 s
# with. Nothing outlives the run: the process that made the folder removes it at exit, and a
# cache folder already set (a developer's own) is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxblocks-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # default 1 s: small ones too
    _cache_owner = True
else:
    _cache_owner = False

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" in os.environ:
    _secs = float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _secs)


def pytest_unconfigure(config):
    if _cache_owner:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
