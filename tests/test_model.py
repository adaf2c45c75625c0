"""PDD network: shapes, shared/separate students, frozen teachers, eval result, checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch

from pdd import PDDConfig, PDDOutput, build_pdd
from pdd.backbones import WeightsError
from pdd.backbones.vmamba import SS2D
from pdd.backbones.wrn import GemmConv2d
from pdd.checkpoint import load_pdd, save_pdd
from pdd.losses import pdd_loss
from pdd.model import DecoderStage, UpConv2x2, _init_trainable
from pdd.ssm import ScanImplUnavailable

logging.getLogger("pdd.model").setLevel(logging.ERROR)


@pytest.mark.parametrize("size", [256, 128])
def test_shapes(size):
    model = build_pdd(PDDConfig(image_size=size, scan_impl="eager"))
    model.train()
    feats = model(torch.randn(2, 3, size, size))
    s = size // 4
    expected = [(2, 256, s, s), (2, 512, s // 2, s // 2), (2, 1024, s // 4, s // 4)]
    assert [tuple(t.shape) for t in feats.targets] == expected
    assert [tuple(a.shape) for a in feats.prior] == expected
    assert [tuple(b.shape) for b in feats.plain] == expected
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert isinstance(out, PDDOutput)
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, size, size)
    assert torch.isfinite(out.anomaly_map).all()
    torch.testing.assert_close(out.pred_score, out.anomaly_map.flatten(1).amax(1))


def test_non_square_input(small_pdd):
    with torch.no_grad():
        out = small_pdd(torch.randn(1, 3, 64, 96))
    assert out.anomaly_map.shape == (1, 64, 96)


def test_trainable_parameter_count():
    model = build_pdd(PDDConfig(image_size=64))
    assert sum(p.numel() for p in model.trainable_parameters()) == 30_407_424  # ≈ 30.4 M, as the spec says
    separate = build_pdd(PDDConfig(image_size=64, shared_decoder=False))
    n_dec = sum(p.numel() for p in separate.plain_student.parameters())
    assert sum(p.numel() for p in separate.trainable_parameters()) == 30_407_424 + n_dec


def test_shared_decoder_computes_d1_once(small_pdd):
    calls = []
    hook = small_pdd.prior_student.d1.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            feats = small_pdd.features(torch.randn(1, 3, 64, 64))
    finally:
        hook.remove()
    assert len(calls) == 1
    assert feats.prior[2] is feats.plain[2]


def test_separate_students_differ():
    model = build_pdd(PDDConfig(image_size=64, shared_decoder=False)).eval()
    assert model.plain_student is not model.prior_student
    with torch.no_grad():
        feats = model.features(torch.randn(1, 3, 64, 64))
    assert not torch.allclose(feats.prior[2], feats.plain[2])


@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 8, 1, 1)])
def test_upconv_gemm_equals_transposed_convolution(shape):
    torch.manual_seed(0)
    up = UpConv2x2(shape[1], 6)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    up = up.double()
    y = up(x)
    ref = torch.nn.functional.conv_transpose2d(x, up.weight, stride=2)
    assert y.shape == ref.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, up.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, up.weight), g)
    torch.testing.assert_close(gx, rx, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["eager", "graph-parallel", "graph-sequential", "plugin"])
def test_the_model_runs_the_scan_it_was_built_with(impl, monkeypatch):
    """A spy in the four-route table counts the calls of the built implementation: one per SS2D block."""
    import pdd.ss2d as ss2d_module

    calls: dict[str, int] = {}
    for name, fn in list(ss2d_module._SS2D.items()):
        monkeypatch.setitem(ss2d_module._SS2D, name,
                            lambda x, w, name=name, fn=fn: calls.update({name: calls.get(name, 0) + 1}) or fn(x, w))
    model = build_pdd(PDDConfig(image_size=64, scan_impl=impl), graph=impl.startswith("graph")).eval()
    assert {m.scan_impl for m in model.modules() if isinstance(m, SS2D)} == {impl}
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert calls == {impl: 15}  # VMamba-T v0: depths 2, 2, 9, 2


def test_building_with_an_unavailable_scan_is_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(ScanImplUnavailable, match="pip install mamba-ssm"):
        build_pdd(PDDConfig(image_size=64, scan_impl="mamba_ssm"))
    from kernels import cpu_scan

    monkeypatch.setenv("PDD_CACHE_DIR", str(tmp_path))  # nothing cached: it would have to build
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cpu_scan.load.cache_clear()
    try:
        with pytest.raises(ScanImplUnavailable, match=r"'cpu_kernel' is not available.*no-such-cc"):
            build_pdd(PDDConfig(image_size=64, scan_impl="cpu_kernel"))
    finally:
        cpu_scan.load.cache_clear()


def test_graph_build_chooses_the_exportable_layer_forms():
    eager, graph = build_pdd(PDDConfig(image_size=64)), build_pdd(PDDConfig(image_size=64), graph=True)
    ups = [m for m in graph.modules() if isinstance(m, UpConv2x2)]
    assert ups and not any(m.eager_gemm for m in ups)
    assert all(m.eager_gemm for m in eager.modules() if isinstance(m, UpConv2x2))
    assert not any(isinstance(m, GemmConv2d) for m in graph.modules())
    assert any(isinstance(m, GemmConv2d) for m in eager.modules())
    graph.load_state_dict(eager.state_dict(), strict=True)  # same parameters either way
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(graph.eval()(x).anomaly_map, eager.eval()(x).anomaly_map, rtol=1e-4, atol=1e-5)


def test_old_scan_name_in_a_config_is_read_as_eager():
    with pytest.warns(DeprecationWarning, match="'chunked' is deprecated"):
        cfg = PDDConfig.from_dict({"image_size": 64, "scan_impl": "chunked"})
    assert cfg.scan_impl == "eager"


def test_init_is_kaiming_for_conv2d_only():
    """As the authors' code: Conv2d gets Kaiming normal (fan_out); ConvTranspose2d keeps PyTorch's default."""
    stage = DecoderStage(256, 128, blocks=2)
    before = {n: p.detach().clone() for n, p in stage.named_parameters()}
    stage.apply(_init_trainable)
    deconvs = [n for n, m in stage.named_modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    convs = [(n, m) for n, m in stage.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(deconvs) == 2 and len(convs) == 5
    for name in deconvs:
        torch.testing.assert_close(stage.get_submodule(name).weight, before[f"{name}.weight"], rtol=0, atol=0)
    for name, conv in convs:
        w = conv.weight.detach()
        assert not torch.equal(w, before[f"{name}.weight"]), name
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        assert w.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05), name


def test_frozen_teachers_get_no_gradient():
    model = build_pdd(PDDConfig(image_size=64)).train()
    assert not model.teachers.training
    loss = pdd_loss(model(torch.randn(2, 3, 64, 64)), model.cfg.loss)["loss"]
    loss.backward()
    assert all(p.grad is None for p in model.teachers.parameters())
    assert all(not p.requires_grad for p in model.teachers.parameters())
    trainable = model.trainable_parameters()
    assert sum(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable) > 0.9 * len(trainable)


def test_batch_scores_equal_single_image_scores(small_pdd):
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batch = small_pdd(x)
        singles = torch.cat([small_pdd(x[i:i + 1]).pred_score for i in range(3)])
    torch.testing.assert_close(batch.pred_score, singles, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(0, 3, 64, 64), "empty batch"),
    (torch.randn(1, 1, 64, 64), r"\(B, 3, H, W\)"),
    (torch.randn(1, 3, 60, 64), "divisible by 32"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float images"),
])
def test_bad_images_are_refused(small_pdd, bad, match):
    with pytest.raises(ValueError, match=match):
        small_pdd(bad)


def test_checkpoint_round_trip(tmp_path, small_pdd):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = small_pdd(x)
    path = tmp_path / "model.pt"
    save_pdd(small_pdd, path, epoch=7)
    loaded = load_pdd(path).eval()
    assert loaded.cfg.image_size == 64
    with torch.no_grad():
        after = loaded(x)
    torch.testing.assert_close(after.anomaly_map, before.anomaly_map, rtol=0, atol=0)


def test_checkpoint_from_before_the_random_teachers_flag_loads_and_warns(tmp_path, small_pdd, caplog):
    path = tmp_path / "old.pt"
    save_pdd(small_pdd, path)
    payload = torch.load(path, weights_only=True)
    del payload["config"]["random_teachers"]  # written before the flag existed
    torch.save(payload, path)
    with caplog.at_level(logging.WARNING, logger="pdd.checkpoint"):
        model = load_pdd(path)
    assert model.cfg.random_teachers is False
    warnings = [r.getMessage() for r in caplog.records if r.name == "pdd.checkpoint"]
    assert len(warnings) == 1 and "randomly initialised WRN50-2 and VMamba-T" in warnings[0]


def test_checkpoint_with_unknown_key_is_refused(tmp_path, small_pdd):
    path = tmp_path / "model.pt"
    save_pdd(small_pdd, path)
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["ina.extra.weight"] = torch.zeros(1)
    torch.save(obj, path)
    with pytest.raises(WeightsError, match=r"ina\.extra\.weight"):
        load_pdd(path)


def test_teacher_file_is_not_a_pdd_checkpoint(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(WeightsError, match="not a PDD checkpoint"):
        load_pdd(path)
