"""Drop-ins for Megatron-LM's megatron/core/transformer/moe/moe_utils.py:

    from moereg_torch.megatron import switch_load_balancing_loss_func, z_loss_func

Same signatures and values as Megatron's functions (written from their documented
semantics), with moereg's analytic gradient. Differences, all where Megatron's value is
undefined: a micro-batch with total_num_tokens = 0 (fully padded) gives 0 here and NaN (or a
ZeroDivisionError) in Megatron; z_loss_func on an empty batch gives 0 here, NaN in Megatron.
"""
import torch

from . import load_balancing, z_loss

__all__ = ["switch_load_balancing_loss_func", "z_loss_func"]


def switch_load_balancing_loss_func(probs, tokens_per_expert, total_num_tokens, topk, num_experts,
                                    moe_aux_loss_coeff, padding_mask=None, *, fused=False):
    """Megatron's auxiliary load-balancing loss:

        coeff * num_experts / (topk * N^2) * sum_e tokens_per_expert[e] * sum_t m_t probs[t, e]

    with N = total_num_tokens and m the padding_mask (True = valid token, Megatron's convention
    for this function; None = all valid). tokens_per_expert and N are the caller's counts (of
    the micro-batch, or summed over the tensor/context-parallel group or the global batch):
    moereg takes them as its reduced statistics [N, tokens_per_expert], so f_e =
    tokens_per_expert[e] / (topk N) and pbar_e = sum_t m_t probs[t, e] / N, as in Megatron.
    `fused` (Megatron's TransformerEngine switch) is accepted and ignored.
    """
    if isinstance(padding_mask, bool):  # Megatron's positional order has `fused` here
        padding_mask = None
    T, E = probs.shape
    counts = torch.as_tensor(tokens_per_expert).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    n = float(total_num_tokens.item() if torch.is_tensor(total_num_tokens) else total_num_tokens)
    stats = torch.cat([torch.tensor([n], dtype=torch.float64), counts])
    # moereg counts selected experts from topk only without reduced statistics; with them the
    # topk tensor is validated but unused: one dropped slot per token.
    no_selection = torch.full((T, 1), -1, dtype=torch.int32)
    coef = float(moe_aux_loss_coeff) * float(num_experts) / float(E) if E > 0 else 0.0
    return load_balancing(probs, no_selection, padding_mask, coef=coef, k=int(topk), scope="micro", stats=stats)


def z_loss_func(logits, z_loss_coeff, padding_mask=None):
    """Megatron's router z-loss: coeff * mean over valid tokens of logsumexp(logits)^2.

    padding_mask: True = padding (excluded), Megatron's convention for this function (the
    opposite of switch_load_balancing_loss_func's). Logits of any rank; the last dimension is E.
    """
    z = logits.reshape(-1, logits.shape[-1]) if logits.dim() != 2 else logits
    mask = None if padding_mask is None else torch.logical_not(padding_mask.reshape(-1))
    return z_loss(z, mask, coef=float(z_loss_coeff))
