"""Memory of exact long-context inference, before a long record starts: weights + one chunk's activations
+ the attention KV cache for the record's length, against the device's free memory.

    weights      every parameter's bytes as loaded (hyena filter parameters stay fp32)
    KV cache     keys and values of every attention layer for the whole record:
                 2 x batch x length x hidden size x element size per attention layer (prefill_chunks
                 reserves exactly this, no doubling); the only term that grows with the length
    activations  what one chunk of C tokens keeps alive at its widest point, counted from the shapes of
                 model.py's chunk path (fp32 inside the hyena operators, the model dtype elsewhere):
                 the residual stream (3 x C x D), plus the widest of a hyena operator (projections
                 3D in the model dtype; featurizer input, its concatenation with the carried taps and its
                 output, 3D fp32 each; u and the filter output, D fp32 each; the FFT of size 2C: two
                 complex spectra and the real inverse, 24 D bytes per token), the MLP (three inner-size
                 tensors) and fused attention (q, k, v, their fp32 rotary copies, the partial outputs over
                 the cache and over the chunk, merged in fp32), times ACTIVATION_SLACK; plus the
                 chunk's logits (two C x vocab fp32 tensors: the logits and logsumexp's temporary)

ACTIVATION_SLACK: peak RSS growth of exact score and embed on a CPU, beyond the KV cache, was 1.5-1.8x the
count of those hidden-size tensors on `small` (copies inside conv1d, allocator blocks), the logits as counted
on `test` (vocab-dominated); 16k and 32k tokens, chunks of 4096 and 8192: the estimate is 0.3-10% above the
measured growth on small, 9-21% on test. Not counted: the CUDA context and kernel workspaces (hundreds of MiB
on a GPU), the Python process, and a score's per-token log-probs with --per-token (4 bytes per base).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evo2_cli.errors import InputError
from evo2_cli.memory import available_memory, format_bytes
from evo2_cli.model.config import ModelConfig

ACTIVATION_SLACK = 1.8  # measured peak growth / counted hidden-size bytes of one chunk: 1.5-1.8 (see above)


@dataclass(frozen=True)
class InferenceMemory:
    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    length: int
    chunk: int
    batch: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    def describe(self) -> str:
        return (
            f"estimated memory {format_bytes(self.total_bytes)} for {self.batch} x {self.length:,} tokens "
            f"in chunks of {self.chunk:,} = weights {format_bytes(self.weight_bytes)} + KV cache "
            f"{format_bytes(self.kv_cache_bytes)} + chunk activations {format_bytes(self.activation_bytes)}"
        )


def kv_cache_bytes(config: ModelConfig, length: int, batch: int, element_size: int) -> int:
    """Keys and values of every attention layer for `length` tokens."""
    layers = config.layout.count("*")
    return layers * 2 * batch * length * config.hidden_size * element_size


def chunk_activation_bytes(config: ModelConfig, chunk: int, batch: int, element_size: int) -> int:
    """The widest point of one chunk, with the measured slack (see the module docstring)."""
    d, inner, a = config.hidden_size, config.inner_mlp_size, element_size
    hyena = 3 * d * a + 3 * 3 * d * 4 + 2 * d * 4 + 24 * d
    mlp = 3 * inner * a + d * a
    # fused attention (CUDA SDPA, the CPU flash kernel): q, k, v, their fp32 rotary copies, and the two
    # partial outputs (cache, chunk) merged in fp32; no (chunk x keys) scores
    attention = 3 * d * a + 2 * d * 4 + 3 * d * 4 if "*" in config.layout else 0
    per_token = ACTIVATION_SLACK * (3 * d * a + max(hyena, mlp, attention)) + 2 * config.vocab_size * 4
    return int(batch * chunk * per_token)


def estimate_inference_memory(
    model: torch.nn.Module, length: int, chunk: int, batch: int = 1
) -> InferenceMemory:
    """The estimate for `model` as loaded (its dtypes) running `batch` x `length` tokens in chunks."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    element_size = next(p for n, p in model.named_parameters() if n.endswith("mlp.l1.weight")).element_size()
    config = model.config
    return InferenceMemory(
        weights,
        kv_cache_bytes(config, length, batch, element_size),
        chunk_activation_bytes(config, min(chunk, length), batch, element_size),
        length,
        min(chunk, length),
        batch,
    )


def check_inference_memory(estimate: InferenceMemory, device: torch.device) -> None:
    """InputError with the fix when what the record adds to the loaded model (KV cache + activations) is
    more than the device's free memory (CUDA: free device memory; CPU: available RAM), which the loaded
    weights already left."""
    free = available_memory(device)
    needed = estimate.kv_cache_bytes + estimate.activation_bytes
    if needed > free:
        raise InputError(
            f"a record of {estimate.length:,} tokens does not fit: {estimate.describe()}; beyond the loaded "
            f"weights that is {format_bytes(needed)}, more than the {format_bytes(free)} free on "
            f"{device.type}. Use a smaller --chunk (activations), --dtype bf16 (halves the weights and the "
            "KV cache), or --mode windows (no KV cache; each position then sees only --window tokens)"
        )
