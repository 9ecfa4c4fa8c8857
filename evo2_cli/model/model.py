"""StripedHyena 2 (Evo 2) in plain PyTorch: the whole model in one file.

What the model computes (DESIGN.md section 4; every formula matches the Vortex inference engine):

- byte tokens -> embedding `E` [V, D]; `num_layers` residual blocks; final RMSNorm; logits = x @ E^T (tied).
- RMSNorm: `scale * x / (||x||_2 / sqrt(D) + eps)` (eps outside the root).
- Hyena block (hcs / hcm / hcl): `z = W_proj RMSNorm(x)` (D -> 3D); a depthwise causal 3-tap featurizer
  conv over the 3D channels; channels de-interleaved by c mod 3 into x2 (gate), x1, v; `u = x1 * v`;
  an inner causal filter over u; `out = x2 * (filter(u) [+ D * u])`; `x += dense(out)`; then the MLP.
    hcs  grouped 7-tap cross-correlation, no D term
    hcm  grouped 128-tap causal convolution, plus D * u
    hcl  one modal filter per channel, h[d, t] = sum_s R[d, s] exp(lambda[d, s] t), FFT conv, plus D * u
  The featurizer, the inner filters and the FFTs always run in fp32, also under bf16 autocast.
- hcl poles: `hcl_form: modal` stores p, gamma with lambda = -exp(p) * exp(gamma) < 0 (stable by construction,
  the training stacks' form); `hcl_form: vortex` stores lambda itself (`log_poles`, free; kept to reproduce
  and diagnose the gradient explosion). Both start from the training stacks' init, never lambda >= 0.
- Attention block: fused Wqkv (rows q, k, v, each head-major), rotary over the full head dim (NeoX
  half-split), causal `scaled_dot_product_attention`, out_proj with bias; then the MLP.
- MLP: `l3(act(l1 m) * l2 m)`, no biases; act is exact GELU in layer 0 and identity in every later layer when
  `evo2_style_activations` (the released models); each block stores its own `MLP.activation`.

Cached inference (`new_cache`, `prefill`, `prefill_chunks`, `step`, `generate_greedy`): attention keeps a
KV cache, the featurizer its last 2 inputs, hcs its last 6, hcm its last 127, and hcl a modal state
s[b, d, s] (fp64) updated per token as `s = exp(lambda) s + u`, `y = sum_s R s + D u` (O(1) per token).
Prefill continues whatever the cache holds, C tokens at a time (chunked prefill, exact long context): a
chunk convolves with itself (hcl: a filter and an FFT of ~2C, never of the whole length) and takes the past
from the cache (hcl: `y += sum_s R exp(lambda (t + 1)) s`, then `s = exp(lambda C) s + chunk's own sum`,
`modal_continue`; attention: a bottom-right causal softmax over the KV cache with fused kernels on CUDA
and CPU, tiles elsewhere, `causal_attention_after_cache`), so memory per chunk is O(B D C) plus the KV
cache. Any mix of prefills (of any chunk size) and steps equals the full forward.

Every fast path has a slow reference next to it (`*_reference`), compared in tests/test_model.py and
tests/test_model_prefill.py.
Parameter names mirror the Vortex checkpoint layout where the math is the same (see vortex.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from evo2_cli.model.config import ModelConfig

# ============================================================== fp32 signal-processing kernels (+ references)


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def causal_cross_correlation(u: Tensor, w: Tensor) -> Tensor:
    """Depthwise causal FIR, cross-correlation orientation: y[c, t] = sum_k w[c, k] u[c, t - K + 1 + k].

    u: (B, C, L), w: (C, K); tap K-1 multiplies the current step. Fast path: grouped conv1d.
    """
    channels, taps = w.shape
    u_pad = F.pad(u, (taps - 1, 0))  # (B, C, L + K - 1)
    return F.conv1d(u_pad, w.unsqueeze(1), groups=channels)  # (B, C, L)


def causal_cross_correlation_reference(u: Tensor, w: Tensor) -> Tensor:
    """Loop over taps: the obvious version of `causal_cross_correlation`."""
    taps = w.shape[1]
    length = u.shape[-1]
    y = torch.zeros_like(u)
    for k in range(taps):
        shift = taps - 1 - k  # tap k looks `shift` steps back
        if shift < length:
            y[..., shift:] += w[:, k, None] * u[..., : length - shift]
    return y


def _fft_size(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def causal_convolution_fft(u: Tensor, h: Tensor) -> Tensor:
    """Causal convolution y[c, t] = sum_{k<=t} h[c, k] u[c, t - k] via a zero-padded real FFT, in fp32.

    u: (B, C, L), h: (C, K) with any K (taps beyond L are ignored); tap 0 multiplies the current step.
    """
    length = u.shape[-1]
    h = h[..., :length]
    n = _fft_size(length + h.shape[-1] - 1)
    u_f = torch.fft.rfft(u.float(), n=n)  # (B, C, n/2+1)
    h_f = torch.fft.rfft(h.float(), n=n)  # (C, n/2+1)
    return torch.fft.irfft(u_f * h_f, n=n)[..., :length]  # (B, C, L)


def causal_convolution_direct(u: Tensor, h: Tensor) -> Tensor:
    """Direct causal convolution: conv1d with flipped taps (tap 0 = current step). Faster than the FFT on a
    CPU for hcm's 128 taps; the two are compared in tests."""
    length = u.shape[-1]
    h = h[..., :length]
    return causal_cross_correlation(u, h.flip(-1))


def _decay_blocks(log_poles: Tensor, length: int) -> tuple[Tensor, Tensor, int]:
    """exp(lambda t) for t = c * B + k factored as across[c] * within[k], B ~ sqrt(length), in fp32.

    Returns within (D, S, B) = exp(lambda k), across (D, S, C) = exp(lambda c B), and B; C * B >= length.
    Only D S (B + C) exponentials instead of D S L (exp dominates the hcl cost on a CPU otherwise).
    """
    lam = log_poles.float().unsqueeze(-1)  # (D, S, 1)
    block = 1 << math.ceil(math.log2(max(length, 1)) / 2)
    count = -(-length // block)
    k = torch.arange(block, device=lam.device, dtype=torch.float32)
    c = torch.arange(count, device=lam.device, dtype=torch.float32) * block
    return torch.exp(lam * k), torch.exp(lam * c), block


def modal_filter(log_poles: Tensor, residues: Tensor, length: int, decay: tuple | None = None) -> Tensor:
    """h[d, t] = sum_s R[d, s] exp(lambda[d, s] t) for t = 0..length-1, in fp32. (D, S) x2 -> (D, L).

    `residues` may carry leading batch dims, (..., D, S) -> (..., D, L) (chunked prefill weights the modes
    by each sequence's carried state). One batched matmul over the factored exponentials:
    h[d, c B + k] = sum_s (R across)[d, c, s] within[d, s, k]. `decay`: `_decay_blocks(log_poles, length)`.
    """
    within, across, _ = decay or _decay_blocks(log_poles, length)  # (D, S, B), (D, S, C)
    weighted = (residues.float().unsqueeze(-1) * across).transpose(-1, -2)  # (..., D, C, S)
    h = torch.matmul(weighted, within)  # (..., D, C, B)
    return h.flatten(-2)[..., :length]  # (..., D, C * B) -> (..., D, L)


def modal_filter_reference(log_poles: Tensor, residues: Tensor, length: int) -> Tensor:
    """The formula as written, materializing (D, S, L), as Vortex does. (..., D, S) -> (..., D, L)."""
    t = torch.arange(length, device=log_poles.device, dtype=torch.float32)  # (L,)
    modes = torch.exp(log_poles.float().unsqueeze(-1) * t)  # (D, S, L)
    return torch.einsum("...ds,dsl->...dl", residues.float(), modes)  # (..., D, L)


def modal_state(log_poles: Tensor, u: Tensor, decay: tuple | None = None) -> Tensor:
    """The recurrent state after u[..., 0..P-1]: s[b, d, s] = sum_k exp(lambda[d, s] (P - 1 - k)) u[b, d, k].

    Equal to running `s = exp(lambda) s + u_k` from s = 0 (see `modal_state_reference`). u: (B, D, P).
    Uses the same factored exponentials as `modal_filter`, over the lag P - 1 - k = c B + j.
    """
    length = u.shape[-1]
    within, across, block = decay or _decay_blocks(log_poles, length)  # (D, S, B), (D, S, C)
    lagged = F.pad(u.float().flip(-1), (0, across.shape[-1] * block - length))  # (B, D, C * B), lag order
    lagged = lagged.reshape(*u.shape[:2], across.shape[-1], block)  # (B, D, C, B)
    partial = torch.einsum("bdcj,dsj->bdsc", lagged, within)  # (B, D, S, C)
    return (partial * across).sum(-1)  # (B, D, S)


def modal_state_reference(log_poles: Tensor, u: Tensor) -> Tensor:
    """The recurrence itself, one step at a time, in fp64 (in fp32 a rounded exp(lambda) raised to the n-th
    power drifts by ~1e-4 relative over 4k steps for slow modes)."""
    poles = torch.exp(log_poles.double())  # (D, S)
    state = u.new_zeros(u.shape[0], *log_poles.shape, dtype=torch.float64)  # (B, D, S)
    for k in range(u.shape[-1]):
        state = poles * state + u[..., k, None].double()
    return state


def modal_continue(
    log_poles: Tensor, residues: Tensor, u: Tensor, state: Tensor, skip: Tensor
) -> tuple[Tensor, Tensor]:
    """One chunk of hcl after earlier tokens (DESIGN.md section 4, chunked prefill).

    u (B, D, C): the chunk's inputs; state (B, D, S): x_s = sum_{tau < t0} exp(lambda_s (t0 - 1 - tau)) u_tau,
    the modal state after everything before the chunk (fp64); skip (D,): the D term. own: the chunk's
    convolution with itself (filter of length C). Returns y (B, D, C) fp32 and the state after the chunk:
        y[t0 + t] = own[t] + skip u[t] + sum_s R_s exp(lambda_s (t + 1)) x_s
        x_s'      = exp(lambda_s C) x_s + sum_{k < C} exp(lambda_s (C - 1 - k)) u_k
    Work and memory O(B D S C), none of it as long as the sequence.
    """
    length = u.shape[-1]
    decay = _decay_blocks(log_poles, length)  # one set of exponentials for the three uses below
    own = causal_convolution_fft(u, modal_filter(log_poles, residues, length, decay))  # (B, D, C)
    lam = log_poles.to(state.dtype)  # (D, S)
    # The past as a modal filter whose residues are R exp(lambda) x (one step of decay folded in).
    carried = (residues.to(state.dtype) * torch.exp(lam) * state).float()  # (B, D, S)
    y = own + skip.float()[:, None] * u + modal_filter(log_poles, carried, length, decay)  # (B, D, C)
    state = torch.exp(lam * length) * state + modal_state(log_poles, u, decay).to(state.dtype)  # (B, D, S)
    return y, state


def modal_continue_reference(
    log_poles: Tensor, residues: Tensor, u: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """`modal_continue` by the recurrence, token by token in fp64: x = exp(lambda) x + u_t, y_t = R . x."""
    poles = torch.exp(log_poles.double())  # (D, S)
    state, ys = state.double(), []
    for k in range(u.shape[-1]):
        state = poles * state + u[..., k, None].double()  # (B, D, S)
        ys.append(torch.einsum("bds,ds->bd", state, residues.double()))
    return torch.stack(ys, -1).float(), state  # (B, D, C), (B, D, S)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """Explicit softmax attention, the reference for `scaled_dot_product_attention`. (B, H, L, hd) each."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v  # (B, H, Lq, hd)


def causal_attention_blocked(q: Tensor, k: Tensor, v: Tensor, block: int = 1024) -> Tensor:
    """Causal attention of Lq queries over Lk >= Lq keys, query i at key position Lk - Lq + i (a chunk after a
    KV cache), tile by tile with a running softmax, in fp32. Equal to `attention_reference`.

    q (B, H, Lq, hd), k and v (B, H, Lk, hd) -> (B, H, Lq, hd). Queries go `block` at a time, keys in tiles
    of about 4M scores per (B, H); tiles wholly in a query tile's future are skipped and only tiles that
    cross the diagonal are masked. Memory O(B H block tile) instead of the O(B H Lq Lk) scores (16 GiB per
    head at 1M cached tokens and a 4096-token chunk).
    """
    lq, lk = q.shape[-2], k.shape[-2]
    offset = lk - lq  # key position of query 0
    query = q.float() * q.shape[-1] ** -0.5
    out = query.new_empty(*q.shape[:-1], v.shape[-1])  # (B, H, Lq, hd)
    for q0 in range(0, lq, block):
        tile = query[..., q0 : q0 + block, :]  # (B, H, n, hd)
        n = tile.shape[-2]
        visible = offset + q0 + n  # keys 0..visible-1 are seen by some query of the tile
        key_block = max(block, (1 << 22) // n)
        row_max = tile.new_full((*tile.shape[:-1], 1), float("-inf"))  # (B, H, n, 1)
        row_sum = tile.new_zeros(*tile.shape[:-1], 1)  # (B, H, n, 1)
        acc = tile.new_zeros(*tile.shape[:-1], v.shape[-1])  # (B, H, n, hd)
        for k0 in range(0, visible, key_block):
            k1 = min(k0 + key_block, visible)
            scores = tile @ k[..., k0:k1, :].float().transpose(-2, -1)  # (B, H, n, k1 - k0)
            if k1 > offset + q0 + 1:  # the tile crosses the diagonal: mask each query's future
                keys = torch.arange(k0, k1, device=q.device)
                rows = torch.arange(offset + q0, offset + q0 + n, device=q.device)
                scores.masked_fill_(keys > rows[:, None], float("-inf"))
            new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True))  # finite: key 0 is in every row
            weights = scores.sub_(new_max).exp_()  # (B, H, n, k1 - k0), in place
            rescale = torch.exp(row_max - new_max)
            row_sum = row_sum * rescale + weights.sum(-1, keepdim=True)
            acc = acc * rescale + weights @ v[..., k0:k1, :].float()
            row_max = new_max
        out[..., q0 : q0 + n, :] = acc / row_sum
    return out.to(v.dtype)


# PyTorch's fused CPU attention kernel; unlike the public SDPA it also returns each query's log-sum-exp,
# which lets attention over the cache and over the chunk be computed apart and merged exactly.
_cpu_flash_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Softmax attention over two disjoint key sets from each one's output (B, H, L, hd) and log-sum-exp of
    the scores (B, H, L): the outputs weighted by each set's share of the total exp-sum. In fp32."""
    top = torch.maximum(lse_a, lse_b)
    weight_a = torch.exp(lse_a.float() - top).unsqueeze(-1)  # (B, H, L, 1)
    weight_b = torch.exp(lse_b.float() - top).unsqueeze(-1)
    return (out_a.float() * weight_a + out_b.float() * weight_b) / (weight_a + weight_b)


def causal_attention_after_cache(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of a chunk's queries (B, H, Lq, hd) over the KV cache plus the chunk (B, H, Lk, hd),
    aligned bottom-right (query i sits at key position Lk - Lq + i). Never holds the (Lq, Lk) scores.

    CUDA: the fused SDPA kernels (flash / memory-efficient) with a lower-right causal bias. CPU: the fused
    CPU kernel twice, over the cached keys (all visible) and over the chunk's own (causal), merged by their
    log-sum-exps (2.3x faster than the tiles). Elsewhere, or without that kernel: `causal_attention_blocked`.
    All are compared with `attention_reference` in tests.
    """
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]))
    if q.device.type == "cpu" and _cpu_flash_attention is not None:
        cached = k.shape[-2] - q.shape[-2]
        past, past_lse = _cpu_flash_attention(q, k[..., :cached, :], v[..., :cached, :], 0.0, False)
        own, own_lse = _cpu_flash_attention(q, k[..., cached:, :], v[..., cached:, :], 0.0, True)
        return merge_attention(past, past_lse, own, own_lse).to(v.dtype)
    return causal_attention_blocked(q, k, v)


# ============================================================== layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5  # (B, L, 1)
        return self.scale * (x / (rms + self.eps))


class MLP(nn.Module):
    """Gated MLP `l3(act(l1 x) * l2 x)`. `activation` is this layer's own: 'gelu', 'silu' or 'identity'."""

    def __init__(self, dim: int, inner: int, activation: str):
        super().__init__()
        self.activation = activation
        self.l1 = nn.Linear(dim, inner, bias=False)
        self.l2 = nn.Linear(dim, inner, bias=False)
        self.l3 = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.l1(x)
        if self.activation == "gelu":
            a = F.gelu(a)  # exact (erf) GELU
        elif self.activation == "silu":
            a = F.silu(a)
        return self.l3(a * self.l2(x))


def mlp_activation(config: ModelConfig, layer: int) -> str:
    """The Evo 2 rule: the configured activation in layer 0, identity after (when evo2_style_activations)."""
    if config.evo2_style_activations and layer > 0:
        return "identity"
    return config.mlp_activation


class RotaryEmbedding(nn.Module):
    """NeoX-style rotary embedding over the full head dim; positions are divided by `scaling_factor`.

    `inv_freq` is computed in fp32 from the base on every call (as Vortex does once its buffers are bf16), so
    it holds no state; export writes it as the Vortex `rotary_emb.inv_freq` buffer.
    """

    def __init__(self, head_dim: int, base: float, scaling_factor: float = 1.0):
        super().__init__()
        self.head_dim, self.base, self.scaling_factor = head_dim, base, scaling_factor

    def inv_freq(self, device: torch.device | str = "cpu") -> Tensor:
        steps = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.base**steps)  # (hd/2,)

    def forward(self, x: Tensor, start: int) -> Tensor:
        """Rotate x (B, H, L, hd) at positions start..start+L-1, in fp32."""
        length = x.shape[-2]
        t = torch.arange(start, start + length, device=x.device, dtype=torch.float32) / self.scaling_factor
        freqs = torch.outer(t, self.inv_freq(x.device))  # (L, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
        xf = x.float()
        return (xf * angles.cos() + rotate_half(xf) * angles.sin()).to(x.dtype)


class KVCache:
    """Keys and values of one attention layer, (B, H, T, hd), in a buffer that doubles when full."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0
        self.reserved = 0  # the buffer's size at the next growth, when the final length is known

    def reserve(self, length: int) -> None:
        """Grow straight to `length` positions when next needed (no doubling past what a prefill needs)."""
        self.reserved = max(self.reserved, length)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        new = k.shape[-2]
        if self.k is None or self.length + new > self.k.shape[-2]:
            needed = self.length + new
            capacity = self.reserved if self.reserved >= needed else max(2 * needed, 16)
            shape = (*k.shape[:-2], capacity, k.shape[-1])
            grown_k, grown_v = k.new_empty(shape), v.new_empty(shape)
            if self.k is not None:
                grown_k[..., : self.length, :] = self.k[..., : self.length, :]
                grown_v[..., : self.length, :] = self.v[..., : self.length, :]
            self.k, self.v = grown_k, grown_v
        self.k[..., self.length : self.length + new, :] = k
        self.v[..., self.length : self.length + new, :] = v
        self.length += new
        return self.k[..., : self.length, :], self.v[..., : self.length, :]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.Wqkv = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=True)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rotary_emb_base, config.rotary_scaling_factor
        )

    def _qkv(self, x: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        b, length, _ = x.shape
        qkv = self.Wqkv(x).view(b, length, 3, self.num_heads, self.head_dim)  # (B, L, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        return self.rotary_emb(q, start), self.rotary_emb(k, start), v

    def _out(self, y: Tensor) -> Tensor:
        b, _, length, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(b, length, -1))  # (B, H, L, hd) -> (B, L, D)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Causal self-attention over x (B, L, D); with `cache`, x continues the cached sequence (rotary
        positions go on from the cached length)."""
        start = cache.length if cache is not None else 0
        q, k, v = self._qkv(x, start)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, start + L, hd)
        if start > 0 and q.shape[-2] > 1:  # a chunk after cached tokens: causal, aligned bottom-right
            y = causal_attention_after_cache(q, k, v)  # (B, H, L, hd)
        else:  # a whole sequence (causal) or one new token (sees every key)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] > 1)  # (B, H, L, hd)
        return self._out(y)


# ============================================================== hyena operators


@dataclass
class HyenaState:
    """Decoding state of one hyena layer: featurizer FIR inputs and the inner filter's state."""

    fir: Tensor  # (B, 3D, short_filter_length - 1): last pre-featurizer inputs
    inner: Tensor  # hcs/hcm: (B, D, K - 1) last inputs u; hcl: (B, D, S) modal state (fp64)
    # Before the first token both are zeros (`HyenaOperator.initial_state`): the same as the zero padding
    # of the full forward, and a modal state with no past.


def _tail(x: Tensor, n: int) -> Tensor:
    """The last n steps of x (B, C, L), left-padded with zeros when L < n: (B, C, n)."""
    if n == 0:
        return x[..., :0]
    return F.pad(x, (max(n - x.shape[-1], 0), 0))[..., -n:]


def _fir_step(taps: Tensor, window: Tensor) -> Tensor:
    """One FIR output from taps (C, K) and a full input window (B, C, K), newest last: (B, C)."""
    return torch.einsum("bck,ck->bc", window, taps)


class HyenaOperator(nn.Module):
    """Featurizer + inner filter of one hyena layer. Subclasses define the inner filter."""

    kind = "hyena"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.short_filter_weight = nn.Parameter(
            torch.empty(3 * config.hidden_size, 1, config.short_filter_length)
        )

    # -- inner filter, implemented per kind
    def inner(self, u: Tensor) -> Tensor:  # (B, D, L) -> (B, D, L), fp32
        raise NotImplementedError

    def initial_inner(self, batch: int, device: torch.device) -> Tensor:  # the inner state before any token
        raise NotImplementedError

    def inner_continue(self, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """u (B, D, C) continues the tokens summarized by `state` -> (B, D, C) fp32, the state after u."""
        raise NotImplementedError

    def inner_step(self, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:  # (B, D) -> (B, D), new state
        raise NotImplementedError

    def initial_state(self, batch: int, device: torch.device) -> HyenaState:
        taps = self.short_filter_weight.shape[-1]
        fir = torch.zeros(batch, 3 * self.hidden_size, taps - 1, device=device)  # (B, 3D, K - 1)
        return HyenaState(fir=fir, inner=self.initial_inner(batch, device))

    # -- shared featurizer
    def _split(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """De-interleave featurized channels by c mod 3 -> x2 (gate), x1, v; each (B, D, ...)."""
        return z[:, 0::3], z[:, 1::3], z[:, 2::3]

    def forward(self, z: Tensor, state: HyenaState | None = None) -> tuple[Tensor, HyenaState | None]:
        """z: projected input (B, L, 3D) -> (gated filter output (B, L, D) in fp32, state).

        Without `state`, z is a whole sequence and the state returned is None. With `state` (the state after
        the sequence's earlier tokens; `initial_state` before the first), z continues that sequence and the
        state after z is returned: chunked prefill.
        """
        with _no_autocast(z.device.type):
            z = z.float().transpose(1, 2)  # (B, 3D, L)
            w = self.short_filter_weight.float()[:, 0]  # (3D, K)
            if state is None:
                zc = causal_cross_correlation(z, w)  # (B, 3D, L)
            else:
                past = state.fir.shape[-1]
                z = torch.cat((state.fir, z), dim=-1)  # (B, 3D, K - 1 + L): the last inputs before z first
                zc = causal_cross_correlation(z, w)[..., past:]  # (B, 3D, L)
            x2, x1, v = self._split(zc)  # (B, D, L) each
            u = x1 * v
            if state is None:
                return (x2 * self.inner(u)).transpose(1, 2), None  # (B, L, D)
            y, inner = self.inner_continue(u, state.inner)  # (B, D, L)
            state = HyenaState(fir=_tail(z, w.shape[-1] - 1), inner=inner)
            return (x2 * y).transpose(1, 2), state  # (B, L, D)

    def step(self, z: Tensor, state: HyenaState) -> Tensor:
        """One token: z (B, 3D) -> (B, D) fp32; updates `state` in place."""
        with _no_autocast(z.device.type):
            w = self.short_filter_weight.float()[:, 0]  # (3D, K)
            window = torch.cat((state.fir, z.float().unsqueeze(-1)), dim=-1)  # (B, 3D, K)
            zc = _fir_step(w, window)  # (B, 3D)
            state.fir = window[..., 1:]
            x2, x1, v = self._split(zc)  # (B, D) each
            y, state.inner = self.inner_step(x1 * v, state.inner)
            return x2 * y


def _expand_groups(h: Tensor, channels: int) -> Tensor:
    """Grouped filter (G, 1, K) -> per-channel taps (D, K): channel d uses filter d // (D / G)."""
    return h[:, 0].float().repeat_interleave(channels // h.shape[0], dim=0)


class _ExplicitFilter(HyenaOperator):
    """hcs and hcm: a grouped FIR `h` (G, 1, K) whose state is its last K - 1 inputs."""

    h: nn.Parameter

    def initial_inner(self, batch, device):
        return torch.zeros(batch, self.hidden_size, self.h.shape[-1] - 1, device=device)  # (B, D, K - 1)

    def inner_continue(self, u, state):
        window = torch.cat((state, u), dim=-1)  # (B, D, K - 1 + C): the last inputs before u first
        return self.inner(window)[..., state.shape[-1] :], _tail(window, state.shape[-1])


class ShortFilter(_ExplicitFilter):
    """hcs: grouped short FIR, cross-correlation (tap K-1 = current step), no D term."""

    kind = "hcs"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.h = nn.Parameter(torch.empty(config.hcs_filter_groups, 1, config.hcs_filter_length))

    def inner(self, u):
        return causal_cross_correlation(u, _expand_groups(self.h, self.hidden_size))

    def inner_step(self, u, state):
        window = torch.cat((state, u.unsqueeze(-1)), dim=-1)  # (B, D, K)
        return _fir_step(_expand_groups(self.h, self.hidden_size), window), window[..., 1:]


class MediumFilter(_ExplicitFilter):
    """hcm: grouped medium FIR, convolution (tap 0 = current step), plus D * u. Direct conv for up to 256
    taps (faster on a CPU), FFT beyond."""

    kind = "hcm"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.h = nn.Parameter(torch.empty(config.hcm_filter_groups, 1, config.hcm_filter_length))
        self.D = nn.Parameter(torch.empty(config.hidden_size))

    def inner(self, u):
        h = _expand_groups(self.h, self.hidden_size)  # (D, K)
        conv = causal_convolution_direct if h.shape[-1] <= 256 else causal_convolution_fft
        return conv(u, h) + self.D.float()[:, None] * u

    def inner_step(self, u, state):
        window = torch.cat((state, u.unsqueeze(-1)), dim=-1)  # (B, D, K), newest last
        h = _expand_groups(self.h, self.hidden_size).flip(-1)  # convolution = correlation with flipped taps
        return _fir_step(h, window) + self.D.float() * u, window[..., 1:]


class LongFilter(HyenaOperator):
    """hcl: one modal filter per channel, h[d, t] = sum_s R[d, s] exp(lambda[d, s] t), FFT conv, plus D * u.

    modal form: lambda = -exp(p) * exp(gamma) (parameters p, gamma: (D, S)); vortex form: lambda =
    log_poles (D, S), free. `residues` R: (D, S).
    """

    kind = "hcl"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        d, s = config.hidden_size, config.state_size
        self.form = config.hcl_form
        if self.form == "modal":
            self.p = nn.Parameter(torch.empty(d, s))
            self.gamma = nn.Parameter(torch.empty(d, s))
        else:
            self.log_poles = nn.Parameter(torch.empty(d, s))
        self.residues = nn.Parameter(torch.empty(d, s))
        self.D = nn.Parameter(torch.empty(d))

    def poles(self) -> Tensor:
        """lambda (D, S) in fp32."""
        if self.form == "modal":
            return modal_poles(self.p, self.gamma)
        return self.log_poles.float()

    def filter(self, length: int) -> Tensor:
        """The materialized long filter h (D, L)."""
        return modal_filter(self.poles(), self.residues, length)

    def inner(self, u):
        return causal_convolution_fft(u, self.filter(u.shape[-1])) + self.D.float()[:, None] * u

    # The decoding state is kept in fp64 (it is only D x S per layer): repeated multiplication by a rounded
    # fp32 exp(lambda) would drift by ~1e-4 relative over a few thousand tokens for slow modes.
    def initial_inner(self, batch, device):
        shape = (batch, *self.residues.shape)  # (B, D, S)
        return torch.zeros(shape, dtype=_state_dtype(device), device=device)

    def inner_continue(self, u, state):
        """The chunk convolves with itself (filter and FFT of the chunk's length only); the past comes from
        the modal state (`modal_continue`)."""
        return modal_continue(self.poles(), self.residues, u, state, self.D)

    def inner_step(self, u, state):
        poles = torch.exp(self.poles().to(state.dtype))  # (D, S)
        state = poles * state + u.to(state.dtype).unsqueeze(-1)  # (B, D, S)
        y = torch.einsum("bds,ds->bd", state, self.residues.to(state.dtype)).float()
        return y + self.D.float() * u, state


def modal_poles(p: Tensor, gamma: Tensor) -> Tensor:
    """The modal form's poles lambda = -exp(p) * exp(gamma) (D, S), in fp32; always < 0."""
    return -torch.exp(p.float()) * torch.exp(gamma.float())


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no fp64


_OPERATORS = {"hcs": ShortFilter, "hcm": MediumFilter, "hcl": LongFilter}


# ============================================================== blocks


class HyenaBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        d = config.hidden_size
        self.kind = config.kind(layer)
        self.pre_norm, self.post_norm = RMSNorm(d, config.eps), RMSNorm(d, config.eps)
        self.projections = nn.Linear(d, 3 * d, bias=False)
        self.filter = _OPERATORS[self.kind](config)
        self.out_filter_dense = nn.Linear(d, d, bias=True)
        self.mlp = MLP(d, config.inner_mlp_size, mlp_activation(config, layer))

    def _finish(self, x: Tensor, y: Tensor) -> Tensor:
        x = x + self.out_filter_dense(y.to(x.dtype))
        return x + self.mlp(self.post_norm(x))

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.filter(self.projections(self.pre_norm(x)))  # (B, L, D)
        return self._finish(x, y)

    def prefill(self, x: Tensor, state: HyenaState | None) -> tuple[Tensor, HyenaState]:
        """x (B, C, D) continues the tokens summarized by `state` (None: x starts the sequence)."""
        if state is None:
            state = self.filter.initial_state(x.shape[0], x.device)
        y, state = self.filter(self.projections(self.pre_norm(x)), state)
        return self._finish(x, y), state

    def step(self, x: Tensor, state: HyenaState) -> Tensor:
        """x (B, 1, D)."""
        y = self.filter.step(self.projections(self.pre_norm(x))[:, 0], state)  # (B, D)
        return self._finish(x, y.unsqueeze(1))


class AttentionBlock(nn.Module):
    kind = "attn"

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        d = config.hidden_size
        self.pre_norm, self.post_norm = RMSNorm(d, config.eps), RMSNorm(d, config.eps)
        self.attn = Attention(config)
        self.mlp = MLP(d, config.inner_mlp_size, mlp_activation(config, layer))

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.pre_norm(x), cache)
        return x + self.mlp(self.post_norm(x))

    def prefill(self, x: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        """x (B, C, D) continues the tokens in `cache` (None: x starts the sequence)."""
        cache = cache if cache is not None else KVCache()
        return self(x, cache), cache

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        return self(x, cache)


# ============================================================== the model


@dataclass
class InferenceCache:
    """Decoding state of a whole model: one HyenaState or KVCache per layer, and the tokens seen so far."""

    batch_size: int
    layers: list = field(default_factory=list)  # None for a layer until its first prefill
    seqlen: int = 0
    max_length: int = 0  # the KV buffers' size when known in advance (0: grow as needed)


class StripedHyena(nn.Module):
    """StripedHyena 2. `forward(input_ids (B, L)) -> logits (B, L, vocab_size)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding_layer = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(
            AttentionBlock(config, i) if config.kind(i) == "attn" else HyenaBlock(config, i)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.eps)
        self.activation_checkpointing = False  # recompute each block in backward (saves activation memory)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ------------------------------------------------------------ init

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The training stacks' init (Savanna / BioNeMo): small_init for input projections, wang_init for
        output projections, uniform(+-1/sqrt(K)) short filters, decayed hcm taps, modal hcl poles with
        lambda = -exp(-1) * U(0.01, 0.1) and residues 0.1 N(0, 1) / sqrt(S)."""
        c = self.config
        d = c.hidden_size
        small = math.sqrt(2 / (5 * d))
        wang = 2 / c.num_layers / math.sqrt(d)
        nn.init.normal_(self.embedding_layer.weight, std=small)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.scale)
        for block in self.blocks:
            mixer_in = block.projections if isinstance(block, HyenaBlock) else block.attn.Wqkv
            mixer_out = block.out_filter_dense if isinstance(block, HyenaBlock) else block.attn.out_proj
            for linear in (mixer_in, block.mlp.l1, block.mlp.l2):
                nn.init.normal_(linear.weight, std=small)
            for linear in (mixer_out, block.mlp.l3):
                nn.init.normal_(linear.weight, std=wang)
            nn.init.zeros_(mixer_out.bias)
            if isinstance(block, HyenaBlock):
                self._init_filter(block.filter)

    @torch.no_grad()
    def _init_filter(self, f: HyenaOperator) -> None:
        bound = 1 / math.sqrt(f.short_filter_weight.shape[-1])
        nn.init.uniform_(f.short_filter_weight, -bound, bound)
        if isinstance(f, ShortFilter):
            bound = 1 / math.sqrt(f.h.shape[-1])
            nn.init.uniform_(f.h, -bound, bound)
        elif isinstance(f, MediumFilter):
            groups, taps = f.h.shape[0], f.h.shape[-1]
            t = torch.linspace(0, 1, taps)  # explicit single-decay filter, "strong" decay preset, small init
            decay = torch.exp(-torch.logspace(0, 2, groups)[:, None] * t)  # (G, K)
            f.h.copy_((torch.randn(groups, taps) / math.sqrt(taps) * 1e-5 * decay).unsqueeze(1))
            bound = 1 / math.sqrt(taps)
            nn.init.uniform_(f.D, -bound, bound)
        elif isinstance(f, LongFilter):
            d, s = f.residues.shape
            gamma = torch.log(torch.rand(d, s) * (0.1 - 0.01) + 0.01)
            p = -torch.ones(d, s)
            if f.form == "modal":
                f.p.copy_(p)
                f.gamma.copy_(gamma)
            else:
                f.log_poles.copy_(-torch.exp(p) * torch.exp(gamma))
            f.residues.copy_(0.1 * torch.randn(d, s) / math.sqrt(s))
            bound = 1 / math.sqrt(8192)  # 1/sqrt(filter length); the Evo 2 pretraining length
            nn.init.uniform_(f.D, -bound, bound)

    # ------------------------------------------------------------ full-sequence forward

    def unembed(self, x: Tensor) -> Tensor:
        return F.linear(self.norm(x), self.embedding_layer.weight)  # (B, L, V), tied

    def forward(
        self, input_ids: Tensor, return_hidden_layers: Sequence[int] | None = None, logits: bool = True
    ) -> Tensor | tuple[Tensor | None, dict[int, Tensor]]:
        """input_ids (B, L) int -> logits (B, L, V).

        With `return_hidden_layers=[i, ...]` returns (logits, {i: hidden}) where hidden (B, L, D) is the
        residual stream after block i (negative i counts from the end; -1 is the last block, before the
        final norm). `logits=False` (embeddings) stops after the last block asked for; logits are None.
        """
        want = self._hidden_layers(return_hidden_layers)
        hidden: dict[int, Tensor] = {}
        x = self.embedding_layer(input_ids)  # (B, L, D)
        for i, block in enumerate(self._blocks_to_run(want, logits)):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in want:
                hidden[i] = x
        logits = self.unembed(x) if logits else None
        if return_hidden_layers is None:
            return logits
        return logits, {i: hidden[i % len(self.blocks)] for i in return_hidden_layers}

    def _blocks_to_run(self, want, logits) -> nn.ModuleList:  # without logits: up to the last one wanted
        return self.blocks if logits else self.blocks[: max(want, default=-1) + 1]

    def _hidden_layers(self, return_hidden_layers) -> set[int]:
        """The block indices (0..n-1) asked for by `return_hidden_layers`; negative counts from the end."""
        n, want = len(self.blocks), set()
        for i in return_hidden_layers or ():
            if not -n <= i < n:
                raise ValueError(f"return_hidden_layers: layer {i} out of range for {n} layers")
            want.add(i % n)
        return want

    # ------------------------------------------------------------ cached inference

    def new_cache(self, batch_size: int, max_length: int = 0) -> InferenceCache:
        """An empty cache. `max_length`, when known (prompt + tokens to generate), sizes the KV buffers once
        at the first prefill instead of doubling them as decoding goes past the prompt."""
        return InferenceCache(batch_size=batch_size, layers=[None] * len(self.blocks), max_length=max_length)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: Tensor,
        cache: InferenceCache,
        chunk_size: int | None = None,
        return_hidden_layers: list[int] | tuple[int, ...] | None = None,
    ) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Run input_ids (B, P), P >= 1, after whatever `cache` holds (nothing for a fresh cache); returns
        logits (B, P, V), or (logits, {layer: hidden (B, P, D)}) with `return_hidden_layers` as in forward.

        `chunk_size` C runs the input C tokens at a time (`prefill_chunks`), the same numbers up to float
        rounding; None runs it in one chunk. Afterwards `step` or another `prefill` continues the sequence.
        """
        chunks = list(self.prefill_chunks(input_ids, cache, chunk_size, return_hidden_layers))
        logits = torch.cat([c[0] for c in chunks], dim=1)  # (B, P, V)
        if return_hidden_layers is None:
            return logits
        return logits, {i: torch.cat([c[1][i] for c in chunks], dim=1) for i in return_hidden_layers}

    def prefill_chunks(
        self,
        input_ids: Tensor,
        cache: InferenceCache,
        chunk_size: int | None = None,
        return_hidden_layers: list[int] | tuple[int, ...] | None = None,
        logits: bool = True,
    ) -> Iterator[tuple[Tensor | None, dict[int, Tensor]]]:
        """Exact long-context prefill, chunk by chunk: yields (logits (B, C, V), {layer: hidden (B, C, D)})
        for each chunk of `chunk_size` tokens of input_ids (B, P) (the last chunk may be shorter; hidden is {}
        without `return_hidden_layers`, which takes layer indices as in forward; `logits` as in forward).

        Each chunk continues `cache` (fresh or already holding earlier tokens) and leaves it after the
        chunk, so a caller can consume the outputs of a 1M-token input without holding (B, P, V), and can
        `step` or `prefill` on afterwards (not after `logits=False`: later blocks stay behind). Every
        position sees its whole left context: hcl layers convolve the chunk with itself (FFT of size ~2C) and
        add the past from their modal state, hcs/hcm and the featurizer carry their last inputs, attention
        its KV cache (rotary positions continue). Memory is
        O(B D C) plus the KV cache, whatever the length; outputs equal the full forward to float rounding.
        hcl_form vortex with a pole lambda >= 0 is refused when a chunk follows earlier tokens. Bad
        arguments raise ValueError here, before the first chunk runs.
        """
        batch, total = cache.batch_size, input_ids.shape[-1]
        if input_ids.ndim != 2 or total < 1 or input_ids.shape[0] != batch:
            raise ValueError(f"prefill expects ids of shape ({batch}, P>=1), got {tuple(input_ids.shape)}")
        chunk_size = total if chunk_size is None else chunk_size
        if chunk_size < 1:
            raise ValueError(f"prefill: chunk_size must be >= 1, got {chunk_size}")
        want = self._hidden_layers(return_hidden_layers)  # checks the indices now
        if cache.seqlen > 0 or chunk_size < total:
            for i, growing in self.growing_poles().items():
                raise ValueError(
                    f"layer {i}: {growing} hcl pole(s) with lambda >= 0 (hcl_form vortex): chunked prefill "
                    "needs decaying modes; prefill in one chunk on a fresh cache, or convert the weights "
                    "with --clamp-poles"
                )
        for i, block in enumerate(self.blocks):
            if isinstance(block, AttentionBlock):  # one buffer of the final size instead of doublings
                cache.layers[i] = cache.layers[i] if cache.layers[i] is not None else KVCache()
                cache.layers[i].reserve(max(cache.max_length, cache.seqlen + total))
        return self._run_chunks(input_ids, cache, chunk_size, return_hidden_layers or (), want, logits)

    @torch.no_grad()
    def _run_chunks(self, input_ids, cache, chunk_size, layers, want, logits) -> Iterator:
        for start in range(0, input_ids.shape[1], chunk_size):
            x = self.embedding_layer(input_ids[:, start : start + chunk_size])  # (B, C, D)
            hidden: dict[int, Tensor] = {}
            for i, block in enumerate(self._blocks_to_run(want, logits)):
                x, cache.layers[i] = block.prefill(x, cache.layers[i])
                if i in want:
                    hidden[i] = x
            cache.seqlen += x.shape[1]
            yield self.unembed(x) if logits else None, {i: hidden[i % len(self.blocks)] for i in layers}

    @torch.no_grad()
    def growing_poles(self) -> dict[int, int]:
        """{layer index: how many hcl poles have lambda >= 0} (only possible with hcl_form vortex): the
        layers a chunked prefill cannot run."""
        counts = {
            i: int((block.filter.poles() >= 0).sum())
            for i, block in enumerate(self.blocks)
            if block.kind == "hcl"
        }
        return {i: n for i, n in counts.items() if n}

    @torch.no_grad()
    def step(self, token_ids: Tensor, cache: InferenceCache) -> Tensor:
        """One token per sequence (B,) after `prefill`; returns logits (B, V)."""
        if cache.seqlen == 0:
            raise ValueError("step() needs a prefilled cache; call prefill() with at least one token first")
        x = self.embedding_layer(token_ids.reshape(-1, 1))  # (B, 1, D)
        for i, block in enumerate(self.blocks):
            x = block.step(x, cache.layers[i])
        cache.seqlen += 1
        return self.unembed(x)[:, 0]  # (B, V)

    @torch.no_grad()
    def generate_greedy(self, prompt_ids: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
        """Greedy decoding with the cache: returns (generated ids (B, N), the logits each was picked from
        (B, N, V)); logits[:, 0] are the prompt's last-position logits."""
        cache = self.new_cache(prompt_ids.shape[0], max_length=prompt_ids.shape[1] + num_tokens)
        logits = self.prefill(prompt_ids, cache)[:, -1]  # (B, V)
        tokens, step_logits = [], []
        for n in range(num_tokens):
            step_logits.append(logits)
            tokens.append(logits.argmax(-1))
            if n + 1 < num_tokens:
                logits = self.step(tokens[-1], cache)
        return torch.stack(tokens, 1), torch.stack(step_logits, 1)

    # ------------------------------------------------------------ helpers

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hcl_filters(self, length: int) -> dict[int, Tensor]:
        """The materialized long filters h (D, length) of every hcl layer, by layer index."""
        return {i: b.filter.filter(length) for i, b in enumerate(self.blocks) if b.kind == "hcl"}


# ============================================================== optimizer grouping

_NO_DECAY_SUFFIXES = (".scale", ".bias")


def is_filter_parameter(name: str) -> bool:
    """Hyena filter parameters: featurizer taps, hcs/hcm taps, D, and hcl p / gamma / log_poles / residues."""
    return ".filter." in name


def is_no_weight_decay(name: str) -> bool:
    """Norm scales, biases, the (tied) embedding and every hyena filter parameter get no weight decay."""
    return (
        name.endswith(_NO_DECAY_SUFFIXES) or name.startswith("embedding_layer.") or is_filter_parameter(name)
    )


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: {'params', 'weight_decay', 'names'}; frozen parameters are left out."""
    decay, no_decay = ([], []), ([], [])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        names, params = no_decay if is_no_weight_decay(name) else decay
        names.append(name)
        params.append(param)
    return [
        {"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
        {"params": no_decay[1], "names": no_decay[0], "weight_decay": 0.0},
    ]


# ============================================================== FLOPs


def flops_breakdown(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs of ONE sequence of `seq_len` tokens, by part (a multiply-add counts 2).

    matmul: every Linear and the tied unembedding. conv: featurizer and hcs FIRs (direct), hcm and hcl FFT
    convolutions (3 real FFTs of size n at 2.5 n log2 n each plus the complex product), the hcl filter
    materialization (D S L) and the D / gating products. attention: QK^T and AV with the causal half counted.
    Training (forward + backward) is 3x the total.
    """
    c, length = config, seq_len
    d, inner = c.hidden_size, c.inner_mlp_size
    counts = {
        k: c.layout.count(letter) for letter, k in (("S", "hcs"), ("D", "hcm"), ("H", "hcl"), ("*", "attn"))
    }
    n_hyena = counts["hcs"] + counts["hcm"] + counts["hcl"]
    per_token_matmul = (
        c.num_layers * 2 * 3 * d * inner  # MLP l1, l2, l3
        + c.num_layers * 2 * 4 * d * d  # projections/Wqkv (3 D^2) + out dense/out_proj (D^2)
        + 2 * d * c.vocab_size  # unembedding
    )

    def fft_conv(taps: int) -> float:  # per channel: rfft(u), rfft(h), irfft, complex product
        n = _fft_size(length + min(taps, length) - 1)
        return 3 * 2.5 * n * math.log2(n) + 4 * n

    conv = n_hyena * length * (2 * 3 * d * c.short_filter_length + 4 * d)  # featurizer + x1*v and x2 gate
    conv += counts["hcs"] * length * 2 * d * c.hcs_filter_length
    conv += counts["hcm"] * d * (fft_conv(c.hcm_filter_length) + 2 * length)
    conv += counts["hcl"] * d * (fft_conv(length) + 2 * length + 3 * c.state_size * length)
    attention = counts["attn"] * 2 * d * length * length  # 2 matmuls x 2 flops x L^2 D / 2 (causal)
    return {"matmul": float(per_token_matmul * length), "conv": float(conv), "attention": float(attention)}


def estimate_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs for one sequence of `seq_len` tokens (divide by seq_len for per token; x3 to train)."""
    return sum(flops_breakdown(config, seq_len).values())
