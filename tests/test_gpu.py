"""The CUDA path itself: run by `make gpu-check` (pytest -m gpu) on a GPU; skipped elsewhere."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from vpdetect.nn.msdnet import MSDNet  # noqa: E402


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    arch = dict(in_channels=1, n_classes=2, width=2, depth=6, max_dilation=3) | kw
    net = MSDNet(**arch)
    with torch.no_grad():
        for bias in net.layer_biases:
            bias.normal_(0, 0.3)
    return net


def test_cuda_fp32_predictions_equal_the_cpu_engine():
    from vpdetect.nn.engine import fast_predict

    net = _net()
    x = torch.randn(2, 1, 20, 21, 22)
    cpu = fast_predict(net, x)
    gpu = fast_predict(net.to("cuda:0"), x, precision="fp32").cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-5, rtol=1e-4)


def test_tiled_map_on_cuda_equals_the_cpu_map():
    from vpdetect.localize.tiling import predict_map

    volume = np.random.default_rng(0).normal(size=(40, 36, 44)).astype(np.float32)
    cpu = predict_map(_net(), volume, 0.0, 1.0, tile=24, halo=8)
    gpu = predict_map(_net().to("cuda:0"), volume, 0.0, 1.0, tile=24, halo=8, device="cuda:0", precision="fp32")
    np.testing.assert_allclose(gpu, cpu, atol=1e-5)


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_reduced_precisions_stay_close_to_fp32(precision):
    from vpdetect.nn.engine import fast_predict

    net = _net().to("cuda:0")
    x = torch.randn(1, 1, 24, 24, 24)
    reference = fast_predict(net, x, precision="fp32")
    other = fast_predict(net, x, precision=precision)
    assert other.dtype == torch.float32
    assert float((other - reference).abs().max()) < {"tf32": 1e-2, "bf16": 0.1, "fp16": 2e-2}[precision]


def test_conv_path_gradients_on_cuda_equal_the_cpu():
    torch.backends.cudnn.allow_tf32 = False
    try:
        cpu_net, gpu_net = _net(), _net().to("cuda:0")
        gpu_net.method = "conv"
        x = torch.randn(2, 1, 12, 12, 12)
        grads = []
        for net, device in ((cpu_net, "cpu"), (gpu_net, "cuda:0")):
            loss = net(x.to(device)).square().mean()
            grads.append([g.cpu() for g in torch.autograd.grad(loss, list(net.parameters()))])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32 = True


def _train_once(deterministic: bool, amp: bool = False):
    from vpdetect.train.data import CropDataset, TrainingVolume
    from vpdetect.train.loop import TrainConfig, Trainer, fit

    rng = np.random.default_rng(0)
    targets = np.zeros((32, 32, 32), np.int16)
    targets[8:16, 8:16, 8:16] = 1
    volume = (targets + rng.normal(0, 0.3, targets.shape)).astype(np.float32)
    data = TrainingVolume(name="t", volume=volume, mean=float(volume.mean()), std=float(volume.std()),
                          targets=targets, centres_zyx=np.array([[12, 12, 12]]), centre_classes=np.array([1]))
    config = TrainConfig(width=2, depth=6, max_dilation=3, crop_size=16, batch_size=2, epochs=2,
                         steps_per_epoch=3, val_crops=2, deterministic=deterministic, amp=amp)
    trainer = Trainer(config, CropDataset([data], 16, seed=1), CropDataset([data], 16, seed=1, stream=1), "cuda:0")
    fit(trainer)
    return torch.cat([p.detach().flatten().cpu() for p in trainer.model.parameters()]), trainer


def test_deterministic_gpu_training_repeats_bit_for_bit():
    first, _ = _train_once(True)
    second, _ = _train_once(True)
    assert torch.equal(first, second)


def test_amp_training_uses_native_bf16_and_float32_gradients():
    from vpdetect.nn.precision import device_capability, native_bf16

    weights, trainer = _train_once(False, amp=True)
    expected = torch.bfloat16 if native_bf16(device_capability("cuda:0")) else torch.float16
    assert trainer.amp_dtype == expected and torch.isfinite(weights).all()


def test_auto_precision_matches_the_gpu():
    from vpdetect.nn.precision import device_capability, resolve_precision

    capability = device_capability("cuda:0")
    assert resolve_precision("auto", "cuda:0").name == ("tf32" if capability >= (8, 0) else "fp32")


def test_bind_device_and_the_tile_guard_on_a_real_gpu():
    from vpdetect.devices import bind_device
    from vpdetect.errors import VPDetectError
    from vpdetect.localize.tiling import choose_tile

    last = torch.cuda.device_count() - 1
    bind_device(f"cuda:{last}")
    assert torch.cuda.current_device() == last
    bind_device("cuda:0")
    net = MSDNet(1, 2, 2, 49, 7)
    with pytest.raises(VPDetectError, match="use --tile"):
        choose_tile(net, (2048, 2048, 2048), "cuda:0", 1, 4, tile=2048)
    assert 8 <= choose_tile(net, (512, 512, 512), "cuda:0", 1, 4) <= 512
