"""Test set-up: 8 host CPU devices for mesh tests (must be set before jax is imported), shared tiny models, and no
silent skips: a skipped test or module fails the run unless it is marked `gpu` or `tpu` (hardware that is absent)."""

import os
import tempfile

# XLA:CPU's backend optimisation off: the suite's programs are tiny, so compiling them is most of its time (measured
# on 2 cores: test_sampling.py + test_train_step.py 128 -> 84 s of CPU). Every process the tests start inherits these
# flags (tests/stage_runs.ENV), so runs compared with each other compile alike; users' runs keep XLA's defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                           + TEST_XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# one XLA compilation cache for the session, shared with the stage processes the resume tests start: a re-run
# process loads the executables the killed one (or this process) compiled instead of compiling them again
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxstages-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# before jax: the C allocator set-up (jaxstages/host.py) takes effect where no other thread has allocated yet
import jaxstages  # noqa: E402,F401
import jax  # noqa: E402
import pytest  # noqa: E402

from jaxstages.model import model_config  # noqa: E402


HARDWARE_MARKERS = ("gpu", "tpu")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end runs of a minute or more")
  for name in HARDWARE_MARKERS:
    config.addinivalue_line("markers", f"{name}: needs a {name.upper()}; the only tests allowed to skip")


def _no_silent_skip(report, node) -> None:
  """A skip (an `importorskip` of a missing dev dependency, a module that failed to import, a `pytest.skip`) turns
  into a failure, unless the node is marked for hardware; expected failures (xfail) stay as they are."""
  if report.skipped and not hasattr(report, "wasxfail") and not any(
      node.get_closest_marker(m) for m in HARDWARE_MARKERS):
    report.outcome = "failed"
    report.longrepr = f"skipped, and only tests marked {' or '.join(HARDWARE_MARKERS)} may skip: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  _no_silent_skip(outcome.get_result(), item)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  outcome = yield
  _no_silent_skip(outcome.get_result(), collector)


@pytest.fixture(scope="session")
def tiny_cfg():
  """2 layers, 64 wide, 4 query / 2 KV heads, vocab 128: compiles in a second."""
  return model_config("tiny")


@pytest.fixture(scope="session")
def devices():
  assert jax.device_count() == 8, "tests expect 8 host CPU devices (see conftest.py)"
  return jax.devices()
