"""One-shot segmentation of new scans (scripts/segment.py on models/engine/segmentation.py): geometry round
trip, extent, real model, bad inputs."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from data.core.io import Geometry, read_volume
from data.core.specs import load_spec
from data.phantoms import make_phantom, phantom_geometry
from data.pipeline import image_from_array, prepare_scan, resample_image, resample_label
from evaluation.surface import array_spacing, surface_distances
from models.engine import segmentation
from models.engine.builders import build_model
from models.engine.experiment import Experiment
from models.engine.predictor import Predictor
from scripts import segment
from tests.helpers import full_config
from tests.test_pictures import panel_boxes, read_png

QUERY_SPACING = (2.0, 3.1, 6.0)          # the phantoms are 2.5 x 2.5 x 8.0 mm, LAS


def _write(path, array, geometry):
    sitk.WriteImage(image_from_array(array, geometry), str(path))
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A support phantom and a query phantom resampled to other spacings, in several orientations."""
    root = tmp_path_factory.mktemp("segment")
    geometry = phantom_geometry(size=64)
    image, label = make_phantom(1, size=64, slices=12)
    files = {"support": _write(root / "support.nii.gz", image, geometry),
             "support_label": _write(root / "support_label.nii.gz", label, geometry)}
    image, label = make_phantom(2, size=64, slices=12)
    query = resample_image(image_from_array(image, geometry), QUERY_SPACING, "clean")
    query_label = Geometry.of(query).apply_to(sitk.GetImageFromArray(
        resample_label(label, geometry, QUERY_SPACING, "clean").astype(np.uint8)))
    for code in ("RPS", "ASL"):     # x and y flipped (LPS vs RAS style); axes permuted and flipped
        files[code] = root / f"query_{code}.nii.gz"
        files[code + "_label"] = root / f"query_{code}_label.nii.gz"
        sitk.WriteImage(sitk.DICOMOrient(query, code), str(files[code]))
        sitk.WriteImage(sitk.DICOMOrient(query_label, code), str(files[code + "_label"]))
    cfg = full_config("adnet", "SYNTH", root / "SYNTH", root / "runs", **{"encoder.weights": "none"})
    files["config_only"] = root / "config_only.pth"
    torch.save({"model": {}, "config": cfg}, files["config_only"])
    files["root"] = root
    return files


def _args(scans, out, query="RPS", class_id=1, with_label=True, checkpoint=None, extra=()):
    args = ["--checkpoint", str(checkpoint or scans["config_only"]), "--support-image", str(scans["support"]),
            "--support-label", str(scans["support_label"]), "--class-id", str(class_id),
            "--query", str(scans[query]), "--out", str(out), *extra]
    if with_label:
        args += ["--query-label", str(scans[query + "_label"])]
    return args


def _own_label_predictor(support, support_zs, query, chunks):
    """Returns the query's own prepared label: a perfect model, so only the geometry is tested."""
    assert all(support.mask[z].any() for z in support_zs) and len(support_zs) == len(chunks)
    return [query.mask[zs].astype(np.float32) for zs in chunks]


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize("orientation", ["RPS", "ASL"])
@pytest.mark.parametrize("class_id", [1, 2])
def test_mask_comes_back_aligned_with_the_query_voxel_for_voxel(scans, tmp_path, capsys, orientation, class_id):
    out = tmp_path / "out"
    assert segment.main(_args(scans, out, orientation, class_id), predictor=_own_label_predictor) == 0
    name = {1: "LIVER", 2: "RK"}[class_id]
    mask, geometry = read_volume(out / f"query_{orientation}_{name}.nii.gz")
    truth, truth_geometry = read_volume(scans[orientation + "_label"])
    assert mask.shape == truth.shape and mask.dtype == np.uint8
    assert np.allclose(geometry.spacing, truth_geometry.spacing, atol=1e-5)
    assert np.allclose(geometry.origin, truth_geometry.origin, atol=1e-4)
    assert np.allclose(geometry.direction, truth_geometry.direction, atol=1e-6)
    assert set(np.unique(mask)) == {0, class_id}
    assert _dice(mask == class_id, truth == class_id) >= 0.95
    # the written volume is the mask's voxels x the query's voxel volume
    rows = (out / f"volumes_{name}.csv").read_text().splitlines()
    volume_ml = float(rows[1].split(",")[4])
    assert volume_ml == pytest.approx(np.count_nonzero(mask) * np.prod(QUERY_SPACING) / 1000, rel=1e-4)
    table = capsys.readouterr().out
    assert f"query_{orientation}" in table and f"{volume_ml:.2f}" in table and "(label)" in table
    _check_overlay(out / f"query_{orientation}_{name}.png", f"query_{orientation}", name, volume_ml, with_dice=True)


def _check_overlay(path, query, class_name, volume_ml, with_dice):
    """The PNG: titled with query, class, volume (and Dice with a query label); every panel names
    class, query, slice (and its Dice); the prediction (LIVER or RK, both on the patient's right)
    is a red tint on the image's left, the right kidney also in the bottom (posterior) half."""
    rgb, text = read_png(path)
    assert text["Title"].startswith(f"{query}: {class_name}, {volume_ml:.1f} ml")
    assert ("Dice" in text["Title"]) == with_dice
    titles = text["Panel titles"].split("\n")
    assert len(titles) == 2 * int(text["Panels"])
    for first, second in zip(titles[::2], titles[1::2]):
        assert first == f"{class_name}, scan {query}" and second.startswith("slice ")
        assert ("Dice" in second) == with_dice
    reddish = (rgb[..., 0] - rgb[..., 1] > 60) & (np.abs(rgb[..., 1] - rgb[..., 2]) < 12)
    for top, bottom, left, right in panel_boxes(rgb):
        ys, xs = np.nonzero(reddish[top:bottom, left:right])
        assert len(xs) > 20 and xs.mean() < 0.45 * (right - left), (path, xs.mean(), right - left)
        if class_name == "RK":
            assert ys.mean() > 0.55 * (bottom - top), (path, ys.mean(), bottom - top)


def test_without_a_query_label_the_extent_is_estimated(scans, tmp_path, capsys):
    """A predictor that knows the answer on the prepared grid: the estimated extent must find the organ."""
    spec = load_spec("SYNTH")
    image = sitk.ReadImage(str(scans["RPS"]))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(scans["RPS_label"]))) == 1
    oracle = prepare_scan(image, label.astype(np.uint8), spec.preprocessing).label > 0
    calls = []

    def oracle_predictor(support, support_zs, query, chunks):
        assert query.mask is None and query.image.shape == oracle.shape
        calls.append([len(zs) for zs in chunks])
        return [oracle[zs].astype(np.float32) for zs in chunks]

    out = tmp_path / "out"
    assert segment.main(_args(scans, out, with_label=False), predictor=oracle_predictor) == 0
    assert calls[0] == [oracle.shape[0]]                    # first pass: every slice, one chunk
    assert len(calls[1]) == 3 and sum(calls[1]) < oracle.shape[0]   # then the estimated extent in 3 chunks
    assert "(estimated)" in capsys.readouterr().out
    mask, geometry = read_volume(out / "query_RPS_LIVER.nii.gz")
    assert _dice(mask > 0, label) >= 0.9
    _check_overlay(out / "query_RPS_LIVER.png", "query_RPS", "LIVER",
                   np.count_nonzero(mask) * np.prod(geometry.spacing) / 1000, with_dice=False)


def test_extent_rule():
    areas = np.array([0, 0, 5, 50, 100, 60, 3, 0, 40])
    assert segmentation.estimate_extent(areas, 0.1) == (3, 5)
    assert segmentation.estimate_extent(areas, 0.01) == (2, 6)    # 40 at z8 is cut off by the empty z7
    assert segmentation.estimate_extent(np.zeros(5), 0.1) is None


def test_untrained_model_through_the_cli(scans, tmp_path, capsys):
    """The real model path: a snapshot in our format with its config, on a dataset of one's own whose
    dataset.json (a coarse 32 x 32 grid, to keep the CPU encoder quick) lives in the config's data_dir."""
    data_dir = tmp_path / "MINE"
    data_dir.mkdir()
    spec = load_spec("SYNTH")
    (data_dir / "dataset.json").write_text(json.dumps({
        "name": "MINE", "modality": "MR", "labels": spec.labels, "image_dir": "scans",
        "preprocessing": {**spec.preprocessing.to_mapping(), "spacing": [5.0, 5.0], "size": 32}}))
    cfg = full_config("adnet", "SYNTH", data_dir, tmp_path / "runs", **{"encoder.weights": "none"})
    cfg["dataset"] = "MINE"
    torch.manual_seed(0)
    exp = Experiment.from_config(cfg)
    model = build_model(exp.encoder, exp.head, load_weights=False)
    checkpoint = tmp_path / "100.pth"
    torch.save({"model": model.state_dict(), "config": cfg}, checkpoint)
    out = tmp_path / "out"
    rc = segment.main(_args(scans, out, "ASL", checkpoint=checkpoint, extra=["--device", "cpu", "--n-part", "3"]))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "volume (ml)" in printed and "query_ASL" in printed and "LIVER" in printed
    mask, geometry = read_volume(out / "query_ASL_LIVER.nii.gz")
    query, query_geometry = read_volume(scans["ASL"])
    assert mask.shape == query.shape and geometry.matches(query_geometry)
    assert set(np.unique(mask)) <= {0, 1}
    assert (out / "query_ASL_LIVER.png").is_file() and (out / "volumes_LIVER.csv").is_file()


def test_support_label_without_the_class(scans, tmp_path, capsys):
    empty = tmp_path / "empty_label.nii.gz"
    label, geometry = read_volume(scans["support_label"])
    _write(empty, np.where(label == 2, 0, label).astype(np.uint8), geometry)
    args = _args(scans, tmp_path / "out", class_id=2)
    args[args.index(str(scans["support_label"]))] = str(empty)
    assert segment.main(args, predictor=_own_label_predictor) == 1
    assert "has no voxel of class RK (value 2)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [(64, 64), (1, 64, 64)])
def test_two_dimensional_query(scans, tmp_path, capsys, shape):
    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(shape, np.float32)), str(flat))
    args = _args(scans, tmp_path / "out", with_label=False)
    args[args.index(str(scans["RPS"]))] = str(flat)
    assert segment.main(args, predictor=_own_label_predictor) == 1
    err = capsys.readouterr().err
    assert "slice.nii.gz" in err and ("2-D" in err or "3-D volume" in err)


def test_a_bad_later_query_is_refused_before_any_output(scans, tmp_path, capsys):
    """All queries are checked before the first mask is written: a constant scan, or one whose header
    spacing (500 mm) would make a grid of billions of voxels, after a good query leaves no output."""
    geometry = phantom_geometry(size=64)
    constant = _write(tmp_path / "constant.nii.gz", np.full((12, 64, 64), 7.0, np.float32), geometry)
    image, _ = make_phantom(3, size=64, slices=12)
    huge = _write(tmp_path / "huge.nii.gz", image, Geometry((500.0, 500.0, 500.0)))
    for bad, says in ((constant, "constant"), (huge, "500.0, 500.0, 500.0")):
        args = _args(scans, tmp_path / "out", with_label=False)
        args[args.index("--query") + 1:args.index("--query") + 2] = [str(scans["RPS"]), str(bad)]
        assert segment.main(args, predictor=_own_label_predictor) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(bad) in err and says in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_class_id_not_in_the_training_labels(scans, tmp_path, capsys):
    assert segment.main(_args(scans, tmp_path / "out", class_id=7), predictor=_own_label_predictor) == 1
    assert "--class-id 7 is not a class of SYNTH" in capsys.readouterr().err


def test_checkpoint_problems(scans, tmp_path, capsys):
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    assert segment.main(_args(scans, tmp_path / "out", checkpoint=plain)) == 1
    assert "has no experiment config" in capsys.readouterr().err
    assert segment.main(_args(scans, tmp_path / "out", checkpoint=tmp_path / "missing.pth")) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_own_dataset_folder_gone_needs_dataset_json(scans, tmp_path, capsys):
    cfg = full_config("adnet", "SYNTH", tmp_path / "gone", tmp_path / "runs", **{"encoder.weights": "none"})
    cfg["dataset"] = "MINE"
    checkpoint = tmp_path / "mine.pth"
    torch.save({"model": {}, "config": cfg}, checkpoint)
    assert segment.main(_args(scans, tmp_path / "out", checkpoint=checkpoint), predictor=_own_label_predictor) == 1
    assert "Pass --dataset-json" in capsys.readouterr().err
    spec = load_spec("SYNTH")
    copy = tmp_path / "dataset.json"
    copy.write_text(json.dumps({"name": "MINE", "modality": "MR", "labels": spec.labels,
                                "preprocessing": spec.preprocessing.to_mapping()}))
    args = _args(scans, tmp_path / "out", checkpoint=checkpoint, extra=["--dataset-json", str(copy)])
    assert segment.main(args, predictor=_own_label_predictor) == 0


def test_model_predictor_is_the_model_on_the_same_slices(tmp_path):
    """Cached, batched encoding and chunked head calls give what one forward pass of the model gives."""
    cfg = full_config("adnet", "SYNTH", tmp_path, tmp_path, **{"encoder.weights": "none"})
    torch.manual_seed(0)
    exp = Experiment.from_config(cfg)
    model = build_model(exp.encoder, exp.head, load_weights=False).eval()
    rng = np.random.default_rng(0)
    support_image, query_image = rng.normal(size=(2, 6, 32, 32)).astype(np.float32)
    mask = np.zeros((6, 32, 32), bool)
    mask[:, 8:20, 10:22] = True
    support = segmentation.PreparedScan("s", None, support_image, Geometry((1.0, 1.0, 1.0)), mask)
    query = segmentation.PreparedScan("q", None, query_image, Geometry((1.0, 1.0, 1.0)), None)
    predictor = segmentation.ModelChunkPredictor(Predictor(model, torch.device("cpu"), batch_size=2))
    chunks = [np.array([0, 1, 2]), np.array([4])]          # batch_size 2: the first chunk takes two head calls
    probs = predictor(support, [1, 3], query, chunks)

    def as_batch(images):       # N x H x W -> 1 x N x 3 x H x W
        return torch.from_numpy(images)[None, :, None].expand(-1, -1, 3, -1, -1)

    for support_z, zs, prob in zip([1, 3], chunks, probs):
        with torch.no_grad():
            log_probs = model(as_batch(support_image[[support_z]]), torch.from_numpy(mask[[support_z]].astype(np.float32))[None],
                              as_batch(query_image[zs])).log_probs
        assert prob.shape == (len(zs), 32, 32)
        np.testing.assert_allclose(prob, torch.softmax(log_probs[0], dim=1)[:, 1].numpy(), atol=1e-5)


def _shifted_label_predictor(support, support_zs, query, chunks):
    """The query's own prepared label moved 3 columns: a prediction with a known, non-zero boundary error."""
    return [np.roll(query.mask[zs], 3, axis=2).astype(np.float32) for zs in chunks]


def _box_predictor(support, support_zs, query, chunks):
    boxes = []
    for zs in chunks:
        box = np.zeros((len(zs), *query.image.shape[1:]), np.float32)
        box[:, 20:40, 20:40] = 1
        boxes.append(box)
    return boxes


def test_with_a_query_label_the_table_and_csv_give_hd95_and_assd(scans, tmp_path, capsys):
    """HD95 and ASSD (mm, evaluation/surface.py) of the mask against the query label on the query's own grid,
    as its Dice; without a label the table has no such columns and the CSV leaves them empty."""
    out = tmp_path / "out"
    assert segment.main(_args(scans, out, "ASL"), predictor=_shifted_label_predictor) == 0
    mask, geometry = read_volume(out / "query_ASL_LIVER.nii.gz")
    truth, _ = read_volume(scans["ASL_label"])
    expected = surface_distances(mask > 0, truth == 1, array_spacing(geometry.spacing))
    assert expected.hd95_mm > 0 and expected.assd_mm > 0
    header, row = (out / "volumes_LIVER.csv").read_text().splitlines()
    values = dict(zip(header.split(","), row.split(",")))
    assert float(values["hd95_mm"]) == pytest.approx(expected.hd95_mm, abs=1e-3)
    assert float(values["assd_mm"]) == pytest.approx(expected.assd_mm, abs=1e-3)
    table = capsys.readouterr().out.splitlines()
    assert "hd95 mm" in table[0] and "assd mm" in table[0]
    assert f"{expected.hd95_mm:.2f}" in table[2] and f"{expected.assd_mm:.2f}" in table[2]

    unlabelled = tmp_path / "unlabelled"
    assert segment.main(_args(scans, unlabelled, "ASL", with_label=False), predictor=_box_predictor) == 0
    assert "hd95" not in capsys.readouterr().out
    header, row = (unlabelled / "volumes_LIVER.csv").read_text().splitlines()
    values = dict(zip(header.split(","), row.split(",")))
    assert values["dice"] == values["hd95_mm"] == values["assd_mm"] == ""
