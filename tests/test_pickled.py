import pickle

import torch

from glmrepl.engine.models.checkpoint import inspect_checkpoint
from glmrepl.engine.pickled import count_pickled_parameters, count_pickled_tensors


def test_counts_match_the_real_tensors(gpt2_checkpoint):
    state = torch.load(gpt2_checkpoint / "pytorch_model.bin", weights_only=True)
    distinct = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t.numel() for t in state.values()}
    assert count_pickled_parameters(gpt2_checkpoint / "pytorch_model.bin") == sum(distinct.values())
    assert inspect_checkpoint(gpt2_checkpoint).param_count == sum(distinct.values())


def test_shared_storage_is_counted_once(tmp_path):
    weight = torch.zeros(4, 3)
    torch.save({"a": weight, "tied": weight, "b": torch.zeros(5)}, tmp_path / "w.bin")
    assert count_pickled_parameters(tmp_path / "w.bin") == 17
    assert count_pickled_tensors(tmp_path / "w.bin") == 3  # the load progress counts each entry


def test_a_malicious_pickle_is_read_without_running_it(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    torch.save({"w": torch.zeros(2, 2), "evil": Payload()}, tmp_path / "w.bin", pickle_module=pickle)
    assert count_pickled_parameters(tmp_path / "w.bin") == 4
    assert not marker.exists()


def test_unreadable_files_give_none(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a zip")
    assert count_pickled_parameters(tmp_path / "junk.bin") is None
    assert count_pickled_tensors(tmp_path / "junk.bin") is None
