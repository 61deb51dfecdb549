import numpy as np
import pytest

from fltac_ray.data.partition import dirichlet_shares, split_counts, split_indices, threshold_shares


def test_threshold_drops_small_shares_and_renormalises():
    shares = threshold_shares(np.array([0.005, 0.595, 0.4]), 0.01)
    # 0.005 is dropped; 0.595 and 0.4 are divided by 0.995
    np.testing.assert_allclose(shares, [0.0, 0.595 / 0.995, 0.4 / 0.995])
    assert shares.sum() == pytest.approx(1.0)


def test_threshold_keeps_the_largest_share_when_all_are_below():
    shares = threshold_shares(np.array([0.004, 0.006, 0.002]), 0.01)
    np.testing.assert_allclose(shares, [0.0, 1.0, 0.0])


def test_threshold_zero_keeps_everything():
    np.testing.assert_allclose(threshold_shares(np.array([0.2, 0.3, 0.5]), 0.0), [0.2, 0.3, 0.5])


def test_split_counts_largest_remainder():
    # exact: 3.3, 3.3, 3.4 -> floors 3, 3, 3; one left over goes to the largest remainder (0.4)
    np.testing.assert_array_equal(split_counts(10, np.array([0.33, 0.33, 0.34])), [3, 3, 4])
    np.testing.assert_array_equal(split_counts(10, np.array([0.5, 0.3, 0.2])), [5, 3, 2])
    # ties on the remainder go to the lower client index
    np.testing.assert_array_equal(split_counts(3, np.array([0.5, 0.5])), [2, 1])


def test_split_indices_blocks():
    blocks = split_indices(np.arange(10), np.array([5, 3, 2]))
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9]]


def test_dirichlet_shares_seeded_and_thresholded():
    a = dirichlet_shares(np.random.default_rng(7), 10, 0.5, 0.01)
    b = dirichlet_shares(np.random.default_rng(7), 10, 0.5, 0.01)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == pytest.approx(1.0)
    assert np.all((a == 0) | (a >= 0.01))


def test_small_alpha_is_more_skewed_than_large_alpha():
    rng = np.random.default_rng(0)
    skewed = np.mean([dirichlet_shares(rng, 10, 0.1, 0.0).max() for _ in range(200)])
    even = np.mean([dirichlet_shares(rng, 10, 100.0, 0.0).max() for _ in range(200)])
    assert skewed > 0.5 > 0.2 > even
