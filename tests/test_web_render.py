"""Rendering frames to JPEG/PNG for WADO-RS /rendered and /thumbnail."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gateway.web.render import (
    PixelAttributes,
    RenderError,
    RenderOptions,
    Viewport,
    VoiFunction,
    Window,
    apply_window,
    parse_quality,
    parse_render_params,
    parse_viewport,
    parse_window,
    render_frame,
    to_display,
    windows_from_values,
)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def ramp(rows=64, cols=256, lo=0, hi=4095, dtype=np.uint16) -> np.ndarray:
    row = np.linspace(lo, hi, cols).round().astype(dtype)
    return np.tile(row, (rows, 1))


# ------------------------------------------------------------------- windowing


@pytest.mark.parametrize("function", list(VoiFunction))
def test_window_center_maps_to_mid_gray(function):
    window = Window(100.0, 201.0, function)
    out = apply_window(np.array([100.0, -1000.0, 1000.0]), window)
    assert abs(out[0] - 128) <= 1
    assert out[1] <= 1 and out[2] >= 254


def test_linear_window_bounds_per_ps3_3():
    # c=50, w=11: x <= 44.5 -> 0, x > 54.5 -> 255, linear between
    out = apply_window(np.array([44.0, 44.5, 45.0, 54.0, 55.0]), Window(50, 11))
    assert out[0] == 0 and out[1] == 0 and out[4] == 255
    assert 0 < out[2] < out[3] < 255
    # y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    assert apply_window(np.array([45.0, 50.0]), Window(50, 11)) == pytest.approx([12.75, 140.25])
    narrow = apply_window(np.array([9.0, 10.0]), Window(10, 1))
    assert list(narrow) == [0, 255]


def test_linear_exact():
    out = apply_window(np.array([0.0, 50.0, 100.0]), Window(50, 100, VoiFunction.LINEAR_EXACT))
    assert list(out) == [0.0, 127.5, 255.0]


def test_ct_rescale_and_header_window():
    attrs = PixelAttributes(rescale_intercept=-1024.0, windows=(Window(40, 400),))
    stored = np.array([[1024 + 40, 0], [1024 + 240, 1024 - 160]], dtype=np.uint16)
    out = to_display(stored, attrs)
    assert abs(int(out[0, 0]) - 128) <= 1  # 40 HU at the center
    assert out[0, 1] == 0 and out[1, 0] == 255 and out[1, 1] == 0


def test_query_window_overrides_header_window():
    attrs = PixelAttributes(windows=(Window(1000, 10),))
    frame = np.full((4, 4), 100, dtype=np.int16)
    assert to_display(frame, attrs)[0, 0] == 0
    assert abs(int(to_display(frame, attrs, Window(100, 500))[0, 0]) - 128) <= 1


def test_default_window_is_min_max():
    out = to_display(ramp(lo=200, hi=1200))
    assert out.min() == 0 and out.max() == 255
    assert to_display(np.full((3, 3), 7, dtype=np.uint8)).max() == 0  # constant frame


def test_invalid_header_window_falls_back_to_min_max():
    out = to_display(ramp(lo=0, hi=10), PixelAttributes(windows=(Window(5, 0),)))
    assert out.min() == 0 and out.max() == 255


def test_monochrome1_is_inverted():
    frame = ramp()
    m2 = to_display(frame, PixelAttributes(photometric="MONOCHROME2"))
    m1 = to_display(frame, PixelAttributes(photometric="MONOCHROME1"))
    assert np.array_equal(m1.astype(int), 255 - m2.astype(int))
    assert m1[0, 0] == 255


def test_signed_and_float_frames():
    signed = np.array([[-2000, 0, 2000]], dtype=np.int16)
    assert list(to_display(signed)[0]) == [0, 128, 255]
    floats = np.array([[0.0, np.nan, 1.0]], dtype=np.float32)
    assert list(to_display(floats)[0]) == [0, 0, 255]


def test_color_frames_pass_through():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    assert np.array_equal(to_display(rgb, PixelAttributes(photometric="RGB")), rgb)
    sixteen = (rgb.astype(np.uint16) << 8) | 0xFF
    assert np.array_equal(to_display(sixteen, PixelAttributes(bits_stored=16)), rgb)
    ybr = np.full((2, 2, 3), [128, 128, 128], dtype=np.uint8)  # mid-gray in YCbCr
    out = to_display(ybr, PixelAttributes(photometric="YBR_FULL"))
    assert np.all(np.abs(out.astype(int) - 128) <= 1)


def test_unrenderable_shape():
    with pytest.raises(RenderError):
        to_display(np.zeros((2, 2, 2, 2)))


# -------------------------------------------------------------------- encoding


def test_png_round_trips_exactly():
    frame = ramp(rows=30, cols=50)
    data = render_frame(frame, media_type="image/png")
    assert data.startswith(b"\x89PNG")
    decoded = decode(data)
    assert decoded.shape == (30, 50) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, to_display(frame))


def test_jpeg_decodes_and_quality_matters():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 4096, size=(64, 64), dtype=np.uint16)
    low = render_frame(frame, options=RenderOptions(quality=10))
    high = render_frame(frame, options=RenderOptions(quality=95))
    assert low.startswith(b"\xff\xd8") and decode(high).shape == (64, 64)
    assert len(low) < len(high)


def test_unknown_media_type():
    with pytest.raises(RenderError):
        render_frame(ramp(), media_type="image/gif")


def test_thumbnail_is_bounded_and_keeps_aspect():
    out = decode(render_frame(ramp(rows=512, cols=256), media_type="image/png", thumbnail=True))
    assert out.shape == (128, 64)
    small = decode(render_frame(ramp(rows=20, cols=40), media_type="image/png", thumbnail=True))
    assert small.shape == (20, 40)  # not enlarged
    custom = render_frame(ramp(rows=100, cols=400), thumbnail=True, thumbnail_size=64)
    assert decode(custom).shape == (16, 64)


def test_viewport_fits_and_may_enlarge():
    options = RenderOptions(viewport=Viewport(300, 300))
    out = decode(render_frame(ramp(rows=50, cols=100), media_type="image/png", options=options))
    assert out.shape == (150, 300)
    thumb = render_frame(ramp(rows=512, cols=512), thumbnail=True, options=options)
    assert decode(thumb).shape == (300, 300)


def test_viewport_source_region_and_flip():
    frame = np.arange(16, dtype=np.uint8).reshape(4, 4) * 17  # 0..255
    region = Viewport(2, 2, sx=1, sy=2, sw=2, sh=2)
    out = decode(
        render_frame(frame, media_type="image/png", options=RenderOptions(viewport=region))
    )
    assert np.array_equal(out, to_display(frame)[2:4, 1:3])
    flipped = Viewport(4, 4, sw=-4)
    out = decode(
        render_frame(frame, media_type="image/png", options=RenderOptions(viewport=flipped))
    )
    assert np.array_equal(out, to_display(frame)[:, ::-1])
    with pytest.raises(RenderError):
        render_frame(frame, options=RenderOptions(viewport=Viewport(4, 4, sx=9)))


# ------------------------------------------------------------- query parameters


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("40,400,linear", Window(40, 400, VoiFunction.LINEAR)),
        ("40.5, 400 ,LINEAR-EXACT", Window(40.5, 400, VoiFunction.LINEAR_EXACT)),
        ("-600,1600,sigmoid", Window(-600, 1600, VoiFunction.SIGMOID)),
        ("40,400", Window(40, 400)),
    ],
)
def test_parse_window(value, expected):
    assert parse_window(value) == expected


@pytest.mark.parametrize(
    "value", ["40", "40,400,cubic", "a,b,linear", "40,0,linear", "40,0.5,linear", "1,2,3,4"]
)
def test_parse_window_errors(value):
    with pytest.raises(RenderError):
        parse_window(value)


def test_parse_viewport():
    assert parse_viewport("512,512") == Viewport(512, 512)
    assert parse_viewport("256,128,10,20,100,-50") == Viewport(256, 128, 10, 20, 100, -50)
    assert parse_viewport("256,128,,,,") == Viewport(256, 128)
    for bad in ("512", "0,10", "a,b", "10,10,-1,0,5,5", "10,10,0,0,0,5", "99999,1"):
        with pytest.raises(RenderError):
            parse_viewport(bad)


def test_parse_quality():
    assert parse_quality("75") == 75
    for bad in ("0", "101", "x", "7.5"):
        with pytest.raises(RenderError):
            parse_quality(bad)


def test_parse_render_params():
    options = parse_render_params(
        [("window", "40,400,linear"), ("viewport", "64,64"), ("quality", "50"), ("x", "y")]
    )
    assert options == RenderOptions(Window(40, 400), Viewport(64, 64), 50)
    assert parse_render_params({}) == RenderOptions()


# ---------------------------------------------------------------- header input


def test_pixel_attributes_from_dataset_json():
    ds = {
        "00280004": {"vr": "CS", "Value": ["MONOCHROME1"]},
        "00281050": {"vr": "DS", "Value": [40, 500]},
        "00281051": {"vr": "DS", "Value": ["400", 2000]},
        "00281052": {"vr": "DS", "Value": [-1024]},
        "00281053": {"vr": "DS", "Value": [1]},
        "00281056": {"vr": "CS", "Value": ["SIGMOID"]},
        "00280101": {"vr": "US", "Value": [12]},
    }
    attrs = PixelAttributes.from_dataset_json(ds)
    assert attrs == PixelAttributes(
        photometric="MONOCHROME1",
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
        windows=(Window(40, 400, VoiFunction.SIGMOID), Window(500, 2000, VoiFunction.SIGMOID)),
        bits_stored=12,
    )
    assert PixelAttributes.from_dataset_json({}) == PixelAttributes()


def test_pixel_attributes_from_functional_groups():
    def transform(slope, intercept):
        return {
            "00289145": {
                "vr": "SQ",
                "Value": [
                    {
                        "00281053": {"vr": "DS", "Value": [slope]},
                        "00281052": {"vr": "DS", "Value": [intercept]},
                    }
                ],
            }
        }

    ds = {
        "52009229": {"vr": "SQ", "Value": [transform(2, -10)]},
        "52009230": {"vr": "SQ", "Value": [{}, transform(3, -30)]},
    }
    assert PixelAttributes.from_dataset_json(ds, 0).rescale_slope == 2.0
    second = PixelAttributes.from_dataset_json(ds, 1)
    assert (second.rescale_slope, second.rescale_intercept) == (3.0, -30.0)


def test_windows_from_values():
    assert windows_from_values([1, 2], [10, 20], "linear_exact") == (
        Window(1, 10, VoiFunction.LINEAR_EXACT),
        Window(2, 20, VoiFunction.LINEAR_EXACT),
    )
