"""Megatron-core on CPU (gloo): the CUDA assumptions its model code makes, patched.

Used only when ``torch.cuda.is_available()`` is False; on a GPU nothing here runs.

1. ``GlobalMemoryBuffer.get_tensor`` allocates on ``torch.cuda.current_device()``: the
   model-parallel state gets a buffer that allocates on the CPU instead.
2. The CUDA RNG tracker: ``get_cuda_rng_tracker().fork()`` swaps CUDA RNG states around
   initialisation and dropout. The tracker installed here forks nothing (no dropout runs:
   the backend sets dropout to 0, and weights are loaded, not drawn by Megatron).

3. Only for RoPE (architecture "llama"): ``RotaryEmbedding.get_emb`` moves its frequencies
   to ``torch.cuda.current_device()`` on first use; on CPU they stay where they are.

The backend also passes an explicit causal mask (Megatron's default one is built on
"cuda") and keeps to code paths without other CUDA allocations: no sequence parallelism,
``parallel_output=True`` logits with vocab-parallel cross entropy, no pipeline schedules
(they allocate on "cuda"), and its own optimizer step instead of Megatron's DDP buffers
and distributed optimizer (both CUDA-only).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch


def _cpu_buffer_class() -> type:
    from megatron.core.utils import GlobalMemoryBuffer

    class CpuGlobalMemoryBuffer(GlobalMemoryBuffer):
        """``GlobalMemoryBuffer`` that allocates on the CPU."""

        def get_tensor(
            self,
            tensor_shape: Any,
            dtype: torch.dtype,
            name: str,
            mem_alloc_context: Callable[..., Any] | None = None,
        ) -> torch.Tensor:
            required = functools.reduce(operator.mul, tensor_shape, 1)
            buf = self.buffer.get((name, dtype))
            if buf is None or buf.numel() < required:
                buf = self.buffer[(name, dtype)] = torch.empty(required, dtype=dtype, device="cpu")
            return buf[0:required].view(*tensor_shape)

    return CpuGlobalMemoryBuffer


def _cpu_rope_get_emb(self: Any, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    """``RotaryEmbedding.get_emb`` without the move of ``inv_freq`` to the current CUDA device."""
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if not self.rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    return emb[:, None, None, :]


def apply() -> None:
    """Installs the patches; call after ``parallel_state.initialize_model_parallel``."""
    if torch.cuda.is_available():
        raise RuntimeError("megatron.cpu.apply(): CUDA is available; the CPU patches must not be used")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    parallel_state._GLOBAL_MEMORY_BUFFER = _cpu_buffer_class()()
    # The "inference" tracker is Megatron's own tracker class whose add/set_states/fork are no-ops.
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    RotaryEmbedding.get_emb = _cpu_rope_get_emb
