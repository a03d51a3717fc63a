"""Convolutions y = W ⋆ x + b (Conv1d, Conv2d; zero padding, groups = 1) and their structured products.

Write U_b (C_in·k, P) for the unfolded input patches of sample b (``F.unfold``'s layout, :func:`unfold_patches`)
and l_{b,r} (C_out, P) for factor row (b, r) at the output (P output positions). The weight is shared over positions, so

    K_{(b,r)} = vec(l_{b,r} U_bᵀ) ⊕ Σ_p l_{b,r,:,p}        (W row-major (C_out, C_in·k), then b)
    rows · A   = conv_transpose(l_{b,r}, W)                (:func:`pull_rows`: one GEMM to the taps, then col2im)
    B_bᵀ λ_b   = λ_b U_bᵀ summed over samples              (the block gradient)

K is formed from the patches in O(B·R·C_out·C_in·k·P) — never through per-sample Jacobians; the inner Gram of the
dual solve is then K Kᵀ. Reference: Grosse & Martens (2016) for the patch view of a convolution.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from flows.linalg import gram


def supports(module: nn.Module) -> bool:
    """Whether the structured path covers this convolution (zero padding given as sizes, one group)."""
    return isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)


def _axis_classes(size: int, out: int, kernel: int, stride: int, padding: int, dilation: int) -> list:
    """How the taps of one spatial axis fold back onto the input axis, by residue class (polyphase): input
    position y = s·q + i·d − p receives tap i of output position q. Write y = s·m + ρ; the taps with
    i·d − p ≡ ρ (mod s) land on the sub-lattice ρ, tap i at m = q + δ_i with δ_i = (i·d − p − ρ)/s. Per class
    ρ < min(s, size): (ρ, [(i, whether it covers the whole sub-lattice, destination slice of m, source slice of
    q), …]) — the slices keep 0 ≤ m < M_ρ and 0 ≤ q < out; a class no tap reaches has no entries."""
    classes = []
    for rho in range(min(stride, size)):
        length = len(range(rho, size, stride))
        taps = []
        for i in range(kernel):
            offset = i * dilation - padding
            if (offset - rho) % stride:
                continue
            delta = (offset - rho) // stride
            lo, hi = max(0, delta), min(length, out + delta)
            if lo < hi:
                taps.append((i, lo == 0 and hi == length, slice(lo, hi), slice(lo - delta, hi - delta)))
        classes.append((rho, taps))
    return classes


@functools.lru_cache(maxsize=256)
def _fold_plan(size: tuple, out: tuple, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple) -> tuple:
    """Per sub-lattice (ρ_h, ρ_w) of the input (:func:`_axis_classes` on each axis): (ρ_h, ρ_w, first, adds) —
    ``first`` a tap (i, j, destination slices, source slices) that covers the whole sub-lattice, copied onto it,
    or None (the sub-lattice is zeroed), and ``adds`` the other taps, added as shifted slices. Cached per
    geometry, so a pull only runs the copies and adds."""
    plan = []
    for rho_y, taps_y in _axis_classes(size[0], out[0], kernel[0], stride[0], padding[0], dilation[0]):
        for rho_x, taps_x in _axis_classes(size[1], out[1], kernel[1], stride[1], padding[1], dilation[1]):
            pairs = [(i, j, whole_y and whole_x, dst_y, dst_x, src_y, src_x)
                     for i, whole_y, dst_y, src_y in taps_y for j, whole_x, dst_x, src_x in taps_x]
            first = next((pair for pair in pairs if pair[2]), None)
            adds = tuple(pair for pair in pairs if pair is not first)
            plan.append((rho_y, rho_x, first, adds))
    return tuple(plan)


def unfold_patches(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """The patches of x (B, C, H, W) under a k_h × k_w kernel, (B, C·k_h·k_w, P_h·P_w) exactly as ``F.unfold``
    returns them, by one copy out of a window view: the zero-padded input's sliding windows (``Tensor.unfold``
    twice, dilation by slicing each window) hold U_b[(c, i, j), (q, q')] = x_pad[b, c, s_h·q + d_h·i,
    s_w·q' + d_w·j]. Views and one copy, so it batches under ``torch.func.vmap`` and differentiates like
    ``F.unfold``; 98–135 against 129–186 µs for the benchmark CNN's second convolution (32 × 16 × 8 × 8, 3 × 3,
    stride 2; min of 400 calls in two sessions, 2 threads), whose im2col loop is not vectorised. Cost O(B·C·k·P)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    b, c, oh, ow = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kh * kw, oh * ow)


PULL_WHOLE_BYTES = 12 << 20  # tap products up to this size are formed in one GEMM
PULL_CHUNK_BYTES = 4 << 20  # above it, in chunks of rows of about this size


def pull_rows(rows: torch.Tensor, weight: torch.Tensor, size, stride, padding, dilation) -> torch.Tensor:
    """The transposed convolution of rows (N, C_out, P_h, P_w) onto an input of spatial ``size`` (H, W): the rows
    times the convolution's input Jacobian, (N, C_in, H, W), for zero padding and one group.

    One GEMM sends every output position to all kernel taps, T = l̃ W̃ with l̃ (N·P_h·P_w, C_out) and
    W̃ (C_out, k_h·k_w·C_in); then every tap (i, j) of every position is added onto the input position it read,
    x[:, i·d_h − p_h + s_h·q, j·d_w − p_w + s_w·q'] += T[:, q, q', i, j] (col2im). The adds go by residue class
    of the input position modulo the stride (:func:`_fold_plan`): on each of the s_h·s_w sub-lattices every tap
    that lands there is one shifted slice of T, so the first tap that covers the whole sub-lattice is copied
    onto it and the others are added as whole (rows, m, m', channels) slices; a sub-lattice that no tap covers
    whole is zeroed first. Returned as a permuted view of an (N, H, W, C_in) buffer, channels innermost in memory.

    T holds k_h·k_w·C_in numbers per output position of every row. Beyond ``PULL_WHOLE_BYTES`` the rows go in
    chunks whose T is about ``PULL_CHUNK_BYTES``, each folded into its slice of the buffer while T is still in
    cache. ``python benchmarks/conv_pull.py``: 0.39–0.63× the time of one T at 18–40 MB (stride 1: 288 rows,
    16 → 16 or 32 → 32 channels on 8 × 8; 32 rows, 64 → 64 on 16 × 16; 128 rows, 8 → 8 on 16 × 16), but
    0.96–1.16× at 5–10 MB, where the chunks' extra calls cost what the cache saves — hence the threshold; on a CNN
    of two stride-1 convolutions 16-16 at batch 32, 0.79× for Layerwise's natural direction and 0.82× for K-FAC's.

    For the benchmark CNN's second convolution (288 rows, 16 → 16 channels, 4 × 4 → 8 × 8, stride 2, T of 5 MB in
    one piece) this takes 0.61–0.73 ms against 0.73–0.94 ms for one ``index_add_`` of all taps into a zeroed
    buffer and 1.30 ms for ``torch.nn.grad.conv2d_input`` in float64; for 288 rows, 16 → 16 channels at stride 1
    (8 × 8, padding 1) 3.2–4.3 against 9.6–10.0 ms unchunked (min of 300 calls, isolated, 2 threads; inside the
    metrics' sweep the gain is within this machine's noise). Out-of-place where it matters: the buffer is
    allocated from T, so it batches under ``torch.func.vmap`` over the rows, the weight or both, and forward- and
    reverse-mode AD go through it. Cost O(N·P·C_out·C_in·k) for the GEMM plus O(N·P·k·C_in) for the adds.
    """
    (kh, kw), (h, w) = weight.shape[2:], size
    n, c_out, oh, ow = rows.shape
    c_in = weight.shape[1]
    per_row = oh * ow * kh * kw * c_in * rows.element_size()
    chunk = max(n, 1) if per_row * n <= PULL_WHOLE_BYTES else max(1, PULL_CHUNK_BYTES // per_row)
    by_position = rows.permute(0, 2, 3, 1)
    kernel = weight.permute(0, 2, 3, 1).reshape(c_out, -1)
    plan = _fold_plan((h, w), (oh, ow), (kh, kw), tuple(stride), tuple(padding), tuple(dilation))
    out = None
    for start in range(0, n, chunk) or [0]:  # no rows: one empty GEMM gives the empty buffer
        part = by_position[start:start + chunk]
        taps = (part.reshape(-1, c_out) @ kernel).view(part.shape[0], oh, ow, kh, kw, c_in)
        if out is None:
            out = taps.new_empty(n, h, w, c_in)
        _fold(taps, out[start:start + part.shape[0]], plan, stride)
    return out.permute(0, 3, 1, 2)


def _fold(taps: torch.Tensor, out: torch.Tensor, plan: tuple, stride) -> None:
    """col2im of the tap products ``taps`` (N, P_h, P_w, k_h, k_w, C_in) into ``out`` (N, H, W, C_in) by the
    sub-lattice copies and adds of ``plan`` (:func:`_fold_plan`)."""
    for rho_y, rho_x, first, adds in plan:
        lattice = out[:, rho_y::stride[0], rho_x::stride[1], :]
        if first is None:
            lattice.zero_()
        else:
            i, j, _, _, _, src_y, src_x = first
            lattice.copy_(taps[:, src_y, src_x, i, j, :])
        for i, j, _, dst_y, dst_x, src_y, src_x in adds:
            lattice[:, dst_y, dst_x, :] += taps[:, src_y, src_x, i, j, :]


class ConvOps:
    """Structured products of an ``nn.Conv1d`` / ``nn.Conv2d`` node."""

    structured = True

    def __init__(self, module: nn.Conv1d | nn.Conv2d):
        self.two_d = isinstance(module, nn.Conv2d)
        self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
        self.has_bias = module.bias is not None
        self.local_names = ("weight", "bias") if self.has_bias else ("weight",)
        self.out_channels = module.out_channels
        self._kernel = torch.empty(0).new_empty((1, 1, *module.kernel_size))  # only its shape is read
        self._last = None  # (weak reference to an input, its version, its patches)

    def forward(self, p, ins):
        """y_b = W U_b + b from the input's patches (F.conv2d in float64 unfolds them too), which the sweep's
        products then reuse (:meth:`patches`)."""
        x, w = ins[0], p["weight"]
        u = self.patches(x)
        w = w.reshape(w.shape[0], -1).expand(u.shape[0], -1, -1)
        y = torch.baddbmm(p["bias"][:, None].expand(u.shape[0], -1, u.shape[2]), w, u) if self.has_bias else \
            torch.bmm(w, u)  # (B, C_out, P)
        size = [(n + 2 * pad - dil * (k - 1) - 1) // st + 1 for n, pad, dil, k, st in
                zip(x.shape[2:], self.padding, self.dilation, self._kernel.shape[2:], self.stride)]
        return y.reshape(*y.shape[:2], *size)

    def patches(self, x):
        """The unfolded input patches U (B, C_in·k, P): the layer is W U_b (+ b) per sample (KFC's input factor is
        built from these). The patches of the last input are kept — with a weak reference to it and its version
        counter, so an input changed in place is unfolded again — and the forward pass and the products of the
        sweep that follows unfold each input once (≈ 0.1 ms per call of the benchmark CNN's second layer)."""
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version:
            return last[2]
        u = self._patches(x, self._kernel)
        self._last = (weakref.ref(x), x._version, u)
        return u

    def _patches(self, x, weight):
        """U: (B, C_in·k, P), as ``F.unfold`` lays it out."""
        if self.two_d:
            return unfold_patches(x, weight.shape[2:], self.stride, self.padding, self.dilation)
        return unfold_patches(x[:, :, None], (1, weight.shape[2]), (1, self.stride[0]), (0, self.padding[0]),
                              (1, self.dilation[0]))

    def pull(self, p, ins, rows, want):
        """rows · ∂y/∂x (B, R, C_in, *spatial), by :func:`pull_rows`: the rows come back with their channels
        innermost in memory (a permuted view), which KFC's Γ reads without a copy and an activation's σ' follows."""
        if not want[0]:
            return [None], None
        x, w = ins[0], p["weight"]
        b, r = rows.shape[:2]
        flat = rows.reshape(b * r, *rows.shape[2:])
        if self.two_d:
            back = pull_rows(flat, w, x.shape[2:], self.stride, self.padding, self.dilation)
        else:
            back = pull_rows(flat[:, :, None], w[:, :, None], (1, x.shape[2]), (1, self.stride[0]),
                             (0, self.padding[0]), (1, self.dilation[0]))[:, :, 0]
        return [back.reshape(b, r, *x.shape[1:])], None

    def has_gram(self, ins) -> bool:
        return True

    def dual(self, ins, rows, weight_shape=None):
        """(K Kᵀ, g ↦ K g, u ↦ Kᵀu) from K_w = l Uᵀ (d × C_out·C_in·k) and the bias rows S = Σ_p l (d × C_out),
        KKᵀ = K_w K_wᵀ + S Sᵀ, so the bias columns are never concatenated onto K."""
        b, r = rows.shape[:2]
        u_patch = self.patches(ins[0])
        l_rows = rows.reshape(b, r, self.out_channels, -1)
        k_w = torch.einsum("brop,bip->broi", l_rows, u_patch).reshape(b * r, -1)
        inner = gram(k_w)
        n_w = k_w.shape[1]
        if not self.has_bias:
            return inner, lambda g: k_w @ g, lambda u: k_w.T @ u
        s = l_rows.sum(-1).reshape(b * r, -1)
        return (inner.addmm_(s, s.T), lambda g: k_w @ g[:n_w] + s @ g[n_w:],
                lambda u: torch.cat([k_w.T @ u, s.T @ u]))

    def k_rows(self, p, ins, rows):
        """K (B, R, n) materialised. The weight part is formed as U_b L_bᵀ per sample, L_b = (|T| × R·C_out) the
        rows by position (one batched product with the long position axis inside, whose (C_in·k) × (R·C_out)
        outputs are then transposed): with few input channels this is 1.8× faster than l_{b,r} U_bᵀ (104 against
        187 µs for the first convolution of the benchmark CNN, 32 × (9 × 64) · (64 × 144)). Rows that arrive with
        channels innermost (from :func:`pull_rows`) are regrouped by position with one copy."""
        u = self.patches(ins[0])
        b, r, c = rows.shape[:3]
        last = rows.movedim(2, -1)
        if last.is_contiguous():  # memory (B, R, positions, C_out)
            by_position = last.reshape(b, r, -1, c).transpose(1, 2).reshape(b, -1, r * c)
        else:
            by_position = rows.reshape(b, r * c, -1).mT
        k_w = torch.bmm(u, by_position)  # (B, C_in·k, R·C_out)
        k_w = k_w.reshape(b, -1, r, c).permute(0, 2, 3, 1).reshape(b, r, -1)
        if not self.has_bias:
            return k_w
        return torch.cat([k_w, by_position.reshape(b, -1, r, c).sum(1)], dim=2)

    def vjp_param(self, p, ins, lam):
        u = self.patches(ins[0])
        lam = lam.reshape(lam.shape[0], self.out_channels, -1)
        g_w = torch.einsum("bop,bip->oi", lam, u).reshape(-1)
        return torch.cat([g_w, lam.sum((0, 2))]) if self.has_bias else g_w
