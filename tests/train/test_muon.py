import pytest
import torch

from lmtrain.config import OptimizerConfig
from lmtrain.config.choices import MuonDtype, OptimizerName
from lmtrain.core import devices
from lmtrain.model.transformer import TransformerConfig, TransformerLM
from lmtrain.train.muon import Muon, ns_dtype, orthogonalize
from lmtrain.train.optim import build_optimizer

CPU = torch.device("cpu")
SHAPES = [(48, 16), (16, 48), (32, 32), (128, 512)]


@pytest.mark.parametrize(
    ("capabilities", "kernels", "native"),
    [
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, "AVX2", False),  # the EPYC
        ({"avx512_f": True, "avx512_bf16": False}, "AVX512", False),  # AVX-512 without BF16 (Skylake, Zen 3)
        ({"avx512_bf16": True}, "AVX512", True),  # Zen 4/5, Cooper Lake
        ({"avx512_bf16": True, "amx_bf16": True}, "AVX512", True),  # Sapphire Rapids
        ({"avx512_bf16": True}, "AVX2", False),  # ATEN_CPU_CAPABILITY=avx2: torch's AVX-512 kernels are off
        ({}, "DEFAULT", False),  # a CPU cpuinfo knows nothing of (aarch64 among them)
    ],
)
def test_muon_orthogonalises_in_bf16_only_on_cpus_with_native_bf16(monkeypatch, capabilities, kernels, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels)
    assert devices.cpu_has_native_bf16() is native
    assert ns_dtype(CPU) == (torch.bfloat16 if native else torch.float32)
    assert ns_dtype(torch.device("cuda")) == torch.bfloat16  # as torch.optim.Muon, on every accelerator
    assert ns_dtype(CPU, "fp32") == torch.float32 and ns_dtype(CPU, "bf16") == torch.bfloat16  # forced
    model = TransformerLM(TransformerConfig(vocab_size=20, d_model=16, num_heads=2, num_layers=1))
    common = dict(name=OptimizerName.muon, lr=1e-3, weight_decay=0.0, betas=[0.9, 0.95], momentum=0.95)
    assert build_optimizer(model, OptimizerConfig(**common), CPU).muon.dtype == ns_dtype(CPU)
    fp32 = OptimizerConfig(**common, muon_dtype=MuonDtype.fp32)
    assert build_optimizer(model, fp32, CPU).muon.dtype == torch.float32


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_and_bf16_orthogonalisation_agree_to_bf16_precision(shape):
    """Both dtypes orthogonalise (singular values pulled from a wide spread into Jordan's band around 1), and
    agree to within a few bf16 roundings (2^-8 relative each) compounded over the 5 iterations."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
    grad = u @ torch.diag(torch.logspace(-1.5, 0, min(shape))) @ v.T  # singular values over 1.5 decades
    fp32, bf16 = orthogonalize(grad, torch.float32), orthogonalize(grad, torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and fp32.shape == bf16.shape == grad.shape
    spread = torch.linalg.svdvals(grad)
    assert spread.max() / spread.min() > 30
    for result in (fp32, bf16.float()):
        singular = torch.linalg.svdvals(result)
        assert singular.min() > 0.5 and singular.max() < 1.5
    assert (fp32 - bf16.float()).norm() / fp32.norm() < 8 * 2**-8


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_muon_in_bf16_equals_torch_optim_muon_bitwise_and_fp32_is_close(adjust_lr_fn):
    """Three steps with momentum, Nesterov and weight decay on wide, tall and square matrices: in bf16 the
    same parameters as torch.optim.Muon bit for bit; in fp32 the same updates to bf16's precision."""
    torch.manual_seed(0)
    start = [torch.randn(shape) for shape in SHAPES]
    grads = [[torch.randn(shape) for shape in SHAPES] for _ in range(3)]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn=adjust_lr_fn)

    def train(make):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = make(params)
        for step_grads in grads:
            for param, grad in zip(params, step_grads, strict=True):
                param.grad = grad.clone()
            opt.step()
        return params

    reference = train(lambda p: torch.optim.Muon(p, **kw))
    ours_bf16 = train(lambda p: Muon(p, dtype=torch.bfloat16, **kw))
    ours_fp32 = train(lambda p: Muon(p, dtype=torch.float32, **kw))
    for w, ref, bf16, fp32 in zip(start, reference, ours_bf16, ours_fp32, strict=True):
        assert torch.equal(ref, bf16)
        moved = ref - w * (1 - 0.02 * 0.1) ** 3  # the orthogonalised part of three steps
        assert (fp32 - bf16).norm() / moved.norm() < 8 * 2**-8
