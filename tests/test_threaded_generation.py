"""Several threads generating with one model at once, as `vision-gpt app --concurrency N` does."""

import threading

import pytest
import torch
from torch import nn

from vision_gpt.modeling.packed_linear_vision_gpt import packed_linear_available, packed_linears

from .conftest import random_images, tiny_model

pytestmark = pytest.mark.skipif(not packed_linear_available(), reason="oneDNN's packed linear kernel is not here")


def test_threads_entering_packed_linears_at_once_swap_the_layers_once_and_restore_them(processor):
    model = tiny_model()
    inputs = processor(images=random_images(1, seed=4))
    expected = model.generate(**inputs, max_new_tokens=6)
    gelus = sum(isinstance(module, nn.GELU) or "GELU" in type(module).__name__ for module in model.modules())
    assert gelus > 0

    # Both threads meet where the swap walks the model's modules. Unguarded, each arrives there having read depth 0,
    # so both swap and the count goes wrong; guarded, the second waits for the lock instead, and the meeting times out.
    meet, plain_modules = threading.Barrier(2, timeout=1), model.modules

    def modules(*args, **kwargs):
        try:
            meet.wait()
        except threading.BrokenBarrierError:
            pass
        return plain_modules(*args, **kwargs)

    model.modules = modules  # this test's own model: an instance attribute shadows the method
    both_inside, errors = threading.Barrier(2, timeout=10), []

    def generate_inside_a_block():
        try:
            with torch.no_grad(), packed_linears(model):
                both_inside.wait()
                assert torch.equal(model.generate(**inputs, max_new_tokens=6), expected)
        except Exception as error:  # reported below: an assert in a thread would not fail the test
            errors.append(error)

    threads = [threading.Thread(target=generate_inside_a_block) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    del model.modules
    assert errors == []
    assert model._vision_gpt_packed_depth == 0
    assert not any("forward" in module.__dict__ for module in model.modules()), "packed forwards left behind"
    assert not any(isinstance(module, nn.Identity) for module in model.modules()), "an MLP lost its GELU"
    assert sum(isinstance(module, nn.GELU) or "GELU" in type(module).__name__ for module in model.modules()) == gelus
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, use_packed_linears=False), expected)
