"""Drop-in for Hugging Face transformers' Mixtral load_balancing_loss_func
(transformers/models/mixtral/modeling_mixtral.py):

    from moereg_torch.hf import load_balancing_loss_func

Same signature and value (written from its documented semantics): the gate logits of all
layers are concatenated into one [L*B*S, E] batch, softmaxed, the top_k experts selected, and
one Switch loss is taken over the pooled tokens, multiplied by top_k relative to LOSSES.md
section 1 (HF's f_e counts slots over tokens, not over top_k * tokens). The softmax and the
selection run in torch; the loss and its gradient are moereg's. Difference: an attention_mask
with no valid token gives 0 here, NaN in transformers.
"""
import torch

from . import load_balancing

__all__ = ["load_balancing_loss_func"]


def load_balancing_loss_func(gate_logits, num_experts=None, top_k=2, attention_mask=None):
    """gate_logits: a tuple of [B*S, E] router logits, one per layer (anything else gives 0,
    as in transformers); attention_mask [B, S] (nonzero = valid), shared by every layer."""
    if gate_logits is None or not isinstance(gate_logits, tuple):
        return 0
    device = gate_logits[0].device
    logits = torch.cat([g.to(device) for g in gate_logits], dim=0)
    E = logits.shape[-1]
    if num_experts is None:
        num_experts = E
    routing_weights = torch.nn.functional.softmax(logits, dim=-1)
    _, selected = torch.topk(routing_weights, top_k, dim=-1)
    mask = None
    if attention_mask is not None:
        B, S = attention_mask.shape
        layers = logits.shape[0] // (B * S)
        mask = attention_mask.reshape(1, B * S).expand(layers, B * S).reshape(-1)
    coef = float(top_k) * float(num_experts) / float(E)
    return load_balancing(routing_weights, selected, mask, coef=coef, k=top_k)
