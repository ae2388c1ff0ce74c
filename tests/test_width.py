"""The one routine that shrinks models: channel maps, slicing, scattering back."""

import pytest
import torch

from fl_app.models import MODEL_NAMES, ModelSpec, build_model
from fl_app.width import (channel_importance, full_map, param_axes, global_index, select_channels,
                          slice_state, widths_at_ratio)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sliced_state_loads_into_the_submodel_and_gives_the_same_outputs_as_masking(name):
    torch.manual_seed(0)
    spec = ModelSpec(name)
    model = build_model(spec).eval()
    widths = widths_at_ratio(spec, 0.5)
    keep = select_channels(model, widths)
    sub = build_model(spec.with_widths(widths)).eval()
    sub.load_state_dict(slice_state(model.state_dict(), param_axes(model), keep))
    assert sub(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_slicing_keeps_exactly_the_chosen_channels():
    model = build_model(ModelSpec("cnn"))
    keep = {"conv1": [0, 5, 9], "conv2": [1, 62], "fc1": [127]}
    sub = slice_state(model.state_dict(), param_axes(model), keep)
    full = model.state_dict()
    w1 = "blocks.0.0.weight"
    assert torch.equal(sub[w1], full[w1][[0, 5, 9]])
    w2 = "blocks.1.0.weight"
    assert torch.equal(sub[w2], full[w2][[1, 62]][:, [0, 5, 9]])
    # fc1 reads a flattened 4x4 map per conv2 channel: channel c owns features 16c..16c+15.
    fc1 = "blocks.2.2.weight"
    assert torch.equal(sub[fc1], full[fc1][[127]][:, list(range(16, 32)) + list(range(992, 1008))])
    fc2 = "blocks.2.4.weight"
    assert torch.equal(sub[fc2], full[fc2][:, [127]])


def test_magnitude_selection_keeps_the_largest_filters():
    model = build_model(ModelSpec("cnn"))
    with torch.no_grad():
        model.blocks[0][0].weight.mul_(0.01)
        model.blocks[0][0].weight[[3, 7]] *= 1000  # two filters now dominate conv1
    keep = select_channels(model, {"conv1": 2, "conv2": 64, "fc1": 128})
    assert keep["conv1"] == [3, 7]


def test_residual_stage_is_one_group_scored_over_all_its_layers():
    model = build_model(ModelSpec("resnet18"))
    scores = channel_importance(model)
    assert scores["stage2"].shape == (128,)
    # stage2's channels are produced by the two blocks' second convs and the shortcut.
    producers = [m for m in model.modules() if getattr(m, "width_axes", (None,))[0] == "stage2"
                 and not isinstance(m, torch.nn.BatchNorm2d)]
    assert len(producers) == 3


def test_first_k_selection_is_heterofl_width_scaling():
    model = build_model(ModelSpec("vgg11"))
    keep = select_channels(model, {"stage1.conv1": 3}, by="first")
    assert keep == {"stage1.conv1": [0, 1, 2]}


def test_global_index_puts_every_value_back_where_it_was_sliced_from():
    model = build_model(ModelSpec("resnet18"))
    axes = param_axes(model)
    spec = model.spec
    keep = select_channels(model, widths_at_ratio(spec, 0.25))
    sub = slice_state(model.state_dict(), axes, keep)
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in model.state_dict().items()}
    for name, value in sub.items():
        total[name][global_index(axes[name], keep, total[name].shape)] = 2.0 * value.float()
    for name, value in slice_state(total, axes, keep).items():
        if value.is_floating_point() and value.dim():
            assert torch.allclose(value, 2.0 * sub[name].float())
    conv = "blocks.1.0.conv1.weight"
    assert torch.count_nonzero(total[conv]) == torch.count_nonzero(sub[conv])  # nothing outside the kept channels


def test_full_map_keeps_everything():
    spec = ModelSpec("cnn")
    model = build_model(spec)
    assert slice_state(model.state_dict(), param_axes(model), full_map(spec)).keys() == model.state_dict().keys()


def test_dependency_graph_of_torch_pruning_agrees_with_our_coupled_groups():
    """Torch-Pruning's DepGraph (the field's reference) couples exactly the layers our tags couple."""
    tp = pytest.importorskip("torch_pruning")
    model = build_model(ModelSpec("resnet18")).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Conv2d):
            continue
        group = graph.get_pruning_group(module, tp.prune_conv_out_channels, idxs=[0])
        coupled_convs = {dep.target.module for dep, _ in group if isinstance(dep.target.module, torch.nn.Conv2d)
                         and dep.handler in (tp.prune_conv_out_channels,)}
        ours = {m for m in model.modules() if isinstance(m, torch.nn.Conv2d)
                and m.width_axes[0] == module.width_axes[0]}
        assert coupled_convs == ours, name
