"""Model → cone program data (SCS's form), as a torch function of the parameters.

The compiled form is, always as a *minimization* (``maximize`` negates the objective,
``objective_sign = -1``), over ``x̃ = (x, t)``: the model's variables ``x`` followed by the
epigraph variables ``t`` of the norm atoms (:mod:`torchdiffopt.modeling.atoms`)::

    minimize    ½ x̃ᵀP x̃ + cᵀx̃ + r
    subject to  A x̃ + s = b,   s ∈ K = {0}ᶻ × ℝ₊ˡ × SOC × … × PSD × … × K_exp × … × K_pow × …

in SCS's cone order (:mod:`torchdiffopt.backends.cones`). The slack ``s(x̃) = b - A x̃`` is
built, as a coefficient form, from three kinds of rows:

* **constraint rows**: ``s = T g`` where ``g(x̃) = C x̃ + c0`` stacks the user's constraint
  functions (``lhs - rhs``, or the cone's stacked arguments; one row per entry, the row
  layout of :class:`~torchdiffopt.compile.layout.ModelLayout`) and ``T`` is a fixed sparse
  matrix, block by block::

      ==  s = -g ∈ {0}        >=  s = g ∈ ℝ₊         <=  s = -g ∈ ℝ₊
      SOC(t, x)             s = (t, x) ∈ SOC
      RotatedSOC(u, v, x)   s = (u + v, u - v, √2 x) ∈ SOC     (‖(u - v, √2x)‖ ≤ u + v ⇔ 2uv ≥ ‖x‖²)
      PSD(X)                s = svec(X) = svec(½(X + Xᵀ))       (T_k,ij = T_k,ji = 1/√2, i ≠ j)
      ExpCone, PowerCone    s = (x, y, z) per cone

* **bound rows**: ``x_j - lb_j ∈ ℝ₊``, ``ub_j - x_j ∈ ℝ₊`` (``x_j - lb_j ∈ {0}`` if fixed);
* **atom rows**: ``norm2(e) → t``, ``(t, e) ∈ SOC``; ``norm_inf(e) → t``, ``t ± e ∈ ℝ₊``;
  ``norm1(e) → Σu``, ``u ± e ∈ ℝ₊``. The epigraph is exact when every atom may only be
  pushed down; that is checked on the numbers (weights may be parameters), per batch
  member (``ConicData.margins``): :class:`~torchdiffopt.errors.NonconvexError` otherwise.
  A ``norm2`` alone in one inequality row and nowhere else is *inlined* instead: the row ``κ·norm2(e) + h ≤ 0``
  (``≥``: sign ``σ = +1``) becomes ``(σh, |κ|e) ∈ SOC``, its first entry by ``T`` — no
  epigraph variable, whose value would not be unique while the bound is inactive.

(A model without any row gets the row ``0 ≤ 1``: SCS needs one.)

**Sign conventions.** SCS's dual ``y ∈ K*`` has ``∂f*/∂b = -y``. The multipliers of the
user's rows in the convention shared by every backend, ``μ = ∂f*/∂c0`` (shadow price
``dual = -objective_sign · μ``), are therefore ``μ = -Tᵀy``: ``y`` on ``<=`` and ``==`` rows,
``-y`` on ``>=`` rows and cones, and ``-smat(y)`` (a symmetric matrix) for ``PSD(X)``. A
tangent ``(dC, dc0)`` of the user's rows is ``(dA, db) = (-T dC, T dc0)``; cotangents pull
back as ``C̄ = -TᵀĀ``, ``c̄0 = Tᵀb̄``.

``P``, ``A`` are sparse with fixed ``(rows, cols)`` patterns; their values, ``c``, ``r`` and
``b`` are torch functions of the parameter tensors (:meth:`ConicForm.data`), so the chain
rule from data to parameters is torch autograd / forward-mode AD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..backends.cones import ConeDims, svec_entries
from ..backends.quadratic import bound_rows
from ..errors import NonconvexError
from ..modeling.atoms import NormAtom, atoms_in
from ..modeling.canonical import (Canon, Terms, cat_last, empty_terms, scatter_add_last, stack,
                                  take_last)
from ..modeling.expressions import Evaluator, KeptForms
from ..modeling.sets import ConeConstraint
from .layout import SENSE_CODES, DataForm
from .quadratic import quadratic_objective

#: SCS's cone keys used here, in row order
_KEYS = ("z", "l", "q", "s", "ep", "p")


def is_conic(model) -> bool:
    """Whether the model has a cone constraint or a norm atom of its variables."""
    exprs = [model.objective_expression] + [c.relation.expression for c in model.constraints]
    return any(isinstance(c.relation, ConeConstraint) for c in model.constraints) \
        or bool(atoms_in(exprs))


@dataclass
class ConicData:
    """Numeric data of the compiled cone program (see the module docstring)."""

    n: int  # model variables
    n_total: int  # with the epigraph variables
    P_rows: np.ndarray
    P_cols: np.ndarray
    P_vals: torch.Tensor
    c: torch.Tensor
    r: torch.Tensor  # shape ()
    A_rows: np.ndarray
    A_cols: np.ndarray
    A_vals: torch.Tensor
    b: torch.Tensor
    cones: ConeDims
    T: sp.csr_matrix  # (cone rows, user rows)
    #: quantities that must be ≥ 0 for the epigraph of the norm atoms to be exact: the
    #: atoms' objective weights, then their signed coefficients in the user's rows
    #: (:meth:`ConicForm.nonconvex_error` names the first negative one)
    margins: torch.Tensor

    def values(self) -> tuple:
        """The parameter-dependent tensors, in a fixed order (for autograd and jvp)."""
        return (self.P_vals, self.c, self.r, self.A_vals, self.b)

    def A_matrix(self) -> sp.csc_matrix:
        return sp.csc_matrix((self.A_vals.detach().numpy(), (self.A_rows, self.A_cols)),
                             shape=(len(self.b), self.n_total))

    def P_matrix(self) -> sp.csr_matrix | None:
        """``P``, or None when the objective is linear."""
        if len(self.P_rows) == 0:
            return None
        return sp.csr_matrix((self.P_vals.detach().numpy(), (self.P_rows, self.P_cols)),
                             shape=(self.n_total, self.n_total))


@dataclass
class _Block:
    """Rows of one cone (or of several rows of ``{0}`` / ``ℝ₊``): ``T`` entries (local row,
    user row, value), fixed entries (local row, variable, coefficient) with constants, or
    the rows of an atom; ``cones`` is what the block adds to its key's cone list."""

    size: int
    t_entries: tuple = ()
    fixed: tuple = ()
    const: np.ndarray | None = None
    atom: NormAtom | None = None
    cones: tuple = ()


def _width(atom: NormAtom) -> int:
    """Number of epigraph variables of an atom: ``u`` for norm1, ``t`` otherwise."""
    return atom.inner.size if atom.name == "norm1" else 1


class ConicEvaluator(Evaluator):
    """Coefficient forms in which each norm atom is its epigraph variable(s)."""

    def __init__(self, parameter_values: dict, epigraph: dict, kept: KeptForms | None = None):
        super().__init__(parameter_values, kept=kept)
        self.epigraph = epigraph

    def atom(self, atom: NormAtom) -> Canon:
        offset = self.epigraph[atom]
        if atom.name == "norm1":  # Σᵢ uᵢ
            k = atom.inner.size
            return Canon.variable(offset, k, self.dtype).reduce(np.zeros(k, np.int64), 1)
        return Canon.variable(offset, 1, self.dtype)


class ConicForm(DataForm):
    """The compiled structure of a model for the conic backend: epigraph variables, cone
    rows and the map ``T`` from the user's rows. :meth:`data` evaluates it."""

    def __init__(self, model):
        super().__init__(model)
        # for data(): the parameter-free parts, evaluated once
        self._kept = KeptForms([self.objective_expression]
                               + [con.relation.expression for con in self.constraints])
        self._constant_rows = None  # (slack, row margins) of _rows, once known constant
        obj = self.objective_expression
        if obj is not None and obj.degree > 2:
            raise ValueError("the objective is not quadratic: the conic backend takes "
                             "objectives of degree ≤ 2 plus norm atoms (backend='nonlinear' "
                             "takes smooth nonlinear ones)")
        for con in self.constraints:
            if con.relation.sense in SENSE_CODES and con.relation.expression.degree > 1:
                raise ValueError(
                    f"constraint {con.name!r} is not affine: the conic backend takes affine "
                    "constraints, norm atoms and cones (a convex quadratic constraint "
                    "sum_squares(x) <= t is tdo.norm2(x) <= sqrt(t), or tdo.RotatedSOC)")
        atoms = atoms_in([obj] + [c.relation.expression for c in self.constraints])
        for atom in atoms:
            if atom.degree > 1:
                raise ValueError(f"the argument of {atom.name}(...) must be affine")
            if atoms_in([atom.inner]):
                raise ValueError(f"the argument of {atom.name}(...) contains a norm atom: "
                                 "bound the inner one by a variable first")
        self._inline = self._inline_atoms(atoms, self._columns(atoms))
        # epigraph variables after x; inlined atoms get columns past n_total, which the
        # data never keep
        outlined = [a for a in atoms if a not in self._inline]
        self.epigraph = self._columns(outlined + list(self._inline))
        self.n_total = self.n + sum(_width(a) for a in outlined)
        self._aux_atoms = [a for a in outlined + list(self._inline) for _ in range(_width(a))]
        self._atoms = outlined
        self._constraint_of_row = np.repeat(
            np.arange(len(self.constraints)),
            [c.relation.expression.size for c in self.constraints]).astype(np.int64)
        self._layout(self._blocks())
        # the rows are data of their own when no constraint and no atom has a parameter
        self._rows_parameter_free = all(self._kept.parameter_free(e) for e in
                                        [con.relation.expression for con in self.constraints]
                                        + [atom for atom, _ in self._atom_rows])

    # -- structure ----------------------------------------------------------------------
    def _columns(self, atoms) -> dict:
        """Consecutive epigraph columns after the model's variables, atom by atom."""
        starts = self.n + np.cumsum([0] + [_width(a) for a in atoms])
        return {a: int(start) for a, start in zip(atoms, starts)}

    def _inline_atoms(self, atoms, columns: dict) -> dict:
        """``{atom: (row, σ)}`` for the ``norm2`` atoms alone in one ``<=`` (σ = -1) or
        ``>=`` (σ = +1) row and nowhere else (module docstring). The pattern of the atoms'
        columns does not depend on parameter values: read it off one evaluation."""
        candidates = [a for a in atoms if a.name == "norm2"]
        if not candidates or not self.constraints:
            return {}
        ev = ConicEvaluator({p: torch.as_tensor(p.value, dtype=torch.float64)
                             for p in self.parameters}, columns)
        in_objective = set()
        if self.objective_expression is not None:
            obj = ev.canon(self.objective_expression)
            in_objective = set(np.concatenate((obj.lin.vars[0], *obj.quad.vars)).tolist())
        g = stack([ev.canon(con.relation.expression) for con in self.constraints])
        on_atom = g.lin.vars[0] >= self.n
        rows, cols = g.lin.rows[on_atom], g.lin.vars[0][on_atom]
        inline = {}
        for atom in candidates:
            col = columns[atom]
            where = np.unique(rows[cols == col])
            if len(where) == 1 and col not in in_objective and abs(self.sense[where[0]]) == 1 \
                    and np.all(cols[rows == where[0]] == col):
                inline[atom] = (int(where[0]), float(self.sense[where[0]]))
        return inline

    def _blocks(self) -> dict:
        blocks = {key: [] for key in _KEYS}
        sqrt2 = math.sqrt(2.0)
        inline_rows = {row: atom for atom, (row, _) in self._inline.items()}
        for con in self.constraints:
            rel, size = con.relation, con.relation.expression.size
            user = self.row_offsets[con] + np.arange(size)
            local = np.arange(size)
            sense = rel.sense
            if sense in SENSE_CODES:
                sign = 1.0 if sense == ">=" else -1.0
                inlined = np.isin(user, list(inline_rows))
                plain = user[~inlined]
                if len(plain):
                    blocks["z" if sense == "==" else "l"].append(
                        _Block(len(plain), (np.arange(len(plain)), plain,
                                            np.full(len(plain), sign))))
                for row in user[inlined]:  # (σh, |κ|e) ∈ SOC, σh by T
                    k = 1 + inline_rows[row].inner.size
                    blocks["q"].append(_Block(k, (np.zeros(1, np.int64), np.array([row]),
                                                  np.array([sign])), atom=inline_rows[row],
                                              cones=(k,)))
            elif sense == "soc":
                blocks["q"].append(_Block(size, (local, user, np.ones(size)), cones=(size,)))
            elif sense == "rotated_soc":
                k = size - 2
                entries = (np.r_[0, 0, 1, 1, 2 + np.arange(k)],
                           user[np.r_[0, 1, 0, 1, 2 + np.arange(k)]],
                           np.r_[1.0, 1.0, 1.0, -1.0, np.full(k, sqrt2)])
                blocks["q"].append(_Block(size, entries, cones=(size,)))
            elif sense == "psd":  # s_k = scale_k · ½(X_ij + X_ji) (diagonal: the two add up)
                d = rel.expression.shape[0]
                i, j, scale = svec_entries(d)
                k = np.arange(len(i))
                blocks["s"].append(_Block(len(i), (np.r_[k, k], user[np.r_[i * d + j, j * d + i]],
                                                   np.r_[scale, scale] / 2), cones=(d,)))
            else:  # exp, power: one cone per triple
                key, count = ("ep" if sense == "exp" else "p"), size // 3
                cones = (rel.alpha,) * count if sense == "power" else (count,)
                blocks[key].append(_Block(size, (local, user, np.ones(size)), cones=cones))
        cols, c0, sense = bound_rows(self.lb, self.ub)
        for key, mask in (("z", sense == 0), ("l", sense != 0)):
            if mask.any():
                k = int(mask.sum())
                sign = np.where(sense[mask] < 0, -1.0, 1.0)  # s = ±(x_j + c0) ≥ 0
                blocks[key].append(_Block(k, fixed=(np.arange(k), cols[mask], sign),
                                          const=sign * c0[mask]))
        for atom in self._atoms:
            k = atom.inner.size
            if atom.name == "norm2":
                blocks["q"].append(_Block(1 + k, atom=atom, cones=(1 + k,)))
            else:
                blocks["l"].append(_Block(2 * k, atom=atom))
        if not any(blocks.values()):
            blocks["l"].append(_Block(1, const=np.ones(1)))  # 0 ≤ 1: SCS needs a row
        return blocks

    def _layout(self, blocks: dict) -> None:
        t_parts, f_parts, const, self._atom_rows = [], [], [], []
        cones, offset = {key: [] for key in _KEYS}, 0
        for key in _KEYS:
            for blk in blocks[key]:
                if blk.t_entries:
                    t_parts.append((blk.t_entries[0] + offset,) + blk.t_entries[1:])
                if blk.fixed:
                    f_parts.append((blk.fixed[0] + offset,) + blk.fixed[1:])
                if blk.atom is not None:
                    self._atom_rows.append((blk.atom, offset + np.arange(blk.size)))
                c = np.zeros(blk.size) if blk.const is None else blk.const
                const.append(c)
                cones[key].extend(blk.cones)
                offset += blk.size
        self.rows = offset
        self.cones = ConeDims(z=sum(b.size for b in blocks["z"]),
                              l=sum(b.size for b in blocks["l"]), q=tuple(cones["q"]),
                              s=tuple(cones["s"]), ep=sum(cones["ep"]), p=tuple(cones["p"]))

        def cat(parts, i, dtype):
            return np.concatenate([p[i] for p in parts]).astype(dtype) if parts \
                else np.zeros(0, dtype)
        self.T = sp.csr_matrix((cat(t_parts, 2, float), (cat(t_parts, 0, np.int64),
                                                          cat(t_parts, 1, np.int64))),
                               shape=(self.rows, self.m))
        # T's entries as data() takes them (a conversion per call took 0.25 ms of W4's 2.5)
        T = self.T.tocoo()
        self._T_entries = (T.row.astype(np.int64), T.col.astype(np.int64), T.data)
        self._fixed = tuple(cat(f_parts, i, t) for i, t in
                            enumerate((np.int64, np.int64, float)))
        self._const = np.concatenate(const)

    # -- data -----------------------------------------------------------------------------
    def data(self, parameter_values: dict, check: bool = True) -> ConicData:
        """Evaluate ``P, c, r, A, b`` for ``parameter_values`` (Parameter → tensor, each with
        optional leading batch dimensions, which the values then carry). With ``check``,
        raises :class:`~torchdiffopt.errors.NonconvexError` where an atom is not pushed down
        (:meth:`nonconvex_error`); without, the caller reads ``margins`` per member."""
        ev = ConicEvaluator(parameter_values, self.epigraph, self._kept)
        dtype = ev.dtype
        obj = None if self.objective_expression is None else ev.canon(self.objective_expression)
        P_rows, P_cols, P_vals, c, r = quadratic_objective(obj, float(self.objective_sign),
                                                           self.n_total, dtype)
        if np.any(P_rows >= self.n):
            atom = self._aux_atoms[P_rows[P_rows >= self.n][0] - self.n]
            raise ValueError(f"{atom.name}(...) appears in a product in the objective: norm "
                             "atoms enter objectives linearly, with a nonnegative weight "
                             "(for ‖x‖² write tdo.sum_squares(x))")
        if self._constant_rows is not None:
            slack, row_margins = self._constant_rows
        else:
            slack, row_margins = self._rows(ev)
            # (no transform whose tensors these could be)
            if self._rows_parameter_free and torch._C._functorch.maybe_current_level() is None:
                self._constant_rows = slack, row_margins
        margins = [c[..., self.n:]] + ([] if row_margins is None else [row_margins])
        data = ConicData(self.n, self.n_total, P_rows, P_cols, P_vals, c, r,
                         slack.lin.rows, slack.lin.vars[0], -slack.lin.vals, slack.const,
                         self.cones, self.T, cat_last(margins))
        if check:
            flat = data.margins.detach().flatten(0, -2) if data.margins.dim() > 1 \
                else data.margins.detach()[None]
            for j, member in enumerate(flat.numpy()):
                err = self.nonconvex_error(member)
                if err is not None:
                    raise (type(err)(f"batch member {j}: {err}") if data.margins.dim() > 1
                           else err)
        return data

    def data_values(self, *parameter_tensors: torch.Tensor) -> tuple:
        """``data(θ).values()`` as a pure function of the parameter tensors (for torch.func;
        no convexity check, which needs the numbers: see ``margins``)."""
        return self.data(dict(zip(self.parameters, parameter_tensors)), check=False).values()

    def _rows(self, ev: ConicEvaluator) -> tuple:
        """The slacks of the cone program's rows, ``s = b - A x`` as a coefficient form
        (the fixed rows, the user's rows through ``T`` and the atoms' cone rows), and the
        margins of the atoms' coefficients in the user's rows (None without constraints)."""
        dtype = ev.dtype
        rows, cols, coef = self._fixed
        slack = Canon(self.rows, torch.as_tensor(self._const, dtype=dtype),
                      Terms(rows, (cols,), torch.as_tensor(coef, dtype=dtype)),
                      empty_terms(2, torch.zeros(0, dtype=dtype)))
        kappa, row_margins = {}, None
        if self.constraints:
            g = stack([ev.canon(con.relation.expression) for con in self.constraints])
            row_margins = self._row_margins(g)
            if self._inline:  # the inlined atoms' coefficients κ leave g for their cones
                cols = g.lin.vars[0]
                kappa = {a: take_last(g.lin.vals, np.flatnonzero(cols == self.epigraph[a]))
                         .sum(-1, keepdim=True) for a in self._inline}
                keep = np.flatnonzero(cols < self.n_total)
                g = Canon(g.size, g.const, g.lin.select(keep, g.lin.rows[keep]), g.quad)
            T_rows, T_cols, T_vals = self._T_entries
            slack = slack + g.matmul_left(T_rows, T_cols, torch.as_tensor(T_vals, dtype=dtype),
                                          self.rows, 1)
        for atom, atom_rows in self._atom_rows:
            slack = slack + self._epigraph_rows(ev, atom, kappa.get(atom)).reduce(atom_rows,
                                                                                  self.rows)
        return slack, row_margins

    def _epigraph_rows(self, ev: ConicEvaluator, atom: NormAtom, kappa=None) -> Canon:
        """The cone rows of an atom (module docstring), as a coefficient form; for an
        inlined atom of coefficient ``kappa``, ``(0, |κ|e)`` (the ``σh`` comes by ``T``)."""
        e = ev.canon(atom.inner)
        k, offset = atom.inner.size, self.epigraph[atom]
        if atom in self._inline:
            scale = (-self._inline[atom][1] * kappa).expand(*kappa.shape[:-1], k)
            return stack([Canon.constant(torch.zeros(1, dtype=ev.dtype)), e.scale(scale)])
        if atom.name == "norm2":
            return stack([Canon.variable(offset, 1, ev.dtype), e])
        bound = (Canon.variable(offset, 1, ev.dtype).gather(np.zeros(k, np.int64))
                 if atom.name == "norm_inf" else Canon.variable(offset, k, ev.dtype))
        return stack([bound + e.scale(torch.full((k,), -1.0, dtype=ev.dtype)), bound + e])

    def _row_margins(self, g: Canon) -> torch.Tensor:
        """The margins of the atoms' coefficients in the user's rows ``g`` (entries on the
        same row and atom added up): ``-|κ|`` in ``==`` rows, ``κ`` in ``<=`` rows, ``-κ``
        in ``>=`` rows and cones. Records the rows and atoms they belong to."""
        on_atom = np.flatnonzero(g.lin.vars[0] >= self.n)
        keys = g.lin.rows[on_atom] * len(self._aux_atoms) + g.lin.vars[0][on_atom] - self.n
        unique, where = np.unique(keys, return_inverse=True)
        coef = scatter_add_last(take_last(g.lin.vals, on_atom), where, len(unique))
        self._margin_rows, self._margin_atoms = np.divmod(unique, len(self._aux_atoms))
        sense = torch.as_tensor(self.sense[self._margin_rows].astype(np.float64),
                                dtype=coef.dtype)
        return torch.where(sense == 0, -coef.abs(), torch.where(sense < 0, coef, -coef))

    def nonconvex_error(self, margins: np.ndarray) -> NonconvexError | None:
        """The error of one member's ``margins`` (:class:`ConicData`), or None when every
        atom is pushed down: a negative weight in the objective, or an atom bounded from
        below or in an equality."""
        bad = np.flatnonzero(margins < 0)
        if not len(bad):
            return None
        i, weights = int(bad[0]), self.n_total - self.n
        if i < weights:
            atom = self._aux_atoms[i]
            verb = "maximized" if self.objective_sign < 0 else "minimized"
            return NonconvexError(
                f"the objective is not convex: {atom.name}(...) has a negative weight in a "
                f"{verb} objective (a norm may be minimized, or maximized with a negative "
                "weight, never the other way)")
        row = self._margin_rows[i - weights]
        atom = self._aux_atoms[self._margin_atoms[i - weights]]
        con = self.constraints[self._constraint_of_row[row]]
        how = "in an equality" if self.sense[row] == 0 else \
            f"bounded from below (as in {atom.name}(x) >= t)"
        return NonconvexError(
            f"constraint {con.name!r} is not convex: {atom.name}(...) is {how}; a norm may only "
            f"be bounded from above ({atom.name}(x) <= t) or minimized")
