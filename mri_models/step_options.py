"""Training-step options for GPUs (and CPUs): mixed precision, channels_last and ``torch.compile``.

Pure PyTorch, no Ray: the Ray worker calls these around its existing step. In the order the worker uses
them (``precision`` is ``"fp32"``, ``"bf16"`` or ``"fp16"``)::

    # once, before DDP (Ray Train's prepare_model), which must see the final parameter layout:
    model = prepare_network(model, channels_last=cl, compile=False, device=device)
    model = ray.train.torch.prepare_model(model)          # DDP wrap (unchanged)
    model = compile_network(model, device=device) if compile else model   # compile(DDP(model))
    scaler = make_grad_scaler(precision, device)
    # every step:
    image = to_network_input(image, cl)
    with autocast(precision, device):
        result = model(image, return_attention=True)
    parts = training_loss(float32_result(result), target, weights, provides)   # loss in float32
    ...finiteness check on parts.total as today...
    optimisation_step(parts.total, optimizer, scaler)     # zero_grad, scaled backward, step, update
    # checkpoints: unwrap(model).state_dict() has plain keys (no "_orig_mod." / "module.")

Without DDP, ``prepare_network(model, channels_last=cl, compile=c, device=device)`` does all three.

Precision. ``bf16`` runs the forward under ``torch.autocast`` with bfloat16 on CUDA and on CPU; it has
float32's exponent range, so it needs no loss scaling. ``fp16`` runs it with float16: on CUDA the usual
mixed precision; on CPU torch (>= 2.4) supports float16 autocast and a CPU ``GradScaler`` too, so it is
allowed there and behaves the same (it is correct, and what the tests use); whether it is faster than
fp32 depends on the CPU's fp16 units (AVX512-FP16 / AMX-FP16), and bf16 is the better CPU choice where
AMX-BF16 exists (this machine has AMX-BF16 and AVX512-FP16, no AMX-FP16). float16's narrow exponent
range needs loss scaling, so :func:`make_grad_scaler` returns an enabled ``torch.amp.GradScaler`` for
``fp16`` and a disabled one (a pass-through: ``scale`` returns the loss, ``step`` calls
``optimizer.step()``, ``update`` does nothing) otherwise, so the worker's code is the same for all three.

Float32 loss. The autocast region covers the network only. :func:`float32_result` casts the network's
output, attention maps and skip norms to float32 (``Tensor.float()``, differentiable, a no-op for float32
tensors) before :func:`mri_models.losses.training_loss`, so the L1 loss, the penalties and every logged
metric are computed in float32 outside autocast; the gradient flows back into the low-precision graph
through the casts.

Compile. :func:`compile_network` checks what Inductor needs before wrapping (a Dynamo-supported Python,
a known backend name, a C/C++ compiler for CPU code, Triton for CUDA code, a device Inductor generates
code for) and, when something is missing, returns the network uncompiled with one
:class:`CompileFallbackWarning` naming the reason. A compiled network's ``state_dict`` keys carry an
``_orig_mod.`` prefix (``module.`` for DDP): save ``unwrap(model).state_dict()``; old prefixed state dicts
load after :func:`plain_state_dict`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "PRECISIONS",
    "CompileFallbackWarning",
    "Precision",
    "autocast",
    "compile_network",
    "compile_unavailable_reason",
    "float32_result",
    "make_grad_scaler",
    "optimisation_step",
    "plain_state_dict",
    "prepare_network",
    "to_network_input",
    "unwrap",
]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Device types Inductor generates code for (CPU: C++/OpenMP; the others: Triton or Metal).
_INDUCTOR_DEVICES = ("cpu", "cuda", "xpu", "mps")
# Prefixes wrappers put in front of state-dict keys: torch.compile's OptimizedModule, DDP/DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CompileFallbackWarning(RuntimeWarning):
    """``torch.compile`` cannot work here; the network runs eagerly."""


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


# --- compile --------------------------------------------------------------------------------------------


def _cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use for CPU code, or None when there is none."""
    try:
        from torch._inductor import cpp_builder

        compiler = cpp_builder.get_cpp_compiler()
    except Exception:  # raises when no candidate compiler exists (or the private API moved)
        return None
    return compiler if shutil.which(compiler) else None


def compile_unavailable_reason(device: str | torch.device, backend: str = "inductor") -> str | None:
    """Why ``torch.compile(..., backend=backend)`` cannot run on ``device`` here, or None if it can.

    Only what is cheap to check without compiling: Dynamo support of this Python, the backend name, and
    for Inductor the device type and its code generator's tool chain.

    Args:
        device: Where the network runs.
        backend: A ``torch.compile`` backend name.
    """
    import torch._dynamo

    device = _device(device)
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (Dynamo) is not supported on this Python/platform"
    try:
        torch._dynamo.lookup_backend(backend)
    except Exception as error:  # InvalidBackend, or a backend whose import fails
        return f"backend {backend!r} is not available ({type(error).__name__}: {str(error).splitlines()[0]})"
    if backend != "inductor":
        return None
    if device.type not in _INDUCTOR_DEVICES:
        return f"Inductor generates no code for device type {device.type!r}"
    if device.type == "cpu" and _cpp_compiler() is None:
        return "Inductor needs a C/C++ compiler for CPU code and none was found (install g++ or set CXX)"
    if device.type in ("cuda", "xpu"):
        from torch.utils._triton import has_triton

        if not has_triton():
            return f"Inductor needs Triton for {device.type} code and it is not installed"
    return None


def compile_network(
    model: nn.Module,
    *,
    device: str | torch.device,
    backend: str = "inductor",
    mode: str | None = None,
    fullgraph: bool = False,
) -> nn.Module:
    """``torch.compile(model)``, or ``model`` itself with one warning when compiling cannot work here.

    Compilation is lazy: the first call of the returned module compiles (a minute or more at paper size;
    Inductor caches its kernels under ``TORCHINDUCTOR_CACHE_DIR``). With DDP, compile the DDP-wrapped
    model so that Dynamo splits the graph at DDP's gradient buckets.

    Args:
        model: The network (or its DDP wrapper), already on ``device``.
        device: Where it runs (decides the code generator that must be present).
        backend: ``torch.compile`` backend.
        mode: ``torch.compile`` mode (``None``, ``"reduce-overhead"``, ``"max-autotune"``, ...).
        fullgraph: Fail on graph breaks instead of splitting (the networks here trace whole).

    Returns:
        The compiled module (an ``OptimizedModule``: :func:`unwrap` gives the original back), or ``model``.
    """
    reason = compile_unavailable_reason(device, backend)
    if reason is None:
        try:
            return torch.compile(model, backend=backend, mode=mode, fullgraph=fullgraph)
        except Exception as error:  # e.g. an unknown mode: same policy, run eagerly and say why
            reason = f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0]}"
    # One line, naming the reason, so that a worker's log says why its steps are not compiled.
    warnings.warn(f"torch.compile disabled, running eagerly: {reason}", CompileFallbackWarning, stacklevel=2)
    return model


def prepare_network(
    model: nn.Module,
    *,
    channels_last: bool,
    compile: bool,
    device: str | torch.device,
    backend: str = "inductor",
    mode: str | None = None,
) -> nn.Module:
    """Move a network to ``device``, optionally to channels_last memory format, optionally compile it.

    Args:
        model: The freshly built (or loaded) network.
        channels_last: Convert the 4-D parameters to ``torch.channels_last`` (NHWC). Feed it inputs from
            :func:`to_network_input` so that no layer converts back and forth.
        compile: Apply :func:`compile_network` (with DDP, pass False and compile the DDP wrapper instead).
        device: Target device.
        backend: ``torch.compile`` backend.
        mode: ``torch.compile`` mode.

    Returns:
        The prepared network: ``model`` itself (moved in place) or its compiled wrapper.
    """
    device = _device(device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = compile_network(model, device=device, backend=backend, mode=mode)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The original network inside ``torch.compile``'s and DDP's wrappers (in any nesting order).

    Its ``state_dict()`` has the plain keys that load into an eager network of the same architecture.
    """
    # An OptimizedModule can only exist once Dynamo was imported: do not import it (slow:
    # benchmarks/README.md, Measured without a script) just to check.
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    compiled = dynamo.OptimizedModule if dynamo is not None else ()
    while True:
        if isinstance(model, compiled):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def plain_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict with the wrappers' key prefixes (``_orig_mod.``, ``module.``) removed.

    For checkpoints saved from a wrapped model; :func:`unwrap` avoids writing them in the first place.
    """
    plain = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        plain[key] = value
    return plain


# --- inputs and precision -------------------------------------------------------------------------------


def to_network_input(tensor: Tensor, channels_last: bool) -> Tensor:
    """A batch ``(N, C, H, W)`` in the memory format the network was prepared with.

    With one channel (the MRI images) NCHW and NHWC hold the same bytes and torch would keep NCHW strides;
    the copy gives real NHWC strides so the first convolution already runs channels_last. Inputs of
    other ranks are returned unchanged.

    Args:
        tensor: The batch, already on the network's device.
        channels_last: What :func:`prepare_network` was called with.
    """
    if not channels_last or tensor.dim() != 4:
        return tensor
    if tensor.stride(1) == 1 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor
    return torch.empty_like(tensor, memory_format=torch.channels_last).copy_(tensor)


def check_precision_supported(precision: Precision, device: str | torch.device) -> None:
    """Raise one readable line when the device cannot run ``precision`` (bf16 on a pre-Ampere GPU).

    Raises:
        ValueError: naming the device and what to use instead.
    """
    device = _device(device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
            "use precision=fp16 (with loss scaling) or fp32"
        )


@contextlib.contextmanager
def autocast(precision: Precision, device: str | torch.device) -> Iterator[None]:
    """Context for the network's forward pass in the given precision (``torch.autocast``).

    ``fp32`` disables autocast (a nested region inherits nothing); ``bf16`` and ``fp16`` enable it with
    that dtype on the device's type, CPU included. Compute the loss outside the context, on
    :func:`float32_result`.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: Where the network runs.

    Raises:
        ValueError: For an unknown precision.
    """
    dtype = _check_precision(precision)
    device = _device(device)
    with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
        yield


def float32_result(result: Any) -> Any:
    """The network's result with its tensors in float32, for the loss and the metrics.

    Casts ``output`` and, when present, ``attention_maps``, ``skip_norms_before`` and ``skip_norms_after``
    with ``Tensor.float()`` (differentiable; float32 tensors are returned as they are). Works on the
    NamedTuple our networks return, on dataclasses, and on a bare tensor.

    Args:
        result: What ``model(image, return_attention=True)`` returned.
    """
    if isinstance(result, Tensor):
        return result.float()
    fields = {"output": result.output.float()}
    for name in ("attention_maps", "skip_norms_before", "skip_norms_after"):
        if hasattr(result, name):
            fields[name] = tuple(t.float() for t in getattr(result, name))
    if hasattr(result, "_replace"):
        return result._replace(**fields)
    if dataclasses.is_dataclass(result):
        return dataclasses.replace(result, **fields)
    raise TypeError(f"cannot rebuild a {type(result).__name__} with float32 tensors")


def make_grad_scaler(precision: Precision, device: str | torch.device) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler``: enabled for ``fp16``, a pass-through for ``fp32`` and ``bf16``.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: Where the network runs (the scaler's device type).
    """
    _check_precision(precision)
    return torch.amp.GradScaler(_device(device).type, enabled=precision == "fp16")


def optimisation_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """One update with loss-scaling semantics: zero the gradients, backward, step, update the scale.

    With an enabled scaler, the loss is multiplied by the scale before ``backward``, ``scaler.step``
    unscales the gradients and skips ``optimizer.step()`` when any of them is inf/NaN (the scale then
    shrinks in ``update``). With a disabled scaler this is exactly ``zero_grad(set_to_none=True)``,
    ``loss.backward()``, ``optimizer.step()``.

    Args:
        loss: The float32 scalar to minimise.
        optimizer: The optimiser of the network's parameters.
        scaler: From :func:`make_grad_scaler`.

    Returns:
        Whether the optimiser stepped (False only when an fp16 step was skipped for inf/NaN gradients;
        reading the scale synchronises with the device, as the worker's ``loss.item()`` already does).
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if not scaler.is_enabled():
        optimizer.step()
        return True
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    # update() lowers the scale exactly when step() found non-finite gradients and skipped.
    return scaler.get_scale() >= scale
