"""Tests for magicstyle/images.py: reading any image as upright 8-bit RGB, square crops, tensors, and PNG output."""
from __future__ import annotations

import gc
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny import fail_half_way, gradient, tree
from magicstyle import images
from magicstyle.output import OutputError
from magicstyle.images import ImageError, open_rgb, save_png, square, to_image, to_rgb, to_tensor

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def pixel(img: Image.Image, xy=(0, 0)) -> tuple:
    return tuple(int(v) for v in img.getpixel(xy))


def near(a: tuple, b: tuple, tol: int = 8) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------- open_rgb


QUADRANTS = (RED, GREEN, BLUE, WHITE)  # top-left, top-right, bottom-left, bottom-right of the stored image


def displayed(a: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF 2.3 definition of tag 0x0112, as where the stored 0th row and 0th column appear when displayed."""
    return {
        1: lambda: a,  # row 0 top, column 0 left
        2: lambda: a[:, ::-1],  # row 0 top, column 0 right
        3: lambda: a[::-1, ::-1],  # row 0 bottom, column 0 right
        4: lambda: a[::-1],  # row 0 bottom, column 0 left
        5: lambda: a.transpose(1, 0, 2),  # row 0 left, column 0 top
        6: lambda: a[::-1].transpose(1, 0, 2),  # row 0 right, column 0 top
        7: lambda: a[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom
        8: lambda: a[:, ::-1].transpose(1, 0, 2),  # row 0 left, column 0 bottom
    }[orientation]()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    a = np.zeros((40, 60, 3), np.uint8)  # 60 wide, 40 high, one colour per quadrant
    for i, colour in enumerate(QUADRANTS):
        a[20 * (i // 2):20 * (i // 2 + 1), 30 * (i % 2):30 * (i % 2 + 1)] = colour
    img = Image.fromarray(a, "RGB")
    exif = img.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out = open_rgb(path)
    want = displayed(a, orientation)
    assert out.mode == "RGB" and out.size == (want.shape[1], want.shape[0])
    h, w = want.shape[:2]
    for y in (h // 4, 3 * h // 4):  # the centre of each quadrant
        for x in (w // 4, 3 * w // 4):
            assert near(pixel(out, (x, y)), tuple(int(v) for v in want[y, x]), 40), (orientation, x, y)


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    img.putpixel((1, 1), (0, 0, 0, 0))  # fully transparent black -> white, not black
    img.putpixel((2, 2), (0, 0, 0, 128))  # half transparent black -> mid grey
    img.save(tmp_path / "a.png")
    out = open_rgb(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert pixel(out, (0, 0)) == RED and pixel(out, (1, 1)) == WHITE
    assert near(pixel(out, (2, 2)), (127, 127, 127), 2)


def test_la_is_composited_on_white(tmp_path):
    img = Image.new("LA", (4, 4), (40, 255))
    img.putpixel((3, 0), (0, 0))
    img.save(tmp_path / "la.png")
    out = open_rgb(tmp_path / "la.png")
    assert out.mode == "RGB" and pixel(out, (0, 0)) == (40, 40, 40) and pixel(out, (3, 0)) == WHITE


def test_greyscale(tmp_path):
    Image.new("L", (5, 3), 77).save(tmp_path / "l.png")
    out = open_rgb(tmp_path / "l.png")
    assert out.mode == "RGB" and out.size == (5, 3) and pixel(out) == (77, 77, 77)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(4, 0)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really a 16-bit file
    out = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and out.shape == (4, 256, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    np.testing.assert_array_equal(out[0, :, 0], np.arange(256))  # 0..65535 -> 0..255, monotone, not all 255
    assert (out[:, 128, 0] < 200).all()


def png_rgb16(path, a: np.ndarray) -> None:
    """Write a (H, W, 3) uint16 array as a 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = a.shape
    rows = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))  # filter type 0 per row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_rgb_keeps_its_colours(tmp_path):
    a = np.zeros((2, 3, 3), np.uint16)
    a[0] = [[65535, 0, 0], [0, 65535, 0], [0, 0, 65535]]
    a[1] = [[32896] * 3, [65535] * 3, [257 * 40, 257 * 80, 257 * 200]]  # 128 grey; white; 8-bit values x 257
    png_rgb16(tmp_path / "rgb16.png", a)
    out = np.asarray(open_rgb(tmp_path / "rgb16.png"))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, (a.astype(np.float64) / 257).round().astype(np.uint8))


@pytest.mark.parametrize("top", [255, 65535])
def test_mode_i_is_scaled_to_8_bits(tmp_path, top):
    """32-bit integer greyscale ("I", e.g. from a TIFF): values up to 255 are kept, larger ones scaled from 16 bits."""
    ramp = np.linspace(0, top, 256).round().astype(np.int32)[None, :].repeat(2, 0)
    img = Image.fromarray(ramp)
    assert img.mode == "I"
    img.save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    for out in (np.asarray(open_rgb(tmp_path / "i.tif")), np.asarray(to_rgb(img))):
        assert out.dtype == np.uint8 and out.shape == (2, 256, 3)
        np.testing.assert_array_equal(out[0, :, 0], np.arange(256))
        assert (out[..., 0] == out[..., 2]).all()


def test_palette(tmp_path):
    img = Image.new("RGB", (4, 4), GREEN).quantize(4)
    assert img.mode == "P"
    img.save(tmp_path / "p.png")
    out = open_rgb(tmp_path / "p.png")
    assert out.mode == "RGB" and pixel(out) == GREEN


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black, 1 blue
    img.putpixel((0, 0), 0)
    img.save(tmp_path / "pt.png", transparency=0)  # index 0 is transparent
    out = open_rgb(tmp_path / "pt.png")
    assert out.mode == "RGB" and pixel(out, (0, 0)) == WHITE and pixel(out, (1, 1)) == BLUE


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # C=0 M=Y=1 K=0: red
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = open_rgb(tmp_path / "cmyk.jpg")
    assert out.mode == "RGB" and near(pixel(out, (4, 4)), RED, 12)


@pytest.mark.parametrize("fmt", ["gif", "png"])
def test_animation_gives_its_first_frame(tmp_path, fmt):
    path = tmp_path / f"anim.{fmt}"
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (8, 8) and pixel(out, (4, 4)) == RED


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        open_rgb(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a file"):
        open_rgb(tmp_path)
    (tmp_path / "text.png").write_text("this is not an image\n")
    with pytest.raises(ImageError, match="cannot read image"):
        open_rgb(tmp_path / "text.png")
    (tmp_path / "truncated.png").write_bytes((gradient(tmp_path / "g.png")).read_bytes()[:60])
    with pytest.raises(ImageError):
        open_rgb(tmp_path / "truncated.png")


def test_images_over_max_pixels_are_refused(tmp_path, monkeypatch):
    path = gradient(tmp_path / "g.png", (80, 64))  # 5120 pixels
    assert open_rgb(path).size == (80, 64)
    monkeypatch.setattr(images, "MAX_PIXELS", 5000)
    with pytest.raises(ImageError, match=r"too large \(limit 5000 pixels\); make a smaller copy first \(e.g. 70 px"):
        open_rgb(path)


@pytest.mark.parametrize("limit", [2000, 4000])  # 5120 pixels: > 2x the limit is Pillow's error, > 1x its warning
def test_decompression_bomb_is_an_image_error_not_a_warning(tmp_path, monkeypatch, limit):
    path = gradient(tmp_path / "g.png", (80, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning that escapes open_rgb fails the test
        with pytest.raises(ImageError, match="decompression bomb"):
            open_rgb(path)


@pytest.mark.parametrize("case", ["animated", "refused"])
def test_open_rgb_closes_the_file(tmp_path, monkeypatch, case):
    path = tmp_path / "a.gif"
    Image.new("RGB", (8, 8), RED).save(path, save_all=True, append_images=[Image.new("RGB", (8, 8), BLUE)])
    if case == "refused":
        monkeypatch.setattr(images, "MAX_PIXELS", 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            open_rgb(path)
        except ImageError:
            assert case == "refused"
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# ------------------------------------------------------------------------------------------------------------ square


def bands(size: tuple[int, int], vertical: bool) -> Image.Image:
    """Green in the middle, a red band at the left (top) and a blue band at the right (bottom), each 1/10 of the
    long side: a centre crop to a square removes both."""
    w, h = size
    img = Image.new("RGB", size, GREEN)
    if vertical:
        img.paste(RED, (0, 0, w // 10, h))
        img.paste(BLUE, (w - w // 10, 0, w, h))
    else:
        img.paste(RED, (0, 0, w, h // 10))
        img.paste(BLUE, (0, h - h // 10, w, h))
    return img


@pytest.mark.parametrize("size", [(80, 64), (64, 80), (160, 128), (40, 32)])
def test_square_is_a_centre_crop(size):
    out = square(bands(size, vertical=size[0] > size[1]), 64)
    assert out.size == (64, 64) and out.mode == "RGB"
    a = np.asarray(out).astype(int)
    inner = a[2:-2, 2:-2]  # Lanczos may ring at the crop edges when resampling
    assert (inner[..., 1] > 230).all() and (inner[..., 0] < 25).all() and (inner[..., 2] < 25).all()
    assert (a[..., 1] > 150).all()  # no red or blue band survived, even at the edges


@pytest.mark.parametrize("size", [(200_000, 10), (10, 200_000)])
def test_a_thin_strip_is_cut_before_it_is_resized(size):
    """A 20000:1 strip: its shorter side to 64 px would make it 1.3 million px long.  Only its centre (at most
    MAX_ASPECT times the shorter side) is resized: quick, small, and the same centre crop."""
    strip = bands(size, vertical=size[0] > size[1])
    assert images.limit_aspect(strip).size == ((80, 10) if size[0] > size[1] else (10, 80))
    out = square(strip, 64)
    assert out.size == (64, 64) and (np.asarray(out)[..., 1] > 150).all()  # the green centre
    ordinary = bands((80, 64), vertical=True)
    assert images.limit_aspect(ordinary) is ordinary  # within the ratio: untouched, so square's result is unchanged


def test_square_of_a_square_image_keeps_it():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    np.testing.assert_array_equal(np.asarray(square(img, 64)), np.asarray(img))
    assert square(img, 128).size == (128, 128)


# -------------------------------------------------------------------------------------------- to_tensor / to_image


def test_tensor_round_trip_is_exact():
    a = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    a[0, :3] = [[0, 0, 0], [255, 255, 255], [127, 128, 1]]
    a[1, :256 // 16] = 0
    img = Image.fromarray(a, "RGB")
    x = to_tensor(img)
    assert x.shape == (1, 3, 16, 24) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x[0, :, 0, 0].tolist() == [-1, -1, -1] and x[0, :, 0, 1].tolist() == [1, 1, 1]
    back = to_image(x)
    assert back.mode == "RGB" and back.size == (24, 16)
    np.testing.assert_array_equal(np.asarray(back), a)
    every = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2), "RGB")
    np.testing.assert_array_equal(np.asarray(to_image(to_tensor(every))), np.asarray(every))


def test_to_image_clamps():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert np.asarray(to_image(x))[0, :, 0].tolist() == [0, 0, 128, 255, 255]


# ---------------------------------------------------------------------------------------------------------- save_png


def test_save_png_writes_parameters(tmp_path):
    img = Image.new("RGB", (8, 8), RED)
    save_png(img, tmp_path / "sub" / "out.png", '{"a": 1}')
    with Image.open(tmp_path / "sub" / "out.png") as out:
        assert out.format == "PNG" and out.text["parameters"] == '{"a": 1}' and pixel(out) == RED
    assert list(tree(tmp_path)) == ["sub/out.png"]  # no temporary file left behind


def test_save_png_refuses_an_existing_file(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists"):
        save_png(Image.new("RGB", (8, 8)), path, "{}")
    assert tree(tmp_path) == {"out.png": b"precious"}
    save_png(Image.new("RGB", (8, 8), BLUE), path, "{}", overwrite=True)
    assert list(tree(tmp_path)) == ["out.png"]
    with Image.open(path) as out:
        assert pixel(out) == BLUE


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_save_png_leaves_nothing_behind_when_writing_fails(tmp_path, monkeypatch, failure):
    """The disk fills (or Ctrl-C comes) half-way through writing the temporary file: the old file is untouched and
    no temporary file remains."""
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    written = fail_half_way(monkeypatch, failure)
    expected = OutputError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        save_png(Image.new("RGB", (8, 8)), path, "{}", overwrite=True)
    with pytest.raises(expected):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "new.png", "{}")
    assert len(written) == 2 and all(written)  # the failure did happen during the write, after some bytes
    assert tree(tmp_path) == {"out.png": b"old"}


def test_save_png_disk_full_is_an_output_error(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match="No space left"):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "new.png", "{}")
    assert tree(tmp_path) == {}  # the temporary file is gone too


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_save_png_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o644
