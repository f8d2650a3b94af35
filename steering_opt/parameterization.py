"""Steering parameterisations: what is learned at a site and how it changes the activation.

A :class:`Steering` owns its tensors, their random start, their projection onto the constraint set
(norm caps), the change it makes to an activation (:meth:`Steering.delta`) and its
(de)serialisation (:meth:`Steering.tensors` / :meth:`Steering.config` / :meth:`Steering.from_state`).
The optimiser, the batched engine, :class:`~steering_opt.vector.SteeringVector` and the file format
only talk to this interface, so a new parameterisation is one subclass with a new ``kind``: it is
registered by being defined, and ``optimize(..., parameterization=MyClass)`` learns it.

Built in (``h`` is the residual-stream activation ``(batch, seq, d)``, ``v`` the vector):

* :class:`Additive` — ``h + v``
* :class:`Clamp` — ``h - (h·v̂)v̂ + c·v`` (rank-1; the component along ``v`` is set to ``c‖v‖``)
* :class:`Affine` — ``h + v + h Mᵀ`` with ``M = Lᵀ R`` (``L, R ∈ ℝ^{r×d}``, applied as ``(h Rᵀ) L``,
  never as a dense ``d×d`` product), or a dense ``M`` given by the user.

Every optimised parameterisation has a primary ``vector`` ``(d,)``: the datapoint sign
(``is_negative``) and the training noise act on it, ``max_norm`` caps it and reports show its norm.
The change is computed per row from ``rows`` ``(batch, d)``, the per-row version of that vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from .options import OptimizeOptions


def _capped(t: torch.Tensor, cap: float, dim: int | None = None) -> None:
    """Scale ``t`` in place so that its norm (over ``dim``; all of it if None) is ``<= cap``. The norm
    is taken in float64 when float32 overflows (‖t‖ ≳ 1e19), which would otherwise scale ``t`` to 0."""
    n = t.norm() if dim is None else t.norm(dim=dim, keepdim=True)
    if not bool(torch.isfinite(n).all()):
        n = (t.double().norm() if dim is None else t.double().norm(dim=dim, keepdim=True)).to(t.dtype)
    t.mul_(torch.where(n > cap, cap / n, torch.ones_like(n)))


def random_vector(d: int, norm: float, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random direction ``(d,)`` with L2 norm ``norm`` (float32, CPU)."""
    v = torch.randn(d, generator=gen)
    return norm * v / v.norm()


class Steering:
    """Base class of the parameterisations (see the module docstring).

    Subclasses set ``kind`` (a unique name, used in saved files), hold ``vector`` ``(d,)`` and
    implement :meth:`tensors`, :meth:`from_state`, :meth:`delta`, and for optimisation
    :meth:`initial`. The rest has defaults that subclasses may refine.
    """

    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Steering]]] = {}
    vector: torch.Tensor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind:
            Steering.registry[kind] = cls

    # ------------------------------------------------------------------ to implement
    def tensors(self) -> dict[str, torch.Tensor]:
        """The named tensors (all learnable, all saved); ``"vector"`` is the primary vector."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able settings that are not tensors (saved with the tensors)."""
        return {}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Steering:
        """Rebuild from :meth:`tensors` and :meth:`config`."""
        raise NotImplementedError

    @classmethod
    def initial(cls, d: int, options: OptimizeOptions, gen: torch.Generator) -> Steering:
        """The starting point of an optimisation (float32, CPU), drawn from ``gen``."""
        raise NotImplementedError

    def delta(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The change to ``h`` ``(B, T, d)`` when row ``b`` uses vector ``rows[b]`` ``(d,)``; returns a
        tensor broadcastable to ``(B, T, d)`` in ``h``'s dtype."""
        raise NotImplementedError

    # ------------------------------------------------------------------ defaults
    @classmethod
    def delta_many(cls, params: Sequence[Steering], which: torch.Tensor, h: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        """:meth:`delta` for a batch whose row ``b`` belongs to ``params[which[b]]`` (all of this class):
        by default one call per member; built-in classes override it with one batched product."""
        out = torch.zeros_like(h)
        for j, p in enumerate(params):
            idx = (which == j).nonzero()[:, 0].to(h.device)
            if len(idx):
                out = out.index_put((idx,), torch.broadcast_to(p.delta(h[idx], rows[idx]), h[idx].shape))
        return out

    def parameters(self) -> list[torch.Tensor]:
        return list(self.tensors().values())

    def map(self, fn: Any) -> Steering:
        """A copy with ``fn`` applied to every tensor (e.g. ``lambda t: t.to(device)``)."""
        return type(self).from_state({k: fn(t) for k, t in self.tensors().items()}, self.config())

    def detach(self) -> Steering:
        return self.map(lambda t: t.detach())

    def requires_grad_(self) -> Steering:
        for t in self.parameters():
            t.requires_grad_(True)
        return self

    def project(self, options: OptimizeOptions) -> None:
        """Put the parameters back into the constraint set after a step (in place): ``‖v‖ ≤ max_norm``."""
        if options.max_norm is not None:
            with torch.no_grad():
                _capped(self.vector, options.max_norm)

    def usable(self) -> bool:
        """Whether the parameters can be applied: finite (subclasses add their own conditions)."""
        return all(bool(torch.isfinite(t).all()) for t in self.parameters())

    def norm_objective(self) -> torch.Tensor:
        """What the output-constrained phase minimises: ``‖v‖`` (subclasses add their other terms)."""
        return self.vector.norm()

    def scaled(self, k: float) -> Steering:
        """The steering ``k`` times as strong: the vector times ``k`` (subclasses refine)."""
        t = self.tensors()
        t["vector"] = t["vector"] * k
        return type(self).from_state(t, self.config())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(t.shape)}" for k, t in self.tensors().items())
        cfg = "".join(f", {k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({shapes}{cfg})"


class Additive(Steering):
    """``h + v``."""

    kind = "additive"

    def __init__(self, vector: torch.Tensor):
        self.vector = vector

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vector": self.vector}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Additive:
        return cls(tensors["vector"])

    @classmethod
    def initial(cls, d: int, options: OptimizeOptions, gen: torch.Generator) -> Additive:
        return cls(_start_vector(d, options, gen))

    def delta(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(h)[:, None, :]

    @classmethod
    def delta_many(cls, params: Sequence[Steering], which: torch.Tensor, h: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        return rows.to(h)[:, None, :]


class Clamp(Steering):
    """``h - (h·v̂)v̂ + c·v``: the component of ``h`` along ``v`` is replaced by ``c‖v‖``."""

    kind = "clamp"

    def __init__(self, vector: torch.Tensor, coefficient: float):
        self.vector = vector
        self.coefficient = float(coefficient)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vector": self.vector}

    def config(self) -> dict[str, Any]:
        return {"coefficient": self.coefficient}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Clamp:
        return cls(tensors["vector"], config["coefficient"])

    @classmethod
    def initial(cls, d: int, options: OptimizeOptions, gen: torch.Generator) -> Clamp:
        assert options.vector_clamp is not None
        return cls(_start_vector(d, options, gen), options.vector_clamp)

    def usable(self) -> bool:
        return super().usable() and bool(self.vector.detach().abs().sum() > 0)

    def scaled(self, k: float) -> Steering:
        if k == 0:
            raise ValueError("a clamp steering cannot be scaled by 0 (its direction v/|v| would be undefined)")
        return super().scaled(k)

    @staticmethod
    def formula(h: torch.Tensor, rows: torch.Tensor, coefficient: torch.Tensor | float) -> torch.Tensor:
        """``-(h·v̂)v̂ + c·v`` for ``h`` ``(B, T, d)``, ``rows`` ``(B, d)``, ``c`` scalar or ``(B,)``."""
        v = rows.to(h)[:, None, :]
        norm = v.norm(dim=-1, keepdim=True)
        if bool((norm == 0).any()):
            raise ValueError("clamp steering needs a non-zero vector (got a vector of norm 0)")
        vhat = v / norm
        c = coefficient.to(h)[:, None, None] if isinstance(coefficient, torch.Tensor) else coefficient
        return -(h * vhat).sum(-1, keepdim=True) * vhat + c * v

    def delta(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.formula(h, rows, self.coefficient)

    @classmethod
    def delta_many(cls, params: Sequence[Steering], which: torch.Tensor, h: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        c = torch.tensor([p.coefficient for p in params if isinstance(p, Clamp)], dtype=torch.float32)
        return cls.formula(h, rows, c[which.cpu()].to(h.device))


class Affine(Steering):
    """``h + v + h Mᵀ`` with ``M = Lᵀ R`` (``left`` L, ``right`` R, both ``(r, d)``), or a dense
    ``matrix`` M ``(d, d)`` given by the user (then nothing is factored)."""

    kind = "affine"

    def __init__(self, vector: torch.Tensor, left: torch.Tensor | None = None, right: torch.Tensor | None = None,
                 *, matrix: torch.Tensor | None = None):
        if (left is None) != (right is None) or (matrix is None) == (left is None):
            raise ValueError("Affine needs either both factors `left` and `right` (r, d) or a dense `matrix` (d, d)")
        self.vector, self.left, self.right, self.matrix = vector, left, right, matrix

    @property
    def rank(self) -> int:
        return int(self.left.shape[0]) if self.left is not None else int(self.vector.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.matrix is not None:
            return {"vector": self.vector, "matrix": self.matrix}
        assert self.left is not None and self.right is not None
        return {"vector": self.vector, "left": self.left, "right": self.right}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Affine:
        if "matrix" in tensors:
            return cls(tensors["vector"], matrix=tensors["matrix"])
        return cls(tensors["vector"], tensors["left"], tensors["right"])

    @classmethod
    def initial(cls, d: int, options: OptimizeOptions, gen: torch.Generator) -> Affine:
        assert options.affine_rank is not None
        v = _start_vector(d, options, gen)
        factors = []
        for _ in range(2):
            m = torch.randn(options.affine_rank, d, generator=gen)
            factors.append(m * (options.starting_affine_norm / m.norm(dim=1, keepdim=True)))
        return cls(v, factors[0], factors[1])

    def dense(self) -> torch.Tensor:
        """``M`` ``(d, d)`` (for showing or returning to the user; steering never forms it)."""
        if self.matrix is not None:
            return self.matrix
        assert self.left is not None and self.right is not None
        return self.left.T @ self.right

    def project(self, options: OptimizeOptions) -> None:
        super().project(options)
        if options.max_affine_norm is not None and self.left is not None and self.right is not None:
            with torch.no_grad():
                _capped(self.left, options.max_affine_norm, dim=1)
                _capped(self.right, options.max_affine_norm, dim=1)

    def norm_objective(self) -> torch.Tensor:
        """``‖v‖ + ‖M‖_F``, with ``‖LᵀR‖_F² = tr(LLᵀ RRᵀ)`` (``r×r`` products only)."""
        if self.matrix is not None:
            return self.vector.norm() + self.matrix.norm()
        assert self.left is not None and self.right is not None
        fro2 = ((self.left @ self.left.T) * (self.right @ self.right.T)).sum().clamp_min(0)
        return self.vector.norm() + torch.sqrt(fro2)

    def scaled(self, k: float) -> Steering:
        """``k·v`` and ``k·M`` (the ``left`` factor scaled)."""
        if self.matrix is not None:
            return Affine(self.vector * k, matrix=self.matrix * k)
        assert self.left is not None and self.right is not None
        return Affine(self.vector * k, self.left * k, self.right)

    def delta(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        v = rows.to(h)[:, None, :]
        if self.matrix is not None:
            return v + h @ self.matrix.to(h).T
        assert self.left is not None and self.right is not None
        return v + (h @ self.right.to(h).T) @ self.left.to(h)

    @classmethod
    def delta_many(cls, params: Sequence[Steering], which: torch.Tensor, h: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        affine = [p for p in params if isinstance(p, Affine)]
        if any(p.matrix is not None for p in affine):
            return super().delta_many(params, which, h, rows)
        r_max, d = max(p.rank for p in affine), h.shape[-1]

        def stack(ts: list[torch.Tensor]) -> torch.Tensor:  # (J, r_max, d), zero rows pad lower ranks
            return torch.stack([torch.cat([t, t.new_zeros(r_max - t.shape[0], d)]) for t in ts])

        w = which.to(h.device)
        left = stack([p.left for p in affine if p.left is not None]).to(h)[w]
        right = stack([p.right for p in affine if p.right is not None]).to(h)[w]
        return rows.to(h)[:, None, :] + torch.bmm(torch.bmm(h, right.transpose(1, 2)), left)


class OperatorSteering(Steering):
    """``h + operator(h, v)``: a user function gives the change (steering-vectors' operators, e.g.
    ablation then addition). Not saved to files (a function is not data), so it has no ``kind``."""

    def __init__(self, vector: torch.Tensor, operator: Any):
        self.vector, self.operator = vector, operator

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vector": self.vector}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Steering:
        raise TypeError("an operator steering cannot be rebuilt from a file")

    def map(self, fn: Any) -> Steering:
        return OperatorSteering(fn(self.vector), self.operator)

    def scaled(self, k: float) -> Steering:
        return OperatorSteering(self.vector * k, self.operator)

    def delta(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = self.operator(h, self.vector.to(device=h.device, dtype=h.dtype))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"operator must return a tensor, got {type(out).__name__}")
        try:
            return torch.broadcast_to(out.to(h), h.shape)
        except RuntimeError as e:
            raise ValueError(f"operator returned shape {tuple(out.shape)}; expected {tuple(h.shape)} or "
                             f"({h.shape[-1]},)") from e


#: Additive steering whose per-row vectors are given directly (the object's own vector is never read).
ADDITIVE: list[Steering] = [Additive(torch.zeros(0))]


def _start_vector(d: int, options: OptimizeOptions, gen: torch.Generator) -> torch.Tensor:
    if options.starting_vec is not None:
        return options.starting_vec.detach().float().cpu().clone()
    return random_vector(d, options.starting_norm, gen)


def class_for(options: OptimizeOptions) -> type[Steering]:
    """The parameterisation ``options`` ask for: ``parameterization``, else clamp / affine / additive."""
    if options.parameterization is not None:
        return options.parameterization
    if options.vector_clamp is not None:
        return Clamp
    if options.affine_rank is not None:
        return Affine
    return Additive


def delta(params: Sequence[Steering], which: torch.Tensor | None, h: torch.Tensor,
          rows: torch.Tensor) -> torch.Tensor:
    """The change to ``h`` ``(B, T, d)`` when row ``b`` is steered by ``params[which[b]]`` with vector
    ``rows[b]`` (``which=None``: every row by ``params[0]``). Rows of several classes are grouped by
    class, each class computing its rows in one batched call."""
    if which is None or len(params) == 1:
        return params[0].delta(h, rows)
    classes = list(dict.fromkeys(type(p) for p in params))
    if len(classes) == 1:
        return classes[0].delta_many(params, which, h, rows)
    out = torch.zeros_like(h)
    which = which.cpu()
    for cls in classes:
        members = [j for j, p in enumerate(params) if type(p) is cls]
        local = torch.full((len(params),), -1, dtype=torch.long)
        local[members] = torch.arange(len(members))
        idx = (local[which] >= 0).nonzero()[:, 0]
        if len(idx):
            sub = cls.delta_many([params[j] for j in members], local[which[idx]], h[idx.to(h.device)],
                                 rows[idx.to(rows.device)])
            out = out.index_put((idx.to(h.device),), torch.broadcast_to(sub, h[idx.to(h.device)].shape))
    return out


def steer(h: torch.Tensor, params: Sequence[Steering], rows: torch.Tensor, *, which: torch.Tensor | None = None,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """The one function that changes an activation: ``h + mask · delta`` (out of place, differentiable).

    Args:
        h: activations ``(B, T, d)``.
        params: the parameterisations; row ``b`` uses ``params[which[b]]`` (``which`` None: ``params[0]``).
        rows: per-row vectors ``(B, d)`` (sign and noise folded in) or one vector ``(d,)`` for all rows.
        mask: ``(B, T)`` bool (False = untouched) or float weights per position; None = all positions.
    """
    if rows.dim() == 1:
        rows = rows.expand(h.shape[0], -1)
    d = delta(params, which, h, rows)
    if mask is not None:
        d = d * mask.to(device=h.device, dtype=h.dtype)[..., None]
    return h + torch.broadcast_to(d, h.shape)

