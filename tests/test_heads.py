"""Tests for facecluster.models.components.heads (ArcFace / CosFace / AdaFace margin heads)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from facecluster.models.components import (
    HEADS,
    AdaFace,
    ArcFace,
    CosFace,
    MarginHead,
    create_head,
)


def _plane_setup(head: MarginHead, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Puts class 0's centre on e1 and embedding i at angle thetas[i] from it.

    Embeddings are given random norms (the head must normalise them). Returns the
    embeddings and all-zero labels, in float64 (the head is converted to float64).
    """
    torch.manual_seed(0)
    head.double()
    with torch.no_grad():
        head.weight.normal_()
        head.weight[0] = 0.0
        head.weight[0, 0] = 3.0  # Non-unit norm on purpose.
    emb = torch.zeros(len(thetas), head.embedding_dim, dtype=torch.float64)
    emb[:, 0] = torch.cos(thetas)
    emb[:, 1] = torch.sin(thetas)
    emb = emb * torch.empty(len(thetas), 1, dtype=torch.float64).uniform_(0.5, 5.0)
    return emb, torch.zeros(len(thetas), dtype=torch.long)


def _hand_cosine(emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    emb = emb.double()
    weight = weight.double()
    return (emb / emb.norm(dim=1, keepdim=True)) @ (weight / weight.norm(dim=1, keepdim=True)).t()


def _hand_arcface(cos: torch.Tensor, labels: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """ArcFace logits from the definition, via an explicit arccos."""
    theta = torch.arccos(cos.clamp(-1, 1))
    target = torch.where(
        theta + m > math.pi, cos - m * math.sin(m), torch.cos(theta + m)
    )  # insightface's fallback beyond theta + m = pi.
    one_hot = F.one_hot(labels, cos.shape[1]).bool()
    return s * torch.where(one_hot, target, cos)


def test_cosine_matches_hand_and_is_bounded() -> None:
    torch.manual_seed(0)
    head = ArcFace(num_classes=7, embedding_dim=16)
    emb = torch.randn(10, 16) * 10
    # Rows exactly parallel / antiparallel to class centres stress the +-1 bound.
    emb[0] = head.weight[3].detach() * 1e3
    emb[1] = -head.weight[5].detach() * 1e-3
    cos = head.cosine(emb)
    assert cos.shape == (10, 7)
    assert cos.dtype == torch.float32
    assert cos.min() >= -1.0 and cos.max() <= 1.0
    torch.testing.assert_close(cos.double(), _hand_cosine(emb, head.weight), atol=1e-6, rtol=0)
    assert cos[0, 3].item() == pytest.approx(1.0, abs=1e-6)
    assert cos[1, 5].item() == pytest.approx(-1.0, abs=1e-6)


def test_arcface_matches_hand_computation_random() -> None:
    torch.manual_seed(1)
    head = ArcFace(num_classes=11, embedding_dim=8, s=30.0, m=0.4).double()
    emb = torch.randn(20, 8, dtype=torch.float64)
    labels = torch.randint(0, 11, (20,))
    logits = head(emb, labels)
    assert logits.dtype == torch.float64
    expected = _hand_arcface(_hand_cosine(emb, head.weight), labels, 30.0, 0.4)
    torch.testing.assert_close(logits, expected, atol=1e-10, rtol=0)


def test_arcface_matches_hand_including_fallback_region() -> None:
    m, s = 0.5, 64.0
    head = ArcFace(num_classes=4, embedding_dim=6, s=s, m=m)
    # pi - m = 2.6416: the last four angles are in the fallback region.
    thetas = torch.tensor([0.01, 0.5, 1.0, 2.0, 2.6, 2.7, 2.9, 3.1, 3.14], dtype=torch.float64)
    emb, labels = _plane_setup(head, thetas)
    logits = head(emb, labels)

    cos = _hand_cosine(emb, head.weight)
    torch.testing.assert_close(cos[:, 0], torch.cos(thetas), atol=1e-12, rtol=0)
    torch.testing.assert_close(logits, _hand_arcface(cos, labels, s, m), atol=1e-9, rtol=0)

    fallback = thetas + m > math.pi
    assert fallback.sum() == 4
    torch.testing.assert_close(
        logits[fallback, 0], s * (torch.cos(thetas[fallback]) - m * math.sin(m)), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(
        logits[~fallback, 0], s * torch.cos(thetas[~fallback] + m), atol=1e-9, rtol=0
    )
    # Non-target columns carry no margin.
    torch.testing.assert_close(logits[:, 1:], s * cos[:, 1:], atol=1e-9, rtol=0)


@pytest.mark.parametrize("m", [0.2, 0.5, 1.0])
def test_arcface_target_logit_monotonic_across_boundary(m: float) -> None:
    head = ArcFace(num_classes=3, embedding_dim=4, s=64.0, m=m)
    thetas = torch.linspace(1e-3, math.pi - 1e-3, 2001, dtype=torch.float64)
    emb, labels = _plane_setup(head, thetas)
    target = head(emb, labels)[:, 0]
    assert (thetas + m > math.pi).any() and (thetas + m < math.pi).any()
    assert (target.diff() < 0).all()


@pytest.mark.parametrize("head_cls", [ArcFace, CosFace])
def test_margin_lowers_target_logit(head_cls: type[MarginHead]) -> None:
    head = head_cls(num_classes=3, embedding_dim=4)
    m = head.m
    upper = math.pi - m if head_cls is ArcFace else math.pi
    thetas = torch.linspace(1e-3, upper - 1e-3, 500, dtype=torch.float64)
    emb, labels = _plane_setup(head, thetas)
    logits = head(emb, labels)
    without_margin = head.s * head.cosine(emb)
    assert (logits[:, 0] < without_margin[:, 0]).all()
    torch.testing.assert_close(logits[:, 1:], without_margin[:, 1:])


def test_cosface_matches_hand_computation() -> None:
    torch.manual_seed(2)
    head = CosFace(num_classes=9, embedding_dim=12, s=32.0, m=0.25).double()
    emb = torch.randn(15, 12, dtype=torch.float64) * 4
    labels = torch.randint(0, 9, (15,))
    logits = head(emb, labels)
    cos = _hand_cosine(emb, head.weight)
    expected = 32.0 * (cos - 0.25 * F.one_hot(labels, 9).double())
    torch.testing.assert_close(logits, expected, atol=1e-10, rtol=0)


def test_defaults_and_create_head() -> None:
    arc = create_head("arcface", num_classes=5, embedding_dim=8)
    assert isinstance(arc, ArcFace) and (arc.s, arc.m) == (64.0, 0.5)
    cosf = create_head("cosface", num_classes=5, embedding_dim=8, s=None, m=None)
    assert isinstance(cosf, CosFace) and (cosf.s, cosf.m) == (64.0, 0.35)
    custom = create_head("arcface", num_classes=5, embedding_dim=8, s=30.0, m=0.3)
    assert (custom.s, custom.m) == (30.0, 0.3)
    assert custom.weight.shape == (5, 8)
    assert HEADS == {"arcface": ArcFace, "cosface": CosFace, "adaface": AdaFace}
    ada = create_head("adaface", num_classes=5, embedding_dim=8, m=None, h=0.2)
    assert (ada.s, ada.m, ada.h, ada.t_alpha) == (64.0, 0.4, 0.2, 0.01)


def test_weight_init_like_arcface_torch() -> None:
    torch.manual_seed(0)
    head = ArcFace(num_classes=1000, embedding_dim=128)
    assert abs(head.weight.mean().item()) < 1e-3
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("head_cls", [ArcFace, CosFace])
def test_gradcheck_float64(head_cls: type[MarginHead]) -> None:
    torch.manual_seed(3)
    head = head_cls(num_classes=5, embedding_dim=6, s=4.0).double()
    labels = torch.tensor([0, 3, 4, 1])
    emb = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def fn(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return functional_call(head, {"weight": w}, (e, labels))

    assert torch.autograd.gradcheck(fn, (emb, weight))


def test_cosine_and_its_gradients_are_those_of_normalised_rows() -> None:
    """The head's cosine keeps no normalised copy of its weights (at 2M identities x
    512 that copy was 4 GB more per step): the same values and gradients as
    ``F.normalize(e) @ F.normalize(w).T``, rows of any norm."""
    torch.manual_seed(5)
    head = ArcFace(num_classes=7, embedding_dim=6)
    with torch.no_grad():
        head.weight.mul_(torch.rand(7, 1) * 10 + 0.01)  # norms from 0.0003 to 0.4
    emb = torch.randn(5, 6, requires_grad=True)
    reference_weight = head.weight.detach().clone().requires_grad_(True)
    cos = head.cosine(emb)
    expected = F.normalize(emb, dim=1) @ F.normalize(reference_weight, dim=1).T
    torch.testing.assert_close(cos, expected)
    upstream = torch.randn(5, 7)
    mine = torch.autograd.grad((cos * upstream).sum(), (emb, head.weight))
    theirs = torch.autograd.grad((expected * upstream).sum(), (emb, reference_weight))
    for got, want in zip(mine, theirs, strict=True):
        torch.testing.assert_close(got, want)


def test_a_second_derivative_through_the_cosine_is_refused() -> None:
    # its backward treats the rows' norms as constants: a gradient penalty through it
    # (create_graph) would have differentiated it wrongly, without a word
    head = ArcFace(num_classes=5, embedding_dim=4).double()
    emb = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(head.cosine(emb).sum(), emb, create_graph=True)


def test_gradcheck_arcface_in_fallback_region() -> None:
    head = ArcFace(num_classes=3, embedding_dim=4, s=4.0, m=0.5)
    thetas = torch.tensor([0.3, 1.5, 2.9, 3.05], dtype=torch.float64)  # Last two fall back.
    emb, labels = _plane_setup(head, thetas)
    emb.requires_grad_(True)
    weight = head.weight.detach().clone().requires_grad_(True)

    def fn(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return functional_call(head, {"weight": w}, (e, labels))

    assert torch.autograd.gradcheck(fn, (emb, weight))


@pytest.mark.parametrize("head_cls", [ArcFace, CosFace])
def test_gradients_finite_at_cos_plus_minus_one(head_cls: type[MarginHead]) -> None:
    torch.manual_seed(4)
    head = head_cls(num_classes=3, embedding_dim=8)
    emb = torch.stack([head.weight[0].detach() * 5, -head.weight[1].detach() * 5])
    emb.requires_grad_(True)
    loss = F.cross_entropy(head(emb, torch.tensor([0, 1])), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    assert torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("head_cls", [ArcFace, CosFace])
def test_bf16_autocast_keeps_fp32(head_cls: type[MarginHead]) -> None:
    torch.manual_seed(5)
    head = head_cls(num_classes=10, embedding_dim=32)
    emb = torch.randn(8, 32)
    labels = torch.randint(0, 10, (8,))
    reference = head(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(emb, labels)
        cos = head.cosine(emb)
        out_bf16_input = head(emb.bfloat16(), labels)
    assert out.dtype == torch.float32 and cos.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    # bf16 embeddings are upcast before the math, not the other way round.
    assert out_bf16_input.dtype == torch.float32
    torch.testing.assert_close(
        out_bf16_input, head(emb.bfloat16().float(), labels), atol=1e-5, rtol=0
    )


def test_training_step_learns() -> None:
    # A few steps of SGD on separable random clusters must raise the target cosine.
    torch.manual_seed(6)
    head = ArcFace(num_classes=4, embedding_dim=16, s=16.0, m=0.3)
    centres = torch.randn(4, 16)
    labels = torch.arange(4).repeat(8)
    emb = centres[labels] + 0.1 * torch.randn(32, 16)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    before = head.cosine(emb).gather(1, labels[:, None]).mean().item()
    for _ in range(30):
        optimizer.zero_grad()
        F.cross_entropy(head(emb, labels), labels).backward()
        optimizer.step()
    after = head.cosine(emb).gather(1, labels[:, None]).mean().item()
    assert after > before + 0.3


@pytest.mark.parametrize("s", [0.0, -1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("head_cls", [ArcFace, CosFace])
def test_bad_scale(head_cls: type[MarginHead], s: float) -> None:
    with pytest.raises(ValueError, match=r"\bs\b"):
        head_cls(num_classes=3, embedding_dim=4, s=s)


@pytest.mark.parametrize("m", [-0.1, math.pi / 2, 2.0, float("nan")])
def test_arcface_bad_margin(m: float) -> None:
    with pytest.raises(ValueError, match=r"\bm\b"):
        ArcFace(num_classes=3, embedding_dim=4, m=m)


@pytest.mark.parametrize("m", [-0.1, 2.0, float("inf")])
def test_cosface_bad_margin(m: float) -> None:
    with pytest.raises(ValueError, match=r"\bm\b"):
        CosFace(num_classes=3, embedding_dim=4, m=m)


def test_zero_margin_is_plain_scaled_cosine() -> None:
    torch.manual_seed(7)
    for head in (ArcFace(5, 8, s=10.0, m=0.0), CosFace(5, 8, s=10.0, m=0.0)):
        emb = torch.randn(6, 8)
        labels = torch.randint(0, 5, (6,))
        torch.testing.assert_close(head(emb, labels), 10.0 * head.cosine(emb))


def test_bad_name_and_shapes() -> None:
    with pytest.raises(ValueError, match="arcface, cosface"):
        create_head("sphereface", num_classes=3, embedding_dim=4)
    with pytest.raises(ValueError, match="num_classes"):
        ArcFace(num_classes=0, embedding_dim=4)
    with pytest.raises(ValueError, match="embedding_dim"):
        CosFace(num_classes=3, embedding_dim=0)
    head = ArcFace(num_classes=3, embedding_dim=4)
    with pytest.raises(ValueError, match="embeddings"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        head(torch.randn(2, 4), torch.tensor([0, 1, 2]))


def test_margin_can_be_changed_after_construction() -> None:
    # Margin warm-up schedules assign head.m during training.
    torch.manual_seed(8)
    head = ArcFace(num_classes=5, embedding_dim=8, s=10.0, m=0.5).double()
    emb = torch.randn(6, 8, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,))
    head.m = 0.2
    expected = _hand_arcface(_hand_cosine(emb, head.weight), labels, 10.0, 0.2)
    torch.testing.assert_close(head(emb, labels), expected, atol=1e-10, rtol=0)


class _AuthorsAdaFace:
    """The AdaFace head of the authors' code (github.com/mk-minchul/AdaFace, head.py,
    ``AdaFace.forward``), transcribed line by line with its state: the reference."""

    def __init__(self, weight: torch.Tensor, m=0.4, h=0.333, s=64.0, t_alpha=0.01) -> None:
        self.kernel = weight.t()  # the authors keep [d, C]
        self.m, self.h, self.s, self.t_alpha, self.eps = m, h, s, t_alpha, 1e-3
        self.batch_mean = torch.ones(1, dtype=weight.dtype) * 20
        self.batch_std = torch.ones(1, dtype=weight.dtype) * 100

    def forward(self, embbedings, norms, label):
        kernel_norm = self.kernel / self.kernel.norm(dim=0, keepdim=True)
        cosine = torch.mm(embbedings, kernel_norm)
        cosine = cosine.clamp(-1 + self.eps, 1 - self.eps)
        safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
        with torch.no_grad():
            mean = safe_norms.mean().detach()
            std = safe_norms.std().detach()
            self.batch_mean = mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean
            self.batch_std = std * self.t_alpha + (1 - self.t_alpha) * self.batch_std
        margin_scaler = (safe_norms - self.batch_mean) / (self.batch_std + self.eps)
        margin_scaler = torch.clip(margin_scaler * self.h, -1, 1)
        m_arc = torch.zeros(label.size()[0], cosine.size()[1], dtype=cosine.dtype)
        m_arc.scatter_(1, label.reshape(-1, 1), 1.0)
        m_arc = m_arc * (self.m * margin_scaler * -1)
        theta = cosine.acos()
        theta_m = torch.clip(theta + m_arc, min=self.eps, max=math.pi - self.eps)
        cosine = theta_m.cos()
        m_cos = torch.zeros(label.size()[0], cosine.size()[1], dtype=cosine.dtype)
        m_cos.scatter_(1, label.reshape(-1, 1), 1.0)
        cosine = cosine - m_cos * (self.m + (self.m * margin_scaler))
        return cosine * self.s


def test_adaface_matches_the_authors_head_over_steps_of_its_running_statistics() -> None:
    # norms from 0.5 to 60 (clear and blurred faces), three steps so that the running
    # mean and std move; the statistics move in training mode only
    torch.manual_seed(3)
    head = AdaFace(num_classes=9, embedding_dim=8, s=32.0, m=0.4).double()
    reference = _AuthorsAdaFace(head.weight.detach().clone(), s=32.0)
    for _ in range(3):
        direction = F.normalize(torch.randn(12, 8, dtype=torch.float64), dim=1)
        norms = torch.empty(12, 1, dtype=torch.float64).uniform_(0.5, 60.0)
        labels = torch.randint(0, 9, (12,))
        logits = head(direction * norms, labels)
        expected = reference.forward(direction, norms, labels)
        torch.testing.assert_close(logits, expected, atol=1e-9, rtol=0)
        torch.testing.assert_close(head.batch_mean.view(1), reference.batch_mean.view(1))
        torch.testing.assert_close(head.batch_std.view(1), reference.batch_std.view(1))
    # both clips: statistics that put z past [-1, 1], a face on its centre (cos 1) and
    # one opposite it (cos -1), whose angles the clips keep off 0 and pi
    for stats in ((head.batch_mean, head.batch_std), (reference.batch_mean, reference.batch_std)):
        stats[0].fill_(10.0), stats[1].fill_(2.0)
    direction = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    centres = F.normalize(head.weight.detach()[labels], dim=1)
    direction[0], direction[1] = centres[0], -centres[1]
    norms = torch.tensor([[0.2], [40.0], [3.0], [12.0], [25.0], [150.0]], dtype=torch.float64)
    logits = head(direction * norms, labels)
    torch.testing.assert_close(
        logits, reference.forward(direction, norms, labels), atol=1e-9, rtol=0
    )
    z = (norms.clamp(0.001, 100) - head.batch_mean) / (head.batch_std + 1e-3) * head.h
    assert z.min() < -1 and z.max() > 1  # the clip of z was reached, both ways
    # the loss is the cross-entropy of these logits, and its gradient is finite
    emb = (direction * norms).requires_grad_()
    loss = head.loss(emb, labels)
    torch.testing.assert_close(loss, F.cross_entropy(head.eval()(emb, labels), labels))
    loss.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
    kept = head.batch_mean.clone(), head.batch_std.clone()
    head.eval()(emb.detach(), labels)  # evaluation: the statistics stay
    assert torch.equal(head.batch_mean, kept[0]) and torch.equal(head.batch_std, kept[1])
    # a batch of one face: its sample std is NaN, which would stay in the running std
    head.train()(emb.detach()[:1], labels[:1])
    assert torch.isfinite(head.batch_std) and torch.equal(head.batch_std, kept[1])
    assert head.batch_mean != kept[0]
    # cast to bf16 (trainer.precision=bf16-true), the statistics stay float32: a bf16
    # mean near 20 took no update below 0.0625 and stopped short of the batches'
    head = AdaFace(num_classes=9, embedding_dim=8).to(torch.bfloat16)
    assert head.weight.dtype == torch.bfloat16 and head.batch_mean.dtype == torch.float32
    for _ in range(200):
        head(torch.randn(16, 8, dtype=torch.bfloat16) * 5, torch.randint(0, 9, (16,)))
    assert head.batch_mean < 15.5  # 20 x 0.99^200 + 13.7 x (1 - 0.99^200) = 14.5; bf16: 18.25
    assert head.double().batch_mean.dtype == torch.float64  # wider is kept
    head.batch_mean.fill_(14.6012)  # and a cast does not round them through bf16 (a resume
    assert head.to(torch.bfloat16).batch_mean.item() == pytest.approx(14.6012)  # casts after)
    # checkpoints keep the statistics
    assert {"batch_mean", "batch_std"} <= set(head.state_dict())
    for bad, said in (
        ({"h": 0.0}, "h must be"),
        ({"t_alpha": 0.0}, "t_alpha"),
        ({"m": 1.0}, "m must"),
    ):
        with pytest.raises(ValueError, match=said):
            AdaFace(3, 4, **bad)
