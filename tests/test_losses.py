import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from geoloc.geo import EARTH_RADIUS_KM
from geoloc.losses import (
    GPSContrastiveLoss,
    GPSQueue,
    HaversineSmoothingLoss,
    gather_latlng,
    haversine_smoothed_targets,
)

KM_PER_DEG = EARTH_RADIUS_KM * math.pi / 180  # one degree of a great circle (equator or meridian)


def _random_latlng(n: int, gen: torch.Generator) -> torch.Tensor:
    lat = torch.rad2deg(torch.asin(2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1))
    lng = 360 * torch.rand(n, generator=gen, dtype=torch.float64) - 180
    return torch.stack([lat, lng], 1)


def _angle_km(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, M] great-circle km via unit vectors and atan2, independent of geoloc.geo's haversine."""

    def xyz(p):
        lat, lng = torch.deg2rad(p[:, 0]), torch.deg2rad(p[:, 1])
        return torch.stack([lat.cos() * lng.cos(), lat.cos() * lng.sin(), lat.sin()], -1)

    u, v = xyz(a.double())[:, None, :], xyz(b.double())[None, :, :]
    cross = torch.linalg.cross(u.expand(-1, v.shape[1], -1), v.expand(u.shape[0], -1, -1)).norm(dim=-1)
    return EARTH_RADIUS_KM * torch.atan2(cross, (u * v).sum(-1))


# --- haversine smoothing ------------------------------------------------------------------------------------


def test_exact_exp_ratios_on_a_centroid():
    # point on cell 0; cells 1, 2, 3 lie 1, 2 and 3 degrees of a great circle away (equator and meridian)
    cells = torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -3.0]])
    tau = 65.0
    y = haversine_smoothed_targets(torch.tensor([[0.0, 0.0]], dtype=torch.float64), cells, tau_km=tau)
    w = [math.exp(-k * KM_PER_DEG / tau) for k in range(4)]  # exp(0)=1, exp(-1.7107), exp(-3.4214), ...
    want = [x / sum(w) for x in w]
    assert y.dtype == torch.float64
    assert y[0].tolist() == pytest.approx(want, rel=1e-9)
    assert y[0, 1] / y[0, 0] == pytest.approx(math.exp(-111.19508 / 65), rel=1e-6)
    assert y[0, 0] == pytest.approx(0.82013, abs=1e-5)  # 1 / (1 + 0.18075 + 0.03267 + 0.00591)


def test_rows_sum_to_one_and_nearest_cell_is_heaviest():
    gen = torch.Generator().manual_seed(0)
    cells, pts = _random_latlng(300, gen), _random_latlng(64, gen)
    for tau in (1.0, 65.0, 1000.0):
        y = haversine_smoothed_targets(pts.float(), cells.float(), tau_km=tau)
        assert y.dtype == torch.float32 and y.shape == (64, 300)
        assert (y >= 0).all()
        torch.testing.assert_close(y.sum(1), torch.ones(64), atol=1e-6, rtol=0)
        assert torch.equal(y.argmax(1), _angle_km(pts, cells).argmin(1))


def test_small_tau_approaches_one_hot_and_zero_tau_is_one_hot():
    cells = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    pts = torch.tensor([[0.0, 0.4], [0.0, 0.6], [0.0, 1.9]])  # nearest: 0, 1, 2
    eye = torch.eye(3)
    prev_max_err = 1.0
    for tau in (100.0, 10.0, 1.0):
        err = (haversine_smoothed_targets(pts, cells, tau_km=tau) - eye).abs().max().item()
        assert err < prev_max_err
        prev_max_err = err
    assert prev_max_err < 1e-9
    assert torch.equal(haversine_smoothed_targets(pts, cells, tau_km=0.0), eye)


def test_top_k_keeps_the_k_nearest_and_renormalizes():
    cells = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, -10.0]])
    pt = torch.tensor([[0.0, 1.2]], dtype=torch.float64)  # distances in degrees: 1.2, 0.2, 0.8, 1.8, 11.2
    y = haversine_smoothed_targets(pt, cells, tau_km=200.0, top_k=3)[0]
    assert (y[[3, 4]] == 0).all() and (y[[0, 1, 2]] > 0).all()
    excess = [1.0, 0.0, 0.6]  # degrees beyond the nearest (cell 1)
    w = [math.exp(-e * KM_PER_DEG / 200.0) for e in excess]
    assert y[[0, 1, 2]].tolist() == pytest.approx([x / sum(w) for x in w], rel=1e-6)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-12)
    full = haversine_smoothed_targets(pt, cells, tau_km=200.0)
    assert torch.equal(haversine_smoothed_targets(pt, cells, tau_km=200.0, top_k=5), full)
    assert torch.equal(haversine_smoothed_targets(pt, cells, tau_km=200.0, top_k=50), full)


def test_far_from_every_cell_does_not_underflow():
    cells = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    y = haversine_smoothed_targets(torch.tensor([[0.0, 179.0]]), cells, tau_km=0.5)  # ~19,700 km away
    assert torch.isfinite(y).all() and y.sum().item() == pytest.approx(1.0)
    assert y[0, 1].item() == pytest.approx(1.0)


def test_smoothing_loss_matches_reference():
    gen = torch.Generator().manual_seed(1)
    cells, pts = _random_latlng(50, gen), _random_latlng(8, gen)
    logits = torch.randn(8, 50, generator=gen, dtype=torch.float64, requires_grad=True)
    tau = 300.0
    out = HaversineSmoothingLoss(cells, tau_km=tau)(logits, pts)

    w = torch.exp(-(_angle_km(pts, cells) - _angle_km(pts, cells).min(1, keepdim=True).values) / tau)
    ref_targets = w / w.sum(1, keepdim=True)
    ref = -(ref_targets * (logits - logits.logsumexp(1, keepdim=True))).sum(1).mean()
    torch.testing.assert_close(out["targets"], ref_targets, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-9, atol=1e-12)
    assert not out["targets"].requires_grad
    out["loss"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_zero_tau_uses_cell_ids_or_nearest():
    cells = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    pts = torch.tensor([[0.0, 0.1], [0.0, 1.8]])  # nearest: 0, 2
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    loss = HaversineSmoothingLoss(cells, tau_km=0)
    nearest = loss(logits, pts)
    torch.testing.assert_close(nearest["loss"], F.cross_entropy(logits, torch.tensor([0, 2])))
    given = loss(logits, pts, cell_ids=torch.tensor([1, 1]))
    torch.testing.assert_close(given["loss"], F.cross_entropy(logits, torch.tensor([1, 1])))
    assert torch.equal(given["targets"], torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    # with tau > 0 the labels come from the distances; cell_ids are ignored
    smooth = HaversineSmoothingLoss(cells, tau_km=65.0)
    torch.testing.assert_close(smooth(logits, pts, cell_ids=torch.tensor([1, 1]))["loss"], smooth(logits, pts)["loss"])


def test_smoothing_loss_is_stable_for_huge_logits():
    gen = torch.Generator().manual_seed(2)
    cells, pts = _random_latlng(1000, gen), _random_latlng(16, gen)
    logits = (
        100
        * F.normalize(torch.randn(16, 64, generator=gen), dim=-1)
        @ F.normalize(torch.randn(1000, 64, generator=gen), dim=-1).T
        * 100
    ).requires_grad_()  # |logits| up to ~1e4
    for loss in (HaversineSmoothingLoss(cells), HaversineSmoothingLoss(cells, top_k=10)):
        out = loss(logits, pts)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None
    masked = logits.detach().clone()
    masked[:, 500:] = -float("inf")  # masked cells with zero weight contribute 0, not nan
    assert torch.isfinite(HaversineSmoothingLoss(cells, top_k=1)(masked, cells[:16])["loss"])
    bf16 = HaversineSmoothingLoss(cells)(logits.detach().bfloat16(), pts)["loss"]
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)


def test_smoothing_loss_buffer_state_and_shape_errors():
    cells = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    loss = HaversineSmoothingLoss(cells)
    assert "cell_centroids" in loss.state_dict()
    assert loss.to(torch.float64).cell_centroids.dtype == torch.float64  # buffers follow .to()
    other = HaversineSmoothingLoss(torch.zeros(2, 2))
    other.load_state_dict(loss.state_dict())
    torch.testing.assert_close(other.cell_centroids, cells, check_dtype=False)
    with pytest.raises(ValueError, match=r"\(B, 2\) for 2 cells"):
        loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="tau_km"):
        HaversineSmoothingLoss(cells, tau_km=-1)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        HaversineSmoothingLoss(torch.zeros(3))


# --- GPS queue ----------------------------------------------------------------------------------------------


def _pts(*ids: int) -> torch.Tensor:
    return torch.tensor([[float(i), -float(i)] for i in ids])


def test_queue_fifo_wraparound_and_oversized_batches():
    q = GPSQueue(5)
    assert q.get().shape == (0, 2) and len(q) == 0
    q.enqueue(_pts(0, 1, 2))
    assert torch.equal(q.get(), _pts(0, 1, 2))
    q.enqueue(_pts(3, 4, 5, 6))  # wraps: 0 and 1 fall out
    assert torch.equal(q.get(), _pts(2, 3, 4, 5, 6)) and len(q) == 5
    q.enqueue(_pts(7))  # partial batch
    assert torch.equal(q.get(), _pts(3, 4, 5, 6, 7))
    q.enqueue(torch.zeros(0, 2))
    assert torch.equal(q.get(), _pts(3, 4, 5, 6, 7))
    q.enqueue(_pts(*range(10, 22)))  # bigger than the queue: the newest 5 stay
    assert torch.equal(q.get(), _pts(17, 18, 19, 20, 21))
    snapshot = q.get()
    q.enqueue(_pts(99))
    assert torch.equal(snapshot, _pts(17, 18, 19, 20, 21))  # get() is a copy
    empty = GPSQueue(0)
    empty.enqueue(_pts(1, 2))
    assert empty.get().shape == (0, 2)


def test_queue_state_dict_round_trip_and_to():
    q = GPSQueue(4)
    q.enqueue(_pts(1, 2, 3))
    q.enqueue(_pts(4, 5))
    state = q.state_dict()
    assert set(state) == {"latlng", "ptr", "count"}
    r = GPSQueue(4)
    r.load_state_dict(state)
    assert torch.equal(r.get(), _pts(2, 3, 4, 5))
    r.enqueue(_pts(6))
    q.enqueue(_pts(6))
    assert torch.equal(r.get(), q.get())
    d = r.to(torch.float64)
    assert d.latlng.dtype == torch.float64 and d.ptr.dtype == torch.long
    d.enqueue(_pts(7))
    assert d.get().dtype == torch.float64 and torch.equal(d.get(), _pts(4, 5, 6, 7).double())


def test_gather_latlng_without_distributed_is_identity():
    x = _pts(1, 2)
    assert gather_latlng(x) is x


@pytest.mark.slow
def test_gather_latlng_two_ranks_unequal_sizes(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(
        textwrap.dedent(f"""
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        from geoloc.losses import gather_latlng

        def run(rank):
            dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=rank, world_size=2)
            x = torch.full((3 - rank, 2), float(rank))  # rank 0 has 3 rows, rank 1 has 2
            out = gather_latlng(x)
            assert out.tolist() == [[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2, out
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.spawn(run, nprocs=2)
            print("ok")
    """)
    )
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# --- GPS contrastive loss -----------------------------------------------------------------------------------


def _reference_infonce(img, pos, queue, scale):
    """Mean over rows of logsumexp_j(s * cos(img_i, c_j)) - s * cos(img_i, pos_i), in plain Python floats."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    img = [unit(v) for v in img.tolist()]
    cands = [unit(v) for v in pos.tolist()] + ([unit(v) for v in queue.tolist()] if queue is not None else [])
    total, hits = 0.0, 0
    for i, u in enumerate(img):
        s = [scale * sum(a * b for a, b in zip(u, c)) for c in cands]
        m = max(s)
        total += m + math.log(sum(math.exp(v - m) for v in s)) - s[i]
        hits += max(range(len(s)), key=s.__getitem__) == i
    return total / len(img), hits / len(img)


@pytest.mark.parametrize(("b", "q"), [(3, 4), (5, 0)])
def test_infonce_matches_reference(b, q):
    gen = torch.Generator().manual_seed(10 * b + q)
    img = torch.randn(b, 6, generator=gen, dtype=torch.float64)
    pos = img + 0.8 * torch.randn(b, 6, generator=gen, dtype=torch.float64)  # some rows right, some wrong
    queue = torch.randn(q, 6, generator=gen, dtype=torch.float64) if q else None
    loss = GPSContrastiveLoss(init_temperature=0.1)
    out = loss(img, pos, queue)
    scale = math.exp(loss.logit_scale.item())  # ln(10) as stored in float32
    want_loss, want_acc = _reference_infonce(img, pos, queue, scale)
    assert out["loss"].item() == pytest.approx(want_loss, rel=1e-10)
    assert out["acc"].item() == pytest.approx(want_acc)
    assert out["logit_scale"].item() == pytest.approx(10.0, rel=1e-6)
    if q == 0:  # None and an empty queue are the same
        assert out["loss"].item() == loss(img, pos, torch.zeros(0, 6, dtype=torch.float64))["loss"].item()


def test_infonce_partial_batch_with_queue():
    gen = torch.Generator().manual_seed(3)
    loss, queue = GPSContrastiveLoss(), GPSQueue(6)
    encode = torch.nn.Linear(2, 8).double()
    for b in (4, 2, 4):  # a partial batch between full ones; queue partially filled, then wrapped
        latlng = _random_latlng(b, gen)
        queued = queue.get().double()
        gps = encode(torch.cat([latlng, queued]))  # the queue is re-encoded every step
        img = torch.randn(b, 8, generator=gen, dtype=torch.float64)
        out = loss(img, gps[:b], gps[b:] if len(queued) else None)
        want, _ = _reference_infonce(
            img, gps[:b].detach(), gps[b:].detach() if len(queued) else None, math.exp(loss.logit_scale.item())
        )
        assert out["loss"].item() == pytest.approx(want, rel=1e-10)
        queue.enqueue(latlng)
    assert len(queue) == 6


def test_infonce_gradients_reach_scale_and_embeddings():
    gen = torch.Generator().manual_seed(4)
    img = torch.randn(4, 8, generator=gen, requires_grad=True)
    pos = torch.randn(4, 8, generator=gen, requires_grad=True)
    queue = torch.randn(3, 8, generator=gen, requires_grad=True)
    loss = GPSContrastiveLoss()
    loss(img, pos, queue)["loss"].backward()
    for t in (loss.logit_scale, img, pos, queue):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert [n for n, _ in loss.named_parameters()] == ["logit_scale"]
    frozen = GPSContrastiveLoss(learnable=False)
    assert list(frozen.parameters()) == [] and "logit_scale" in frozen.state_dict()


def test_infonce_scale_is_capped_and_stable():
    loss = GPSContrastiveLoss(init_temperature=1e-4)  # 1 / T = 10000 > cap
    gen = torch.Generator().manual_seed(5)
    img = torch.randn(64, 16, generator=gen, requires_grad=True)
    out = loss(img, img.detach() + 0.01 * torch.randn(64, 16, generator=gen), torch.randn(1000, 16, generator=gen))
    assert out["logit_scale"].item() == pytest.approx(100.0)
    assert torch.isfinite(out["loss"]) and out["acc"].item() == 1.0
    out["loss"].backward()
    assert torch.isfinite(img.grad).all()
    assert loss.logit_scale.grad.item() == 0.0  # at the cap the scale gets no gradient
    # bf16 inputs are scored in float32
    half = GPSContrastiveLoss()(img.detach().bfloat16(), img.detach().bfloat16())
    assert half["loss"].dtype == torch.float32 and torch.isfinite(half["loss"])


def test_infonce_shape_errors():
    loss = GPSContrastiveLoss()
    with pytest.raises(ValueError, match="equal shapes"):
        loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\(Q, 4\)"):
        loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 5))
