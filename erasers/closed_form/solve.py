"""UCE, RECE and TRCE stage 1: closed-form edits of the cross-attention key/value projections.

All three minimise, for every attn2 to_k/to_v weight W₀ (d×n, n = context width) at once,

    Σᵢ η_e ‖W cᵢ − vᵢ*‖² + Σⱼ η_p ‖W cⱼ − W₀ cⱼ‖² + λ ‖W − W₀‖²_F  (+ a dense prior term for TRCE)

whose solution is W* = (λW₀ + η_e V Cᵀ + η_p W₀ PᵀP + W₀Π)(λI + η_e CᵀC + η_p PᵀP + Π)⁻¹ with the erased keys as
rows of C (m×n), the preserved keys as rows of P and an optional prior Π (n×n). The preserve and prior terms
cancel in the difference, which leaves an edit of rank at most m:

    ΔW = W* − W₀ = (V − W₀Cᵀ) · η_e C M⁻¹,    M = λI + η_e CᵀC + η_p PᵀP + Π.

The right factor S = η_e C M⁻¹ (m×n) depends only on text embeddings, so it is solved once per context width and
shared by every layer (Woodbury's identity when the number of vectors is below n); each layer only needs
V − W₀Cᵀ (d×m). For the `replace` technique V = W₀Gᵀ with guide keys G, so that factor is W₀(G − C)ᵀ.

- UCE: C = erased concepts' token embeddings, G = guide's (`last word token`, or the 2023 suffix selection).
- RECE: from a UCE edit, repeat: derive adversarial embeddings C′ that make the edited model reproduce the original
  K/V of the concept (a ridge solve against Σ W′ᵀW′), then erase C′ with the same closed form on W′.
- TRCE stage 1: first-[EoT] embeddings of malicious → safe sentences, λ = 0, η_e = 1/N and a COCO prior Π.
Per-layer dense equivalents, written the way the official code computes them, are in closed_form_reference.py.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..erasure import LayerDelta, compact


@dataclass
class Pairs:
    """Erased key blocks and their guide blocks: rows are token embeddings, one block per (concept, guide) pair."""

    keys: list[torch.Tensor] = field(default_factory=list)
    guides: list[torch.Tensor] = field(default_factory=list)

    def add(self, key: torch.Tensor, guide: torch.Tensor) -> None:
        if key.shape != guide.shape:
            raise ValueError(f"erased block {tuple(key.shape)} and guide block {tuple(guide.shape)} must align")
        self.keys.append(key)
        self.guides.append(guide)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.keys), torch.cat(self.guides)


def solve_shared(keys: torch.Tensor, lam: float, erase_scale: float, preserve: torch.Tensor | None = None,
                 preserve_scale: float = 0.0, prior: torch.Tensor | None = None) -> torch.Tensor:
    """S = η_e C M⁻¹ with M = λI + η_e CᵀC + η_p PᵀP + Π (m×n), in float64."""
    c = keys.double()
    n = c.shape[1]
    parts = [erase_scale ** 0.5 * c]
    if preserve is not None and len(preserve):
        parts.append(preserve_scale ** 0.5 * preserve.double())
    u = torch.cat(parts)
    if prior is None and lam > 0 and u.shape[0] < n:
        # Woodbury: M⁻¹ = (I − Uᵀ(λI + UUᵀ)⁻¹U) / λ, a k×k solve instead of n×n.
        inner = lam * torch.eye(u.shape[0], dtype=torch.float64, device=u.device) + u @ u.T
        solved = c - torch.linalg.solve(inner, u @ c.T).T @ u
        return erase_scale / lam * solved
    m = lam * torch.eye(n, dtype=torch.float64, device=u.device) + u.T @ u
    if prior is not None:
        m = m + prior.double()
    return erase_scale * torch.linalg.solve(m, c.T).T


def tensor_targets(projected_keys: torch.Tensor, projected_guides: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
    """UCE's `tensor` technique: per pair, remove from the guide's values their component along the erased values.

    As in the official code, the direction u = W c / ‖W c‖ and the inner product span the whole block of a pair
    (all its aligned token positions jointly). Inputs are d×m (columns = tokens); `blocks` are the block lengths.
    """
    out = []
    for key, guide in zip(projected_keys.split(list(blocks), dim=1), projected_guides.split(list(blocks), dim=1)):
        u = key / torch.linalg.vector_norm(key)
        out.append(guide - (u * guide).sum() * u)
    return torch.cat(out, dim=1)


def _thin_product(weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """weight @ columns for a thin right side. On the CPU, MKL's sgemm is several times slower for 2 to 15 columns
    than for 16 (docs/benchmarks.md, closed form), so those are padded with zero columns to 16; one column stays a
    matrix-vector product."""
    m = columns.shape[1]
    if weight.device.type == "cpu" and 1 < m < 16:
        padded = torch.cat([columns, columns.new_zeros(columns.shape[0], 16 - m)], dim=1)
        return (weight @ padded)[:, :m]
    return weight @ columns


class KVEdit:
    """Cross-attention K/V weights of one context width and an accumulated low-rank edit ΔWₗ = Aₗ S.

    Every step of UCE/RECE/TRCE adds columns to each Aₗ and rows to the shared S; nothing dense is formed until
    `layers()` decides per layer whether factors or a dense matrix are smaller. Products with the weights run in
    float32; from the second edit on the factors are kept in float64 (they are thin): RECE's ridge systems are
    ill-conditioned (λ ≪ ‖c‖²), and rounding the factors would show in the edit. A first edit's up factors are
    float32 products and stay float32 until then: a float64 copy would be exact but cost two more passes over
    every layer's factor (two more kernel launches each on a GPU, where UCE is mostly launches).
    """

    def __init__(self, base: Mapping[str, torch.Tensor]):
        widths = {w.shape[1] for w in base.values()}
        if len(widths) != 1:
            raise ValueError(f"KVEdit takes layers of one context width, got {sorted(widths)}")
        self.base = {name: w.detach().float() for name, w in base.items()}
        self.width = widths.pop()
        self.ups: dict[str, torch.Tensor] = {name: w.new_zeros(w.shape[0], 0) for name, w in self.base.items()}
        self.down = torch.zeros(0, self.width, dtype=torch.float64, device=next(iter(self.base.values())).device)
        self._gram: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def projector(self, x: torch.Tensor) -> Callable[[str], torch.Tensor]:
        """name -> W′ xᵀ (d×m) for the current (edited) weight of that layer, x m×n: what depends on x alone is
        computed once for all layers. Float32 while nothing is edited, float64 after."""
        columns = x.T.float().contiguous()
        if self.rank == 0:
            return lambda name: _thin_product(self.base[name], columns)
        low = self.down @ x.double().T
        return lambda name: _thin_product(self.base[name], columns).double() + self.ups[name].double() @ low

    def add(self, ups: Mapping[str, torch.Tensor], down: torch.Tensor) -> None:
        """Append columns to every layer's up factor and the matching rows to the shared down factor."""
        if self.rank == 0:
            self.ups = {name: ups[name] for name in self.base}
        else:
            self.ups = {name: torch.cat([self.ups[name].double(), ups[name].double()], dim=1) for name in self.base}
        self.down = torch.cat([self.down, down])

    def erase(self, pairs: Pairs, *, lam: float, erase_scale: float, preserve: torch.Tensor | None = None,
              preserve_scale: float = 0.0, prior: torch.Tensor | None = None, technique: str = "replace") -> None:
        """One closed-form edit on the current weights: map each erased key to its guide's value."""
        keys, guides = pairs.stacked()
        shared = solve_shared(keys, lam, erase_scale, preserve, preserve_scale, prior)
        blocks = [k.shape[0] for k in pairs.keys]
        if technique == "replace":
            difference = self.projector(guides - keys)
            ups = {name: difference(name) for name in self.base}
        elif technique == "tensor":
            erased, guided = self.projector(keys), self.projector(guides)
            ups = {}
            for name in self.base:
                projected = erased(name)
                ups[name] = tensor_targets(projected, guided(name), blocks) - projected
        else:
            raise ValueError(f"unknown technique {technique!r}: use 'replace' or 'tensor'")
        self.add(ups, shared)

    def gram(self) -> torch.Tensor:
        """Σₗ WₗᵀWₗ over the base weights (n×n), computed once (float32 products, float64 sum)."""
        if self._gram is None:
            self._gram = sum((w.T @ w).double() for w in self.base.values())
        return self._gram

    def adversarial_embeddings(self, concepts: torch.Tensor, reg: float, variant: str = "regzero",
                               old_targets: torch.Tensor | None = None) -> torch.Tensor:
        """RECE step A: embeddings c′ with W′c′ ≈ W c for all K/V layers at once (rows of `concepts`).

        regzero:   c′ = (ΣW′ᵀW′ + λ_r I)⁻¹ ΣW′ᵀW c
        standard:  c′ = (ΣW′ᵀW′ + λ_r I)⁻¹ (ΣW′ᵀW c + λ_r c_o)            (c_o: rows of `old_targets`)
        surrogate-1st/-2nd/-both: the official surrogate-regularised forms (see closed_form_reference).
        With G = ΣWᵀW, P = ΣWᵀA, Q = ΣAᵀA: ΣW′ᵀW = G + SᵀPᵀ and ΣW′ᵀW′ = ΣW′ᵀW + E with E = PS + SᵀQS, so
        regzero is c′ = c − (ΣW′ᵀW′ + λ_r I)⁻¹ (E + λ_r I) c. Solving for the correction keeps float32 rounding
        in G from swamping a small edit, and no layer is ever materialised.
        """
        g = self.gram()
        s = self.down.double()
        p = sum((self.base[n].T @ self.ups[n].float()).double() for n in self.base)
        q = sum(up.T @ up for up in (self.ups[n].double() for n in self.base))
        e = p @ s + s.T @ q @ s
        edited_base = g + s.T @ p.T  # Σ W′ᵀW
        edited_edited = edited_base + e  # Σ W′ᵀW′
        eye = torch.eye(self.width, dtype=torch.float64, device=s.device)
        c = concepts.double().T
        if variant in ("regzero", "standard"):
            correction = (e + reg * eye) @ c
            if variant == "standard":
                if old_targets is None:
                    raise ValueError("RECE's standard regularisation needs the old target concept's embedding")
                correction = correction - reg * old_targets.double().T
            return (c - torch.linalg.solve(edited_edited + reg * eye, correction)).T
        forms = {
            "surrogate-1st": ((1 + reg) * edited_edited, edited_base + reg * edited_edited),
            "surrogate-2nd": (reg * eye + edited_edited, reg * eye + edited_base),
            "surrogate-both": (reg * eye + (1 + reg) * edited_edited, reg * eye + edited_base + reg * edited_edited),
        }
        if variant not in forms:
            raise ValueError(f"unknown RECE embedding variant {variant!r}: use regzero, standard or {', '.join(forms)}")
        lhs, right = forms[variant]
        return torch.linalg.solve(lhs, right @ c).T

    def layers(self, prefix: str = "unet.") -> dict[str, LayerDelta]:
        """Per-layer deltas; layers kept as factors share one `down` tensor (stored once in a file)."""
        shared = self.down.float().contiguous()
        return {prefix + name: compact(up.float().contiguous(), shared) for name, up in self.ups.items()}


def uce(weights: Mapping[str, torch.Tensor], pairs: Pairs, *, lam: float = 0.5, erase_scale: float = 1.0,
        preserve: torch.Tensor | None = None, preserve_scale: float = 1.0, technique: str = "replace") -> KVEdit:
    """UCE on the K/V weights of one context width (name -> W₀, d×n)."""
    _check_scales(lam=lam, erase_scale=erase_scale)
    edit = KVEdit(weights)
    edit.erase(pairs, lam=lam, erase_scale=erase_scale, preserve=preserve, preserve_scale=preserve_scale,
               technique=technique)
    return edit


def rece(edit: KVEdit, concepts: Sequence[torch.Tensor], guides: Sequence[torch.Tensor], *, epochs: int,
         reg: float, lam: float = 0.1, erase_scale: float = 1.0, retain: torch.Tensor | None = None,
         preserve_scale: float = 0.1, variant: str = "regzero", old_targets: Sequence[torch.Tensor] | None = None,
         technique: str = "replace", progress: Callable[[int, int], None] | None = None) -> KVEdit:
    """RECE epochs on top of a (UCE) edit, in place. `concepts`/`guides`: full 77-token embeddings per concept."""
    _check_scales(lam=lam, erase_scale=erase_scale)
    if reg <= 0:
        raise ValueError(f"RECE's regularisation λ_r must be > 0, got {reg}")
    for epoch in range(epochs):
        # One solve for every concept's 77 rows: the matrices depend only on the current weights.
        stacked_old = torch.cat(list(old_targets)) if old_targets is not None else None
        adversarial = edit.adversarial_embeddings(torch.cat(list(concepts)), reg, variant, stacked_old)
        pairs = Pairs()
        for block, guide in zip(adversarial.split([len(c) for c in concepts]), guides):
            pairs.add(block, guide)
        edit.erase(pairs, lam=lam, erase_scale=erase_scale, preserve=retain, preserve_scale=preserve_scale,
                   technique=technique)
        if progress is not None:
            progress(epoch + 1, epochs)
    return edit


def trce_stage1(weights: Mapping[str, torch.Tensor], malicious: torch.Tensor, safe: torch.Tensor, *,
                prior: torch.Tensor, preserve_scale: float = 0.01) -> KVEdit:
    """TRCE stage 1: map first-[EoT] embeddings of malicious sentences (rows) to those of safe ones.

    `prior` is the per-caption mean of Σₜ eₜeₜᵀ over prior captions' token embeddings (the official cache sums over
    ~3·10⁴ COCO captions and divides by 3·10⁴). As in the official code the preserve scale enters squared (the cache
    is pre-multiplied by it and multiplied again) and λ = 0.
    """
    if len(malicious) == 0:
        raise ValueError("TRCE needs at least one (malicious, safe) sentence pair")
    edit = KVEdit(weights)
    pairs = Pairs()
    pairs.add(malicious, safe)
    edit.erase(pairs, lam=0.0, erase_scale=1.0 / len(malicious), prior=preserve_scale ** 2 * prior)
    return edit


def _check_scales(*, lam: float, erase_scale: float) -> None:
    if not lam > 0:
        raise ValueError(f"λ must be > 0 (it keeps the edit close to the original weights), got {lam}")
    if not erase_scale > 0:
        raise ValueError(f"the erase scale must be > 0, got {erase_scale}")
