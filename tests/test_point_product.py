"""``folding.point_product``: the tangents' products with the point in forward mode, one
``bmm`` also under ``vmap``. Checked against ``einsum`` on plain tensors, under ``vmap`` over
a leading and an inner dimension, with a vmapped point, and under two nested ``vmap``\\ s."""

import pytest
import torch

from torchdiffopt.folding import point_product

F64 = torch.float64
B, D, r, c, V = 3, 4, 5, 6, 7


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    T = torch.randn(V, B, D, r, c, dtype=F64, generator=g)
    x = torch.randn(B, c, dtype=F64, generator=g)
    w = torch.randn(B, r, dtype=F64, generator=g)
    return T, x, w


def test_plain_tensors(data):
    T, x, w = data
    torch.testing.assert_close(point_product(T[0], x, "right"),
                               torch.einsum("bdrc,bc->bdr", T[0], x))
    torch.testing.assert_close(point_product(T[0], w, "left"),
                               torch.einsum("bdrc,br->bdc", T[0], w))


@pytest.mark.parametrize("dim", [0, 2])
def test_under_vmap(data, dim):
    T, x, w = data
    Tv = T.movedim(0, dim)
    right = torch.func.vmap(lambda t: point_product(t, x, "right"), in_dims=dim)(Tv)
    left = torch.func.vmap(lambda t: point_product(t, w, "left"), in_dims=dim)(Tv)
    torch.testing.assert_close(right, torch.einsum("vbdrc,bc->vbdr", T, x))
    torch.testing.assert_close(left, torch.einsum("vbdrc,br->vbdc", T, w))


def test_vmapped_point_and_nested_vmaps(data):
    T, x, _ = data
    xs = torch.stack([x * (1 + v) for v in range(V)])
    torch.testing.assert_close(
        torch.func.vmap(lambda t, y: point_product(t, y, "right"))(T, xs),
        torch.einsum("vbdrc,vbc->vbdr", T, xs))
    T2 = torch.stack((T, -T))
    torch.testing.assert_close(
        torch.func.vmap(torch.func.vmap(lambda t: point_product(t, x, "right")))(T2),
        torch.einsum("uvbdrc,bc->uvbdr", T2, x))


def test_its_derivative_is_refused(data):
    """Under vmap it is an autograd function of its own whose derivative would be a second
    derivative of a solution map."""
    T, x, _ = data
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.func.jacrev(lambda t: torch.func.vmap(
            lambda s: point_product(s, x, "right"))(t))(T)
