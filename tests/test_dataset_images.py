"""load_rgb: every unusual mode becomes the RGB a viewer shows, checked pixel by pixel against an
expectation computed here with numpy (not with the code under test)."""

import numpy as np
import pytest
from PIL import Image

from studio.dataset import load_rgb
from studio.errors import DatasetError

WHITE = np.array([255, 255, 255], dtype=np.float64)


def rgb_array(path, **kwargs):
    image = load_rgb(path, **kwargs)
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int32)


def composite(color, alpha, background=WHITE):
    """Straight alpha over an opaque background, in floats."""
    a = alpha[..., None].astype(np.float64) / 255.0
    return np.rint(color.astype(np.float64) * a + background * (1.0 - a)).astype(np.int32)


def test_rgba_is_composited_onto_white_and_onto_a_chosen_background(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    pixels[0, 0, 3], pixels[0, 1, 3] = 0, 255  # fully transparent, fully opaque
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")

    got = rgb_array(tmp_path / "a.png")
    assert np.abs(got - composite(pixels[..., :3], pixels[..., 3])).max() <= 1
    assert got[0, 0].tolist() == [255, 255, 255]
    assert got[0, 1].tolist() == pixels[0, 1, :3].tolist()

    black = rgb_array(tmp_path / "a.png", background=(0, 0, 0))
    assert np.abs(black - composite(pixels[..., :3], pixels[..., 3], np.zeros(3))).max() <= 1


def test_la_gray_with_alpha(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (9, 7, 2), dtype=np.uint8)
    Image.fromarray(pixels, "LA").save(tmp_path / "la.png")
    gray = np.repeat(pixels[..., :1], 3, axis=2)
    assert np.abs(rgb_array(tmp_path / "la.png") - composite(gray, pixels[..., 1])).max() <= 1


def test_palette_transparency_is_respected(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3)  # 0 red, 1 green, 2 blue
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette)
    image.save(tmp_path / "p.png", transparency=1)  # green is the transparent index

    expected = np.array([[[255, 0, 0], [255, 255, 255], [0, 0, 255]],
                         [[0, 0, 255], [255, 255, 255], [255, 0, 0]]])
    assert rgb_array(tmp_path / "p.png").tolist() == expected.tolist()
    assert rgb_array(tmp_path / "p.png", background=(10, 20, 30))[0, 1].tolist() == [10, 20, 30]


def test_rgb_colour_key_transparency(tmp_path):
    pixels = np.array([[[255, 0, 0], [1, 2, 3]]], dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(tmp_path / "key.png", transparency=(255, 0, 0))
    assert rgb_array(tmp_path / "key.png").tolist() == [[[255, 255, 255], [1, 2, 3]]]


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 4).astype(np.uint16).reshape(4, 64)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"

    got = rgb_array(tmp_path / "g16.png")
    expected = np.rint(values.astype(np.float64) / 257.0).astype(np.int32)
    assert (got[..., 0] == expected).all() and (got[..., 1] == expected).all()
    ramp = got[..., 0].ravel()
    assert ramp[0] == 0 and ramp[-1] == 255
    assert 125 <= ramp[128] <= 130  # mid grey stays mid grey (a clip would give 255)


def test_cmyk_tiff_exact_colours(tmp_path):
    cmyk = np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0],
                      [128, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    expected = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255
    assert np.abs(rgb_array(tmp_path / "c.tif") - np.rint(expected)).max() <= 1
    assert rgb_array(tmp_path / "c.tif")[0, :5].tolist() == [
        [0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0], [255, 255, 255]]


def test_cmyk_jpeg(tmp_path):
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "CMYK").save(tmp_path / "c.jpg")
    decoded = np.asarray(Image.open(tmp_path / "c.jpg")).astype(np.float64)  # CMYK as stored
    c, m, y, k = (decoded[..., i] for i in range(4))
    expected = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255
    assert np.abs(rgb_array(tmp_path / "c.jpg") - np.rint(expected)).max() <= 1


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 4), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    assert Image.open(tmp_path / "a.gif").n_frames == 3
    got = rgb_array(tmp_path / "a.gif")
    assert got.shape == (4, 6, 3) and (got == [255, 0, 0]).all()


@pytest.mark.parametrize("orientation, turn", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "r.png", exif=exif)
    # np.rot90 turns counter-clockwise for k > 0; orientation 6 needs a clockwise quarter turn
    assert rgb_array(tmp_path / "r.png").tolist() == np.rot90(pixels, k=turn).tolist()


def test_plain_modes(tmp_path):
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    assert rgb_array(tmp_path / "l.png").tolist() == np.repeat(gray[..., None], 3, 2).tolist()
    rgb = np.random.default_rng(4).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    assert rgb_array(tmp_path / "rgb.bmp").tolist() == rgb.tolist()


def test_bad_files_raise_a_dataset_error(tmp_path):
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(DatasetError, match="not an image"):
        load_rgb(tmp_path / "t.png")
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    with pytest.raises(DatasetError, match="over the limit"):
        load_rgb(tmp_path / "big.png", max_pixels=10_000)
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cannot be decoded"):
        load_rgb(tmp_path / "cut.png")


def test_draft_size_decodes_a_jpeg_smaller(tmp_path):
    Image.new("RGB", (800, 600), (200, 100, 50)).save(tmp_path / "big.jpg", quality=95)
    small = load_rgb(tmp_path / "big.jpg", draft_size=(64, 64))
    assert small.size == (100, 75)  # 1/8 scale, still at least 64x64
    assert np.abs(np.asarray(small).astype(int) - [200, 100, 50]).max() <= 3
