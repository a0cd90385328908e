"""tools/gpu_check.py works end to end (its CPU smoke mode: tiny model, 64 px): steps run, a
failing step does not stop the others, the table is printed and the log written."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path),
           "--steps", "env", "bench-tiny-f8c4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "env              ok" in out.stdout and "bench-tiny-f8c4  ok" in out.stdout
    # the table: ours fp32 and every variant, each with the dtype that ran
    for variant, dtype in [("ours ", "float32"), ("ours-bf16", "bfloat16"), ("ours-fp16", "float16"),
                           ("ours-nchw", "float32")]:
        assert any(line.startswith("tiny-f8c4") and variant in line and dtype in line for line in out.stdout.splitlines())
    log = (tmp_path / "gpu_check.log").read_text()
    assert "===== env: ok" in log and (tmp_path / "bench-tiny-f8c4.json").exists()


def test_a_failing_step_does_not_stop_the_run(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    def plan(args):
        return [("boom", [sys.executable, "-c", "raise SystemExit(3)"], 30),
                ("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1),
                ("fine", [sys.executable, "-c", "print('done')"], 30)]

    monkeypatch.setattr(gpu_check, "steps", plan)
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    log = (tmp_path / "gpu_check.log").read_text()
    assert "boom: failed (exit 3)" in log and "slow: timeout (1s)" in log and "fine: ok" in log
