"""Models: fastMRI U-Net equivalence, the attention gate, the forward contract and the registry."""

from __future__ import annotations

import pytest
import torch
from fastmri.models import Unet as FastmriUnet
from torch import nn
from torch.nn import functional as F

from mri_models.losses import attention_sparsity_penalty
from mri_models.models import (
    INSTANCE_NORM_FLOOR,
    PSI_NORMS,
    AttentionGate,
    AttentionUnet,
    Unet,
    UnetOutput,
    build_model,
    model_names,
    uses_attention,
)

SMALL = {"in_chans": 1, "out_chans": 1, "chans": 4, "num_pool_layers": 3}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter from a seeded normal so that outputs are not near-degenerate."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


# --- U-Net equivalence with fastMRI ----------------------------------------------------------------------


def test_unet_state_dict_keys_and_shapes_match_fastmri() -> None:
    ours, theirs = Unet(**SMALL).state_dict(), FastmriUnet(**SMALL).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_unet_paper_size_matches_fastmri_parameter_count_and_keys() -> None:
    ours, theirs = Unet(1, 1, chans=32, num_pool_layers=4), FastmriUnet(1, 1, chans=32, num_pool_layers=4)
    assert num_params(ours) == num_params(theirs) == 7_756_097
    assert len(ours.state_dict()) == 24
    ours.load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 33, 37), (2, 20, 17)])
@pytest.mark.parametrize("drop_prob", [0.0, 0.3])
def test_fastmri_checkpoint_loads_into_ours_with_identical_outputs(shape: tuple, drop_prob: float) -> None:
    batch, height, width = shape
    theirs = seeded(FastmriUnet(**SMALL, drop_prob=drop_prob), seed=1).eval()
    ours = Unet(**SMALL, drop_prob=drop_prob).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    image = torch.randn(batch, 1, height, width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, actual = theirs(image), ours(image)
    assert actual.shape == (batch, 1, height, width)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 33, 37)])
def test_our_checkpoint_loads_into_fastmri_with_identical_outputs(shape: tuple) -> None:
    batch, height, width = shape
    kwargs = {**SMALL, "in_chans": 2, "out_chans": 3}
    ours = seeded(Unet(**kwargs), seed=3).eval()
    theirs = FastmriUnet(**kwargs).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    image = torch.randn(batch, 2, height, width)
    with torch.no_grad():
        assert torch.equal(ours(image), theirs(image))


def test_unet_gradients_match_fastmri_in_training_mode() -> None:
    # Training mode exercises InstanceNorm's batch statistics path and the inplace LeakyReLUs in backward.
    theirs = seeded(FastmriUnet(**SMALL), seed=4).train()
    ours = Unet(**SMALL).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    image, target = torch.randn(2, 1, 33, 37), torch.randn(2, 1, 33, 37)
    F.l1_loss(theirs(image), target).backward()
    F.l1_loss(ours(image), target).backward()
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p_ours.grad, p_theirs.grad), name


def test_unet_return_attention_gives_same_output_and_empty_tuples() -> None:
    model = Unet(**SMALL).eval()
    image = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        plain, full = model(image), model(image, return_attention=True)
    assert isinstance(plain, torch.Tensor)
    assert isinstance(full, UnetOutput)
    assert torch.equal(full.output, plain)
    assert full.attention_maps == full.skip_norms_before == full.skip_norms_after == ()


@pytest.mark.parametrize(
    "kwargs", [{"chans": 0}, {"num_pool_layers": 0}, {"drop_prob": 1.5}, {"drop_prob": -0.1}, {"in_chans": 0}]
)
def test_invalid_sizes_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Unet(**{**SMALL, **kwargs})


# --- the attention gate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chans", [1, 6, 7])
def test_attention_gate_follows_the_design_formula(chans: int) -> None:
    gate = seeded(AttentionGate(chans), seed=5)
    inter = max(1, chans // 2)
    assert gate.w_g[0].weight.shape == gate.w_x[0].weight.shape == (inter, chans, 1, 1)
    assert gate.psi[0].weight.shape == (1, inter, 1, 1)
    x, g = torch.randn(2, chans, 9, 11), torch.randn(2, chans, 9, 11)

    def branch(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(F.conv2d(t, conv.weight))

    hidden = torch.relu(branch(gate.w_g[0], g) + branch(gate.w_x[0], x))
    expected = torch.sigmoid(branch(gate.psi[0], hidden))
    torch.testing.assert_close(gate(x, g), expected, rtol=0, atol=1e-6)


def _reference_gate(gate: AttentionGate, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gate formula (docs/architecture.md) with conv2d and instance_norm and the gate's own weights:
    after ``psi`` the paper's instance norm, the norm with its affine scale and shift, or a bias."""
    w_g, w_x, psi = gate.w_g[0].weight, gate.w_x[0].weight, gate.psi[0].weight
    hidden = torch.relu(F.instance_norm(F.conv2d(g, w_g)) + F.instance_norm(F.conv2d(x, w_x)))
    if gate.psi_norm == "none":
        return torch.sigmoid(F.conv2d(hidden, psi, gate.psi[0].bias))
    norm = gate.psi[1]
    return torch.sigmoid(F.instance_norm(F.conv2d(hidden, psi), weight=norm.weight, bias=norm.bias))


@pytest.mark.parametrize("chans", [1, 8, 13])
@pytest.mark.parametrize("shape", [(1, 16, 16), (1, 33, 37), (3, 9, 11)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("psi_norm", PSI_NORMS)
def test_fused_gate_matches_reference_outputs_and_gradients(
    chans: int, shape: tuple, channels_last: bool, psi_norm: str
) -> None:
    # The gate computes its 1x1 convolutions as matrix products and its norms as direct batch-norm
    # calls (batch 1 takes a separate 2-D mm path); values and gradients must equal the plain formula.
    batch, height, width = shape
    gate = seeded(AttentionGate(chans, psi_norm), seed=13).train()
    generator = torch.Generator().manual_seed(14)
    x, g = (torch.randn(batch, chans, height, width, generator=generator) for _ in range(2))
    if channels_last:  # non-contiguous NCHW strides must still give the same result
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    upstream = torch.randn(batch, 1, height, width, generator=generator)

    def run(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [x.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()]
        gate.zero_grad(set_to_none=True)
        alpha = fn(*leaves)
        (alpha * upstream).sum().backward()
        return alpha.detach(), [t.grad for t in leaves] + [p.grad.clone() for p in gate.parameters()]

    actual, actual_grads = run(gate)
    expected, expected_grads = run(lambda x_, g_: _reference_gate(gate, x_, g_))
    # The module-by-module evaluation (w_g(g) etc.) is the same formula too.
    with torch.no_grad():
        modules = torch.sigmoid(gate.psi(torch.relu(gate.w_g(g) + gate.w_x(x))))
    assert actual.shape == (batch, 1, height, width)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(modules, expected, rtol=0, atol=1e-6)
    # With one channel, IN(w * t) = sign(w) IN(t) up to eps, so the weight gradients are eps-sized
    # differences of large terms: compare them on the scale of those terms, not their own.
    weight_atol = 1e-3 if chans == 1 else 1e-5
    for index, (ours, reference) in enumerate(zip(actual_grads, expected_grads, strict=True)):
        atol = 1e-5 if index < 2 else weight_atol
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=atol)


def test_attention_gate_convs_have_no_bias_and_gate_parameter_count() -> None:
    # InstanceNorm after each conv removes a constant bias exactly, so the gates carry none.
    gate = AttentionGate(8)
    assert all(conv[0].bias is None for conv in (gate.w_g, gate.w_x, gate.psi))
    assert num_params(gate) == 8 * 4 * 2 + 4
    # The variants add psi's norm scale and shift, or psi's bias (Oktay et al.'s gate).
    assert num_params(AttentionGate(8, "instance_affine")) == 8 * 4 * 2 + 4 + 2
    assert num_params(AttentionGate(8, "none")) == 8 * 4 * 2 + 4 + 1
    assert AttentionGate(8, "none").psi[0].bias is not None
    with pytest.raises(ValueError, match="psi_norm"):
        AttentionGate(8, "batch")


def _lowest_mean_coefficient(psi_norm: str, steps: int, free_logits: bool) -> float:
    """Mean alpha after minimising it directly (Adam) over the gate's own parameters after ``psi`` and, with
    ``free_logits``, over ``psi``'s 64 x 64 output itself: the least an L1 penalty could reach."""
    gate = AttentionGate(8, psi_norm)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 64 * 64, generator=generator).requires_grad_(free_logits)
    parameters = [*gate.psi.parameters()][1:]  # psi's convolution weight does not act on free logits
    optimizer = torch.optim.Adam([logits] * free_logits + parameters, lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        gate.coefficients(logits).mean().backward()
        optimizer.step()
    with torch.no_grad():
        return float(gate.coefficients(logits).mean())


def test_the_papers_gate_bounds_mean_alpha_and_the_other_gates_do_not() -> None:
    # The instance norm after psi fixes every image's logits at mean 0 and variance 1 whatever they were:
    # even over free logits, mean sigmoid cannot fall below the floor (docs/attention.md) ...
    assert _lowest_mean_coefficient("instance", steps=3000, free_logits=True) >= INSTANCE_NORM_FLOOR
    # ... which is tight: logits at two values, 6.44% of them high, reach it.
    two_point = torch.full((1, 1, 10_000), -1.0)
    two_point[..., :644] = 20.0
    alpha = AttentionGate(8).coefficients(two_point)
    assert INSTANCE_NORM_FLOOR <= float(alpha.mean()) < INSTANCE_NORM_FLOOR + 1e-4
    for seed in range(20):  # and logits of any shape and scale stay above it
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(1, 1, 4096, generator=generator) ** (1 + seed % 3) * 10 ** (seed % 4 - 1)
        assert float(AttentionGate(8).coefficients(logits).mean()) >= INSTANCE_NORM_FLOOR
    # psi's bias, or the norm's learned shift, moves every logit: the coefficients can switch off.
    assert _lowest_mean_coefficient("none", steps=300, free_logits=False) < 0.05
    assert _lowest_mean_coefficient("instance_affine", steps=300, free_logits=False) < 0.05


def test_attention_unet_paper_size_parameter_count() -> None:
    model = AttentionUnet(1, 1, chans=32, num_pool_layers=4)
    # Per level with C skip channels: W_g and W_x are C x C/2, psi is C/2 x 1.
    gates = sum(c * c + c // 2 for c in (256, 128, 64, 32))
    assert num_params(model.attention_gates) == gates == 87_280
    assert num_params(model) == 7_756_097 + 87_280 == 7_843_377
    assert [g.chans for g in model.attention_gates] == [256, 128, 64, 32]


def test_attention_unet_keeps_unet_parameter_names() -> None:
    unet_state = seeded(FastmriUnet(**SMALL), seed=6).state_dict()
    model = AttentionUnet(**SMALL)
    result = model.load_state_dict(unet_state, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("attention_gates.") for k in result.missing_keys)
    assert set(model.state_dict()) - set(result.missing_keys) == set(unet_state)


@pytest.mark.parametrize("batch", [1, 3])
def test_attention_outputs_shapes_order_and_ranges(batch: int) -> None:
    model = seeded(AttentionUnet(**SMALL), seed=7).train()
    skips: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: skips.append(o.detach().clone()))
        for layer in model.down_sample_layers
    ]
    image = torch.randn(batch, 1, 33, 37)
    result = model(image, return_attention=True)
    for hook in hooks:
        hook.remove()

    assert isinstance(result, UnetOutput)
    assert result.output.shape == (batch, 1, 33, 37)
    # Decoder order: deepest first, full resolution last.
    assert [tuple(a.shape) for a in result.attention_maps] == [
        (batch, 1, 8, 9),
        (batch, 1, 16, 18),
        (batch, 1, 33, 37),
    ]
    for alpha in result.attention_maps:
        assert alpha.requires_grad
        assert bool(((alpha > 0) & (alpha < 1)).all())
    for level, (x, alpha) in enumerate(zip(reversed(skips), result.attention_maps, strict=True)):
        before, after = result.skip_norms_before[level], result.skip_norms_after[level]
        assert before.shape == after.shape == (batch,)
        torch.testing.assert_close(before, x.flatten(1).norm(dim=1))
        torch.testing.assert_close(after, (alpha.detach() * x).flatten(1).norm(dim=1))
        assert bool((after <= before).all())  # alpha < 1 can only shrink the skip features
        assert not before.requires_grad and not after.requires_grad


def test_attention_forward_without_flag_returns_the_same_tensor() -> None:
    model = seeded(AttentionUnet(**SMALL), seed=8).eval()
    image = torch.randn(2, 1, 20, 17)
    with torch.no_grad():
        plain, full = model(image), model(image, return_attention=True)
    assert isinstance(plain, torch.Tensor) and plain.shape == (2, 1, 20, 17)
    assert torch.equal(plain, full.output)


def test_attention_actually_changes_the_network() -> None:
    # The same U-Net weights with and without gates must differ, or the gates would be dead code.
    unet = seeded(Unet(**SMALL), seed=9).eval()
    attention = AttentionUnet(**SMALL).eval()
    attention.load_state_dict(unet.state_dict(), strict=False)
    image = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        assert not torch.allclose(unet(image), attention(image))


def test_penalty_gradient_reaches_gates_and_encoder() -> None:
    model = seeded(AttentionUnet(**SMALL), seed=10).train()
    result = model(torch.randn(2, 1, 24, 28), return_attention=True)
    attention_sparsity_penalty(result.attention_maps).backward()
    for level, gate in enumerate(model.attention_gates):
        # Every gate parameter (the W_g, W_x and psi weights), whatever the gate's forward does with them.
        assert [name for name, _ in gate.named_parameters()] == [
            "w_g.0.weight",
            "w_x.0.weight",
            "psi.0.weight",
        ]
        for name, parameter in gate.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, (level, name)
    for layer in model.down_sample_layers:
        assert layer.layers[0].weight.grad.abs().sum() > 0
    # The last decoder block comes after every gate: the penalty must not reach it.
    assert model.up_conv[-1][1].weight.grad is None


# --- no state on the module (DDP, torch.compile) ---------------------------------------------------------


def _module_snapshot(model: nn.Module) -> dict:
    snapshot = {}
    for name, module in model.named_modules():
        attrs = {k: id(v) for k, v in vars(module).items()}
        for registry in ("_parameters", "_buffers", "_modules"):
            attrs[registry + "_contents"] = {k: id(v) for k, v in getattr(module, registry).items()}
        snapshot[name] = attrs
    return snapshot


@pytest.mark.parametrize("name", model_names())
def test_forward_sets_no_attributes(name: str) -> None:
    model = build_model(name, chans=4, num_pool_layers=2)
    before = _module_snapshot(model)
    model(torch.randn(2, 1, 16, 16), return_attention=True)
    model(torch.randn(1, 1, 17, 15))
    assert _module_snapshot(model) == before


def test_two_calls_return_their_own_maps() -> None:
    model = seeded(AttentionUnet(**SMALL), seed=11).eval()
    first_image, second_image = torch.randn(2, 1, 24, 24), torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        first = model(first_image, return_attention=True)
        kept = [a.clone() for a in first.attention_maps]
        second = model(second_image, return_attention=True)
        again = model(first_image, return_attention=True)
    for a_first, a_kept, a_second, a_again in zip(
        first.attention_maps, kept, second.attention_maps, again.attention_maps, strict=True
    ):
        assert torch.equal(a_first, a_kept)
        assert torch.equal(a_first, a_again)
        assert not torch.allclose(a_first, a_second)


def test_torch_compile_traces_the_whole_graph() -> None:
    # backend="eager" runs Dynamo's full tracing (fullgraph=True fails on any graph break) without
    # Inductor's C++ code generation, which takes ~40 s on CPU; the traced graph is what DDP sees too.
    torch._dynamo.reset()
    model = seeded(AttentionUnet(**SMALL), seed=12).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    image = torch.randn(2, 1, 33, 37)
    with torch.no_grad():
        expected, actual = model(image, return_attention=True), compiled(image, return_attention=True)
    torch.testing.assert_close(actual.output, expected.output)
    for ours, reference in zip(actual.attention_maps, expected.attention_maps, strict=True):
        torch.testing.assert_close(ours, reference)


# --- registry --------------------------------------------------------------------------------------------


def test_registry_names_and_classes() -> None:
    assert model_names() == ("unet", "attention_unet", "sparse_attention_unet")
    assert [uses_attention(n) for n in model_names()] == [False, True, True]
    assert type(build_model("unet", **SMALL)) is Unet
    assert type(build_model("attention_unet", **SMALL)) is AttentionUnet
    assert type(build_model("sparse_attention_unet", **SMALL)) is AttentionUnet


def test_registry_defaults_are_the_paper_settings() -> None:
    model = build_model("unet")
    assert (model.in_chans, model.out_chans, model.chans, model.num_pool_layers, model.drop_prob) == (
        1,
        1,
        32,
        4,
        0.0,
    )
    assert num_params(model) == 7_756_097
    model = build_model("attention_unet", chans=8, num_pool_layers=2, drop_prob=0.1)
    assert (model.chans, model.num_pool_layers, model.drop_prob) == (8, 2, 0.1)


def test_registry_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_model("transformer")
    assert "transformer" in str(info.value)
    assert all(name in str(info.value) for name in model_names())
    with pytest.raises(ValueError, match="attention_unet"):
        uses_attention("Unet")


def test_registry_unknown_hparam_is_named() -> None:
    with pytest.raises(TypeError, match="num_pools"):
        build_model("unet", num_pools=3)
    with pytest.raises(TypeError, match="gamma"):
        build_model("sparse_attention_unet", gamma=0.1)
