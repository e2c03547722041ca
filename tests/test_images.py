"""Decoding odd and corrupt files, resize geometry, and the evaluation views against hand-computed values."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from data.transforms import images
from data.transforms.images import BadImageError, center_crop, decode_rgb, eval_views, resize_shorter, views_at_scales


def gradient(h=30, w=40):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6, y * 8, (x + y) * 3], axis=-1).clip(0, 255).astype(np.uint8)


def save(tmp_path, name, img, fmt, **kw):
    path = tmp_path / name
    img.save(path, fmt, **kw)
    return str(path)


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA"])
def test_decode_any_mode_to_rgb(tmp_path, mode):
    src = Image.fromarray(gradient())
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    path = save(tmp_path, f"x_{mode}.JPEG", src.convert(mode), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    img = decode_rgb(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    if mode == "L":
        arr = np.asarray(img).astype(int)
        assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    if mode == "CMYK":  # colours survive the CMYK round trip
        assert np.abs(np.asarray(img).astype(int) - gradient().astype(int)).mean() < 6


def test_png_named_jpeg_is_decoded_by_content(tmp_path):
    path = save(tmp_path, "really_a_png.JPEG", Image.fromarray(gradient()), "PNG")
    assert np.array_equal(np.asarray(decode_rgb(path)), gradient())


def test_palette_with_transparency(tmp_path):
    img = Image.fromarray(gradient()).convert("P")
    img.info["transparency"] = 0
    path = save(tmp_path, "t.png", img, "PNG", transparency=0)
    assert decode_rgb(path).mode == "RGB"


def test_corrupt_files_raise_bad_image_error(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(gradient(120, 160)).save(buf, "JPEG", quality=90)
    (tmp_path / "truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "zero.JPEG").write_bytes(b"")
    (tmp_path / "text.JPEG").write_text("<html>not an image</html>")
    reasons = {}
    for name in ("truncated.JPEG", "zero.JPEG", "text.JPEG", "absent.JPEG"):
        with pytest.raises(BadImageError) as e:
            decode_rgb(str(tmp_path / name))
        reasons[name] = str(e.value)
    assert "truncated" in reasons["truncated.JPEG"]
    assert reasons["zero.JPEG"] == "zero bytes"
    assert str(tmp_path) not in reasons["text.JPEG"]  # the path is reported once, by the skip list
    assert reasons["absent.JPEG"] == "file not found"


@pytest.mark.parametrize("size, side, expected", [
    ((500, 375), 256, (341, 256)),   # landscape: floor(256*500/375) = 341
    ((375, 500), 256, (256, 341)),   # portrait
    ((300, 200), 100, (150, 100)),   # exact
    ((64, 64), 72, (72, 72)),        # square, upscaled
    ((100, 99), 50, (50, 50)),       # floor(50*100/99) = 50
])
def test_resize_shorter_sizes(size, side, expected):
    assert resize_shorter(Image.new("RGB", size), side).size == expected
    assert images.resized_size(*size, side) == expected


def test_resize_is_antialiased():
    stripes = np.zeros((100, 200, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: nearest-neighbour would alias to black or white
    out = np.asarray(resize_shorter(Image.fromarray(stripes), 25)).astype(float)
    assert abs(out[5:-5, 5:-5].mean() - 127.5) < 3 and out[5:-5, 5:-5].std() < 3


def test_eval_views_geometry_by_hand():
    # a 6 x 8 image whose pixel (r, c) holds 10*r + c in every channel; crop 4
    arr = np.repeat((10 * np.arange(6)[:, None] + np.arange(8)[None, :])[..., None], 3, axis=2).astype(np.uint8)
    v = eval_views(arr, 4)
    assert v.shape == (10, 4, 4, 3) and v.dtype == np.uint8
    # top-left pixel of each unflipped view: tl (0,0), tr (0,4), bl (2,0), br (2,4), centre (1,2)
    assert [int(v[k, 0, 0, 0]) for k in (0, 2, 4, 6, 8)] == [0, 4, 20, 24, 12]
    # bottom-right pixel of each: tl (3,3), tr (3,7), bl (5,3), br (5,7), centre (4,5)
    assert [int(v[k, 3, 3, 0]) for k in (0, 2, 4, 6, 8)] == [33, 37, 53, 57, 45]
    # each flipped view is its view mirrored left-right: first row of tl-flipped is 3, 2, 1, 0
    assert v[1, 0, :, 0].tolist() == [3, 2, 1, 0]
    for k in (0, 2, 4, 6, 8):
        assert np.array_equal(v[k + 1], v[k][:, ::-1])
    assert np.array_equal(eval_views(arr, 4, flip=False), v[0::2])
    assert np.array_equal(center_crop(arr, 4), v[8])


def test_center_crop_offset_matches_original():
    arr = np.zeros((341, 256, 3), np.uint8)
    arr[(341 - 224) // 2, (256 - 224) // 2] = 255  # the original's (dim-224)//2
    assert center_crop(arr, 224)[0, 0, 0] == 255


def test_views_too_small_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        eval_views(np.zeros((10, 20, 3), np.uint8), 12)


def test_views_at_scales_order():
    img = Image.fromarray(gradient(30, 40))
    v = views_at_scales(img, (24, 30), 20)
    assert v.shape == (20, 20, 20, 3)
    assert np.array_equal(v[:10], eval_views(np.asarray(resize_shorter(img, 24)), 20))
    assert np.array_equal(v[10:], eval_views(np.asarray(img), 20))


def test_skip_list_logs_each_file_once(tmp_path, caplog):
    skips = images.SkipList()
    with caplog.at_level(logging.WARNING):
        skips.add("/data/a.JPEG", "zero bytes")
        skips.add("/data/a.JPEG", "zero bytes")
        skips.add("/data/b.JPEG", "image file is truncated")
    assert len(skips) == 2
    assert sum("/data/a.JPEG" in r.getMessage() for r in caplog.records) == 1
    assert "2 unreadable" in skips.summary()
    out = skips.save(str(tmp_path / "skipped.txt"))
    assert open(out).read() == "/data/a.JPEG\tzero bytes\n/data/b.JPEG\timage file is truncated\n"
    assert images.SkipList().save(str(tmp_path / "none.txt")) is None and not (tmp_path / "none.txt").exists()
