"""kohya's max_token_length for SDXL training: a caption longer than one CLIP window is encoded
in 75-token chunks the way generation encodes a prompt, so the tags past token 75 train too."""

import pytest
import torch

from studio.generation.conditioning import caption_chunk_ids, chunk_prompt
from studio.models.demo import build_demo_sdxl_pipeline
from studio.training.sdxl import SDXLTrainingModel
from tests.train_fixtures import fast_config

LONG = ", ".join(f"tag{i} word{i}" for i in range(12))  # about 100 tokens: two windows


@pytest.fixture(scope="module")
def pipe():
    return build_demo_sdxl_pipeline(0)


def model(pipe, tmp_path, tokens):
    return SDXLTrainingModel(pipe, fast_config(tmp_path, max_token_length=tokens), torch.device("cpu"), torch.float32)


def test_long_captions_keep_their_tail_with_150_tokens(pipe, tmp_path):
    assert len(chunk_prompt(pipe.tokenizer, LONG).ids) >= 2, "the caption needs two windows"
    changed_tail = LONG + ", red hair"
    short = model(pipe, tmp_path, 75)
    states, pooled = short.encode_text([LONG, changed_tail])
    assert states.shape[:2] == (2, 77) and pooled.shape[0] == 2
    assert torch.equal(states[0], states[1]), "75 tokens: the tail is cut, as before"
    long = model(pipe, tmp_path, 150)
    states, pooled = long.encode_text([LONG, changed_tail, "1girl"])
    assert states.shape[:2] == (3, 154) and pooled.shape[0] == 3
    assert not torch.equal(states[0], states[1]), "150 tokens: the tail reaches the model"
    assert torch.equal(pooled[0], pooled[1]), "pooled from the first window, as in generation"


def test_the_chunks_are_generations_chunks(pipe):
    """Windows split where generation splits the same text (at a comma), padded to the count."""
    generation = chunk_prompt(pipe.tokenizer, LONG).ids
    training = caption_chunk_ids(pipe.tokenizer, LONG, 3)
    assert training[:len(generation)] == generation and len(training) == 3
    assert training[len(generation):] == chunk_prompt(pipe.tokenizer, "").ids * (3 - len(generation))
    assert caption_chunk_ids(pipe.tokenizer, LONG, 1) == generation[:1]


def test_kohya_configs_bring_their_max_token_length(tmp_path):
    from studio.errors import ConfigError
    from studio.training.kohya_import import import_kohya_file

    path = tmp_path / "k.toml"
    path.write_text("max_token_length = 225\n")
    assert import_kohya_file(path).values["max_token_length"] == 225
    path.write_text("max_token_length = 100\n")
    with pytest.raises(ConfigError, match="max_token_length = 100: 100: sd-scripts takes 75, 150 or 225"):
        import_kohya_file(path)


def test_a_run_with_150_tokens_trains_from_cached_text(tmp_path, demo_models_dir):
    from tests.test_training import run
    from tests.train_fixtures import make_dataset

    dataset = make_dataset(tmp_path / "data", count=2)
    for caption in dataset.glob("*.txt"):
        caption.write_text(LONG)
    config = fast_config(dataset, max_train_steps=2, max_token_length=150, cache_text_encoder_outputs=True,
                         train_batch_size=1)
    result = run(config, tmp_path, demo_models_dir)
    assert result.status == "done" and (result.run_dir / "loras" / "lora.safetensors").is_file()


def test_a_run_started_before_a_setting_existed_still_resumes():
    """Its saved fingerprint lacks the new key: the default is what it used, not a change."""
    from studio.training.config import TrainConfig, changed_settings

    now = TrainConfig().resume_fingerprint()
    older = {key: value for key, value in now.items() if key != "max_token_length"}
    assert changed_settings(older, now) == []
    assert changed_settings(older, {**now, "max_token_length": 150}) == ["max_token_length: 75 -> 150"]
