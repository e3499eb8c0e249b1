"""scripts.benchmark: FLOP counting, the roofline arithmetic, the table, the load warning, a tiny run
end to end (columns present and positive, never a timed assertion), and every bad flag refused
before anything is written."""
from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.heads.contract import prepare_support, segment_prepared
from models.heads.qnet import QNetHead
from scripts import benchmark
from scripts.benchmark import (
    COLUMNS,
    EvalProbe,
    count_flops,
    fraction_of_peak,
    load_warning,
    relevant_peak,
    roofline,
    table,
)

pytestmark = pytest.mark.slow     # trains a model, runs commands or reads every real scan: not in `make check`


# ----------------------------------------------------------------------------- FLOPs and peaks
def test_count_flops_of_one_convolution_is_2_cin_cout_k2_hw():
    x = torch.randn(2, 5, 12, 10)
    w = torch.randn(7, 5, 3, 3)
    out, flops = count_flops(lambda: F.conv2d(x, w, padding=2, dilation=2))
    assert out.shape == (2, 7, 12, 10)
    assert flops == 2 * 5 * 7 * 3 * 3 * 12 * 10 * 2


def test_count_flops_includes_the_backward_pass():
    x = torch.randn(4, 6, requires_grad=True)
    layer = nn.Linear(6, 3, bias=False)
    _, forward = count_flops(lambda: layer(x))
    _, both = count_flops(lambda: layer(x).sum().backward())
    assert forward == 2 * 4 * 6 * 3
    assert both == 3 * forward            # backward: the input's and the weight's gradient, one matmul each


def test_fraction_of_peak_arithmetic():
    assert fraction_of_peak(1.5, 2.0, 10.0) == (3.0, 0.3)
    assert fraction_of_peak(1.5, 2.0, None) == (3.0, None)
    assert fraction_of_peak(None, 2.0, 10.0) == (None, None)


def test_relevant_peak_is_bf16_for_a_bf16_mode_and_fp32_otherwise():
    peaks = {"fp32": 200.0, "bf16": 450.0}
    assert relevant_peak(peaks, "bf16") == 450.0 and relevant_peak(peaks, "fp32") == 200.0
    assert relevant_peak({"fp32": 200.0, "bf16": None}, "bf16") == 200.0     # bf16 not native: emulated
    assert relevant_peak(None, "fp32") is None
    row = {"train_gflop_per_episode": 1550.0, "train_episodes_per_s": 1 / 4.5, "train_dtype": "bf16",
           "eval_gflop_per_slice": 100.0, "eval_slices_per_s": 1.0, "eval_dtype": "fp32"}
    d = roofline(row, peaks)
    assert d["train_gflops"] == pytest.approx(344.4, abs=0.1)
    assert d["train_peak_fraction"] == pytest.approx(344.44 / 450.0, rel=1e-3)
    assert d["eval_gflops"] == 100.0 and d["eval_peak_fraction"] == 0.5


# ----------------------------------------------------------------------------- the evaluation split
class TinyQNetModel(nn.Module):
    """The model calls the predictor makes (encode / prepare_support / segment_prepared) around the
    real Q-Net head, on a 1x1-convolution 'encoder' (32 x 32 images, 8 channels)."""

    def __init__(self, refine_steps: int = 2):
        super().__init__()
        self.head = QNetHead(refine_steps=refine_steps)
        self.conv = nn.Conv2d(3, 8, 1, bias=False)

    def encode(self, images):
        f = self.conv(images)
        return {"layer3": F.avg_pool2d(f, 4), "layer4": F.avg_pool2d(f, 8), "threshold": f.mean(dim=(1, 2, 3))[:, None]}

    def prepare_support(self, support, masks):
        return prepare_support(self.head, support, masks)

    def segment_prepared(self, state, query):
        return segment_prepared(self.head, state, query)


def _run_probe(model):
    torch.manual_seed(0)
    model.eval()
    probe = EvalProbe(model, torch.device("cpu")).install()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = model.encode(images)                                            # 1 support + 2 queries
        state = model.prepare_support({k: v[:1][None] for k, v in f.items()}, (images[:1, 0] > 0).float()[None])
        model.segment_prepared(state, {k: v[1:][None] for k, v in f.items()})
    probe.remove()
    return probe, probe.count(lambda: torch.autocast("cpu", enabled=False))


def test_probe_times_and_counts_qnet_refinement_and_unwraps():
    model = TinyQNetModel(refine_steps=2)
    probe, flops = _run_probe(model)
    assert probe.images_encoded == 3 and probe.support_states == 1 and probe.query_slices == 2
    assert probe.refinement_timed and probe.seconds["refinement"] > 0
    assert probe.seconds["head"] >= probe.seconds["refinement"]
    assert flops["encoder"] == 2 * 3 * 8 * 32 * 32 * 3                      # the 1x1 conv, 3 images
    assert flops["refinement"] > 0
    assert "encode" not in model.__dict__ and "refine_prototypes" not in model.head.__dict__
    assert model.head.refine_steps == 2

    no_refinement, flops0 = _run_probe(TinyQNetModel(refine_steps=0))
    assert flops0["refinement"] == 0 and no_refinement.seconds["refinement"] == 0
    assert flops0["head"] == pytest.approx(flops["head"])


# ----------------------------------------------------------------------------- table and machine state
def _row(mode, refinement=None, train=0.2, ev=1.0):
    return {"method": "qnet", "device": "cpu", "mode": mode, "batch": 1, "threads": 2,
            "train_episodes_per_s": train, "train_gflop_per_episode": 1550.0, "train_dtype": "fp32",
            "eval_slices_per_s": ev, "eval_gflop_per_slice": 90.0, "eval_dtype": "fp32",
            "eval_ms_per_slice": {"encoder": 400.0, "head": 5.0, "refinement": refinement},
            "host_peak_mb": 3000.0, "device_peak_mb": None}


def test_table_has_the_roofline_columns_ratios_and_refinement_verdict():
    peaks = [{"device": "cpu", "device_name": "cpu", "peaks": {"fp32": 229.0, "bf16": 457.0},
              "kernels": [{"kernel": "matmul 2048x2048x2048", "dtype": "fp32", "format": "NCHW", "gflop": 17.18,
                           "gflops": 229.0}]}]
    machine = {"cores": 2, "threads": 2, "load_start": 0.1, "load_end": 0.3, "warnings": []}
    text = table([_row("reference", 60.0), _row("fast", 100.0, train=0.4, ev=5.0)], 256, peaks, machine)
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    for column in ("GFLOP/episode", "train GFLOP/s", "train % peak", "GFLOP/slice", "eval % peak",
                   "encoder ms/slice", "head ms/slice", "refinement ms/slice"):
        assert column in COLUMNS
    ref = next(line for line in text.splitlines() if line.startswith("| qnet | cpu | reference |"))
    cells = [c.strip() for c in ref.strip("|").split("|")]
    assert cells[COLUMNS.index("train GFLOP/s")] == "310.0" and cells[COLUMNS.index("train % peak")] == "135.4%"
    assert cells[COLUMNS.index("refinement ms/slice")] == "60.0"
    assert "| qnet | cpu | fast / reference |  |  | 2.00x |  |  |  | 5.00x |" in text
    assert "2 cores, 2 torch threads; load average (1 min) 0.10 at the start, 0.30 at the end" in text
    assert "fp32 refinement 60.0 ms per slice = 15% of the encoder's 400.0 ms (within the 20% budget)" in text
    assert "= 25% of the encoder's 400.0 ms (over the 20% budget)" in text
    assert "| cpu | matmul 2048x2048x2048 | fp32 | NCHW | 17.18 | 229.0 |" in text


def test_load_warning_when_the_load_takes_the_benchmarks_cores():
    assert load_warning(0.2, 2, 2) is None                      # a quiet machine
    assert load_warning(1.4, 1, 2) is None                      # one core left free, one job on it
    warning = load_warning(1.2, 2, 2)
    assert warning.startswith("warning: load average 1.20") and "--threads 1" in warning
    assert load_warning(None, 2, 2) is None


# ----------------------------------------------------------------------------- end to end
NUMERIC = ("train ep/s", "GFLOP/episode", "train GFLOP/s", "eval slices/s", "GFLOP/slice", "eval GFLOP/s",
           "encoder ms/slice", "head ms/slice", "host peak MB")


def test_tiny_benchmark_prints_every_column_with_positive_numbers(tmp_path, capsys):
    out = tmp_path / "results" / "bench.md"
    code = benchmark.main(["--methods", "adnet", "--modes", "fast", "--devices", "cpu", "--size", "32",
                           "--slices", "6", "--scans", "6", "--steps", "1", "--warmup", "0", "--peak-size", "32",
                           "--data-dir", str(tmp_path / "bench" / "data"), "--out", str(out), "-q"])
    assert code == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    row = next(line for line in text.splitlines() if line.startswith("| adnet | cpu | fast |"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    for column in NUMERIC:
        value = float(cells[column])
        assert math.isfinite(value) and value > 0, (column, cells[column])
    for column in ("train % peak", "eval % peak"):
        assert re.fullmatch(r"\d+\.\d%", cells[column]) and float(cells[column][:-1]) > 0, cells[column]
    assert cells["refinement ms/slice"] == "-"                    # ADNet does not refine
    assert int(cells["threads"]) == torch.get_num_threads()
    assert re.search(r"load average \(1 min\) \d+\.\d\d at the start, \d+\.\d\d at the end", text)
    assert re.search(r"- cpu \(cpu\): fp32 \d+\.\d GFLOP/s", text)
    report = json.loads(out.with_suffix(".json").read_text())
    (peaks,) = report["peaks"]                                   # the peaks, measured once on the cpu
    assert peaks["peaks"]["fp32"] > 0 and all(k["gflops"] > 0 for k in peaks["kernels"])
    assert (peaks["peaks"]["bf16"] is not None) == benchmark.bf16_native(torch.device("cpu"))
    conv = next(k for k in peaks["kernels"] if "qnet_r101" in k["kernel"])     # 256 -> 256, 3 x 3, 8 x 8, 2 images
    assert conv["gflop"] == pytest.approx(2 * 256 * 256 * 9 * 8 * 8 * 2 / 1e9)
    assert report["machine"]["load_end"] is not None and report["runs"][0]["eval_slices"] > 0


# ----------------------------------------------------------------------------- bad arguments
def tree_checksum(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


BAD_FLAGS = [
    (["--size", "16"], "--size 16 is too small"),
    (["--size", "100"], "--size 100 is not a multiple of 8"),
    (["--peak-size", "20"], "--peak-size 20 is too small"),
    (["--steps", "0"], "--steps 0 is too small"),
    (["--warmup", "-1"], "--warmup -1 is too small"),
    (["--slices", "3"], "--slices 3 is too small"),
    (["--scans", "5"], "--scans 5 is too small"),
    (["--quality", "-5"], "--quality -5 is too small"),
    (["--batch-episodes", "-2"], "--batch-episodes -2 is too small"),
    (["--threads", "0"], "--threads 0 is too small"),
    (["--devices", "tpu"], "--devices tpu: unknown device"),
    (["--out", "a_file/table.md"], "--out: "),
    (["--out", "a_folder"], "--out: "),
    (["--data-dir", "a_file/data"], "--data-dir: "),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append((["--devices", "cpu", "cuda"], "--devices cuda: no CUDA device is available here"))


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_error_line_and_writes_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    before = tree_checksum(tmp_path)
    assert benchmark.main(["--methods", "adnet", *argv]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and any(fix in lines[0] for fix in ("; use ", "; choose ", "; name "))
    assert tree_checksum(tmp_path) == before


def test_a_failed_run_is_one_error_paragraph_with_the_childs_last_line(tmp_path, monkeypatch, capsys):
    real_run = subprocess.run

    def failing_child(cmd, **kwargs):
        if cmd[1:3] != ["-m", "scripts.benchmark"]:
            return real_run(cmd, **kwargs)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Traceback (most recent call last):\n"
                                           "  File \"x.py\", line 1\nRuntimeError: out of memory\n")

    monkeypatch.setattr(benchmark, "load_average", lambda: 0.0)          # no load warning before the error
    monkeypatch.setattr(benchmark, "prepare_data", lambda data_dir, *a: data_dir)
    monkeypatch.setattr(benchmark, "measure_peaks", lambda size, device: {
        "device": device, "device_name": device, "peaks": {"fp32": 1.0, "bf16": None}, "kernels": []})
    monkeypatch.setattr(benchmark.subprocess, "run", failing_child)
    code = benchmark.main(["--methods", "adnet", "--modes", "fast", "--devices", "cpu", "--size", "32",
                           "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out.md"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: the benchmark run of adnet on cpu (adnet_cpu_fast) failed with "
                                        "exit status 1: RuntimeError: out of memory\n"), err
    assert "Traceback" not in err
    log_file = tmp_path / "work" / "adnet_cpu_fast" / "child_stderr.txt"
    assert str(log_file) in err and "RuntimeError: out of memory" in log_file.read_text()
    assert not (tmp_path / "out.md").exists()
