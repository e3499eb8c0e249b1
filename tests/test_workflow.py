"""Experiment workflow: collecting five folds into a table, curves and overlays as PNG."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data.core.io import write_volume
from evaluation.leaderboard import build_table, find_runs, select
from evaluation.reporting import write_training_curves
from scripts import collect_results, plot_curves, render_overlays
from tests.helpers import GEOMETRY, write_dataset

PROTOCOL = {"fold_scheme": "alpnet", "supp_idx": -1, "n_part": 3, "chunking": "zrange", "scored": "range",
            "batch_size": 16}


def fake_run(root, method="adnet", dataset="CHAOST2", setting=1, fold=0, run_id=1, dice=None, labels=(1, 2, 3, 4),
             n_steps=50000, names=None, config=None, **protocol):
    """An evaluation run folder as validation.py leaves it (`config` adds recorded keys, e.g. data_dir)."""
    group = "-".join(map(str, labels))
    folder = root / f"{method}_{dataset}_setting{setting}_labels{group}_fold{fold}" / str(run_id)
    folder.mkdir(parents=True)
    names = names or {1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"}
    dice = dice or {names[c]: 0.5 + 0.1 * fold + 0.01 * c for c in labels}
    (folder / "config.json").write_text(json.dumps({
        "method": method, "dataset": dataset, "setting": setting, "eval_fold": fold, "test_labels": list(labels),
        "evaluation": {**PROTOCOL, **protocol}, "train": {"n_steps": n_steps}, **(config or {})}))
    ids = {v: k for k, v in names.items()}
    (folder / "results.json").write_text(json.dumps({
        "checkpoint": f"runs/train/x/{fold}/snapshots/50000.pth", "classes": {k: {"dice": v} for k, v in dice.items()},
        "per_scan": [{"class": k, "class_id": ids[k], "scan": 1, "dice": v} for k, v in dice.items() if k in ids]}))
    return folder


def _panels(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return int(im.text["Panels"])


def _titles(path):
    """The panels' titles a PNG records (evaluation.reporting.save_figure)."""
    with Image.open(path) as im:
        return im.text.get("Panel titles", "")


def test_five_folds_become_one_table(tmp_path):
    for fold in range(5):
        fake_run(tmp_path, fold=fold)
        fake_run(tmp_path, method="qnet", fold=fold)
    fake_run(tmp_path, fold=2, run_id=2, dice={"LIVER": 0.9, "RK": 0.9, "LK": 0.9, "SPLEEN": 0.9})  # newer run wins
    table = build_table(select(find_runs([tmp_path])))
    assert table.organs == ["LK", "RK", "SPLEEN", "LIVER"]            # the papers' column order
    mean, std, n = table.organ_stats("qnet", "LIVER")
    liver = [0.51 + 0.1 * k for k in range(5)]
    assert n == 5 and mean == pytest.approx(np.mean(liver)) and std == pytest.approx(np.std(liver))
    assert table.dice["adnet"]["LIVER"][2] == 0.9
    assert table.overall("qnet") == pytest.approx(np.mean([table.organ_stats("qnet", o)[0] for o in table.organs]))
    out = tmp_path / "out"
    assert collect_results.main([str(tmp_path), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert "| Method | LK | RK | SPLEEN | LIVER | Mean |" in md and "| qnet |" in md
    assert len((out / "folds.csv").read_text().splitlines()) == 1 + 2 * 4 * 5
    assert _panels(out / "dice.png") == 1
    assert _titles(out / "dice.png") == "CHAOST2, setting 1 (all 5 folds)"


def test_missing_folds_are_reported(tmp_path, capsys):
    for fold in (0, 1, 3):
        fake_run(tmp_path, fold=fold)
    assert collect_results.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("missing") == 1 and "missing adnet folds [2, 4] (of 5)" in captured.err
    assert "(3/5)" in captured.out
    assert _titles(tmp_path / "out" / "dice.png") == "CHAOST2, setting 1 (folds 0-1, 3 of 5)"


def test_a_one_fold_table_shows_means_without_nan_or_a_zero_spread(tmp_path, capsys):
    fake_run(tmp_path, fold=0)
    fake_run(tmp_path, method="qnet", fold=0, labels=(1, 2), dice={"LIVER": 0.5, "RK": 0.7})
    assert collect_results.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    table = (tmp_path / "out" / "table.md").read_text()
    assert "nan" not in table and "± 0.00" not in table, table
    assert "| adnet | 53.00 (1/5) | 52.00 (1/5) | 54.00 (1/5) | 51.00 (1/5) | 52.50* |" in table
    assert "| qnet | – | 70.00 (1/5) | – | 50.00 (1/5) | 60.00* |" in table     # the mean of the organs present
    assert "* the mean over the organs and folds present" in table
    assert captured.err.count("missing") == 1
    assert _titles(tmp_path / "out" / "dice.png") == "CHAOST2, setting 1 (fold 0 of 5)"     # not "(5-fold)"


def test_refuses_to_mix_settings_datasets_and_protocols(tmp_path, capsys):
    fake_run(tmp_path / "a", setting=1)
    fake_run(tmp_path / "a", setting=2, labels=(2, 3))
    assert collect_results.main([str(tmp_path / "a")]) == 1
    assert "mix settings" in capsys.readouterr().err
    assert collect_results.main([str(tmp_path / "a"), "--setting", "2", "--out", str(tmp_path / "o")]) == 0
    fake_run(tmp_path / "b", dataset="CHAOST2")
    fake_run(tmp_path / "b", dataset="CMR", labels=(1, 2, 3), dice={"LV-MYO": 0.5})
    assert collect_results.main([str(tmp_path / "b")]) == 1
    assert "mix datasets" in capsys.readouterr().err
    fake_run(tmp_path / "c", fold=0)
    fake_run(tmp_path / "c", fold=1, supp_idx=2, chunking="count")
    assert collect_results.main([str(tmp_path / "c")]) == 1
    assert "different protocols" in capsys.readouterr().err


def test_one_cell_never_mixes_two_configurations(tmp_path, caplog):
    """Two evaluations of one cell made with different configurations (another fingerprint): the table
    takes the newest and says which runs it passed over."""
    old = fake_run(tmp_path, fold=0, run_id=1, n_steps=2, dice={"LIVER": 0.1, "RK": 0.1, "LK": 0.1, "SPLEEN": 0.1})
    new = fake_run(tmp_path, fold=0, run_id=2, n_steps=3)
    table = build_table(select(find_runs([tmp_path])))
    assert table.dice["adnet"]["LIVER"] == {0: pytest.approx(0.51)}
    assert "produced by different configurations" in caplog.text and str(old) in caplog.text and str(new) in caplog.text


def test_setting2_groups_fill_the_organ_columns(tmp_path):
    for fold in range(5):
        fake_run(tmp_path, setting=2, fold=fold, labels=(2, 3))
        fake_run(tmp_path, setting=2, fold=fold, labels=(1, 4))
    table = build_table(select(find_runs([tmp_path])))
    assert all(table.organ_stats("adnet", o)[2] == 5 for o in table.organs)


def test_training_curves_png(tmp_path):
    history = {"loss.query": ([10, 20, 30], [0.9, 0.7, 0.6]), "loss.align": ([10, 20, 30], [0.5, 0.4, 0.4]),
               "lr": ([10, 20, 30], [1e-3, 1e-3, 9.5e-4])}
    path = write_training_curves(history, tmp_path / "curves.png")
    assert _panels(path) == 2
    metrics = {k: {"steps": s, "values": v, "timestamps": [""] * len(s)} for k, (s, v) in history.items()}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert plot_curves.main([str(tmp_path), "--out", str(tmp_path / "again.png")]) == 0
    assert _panels(tmp_path / "again.png") == 2
    assert plot_curves.main([str(tmp_path / "nothing")]) == 1


def test_plot_curves_on_a_run_before_its_first_metrics(tmp_path, capsys):
    """Sacred creates metrics.json empty (0 bytes) at the start of a run: one error line saying no
    losses are recorded yet, nothing written."""
    (tmp_path / "metrics.json").write_text("")
    assert plot_curves.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no loss metrics yet" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_render_overlays_for_a_saved_prediction(tmp_path):
    root = write_dataset(tmp_path / "toy")
    label = np.zeros((8, 32, 32), np.uint8)
    label[3:6, 5:15, 5:15] = 1
    pred_path = write_volume(tmp_path / "preds" / "scan_2_C1.nii.gz", label, GEOMETRY)
    assert render_overlays.main([str(pred_path), "--data-dir", str(root), "--dataset", "TOY", "--n", "3"]) == 0
    assert _panels(tmp_path / "preds" / "scan_2_C1.png") == 3
    titles = _titles(tmp_path / "preds" / "scan_2_C1.png").split("\n")
    assert titles[0] == "C1, scan 2" and titles[1].startswith("slice ") and ", Dice " in titles[1]
    bad = write_volume(tmp_path / "preds" / "scan_2_NOPE.nii.gz", label, GEOMETRY)
    assert render_overlays.main([str(bad), "--data-dir", str(root), "--dataset", "TOY"]) == 1


def test_a_dataset_of_ones_own_is_tabled(tmp_path, monkeypatch, capsys):
    """collect_results finds a dataset.json dataset's description through the data_dir its runs recorded
    (relative to the folder they ran in), and builds the table without it when the folder is gone."""
    work = tmp_path / "work"
    root = write_dataset(work / "data" / "TOY", ids=(1, 2, 3, 4), with_supervoxels=False)
    description = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**description, "table_order": [2, 1], "n_folds": 3}))
    for fold in range(3):
        fake_run(work / "runs" / "test", dataset="TOY", fold=fold, labels=(1, 2), names={1: "C1", 2: "C2"},
                 config={"data_dir": "./data/TOY", "log_dir": "./runs"})
    monkeypatch.chdir(tmp_path)                 # not the folder the runs ran in (work/)
    out = tmp_path / "out"
    assert collect_results.main([str(work / "runs"), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert "Dice (%) on TOY, setting 1" in md and "| Method | C2 | C1 | Mean |" in md       # its table_order
    assert "| adnet | 62.00 ± 8.16 | 61.00 ± 8.16 | 61.50 |" in md                           # its 3 folds, all there
    assert _titles(out / "dice.png") == "TOY, setting 1 (all 3 folds)"
    shutil.rmtree(work / "data")
    capsys.readouterr()
    assert collect_results.main([str(work / "runs"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "no dataset.json was found for it (the runs record data_dir ./data/TOY" in err and "assumes 5 folds" in err
    md = (out / "table.md").read_text()
    assert "| Method | C1 | C2 | Mean |" in md and "| adnet | 61.00 ± 8.16 (3/5) |" in md    # results.json's order


def test_one_fold_evaluated_with_two_label_groups_is_two_cells_never_merged(tmp_path):
    """Two runs of one method and fold with different test_labels that both give an organ: each label group is
    a row of its own, whichever was written last; disjoint groups (setting 2) still share one row."""
    wide = fake_run(tmp_path, fold=0, labels=(1, 2, 3, 4))
    narrow = fake_run(tmp_path, fold=0, labels=(1,), dice={"LIVER": 0.9})
    for newer in (narrow, wide):
        os.utime(newer / "results.json", (3000, 3000))
        table = build_table(select(find_runs([tmp_path])))
        assert set(table.dice) == {"adnet [labels 1,2,3,4]", "adnet [labels 1]"}
        assert table.dice["adnet [labels 1]"] == {"LIVER": {0: 0.9}}
        assert table.dice["adnet [labels 1,2,3,4]"]["LIVER"] == {0: pytest.approx(0.51)}
    out = tmp_path / "out"
    assert collect_results.main([str(tmp_path), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert "| adnet [labels 1] | – | – | – | 90.00 (1/5) | 90.00* |" in md
    assert "| adnet [labels 1,2,3,4] | 53.00 (1/5) | 52.00 (1/5) | 54.00 (1/5) | 51.00 (1/5) | 52.50* |" in md


def test_k_shot_runs_are_rows_with_a_k_column_and_cross_domain_runs_a_table_of_their_own(tmp_path, capsys):
    for fold in range(5):
        fake_run(tmp_path / "runs", fold=fold)
        fake_run(tmp_path / "runs", fold=fold, run_id=2, n_shot=3, dice={"LIVER": 0.7, "RK": 0.7, "LK": 0.7,
                                                                         "SPLEEN": 0.7})
    out = tmp_path / "kshot"
    assert collect_results.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert "| Method | K | LK | RK | SPLEEN | LIVER | Mean |" in md
    assert "| adnet | 1 | 73.00 ± 14.14 |" in md and "| adnet, 3-shot | 3 | 70.00 ± 0.00 |" in md
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert {(r["method"], r["n_shot"]) for r in summary} == {("adnet", "1"), ("adnet, 3-shot", "3")}
    assert {r["n_shot"] for r in csv.DictReader((out / "folds.csv").open())} == {"1", "3"}
    # trained on CHAOST2, evaluated on SABS: SABS's classes (its names), a table "CHAOST2 -> SABS"
    sabs = {1: "SPLEEN", 2: "KID_R", 3: "KID_l", 6: "LIVER"}
    for fold in range(2):      # test_labels are the training dataset's ids; the results name SABS's classes
        fake_run(tmp_path / "runs", fold=fold, run_id=3, names=sabs, config={"eval_dataset": "SABS"},
                 dice={"LIVER": 0.6, "KID_R": 0.6, "KID_l": 0.6, "SPLEEN": 0.6})
    assert collect_results.main([str(tmp_path / "runs"), "--out", str(tmp_path / "mixed")]) == 1
    assert "mix evaluated datasets" in capsys.readouterr().err
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert collect_results.main([str(tmp_path / "runs"), "--eval-dataset", "SABS"]) == 0
    finally:
        os.chdir(cwd)
    md = (tmp_path / "results" / "CHAOST2-to-SABS_setting1" / "table.md").read_text()
    assert "Dice (%) on CHAOST2 -> SABS, setting 1" in md and "| Method | KID_l | KID_R | SPLEEN | LIVER | Mean |" in md
