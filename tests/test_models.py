"""Models: every architecture is a block sequence, buildable at any width, for 28x28 and 32x32."""

import pytest
import torch

from fl_app.models import MODEL_NAMES, ModelSpec, build_model, full_widths, num_parameters

EXPECTED_BLOCKS = {"cnn": 3, "resnet18": 4, "resnet34": 4, "vgg11": 5, "vgg16": 5,
                   "vgg11-fc4096": 5, "vgg16-fc4096": 5, "resnet18-w0.5": 4, "resnet18-w0.25": 4,
                   "vgg16-w0.5": 5, "vgg16-w0.25": 5}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_classifies_both_input_sizes(name, shape):
    model = build_model(ModelSpec(name, num_classes=7, in_channels=shape[0]))
    assert model(torch.randn(2, *shape)).shape == (2, 7)
    assert len(model.blocks) == EXPECTED_BLOCKS[name]


def test_vgg16_with_4096_classifier_is_the_papers_128_4_mb():
    model = build_model(ModelSpec("vgg16-fc4096", 10, 3))
    megabytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point()) / 2**20
    assert round(megabytes, 1) == 128.4
    assert 33.6e6 < num_parameters(model) < 33.7e6


def test_resnet18_has_the_cifar_parameter_count():
    assert 11.1e6 < num_parameters(build_model(ModelSpec("resnet18"))) < 11.2e6


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reduced_width_builds_a_smaller_model_that_runs(name):
    spec = ModelSpec(name)
    half = spec.with_widths({g: max(1, c // 2) for g, c in full_widths(name).items()})
    small, full = build_model(half), build_model(spec)
    assert num_parameters(small) < 0.3 * num_parameters(full)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_spec_round_trips_through_json():
    spec = ModelSpec("resnet18", 100, 1, {"stage1": 17})
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_unknown_model_and_bad_widths_are_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match="valid models: cnn"):
        build_model(ModelSpec("resnet50"))
    with pytest.raises(ValueError, match="no width groups"):
        build_model(ModelSpec("cnn", widths={"conv9": 3}))
    with pytest.raises(ValueError, match="positive integer"):
        build_model(ModelSpec("cnn", widths={"conv1": 0}))
