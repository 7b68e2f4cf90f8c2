"""`opd.run.parallel` in one process: what it refuses, and that it leaves unwrapped models alone
(the two-process behaviour is in tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from opd.errors import OPDError
from opd.run.parallel import decoder_layers, gathered, grad_norm, plain_class
from opd.runtime import is_wrapped
from tests.conftest import make_tokenizer
from tests.tiny_models import build_model


def test_a_model_without_named_decoder_layers_is_refused_with_its_name():
    with pytest.raises(OPDError, match=r"parallel: Sequential names no decoder layer class"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_decoder_layers_are_the_classes_the_model_names(name):
    model = build_model(name, make_tokenizer(), seed=0, tied=True)
    layers = decoder_layers(model)
    assert len(layers) == 2 and len({type(layer) for layer in layers}) == 1


def test_an_unwrapped_model_passes_through_unchanged():
    model = build_model("llama", make_tokenizer(), seed=0, tied=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with gathered(model), plain_class(model):
        assert type(model).__name__ == "LlamaForCausalLM"
    assert not is_wrapped(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert grad_norm(torch.tensor(2.5)) == 2.5


def test_a_full_disk_while_writing_the_sharded_optimizer_state_is_one_line(tmp_path, monkeypatch):
    import errno

    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from opd.run.checkpoints import save_sharded_optimizer, start_checkpoint

    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    start_checkpoint(tmp_path, 1)
    save_sharded_optimizer(tmp_path, 1, model, optimizer)  # writes alone, without a process group
    assert list((tmp_path / "checkpoints" / "step-000001.tmp" / "optimizer").glob("*.safetensors"))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", full_disk)
    start_checkpoint(tmp_path, 2)
    with pytest.raises(OPDError) as raised:
        save_sharded_optimizer(tmp_path, 2, model, optimizer)
    message = str(raised.value)
    assert "\n" not in message and "step 2" in message and "No space left on device" in message
    assert "--resume" in message


@pytest.mark.slow
def test_activation_checkpointing_in_one_process_keeps_the_curve(tiny_pair, tmp_path):
    """Recomputed layers give the same gradients (the scoring pass keeps no KV cache, which a
    recomputed layer would fill twice)."""
    from opd.metrics import read
    from opd.run.loop import run_training
    from tests.support import tiny_config

    run_training(tiny_config(tiny_pair, tmp_path / "plain", max_steps=2))
    run_training(tiny_config(tiny_pair, tmp_path / "checkpointed", max_steps=2,
                             activation_checkpointing=True))
    for a, b in zip(read(tmp_path / "plain"), read(tmp_path / "checkpointed"), strict=True):
        for key in ("loss", "grad_norm", "overlap_ratio"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
