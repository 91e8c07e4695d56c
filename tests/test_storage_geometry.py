"""Slice ordering and geometry (dicom.geometry)."""

from __future__ import annotations

import numpy as np
import pytest

from dicom.geometry import GeometryError, order_slices, slice_normal

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _oblique(angle_deg: float) -> list[float]:
    a = np.radians(angle_deg)
    row = [np.cos(a), np.sin(a), 0.0]
    col = [0.0, 0.0, -1.0]  # coronal-ish plane rotated about the vertical axis
    return [*row, *col]


def test_orders_along_the_normal_not_along_z():
    iop = _oblique(30)
    normal = slice_normal(iop)
    origin = np.array([10.0, -20.0, 5.0])
    positions = [list(origin + normal * 3.0 * k) for k in range(6)]
    shuffled = [4, 0, 5, 2, 1, 3]
    geom = order_slices(
        [positions[i] for i in shuffled],
        [iop] * 6,
        [None] * 6,
        pixel_spacing=[0.7, 0.8],
    )
    assert [shuffled[i] for i in geom.order] == [0, 1, 2, 3, 4, 5]
    assert geom.spacing == pytest.approx((3.0, 0.7, 0.8))
    assert geom.origin == pytest.approx(tuple(origin))
    assert geom.direction == pytest.approx([*iop, *normal])
    assert geom.uniform


def test_affine_maps_every_slice_index_to_its_position_even_with_gantry_tilt():
    # Tilted acquisition: each slice is shifted in y as well as z, so the stack does not run
    # along the normal; the affine must still land on each slice's ImagePositionPatient.
    positions = [[-100.0, -50.0 + 0.5 * k, 20.0 + 2.0 * k] for k in range(8)]
    geom = order_slices(positions[::-1], [AXIAL] * 8, list(range(8, 0, -1)), [0.5, 0.6])
    affine = np.array(geom.affine)
    for k in range(8):
        assert affine @ [k, 0, 0, 1] == pytest.approx([*positions[k], 1.0])
    # A voxel (z=2, y=3, x=4) sits 3 rows down (column cosine) and 4 columns across.
    expected = (
        np.array(positions[2]) + 3 * 0.5 * np.array([0, 1, 0]) + 4 * 0.6 * np.array([1, 0, 0])
    )
    assert (affine @ [2, 3, 4, 1])[:3] == pytest.approx(expected)


def test_same_position_is_broken_by_instance_number():
    positions = [[0, 0, 5.0], [0, 0, 0.0], [0, 0, 5.0], [0, 0, 0.0]]
    geom = order_slices(positions, [AXIAL] * 4, [4, 3, 2, 1], [1.0, 1.0])
    assert geom.order == [3, 1, 2, 0]
    assert geom.spacing[0] == pytest.approx(5.0)
    assert not geom.uniform


def test_uneven_spacing_is_flagged_and_positions_kept():
    z = [0.0, 1.0, 2.0, 4.0]
    geom = order_slices([[0, 0, v] for v in z], [AXIAL] * 4, [1, 2, 3, 4], [1.0, 1.0])
    assert geom.positions == pytest.approx(z)
    assert not geom.uniform


def test_no_position_at_all_orders_by_instance_number():
    geom = order_slices([None] * 3, [None] * 3, [3, 1, 2], [0.2, 0.2])
    assert geom.order == [1, 2, 0]
    assert geom.origin is None and geom.affine is None
    assert geom.spacing == (None, 0.2, 0.2)


def test_single_slice_uses_slice_thickness():
    geom = order_slices([[1, 2, 3]], [AXIAL], [1], [0.5, 0.5], slice_thickness=1.25)
    assert geom.spacing == pytest.approx((1.25, 0.5, 0.5))
    assert geom.uniform


@pytest.mark.parametrize(
    ("positions", "orientations", "message"),
    [
        ([[0, 0, 0], None], [AXIAL, AXIAL], "lack"),
        ([[0, 0, 0], [0, 0, 1]], [AXIAL, _oblique(40)], "ImageOrientationPatient"),
        ([[0, 0, 0], [0, 0, 1]], [AXIAL, [1, 0, 0, 1, 0, 0]], "ImageOrientationPatient"),
        ([[0, 0, 0]], [[1, 0, 0, 1, 0, 0]], "orthogonal"),
    ],
)
def test_inconsistent_stacks_raise(positions, orientations, message):
    with pytest.raises(GeometryError, match=message):
        order_slices(positions, orientations, [1] * len(positions), [1.0, 1.0])
