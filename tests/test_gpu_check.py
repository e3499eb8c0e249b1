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
    assert lines[2] == ("| run | method | mode | episodes/step | train episodes/s | GFLOP/episode | train % peak "
                        "| eval slices/s | GFLOP/slice | eval % peak | encoder ms/slice | head ms/slice "
                        "| refinement ms/slice | peak device MB | mean Dice |")
    assert lines[3] == "|" + "---|" * 15
    assert lines[4] == ("| train 500 ep + evaluate fold 0 | qnet | defaults | 8 | 41.235 | - | - | 310.46 | - | - "
                        "| - | - | - | 20480 | 0.6123 |")
    assert lines[5] == "| benchmark | adnet | reference | 1 | 12.500 | - | - | 80.00 | - | - | - | - | - | 3000 | - |"
    assert lines[6] == ("| benchmark (skipped: time budget spent) | dspnet | fast | - | - | - | - | - | - | - | - | - | - "
                        "| - | - |")
    assert len(lines) == 7 and text.endswith("\n")


def test_table_roofline_columns_on_cuda_numbers():
    """The benchmark's roofline columns as gpu_check prints them: % of the bf16 peak for a bf16 mode,
    of the fp32 peak otherwise, and the evaluation split in ms per slice."""
    peaks = {"fp32": 50_000.0, "bf16": 400_000.0}
    rows = [
        {"run": "benchmark", "method": "qnet", "mode": "reference", "batch": 1, "train_episodes_per_s": 10.0,
         "train_gflop_per_episode": 1550.0, "train_dtype": "fp32", "eval_slices_per_s": 20.0,
         "eval_gflop_per_slice": 250.0, "eval_dtype": "fp32",
         "eval_ms_per_slice": {"encoder": 12.0, "head": 0.5, "refinement": 2.0}, "device_peak_mb": 9000.0},
        {"run": "benchmark", "method": "qnet", "mode": "fast", "batch": 8, "train_episodes_per_s": 100.0,
         "train_gflop_per_episode": 1550.0, "train_dtype": "bf16", "eval_slices_per_s": 200.0,
         "eval_gflop_per_slice": 100.0, "eval_dtype": "bf16",
         "eval_ms_per_slice": {"encoder": 2.0, "head": 0.3, "refinement": 1.5}, "device_peak_mb": 20000.0},
    ]
    lines = gpu_check.format_table(rows, "", peaks).splitlines()
    assert lines[2] == ("| benchmark | qnet | reference | 1 | 10.000 | 1550.0 | 31.0% | 20.00 | 250.0 | 10.0% "
                        "| 12.0 | 0.5 | 2.0 | 9000 | - |")
    assert lines[3] == ("| benchmark | qnet | fast | 8 | 100.000 | 1550.0 | 38.8% | 200.00 | 100.0 | 5.0% "
                        "| 2.0 | 0.3 | 1.5 | 20000 | - |")
