"""config.toml: bad entries are one warning naming the file, the key and the valid values; the command line wins."""

import pytest

from glmrepl.cli.main import build_app, build_parser, main
from glmrepl.repl.config import load_config


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """Write ``$XDG_CONFIG_HOME/glmrepl/config.toml`` and return its path."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    path = tmp_path / "config-home" / "glmrepl" / "config.toml"
    path.parent.mkdir(parents=True)

    def write(text: str):
        path.write_text(text, encoding="utf-8")
        return path

    return write


def app_for(argv):
    return build_app(build_parser().parse_args(argv), load_config())


def test_a_bad_value_is_a_warning_naming_file_key_and_range_not_a_usage_error(config_file, gpt2_checkpoint, capsys):
    path = config_file('[generation]\nmax_new_tokens = "lots"\n')
    status = main([str(gpt2_checkpoint), "--device", "cpu", "--max-new-tokens", "2", "-p", "hello"])
    err = capsys.readouterr().err
    assert status == 0
    assert [line for line in err.splitlines() if line.startswith("warning")] == [
        f'warning: {path}: [generation] max_new_tokens must be an integer from 1 to 1000000, not "lots"; using 512'
    ]
    assert "usage:" not in err


def test_every_kind_of_bad_entry_is_named(config_file):
    path = config_file(
        '[ui]\nstats = "yes"\nhistory = 1\n[model]\ndevice = "gpux"\ncolour = "red"\n'
        "[generation]\nmax_new_tokens = 0\n[server]\nport = 1\n"
    )
    assert load_config().problems == [
        f'{path}: [ui] stats must be true or false, not "yes"; using true',
        f"{path}: [ui] history must be true or false, not 1; using true",
        f'{path}: [model] device must be one of cpu, gpu, sharded, auto, not "gpux"; using "auto"',
        f"{path}: [model] unknown key colour ignored (keys: models_dir, device, dtype)",
        f"{path}: [generation] max_new_tokens must be an integer from 1 to 1000000, not 0; using 512",
        f"{path}: unknown section [server] ignored (sections: ui, model, generation)",
    ]
    app = app_for([])
    assert app.settings.get("max_new_tokens") == 512 and app.options.mode == "auto"


def test_the_command_line_beats_the_file_and_the_file_beats_the_defaults(config_file):
    config_file('[generation]\nmax_new_tokens = 64\n[ui]\nstats = false\n[model]\ndevice = "cpu"\ndtype = "bfloat16"\n')
    app = app_for([])
    assert (app.settings.get("max_new_tokens"), app.settings.source("max_new_tokens")) == (64, "config file")
    assert app.settings.get("stats") is False and (app.options.mode, app.options.dtype) == ("cpu", "bfloat16")
    app = app_for(["--max-new-tokens", "7", "--device", "auto", "--dtype", "float32"])
    assert (app.settings.get("max_new_tokens"), app.settings.source("max_new_tokens")) == (7, "command line")
    assert (app.options.mode, app.options.dtype) == ("auto", "float32")


def test_a_bad_command_line_value_is_still_a_usage_error(config_file, capsys):
    config_file("[generation]\nmax_new_tokens = 64\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--max-new-tokens", "0", "-p", "hi"])
    assert exit_info.value.code == 2
    assert "max_new_tokens must be an integer from 1 to 1000000, not 0" in capsys.readouterr().err


def test_a_key_outside_its_section_is_named_with_the_section_it_belongs_under(config_file):
    path = config_file('max_new_tokens = "lots"\ndevice = "cpu"\n[ui]\nstats = false\n')
    assert load_config().problems == [
        f"{path}: max_new_tokens ignored: it belongs under [generation]",
        f"{path}: device ignored: it belongs under [model]",
    ]
    app = app_for([])
    assert app.settings.get("max_new_tokens") == 512 and app.settings.get("stats") is False
