"""HD95 and ASSD beside Dice (evaluation/surface.py): hand-computed cases, empty masks, and where they are
reported (results.csv/json, the evaluation's printout, collect_results --surface)."""
import csv
import json
import math

import numpy as np
import pytest

from data.core.specs import load_spec
from dataloaders.volumes import VolumeStore
from evaluation.protocol import EvaluationResult, ProtocolOptions, ScanScore
from evaluation.reporting import format_surface_table, summary, write_results
from evaluation.surface import (
    SurfaceDistances,
    array_spacing,
    mean_distances,
    scored_surface_distances,
    surface_distances,
)
from models.engine.evaluation import Evaluator
from models.heads.common import HeadOutput, two_class_log_probs
from scripts import collect_results
from tests.helpers import GEOMETRY, write_dataset
from tests.test_protocol import OracleModel
from tests.test_workflow import fake_run


def two_offset_squares(shape=(10, 10)):
    """4 x 4 squares, rows 2-5; A in columns 2-5, B two columns to the right (4-7)."""
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[2:6, 2:6] = True
    b[2:6, 4:8] = True
    return a, b


# ----------------------------------------------------------------------------- hand-computed
@pytest.mark.parametrize("row_mm, col_mm, hd95, assd", [(0.5, 1.5, 3.0, 4 / 3), (1.5, 0.5, 1.0, 0.5)])
def test_two_offset_squares_by_hand(row_mm, col_mm, hd95, assd):
    """Each square's surface is its 12-pixel ring. From A's ring to B's (and by symmetry back): column 2,
    4 pixels at 2 columns; column 5, rows 2 and 5 on B's ring (0), rows 3-4 one column or one row from it
    (min(col, row)); rows 2 and 5, column 4 on B's ring (0), column 3 one column away. Sorted (row 0.5 mm,
    column 1.5 mm): 0 x4, 0.5 x2, 1.5 x2, 3 x4: ASSD 16/12 mm, 95th percentile (linear, position 10.45 of
    0..11) 3 mm. With the spacings swapped: 0 x4, 0.5 x4, 1 x4: ASSD 0.5 mm, HD95 1 mm."""
    a, b = two_offset_squares()
    d = surface_distances(a, b, (row_mm, col_mm))
    assert d.hd95_mm == pytest.approx(hd95, abs=1e-5) and d.assd_mm == pytest.approx(assd, abs=1e-5)
    back = surface_distances(b, a, (row_mm, col_mm))                         # symmetric
    assert (back.hd95_mm, back.assd_mm) == pytest.approx((d.hd95_mm, d.assd_mm))
    assert d.defined


def test_volume_spacing_is_taken_in_array_order_and_only_scored_slices_count():
    """The squares on one slice of a volume: every voxel of a one-slice mask is surface, so the distances
    are between the filled squares: from A, columns 4-5 (8 voxels) lie in B (0), column 3 one column away,
    column 2 two. 16 x 0, 8 x 1 col, 8 x 2 col: ASSD 0.75 col, HD95 2 col (x = columns = 1.5 mm, given
    first in SimpleITK's (x, y, z) order). A blob predicted on a slice that is not scored changes nothing."""
    a, b = two_offset_squares()
    prediction, truth = np.zeros((5, 10, 10), bool), np.zeros((5, 10, 10), bool)
    prediction[2], truth[2] = a, b
    prediction[0, 7:9, 7:9] = True                                          # slice 0 is not scored
    d = scored_surface_distances(prediction, truth, np.array([2]), (1.5, 0.5, 4.0))
    assert d.hd95_mm == pytest.approx(3.0, abs=1e-5) and d.assd_mm == pytest.approx(1.125, abs=1e-5)
    assert array_spacing((1.5, 0.5, 4.0)) == (4.0, 0.5, 1.5)
    unscored = scored_surface_distances(prediction, truth, np.array([0, 2]), (1.5, 0.5, 4.0))
    assert unscored.hd95_mm > 3.0                                          # the blob counts once scored


# ----------------------------------------------------------------------------- empty masks (MONAI's values)
def test_empty_prediction_or_label_give_monais_nan_and_inf():
    a, _ = two_offset_squares()
    empty = np.zeros_like(a)
    for prediction, truth in ((empty, a), (a, empty)):
        d = surface_distances(prediction, truth, (1.0, 1.0))
        assert math.isnan(d.hd95_mm) and d.assd_mm == math.inf and not d.defined
    both = surface_distances(empty, empty, (1.0, 1.0))
    assert math.isnan(both.hd95_mm) and math.isnan(both.assd_mm)


def test_means_leave_out_undefined_distances_and_count_them():
    means, excluded = mean_distances([SurfaceDistances(2.0, 1.0), SurfaceDistances(float("nan"), math.inf),
                                      SurfaceDistances(4.0, 3.0)])
    assert (means.hd95_mm, means.assd_mm, excluded) == (3.0, 2.0, 1)
    none, excluded = mean_distances([SurfaceDistances(float("nan"), math.inf)])
    assert math.isnan(none.hd95_mm) and math.isnan(none.assd_mm) and excluded == 1


def test_shape_or_spacing_mismatch_is_refused():
    a, _ = two_offset_squares()
    with pytest.raises(ValueError, match="shape"):
        surface_distances(a, a[:5], (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(a, a, (1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------- evaluation outputs
class NothingModel(OracleModel):
    """Predicts background everywhere: every query's prediction is empty."""

    def segment_prepared(self, state, query):
        q = query["out"][:, :, 0]
        return HeadOutput(two_class_log_probs(q * 0))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("surface") / "toy", ids=tuple(range(1, 12)), n_classes=1)
    spec = load_spec("TOY", root)
    store = VolumeStore(spec, root)
    return spec, store, spec.fold(store.ids, 0)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_and_json_carry_hd95_and_assd_per_scan_and_class(toy, tmp_path):
    spec, store, fold = toy
    result = Evaluator(OracleModel(), store, spec, fold, ProtocolOptions(batch_size=4), progress=False).run([1])
    paths = write_results(result, tmp_path)
    rows = _rows(paths["csv"])
    assert list(rows[0]) == ["class", "class_id", "scan", "dice", "iou", "hd95_mm", "assd_mm", "tp", "fp", "fn",
                             "scored_slices"]
    assert len(rows) == len(result.scores) == 2
    for row in rows:
        scan = store.scan(int(row["scan"]))
        expected = surface_distances(result.predictions[(scan.scan_id, 1)], scan.label == 1,
                                     array_spacing(GEOMETRY.spacing))
        assert float(row["hd95_mm"]) == pytest.approx(expected.hd95_mm, abs=1e-4)
        assert float(row["assd_mm"]) == pytest.approx(expected.assd_mm, abs=1e-4)
    written = json.loads(paths["json"].read_text())
    assert {"hd95_mm", "assd_mm"} <= set(written["per_scan"][0])
    c1 = written["classes"]["C1"]
    assert c1["surface_excluded"] == 0
    assert c1["hd95_mm"] == pytest.approx(np.mean([float(r["hd95_mm"]) for r in rows]), abs=1e-4)
    assert written["mean_assd_mm"] == pytest.approx(c1["assd_mm"])


def test_an_empty_prediction_is_written_as_monai_gives_it_and_left_out_of_the_means(toy, tmp_path):
    spec, store, fold = toy
    result = Evaluator(NothingModel(), store, spec, fold, ProtocolOptions(batch_size=4), progress=False).run([1])
    rows = _rows(write_results(result, tmp_path)["csv"])
    assert [(r["hd95_mm"], r["assd_mm"]) for r in rows] == [("nan", "inf")] * 2
    entry = summary(result)["classes"]["C1"]
    assert entry["surface_excluded"] == 2 and math.isnan(entry["hd95_mm"]) and math.isnan(entry["assd_mm"])
    table = format_surface_table(result)
    assert table.splitlines()[2].split() == ["C1", "nan", "nan", "2", "2"]


def test_surface_table_gives_class_means_and_exclusions():
    r = EvaluationResult("X", 0, 9, (1, 2, 3))
    r.scores = [ScanScore(1, "A", 1, 1, 0, 0, 1, hd95_mm=2.0, assd_mm=1.0),
                ScanScore(1, "A", 2, 1, 0, 0, 1, hd95_mm=4.0, assd_mm=2.0),
                ScanScore(1, "A", 3, 0, 0, 1, 1, hd95_mm=float("nan"), assd_mm=math.inf),
                ScanScore(2, "B", 1, 1, 0, 0, 1, hd95_mm=10.0, assd_mm=5.0)]
    lines = format_surface_table(r).splitlines()
    assert lines[0].split() == ["class", "hd95", "mm", "assd", "mm", "scans", "excluded"]
    assert lines[2].split() == ["A", "3.00", "1.50", "3", "1"] and lines[3].split() == ["B", "10.00", "5.00", "1", "0"]
    assert lines[5].split() == ["mean", "6.50", "3.25"]


# ----------------------------------------------------------------------------- collect_results --surface
def _with_surface(folder, hd95, excluded=0):
    path = folder / "results.json"
    results = json.loads(path.read_text())
    for name, entry in results["classes"].items():
        entry.update(hd95_mm=hd95, assd_mm=hd95 / 4, surface_excluded=excluded)
    path.write_text(json.dumps(results))


def test_collect_results_tables_hd95_and_assd_on_request(tmp_path, capsys):
    for fold in range(5):
        _with_surface(fake_run(tmp_path / "runs", fold=fold), hd95=10.0 + fold, excluded=int(fold == 3))
    fake_run(tmp_path / "runs", method="qnet", fold=0)                     # written before the distances were
    plain, surface = tmp_path / "plain", tmp_path / "surface"
    assert collect_results.main([str(tmp_path / "runs"), "--out", str(plain)]) == 0
    assert "HD95" not in (plain / "table.md").read_text() and not (plain / "surface.csv").exists()
    assert collect_results.main([str(tmp_path / "runs"), "--out", str(surface), "--surface"]) == 0
    md = (surface / "table.md").read_text()
    assert md.startswith((plain / "table.md").read_text())                  # the Dice table as before
    hd95 = md[md.index("HD95 (mm)"):md.index("ASSD (mm)")]
    assert "| adnet | 12.00 ± 1.41 | 12.00 ± 1.41 | 12.00 ± 1.41 | 12.00 ± 1.41 | 12.00 |" in hd95
    assert "| qnet | – | – | – | – | – |" in hd95
    assert "| adnet | 3.00 ± 0.35 |" in md[md.index("ASSD (mm)"):]
    assert "adnet LK fold 3: 1" in md and "HD95 (mm)" in capsys.readouterr().out
    rows = _rows(surface / "surface.csv")
    assert len(rows) == 4 * 5 and list(rows[0]) == ["method", "organ", "fold", "hd95_mm", "assd_mm",
                                                    "surface_excluded"]
