"""Fused linear + cross-entropy for causal LMs, in pure torch: what Liger's kernel does on GPU.

The output projection and the loss are computed a chunk of tokens at a time, and the gradients of
each chunk are formed right there (the loss is the last op, so ``d loss / d logits`` is
``softmax - onehot`` and needs no upstream gradient), so the ``[tokens, vocab]`` logits, their
softmax and their gradient never exist at full size: peak memory holds one chunk's worth (the
logits' storage becomes the chunk's gradient, in place) and it is freed before the next chunk.
Nothing keeps a chunk: the autograd Function saves only the finished input and weight gradients,
and ``backward`` scales them. The forward does the three matmuls a plain forward + backward does,
so it costs about the same time (see ``benchmarks/fused_loss.py``).

Without gradients (evaluation) only the chunked loss is computed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

IGNORE_INDEX = -100


def _chunk_size(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: a power of two whose fp32 logits take ~128 MB (32M elements), at least 64.

    Small chunks are slow (smaller GEMMs, and each chunk's ``gradient.T @ hidden`` is a pass over
    the whole ``[vocab, hidden]`` weight gradient); the peak grows by one chunk. Measured (vocab 32k, hidden 256, 2048 tokens, shared CPU):
    time vs the plain loss 1.29x at 128 tokens, 0.97x at 512, 0.86x at 1024 (eager); peak growth
    96 MB at 512, 159 MB at 1024, plain 283 MB (compiled). Liger's GPU rule (about
    ``vocab / hidden`` chunks) is too fine for CPUs.
    """
    size = max(64, 1 << max(0, ((1 << 25) // max(vocab, 1)).bit_length() - 1))
    return min(size, max(n_tokens, 1))


def _chunk_logits(h, weight, bias):
    logits = (h @ weight.T).float()
    return logits if bias is None else logits + bias.float()


# An opaque op to torch.compile: inside it the chunk loop runs eagerly with its in-place updates, so
# one chunk-sized tensor is alive at a time. (Traced, inductor functionalizes the in-place ops and
# keeps two or three chunk-sized buffers: measured, that is more memory than the plain loss.)
@torch.library.custom_op("functrain::fused_linear_cross_entropy", mutates_args=())
def _loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    ignore_index: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` and its gradients for hidden, weight
    and bias (an empty tensor without bias), chunk by chunk."""
    valid_all = labels != ignore_index
    denom = valid_all.sum().clamp_min(1).float()
    loss = hidden.new_zeros((), dtype=torch.float32)
    # Accumulated in place: a fresh [vocab, hidden] tensor per chunk would cost an allocation
    # (page faults) and a full pass each time.
    grad_h = torch.empty_like(hidden)
    grad_w = torch.zeros_like(weight, dtype=torch.float32)
    grad_b = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        valid = y != ignore_index
        target = torch.where(valid, y, 0).unsqueeze(1)
        # One chunk-sized tensor, z, changed in place from logits to their gradient (a temporary
        # such as torch.logsumexp's would double the peak).
        z = _chunk_logits(h, weight, bias)
        picked = z.gather(1, target).squeeze(1)
        row_max = z.amax(dim=1, keepdim=True)
        z.sub_(row_max).exp_()
        total = z.sum(dim=1, keepdim=True)
        loss = loss + ((row_max + total.log()).squeeze(1) - picked).mul(valid).sum()
        # d(mean loss)/d logits = (softmax - onehot) / denom, zero on ignored tokens
        scale = (valid.float() / denom).unsqueeze(1)
        z.mul_(scale / total).scatter_add_(1, target, -scale)
        grad_h[start:start + chunk_size] = (z.to(weight.dtype) @ weight).to(hidden.dtype)
        grad_w.addmm_(z.T, h.float())
        if grad_b is not None:
            grad_b += z.sum(0)
        del z  # freed before the next chunk's logits exist: nothing else refers to it
    grad_b = weight.new_zeros(0) if grad_b is None else grad_b.to(bias.dtype)
    return loss / denom, grad_h, grad_w.to(weight.dtype), grad_b


@_loss_and_grads.register_fake
def _(hidden, weight, bias, labels, ignore_index, chunk_size):
    grad_b = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), torch.empty_like(weight), grad_b


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``; gradients made in forward."""

    @staticmethod
    def forward(hidden, weight, bias, labels, ignore_index, chunk_size):
        loss, grad_h, grad_w, grad_b = _loss_and_grads(hidden, weight, bias, labels, ignore_index, chunk_size)
        return loss, grad_h, grad_w, (None if bias is None else grad_b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_h, grad_w, grad_b = output
        ctx.mark_non_differentiable(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.save_for_backward(grad_h, grad_w, grad_b)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return scaled[0], scaled[1], scaled[2], None, None, None


def _chunked_loss(hidden, weight, bias, labels, ignore_index, chunk_size):
    """The loss alone, chunk by chunk (no gradients kept)."""
    valid_all = labels != ignore_index
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        y = labels[start:start + chunk_size]
        logits = _chunk_logits(hidden[start:start + chunk_size], weight, bias)
        valid = y != ignore_index
        picked = logits.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
        total = total + ((torch.logsumexp(logits, dim=-1) - picked) * valid).sum()
    return total / valid_all.sum().clamp_min(1).float()


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias=None, *,
                               ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` (mean over non-ignored tokens), chunked.

    ``hidden`` is ``[tokens, hidden]`` (or any leading shape, flattened), ``weight`` ``[vocab, hidden]``,
    ``labels`` the matching token ids with ``ignore_index`` where there is no target.
    """
    if weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden [..., {hidden.shape[-1]}] does not match "
                         f"weight {tuple(weight.shape)} (expected [vocab, hidden])")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: {labels.shape[0]} labels for {hidden.shape[0]} tokens")
    chunk = chunk_size or _chunk_size(hidden.shape[0], weight.shape[0])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:
        return _chunked_loss(hidden, weight, bias, labels, ignore_index, chunk)
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, chunk)[0]


def causal_lm_fused_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """A ``loss_fn(model, batch)`` for transformers causal LMs: the model's own loss (labels shifted
    by one, ``-100`` ignored, mean over predicted tokens) without materializing the logits.

    Runs the decoder (``model.get_decoder()``) for the last hidden states and applies
    :func:`fused_linear_cross_entropy` with the output embeddings' weight.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(head, nn.Linear) or decoder is None:
        raise TypeError(f"the fused LM loss needs a transformers causal LM (get_decoder() and an nn.Linear "
                        f"get_output_embeddings()); {type(model).__name__} has not both")
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise ValueError(f"{type(model).__name__} transforms its logits (softcapping / scaling); the fused loss "
                         "computes plain cross-entropy, so it would train a different objective")
    if "labels" not in batch:
        raise ValueError("the fused LM loss needs 'labels' in the batch")
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    if "shift_labels" in batch:
        labels = batch["shift_labels"]
    else:  # HF ForCausalLMLoss: position t predicts token t + 1; the last position predicts nothing
        labels = nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
    return fused_linear_cross_entropy(hidden, head.weight, labels.to(hidden.device), head.bias)
