"""Where the erase's tensors live, and in what dtype, while the loop runs: what a GPU's memory needs, with the
updates unchanged. The CPU computes in fp32, where both are exact (the weights an erase writes are the same bytes).
How much each saves, measured: docs/gpu-memory.md."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .settings import EraseSettings


def adam(weight, settings: EraseSettings) -> torch.optim.Adam:
    # Fused: one kernel for the whole update of a weight instead of one per operation.
    return torch.optim.Adam([weight], lr=settings.lr, betas=settings.betas, eps=settings.eps,
                            weight_decay=settings.weight_decay, fused=weight.device.type in ("cpu", "cuda"))


@contextmanager
def stepped_in_backward(parameters: list, step):
    """`step(parameter)` runs as soon as backward has accumulated that parameter's gradient."""
    hooks = [p.register_post_accumulate_grad_hook(step) for p in parameters]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def stepping_in_backward(trained: dict, settings: EraseSettings):
    """One Adam a trained weight, stepped as soon as backward has accumulated that weight's gradient, which is then
    freed: no gradient outlives its own update (on a GPU, the gradients never all exist at once), and each update is
    the one a single Adam over all the weights would make."""
    parameters = [p for group in trained.values() for p in group.values()]
    optimizers = {p: adam(p, settings) for p in parameters}

    def step(parameter):
        optimizers[parameter].step()
        parameter.grad = None

    with stepped_in_backward(parameters, step):
        yield


@contextmanager
def encoders_held(parts, low_memory: bool):
    """--low-memory on a GPU, around the report's two snapshots and the loop: the text encoders compute in the
    compute dtype, their fp32 weights wait on the host (`parts.held`; the loop's Adam updates the trained ones
    there), and afterwards those host copies are the encoders' weights, ready to be saved. Both snapshots see the
    same encoder precision, and the fp32 encoders never share the GPU with the UNet."""
    if not low_memory or parts.dtype == torch.float32:
        yield
        return
    slots = [(module, key, parameter) for name in parts.family.encoders
             for module in parts.text_encoder(name).modules()
             for key, parameter in module._parameters.items() if parameter is not None]
    parts.held = {parameter: parameter.detach().to(parts.host, copy=True) for _, _, parameter in slots}
    for _, _, parameter in slots:
        parameter.data = parameter.data.to(parts.dtype)
    try:
        yield
    finally:
        for module, key, parameter in slots:
            module._parameters[key] = torch.nn.Parameter(parts.held[parameter], requires_grad=parameter.requires_grad)
        parts.held = {}


@contextmanager
def stepping_on_host(trained: dict, settings: EraseSettings, dtype, host, held: dict):
    """--low-memory: each trained weight's fp32 value and its Adam state wait on the `host`; the GPU holds a copy in
    the compute dtype, which the forward uses. Each backward hands a weight's gradient to the host as soon as it is
    complete, the host takes the Adam step in fp32, and the copy is refreshed; afterwards the weights are the fp32
    values again. The update is fp32 Adam's; the forward sees the weights rounded to `dtype` (on the CPU, in fp32,
    nothing is rounded and the weights are the same bytes as `stepping_in_backward`'s)."""
    parameters = [p for group in trained.values() for p in group.values()]
    # `held`: the fp32 values `encoders_held` keeps on the host, already rounded on the GPU
    masters = {p: held[p] if p in held else p.detach().to(host, copy=True) for p in parameters}
    optimizers = {p: adam(master, settings) for p, master in masters.items()}
    for parameter in parameters:
        parameter.data = parameter.data.to(dtype)

    def step(parameter):
        master = masters[parameter]
        master.grad = parameter.grad.to(host, torch.float32)
        parameter.grad = None
        optimizers[parameter].step()
        master.grad = None
        parameter.data.copy_(master)

    try:
        with stepped_in_backward(parameters, step):
            yield
    finally:
        for parameter, master in masters.items():
            if parameter not in held:
                parameter.data = master.to(parameter.device)


@contextmanager
def frozen_parts_in(encoders, dtype, host):
    """The trained encoders' frozen weights in the compute dtype for the loop (half their memory and their
    activations' in bf16); a module holding trained weights stays fp32, its inputs cast up and its output cast back
    down (under `stepping_on_host` the trained weights are in the compute dtype too, and nothing is cast). The exact
    frozen weights wait on the `host` and come back afterwards, for the report and the save."""
    if dtype == torch.float32:
        yield
        return
    waiting, hooks = {}, []
    for encoder in encoders:
        for module in encoder.modules():
            own = list(module.parameters(recurse=False))
            if any(p.requires_grad and p.dtype == torch.float32 for p in own):
                hooks.append(module.register_forward_pre_hook(lambda module, args: tuple(
                    a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)))
                hooks.append(module.register_forward_hook(lambda module, args, out: out.to(dtype)))
            else:
                for parameter in own:
                    if parameter.dtype != dtype:  # under `encoders_held` everything already is
                        waiting[parameter] = parameter.detach().to(host, copy=True)
                        parameter.data = parameter.data.to(dtype)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for parameter, original in waiting.items():
            parameter.data = original.to(parameter.device)
