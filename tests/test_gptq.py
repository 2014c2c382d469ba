import logging
import re

import pytest
import torch

import qpass
from qpass import IntFormat, PerChannel, PerGroup, QSpec, Recipe
from qpass.graph import META_QUANT, is_quantizer, linear_sites, op_counts, param_of
from qpass.passes import GptqConfig, QuantizeConfig
from qpass.primitives import choose_qparams
from qpass.primitives import quant as Q
from qpass.primitives.gptq import HessianAccumulator, gptq_quantize, reconstruction_error
from tests import toy

W4G8 = QSpec(IntFormat(4), PerGroup(8))
SPECS = [QSpec(IntFormat(4), PerGroup(32)), QSpec(IntFormat(3), PerChannel(0), symmetric=False),
         QSpec(IntFormat(2), PerGroup(16), symmetric=False), QSpec(IntFormat(8), PerGroup(20))]   # 20: partial group


@pytest.fixture(scope="module")
def llama():
    return toy.captured("llama")


def rtn(w, spec):
    block = spec.block_size(w.shape)
    scale, zp = choose_qparams(w, spec, block_size=block)
    return Q.fake_quantize(w, scale, zp, block, spec.format.name)


def layer(out=48, inn=72, n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inn, generator=g), toy.correlated_input(n, inn, seed=seed)


def test_hessian_accumulation_equals_the_closed_form():
    x = torch.randn(5, 7, 12, dtype=torch.float64)
    acc = HessianAccumulator()
    for part in x.split(2):
        acc.update(part)
    flat = x.reshape(-1, 12)
    torch.testing.assert_close(acc.hessian, 2 * flat.T @ flat / flat.shape[0], rtol=1e-12, atol=1e-12)
    assert acc.tokens == 35


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_beats_rtn_on_a_random_layer_and_stays_representable(spec, act_order, static):
    w, x = layer()
    acc = HessianAccumulator()
    acc.update(x)
    res = gptq_quantize(w, acc.hessian, spec, act_order=act_order, static_groups=static, block_size=32)
    block = spec.block_size(w.shape)
    assert torch.equal(Q.fake_quantize(res.weight, res.scale, res.zero_point, block, spec.format.name), res.weight)
    assert reconstruction_error(w, res.weight, acc.xtx) < 0.9 * reconstruction_error(w, rtn(w, spec), acc.xtx)


def test_identity_hessian_reduces_to_rtn():
    w, _ = layer()
    for spec in SPECS:
        res = gptq_quantize(w, torch.eye(w.shape[1]), spec, act_order=True)
        assert torch.equal(res.weight, rtn(w, spec))


def test_lazy_batches_match_column_by_column_updates():
    w, x = layer()
    h = 2 * x.double().T @ x.double() / x.shape[0]
    a = gptq_quantize(w.double(), h, SPECS[0], block_size=128)     # float64: no rounding noise between the two
    b = gptq_quantize(w.double(), h, SPECS[0], block_size=1)
    assert torch.equal(a.weight, b.weight)


def test_act_order_permutation_is_undone():
    w, x = layer()
    h = 2 * x.double().T @ x.double() / x.shape[0]
    spec = QSpec(IntFormat(4), PerChannel(0))            # row scales do not depend on the column order
    res = gptq_quantize(w, h, spec, act_order=True)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    assert torch.equal(res.perm, perm) and not torch.equal(perm, torch.arange(len(perm)))
    manual = gptq_quantize(w[:, perm], h[perm][:, perm], spec)
    assert torch.equal(res.weight, manual.weight[:, torch.argsort(perm)])


def test_static_groups_take_rtn_scales_from_the_original_weights():
    w, x = layer()
    acc = HessianAccumulator()
    acc.update(x)
    res = gptq_quantize(w, acc.hessian, W4G8, act_order=True, static_groups=True)
    scale, _ = choose_qparams(w, W4G8)
    assert torch.equal(res.scale, scale)


def test_cholesky_failure_raises_dampening_with_a_warning():
    w, _ = layer(inn=16)
    x = torch.randn(4, 16)                               # rank 4 < 16: singular without dampening
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("qpass.gptq").addHandler(handler)
    try:
        res = gptq_quantize(w, 2 * x.T @ x, W4G8, percdamp=0.0)
    finally:
        logging.getLogger("qpass.gptq").removeHandler(handler)
    assert res.damp > 0 and any("Cholesky" in r.getMessage() for r in records)


def gptq_recipe(spec=W4G8, **kw):
    return Recipe([QuantizeConfig(weights=spec, ignore=("lm_head",)), GptqConfig(**kw)])


def weight_quantizers(gm):
    return [n for n in gm.graph.nodes if is_quantizer(n) and n.meta[META_QUANT]["role"] == "weight"]


def test_pass_fires_on_llama_and_writes_representable_weights(llama):
    (model, gm), calib = llama, [toy.token_ids(seed=s) for s in range(4)]
    rtn_qm = qpass.apply(gm, Recipe([QuantizeConfig(weights=W4G8, ignore=("lm_head",))]))
    qm = qpass.apply(gm, gptq_recipe(act_order=True), calib_data=calib, progress=False)
    stats = qm.report["gptq"].stats
    assert stats["linears"] == 14 and stats["hessians"] == 8 and stats["blocks"] == 2   # q/k/v and gate/up share
    assert stats["improved"] == 14 and all(e["ratio"] < 1 for e in stats["errors"].values())
    assert op_counts(qm.graph_module) == op_counts(rtn_qm.graph_module)                # no nodes added
    gm = qm.graph_module
    for fq in weight_quantizers(gm):
        w = param_of(gm, fq.args[0])
        zp = param_of(gm, fq.args[2]) if fq.args[2] is not None else None
        assert torch.equal(Q.fake_quantize(w, param_of(gm, fq.args[1]), zp, fq.args[3], fq.args[4]), w)
    ids = toy.token_ids(batch=2, t=12, seed=7)
    ref = model(ids).logits
    assert (qm(ids).logits - ref).pow(2).mean() < (rtn_qm(ids).logits - ref).pow(2).mean()


def test_trained_layers_gptq_error_below_rtn():
    model, x = toy.trained_mlp()
    gm = qpass.capture(model, (x[:4],))
    spec = QSpec(IntFormat(3), PerGroup(16), symmetric=False)
    qm = qpass.apply(gm, Recipe([QuantizeConfig(weights=spec), GptqConfig(act_order=True)]),
                     calib_data=[(c,) for c in x[:256].split(64)], progress=False)
    errors = qm.report["gptq"].stats["errors"]
    assert set(errors) == {"fc1", "fc2"} and all(e["gptq"] < 0.8 * e["rtn"] for e in errors.values())


def test_gpt2_conv1d_layout_is_handled():
    qm = qpass.apply(toy.captured("gpt2")[1], gptq_recipe(QSpec(IntFormat(4), PerGroup(16), symmetric=False)),
                     calib_data=[toy.token_ids(seed=s) for s in range(3)], progress=False)
    stats = qm.report["gptq"].stats
    assert stats["linears"] == 8 and stats["improved"] == 8
    gm = qm.graph_module
    for fq in weight_quantizers(gm):                      # quantizers see W^T of the stored [in, out] weight
        w = fq.args[0]
        w = param_of(gm, w) if w.op == "get_attr" else param_of(gm, w.args[0]).t()
        zp = param_of(gm, fq.args[2])
        assert torch.equal(Q.fake_quantize(w, param_of(gm, fq.args[1]), zp, fq.args[3], fq.args[4]), w)


def test_save_load_round_trip_is_bit_exact(tmp_path):   # llama + awq + gptq: tests/test_awq.py
    model, x = toy.trained_mlp(steps=20)
    rec = Recipe([QuantizeConfig(weights=QSpec(IntFormat(3), PerGroup(16))), GptqConfig(act_order=True)])
    qm = qpass.apply(model, rec, calib_data=[(x[:64],)], example_inputs=(x[:4],), progress=False)
    qm.save(tmp_path / "m")
    back = qpass.load(tmp_path / "m", model=toy.TinyMLP(32, 64, seed=5))
    assert torch.equal(back(x), qm(x))


def test_without_a_preceding_quantize_is_an_error_with_the_fix(llama):
    with pytest.raises(qpass.QuantizationError, match=r"(?s)no quantized weights.*fix: place '- quantize"):
        qpass.apply(llama[1], Recipe([GptqConfig()]), calib_data=[toy.token_ids()])


def test_needs_calibration_data(llama):
    with pytest.raises(qpass.CalibrationError, match="gptq needs calibration data"):
        qpass.apply(llama[1], gptq_recipe())


def test_nothing_to_match_is_a_no_op():
    class NoLinear(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    gm = qpass.capture(NoLinear(), (toy.mlp_input(),))
    qm = qpass.apply(gm, Recipe([GptqConfig()]), calib_data=[(toy.mlp_input(),)])
    assert qm.report["gptq"].stats["linears"] == 0 and qm.report["gptq"].nodes_added == 0


def test_ignored_and_tied_weights_are_near_misses():
    rec = Recipe([QuantizeConfig(weights=W4G8), GptqConfig(ignore=("down_proj",))])
    qm = qpass.apply(toy.captured("llama_tied")[1], rec, calib_data=[toy.token_ids()], progress=False)
    row = qm.report["gptq"]
    assert row.stats["linears"] == 12
    assert any("down_proj: excluded" in m for m in row.near_misses)
    assert any(m.startswith("lm_head") and "tied" in m for m in row.near_misses)


@pytest.mark.parametrize("options,path", [({"damp": -0.1}, "passes[1].gptq.damp"),
                                          ({"block_size": 0}, "passes[1].gptq.block_size"),
                                          ({"blocksize": 64}, "passes[1].gptq.blocksize"),
                                          ({"feed": "fp"}, "passes[1].gptq.feed")])
def test_bad_config_is_a_recipe_error_with_its_path(options, path):
    with pytest.raises(qpass.RecipeError, match="^" + re.escape(path)):
        Recipe.from_dict({"passes": [{"quantize": {"weights": {"bits": 4}}}, {"gptq": options}]})
