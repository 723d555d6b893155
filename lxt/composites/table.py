"""The architecture tables as data: one base map of modules and calls, one row per model type.

:func:`layer_map` puts a family's own entries (its norm, gated MLP, experts, gamma layers)
before the base map, so they win where both match (first match wins), and applies epsilon in
one place.  Each operation is named once: a call key matches every spelling of its op
(``"add"`` is ``a + b``, ``torch.add``, ``x.add(y)`` and the in-place ``x += y``).

The rules, and why each conserves (AttnLRP, Achtibat et al. 2024; CP-LRP, Ali et al. 2022):

- epsilon on linear layers, convolutions, pooling, residual and embedding sums (Eq. 8; biases
  and constant summands such as position embeddings absorb their share);
- identity on elementwise activations and RMSNorms (Eq. 9, Prop. 3.4; Gemma's
  ``x / rms * (1 + w)`` keeps its own forward), the LayerNorm rule (identity on 1/std,
  epsilon on the centring), identity through ``-x`` and constant scales (rotary halves,
  soft-capping, ``a / b`` with ``b`` a constant);
- uniform on products of two variable factors (the gated MLP, Prop. 3.3), AttnLRP attention
  (sdpa and eager matmul -> softmax -> matmul, Prop. 3.1 / 3.3);
- CP-LRP: attention weights, the gate branch of gated MLPs and MoE routing weights are
  constants, so relevance flows through values only;
- MoE experts (:class:`lxt.modules.MoEExperts`): routing weight times expert output is a
  product (uniform; CP-LRP: the weight is a constant);
- ViT: the gamma rule on the patch convolution and the MLP linears (AttnLRP appendix, noise in
  ViTs), parameters ``conv_gamma`` / ``mlp_gamma``;
- a dual encoder's similarity logit (CLIP, SigLIP, SigLIP2), ``t / |t| @ (i / |i|)^T *
  exp(logit_scale) (+ logit_bias)``: each normalisation a division by a constant (identity on
  the numerator; the norm, ``torch.sum`` and ``** 0.5`` or ``Tensor.norm``, is then off the
  relevance path), the text-image product a matmul of two variables (uniform: half of the
  relevance to each tower), ``exp(logit_scale)`` a constant scale, ``logit_bias`` a constant
  summand that absorbs its share (epsilon);
- SigLIP's attention-pooling head (``nn.MultiheadAttention``, a learned probe as the one
  query): the probe's query is a constant of ``q k^T``, so the keys keep that product's whole
  share (epsilon), the values half of ``A v`` (uniform); SigLIP2's padding mask is a constant;
- vision-language models (a row with ``parts``: their language model's row and their vision
  tower's): image features enter the text stream by ``masked_scatter`` / index writes, data
  movements (each output element is one input element: the gradient routes relevance
  unchanged, the overwritten image-token embeddings get none); projectors are MLPs (epsilon,
  identity on the activation), Gemma 3's average pooling is epsilon on a sum; Qwen's patch
  merger and Idefics3's pixel shuffle are reshapes before an MLP; Qwen's vision rotary
  multiplies by constants (a scale); LLaVA-NeXT's ``image_newline`` is a constant input that
  absorbs its share like a bias.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as lf
from .. import modules as lm
from ..rules.base import LxtModule
from ..rules import EpsilonRule, GammaRule, IdentityRule, Rule, UniformEpsilonRule

#: defaults of the ViT gamma rule (patch convolution, MLP linears)
CONV_GAMMA = 0.25
MLP_GAMMA = 0.05


@dataclass(frozen=True)
class Family:
    """One architecture: where its classes live and how its blocks differ from the base map."""

    module: str = ""  # the module holding the classes named below
    norm: Optional[str] = None  # RMSNorm class: identity rule
    one_plus_weight: bool = False  # Gemma: x / rms * (1 + w), kept as its own forward
    mlp: Union[str, tuple, None] = None  # gated MLP class(es): CP-LRP detaches the gate branch
    gate_position: int = 0  # which factor of the MLP's product is the gate
    experts: Optional[str] = None  # MoE experts class (transformers 5 layout)
    gamma: tuple = ()  # MLP classes whose linears (and the patch convolution) get the gamma rule
    python_activations: bool = False  # transformers' Python activation modules: identity on the module
    strict: bool = False  # refuse operations the table cannot cover
    #: sub-configurations (``"text_config"``, ``"vision_config"``) whose models' rows join this
    #: one (a VLM: its language model's row and its vision tower's, read off the model's config)
    parts: tuple = ()


_HF = "transformers.models.{0}.modeling_{0}"
_decoder = lambda name, prefix, mlp=True, **kw: Family(
    _HF.format(name), f"{prefix}RMSNorm", mlp=f"{prefix}MLP" if mlp else None, **kw)
_vit = lambda name, prefix: Family(_HF.format(name), gamma=tuple(prefix + n for n in ("MLP", "Intermediate", "Output")))
_BERT = Family(python_activations=True)
_ENCODER = Family(python_activations=True)
_VLM = Family(python_activations=True, strict=True, parts=("text_config", "vision_config"))
#: model_type -> row
FAMILIES = {
    "llama": _decoder("llama", "Llama"),
    "mistral": _decoder("mistral", "Mistral"),
    "qwen2": _decoder("qwen2", "Qwen2"),
    "smollm3": _decoder("smollm3", "SmolLM3"),  # Llama with no rotary in every 4th layer
    "qwen3": _decoder("qwen3", "Qwen3"),
    "qwen3_moe": _decoder("qwen3_moe", "Qwen3Moe", experts="Qwen3MoeExperts"),
    "mixtral": _decoder("mixtral", "Mixtral", mlp=False, experts="MixtralExperts"),
    "phi3": _decoder("phi3", "Phi3", gate_position=1),  # fused gate_up: up * act(gate)
    "gemma": _decoder("gemma", "Gemma", one_plus_weight=True),
    "gemma2": _decoder("gemma2", "Gemma2", one_plus_weight=True),
    "gemma3_text": _decoder("gemma3", "Gemma3", one_plus_weight=True),
    "gpt2": _BERT,  # Conv1D projections: linear layers
    "bert": _BERT, "roberta": _BERT, "distilbert": _BERT,
    "vit": _vit("vit", "ViT"), "deit": _vit("deit", "DeiT"),  # 5.x: *MLP; 4.x: *Intermediate / *Output
    "torchvision-vit": Family("torchvision.models.vision_transformer", gamma=("MLPBlock",)),
    # image encoders: transformers' Python activations (quick_gelu, gelu_pytorch_tanh); the
    # towers' pooling heads are the base map's (a selection, nn.MultiheadAttention, a mean)
    "clip": _ENCODER, "clip_vision_model": _ENCODER, "clip_text_model": _ENCODER,
    "siglip": _ENCODER, "siglip_vision_model": _ENCODER, "siglip_text_model": _ENCODER,
    # NaFlex: a linear patch embedding; position embeddings resized (a constant, interpolated);
    # the pooling head's padding mask: a constant of its attention
    "siglip2": _ENCODER, "siglip2_vision_model": _ENCODER, "siglip2_text_model": _ENCODER,
    "dinov2": _ENCODER,
    # VLMs: the rows of their language model and vision tower (read off config.text_config /
    # vision_config); image features enter the text stream by masked_scatter, a data movement
    # whose gradient routes relevance unchanged (lxt.core.dispatch.COMPATIBLE)
    "llava": _VLM, "llava_next": _VLM, "paligemma": _VLM, "idefics3": _VLM, "smolvlm": _VLM,
    "gemma3": _VLM,  # Gemma3ForConditionalGeneration: gemma3_text + siglip_vision_model
    "qwen2_vl": _VLM, "qwen2_5_vl": _VLM,
    # their towers and language models where they have classes of their own
    "idefics3_vision": _ENCODER, "smolvlm_vision": _ENCODER,  # the pixel shuffle: reshapes
    "qwen2_vl_text": Family(_HF.format("qwen2_vl"), "Qwen2VLRMSNorm", mlp="Qwen2MLP"),
    "qwen2_vl_vision": _ENCODER,  # vision rotary: products with constants; the patch merger: an MLP
    "qwen2_5_vl_text": Family(_HF.format("qwen2_5_vl"), "Qwen2_5_VLRMSNorm", mlp="Qwen2MLP"),
    "qwen2_5_vl_vision": Family(_HF.format("qwen2_5_vl"), "Qwen2_5_VLRMSNorm", mlp="Qwen2_5_VLMLP",
                                python_activations=True),  # gated vision MLP
    "torch": Family(),  # models built from torch modules (nn.MultiheadAttention, ...): the base map
    "structural": Family(python_activations=True, strict=True),  # read off the model: structural.py
}


def _class(family: Family, name: str, model_type: str):
    cls = getattr(importlib.import_module(family.module), name, None)
    if cls is None:
        import transformers

        raise ValueError(f"lxt: the {model_type} table needs {name} from {family.module}, which transformers "
                         f"{transformers.__version__} does not have (the table is written for transformers 5).")
    return cls


def _named(fn, name):
    fn.__name__ = fn.__qualname__ = name
    return fn


def with_epsilon(value, epsilon):
    """``value`` with its stabiliser set to ``epsilon`` (``value`` itself for the default): a
    Rule class is instantiated, an lxt module class gets a factory, a functional its keyword."""
    if epsilon is None:
        return value
    if isinstance(value, type) and issubclass(value, Rule):
        return value(epsilon)
    if isinstance(value, type) and hasattr(value, "from_module"):
        return _named(lambda module: value.from_module(module, epsilon=epsilon),
                      f"{value.__name__}[epsilon={epsilon:g}]")

    def wrapped(*args, **kwargs):
        kwargs.setdefault("epsilon", epsilon)
        return value(*args, **kwargs)

    wrapped.__doc__, wrapped.__wrapped__ = value.__doc__, value
    return _named(wrapped, f"{value.__name__}[epsilon={epsilon:g}]")


def rms_norm_module(module):
    """RMSNorm -> :class:`lxt.modules.RMSNormIdentity` (weight shared)."""
    return lm.RMSNormIdentity.from_module(module)


def identity_module(module):
    """Any elementwise-scaling module under the identity rule, its own forward kept."""
    return module if isinstance(module, LxtModule) else IdentityRule()(module)


def multihead_attention(cp: bool = False, epsilon=None):
    """``nn.MultiheadAttention`` -> :class:`lxt.modules.MultiheadAttention` (parameters shared)."""
    name = f"MultiheadAttention[{'cp-lrp' if cp else 'attnlrp'}{'' if epsilon is None else f', epsilon={epsilon:g}'}]"
    return _named(lambda module: lm.MultiheadAttention.from_module(module, cp=cp, epsilon=epsilon), name)


def experts_module(cp: bool, epsilon=None):
    """MoE experts (transformers 5 layout) -> :class:`lxt.modules.MoEExperts` (weights shared)."""
    kw = {} if epsilon is None else {"epsilon": epsilon}
    return _named(lambda module: lm.MoEExperts.from_module(module, cp=cp, **kw), "MoEExperts" + ("[cp]" if cp else ""))


def detached_mul(position: int):
    """CP-LRP gated MLP: the product with the gate (factor ``position``) a constant."""
    return _named(lambda a, b: lf.mul2(a.detach(), b) if position == 0 else lf.mul2(a, b.detach()),
                  f"gate_detached_mul[{position}]")


def python_activations() -> tuple:
    """transformers' activation modules that compute their formula in Python (``gelu_new``,
    ``quick_gelu``, ...): identity on the whole module.  Those that call one torch function
    (``GELUActivation``) are left to the call entries."""
    from transformers import activations

    names = ("NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "AccurateGELUActivation",
             "MishActivation", "LaplaceActivation", "ReLUSquaredActivation", "ClippedGELUActivation",
             "GELUTanh", "PytorchGELUTanh")
    return tuple(getattr(activations, n) for n in names if hasattr(activations, n))


def base_map(cp: bool = False, epsilon=None) -> dict:
    """Modules and calls every table maps (after the family's own entries)."""
    eps = lambda value: with_epsilon(value, epsilon)
    kw = {} if epsilon is None else {"epsilon": epsilon}
    from transformers.pytorch_utils import Conv1D

    table = {cls: eps(EpsilonRule) for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D, nn.AvgPool2d)}
    table.update({
        nn.LayerNorm: eps(lm.LayerNormEpsilon),
        nn.MultiheadAttention: multihead_attention(cp, epsilon),
        nn.GELU: lm.GELUIdentity, nn.SiLU: lm.SiLUIdentity, nn.ReLU: lm.ReLUIdentity, nn.Tanh: lm.TanhIdentity,
        # attention: fused, and eager matmul -> softmax -> matmul
        F.scaled_dot_product_attention: eps(lf.scaled_dot_product_attention_cp if cp
                                            else lf.scaled_dot_product_attention),
        F.softmax: lf.detached_softmax if cp else lf.softmax,
        torch.matmul: eps(lf.matmul), torch.bmm: eps(lf.matmul),
        torch.baddbmm: UniformEpsilonRule(**kw),  # bias + q @ k^T (ALiBi): the bias absorbs its share
        F.linear: eps(lf.linear_epsilon),  # with a weight tensor (MoE routers, fused projections)
        F.layer_norm: eps(lf.layer_norm), F.rms_norm: lf.rms_norm, F.normalize: lf.normalize,
        F.silu: lf.silu, F.gelu: lf.gelu, F.relu: lf.relu, torch.tanh: lf.tanh,
        torch.add: eps(lf.add2),  # in place too: the rule runs on a copy, written back (lxt.core.dispatch)
        torch.mul: lf.mul2,
        torch.neg: IdentityRule,  # rotate_half: -x carries x's relevance, not -R
        torch.mean: eps(lf.mean),  # mean pooling (DINOv2's classifier): epsilon on a sum / N
        torch.div: lf.div,  # a / b: identity on a, the divisor a constant (x / x.norm(), e / e.sum())
    })
    return table


def layer_map(family: str = "llama", method: str = "attnlrp", epsilon=None, *, model=None,
              conv_gamma: float = CONV_GAMMA, mlp_gamma: float = MLP_GAMMA) -> dict:
    """The table of ``family`` (a key of :data:`FAMILIES`) for ``method`` (``"attnlrp"`` or
    ``"cp_lrp"``): the family's entries (and those of the rows its ``parts`` name), then the
    base map (first match wins).  ``epsilon`` sets the stabiliser of every epsilon-family rule
    (default :data:`lxt.rules.EPSILON`); the structural family, and a row with ``parts``, read
    their entries off ``model``."""
    if family not in FAMILIES:
        raise ValueError(f"lxt: no table for {family!r}; known: {', '.join(FAMILIES)}.")
    if method not in ("attnlrp", "cp_lrp", "cp-lrp"):
        raise ValueError(f"lxt: method is 'attnlrp' or 'cp_lrp', got {method!r}.")
    table = _entries(family, method != "attnlrp", epsilon, model, (conv_gamma, mlp_gamma))
    return {**table, **{k: v for k, v in base_map(method != "attnlrp", epsilon).items() if k not in table}}


def part_families(family: str, model) -> list:
    """``[(part, row key)]``: the rows of ``family``'s sub-models (``"structural"`` for a
    sub-model no row names), read off ``model.config``."""
    row = FAMILIES[family]
    if not row.parts:
        return []
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"lxt: the {family} table joins the rows of its sub-models ({', '.join(row.parts)}), "
                         "read off the model: pass model=.")
    out = []
    for part in row.parts:
        sub = getattr(config, part, None)
        sub_type = getattr(sub, "model_type", None)
        if sub_type is None:
            continue
        out.append((part, sub_type if sub_type in FAMILIES and sub_type not in ("structural", "torch")
                    else "structural"))
    return out


def _entries(family, cp, epsilon, model, gammas) -> dict:
    """The entries of ``family``'s row (before the base map), then those of its parts."""
    row, table = FAMILIES[family], {}
    kw = {} if epsilon is None else {"epsilon": epsilon}
    if row.gamma:
        mlps = [getattr(importlib.import_module(row.module), n, None) for n in row.gamma]
        table[nn.Conv2d] = GammaRule(gamma=gammas[0], **kw)
        table.update({(mlp, nn.Linear): GammaRule(gamma=gammas[1], **kw) for mlp in mlps if mlp is not None})
    if row.norm:
        table[_class(row, row.norm, family)] = identity_module if row.one_plus_weight else rms_norm_module
    if row.experts:
        table[_class(row, row.experts, family)] = experts_module(cp, epsilon)
    if row.mlp and cp:
        for name in (row.mlp,) if isinstance(row.mlp, str) else row.mlp:
            table[(_class(row, name, family), torch.mul)] = detached_mul(row.gate_position)
    if family == "structural":
        from .structural import detected

        if model is None:
            raise ValueError("lxt: the structural table is read off a model: pass model=.")
        table.update(detected(model, identity_module, experts_module(cp, epsilon)))
    table.update({cls: identity_module for cls in python_activations()} if row.python_activations else {})
    for _, key in part_families(family, model):
        for k, v in _entries(key, cp, epsilon, model, gammas).items():
            table.setdefault(k, v)
    return table
