"""scripts.gpu_check: the CPU-only path and the table (the CUDA path needs a GPU: run it there)."""
import os
import subprocess
import sys

from scripts import gpu_check
from tests.conftest import PROJECT_ROOT


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "table.md")], cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no CUDA device here" in out.stdout and "nothing was run" in out.stdout
    assert not (tmp_path / "work").exists() and not (tmp_path / "table.md").exists()


def test_main_without_cuda_runs_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    monkeypatch.setattr(gpu_check, "train_and_evaluate_qnet", lambda *a: (_ for _ in ()).throw(AssertionError))
    assert gpu_check.main(["--work", str(tmp_path / "w")]) == 0
    assert "no CUDA device here" in capsys.readouterr().out and not (tmp_path / "w").exists()


def test_table_with_fake_numbers():
    rows = [
        {"run": "train 500 ep + evaluate fold 0", "method": "qnet", "mode": "defaults", "batch": 8,
         "train_episodes_per_s": 41.23456, "eval_slices_per_s": 310.456, "device_peak_mb": 20480.4, "dice": 0.61234},
        {"run": "benchmark", "method": "adnet", "mode": "reference", "batch": 1, "train_episodes_per_s": 12.5,
         "eval_slices_per_s": 80.0, "device_peak_mb": 3000.0, "host_peak_mb": 2500.0},
        {"run": "benchmark", "method": "dspnet", "mode": "fast", "skipped": "time budget spent"},
    ]
    text = gpu_check.format_table(rows, "title line")
    lines = text.splitlines()
    assert lines[0] == "title line" and lines[1] == ""
    assert lines[2] == ("| run | method | mode | episodes/step | train episodes/s | eval slices/s | peak device MB "
                        "| mean Dice |")
    assert lines[3] == "|---|---|---|---|---|---|---|---|"
    assert lines[4] == "| train 500 ep + evaluate fold 0 | qnet | defaults | 8 | 41.235 | 310.46 | 20480 | 0.6123 |"
    assert lines[5] == "| benchmark | adnet | reference | 1 | 12.500 | 80.00 | 3000 | - |"
    assert lines[6] == "| benchmark (skipped: time budget spent) | dspnet | fast | - | - | - | - | - |"
    assert len(lines) == 7 and text.endswith("\n")
