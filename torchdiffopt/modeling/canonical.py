"""Coefficient form of an expression of degree at most two.

An expression of shape ``S`` with ``k = prod(S)`` entries is stored, entry by entry
(row-major), as

    e_r(x) = const_r + sum_{(r, j, v) in lin} v * x_j + sum_{(r, i, j, v) in quad} v * x_i * x_j

where ``x`` is the model's flat variable vector. The *structure* (the integer row and column
arrays) is numpy and does not depend on parameter values; the *values* (``const`` and the
``vals`` arrays) are torch tensors, computed from the parameter tensors, so the map from
parameters to problem data is differentiated by torch's own autograd and ``torch.func``.
Values may carry leading batch dimensions: ``const`` has shape ``(*batch, k)`` and each
``vals`` array ``(*batch, nnz)``. Repeated ``(row, column)`` pairs are allowed and add up.

Every operation here works on whole arrays (no Python object per scalar term), so building
a model with ten thousand variables and rows costs a few numpy and torch calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..linalg.threads import take_last as take_last_of

_INDEX = np.int64


def join_by_key(left_keys: np.ndarray, right_keys: np.ndarray, n_keys: int):
    """All pairs ``(a, b)`` with ``left_keys[a] == right_keys[b]``, as two index arrays.

    The pairs are grouped by ``a`` in increasing order. This single relational join is the
    work-horse of gathering rows, products of affine expressions and matrix products.
    """
    left_keys = np.asarray(left_keys, dtype=_INDEX)
    right_keys = np.asarray(right_keys, dtype=_INDEX)
    order = np.argsort(right_keys, kind="stable")
    counts = np.bincount(right_keys, minlength=n_keys)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(_INDEX)
    reps = counts[left_keys] if len(left_keys) else np.zeros(0, dtype=_INDEX)
    total = int(reps.sum())
    left = np.repeat(np.arange(len(left_keys), dtype=_INDEX), reps)
    group_start = np.repeat(np.cumsum(reps) - reps, reps)
    within = np.arange(total, dtype=_INDEX) - group_start
    right = order[np.repeat(starts[left_keys], reps) + within] if total else np.zeros(0, _INDEX)
    return left, right


def _batch_shape(*tensors: torch.Tensor) -> tuple:
    # numpy's rule, not torch.broadcast_shapes: the latter imports sympy on first use (~1 s)
    return np.broadcast_shapes(*(tuple(t.shape[:-1]) for t in tensors))


def cat_last(tensors) -> torch.Tensor:
    """Concatenate along the last dimension, broadcasting the leading (batch) dimensions."""
    tensors = list(tensors)
    batch = _batch_shape(*tensors)
    return torch.cat([t.expand(*batch, t.shape[-1]) for t in tensors], dim=-1)


def scatter_add_last(values: torch.Tensor, index: np.ndarray, size: int) -> torch.Tensor:
    """``out[..., index[e]] += values[..., e]`` into a zero tensor of last dimension ``size``."""
    out = values.new_zeros(*values.shape[:-1], size)
    return out.index_add(-1, torch.as_tensor(index, dtype=torch.long), values)


def take_last(values: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``values[..., index]`` (:func:`torchdiffopt.linalg.threads.take_last`)."""
    return take_last_of(values, torch.as_tensor(index, dtype=torch.long, device=values.device))


@dataclass
class Terms:
    """Sparse terms of one degree: ``rows`` and ``vars`` (one array per factor) plus values."""

    rows: np.ndarray
    vars: tuple  # tuple of np.ndarray, one per factor (1 for linear, 2 for quadratic)
    vals: torch.Tensor

    @property
    def nnz(self) -> int:
        return len(self.rows)

    def select(self, entries: np.ndarray, rows: np.ndarray) -> "Terms":
        return Terms(rows, tuple(v[entries] for v in self.vars), take_last(self.vals, entries))

    def scaled(self, factor: torch.Tensor) -> "Terms":
        """Multiply each term by ``factor[..., row]``."""
        return Terms(self.rows, self.vars, self.vals * take_last(factor, self.rows))


def empty_terms(degree: int, like: torch.Tensor) -> Terms:
    z = np.zeros(0, dtype=_INDEX)
    return Terms(z, tuple(z for _ in range(degree)), like.new_zeros(0))


def concat_terms(a: Terms, b: Terms) -> Terms:
    if a.nnz == 0 and a.vals.dim() == 1:
        return b
    if b.nnz == 0 and b.vals.dim() == 1:
        return a
    return Terms(
        np.concatenate((a.rows, b.rows)),
        tuple(np.concatenate(pair) for pair in zip(a.vars, b.vars)),
        cat_last((a.vals, b.vals)),
    )


def stack(canons) -> "Canon":
    """The entries of several coefficient forms one after the other (a concatenation)."""
    canons = list(canons)
    size = sum(c.size for c in canons)
    out, offset = None, 0
    for c in canons:
        placed = c.reduce(np.arange(offset, offset + c.size, dtype=_INDEX), size)
        out = placed if out is None else out + placed
        offset += c.size
    return out


@dataclass
class Canon:
    """Coefficient form of an expression of ``size`` entries (see the module docstring)."""

    size: int
    const: torch.Tensor  # (*batch, size)
    lin: Terms
    quad: Terms

    @property
    def degree(self) -> int:
        if self.quad.nnz:
            return 2
        return 1 if self.lin.nnz else 0

    # -- constructors -------------------------------------------------------------------
    @staticmethod
    def constant(values: torch.Tensor) -> "Canon":
        return Canon(values.shape[-1], values, empty_terms(1, values), empty_terms(2, values))

    @staticmethod
    def variable(offset: int, size: int, dtype: torch.dtype) -> "Canon":
        rows = np.arange(size, dtype=_INDEX)
        const = torch.zeros(size, dtype=dtype)
        lin = Terms(rows, (rows + offset,), torch.ones(size, dtype=dtype))
        return Canon(size, const, lin, empty_terms(2, const))

    # -- structural maps ----------------------------------------------------------------
    def gather(self, source: np.ndarray) -> "Canon":
        """Entry ``o`` of the result is entry ``source[o]`` of ``self`` (indexing, broadcasting,
        transposition and reshaping are all gathers)."""
        source = np.asarray(source, dtype=_INDEX).ravel()
        if len(source) == self.size and np.array_equal(source, np.arange(self.size)):
            return self
        parts = []
        for terms in (self.lin, self.quad):
            out_rows, entries = join_by_key(source, terms.rows, self.size)
            parts.append(terms.select(entries, out_rows))
        return Canon(len(source), take_last(self.const, source), parts[0], parts[1])

    def reduce(self, target: np.ndarray, size: int) -> "Canon":
        """Entry ``r`` of ``self`` is added into entry ``target[r]`` of a result of ``size``."""
        target = np.asarray(target, dtype=_INDEX).ravel()
        lin = Terms(target[self.lin.rows], self.lin.vars, self.lin.vals)
        quad = Terms(target[self.quad.rows], self.quad.vars, self.quad.vals)
        return Canon(size, scatter_add_last(self.const, target, size), lin, quad)

    # -- algebra ------------------------------------------------------------------------
    def __add__(self, other: "Canon") -> "Canon":
        assert self.size == other.size
        return Canon(
            self.size,
            self.const + other.const,
            concat_terms(self.lin, other.lin),
            concat_terms(self.quad, other.quad),
        )

    def scale(self, factor: torch.Tensor) -> "Canon":
        """Multiply entry ``r`` by ``factor[..., r]`` (a parameter-only quantity)."""
        return Canon(self.size, self.const * factor, self.lin.scaled(factor), self.quad.scaled(factor))

    def multiply(self, other: "Canon") -> "Canon":
        """Entrywise product of two expressions of the same size; the degrees must add to ≤ 2."""
        if other.degree == 0:
            return self.scale(other.const)
        if self.degree == 0:
            return other.scale(self.const)
        if self.degree + other.degree > 2:
            raise ValueError(
                "product of degree > 2: the quadratic form holds at most products of two "
                "affine expressions"
            )
        # (a0 + a.x)(b0 + b.x) = a0 b0 + a0 (b.x) + b0 (a.x) + (a.x)(b.x)
        lin = concat_terms(self.lin.scaled(other.const), other.lin.scaled(self.const))
        left, right = join_by_key(self.lin.rows, other.lin.rows, self.size)
        quad = Terms(
            self.lin.rows[left],
            (self.lin.vars[0][left], other.lin.vars[0][right]),
            take_last(self.lin.vals, left) * take_last(other.lin.vals, right),
        )
        return Canon(self.size, self.const * other.const, lin, quad)

    def matmul_left(self, m_rows: np.ndarray, m_cols: np.ndarray, m_vals: torch.Tensor,
                    n_out_rows: int, n_cols: int) -> "Canon":
        """``M @ E`` for a sparse parameter-only matrix ``M`` (entries ``m_rows, m_cols,
        m_vals``, shape ``(n_out_rows, k)``) and ``E = self`` viewed as a ``(k, n_cols)`` array.
        Only the stored entries of ``M`` are visited."""

        def product(rows: np.ndarray, vals: torch.Tensor, vars_: tuple) -> Terms:
            inner, column = np.divmod(rows, n_cols)
            m_index, e_index = join_by_key(m_cols, inner, self.size // n_cols)
            out_rows = m_rows[m_index] * n_cols + column[e_index]
            out_vals = take_last(m_vals, m_index) * take_last(vals, e_index)
            return Terms(out_rows, tuple(v[e_index] for v in vars_), out_vals)

        all_rows = np.arange(self.size, dtype=_INDEX)
        const_terms = product(all_rows, self.const, ())
        size = n_out_rows * n_cols
        const = scatter_add_last(const_terms.vals, const_terms.rows, size)
        lin = product(self.lin.rows, self.lin.vals, self.lin.vars)
        quad = product(self.quad.rows, self.quad.vals, self.quad.vars)
        return Canon(size, const, lin, quad)
