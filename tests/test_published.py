"""The published numbers beside ours: the table in the repository and collect_results --published."""
import numpy as np
import pytest

from configs.experiment import method_names
from data.core.errors import DataError
from data.core.specs import load_spec
from evaluation.published import PUBLISHED_CSV, load_published, published_for
from scripts import collect_results
from tests.test_workflow import fake_run

ALL_ORGANS_CONSISTENT = ("V", "T", "U")     # statuses whose organs must average to the printed mean


def test_every_entry_names_a_method_dataset_and_labels_of_this_project():
    entries = load_published()
    assert {e.method for e in entries} == set(method_names())          # all six methods have numbers
    for e in entries:
        spec = load_spec(e.dataset)
        assert set(e.dice) <= set(spec.eval_labels), (e.method, e.dataset, e.entry)
        assert e.mean is not None and e.source, (e.method, e.dataset, e.entry)


def test_transcribed_organs_average_to_the_printed_mean():
    """A typo in the table shows as an entry whose organs do not average to its mean; the
    reference notes mark the entries whose source itself is inconsistent (X) or computed (c)."""
    checked = 0
    for e in load_published():
        spec = load_spec(e.dataset)
        if len(e.dice) == len(spec.eval_labels) and e.status.split(",")[0] in ALL_ORGANS_CONSISTENT:
            assert np.mean(list(e.dice.values())) == pytest.approx(e.mean, abs=0.06), (e.method, e.dataset, e.entry)
            checked += 1
    assert checked >= 20


def test_papers_numbers_as_published():
    # spot checks against ../shared/reference/published_results.md (A1, A3, A4)
    chaos = {e.method: e for e in published_for("CHAOST2", 1) if e.primary}
    assert chaos["qnet"].dice == {3: 78.36, 2: 87.98, 4: 75.99, 1: 81.74} and chaos["qnet"].mean == 81.02
    sabs = {e.method: e for e in published_for("SABS", 2) if e.primary}
    assert sabs["gmrd"].dice == {} and sabs["gmrd"].mean == 77.32
    assert sabs["alpnet"].dice[6] == 73.65                       # SABS liver is label 6
    cmr = {e.method: e for e in published_for("CMR", 1) if e.primary}
    assert cmr["rpt"].dice == {2: 89.90, 1: 66.91, 3: 80.78}     # LV-BP is label 2, LV-MYO 1
    assert published_for("CMR", 2) == []


def test_collect_results_published_adds_the_papers_columns(tmp_path, capsys):
    for fold in range(5):
        fake_run(tmp_path, method="qnet", fold=fold, dice={"LIVER": 0.8, "RK": 0.85, "LK": 0.75, "SPLEEN": 0.7})
    out = tmp_path / "out"
    assert collect_results.main([str(tmp_path), "--out", str(out), "--published"]) == 0
    md = (out / "table.md").read_text()
    assert md == capsys.readouterr().out.split("written:")[0].rstrip("\n") + "\n"
    header = "| Method | LK | LK pub. | RK | RK pub. | SPLEEN | SPLEEN pub. | LIVER | LIVER pub. | Mean | Mean pub. |"
    assert header in md
    assert ("| qnet | 75.00 ± 0.00 | 78.36 | 85.00 ± 0.00 | 87.98 | 70.00 ± 0.00 | 75.99 | 80.00 ± 0.00 | 81.74 "
            "| 77.50 | 81.02 | paper: PONet Tab.2 (transcription) [T] |") in md
    # methods without a run here still get their published row; ours is a dash
    assert "| rpt | – | 80.72 | – | 89.82 | – | 76.37 | – | 82.86 | – | 82.44 |" in md
    # the other published entries are listed below
    assert "| gmrd | user reproduction | 76.66 | 90.51 | 71.27 | 80.14 | 79.63 |" in md
    assert "| qnet | re-run by DSPNet |" in md
    # without the flag the table is ours only
    assert collect_results.main([str(tmp_path), "--out", str(tmp_path / "plain")]) == 0
    assert "pub." not in (tmp_path / "plain" / "table.md").read_text()


def test_a_malformed_published_table_names_the_row(tmp_path):
    text = PUBLISHED_CSV.read_text()
    bad = tmp_path / "published.csv"
    bad.write_text(text.replace("alpnet,CHAOST2,1,paper,yes,3,LK,81.92", "alpnet,CHAOST2,1,paper,yes,3,LK,8l.92"))
    with pytest.raises(DataError, match=r"published.csv, row 2: .*dice='8l.92'"):
        load_published(bad)
    bad.write_text(text.replace("rpt,CHAOST2,1,as listed by PONet,no", "rpt,CHAOST2,1,as listed by PONet,yes"))
    with pytest.raises(DataError, match="rpt CHAOST2 setting 1 has two primary entries"):
        load_published(bad)
