import pytest

from glmrepl.engine.request import SamplingParams
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
    assert settings.get("top_p") == 0.8 and settings.source("top_p") == "family"
    assert settings.get("temperature") == 0.3 and settings.source("temperature") == "checkpoint"
    settings.set("top_p", "0.95")
    assert settings.get("top_p") == 0.95 and settings.source("top_p") == "/set"
    settings.set_model_defaults({}, {})  # another model: its own layer only
    assert settings.get("temperature") == SETTINGS["temperature"].default


def test_temperature_zero_means_greedy_and_clears_sampling_flags():
    settings = Settings({"temperature": 0})
    kwargs = SamplingParams.from_settings(settings).generate_kwargs()
    assert kwargs["do_sample"] is False
    assert kwargs["temperature"] is None and kwargs["top_p"] is None
    settings.set("temperature", "0.7")
    kwargs = SamplingParams.from_settings(settings).generate_kwargs()
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.7


def test_the_file_and_the_command_line_sit_between_the_model_and_set():
    settings = Settings(
        {"seed": 1}, defaults={"max_new_tokens": 512}, config_file={"top_p": 0.5, "top_k": 3}, command_line={"top_k": 7}
    )
    settings.set_model_defaults({"top_p": 0.6, "repetition_penalty": 1.2}, {"temperature": 0.8})
    assert {key: (settings.get(key), settings.source(key)) for key in SETTINGS} == {
        "max_new_tokens": (512, "default"),
        "temperature": (0.8, "family"),
        "top_p": (0.5, "config file"),
        "top_k": (7, "command line"),
        "repetition_penalty": (1.2, "checkpoint"),
        "seed": (1, "/set"),
        "do_sample": (True, "default"),
        "stats": (True, "default"),
    }
    assert settings.user == {"seed": 1} and settings.chosen() == {"top_p": 0.5, "top_k": 7, "seed": 1}


def test_set_lists_where_each_value_comes_from(tmp_path, monkeypatch, copy_checkpoint):
    import json
    from pathlib import Path

    from glmrepl.cli.main import build_app, build_parser
    from glmrepl.repl.commands import TABLE
    from glmrepl.repl.config import load_config

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    checkpoint = copy_checkpoint(Path(__file__).parent / "data" / "chatglm" / "chatglm2-tiny")
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    (checkpoint / "generation_config.json").write_text(json.dumps({**generation, "repetition_penalty": 1.1}))

    def sources(app) -> dict[str, str]:
        return {row[0]: row[2] for row in TABLE.dispatch(app, "/set").rows}

    fresh = build_app(build_parser().parse_args([]), load_config())
    assert set(sources(fresh).values()) == {"default"}  # nothing is "set" in a fresh session

    (tmp_path / "config-home" / "glmrepl").mkdir(parents=True)
    (tmp_path / "config-home" / "glmrepl" / "config.toml").write_text("[generation]\nmax_new_tokens = 64\n")
    app = build_app(build_parser().parse_args(["--device", "cpu", "--top-k", "5"]), load_config())
    app.manager.load(app.load_request(str(checkpoint)))
    TABLE.dispatch(app, "/set seed 3")
    assert sources(app) == {
        "max_new_tokens": "config file",
        "temperature": "family",
        "top_p": "family",
        "top_k": "command line",
        "repetition_penalty": "checkpoint",
        "seed": "/set",
        "do_sample": "family",
        "stats": "default",
    }


@pytest.mark.parametrize("typed", ["-1", " -1", "11", "1e3"])
def test_an_out_of_range_value_is_quoted_as_typed(typed):
    from glmrepl.engine.settings import SETTINGS

    with pytest.raises(ValueError) as refused:
        SETTINGS["temperature"].parse(typed)
    assert str(refused.value) == f"temperature must be a number from 0 to 10, not {typed.strip()}"


def test_counts_are_spelled_in_the_singular_for_one():
    from glmrepl.common.units import counted

    assert [counted(n, "turn") for n in (0, 1, 2, 1000)] == ["0 turns", "1 turn", "2 turns", "1,000 turns"]
    assert counted(1, "reply", "replies") == "1 reply" and counted(3, "reply", "replies") == "3 replies"
