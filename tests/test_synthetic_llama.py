"""benchmarks/synthetic_llama.py: the checkpoints bench-scale measures have the shapes of the models they stand for."""

import pytest
import torch

from benchmarks.synthetic_llama import SHAPES, config_for, make_tensor, tensor_shapes
from ramp.models import hf_check


class Bad(Exception):
    pass


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_tensor_is_what_transformers_builds_for_the_config(shape):
    config, arch = hf_check.config_from_dict(config_for(shape), shape, Bad)
    assert arch.gguf_arch == "llama"
    from ramp.models.sanity import expected_shapes

    assert dict(tensor_shapes(config_for(shape))) == expected_shapes(config)


def test_llama_2_7b_parameter_count_and_seeded_tensors():
    n = sum(torch.Size(s).numel() for _, s in tensor_shapes(config_for("7B")))
    assert n == 6_738_415_616  # Llama-2-7B's published parameter count
    a, b = make_tensor("x.weight", (64, 32), 0), make_tensor("x.weight", (64, 32), 0)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert not torch.equal(a, make_tensor("x.weight", (64, 32), 1))
    assert not torch.equal(a, make_tensor("y.weight", (64, 32), 0))
    assert 0.015 < float(make_tensor("z.weight", (256, 256), 0).float().std()) < 0.025
