"""Published ``lxt.explicit.models`` (copies of transformers' modelling files, e.g.
``lxt.explicit.models.llama.LlamaForCausalLM`` with its ``attnlrp`` / ``cp_lrp`` composites):
replaced by the stock transformers classes and :mod:`lxt.composites`."""
raise ImportError(
    "lxt: lxt.explicit.models (the published copies of transformers' modelling files, e.g. "
    "lxt.explicit.models.llama.LlamaForCausalLM and its attnlrp / cp_lrp) is gone; load the "
    "stock class (transformers.LlamaForCausalLM.from_pretrained(...)) and use `with "
    "lxt.composites.attnlrp(model).context(model):` or cp_lrp(model) (see docs/migration.md)."
)
