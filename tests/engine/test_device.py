"""`--device`: a clear error for a device this machine or optiserve cannot use, before any model is loaded."""

import pytest
import torch

from optiserve.engine.config import EngineConfig
from optiserve.server.cli import main


@pytest.mark.parametrize(("device", "message"), [("gpu0", "unknown device"), ("meta", "runs on cpu or cuda")])
def test_unknown_devices_are_refused(device, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(device=device)


def test_cuda_without_a_gpu_is_a_clear_cli_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU build of torch (CI)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--device", "cuda"])
    assert "torch sees no CUDA GPU" in str(e.value.code)


def test_speculation_on_a_gpu_is_refused():
    with pytest.raises(ValueError, match="CPU engine only"):
        EngineConfig(device="cuda", speculative="ngram")
