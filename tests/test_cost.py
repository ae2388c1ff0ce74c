"""The cost model: FLOPs counted by PyTorch, predicted peak memory against a measured step."""

import pytest
import torch

from fl_app.cost import device_time_s, model_cost
from fl_app.models import MODEL_NAMES, ModelSpec, build_model
from fl_app.profiles import DeviceProfile
from fl_app.training import TrainConfig, freeze_except, make_optimizer, measure_step


def test_vgg16_forward_is_the_papers_0_33_g_macs_per_image():
    cost = model_cost(ModelSpec("vgg16-fc4096"), (3, 32, 32))
    assert round(cost.forward_macs_per_sample / 1e9, 2) == 0.33


def test_training_costs_about_three_forwards():
    cost = model_cost(ModelSpec("resnet18"), (3, 32, 32))
    ratio = cost.train_flops_per_sample / (2 * cost.forward_macs_per_sample)
    assert 2.8 < ratio < 3.05  # backward = grads w.r.t. inputs and weights (first conv: weights only)


def test_frozen_prefix_costs_forward_only_and_trains_fewer_parameters():
    spec = ModelSpec("resnet18")
    full = model_cost(spec, (3, 32, 32))
    last = model_cost(spec, (3, 32, 32), trainable=[3])
    assert last.trainable_params < full.trainable_params
    assert last.train_flops_per_sample < 0.6 * full.train_flops_per_sample
    assert last.activation_bytes_per_sample < 0.2 * full.activation_bytes_per_sample


@pytest.mark.parametrize("name,batch", [("cnn", 32), ("resnet18", 16)])
def test_predicted_peak_memory_is_close_to_a_measured_step(name, batch):
    spec = ModelSpec(name)
    model = build_model(spec)
    freeze_except(model, None)
    optimizer = make_optimizer(model, TrainConfig())
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    _, measured = measure_step(model, optimizer, x, y)
    predicted = model_cost(spec, (3, 32, 32)).peak_train_bytes(batch, (3, 32, 32))
    assert 0.75 < predicted / measured < 1.35, (predicted / 2**20, measured / 2**20)


# REFT's global pruning at the memory wall (experiments/specs/memory_wall.toml, seed 0, round 1, node 17 with a
# 4.77 MB budget) gave resnet18-w0.25 these widths: one channel in the stem and stage 1, wide stage-4 blocks.
# Predicted 4.76 MB, measured 5.86 MB at batch 32: the node refused every round. Why, measured with the
# profiler: PyTorch's CPU convolution (oneDNN) works on channel-blocked copies padded to 16 channels, so a
# 1 -> 1 channel 3x3 conv on 32 x 32 images at batch 32 allocates two 2048 KB buffers for 128 KB of logical
# output; pricing on the meta device sees the logical tensors only. Not yet modelled (it needs the backward's
# timeline: the stem's buffers coexist with few saved activations, so padding the largest-layer term over-predicts).
NARROW_STEM_WIDTHS = {"stage1": 1, "stage2": 2, "stage3": 4, "stage4": 7, "stage1.block0.mid": 1,
                      "stage1.block1.mid": 1, "stage2.block0.mid": 2, "stage2.block1.mid": 2, "stage3.block0.mid": 16,
                      "stage3.block1.mid": 4, "stage4.block0.mid": 128, "stage4.block1.mid": 112}


@pytest.mark.xfail(strict=True, reason="oneDNN's 16-channel blocked copies are not priced: "
                   "a one-channel-stem REFT submodel is under-predicted by 19 %")
def test_a_globally_pruned_submodel_with_a_one_channel_stem_is_not_under_predicted():
    spec = ModelSpec("resnet18-w0.25").with_widths(NARROW_STEM_WIDTHS)
    torch.manual_seed(0)
    model = build_model(spec)
    freeze_except(model, None)
    optimizer = make_optimizer(model, TrainConfig())
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    _, measured = measure_step(model, optimizer, x, y)
    predicted = model_cost(spec, (3, 32, 32)).peak_train_bytes(32, (3, 32, 32))
    assert predicted >= measured, (predicted / 2**20, measured / 2**20)


@pytest.mark.parametrize("batch", [8, 32])
def test_checkpointed_prediction_is_close_to_a_measured_step_and_not_below(batch):
    """ResNet-18's largest ProFL step, grow block 1 (stem and layer1 with its output module).
    At batch 8 its peak is the output module's largest weight gradient, at 32 the recompute of
    a residual block: the prediction must cover both, and not by much more."""
    spec, trainable = ModelSpec("resnet18").with_depth(1), [0, 1]
    torch.manual_seed(0)
    model = build_model(spec)
    freeze_except(model, trainable)
    optimizer = make_optimizer(model, TrainConfig())
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    _, measured = measure_step(model, optimizer, x, y, trainable, checkpoint=True)
    predicted = model_cost(spec, (3, 32, 32), trainable, checkpoint=True).peak_train_bytes(batch, (3, 32, 32))
    assert 1.0 <= predicted / measured < 1.2, (predicted / 2**20, measured / 2**20)


def test_device_time_adds_compute_and_both_transfers():
    pi = DeviceProfile("pi", gflops=2.0, memory_mb=500, uplink_mbps=8.0, downlink_mbps=16.0)
    assert device_time_s(pi, train_flops=4e9, bytes_down=2_000_000, bytes_up=1_000_000) == pytest.approx(
        2.0 + 1.0 + 1.0)


def test_cached_cost_equals_a_fresh_pricing_and_never_answers_for_other_arguments():
    """model_cost is memoized (fl_app.cost._model_cost) and meta kernels are answered from their
    remembered output layouts (_MetaKernelCache): both must give exactly what pricing from scratch
    gives, and a call that differs in any argument must not get another call's answer."""
    from fl_app.cost import _model_cost, _price

    resnet = ModelSpec("resnet18")
    calls = [(resnet, (3, 32, 32), None, False), (resnet, (3, 28, 28), None, False),
             (ModelSpec("resnet18", in_channels=1), (1, 32, 32), None, False),
             (resnet, (3, 32, 32), (3,), False), (resnet, (3, 32, 32), (2, 3), False),
             (resnet, (3, 32, 32), (3,), True), (resnet.with_depth(2), (3, 32, 32), (0, 1), True),
             (resnet.with_widths({g: max(1, c // 3) for g, c in resnet.resolved_widths().items()}), (3, 32, 32),
              None, False),
             (ModelSpec("cnn", exits=True), (3, 32, 32), None, False), (ModelSpec("cnn"), (3, 32, 32), None, False)]
    costs = [model_cost(spec, shape, trainable, checkpoint) for spec, shape, trainable, checkpoint in calls]
    assert len(set(costs)) == len(costs)  # every argument changes the answer here
    for (spec, shape, trainable, checkpoint), cost in zip(calls, costs):
        checkpoint = checkpoint and not spec.exits
        fresh = _price(spec, shape, None if trainable is None else tuple(sorted(trainable)), checkpoint,
                       memoize_kernels=False)
        assert cost == fresh == model_cost(spec, shape, trainable, checkpoint), (spec, shape, trainable)
    assert model_cost(resnet, (3, 32, 32), [3, 2]) is model_cost(resnet, (3, 32, 32), (2, 3))  # one entry
    assert _model_cost.cache_info().maxsize is not None  # bounded


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_flop_count_is_flop_counter_modes(name):
    """fl_app.cost counts FLOPs with FlopCounterMode's rule, without its per-module table: the totals
    must be FlopCounterMode's, forward and backward, with checkpointing and with exits."""
    from torch.utils.flop_counter import FlopCounterMode

    from fl_app.cost import _FlopCount
    from fl_app.training import forward

    spec = ModelSpec(name)
    for spec, trainable, checkpoint in [(spec, None, False), (spec, [1], True),
                                        (ModelSpec(name, exits=True), None, False)]:
        with torch.device("meta"):
            model = build_model(spec)
        freeze_except(model, trainable)
        x = torch.zeros(2, 3, 32, 32, device="meta")
        totals = []
        for counter in (FlopCounterMode(display=False), _FlopCount()):
            with counter:
                forward(model, x, trainable, checkpoint).sum().backward()
            totals.append(counter.get_total_flops() if isinstance(counter, FlopCounterMode) else counter.flops)
        assert totals[0] == totals[1] > 0, (spec, trainable, checkpoint)


def test_fit_ratio_is_the_plain_bisections_result_with_fewer_pricings():
    """fl_app.width.fit_ratio settles most bisection steps from a few priced levels (a submodel that
    keeps fewer channels costs no more); its answer must be the bisection's that prices every step,
    for compute- and memory-bound budgets, budgets exactly at a submodel's cost, and none; with
    uniform levels and with global pruning's levels."""
    from fl_app import width
    from fl_app.models import build_model

    def plain(spec, shape, widths_at, fits, min_ratio):
        def ok(level):
            return fits(model_cost(spec.with_widths(widths_at(level)), shape))
        if ok(1.0):
            return 1.0
        if not ok(min_ratio):
            return None
        low, high = min_ratio, 1.0
        while high - low > 1e-3:
            mid = (low + high) / 2
            low, high = (mid, high) if ok(mid) else (low, mid)
        return low

    for spec, shape in [(ModelSpec("cnn"), (3, 32, 32)), (ModelSpec("resnet18", 100, 1), (1, 28, 28))]:
        full = model_cost(spec, shape)
        at = model_cost(spec.with_widths(width.widths_at_ratio(spec, 0.3)), shape)
        inf = float("inf")
        budgets = [(full.train_flops_per_sample * share, inf) for share in (0.004, 0.05, 0.31, 0.9)]
        budgets += [(inf, full.peak_train_bytes(32, shape) * share) for share in (0.01, 0.2, 0.5)]
        budgets += [(at.train_flops_per_sample, inf), (inf, at.peak_train_bytes(32, shape)), (inf, inf), (0.0, inf),
                    (full.train_flops_per_sample * 0.2, full.peak_train_bytes(32, shape) * 0.3)]
        levels = [(width.uniform_widths(spec), 0.05)] + [
            (width.global_widths(build_model(spec), 0.05, width.channel_costs(spec, shape, 32, resource)), 0.0)
            for resource in width.RESOURCES]
        for flops, memory in budgets:
            def fits(cost):
                return cost.train_flops_per_sample <= flops and cost.peak_train_bytes(32, shape) <= memory
            for widths_at, floor in levels:
                expected = plain(spec, shape, widths_at, fits, floor)
                assert width.fit_ratio(spec, shape, fits, floor, widths_at) == expected, (spec.name, flops, memory)


def test_message_bytes_bound_is_above_the_exact_serialized_size():
    """Device-time predictions (fl_app.cost.Workload) bound message bytes from above, so a job sized to
    a deadline never misses it on the virtual clock for its bytes."""
    from flwr.app import ConfigRecord, RecordDict

    from fl_app.cost import message_bytes_bound
    from fl_app.job import Job
    from fl_app.models import build_model
    from fl_app.wire import encode, serialized_bytes

    for name in ("cnn", "resnet18"):
        state = build_model(ModelSpec(name)).state_dict()
        values = sum(v.numel() for v in state.values())
        job = Job(round=1, model=ModelSpec(name).with_widths(ModelSpec(name).resolved_widths()))
        for encoding in ("fp32", "fp16", "int8"):
            content = RecordDict({"job": ConfigRecord({"json": job.to_json()}), "weights": encode(state, encoding)})
            exact = serialized_bytes(content)
            bound = message_bytes_bound(values, len(state), encoding)
            assert exact <= bound < exact * 1.2 + 20_000, (name, encoding, exact, bound)


def test_meta_kernel_memo_stays_within_its_size_and_still_prices_exactly(monkeypatch):
    from fl_app import cost

    monkeypatch.setattr(cost, "_KERNEL_CACHE_SIZE", 50)
    monkeypatch.setattr(cost, "_kernel_outputs", type(cost._kernel_outputs)())
    spec = ModelSpec("cnn").with_widths({"conv1": 7, "conv2": 9, "fc1": 11})
    for _ in range(2):  # the second time mostly from the memo
        assert cost._price(spec, (3, 32, 32), None, False) == cost._price(spec, (3, 32, 32), None, False,
                                                                          memoize_kernels=False)
        assert len(cost._kernel_outputs) <= 50
