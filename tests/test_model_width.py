"""Width-scaled registry entries: the base architecture with every channel count scaled, so the cost
model, the planner, the width routine, ProFL's blocks and DepthFL's exits treat them as any model."""

import pytest
import torch

from fl_app.cost import model_cost
from fl_app.models import ModelSpec, block_outputs, build_model, full_widths, num_blocks, num_parameters
from fl_app.width import fit_ratio, uniform_widths

SCALED = {"resnet18-w0.5": ("resnet18", 0.5), "resnet18-w0.25": ("resnet18", 0.25),
          "vgg16-w0.5": ("vgg16", 0.5), "vgg16-w0.25": ("vgg16", 0.25)}
SHAPE = (3, 32, 32)


def base_at_width(name: str) -> ModelSpec:
    """The base model with every group at the scaled entry's width."""
    base, _ = SCALED[name]
    return ModelSpec(base).with_widths(full_widths(name))


@pytest.mark.parametrize("name", SCALED)
def test_a_width_scaled_model_is_its_base_with_every_channel_count_scaled(name):
    base, width = SCALED[name]
    assert full_widths(name) == {g: round(c * width) for g, c in full_widths(base).items()}
    assert num_blocks(name) == num_blocks(base)
    assert [g for g, _ in block_outputs(name)] == [g for g, _ in block_outputs(base)]
    scaled, reference = build_model(ModelSpec(name)), build_model(base_at_width(name))
    assert {k: v.shape for k, v in scaled.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    # Parameters scale with the width's square (the first conv's 3 inputs and the classes do not).
    assert 0.9 * width**2 < num_parameters(scaled) / num_parameters(build_model(ModelSpec(base))) < 1.1 * width**2


@pytest.mark.parametrize("name", SCALED)
def test_the_cost_model_prices_it_exactly_as_its_base_at_that_width(name):
    assert model_cost(ModelSpec(name), SHAPE) == model_cost(base_at_width(name), SHAPE)
    half = model_cost(ModelSpec(SCALED[name][0]).with_widths({g: c // 2 for g, c in full_widths(name).items()}), SHAPE)
    assert model_cost(ModelSpec(name), SHAPE).peak_train_bytes(64, SHAPE) > half.peak_train_bytes(64, SHAPE)


@pytest.mark.parametrize("name", SCALED)
def test_the_width_routine_finds_the_widest_submodel_under_a_budget(name):
    spec = ModelSpec(name)
    budget = model_cost(spec, SHAPE).peak_train_bytes(32, SHAPE) * 0.5

    def fits(cost):
        return cost.peak_train_bytes(32, SHAPE) <= budget

    ratio = fit_ratio(spec, SHAPE, fits, 0.05)
    assert ratio is not None and 0.05 < ratio < 1
    assert fits(model_cost(spec.with_widths(uniform_widths(spec)(ratio)), SHAPE))
    assert not fits(model_cost(spec.with_widths(uniform_widths(spec)(min(1.0, ratio + 0.01))), SHAPE))


@pytest.mark.parametrize("name", SCALED)
def test_profl_blocks_and_depthfl_exits_build_at_every_depth(name):
    x = torch.randn(2, *SHAPE)
    for depth in range(1, num_blocks(name) + 1):
        profl_step, depthfl = ModelSpec(name).with_depth(depth), ModelSpec(name, exits=True).with_depth(depth)
        assert build_model(profl_step)(x).shape == (2, 10)
        model = build_model(depthfl)
        assert model.exit_logits(x).shape == (depth, 2, 10)
        assert model_cost(depthfl, SHAPE).params == num_parameters(model)
