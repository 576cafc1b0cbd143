"""bf16 weight copies with float32 master weights: the same bits as autocast + fused Adam, and the model's
own float32 parameters back afterwards."""

import numpy as np
import pytest
import torch
from conftest import TINY

from cnnkit.kernels import extension, master_weights
from cnnkit.kernels.master_weights import bf16_weights
from cnnkit.model import Architecture, build_model
from cnnkit.training import FusedAdam, make_optimizer, train_epoch


@pytest.fixture(scope="session")
def adam_kernel(cpp_extension):
    return cpp_extension.adam


def _moments(shape, generator, channels_last=False):
    tensors = [
        torch.randn(shape, generator=generator) * 0.1,
        torch.randn(shape, generator=generator) * 1e-3,
        torch.rand(shape, generator=generator) * 1e-5,
    ]
    if channels_last:
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    return tensors


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((1024, 1024), False), ((10,), False), ((33,), False), ((64, 32, 5, 5), True), ((7, 3, 5, 5), True)],
)
def test_the_cpp_adam_step_is_torchs_fused_adam_bit_for_bit(adam_kernel, shape, channels_last):
    # Lengths that are and are not multiples of 16 (torch's vector width), and channels_last memory.
    generator = torch.Generator().manual_seed(len(shape))
    ours = _moments(shape, generator, channels_last)
    torchs = [t.clone(memory_format=torch.preserve_format) for t in ours]
    copy = torch.empty_like(ours[0], dtype=torch.bfloat16)
    our_step, torch_step = torch.tensor(0.0), torch.tensor(0.0)
    for step in range(12):
        scale = 10.0 ** -(step % 6)
        grad = (torch.randn(shape, generator=generator) * scale).to(torch.bfloat16)
        grad = grad.contiguous(memory_format=torch.channels_last) if channels_last else grad
        lr = 1e-3 * (1 + step % 3)
        our_step += 1
        torch_step += 1
        adam_kernel.step([ours[0]], [grad], [ours[1]], [ours[2]], [copy], [our_step], lr, 0.9, 0.999, 1e-8)
        torch._fused_adam_(
            [torchs[0]],
            [grad.float()],
            [torchs[1]],
            [torchs[2]],
            [],
            [torch_step],
            amsgrad=False,
            lr=lr,
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
        )
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), ours, torchs, strict=True):
            assert torch.equal(a, b), (name, step)
        assert torch.equal(copy, ours[0].to(torch.bfloat16))


def test_the_cpp_adam_step_refuses_mismatched_tensors(adam_kernel):
    master, grad = torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.bfloat16)
    step = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="bfloat16 with their master's shape and strides"):
        adam_kernel.step(
            [master],
            [grad.t()],
            [master.clone()],
            [master.clone()],
            [grad.clone()],
            [step],
            1e-3,
            0.9,
            0.999,
            1e-8,
        )
    with pytest.raises(RuntimeError, match="as many"):
        adam_kernel.step(
            [master], [], [master.clone()], [master.clone()], [grad.clone()], [step], 1e-3, 0.9, 0.999, 1e-8
        )


def _train(build, precision, steps=7, copies=True, monkeypatch=None):
    """A few bf16 steps of a tiny network from a fresh optimizer (so the first step, which creates Adam's
    state, is among them); returns the model and the optimizer."""
    model = build_model(Architecture(**TINY), build=build, seed=0).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-3)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16 * steps, 1, 28, 28, generator=generator).contiguous(
        memory_format=torch.channels_last
    )
    labels = torch.randint(0, 10, (16 * steps,), generator=generator)
    batches = [np.arange(i, i + 16) for i in range(0, 16 * steps, 16)]
    learning_rates = [1e-3 * (1 + step % 3) for step in range(steps)]
    torch.manual_seed(0)  # dropout
    with pytest.MonkeyPatch.context() as patch:
        if not copies:
            patch.setattr(master_weights, "_kernels_for", lambda *args: None)
        train_epoch(model, optimizer, images, labels, batches, precision, learning_rates=learning_rates)
    return model, optimizer


@pytest.mark.parametrize("build", ["layers", "lowlevel"])
def test_bf16_copies_learn_exactly_what_autocast_with_fused_adam_learns(adam_kernel, build):
    ours, our_optimizer = _train(build, "bf16")
    theirs, their_optimizer = _train(build, "bf16", copies=False)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert a.dtype == torch.float32 and a.stride() == b.stride(), name
        assert torch.equal(a, b), name
    ours_state, theirs_state = our_optimizer.state_dict(), their_optimizer.state_dict()
    assert ours_state["param_groups"] == theirs_state["param_groups"]
    for index, moments in theirs_state["state"].items():
        assert moments.keys() == ours_state["state"][index].keys()
        assert all(torch.equal(moments[key], ours_state["state"][index][key]) for key in moments)


def test_the_model_holds_bf16_copies_inside_and_its_own_parameters_after(adam_kernel):
    model = build_model(Architecture(**TINY), seed=0)
    before = list(model.parameters())
    optimizer = make_optimizer(model, 1e-3)
    with pytest.raises(KeyboardInterrupt), bf16_weights(model, optimizer, "bf16") as step:
        inside = list(model.parameters())
        assert {p.dtype for p in inside} == {torch.bfloat16}
        assert all(torch.equal(p, q.to(torch.bfloat16)) for p, q in zip(inside, before, strict=True))
        assert step is not optimizer.step
        raise KeyboardInterrupt
    after = list(model.parameters())
    assert all(p is q for p, q in zip(after, before, strict=True))


@pytest.mark.parametrize(
    "case",
    ["fp32", "no kernels", "plain Adam", "amsgrad", "weight decay", "two groups", "SGD", "not the model's"],
)
def test_where_the_copies_do_not_apply_the_optimizer_steps_itself(case, monkeypatch):
    model = build_model(Architecture(**TINY), seed=0)
    params = list(model.parameters())
    optimizer = {
        "plain Adam": lambda: torch.optim.Adam(params),
        "amsgrad": lambda: torch.optim.Adam(params, fused=True, amsgrad=True),
        "weight decay": lambda: torch.optim.Adam(params, fused=True, weight_decay=0.1),
        "two groups": lambda: torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], fused=True),
        "SGD": lambda: torch.optim.SGD(params, lr=0.1),
        "not the model's": lambda: FusedAdam([torch.nn.Parameter(torch.zeros(3))], lr=1e-3),
    }.get(case, lambda: FusedAdam(params, lr=1e-3))()
    if case == "no kernels":
        monkeypatch.setattr(extension, "load", lambda: None)
    with bf16_weights(model, optimizer, "fp32" if case == "fp32" else "bf16") as step:
        assert step == optimizer.step
        assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
