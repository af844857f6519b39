"""Tests for pipeline/losses.py: hand-computed b=2 cases, naive float64 loops, gradchecks, KD fixed
points, ensembles, the unified objective and numerical stability."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline import losses as L


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _unit(b: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


# Hand-worked b = 2, d = 2 example.
# u1 = (1, 0), u2 = (0, 1); v1 = (0.6, 0.8), v2 = (0.8, -0.6)
# dots u_i . v_j = [[0.6, 0.8], [0.8, -0.6]]
IMG2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
TXT2 = torch.tensor([[0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)


def test_sigmoid_contrastive_hand_computed():
    # scale 10, bias -5: logits [[1, 3], [3, -11]]; diagonal y=+1, off-diagonal y=-1
    # terms: softplus(-1), softplus(3), softplus(3), softplus(11); loss = sum / b
    want = (_softplus(-1) + 2 * _softplus(3) + _softplus(11)) / 2
    got = L.sigmoid_contrastive(IMG2, TXT2, 10.0, -5.0)
    assert got.item() == pytest.approx(want, rel=1e-12)
    terms = L.sigmoid_pair_terms(IMG2, TXT2, 10.0, -5.0)
    assert terms.shape == (2, 2)
    assert terms[0, 1].item() == pytest.approx(_softplus(3), rel=1e-12)
    assert terms[1, 1].item() == pytest.approx(_softplus(11), rel=1e-12)


def test_softmax_contrastive_hand_computed():
    # scale 10: logits [[6, 8], [8, -6]] (symmetric)
    # row 1: -log(e^6 / (e^6 + e^8)) = log(1 + e^2); row 2: -log(e^-6 / (e^8 + e^-6)) = log(1 + e^14)
    # columns are the same by symmetry; loss = (1/2b) * 2 * (row1 + row2)
    want = (math.log1p(math.exp(2)) + math.log1p(math.exp(14))) / 2
    got = L.softmax_contrastive(IMG2, TXT2, 10.0)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_softmax_kd_hand_computed():
    # teacher: identity embeddings, scale 1 -> T = [[1, 0], [0, 1]]:
    #   row/column softmax: [s(1), s(-1)] and [s(-1), s(1)] with s = sigmoid
    # student: S = [[6, 8], [8, -6]]: log softmax row 1 = [-log(1+e^2), -log(1+e^-2)],
    #   row 2 = [-log(1+e^-14), -log(1+e^14)]; columns equal rows (symmetric)
    row1 = _sig(1) * math.log1p(math.exp(2)) + _sig(-1) * math.log1p(math.exp(-2))
    row2 = _sig(-1) * math.log1p(math.exp(-14)) + _sig(1) * math.log1p(math.exp(14))
    want = (2 * (row1 + row2)) / (2 * 2)
    got = L.softmax_kd(IMG2, TXT2, 10.0, IMG2, IMG2, 1.0)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_sigmoid_kd_hand_computed():
    # teacher: identity embeddings, scale 2, bias -1 -> T = [[1, -1], [-1, 1]]
    # student: scale 10, bias -5 -> S = [[1, 3], [3, -11]]
    # per pair: -(s(T) log s(S) + s(-T) log s(-S)) = s(T) softplus(-S) + s(-T) softplus(S)
    pairs = [(1, 1), (-1, 3), (-1, 3), (1, -11)]
    want = sum(_sig(t) * _softplus(-s) + _sig(-t) * _softplus(s) for t, s in pairs) / 2
    got = L.sigmoid_kd(IMG2, TXT2, 10.0, -5.0, IMG2, IMG2, 2.0, -1.0)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_feature_matching_hand_computed():
    # image: student (1,0),(0,1) vs teacher (0.6,0.8),(0.8,-0.6):
    #   ||(0.4,-0.8)||^2 = 0.8, ||(-0.8,1.6)||^2 = 3.2; text: identical -> 0
    # loss = (0.8 + 3.2 + 0) / (2 * 2) = 1.0
    got = L.feature_matching_kd(IMG2, TXT2, TXT2, TXT2)
    assert got.item() == pytest.approx(1.0, rel=1e-12)


# ---------------------------------------------------------------- naive float64 loops, odd b and d

B, D, DT = 7, 5, 3


def _naive_sigmoid(u, v, a, c):
    b = u.shape[0]
    tot = 0.0
    for i in range(b):
        for j in range(b):
            y = 1.0 if i == j else -1.0
            tot += _softplus(-y * (a * float(u[i] @ v[j]) + c))
    return tot / b


def _naive_softmax(u, v, a):
    b = u.shape[0]
    l = [[a * float(u[i] @ v[j]) for j in range(b)] for i in range(b)]
    tot = 0.0
    for i in range(b):
        row = math.log(sum(math.exp(l[i][k]) for k in range(b)))
        col = math.log(sum(math.exp(l[k][i]) for k in range(b)))
        tot += (row - l[i][i]) + (col - l[i][i])
    return tot / (2 * b)


def _naive_softmax_kd(u, v, a, ut, vt, at):
    b = u.shape[0]
    s = [[a * float(u[i] @ v[j]) for j in range(b)] for i in range(b)]
    t = [[at * float(ut[i] @ vt[j]) for j in range(b)] for i in range(b)]
    tot = 0.0
    for i in range(b):
        zs_r = math.log(sum(math.exp(s[i][k]) for k in range(b)))
        zt_r = sum(math.exp(t[i][k]) for k in range(b))
        zs_c = math.log(sum(math.exp(s[k][i]) for k in range(b)))
        zt_c = sum(math.exp(t[k][i]) for k in range(b))
        for j in range(b):
            tot += math.exp(t[i][j]) / zt_r * (s[i][j] - zs_r)
            tot += math.exp(t[j][i]) / zt_c * (s[j][i] - zs_c)
    return -tot / (2 * b)


def _naive_sigmoid_kd(u, v, a, c, ut, vt, at, ct):
    b = u.shape[0]
    tot = 0.0
    for i in range(b):
        for j in range(b):
            s = a * float(u[i] @ v[j]) + c
            t = at * float(ut[i] @ vt[j]) + ct
            tot += _sig(t) * math.log(_sig(s)) + _sig(-t) * math.log(_sig(-s))
    return -tot / b


def _naive_fm(u, v, ut, vt, p=None):
    b = u.shape[0]
    tot = 0.0
    for i in range(b):
        zu, zv = (u[i], v[i]) if p is None else (u[i] @ p, v[i] @ p)
        tot += sum(float(x) ** 2 for x in (zu - ut[i])) + sum(float(x) ** 2 for x in (zv - vt[i]))
    return tot / (2 * b)


@pytest.fixture
def batch():
    return dict(u=_unit(B, D, 1), v=_unit(B, D, 2), ut=_unit(B, DT, 3), vt=_unit(B, DT, 4),
                ut_same=_unit(B, D, 5), vt_same=_unit(B, D, 6))


def test_sigmoid_against_loop(batch):
    got = L.sigmoid_contrastive(batch["u"], batch["v"], 7.3, -2.1).item()
    assert got == pytest.approx(_naive_sigmoid(batch["u"], batch["v"], 7.3, -2.1), rel=1e-10)
    terms = L.sigmoid_pair_terms(batch["u"], batch["v"], 7.3, -2.1)
    assert torch.allclose(L.sigmoid_self_terms(batch["u"], batch["v"], 7.3, -2.1), terms.diagonal(), rtol=1e-12)


def test_softmax_against_loop(batch):
    got = L.softmax_contrastive(batch["u"], batch["v"], 12.5).item()
    assert got == pytest.approx(_naive_softmax(batch["u"], batch["v"], 12.5), rel=1e-10)


def test_softmax_kd_against_loop(batch):
    # teacher dim 3 != student dim 5: only the b x b logits are compared
    got = L.softmax_kd(batch["u"], batch["v"], 9.0, batch["ut"], batch["vt"], 20.0).item()
    want = _naive_softmax_kd(batch["u"], batch["v"], 9.0, batch["ut"], batch["vt"], 20.0)
    assert got == pytest.approx(want, rel=1e-10)


def test_sigmoid_kd_against_loop(batch):
    got = L.sigmoid_kd(batch["u"], batch["v"], 9.0, -3.0, batch["ut"], batch["vt"], 15.0, -6.0).item()
    want = _naive_sigmoid_kd(batch["u"], batch["v"], 9.0, -3.0, batch["ut"], batch["vt"], 15.0, -6.0)
    assert got == pytest.approx(want, rel=1e-10)


def test_feature_matching_against_loop(batch):
    got = L.feature_matching_kd(batch["u"], batch["v"], batch["ut_same"], batch["vt_same"]).item()
    assert got == pytest.approx(_naive_fm(batch["u"], batch["v"], batch["ut_same"], batch["vt_same"]), rel=1e-10)
    proj = L.FeatureProjection(D, DT).double()
    got = L.feature_matching_kd(batch["u"], batch["v"], batch["ut"], batch["vt"], proj).item()
    want = _naive_fm(batch["u"], batch["v"], batch["ut"], batch["vt"], proj.weight.detach())
    assert got == pytest.approx(want, rel=1e-10)


def test_feature_matching_needs_projection_when_dims_differ(batch):
    with pytest.raises(ValueError, match="student dim 5 != teacher dim 3"):
        L.feature_matching_kd(batch["u"], batch["v"], batch["ut"], batch["vt"])


def test_projection_init_keeps_unit_norm():
    proj = L.FeatureProjection(4, 9)
    z = _unit(6, 4, 0, torch.float32)
    assert torch.allclose(proj(z).norm(dim=1), torch.ones(6), atol=1e-5)
    with pytest.raises(ValueError, match="last dim 4"):
        proj(torch.zeros(2, 5))


# ---------------------------------------------------------------- gradients


def _req(*ts):
    return [t.clone().requires_grad_(True) for t in ts]


def test_gradcheck_contrastive(batch):
    u, v = _req(batch["u"], batch["v"])
    a, c = _req(torch.tensor(4.0, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64))
    assert torch.autograd.gradcheck(L.sigmoid_contrastive, (u, v, a, c))
    assert torch.autograd.gradcheck(L.softmax_contrastive, (u, v, a))
    assert torch.autograd.gradcheck(lambda x, y, s, t: L.sigmoid_self_terms(x, y, s, t).sum(), (u, v, a, c))


def test_gradcheck_kd(batch):
    u, v = _req(batch["u"], batch["v"])
    a, c = _req(torch.tensor(4.0, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64))
    ut, vt = batch["ut"], batch["vt"]
    assert torch.autograd.gradcheck(lambda x, y, s: L.softmax_kd(x, y, s, ut, vt, 10.0), (u, v, a))
    assert torch.autograd.gradcheck(lambda x, y, s, t: L.sigmoid_kd(x, y, s, t, ut, vt, 10.0, -4.0), (u, v, a, c))
    proj = L.FeatureProjection(D, DT).double()
    assert torch.autograd.gradcheck(lambda x, y, w: L.feature_matching_kd(x, y, ut, vt, lambda z: z @ w),
                                    (u, v, proj.weight.detach().clone().requires_grad_(True)))


def test_teacher_gets_no_gradient(batch):
    ut, vt = _req(batch["ut"], batch["vt"])
    u, v = _req(batch["u"], batch["v"])
    L.softmax_kd(u, v, 5.0, ut, vt, 10.0).backward()
    assert ut.grad is None and vt.grad is None and u.grad is not None


def test_softmax_kd_stationary_when_student_equals_teacher(batch):
    u, v = batch["u"], batch["v"]
    su, sv, sa = _req(u, v, torch.tensor(11.0, dtype=torch.float64))
    loss = L.softmax_kd(su, sv, sa, u, v, 11.0)
    loss.backward()
    for g in (su.grad, sv.grad, sa.grad):
        assert g.abs().max().item() < 1e-12
    # at the fixed point the cross-entropy equals the teacher's entropy (rows + columns)/2b
    t = 11.0 * u @ v.T
    ent = -(torch.softmax(t, 1) * torch.log_softmax(t, 1)).sum() - (torch.softmax(t, 0) * torch.log_softmax(t, 0)).sum()
    assert loss.item() == pytest.approx(ent.item() / (2 * B), rel=1e-12)
    # and any other student is worse
    assert L.softmax_kd(batch["ut_same"], v, 11.0, u, v, 11.0).item() > loss.item()


def test_sigmoid_kd_stationary_when_student_equals_teacher(batch):
    u, v = batch["u"], batch["v"]
    su, sv, sa, sc = _req(u, v, torch.tensor(8.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64))
    L.sigmoid_kd(su, sv, sa, sc, u, v, 8.0, -3.0).backward()
    for g in (su.grad, sv.grad, sa.grad, sc.grad):
        assert g.abs().max().item() < 1e-12


# ---------------------------------------------------------------- ensembles, objective


def test_ensemble_of_identical_teachers_equals_single(batch):
    stu = (batch["u"], batch["v"], 6.0)
    tea = (batch["ut"], batch["vt"], 12.0)
    single = L.softmax_kd(*stu, *tea)
    assert L.ensemble_kd(L.softmax_kd, stu, [tea, tea, tea]).item() == pytest.approx(single.item(), rel=1e-12)
    other = (batch["ut_same"], batch["vt_same"], 30.0)
    mixed = L.ensemble_kd(L.softmax_kd, stu, [tea, other]).item()
    assert mixed == pytest.approx((single.item() + L.softmax_kd(*stu, *other).item()) / 2, rel=1e-12)
    s_stu = (batch["u"], batch["v"], 6.0, -2.0)
    s_tea = (batch["ut"], batch["vt"], 12.0, -4.0)
    assert (L.ensemble_kd(L.sigmoid_kd, s_stu, [s_tea, s_tea]).item()
            == pytest.approx(L.sigmoid_kd(*s_stu, *s_tea).item(), rel=1e-12))
    with pytest.raises(ValueError, match="at least one teacher"):
        L.ensemble_kd(L.softmax_kd, stu, [])


def test_unified_objective_and_weights(batch):
    u, v = _req(batch["u"], batch["v"])
    con = L.sigmoid_contrastive(u, v, 10.0, -10.0)
    kd = L.softmax_kd(u, v, 10.0, batch["ut"], batch["vt"], 20.0)
    fm = L.feature_matching_kd(u, v, batch["ut_same"], batch["vt_same"])
    total, metrics = L.unified_objective(con, {"softmax_kd": (2.0, kd), "fm_kd": (0.5, fm)})
    assert total.item() == pytest.approx(con.item() + 2.0 * kd.item() + 0.5 * fm.item(), rel=1e-12)
    assert set(metrics) == {"contrastive", "softmax_kd", "fm_kd", "total"}
    assert metrics["softmax_kd"].item() == pytest.approx(kd.item()) and not metrics["total"].requires_grad
    total.backward()
    assert u.grad is not None
    with pytest.raises(ValueError, match="weight must be finite"):
        L.unified_objective(con, {"softmax_kd": (-1.0, kd)})
    t0, m0 = L.unified_objective(con, {})
    assert t0.item() == con.item() and set(m0) == {"contrastive", "total"}


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        L.sigmoid_contrastive(torch.zeros(3, 4), torch.zeros(3, 5), 1.0, 0.0)
    with pytest.raises(ValueError, match="teacher batch 2 != student batch 3"):
        L.softmax_kd(torch.zeros(3, 4), torch.zeros(3, 4), 1.0, torch.zeros(2, 4), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="scale must be a scalar"):
        L.softmax_contrastive(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2))


# ---------------------------------------------------------------- stability and precision


@pytest.mark.parametrize("scale", [100.0, 1e4])
def test_huge_logits_stay_finite(scale):
    u = _unit(9, 6, 7, torch.float32)
    v = u.clone()  # perfectly matched pairs: logits up to +scale on the diagonal
    w = -u  # anti-matched: logits down to -scale
    for txt in (v, w, _unit(9, 6, 8, torch.float32)):
        su, sv = _req(u, txt)
        a = torch.tensor(scale, requires_grad=True)
        c = torch.tensor(-10.0, requires_grad=True)
        vals = [L.sigmoid_contrastive(su, sv, a, c), L.softmax_contrastive(su, sv, a),
                L.softmax_kd(su, sv, a, u, _unit(9, 6, 9, torch.float32), scale),
                L.sigmoid_kd(su, sv, a, c, u, w, scale, -10.0)]
        total = sum(vals)
        total.backward()
        assert all(torch.isfinite(x) for x in vals)
        for g in (su.grad, sv.grad, a.grad, c.grad):
            assert torch.isfinite(g).all()
    # the anti-matched sigmoid loss is ~ (scale + 10) per positive pair, computed without overflow
    assert L.sigmoid_self_terms(u, w, scale, -10.0).mean().item() == pytest.approx(scale + 10.0, rel=1e-4)


def test_bf16_inputs_are_upcast():
    u32, v32 = _unit(16, 8, 1, torch.float32), _unit(16, 8, 2, torch.float32)
    u16, v16 = u32.bfloat16(), v32.bfloat16()
    out = L.sigmoid_contrastive(u16, v16, 10.0, -10.0)
    assert out.dtype == torch.float32
    # identical to float32 math on the (rounded) bf16 values
    ref = L.sigmoid_contrastive(u16.float(), v16.float(), 10.0, -10.0)
    assert out.item() == ref.item()
    kd = L.softmax_kd(u16, v16, 10.0, u32.half(), v32.half(), 20.0)
    assert kd.dtype == torch.float32
    assert kd.item() == pytest.approx(L.softmax_kd(u16.float(), v16.float(), 10.0,
                                                   u32.half().float(), v32.half().float(), 20.0).item(), rel=1e-6)


def test_losses_ignore_an_enclosing_autocast():
    # The trainer computes losses inside torch.autocast; the logit matmul must stay float32.
    u, v = _unit(32, 16, 1, torch.float32), _unit(32, 16, 2, torch.float32)
    ut, vt = _unit(32, 8, 3, torch.float32), _unit(32, 8, 4, torch.float32)
    proj = L.FeatureProjection(16, 8)
    fns = [lambda: L.sigmoid_contrastive(u, v, 10.0, -10.0), lambda: L.softmax_contrastive(u, v, 10.0),
           lambda: L.softmax_kd(u, v, 10.0, ut, vt, 20.0), lambda: L.sigmoid_kd(u, v, 10.0, -5.0, ut, vt, 20.0, -8.0),
           lambda: L.feature_matching_kd(u, v, ut, vt, proj)]
    ref = [f() for f in fns]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (u @ v.T).dtype == torch.bfloat16  # the region does recast a bare matmul
        got = [f() for f in fns]
    for r, g in zip(ref, got):
        assert g.dtype == torch.float32 and g.item() == r.item()


# ---------------------------------------------------------------- rows of the loss (data-parallel ranks)
# One process simulates W ranks: rank r's rows are a view of the whole batch and its "gather" returns the
# whole batch (the same tensor, so gradients flow as through a differentiable all-gather). The ranks'
# shares must add up to the plain loss as functions, hence in value and in gradient.
# tests/integration/test_sharded_loss.py runs the same on real gloo ranks with DDP.


def _rank_rows(u, v, world, rank):
    m = u.shape[0] // world
    img, txt = u[rank * m:(rank + 1) * m], v[rank * m:(rank + 1) * m]
    whole = {id(img): u, id(txt): v}
    return L.Rows(img, txt, offset=rank * m, total=u.shape[0], gather=lambda x: whole[id(x)])


def _shares(world: int, fn, *tensors):
    """sum_r fn(rows_r of each (img, txt) pair in `tensors`)."""
    pairs = [tensors[i:i + 2] for i in range(0, len(tensors), 2)]
    return sum(fn(*[_rank_rows(a, b, world, r) for a, b in pairs]) for r in range(world))


ROW_CASES = {
    "sigmoid": (lambda s, a, c: L.sigmoid_contrastive_rows(s, a, c),
                lambda u, v, a, c: L.sigmoid_contrastive(u, v, a, c), 1),
    "softmax": (lambda s, a, c: L.softmax_contrastive_rows(s, a),
                lambda u, v, a, c: L.softmax_contrastive(u, v, a), 1),
    "softmax_kd": (lambda s, t, a, c: L.softmax_kd_rows(s, a, t, 9.0),
                   lambda u, v, ut, vt, a, c: L.softmax_kd(u, v, a, ut, vt, 9.0), 2),
    "sigmoid_kd": (lambda s, t, a, c: L.sigmoid_kd_rows(s, a, c, t, 9.0, -3.0),
                   lambda u, v, ut, vt, a, c: L.sigmoid_kd(u, v, a, c, ut, vt, 9.0, -3.0), 2),
    "fm": (lambda s, t, a, c: L.feature_matching_kd_rows(s, t),
           lambda u, v, ut, vt, a, c: L.feature_matching_kd(u, v, ut, vt), 2),
}


@pytest.mark.parametrize("world", [1, 2, 3, 6])
@pytest.mark.parametrize("kind", sorted(ROW_CASES))
def test_rank_shares_add_up_to_the_plain_loss(kind, world):
    rows_fn, plain_fn, n_pairs = ROW_CASES[kind]
    b = 12
    u, v = _req(_unit(b, D, 1), _unit(b, D, 2))
    a, c = _req(torch.tensor(6.0, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64))
    tea = (_unit(b, D, 3), _unit(b, D, 4)) if n_pairs == 2 else ()
    got = _shares(world, lambda *rows: rows_fn(*rows, a, c), u, v, *tea)
    grads = torch.autograd.grad(got, [u, v, a, c], allow_unused=True)
    ref = plain_fn(u, v, *tea, a, c)
    ref_grads = torch.autograd.grad(ref, [u, v, a, c], allow_unused=True)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


def test_rows_at_w1_are_the_plain_functions_bit_for_bit():
    u, v = _unit(10, 6, 1, torch.float32), _unit(10, 6, 2, torch.float32)
    ut, vt = _unit(10, 4, 3, torch.float32), _unit(10, 4, 4, torch.float32)
    s, t = L.Rows(u, v), L.Rows(ut, vt)
    assert s.whole and s.img_all is u and s.txt_all is v
    assert torch.equal(L.sigmoid_contrastive_rows(s, 10.0, -10.0), L.sigmoid_contrastive(u, v, 10.0, -10.0))
    assert torch.equal(L.softmax_contrastive_rows(s, 10.0), L.softmax_contrastive(u, v, 10.0))
    assert torch.equal(L.softmax_kd_rows(s, 10.0, t, 20.0), L.softmax_kd(u, v, 10.0, ut, vt, 20.0))
    assert torch.equal(L.sigmoid_kd_rows(s, 10.0, -1.0, t, 20.0, -5.0), L.sigmoid_kd(u, v, 10.0, -1.0, ut, vt, 20.0, -5.0))
    proj = L.FeatureProjection(6, 4)
    assert torch.equal(L.feature_matching_kd_rows(s, t, proj), L.feature_matching_kd(u, v, ut, vt, proj))


def test_signs_by_index_arithmetic_are_bit_identical_to_the_identity_matrix_form():
    # _signed replaced y = 2 * eye - 1: values and gradients must not move by a bit (W = 1 unchanged).
    u, v = _req(_unit(33, 8, 1, torch.float32), _unit(33, 8, 2, torch.float32))
    a = torch.tensor(10.0, requires_grad=True)
    c = torch.tensor(-10.0, requires_grad=True)
    got = L.sigmoid_contrastive(u, v, a, c)
    g = torch.autograd.grad(got, [u, v, a, c])
    logits = a * (u @ v.T) + c
    ref = -torch.nn.functional.logsigmoid((2.0 * torch.eye(33) - 1.0) * logits).sum() / 33
    r = torch.autograd.grad(ref, [u, v, a, c])
    assert torch.equal(got, ref)
    assert all(torch.equal(x, y) for x, y in zip(g, r))
    # an off-diagonal block: row i of the block is pair offset + i
    block = torch.zeros(3, 9)
    assert L._signed(block + 1.0, 6).tolist() == [[-1.0] * 6 + [1.0, -1.0, -1.0], [-1.0] * 7 + [1.0, -1.0],
                                                  [-1.0] * 8 + [1.0]]


def test_rows_refuse_misplaced_blocks():
    u = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="need a gather"):
        L.Rows(u, u, offset=4, total=8)
    with pytest.raises(ValueError, match="do not fit a batch of 6"):
        L.Rows(u, u, offset=4, total=6, gather=lambda x: torch.zeros(6, 3))
    bad = L.Rows(u, u, offset=0, total=8, gather=lambda x: torch.zeros(6, 3))
    with pytest.raises(ValueError, match=r"gather returned \(6, 3\), expected \(8, 3\)"):
        L.sigmoid_contrastive_rows(bad, 1.0, 0.0)
    stu = L.Rows(u, u, offset=0, total=8, gather=lambda x: torch.zeros(8, 3))
    tea = L.Rows(u, u, offset=4, total=8, gather=lambda x: torch.zeros(8, 3))
    with pytest.raises(ValueError, match="teacher rows must be the same pairs"):
        L.softmax_kd_rows(stu, 1.0, tea, 1.0)


def test_gathers_happen_on_demand_and_once():
    calls = []
    u = _unit(8, 4, 1, torch.float32)

    def gather(x):
        calls.append(x.shape)
        return torch.cat([x, x])

    rows = L.Rows(u[:4], u[4:], offset=0, total=8, gather=gather)
    L.sigmoid_contrastive_rows(rows, 10.0, -10.0)
    assert len(calls) == 1  # the sigmoid loss needs only the texts
    L.sigmoid_kd_rows(rows, 10.0, -10.0, L.Rows(u[:4], u[4:], offset=0, total=8, gather=gather), 5.0, 0.0)
    L.softmax_contrastive_rows(rows, 10.0)
    assert len(calls) == 1 + 1 + 1  # teacher texts; the student's images; student texts reused


# ---------------------------------------------------------------- column blocks (flat per-rank loss memory)
# The *_rows losses visit a rank's [m, b] logits `block` columns at a time (custom autograd Functions that
# recompute each block in backward). Each rank's share must equal the same share read off the full b x b
# matrices (a naive reference built here, independent of pipeline.losses' row code), in value and in
# gradient, for every block size: dividing b or not, one column, more than b, and m = 1.


def _naive_share(kind, rank, world, u, v, ut, vt, a, c):
    """Rank `rank`'s share of the loss from the full b x b matrices (float64, plain autograd)."""
    b = u.shape[0]
    m = b // world
    mine = slice(rank * m, (rank + 1) * m)
    F = torch.nn.functional
    s = a * (u @ v.T)
    if kind == "sigmoid":
        y = 2.0 * torch.eye(b, dtype=u.dtype) - 1.0
        return -F.logsigmoid(y * (s + c))[mine].sum() / b
    target = torch.arange(b)
    if kind == "softmax":
        ce = F.cross_entropy(s, target, reduction="none") + F.cross_entropy(s.T, target, reduction="none")
        return ce[mine].sum() / (2 * b)
    t = 9.0 * (ut @ vt.T)
    if kind == "softmax_kd":
        rows = (torch.softmax(t, 1) * torch.log_softmax(s, 1)).sum(1)
        cols = (torch.softmax(t, 0) * torch.log_softmax(s, 0)).sum(0)
        return -(rows + cols)[mine].sum() / (2 * b)
    t, s = t - 3.0, s + c   # sigmoid_kd
    return -(torch.sigmoid(t) * F.logsigmoid(s) + torch.sigmoid(-t) * F.logsigmoid(-s))[mine].sum() / b


BLOCK_CASES = {
    "sigmoid": lambda s, t, a, c, k: L.sigmoid_contrastive_rows(s, a, c, block=k),
    "softmax": lambda s, t, a, c, k: L.softmax_contrastive_rows(s, a, block=k),
    "softmax_kd": lambda s, t, a, c, k: L.softmax_kd_rows(s, a, t, 9.0, block=k),
    "sigmoid_kd": lambda s, t, a, c, k: L.sigmoid_kd_rows(s, a, c, t, 9.0, -3.0, block=k),
}


# (block, world, scale) over b = 15: block m (None), dividing neither m = 5 nor b (4), one column, more than
# b; blocked at W = 1 (an option there); m = 1; scale 300: logits far beyond exp's float32 range.
BLOCK_SHAPES = [(None, 3, 6.0), (4, 3, 6.0), (4, 3, 300.0), (1, 3, 6.0), (20, 3, 6.0), (7, 1, 6.0), (7, 1, 300.0),
                (None, 15, 6.0), (2, 15, 300.0)]


@pytest.mark.parametrize("block,world,scale", BLOCK_SHAPES)
@pytest.mark.parametrize("kind", sorted(BLOCK_CASES))
def test_each_ranks_blocked_share_equals_its_rows_of_the_full_matrix(kind, block, world, scale):
    b = 15
    u, v = _req(_unit(b, D, 1), _unit(b, D, 2))
    a, c = _req(torch.tensor(scale, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64))
    ut, vt = _unit(b, DT, 3), _unit(b, DT, 4)
    for rank in range(world):
        stu, tea = _rank_rows(u, v, world, rank), _rank_rows(ut, vt, world, rank)
        got = BLOCK_CASES[kind](stu, tea, a, c, block)
        ref = _naive_share(kind, rank, world, u, v, ut, vt, a, c)
        assert got.dtype == torch.float64 and torch.isfinite(got)
        assert got.item() == pytest.approx(ref.item(), rel=1e-10), (rank, got.item(), ref.item())
        wrt = [u, v, a] if kind in ("softmax", "softmax_kd") else [u, v, a, c]
        for g, r in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(ref, wrt)):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", sorted(BLOCK_CASES))
def test_blocked_losses_pass_gradcheck(kind):
    # A rank in the middle (rows 2..3 of 6) with blocks of 3 columns: a block boundary cuts through its pairs.
    u, v = _req(_unit(6, 3, 1), _unit(6, 3, 2))
    a, c = _req(torch.tensor(4.0, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64))
    ut, vt = _unit(6, 3, 3), _unit(6, 3, 4)
    fn = BLOCK_CASES[kind]
    assert torch.autograd.gradcheck(
        lambda u, v, a, c: fn(_rank_rows(u, v, 3, 1), _rank_rows(ut, vt, 3, 1), a, c, 3), (u, v, a, c))


def test_block_option_at_w1_and_its_validation():
    # W = 1 keeps the plain functions (bit for bit, test above) unless a block is asked for; a block is
    # then the blocked path on the whole batch, equal to the plain loss to rounding.
    u, v = _unit(10, 6, 1), _unit(10, 6, 2)
    s = L.Rows(u, v)
    got = L.softmax_contrastive_rows(s, 10.0, block=3)
    assert got.item() == pytest.approx(L.softmax_contrastive(u, v, 10.0).item(), rel=1e-12)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="block must be a positive int"):
            L.sigmoid_contrastive_rows(s, 10.0, -10.0, block=bad)


def test_blocked_losses_stay_float32_under_autocast():
    # Autocast is off inside the loss, also in the recomputing backward (it runs in the caller's thread on
    # the CPU, inside the caller's autocast region).
    u, v = _req(_unit(12, 8, 1, torch.float32), _unit(12, 8, 2, torch.float32))
    ut, vt = _unit(12, 4, 3, torch.float32), _unit(12, 4, 4, torch.float32)
    stu, tea = _rank_rows(u, v, 3, 1), _rank_rows(ut, vt, 3, 1)
    for kind, fn in BLOCK_CASES.items():
        ref = fn(stu, tea, 10.0, -5.0, None)
        ref_g = torch.autograd.grad(ref, [u, v])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(stu, tea, 10.0, -5.0, None)
            got_g = torch.autograd.grad(got, [u, v])
        assert got.dtype == torch.float32 and got.item() == ref.item(), kind
        assert all(g.dtype == torch.float32 and torch.equal(g, r) for g, r in zip(got_g, ref_g)), kind
