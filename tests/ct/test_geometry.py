"""FanBeamGeometry: DESIGN.md §4 numbers, orientation, round trips and refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mar_rt.ct.geometry import FanBeamGeometry


def test_syndeeplesion_derived_quantities() -> None:
    g = FanBeamGeometry.syndeeplesion()
    assert g.image_shape == (416, 416)
    assert g.sino_shape == (640, 641)
    assert g.pixel_size == pytest.approx(0.036923, abs=1e-6)
    assert g.n_cols * g.pixel_size == pytest.approx(15.36, rel=1e-12)
    assert g.det_spacing == pytest.approx(0.067776, abs=1e-6)
    assert g.source_distance == pytest.approx(39.6923, abs=1e-4)
    assert g.detector_distance == pytest.approx(39.6923, abs=1e-4)
    assert g.magnification == pytest.approx(2.0, rel=1e-12)
    # the detector, scaled to the isocentre, spans the image diagonal
    assert g.n_det * g.det_spacing / g.magnification == pytest.approx(math.sqrt(2) * 15.36)


def test_angles_and_bins() -> None:
    g = FanBeamGeometry.syndeeplesion()
    a = g.angles()
    assert a.shape == (640,) and a[0] == 0.0
    np.testing.assert_allclose(np.diff(a), 2 * np.pi / 640)
    u = g.det_positions()
    assert u.shape == (641,) and u[320] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(np.diff(u), g.det_spacing)
    shifted = FanBeamGeometry.syndeeplesion(det_offset=0.01)
    np.testing.assert_allclose(shifted.det_positions() - u, 0.01)


def test_orientation_matches_design() -> None:
    """DESIGN §4: view 0 source at (−R, 0), bins towards −y; view n/4 source at (0, −R), +x."""
    g = FanBeamGeometry.syndeeplesion()
    r, d = g.source_distance, g.detector_distance
    src, det = g.source_positions(), g.detector_points()
    assert src.shape == (640, 2) and det.shape == (640, 641, 2)
    np.testing.assert_allclose(src[0], [-r, 0.0], atol=1e-12)
    np.testing.assert_allclose(det[0, 320], [d, 0.0], atol=1e-12)
    step0 = det[0, 1] - det[0, 0]
    np.testing.assert_allclose(step0, [0.0, -g.det_spacing], atol=1e-12)
    np.testing.assert_allclose(src[160], [0.0, -r], atol=1e-12)
    np.testing.assert_allclose(det[160, 320], [0.0, d], atol=1e-12)
    np.testing.assert_allclose(det[160, 1] - det[160, 0], [g.det_spacing, 0.0], atol=1e-12)


def test_pixel_centres_rows_run_down() -> None:
    g = FanBeamGeometry.syndeeplesion(n_rows=4, n_cols=6, pixel_size=1.0)
    x, y = g.pixel_centres()
    np.testing.assert_allclose(x, [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    np.testing.assert_allclose(y, [1.5, 0.5, -0.5, -1.5])  # row 0 on top


def test_with_image_size_keeps_the_field() -> None:
    g = FanBeamGeometry.syndeeplesion()
    h = g.with_image_size(256)
    assert h.image_shape == (256, 256)
    assert h.n_cols * h.pixel_size == pytest.approx(15.36)
    assert (h.n_views, h.n_det, h.det_spacing) == (g.n_views, g.n_det, g.det_spacing)
    rect = g.with_image_size(200, 300)
    assert rect.image_shape == (200, 300)
    assert rect.n_cols * rect.pixel_size == pytest.approx(15.36)


def test_to_dict_round_trip_through_json() -> None:
    g = FanBeamGeometry.syndeeplesion(det_offset=0.013, angle_offset=0.1, n_views=360)
    back = FanBeamGeometry(**json.loads(json.dumps(g.to_dict())))
    assert back == g
    assert hash(back) == hash(g)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_rows", 0),
        ("n_cols", -3),
        ("n_views", 2.5),
        ("n_det", True),
        ("pixel_size", -0.1),
        ("det_spacing", float("nan")),
        ("source_distance", float("inf")),
        ("detector_distance", 0.0),
        ("det_offset", float("nan")),
        ("angle_offset", "0"),
    ],
)
def test_refuses_bad_fields_by_name(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        FanBeamGeometry.syndeeplesion(**{field: value})


def test_refuses_source_inside_the_image() -> None:
    with pytest.raises(ValueError, match="source_distance"):
        FanBeamGeometry.syndeeplesion(source_distance=10.0)


def test_shape_checks_name_the_array() -> None:
    g = FanBeamGeometry.syndeeplesion()
    g.check_image((2, 416, 416))
    g.check_sinogram((640, 641))
    with pytest.raises(ValueError, match="mask has shape"):
        g.check_image((416, 415), name="mask")
    with pytest.raises(ValueError, match="sinogram"):
        g.check_sinogram((641, 640))
    with pytest.raises(ValueError, match="image"):
        g.check_image((416,))
