"""Symbolic, numpy-like expressions of variables and parameters.

Expressions are array-shaped trees built with ``+ - * / @ **``, indexing, ``.sum()``, ``.T``
and the helpers :func:`dot`, :func:`sum_squares`. Nothing is evaluated while a model is
built: :class:`Evaluator` turns a tree into its coefficient form
(:class:`~torchdiffopt.modeling.canonical.Canon`) for given parameter tensors, so the problem
data is a torch function of the parameters.

The *degree* of an expression is known statically: 0 for data (constants and parameters,
combined in any way torch can evaluate), 1 for affine, 2 for quadratic expressions and
:data:`NONLINEAR` for anything else (``x ** 3``, ``sin(x)``, ``x / y``). Expressions up to
degree 2 have a coefficient form (:class:`Evaluator`, for the quadratic backend); every
expression has a value as a torch function of the variables and parameters
(:class:`ValueEvaluator`, for the nonlinear backend).
"""

from __future__ import annotations

import itertools
import numbers

import numpy as np
import scipy.sparse as sp
import torch

from .canonical import Canon, stack

_ids = itertools.count()

#: the degree of expressions that are not polynomials of degree ≤ 2
NONLINEAR = 3


def _product_degree(a: int, b: int) -> int:
    return min(a + b, NONLINEAR)


def _broadcast_source(shape: tuple, to: tuple) -> np.ndarray:
    return np.broadcast_to(np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape), to).ravel()


class Expression:
    """An array-shaped expression. Subclasses define ``shape``, ``degree`` and ``_canon``."""

    __array_ufunc__ = None  # numpy defers to our reflected operators (``A @ x``, ``3 * x``)
    __hash__ = object.__hash__
    shape: tuple = ()
    degree: int = 0

    def __array__(self, dtype=None, copy=None):
        # A 0-d object array: scipy.sparse's ``A @ expr`` then returns NotImplemented and
        # Python calls our ``__rmatmul__`` instead of iterating the expression entry by entry.
        out = np.empty((), dtype=object)
        out[()] = self
        return out

    # -- shape helpers ------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a scalar expression")
        return self.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # -- arithmetic ---------------------------------------------------------------------
    def __add__(self, other):
        return Sum2(self, as_expression(other))

    def __radd__(self, other):
        return Sum2(as_expression(other), self)

    def __sub__(self, other):
        return Sum2(self, -as_expression(other))

    def __rsub__(self, other):
        return Sum2(as_expression(other), -self)

    def __neg__(self):
        return Product(Constant(-1.0), self)

    def __pos__(self):
        return self

    def __mul__(self, other):
        return Product(self, as_expression(other))

    def __rmul__(self, other):
        return Product(as_expression(other), self)

    def __truediv__(self, other):
        return Product(self, Power(as_expression(other), -1))

    def __rtruediv__(self, other):
        return as_expression(other) / self

    def __pow__(self, exponent):
        if not isinstance(exponent, numbers.Real):
            raise TypeError("exponents must be numbers")
        return Power(self, exponent)

    def __matmul__(self, other):
        return MatMul(self, as_expression(other))

    def __rmatmul__(self, other):
        return MatMul(as_expression(other), self)

    # -- array views --------------------------------------------------------------------
    def __getitem__(self, key):
        source = np.arange(self.size).reshape(self.shape)[key]
        return Gather(self, np.asarray(source))

    @property
    def T(self):
        return Gather(self, np.arange(self.size).reshape(self.shape).T)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return Gather(self, np.arange(self.size).reshape(shape))

    def sum(self, axis=None):
        return Reduce(self, axis)

    # -- relations (constraints) --------------------------------------------------------
    def __le__(self, other):
        return Relation(self - as_expression(other), "<=")

    def __ge__(self, other):
        return Relation(self - as_expression(other), ">=")

    def __eq__(self, other):
        return Relation(self - as_expression(other), "==")

    # -- evaluation ---------------------------------------------------------------------
    def _canon(self, ev: "Evaluator") -> Canon:  # pragma: no cover - abstract
        raise NotImplementedError

    def _value(self, ev: "ValueEvaluator") -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __bool__(self):
        raise TypeError("an expression has no truth value; did you mean a constraint?")

    @property
    def children(self) -> tuple:
        """The sub-expressions this node is built from (its expression-valued attributes)."""
        out = []
        for value in vars(self).values():
            if isinstance(value, Expression):
                out.append(value)
            elif isinstance(value, tuple):
                out.extend(v for v in value if isinstance(v, Expression))
        return tuple(out)


class Relation:
    """``expression ∈ set`` with set ``{0}`` (==), ``[0, ∞)`` (>=) or ``(-∞, 0]`` (<=).

    ``expression`` is the normalized function ``lhs - rhs`` of the functional API.
    """

    def __init__(self, expression: Expression, sense: str):
        self.expression = expression
        self.sense = sense

    def __bool__(self):
        raise TypeError("a constraint has no truth value; pass it to Model.constraint")


# -- leaves -----------------------------------------------------------------------------------
class Constant(Expression):
    """A numeric array (numpy, scipy.sparse, or a number). Sparse matrices stay sparse."""

    degree = 0

    def __init__(self, value):
        if sp.issparse(value):
            self.sparse = sp.coo_matrix(value)
            self.value = None
            self.shape = self.sparse.shape
        else:
            self.sparse = None
            self.value = np.asarray(value, dtype=np.float64)
            if not np.all(np.isfinite(self.value)):
                raise ValueError("constants in expressions must be finite (got NaN or inf)")
            self.shape = self.value.shape

    @property
    def T(self):
        if self.sparse is not None:
            return Constant(self.sparse.T)
        return Constant(self.value.T)

    def dense(self) -> np.ndarray:
        return self.value if self.sparse is None else self.sparse.toarray()

    def _canon(self, ev):
        return Canon.constant(torch.as_tensor(self.dense().reshape(-1), dtype=ev.dtype))

    def _value(self, ev):
        return torch.as_tensor(self.dense(), dtype=ev.dtype)


class Variable(Expression):
    """A block of decision variables, a slice ``offset : offset + size`` of the model's
    variable vector. Created by :meth:`Model.variable`."""

    degree = 1

    def __init__(self, model, offset: int, shape: tuple, name: str):
        self.model = model
        self.offset = offset
        self.shape = shape
        self.name = name

    def _canon(self, ev):
        return Canon.variable(self.offset, self.size, ev.dtype)

    def _value(self, ev):
        return ev.x[self.offset: self.offset + self.size].reshape(self.shape)

    def element_name(self, flat_index: int) -> str:
        if not self.shape:
            return self.name
        idx = np.unravel_index(flat_index, self.shape)
        return f"{self.name}[{','.join(str(i) for i in idx)}]"

    def __repr__(self):
        return f"Variable({self.name!r}, shape={self.shape})"


class Parameter(Expression):
    """A model parameter θ: data whose value can change between solves and with respect to
    which solutions are differentiated. Created by :meth:`Model.parameter`."""

    degree = 0

    def __init__(self, model, value: np.ndarray, name: str):
        self.model = model
        self.value = value
        self.shape = value.shape
        self.name = name

    def _canon(self, ev):
        values = ev.parameter_values[self]
        return Canon.constant(values.reshape(*values.shape[: values.dim() - self.ndim], self.size))

    def _value(self, ev):
        return ev.parameter_values[self]

    def __repr__(self):
        return f"Parameter({self.name!r}, shape={self.shape})"


# -- interior nodes ---------------------------------------------------------------------------
class Sum2(Expression):
    def __init__(self, a: Expression, b: Expression):
        self.shape = np.broadcast_shapes(a.shape, b.shape)
        self.a, self.b = a, b
        self.degree = max(a.degree, b.degree)

    def _canon(self, ev):
        return ev.broadcast(self.a, self.shape) + ev.broadcast(self.b, self.shape)

    def _value(self, ev):
        return ev.value(self.a) + ev.value(self.b)


class Product(Expression):
    """Entrywise product with numpy broadcasting."""

    def __init__(self, a: Expression, b: Expression):
        self.shape = np.broadcast_shapes(a.shape, b.shape)
        self.a, self.b = a, b
        self.degree = _product_degree(a.degree, b.degree)

    def _canon(self, ev):
        return ev.broadcast(self.a, self.shape).multiply(ev.broadcast(self.b, self.shape))

    def _value(self, ev):
        return ev.value(self.a) * ev.value(self.b)


class Power(Expression):
    """``base ** exponent``: quadratic for exponents 0, 1, 2 of affine terms, nonlinear for
    other exponents of expressions of variables."""

    def __init__(self, base: Expression, exponent: float):
        self.shape = base.shape
        self.base, self.exponent = base, exponent
        if base.degree == 0:
            self.degree = 0
        elif exponent in (0, 1, 2):
            self.degree = min(base.degree * int(exponent), NONLINEAR)
        else:
            self.degree = NONLINEAR

    def _canon(self, ev):
        base = ev.canon(self.base)
        if self.base.degree == 0:
            return Canon.constant(base.const ** self.exponent)
        if self.exponent == 0:
            return Canon.constant(torch.ones_like(base.const))
        if self.exponent == 1:
            return base
        return base.multiply(base)

    def _value(self, ev):
        return ev.value(self.base) ** self.exponent


class Function(Expression):
    """An elementwise function (``sin``, ``cos``, ``exp``, ``log``, ``sqrt``) of an
    expression; of the data alone it stays data (degree 0)."""

    TORCH = {"sin": torch.sin, "cos": torch.cos, "exp": torch.exp, "log": torch.log,
             "sqrt": torch.sqrt}

    def __init__(self, name: str, inner: Expression):
        self.name, self.inner = name, inner
        self.shape = inner.shape
        self.degree = 0 if inner.degree == 0 else NONLINEAR

    def _canon(self, ev):
        return Canon.constant(self.TORCH[self.name](ev.canon(self.inner).const))

    def _value(self, ev):
        return self.TORCH[self.name](ev.value(self.inner))


class Gather(Expression):
    """Entry ``o`` of the result is entry ``source.flat[o]`` of ``inner``."""

    def __init__(self, inner: Expression, source: np.ndarray):
        self.inner, self.source = inner, np.asarray(source, dtype=np.int64)
        self.shape = self.source.shape
        self.degree = inner.degree

    def _canon(self, ev):
        return ev.canon(self.inner).gather(self.source)

    def _value(self, ev):
        flat = ev.value(self.inner).reshape(-1)
        return flat[torch.as_tensor(self.source.ravel())].reshape(self.shape)


class Reduce(Expression):
    """Sum over one axis, or over all entries when ``axis`` is None."""

    def __init__(self, inner: Expression, axis=None):
        self.inner = inner
        self.degree = inner.degree
        if axis is None:
            self.shape = ()
            self.target = np.zeros(inner.size, dtype=np.int64)
        else:
            axis = axis % inner.ndim
            self.shape = inner.shape[:axis] + inner.shape[axis + 1:]
            out = np.arange(int(np.prod(self.shape, dtype=np.int64))).reshape(self.shape)
            self.target = np.broadcast_to(np.expand_dims(out, axis), inner.shape).ravel()

    def _canon(self, ev):
        return ev.canon(self.inner).reduce(self.target, self.size)

    def _value(self, ev):
        flat = ev.value(self.inner).reshape(-1)
        out = flat.new_zeros(self.size).index_add(0, torch.as_tensor(self.target), flat)
        return out.reshape(self.shape)


class MatMul(Expression):
    """``a @ b`` with numpy's rules for 1-D and 2-D operands."""

    def __init__(self, a: Expression, b: Expression):
        if a.ndim not in (1, 2) or b.ndim not in (1, 2):
            raise ValueError(f"@ needs 1-D or 2-D operands, got shapes {a.shape} and {b.shape}")
        inner_a = a.shape[-1]
        inner_b = b.shape[0]
        if inner_a != inner_b:
            raise ValueError(f"shape mismatch in @: {a.shape} @ {b.shape}")
        self.a, self.b = a, b
        self.shape = a.shape[:-1] + b.shape[1:]
        self.degree = _product_degree(a.degree, b.degree)

    def _value(self, ev):
        return ev.value(self.a) @ ev.value(self.b)

    def _canon(self, ev):
        a, b = self.a, self.b
        if a.degree == 0:
            return _data_matmul(ev, a, b)
        if b.degree == 0:
            # a @ B = (Bᵀ @ aᵀ)ᵀ
            bt = b.T if b.ndim == 2 else b
            at = a.T if a.ndim == 2 else a
            out = _data_matmul(ev, bt, at)
            if a.ndim == 2 and b.ndim == 2:
                out = out.gather(np.arange(out.size).reshape(self.shape[::-1]).T)
            return out
        # both contain variables: sum_r a[i, r] * b[r, j] by broadcasting
        a2 = a if a.ndim == 2 else a.reshape(1, a.size)
        b2 = b if b.ndim == 2 else b.reshape(b.size, 1)
        m, k = a2.shape
        n = b2.shape[1]
        prod = Product(a2.reshape(m, k, 1), b2.reshape(1, k, n)).sum(axis=1)
        return ev.canon(prod.reshape(self.shape))


class Concat(Expression):
    """The entries of several expressions (each flattened row-major), one after the other:
    a vector of their total size."""

    def __init__(self, parts):
        self.parts = tuple(as_expression(p) for p in parts)
        self.shape = (int(np.sum([p.size for p in self.parts], dtype=np.int64)),)
        self.degree = max((p.degree for p in self.parts), default=0)

    def _canon(self, ev):
        return stack([ev.canon(p) for p in self.parts])

    def _value(self, ev):
        return torch.cat([ev.value(p).reshape(-1) for p in self.parts])


def _data_matmul(ev: "Evaluator", m: Expression, e: Expression) -> Canon:
    """``M @ E`` with ``M`` free of variables; only stored entries of a sparse constant
    ``M`` are visited, so a scipy.sparse matrix of 10⁴ × 10⁴ costs its nonzeros only."""
    m2_shape = m.shape if m.ndim == 2 else (1, m.size)
    n_cols = e.shape[1] if e.ndim == 2 else 1
    if isinstance(m, Constant):
        if m.sparse is not None:
            coo = m.sparse
            rows, cols, vals = coo.row, coo.col, coo.data
        else:
            dense = m.value.reshape(m2_shape)
            rows, cols = np.nonzero(dense)
            vals = dense[rows, cols]
        m_vals = torch.as_tensor(vals, dtype=ev.dtype)
    else:
        rows, cols = np.divmod(np.arange(m.size, dtype=np.int64), m2_shape[1])
        m_vals = ev.canon(m).const
    return ev.canon(e).matmul_left(
        rows.astype(np.int64), cols.astype(np.int64), m_vals, m2_shape[0], n_cols
    )


class ValueEvaluator:
    """Evaluates expressions to torch tensors of their shape at a point ``x`` (the flat
    variable vector) for given parameter tensors; differentiable in both by torch."""

    def __init__(self, x: torch.Tensor, parameter_values: dict):
        self.x = x
        self.parameter_values = parameter_values
        self.dtype = x.dtype
        self._memo: dict[int, tuple] = {}

    def value(self, expr: Expression) -> torch.Tensor:
        key = id(expr)
        if key not in self._memo:
            self._memo[key] = (expr, expr._value(self))
        return self._memo[key][1]


class KeptForms:
    """The coefficient forms of a compiled model's parameter-free sub-expressions, kept from
    one evaluation to the next: they do not change with the parameter values, so the model's
    data evaluate them once (W4's constraints ``‖S w‖₂ ≤ σ``, ``1ᵀw = 1``, all but its
    objective: its data for a batch of 64 in 0.15 against 0.62 ms). One per compiled form,
    whose evaluations share the meaning of every atom's variables.

    The parameter-free nodes are those of the trees of ``roots`` (the model's objective and
    constraints), found once: nodes that an evaluation makes on the way (``MatMul``'s
    transposes) are not kept, so the memory held stays that of the model. Forms computed
    under a ``torch.func`` transform are not kept either (their tensors may be the
    transform's)."""

    def __init__(self, roots):
        self._free: dict[int, Expression] = {}  # id → parameter-free node of the roots
        self._forms: dict[int, Canon] = {}  # id → its coefficient form, once evaluated
        free: dict[int, bool] = {}
        stack = [(root, False) for root in roots if root is not None]
        while stack:  # (post-order without recursion: long sums make deep trees)
            expr, children_done = stack.pop()
            if id(expr) in free:
                continue
            if not children_done:
                stack.append((expr, True))
                stack.extend((child, False) for child in expr.children if id(child) not in free)
                continue
            free[id(expr)] = not isinstance(expr, Parameter) and all(
                free[id(child)] for child in expr.children)
            if free[id(expr)]:
                self._free[id(expr)] = expr

    def parameter_free(self, expr: Expression) -> bool:
        """Whether ``expr`` is a node of the roots' trees in which no :class:`Parameter`
        occurs."""
        return id(expr) in self._free

    def form(self, expr: Expression) -> Canon | None:
        """The kept form of ``expr``, if one is."""
        return self._forms.get(id(expr))

    def keep(self, expr: Expression, form: Canon) -> None:
        """Keep ``form`` if ``expr`` is parameter-free and no transform is active."""
        if id(expr) in self._free and torch._C._functorch.maybe_current_level() is None:
            self._forms[id(expr)] = form


class Evaluator:
    """Evaluates expression trees to coefficient form for given parameter tensors.

    ``parameter_values`` maps each :class:`Parameter` to a tensor of its shape, optionally
    with leading batch dimensions. Shared sub-trees are evaluated once; with ``kept``
    (:class:`KeptForms`), parameter-free ones once for all evaluations that share it.
    """

    def __init__(self, parameter_values: dict, dtype: torch.dtype = torch.float64,
                 kept: KeptForms | None = None):
        self.parameter_values = parameter_values
        self.dtype = dtype
        self._memo: dict[int, Canon] = {}
        self._kept = kept

    def canon(self, expr: Expression) -> Canon:
        if expr.degree > 2:
            raise ValueError(
                "this expression is nonlinear (not a polynomial of degree ≤ 2): the quadratic "
                "backend cannot take it; use backend='nonlinear' (tdo.nonlinear_diff_model)")
        key = id(expr)
        if key not in self._memo:
            form = None if self._kept is None else self._kept.form(expr)
            if form is None:
                form = expr._canon(self)
                if self._kept is not None:
                    self._kept.keep(expr, form)
            self._memo[key] = (expr, form)
        return self._memo[key][1]

    def atom(self, atom: Expression) -> Canon:
        """Coefficient form of a convex atom (``norm2`` …, :mod:`.atoms`). Only the conic
        compiler has one (an epigraph variable, :mod:`torchdiffopt.compile.conic`)."""
        raise ValueError(
            f"{atom.name}(...) is a convex atom that the conic backend reformulates with cones: "
            "use backend='conic' or 'auto' (tdo.conic_diff_model, tdo.diff_model)")

    def broadcast(self, expr: Expression, shape: tuple) -> Canon:
        canon = self.canon(expr)
        if expr.shape == shape:
            return canon
        return canon.gather(_broadcast_source(expr.shape, shape))


# -- helpers and conversion -------------------------------------------------------------------
def as_expression(value) -> Expression:
    if isinstance(value, Expression):
        return value
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return Constant(value)


def dot(a, b) -> Expression:
    """``Σ_i a_i b_i`` of two vectors (expressions or arrays)."""
    return (as_expression(a) * as_expression(b)).sum()


def sum_squares(a) -> Expression:
    """``Σ_i a_i²``."""
    a = as_expression(a)
    return (a * a).sum()


def sum(a, axis=None) -> Expression:  # noqa: A001 - numpy-like name
    """Sum of the entries (over ``axis`` if given)."""
    return as_expression(a).sum(axis)


def _elementwise(name: str):
    def apply(a) -> Expression:
        return Function(name, as_expression(a))

    apply.__name__ = apply.__qualname__ = name
    apply.__doc__ = f"Elementwise ``{name}`` of an expression (nonlinear unless of data only)."
    return apply


sin, cos, exp, log, sqrt = (_elementwise(n) for n in ("sin", "cos", "exp", "log", "sqrt"))
