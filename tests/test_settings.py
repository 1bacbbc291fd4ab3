import pytest

from glmrepl.engine.settings import SETTINGS, Settings


def test_parse_rejects_out_of_range_with_the_valid_range():
    with pytest.raises(ValueError, match=r"top_p must be a number from 0 to 1, not 1.5"):
        Settings().set("top_p", "1.5")
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer from 1"):
        Settings().set("max_new_tokens", "lots")


def test_bool_and_seed_values():
    settings = Settings()
    assert settings.set("do_sample", "off") is False
    assert settings.set("seed", "none") is None
    assert settings.set("seed", "42") == 42
    with pytest.raises(ValueError, match="on or off"):
        settings.set("stats", "maybe")


def test_layers_user_beats_family_beats_checkpoint_beats_default():
    settings = Settings()
    assert settings.get("top_p") == SETTINGS["top_p"].default
    settings.set_model_defaults({"top_p": 0.5, "temperature": 0.3}, {"top_p": 0.8})
    assert settings.get("top_p") == 0.8 and settings.source("top_p") == "model"
    assert settings.get("temperature") == 0.3
    settings.set("top_p", "0.95")
    assert settings.get("top_p") == 0.95 and settings.source("top_p") == "set"
    settings.set_model_defaults({}, {})  # another model: its own layer only
    assert settings.get("temperature") == SETTINGS["temperature"].default


def test_temperature_zero_means_greedy_and_clears_sampling_flags():
    settings = Settings({"temperature": 0})
    kwargs = settings.generation_kwargs()
    assert kwargs["do_sample"] is False
    assert kwargs["temperature"] is None and kwargs["top_p"] is None
    settings.set("temperature", "0.7")
    kwargs = settings.generation_kwargs()
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.7
