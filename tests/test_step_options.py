"""Training-step options (mixed precision, channels_last, torch.compile) on tiny gated networks, no Ray."""

from __future__ import annotations

import warnings

import pytest
import torch

from mri_models.losses import training_loss
from mri_models.models import AttentionOutput, AttentionUnet, build_model
from mri_models.step_options import (
    CompileFallbackWarning,
    autocast,
    compile_unavailable_reason,
    float32_result,
    make_grad_scaler,
    optimisation_step,
    plain_state_dict,
    prepare_network,
    to_network_input,
    unwrap,
)

TINY = {"chans": 4, "num_pool_layers": 2}
SIZE = 32
# The Attention U-Net and the Sparse Attention U-Net (the same network trained with the L1 penalty).
ARMS = {"attention_unet": {}, "sparse_attention_unet": {"attention_l1": 1e-3}}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 1, SIZE, SIZE, generator=generator)
    return image, image + 0.1 * torch.randn(1, 1, SIZE, SIZE, generator=generator)


def _train(
    name: str,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    backend: str | None = None,
    steps: int = 3,
) -> tuple[list[float], torch.nn.Module]:
    """A few steps as the worker runs them with the options; the losses and the (wrapped) network."""
    torch.manual_seed(0)
    model = build_model(name, **TINY).train()
    model = prepare_network(
        model,
        channels_last=channels_last,
        compile=backend is not None,
        device="cpu",
        backend=backend or "inductor",
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = make_grad_scaler(precision, "cpu")
    image, target = _data()
    image = to_network_input(image, channels_last)
    losses = []
    for _ in range(steps):
        with autocast(precision, "cpu"):
            result = model(image, return_attention=True)
        parts = training_loss(float32_result(result), target, ARMS[name], AttentionOutput)
        assert parts.total.dtype == torch.float32
        assert optimisation_step(parts.total, optimizer, scaler)
        losses.append(parts.total.item())
    return losses, model


@pytest.fixture(scope="module")
def fp32_eager() -> dict[str, list[float]]:
    return {name: _train(name)[0] for name in ARMS}


# Relative tolerances on the losses of three steps against fp32 eager. bf16 keeps 8 significant bits
# (relative rounding 2^-9 ~ 0.2% per operation), fp16 11 bits; after a dozen layers and two optimiser
# steps both moved the loss by at most ~0.2% in trials (the errors partly average out), so 1% leaves a 5x
# margin while a wrong result (a missing gradient path, a loss in the wrong dtype, a skipped fp16 step:
# each step lowers the loss by ~5%) still fails. channels_last in float32 only changes the summation
# order inside the convolutions (~1e-7 observed): 1e-5.
OPTIONS = {
    "bf16": ({"precision": "bf16"}, 1e-2),
    "fp16+scaler": ({"precision": "fp16"}, 1e-2),
    "channels_last": ({"channels_last": True}, 1e-5),
    "bf16+channels_last": ({"precision": "bf16", "channels_last": True}, 1e-2),
    # Dynamo + AOTAutograd (the graph Inductor would receive), without Inductor's slow C++ build; the
    # Inductor backend itself is covered by the slow test below.
    "compile(aot_eager)": ({"backend": "aot_eager"}, 1e-4),
}


@pytest.mark.parametrize("name", ARMS)
@pytest.mark.parametrize("option", OPTIONS)
def test_option_trains_close_to_fp32_eager(option: str, name: str, fp32_eager) -> None:
    kwargs, rtol = OPTIONS[option]
    losses, _ = _train(name, **kwargs)
    reference = fp32_eager[name]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert reference[-1] < reference[0]  # the reference really trains
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=rtol, atol=0)


def test_fp16_uses_an_enabled_scaler_and_the_others_a_pass_through() -> None:
    assert make_grad_scaler("fp16", "cpu").is_enabled()
    assert not make_grad_scaler("bf16", "cpu").is_enabled()
    assert not make_grad_scaler("fp32", "cpu").is_enabled()
    with pytest.raises(ValueError, match="precision"):
        make_grad_scaler("fp8", "cpu")
    with pytest.raises(ValueError, match="precision"), autocast("half", "cpu"):
        pass


def test_fp16_step_with_infinite_gradients_is_skipped() -> None:
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scaler = make_grad_scaler("fp16", "cpu")
    assert not optimisation_step((parameter * float("inf")).sum(), optimizer, scaler)
    assert torch.equal(parameter.detach(), torch.ones(3))  # skipped, not corrupted
    assert optimisation_step(parameter.sum(), optimizer, scaler)
    assert not torch.equal(parameter.detach(), torch.ones(3))


def test_channels_last_outputs_match_contiguous() -> None:
    torch.manual_seed(0)
    model = AttentionUnet(**TINY).train()
    image = torch.randn(2, 1, SIZE, SIZE)
    reference = model(image, return_attention=True)
    model = prepare_network(model, channels_last=True, compile=False, device="cpu")
    assert model.down_sample_layers[1].layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    ours = model(to_network_input(image, True), return_attention=True)
    # The same float32 arithmetic in another summation order: agreement to float32 rounding.
    torch.testing.assert_close(ours.output, reference.output, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ours.attention_maps, reference.attention_maps, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_to_network_input_gives_real_nhwc_strides() -> None:
    image = torch.randn(2, 1, 5, 7)
    nhwc = to_network_input(image, True)
    assert nhwc.stride() == (35, 1, 7, 1) and torch.equal(nhwc, image)
    assert to_network_input(image, False) is image
    assert to_network_input(nhwc, True) is nhwc


def test_float32_result_casts_every_tensor_and_keeps_the_graph() -> None:
    model = AttentionUnet(**TINY)
    with autocast("bf16", "cpu"):
        result = model(torch.randn(1, 1, 16, 16), return_attention=True)
    assert result.output.dtype == torch.bfloat16
    cast = float32_result(result)
    assert type(cast) is type(result)
    tensors = [cast.output, *cast.attention_maps, *cast.skip_norms_before, *cast.skip_norms_after]
    assert all(t.dtype == torch.float32 for t in tensors)
    assert cast.output.requires_grad and cast.attention_maps[0].requires_grad


def test_invalid_backend_falls_back_to_eager_with_one_warning() -> None:
    torch.manual_seed(0)
    model = AttentionUnet(**TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = prepare_network(
            model, channels_last=False, compile=True, device="cpu", backend="no_such_backend"
        )
    fallbacks = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(fallbacks) == 1 and len(caught) == 1
    message = str(fallbacks[0].message)
    assert "\n" not in message and "no_such_backend" in message and "eager" in message
    assert prepared is model  # the eager network itself, which trains
    assert compile_unavailable_reason("cpu", "no_such_backend") is not None
    assert compile_unavailable_reason("meta") == "Inductor generates no code for device type 'meta'"


def test_compiled_checkpoint_round_trip_has_plain_keys() -> None:
    _, trained = _train("sparse_attention_unet", channels_last=True, backend="aot_eager", steps=2)
    assert next(iter(trained.state_dict())).startswith("_orig_mod.")
    network = unwrap(trained)
    assert isinstance(network, AttentionUnet)
    state = network.state_dict()
    eager = AttentionUnet(**TINY)
    assert list(state) == list(eager.state_dict())
    eager.load_state_dict(state)  # strict: every key plain and present
    assert plain_state_dict(trained.state_dict()).keys() == state.keys()
    image = torch.randn(1, 1, SIZE, SIZE)
    eager.eval()
    trained.eval()
    with torch.no_grad():
        expected = trained(to_network_input(image, True), return_attention=True)
        actual = eager(image, return_attention=True)
    torch.testing.assert_close(actual.output, expected.output, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(actual.attention_maps, expected.attention_maps, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_unwrap_and_plain_state_dict_handle_ddp_style_prefixes() -> None:
    model = AttentionUnet(**TINY)
    assert unwrap(model) is model
    prefixed = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}
    assert list(plain_state_dict(prefixed)) == list(model.state_dict())


@pytest.mark.slow
@pytest.mark.skipif(compile_unavailable_reason("cpu") is not None, reason="Inductor cannot run here")
def test_inductor_training_steps_match_eager(fp32_eager) -> None:
    # Inductor's C++ build of forward and backward takes ~25 s cold on 2 cores (cached afterwards).
    torch._dynamo.reset()
    losses, _ = _train("sparse_attention_unet", backend="inductor")
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(fp32_eager["sparse_attention_unet"]), rtol=1e-4, atol=0
    )


def test_timed_regions_wait_for_a_cuda_device_and_not_for_a_cpu(monkeypatch):
    # CUDA kernels run asynchronously; the worker's compute and epoch times must wait for them. Only the
    # routing can be checked without a GPU (benchmarks/gpu_step.py times a real device).
    from mri_models.model_cost import synchronised_clock

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    first = synchronised_clock(torch.device("cpu"))
    assert waited == [] and synchronised_clock(torch.device("cpu")) >= first
    synchronised_clock(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]
