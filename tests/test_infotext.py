"""A1111 infotext: format/parse round trips, real A1111 output, PNG/JPEG/WebP metadata, hashes,
and mapping params back into the generate form."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from studio.generation import infotext
from studio.generation.infotext import (
    encode_user_comment,
    file_sha256,
    format_infotext,
    format_lora_hashes,
    infotext_to_form,
    lora_hash,
    model_hash,
    parse_infotext,
    parse_lora_hashes,
    read_infotext,
    safetensors_data_sha256,
    write_png,
)
from studio.schemas import GenerateConfig

PARAMS = {
    "Steps": 28,
    "Sampler": "Euler a",
    "Schedule type": "Automatic",
    "CFG scale": 7.0,
    "Seed": 2947213947,
    "Size": "832x1216",
    "Model hash": "e3c47aedb0",
    "Model": "animagine-xl-3.1",
    "Lora hashes": "asuka_v2: 1a2b3c4d5e6f, detail-tweaker: abcdef012345",
    "Version": "studio 0.1.0",
}


def as_read_back(params: dict) -> dict[str, str]:
    """What a reader gets back: strings, and a whole float written without its ".0"."""
    return {k: str(int(v) if isinstance(v, float) and v.is_integer() else v) for k, v in params.items()}


# Written by A1111 v1.10.1 (hires fix on, two LoRAs, ADetailer): the shape users paste in.
A1111_SAMPLE = (
    "1girl, souryuu asuka langley, neon genesis evangelion, solo, upper body, v, smile, "
    "looking at viewer, outdoors, night, <lora:asuka_v2:0.8>, masterpiece, best quality, "
    "very aesthetic, absurdres\n"
    "Negative prompt: nsfw, lowres, (bad), text, error, fewer, extra, missing, worst quality, "
    "jpeg artifacts, low quality, watermark, unfinished, displeasing, oldest, early, chromatic "
    "aberration, signature, extra digits, artistic error, username, scan, [abstract]\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 2947213947, "
    "Size: 832x1216, Model hash: e3c47aedb0, Model: animagine-xl-3.1, Denoising strength: 0.55, "
    'ADetailer model: face_yolov8n.pt, ADetailer prompt: "smile, blue eyes", '
    'ADetailer version: 24.9.0, Hires upscale: 1.5, Hires steps: 20, Hires upscaler: R-ESRGAN 4x+ Anime6B, '
    'Lora hashes: "asuka_v2: 1a2b3c4d5e6f, detail-tweaker: abcdef012345", '
    'TI hashes: "EasyNegative: c74b4e810b03", Emphasis: Original, Version: v1.10.1'
)


# --- format_infotext -------------------------------------------------------------------------


def test_format_matches_a1111_layout():
    text = format_infotext("1girl, solo", "lowres, (bad)", PARAMS)
    assert text == (
        "1girl, solo\n"
        "Negative prompt: lowres, (bad)\n"
        "Steps: 28, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 2947213947, "
        "Size: 832x1216, Model hash: e3c47aedb0, Model: animagine-xl-3.1, "
        'Lora hashes: "asuka_v2: 1a2b3c4d5e6f, detail-tweaker: abcdef012345", Version: studio 0.1.0'
    )


def test_format_leaves_out_empty_negative_and_none_values():
    text = format_infotext("1girl", "", {"Steps": 20, "Schedule type": None, "Sampler": "Euler", "Seed": 1})
    assert text == "1girl\nSteps: 20, Sampler: Euler, Seed: 1"


def test_format_without_params_or_prompt():
    assert format_infotext("1girl", "", {}) == "1girl"
    assert format_infotext("", "lowres", {"Steps": 1}) == "Negative prompt: lowres\nSteps: 1"


@pytest.mark.parametrize(
    "value, written",
    [
        (7.0, "7"),
        (6.5, "6.5"),
        (0.55, "0.55"),
        (28, "28"),
        (True, "True"),
        ("Euler a", "Euler a"),
        ("a, b", '"a, b"'),
        ("k: v", '"k: v"'),
        ("two\nlines", '"two\\nlines"'),
        ('say "hi"', '"say \\"hi\\""'),
        (" padded ", '" padded "'),
        ("日本語: テスト", '"日本語: テスト"'),  # ensure_ascii=False: stays readable
    ],
)
def test_format_values(value, written):
    assert format_infotext("p", "", {"Key": value}) == f"p\nKey: {written}"


@pytest.mark.parametrize("key", ["Bad:key", "Bad,key", "Two\nlines", " padded", ""])
def test_format_rejects_keys_a_reader_could_not_split(key):
    with pytest.raises(ValueError, match="infotext key"):
        format_infotext("p", "", {key: 1})


# --- round trips -----------------------------------------------------------------------------

ROUND_TRIP_PROMPTS = [
    "1girl, solo",
    "1girl, (red hair, blue eyes:1.2), hatsune miku \\(cosplay\\), <lora:asuka_v2:0.8>",
    "ratio 16:9, time: 12:30, key: value",
    "line one,\nline two\n\nline four after a blank",
    'she says "hello, world", "quoted"',
    "a caption with Negative prompt: inside a line",
    "初音ミク, 1girl, 笑顔, 🎉🌸, ñandú",
    "Steps: 20, Sampler: Euler, Seed: 1\nthe prompt's own line looks like params",
    "the last line of this prompt looks like params\nSteps: 20, Sampler: Euler, Seed: 1",
    " leading and trailing spaces ",
    "ends with a newline\n",
    "back\\slash, tab\there",
    "",
]
ROUND_TRIP_NEGATIVES = [
    "",
    "lowres, (bad), [abstract]",
    "multi\nline: negative, with \"quotes\"",
    "低品質, 🙅",
    "Negative prompt: twice",
]
ROUND_TRIP_PARAMS = [
    PARAMS,
    {
        "Steps": 20,
        "Sampler": "DPM++ 2M",
        "Seed": 1,
        "Hires prompt": "a, b: c\nd",
        "Note": 'quote " inside',
        "Comment": "日本語, emoji 🎉: yes",
        "Padded": "  x ",
        "Path": "C:\\models\\x.safetensors",
        "Empty": "",
    },
]


@pytest.mark.parametrize("prompt", ROUND_TRIP_PROMPTS)
@pytest.mark.parametrize("negative", ROUND_TRIP_NEGATIVES)
@pytest.mark.parametrize("params", ROUND_TRIP_PARAMS, ids=["typical", "awkward-values"])
def test_round_trip(prompt, negative, params):
    text = format_infotext(prompt, negative, params)
    assert parse_infotext(text) == (prompt, negative, as_read_back(params))


@pytest.mark.parametrize("prompt", ROUND_TRIP_PROMPTS)
def test_round_trip_without_params(prompt):
    assert parse_infotext(format_infotext(prompt, "lowres", {})) == (prompt, "lowres", {})
    if ":" not in prompt:  # a prompt alone whose last line holds 3 pairs reads as params, as in A1111
        assert parse_infotext(format_infotext(prompt, "", {})) == (prompt, "", {})


# --- parse_infotext --------------------------------------------------------------------------


def test_parse_real_a1111_sample():
    prompt, negative, params = parse_infotext(A1111_SAMPLE)
    assert prompt.startswith("1girl, souryuu asuka langley,") and prompt.endswith("absurdres")
    assert negative.startswith("nsfw, lowres, (bad)") and negative.endswith("scan, [abstract]")
    assert params == {
        "Steps": "28",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "6.5",
        "Seed": "2947213947",
        "Size": "832x1216",
        "Model hash": "e3c47aedb0",
        "Model": "animagine-xl-3.1",
        "Denoising strength": "0.55",
        "ADetailer model": "face_yolov8n.pt",
        "ADetailer prompt": "smile, blue eyes",
        "ADetailer version": "24.9.0",
        "Hires upscale": "1.5",
        "Hires steps": "20",
        "Hires upscaler": "R-ESRGAN 4x+ Anime6B",
        "Lora hashes": "asuka_v2: 1a2b3c4d5e6f, detail-tweaker: abcdef012345",
        "TI hashes": "EasyNegative: c74b4e810b03",
        "Emphasis": "Original",
        "Version": "v1.10.1",
    }


def test_parse_plain_text_is_all_prompt():
    text = "1girl, solo\nsmile, looking at viewer"
    assert parse_infotext(text) == (text, "", {})


def test_parse_empty_text():
    assert parse_infotext("") == ("", "", {})


def test_parse_last_line_needs_three_pairs():
    text = "1girl\nSteps: 20, Seed: 3"
    assert parse_infotext(text) == (text, "", {})


def test_weighted_negative_is_not_mistaken_for_params():
    text = "1girl\nNegative prompt: (worst quality:1.4), (low quality:1.4), (normal quality:1.4)"
    negative = "(worst quality:1.4), (low quality:1.4), (normal quality:1.4)"
    assert parse_infotext(text) == ("1girl", negative, {})


def test_parse_multiline_negative():
    text = "1girl\nsolo\nNegative prompt: lowres,\nbad hands\nSteps: 1, Sampler: Euler, Seed: 2"
    params = {"Steps": "1", "Sampler": "Euler", "Seed": "2"}
    assert parse_infotext(text) == ("1girl\nsolo", "lowres,\nbad hands", params)


def test_parse_tolerates_windows_newlines_and_trailing_blank_lines():
    text = "1girl\r\nNegative prompt: lowres\r\nSteps: 1, Sampler: Euler, Seed: 2\r\n\r\n"
    assert parse_infotext(text) == ("1girl", "lowres", {"Steps": "1", "Sampler": "Euler", "Seed": "2"})


def test_parse_skips_bare_flags_and_keeps_later_duplicates():
    text = "p\nSteps: 1, Tiling, Sampler: Euler, Seed: 2, Seed: 3"
    assert parse_infotext(text)[2] == {"Steps": "1", "Sampler": "Euler", "Seed": "3"}


def test_parse_keeps_a_broken_quote_as_text():
    text = 'p\nSteps: 1, Sampler: Euler, Seed: 2, Odd: "unterminated'
    assert parse_infotext(text)[2]["Odd"] == '"unterminated'


# --- Lora hashes -----------------------------------------------------------------------------


def test_lora_hashes_round_trip():
    hashes = {"asuka_v2": "1a2b3c4d5e6f", "detail tweaker": "abcdef012345"}
    assert format_lora_hashes(hashes) == "asuka_v2: 1a2b3c4d5e6f, detail tweaker: abcdef012345"
    assert parse_lora_hashes(format_lora_hashes(hashes)) == hashes


def test_lora_hash_names_lose_separators_like_a1111():
    assert format_lora_hashes({"my:lora, v2": "0123456789ab"}) == "mylora v2: 0123456789ab"


def test_lora_hashes_through_infotext():
    value = format_lora_hashes({"a": "111111111111", "b": "222222222222"})
    text = format_infotext("p", "", {"Steps": 1, "Seed": 2, "Lora hashes": value})
    assert 'Lora hashes: "a: 111111111111, b: 222222222222"' in text
    read_back = parse_infotext(text)[2]["Lora hashes"]
    assert parse_lora_hashes(read_back) == {"a": "111111111111", "b": "222222222222"}


@pytest.mark.parametrize(
    "value, expected",
    [
        ("", {}),
        ('"a: 1, b: 2"', {"a": "1", "b": "2"}),  # still JSON-quoted: unquoted here
        ("a: 1, garbage, : 3, c:, d: 4", {"a": "1", "d": "4"}),
    ],
)
def test_parse_lora_hashes_odd_values(value, expected):
    assert parse_lora_hashes(value) == expected


# --- hashes ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_hash_cache():
    infotext.clear_hash_cache()
    yield
    infotext.clear_hash_cache()


def _write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def test_file_sha256_matches_hashlib(tmp_path):
    data = os.urandom(3 * 1024 + 7)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == expected
    infotext.clear_hash_cache()
    assert file_sha256(str(path), chunk=100) == expected  # chunking does not change the digest
    assert model_hash(path) == expected[:10]


def test_lora_hash_is_autov3_for_safetensors(tmp_path):
    data = os.urandom(4096)
    header = {"lora.weight": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}
    first = _write_safetensors(tmp_path / "a.safetensors", header, data)
    with_metadata = header | {"__metadata__": {"ss_output_name": "x"}}
    renamed = _write_safetensors(tmp_path / "b.safetensors", with_metadata, data)
    assert safetensors_data_sha256(first) == hashlib.sha256(data).hexdigest()
    assert lora_hash(first) == hashlib.sha256(data).hexdigest()[:12]
    assert lora_hash(renamed) == lora_hash(first)  # metadata edits do not change it
    assert file_sha256(renamed) != file_sha256(first)


def test_lora_hash_of_other_files_is_the_file_sha256(tmp_path):
    path = tmp_path / "old.pt"
    path.write_bytes(b"not a safetensors file")
    assert lora_hash(path) == hashlib.sha256(b"not a safetensors file").hexdigest()[:12]


def test_safetensors_hash_rejects_a_file_that_is_not_one(tmp_path):
    path = tmp_path / "fake.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        lora_hash(path)


def test_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    calls = []
    real = infotext._sha256_from
    monkeypatch.setattr(infotext, "_sha256_from", lambda *a: calls.append(a) or real(*a))
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(b"version one")
    first = file_sha256(path)
    assert file_sha256(path) == first and model_hash(path) == first[:10]
    assert len(calls) == 1
    path.write_bytes(b"version two, longer")  # size and mtime change: hashed again
    assert file_sha256(path) == hashlib.sha256(b"version two, longer").hexdigest()
    assert len(calls) == 2


# --- images ----------------------------------------------------------------------------------

TEXTS = [
    format_infotext("1girl, solo", "lowres", PARAMS),
    format_infotext("初音ミク, 1girl, 🎉\nsecond line", "低品質", PARAMS),
    format_infotext("café, naïve", "", {"Steps": 1, "Sampler": "Euler", "Seed": 2}),
]


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "japanese-emoji", "latin1"])
def test_png_round_trip(tmp_path, text):
    path = write_png(Image.new("RGB", (16, 8), "red"), tmp_path / "out.png", text)
    assert path == tmp_path / "out.png"
    assert read_infotext(path) == text
    assert read_infotext(str(path)) == text
    with Image.open(path) as image:
        assert image.size == (16, 8)
        assert read_infotext(image) == text
        assert parse_infotext(read_infotext(image))[2]["Steps"] in ("28", "1")


def test_png_chunk_types(tmp_path):
    ascii_png = write_png(Image.new("RGB", (4, 4)), tmp_path / "a.png", TEXTS[0]).read_bytes()
    utf8_png = write_png(Image.new("RGB", (4, 4)), tmp_path / "b.png", TEXTS[1]).read_bytes()
    assert b"tEXtparameters\0" in ascii_png
    assert b"iTXtparameters\0" in utf8_png and TEXTS[1].encode("utf-8") in utf8_png


def test_png_keeps_alpha(tmp_path):
    path = write_png(Image.new("RGBA", (4, 4), (1, 2, 3, 4)), tmp_path / "a.png", "p")
    with Image.open(path) as image:
        assert image.mode == "RGBA" and image.getpixel((0, 0)) == (1, 2, 3, 4)


def test_png_write_is_atomic(tmp_path):
    target = tmp_path / "out.png"
    write_png(Image.new("RGB", (4, 4)), target, "first")
    write_png(Image.new("RGB", (4, 4)), target, "second")  # replaces in place
    assert read_infotext(target) == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_failed_png_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.png"
    write_png(Image.new("RGB", (4, 4)), target, "kept")
    with pytest.raises(OSError):
        write_png(Image.new("CMYK", (4, 4)), target, "lost")  # PNG cannot hold CMYK
    assert read_infotext(target) == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_image_info_of_an_in_memory_image():
    image = Image.new("RGB", (4, 4))
    assert read_infotext(image) is None
    image.info["parameters"] = "from info"
    assert read_infotext(image) == "from info"


def test_png_without_metadata(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_infotext(path) is None


def _exif_with_comment(comment: bytes) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    return exif


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment_as_a1111_writes_it(tmp_path, fmt):
    text = TEXTS[1]
    path = tmp_path / f"out.{fmt.lower()}"
    Image.new("RGB", (8, 8)).save(path, format=fmt, exif=_exif_with_comment(encode_user_comment(text)))
    assert read_infotext(path) == text


@pytest.mark.parametrize(
    "comment",
    [
        b"UNICODE\0" + "1girl, 日本語".encode("utf-16-le"),  # some tools write little-endian
        b"ASCII\0\0\0" + b"1girl, \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e",
    ],
)
def test_exif_user_comment_other_encodings(tmp_path, comment):
    path = tmp_path / "out.jpg"
    Image.new("RGB", (8, 8)).save(path, exif=_exif_with_comment(comment))
    assert read_infotext(path) == "1girl, 日本語"


def test_jpeg_without_metadata(tmp_path):
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (8, 8)).save(path)
    assert read_infotext(path) is None


def test_third_party_reader_agrees(tmp_path):
    sd_parsers = pytest.importorskip("sd_parsers")
    text = format_infotext("1girl, solo, smile", "lowres, (bad)", PARAMS)
    path = write_png(Image.new("RGB", (8, 8)), tmp_path / "out.png", text)
    info = sd_parsers.ParserManager().parse(path)
    assert info is not None and info.generator.value == "AUTOMATIC1111"
    assert info.full_prompt == "1girl, solo, smile"
    assert info.full_negative_prompt == "lowres, (bad)"
    (sampler,) = info.samplers
    assert sampler.name == "Euler a"
    assert sampler.parameters["steps"] == "28"
    assert sampler.parameters["cfg_scale"] == "7"
    assert sampler.parameters["seed"] == "2947213947"
    assert sampler.parameters["scheduler"] == "Automatic"
    assert (sampler.model.name, sampler.model.hash) == ("animagine-xl-3.1", "e3c47aedb0")


# --- infotext_to_form ------------------------------------------------------------------------


def test_form_from_real_a1111_sample():
    form = infotext_to_form(parse_infotext(A1111_SAMPLE)[2])
    assert form == {
        "steps": 28,
        "cfg_scale": 6.5,
        "seed": 2947213947,
        "width": 832,
        "height": 1216,
        "sampler": "DPM++ 2M Karras",
        "model": "animagine-xl-3.1",
        "hires": {"scale": 1.5, "denoise": 0.55, "steps": 20},
    }
    config = GenerateConfig.model_validate({"prompt": "1girl", **form})
    assert config.hires is not None and config.hires.steps == 20


def test_form_round_trip_through_our_own_infotext():
    params = dict(PARAMS, **{"Denoising strength": 0.4, "Hires upscale": 2, "Hires steps": 0})
    form = infotext_to_form(parse_infotext(format_infotext("p", "", params))[2])
    assert form["sampler"] == "Euler a"  # "Schedule type: Automatic" is not part of the name
    assert form["cfg_scale"] == 7.0 and form["seed"] == 2947213947
    assert form["hires"] == {"scale": 2.0, "denoise": 0.4, "steps": 28}  # 0 = as the first pass


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, {}),
        ({"Steps": "many", "CFG scale": "high", "Seed": "-"}, {}),
        ({"Steps": "28.0", "Seed": "12.0"}, {"steps": 28, "seed": 12}),
        ({"Steps": "28.5"}, {}),
        ({"Steps": "0", "CFG scale": "99", "Seed": str(2**40)}, {}),  # outside what the form accepts
        ({"Size": "big"}, {}),
        ({"Size": "832x"}, {}),
        ({"Size": "1020x1024"}, {}),  # 1020 is not a multiple of 8
        ({"Size": "1024X768"}, {"width": 1024, "height": 768}),
        ({"Sampler": "LMS"}, {}),
        ({"Sampler": "DPM++ 2M Karras"}, {"sampler": "DPM++ 2M Karras"}),
        ({"Sampler": "DPM++ 2M", "Schedule type": "Karras"}, {"sampler": "DPM++ 2M Karras"}),
        ({"Sampler": "Euler a", "Schedule type": "Automatic"}, {"sampler": "Euler a"}),
        ({"Schedule type": "Karras"}, {}),
        ({"Model": ""}, {}),
        ({"Denoising strength": "0.7"}, {}),  # img2img, not a hires fix
        ({"Hires upscale": "1.5", "Hires steps": "0"}, {"hires": {"scale": 1.5}}),
        ({"Hires upscale": "9", "Denoising strength": "nan", "Hires steps": "x"}, {"hires": {}}),
        ({"Clip skip": "2", "ENSD": "31337", "Version": "v1.10.1"}, {}),
    ],
)
def test_form_skips_odd_values(params, expected):
    form = infotext_to_form(params)
    assert form == expected
    GenerateConfig.model_validate({"prompt": "1girl", **form})  # whatever it returns is valid
