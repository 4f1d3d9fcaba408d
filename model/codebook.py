"""CSRC: the cosine-similarity residual codebook that turns an item embedding into a few bytes.

Level l holds C centres (unit vectors). A vector's residual r_0 = x; at each level the code is the
centre c of highest cosine with r_l, the scale is alpha_l = r_l·c / ||c||² (= r_l·c, centres are
unit), and the next residual removes that projection: r_{l+1} = r_l - alpha_l c. The decoded vector
is sum_l alpha_l c_l.

Codes alone lose alpha, so each item also stores, per level, either
- ``scale_bits`` > 0: alpha quantised uniformly to ``scale_bits`` bits (one byte per level) over a
  per-level range [lo, hi] learned in ``fit``; or
- ``scale_bits`` = 0: nothing; decode uses the centre's mean alpha over its members in ``fit``.

Centres are learned level by level with *balanced* spherical k-means on that level's residuals
(see ``balanced_assign``); the residuals passed to the next level use the plain highest-cosine
assignment, the same rule ``encode`` applies, so each level is trained on what it will see.

Stored bytes per item: L code bytes (uint8 when C ≤ 256, else uint16 little-endian), then L scale
bytes when ``scale_bits`` > 0. A history of n items is those rows back to back (``pack_history``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CodebookConfig:
    levels: int = 4  # L: residual levels, one code each
    size: int = 256  # C: centres per level
    kmeans_iters: int = 20
    balance: bool = True  # capacity-constrained k-means assignment while fitting
    scale_bits: int = 8  # 0 = no stored scale (per-centre mean alpha); 1..8 = one byte per level
    seed: int = 0

    def __post_init__(self) -> None:
        if self.levels < 1 or self.size < 2 or self.size > 65536:
            raise ValueError(f"need levels ≥ 1 and 2 ≤ size ≤ 65536, got {self.levels}, {self.size}")
        if not 0 <= self.scale_bits <= 8:
            raise ValueError(f"scale_bits must be in 0..8, got {self.scale_bits}")


def balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy capacity-constrained assignment: each row to a column, no column over ``capacity``.

    sim [N, C] (higher is better) -> assign LongTensor [N].
    Rounds of proposals: every unassigned row proposes to its best column that still has room; a
    column accepts its highest-scoring proposers up to its remaining room, the rest propose again
    next round. Each round fills at least one column or places every proposer, so there are at most
    C rounds; in practice a handful. Vectorised per round, O(N·C) memory: fine for N ~ 1e5, C = 256.
    Needs capacity · C ≥ N.
    """
    n, c = sim.shape
    assign = torch.full((n,), -1, dtype=torch.long, device=sim.device)
    room = torch.full((c,), capacity, dtype=torch.long, device=sim.device)
    pending = torch.arange(n, device=sim.device)
    while pending.numel():
        s = sim if pending.numel() == n else sim.index_select(0, pending)
        if (room <= 0).any():
            s = s.masked_fill((room <= 0)[None, :], -math.inf)
        score, best = s.max(dim=1)
        # order proposers by (column, score descending) to rank them within their column
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        col = best[order]
        counts = torch.bincount(col, minlength=c)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=sim.device) - starts[col]
        accepted = rank < room[col]
        rows = pending[order[accepted]]
        assign[rows] = col[accepted]
        room -= torch.bincount(col[accepted], minlength=c)
        pending = pending[order[~accepted]]
    return assign


def spherical_kmeans(
    x: torch.Tensor, k: int, iters: int, balance: bool, generator: torch.Generator
) -> torch.Tensor:
    """Cosine k-means on x [N, D] -> unit centres [k, D].

    Init: k distinct random rows (seeded); when N < k the rest are random unit vectors, which stay
    put because no point ever needs them. An empty cluster keeps its previous centre.
    """
    n, d = x.shape
    xn = F.normalize(x, dim=-1)
    perm = torch.randperm(n, generator=generator)[: min(n, k)].to(x.device)
    centres = xn[perm]
    if n < k:
        extra = torch.randn(k - n, d, generator=generator).to(x.device, x.dtype)
        centres = torch.cat([centres, F.normalize(extra, dim=-1)])
    capacity = math.ceil(n / k)
    for _ in range(iters):
        sim = xn @ centres.T
        assign = balanced_assign(sim, capacity) if balance else sim.argmax(dim=1)
        sums = torch.zeros_like(centres).scatter_add_(0, assign[:, None].expand(-1, d), xn)
        counts = torch.bincount(assign, minlength=k)
        centres = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), centres)
    return centres


class ResidualCodebook(nn.Module):
    """CSRC codebook for dim-D vectors.

    Buffers: centres [L, C, D] (unit rows), scale_lo / scale_hi [L] (quantisation range of alpha),
    mean_alpha [L, C] (decode scale when scale_bits = 0), fitted [] (0/1).
    """

    def __init__(self, config: CodebookConfig, dim: int):
        super().__init__()
        self.config = config
        self.dim = dim
        L, C = config.levels, config.size
        self.register_buffer("centres", torch.zeros(L, C, dim))
        self.register_buffer("scale_lo", torch.zeros(L))
        self.register_buffer("scale_hi", torch.ones(L))
        self.register_buffer("mean_alpha", torch.zeros(L, C))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))

    # --- layout ----------------------------------------------------------------------------------
    @property
    def code_bytes(self) -> int:
        return 1 if self.config.size <= 256 else 2

    @property
    def bytes_per_item(self) -> int:
        L = self.config.levels
        return L * self.code_bytes + (L if self.config.scale_bits else 0)

    @property
    def scale_steps(self) -> int:
        """Largest quantised scale value (2^bits - 1); 0 when no scale is stored."""
        return (1 << self.config.scale_bits) - 1 if self.config.scale_bits else 0

    # --- fit -------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> ResidualCodebook:
        """Learn centres and scale tables from x [N, D], level by level over the residuals."""
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise ValueError(f"fit expects a non-empty [N, {self.dim}] tensor, got {tuple(x.shape)}")
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        r = x.to(self.centres.device, torch.float32)
        for level in range(cfg.levels):
            centres = spherical_kmeans(r, cfg.size, cfg.kmeans_iters, cfg.balance, gen)
            self.centres[level] = centres
            code, alpha = self._level_step(r, centres)
            # quantisation range: robust quantiles so one outlier does not waste the 2^bits steps
            # (torch.quantile takes ≤ 2^24 values; the first 2^20 are plenty for two quantiles)
            lo, hi = torch.quantile(alpha[: 1 << 20], torch.tensor([0.001, 0.999], device=r.device))
            self.scale_lo[level] = lo
            self.scale_hi[level] = torch.maximum(hi, lo + 1e-6)
            sums = torch.zeros(cfg.size, device=r.device).index_add_(0, code, alpha)
            counts = torch.bincount(code, minlength=cfg.size).clamp(min=1)
            self.mean_alpha[level] = sums / counts
            r = r - alpha[:, None] * centres[code]
        self.fitted.fill_(1)
        return self

    @staticmethod
    def _level_step(r: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r [N, D], unit centres [C, D] -> (code [N] of highest cosine, alpha [N] = r·c)."""
        # argmax of r·c over unit centres is the argmax of cosine: ||r|| is the same for every c
        alpha, code = (r @ centres.T).max(dim=1)
        return code, alpha

    # --- encode / decode -------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError("codebook is not fitted: call fit() or load a fitted state")

    @torch.no_grad()
    def encode(
        self, x: torch.Tensor, batch_size: int = 65536
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, D] -> (codes LongTensor [N, L], scales uint8 [N, L] or None when scale_bits = 0)."""
        self._check_fitted()
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"encode expects [N, {self.dim}], got {tuple(x.shape)}")
        codes, alphas = [], []
        for start in range(0, x.shape[0], batch_size):
            r = x[start : start + batch_size].to(self.centres.device, torch.float32)
            c_l, a_l = [], []
            for level in range(self.config.levels):
                code, alpha = self._level_step(r, self.centres[level])
                r = r - alpha[:, None] * self.centres[level][code]
                c_l.append(code)
                a_l.append(alpha)
            codes.append(torch.stack(c_l, dim=1))
            alphas.append(torch.stack(a_l, dim=1))
        dev = self.centres.device
        codes_t = torch.cat(codes) if codes else torch.zeros(0, self.config.levels, dtype=torch.long, device=dev)
        if not self.config.scale_bits:
            return codes_t, None
        alpha_t = torch.cat(alphas) if alphas else torch.zeros(0, self.config.levels, device=dev)
        steps = self.scale_steps
        q = (alpha_t - self.scale_lo) / (self.scale_hi - self.scale_lo) * steps
        return codes_t, q.round().clamp(0, steps).to(torch.uint8)

    @torch.no_grad()
    def decode(
        self, codes: torch.Tensor, scales: torch.Tensor | None = None, batch_size: int = 65536
    ) -> torch.Tensor:
        """codes [N, L] (any integer dtype), scales uint8 [N, L] or None -> vectors [N, D] float32.

        Also accepts codes [..., L] with scales [..., L]; the leading shape is kept.
        """
        self._check_fitted()
        if self.config.scale_bits and scales is None:
            raise ValueError("this codebook stores scales (scale_bits > 0): pass them to decode")
        lead = codes.shape[:-1]
        codes = codes.reshape(-1, self.config.levels).to(self.centres.device, torch.long)
        if scales is not None:
            scales = scales.reshape(-1, self.config.levels).to(self.centres.device)
        level_idx = torch.arange(self.config.levels, device=self.centres.device)
        out = []
        for start in range(0, codes.shape[0], batch_size):
            c = codes[start : start + batch_size]
            vecs = self.centres[level_idx, c]  # [n, L, D]
            if self.config.scale_bits:
                q = scales[start : start + batch_size].float()
                alpha = self.scale_lo + q / self.scale_steps * (self.scale_hi - self.scale_lo)
            else:
                alpha = self.mean_alpha[level_idx, c]
            out.append((alpha[..., None] * vecs).sum(dim=1))
        dec = torch.cat(out) if out else torch.zeros(0, self.dim, device=self.centres.device)
        return dec.reshape(*lead, self.dim)

    @torch.no_grad()
    def reconstruction_cosine(self, x: torch.Tensor) -> float:
        """Mean cosine between x [N, D] and decode(encode(x))."""
        x = x.to(self.centres.device, torch.float32)
        return F.cosine_similarity(self.decode(*self.encode(x)), x, dim=-1).mean().item()

    # --- bytes -----------------------------------------------------------------------------------
    def pack(self, codes: torch.Tensor | np.ndarray, scales: torch.Tensor | np.ndarray | None) -> np.ndarray:
        """codes [N, L], scales [N, L] | None -> uint8 array [N, bytes_per_item]; row i is item i's bytes."""
        codes_np = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
        if codes_np.ndim != 2 or codes_np.shape[1] != self.config.levels:
            raise ValueError(f"codes must be [N, {self.config.levels}], got {codes_np.shape}")
        if codes_np.size and (codes_np.min() < 0 or codes_np.max() >= self.config.size):
            raise ValueError(f"codes out of range 0..{self.config.size - 1}")
        parts = [codes_np.astype("<u2" if self.code_bytes == 2 else np.uint8).view(np.uint8)]
        parts[0] = parts[0].reshape(codes_np.shape[0], -1)
        if self.config.scale_bits:
            if scales is None:
                raise ValueError("this codebook stores scales (scale_bits > 0): pass them to pack")
            s = np.asarray(scales.cpu() if isinstance(scales, torch.Tensor) else scales)
            parts.append(s.astype(np.uint8).reshape(codes_np.shape[0], self.config.levels))
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    def unpack(self, rows: np.ndarray | bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 [N, bytes_per_item] (or the bytes of N rows) -> (codes LongTensor [N, L], scales uint8 [N, L] | None)."""
        buf = np.frombuffer(rows, dtype=np.uint8) if isinstance(rows, (bytes, bytearray, memoryview)) else np.asarray(rows, dtype=np.uint8)
        B, L = self.bytes_per_item, self.config.levels
        if buf.size % B:
            raise ValueError(f"packed codes must be a multiple of {B} bytes, got {buf.size}")
        buf = buf.reshape(-1, B)
        nc = L * self.code_bytes
        code_bytes = np.ascontiguousarray(buf[:, :nc])
        codes = code_bytes.view("<u2" if self.code_bytes == 2 else np.uint8).astype(np.int64)
        scales = torch.from_numpy(buf[:, nc:].copy()) if self.config.scale_bits else None
        return torch.from_numpy(codes), scales

    def pack_history(self, codes: torch.Tensor | np.ndarray, scales: torch.Tensor | np.ndarray | None) -> bytes:
        """A history's codes [n, L] (+ scales) -> one bytes object of n · bytes_per_item bytes."""
        return self.pack(codes, scales).tobytes()

    def unpack_history(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of pack_history: bytes -> (codes [n, L], scales [n, L] | None)."""
        return self.unpack(data)

    def decode_history(self, data: bytes) -> torch.Tensor:
        """Packed history bytes -> reconstructed vectors [n, D]."""
        return self.decode(*self.unpack(data))

    # --- persistence -----------------------------------------------------------------------------
    def to_manifest(self) -> dict:
        """JSON-able description that, with state_dict(), rebuilds this codebook."""
        return {"config": asdict(self.config), "dim": self.dim, "bytes_per_item": self.bytes_per_item}

    @classmethod
    def from_state(cls, manifest: dict, state: dict[str, torch.Tensor]) -> ResidualCodebook:
        book = cls(CodebookConfig(**manifest["config"]), int(manifest["dim"]))
        book.load_state_dict(state)
        return book
