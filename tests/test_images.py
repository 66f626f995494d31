import io

import numpy as np
import pytest
from PIL import Image

from geoloc.data.images import ImageError, SkipReport, decode_image, to_rgb


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_modes_become_rgb():
    gray = Image.new("L", (8, 6), 128)
    assert decode_image(_png(gray)).mode == "RGB"
    assert np.asarray(decode_image(_png(gray)))[0, 0].tolist() == [128, 128, 128]

    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode_image(_jpeg(cmyk)))
    assert out.shape == (6, 8, 3) and out[0, 0, 0] > 200 and out[0, 0, 1] < 60

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    assert np.asarray(decode_image(_png(rgba)))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert 120 <= np.asarray(decode_image(_png(half)))[0, 0, 0] <= 135

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert np.asarray(decode_image(_png(pal)))[0, 0].tolist() == [10, 200, 30]
    pal_t = pal.copy()
    assert decode_image(_png(pal_t, transparency=1)).mode == "RGB"

    la = Image.new("LA", (4, 4), (50, 255))
    assert np.asarray(decode_image(_png(la)))[0, 0].tolist() == [50, 50, 50]


def test_16bit_is_rescaled_not_clipped():
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    arr[0, 0] = 257 * 100
    img16 = Image.fromarray(arr)  # uint16 -> mode I;16
    out = np.asarray(decode_image(_png(img16)))
    assert out[1, 1].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [100, 100, 100]
    f = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4))  # mode F
    assert to_rgb(f).mode == "RGB" and np.asarray(to_rgb(f))[3, 3, 0] == 255


def test_exif_orientation_applied():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 10))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = decode_image(_jpeg(img, exif=exif.tobytes(), quality=95))
    assert out.size == (10, 20)  # portrait after the rotation
    top = np.asarray(out)[2, 5]
    assert top[2] > 200 and top[0] < 60  # the blue (left) half is now on top


def test_missing_unreadable_truncated(tmp_path):
    with pytest.raises(ImageError) as e:
        decode_image(tmp_path / "nope.jpg")
    assert e.value.reason == "missing" and "nope.jpg" in str(e.value)

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError) as e:
        decode_image(junk)
    assert e.value.reason == "unreadable" and "junk.jpg" in str(e.value)

    rng = np.random.default_rng(0)
    data = _jpeg(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        decode_image(cut)
    assert e.value.reason == "truncated"


def test_decompression_bomb(tmp_path):
    small = Image.new("RGB", (100, 100))
    with pytest.raises(ImageError) as e:
        decode_image(_png(small), max_pixels=5000)
    assert e.value.reason == "decompression_bomb" and "10000 pixels" in str(e.value)
    # a real bomb: a tiny file that claims 400 megapixels (mode "1" keeps this test's memory small)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(Image.new("1", (20000, 20000))))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(ImageError) as e:
        decode_image(bomb)
    assert e.value.reason == "decompression_bomb"


def test_skip_report():
    r = SkipReport()
    r.add("a", "missing")
    r.add("b", "truncated", "x")
    r.add("c", "missing")
    d = r.to_dict()
    assert len(r) == 3 and d["n_skipped"] == 3 and d["by_reason"] == {"missing": 2, "truncated": 1}


def _jpeg_with_gps(path, lat_ref, lat, lng_ref, lng):
    from PIL import Image, TiffImagePlugin

    img = Image.new("RGB", (16, 16), (120, 80, 40))
    exif = img.getexif()
    r = TiffImagePlugin.IFDRational
    gps = {1: lat_ref, 2: tuple(r(*v) for v in lat), 3: lng_ref, 4: tuple(r(*v) for v in lng)}
    exif[0x8825] = gps
    img.save(path, exif=exif)
    return path


def test_read_exif_latlng(tmp_path):
    from geoloc.data.images import read_exif_latlng

    # the Eiffel Tower: 48°51'29.6"N 2°17'40.2"E
    p = _jpeg_with_gps(tmp_path / "a.jpg", "N", ((48, 1), (51, 1), (296, 10)), "E", ((2, 1), (17, 1), (402, 10)))
    lat, lng = read_exif_latlng(p)
    assert abs(lat - 48.858222) < 1e-5 and abs(lng - 2.2945) < 1e-5
    p = _jpeg_with_gps(tmp_path / "b.jpg", "S", ((33, 1), (52, 1), (0, 1)), "W", ((70, 1), (30, 1), (0, 1)))
    assert read_exif_latlng(p) == (-33 - 52 / 60, -70.5)
    assert read_exif_latlng(p.read_bytes()) == (-33 - 52 / 60, -70.5)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "none.jpg")
    assert read_exif_latlng(tmp_path / "none.jpg") is None
    p = _jpeg_with_gps(tmp_path / "bad.jpg", "N", ((95, 1), (0, 1), (0, 1)), "E", ((1, 1), (0, 1), (0, 1)))
    assert read_exif_latlng(p) is None  # latitude out of range
    p = _jpeg_with_gps(tmp_path / "zero.jpg", "N", ((1, 0), (0, 1), (0, 1)), "E", ((1, 1), (0, 1), (0, 1)))
    assert read_exif_latlng(p) is None  # a zero denominator: malformed, no crash
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    assert read_exif_latlng(tmp_path / "junk.jpg") is None
