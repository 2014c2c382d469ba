"""Observers: agreement with choose_qparams, moving average, percentile clipping, MSE search, errors."""
import pytest
import torch

from qpass.errors import QuantizationError
from qpass.primitives import quant
from qpass.primitives.observers import (OBSERVERS, MinMaxObserver, MovingAverageMinMaxObserver, MseObserver,
                                        PercentileObserver)
from qpass.primitives.spec import IntFormat, PerChannel, PerGroup, PerHead, PerTensor, PerToken, QSpec, format_from_name


def _batches(shapes, seed=0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * 3 + shift for s in shapes]


def _rows(data):  # [b, s, h] batches -> [tokens, h]
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in data])


def _heads(data):  # [b, H, s, d] batches -> [H, everything else]
    return torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in data], dim=1)


# (spec, batch shapes, reduce_dims, joined data, block size for the joined data)
MINMAX_CASES = [
    (QSpec(IntFormat(8), PerTensor()), [(2, 5, 6), (1, 9, 6)], (), lambda d: torch.cat([x.flatten() for x in d]),
     (-1,)),
    (QSpec(IntFormat(8), PerChannel(-1), symmetric=False), [(2, 5, 6), (3, 2, 6)], (), _rows, (-1, 1)),
    (QSpec(IntFormat(4), PerGroup(3)), [(4, 7), (4, 7)], (), torch.stack, (-1, 1, 3)),  # partial last group
    (QSpec(IntFormat(8), PerHead()), [(1, 3, 5, 4), (2, 3, 2, 4)], (), _heads, (1, -1)),
    (QSpec(IntFormat(4), PerGroup(4), symmetric=False), [(2, 3, 10), (1, 5, 10)], (0, 1), _rows, (-1, 4)),
    (QSpec(format_from_name("fp8_e4m3"), PerChannel(-1)), [(2, 5, 6), (1, 1, 6)], (), _rows, (-1, 1)),
]


@pytest.mark.parametrize("spec,shapes,reduce_dims,join,block", MINMAX_CASES)
def test_minmax_equals_choose_qparams_on_concatenated_data(spec, shapes, reduce_dims, join, block):
    obs = MinMaxObserver(spec, reduce_dims=reduce_dims)
    data = _batches(shapes)
    for x in data:
        obs.update(x)
    scale, zp = obs.qparams()
    assert scale.shape == obs.scale_shape == quant.scale_shape(shapes[0], obs.block_size)
    want_scale, want_zp = quant.choose_qparams(join(data), spec, block_size=block)
    assert torch.equal(scale.flatten(), want_scale.flatten())
    assert (zp is None and want_zp is None) or torch.equal(zp.flatten(), want_zp.flatten())


def test_observer_qparams_drive_the_quantize_op():
    obs = MinMaxObserver(QSpec(IntFormat(8), PerChannel(-1)))
    data = _batches([(2, 5, 6), (1, 3, 6)])
    for x in data:
        obs.update(x)
    scale, zp = obs.qparams()
    y = quant.fake_quantize(torch.randn(4, 7, 6), scale, zp, obs.block_size, "int8")
    assert y.shape == (4, 7, 6)


def test_moving_average_hand_case():
    obs = MovingAverageMinMaxObserver(QSpec(IntFormat(8), PerTensor()), averaging_constant=0.5)
    obs.update(torch.tensor([-1.0, 0.0, 2.0]))
    obs.update(torch.tensor([-3.0, 4.0]))
    assert obs.min_val.item() == -2.0 and obs.max_val.item() == 3.0  # -1 + .5 (-3 + 1), 2 + .5 (4 - 2)
    assert obs.qparams()[0].item() == pytest.approx(3.0 / 127)
    obs.update(torch.tensor([1.0]))  # min -2 + .5 (1 + 2) = -0.5, max 3 + .5 (1 - 3) = 2
    assert (obs.min_val.item(), obs.max_val.item()) == (-0.5, 2.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_matches_torch_quantile(symmetric):
    spec = QSpec(IntFormat(8), PerChannel(-1), symmetric=symmetric)
    obs = PercentileObserver(spec, percentile=99.0)
    data = _batches([(2, 40, 3), (1, 57, 3)], shift=1.0)
    for x in data:
        obs.update(x)
    rows = _rows(data)
    if symmetric:
        hi = torch.quantile(rows.abs(), 0.99, dim=0)
        lo = -hi
    else:
        lo, hi = torch.quantile(rows, 0.01, dim=0), torch.quantile(rows, 0.99, dim=0)
    want = quant.qparams_from_minmax(lo[None, None], hi[None, None], spec)
    torch.testing.assert_close(obs.qparams()[0], want[0], rtol=1e-5, atol=0)
    if not symmetric:
        assert (obs.qparams()[1] - want[1]).abs().max() <= 1


def test_percentile_per_group_with_partial_group():
    spec = QSpec(IntFormat(4), PerGroup(3))
    x = torch.randn(2, 7, generator=torch.Generator().manual_seed(4))
    obs = PercentileObserver(spec, percentile=90.0)
    obs.update(x)
    groups = [x[:, 0:3], x[:, 3:6], x[:, 6:7]]
    want = torch.stack([torch.stack([torch.quantile(gr[i].abs(), 0.9) for gr in groups]) for i in range(2)]) / 7
    torch.testing.assert_close(obs.qparams()[0], want, rtol=1e-5, atol=0)


def test_percentile_clips_an_injected_outlier():
    spec = QSpec(IntFormat(8), PerTensor())
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    x[3, 7] = 1000.0
    pct, mm = PercentileObserver(spec, percentile=99.9), MinMaxObserver(spec)
    pct.update(x)
    mm.update(x)
    assert mm.qparams()[0].item() == pytest.approx(1000.0 / 127)
    assert pct.qparams()[0].item() < 5.0 / 127


def test_percentile_with_a_small_budget_stays_between_percentile_and_max():
    spec = QSpec(IntFormat(8), PerTensor())
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(6))
    obs = PercentileObserver(spec, percentile=99.0, max_values=100)  # needs rank 1000 from the top
    for part in x.split(10_000):
        obs.update(part)
    absmax = obs.qparams()[0].item() * 127
    assert torch.quantile(x.abs(), 0.99).item() <= absmax <= x.abs().max().item()


@pytest.mark.parametrize("fmt,symmetric,gran", [("int4", True, PerTensor()), ("int3", False, PerTensor()),
                                                ("int4", True, PerChannel(0)), ("nf4", True, PerGroup(16)),
                                                ("fp4_e2m1", True, PerChannel(0))])
def test_mse_error_is_at_most_minmax_error(fmt, symmetric, gran):
    spec = QSpec(format_from_name(fmt), gran, symmetric=symmetric)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 64, generator=g)
    x[torch.rand(8, 64, generator=g) < 0.01] *= 6  # outliers
    parts = x.split(4) if gran == PerTensor() else [x]  # weights (per row / group) are observed whole
    errors = {}
    for name in ("minmax", "mse"):
        obs = OBSERVERS[name](spec)
        for part in parts:
            obs.update(part)
        scale, zp = obs.qparams()
        errors[name] = (quant.fake_quantize(x, scale, zp, obs.block_size, fmt) - x).pow(2).mean().item()
    assert errors["mse"] <= errors["minmax"]
    if fmt.startswith("int") and gran == PerTensor():
        assert errors["mse"] < 0.8 * errors["minmax"]


def test_mse_observer_with_partial_groups_and_sampling():
    spec = QSpec(IntFormat(4), PerGroup(5))
    x = torch.randn(6, 13, generator=torch.Generator().manual_seed(8))
    obs = MseObserver(spec, max_samples=30, grid=20)  # 18 groups: one sampled column per group
    obs.update(x)
    obs.update(x * 0.5)
    scale, _ = obs.qparams()
    assert scale.shape == (6, 3) and torch.isfinite(scale).all()
    mm_scale, _ = quant.choose_qparams(x, spec)
    assert (scale <= mm_scale * (1 + 1e-6)).all() and (scale >= mm_scale * 0.2 * (1 - 1e-6)).all()


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observer_errors(name):
    obs = OBSERVERS[name](QSpec(IntFormat(8), PerToken()))
    with pytest.raises(QuantizationError, match="before any update"):
        obs.qparams()
    obs.update(torch.zeros(0, 4))  # ignored
    with pytest.raises(QuantizationError, match="before any update"):
        obs.qparams()
    bad = torch.ones(2, 3, 4)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="1 of 24 values are non-finite"):
        obs.update(bad)
    obs.update(torch.ones(2, 3, 4))
    with pytest.raises(QuantizationError, match="reduce_dims"):  # per-token stats depend on batch/seq
        obs.update(torch.ones(2, 5, 4))


def test_reduce_dims_make_per_token_granularity_static():
    obs = MinMaxObserver(QSpec(IntFormat(8), PerGroup(2)), reduce_dims=(0, 1))
    obs.update(torch.randn(2, 3, 4))
    obs.update(torch.randn(1, 7, 4))
    assert obs.block_size == (-1, -1, 2) and obs.qparams()[0].shape == (1, 1, 2)


def test_all_zero_and_constant_data():
    for name, cls in OBSERVERS.items():
        obs = cls(QSpec(IntFormat(8), PerChannel(-1)))
        obs.update(torch.zeros(2, 3, 2))
        scale, _ = obs.qparams()
        assert torch.equal(scale, torch.full((1, 1, 2), quant.SCALE_FLOOR)), name
        obs = cls(QSpec(IntFormat(8), PerTensor()))
        obs.update(torch.full((4, 4), -2.0))
        assert obs.qparams()[0].item() == pytest.approx(2.0 / 127, rel=1e-6), name
