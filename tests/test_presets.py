"""Presets: sparse files merged over defaults, written as TOML that reads back equal, shipped
presets never overwritten, and the shipped caption presets valid."""

import tomllib

import pytest

from studio.captioning.nl_caption import check_template
from studio.errors import ConfigError
from studio.presets import SHIPPED_DIR, PresetStore, dumps_toml, merge, read_preset_file, sparse
from studio.ui.caption_form import caption_config, default_settings, load_caption_preset

DEFAULTS = {"tagger": "demo", "batch_size": 8, "rules": {"template": "animagine", "quality": [], "year": None,
                                                          "character_series": {}},
            "nl": {"backend": "none", "template": "Describe {tags}."}}


@pytest.fixture
def store(tmp_path):
    shipped = tmp_path / "shipped"
    (shipped / "caption").mkdir(parents=True)
    (shipped / "caption" / "anima.toml").write_text('[rules]\ntemplate = "anima"\n')
    return PresetStore("caption", user_root=tmp_path / "workspace" / "presets", shipped_root=shipped)


def test_merge_lays_tables_over_defaults_key_by_key():
    merged = merge(DEFAULTS, {"batch_size": 4, "rules": {"template": "anima", "character_series": {"a": "b"}}})
    assert merged["batch_size"] == 4 and merged["tagger"] == "demo"
    assert merged["rules"] == {"template": "anima", "quality": [], "year": None, "character_series": {"a": "b"}}
    assert merged["nl"] == DEFAULTS["nl"] and DEFAULTS["rules"]["template"] == "animagine", "defaults untouched"
    with pytest.raises(ConfigError, match=r"rules must be a table"):
        merge(DEFAULTS, {"rules": "anima"})
    with pytest.raises(ConfigError, match="batch_size must be a single value"):
        merge(DEFAULTS, {"batch_size": {"x": 1}})


def test_sparse_keeps_only_what_differs():
    values = merge(DEFAULTS, {"rules": {"template": "anima"}})
    assert sparse(values, DEFAULTS) == {"rules": {"template": "anima"}}
    assert sparse(DEFAULTS, DEFAULTS) == {}
    assert sparse({**DEFAULTS, "new": 1}, DEFAULTS) == {"new": 1}


@pytest.mark.parametrize("text", [
    'plain', 'with "quotes" and \\backslashes\\', "tab\there", "unicode ✓ 東方",
    "line one\nline two\n", "ends with a quote'\nsecond", "has ''' inside\nyes", "control \x01 char\nx",
    "windows\r\nlines", "{placeholder} and trailing space \n", "",
])
def test_toml_strings_read_back_exactly(text):
    data = {"s": text, "nested": {"key with spaces (and parens)": text}}
    assert tomllib.loads(dumps_toml(data)) == data


def test_toml_values_and_tables_read_back_equal():
    data = {"b": True, "i": -3, "f": 0.35, "big": 1e-7, "list": ["a", "b, c"], "empty": [], "nums": [1, 2.5],
            "rules": {"template": "anima", "character_series": {"saber (fate)": "fate (series)"}, "deep": {"x": 1}},
            "nl": {}, "only_tables": {"inner": {"y": "z"}}}
    text = dumps_toml(data)
    assert tomllib.loads(text) == data
    with pytest.raises(ConfigError, match="rules.year has no value"):
        dumps_toml({"rules": {"year": None}})


def test_store_lists_saves_and_loads_sparse_user_presets(store, tmp_path):
    assert store.names() == ["anima"]
    values = merge(DEFAULTS, {"batch_size": 2, "nl": {"template": "Line 1\nLine 2 {tags}"}})
    path = store.save("My char", values, DEFAULTS)
    assert path == tmp_path / "workspace" / "presets" / "caption" / "My char.toml"
    saved = tomllib.loads(path.read_text())
    assert saved == {"batch_size": 2, "nl": {"template": "Line 1\nLine 2 {tags}"}}, "only what differs"
    assert "'''" in path.read_text(), "multi-line text stays readable"
    assert sorted(p.name for p in path.parent.iterdir()) == ["My char.toml"], "no temporary file left"
    assert store.names() == ["anima", "My char"]
    assert store.load("My char", DEFAULTS) == values
    assert store.load("anima", DEFAULTS)["rules"]["template"] == "anima"
    store.save("My char", merge(DEFAULTS, {"batch_size": 3}), DEFAULTS)  # the user's own: replaced
    assert tomllib.loads(path.read_text()) == {"batch_size": 3}


def test_shipped_presets_are_never_overwritten(store):
    before = (store.shipped_dir / "anima.toml").read_bytes()
    for name in ("anima", "ANIMA"):
        with pytest.raises(ConfigError, match="shipped"):
            store.save(name, DEFAULTS, {})
    assert (store.shipped_dir / "anima.toml").read_bytes() == before
    assert not store.user_dir.exists()


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "x" * 65, "trailing."])
def test_unusable_names_are_refused(store, name):
    with pytest.raises(ConfigError, match="not usable"):
        store.save(name, DEFAULTS, {})


def test_unknown_and_broken_presets_say_what_is_wrong(store):
    with pytest.raises(ConfigError, match=r"no caption preset named 'nope' \(known: anima\)"):
        store.load("nope", DEFAULTS)
    store.user_dir.mkdir(parents=True)
    (store.user_dir / "broken.toml").write_text("rules = [unclosed")
    with pytest.raises(ConfigError, match="broken.toml"):
        store.load("broken", DEFAULTS)
    (store.user_dir / "empty.toml").write_text("")
    assert store.load("empty", DEFAULTS) == DEFAULTS


def test_yaml_presets_are_read(store):
    pytest.importorskip("yaml")
    store.user_dir.mkdir(parents=True)
    (store.user_dir / "yml.yaml").write_text("rules:\n  template: none\nbatch_size: 1\n")
    assert read_preset_file(store.user_dir / "yml.yaml") == {"rules": {"template": "none"}, "batch_size": 1}
    assert store.load("yml", DEFAULTS)["rules"]["template"] == "none"


@pytest.mark.parametrize("name", ["animagine", "anima"])
def test_shipped_caption_presets_are_valid_configs(tmp_path, name):
    store = PresetStore("caption", user_root=tmp_path)
    assert {"animagine", "anima"} <= set(store.names())
    values, unshown = load_caption_preset(store, name, default_settings(demo=True))
    assert unshown == [] and values["template"] == name and values["tagger"] == "demo-tagger"
    settings = store.load(name, default_settings(demo=False))
    config = caption_config(settings, "-")
    check_template(config.nl.template)
    assert config.rules.quality == ["masterpiece", "best quality"]
    assert (SHIPPED_DIR / "caption" / f"{name}.toml").is_file()


def test_anima_preset_has_its_own_nl_template(tmp_path):
    settings = PresetStore("caption", user_root=tmp_path).load("anima", default_settings(demo=False))
    assert "Anima" in settings["nl"]["template"] and "{opening}" in settings["nl"]["template"]
    assert settings["rules"]["escape"] is True
