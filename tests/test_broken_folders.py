"""Every broken checkpoint folder: a one-line error naming the file, and the REPL carries on.

Each case breaks a copy of a good checkpoint the way downloads really break,
then tries to switch to it from a running conversation.
"""

import json
import shutil

import pytest
from support import drive_repl, loaded_app

ENTER = "\r"
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 123456\n".format("0" * 64)


def missing_shard(folder):
    next(folder.glob("model-00002-*.safetensors")).unlink()


def lfs_pointer_shard(folder):
    next(folder.glob("model-00001-*.safetensors")).write_text(LFS_POINTER)


def truncated_shard(folder):
    shard = next(folder.glob("model-00001-*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def only_tensorflow_weights(folder):
    for shard in folder.glob("model*.safetensors*"):
        shard.unlink()
    (folder / "tf_model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)


def corrupt_bin(folder):
    (folder / "pytorch_model.bin").write_bytes(b"this is not a pickle or a zip archive")


CASES = {
    "missing folder": (None, lambda folder: shutil.rmtree(folder), ["does not exist"]),
    "no config.json": (None, lambda folder: (folder / "config.json").unlink(), ["config.json is missing"]),
    "invalid config JSON": (
        None,
        lambda folder: (folder / "config.json").write_text('{"model_type": '),
        ["config.json is not valid JSON (line 1"],
    ),
    "unknown architecture": (
        None,
        edit_config(model_type="warpdrive", architectures=["WarpDriveForCausalLM"]),
        ["model type 'warpdrive' is not known to transformers"],
    ),
    "custom code without trust": (
        None,
        edit_config(model_type="warpdrive", auto_map={"AutoModelForCausalLM": "modeling_warp.WarpLM"}),
        ["--trust-remote-code"],
    ),
    "no tokenizer": (None, lambda folder: (folder / "tokenizer.json").unlink(), ["has no tokenizer files"]),
    "bad tokenizer_config": (
        None,
        lambda folder: (folder / "tokenizer_config.json").write_text("{nope"),
        ["tokenizer_config.json is not valid JSON"],
    ),
    "missing shard": (None, missing_shard, ["listed in model.safetensors.index.json but missing", "incomplete"]),
    "LFS pointer": (None, lfs_pointer_shard, ["git-LFS pointer", "git lfs pull"]),
    "truncated safetensors": (None, truncated_shard, ["truncated"]),
    "TensorFlow weights only": (None, only_tensorflow_weights, ["tf_model.h5", "TensorFlow"]),
    "corrupt pytorch_model.bin": ("gpt2", corrupt_bin, ["pytorch_model.bin", "not PyTorch weights"]),
    "config of another size": (
        None,
        lambda folder: edit_config(hidden_size=2 * json.loads((folder / "config.json").read_text())["hidden_size"])(
            folder
        ),
        ["does not match the weights", "model.embed_tokens.weight as [", "hidden_size"],
    ),
    "a size written as text": (
        None,
        edit_config(num_hidden_layers="2"),
        ["num_hidden_layers must be a positive whole number, not '2'"],
    ),
    "config of another size, pickled": (
        "gpt2",
        edit_config(n_embd=48),
        ["another shape than config.json makes it", "download it again"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_folder_gives_one_line_and_the_conversation_survives(
    case, qwen_checkpoint, gpt2_checkpoint, copy_checkpoint
):
    source, breaker, expected = CASES[case]
    broken = copy_checkpoint(gpt2_checkpoint if source == "gpt2" else qwen_checkpoint)
    breaker(broken)
    app = loaded_app(qwen_checkpoint)
    out = drive_repl(app, "hello" + ENTER + f"/model {broken}" + ENTER + "are you still there?" + ENTER)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for fragment in expected:
        assert fragment in errors[0]
    assert app.manager.current.info.path == qwen_checkpoint
    assert app.session.turns == 2 and app.session.messages[-1].role == "assistant"


def test_pickled_weights_are_loaded_with_weights_only(gpt2_checkpoint, copy_checkpoint):
    """A .bin that would run code when unpickled is refused, not executed."""
    import pickle

    import torch

    folder = copy_checkpoint(gpt2_checkpoint)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(folder / 'PWNED')!r}, 'w').write('pwned')",))

    state["evil"] = Payload()
    with open(folder / "pytorch_model.bin", "wb") as handle:
        torch.save(state, handle, pickle_module=pickle)
    from support import make_app

    from glmrepl.engine.errors import GlmreplError

    app = make_app()
    with pytest.raises(GlmreplError):
        app.manager.load(app.load_request(str(folder)))
    assert not (folder / "PWNED").exists()
