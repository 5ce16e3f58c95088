"""Natural-language captions: the grounded prompt, post-processing, the OpenAI-compatible client
against a local HTTP server, the in-process backend on a tiny random Qwen2-VL, and the folder run
(skip/overwrite, per-image errors, stop, progress)."""

import base64
import io
import socket
import threading
import time

import pytest
from PIL import Image

from studio.captioning.nl_caption import (
    DEFAULT_NL_TEMPLATE,
    BackendUnavailable,
    Grounding,
    NLItem,
    OpenAICompatibleBackend,
    RawCaption,
    TransformersVLMBackend,
    caption_images,
    clean_caption,
    display_name,
    nl_caption_path,
    normalise_base_url,
    render_prompt,
)
from studio.captioning.tag_rules import TagRules, caption_parts
from studio.captioning.tagger import TagResult
from studio.errors import ConfigError, StudioError
from tests.fake_openai import ANSWER, FakeServer

REIMU = Grounding(
    characters=("hakurei reimu",), series=("touhou",), artists=("@ke-ta",), tags=("1girl", "red bow")
)


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def backend_for(server_or_url, **kwargs) -> OpenAICompatibleBackend:
    url = server_or_url.url if isinstance(server_or_url, FakeServer) else server_or_url
    kwargs.setdefault("backoff", 0.01)
    kwargs.setdefault("timeout", 5.0)
    return OpenAICompatibleBackend(url, "qwen2.5-vl-7b", **kwargs)


def make_images(folder, n, size=(96, 64)):
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        Image.new("RGB", size, (40 * i % 255, 120, 200)).save(path)
        paths.append(path)
    return paths


def items_for(paths, grounding=REIMU):
    return [NLItem(p, grounding) for p in paths]


# --- OpenAI-compatible backend ----------------------------------------------------------------


def test_request_carries_model_grounded_prompt_and_a_data_url_image(server, tmp_path):
    (path,) = make_images(tmp_path, 1, size=(3000, 1000))
    with backend_for(server, api_key="sk-local", max_image_side=512) as backend:
        report = caption_images(items_for([path]), backend)
    assert report.written == [nl_caption_path(path)] and not report.errors
    assert nl_caption_path(path).name == "img00_nl.txt"
    assert nl_caption_path(path).read_text() == ANSWER

    (request,) = server.requests
    body = request["body"]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-local"
    assert body["model"] == "qwen2.5-vl-7b" and body["temperature"] == 0.0
    (message,) = body["messages"]
    image_part, text_part = message["content"]
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.format == "JPEG" and sent.size == (512, 171)  # long side capped, aspect kept
    prompt = text_part["text"]
    assert 'Start the first sentence with "An illustration of Hakurei Reimu from Touhou"' in prompt
    assert "@ke-ta" in prompt and "1girl, red bow" in prompt


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retries_on_server_errors_then_succeeds(server, tmp_path, status):
    server.statuses = [status, status]
    paths = make_images(tmp_path, 1)
    report = caption_images(items_for(paths), backend_for(server, max_retries=2))
    assert len(server.requests) == 3
    assert report.written == [nl_caption_path(paths[0])]


def test_persistent_server_errors_are_per_image_and_the_run_goes_on(server, tmp_path):
    server.statuses = [500, 500, 500]  # the first image's three tries
    paths = make_images(tmp_path, 2)
    report = caption_images(items_for(paths), backend_for(server, max_retries=2, concurrency=1))
    assert list(report.errors) == [paths[0]] and "HTTP 500" in report.errors[paths[0]]
    assert report.written == [nl_caption_path(paths[1])]
    assert not nl_caption_path(paths[0]).exists()


def test_requests_overlap_up_to_the_concurrency(server, tmp_path):
    server.delay = 0.4
    paths = make_images(tmp_path, 8)
    start = time.monotonic()
    report = caption_images(items_for(paths), backend_for(server, concurrency=4))
    elapsed = time.monotonic() - start
    assert len(report.written) == 8
    assert server.max_in_flight == 4
    assert elapsed < 8 * 0.4 / 2  # serial would take 3.2 s; four at a time about 0.8 s


def test_a_server_that_is_down_gives_a_clear_error_naming_the_url(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    paths = make_images(tmp_path, 2)
    with pytest.raises(BackendUnavailable, match=rf"http://127\.0\.0\.1:{port}/v1 is not answering.*running"):
        caption_images(items_for(paths), backend_for(f"http://127.0.0.1:{port}", max_retries=1))
    assert issubclass(BackendUnavailable, StudioError)
    assert not any(nl_caption_path(p).exists() for p in paths)


def test_a_server_that_stalls_times_out(server, tmp_path):
    server.delay = 1.0
    with pytest.raises(BackendUnavailable, match="no answer within 0.2 s"):
        caption_images(items_for(make_images(tmp_path, 1)), backend_for(server, timeout=0.2, max_retries=1))


def test_wrong_path_is_a_clear_404(server, tmp_path):
    url = server.url.replace("/v1", "/api")
    with pytest.raises(BackendUnavailable, match="404.*base URL"):
        caption_images(items_for(make_images(tmp_path, 1)), backend_for(url))
    assert len(server.requests) == 1  # not retried


def test_a_cut_off_answer_loses_its_unfinished_sentence(server, tmp_path):
    server.answer = "An illustration of Hakurei Reimu from Touhou. She stands by the"
    server.finish_reason = "length"
    (path,) = make_images(tmp_path, 1)
    caption_images(items_for([path]), backend_for(server))
    assert nl_caption_path(path).read_text() == "An illustration of Hakurei Reimu from Touhou."


def test_base_url_normalisation():
    assert normalise_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalise_base_url("http://localhost:1234/v1/") == "http://localhost:1234/v1"
    assert normalise_base_url("https://example.org/openai/v1") == "https://example.org/openai/v1"
    with pytest.raises(ConfigError, match="not a server URL"):
        normalise_base_url("localhost:8000")
    with pytest.raises(ConfigError, match="name the model"):
        OpenAICompatibleBackend("http://127.0.0.1:1", " ")


# --- the folder run ---------------------------------------------------------------------------


def test_existing_nl_captions_are_kept_unless_overwrite(server, tmp_path):
    paths = make_images(tmp_path, 3)
    nl_caption_path(paths[0]).write_text("my own words")
    nl_caption_path(paths[1]).write_text("  \n")  # empty: not a caption
    report = caption_images(items_for(paths), backend_for(server))
    assert report.skipped == [paths[0]]
    assert sorted(report.written) == [nl_caption_path(paths[1]), nl_caption_path(paths[2])]
    assert nl_caption_path(paths[0]).read_text() == "my own words"
    assert len(server.requests) == 2

    report = caption_images(items_for(paths), backend_for(server), existing="overwrite")
    assert len(report.written) == 3 and not report.skipped
    assert nl_caption_path(paths[0]).read_text() == ANSWER
    with pytest.raises(ConfigError, match="skip' or 'overwrite"):
        caption_images(items_for(paths), backend_for(server), existing="append")


def test_an_unreadable_image_is_reported_and_the_rest_captioned(server, tmp_path):
    paths = make_images(tmp_path, 2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    report = caption_images(items_for([broken, *paths]), backend_for(server))
    assert list(report.errors) == [broken] and "cannot read the image" in report.errors[broken]
    assert len(report.written) == 2


def test_stop_between_images_keeps_what_was_written_and_progress_counts(server, tmp_path):
    paths = make_images(tmp_path, 5)
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done >= 2:
            stop.set()

    report = caption_images(
        items_for(paths), backend_for(server, concurrency=1), stop=stop, progress=progress
    )
    assert report.stopped and len(report.written) == 2
    assert [nl_caption_path(p).exists() for p in paths] == [True, True, False, False, False]
    assert seen == [(0, 5), (1, 5), (2, 5)]

    seen.clear()
    report = caption_images(
        items_for(paths), backend_for(server, concurrency=2), progress=lambda *a: seen.append(a)
    )
    assert not report.stopped and report.skipped == paths[:2] and seen[0] == (2, 5) and seen[-1] == (5, 5)


def test_a_bad_template_fails_before_any_request(server, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown placeholder.*'character'"):
        caption_images(
            items_for(make_images(tmp_path, 1)), backend_for(server), template="Describe {character}."
        )
    assert server.requests == []


# --- the grounded prompt ----------------------------------------------------------------------


def first_instruction(grounding: Grounding) -> str:
    return render_prompt("{opening}", grounding)


def test_template_names_character_series_and_artist():
    prompt = render_prompt(DEFAULT_NL_TEMPLATE, REIMU)
    assert "- Character: Hakurei Reimu\n" in prompt and "- Series: Touhou\n" in prompt
    assert "- Artist: @ke-ta\n" in prompt and "- Tags: 1girl, red bow\n" in prompt
    assert "no lists" in prompt and "no markdown" in prompt
    assert (
        first_instruction(REIMU)
        == 'Start the first sentence with "An illustration of Hakurei Reimu from Touhou".'
    )


def test_opening_for_several_characters_a_series_only_or_nothing():
    two = Grounding(characters=("hakurei reimu", "kirisame marisa"), series=("touhou",))
    assert "An illustration of Hakurei Reimu and Kirisame Marisa from Touhou" in first_instruction(two)
    no_series = Grounding(characters=(r"saber \(fate\)",))
    assert first_instruction(no_series) == 'Start the first sentence with "An illustration of Saber".'
    assert '"An illustration from Blue Archive showing"' in first_instruction(
        Grounding(series=("blue archive",))
    )
    nothing = render_prompt(DEFAULT_NL_TEMPLATE, Grounding(tags=("no humans", "scenery")))
    assert "- Character: none\n" in nothing and "- Series: unknown\n" in nothing
    assert "followed by the main subject" in nothing and "An illustration of none" not in nothing


def test_custom_template_keeps_other_braces():
    assert render_prompt('Caption {characters} as JSON like {"text": "..."}', REIMU) == (
        'Caption Hakurei Reimu as JSON like {"text": "..."}'
    )
    with pytest.raises(ConfigError, match="empty"):
        render_prompt("  ", REIMU)


@pytest.mark.parametrize(
    "tag, name",
    [
        ("hakurei reimu", "Hakurei Reimu"),
        (r"saber \(fate\)", "Saber"),
        ("fate (series)", "Fate"),
        ("sousou no frieren", "Sousou no Frieren"),
        ("goddess of victory: nikke", "Goddess of Victory: Nikke"),
        ("kantai_collection", "Kantai Collection"),
        ("@ke-ta", "@ke-ta"),
    ],
)
def test_display_names(tag, name):
    assert display_name(tag) == name


def test_grounding_from_tag_rules_parts_and_from_a_caption_file():
    res = TagResult(
        ("general", 0.9), [("saber (fate)", 0.9)], [("solo", 0.9), ("1girl", 0.9), ("@ke-ta", 0.5)]
    )
    grounding = Grounding.from_parts(caption_parts(res, TagRules(template="anima")))
    assert grounding == Grounding((r"saber \(fate\)",), (r"fate \(series\)",), ("@ke-ta",), ("1girl", "solo"))
    assert "An illustration of Saber from Fate" in first_instruction(grounding)

    tags = ["ohwx", "1girl", "hakurei reimu", "touhou", "@ke-ta", "smile", "masterpiece"]
    grounding = Grounding.from_tags(
        tags, characters=["hakurei reimu"], series=["touhou"], ignore=["ohwx", "masterpiece"]
    )
    assert grounding == Grounding(("hakurei reimu",), ("touhou",), ("@ke-ta",), ("1girl", "smile"))


# --- post-processing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, truncated, cleaned",
    [
        ("A girl smiles.  She waves.\n", False, "A girl smiles. She waves."),
        ('"A girl smiles."', False, "A girl smiles."),
        ("\u201cA girl smiles.\u201d", False, "A girl smiles."),
        ("**An illustration** of _Reimu_.", False, "An illustration of _Reimu_."),
        ("## Caption\n- A girl smiles.\n- She waves.", False, "Caption A girl smiles. She waves."),
        ("1. A girl smiles.\n2. She waves.", False, "A girl smiles. She waves."),
        ("```\nA girl smiles.\n```", False, "A girl smiles."),
        ("Sure! Here's a caption: A girl smiles.", False, "A girl smiles."),
        ("Here is the description:\nA girl smiles.", False, "A girl smiles."),
        ("A girl smiles. She waves at the", True, "A girl smiles."),
        ('"A girl smiles. She waves at the', True, "A girl smiles."),
        ("A girl smiles. She waves at the", False, "A girl smiles. She waves at the"),
        ("A girl smiles! Does she? Yes. And then", True, "A girl smiles! Does she? Yes."),
        ("A girl stands by the", True, "A girl stands by the"),  # nothing finished: kept
        ("A girl\x00 smiles\x07.", False, "A girl smiles."),
    ],
)
def test_clean_caption(raw, truncated, cleaned):
    assert clean_caption(raw, truncated) == cleaned


# --- in-process backend on a tiny random Qwen2-VL ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A Qwen2-VL with random weights, a byte-level BPE tokenizer and a chat template, built
    offline. Output logits for all tokens but letters, space and '.' are zeroed so that greedy
    decoding writes printable text and never stops early."""
    import torch
    import transformers
    from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-qwen2-vl")
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "a"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    special = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
    chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=32 * 32
    )

    # Save through the images-only processor (no torchvision here), under the real class name.
    base = transformers.Qwen2VLProcessor
    attributes = [a for a in base.get_attributes() if a != "video_processor"]
    images_only = type(
        "Qwen2VLProcessor", (base,), {"get_attributes": classmethod(lambda cls: list(attributes))}
    )
    images_only(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    ).save_pretrained(folder)

    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": None,
        },
        vision_config={
            "depth": 1,
            "embed_dim": 16,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    printable = [vocab[ch] for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZĠ."]
    with torch.no_grad():
        keep = torch.zeros(len(tokenizer), dtype=torch.bool)
        keep[printable] = True
        model.lm_head.weight[~keep] = 0.0
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    return folder


def test_transformers_backend_captions_a_batch(tiny_vlm):
    import importlib.util

    backend = TransformersVLMBackend(tiny_vlm, max_new_tokens=6, batch_size=3)
    images = [
        Image.new("RGB", (40, 30), (200, 10, 10)),
        Image.new("RGB", (30, 50), (10, 200, 10)),
        Image.new("RGB", (32, 32)),
    ]
    prompts = [render_prompt(DEFAULT_NL_TEMPLATE, REIMU), "Describe the image.", "Describe it."]
    batch = backend.caption(images, prompts)
    assert len(batch) == 3 and all(
        isinstance(r, RawCaption) and isinstance(r.text, str) and r.text for r in batch
    )
    assert all(r.truncated for r in batch)  # eos is never chosen, so all six tokens were used
    singles = [backend.caption([image], [prompt])[0] for image, prompt in zip(images, prompts)]
    assert [r.text for r in batch] == [r.text for r in singles]  # left padding changes nothing
    if importlib.util.find_spec("torchvision") is None:
        assert "video_processor" not in type(backend._processor).get_attributes()
    assert type(backend._processor).__name__ == "Qwen2VLProcessor"


def test_transformers_backend_in_a_folder_run(tiny_vlm, tmp_path):
    paths = make_images(tmp_path, 3, size=(40, 40))
    backend = TransformersVLMBackend(tiny_vlm, max_new_tokens=12, batch_size=2)
    done = []
    report = caption_images(items_for(paths), backend, progress=lambda d, t: done.append(d))
    assert not report.errors and len(report.written) == 3
    assert done == [0, 2, 3]
    assert all(nl_caption_path(p).read_text().strip() for p in paths)


def test_transformers_backend_missing_model_is_a_clear_error(tmp_path):
    from studio.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="cannot load the captioning model"):
        TransformersVLMBackend(tmp_path / "nowhere").load()
