"""`fewshot-erase memory`: the real erase run on fake tensors, and its accounting adding up."""

import json

import pytest
import torch
from helpers import run_cli

from fewshot_erase import gpu_memory
from fewshot_erase.models import DEMO_DIR

BLOCK = gpu_memory.BLOCK


def rounded(tensors) -> int:
    return sum(-(-t.untyped_storage().nbytes() // BLOCK) * BLOCK for t in tensors)


def test_the_tracker_counts_weights_gradients_optimizer_state_and_activations_by_kind():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        frozen, trained = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
        frozen.requires_grad_(False)
        optimizer = torch.optim.Adam(trained.parameters())
        with gpu_memory.PeakMemory([frozen, trained], list(trained.parameters())) as memory:
            assert memory.live["weights"] == rounded([*frozen.parameters(), *trained.parameters()])
            trained(frozen(torch.randn(64, 256))).pow(2).sum().backward()
            assert memory.live["gradients"] == rounded([p.grad for p in trained.parameters()])
            optimizer.step()
            moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
            assert memory.live["optimizer"] >= rounded(moments)
            assert memory.peak >= memory.live["weights"] + memory.live["gradients"] + 64 * 256 * 4


@pytest.fixture(scope="module")
def demo_estimate():
    return gpu_memory.estimate("sd1", preset="preserve", dtype="bfloat16", folder=DEMO_DIR)


def test_the_demo_erase_runs_on_fake_tensors_and_its_weights_add_up(demo_estimate):
    from transformers import CLIPTextConfig

    config = json.loads((DEMO_DIR / "unet" / "config.json").read_text())
    assert demo_estimate.resolution == config["sample_size"] * 2
    at_peak = demo_estimate.at_peak
    assert sum(at_peak.values()) == demo_estimate.peak
    # the UNet in bf16, the encoder's feed-forward weights in fp32 and the rest of it in bf16 during the loop
    text = CLIPTextConfig.from_json_file(str(DEMO_DIR / "text_encoder" / "config.json"))
    ffn = text.num_hidden_layers * (2 * text.hidden_size * text.intermediate_size + text.hidden_size + text.intermediate_size)
    unet_parameters = 1077572  # demo.json "parameters"
    encoder_parameters = 3367104
    expected = unet_parameters * 2 + ffn * 4 + (encoder_parameters - ffn) * 2
    assert expected <= at_peak["weights"] <= expected + 400 * BLOCK
    # Adam: two fp32 moments of each trained weight, and a step count each
    assert 2 * ffn * 4 <= at_peak["optimizer"] <= 2 * ffn * 4 + 3 * 4 * text.num_hidden_layers * BLOCK
    assert at_peak["gradients"] <= ffn * 4  # stepped in backward: never all of them at once


def test_the_demo_estimate_counts_the_flops_of_every_kind_of_step(demo_estimate):
    flops = demo_estimate.flops
    assert all(flops[name] > 0 for name in ("encode", "report", "report_after", "first_step", "step", "check", "floor"))
    assert flops["step"] > flops["floor"]  # the encoder's forward and backward, and the retain term's rows
    assert demo_estimate.overhead == pytest.approx((flops["step"] + flops["check"] / 4) / flops["floor"])


def test_memory_prints_peak_and_predictions_as_json():
    result = run_cli("memory", "--family", "sd1", "--resolution", "64", "--json")
    assert result.exit_code == 0, result.output
    (estimate,) = json.loads(result.stdout)["estimates"]
    assert estimate["family"] == "sd1" and estimate["resolution"] == 64
    # SD 1.5's UNet alone is 859.5 M parameters: 1.6 GiB in bf16
    assert 1.6 < estimate["at_peak_gib"]["weights"] < 2.2
    assert set(estimate["predicted_seconds"]) == {"H100 SXM", "RTX 4090", "RTX 3060", "RTX 4060"}


@pytest.mark.parametrize("args, message", [
    (["--family", "sd4"], "unknown family 'sd4'"),
    (["--resolution", "500"], "--resolution must be a multiple of 64"),
    (["--preset", "fast"], "unknown preset 'fast'"),
    (["--dtype", "int8"], "--dtype must be bfloat16, float16 or float32"),
    (["--family", "sd1", "--t5-layers", "0-5"], "SD 1.x has no T5"),
    (["--family", "flux", "--t5-layers", "0-999"], "name blocks it has"),
])
def test_memory_refuses_bad_requests_in_one_line(args, message):
    result = run_cli("memory", *args)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("family, low_memory", [("sd1", False), ("sdxl", False), ("sdxl", True)])
def test_an_erase_in_half_precision_writes_the_frozen_weights_unchanged(tiny_model, pictures, tmp_path, family,
                                                                         low_memory):
    """On a GPU the loop holds the encoders' frozen parts in the compute dtype (with --low-memory the whole erase
    does, the fp32 weights on the host); what it writes is still the original's exact weights beside the erased
    feed-forward ones, in fp32 (here bf16 on the CPU takes the same path)."""
    from helpers import erased_tensors

    from fewshot_erase import erase
    from fewshot_erase.keys import canonical_clip_key

    tiny = tiny_model(family)
    result = erase("tiny robot", [pictures], tmp_path / "out", model=str(tiny.folder), steps=2, lr=1e-3,
                   dtype="bfloat16", device="cpu", low_memory=low_memory)
    written = erased_tensors(result.output, family)
    for encoder, tensors in written.items():
        original = {canonical_clip_key(k): v for k, v in getattr(tiny.pipe, encoder).state_dict().items()}
        trained = set(result.record["trained_tensors"][encoder])
        assert any(not torch.equal(tensors[name], original[name]) for name in trained)
        for name, tensor in tensors.items():
            if name not in trained:
                assert tensor.dtype == torch.float32 and torch.equal(tensor, original[name].float()), name


def test_low_memory_writes_the_same_weights_on_the_cpu(tiny_model, pictures, tmp_path):
    """--low-memory keeps the trained weights' fp32 values and Adam on the host and recomputes the UNet's
    activations; on the CPU, in fp32, that is the same computation: the same bytes."""
    from helpers import erased_tensors

    from fewshot_erase import erase

    tiny = tiny_model("sdxl")
    options = dict(model=str(tiny.folder), steps=3, lr=1e-3, device="cpu")
    plain = erase("tiny robot", [pictures], tmp_path / "plain", **options)
    low = erase("tiny robot", [pictures], tmp_path / "low", low_memory=True, **options)
    assert low.record["settings"]["low_memory"]
    for encoder, tensors in erased_tensors(plain.output, "sdxl").items():
        other = erased_tensors(low.output, "sdxl")[encoder]
        assert all(torch.equal(tensor, other[name]) for name, tensor in tensors.items())


def test_an_erase_the_gpu_cannot_hold_runs_again_with_low_memory_from_the_same_start(tiny_model, pictures, tmp_path,
                                                                                  monkeypatch):
    """Out of GPU memory in the default erase: the same erase again with --low-memory, from the original weights,
    with a warning; the result is the erase --low-memory gives (on the CPU, the default's bytes)."""
    from helpers import erased_tensors

    from fewshot_erase import erase, unlearning
    from fewshot_erase.errors import EraseWarning

    tiny = tiny_model("sd1")
    options = dict(model=str(tiny.folder), steps=3, lr=1e-3, device="cpu")
    plain = erase("tiny robot", [pictures], tmp_path / "plain", **options)
    real_step = unlearning.erase_step

    def runs_out_in_the_default(loop, *args, **kwargs):
        if not loop.settings.low_memory and args[-1] == 2:  # the third step, after two have moved the weights
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(loop, *args, **kwargs)

    monkeypatch.setattr(unlearning, "erase_step", runs_out_in_the_default)
    with pytest.warns(EraseWarning, match="ran again with --low-memory"):
        fallen_back = erase("tiny robot", [pictures], tmp_path / "fallen-back", **options)
    assert fallen_back.record["settings"]["low_memory"] and fallen_back.record["steps"] == 3
    first, second = erased_tensors(plain.output, "sd1"), erased_tensors(fallen_back.output, "sd1")
    assert all(torch.equal(first["text_encoder"][name], tensor) for name, tensor in second["text_encoder"].items())


def test_out_of_memory_even_with_low_memory_is_a_run_failure_naming_the_ways_out(tiny_model, pictures, tmp_path,
                                                                                monkeypatch):
    from fewshot_erase import erase, unlearning
    from fewshot_erase.errors import RunFailure

    def always_out(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(unlearning, "erase_step", always_out)
    with pytest.raises(RunFailure, match="ran out of memory even with .low.memory.; pass a smaller .batch.size"):
        erase("tiny robot", [pictures], tmp_path / "out", model=str(tiny_model("sd1").folder), steps=2, device="cpu")
    assert not (tmp_path / "out").exists()
