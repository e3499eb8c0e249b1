"""Pictures a person can read: overlays show any prediction (a whole-slice one too), slices in the
radiological convention (anterior up, the patient's right on the image's left) whatever the scan's
orientation, titles that name class, scan, slice and Dice, and training curves that are never blank."""
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from data.core.specs import load_spec
from data.phantoms import make_phantom, phantom_geometry
from dataloaders.volumes import VolumeStore
from evaluation import reporting
from evaluation.protocol import EvaluationResult, ScanScore
from evaluation.reporting import (FILL_ALPHA, PREDICTION_COLOR, SliceView, radiological_view, render_prediction,
                                  write_overlays, write_training_curves)
from tests.helpers import GEOMETRY, write_dataset

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
LAS = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)          # CHAOS, the phantoms: rows run anterior
RPS = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)          # columns run right, rows posterior
ALS = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)          # columns run anterior, rows left (transposed)
# a CMR short-axis scan as stored in the Q-Net data (image_1 of CMR): oblique
CMR_1 = (0.628, 0.507, -0.591, 0.729, -0.116, 0.675, -0.273, 0.854, 0.442)


# ----------------------------------------------------------------------------- reading the PNG back
def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int), dict(im.text)


def panel_boxes(rgb):
    """[(top, bottom, left, right)] of the image panels, left to right: the rows and columns mostly
    covered by non-white pixels (titles and legend are sparse text)."""
    ink = (rgb < 245).any(axis=2)
    rows = np.flatnonzero(ink.mean(axis=1) >= 0.5 * ink.mean(axis=1).max())
    top, bottom = rows.min(), rows.max() + 1
    cols = ink[top:bottom].mean(axis=0) >= 0.5
    runs, n = ndimage.label(cols)
    return [(top, bottom, int(np.flatnonzero(runs == k)[0]), int(np.flatnonzero(runs == k)[-1]) + 1)
            for k in range(1, n + 1) if (runs == k).sum() > 20]


def panel_box(rgb):
    [box] = panel_boxes(rgb)
    return box


def prediction_fill(over=(0.0, 0.0, 0.0)):
    """The RGB (0-255) of the prediction's fill blended over a pixel of colour `over`."""
    return np.array([round(255 * (FILL_ALPHA * p + (1 - FILL_ALPHA) * o)) for p, o in zip(PREDICTION_COLOR, over)])


def coloured(rgb, colour, tolerance=4):
    return (np.abs(rgb - np.asarray(colour)) <= tolerance).all(axis=2)


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return ys.mean(), xs.mean()


# ----------------------------------------------------------------------------- (a) any prediction is visible
def test_a_whole_slice_prediction_fills_the_panel(tmp_path):
    image = np.zeros((3, 40, 48), np.float32)                  # black: the fill's colour is known exactly
    prediction = np.ones(image.shape, np.uint8)
    path = render_prediction(image, prediction, None, [1], "whole slice", tmp_path / "whole.png",
                             class_name="LIVER", scan=2, direction=LAS)
    rgb, _ = read_png(path)
    fill = coloured(rgb, prediction_fill())
    assert fill.sum() > 5000, fill.sum()
    (top, bottom), (left, right) = np.flatnonzero(fill.any(axis=1))[[0, -1]], np.flatnonzero(fill.any(axis=0))[[0, -1]]
    assert bottom - top > 100 and right - left > 100, (top, bottom, left, right)
    # the interior (the box less 10 % on each side) is filled, not only the border
    dy, dx = (bottom - top) // 10, (right - left) // 10
    interior = fill[top + dy:bottom - dy, left + dx:right - dx]
    assert interior.mean() > 0.98, interior.mean()
    # and the fill covers the panel: the box of the filled pixels is the panel's
    p_top, p_bottom, p_left, p_right = panel_box(rgb)
    assert abs(top - p_top) <= 3 and abs(bottom - p_bottom) <= 3 and abs(left - p_left) <= 3


def test_a_small_prediction_is_filled_and_outlined(tmp_path):
    image = np.zeros((1, 40, 40), np.float32)
    prediction = np.zeros(image.shape, np.uint8)
    prediction[0, 10:30, 10:30] = 1
    rgb, _ = read_png(render_prediction(image, prediction, None, [0], "box", tmp_path / "box.png", direction=LPS))
    fill, outline = coloured(rgb, prediction_fill()), coloured(rgb, 255 * np.array(PREDICTION_COLOR), 40)
    top, bottom, left, right = panel_box(rgb)
    assert fill[top:bottom, left:right].mean() == pytest.approx(0.25, abs=0.06)   # 20 x 20 of 40 x 40
    assert outline.sum() > 100


# ----------------------------------------------------------------------------- (b) radiological convention
@pytest.mark.parametrize("direction, expected", [
    (LPS, SliceView(False, False, False, "axial")),
    (LAS, SliceView(False, True, False, "axial")),
    (RPS, SliceView(False, False, True, "axial")),
    ((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0), SliceView(False, True, True, "axial")),    # RAS
    (ALS, SliceView(True, True, False, "axial")),
    ((1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0), SliceView(False, False, False, "coronal")),  # LIP
    ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0), SliceView(False, True, False, "coronal")),   # LSA
    ((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0), SliceView(False, True, False, "sagittal")),   # PSL
    (CMR_1, SliceView(False, True, False, "coronal")),
    (None, SliceView()),
])
def test_radiological_view_of_known_directions(direction, expected):
    assert radiological_view(direction) == expected


def marker_volume_las():
    """A LAS volume (rows run anterior, columns towards patient left): grey background, a white blob
    at the anterior side (high rows) and a black blob at the patient's right side (low columns)."""
    image = np.full((3, 40, 48), 0.5, np.float32)
    image[:, 32:38, 20:28] = 1.0      # anterior
    image[:, 16:24, 2:8] = 0.0        # patient right
    return image


STORED = {   # the same volume stored in other orientations: (direction, array from the LAS array)
    "LAS": (LAS, lambda a: a),
    "RPS": (RPS, lambda a: a[:, ::-1, ::-1]),          # x and y flipped
    "ALS": (ALS, lambda a: a.transpose(0, 2, 1)),      # in-plane axes swapped
}


@pytest.mark.parametrize("stored", sorted(STORED))
def test_anterior_is_up_and_patient_right_is_on_the_left(tmp_path, stored):
    direction, from_las = STORED[stored]
    image = np.ascontiguousarray(from_las(marker_volume_las()))
    path = render_prediction(image, np.zeros(image.shape, np.uint8), None, [1], stored, tmp_path / "m.png",
                             direction=direction)
    rgb, _ = read_png(path)
    top, bottom, left, right = panel_box(rgb)
    panel = rgb[top:bottom, left:right]
    anterior_y, anterior_x = centroid(coloured(panel, (255, 255, 255), 10))
    right_y, right_x = centroid(coloured(panel, (0, 0, 0), 10))
    height, width = panel.shape[:2]
    assert anterior_y < 0.5 * height, (anterior_y, height)            # anterior marker in the top half
    assert abs(anterior_x - 0.5 * width) < 0.15 * width                # ... near the middle
    assert right_x < 0.5 * width, (right_x, width)                     # patient right on the image's left
    assert abs(right_y - 0.5 * height) < 0.15 * height


def test_phantom_liver_is_on_the_left_and_kidneys_at_the_back(tmp_path):
    """The phantoms (LAS like CHAOS): the liver (patient right) on the image's left, the kidneys
    (posterior) in the bottom half."""
    image, label = make_phantom(1, size=64, slices=12)
    z = int(np.flatnonzero(((label == 1).any(axis=(1, 2))) & (label == 2).any(axis=(1, 2)))[0])
    direction = phantom_geometry(size=64).direction
    for organ, check in (((1,), lambda y, x, h, w: x < 0.45 * w), ((2, 3), lambda y, x, h, w: y > 0.55 * h)):
        path = render_prediction(np.zeros_like(image), np.isin(label, organ), None, [z], "phantom",
                                 tmp_path / f"{organ}.png", direction=direction)
        rgb, _ = read_png(path)
        top, bottom, left, right = panel_box(rgb)
        panel = rgb[top:bottom, left:right]
        y, x = centroid(coloured(panel, prediction_fill()))
        assert check(y, x, *panel.shape[:2]), (organ, y, x, panel.shape)


# ----------------------------------------------------------------------------- (d) titles; evaluation overlays
def test_panel_titles_name_class_scan_slice_and_dice(tmp_path):
    image = np.zeros((4, 20, 20), np.float32)
    prediction, truth = np.zeros(image.shape, np.uint8), np.zeros(image.shape, np.uint8)
    prediction[2, 5:15, 5:15] = 1
    truth[2, 5:15, 5:10] = 1                      # Dice 2 * 50 / (100 + 50) = 0.667
    path = render_prediction(image, prediction, truth, [2], "scan 7: LIVER", tmp_path / "t.png",
                             class_name="LIVER", scan=7, direction=LAS)
    _, text = read_png(path)
    assert text["Panels"] == "1" and text["Title"] == "scan 7: LIVER"
    assert text["Panel titles"] == "LIVER, scan 7\nslice 2, Dice 0.667"
    # without a ground truth: no Dice
    path = render_prediction(image, prediction, None, [2], "t", tmp_path / "u.png", class_name="LIVER", scan=7)
    assert read_png(path)[1]["Panel titles"] == "LIVER, scan 7\nslice 2"


def test_evaluation_overlays_fill_orient_and_title(tmp_path):
    root = write_dataset(tmp_path / "toy", ids=(1, 2), shape=(6, 32, 32), n_classes=1)
    store = VolumeStore(load_spec("TOY", root), root)
    query = store.scan(2)
    prediction = np.ones(query.image.shape, np.uint8)          # the whole volume predicted
    tp = int((query.label == 1).sum())
    support_z = int(store.scan(1).slices_with(1)[0])
    result = EvaluationResult("TOY", 0, 1, (2,), scores=[ScanScore(1, "C1", 2, tp, prediction.size - tp, 0, 4)],
                              predictions={(2, 1): prediction}, support_slices={1: [support_z]})
    [path] = write_overlays(result, store, tmp_path / "overlays", per_class=2)
    rgb, text = read_png(path)
    assert text["Panels"] == "3"
    titles = text["Panel titles"].split("\n")
    assert titles[0] == "C1, scan 1 (support)" and titles[1].startswith("slice ")
    picks = query.slices_with(1)[[0, -1]]
    for z, first, second in zip(picks, titles[2::2], titles[3::2]):
        dice = reporting.slice_dice(prediction[z], query.label[z] == 1)
        assert first == "C1, scan 2" and second == f"slice {z}, Dice {dice:.3f}"
    assert "TOY fold 0: C1" in text["Title"]
    # the toy image is grey noise: over grey g the fill gives (89 + 0.65 g, 0.65 g, 0.65 g), red well
    # above green and blue; the query panels are tinted over their whole area, the support panel nowhere
    reddish = (rgb[..., 0] - rgb[..., 1] > 60) & (np.abs(rgb[..., 1] - rgb[..., 2]) < 12)
    boxes = panel_boxes(rgb)
    assert len(boxes) == 3
    tinted = [reddish[t:b, l:r].mean() for t, b, l, r in boxes]
    assert tinted[0] < 0.01 and min(tinted[1:]) > 0.95, tinted
    assert GEOMETRY.direction == LAS and radiological_view(query.geometry.direction).flip_rows


# ----------------------------------------------------------------------------- (c) training curves
def _blue_blobs(path):
    rgb, _ = read_png(path)
    blue = coloured(rgb, (31, 119, 180), 12)                   # tab:blue, the first loss's colour
    return ndimage.label(blue)[1]


def test_curves_with_one_point_are_not_blank(tmp_path, monkeypatch):
    history = {"loss.query": ([1], [0.8]), "lr": ([1], [1e-3])}
    path = write_training_curves(history, tmp_path / "one.png")
    _, text = read_png(path)
    assert text["Panels"] == "2"
    # the point itself and the legend's sample: two separate blue marks
    with_marker = _blue_blobs(path)
    assert with_marker >= 2
    # drawn as a bare line (as before), the point vanishes: fewer blue marks
    monkeypatch.setattr(reporting, "_MARKER_POINTS", 0)
    assert _blue_blobs(write_training_curves(history, tmp_path / "bare.png")) < with_marker
