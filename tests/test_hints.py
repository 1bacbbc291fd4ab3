"""Engine errors carry a hint apart from the message; each front end words it."""

import pytest

from glmrepl.engine.errors import DeviceError, GlmreplError, Hint
from glmrepl.repl.hints import explain, flag_words, slash_words


def test_one_error_worded_for_the_repl_the_command_line_and_plainly():
    error = DeviceError("gpu mode needs a CUDA GPU", Hint("device", "cpu"))
    assert explain(error, slash_words) == "gpu mode needs a CUDA GPU: use /device cpu"
    assert explain(error, flag_words) == "gpu mode needs a CUDA GPU: use --device cpu"
    assert str(error) == "gpu mode needs a CUDA GPU: use device cpu"
    assert error.message == "gpu mode needs a CUDA GPU"


def test_settings_and_errors_without_hints():
    more = Hint("setting", "max_new_tokens", "raise {}")
    assert more.worded(slash_words) == "raise /set max_new_tokens"
    assert more.worded(flag_words) == "raise --max-new-tokens"
    assert explain(GlmreplError("plain"), flag_words) == "plain"
    assert explain(ValueError("not ours"), flag_words) == "not ours"


def test_the_engine_words_no_front_end(cpu_only_machine):
    from glmrepl.engine.devices.modes import plan_placement

    with pytest.raises(DeviceError) as raised:
        plan_placement("gpu")
    assert "/device" not in str(raised.value) and "--device" not in str(raised.value)
    assert raised.value.hint == Hint("device", "cpu")
