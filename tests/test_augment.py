"""Reference augmentation with explicit RNGs."""
import numpy as np

from dataloaders.augment import AugmentDraw, AugmentParams, apply_draw, draw_affine, draw_elastic, draw_geometry, \
    draw_reference_pair, gamma_transform, warp


def geometric_transform(rng, image, mask, p):
    """The geometric part of a draw (affine then elastic), applied as the samplers do (`apply_draw`)."""
    affine, seed = draw_geometry(rng, image.shape, p)
    return apply_draw(image, mask, AugmentDraw(affine=affine, elastic_seed=seed), p)


def augment_pair(rng, support, query, p):
    """An ADNet / Q-Net episode's augmentation as dataloaders/supervoxel_episodes.py applies it."""
    draw_s, draw_q = draw_reference_pair(rng, support[0].shape, p)
    return apply_draw(*support, draw_s, p), apply_draw(*query, draw_q, p)


def test_gamma_keeps_the_range_and_bends_the_histogram():
    x = np.linspace(-2, 3, 100).astype(np.float32)
    y = gamma_transform(x, 1.5)
    assert abs(y.min() - x.min()) < 1e-4 and abs(y.max() - x.max()) < 1e-4
    assert y[50] < x[50]


def test_identity_parameters_change_nothing():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(32, 32)).astype(np.float32)
    mask = (image > 0.5).astype(np.float32)
    p = AugmentParams(rotate=0, shift=0, shear=0, scale=(1, 1), elastic_alpha=0)
    out_img, out_mask = geometric_transform(rng, image, mask, p)
    np.testing.assert_allclose(out_img, image, atol=1e-5)
    np.testing.assert_array_equal(out_mask, mask)


def test_affine_matrix_is_rotation_about_the_centre():
    class Fixed:   # draws in the reference order: rotation, tx, ty, shear, zoom
        values = iter([5.0, 0.0, 0.0, 0.0, 1.0])

        def uniform(self, lo, hi):
            return next(self.values)
    m = draw_affine(Fixed(), (64, 64), AugmentParams())
    centre = m @ np.array([32.0, 32.0, 1.0])
    np.testing.assert_allclose(centre, [32.0, 32.0], atol=1e-9)   # rotation about (H/2, W//2)
    np.testing.assert_allclose(np.degrees(np.arctan2(-m[0, 1], m[0, 0])), -5.0, atol=1e-6)


def test_mask_stays_binary_and_moves_with_the_image():
    rng = np.random.default_rng(3)
    image = np.zeros((48, 48), np.float32)
    image[10:30, 12:28] = 5.0
    mask = (image > 0).astype(np.float32)
    out_img, out_mask = geometric_transform(rng, image, mask, AugmentParams())
    assert set(np.unique(out_mask)) <= {0.0, 1.0}
    assert ((out_img > 2.5) == (out_mask > 0)).mean() > 0.97


def test_elastic_field_is_small_as_in_the_reference():
    dy, dx = draw_elastic(np.random.default_rng(0), (256, 256), AugmentParams())
    assert 0.2 < dx.std() < 0.6 and np.abs(dy).max() < 3.0   # ~0.36 px s.d. (adnet_qnet.md §3.7)


def test_exactly_one_of_support_and_query_is_transformed_and_reproducible():
    image = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
    mask = (image > 0).astype(np.float32)
    runs = [augment_pair(np.random.default_rng(7), (image, mask), (image.copy(), mask.copy()), AugmentParams())
            for _ in range(2)]
    (s, sm), (q, qm) = runs[0]
    np.testing.assert_array_equal(runs[0][0][0], runs[1][0][0])
    assert not np.allclose(s, q)     # at least one side changed
    assert not (np.array_equal(s, image) and np.array_equal(q, image))


def test_warp_with_zero_displacement_and_identity_affine():
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    out, _ = warp(image, np.zeros_like(image), np.eye(3)[:2], np.zeros((8, 8)), np.zeros((8, 8)))
    np.testing.assert_allclose(out, image, atol=1e-4)
