"""The accelerator benchmarks still run (at tiny shapes, on whatever device the tests have), so they do not rot."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pytest  # noqa: E402
import roofline  # noqa: E402


@pytest.mark.slow  # a train step and a decode compiled and timed: ~25 s of CPU
def test_roofline_benchmark_runs_at_tiny_shapes(capsys):
  roofline.main(["--tiny", "--models", "interplay-100m", "--repeats", "1"])
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith("| interplay-100m (tiny)"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[4].endswith("%") and cells[-1].endswith("%"), row  # MFU and share of the decode roofline


def test_known_chips_have_datasheet_peaks():
  class Device:
    device_kind = "NVIDIA H100 80GB HBM3"

  assert roofline.chip_peaks(Device(), "bfloat16") == (989e12, 3.35e12, "datasheet (NVIDIA H100)")
  Device.device_kind = "TPU v5 lite"
  assert roofline.chip_peaks(Device(), "bfloat16")[:2] == (197e12, 0.819e12)
