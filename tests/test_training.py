"""Local training: the SGD update is torch.optim.SGD's, bit for bit, and a training process never
imports torch._dynamo (a deployed ClientApp pays that import, 1.4-4 s, in every message's process)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fl_app.models import ModelSpec, build_model
from fl_app.training import SGD, freeze_except, forward, measure_step


def _train_both(spec: ModelSpec, trainable, momentum: float, weight_decay: float, steps: int = 4):
    """Train two copies of one model, ours and torch.optim.SGD, on the same batches."""
    torch.manual_seed(0)
    ours = build_model(spec)
    theirs = build_model(spec)
    theirs.load_state_dict(ours.state_dict())
    pairs = []
    for model in (ours, theirs):
        freeze_except(model, trainable)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (SGD(params, lr=0.05, momentum=momentum, weight_decay=weight_decay) if model is ours else
               torch.optim.SGD(params, lr=0.05, momentum=momentum, weight_decay=weight_decay))
        pairs.append((model, opt))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        for model, opt in pairs:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(model, x, trainable), y).backward()
            opt.step()
    return pairs


@pytest.mark.parametrize("name,trainable,momentum,weight_decay", [
    ("cnn", None, 0.9, 5e-4),
    ("cnn", None, 0.0, 0.0),
    ("resnet18", [1, 2], 0.9, 5e-4),  # a ProFL-style step: frozen blocks have no gradient
])
def test_sgd_gives_torch_optim_sgds_weights_and_momentum_bit_for_bit(name, trainable, momentum, weight_decay):
    (ours, ours_opt), (theirs, theirs_opt) = _train_both(ModelSpec(name), trainable, momentum, weight_decay)
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), key
    trained = [p for p in theirs.parameters() if p.requires_grad]
    assert len(ours_opt.state) == len(theirs_opt.state) == (len(trained) if momentum else 0)
    for p_ours, p_theirs in zip([p for p in ours.parameters() if p.requires_grad], trained):
        if momentum:
            assert torch.equal(ours_opt.state[p_ours]["momentum_buffer"],
                               theirs_opt.state[p_theirs]["momentum_buffer"])


def _peak(events) -> int:
    current = highest = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        current += event.nbytes()
        highest = max(highest, current)
    return highest


def test_measured_peak_is_what_torch_profiler_reports_for_the_same_step():
    """measure_step reads the autograd profiler that torch.profiler.profile wraps: same events, same peak."""
    from torch.profiler import ProfilerActivity, profile

    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn"))
    _, measured = measure_step(model, SGD(list(model.parameters()), lr=0.05, momentum=0.9), x, y)
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn"))
    opt = SGD(list(model.parameters()), lr=0.05, momentum=0.9)
    before = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), x])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert measured == before + _peak(prof.profiler.kineto_results.events())


def test_a_training_process_never_imports_torch_dynamo():
    code = """
import sys
import torch
from fl_app.data import Batches, load_dataset
from fl_app.models import ModelSpec, build_model
from fl_app.training import TrainConfig, train, evaluate
ds = load_dataset("synthetic")
x, y = ds.x_train[:40], ds.y_train[:40]
model = build_model(ModelSpec("cnn"))
train(model, Batches(x, y, ds, 16), TrainConfig(epochs=1, batch_size=16))
evaluate(model, Batches(x, y, ds, 16, shuffle=False))
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
