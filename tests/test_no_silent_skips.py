"""No silent skips (tests/conftest.py): a skipped test or an importorskip'd module fails the run unless marked for
absent hardware (`gpu`, `tpu`), and a missing dev dependency fails the HF parity tests instead of skipping them."""

import subprocess
import sys
import textwrap

from tests.stage_runs import ENV, REPO


def _pytest(*args, pythonpath=str(REPO)):
  """pytest in a process; files outside tests/ get the suite's conftest as a plugin."""
  plugin = [] if all(a.startswith(("tests/", "-")) for a in args) else ["-p", "tests.conftest"]
  cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", *plugin, "-p", "no:cacheprovider", "-o", "addopts=-ra",
         *args]
  return subprocess.run(cmd, cwd=REPO, env={**ENV, "PYTHONPATH": pythonpath}, capture_output=True, text=True,
                        timeout=300)


def test_skips_fail_unless_marked_for_hardware(tmp_path):
  (tmp_path / "test_runtime.py").write_text(textwrap.dedent("""
      import pytest

      def test_skipped():
        pytest.skip("a dev dependency is missing")

      @pytest.mark.gpu
      def test_needs_a_gpu():
        pytest.skip("no GPU here")

      @pytest.mark.xfail(reason="known")
      def test_known_failure():
        assert False

      def test_passes():
        pass
      """))
  (tmp_path / "test_module.py").write_text("import pytest\n\npytest.importorskip('no_such_module_xyz')\n\n"
                                           "def test_never():\n  pass\n")
  done = _pytest("--continue-on-collection-errors", str(tmp_path / "test_runtime.py"), str(tmp_path / "test_module.py"))
  assert done.returncode != 0, done.stdout[-2000:]
  assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in done.stdout, done.stdout[-2000:]
  assert "FAILED" in done.stdout and "test_skipped" in done.stdout
  assert "ERROR" in done.stdout and "test_module.py" in done.stdout, done.stdout[-2000:]


def test_missing_dev_dependency_fails_hf_parity(tmp_path):
  """With `torch` unimportable (a stand-in module that raises ImportError first on the path), collecting
  `tests/test_hf.py` is an error, not a skip."""
  (tmp_path / "torch.py").write_text("raise ImportError('torch is not installed (stand-in)')\n")
  done = _pytest("--collect-only", "tests/test_hf.py", pythonpath=f"{tmp_path}:{REPO}")
  assert done.returncode != 0 and "torch is not installed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
  assert "1 error" in done.stdout.splitlines()[-1] and "SKIPPED" not in done.stdout, done.stdout[-2000:]
