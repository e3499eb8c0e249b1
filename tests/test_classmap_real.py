"""Class-slice index (data/classmap.py): golden comparison with the JSONs shipped with the Q-Net data,
plus the two inclusion rules on small arrays."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data import classmap as cm
from data.core.specs import load_spec

GOLDEN = [("CHAOST2", "chaos_dir", (1, 100, 400)), ("CMR", "cmr_dir", (1, 200))]


@pytest.mark.parametrize("name, fixture, min_fgs", GOLDEN)
def test_reference_rule_reproduces_the_shipped_classmaps(name, fixture, min_fgs, request):
    data_dir = request.getfixturevalue(fixture)
    spec = load_spec(name)
    maps = cm.build_classmaps(data_dir, spec, min_fgs)
    for m in min_fgs:
        shipped_text = (spec.image_folder(data_dir) / f"classmap_{m}.json").read_text()
        shipped = json.loads(shipped_text)
        assert maps[m] == shipped
        assert list(maps[m]) == list(shipped)                               # class order
        for name_ in shipped:
            assert list(maps[m][name_]) == list(shipped[name_])             # scan id order
        assert json.dumps(maps[m]) == shipped_text                          # byte for byte


def test_classmap_command_writes_the_shipped_files(chaos_dir, tmp_path):
    spec = load_spec("CHAOST2")
    source = spec.image_folder(chaos_dir)
    target = spec.image_folder(tmp_path)
    target.mkdir()
    for label in source.glob("label_*.nii.gz"):
        (target / label.name).symlink_to(label)
        (target / label.name.replace("label_", "image_")).symlink_to(source / label.name.replace("label_", "image_"))
    assert cm.main([str(tmp_path), "--dataset", "chaost2", "--min-fg", "1", "100", "400"]) == 0
    for m in (1, 100, 400):
        assert (target / f"classmap_{m}.json").read_bytes() == (source / f"classmap_{m}.json").read_bytes()


def test_count_rule_differs_on_real_data_and_counts_voxels(cmr_dir):
    from data.core.io import read_volume

    spec = load_spec("CMR")
    summed = cm.build_classmaps(cmr_dir, spec, [200], rule="sum")[200]
    counted = cm.build_classmaps(cmr_dir, spec, [200], rule="count")[200]
    differing = [(c, i) for c in summed for i in summed[c] if summed[c][i] != counted[c][i]]
    assert len(differing) > 20                       # the rules really differ on the shipped labels
    label = spec.map_labels(read_volume(spec.label_path(cmr_dir, 2))[0])
    for name, class_id in spec.labels.items():
        per_slice = (label == class_id).sum(axis=(1, 2))
        assert counted[name]["2"] == np.flatnonzero(per_slice >= 200).tolist()


def test_rules_on_a_small_volume():
    label = np.zeros((4, 20, 20), np.uint8)
    label[0, :10, :15] = 1            # liver, 150 voxels
    label[0, 19, 19] = 2              # one kidney voxel: slice sum 152
    label[1, 0, 0] = 3                # a lone voxel: slice sum 3
    label[2, :10, :10] = 4            # 100 spleen voxels: slice sum 400
    out_sum = cm.slices_per_class(label, 5, [1, 100, 400], "sum")
    out_count = cm.slices_per_class(label, 5, [1, 100, 400], "count")
    assert out_sum[1] == [[0, 1, 2], [0], [0], [1], [2]]           # BG: the slices with foreground
    assert out_sum[100] == [[0, 2], [0], [0], [], [2]]              # the kidney rides on the liver
    assert out_sum[400] == [[2], [], [], [], [2]]
    assert out_count[1] == [[0, 1, 2, 3], [0], [0], [1], [2]]       # BG: every slice with background
    assert out_count[100] == [[0, 1, 2, 3], [0], [], [], [2]]
    assert out_count[400] == [[3], [], [], [], []]                  # 400 background voxels only in slice 3


def test_reference_rule_per_dataset():
    assert cm.resolve_rule("reference", load_spec("SABS")) == "count"
    assert cm.resolve_rule("reference", load_spec("CHAOST2")) == "sum"
    assert cm.resolve_rule("reference", load_spec("CMR")) == "sum"
    with pytest.raises(ValueError):
        cm.resolve_rule("median", load_spec("CMR"))


def test_classmap_command_errors(tmp_path, capsys):
    assert cm.main([str(tmp_path / "none"), "--dataset", "CHAOST2"]) == 1
    assert "CHAOST2 data directory not found" in capsys.readouterr().err
    assert cm.main([str(tmp_path), "--dataset", "CHAOS"]) == 1
    assert "unknown dataset 'CHAOS'" in capsys.readouterr().err
